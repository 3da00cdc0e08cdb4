"""The composition root: the one place that wires configuration, drivers, buses, pipeline,
buffer, uplink and the command path together. Everything else receives what it needs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from agent.buffer import Buffer, BufferStats, DropReport
from agent.commands import CachedClockState, CommandService, fixed_clock_state
from agent.config import Circuit, GatewayConfig
from agent.crypto import RecordCipher, load_or_create_key
from agent.jws import CommandTableReplayStore, CommandVerifier
from agent.keys import AgentKeys, load_agent_keys
from agent.pipeline import Pipeline
from agent.scheduler import BusWorker, DeviceState, Priority
from agent.sdk import DeviceSpec, Driver, PointRole, Quality, Reading, now_ms
from agent.uplink import ReceiptSettings, Uplink, UplinkStats

log = logging.getLogger(__name__)

COMMAND_MEMORY_PURGE_S = 600.0
_SEVERITIES = ("alarm", "warning", "info")

T = TypeVar("T")


class _DriverContext:
    """What one driver instance sees of the runtime (agent.sdk.DriverContext)."""

    def __init__(self, bus_id: str, readings: ReadingRouter, pipeline: Pipeline) -> None:
        self._readings = readings
        self._pipeline = pipeline
        self._logger = logging.getLogger(f"lampyre.bus.{bus_id}")
        self.worker: BusWorker | None = None
        """Set once the bus worker exists (it needs the driver, which needs this context)."""

    @property
    def logger(self) -> logging.Logger:
        return self._logger

    def emit(self, readings: Sequence[Reading]) -> None:
        if self.worker is not None:
            self.worker.pushed(readings)
        else:
            self._readings.submit(readings)

    def event(self, kind: str, device: str | None, detail: Mapping[str, Any]) -> None:
        detail = dict(detail)
        state = str(detail.pop("state", "raised"))
        severity = detail.pop("severity", None)
        if severity not in _SEVERITIES:
            severity = None
        self._pipeline.event(kind, device, state, detail, severity)

    def device_silent(self, device: str, reason: str) -> None:
        if self.worker is not None:
            self.worker.silent(device, reason)

    async def checkpoint(self) -> bool:
        return await self.worker.checkpoint() if self.worker is not None else False


class ReadingRouter:
    """Between the buses and the pipeline: watches lamp-failure points (an alarm is raised on
    the poll that sees the failure, cleared when it clears) and the points that say whether
    each switched circuit is on (a lamp on a circuit that is off is not expected to answer)."""

    def __init__(
        self,
        devices: Mapping[str, DeviceSpec],
        pipeline: Pipeline,
        circuits: Mapping[str, Circuit] | None = None,
    ) -> None:
        self._pipeline = pipeline
        circuits = circuits or {}
        self._circuit_of_point = {(c.device, c.point): name for name, c in circuits.items()}
        self._circuit_of_device = {d: name for name, c in circuits.items() for d in c.feeds}
        self._circuit_on: dict[str, bool] = {}
        self._failure_point = {
            device_id: point.name
            for device_id, device in devices.items()
            if (point := device.profile.point_with_role(PointRole.LAMP_FAILURE)) is not None
        }
        self._failed: dict[str, bool] = {}

    def submit(self, readings: Sequence[Reading]) -> None:
        for reading in readings:
            if reading.quality is not Quality.GOOD:
                continue
            if self._failure_point.get(reading.device) == reading.point:
                self._observe_failure(reading)
            circuit = self._circuit_of_point.get((reading.device, reading.point))
            if circuit is not None:
                on = bool(reading.value)
                if self._circuit_on.get(circuit) != on:
                    log.info("circuit %s is %s", circuit, "on" if on else "off")
                self._circuit_on[circuit] = on
        self._pipeline.submit(readings)

    def powered(self, device_id: str) -> bool:
        """False only when the device's circuit is known to be switched off."""
        circuit = self._circuit_of_device.get(device_id)
        return circuit is None or self._circuit_on.get(circuit, True)

    def _observe_failure(self, reading: Reading) -> None:
        failed = bool(reading.value)
        before = self._failed.get(reading.device)
        self._failed[reading.device] = failed
        if failed and before is not True:
            self._pipeline.event("lamp_failure", reading.device, "raised", {"point": reading.point})
        elif not failed and before is True:
            self._pipeline.event(
                "lamp_failure", reading.device, "cleared", {"point": reading.point}
            )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the agent is doing, for the demo screen and health reports."""

    devices: Mapping[str, DeviceState]
    buses: Mapping[str, bool]
    buffer: BufferStats
    uplink: UplinkStats
    readings_in: int
    batches_out: int
    commands_accepted: int
    commands_rejected: int


class Agent:
    """One gateway's agent. ``await Agent(config).run()`` until cancelled."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.buffer: Buffer | None = None
        self.pipeline: Pipeline | None = None
        self.uplink: Uplink | None = None
        self.commands: CommandService | None = None
        self.workers: dict[str, BusWorker] = {}
        self.started = asyncio.Event()

    async def run(self) -> None:
        config = self.config
        keys = await asyncio.to_thread(
            load_agent_keys,
            config.gateway_id,
            config.keys,
            seal=config.hub.seal,
            signed_commands_only=not config.allow_unsigned_commands,
            receipts=config.hub.receipts,
        )
        _log_key_setup(config, keys)
        key = await asyncio.to_thread(load_or_create_key, config.buffer.key_file)
        buffer = Buffer(config.buffer.path, RecordCipher(key), config.buffer.max_bytes)
        await buffer.open()
        self.buffer = buffer
        try:
            await self._run_with(buffer, keys)
        finally:
            await buffer.close()

    async def _run_with(self, buffer: Buffer, keys: AgentKeys) -> None:
        config = self.config
        uplink_box: list[Uplink] = []
        pipeline = Pipeline(
            config.gateway_id,
            buffer,
            batch_max_readings=config.buffer.batch_max_readings,
            batch_max_delay_s=config.buffer.batch_max_delay_s,
            on_stored=lambda: uplink_box[0].notify() if uplink_box else None,
            sealer=keys.sealer,
            ack_signer=keys.signer,
        )
        self.pipeline = pipeline
        buffer.on_drop(lambda report: _report_drop(pipeline, report))
        buffer.on_quarantine(
            lambda report: pipeline.event(
                "buffer_tampered",
                None,
                "raised",
                {"seqs": list(report.seqs[:20]), "quarantined_total": report.quarantined_total},
            )
        )
        router = ReadingRouter(config.devices, pipeline, config.circuits)

        for bus_id, bus in config.buses.items():
            devices = [d for d in config.devices.values() if d.bus == bus_id]
            driver_cls = config.drivers[bus.driver]
            context = _DriverContext(bus_id, router, pipeline)
            driver: Driver = driver_cls(bus, devices, context)
            context.worker = self.workers[bus_id] = BusWorker(
                driver, devices, router, pipeline.event, router.powered
            )

        commands = CommandService(
            config.devices,
            config.groups,
            _CommandRunner(self.workers),
            buffer,
            pipeline.ack,
            pipeline.event,
            verifier=(
                CommandVerifier(
                    keys=keys.post_keys,
                    audience=config.gateway_id,
                    replay=CommandTableReplayStore(buffer),
                )
                if keys.post_keys
                else None
            ),
            allow_unsigned=config.allow_unsigned_commands,
            clock=(
                CachedClockState()
                if config.clock_synchronized is None
                else fixed_clock_state(config.clock_synchronized)
            ),
        )
        self.commands = commands
        uplink = Uplink(
            config.hub.mqtt,
            prefix=config.hub.prefix,
            gateway_id=config.gateway_id,
            buffer=buffer,
            on_command=commands.handle,
            max_inflight=config.hub.max_inflight,
            receipts=(
                ReceiptSettings(keys.receipt_keys, config.hub.receipt_timeout_s)
                if config.hub.receipts
                else None
            ),
        )
        uplink_box.append(uplink)
        self.uplink = uplink

        log.info(
            "agent %s starting: %d buses, %d devices, hub %s:%d",
            config.gateway_id,
            len(config.buses),
            len(config.devices),
            config.hub.mqtt.host,
            config.hub.mqtt.port,
        )
        try:
            async with asyncio.TaskGroup() as group:
                for bus_id, worker in self.workers.items():
                    group.create_task(worker.run(), name=f"bus-{bus_id}")
                group.create_task(pipeline.run(), name="pipeline")
                group.create_task(uplink.run(), name="uplink")
                group.create_task(self._housekeeping(buffer), name="housekeeping")
                self.started.set()
        finally:
            await commands.close()
            log.info("agent %s stopped", config.gateway_id)

    async def _housekeeping(self, buffer: Buffer) -> None:
        while True:
            await asyncio.sleep(COMMAND_MEMORY_PURGE_S)
            with contextlib.suppress(Exception):
                await buffer.forget_commands(now_ms())

    async def snapshot(self) -> Snapshot:
        assert self.buffer is not None and self.uplink is not None and self.pipeline is not None
        devices: dict[str, DeviceState] = {}
        for worker in self.workers.values():
            devices.update(worker.state)
        commands = self.commands
        return Snapshot(
            devices=devices,
            buses={bus_id: w.connected for bus_id, w in self.workers.items()},
            buffer=await self.buffer.stats(),
            uplink=self.uplink.stats,
            readings_in=self.pipeline.readings_in,
            batches_out=self.pipeline.batches_out,
            commands_accepted=commands.accepted if commands else 0,
            commands_rejected=commands.rejected if commands else 0,
        )


class _CommandRunner:
    """Puts a command's job on a bus, ahead of polling."""

    def __init__(self, workers: Mapping[str, BusWorker]) -> None:
        self._workers = workers

    async def run_on_bus(self, bus: str, job: Callable[[Driver], Awaitable[T]]) -> T:
        return await self._workers[bus].submit(Priority.COMMAND, job)


def _log_key_setup(config: GatewayConfig, keys: AgentKeys) -> None:
    """Say once, at start, what protects what: the operator must not have to guess."""
    if keys.sealer is not None:
        log.info(
            "readings sealed to hub key %s (%s), signed by gateway key %s",
            keys.sealer.hub_key.kid,
            keys.sealer.suite.name,
            keys.sealer.signer.skid,
        )
    else:
        log.warning(
            'hub.seal = "none": readings and events are published as plain JSON, readable by '
            "the broker and anyone it serves"
        )
    if config.allow_unsigned_commands:
        log.warning(
            "commands.allow_unsigned = true: anyone who can publish on the cmd topic commands "
            "the lamps (demo benches only)"
        )
    if not keys.post_keys:
        log.warning(
            "no control-post key (post-*.pub) in %s: every signed command will be refused",
            config.keys.dir,
        )
    else:
        log.info("control-post keys trusted: %s", ", ".join(sorted(keys.post_keys)))


def _report_drop(pipeline: Pipeline, report: DropReport) -> None:
    pipeline.event(
        "buffer_drop",
        None,
        "raised",
        {
            "count": report.count,
            "bytes": report.bytes,
            "first_seq": report.first_seq,
            "last_seq": report.last_seq,
            "dropped_total": report.dropped_total,
        },
    )
