"""Simulated Modbus devices: a small base class and the equipment Lampyre talks to.

A device is pure state: it answers decoded requests and knows nothing about transports,
framing or timing. Physical quantities are computed on read from a monotonic clock, so no
background task is needed and tests can drive time through the ``clock`` argument.
"""

from __future__ import annotations

import logging
import math
import random
import struct
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from firmware_sim.modbus.protocol import (
    ExceptionCode,
    FunctionCode,
    ModbusException,
    ReadRequest,
    Request,
    WriteMultipleCoils,
    WriteMultipleRegisters,
    WriteSingleCoil,
    WriteSingleRegister,
    decode_request,
    encode_exception,
    encode_read_bits_response,
    encode_read_registers_response,
    encode_write_response,
)

__all__ = [
    "DataType",
    "EnergyMeter",
    "Faults",
    "LampController",
    "MemoryDevice",
    "ModbusDevice",
    "from_registers",
    "to_registers",
]

logger = logging.getLogger(__name__)

_V = TypeVar("_V")
Clock = Callable[[], float]
DataType = Literal["int16", "uint16", "int32", "uint32", "float32"]
WordOrder = Literal["big", "little"]

_STRUCT_FORMATS: dict[str, str] = {
    "int16": ">h",
    "uint16": ">H",
    "int32": ">i",
    "uint32": ">I",
    "float32": ">f",
}


def to_registers(value: float, data_type: DataType, word_order: WordOrder = "big") -> list[int]:
    """The 16-bit registers holding ``value``; integers are rounded and wrap around like a
    device counter does. ``word_order`` only matters for 32-bit types."""
    if data_type == "float32":
        raw = struct.pack(">f", value)
    else:
        bits = 16 if data_type.endswith("16") else 32
        integer = round(value) % (1 << bits)
        raw = struct.pack(">H" if bits == 16 else ">I", integer)
    words = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
    return words[::-1] if word_order == "little" else words


def from_registers(
    registers: Sequence[int], data_type: DataType, word_order: WordOrder = "big"
) -> float | int:
    """The inverse of :func:`to_registers`."""
    words = list(registers)[::-1] if word_order == "little" else list(registers)
    raw = b"".join(word.to_bytes(2, "big") for word in words)
    value: float | int = struct.unpack(_STRUCT_FORMATS[data_type], raw)[0]
    return value


@dataclass
class Faults:
    """Misbehaviour of one unit, mutable while the simulator runs.

    A unit with ``no_answer`` neither answers nor executes (it is as good as absent); with
    ``exception_code`` it refuses every request with that code and executes nothing. With
    ``delay_s``, ``garbage`` or ``bad_crc`` it *does* execute writes: only the reply is late or
    damaged, which is exactly the case where a master must read back to learn the truth.
    ``bad_crc`` applies to RTU only (TCP has no CRC).
    """

    no_answer: bool = False
    delay_s: float = 0.0
    exception_code: int | None = None
    garbage: bool = False
    bad_crc: bool = False

    def clear(self) -> None:
        self.no_answer = False
        self.delay_s = 0.0
        self.exception_code = None
        self.garbage = False
        self.bad_crc = False


class ModbusDevice:
    """Base class of simulated devices.

    Subclasses describe their data through four read hooks (each returns the whole table as
    address → value; addresses not in it answer exception 02) and two write hooks. Write hooks
    must check every address and value before changing anything, and raise
    :class:`ModbusException` with ``ILLEGAL_DATA_ADDRESS`` or ``ILLEGAL_DATA_VALUE``.

    Ground truth for tests: ``requests`` counts every request addressed to the unit (faulted
    ones and broadcasts included), ``requests_by_function`` splits them by function code,
    ``writes`` counts writes applied per holding register and ``coil_writes`` per coil.
    """

    def __init__(self) -> None:
        self.faults = Faults()
        self.requests = 0
        self.requests_by_function: Counter[int] = Counter()
        self.writes: dict[int, int] = {}
        self.coil_writes: dict[int, int] = {}

    # Hooks for subclasses -------------------------------------------------------------------
    def coils(self) -> Mapping[int, bool]:
        return {}

    def discrete_inputs(self) -> Mapping[int, bool]:
        return {}

    def holding_registers(self) -> Mapping[int, int]:
        return {}

    def input_registers(self) -> Mapping[int, int]:
        return {}

    def store_registers(self, address: int, values: Sequence[int]) -> None:
        """Apply a write of holding registers (function 06 or 16)."""
        raise ModbusException(ExceptionCode.ILLEGAL_DATA_ADDRESS)

    def store_coils(self, address: int, values: Sequence[bool]) -> None:
        """Apply a write of coils (function 05 or 15)."""
        raise ModbusException(ExceptionCode.ILLEGAL_DATA_ADDRESS)

    # Request handling -----------------------------------------------------------------------
    def handle(self, pdu: bytes) -> bytes:
        """The response PDU to a request PDU, exception responses included."""
        try:
            return self.execute(decode_request(pdu))
        except ModbusException as exc:
            return encode_exception(pdu[0] if pdu else 0, exc.code)

    def execute(self, request: Request) -> bytes:
        match request:
            case ReadRequest(function, address, count):
                if function is FunctionCode.READ_COILS:
                    return encode_read_bits_response(function, _slice(self.coils(), address, count))
                if function is FunctionCode.READ_DISCRETE_INPUTS:
                    return encode_read_bits_response(
                        function, _slice(self.discrete_inputs(), address, count)
                    )
                if function is FunctionCode.READ_HOLDING_REGISTERS:
                    return encode_read_registers_response(
                        function, _slice(self.holding_registers(), address, count)
                    )
                return encode_read_registers_response(
                    function, _slice(self.input_registers(), address, count)
                )
            case WriteSingleRegister(address, value):
                self._apply_registers(address, [value])
            case WriteMultipleRegisters(address, values):
                self._apply_registers(address, values)
            case WriteSingleCoil(address, value):
                self._apply_coils(address, [value])
            case WriteMultipleCoils(address, values):
                self._apply_coils(address, values)
        return encode_write_response(request)

    def _apply_registers(self, address: int, values: Sequence[int]) -> None:
        self.store_registers(address, values)
        for offset in range(len(values)):
            self.writes[address + offset] = self.writes.get(address + offset, 0) + 1

    def _apply_coils(self, address: int, values: Sequence[bool]) -> None:
        self.store_coils(address, values)
        for offset in range(len(values)):
            self.coil_writes[address + offset] = self.coil_writes.get(address + offset, 0) + 1


def _slice(table: Mapping[int, _V], address: int, count: int) -> list[_V]:
    try:
        return [table[a] for a in range(address, address + count)]
    except KeyError:
        raise ModbusException(ExceptionCode.ILLEGAL_DATA_ADDRESS) from None


# ---------------------------------------------------------------------------------------------
# A plain register bank, for driver tests of data types, word orders and coils
# ---------------------------------------------------------------------------------------------


class MemoryDevice(ModbusDevice):
    """``size`` coils, discrete inputs, holding and input registers at addresses 0..size-1,
    all zero at first; coils and holding registers are writable over the wire and every
    table is settable from Python (``device.holding[3] = 7``, :meth:`set_value`)."""

    def __init__(self, size: int = 100) -> None:
        super().__init__()
        if not 1 <= size <= 0x10000:
            raise ValueError(f"size must be 1..65536, got {size}")
        self.coil = [False] * size
        self.discrete = [False] * size
        self.holding = [0] * size
        self.input = [0] * size

    def coils(self) -> Mapping[int, bool]:
        return dict(enumerate(self.coil))

    def discrete_inputs(self) -> Mapping[int, bool]:
        return dict(enumerate(self.discrete))

    def holding_registers(self) -> Mapping[int, int]:
        return dict(enumerate(self.holding))

    def input_registers(self) -> Mapping[int, int]:
        return dict(enumerate(self.input))

    def store_registers(self, address: int, values: Sequence[int]) -> None:
        if address + len(values) > len(self.holding):
            raise ModbusException(ExceptionCode.ILLEGAL_DATA_ADDRESS)
        self.holding[address : address + len(values)] = values

    def store_coils(self, address: int, values: Sequence[bool]) -> None:
        if address + len(values) > len(self.coil):
            raise ModbusException(ExceptionCode.ILLEGAL_DATA_ADDRESS)
        self.coil[address : address + len(values)] = values

    def set_value(
        self,
        kind: Literal["holding", "input"],
        address: int,
        value: float,
        data_type: DataType,
        word_order: WordOrder = "big",
    ) -> None:
        """Store ``value`` encoded as ``data_type`` at ``address``."""
        table = self.holding if kind == "holding" else self.input
        words = to_registers(value, data_type, word_order)
        table[address : address + len(words)] = words

    def get_value(
        self,
        kind: Literal["holding", "input"],
        address: int,
        data_type: DataType,
        word_order: WordOrder = "big",
    ) -> float | int:
        table = self.holding if kind == "holding" else self.input
        width = 1 if data_type.endswith("16") else 2
        return from_registers(table[address : address + width], data_type, word_order)


# ---------------------------------------------------------------------------------------------
# Street-lamp controller
# ---------------------------------------------------------------------------------------------

RATED_POWER_W = 60.0
"""Lamp power at 100 %; power is proportional to the actual level."""
AMBIENT_TEMPERATURE_C = 20.0
SELF_HEATING_AT_FULL_C = 25.0
"""How far above ambient the LED driver settles at 100 %."""
THERMAL_TIME_CONSTANT_S = 300.0
_SECONDS_PER_HOUR = 3600.0
MAX_LEVEL_PERCENT = 100

# Register map (0-based protocol addresses); see docs/simulators.md.
LAMP_HR_LEVEL_SETPOINT = 0
LAMP_IR_ACTUAL_LEVEL = 0
LAMP_IR_POWER = 1
LAMP_IR_ENERGY = 2
LAMP_IR_BURNING_HOURS = 4
LAMP_IR_FAILURE = 6
LAMP_IR_TEMPERATURE = 7


class LampController(ModbusDevice):
    """A dimmable street-lamp controller.

    ``setpoint`` is what the master asked for (holding register 0, 0..100 %); the lamp really
    runs at ``actual_level``: the set point clamped to ``max_level``, or 0 when the lamp has
    failed. Power, energy, burning hours and driver temperature follow the actual level.
    ``time_scale`` makes simulated time run faster than the clock (for demos).
    """

    def __init__(
        self,
        *,
        setpoint: int = 0,
        energy_wh: float = 0.0,
        burning_hours: float = 0.0,
        ambient_c: float = AMBIENT_TEMPERATURE_C,
        rated_power_w: float = RATED_POWER_W,
        clock: Clock = time.monotonic,
        time_scale: float = 1.0,
    ) -> None:
        super().__init__()
        _check_level("setpoint", setpoint)
        self._clock = clock
        self.time_scale = time_scale
        self.rated_power_w = rated_power_w
        self.ambient_c = ambient_c
        self._setpoint = setpoint
        self._max_level = MAX_LEVEL_PERCENT
        self._lamp_failed = False
        self._energy_wh = energy_wh
        self._burning_hours = burning_hours
        self._temperature_c = ambient_c
        self._last_s = clock()

    # State ----------------------------------------------------------------------------------
    @property
    def setpoint(self) -> int:
        return self._setpoint

    @setpoint.setter
    def setpoint(self, level: int) -> None:
        _check_level("setpoint", level)
        self.advance()
        self._setpoint = level

    @property
    def max_level(self) -> int:
        return self._max_level

    @max_level.setter
    def max_level(self, level: int) -> None:
        _check_level("max_level", level)
        self.advance()
        self._max_level = level

    @property
    def lamp_failed(self) -> bool:
        return self._lamp_failed

    def fail_lamp(self) -> None:
        self.advance()
        self._lamp_failed = True

    def repair_lamp(self) -> None:
        self.advance()
        self._lamp_failed = False

    @property
    def actual_level(self) -> int:
        return 0 if self._lamp_failed else min(self._setpoint, self._max_level)

    @property
    def power_w(self) -> float:
        return self.rated_power_w * self.actual_level / 100.0

    @property
    def energy_wh(self) -> float:
        self.advance()
        return self._energy_wh

    @energy_wh.setter
    def energy_wh(self, value: float) -> None:
        self.advance()
        self._energy_wh = value

    @property
    def burning_hours(self) -> float:
        self.advance()
        return self._burning_hours

    @burning_hours.setter
    def burning_hours(self, value: float) -> None:
        self.advance()
        self._burning_hours = value

    @property
    def temperature_c(self) -> float:
        self.advance()
        return self._temperature_c

    def advance(self) -> None:
        """Bring counters and temperature up to now, with the level that held since the last
        call (every state change calls this first, so piecewise-constant power is exact)."""
        now = self._clock()
        elapsed_s = (now - self._last_s) * self.time_scale
        self._last_s = now
        if elapsed_s <= 0:
            return
        self._energy_wh += self.power_w * elapsed_s / _SECONDS_PER_HOUR
        if self.actual_level > 0:
            self._burning_hours += elapsed_s / _SECONDS_PER_HOUR
        target = self.ambient_c + SELF_HEATING_AT_FULL_C * self.actual_level / 100.0
        decay = math.exp(-elapsed_s / THERMAL_TIME_CONSTANT_S)
        self._temperature_c = target + (self._temperature_c - target) * decay

    # Modbus hooks ---------------------------------------------------------------------------
    def holding_registers(self) -> Mapping[int, int]:
        return {LAMP_HR_LEVEL_SETPOINT: self._setpoint}

    def input_registers(self) -> Mapping[int, int]:
        self.advance()
        registers = {
            LAMP_IR_ACTUAL_LEVEL: self.actual_level,
            LAMP_IR_POWER: round(self.power_w * 10) & 0xFFFF,
            LAMP_IR_FAILURE: int(self._lamp_failed),
        }
        # Counters truncate like real meters: a register never shows energy not yet used.
        _put(registers, LAMP_IR_ENERGY, to_registers(math.floor(self._energy_wh), "uint32"))
        hours_raw = math.floor(self._burning_hours * 100)
        _put(registers, LAMP_IR_BURNING_HOURS, to_registers(hours_raw, "uint32"))
        temperature = max(-32768, min(32767, round(self._temperature_c * 10)))
        _put(registers, LAMP_IR_TEMPERATURE, to_registers(temperature, "int16"))
        return registers

    def store_registers(self, address: int, values: Sequence[int]) -> None:
        if address != LAMP_HR_LEVEL_SETPOINT or len(values) != 1:
            raise ModbusException(ExceptionCode.ILLEGAL_DATA_ADDRESS)
        if values[0] > MAX_LEVEL_PERCENT:
            raise ModbusException(ExceptionCode.ILLEGAL_DATA_VALUE)
        self.setpoint = values[0]


def _check_level(name: str, level: int) -> None:
    if not 0 <= level <= MAX_LEVEL_PERCENT:
        raise ValueError(f"{name} must be 0..{MAX_LEVEL_PERCENT}, got {level}")


def _put(registers: dict[int, int], address: int, words: Sequence[int]) -> None:
    for offset, word in enumerate(words):
        registers[address + offset] = word


# ---------------------------------------------------------------------------------------------
# Cabinet energy meter (Eastron SDM630 input-register map)
# ---------------------------------------------------------------------------------------------

NOMINAL_VOLTAGE_V = 230.0
VOLTAGE_NOISE_V = 0.8
NOMINAL_FREQUENCY_HZ = 50.0
FREQUENCY_NOISE_HZ = 0.02
POWER_FACTOR = 0.95
CABINET_BASE_LOAD_W = (12.0, 0.0, 0.0)
"""The cabinet's own electronics (controller, modem, this gateway) on phase 1."""

SDM_VOLTAGE = (0, 2, 4)
SDM_CURRENT = (6, 8, 10)
SDM_POWER = (12, 14, 16)
SDM_TOTAL_POWER = 52
SDM_FREQUENCY = 70
SDM_IMPORT_ENERGY = 72
SDM_EXPORT_ENERGY = 74
SDM_TOTAL_ENERGY = 342


class EnergyMeter(ModbusDevice):
    """An Eastron SDM630 three-phase meter at the cabinet's supply (float32 input registers,
    high word first; read-only, unknown addresses answer exception 02 like the real meter).

    ``lamps`` are spread over the phases in turn (lamp *i* on phase *i* mod 3); phase power is
    the cabinet's base load plus its lamps, and imported energy grows by exactly the lamps'
    energy plus the base load's. Voltages and frequency carry a little random noise
    (``seed`` makes it reproducible).
    """

    def __init__(
        self,
        *,
        lamps: Sequence[LampController] = (),
        base_load_w: tuple[float, float, float] = CABINET_BASE_LOAD_W,
        import_kwh: float = 1520.25,
        export_kwh: float = 0.0,
        seed: int | None = None,
        clock: Clock = time.monotonic,
        time_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.lamps = list(lamps)
        self.base_load_w = base_load_w
        self.export_kwh = export_kwh
        self.time_scale = time_scale
        self._clock = clock
        self._random = random.Random(seed)  # noqa: S311 - measurement noise, not security
        self._start_import_kwh = import_kwh
        self._start_s = clock()
        self._lamp_start_wh = [lamp.energy_wh for lamp in self.lamps]
        self._last_import_kwh = import_kwh

    def phase_power_w(self) -> tuple[float, float, float]:
        power = list(self.base_load_w)
        for index, lamp in enumerate(self.lamps):
            power[index % 3] += lamp.power_w
        return power[0], power[1], power[2]

    @property
    def import_kwh(self) -> float:
        elapsed_h = (self._clock() - self._start_s) * self.time_scale / _SECONDS_PER_HOUR
        pairs = zip(self.lamps, self._lamp_start_wh, strict=True)
        lamp_wh = sum(lamp.energy_wh - start for lamp, start in pairs)
        value = self._start_import_kwh + (sum(self.base_load_w) * elapsed_h + lamp_wh) / 1000.0
        # An energy register never runs backwards, even if a test rewinds a lamp's counter.
        self._last_import_kwh = max(self._last_import_kwh, value)
        return self._last_import_kwh

    def input_registers(self) -> Mapping[int, int]:
        registers: dict[int, int] = {}
        powers = self.phase_power_w()
        for phase in range(3):
            voltage = NOMINAL_VOLTAGE_V + self._random.gauss(0.0, VOLTAGE_NOISE_V)
            current = powers[phase] / (voltage * POWER_FACTOR)
            _put(registers, SDM_VOLTAGE[phase], to_registers(voltage, "float32"))
            _put(registers, SDM_CURRENT[phase], to_registers(current, "float32"))
            _put(registers, SDM_POWER[phase], to_registers(powers[phase], "float32"))
        frequency = NOMINAL_FREQUENCY_HZ + self._random.gauss(0.0, FREQUENCY_NOISE_HZ)
        imported = self.import_kwh
        _put(registers, SDM_TOTAL_POWER, to_registers(sum(powers), "float32"))
        _put(registers, SDM_FREQUENCY, to_registers(frequency, "float32"))
        _put(registers, SDM_IMPORT_ENERGY, to_registers(imported, "float32"))
        _put(registers, SDM_EXPORT_ENERGY, to_registers(self.export_kwh, "float32"))
        _put(registers, SDM_TOTAL_ENERGY, to_registers(imported + self.export_kwh, "float32"))
        return registers
