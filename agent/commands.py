"""Remote commands: verify, route to buses, execute ahead of polling, read back, acknowledge.

A command is checked completely before anything touches a bus. Every rejection is answered with
an ack whose ``status`` is ``rejected`` and whose ``reason`` says what was wrong; the agent keeps
running. A valid command is acknowledged with what the equipment really did: the level read back
after the write, not the level that was asked for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from agent.sdk import (
    DeviceSpec,
    Driver,
    DriverError,
    LampyreError,
    PointRole,
    PointSpec,
    Quality,
    now_ms,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_COMMAND_BYTES = 4096
"""Larger messages are refused before JSON parsing (a cheap guard against memory abuse)."""
MAX_TTL_MS = 24 * 3600 * 1000
"""A command may not claim to stay valid for longer than this (it would be replayable for long)."""
DEDUPE_KEEP_MS = 3600 * 1000
"""How long after its expiry a command id is still remembered."""
COMMAND_TIMEOUT_S = 30.0
"""Bound on executing one command on all its devices."""
FADE_MARGIN_S = 0.3
"""After a fade, wait this much longer before reading back (the gear's own timing is loose)."""
MAX_FADE_S = 90.5
"""The longest standard DALI fade time; other protocols apply levels at once."""
LEVEL_TOLERANCE = 1.0
"""Read-back within this many percent of the request counts as done (integer registers round)."""

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
ACTIONS = ("dim", "switch")
COMMON_KEYS = {"id", "action", "target", "expires"}
ACTION_KEYS = {"dim": {"level", "fade_s"}, "switch": {"state"}}


class Rejected(Exception):
    """A command that must not run; ``code`` is stable for machines, ``reason`` for people."""

    def __init__(self, code: str, reason: str, command_id: str | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.command_id = command_id


@dataclass(frozen=True, slots=True)
class Target:
    device: str | None = None
    group: str | None = None
    all: bool = False

    def as_json(self) -> dict[str, Any]:
        if self.device is not None:
            return {"device": self.device}
        if self.group is not None:
            return {"group": self.group}
        return {"all": True}


@dataclass(frozen=True, slots=True)
class Command:
    id: str
    action: str
    target: Target
    level: float
    """Requested level in percent (``switch`` on = 100, off = 0)."""
    expires_ms: int
    fade_s: float | None = None
    """Transition time asked for (dim only); None = the equipment's default."""


def parse_command(payload: bytes, now: int) -> Command:
    """Check a command's form and values (not its target: see :class:`CommandService`)."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise Rejected("too_large", f"command is {len(payload)} bytes; at most {MAX_COMMAND_BYTES}")
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Rejected("malformed", f"not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise Rejected("malformed", "expected a JSON object")
    raw_id = document.get("id")
    if not isinstance(raw_id, str) or not ID_PATTERN.fullmatch(raw_id):
        raise Rejected(
            "invalid_id", "id: expected a string of 1-64 letters, digits, '.', '_', ':' or '-'"
        )
    command_id = raw_id

    def reject(code: str, reason: str) -> Rejected:
        return Rejected(code, reason, command_id)

    action = document.get("action")
    if action not in ACTIONS:
        raise reject(
            "unknown_action", f"action: expected one of {', '.join(ACTIONS)}, got {action!r}"
        )
    unexpected = set(document) - COMMON_KEYS - ACTION_KEYS[action]
    if unexpected:
        raise reject(
            "malformed", f"unexpected field(s) for {action}: {', '.join(sorted(unexpected))}"
        )

    expires = document.get("expires")
    if isinstance(expires, bool) or not isinstance(expires, int):
        raise reject("malformed", "expires: expected an integer time in epoch milliseconds")
    if expires <= now:
        raise reject("expired", f"expired {now - expires} ms ago")
    if expires - now > MAX_TTL_MS:
        raise reject("malformed", f"expires: at most {MAX_TTL_MS // 3_600_000} h ahead")

    target = _parse_target(document.get("target"), reject)
    if action == "dim":
        level = document.get("level")
        if (
            isinstance(level, bool)
            or not isinstance(level, int | float)
            or not math.isfinite(level)
        ):
            raise reject("invalid_level", "level: expected a number from 0 to 100")
        if not 0 <= level <= 100:
            raise reject("invalid_level", f"level: expected a number from 0 to 100, got {level}")
        value = float(level)
        fade = document.get("fade_s")
        if fade is not None and (
            isinstance(fade, bool)
            or not isinstance(fade, int | float)
            or not 0 <= fade <= MAX_FADE_S
        ):
            raise reject("invalid_level", f"fade_s: expected seconds from 0 to {MAX_FADE_S}")
    else:
        fade = None
        state = document.get("state")
        if state not in ("on", "off"):
            raise reject("invalid_state", f"state: expected 'on' or 'off', got {state!r}")
        value = 100.0 if state == "on" else 0.0
    return Command(
        command_id, action, target, value, expires, None if fade is None else float(fade)
    )


def _parse_target(raw: Any, reject: Callable[[str, str], Rejected]) -> Target:
    if not isinstance(raw, dict) or len(raw) != 1:
        raise reject(
            "invalid_target",
            'target: expected exactly one of {"device": ID}, {"group": NAME}, {"all": true}',
        )
    ((key, value),) = raw.items()
    if key == "device" and isinstance(value, str):
        return Target(device=value)
    if key == "group" and isinstance(value, str):
        return Target(group=value)
    if key == "all" and value is True:
        return Target(all=True)
    raise reject(
        "invalid_target",
        'target: expected exactly one of {"device": ID}, {"group": NAME}, {"all": true}',
    )


class CommandStore(Protocol):
    async def remember_command(
        self, command_id: str, ack_payload: bytes, expires_ms: int
    ) -> None: ...

    async def recall_command(self, command_id: str) -> bytes | None: ...


class BusRunner(Protocol):
    """What the command path needs of the bus workers: run a job on a bus, ahead of polls."""

    async def run_on_bus(self, bus: str, job: Callable[[Driver], Awaitable[T]]) -> T: ...


AckSink = Callable[[Mapping[str, Any]], None]
EventSink = Callable[[str, str | None, str, Mapping[str, Any]], None]


class CommandService:
    """Turns command messages into bus transactions and acks."""

    def __init__(
        self,
        devices: Mapping[str, DeviceSpec],
        groups: Mapping[str, Sequence[str]],
        runner: BusRunner,
        store: CommandStore,
        acks: AckSink,
        events: EventSink,
    ) -> None:
        self._devices = devices
        self._groups = groups
        self._runner = runner
        self._store = store
        self._acks = acks
        self._events = events
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_progress: set[str] = set()
        self.accepted = 0
        self.rejected = 0

    async def handle(self, payload: bytes) -> None:
        """Check a message from the ``cmd`` topic; start it or answer why not.

        Returns once the command is recorded (so the MQTT PUBACK can follow); execution goes on
        in a task this service owns.
        """
        now = now_ms()
        try:
            command = parse_command(payload, now)
            previous = await self._duplicate_of(command.id)
            if previous is not None:
                raise Rejected(
                    "duplicate", "duplicate id: this command was already executed", command.id
                ) from _Original(previous)
            devices = self._resolve(command)
        except Rejected as rejection:
            self._reject(rejection)
            return
        self._in_progress.add(command.id)
        # Record the id before anything moves, so a redelivery during execution is not run twice.
        await self._store.remember_command(
            command.id, b'{"status":"in_progress"}', command.expires_ms + DEDUPE_KEEP_MS
        )
        self.accepted += 1
        task = asyncio.create_task(self._execute(command, devices), name=f"cmd-{command.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Wait briefly for commands in flight, then cancel them."""
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=2.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    # ------------------------------------------------------------------ checks
    async def _duplicate_of(self, command_id: str) -> dict[str, Any] | None:
        if command_id in self._in_progress:
            return {"status": "in_progress"}
        try:
            stored = await self._store.recall_command(command_id)
        except LampyreError:
            # Seen before, but its stored answer does not authenticate: never run it again.
            log.warning("command %s: stored result unreadable", command_id)
            return {"status": "unknown"}
        if stored is None:
            return None
        try:
            previous = json.loads(stored)
        except json.JSONDecodeError:
            return {"status": "unknown"}
        return previous if isinstance(previous, dict) else {"status": "unknown"}

    def _resolve(self, command: Command) -> list[DeviceSpec]:
        target = command.target
        if target.device is not None:
            device = self._devices.get(target.device)
            if device is None:
                raise Rejected("unknown_target", f"unknown device {target.device!r}", command.id)
            if device.profile.point_with_role(PointRole.DIM_LEVEL) is None:
                raise Rejected(
                    "unsupported",
                    f"device {device.id!r} ({device.profile.name}) has no dimmable point",
                    command.id,
                )
            return [device]
        if target.group is not None:
            if target.group not in self._groups:
                raise Rejected("unknown_target", f"unknown group {target.group!r}", command.id)
            ids = self._groups[target.group]
        else:
            ids = list(self._devices)
        # Groups and broadcasts address the lamps among their members; meters are not dimmed.
        devices = [
            self._devices[i]
            for i in ids
            if self._devices[i].profile.point_with_role(PointRole.DIM_LEVEL) is not None
        ]
        if not devices:
            raise Rejected("unsupported", "the target holds no dimmable device", command.id)
        return devices

    def _reject(self, rejection: Rejected) -> None:
        self.rejected += 1
        log.warning(
            "command %s rejected (%s): %s", rejection.command_id, rejection.code, rejection.reason
        )
        body: dict[str, Any] = {
            "id": rejection.command_id,
            "status": "rejected",
            "code": rejection.code,
            "reason": rejection.reason,
        }
        original = rejection.__cause__
        if isinstance(original, _Original):
            body["original"] = original.ack
        self._acks(body)
        self._events(
            "command_rejected",
            None,
            "info",
            {"id": rejection.command_id, "code": rejection.code, "reason": rejection.reason},
        )

    # --------------------------------------------------------------- execution
    async def _execute(self, command: Command, devices: list[DeviceSpec]) -> None:
        by_bus: dict[str, list[DeviceSpec]] = {}
        for device in devices:
            by_bus.setdefault(device.bus, []).append(device)
        results: dict[str, dict[str, Any]] = {}
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_S):
                # Buses work in parallel; on each bus the devices share one job.
                for part in await asyncio.gather(
                    *(self._apply_on_bus(command, bus, members) for bus, members in by_bus.items())
                ):
                    results.update(part)
        except TimeoutError:
            pass
        ordered = [
            results.get(d.id)
            or {"device": d.id, "status": "unknown", "level": None, "error": "timed out"}
            for d in devices
        ]
        status = "ok" if all(r["status"] == "ok" for r in ordered) else "error"
        body: dict[str, Any] = {
            "id": command.id,
            "status": status,
            "action": command.action,
            "target": command.target.as_json(),
            "requested": command.level,
            "results": ordered,
        }
        if command.fade_s is not None:
            body["fade_s"] = command.fade_s
        self._in_progress.discard(command.id)
        try:
            await self._store.remember_command(
                command.id, json.dumps(body).encode(), command.expires_ms + DEDUPE_KEEP_MS
            )
        except Exception:
            log.exception("command %s: could not record its result", command.id)
        self._acks(body)
        log.info("command %s %s: %s", command.id, status, ordered)

    async def _apply_on_bus(
        self, command: Command, bus: str, devices: list[DeviceSpec]
    ) -> dict[str, dict[str, Any]]:
        """Write the level to every device of one bus, then read each one back."""
        targets = [(d, _role_point(d, PointRole.DIM_LEVEL)) for d in devices]
        fading = bool(command.fade_s)
        try:
            failures, levels = await self._runner.run_on_bus(
                bus, _write_and_read_back(targets, command.level, command.fade_s, not fading)
            )
            if fading:
                # Read back once the fade is over, in a job of its own: polls go on meanwhile.
                assert command.fade_s is not None
                await asyncio.sleep(command.fade_s + FADE_MARGIN_S)
                levels = await self._runner.run_on_bus(
                    bus, _read_back([d for d, _ in targets if d.id not in failures])
                )
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            return {
                d.id: {"device": d.id, "status": "error", "level": None, "error": reason}
                for d in devices
            }
        return {
            d.id: _result(d.id, command.level, failures.get(d.id), levels.get(d.id))
            for d in devices
        }


def _result(
    device_id: str, requested: float, failure: Exception | None, level: float | None
) -> dict[str, Any]:
    if failure is not None:
        reason = str(failure) or type(failure).__name__
        return {"device": device_id, "status": "error", "level": level, "error": reason}
    if level is None:
        return {
            "device": device_id,
            "status": "unknown",
            "level": None,
            "error": "written, but the level could not be read back",
        }
    if abs(level - requested) > LEVEL_TOLERANCE:
        return {
            "device": device_id,
            "status": "mismatch",
            "level": level,
            "error": f"the equipment reports {level:g} % after being asked for {requested:g} %",
        }
    return {"device": device_id, "status": "ok", "level": level}


def _role_point(device: DeviceSpec, role: PointRole) -> PointSpec:
    point = device.profile.point_with_role(role)
    if point is None and role is PointRole.ACTUAL_LEVEL:
        point = device.profile.point_with_role(PointRole.DIM_LEVEL)
    assert point is not None  # ensured by CommandService._resolve
    return point


class _Original(Exception):
    """Carries the original ack of a duplicate command to its rejection."""

    def __init__(self, ack: dict[str, Any]) -> None:
        super().__init__("original ack")
        self.ack = ack


Levels = dict[str, float | None]


def _write_and_read_back(
    targets: list[tuple[DeviceSpec, PointSpec]],
    level: float,
    fade_s: float | None,
    read_back: bool,
) -> Callable[[Driver], Awaitable[tuple[Mapping[str, Exception], Levels]]]:
    """One bus job: write the level (one frame for a whole group where the protocol can), then
    read every device back in the same slot, so no poll runs between the two and the ack
    reports this command's effect."""

    async def job(driver: Driver) -> tuple[Mapping[str, Exception], Levels]:
        failures = await driver.write_many(targets, level, fade_s=fade_s)
        if not read_back:
            return failures, {}
        written = [device for device, _ in targets if device.id not in failures]
        return failures, await _read_back(written)(driver)

    return job


def _read_back(devices: list[DeviceSpec]) -> Callable[[Driver], Awaitable[Levels]]:
    async def job(driver: Driver) -> Levels:
        levels: Levels = {}
        for device in devices:
            feedback = _role_point(device, PointRole.ACTUAL_LEVEL)
            levels[device.id] = None
            try:
                readings = await driver.read(device, [feedback])
            except DriverError as exc:
                # The write went through; only the answer is missing: "unknown", never "ok".
                log.warning("device %s: read-back after write failed: %s", device.id, exc)
                continue
            for reading in readings:
                if (
                    reading.point == feedback.name
                    and reading.quality is Quality.GOOD
                    and isinstance(reading.value, int | float)
                ):
                    levels[device.id] = float(reading.value)
        return levels

    return job
