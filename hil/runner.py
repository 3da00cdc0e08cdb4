"""Bring up the equipment, a broker when asked, the agent and the control post; run the
scenarios one after the other; report what happened.

The agent runs in this process (:class:`agent.runtime.Agent`, the same composition root as
``lampyre run``) with a fresh buffer in a temporary folder, so a run never reads or forwards the
data of an earlier one and never touches a gateway's own buffer.

The runner reads the gateway in the form its configuration says it publishes: with ``[hub]
seal`` on it needs the hub's keys and the gateway's public key (:mod:`hil.keys`), and refuses
plaintext; with ``[commands] allow_unsigned`` off, the command scenarios need the control post's
key.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from agent.config import GatewayConfig
from agent.demo import PrivateBroker, mosquitto_binary
from agent.jws import read_clock_state
from agent.runtime import Agent
from agent.sdk import LampyreError, now_ms
from hil.hub import ControlPost
from hil.keys import BenchKeys, command_problem, describe_security, key_problems
from hil.scenarios import (
    SCENARIOS,
    Scenario,
    ScenarioContext,
    ScenarioResult,
    Status,
    run_scenario,
)
from hil.targets import Target

__all__ = [
    "READY_POLL_S",
    "REPORT_VERSION",
    "STARTUP_TIMEOUT_S",
    "Report",
    "SetupError",
    "parse_broker",
    "result_lines",
    "run_hil",
]

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 30.0
"""From starting the agent to its uplink being online (connected, subscribed to ``cmd``)."""
READY_POLL_S = 0.05
REPORT_VERSION = 1


class SetupError(LampyreError):
    """The bench could not be brought up; no scenario ran."""


@dataclass
class Report:
    gateway: str
    target: str
    config_file: str
    started_ms: int
    target_detail: str = ""
    broker: str = ""
    security: str = ""
    """How the runner read and commanded the gateway (plain JSON, sealed, signed; which keys)."""
    traffic: dict[str, dict[str, int]] = field(default_factory=dict)
    """What the gateway published, by topic and form (``sealed``, ``signed``, ``plain``,
    ``refused``): ``{"data": {"sealed": 120}, "ack": {"signed": 30}, ...}``."""
    duration_s: float = 0.0
    results: list[ScenarioResult] = field(default_factory=list)
    error: str | None = None

    def count(self, status: Status) -> int:
        return sum(1 for r in self.results if r.status is status)

    @property
    def ok(self) -> bool:
        """Nothing failed (scenarios that do not apply to the target are not failures)."""
        return self.error is None and self.count(Status.FAILED) == 0

    def summary_line(self) -> str:
        text = (
            f"{self.count(Status.PASSED)} passed, {self.count(Status.FAILED)} failed, "
            f"{self.count(Status.NOT_APPLICABLE)} not applicable on target {self.target}"
        )
        return text if self.error is None else f"{text}; setup failed: {self.error}"

    def as_json(self) -> dict[str, Any]:
        return {
            "report_version": REPORT_VERSION,
            "gateway": self.gateway,
            "target": self.target,
            "target_detail": self.target_detail,
            "config": self.config_file,
            "broker": self.broker,
            "security": self.security,
            "traffic": self.traffic,
            "started_ms": self.started_ms,
            "duration_s": round(self.duration_s, 3),
            "ok": self.ok,
            "error": self.error,
            "counts": {str(s): self.count(s) for s in Status},
            "scenarios": [
                {**r.as_json(), "checks": SCENARIOS[r.name].checks if r.name in SCENARIOS else ""}
                for r in self.results
            ],
        }


def parse_broker(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for an IPv6 address) → (host, port)."""
    host, sep, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port_text)


_LABELS = {
    Status.PASSED: "PASSED",
    Status.FAILED: "FAILED",
    Status.NOT_APPLICABLE: "NOT APPLICABLE",
}


def result_lines(result: ScenarioResult) -> list[str]:
    """One line per scenario, with its figures; failures follow, indented."""
    label = _LABELS[result.status]
    head = f"{label:<14} {result.name:<22} {result.duration_s:6.1f} s  "
    if result.status is Status.NOT_APPLICABLE:
        return [head + (result.details[0] if result.details else "not applicable")]
    lines = [head + (result.summary or "")]
    if result.status is Status.FAILED:
        lines += [f"{'':<14}   - {detail}" for detail in result.details]
    return lines


def _not_applicable(
    scenario: Scenario, target: Target, config: GatewayConfig, keys: BenchKeys
) -> str | None:
    if scenario.needs_faults and not target.can_inject_faults:
        return (
            f"not applicable on the {target.name} target: it needs fault injection, which this "
            "target cannot do (it runs against the simulators, --target sim)"
        )
    if scenario.sends_commands and not target.commands_allowed:
        return (
            f"not applicable on the {target.name} target without --allow-commands: it sends "
            "commands that move real lamps"
        )
    if scenario.needs_post_key and keys.post is None:
        return (
            "not applicable without the control post's key (--post-key): it checks how the "
            "gateway refuses bad command tokens, and commands are sent as plain JSON"
        )
    problem = command_problem(config, keys) if scenario.sends_commands else None
    if problem is not None:
        return f"not applicable: it sends commands, and {problem}"
    return None


class _Progress:
    """Prints each result once, as soon as it is known, in scenario order."""

    def __init__(self, out: TextIO | None) -> None:
        self.out = out
        self._shown: set[str] = set()

    def print(self, *lines: str) -> None:
        if self.out is not None:
            for line in lines:
                print(line, file=self.out)
            self.out.flush()

    def show(self, result: ScenarioResult) -> None:
        if result.name not in self._shown:
            self._shown.add(result.name)
            self.print(*result_lines(result))


async def run_hil(
    config: GatewayConfig,
    target: Target,
    *,
    scenarios: Sequence[str] | None = None,
    broker: tuple[str, int] | None = None,
    private_broker: bool = False,
    out: TextIO | None = None,
    keys: BenchKeys | None = None,
) -> Report:
    """Run ``scenarios`` (all by default; always in the order of :data:`SCENARIOS`) against
    ``target``.

    The hub is ``broker`` when given (plain MQTT: the configured TLS and credentials are
    dropped), else a private Mosquitto on a free loopback port when ``private_broker``, else
    the configured hub. ``keys`` are the control post's and the hub's (:func:`hil.keys.
    load_bench_keys`; none: plain JSON only). Progress is printed to ``out``. Never raises for
    a failed scenario or a failed set-up: both are in the report.
    """
    keys = keys if keys is not None else BenchKeys()
    names = list(SCENARIOS) if scenarios is None else list(scenarios)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s): {', '.join(unknown)}")
    selected = [s for name, s in SCENARIOS.items() if name in names]
    report = Report(
        gateway=config.gateway_id,
        target=target.name,
        config_file=str(config.file),
        started_ms=now_ms(),
        security=describe_security(config, keys),
    )
    progress = _Progress(out)
    started_s = time.monotonic()
    done: dict[str, ScenarioResult] = {}
    for scenario in selected:
        reason = _not_applicable(scenario, target, config, keys)
        if reason is not None:
            done[scenario.name] = ScenarioResult(
                scenario.name, Status.NOT_APPLICABLE, details=[reason]
            )
    try:
        if len(done) < len(selected):
            problems = key_problems(config, keys)
            if problems:
                progress.print(f"Lampyre HIL — gateway {config.gateway_id}, target {target.name}")
                raise SetupError("; ".join(problems))
            await _run_bench(
                config, target, selected, done, report, broker, private_broker, progress, keys
            )
        else:
            progress.print(f"Lampyre HIL — gateway {config.gateway_id}, target {target.name}")
    except (LampyreError, OSError, RuntimeError) as exc:
        log.debug("bench set-up failed", exc_info=True)
        report.error = str(exc) or type(exc).__name__
    for scenario in selected:
        if scenario.name not in done:
            done[scenario.name] = ScenarioResult(
                scenario.name, Status.FAILED, details=[f"not run: {report.error or 'stopped'}"]
            )
        progress.show(done[scenario.name])
    report.results = [done[s.name] for s in selected]
    report.duration_s = time.monotonic() - started_s
    progress.print(report.summary_line())
    return report


async def _run_bench(
    config: GatewayConfig,
    target: Target,
    selected: list[Scenario],
    done: dict[str, ScenarioResult],
    report: Report,
    broker: tuple[str, int] | None,
    private_broker: bool,
    progress: _Progress,
    keys: BenchKeys,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        workdir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="lampyre-hil-"))
        stack.push_async_callback(asyncio.to_thread, shutil.rmtree, workdir, True)

        stack.push_async_callback(target.stop)
        config = await target.start(config)
        report.target_detail = target.describe()

        mqtt = config.hub.mqtt
        if broker is None and private_broker:
            binary = await asyncio.to_thread(mosquitto_binary)
            if binary is None:
                raise SetupError(
                    "Mosquitto is not installed: install it or give a broker with --broker"
                )
            own = PrivateBroker(binary)
            await asyncio.to_thread(own.start)
            stack.push_async_callback(asyncio.to_thread, own.stop)
            broker = ("127.0.0.1", own.port)
        if broker is not None:
            mqtt = dataclasses.replace(
                mqtt, host=broker[0], port=broker[1], tls=None, username=None, password_file=None
            )
        report.broker = f"{mqtt.host}:{mqtt.port}"
        buffer = dataclasses.replace(
            config.buffer, path=workdir / "buffer.db", key_file=workdir / "buffer.db.key"
        )
        config = dataclasses.replace(
            config, hub=dataclasses.replace(config.hub, mqtt=mqtt), buffer=buffer
        )
        progress.print(
            f"Lampyre HIL — gateway {config.gateway_id}, target {target.name}",
            f"  {report.target_detail}",
            f"  hub: {report.broker} (topics {config.hub.prefix}/{config.gateway_id}/#)",
            f"  security: {report.security}",
        )

        post = ControlPost(
            dataclasses.replace(mqtt, client_id=f"{mqtt.client_id}-hil"),
            prefix=config.hub.prefix,
            gateway_id=config.gateway_id,
            keys=keys,
            require_sealed=config.hub.seal,
            # A gateway that seals or takes only signed commands must have a signing key, and
            # then signs every ack (docs/hub-protocol.md#ack).
            require_signed_acks=config.hub.seal or not config.allow_unsigned_commands,
        )
        try:
            await post.connect()
        except LampyreError as exc:
            raise SetupError(f"the runner cannot watch the hub at {report.broker}: {exc}") from exc
        stack.push_async_callback(post.close)

        def record_traffic() -> None:
            report.traffic = post.traffic()

        # Runs once the agent stopped: everything it published is counted.
        stack.callback(record_traffic)

        agent = Agent(config)
        agent_task = asyncio.create_task(agent.run(), name="hil-agent")
        stack.push_async_callback(_stop, agent_task)
        await _wait_ready(agent, agent_task)

        clock_synchronized = config.clock_synchronized
        if clock_synchronized is None and keys.post is not None:
            # What the agent, in this process, is told too (it caches the answer): whether it
            # can tell an expired token, or goes by the order of iat alone.
            clock_synchronized = (await read_clock_state()).synchronized
        run_id = secrets.token_hex(3)
        for scenario in selected:
            if scenario.name in done:  # not applicable on this target
                progress.show(done[scenario.name])
                continue
            context = ScenarioContext(
                config=config,
                target=target,
                hub=post,
                run_id=run_id,
                clock_synchronized=clock_synchronized,
            )
            task = asyncio.create_task(run_scenario(scenario, context), name=f"hil-{scenario.name}")
            try:
                await asyncio.wait({task, agent_task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            if task.cancelled():
                # The agent died: whatever the scenario would say now is only timeouts.
                reason = f"the agent stopped during this scenario: {_outcome(agent_task)}"
                done[scenario.name] = ScenarioResult(scenario.name, Status.FAILED, details=[reason])
                progress.show(done[scenario.name])
                raise SetupError(f"the agent stopped: {_outcome(agent_task)}")
            done[scenario.name] = task.result()
            progress.show(done[scenario.name])


async def _wait_ready(agent: Agent, agent_task: asyncio.Task[None]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while agent.uplink is None or agent.uplink.stats.state != "online":
        if agent_task.done():
            raise SetupError(f"the agent stopped at start-up: {_outcome(agent_task)}")
        if time.monotonic() > deadline:
            last = agent.uplink.stats.last_error if agent.uplink is not None else None
            raise SetupError(
                f"the agent's uplink was not online within {STARTUP_TIMEOUT_S:g} s"
                + (f" ({last})" if last else "")
            )
        await asyncio.sleep(READY_POLL_S)


def _outcome(task: asyncio.Task[None]) -> str:
    if not task.done():
        return "still running"
    if task.cancelled():
        return "cancelled"
    exc = task.exception()
    return "returned" if exc is None else f"{type(exc).__name__}: {exc}"


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
