"""One worker per bus: one transaction at a time, commands ahead of polling, offline devices
backed off without stalling the others, and the link reconnected with backoff.

The worker is the only code that calls a driver's ``read`` and ``write``, so a driver never has to
arbitrate its own line. Jobs wait in a priority queue: a command submitted while a poll is on the
wire starts right after that one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from agent.backoff import backoff_delay_s
from agent.sdk import (
    BusUnavailable,
    DeviceSpec,
    DeviceUnreachable,
    Driver,
    DriverError,
    FatalDriverError,
    Quality,
    Reading,
    now_ms,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# Timings as module constants so tests can shrink them.
JOB_TIMEOUT_S = 10.0
"""Outer guard on one driver call; drivers have their own, shorter protocol timeouts."""
OFFLINE_AFTER_FAILURES = 2
"""Consecutive failed polls before a device is declared offline: one lost frame is no outage."""
OFFLINE_BACKOFF_MAX_S = 60.0
"""Longest wait between polls of an offline device."""
RECONNECT_BASE_S = 0.5
RECONNECT_MAX_S = 30.0


class Priority(enum.IntEnum):
    """Lower runs first."""

    COMMAND = 0
    POLL = 1


class BusDown(DriverError):
    """The bus is not connected; the job was not attempted."""


class ReadingSink(Protocol):
    def submit(self, readings: Sequence[Reading]) -> None: ...


class EventSink(Protocol):
    def __call__(
        self, kind: str, device: str | None, state: str, detail: Mapping[str, Any]
    ) -> None: ...


@dataclass(slots=True)
class DeviceState:
    """What the worker knows about one device."""

    online: bool | None = None
    """None until the first poll answered or failed enough times to decide."""
    failures: int = 0
    last_ok_ms: int | None = None
    last_error: str | None = None
    last_readings: dict[str, Reading] = field(default_factory=dict)
    polls: int = 0


@dataclass(slots=True)
class _Job:
    priority: int
    order: int
    run: Callable[[], Awaitable[Any]] = field(compare=False)
    done: asyncio.Future[Any] = field(compare=False)


def _raise_if_cancelled() -> None:
    """Re-raise a cancellation that library code swallowed.

    On Python 3.11, ``asyncio.wait_for`` (used inside pymodbus) loses a cancellation that
    arrives as its inner future completes: the driver call returns normally and the worker would
    go on polling while the agent waits for it to stop. The task still counts the request
    (``Task.cancelling()``), so the worker checks it between jobs.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class BusWorker:
    """Owns one driver: connects it, polls its devices, runs submitted commands."""

    def __init__(
        self,
        driver: Driver,
        devices: Sequence[DeviceSpec],
        readings: ReadingSink,
        events: EventSink,
        powered: Callable[[str], bool] = lambda _device_id: True,
    ) -> None:
        self.driver = driver
        self._powered = powered
        self.bus_id = driver.bus.id
        self.devices = {d.id: d for d in devices}
        self.state = {d.id: DeviceState() for d in devices}
        # Pushed drivers (subscriptions) poll only what they cannot push; a device with nothing
        # to poll gets no poll at all, its values arrive through pushed().
        self._polled = {d.id: list(driver.polled_points(d)) for d in devices}
        self._readings = readings
        self._events = events
        # Commands first, then polls; within a kind, first come first served.
        self._jobs: dict[Priority, deque[_Job]] = {p: deque() for p in Priority}
        self._work = asyncio.Event()
        self._order = itertools.count()
        self._polling_now = False
        self._connected = asyncio.Event()
        self._bus_reported_down = False
        self._lost = asyncio.Event()
        self._poll_queued: set[str] = set()
        self._polling = True

    # ------------------------------------------------------------------ public
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def submit(self, priority: Priority, job: Callable[[Driver], Awaitable[T]]) -> T:
        """Run ``job(driver)`` on this bus, after the transaction in progress.

        Raises :class:`BusDown` at once when the bus is not connected: a command must not sit in
        a queue for an unknown time and then move a lamp long after the operator gave up.
        """
        if not self._connected.is_set():
            raise BusDown(f"bus {self.bus_id} is not connected")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._put(_Job(priority, next(self._order), lambda: job(self.driver), future))
        return await future

    async def checkpoint(self) -> bool:
        """Run the commands waiting for this bus now, in the middle of a long poll.

        A driver calls it between two transactions of a read that takes many (a DALI memory-bank
        read is a dozen frames), so a command starts within one frame instead of after the whole
        poll. Returns True when something ran: the driver must then set up again any bus state
        its read relied on (DTR registers, a latched bank...). Outside a poll it does nothing.
        """
        if not self._polling_now or not self._jobs[Priority.COMMAND]:
            return False
        self._polling_now = False
        try:
            while self._jobs[Priority.COMMAND] and not self._lost.is_set():
                await self._execute(self._jobs[Priority.COMMAND].popleft())
        finally:
            self._polling_now = True
        return True

    def _put(self, job: _Job) -> None:
        self._jobs[Priority(job.priority)].append(job)
        self._work.set()

    def _take(self) -> _Job | None:
        for priority in Priority:
            if self._jobs[priority]:
                return self._jobs[priority].popleft()
        return None

    def silent(self, device_id: str, reason: str) -> None:
        """A pushed device went quiet (its driver says so): offline until it is heard again."""
        state = self.state.get(device_id)
        if state is None or state.online is False:
            return
        state.online = False
        state.last_error = reason
        log.warning("device %s is offline: %s", device_id, reason)
        self._events("device_offline", device_id, "raised", {"reason": reason})

    def pushed(self, readings: Sequence[Reading]) -> None:
        """Readings a driver received without polling (:meth:`DriverContext.emit`): they count
        as signs of life of their devices, like an answered poll."""
        ts = now_ms()
        for reading in readings:
            state = self.state.get(reading.device)
            if state is None:
                continue
            state.last_readings[reading.point] = reading
            state.last_ok_ms = ts
            if state.online is not True:
                if state.online is False:
                    self._events("device_offline", reading.device, "cleared", {})
                    log.info("device %s is back online", reading.device)
                state.online = True
                state.failures = 0
                state.last_error = None
        self._readings.submit(readings)

    def pause_polling(self) -> None:
        """Stop queueing polls (commands still run): for benches and maintenance."""
        self._polling = False

    def resume_polling(self) -> None:
        self._polling = True

    async def run(self) -> None:
        """Connect, serve jobs and poll until cancelled; reconnect whenever the link drops."""
        attempt = 0
        try:
            while True:
                if not await self._connect(attempt):
                    attempt += 1
                    await asyncio.sleep(backoff_delay_s(attempt, RECONNECT_BASE_S, RECONNECT_MAX_S))
                    continue
                attempt = 0
                await self._serve()
                _raise_if_cancelled()
                # The link was lost: close it and try again after a short pause.
                await self._disconnect()
                await asyncio.sleep(backoff_delay_s(1, RECONNECT_BASE_S, RECONNECT_MAX_S))
        finally:
            self._fail_queued(BusDown(f"bus {self.bus_id} is shutting down"))
            await self._disconnect()

    # ----------------------------------------------------------------- private
    async def _connect(self, attempt: int) -> bool:
        try:
            await self.driver.connect()
        except DriverError as exc:
            if not self._bus_reported_down:
                log.warning("bus %s: cannot connect: %s", self.bus_id, exc)
                self._report_bus_down(str(exc))
            else:
                log.debug("bus %s: reconnect attempt %d failed: %s", self.bus_id, attempt, exc)
            return False
        except Exception as exc:
            log.exception("bus %s: driver failed to connect", self.bus_id)
            self._report_bus_down(f"{type(exc).__name__}: {exc}")
            return False
        log.info("bus %s: connected", self.bus_id)
        if self._bus_reported_down:
            self._events("bus_offline", None, "cleared", {"bus": self.bus_id})
            self._bus_reported_down = False
        self._lost.clear()
        self._connected.set()
        return True

    def _report_bus_down(self, reason: str) -> None:
        if not self._bus_reported_down:
            self._bus_reported_down = True
            self._events("bus_offline", None, "raised", {"bus": self.bus_id, "reason": reason})
        for device_id, state in self.state.items():
            if state.online is not False:
                state.online = False
                state.last_error = reason
                self._events("device_offline", device_id, "raised", {"reason": reason})

    async def _disconnect(self) -> None:
        self._connected.clear()
        with contextlib.suppress(Exception):
            await self.driver.close()

    async def _serve(self) -> None:
        """Run jobs one at a time and schedule polls, until the link is lost."""
        async with asyncio.TaskGroup() as group:
            poller = group.create_task(self._schedule_polls(), name=f"poll-{self.bus_id}")
            pushed = group.create_task(self._run_driver(), name=f"driver-{self.bus_id}")
            try:
                while not self._lost.is_set():
                    job = await self._next_job()
                    if job is None:
                        break
                    await self._execute(job)
                    _raise_if_cancelled()
            finally:
                poller.cancel()
                pushed.cancel()
                self._connected.clear()
                self._fail_queued(BusDown(f"bus {self.bus_id} lost its link"))

    async def _run_driver(self) -> None:
        """The driver's own long-running work (subscriptions, scanners); a crash of it is a lost
        link, so the worker reconnects."""
        try:
            await self.driver.run()
        except asyncio.CancelledError:
            raise
        except BusUnavailable as exc:
            # The driver's own watchdog says its pushed source died: expected, no traceback.
            log.warning("bus %s: link lost: %s", self.bus_id, exc)
            self._report_bus_down(str(exc))
            self._lost.set()
        except Exception as exc:
            log.exception("bus %s: driver task failed", self.bus_id)
            self._report_bus_down(f"{type(exc).__name__}: {exc}")
            self._lost.set()

    async def _next_job(self) -> _Job | None:
        """The next job, commands first; None once the link is lost."""
        while not self._lost.is_set():
            job = self._take()
            if job is not None:
                return job
            self._work.clear()
            work = asyncio.ensure_future(self._work.wait())
            lost = asyncio.ensure_future(self._lost.wait())
            try:
                await asyncio.wait({work, lost}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                work.cancel()
                lost.cancel()
        return None

    async def _execute(self, job: _Job) -> None:
        if job.done.done():  # cancelled by its submitter while waiting
            return
        self._polling_now = job.priority == Priority.POLL
        try:
            async with asyncio.timeout(JOB_TIMEOUT_S):
                result = await job.run()
        except BusUnavailable as exc:
            log.warning("bus %s: link lost: %s", self.bus_id, exc)
            self._lost.set()
            self._report_bus_down(str(exc))
            if not job.done.done():
                job.done.set_exception(exc)
        except TimeoutError:
            exc2 = DeviceUnreachable(f"no result within {JOB_TIMEOUT_S:g} s")
            if not job.done.done():
                job.done.set_exception(exc2)
        except Exception as exc:
            if not job.done.done():
                job.done.set_exception(exc)
        else:
            if not job.done.done():
                job.done.set_result(result)
        finally:
            self._polling_now = False

    def _fail_queued(self, exc: Exception) -> None:
        while (job := self._take()) is not None:
            if not job.done.done():
                job.done.set_exception(exc)
        self._poll_queued.clear()

    async def _schedule_polls(self) -> None:
        """Queue each device's poll when it is due; at most one queued poll per device."""
        due: list[tuple[float, str]] = []
        start = time.monotonic()
        # Stagger first polls so a cabinet's devices do not all fire in the same instant.
        polled = [device for device in self.devices.values() if self._polled[device.id]]
        for index, device in enumerate(polled):
            offset = min(device.poll_interval_s, 1.0) * index / max(len(polled), 1)
            heapq.heappush(due, (start + offset, device.id))
        tasks: set[asyncio.Task[None]] = set()
        try:
            while due:
                when, device_id = heapq.heappop(due)
                delay = when - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                _raise_if_cancelled()
                device = self.devices[device_id]
                if self._polling and device_id not in self._poll_queued:
                    self._poll_queued.add(device_id)
                    task = asyncio.create_task(self._poll(device), name=f"poll-{device_id}")
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                heapq.heappush(
                    due, (max(when, time.monotonic()) + self._interval(device), device_id)
                )
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _interval(self, device: DeviceSpec) -> float:
        state = self.state[device.id]
        if state.online is False and state.failures > 0 and self._powered(device.id):
            # Exponential backoff of an offline device: it costs the line a timeout per poll,
            # which would otherwise starve the devices that do answer.
            backoff: float = device.poll_interval_s * (2 ** min(state.failures - 1, 10))
            return min(max(backoff, device.poll_interval_s), OFFLINE_BACKOFF_MAX_S)
        interval: float = device.poll_interval_s
        return interval

    async def _poll(self, device: DeviceSpec) -> None:
        points = self._polled[device.id]
        state = self.state[device.id]
        try:
            readings = await self._enqueue_poll(device, points)
        except BusDown:
            return
        except asyncio.CancelledError:
            raise
        except (DeviceUnreachable, FatalDriverError) as exc:
            self._poll_failed(device, state, str(exc) or type(exc).__name__)
            return
        except BusUnavailable:
            return
        except Exception as exc:
            log.exception(
                "bus %s: driver raised an untyped error polling %s", self.bus_id, device.id
            )
            self._poll_failed(device, state, f"{type(exc).__name__}: {exc}")
            return
        finally:
            self._poll_queued.discard(device.id)
        state.polls += 1
        state.failures = 0
        state.last_ok_ms = now_ms()
        for reading in readings:
            state.last_readings[reading.point] = reading
        if state.online is not True:
            if state.online is False:
                self._events("device_offline", device.id, "cleared", {})
                log.info("device %s is back online", device.id)
            state.online = True
            state.last_error = None
        self._readings.submit(readings)

    async def _enqueue_poll(self, device: DeviceSpec, points: list[Any]) -> list[Reading]:
        future: asyncio.Future[list[Reading]] = asyncio.get_running_loop().create_future()

        async def job() -> list[Reading]:
            return await self.driver.read(device, points)

        self._put(_Job(Priority.POLL, next(self._order), job, future))
        try:
            return await future
        except asyncio.CancelledError:
            future.cancel()
            raise

    def _poll_failed(self, device: DeviceSpec, state: DeviceState, reason: str) -> None:
        state.failures += 1
        state.last_error = reason
        ts = now_ms()
        # A failed poll is data too: the hub sees the gap as bad-quality readings.
        self._readings.submit(
            [
                Reading(device.id, p.name, None, p.unit, ts, Quality.BAD)
                for p in self._polled[device.id]
            ]
        )
        if not self._powered(device.id):
            # Its circuit is switched off (by day, say): silence is expected, no alarm, and no
            # backoff either, so it is seen again as soon as the cabinet switches it on.
            log.debug("device %s: no answer, its circuit is off", device.id)
            return
        if state.online is not False and state.failures >= OFFLINE_AFTER_FAILURES:
            state.online = False
            log.warning("device %s is offline: %s", device.id, reason)
            self._events("device_offline", device.id, "raised", {"reason": reason})
        else:
            log.debug("device %s: poll failed (%d): %s", device.id, state.failures, reason)
