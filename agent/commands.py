"""Remote commands: verify, route to buses, execute ahead of polling, read back, acknowledge.

A command is checked completely before anything touches a bus. Every rejection is answered with
an ack whose ``status`` is ``rejected`` and whose ``reason`` says what was wrong; the agent keeps
running. A valid command is acknowledged with what the equipment really did: the value read back
after the write, not the value that was asked for.

Three actions, all "write a point, then read a point back in the same bus slot":

- ``dim`` writes the ``dim_level`` point and reads back ``actual_level``;
- ``switch`` writes true/false to the ``switch`` point (a contactor command) and reads back
  ``switch_state``; a device without a ``switch`` point is dimmed to 100 or 0 % instead;
- ``write`` writes any writable point by name and reads back its ``read_back`` point.

Where no feedback point is named, the written point itself is read back.

Before any of that, a command must be a compact JWS signed by an enrolled control-post key
(``agent.jws``, ``docs/command-signing.md``): the token is verified before its body is parsed,
and each refusal is a ``rejected`` ack plus a ``security`` event. Plain JSON commands are taken
only when the configuration explicitly allows them (demo benches).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from agent.jws import ClockState, CommandRejected, CommandVerifier, read_clock_state
from agent.sdk import (
    BusUnavailable,
    DeviceSpec,
    Driver,
    DriverError,
    LampyreError,
    PointRole,
    PointSpec,
    Profile,
    Quality,
    TransientError,
    Value,
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
VALUE_REL_TOLERANCE = 1e-6
"""``write``: a number read back within this fraction of the request counts as done (float32
registers and scaled values do not round-trip exactly); integers read back must be equal."""
VALUE_ABS_TOLERANCE = 1e-9
"""``write``: and within this much of a request of zero, where a relative tolerance is none."""
MIN_WRITE_INT = -(2**63)
MAX_WRITE_INT = 2**64 - 1
"""``write``: integers must fit a 64-bit register, signed or not (no protocol holds more)."""

CLOCK_STATE_CACHE_S = 30.0
"""How long an answer about the clock's synchronisation is reused: a flood of tokens must not
start a subprocess each."""

MAX_SHOWN_DIGITS = 24
"""A rejection's reason quotes at most this many characters of a number that was sent."""

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
POINT_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")
"""The profile's rule for point names: anything else names no point."""
ACTIONS = ("dim", "switch", "write")
COMMON_KEYS = {"id", "action", "target", "expires"}
ACTION_KEYS = {"dim": {"level", "fade_s"}, "switch": {"state"}, "write": {"point", "value"}}

WriteValue = bool | int | float
"""What a command writes: a ``write`` value, a level, or a switch state."""
Report = Literal["level", "state", "value"]
"""The field of an ack result that carries what was read back: ``level`` (dim, and switching by
level), ``state`` (switching a ``switch`` point: "on"/"off") or ``value`` (write)."""


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
    """A command whose form and values passed every check."""

    id: str
    action: str
    target: Target
    level: float | None
    """Requested level in percent: ``dim``, and ``switch`` for devices switched by level
    (on = 100, off = 0); None for ``write``."""
    expires_ms: int
    fade_s: float | None = None
    """Transition time asked for (dim only); None = the equipment's default."""
    point: str | None = None
    """``write``: the name of the point to write."""
    value: WriteValue | None = None
    """``switch``: True (on) or False (off); ``write``: the value to write; ``dim``: None."""

    @property
    def requested(self) -> WriteValue:
        """What the ack reports as asked for: the level (dim, switch) or the value (write)."""
        if self.level is not None:
            return self.level
        assert self.value is not None
        return self.value


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
        # Integers are checked by comparison only: a 400-digit one does not convert to float.
        if (
            isinstance(level, bool)
            or not isinstance(level, int | float)
            or (isinstance(level, float) and not math.isfinite(level))
        ):
            raise reject("invalid_level", "level: expected a number from 0 to 100")
        if not 0 <= level <= 100:
            raise reject(
                "invalid_level", f"level: expected a number from 0 to 100, got {_shown(level)}"
            )
        fade = document.get("fade_s")
        if fade is not None and (
            isinstance(fade, bool)
            or not isinstance(fade, int | float)
            or not 0 <= fade <= MAX_FADE_S
        ):
            raise reject("invalid_level", f"fade_s: expected seconds from 0 to {MAX_FADE_S}")
        return Command(
            command_id,
            action,
            target,
            float(level),
            expires,
            None if fade is None else float(fade),
        )
    if action == "switch":
        state = document.get("state")
        if state not in ("on", "off"):
            raise reject("invalid_state", f"state: expected 'on' or 'off', got {state!r}")
        on = state == "on"
        return Command(command_id, action, target, 100.0 if on else 0.0, expires, value=on)
    point = document.get("point")
    if not isinstance(point, str):
        raise reject("malformed", "point: expected the name of a point of the target's profile")
    if not POINT_NAME_PATTERN.fullmatch(point):
        raise reject(
            "unknown_point",
            "point: expected a point name (a lowercase letter, then lowercase letters, digits "
            "or '_')",
        )
    return Command(
        command_id,
        action,
        target,
        None,
        expires,
        point=point,
        value=_write_value(document.get("value"), reject),
    )


def _looks_like_json(payload: bytes) -> bool:
    """A plain JSON command (``{`` first), as opposed to a compact JWS (base64url first)."""
    return payload.lstrip(b" \t\r\n")[:1] == b"{"


def _shown(number: float) -> str:
    """A number as a reason quotes it: never hundreds of digits, whatever was sent."""
    text = str(number)
    return text if len(text) <= MAX_SHOWN_DIGITS else f"{text[:MAX_SHOWN_DIGITS]}…"


def _write_value(raw: Any, reject: Callable[[str, str], Rejected]) -> WriteValue:
    """A ``write`` value: a JSON boolean, a finite number, an integer of at most 64 bits."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int):
        if not MIN_WRITE_INT <= raw <= MAX_WRITE_INT:
            raise reject("invalid_value", "value: expected an integer that fits in 64 bits")
        return raw
    if isinstance(raw, float) and math.isfinite(raw):
        return raw
    # The value itself is not echoed: a reason must stay short whatever was sent.
    kinds = {str: "a string", list: "a list", dict: "an object", float: "a non-finite number"}
    got = "null or nothing" if raw is None else kinds.get(type(raw), type(raw).__name__)
    raise reject("invalid_value", f"value: expected true, false or a finite number, got {got}")


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


class EventSink(Protocol):
    """Where events go (``Pipeline.event``)."""

    def __call__(
        self,
        kind: str,
        device: str | None,
        state: str,
        detail: Mapping[str, Any],
        severity: str | None = None,
    ) -> None: ...


ClockSource = Callable[[], Awaitable[ClockState]]


class CachedClockState:
    """:func:`agent.jws.read_clock_state`, asked at most once per :data:`CLOCK_STATE_CACHE_S`."""

    def __init__(self, source: ClockSource = read_clock_state) -> None:
        self._source = source
        self._state: ClockState | None = None
        self._asked_at = 0.0

    async def __call__(self) -> ClockState:
        now = asyncio.get_running_loop().time()
        if self._state is None or now - self._asked_at >= CLOCK_STATE_CACHE_S:
            self._state = await self._source()
            self._asked_at = now
        return self._state


def fixed_clock_state(synchronized: bool) -> ClockSource:
    """A clock source that always gives the same answer (``[commands] clock_synchronized``)."""
    state = ClockState(synchronized, "configuration")

    async def source() -> ClockState:
        return state

    return source


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
        *,
        verifier: CommandVerifier | None = None,
        allow_unsigned: bool = False,
        clock: ClockSource | None = None,
    ) -> None:
        """``verifier`` checks signed commands (None: no control-post key is enrolled, so every
        signed command is refused as ``unknown_key``); ``allow_unsigned`` also takes plain JSON
        commands (demo benches only); ``clock`` says whether the gateway clock is synchronised
        (default: systemd, cached)."""
        self._verifier = verifier
        self._allow_unsigned = allow_unsigned
        self._clock = clock or CachedClockState()
        self._clock_warnings: dict[str, str] = {}
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
        if _looks_like_json(payload):
            if not self._allow_unsigned:
                self._reject(
                    Rejected(
                        "unsigned",
                        "unsigned command refused: commands must be compact JWS tokens signed by "
                        "an enrolled control-post key ([commands] allow_unsigned is off)",
                    ),
                    security=True,
                    authenticated=False,
                )
                return
        else:
            verified = await self._verify(payload, now)
            if verified is None:
                return
            payload, now = verified
        try:
            command = parse_command(payload, now)
            previous = await self._duplicate_of(command.id)
            if previous is not None:
                raise Rejected(
                    "duplicate", "duplicate id: this command was already executed", command.id
                ) from _Original(previous)
            steps = self._resolve(command)
        except Rejected as rejection:
            self._reject(rejection)
            return
        self._in_progress.add(command.id)
        # Record the id before anything moves, so a redelivery during execution is not run twice.
        await self._store.remember_command(
            command.id, b'{"status":"in_progress"}', command.expires_ms + DEDUPE_KEEP_MS
        )
        self.accepted += 1
        task = asyncio.create_task(self._execute(command, steps), name=f"cmd-{command.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _verify(self, token: bytes, now: int) -> tuple[bytes, int] | None:
        """The body and reference time of a verified token, or None once it was rejected."""
        if self._verifier is None:
            self._reject(
                Rejected(
                    "unknown_key",
                    "no control-post key is enrolled on this gateway (post-*.pub in the key "
                    "folder): no signed command can be accepted",
                ),
                security=True,
                authenticated=False,
            )
            return None
        try:
            verified = await self._verifier.verify(token, now_ms=now, clock=await self._clock())
        except CommandRejected as exc:
            self._reject(
                Rejected(exc.code.value, exc.reason, exc.command_id),
                security=True,
                authenticated=exc.authenticated,
            )
            return None
        if verified.clock_warning is not None:
            log.warning("command %s: %s", verified.jti, verified.clock_warning)
            self._clock_warnings[verified.jti] = verified.clock_warning
            self._events(
                "security",
                None,
                "info",
                {
                    "what": "clock_unsynchronized",
                    "id": verified.jti,
                    "kid": verified.kid,
                    "warning": verified.clock_warning,
                },
                severity="warning",
            )
        return verified.body_json(), verified.reference_time_ms

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

    def _resolve(self, command: Command) -> list[_Step]:
        """What the command does to each device of its target, or why it must not run."""
        target = command.target
        if target.device is not None:
            device = self._devices.get(target.device)
            if device is None:
                raise Rejected("unknown_target", f"unknown device {target.device!r}", command.id)
            return [_step_for(command, device)]
        if target.group is not None:
            if target.group not in self._groups:
                raise Rejected("unknown_target", f"unknown group {target.group!r}", command.id)
            ids = self._groups[target.group]
        else:
            ids = list(self._devices)
        # Groups and broadcasts address the members that can do it (meters are not dimmed,
        # lamps have no contactor point); only a target where none can is refused.
        steps: list[_Step] = []
        for device_id in ids:
            try:
                steps.append(_step_for(command, self._devices[device_id]))
            except Rejected:
                continue
        if not steps:
            raise Rejected("unsupported", _nothing_to_do(command), command.id)
        return steps

    def _reject(
        self, rejection: Rejected, *, security: bool = False, authenticated: bool = True
    ) -> None:
        """Answer a refused command with a ``rejected`` ack and an event. ``security``: refused
        by the signature checks (a ``security`` event, an alarm when the token was not even
        authentic); otherwise by the spine's checks (a ``command_rejected`` event)."""
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
        self._with_clock_warning(body)
        self._acks(body)
        detail = {"id": rejection.command_id, "code": rejection.code, "reason": rejection.reason}
        if security:
            self._events(
                "security",
                None,
                "raised",
                {"what": "command_rejected", **detail, "authenticated": authenticated},
                severity="warning" if authenticated else "alarm",
            )
        else:
            self._events("command_rejected", None, "info", detail)

    def _with_clock_warning(self, body: dict[str, Any]) -> None:
        command_id = body.get("id")
        if isinstance(command_id, str) and command_id in self._clock_warnings:
            body["clock_warning"] = self._clock_warnings.pop(command_id)

    # --------------------------------------------------------------- execution
    async def _execute(self, command: Command, steps: list[_Step]) -> None:
        by_bus: dict[str, list[_Step]] = {}
        for step in steps:
            by_bus.setdefault(step.device.bus, []).append(step)
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
            results.get(step.device.id) or _unanswered(step, "unknown", "timed out")
            for step in steps
        ]
        status = "ok" if all(r["status"] == "ok" for r in ordered) else "error"
        body: dict[str, Any] = {
            "id": command.id,
            "status": status,
            "action": command.action,
            "target": command.target.as_json(),
            "requested": command.requested,
        }
        if command.point is not None:
            body["point"] = command.point
        body["results"] = ordered
        if command.fade_s is not None:
            body["fade_s"] = command.fade_s
        self._with_clock_warning(body)
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
        self, command: Command, bus: str, steps: list[_Step]
    ) -> dict[str, dict[str, Any]]:
        """Write every device of one bus, then read each one back."""
        fading = bool(command.fade_s)
        try:
            failures, feedback = await self._runner.run_on_bus(
                bus, _write_and_read_back(steps, command.fade_s, not fading)
            )
            if fading:
                # Read back once the fade is over, in a job of its own: polls go on meanwhile.
                assert command.fade_s is not None
                await asyncio.sleep(command.fade_s + FADE_MARGIN_S)
                feedback = await self._runner.run_on_bus(
                    bus, _read_back([s for s in steps if s.device.id not in failures])
                )
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            return {s.device.id: _unanswered(s, "error", reason) for s in steps}
        return {
            s.device.id: _result(s, failures.get(s.device.id), feedback.get(s.device.id))
            for s in steps
        }


# ------------------------------------------------------------------------------ resolution


@dataclass(frozen=True, slots=True)
class _Step:
    """What a command does to one device: write ``value`` to ``point``, then read ``feedback``
    to learn what the equipment did; ``report`` is the ack result field that says so."""

    device: DeviceSpec
    point: PointSpec
    feedback: PointSpec
    value: WriteValue
    report: Report


def _step_for(command: Command, device: DeviceSpec) -> _Step:
    """The step of ``command`` on ``device``, or the rejection saying why it has none."""
    profile = device.profile
    if command.action == "write":
        assert command.point is not None and command.value is not None
        point = profile.points.get(command.point)
        if point is None:
            raise Rejected(
                "unknown_point",
                f"device {device.id!r} ({profile.name}) has no point {command.point!r}",
                command.id,
            )
        if not point.writable:
            raise Rejected(
                "not_writable",
                f"point {point.name!r} of device {device.id!r} ({profile.name}) is not writable",
                command.id,
            )
        return _Step(device, point, _feedback_of(profile, point), command.value, "value")
    if command.action == "switch":
        switch = profile.point_with_role(PointRole.SWITCH)
        if switch is not None:
            assert isinstance(command.value, bool)
            feedback = _feedback_of(profile, switch, PointRole.SWITCH_STATE)
            return _Step(device, switch, feedback, command.value, "state")
    dim = profile.point_with_role(PointRole.DIM_LEVEL)
    if dim is None:
        can = "no dimmable point" if command.action == "dim" else "no switch or dimmable point"
        raise Rejected(
            "unsupported", f"device {device.id!r} ({profile.name}) has {can}", command.id
        )
    assert command.level is not None
    feedback = _feedback_of(profile, dim, PointRole.ACTUAL_LEVEL)
    return _Step(device, dim, feedback, command.level, "level")


def _feedback_of(profile: Profile, point: PointSpec, role: PointRole | None = None) -> PointSpec:
    """The point read back after writing ``point``: the profile's point with ``role`` (the
    dedicated feedback), else the point's ``read_back``, else the point itself."""
    if role is not None and (by_role := profile.point_with_role(role)) is not None:
        return by_role
    if point.read_back is not None:
        return profile.points.get(point.read_back, point)
    return point


def _nothing_to_do(command: Command) -> str:
    if command.action == "dim":
        return "the target holds no dimmable device"
    if command.action == "switch":
        return "the target holds no device that can be switched (no switch or dimmable point)"
    return f"no device of the target has a writable point {command.point!r}"


class _Original(Exception):
    """Carries the original ack of a duplicate command to its rejection."""

    def __init__(self, ack: dict[str, Any]) -> None:
        super().__init__("original ack")
        self.ack = ack


# ------------------------------------------------------------------------------- bus jobs


@dataclass(frozen=True, slots=True)
class _Feedback:
    """What reading a device back gave: a usable ``value``, or None and the ``problem``."""

    value: Value
    problem: str | None = None


Failures = Mapping[str, Exception]
FeedbackByDevice = dict[str, _Feedback]


def _write_and_read_back(
    steps: list[_Step], fade_s: float | None, read_back: bool
) -> Callable[[Driver], Awaitable[tuple[Failures, FeedbackByDevice]]]:
    """One bus job: write every device (one frame for a whole group of levels where the protocol
    can), then read every device back in the same slot, so no poll runs between the two and the
    ack reports this command's effect."""

    async def job(driver: Driver) -> tuple[Failures, FeedbackByDevice]:
        failures: dict[str, Exception] = {}
        levels = [s for s in steps if s.report == "level"]
        if levels:
            # Every level step of a command carries the same level.
            failures.update(
                await driver.write_many(
                    [(s.device, s.point) for s in levels], levels[0].value, fade_s=fade_s
                )
            )
        # Points other than levels are written one by one: group frames are for levels only.
        for step in steps:
            if step.report == "level":
                continue
            try:
                await driver.write(step.device, step.point, step.value)
            except BusUnavailable:
                raise
            except Exception as exc:
                failures[step.device.id] = exc
        if not read_back:
            return failures, {}
        written = [s for s in steps if s.device.id not in failures]
        return failures, await _read_back(written)(driver)

    return job


def _read_back(steps: list[_Step]) -> Callable[[Driver], Awaitable[FeedbackByDevice]]:
    async def job(driver: Driver) -> FeedbackByDevice:
        found: FeedbackByDevice = {}
        for step in steps:
            feedback = step.feedback
            try:
                readings = await driver.read(step.device, [feedback])
            except DriverError as exc:
                # The write went through; only the answer is missing: "unknown", never "ok".
                log.warning("device %s: read-back after write failed: %s", step.device.id, exc)
                transient = isinstance(exc, TransientError)
                found[step.device.id] = _Feedback(None, _no_value(step, str(exc), transient))
                continue
            value: Value = None
            for reading in readings:
                if reading.point == feedback.name and reading.quality is Quality.GOOD:
                    value = reading.value
            if isinstance(value, float) and not math.isfinite(value):
                value = None  # NaN is no reading (and no JSON)
            found[step.device.id] = _Feedback(value, None if value is not None else _no_value(step))
        return found

    return job


def _no_value(step: _Step, error: str = "", transient: bool = False) -> str:
    """Why a device written to has nothing to report back."""
    if step.report == "level":
        return "written, but the level could not be read back"
    if step.feedback is step.point and not transient:
        # A method point (OPC UA) or a write-only register: nothing to read, ever.
        if step.report == "state":
            return (
                "written; the switch point has no value to read back: give the profile a "
                "switch_state point or the point a read_back point"
            )
        return "written; the point has no value to read back: give it a read_back point"
    detail = f": {error}" if error else ""
    return f"written, but {step.feedback.name} could not be read back{detail}"


# -------------------------------------------------------------------------------- results


def _unanswered(step: _Step, status: str, error: str) -> dict[str, Any]:
    return {"device": step.device.id, "status": status, step.report: None, "error": error}


def _result(step: _Step, failure: Exception | None, feedback: _Feedback | None) -> dict[str, Any]:
    """The ack result of one device: what was read back and whether it is what was asked."""
    if failure is not None:
        return _unanswered(step, "error", str(failure) or type(failure).__name__)
    if feedback is None or feedback.value is None:
        problem = feedback.problem if feedback is not None else None
        return _unanswered(step, "unknown", problem or _no_value(step))
    value = feedback.value
    if step.report == "level":
        return _level_result(step, value)
    if step.report == "state":
        return _state_result(step, value)
    return _value_result(step, value)


def _level_result(step: _Step, value: Value) -> dict[str, Any]:
    device_id = step.device.id
    if not isinstance(value, int | float):
        return _unanswered(step, "unknown", f"{step.feedback.name} is not a number: {value!r}")
    level = float(value)
    requested = float(step.value)
    if abs(level - requested) > LEVEL_TOLERANCE:
        return {
            "device": device_id,
            "status": "mismatch",
            "level": level,
            "error": f"the equipment reports {level:g} % after being asked for {requested:g} %",
        }
    return {"device": device_id, "status": "ok", "level": level}


def _state_result(step: _Step, value: Value) -> dict[str, Any]:
    if not isinstance(value, int | float):
        return _unanswered(step, "unknown", f"{step.feedback.name} is not on/off: {value!r}")
    state = "on" if value else "off"
    asked = "on" if step.value else "off"
    if state != asked:
        return {
            "device": step.device.id,
            "status": "mismatch",
            "state": state,
            "error": f"the equipment reports {state} after being switched {asked}",
        }
    return {"device": step.device.id, "status": "ok", "state": state}


def _value_result(step: _Step, value: Value) -> dict[str, Any]:
    if _same_value(step.value, value):
        return {"device": step.device.id, "status": "ok", "value": value}
    return {
        "device": step.device.id,
        "status": "mismatch",
        "value": value,
        "error": f"{step.feedback.name} reads {json.dumps(value)} after "
        f"{step.point.name} was written {json.dumps(step.value)}",
    }


def _same_value(requested: WriteValue, actual: Value) -> bool:
    """Whether a read-back ``actual`` shows that ``requested`` was applied."""
    if actual is None or isinstance(actual, str):
        return False
    if isinstance(requested, bool):
        return bool(actual) == requested
    if isinstance(actual, bool):
        actual = int(actual)  # a number was written, a bit reads back: 1 is true
    if isinstance(requested, int) and isinstance(actual, int):
        return requested == actual
    return math.isclose(actual, requested, rel_tol=VALUE_REL_TOLERANCE, abs_tol=VALUE_ABS_TOLERANCE)
