"""The Modbus driver: Modbus TCP and Modbus RTU (serial) through pymodbus.

One instance per bus (one TCP endpoint or one serial line). Point options, bus and device keys
are described in ``docs/drivers/modbus.md``; the register codec is :mod:`drivers.modbus.codec`,
request planning :mod:`drivers.modbus.plan`, everything pymodbus-specific :mod:`.link`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from typing import Final, cast

from pymodbus.pdu import ModbusPDU

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
    TransientError,
    now_ms,
)

from . import codec
from .link import (
    BadReply,
    ClientCall,
    LinkDown,
    LinkSettings,
    ModbusLink,
    NoReply,
    ReplyCheck,
    Transport,
)
from .plan import PlannedPoint, PointAddress, ReadRequest, parse_point, plan_reads
from .plan import split_without_gaps as _split

__all__ = ["EXCEPTION_NAMES", "ModbusDriver", "parse_bus", "parse_unit"]

logger = logging.getLogger(__name__)

MAX_PLAN_CACHE_ENTRIES: Final = 1024
"""Read plans kept per bus; the runtime asks for a handful of point sets per device."""

READ_FUNCTION_CODES: Final[dict[str, int]] = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
FC_WRITE_COIL: Final = 5
FC_WRITE_REGISTER: Final = 6
FC_WRITE_REGISTERS: Final = 16

ILLEGAL_DATA_ADDRESS: Final = 0x02
EXCEPTION_NAMES: Final[dict[int, str]] = {
    0x01: "ILLEGAL FUNCTION",
    0x02: "ILLEGAL DATA ADDRESS",
    0x03: "ILLEGAL DATA VALUE",
    0x04: "SERVER DEVICE FAILURE",
    0x05: "ACKNOWLEDGE",
    0x06: "SERVER DEVICE BUSY",
    0x07: "NEGATIVE ACKNOWLEDGE",
    0x08: "MEMORY PARITY ERROR",
    0x0A: "GATEWAY PATH UNAVAILABLE",
    0x0B: "GATEWAY TARGET DEVICE FAILED TO RESPOND",
}
# A gateway answering one of these is telling us the device behind it did not answer.
GATEWAY_NO_DEVICE: Final = frozenset({0x0A, 0x0B})
# Worth trying again later; every other exception code will give the same answer again.
TRY_LATER: Final = frozenset({0x05, 0x06})

BUS_KEYS_COMMON: Final = ("transport", "timeout_s", "inter_request_gap_s")
BUS_KEYS_TCP: Final = ("host", "port")
BUS_KEYS_RTU: Final = ("device", "baudrate", "parity", "stopbits", "bytesize")
DEVICE_KEYS: Final = ("unit",)


def exception_name(code: int) -> str:
    return EXCEPTION_NAMES.get(code, f"exception {code:#04x}")


def parse_bus(options: ConfigTable) -> LinkSettings:
    """Validate a bus table's Modbus keys (no I/O); raise ConfigError naming file and line."""
    options.check_keys(BUS_KEYS_COMMON + BUS_KEYS_TCP + BUS_KEYS_RTU)
    transport = cast(Transport, options.get_str("transport", choices=("tcp", "rtu")))
    own = BUS_KEYS_TCP if transport == "tcp" else BUS_KEYS_RTU
    options.check_keys(BUS_KEYS_COMMON + own)
    timeout_s = options.get_float("timeout_s", 1.0, minimum=0.0, exclusive_minimum=True)
    gap_s = options.get_float("inter_request_gap_s", 0.0, minimum=0.0)
    if transport == "tcp":
        host = options.get_str("host")
        if not host.strip():
            raise options.error("host", "expected a host name or address, got an empty string")
        port = options.get_int("port", 502, minimum=1, maximum=65535)
        return LinkSettings("tcp", timeout_s, gap_s, host=host, port=port)
    device = options.get_str("device")
    if not device.strip():
        raise options.error("device", "expected a serial device path, got an empty string")
    return LinkSettings(
        "rtu",
        timeout_s,
        gap_s,
        device=device,
        baudrate=options.get_int("baudrate", 9600, minimum=50, maximum=4_000_000),
        parity=options.get_str("parity", "N", choices=("N", "E", "O")),
        stopbits=options.get_int("stopbits", 1, minimum=1, maximum=2),
        bytesize=options.get_int("bytesize", 8, minimum=7, maximum=8),
    )


def parse_unit(options: ConfigTable) -> int:
    """Validate a device table's Modbus keys: the unit id (0..247, required)."""
    options.check_keys(DEVICE_KEYS)
    return cast(int, options.get_int("unit", minimum=0, maximum=247))


class ModbusDriver(Driver):
    """Modbus TCP / RTU client. See ``docs/drivers/modbus.md``."""

    name = "modbus"
    one_transaction_at_a_time = True

    # Configuration-time validation ---------------------------------------------------
    @classmethod
    def validate_bus(cls, bus: BusSpec) -> None:
        parse_bus(bus.options)

    @classmethod
    def validate_point(cls, point: PointSpec) -> None:
        parse_point(point)

    @classmethod
    def validate_device(cls, device: DeviceSpec) -> None:
        parse_unit(device.options)

    # Lifecycle ---------------------------------------------------------------------------
    def __init__(self, bus: BusSpec, devices: Sequence[DeviceSpec], context: DriverContext) -> None:
        super().__init__(bus, devices, context)
        self.settings = parse_bus(bus.options)
        self._health = BusHealth()
        self._link: ModbusLink | None = None
        self._connected_before = False
        self._units: dict[str, int] = {}
        self._addresses: dict[tuple[str, str], PointAddress] = {}
        self._plans: dict[tuple[str, tuple[str, ...]], tuple[ReadRequest, ...]] = {}

    async def connect(self) -> None:
        await self.close()
        link = ModbusLink(self.settings, name=f"modbus:{self.bus.id}", health=self._health)
        try:
            await link.open()
        except LinkDown as exc:
            self._health.errors += 1
            self._health.last_error = str(exc)
            raise self._bus_unavailable(exc) from exc
        self._link = link
        if self._connected_before:
            self._health.reconnects += 1
        self._connected_before = True
        logger.info("bus %s: connected to %s", self.bus.id, self.settings.endpoint)

    async def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.close()
            # Let the transport's close callbacks run so the socket or port is really released.
            await asyncio.sleep(0)
            logger.info("bus %s: closed", self.bus.id)

    # I/O ---------------------------------------------------------------------------------
    async def read(self, device: DeviceSpec, points: Sequence[PointSpec]) -> list[Reading]:
        unit = self._unit(device)
        key = (device.id, tuple(point.name for point in points))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(device, points)
        readings: list[Reading] = []
        pending = list(plan)
        kept: list[ReadRequest] = []
        replanned = False
        while pending:
            request = pending.pop(0)
            reply = await self._read_once(device, unit, request)
            if (
                reply.isError()
                and reply.exception_code == ILLEGAL_DATA_ADDRESS
                and request.has_gaps
            ):
                # The span reads through registers the device does not have; read its points
                # without the holes, now and from now on.
                logger.info(
                    "device %s: %s %d..%d crosses unmapped addresses; reading it in parts",
                    device.id,
                    request.kind,
                    request.address,
                    request.address + request.count - 1,
                )
                pending[0:0] = _split(request)
                replanned = True
                continue
            kept.append(request)
            readings.extend(self._decode(device, request, reply))
        if replanned or key not in self._plans:
            if len(self._plans) >= MAX_PLAN_CACHE_ENTRIES:
                self._plans.clear()
            self._plans[key] = tuple(kept)
        return readings

    async def write(
        self,
        device: DeviceSpec,
        point: PointSpec,
        value: float | int | bool,
        *,
        fade_s: float | None = None,  # Modbus registers take a value at once: no fade
    ) -> None:
        unit = self._unit(device)
        address = self._address(device, point)
        if not point.writable:
            raise FatalDriverError(f"{device.id}.{point.name} is not writable")
        where = f"{device.id}.{point.name}"
        if address.is_bit:
            if value not in (0, 1):
                raise ValueError(f"{where}: a coil takes true/false or 1/0, got {value!r}")
            bit = bool(value)
            reply = await self._transact(
                device,
                unit,
                FC_WRITE_COIL,
                lambda c: c.write_coil(address.address, bit, device_id=unit),
                lambda r: _check_echo(
                    r.address, address.address, [bool(b) for b in r.bits[:1]], [bit]
                ),
            )
        else:
            try:
                registers = codec.encode(
                    value, cast(codec.RegisterType, address.type), address.word_order, address.scale
                )
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
            if len(registers) == 1:
                reply = await self._transact(
                    device,
                    unit,
                    FC_WRITE_REGISTER,
                    lambda c: c.write_register(address.address, registers[0], device_id=unit),
                    lambda r: _check_echo(r.address, address.address, list(r.registers), registers),
                )
            else:
                reply = await self._transact(
                    device,
                    unit,
                    FC_WRITE_REGISTERS,
                    lambda c: c.write_registers(address.address, registers, device_id=unit),
                    lambda r: _check_echo(r.address, address.address, [r.count], [len(registers)]),
                )
        if reply.isError():
            code = reply.exception_code
            message = f"{where}: device refused the write: {exception_name(code)}"
            self._health.errors += 1
            self._health.last_error = message
            if code in GATEWAY_NO_DEVICE:
                raise DeviceUnreachable(message)
            if code in TRY_LATER:
                raise TransientError(message)
            raise FatalDriverError(message)
        logger.debug("device %s: wrote %s = %r", device.id, point.name, value)

    def health(self) -> BusHealth:
        health = self._health
        return BusHealth(
            connected=self._link is not None and self._link.connected,
            transactions=health.transactions,
            timeouts=health.timeouts,
            errors=health.errors,
            reconnects=health.reconnects,
            last_error=health.last_error,
        )

    # ------------------------------------------------------------------------------------
    def _unit(self, device: DeviceSpec) -> int:
        unit = self._units.get(device.id)
        if unit is None:
            unit = self._units[device.id] = parse_unit(device.options)
        return unit

    def _address(self, device: DeviceSpec, point: PointSpec) -> PointAddress:
        key = (device.id, point.name)
        address = self._addresses.get(key)
        if address is None:
            address = self._addresses[key] = parse_point(point)
        return address

    def _plan(self, device: DeviceSpec, points: Sequence[PointSpec]) -> tuple[ReadRequest, ...]:
        return plan_reads(PlannedPoint(p, self._address(device, p)) for p in points)

    async def _read_once(self, device: DeviceSpec, unit: int, request: ReadRequest) -> ModbusPDU:
        start, count = request.address, request.count
        call: ClientCall
        if request.kind == "holding":
            call = lambda c: c.read_holding_registers(start, count=count, device_id=unit)  # noqa: E731
        elif request.kind == "input":
            call = lambda c: c.read_input_registers(start, count=count, device_id=unit)  # noqa: E731
        elif request.kind == "coil":
            call = lambda c: c.read_coils(start, count=count, device_id=unit)  # noqa: E731
        else:
            call = lambda c: c.read_discrete_inputs(start, count=count, device_id=unit)  # noqa: E731
        if request.kind in ("coil", "discrete"):
            # Bits come packed in bytes, padded to a multiple of 8.
            def check(reply: ModbusPDU) -> str | None:
                expected = -(-count // 8) * 8
                if len(reply.bits) != expected:
                    return f"asked {count} bits, got {len(reply.bits)}"
                return None
        else:

            def check(reply: ModbusPDU) -> str | None:
                if len(reply.registers) != count:
                    return f"asked {count} registers, got {len(reply.registers)}"
                return None

        reply = await self._transact(device, unit, READ_FUNCTION_CODES[request.kind], call, check)
        if reply.isError():
            self._health.errors += 1
            name = exception_name(reply.exception_code)
            self._health.last_error = f"unit {unit}: {name}"
            if reply.exception_code in GATEWAY_NO_DEVICE:
                raise DeviceUnreachable(f"device {device.id} (unit {unit}): {name}")
            logger.debug(
                "device %s: %s %d+%d refused: %s", device.id, request.kind, start, count, name
            )
        return reply

    async def _transact(
        self,
        device: DeviceSpec,
        unit: int,
        function_code: int,
        call: ClientCall,
        check: ReplyCheck,
    ) -> ModbusPDU:
        link = self._link
        if link is None:
            raise self._bus_unavailable("not connected")
        try:
            return await link.transact(unit, function_code, call, check)
        except LinkDown as exc:
            raise self._bus_unavailable(exc) from exc
        except NoReply as exc:
            raise DeviceUnreachable(f"device {device.id}: {exc}") from exc
        except BadReply as exc:
            raise DeviceUnreachable(f"device {device.id}: {exc}") from exc

    def _decode(self, device: DeviceSpec, request: ReadRequest, reply: ModbusPDU) -> list[Reading]:
        ts = now_ms()
        if reply.isError():
            return [_bad(device, planned, ts) for planned in request.points]
        readings: list[Reading] = []
        for planned in request.points:
            address = planned.address
            offset = address.address - request.address
            value: bool | int | float
            if address.is_bit:
                value = bool(reply.bits[offset])
            else:
                words = reply.registers[offset : offset + address.width]
                value = codec.decode(
                    words, cast(codec.RegisterType, address.type), address.word_order, address.scale
                )
                if isinstance(value, float) and not math.isfinite(value):
                    readings.append(_bad(device, planned, ts))
                    continue
            spec = planned.spec
            readings.append(Reading(device.id, spec.name, value, spec.unit, ts, Quality.GOOD))
        return readings

    def _bus_unavailable(self, reason: object) -> BusUnavailable:
        return BusUnavailable(f"bus {self.bus.id} ({self.settings.endpoint}): {reason}")


def _bad(device: DeviceSpec, planned: PlannedPoint, ts: int) -> Reading:
    spec = planned.spec
    return Reading(device.id, spec.name, None, spec.unit, ts, Quality.BAD)


def _check_echo(
    address: int, expected_address: int, values: list[int] | list[bool], expected: Sequence[object]
) -> str | None:
    if address != expected_address or list(values) != list(expected):
        return f"write echo {address}={values} does not match {expected_address}={list(expected)}"
    return None
