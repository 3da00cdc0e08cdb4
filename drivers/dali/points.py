"""What a DALI profile point reads: its ``source`` key, parsed and checked once.

A point of a ``driver = "dali"`` profile names one thing the gear can tell (``level``, a bit of
QUERY STATUS, the DT6 failure status, a memory-bank field...). The driver groups the points of
one read by what they need on the bus, so several status bits cost one QUERY STATUS and several
fields of a bank one (latched) bank read. See ``docs/drivers/dali.md`` for the list.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, fields
from typing import Final

from agent.sdk import ConfigTable, PointSpec

from . import codec, memory

__all__ = [
    "POINT_KEYS",
    "SIMPLE_SOURCES",
    "STATUS_BITS",
    "PointSource",
    "SourceKind",
    "parse_point",
    "parse_source",
]

POINT_KEYS: Final = ("source",)


class SourceKind(enum.Enum):
    LEVEL = "level"
    """QUERY ACTUAL LEVEL as percent on the logarithmic curve; the only writable source."""
    STATUS = "status"
    """The QUERY STATUS byte as an integer."""
    STATUS_BIT = "status_bit"
    """One bit of QUERY STATUS, as a boolean."""
    LED_FAILURE = "led_failure"
    """The DT6 (LED) QUERY FAILURE STATUS byte as an integer."""
    DEVICE_TYPE = "device_type"
    """QUERY DEVICE TYPE (255 = several: see QUERY NEXT DEVICE TYPE)."""
    BANK = "bank"
    """One field of a memory bank."""


STATUS_BITS: Final[dict[str, int]] = {f.name: bit for bit, f in enumerate(fields(codec.Status))}
"""Status bit sources by name (``lamp_failure``, ``gear_failure``, ``lamp_on``,
``fade_running``, ``power_cycle_seen``, ``limit_error``, ``reset_state``,
``short_address_missing``) → bit number of the QUERY STATUS answer."""

SIMPLE_SOURCES: Final = ("level", "status", "led_failure", "device_type", *STATUS_BITS)

_BANK_SOURCE: Final = re.compile(r"bank(\d{1,3})\.([a-z0-9_]+)")


@dataclass(frozen=True, slots=True)
class PointSource:
    """A parsed ``source``."""

    kind: SourceKind
    text: str
    bit: int | None = None
    bank: memory.Bank | None = None
    field: memory.Field | None = None

    @property
    def unit(self) -> str:
        """The unit this source's values come in ("" when it has none)."""
        if self.kind is SourceKind.LEVEL:
            return "%"
        if self.field is not None:
            return self.field.unit
        return ""


def parse_source(text: str) -> PointSource:
    """The source named ``text``; :class:`ValueError` with the accepted forms otherwise."""
    if text == "level":
        return PointSource(SourceKind.LEVEL, text)
    if text == "status":
        return PointSource(SourceKind.STATUS, text)
    if text == "led_failure":
        return PointSource(SourceKind.LED_FAILURE, text)
    if text == "device_type":
        return PointSource(SourceKind.DEVICE_TYPE, text)
    if text in STATUS_BITS:
        return PointSource(SourceKind.STATUS_BIT, text, bit=STATUS_BITS[text])
    match = _BANK_SOURCE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"expected one of {', '.join(SIMPLE_SOURCES)} or bankNNN.<field> "
            f"(banks {', '.join(map(str, memory.BANKS))}), got {text!r}"
        )
    number, name = int(match.group(1)), match.group(2)
    bank = memory.BANKS.get(number)
    if bank is None:
        raise ValueError(
            f"no memory bank {number} is known; known banks: {', '.join(map(str, memory.BANKS))}"
        )
    try:
        field = bank.field(name)
    except KeyError:
        known = ", ".join(f.name for f in bank.fields)
        raise ValueError(f"bank {number} has no field {name!r}; its fields: {known}") from None
    return PointSource(SourceKind.BANK, text, bank=bank, field=field)


def parse_point(point: PointSpec) -> PointSource:
    """Validate the DALI keys of a profile point (no I/O); errors name file and line."""
    options: ConfigTable = point.options
    options.check_keys(POINT_KEYS)
    text = options.get_str("source")
    try:
        source = parse_source(text)
    except ValueError as exc:
        raise options.error("source", str(exc)) from None
    if point.writable and source.kind is not SourceKind.LEVEL:
        raise options.error(
            "source", f"only a 'level' point can be writable; {text!r} is read-only"
        )
    return source
