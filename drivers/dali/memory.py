"""Memory banks of DALI control gear as read *plans*: the frames to send, and a decoder for the
answers. Pure data, no I/O: the driver runs a plan over whatever interface it has.

Reading a bank (IEC 62386-102): DTR1 selects the bank, DTR0 the first location; each READ
MEMORY LOCATION answers one byte and moves DTR0 on by one, even past a location the gear does
not implement (that one is simply not answered). A bank the gear does not implement answers
nothing at all, so its fields decode to ``None``.

**Latch.** The D4i banks (202..206) hold multi-byte counters that a gear updates while they are
being read byte by byte; read naively, a counter rolling from 0x00FF to 0x0100 can come back as
0x01FF. Writing 0xAA to the bank's lock byte (location 0x02) *latches* it: the gear freezes a
snapshot of the whole bank for reading, and writing 0xFF releases it. Writing needs ENABLE
WRITE MEMORY (sent twice, addressed to the one gear, so only that gear accepts the broadcast
WRITE MEMORY LOCATION) immediately before, and any command other than DTR0/1/2, QUERY CONTENT
DTRn and the memory writes disables it again: READ MEMORY LOCATION does, so the unlatch enables
writing again first. A latched plan is::

    DTR1(bank)  ENABLE WRITE MEMORY (twice)  DTR0(2)  WRITE MEMORY LOCATION NO REPLY 0xAA
    DTR0(first)  READ MEMORY LOCATION, n times
    ENABLE WRITE MEMORY (twice)  DTR0(2)  WRITE MEMORY LOCATION NO REPLY 0xFF

**No value.** In the D4i banks a value whose bytes are all 0xFF is MASK (not implemented or
read-protected), and all 0xFF but a last 0xFE is TMASK (temporarily unavailable, e.g. power
before the first measurement). Both decode to ``None``, as do values above a field's valid
range and fields with any unanswered byte.

A plan is only as good as its alignment: if a transaction of it fails (the interface reports
an error rather than "no answer"), the gear's DTR0 may not have moved as planned; discard the
answers and run the whole plan again.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

from . import codec

__all__ = [
    "BANKS",
    "BANK_0",
    "BANK_1",
    "BANK_202",
    "BANK_203",
    "BANK_204",
    "BANK_205",
    "BANK_206",
    "LATCH",
    "LOCK_BYTE",
    "UNLATCH",
    "Bank",
    "BankRead",
    "Field",
    "FieldKind",
    "MemoryValue",
    "plan_read",
]

MemoryValue = float | int | None
"""A decoded field: ``int`` for counts and flags (``bool``), ``float`` for scaled values,
``None`` when the gear has no value (MASK, TMASK, out of range or not answered)."""

LOCK_BYTE: Final = 0x02
LATCH: Final = 0xAA
UNLATCH: Final = 0xFF
TEMPERATURE_OFFSET_C: Final = 60
SCALE_EXPONENT_RANGE: Final = range(-6, 7)


class FieldKind(enum.Enum):
    UNSIGNED = "unsigned"
    """Big-endian unsigned integer, times the field's fixed ``scale``."""
    SCALED = "scaled"
    """Part 252: a signed power-of-ten exponent byte (-6..6), then a big-endian unsigned
    integer; value = integer * 10^exponent."""
    TEMPERATURE = "temperature"
    """One byte, °C + 60 (so -60..193 °C)."""
    FLAG = "flag"
    """One byte, 0 or 1 (``bool``)."""


@dataclass(frozen=True, slots=True)
class Field:
    """One value of a bank: ``length`` bytes from location ``offset``."""

    name: str
    offset: int
    length: int = 1
    kind: FieldKind = FieldKind.UNSIGNED
    unit: str = ""
    scale: float = 1.0
    tmask: bool = True
    """Whether all-0xFF-but-a-last-0xFE means "temporarily unavailable" for this field."""
    mask: bool = True
    """Whether all-0xFF means "not available" for this field."""
    minimum: int | None = None
    """Smallest valid raw value; below it means invalid (``None``)."""
    maximum: int | None = None
    """Largest valid raw value (of the integer part, for SCALED); above it means invalid."""

    def __post_init__(self) -> None:
        if not 0 <= self.offset <= 0xFE or self.length < 1 or self.offset + self.length > 0x100:
            raise ValueError(f"{self.name}: bad location {self.offset}+{self.length}")
        if self.kind in (FieldKind.TEMPERATURE, FieldKind.FLAG) and self.length != 1:
            raise ValueError(f"{self.name}: a {self.kind.value} field is one byte")
        if self.kind is FieldKind.SCALED and self.length < 2:
            raise ValueError(f"{self.name}: a scaled field needs an exponent and a value")
        if self.scale == 0 or not math.isfinite(self.scale):
            raise ValueError(f"{self.name}: scale must be finite and non-zero")

    @property
    def last(self) -> int:
        """The last location the field occupies."""
        return self.offset + self.length - 1

    def decode(self, raw: Sequence[int | None]) -> MemoryValue:
        """The value of the field from its ``length`` bytes (``None`` for an unanswered one)."""
        if len(raw) != self.length:
            raise ValueError(f"{self.name} needs {self.length} byte(s), got {len(raw)}")
        if any(byte is None for byte in raw):
            return None
        data = [int(byte) for byte in raw if byte is not None]
        if any(not 0 <= byte <= 0xFF for byte in data):
            raise ValueError(f"{self.name}: bytes must be 0..255, got {data}")
        if self.kind is FieldKind.SCALED:
            exponent = int.from_bytes(data[:1], "big", signed=True)
            integer = self._integer(data[1:])
            if integer is None or exponent not in SCALE_EXPONENT_RANGE:
                return None
            return _scaled(integer, exponent)
        integer = self._integer(data)
        if integer is None:
            return None
        if self.kind is FieldKind.FLAG:
            return None if integer > 1 else bool(integer)
        if self.kind is FieldKind.TEMPERATURE:
            return integer - TEMPERATURE_OFFSET_C
        if self.scale == 1.0:
            return integer
        return float(round(integer * self.scale, _decimals(self.scale)))

    def _integer(self, data: Sequence[int]) -> int | None:
        """The raw unsigned integer, or ``None`` for MASK / TMASK / out of range."""
        value = int.from_bytes(bytes(data), "big")
        top = (1 << (8 * len(data))) - 1
        if (self.mask and value == top) or (self.tmask and value == top - 1):
            return None
        if (self.minimum is not None and value < self.minimum) or (
            self.maximum is not None and value > self.maximum
        ):
            return None
        return value


def _scaled(integer: int, exponent: int) -> float | int:
    # Decimal scaling is exact, so 350 * 10^-1 is 35.0, not 35.00000000000001.
    value = Decimal(integer).scaleb(exponent)
    return int(value) if exponent >= 0 else float(value)


def _decimals(scale: float) -> int:
    exponent = Decimal(repr(scale)).normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


@dataclass(frozen=True, slots=True)
class Bank:
    """A memory bank: its number, last address, whether it latches, and the fields Lampyre
    decodes (not every location of the bank)."""

    number: int
    title: str
    last_address: int
    latch: bool
    fields: tuple[Field, ...]

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"bank {self.number}: duplicate field names")
        for f in self.fields:
            if f.last > self.last_address:
                raise ValueError(f"bank {self.number}: {f.name} ends past the last address")

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        known = ", ".join(f.name for f in self.fields)
        raise KeyError(f"bank {self.number} has no field {name!r}; known: {known}")

    @property
    def units(self) -> dict[str, str]:
        """Field name → unit, for building readings."""
        return {f.name: f.unit for f in self.fields}


@dataclass(frozen=True, slots=True)
class BankRead:
    """The plan to read some fields of one bank of the gear at one short address.

    Run :meth:`commands` in order, one transaction each, collecting one entry per command:
    the backward frame for an answered command, ``None`` otherwise (no answer, a collision, or
    a command that expects no answer). Then :meth:`decode` that list.
    """

    short_address: int
    bank: Bank
    fields: tuple[Field, ...]
    latch: bool

    def __post_init__(self) -> None:
        codec.Short(self.short_address)  # validates 0..63
        if not self.fields:
            raise ValueError("a bank read needs at least one field")
        if self.latch and not self.bank.latch:
            raise ValueError(f"bank {self.bank.number} has no latch")

    @property
    def first_location(self) -> int:
        return min(f.offset for f in self.fields)

    @property
    def last_location(self) -> int:
        return max(f.last for f in self.fields)

    @property
    def read_count(self) -> int:
        return self.last_location - self.first_location + 1

    def commands(self) -> tuple[codec.Command, ...]:
        """The transactions, in order (ENABLE WRITE MEMORY carries ``send_twice``)."""
        gear = codec.Short(self.short_address)
        read = codec.command(gear, codec.Opcode.READ_MEMORY_LOCATION)
        suffix = _write_lock_byte(gear, UNLATCH) if self.latch else []
        return (*self._prefix(), *([read] * self.read_count), *suffix)

    def frames(self) -> tuple[int, ...]:
        """The forward frame of each transaction of :meth:`commands`."""
        return tuple(c.frame for c in self.commands())

    def _prefix(self) -> list[codec.Command]:
        """Everything before the first READ MEMORY LOCATION."""
        steps = [codec.dtr1(self.bank.number)]
        if self.latch:
            steps += _write_lock_byte(codec.Short(self.short_address), LATCH)
        steps.append(codec.dtr0(self.first_location))
        return steps

    def decode(self, answers: Sequence[int | None]) -> dict[str, MemoryValue]:
        """Field name → value from the answers to :meth:`commands` (one entry per command)."""
        expected = len(self.commands())
        if len(answers) != expected:
            raise ValueError(f"expected {expected} answers (one per command), got {len(answers)}")
        start = len(self._prefix())
        reads = answers[start : start + self.read_count]
        first = self.first_location
        return {f.name: f.decode(reads[f.offset - first : f.last - first + 1]) for f in self.fields}


def _write_lock_byte(gear: codec.Short, value: int) -> list[codec.Command]:
    return [
        codec.command(gear, codec.Opcode.ENABLE_WRITE_MEMORY),
        codec.dtr0(LOCK_BYTE),
        codec.write_memory_location_no_reply(value),
    ]


def plan_read(
    short_address: int,
    bank: Bank,
    names: Iterable[str] | None = None,
    *,
    latch: bool | None = None,
) -> BankRead:
    """A plan reading ``names`` (default: every field) of ``bank`` from one gear. Latched by
    default when the bank has a latch; the read covers the locations from the first to the
    last field asked for."""
    chosen = bank.fields if names is None else tuple(bank.field(name) for name in names)
    return BankRead(short_address, bank, chosen, bank.latch if latch is None else latch)


# --------------------------------------------------------------------------------------------
# Bank maps. Names are unique across banks so the results of several plans can be merged.
# --------------------------------------------------------------------------------------------


def _flag_and_counter(prefix: str, offset: int) -> tuple[Field, Field]:
    return (
        Field(prefix, offset, kind=FieldKind.FLAG),
        Field(f"{prefix}_count", offset + 1),
    )


BANK_0: Final = Bank(
    0,
    "part 102 identification",
    last_address=0x1A,
    latch=False,
    fields=(
        # Read-only identification: no TMASK; an all-0xFF GTIN is unprogrammed.
        Field("last_memory_bank", 0x02, tmask=False, mask=False),
        Field("gtin", 0x03, 6, tmask=False),
        Field("firmware_version_major", 0x09, tmask=False, mask=False),
        Field("firmware_version_minor", 0x0A, tmask=False, mask=False),
        Field("identification_number", 0x0B, 8, tmask=False, mask=False),
        Field("hardware_version_major", 0x13, tmask=False, mask=False),
        Field("hardware_version_minor", 0x14, tmask=False, mask=False),
    ),
)

BANK_1: Final = Bank(
    1,
    "part 251 luminaire data",
    last_address=0x77,
    latch=False,
    fields=(
        # Written by the luminaire maker; 0xFF…FF is the factory "not set".
        Field("luminaire_gtin", 0x03, 6, tmask=False),
        Field("luminaire_id", 0x09, 8, tmask=False),
        Field("content_format_id", 0x11, 2, tmask=False),
        Field("year_of_manufacture", 0x13, tmask=False, maximum=99),
        Field("week_of_manufacture", 0x14, tmask=False, minimum=1, maximum=53),
        Field("nominal_input_power", 0x15, 2, unit="W", tmask=False),
        Field("power_at_minimum_dim", 0x17, 2, unit="W", tmask=False),
        Field("nominal_mains_voltage_min", 0x19, 2, unit="V", tmask=False, minimum=90, maximum=480),
        Field("nominal_mains_voltage_max", 0x1B, 2, unit="V", tmask=False, minimum=90, maximum=480),
        Field("nominal_light_output", 0x1D, 3, unit="lm", tmask=False),
        Field("cri", 0x20, tmask=False, maximum=100),
        # 0xFFFE says "colour is controlled through part 209": no fixed CCT to report.
        Field("cct", 0x21, 2, unit="K", tmask=False, maximum=17000),
    ),
)


def _energy_bank(number: int, title: str, prefix: str, energy: str, power: str) -> Bank:
    return Bank(
        number,
        title,
        last_address=0x0F,
        latch=True,
        fields=(
            Field(f"{prefix}_energy", 0x04, 7, FieldKind.SCALED, unit=energy),
            Field(f"{prefix}_power", 0x0B, 5, FieldKind.SCALED, unit=power),
        ),
    )


BANK_202: Final = _energy_bank(202, "part 252 active energy and power", "active", "Wh", "W")
BANK_203: Final = _energy_bank(203, "part 252 apparent energy and power", "apparent", "VAh", "VA")
BANK_204: Final = _energy_bank(204, "part 252 load-side energy and power", "loadside", "Wh", "W")

BANK_205: Final = Bank(
    205,
    "part 253 control gear diagnostics",
    last_address=0x1C,
    latch=True,
    fields=(
        Field("gear_operating_time", 0x04, 4, unit="s"),
        Field("gear_start_count", 0x08, 3),
        Field("gear_supply_voltage", 0x0B, 2, unit="V", scale=0.1),
        Field("gear_supply_frequency", 0x0D, unit="Hz"),
        Field("gear_power_factor", 0x0E, scale=0.01, maximum=100),
        *_flag_and_counter("gear_failure", 0x0F),
        *_flag_and_counter("gear_under_voltage", 0x11),
        *_flag_and_counter("gear_over_voltage", 0x13),
        *_flag_and_counter("gear_power_limitation", 0x15),
        *_flag_and_counter("gear_thermal_derating", 0x17),
        *_flag_and_counter("gear_thermal_shutdown", 0x19),
        Field("gear_temperature", 0x1B, kind=FieldKind.TEMPERATURE, unit="°C"),
        Field("gear_output_current", 0x1C, unit="%", maximum=100),
    ),
)

BANK_206: Final = Bank(
    206,
    "part 253 light source diagnostics",
    last_address=0x20,
    latch=True,
    fields=(
        Field("light_start_count_resettable", 0x04, 3),
        Field("light_start_count", 0x07, 3),
        Field("light_on_time_resettable", 0x0A, 4, unit="s"),
        Field("light_on_time", 0x0E, 4, unit="s"),
        Field("light_voltage", 0x12, 2, unit="V", scale=0.1),
        Field("light_current", 0x14, 2, unit="A", scale=0.001),
        *_flag_and_counter("light_failure", 0x16),
        *_flag_and_counter("light_short_circuit", 0x18),
        *_flag_and_counter("light_open_circuit", 0x1A),
        *_flag_and_counter("light_thermal_derating", 0x1C),
        *_flag_and_counter("light_thermal_shutdown", 0x1E),
        Field("light_temperature", 0x20, kind=FieldKind.TEMPERATURE, unit="°C"),
    ),
)

BANKS: Final[dict[int, Bank]] = {
    bank.number: bank for bank in (BANK_0, BANK_1, BANK_202, BANK_203, BANK_204, BANK_205, BANK_206)
}
