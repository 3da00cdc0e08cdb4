"""The scenarios: one body each, run unchanged against simulators (CI) and a real bench.

A scenario sees the gateway only as the control post does (the messages under
``{prefix}/{gateway}/#`` and the commands it publishes on ``cmd``, through :class:`ControlPost`)
plus what its :class:`~hil.targets.Target` can tell or do. It reads plain JSON objects whatever
the wire form (sealed envelopes and signed acks are opened and verified by the control post) and
sends command objects that the control post signs when it holds the post key. It records
figures and failures in its :class:`ScenarioContext`; it raises :class:`NotApplicable` when the
target or the configuration cannot support it, never to hide a failure.

Waits are bounded by the configured poll intervals and the module constants below, which tests
shrink.
"""

from __future__ import annotations

import enum
import itertools
import json
import logging
import re
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import GatewayConfig
from agent.jws import MAX_TOKEN_BYTES
from agent.post import PostKey
from agent.sdk import DeviceSpec, PointRole, now_ms
from hil.hub import COMMAND_LIFETIME_S, ControlPost, HubMessage, HubTimeout
from hil.targets import Fault, Target

__all__ = [
    "ACK_TIMEOUT_S",
    "ALARM_SLACK_S",
    "ALARM_WITHIN_POLLS",
    "COMMAND_TTL_S",
    "DIM_TEST_LEVELS_PERCENT",
    "EXPIRED_BY_S",
    "LEVEL_TOLERANCE_PERCENT",
    "READINGS_MIN_POLLS",
    "READINGS_SLACK_S",
    "READINGS_WITHIN_POLLS",
    "SCENARIOS",
    "TOKEN_EXPIRED_BY_S",
    "NotApplicable",
    "Scenario",
    "ScenarioContext",
    "ScenarioFailed",
    "ScenarioResult",
    "Status",
    "run_scenario",
]

log = logging.getLogger(__name__)

READINGS_WITHIN_POLLS = 3
"""A device's first good reading must reach the hub within this many of its poll intervals
(plus the batching delay and :data:`READINGS_SLACK_S`)."""
READINGS_MIN_POLLS = 3
"""Good polls observed per device before its interval is measured."""
READINGS_SLACK_S = 5.0
"""Added to every readings wait: the line's first connection, a first timeout, scheduling."""
ALARM_WITHIN_POLLS = 8
"""An alarm must be raised or cleared within this many poll intervals of the fault changing.
Offline devices are polled with exponential backoff, so this is well above the 2 failed polls
that raise ``device_offline``."""
ALARM_SLACK_S = 5.0
ACK_TIMEOUT_S = 35.0
"""Longer than the agent's own bound on executing one command (30 s), so an ack that is slow
because a device does not answer still arrives before the runner gives up."""
COMMAND_TTL_S = COMMAND_LIFETIME_S
"""How long a command sent is valid (``expires``, or ``exp - iat`` of a token), from now."""
EXPIRED_BY_S = 10
"""The ``expired`` bad command ended its validity this long before it is sent. Less than the
30 s of clock skew a gateway allows a token (``agent.jws.CLOCK_SKEW_S``), so a signed one passes
the token's time window and reaches the spine's own expiry check, as a plain one does."""
TOKEN_EXPIRED_BY_S = 600
"""The ``expired token`` of ``rejects_bad_tokens`` was issued this long ago: far outside the
token's time window, refused by the token checks."""
DIM_TEST_LEVELS_PERCENT = (40.0, 60.0)
"""The first of these that differs from a lamp's current level is the test level."""
LEVEL_TOLERANCE_PERCENT = 1.0
"""Same as the agent's: integer registers round."""


class Status(enum.StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    NOT_APPLICABLE = "not-applicable"


class NotApplicable(Exception):
    """The scenario cannot run on this target or configuration; the message says why."""


class ScenarioFailed(Exception):
    """A check failed and the scenario cannot go on."""


@dataclass
class ScenarioResult:
    name: str
    status: Status
    summary: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": str(self.status),
            "duration_s": round(self.duration_s, 3),
            "summary": self.summary,
            "figures": self.figures,
            "details": list(self.details),
        }


@dataclass
class ScenarioContext:
    """What a scenario body works with, and where it leaves its findings."""

    config: GatewayConfig
    target: Target
    hub: ControlPost
    run_id: str
    clock_synchronized: bool | None = None
    """Whether the gateway takes its clock as synchronised (``[commands] clock_synchronized``, or
    what systemd says); None when unknown. A gateway whose clock is not synchronised accepts
    signed commands on the order of their ``iat``, so it cannot tell an expired one."""
    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: str = ""
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def fail(self, message: str) -> None:
        """Record a failed check and go on (later checks still tell something)."""
        log.info("check failed: %s", message)
        self.failures.append(message)

    def note(self, message: str) -> None:
        self.notes.append(message)

    def command_id(self, label: str) -> str:
        slug = re.sub(r"[^A-Za-z0-9._:-]+", "-", label)
        return f"hil-{self.run_id}-{next(self._ids)}-{slug}"[:64]


Body = Callable[[ScenarioContext], Awaitable[None]]


@dataclass(frozen=True)
class Scenario:
    name: str
    checks: str
    """One line: what the scenario checks."""
    body: Body
    needs_faults: bool = False
    sends_commands: bool = False
    """It sends commands that move equipment when the agent obeys them (even the bad ones would,
    were the agent wrong)."""
    needs_post_key: bool = False
    """It checks the gateway's token checks, so it signs (the control post's key is needed)."""


async def run_scenario(scenario: Scenario, context: ScenarioContext) -> ScenarioResult:
    """Run one scenario body and turn what happened into a result (never raises, except on
    cancellation)."""
    started = time.monotonic()
    status = Status.PASSED
    try:
        await scenario.body(context)
    except NotApplicable as exc:
        status = Status.NOT_APPLICABLE
        context.notes.insert(0, str(exc))
    except (ScenarioFailed, HubTimeout) as exc:
        context.failures.append(str(exc))
    except Exception as exc:
        log.exception("scenario %s raised", scenario.name)
        context.failures.append(f"error: {type(exc).__name__}: {exc}")
    refused = context.hub.refused(since_s=started)
    if refused and status is not Status.NOT_APPLICABLE:
        # A hub would have refused them too: readings lost, or an answer nobody can trust.
        context.failures.append(_refused_summary(refused))
    if context.failures and status is not Status.NOT_APPLICABLE:
        status = Status.FAILED
    return ScenarioResult(
        name=scenario.name,
        status=status,
        summary=context.summary,
        figures=context.figures,
        details=[*context.failures, *context.notes],
        duration_s=time.monotonic() - started,
    )


def _refused_summary(refused: Sequence[HubMessage], shown: int = 3) -> str:
    reasons = "; ".join(f"{m.kind}: {m.refusal}" for m in refused[:shown])
    more = f"; and {len(refused) - shown} more" if len(refused) > shown else ""
    return (
        f"{len(refused)} message(s) from the gateway could not be opened or verified: "
        f"{reasons}{more}"
    )


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _lamps(config: GatewayConfig) -> list[DeviceSpec]:
    """Devices a ``dim`` command can address, in configuration order."""
    return [d for d in config.devices.values() if d.profile.point_with_role(PointRole.DIM_LEVEL)]


def _level_points(device: DeviceSpec) -> list[str]:
    """Points that tell a lamp's set level, best first: what a dim command writes, else what
    the lamp reports."""
    points = [
        device.profile.point_with_role(PointRole.DIM_LEVEL),
        device.profile.point_with_role(PointRole.ACTUAL_LEVEL),
    ]
    return [p.name for p in points if p is not None]


def _latest_level(ctx: ScenarioContext, device: DeviceSpec, since_ms: int) -> float | None:
    for point in _level_points(device):
        values = [
            (r["ts"], r["value"])
            for r in ctx.hub.readings(since_ms)
            if r.get("device") == device.id
            and r.get("point") == point
            and r.get("quality") == "good"
            and isinstance(r.get("value"), int | float)
        ]
        if values:
            return float(max(values)[1])
    return None


def _within_polls(
    ctx: ScenarioContext, devices: Sequence[DeviceSpec], polls: float, *, alarm: bool = False
) -> float:
    """A wait long enough for ``polls`` poll intervals of the slowest of ``devices``, the
    batching delay and the slack (:data:`ALARM_SLACK_S` for alarms, else
    :data:`READINGS_SLACK_S`; looked up at call time so tests can shrink them)."""
    interval = max((d.poll_interval_s for d in devices), default=1.0)
    slack_s = ALARM_SLACK_S if alarm else READINGS_SLACK_S
    return polls * interval + ctx.config.buffer.batch_max_delay_s + slack_s


async def _current_level(
    ctx: ScenarioContext, device: DeviceSpec, since_ms: int = 0
) -> float | None:
    try:
        found = await ctx.hub.wait_for(
            lambda: _Found(_latest_level(ctx, device, since_ms)),
            _within_polls(ctx, [device], READINGS_WITHIN_POLLS),
            f"good level reading of {device.id}",
        )
    except HubTimeout:
        return None
    level: float | None = found.value
    return level


def _latency_figures(latencies_s: Sequence[float]) -> dict[str, Any]:
    if not latencies_s:
        return {"count": 0, "median": None, "max": None}
    return {
        "count": len(latencies_s),
        "median": round(statistics.median(latencies_s) * 1000, 1),
        "max": round(max(latencies_s) * 1000, 1),
    }


async def _ack_for(
    ctx: ScenarioContext, command_id: str | None, sent_s: float, what: str
) -> tuple[dict[str, Any], float]:
    """The ack of ``command_id`` and the command→ack latency."""

    def first() -> HubMessage | None:
        acks = ctx.hub.acks(command_id, since_s=sent_s)
        return acks[0] if acks else None

    try:
        message = await ctx.hub.wait_for(first, ACK_TIMEOUT_S, f"ack for {what}")
    except HubTimeout as exc:
        refused = [m for m in ctx.hub.refused(since_s=sent_s) if m.kind == "ack"]
        if not refused:
            raise
        raise HubTimeout(
            f"verified ack for {what} ({len(refused)} ack(s) refused meanwhile, the first: "
            f"{refused[0].refusal})",
            exc.timeout_s,
        ) from exc
    return message.doc, message.received_s - sent_s


class _Found:
    """Wraps a found value so that a found 0 (a lamp at 0 %) is still truthy for wait_for."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __bool__(self) -> bool:
        return self.value is not None


# --------------------------------------------------------------------------------------------
# readings_flow
# --------------------------------------------------------------------------------------------


@dataclass
class _Flow:
    """What the hub saw of one device since the scenario started."""

    reference: str
    """The point whose timestamps count the polls (the profile's first point)."""
    poll_ts: list[int] = field(default_factory=list)
    good_points: set[str] = field(default_factory=set)
    bad_readings: int = 0


def _flows(ctx: ScenarioContext, since_ms: int) -> dict[str, _Flow]:
    flows = {
        d.id: _Flow(reference=next(iter(d.profile.points)))
        for d in ctx.config.devices.values()
        if d.profile.points
    }
    for reading in ctx.hub.readings(since_ms):
        flow = flows.get(str(reading.get("device")))
        if flow is None:
            continue
        if reading.get("quality") != "good":
            flow.bad_readings += 1
            continue
        flow.good_points.add(str(reading.get("point")))
        if reading.get("point") == flow.reference:
            flow.poll_ts.append(int(reading["ts"]))
    for flow in flows.values():
        flow.poll_ts = sorted(set(flow.poll_ts))
    return flows


async def readings_flow(ctx: ScenarioContext) -> None:
    config = ctx.config
    devices = [d for d in config.devices.values() if d.profile.points]
    if not devices:
        raise NotApplicable("no device with points in the configuration")
    start_ms = now_ms()

    def complete() -> bool:
        flows = _flows(ctx, start_ms)
        return all(
            len(flows[d.id].poll_ts) >= READINGS_MIN_POLLS
            and flows[d.id].good_points >= set(d.profile.points)
            for d in devices
        )

    timeout_s = _within_polls(ctx, devices, READINGS_WITHIN_POLLS + READINGS_MIN_POLLS)
    try:
        await ctx.hub.wait_for(complete, timeout_s, "good readings from every device")
    except HubTimeout as exc:
        ctx.fail(str(exc))

    flows = _flows(ctx, start_ms)
    per_device: dict[str, Any] = {}
    parts = []
    for device in devices:
        flow = flows[device.id]
        intervals = [(b - a) / 1000 for a, b in itertools.pairwise(flow.poll_ts)]
        first_s = (flow.poll_ts[0] - start_ms) / 1000 if flow.poll_ts else None
        figures: dict[str, Any] = {
            "good_polls": len(flow.poll_ts),
            "configured_interval_s": device.poll_interval_s,
            "interval_s": round(statistics.median(intervals), 3) if intervals else None,
            "interval_max_s": round(max(intervals), 3) if intervals else None,
            "first_good_after_s": round(first_s, 3) if first_s is not None else None,
            "bad_readings": flow.bad_readings,
        }
        per_device[device.id] = figures
        if figures["interval_s"] is not None:
            parts.append(
                f"{device.id} every {figures['interval_s']:.2f} s "
                f"(configured {device.poll_interval_s:g} s)"
            )
        else:
            parts.append(f"{device.id} no interval")

        if len(flow.poll_ts) < READINGS_MIN_POLLS:
            ctx.fail(
                f"{device.id}: {len(flow.poll_ts)} good poll(s) in {timeout_s:.1f} s, expected "
                f"at least {READINGS_MIN_POLLS} at {device.poll_interval_s:g} s intervals"
            )
        missing = sorted(set(device.profile.points) - flow.good_points)
        if missing:
            ctx.fail(f"{device.id}: no good reading of {', '.join(missing)}")
        limit_s = _within_polls(ctx, [device], READINGS_WITHIN_POLLS)
        if first_s is not None and first_s > limit_s:
            ctx.fail(
                f"{device.id}: first good reading after {first_s:.1f} s, expected within "
                f"{limit_s:.1f} s ({READINGS_WITHIN_POLLS} poll intervals + slack)"
            )
        if flow.bad_readings:
            ctx.note(f"{device.id}: {flow.bad_readings} bad-quality reading(s) seen")
    ctx.figures["devices"] = per_device
    ctx.summary = f"{len(devices)} devices: " + ", ".join(parts)


# --------------------------------------------------------------------------------------------
# dim_round_trip
# --------------------------------------------------------------------------------------------


async def _dim(
    ctx: ScenarioContext, device: DeviceSpec, level: float, label: str, latencies: list[float]
) -> float | None:
    """Dim one lamp, check its ack; returns the level read back (None when unknown)."""
    command_id = ctx.command_id(label)
    sent_s = await ctx.hub.send_command(
        {"id": command_id, "action": "dim", "target": {"device": device.id}, "level": level}
    )
    ack, latency_s = await _ack_for(ctx, command_id, sent_s, f"dim {device.id} to {level:g} %")
    latencies.append(latency_s)
    results = ack.get("results") or []
    result = results[0] if len(results) == 1 and isinstance(results[0], dict) else {}
    read_back = result.get("level")
    if ack.get("status") != "ok" or result.get("status") != "ok":
        ctx.fail(
            f"{device.id}: dim to {level:g} % acked {ack.get('status')!r}, result "
            f"{result or results!r}"
        )
    elif result.get("device") != device.id:
        ctx.fail(f"{device.id}: ack result is for {result.get('device')!r}")
    elif not isinstance(read_back, int | float) or abs(read_back - level) > LEVEL_TOLERANCE_PERCENT:
        ctx.fail(f"{device.id}: dim to {level:g} % read back {read_back!r}")
    truth = ctx.target.setpoint(device.id)
    if truth is not None and abs(truth - level) > LEVEL_TOLERANCE_PERCENT:
        ctx.fail(f"{device.id}: the equipment holds {truth:g} % after a dim to {level:g} %")
    return float(read_back) if isinstance(read_back, int | float) else None


async def dim_round_trip(ctx: ScenarioContext) -> None:
    lamps = _lamps(ctx.config)
    if not lamps:
        raise NotApplicable("no dimmable device in the configuration")
    # Levels from polls taken after this point: an earlier poll may predate a command.
    start_ms = now_ms()
    latencies: list[float] = []
    per_device: dict[str, Any] = {}
    for lamp in lamps:
        before = await _current_level(ctx, lamp, since_ms=start_ms)
        if before is None:
            ctx.fail(f"{lamp.id}: no good level reading, so it is not dimmed (no way back)")
            continue
        test_level = next(
            level
            for level in DIM_TEST_LEVELS_PERCENT
            if abs(level - before) > LEVEL_TOLERANCE_PERCENT
        )
        entry: dict[str, Any] = {"from": before, "to": test_level}
        per_device[lamp.id] = entry
        try:
            entry["read_back"] = await _dim(ctx, lamp, test_level, "there", latencies)
        except HubTimeout as exc:
            ctx.fail(f"{lamp.id}: {exc}")
        # Always try to put the lamp back, whatever happened to the first command.
        try:
            entry["restored"] = await _dim(ctx, lamp, before, "back", latencies)
        except HubTimeout as exc:
            ctx.fail(f"{lamp.id}: {exc}; it may be left at {test_level:g} %")
    ctx.figures["devices"] = per_device
    ctx.figures["ack_latency_ms"] = stats = _latency_figures(latencies)
    if stats["count"]:
        ctx.summary = (
            f"{len(per_device)} lamps, {stats['count']} commands, command→ack latency "
            f"median {stats['median']:.0f} ms, max {stats['max']:.0f} ms"
        )
    else:
        ctx.summary = "no command acknowledged"


# --------------------------------------------------------------------------------------------
# rejects_bad_commands
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _BadCommand:
    label: str
    code: str
    command_id: str | None
    """The id the ack must carry (None: the command's id cannot be read)."""
    body: dict[str, Any] | None = None
    """Sent as every command is (signed, or plain JSON with its ``expires``)."""
    raw: bytes | None = None
    """Sent exactly as it is."""
    expired: bool = False
    """Issued so long ago that its validity ended :data:`EXPIRED_BY_S` before it is sent."""

    async def payload(self, hub: ControlPost) -> bytes:
        if self.raw is not None:
            return self.raw
        assert self.body is not None
        issued_at_s = int(time.time()) - COMMAND_TTL_S - EXPIRED_BY_S if self.expired else None
        return await hub.command_payload(self.body, issued_at_s=issued_at_s)


def _bad_commands(ctx: ScenarioContext) -> tuple[list[_BadCommand], dict[str, str]]:
    """The cases, and those left out with the reason."""
    lamps = _lamps(ctx.config)
    fixed = [d for d in ctx.config.devices.values() if d not in lamps]
    some_lamp: dict[str, Any] = {"device": lamps[0].id} if lamps else {"all": True}
    signed = ctx.hub.signs_commands
    cases: list[_BadCommand] = []
    skipped: dict[str, str] = {}

    def add(label: str, code: str, *, expired: bool = False, **fields: Any) -> None:
        command_id = ctx.command_id(label)
        body = {"id": command_id, **fields}
        cases.append(_BadCommand(label, code, command_id, body=body, expired=expired))

    if signed:
        skipped["not JSON"] = (
            "the body of a signed command is always JSON (rejects_bad_tokens sends a payload "
            "that is no token)"
        )
    else:
        cases.append(_BadCommand("not JSON", "malformed", None, raw=b"{this is not json"))
    add("unknown action", "unknown_action", action="explode", target={"all": True})
    add("unknown device", "unknown_target", action="dim", target={"device": "hil-nx"}, level=10)
    add("unknown group", "unknown_target", action="dim", target={"group": "hil-nx"}, level=10)
    add("two targets", "invalid_target", action="dim", target={**some_lamp, "all": True}, level=10)
    add("extra field", "malformed", action="dim", target=some_lamp, level=10, hil=True)
    if signed and ctx.clock_synchronized is not True:
        skipped["expired"] = (
            "the gateway clock is not synchronised: the gateway accepts signed commands on the "
            "order of their iat and cannot tell an expired one"
        )
    else:
        add("expired", "expired", expired=True, action="dim", target=some_lamp, level=10)
    if lamps:
        add("level above 100", "invalid_level", action="dim", target=some_lamp, level=140)
        add("negative level", "invalid_level", action="dim", target=some_lamp, level=-5)
        add("level not a number", "invalid_level", action="dim", target=some_lamp, level="50")
        add("bad switch state", "invalid_state", action="switch", target=some_lamp, state="dim")
    if fixed:
        add("not dimmable", "unsupported", action="dim", target={"device": fixed[0].id}, level=10)
    return cases, skipped


async def _lamps_before(
    ctx: ScenarioContext, lamps: Sequence[DeviceSpec]
) -> tuple[dict[str, float | None], dict[str, int | None]]:
    """Each lamp's level from a poll taken from now on (an earlier poll may predate a command),
    and its write count where the target can tell."""
    start_ms = now_ms()
    levels = {lamp.id: await _current_level(ctx, lamp, start_ms) for lamp in lamps}
    writes = {lamp.id: ctx.target.write_count(lamp.id) for lamp in lamps}
    return levels, writes


class _Case(Protocol):
    """What the rejection scenarios' reports need of a case."""

    @property
    def label(self) -> str: ...

    @property
    def code(self) -> str: ...


def _report_rejections(
    ctx: ScenarioContext,
    cases: Sequence[_Case],
    codes: Mapping[str, str | None],
    skipped: Mapping[str, str],
    latencies: Sequence[float],
    lamps: int,
    verb: str,
) -> None:
    """The notes, figures and summary shared by the two rejection scenarios."""
    for label, reason in skipped.items():
        ctx.note(f"{label}: not sent: {reason}")
    ctx.figures["cases"] = len(cases)
    ctx.figures["codes"] = dict(codes)
    ctx.figures["skipped"] = dict(skipped)
    ctx.figures["ack_latency_ms"] = stats = _latency_figures(latencies)
    right = sum(1 for c in cases if codes.get(c.label) == c.code)
    ctx.summary = (
        f"{right}/{len(cases)} {verb} with the expected code, {lamps} lamps unmoved "
        f"checked, ack latency median {stats['median'] or 0:.0f} ms"
        + (f", {len(skipped)} case(s) not sent" if skipped else "")
    )


async def _check_unmoved(
    ctx: ScenarioContext,
    lamps: Sequence[DeviceSpec],
    before: tuple[dict[str, float | None], dict[str, int | None]],
    after_ms: int,
) -> None:
    """Nothing moved: a poll taken after ``after_ms`` shows the level from before, and where
    the target can tell, no write reached the equipment."""
    levels_before, writes_before = before
    for lamp in lamps:
        level_before = levels_before[lamp.id]
        after = await _current_level(ctx, lamp, since_ms=after_ms)
        if level_before is None or after is None:
            ctx.fail(
                f"{lamp.id}: level not observed before and after ({level_before!r}, {after!r})"
            )
        elif abs(after - level_before) > LEVEL_TOLERANCE_PERCENT:
            ctx.fail(f"{lamp.id}: level moved from {level_before:g} % to {after:g} %")
        writes = ctx.target.write_count(lamp.id)
        if writes is not None and writes != writes_before[lamp.id]:
            ctx.fail(f"{lamp.id}: {writes - (writes_before[lamp.id] or 0)} write(s) applied")


async def rejects_bad_commands(ctx: ScenarioContext) -> None:
    lamps = _lamps(ctx.config)
    start_s = time.monotonic()
    before = await _lamps_before(ctx, lamps)

    cases, skipped = _bad_commands(ctx)
    latencies: list[float] = []
    codes: dict[str, str | None] = {}
    for case in cases:
        sent_s = await ctx.hub.send(await case.payload(ctx.hub))
        ack, latency_s = await _ack_for(ctx, case.command_id, sent_s, case.label)
        latencies.append(latency_s)
        codes[case.label] = ack.get("code")
        if ack.get("status") != "rejected":
            ctx.fail(f"{case.label}: acked {ack.get('status')!r}, expected rejected: {ack}")
        elif ack.get("code") != case.code:
            ctx.fail(f"{case.label}: rejected with {ack.get('code')!r}, expected {case.code!r}")
        elif not ack.get("reason"):
            ctx.fail(f"{case.label}: rejected without a reason")
    after_ms = now_ms()

    # Each rejection is also reported as an event.
    with_id = {c.command_id for c in cases if c.command_id is not None}

    def all_reported() -> bool:
        reported = {
            doc.get("detail", {}).get("id")
            for _m, doc in ctx.hub.events("command_rejected", since_s=start_s)
        }
        return with_id <= reported

    try:
        await ctx.hub.wait_for(
            all_reported, _within_polls(ctx, lamps, 1), "command_rejected events"
        )
    except HubTimeout as exc:
        ctx.fail(str(exc))

    await _check_unmoved(ctx, lamps, before, after_ms)

    _report_rejections(ctx, cases, codes, skipped, latencies, len(lamps), "rejected")


# --------------------------------------------------------------------------------------------
# rejects_bad_tokens
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _BadToken:
    label: str
    code: str
    payload: bytes
    command_id: str | None
    """The ack's id: the token's ``jti`` once its signature verified and its claims were read,
    else None."""
    authenticated: bool
    """Whether the gateway must report it as authentic (signed by an enrolled key, refused on
    its claims) or as a forgery."""
    security: bool = True
    """Refused by the token checks (a ``security`` event); False: by the spine's checks."""


async def _bad_tokens(ctx: ScenarioContext) -> tuple[list[_BadToken], dict[str, str]]:
    """The cases, and those left out with the reason. Every body is one the spine refuses
    (level 140): were a token wrongly let through, nothing would move."""
    hub = ctx.hub
    lamps = _lamps(ctx.config)
    target: dict[str, Any] = {"device": lamps[0].id} if lamps else {"all": True}
    cases: list[_BadToken] = []
    skipped: dict[str, str] = {}

    def body(label: str) -> dict[str, Any]:
        return {"id": ctx.command_id(label), "action": "dim", "target": target, "level": 140}

    if ctx.config.allow_unsigned_commands:
        skipped["unsigned"] = (
            "the gateway takes plain JSON commands too ([commands] allow_unsigned = true)"
        )
    else:
        plain = {**body("unsigned"), "expires": now_ms() + COMMAND_TTL_S * 1000}
        cases.append(_BadToken("unsigned", "unsigned", json.dumps(plain).encode(), None, False))
    cases.append(_BadToken("not a token", "malformed", b"not-a.token", None, False))
    oversized = b"A" * (MAX_TOKEN_BYTES + 1)
    cases.append(_BadToken("too large", "too_large", oversized, None, False))

    header, claims, signature = (await hub.sign(body("altered"))).split(b".")
    # A middle character of the claims: every bit of it counts, so the token stays canonical
    # base64url and only the signature check can catch it.
    middle = len(claims) // 2
    swapped = b"B" if claims[middle : middle + 1] == b"A" else b"A"
    altered = b".".join((header, claims[:middle] + swapped + claims[middle + 1 :], signature))
    cases.append(_BadToken("altered", "bad_signature", altered, None, False))

    stranger = PostKey.from_private_key(Ed25519PrivateKey.generate())
    foreign = await hub.sign(body("unknown key"), key=stranger)
    cases.append(_BadToken("unknown key", "unknown_key", foreign, None, False))

    other = next(g for g in ("hil-other-gateway", "hil-other-gateway-2") if g != hub.gateway_id)
    elsewhere = await hub.sign(body("wrong audience"), audience=other)
    cases.append(_BadToken("wrong audience", "wrong_audience", elsewhere, None, True))

    if ctx.clock_synchronized is True:
        stale = body("expired token")
        token = await hub.sign(stale, issued_at_s=int(time.time()) - TOKEN_EXPIRED_BY_S)
        cases.append(_BadToken("expired token", "expired", token, stale["id"], True))
    else:
        skipped["expired token"] = (
            "the gateway clock is not synchronised: the gateway accepts tokens on the order of "
            "their iat, not on their time window"
        )

    # Authentic, refused by the spine (its jti is remembered all the same); then the very same
    # token again is a replay.
    first = body("replayed")
    token = await hub.sign(first)
    cases.append(
        _BadToken("replayed: first", "invalid_level", token, first["id"], True, security=False)
    )
    cases.append(_BadToken("replayed", "replayed", token, first["id"], True))
    return cases, skipped


async def rejects_bad_tokens(ctx: ScenarioContext) -> None:
    if not ctx.hub.signs_commands:
        raise NotApplicable(
            "commands are sent as plain JSON: checking the gateway's token checks needs the "
            "control post's key (--post-key)"
        )
    lamps = _lamps(ctx.config)
    start_s = time.monotonic()
    before = await _lamps_before(ctx, lamps)

    cases, skipped = await _bad_tokens(ctx)
    latencies: list[float] = []
    codes: dict[str, str | None] = {}
    for case in cases:
        sent_s = await ctx.hub.send(case.payload)
        ack, latency_s = await _ack_for(ctx, case.command_id, sent_s, case.label)
        latencies.append(latency_s)
        codes[case.label] = ack.get("code")
        if ack.get("status") != "rejected":
            ctx.fail(f"{case.label}: acked {ack.get('status')!r}, expected rejected: {ack}")
        elif ack.get("code") != case.code:
            ctx.fail(f"{case.label}: rejected with {ack.get('code')!r}, expected {case.code!r}")
        elif not ack.get("reason"):
            ctx.fail(f"{case.label}: rejected without a reason")
    after_ms = now_ms()

    # Each refusal by the token checks is also a security event, which tells a forgery from an
    # authentic token refused on its claims.
    wanted = {c.code: c for c in cases if c.security}

    def reported() -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for _m, doc in ctx.hub.events("security", since_s=start_s):
            detail = doc.get("detail")
            if isinstance(detail, dict) and detail.get("what") == "command_rejected":
                found.setdefault(str(detail.get("code")), detail)
        return found

    try:
        await ctx.hub.wait_for(
            lambda: wanted.keys() <= reported().keys(),
            _within_polls(ctx, lamps, 1),
            "security events for every refused token",
        )
    except HubTimeout as exc:
        missing = sorted(wanted.keys() - reported().keys())
        ctx.fail(f"{exc} (missing: {', '.join(missing)})")
    events = reported()
    for code, case in wanted.items():
        detail = events.get(code)
        if detail is None:
            continue
        if detail.get("authenticated") is not case.authenticated:
            ctx.fail(
                f"{case.label}: security event says authenticated="
                f"{detail.get('authenticated')!r}, expected {case.authenticated}"
            )
        if detail.get("id") != case.command_id:
            ctx.fail(f"{case.label}: security event names id {detail.get('id')!r}")

    await _check_unmoved(ctx, lamps, before, after_ms)

    _report_rejections(ctx, cases, codes, skipped, latencies, len(lamps), "refused")


# --------------------------------------------------------------------------------------------
# lamp_failure_alarm
# --------------------------------------------------------------------------------------------


async def _wait_events(
    ctx: ScenarioContext,
    kind: str,
    state: str,
    devices: Sequence[DeviceSpec],
    since_s: float,
    timeout_s: float,
) -> dict[str, tuple[HubMessage, dict[str, Any]]]:
    """The first ``kind``/``state`` event of each device since ``since_s``; a timeout fails
    the scenario naming the devices still missing."""

    def found() -> dict[str, tuple[HubMessage, dict[str, Any]]]:
        out: dict[str, tuple[HubMessage, dict[str, Any]]] = {}
        for message, doc in ctx.hub.events(kind, since_s=since_s):
            if doc.get("state") == state and doc.get("device") not in out:
                out[str(doc.get("device"))] = (message, doc)
        return out

    wanted = {d.id for d in devices}
    try:
        return await ctx.hub.wait_for(
            lambda: events if wanted <= (events := found()).keys() else None,
            timeout_s,
            f"{kind} {state} events",
        )
    except HubTimeout as exc:
        missing = sorted(wanted - found().keys())
        raise ScenarioFailed(f"{exc} for {', '.join(missing)}") from exc


async def lamp_failure_alarm(ctx: ScenarioContext) -> None:
    lamps = [
        d for d in ctx.config.devices.values() if d.profile.point_with_role(PointRole.LAMP_FAILURE)
    ]
    if not lamps:
        raise NotApplicable("no device with a lamp_failure point in the configuration")
    timeout_s = _within_polls(ctx, lamps, ALARM_WITHIN_POLLS, alarm=True)
    try:
        injected_s = time.monotonic()
        for lamp in lamps:
            await ctx.target.inject(lamp.id, Fault.LAMP_FAILURE)
        raised = await _wait_events(ctx, "lamp_failure", "raised", lamps, injected_s, timeout_s)
        for lamp in lamps:
            _message, doc = raised[lamp.id]
            point = lamp.profile.point_with_role(PointRole.LAMP_FAILURE)
            if doc.get("severity") != "alarm":
                ctx.fail(f"{lamp.id}: lamp_failure raised with severity {doc.get('severity')!r}")
            if point is not None and doc.get("detail", {}).get("point") != point.name:
                ctx.fail(f"{lamp.id}: lamp_failure names point {doc.get('detail')!r}")
        repaired_s = time.monotonic()
        for lamp in lamps:
            await ctx.target.clear(lamp.id, Fault.LAMP_FAILURE)
        cleared = await _wait_events(ctx, "lamp_failure", "cleared", lamps, repaired_s, timeout_s)
    finally:
        for lamp in lamps:
            await ctx.target.clear(lamp.id, Fault.LAMP_FAILURE)
    raise_s = [raised[lamp.id][0].received_s - injected_s for lamp in lamps]
    clear_s = [cleared[lamp.id][0].received_s - repaired_s for lamp in lamps]
    ctx.figures["raised_after_s"] = {
        lamp.id: round(s, 3) for lamp, s in zip(lamps, raise_s, strict=True)
    }
    ctx.figures["cleared_after_s"] = {
        lamp.id: round(s, 3) for lamp, s in zip(lamps, clear_s, strict=True)
    }
    ctx.summary = (
        f"{len(lamps)} lamps failed and repaired: raised within {max(raise_s):.2f} s, "
        f"cleared within {max(clear_s):.2f} s"
    )


# --------------------------------------------------------------------------------------------
# device_offline_alarm
# --------------------------------------------------------------------------------------------


async def device_offline_alarm(ctx: ScenarioContext) -> None:
    devices = [d for d in ctx.config.devices.values() if d.profile.points]
    if not devices:
        raise NotApplicable("no device in the configuration")
    # A lamp if there is one: a silent lamp is the common field case.
    lamps = _lamps(ctx.config)
    victim = lamps[0] if lamps else devices[0]
    peers = [d for d in devices if d.bus == victim.bus and d.id != victim.id]
    timeout_s = _within_polls(ctx, [victim], ALARM_WITHIN_POLLS, alarm=True)
    injected_ms = now_ms()
    try:
        injected_s = time.monotonic()
        await ctx.target.inject(victim.id, Fault.NO_ANSWER)
        raised = await _wait_events(
            ctx, "device_offline", "raised", [victim], injected_s, timeout_s
        )
        _message, doc = raised[victim.id]
        if doc.get("severity") != "alarm" or not doc.get("detail", {}).get("reason"):
            ctx.fail(f"{victim.id}: device_offline raised without severity alarm and a reason")
        # The line keeps serving the others while the silent device is backed off.
        raised_ms = int(doc.get("ts", now_ms()))
        for peer in peers:
            reference = next(iter(peer.profile.points))

            def polled(peer_id: str = peer.id, point: str = reference) -> bool:
                return any(
                    r.get("device") == peer_id
                    and r.get("point") == point
                    and r.get("quality") == "good"
                    for r in ctx.hub.readings(raised_ms)
                )

            try:
                await ctx.hub.wait_for(
                    polled,
                    _within_polls(ctx, [peer], READINGS_WITHIN_POLLS),
                    f"good reading of {peer.id} while {victim.id} is offline",
                )
            except HubTimeout as exc:
                ctx.fail(str(exc))
        restored_s = time.monotonic()
        restored_ms = now_ms()
        await ctx.target.clear(victim.id, Fault.NO_ANSWER)
        cleared = await _wait_events(
            ctx, "device_offline", "cleared", [victim], restored_s, timeout_s
        )
    finally:
        await ctx.target.clear(victim.id, Fault.NO_ANSWER)
    bad = [
        r
        for r in ctx.hub.readings(injected_ms)
        if r.get("device") == victim.id and r.get("quality") == "bad"
    ]
    if not bad:
        ctx.fail(f"{victim.id}: no bad-quality reading published during the outage")
    elif any(r.get("value") is not None for r in bad):
        ctx.fail(f"{victim.id}: bad-quality readings carry values")
    back = [
        r
        for r in ctx.hub.readings(restored_ms)
        if r.get("device") == victim.id and r.get("quality") == "good"
    ]
    raised_after = raised[victim.id][0].received_s - injected_s
    cleared_after = cleared[victim.id][0].received_s - restored_s
    ctx.figures.update(
        {
            "device": victim.id,
            "raised_after_s": round(raised_after, 3),
            "cleared_after_s": round(cleared_after, 3),
            "bad_readings": len(bad),
            "peers_polled": [p.id for p in peers],
            "good_readings_after_clear": len(back),
        }
    )
    ctx.summary = (
        f"{victim.id} silenced: offline raised after {raised_after:.2f} s, cleared "
        f"{cleared_after:.2f} s after it answered again; {len(peers)} peers kept polling"
    )


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "readings_flow",
            "every configured device delivers good readings within a few poll intervals; "
            "reports the observed interval per device",
            readings_flow,
        ),
        Scenario(
            "dim_round_trip",
            "each lamp is dimmed to a test level and back; the acks are ok with the level read "
            "back; reports the command→ack latency",
            dim_round_trip,
            sends_commands=True,
        ),
        Scenario(
            "rejects_bad_commands",
            "malformed, out-of-range, expired and unknown-target commands are rejected with the "
            "right code and a command_rejected event; no lamp moves",
            rejects_bad_commands,
            sends_commands=True,
        ),
        Scenario(
            "rejects_bad_tokens",
            "unsigned, malformed, oversized, altered, foreign-key, wrong-audience, expired and "
            "replayed command tokens are refused with the right code and a security event; no "
            "lamp moves (signed commands only)",
            rejects_bad_tokens,
            sends_commands=True,
            needs_post_key=True,
        ),
        Scenario(
            "lamp_failure_alarm",
            "a lamp failure raises a lamp_failure alarm and its repair clears it",
            lamp_failure_alarm,
            needs_faults=True,
        ),
        Scenario(
            "device_offline_alarm",
            "a device that stops answering raises device_offline while the others on its line "
            "keep polling; the alarm clears when it answers again",
            device_offline_alarm,
            needs_faults=True,
        ),
    )
}
"""Every scenario, in the order they run."""
