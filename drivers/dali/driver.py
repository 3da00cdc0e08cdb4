"""The DALI driver: control gear on one DALI line, reached through a serial DALI interface.

One instance per bus (one DALI line behind one interface). Bus, device and point keys are
described in ``docs/drivers/dali.md``; frames come from :mod:`drivers.dali.codec`, memory-bank
plans from :mod:`drivers.dali.memory`, point sources from :mod:`drivers.dali.points`, and the
serial interface is whatever :func:`drivers.dali.interface.load_interface` finds by name.

A read costs as few transactions as the points allow (one QUERY STATUS for every status bit,
one latched plan per memory bank) and calls :meth:`DriverContext.checkpoint` between
transactions, so a command waiting for the line runs within one transaction; when one did, the
step in progress starts again (the command may have changed DTR0/DTR1 or the bank latch).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

from agent.sdk import (
    BusHealth,
    BusSpec,
    BusUnavailable,
    ConfigTable,
    DeviceSpec,
    DeviceUnreachable,
    Driver,
    DriverContext,
    FatalDriverError,
    PointSpec,
    Quality,
    Reading,
    Value,
    now_ms,
)

from . import codec, memory
from .interface import (
    BusEvent,
    DaliAnswer,
    DaliBusPowerError,
    DaliInterface,
    DaliInterfaceError,
    Outcome,
    UnknownInterface,
    available_interfaces,
    load_interface,
)
from .points import PointSource, SourceKind, parse_point

__all__ = [
    "ANSWERED_TRANSACTION_S",
    "BUS_KEYS",
    "DEVICE_KEYS",
    "MAX_TRANSACTIONS_PER_S",
    "SILENT_TRANSACTION_S",
    "BusSettings",
    "DaliBusHealth",
    "DaliDriver",
    "GearConfig",
    "parse_bus",
    "parse_gear",
]

logger = logging.getLogger(__name__)

BUS_KEYS: Final = ("interface", "device", "baudrate", "metrics_interval_s")
DEVICE_KEYS: Final = ("address", "groups")

DEFAULT_METRICS_INTERVAL_S: Final = 60.0
INTERFACE_RETRIES: Final = 2
"""A step whose interface report was garbled or missing runs again this many times before the
device is reported unreachable (the gear's DTR0 may not have moved as planned: start over)."""
MAX_STEP_RESTARTS: Final = 4
"""Commands may pre-empt one step this many times; after that it runs to its end, so a stream
of commands cannot starve a bank read forever."""

# Bus occupancy of one transaction, from IEC 62386-101 timing at 1200 bit/s (a transaction is
# one forward frame, what follows it, and the settling time before the next forward frame).
FORWARD_FRAME_S: Final = 17 / 1200 + 0.00245
"""Start bit, 16 data bits, stop condition: 16.6 ms."""
BACKWARD_DELAY_S: Final = 0.0055
"""Shortest gap between a forward frame and the backward frame that answers it."""
BACKWARD_FRAME_S: Final = 9 / 1200 + 0.00245
"""Start bit, 8 data bits, stop condition: 9.9 ms."""
SETTLING_S: Final = 0.0135
"""Quiet time before the next forward frame (priority 1, the shortest)."""
NO_ANSWER_WINDOW_S: Final = 0.0124
ANSWERED_TRANSACTION_S: Final = FORWARD_FRAME_S + BACKWARD_DELAY_S + BACKWARD_FRAME_S + SETTLING_S
"""45.5 ms: a query that is answered (or answered by several at once)."""
SILENT_TRANSACTION_S: Final = FORWARD_FRAME_S + max(NO_ANSWER_WINDOW_S, SETTLING_S)
"""30.1 ms: a command, or a query nobody answers."""
SEND_TWICE_EXTRA_S: Final = SETTLING_S + FORWARD_FRAME_S
"""The second frame of a configuration command."""
MAX_TRANSACTIONS_PER_S: Final = 2 / (ANSWERED_TRANSACTION_S + SILENT_TRANSACTION_S)
"""≈ 26.4/s: the theoretical rate of a line that alternates queries and commands (one
transaction every 37.8 ms on average); a line of queries only does 22/s, of commands 33/s."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BusSettings:
    interface: str
    device: str
    baudrate: int | None
    metrics_interval_s: float


@dataclass(frozen=True, slots=True)
class GearConfig:
    """A device table's DALI keys."""

    address: int
    groups: frozenset[int]


def parse_bus(options: ConfigTable) -> BusSettings:
    """Validate a bus table's DALI keys (no I/O); errors name the file and line."""
    options.check_keys(BUS_KEYS)
    installed = available_interfaces()
    interface = options.get_str("interface")
    if interface not in installed:
        raise options.error(
            "interface",
            f"no DALI interface named {interface!r} is installed; installed: "
            f"{', '.join(installed) or 'none'}",
        )
    device = options.get_str("device")
    if not device.strip():
        raise options.error("device", "expected a serial device path, got an empty string")
    return BusSettings(
        interface=interface,
        device=device,
        baudrate=options.get_int("baudrate", None, minimum=1200, maximum=4_000_000),
        metrics_interval_s=options.get_float(
            "metrics_interval_s",
            DEFAULT_METRICS_INTERVAL_S,
            minimum=0.0,
            exclusive_minimum=True,
        ),
    )


def parse_gear(options: ConfigTable) -> GearConfig:
    """Validate a device table's DALI keys: ``address`` (0..63, required), ``groups``."""
    options.check_keys(DEVICE_KEYS)
    address = cast(int, options.get_int("address", minimum=0, maximum=63))
    raw = options.get("groups", [])
    if not isinstance(raw, list) or any(
        isinstance(g, bool) or not isinstance(g, int) or not 0 <= g <= 15 for g in raw
    ):
        raise options.error("groups", f"expected a list of DALI groups 0..15, got {raw!r}")
    if len(set(raw)) != len(raw):
        raise options.error("groups", f"a group is listed twice: {raw!r}")
    return GearConfig(address, frozenset(raw))


# --------------------------------------------------------------------------------------------
# Health
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class DaliBusHealth(BusHealth):
    """:class:`BusHealth` plus the line's load over the last metrics window."""

    transactions_per_s: float = 0.0
    utilisation: float = 0.0
    """Percent of the time the line was busy with frames and settling (see
    :data:`ANSWERED_TRANSACTION_S`)."""
    bus_power_ok: bool = True

    def as_dict(self) -> dict[str, Any]:
        body = BusHealth.as_dict(self)
        body.update(
            transactions_per_s=self.transactions_per_s,
            utilisation=self.utilisation,
            bus_power_ok=self.bus_power_ok,
        )
        return body


@dataclass(slots=True)
class _Window:
    started: float
    transactions: int
    busy_s: float


class _Restart(Exception):
    """A command ran on the line in the middle of a step: run the step again."""


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


class DaliDriver(Driver):
    """DALI control gear through a serial DALI interface. See ``docs/drivers/dali.md``."""

    name = "dali"
    one_transaction_at_a_time = True

    # Configuration-time validation -----------------------------------------------------
    @classmethod
    def validate_bus(cls, bus: BusSpec) -> None:
        parse_bus(bus.options)

    @classmethod
    def validate_point(cls, point: PointSpec) -> None:
        parse_point(point)

    @classmethod
    def validate_device(cls, device: DeviceSpec) -> None:
        parse_gear(device.options)

    # Lifecycle ---------------------------------------------------------------------------
    def __init__(self, bus: BusSpec, devices: Sequence[DeviceSpec], context: DriverContext) -> None:
        super().__init__(bus, devices, context)
        self.settings = parse_bus(bus.options)
        self.gear: dict[str, GearConfig] = {d.id: parse_gear(d.options) for d in devices}
        by_address: dict[int, str] = {}
        for device_id, gear in self.gear.items():
            if gear.address in by_address:
                logger.warning(
                    "bus %s: devices %s and %s share DALI short address %d",
                    bus.id,
                    by_address[gear.address],
                    device_id,
                    gear.address,
                )
            by_address[gear.address] = device_id
        self._sources: dict[tuple[str, str], PointSource] = {}
        self._interface: DaliInterface | None = None
        self._health = DaliBusHealth()
        self._connected_before = False
        self._fade_codes: dict[int, int] = {}
        self._power_fault: BusEvent | None = None
        self._busy_s = 0.0
        self._window = _Window(time.monotonic(), 0, 0.0)
        self._last_rates = (0.0, 0.0)

    @property
    def interface(self) -> DaliInterface | None:
        """The open interface (for tools and tests), ``None`` while disconnected."""
        return self._interface

    async def connect(self) -> None:
        await self.close()
        try:
            interface_cls = load_interface(self.settings.interface)
        except (UnknownInterface, TypeError) as exc:
            raise FatalDriverError(f"bus {self.bus.id}: {exc}") from exc
        interface = interface_cls(
            self.settings.device, baudrate=self.settings.baudrate, on_event=self._on_bus_event
        )
        try:
            await interface.open()
        except BusUnavailable as exc:
            self._health.errors += 1
            self._health.last_error = str(exc)
            raise BusUnavailable(f"bus {self.bus.id}: {exc}") from exc
        self._interface = interface
        # Another master may have changed fade times while we were away.
        self._fade_codes.clear()
        self._window = _Window(time.monotonic(), self._health.transactions, self._busy_s)
        if self._connected_before:
            self._health.reconnects += 1
        self._connected_before = True
        logger.info(
            "bus %s: %s interface on %s open",
            self.bus.id,
            self.settings.interface,
            self.settings.device,
        )

    async def close(self) -> None:
        interface, self._interface = self._interface, None
        if interface is not None:
            await interface.close()
            logger.info("bus %s: closed", self.bus.id)

    async def run(self) -> None:
        """Emit the line's load as readings of the device ``<bus id>`` every
        ``metrics_interval_s``."""
        while True:
            await asyncio.sleep(self.settings.metrics_interval_s)
            rate, utilisation = self._close_window()
            ts = now_ms()
            self.context.emit(
                [
                    Reading(self.bus.id, "transactions_per_s", round(rate, 3), "1/s", ts),
                    Reading(self.bus.id, "utilisation", round(utilisation, 2), "%", ts),
                ]
            )

    def health(self) -> BusHealth:
        rate, utilisation = self._window_rates()
        health = self._health
        interface = self._interface
        return DaliBusHealth(
            connected=interface is not None,
            transactions=health.transactions,
            timeouts=health.timeouts,
            errors=health.errors,
            reconnects=health.reconnects,
            last_error=health.last_error,
            transactions_per_s=round(rate, 3),
            utilisation=round(utilisation, 2),
            bus_power_ok=self._power_fault is None,
        )

    # I/O ---------------------------------------------------------------------------------
    async def read(self, device: DeviceSpec, points: Sequence[PointSpec]) -> list[Reading]:
        gear = self._gear_of(device)
        short = codec.Short(gear.address)
        sources = [(point, self._source(device, point)) for point in points]
        kinds = {source.kind for _, source in sources}
        values: dict[str, Value] = {}
        reader = _GearRead(self, device.id)

        if kinds & {SourceKind.STATUS, SourceKind.STATUS_BIT}:
            status = await reader.query(codec.command(short, codec.Opcode.QUERY_STATUS))
            for point, source in sources:
                if status is None:
                    continue
                if source.kind is SourceKind.STATUS:
                    values[point.name] = status
                elif source.kind is SourceKind.STATUS_BIT and source.bit is not None:
                    values[point.name] = bool(status >> source.bit & 1)
        if SourceKind.LEVEL in kinds:
            level = await reader.query(codec.command(short, codec.Opcode.QUERY_ACTUAL_LEVEL))
            if level is not None and level != codec.MASK:
                percent = round(codec.arc_to_percent(level), 3)
                values.update({p.name: percent for p, s in sources if s.kind is SourceKind.LEVEL})
        if SourceKind.DEVICE_TYPE in kinds:
            device_type = await reader.query(codec.command(short, codec.Opcode.QUERY_DEVICE_TYPE))
            if device_type is not None:
                values.update(
                    {p.name: device_type for p, s in sources if s.kind is SourceKind.DEVICE_TYPE}
                )
        if SourceKind.LED_FAILURE in kinds:
            failure = await reader.query(codec.dt6(short, codec.Dt6Opcode.QUERY_FAILURE_STATUS))
            if failure is not None:
                values.update(
                    {p.name: failure for p, s in sources if s.kind is SourceKind.LED_FAILURE}
                )
        banks: dict[int, list[tuple[PointSpec, PointSource]]] = {}
        for point, source in sources:
            if source.kind is SourceKind.BANK and source.bank is not None:
                banks.setdefault(source.bank.number, []).append((point, source))
        for number, wanted in banks.items():
            names = sorted({s.field.name for _, s in wanted if s.field is not None})
            plan = memory.plan_read(gear.address, memory.BANKS[number], names)
            decoded = await reader.bank(plan)
            for point, source in wanted:
                if source.field is not None:
                    values[point.name] = decoded.get(source.field.name)
        await reader.finish()

        ts = now_ms()
        return [
            Reading(device.id, p.name, values.get(p.name), p.unit, ts)
            if values.get(p.name) is not None
            else Reading(device.id, p.name, None, p.unit, ts, Quality.BAD)
            for p in points
        ]

    async def write(
        self,
        device: DeviceSpec,
        point: PointSpec,
        value: float | int | bool,
        *,
        fade_s: float | None = None,
    ) -> None:
        gear = self._gear_of(device)
        self._check_writable(device, point)
        arc = _arc_level(f"{device.id}.{point.name}", value)
        await self._apply(codec.Short(gear.address), [gear.address], arc, fade_s)
        logger.debug("device %s: level %s %% (arc %d)", device.id, value, arc)

    async def write_many(
        self,
        targets: Sequence[tuple[DeviceSpec, PointSpec]],
        value: float | int | bool,
        *,
        fade_s: float | None = None,
    ) -> Mapping[str, Exception]:
        failures: dict[str, Exception] = {}
        valid: list[DeviceSpec] = []
        for device, point in targets:
            try:
                self._gear_of(device)
                self._check_writable(device, point)
            except FatalDriverError as exc:
                failures[device.id] = exc
                continue
            valid.append(device)
        if not valid:
            return failures
        arc = _arc_level("level", value)
        address = self._collective_address({d.id for d in valid}) if len(valid) > 1 else None
        if address is None:
            for device in valid:
                short = self.gear[device.id].address
                try:
                    await self._apply(codec.Short(short), [short], arc, fade_s)
                except BusUnavailable:
                    raise
                except Exception as exc:
                    failures[device.id] = exc
            return failures
        shorts = [self.gear[d.id].address for d in valid]
        try:
            await self._apply(address, shorts, arc, fade_s)
        except BusUnavailable:
            raise
        except Exception as exc:
            failures.update({d.id: exc for d in valid})
        else:
            logger.debug(
                "bus %s: level arc %d to %s (%d gear)", self.bus.id, arc, address, len(valid)
            )
        return failures

    # ------------------------------------------------------------------------------------
    def _gear_of(self, device: DeviceSpec) -> GearConfig:
        gear = self.gear.get(device.id)
        if gear is None:
            raise FatalDriverError(f"device {device.id} is not on bus {self.bus.id}")
        return gear

    def _source(self, device: DeviceSpec, point: PointSpec) -> PointSource:
        key = (device.id, point.name)
        source = self._sources.get(key)
        if source is None:
            source = self._sources[key] = parse_point(point)
        return source

    def _check_writable(self, device: DeviceSpec, point: PointSpec) -> None:
        if not point.writable or self._source(device, point).kind is not SourceKind.LEVEL:
            raise FatalDriverError(f"{device.id}.{point.name} is not a writable level point")

    def _collective_address(self, ids: set[str]) -> codec.Address | None:
        """Broadcast when ``ids`` are every gear of the bus, a group address when they are
        exactly the configured members of a DALI group, else None."""
        if ids == set(self.gear):
            return codec.BROADCAST
        for group in range(16):
            members = {d for d, gear in self.gear.items() if group in gear.groups}
            if members == ids:
                return codec.Group(group)
        return None

    async def _apply(
        self, address: codec.Address, shorts: Sequence[int], arc: int, fade_s: float | None
    ) -> None:
        """DAPC ``arc`` to ``address`` (which reaches ``shorts``), setting the fade time first
        when it is not what those gear were last given."""
        steps: list[codec.Command] = []
        if fade_s is not None:
            try:
                code = codec.fade_time_code(fade_s)
            except ValueError as exc:
                raise ValueError(f"fade_s: {exc}") from None
        else:
            # Without a fade asked for, undo a fade time Lampyre gave earlier (a gear we never
            # touched keeps the fade time it was commissioned with).
            code = 0 if any(self._fade_codes.get(s, 0) != 0 for s in shorts) else -1
        if code >= 0 and any(self._fade_codes.get(s) != code for s in shorts):
            steps += [codec.dtr0(code), codec.command(address, codec.Opcode.SET_FADE_TIME)]
        steps.append(codec.dapc(address, arc))
        for attempt in range(INTERFACE_RETRIES + 1):
            try:
                for step in steps:
                    await self._send(step)
                break
            except DaliInterfaceError as exc:
                if attempt == INTERFACE_RETRIES:
                    raise DeviceUnreachable(f"bus {self.bus.id}: {exc}") from exc
                logger.info("bus %s: %s; sending again", self.bus.id, exc)
            except DaliBusPowerError as exc:
                raise DeviceUnreachable(f"bus {self.bus.id}: {exc}") from exc
        if code >= 0:
            self._fade_codes.update(dict.fromkeys(shorts, code))

    async def _send(self, command: codec.Command) -> DaliAnswer:
        """One transaction (two for an application-extended command: ENABLE DEVICE TYPE
        immediately before it)."""
        if command.device_type is not None:
            await self._send(codec.enable_device_type(command.device_type))
        interface = self._interface
        if interface is None:
            raise BusUnavailable(f"bus {self.bus.id} is not connected")
        self._health.transactions += 1
        try:
            answer = await interface.send(
                command.frame,
                send_twice=command.send_twice,
                expect_answer=command.expects_answer,
            )
        except BusUnavailable as exc:
            self._health.errors += 1
            self._health.last_error = str(exc)
            raise BusUnavailable(f"bus {self.bus.id}: {exc}") from exc
        except DaliInterfaceError as exc:
            self._health.timeouts += 1
            self._health.last_error = str(exc)
            self._busy_s += SILENT_TRANSACTION_S
            raise
        except DaliBusPowerError as exc:
            self._health.errors += 1
            self._health.last_error = str(exc)
            raise
        silent = answer.outcome is Outcome.NO_ANSWER
        busy = SILENT_TRANSACTION_S if silent else ANSWERED_TRANSACTION_S
        self._busy_s += busy + (SEND_TWICE_EXTRA_S if command.send_twice else 0.0)
        return answer

    def _on_bus_event(self, event: BusEvent) -> None:
        if event is BusEvent.POWER_OK:
            if self._power_fault is not None:
                self._power_fault = None
                logger.info("bus %s: DALI bus power is back", self.bus.id)
                self.context.event("dali_bus_power", None, {"state": "cleared", "bus": self.bus.id})
            return
        if self._power_fault is None:
            logger.warning("bus %s: DALI bus %s", self.bus.id, event.value.replace("_", " "))
            self.context.event(
                "dali_bus_power",
                None,
                {"state": "raised", "bus": self.bus.id, "cause": event.value},
            )
        self._power_fault = event

    # Metrics ----------------------------------------------------------------------------
    def _window_rates(self) -> tuple[float, float]:
        window = self._window
        elapsed = time.monotonic() - window.started
        if elapsed <= 0:
            return self._last_rates
        rate = (self._health.transactions - window.transactions) / elapsed
        utilisation = min(100.0, 100.0 * (self._busy_s - window.busy_s) / elapsed)
        return rate, utilisation

    def _close_window(self) -> tuple[float, float]:
        rates = self._window_rates()
        self._last_rates = rates
        self._window = _Window(time.monotonic(), self._health.transactions, self._busy_s)
        return rates


def _arc_level(where: str, value: float | int | bool) -> int:
    if isinstance(value, bool):
        value = 100.0 if value else 0.0
    try:
        return codec.percent_to_arc(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


class _GearRead:
    """The transactions of one ``read`` of one gear: checkpoints between them, restarts of a
    step after a command pre-empted it or the interface garbled a report, and the decision that
    the gear is not there at all."""

    def __init__(self, driver: DaliDriver, device_id: str) -> None:
        self._driver = driver
        self._device_id = device_id
        self._short = codec.Short(driver.gear[device_id].address)
        self._answered = False
        self._first = True

    async def query(self, command: codec.Command) -> int | None:
        """The answer byte of one query, ``None`` when the gear gave no usable one."""
        answers = await self._step([command])
        if not self._answered:
            await self._check_present()
        return answers[0]

    async def bank(self, plan: memory.BankRead) -> dict[str, memory.MemoryValue]:
        answers = await self._step(list(plan.commands()))
        if not self._answered:
            await self._check_present()
        return plan.decode(answers)

    async def finish(self) -> None:
        if not self._answered:
            await self._check_present()

    async def _check_present(self) -> None:
        """Nothing answered yet: ask once whether the gear is there before spending more
        transactions on it."""
        present = await self._step(
            [codec.command(self._short, codec.Opcode.QUERY_CONTROL_GEAR_PRESENT)],
            yes_no=True,
        )
        if present[0] is None:
            raise DeviceUnreachable(
                f"device {self._device_id} (DALI short address {self._short.number}) "
                "does not answer"
            )

    async def _step(
        self, commands: list[codec.Command], *, yes_no: bool = False
    ) -> list[int | None]:
        driver = self._driver
        restarts = 0
        failures = 0
        while True:
            try:
                return await self._run(commands, yes_no, checkpoints=restarts < MAX_STEP_RESTARTS)
            except _Restart:
                restarts += 1
                logger.debug(
                    "device %s: a command used the line; step restarted (%d)",
                    self._device_id,
                    restarts,
                )
            except DaliInterfaceError as exc:
                failures += 1
                if failures > INTERFACE_RETRIES:
                    raise DeviceUnreachable(f"device {self._device_id}: {exc}") from exc
                logger.info("device %s: %s; step restarted", self._device_id, exc)
            except DaliBusPowerError as exc:
                raise DeviceUnreachable(
                    f"device {self._device_id} on bus {driver.bus.id}: {exc}"
                ) from exc

    async def _run(
        self, commands: list[codec.Command], yes_no: bool, *, checkpoints: bool
    ) -> list[int | None]:
        driver = self._driver
        answers: list[int | None] = []
        for command in commands:
            if checkpoints and not self._first and await driver.context.checkpoint():
                raise _Restart
            self._first = False
            answer = await driver._send(command)
            if not command.expects_answer:
                answers.append(None)
                continue
            if answer.outcome is Outcome.ANSWER:
                self._answered = True
                answers.append(answer.value)
            elif answer.outcome is Outcome.COLLISION:
                self._answered = True
                if yes_no or command.answer is codec.AnswerKind.YES_NO:
                    answers.append(codec.YES)
                else:
                    # Two gear answering one short address: neither value can be trusted.
                    logger.warning(
                        "device %s: several gear answered %s (duplicate short address?)",
                        self._device_id,
                        command,
                    )
                    answers.append(None)
            else:
                answers.append(None)
        return answers
