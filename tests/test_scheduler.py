"""Bus workers: one transaction at a time, commands ahead of polls, offline devices backed off
without stalling the others, reconnection after a lost link.

The driver here is a test double that subclasses the real Driver interface and records the order
of the calls the worker makes; Modbus on the wire is covered by the driver and end-to-end tests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from agent import scheduler
from agent.scheduler import BusDown, BusWorker, Priority
from agent.sdk import (
    BusHealth,
    BusSpec,
    BusUnavailable,
    ConfigTable,
    DeviceSpec,
    DeviceUnreachable,
    Driver,
    PointSpec,
    Profile,
    Quality,
    Reading,
)

TRANSACTION_S = 0.02


def table() -> ConfigTable:
    return ConfigTable(data={}, file="test.toml")


POINT = PointSpec("level", "%", True, None, table())
PROFILE = Profile("test", "recording", {"level": POINT}, "test.toml")


def device(name: str, interval_s: float = 0.05) -> DeviceSpec:
    return DeviceSpec(name, "bus", PROFILE, interval_s, table())


class RecordingDriver(Driver):
    name = "recording"

    @classmethod
    def validate_bus(cls, bus: BusSpec) -> None: ...

    @classmethod
    def validate_point(cls, point: PointSpec) -> None: ...

    @classmethod
    def validate_device(cls, device: DeviceSpec) -> None: ...

    def __init__(self, devices: Sequence[DeviceSpec]) -> None:
        super().__init__(BusSpec("bus", "recording", table()), devices, None)  # type: ignore[arg-type]
        self.calls: list[str] = []
        self.active = 0
        self.max_active = 0
        self.dead: set[str] = set()
        self.connects = 0
        self.refuse_connect = False
        self.lose_link = False

    async def connect(self) -> None:
        if self.refuse_connect:
            raise BusUnavailable("refused")
        self.connects += 1

    async def close(self) -> None:
        return

    async def _transaction(self, label: str) -> None:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.calls.append(label)
        try:
            await asyncio.sleep(TRANSACTION_S)
        finally:
            self.active -= 1

    async def read(self, device: DeviceSpec, points: Sequence[PointSpec]) -> list[Reading]:
        if self.lose_link:
            raise BusUnavailable("cable cut")
        await self._transaction(f"read {device.id}")
        if device.id in self.dead:
            raise DeviceUnreachable("no answer")
        return [Reading(device.id, p.name, 1, p.unit, 0) for p in points]

    async def write(
        self,
        device: DeviceSpec,
        point: PointSpec,
        value: float | int | bool,
        *,
        fade_s: float | None = None,
    ) -> None:
        await self._transaction(f"write {device.id}")

    def health(self) -> BusHealth:
        return BusHealth(connected=True)


class Sink:
    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.events: list[tuple[str, str | None, str]] = []

    def submit(self, readings: Sequence[Reading]) -> None:
        self.readings.extend(readings)

    def __call__(
        self, kind: str, device: str | None, state: str, detail: Mapping[str, Any]
    ) -> None:
        self.events.append((kind, device, state))


async def started(
    driver: RecordingDriver, sink: Sink, devices: list[DeviceSpec]
) -> tuple[BusWorker, asyncio.Task[None]]:
    worker = BusWorker(driver, devices, sink, sink)
    task = asyncio.create_task(worker.run())
    while not worker.connected:
        await asyncio.sleep(0.005)
    return worker, task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_one_transaction_at_a_time_and_commands_jump_the_queue() -> None:
    async def body() -> None:
        devices = [device(f"d{i}", interval_s=0.01) for i in range(8)]
        driver = RecordingDriver(devices)
        worker, task = await started(driver, Sink(), devices)
        try:
            await asyncio.sleep(0.1)  # the poll queue is full: 8 devices at 10 ms, 20 ms a read

            async def job(d: Driver) -> str:
                await d.write(devices[3], POINT, 50)
                return "done"

            mark = len(driver.calls)
            assert await worker.submit(Priority.COMMAND, job) == "done"
            position = driver.calls.index("write d3", mark)
            # At most the transaction already on the wire ran before the command.
            assert position - mark <= 1, driver.calls[mark:]
            assert driver.max_active == 1
        finally:
            await stop(task)

    asyncio.run(asyncio.wait_for(body(), 10))


def test_offline_device_is_backed_off_and_the_others_keep_their_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(scheduler, "OFFLINE_BACKOFF_MAX_S", 0.4)

    async def body() -> None:
        devices = [device("good", 0.05), device("dead", 0.05)]
        driver = RecordingDriver(devices)
        driver.dead.add("dead")
        sink = Sink()
        worker, task = await started(driver, sink, devices)
        try:
            await asyncio.sleep(1.2)
            good = driver.calls.count("read good")
            dead = driver.calls.count("read dead")
            assert good >= 15, driver.calls
            assert dead < good / 2, (good, dead)
            assert ("device_offline", "dead", "raised") in sink.events
            assert worker.state["dead"].online is False and worker.state["good"].online is True
            bad = [r for r in sink.readings if r.device == "dead"]
            assert bad and all(r.quality is Quality.BAD and r.value is None for r in bad)
            driver.dead.clear()
            for _ in range(100):
                if ("device_offline", "dead", "cleared") in sink.events:
                    break
                await asyncio.sleep(0.02)
            assert ("device_offline", "dead", "cleared") in sink.events
        finally:
            await stop(task)

    asyncio.run(asyncio.wait_for(body(), 10))


def test_lost_link_fails_commands_fast_then_reconnects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler, "RECONNECT_BASE_S", 0.01)
    monkeypatch.setattr(scheduler, "RECONNECT_MAX_S", 0.05)

    async def body() -> None:
        devices = [device("d0", 0.02)]
        driver = RecordingDriver(devices)
        sink = Sink()
        worker, task = await started(driver, sink, devices)
        try:
            driver.refuse_connect = True
            driver.lose_link = True
            for _ in range(100):
                if not worker.connected:
                    break
                await asyncio.sleep(0.01)
            assert ("bus_offline", None, "raised") in sink.events

            async def job(d: Driver) -> None:
                await d.write(devices[0], POINT, 1)

            with pytest.raises(BusDown):
                await worker.submit(Priority.COMMAND, job)
            driver.lose_link = False
            driver.refuse_connect = False
            for _ in range(200):
                if worker.connected:
                    break
                await asyncio.sleep(0.01)
            assert worker.connected and driver.connects >= 2
            assert ("bus_offline", None, "cleared") in sink.events
        finally:
            await stop(task)

    asyncio.run(asyncio.wait_for(body(), 10))


class LongReadDriver(RecordingDriver):
    """A read of many transactions that offers the bus to commands between them."""

    worker: BusWorker | None = None
    reestablished = 0

    async def read(self, device: DeviceSpec, points: Sequence[PointSpec]) -> list[Reading]:
        for frame in range(10):
            await self._transaction(f"read {device.id} frame {frame}")
            assert self.worker is not None
            if await self.worker.checkpoint():
                self.reestablished += 1
        return [Reading(device.id, p.name, 1, p.unit, 0) for p in points]


def test_a_command_preempts_a_long_poll_between_two_transactions() -> None:
    async def body() -> None:
        devices = [device("d0", interval_s=0.01)]
        driver = LongReadDriver(devices)
        sink = Sink()
        worker = BusWorker(driver, devices, sink, sink)
        driver.worker = worker
        task = asyncio.create_task(worker.run())
        try:
            while not any("frame 2" in c for c in driver.calls):
                await asyncio.sleep(0.005)

            async def job(d: Driver) -> None:
                await d.write(devices[0], POINT, 50)

            mark = len(driver.calls)
            await worker.submit(Priority.COMMAND, job)
            position = driver.calls.index("write d0", mark)
            assert position - mark <= 1, driver.calls[mark:]
            # The poll it interrupted went on afterwards, told to set its bus state up again.
            assert "frame" in driver.calls[position + 1]
            assert driver.reestablished >= 1
            assert driver.max_active == 1
            # Outside a poll, a checkpoint does nothing.
            assert await worker.checkpoint() is False
        finally:
            await stop(task)

    asyncio.run(asyncio.wait_for(body(), 10))


class SwallowingDriver(RecordingDriver):
    """A read that loses a cancellation, as asyncio.wait_for does on Python 3.11 when the
    cancellation arrives together with the reply (pymodbus uses it)."""

    async def read(self, device: DeviceSpec, points: Sequence[PointSpec]) -> list[Reading]:
        self.calls.append(f"read {device.id}")
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.02)
        return [Reading(device.id, p.name, 1, p.unit, 0) for p in points]


def test_a_swallowed_cancellation_still_stops_the_worker() -> None:
    async def body() -> None:
        devices = [device("d0", interval_s=0.001)]
        driver = SwallowingDriver(devices)
        _worker, task = await started(driver, Sink(), devices)
        while not driver.calls:
            await asyncio.sleep(0.001)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=3)
        assert done, "the worker kept polling after it was cancelled"

    asyncio.run(asyncio.wait_for(body(), 10))


class PushingDriver(RecordingDriver):
    """Values arrive by themselves (subscriptions, advertisements): nothing to poll."""

    def polled_points(self, device: DeviceSpec) -> Sequence[PointSpec]:
        return []


def test_pushed_devices_are_not_polled_and_their_silence_is_an_alarm() -> None:
    async def body() -> None:
        devices = [device("sensor", 0.01)]
        driver = PushingDriver(devices)
        sink = Sink()
        worker, task = await started(driver, sink, devices)
        try:
            await asyncio.sleep(0.2)
            assert driver.calls == []  # not one poll in 20 intervals
            worker.pushed([Reading("sensor", "level", 5, "%", 0)])
            assert worker.state["sensor"].online is True
            assert [r.value for r in sink.readings] == [5]
            worker.silent("sensor", "no advertisement for 300 s")
            worker.silent("sensor", "still nothing")  # raised once, not twice
            assert worker.state["sensor"].online is False
            worker.pushed([Reading("sensor", "level", 6, "%", 0)])
            assert [e for e in sink.events if e[0] == "device_offline"] == [
                ("device_offline", "sensor", "raised"),
                ("device_offline", "sensor", "cleared"),
            ]
        finally:
            await stop(task)

    asyncio.run(asyncio.wait_for(body(), 10))
