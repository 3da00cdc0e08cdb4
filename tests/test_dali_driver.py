"""The DALI driver against the simulated DALI line behind both serial interface emulators, over
real pseudo-terminals: every point source reads the simulator's truth, writes with and without
fade, group and broadcast frames, dead gear, lamp failure, bus power, pre-emption of a bank read
by a command through the real bus worker, and configuration errors."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_profile
from agent.scheduler import BusWorker, Priority
from agent.sdk import (
    BusSpec,
    ConfigError,
    ConfigTable,
    DeviceSpec,
    DeviceUnreachable,
    FatalDriverError,
    PointSpec,
    Profile,
    Quality,
    Reading,
)
from drivers.dali import DaliDriver, codec, interface
from drivers.dali import driver as driver_module
from drivers.dali.interfaces import foxtron, sci2
from firmware_sim.dali import ControlGear, DaliLine
from firmware_sim.dali.interfaces import EMULATORS, InterfaceEmulator

REPO = Path(__file__).resolve().parent.parent
PROFILE_FILE = REPO / "config" / "profiles" / "dali-d4i-led.toml"
TEST_BOUND_S = 20.0
TIME_SCALE = 0.02
BOTH = pytest.mark.parametrize("kind", ["foxtron", "sci2"])


@pytest.fixture(autouse=True)
def _short_timeouts(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(foxtron, "RESPONSE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(sci2, "RESPONSE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(interface, "AFTER_FAILURE_QUIET_S", 0.1)
    yield


def dali_profile() -> Profile:
    return load_profile(PROFILE_FILE, {"dali": DaliDriver})


class Context:
    """What the runtime gives a driver, recording what the driver reports. ``worker`` (when
    set) answers ``checkpoint`` as the runtime does."""

    logger = logging.getLogger("test.dali")

    def __init__(self) -> None:
        self.events: list[tuple[str, str | None, dict[str, Any]]] = []
        self.emitted: list[Reading] = []
        self.worker: BusWorker | None = None

    def emit(self, readings: Sequence[Reading]) -> None:
        self.emitted.extend(readings)

    def event(self, kind: str, device: str | None, detail: Mapping[str, Any]) -> None:
        self.events.append((kind, device, dict(detail)))

    def device_silent(self, device: str, reason: str) -> None:
        self.events.append(("device_offline", device, {"reason": reason}))

    async def checkpoint(self) -> bool:
        return await self.worker.checkpoint() if self.worker is not None else False


def bus_spec(kind: str, path: str, **extra: Any) -> BusSpec:
    options = {"interface": kind, "device": path, **extra}
    return BusSpec("dali-1", "dali", ConfigTable(options, "test.toml", "buses.dali-1"))


def device_spec(
    device_id: str, address: int, groups: Sequence[int] = (), profile: Profile | None = None
) -> DeviceSpec:
    options: dict[str, Any] = {"address": address}
    if groups:
        options["groups"] = list(groups)
    table = ConfigTable(options, "test.toml", f"devices.{device_id}")
    return DeviceSpec(device_id, "dali-1", profile or dali_profile(), 1000.0, table)


@dataclass
class Rig:
    line: DaliLine
    emulator: InterfaceEmulator
    driver: DaliDriver
    context: Context
    devices: dict[str, DeviceSpec] = field(default_factory=dict)

    def points(self, *names: str) -> list[PointSpec]:
        profile = next(iter(self.devices.values())).profile
        return [profile.points[n] for n in names] if names else list(profile.points.values())

    async def read(self, device_id: str, *names: str) -> dict[str, Reading]:
        readings = await self.driver.read(self.devices[device_id], self.points(*names))
        return {r.point: r for r in readings}

    async def sync(self) -> None:
        """Wait until the line has carried every frame sent so far: an SCI2 confirms a command
        before sending it on the bus, but carries frames in order, so one query is enough."""
        device = next(iter(self.devices.values()))
        await self.driver.read(device, self.points("lamp_on"))

    def dapc_frames(self) -> list[int]:
        return [r.frame for r in self.line.history if r.command == "DAPC"]


@asynccontextmanager
async def rig(
    kind: str,
    line: DaliLine,
    gear: Mapping[str, tuple[int, Sequence[int]]],
    **bus_options: Any,
) -> AsyncIterator[Rig]:
    emulator = EMULATORS[kind](line)
    path = await emulator.start()
    profile = dali_profile()
    devices = {d: device_spec(d, a, g, profile) for d, (a, g) in gear.items()}
    context = Context()
    driver = DaliDriver(bus_spec(kind, path, **bus_options), list(devices.values()), context)
    try:
        await driver.connect()
        yield Rig(line, emulator, driver, context, devices)
    finally:
        await driver.close()
        await driver.close()  # idempotent
        await emulator.stop()


def lamps(count: int) -> dict[str, tuple[int, Sequence[int]]]:
    return {f"lamp-{i}": (i, ()) for i in range(count)}


# --------------------------------------------------------------------------------------------
# Reads
# --------------------------------------------------------------------------------------------


@BOTH
def test_every_source_reads_the_simulators_truth(kind: str) -> None:
    async def body() -> None:
        gear = [
            ControlGear(short_address=0, level=200, energy_wh=1234.0, seed=1),
            ControlGear(
                short_address=1,
                level=120,
                energy_wh=50_000.0,
                operating_time_s=7200.0,
                gear_starts=17,
                seed=2,
            ),
        ]
        line = DaliLine(gear, time_scale=TIME_SCALE)
        async with rig(kind, line, lamps(2)) as r:
            target = gear[1]
            readings = await r.read("lamp-1")
            assert all(reading.quality is Quality.GOOD for reading in readings.values()), readings
            truth = target.counters()
            assert readings["level"].value == pytest.approx(codec.arc_to_percent(120), abs=1e-3)
            assert readings["level"].unit == "%"
            assert readings["status"].value == target.status()
            assert readings["lamp_on"].value is True
            assert readings["lamp_failure"].value is False
            assert readings["gear_failure"].value is False
            assert readings["led_failure"].value == 0
            # Counters advance with line time (100x real time here): compare with a margin.
            energy = readings["active_energy"].value
            assert isinstance(energy, int | float)
            assert 50_000 <= energy <= truth["energy_wh"]
            assert readings["active_power"].value == pytest.approx(target.power_w, abs=0.2)
            assert readings["active_power"].unit == "W"
            operating = readings["operating_time"].value
            assert isinstance(operating, int)
            assert 7200 <= operating <= truth["operating_time_s"]
            assert readings["start_count"].value == target.gear_starts == 17
            temperature = readings["gear_temperature"].value
            assert isinstance(temperature, int)
            assert abs(temperature - truth["temperature_c"]) <= 1
            assert readings["gear_failure_count"].value == 0
            assert readings["light_failure_count"].value == 0
            assert readings["light_short_circuit"].value is False
            # The other lamp is read on its own and gives its own level.
            other = await r.read("lamp-0", "level")
            assert other["level"].value == pytest.approx(codec.arc_to_percent(200), abs=1e-3)
            device_type = PointSpec("dt", "", False, None, _table({"source": "device_type"}, "p"))
            [reading] = await r.driver.read(r.devices["lamp-0"], [device_type])
            assert reading.value == codec.DEVICE_TYPE_LED

    asyncio.run(asyncio.wait_for(body(), TEST_BOUND_S))


def test_status_bits_cost_one_query_and_each_bank_one_plan() -> None:
    async def body() -> None:
        line = DaliLine.random(1, seed=3, time_scale=TIME_SCALE)
        async with rig("foxtron", line, lamps(1)) as r:
            await r.read("lamp-0", "lamp_failure", "gear_failure", "lamp_on", "status")
            assert line.frames_by_command["QueryStatus"] == 1
            assert line.transactions == 1
            before = line.frames_by_command["DTR1"]
            await r.read("lamp-0", "active_energy", "active_power")
            assert line.frames_by_command["DTR1"] == before + 1  # one bank plan for both fields

    asyncio.run(asyncio.wait_for(body(), TEST_BOUND_S))


@BOTH
def test_lamp_failure_and_led_failure(kind: str) -> None:
    async def body() -> None:
        line = DaliLine.random(2, seed=4, time_scale=TIME_SCALE)
        async with rig(kind, line, lamps(2)) as r:
            line.gear[0].fail_lamp()
            failed = await r.read("lamp-0", "lamp_failure", "led_failure", "level")
            assert failed["lamp_failure"].value is True
            assert failed["led_failure"].value == line.gear[0].led_failure_status != 0
            assert codec.LedFailureStatus.from_byte(
                int(failed["led_failure"].value or 0)
            ).open_circuit
            # QUERY ACTUAL LEVEL answers MASK while the lamp is failed: no level to report.
            assert failed["level"].quality is Quality.BAD
            assert (await r.read("lamp-1", "lamp_failure"))["lamp_failure"].value is False
            line.gear[0].repair_lamp()
            repaired = await r.read("lamp-0", "lamp_failure", "led_failure")
            assert repaired["lamp_failure"].value is False
            assert repaired["led_failure"].value == 0

    asyncio.run(asyncio.wait_for(body(), TEST_BOUND_S))


@BOTH
def test_dead_gear_is_unreachable_while_the_others_answer(kind: str) -> None:
    async def body() -> None:
        line = DaliLine.random(3, seed=5, time_scale=TIME_SCALE)
        async with rig(kind, line, lamps(3)) as r:
            line.gear[1].kill()
            before = line.transactions
            with pytest.raises(DeviceUnreachable, match="short address 1"):
                await r.read("lamp-1")
            # Found out with the first query and one presence check, not a whole bank read.
            assert line.transactions - before == 2
            alive = await r.read("lamp-2")
            assert all(x.quality is Quality.GOOD for x in alive.values())
            line.gear[1].revive()
            assert (await r.read("lamp-1", "lamp_on"))["lamp_on"].quality is Quality.GOOD

    asyncio.run(asyncio.wait_for(body(), TEST_BOUND_S))


def test_gear_without_d4i_banks_gives_bad_bank_points_only() -> None:
    async def body() -> None:
        line = DaliLine([ControlGear(short_address=0, d4i=False, seed=9)], time_scale=TIME_SCALE)
        async with rig("sci2", line, lamps(1)) as r:
            readings = await r.read("lamp-0", "level", "active_energy", "gear_temperature")
            assert readings["level"].quality is Quality.GOOD
            assert readings["active_energy"].quality is Quality.BAD
            assert readings["gear_temperature"].quality is Quality.BAD

    asyncio.run(asyncio.wait_for(body(), TEST_BOUND_S))


@BOTH
def test_bus_power_lost_and_back_are_events(kind: str) -> None:
    async def body() -> None:
        line = DaliLine.random(2, seed=6, time_scale=TIME_SCALE)
        async with rig(kind, line, lamps(2)) as r:
            line.power_off()
            with pytest.raises(DeviceUnreachable, match=r"power|short circuit"):
                await r.read("lamp-0", "level")
            raised = [e for e in r.context.events if e[0] == "dali_bus_power"]
            assert raised == [("dali_bus_power", None, {**raised[0][2], "state": "raised"})]
            assert raised[0][2]["bus"] == "dali-1"
            health = r.driver.health()
            assert isinstance(health, driver_module.DaliBusHealth)
            assert health.bus_power_ok is False
            line.power_on()
            assert (await r.read("lamp-0", "lamp_on"))["lamp_on"].quality is Quality.GOOD
            states = [e[2]["state"] for e in r.context.events if e[0] == "dali_bus_power"]
            assert states == ["raised", "cleared"]
            assert r.driver.health().as_dict()["bus_power_ok"] is True

    asyncio.run(asyncio.wait_for(body(), TEST_BOUND_S))


# --------------------------------------------------------------------------------------------
# Writes
# --------------------------------------------------------------------------------------------


@BOTH
def test_write_with_and_without_fade(kind: str) -> None:
    async def body() -> None:
        line = DaliLine.random(2, seed=7, time_scale=TIME_SCALE)
        async with rig(kind, line, lamps(2)) as r:
            device, level = r.devices["lamp-1"], r.points("level")[0]
            await r.driver.write(device, level, 50.0)
            await r.sync()
            assert line.gear[1].target_level == codec.percent_to_arc(50.0)
            assert line.frames_by_command["SetFadeTime"] == 0  # the gear's own fade time
            assert line.gear[0].target_level == 254  # the other lamp is untouched

            await r.driver.write(device, level, 20.0, fade_s=2.0)
            await r.sync()
            assert line.gear[1].fade_time == codec.fade_time_code(2.0)
            assert line.frames_by_command["SetFadeTime"] == 2  # sent twice
            assert line.gear[1].target_level == codec.percent_to_arc(20.0)
            await r.driver.write(device, level, 30.0, fade_s=2.0)
            assert line.frames_by_command["SetFadeTime"] == 2  # already set: not again

            # Without a fade asked for, the fade time Lampyre gave is taken back.
            await r.driver.write(device, level, 0.0)
            await r.sync()
            assert line.gear[1].fade_time == 0
            assert line.gear[1].target_level == 0
            await asyncio.sleep(0.05)
            off = await r.read("lamp-1", "level", "lamp_on")
            assert off["level"].value == 0.0
            assert off["lamp_on"].value is False

            with pytest.raises(ValueError, match="percent"):
                await r.driver.write(device, level, 120.0)
            with pytest.raises(ValueError, match="fade"):
                await r.driver.write(device, level, 10.0, fade_s=500.0)
            with pytest.raises(FatalDriverError):
                await r.driver.write(device, r.points("lamp_on")[0], 1)

    asyncio.run(asyncio.wait_for(body(), TEST_BOUND_S))


@BOTH
def test_write_many_uses_group_and_broadcast_frames(kind: str) -> None:
    async def body() -> None:
        line = DaliLine.random(4, seed=8, time_scale=TIME_SCALE, groups={0: [3], 1: [3], 2: [5]})
        gear = {"lamp-0": (0, [3]), "lamp-1": (1, [3]), "lamp-2": (2, [5]), "lamp-3": (3, [])}
        async with rig(kind, line, gear) as r:
            level = r.points("level")[0]

            def targets(*ids: str) -> list[tuple[DeviceSpec, PointSpec]]:
                return [(r.devices[i], level) for i in ids]

            assert await r.driver.write_many(targets(*gear), 40.0) == {}
            await r.sync()
            assert r.dapc_frames() == [0xFE00 | codec.percent_to_arc(40.0)]
            assert {g.target_level for g in line.gear} == {codec.percent_to_arc(40.0)}

            assert await r.driver.write_many(targets("lamp-0", "lamp-1"), 60.0, fade_s=1.0) == {}
            await r.sync()
            group_frames = r.dapc_frames()[1:]
            assert group_frames == [(0x80 | 3 << 1) << 8 | codec.percent_to_arc(60.0)]
            assert line.frames_by_command["SetFadeTime"] == 2  # once, to the group
            assert [g.target_level for g in line.gear[:2]] == [codec.percent_to_arc(60.0)] * 2
            assert line.gear[2].target_level == codec.percent_to_arc(40.0)
            assert line.gear[0].fade_time == line.gear[1].fade_time == codec.fade_time_code(1.0)

            # Not a configured group: one frame per gear.
            assert await r.driver.write_many(targets("lamp-0", "lamp-2"), 10.0) == {}
            await r.sync()
            per_gear = r.dapc_frames()[2:]
            assert [f >> 8 for f in per_gear] == [0x00, 0x04]

            # A point that cannot be written fails alone.
            mixed = [*targets("lamp-3"), (r.devices["lamp-2"], r.points("status")[0])]
            failures = await r.driver.write_many(mixed, 70.0)
            await r.sync()
            assert list(failures) == ["lamp-2"]
            assert line.gear[3].target_level == codec.percent_to_arc(70.0)

    asyncio.run(asyncio.wait_for(body(), TEST_BOUND_S))


# --------------------------------------------------------------------------------------------
# Pre-emption through the real bus worker
# --------------------------------------------------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.polled = asyncio.Event()

    def submit(self, readings: Sequence[Reading]) -> None:
        self.readings.extend(readings)
        self.polled.set()


@BOTH
def test_a_command_preempts_a_bank_read_which_restarts(kind: str) -> None:
    async def body() -> None:
        line = DaliLine([ControlGear(short_address=0, gear_starts=42, seed=11)], time_scale=0.05)
        emulator = EMULATORS[kind](line)
        path = await emulator.start()
        context = Context()
        device = device_spec("lamp-0", 0)
        driver = DaliDriver(bus_spec(kind, path), [device], context)
        sink = Sink()
        worker = BusWorker(driver, [device], sink, lambda *args: None)
        context.worker = worker
        task = asyncio.create_task(worker.run())
        try:
            while line.frames_by_command["ReadMemoryLocation"] < 4:
                await asyncio.sleep(0.001)
            submitted_at = line.transactions
            level = device.profile.points["level"]
            await worker.submit(Priority.COMMAND, lambda d: d.write(device, level, 25.0))
            [back] = await worker.submit(Priority.COMMAND, lambda d: d.read(device, [level]))
            assert back.value == pytest.approx(
                codec.arc_to_percent(codec.percent_to_arc(25.0)), abs=1e-3
            )
            history = list(line.history)
            dapc = next(i for i, rec in enumerate(history) if rec.command == "DAPC")
            # The command went out right after the transaction that was on the wire.
            assert dapc - submitted_at <= 1
            assert line.gear[0].target_level == codec.percent_to_arc(25.0)
            # The bank read started again: DTR1 (bank select) right after the command.
            assert history[dapc + 1].command == "DTR1"
            await asyncio.wait_for(sink.polled.wait(), 10)
            readings = {r.point: r for r in sink.readings}
            assert readings["start_count"].value == 42
            assert readings["start_count"].quality is Quality.GOOD
            assert isinstance(readings["gear_temperature"].value, int)
            # Every latch was released in the end (a query makes sure the line carried all).
            lamp_on = device.profile.points["lamp_on"]
            await worker.submit(Priority.COMMAND, lambda d: d.read(device, [lamp_on]))
            assert all(bank.snapshot is None for bank in line.gear[0]._banks.values())
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await emulator.stop()

    asyncio.run(asyncio.wait_for(body(), TEST_BOUND_S))


# --------------------------------------------------------------------------------------------
# Metrics, lifecycle, configuration
# --------------------------------------------------------------------------------------------


def test_metrics_are_emitted_as_readings_of_the_bus() -> None:
    async def body() -> None:
        line = DaliLine.random(2, seed=12, time_scale=TIME_SCALE)
        async with rig("foxtron", line, lamps(2), metrics_interval_s=0.2) as r:
            runner = asyncio.create_task(r.driver.run())
            try:
                for _ in range(10):
                    await r.read("lamp-0", "level", "status")
                while not r.context.emitted:
                    await asyncio.sleep(0.02)
            finally:
                runner.cancel()
                await asyncio.gather(runner, return_exceptions=True)
            by_point = {x.point: x for x in r.context.emitted}
            assert {x.device for x in r.context.emitted} == {"dali-1"}
            assert by_point["transactions_per_s"].unit == "1/s"
            rate = by_point["transactions_per_s"].value
            assert isinstance(rate, float) and rate > 0
            utilisation = by_point["utilisation"].value
            assert isinstance(utilisation, float) and 0 < utilisation <= 100
            assert r.driver.health().transactions == line.transactions == 20

    asyncio.run(asyncio.wait_for(body(), TEST_BOUND_S))


def test_theoretical_rate_derivation() -> None:
    assert pytest.approx(0.0166, abs=1e-4) == driver_module.FORWARD_FRAME_S
    assert pytest.approx(0.0455, abs=1e-4) == driver_module.ANSWERED_TRANSACTION_S
    assert pytest.approx(0.0301, abs=1e-4) == driver_module.SILENT_TRANSACTION_S
    assert 26 < driver_module.MAX_TRANSACTIONS_PER_S < 27


def test_connect_to_a_missing_port_is_bus_unavailable(tmp_path: Path) -> None:
    async def body() -> None:
        driver = DaliDriver(
            bus_spec("foxtron", str(tmp_path / "nope")), [device_spec("l", 0)], Context()
        )
        with pytest.raises(Exception, match="nope") as info:
            await driver.connect()
        assert type(info.value).__name__ == "BusUnavailable"
        assert driver.health().connected is False
        await driver.close()

    asyncio.run(asyncio.wait_for(body(), TEST_BOUND_S))


def _table(data: dict[str, Any], path: str) -> ConfigTable:
    return ConfigTable(data, "cab.toml", path, key_lines={k: 7 for k in data})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"interface": "acme", "device": "/dev/x"}, "interface: no DALI interface named 'acme'"),
        ({"interface": "sci2"}, "missing key 'device'"),
        ({"interface": "sci2", "device": "/dev/x", "speed": 1}, "speed: unknown key"),
        ({"interface": "sci2", "device": "/dev/x", "metrics_interval_s": 0}, "above 0"),
    ],
)
def test_bus_validation(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        DaliDriver.validate_bus(BusSpec("b", "dali", _table(options, "buses.b")))
    assert "cab.toml" in str(info.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "missing key 'address'"),
        ({"address": 64}, "0 to 63"),
        ({"address": 1, "groups": [16]}, "groups 0..15"),
        ({"address": 1, "groups": [1, 1]}, "twice"),
        ({"address": 1, "unit": 3}, "unit: unknown key"),
    ],
)
def test_device_validation(options: dict[str, Any], message: str) -> None:
    spec = DeviceSpec("d", "b", dali_profile(), 1.0, _table(options, "devices.d"))
    with pytest.raises(ConfigError, match=message):
        DaliDriver.validate_device(spec)


@pytest.mark.parametrize(
    ("options", "writable", "message"),
    [
        ({"source": "brightness"}, False, "expected one of level"),
        ({"source": "bank999.x"}, False, "no memory bank 999"),
        ({"source": "bank202.nope"}, False, "bank 202 has no field 'nope'"),
        ({"source": "status"}, True, "only a 'level' point can be writable"),
        ({"source": "level", "kind": "x"}, False, "kind: unknown key"),
    ],
)
def test_point_validation(options: dict[str, Any], writable: bool, message: str) -> None:
    point = PointSpec("p", "", writable, None, _table(options, "points.p"))
    with pytest.raises(ConfigError, match=message) as info:
        DaliDriver.validate_point(point)
    assert "cab.toml:7" in str(info.value)


def test_every_bank_field_is_a_valid_source() -> None:
    for number, bank in driver_module.memory.BANKS.items():
        for f in bank.fields:
            point = PointSpec(
                "p", f.unit, False, None, _table({"source": f"bank{number}.{f.name}"}, "p")
            )
            DaliDriver.validate_point(point)
    assert math.isfinite(driver_module.MAX_TRANSACTIONS_PER_S)


def test_the_example_configuration_is_valid() -> None:
    from agent.config import load_config
    from drivers.modbus import ModbusDriver

    config = load_config(
        REPO / "config" / "examples" / "cabinet-dali.toml",
        {"dali": DaliDriver, "modbus": ModbusDriver},
    )
    assert config.buses["dali-1"].driver == "dali"
    lamps = {d.id for d in config.devices.values() if d.bus == "dali-1"}
    assert {config.devices[i].profile.name for i in lamps} == {"dali-d4i-led"}
    # Every lamp is on the switched circuit, read from the cabinet's I/O module.
    assert set(config.circuits["street"].feeds) == lamps
    assert config.circuits["street"].device == "cabinet-io"
