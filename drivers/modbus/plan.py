"""Point options and read planning: which Modbus requests read a set of points.

Every request costs a round trip (tens of milliseconds on a 9600 baud line), so points of the same
kind are merged into contiguous spans, bridging small holes of unused registers. Some devices
answer a request that touches an unmapped register with "illegal data address" (the SDM630
does); the driver then re-plans that span without holes (:func:`split_without_gaps`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal, cast, get_args

from agent.sdk import ConfigTable, PointSpec

from .codec import REGISTER_TYPES, WORD_ORDERS, RegisterType, WordOrder, register_count

__all__ = [
    "KINDS",
    "MAX_BITS_PER_REQUEST",
    "MAX_GAP_BITS",
    "MAX_GAP_REGISTERS",
    "MAX_REGISTERS_PER_REQUEST",
    "Kind",
    "PlannedPoint",
    "PointAddress",
    "ReadRequest",
    "parse_point",
    "plan_reads",
    "split_without_gaps",
]

Kind = Literal["holding", "input", "coil", "discrete"]
KINDS: Final[tuple[Kind, ...]] = get_args(Kind)
BIT_KINDS: Final[frozenset[str]] = frozenset({"coil", "discrete"})
WRITABLE_KINDS: Final[frozenset[str]] = frozenset({"holding", "coil"})
POINT_KEYS: Final[tuple[str, ...]] = ("kind", "address", "type", "word_order", "scale")

MAX_REGISTERS_PER_REQUEST: Final = 125
"""Protocol limit of FC03/FC04 (a reply must fit in a 256-byte RTU frame)."""
MAX_BITS_PER_REQUEST: Final = 2000
"""Protocol limit of FC01/FC02."""
MAX_GAP_REGISTERS: Final = 8
"""Unused registers a request may read through to avoid a second round trip."""
MAX_GAP_BITS: Final = 64
"""Unused coils or discrete inputs a request may read through (8 bytes of reply)."""
MAX_ADDRESS: Final = 0xFFFF


@dataclass(frozen=True, slots=True)
class PointAddress:
    """Where a point lives and how its registers become a value (the parsed point options)."""

    kind: Kind
    address: int
    type: RegisterType | Literal["bool"]
    word_order: WordOrder = "big"
    scale: float = 1.0

    @property
    def is_bit(self) -> bool:
        return self.kind in BIT_KINDS

    @property
    def width(self) -> int:
        """Registers (or bits) the point occupies."""
        return 1 if self.type == "bool" else register_count(self.type)

    @property
    def end(self) -> int:
        """First address after the point."""
        return self.address + self.width


@dataclass(frozen=True, slots=True)
class PlannedPoint:
    spec: PointSpec
    address: PointAddress


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One read transaction: ``count`` registers or bits of ``kind`` from ``address``."""

    kind: Kind
    address: int
    count: int
    points: tuple[PlannedPoint, ...]
    has_gaps: bool
    """True when the span reads through addresses no point uses."""


def parse_point(point: PointSpec) -> PointAddress:
    """Validate a point's Modbus options; raise :class:`ConfigError` naming file and line."""
    options: ConfigTable = point.options
    options.check_keys(POINT_KEYS)
    kind = cast(Kind, options.get_str("kind", choices=KINDS))
    address = options.get_int("address", minimum=0, maximum=MAX_ADDRESS)
    if kind in BIT_KINDS:
        options.get_str("type", "bool", choices=("bool",))
        for key in ("word_order", "scale"):
            if key in options:
                raise options.error(key, f"not used by {kind} points, which are always bool")
        parsed = PointAddress(kind, address, "bool")
    else:
        type_ = cast(RegisterType, options.get_str("type", "uint16", choices=REGISTER_TYPES))
        width = register_count(type_)
        if "word_order" in options and width == 1:
            raise options.error("word_order", f"only applies to 32-bit types, not {type_}")
        word_order = cast(WordOrder, options.get_str("word_order", "big", choices=WORD_ORDERS))
        scale = options.get_float("scale", 1.0)
        if scale == 0:
            raise options.error("scale", "expected a non-zero number")
        if address + width - 1 > MAX_ADDRESS:
            raise options.error(
                "address",
                f"a {type_} needs {width} registers; {address}..{address + width - 1} "
                f"goes past {MAX_ADDRESS}",
            )
        parsed = PointAddress(kind, address, type_, word_order, scale)
    if point.writable and kind not in WRITABLE_KINDS:
        raise options.error("kind", f"{kind} points are read-only; writable needs holding or coil")
    return parsed


def plan_reads(
    points: Iterable[PlannedPoint],
    *,
    max_gap_registers: int = MAX_GAP_REGISTERS,
    max_gap_bits: int = MAX_GAP_BITS,
) -> tuple[ReadRequest, ...]:
    """The fewest requests that read ``points``, in kind then address order."""
    by_kind: dict[Kind, list[PlannedPoint]] = {}
    for planned in points:
        by_kind.setdefault(planned.address.kind, []).append(planned)
    requests: list[ReadRequest] = []
    for kind in KINDS:
        members = sorted(by_kind.get(kind, ()), key=lambda p: (p.address.address, p.spec.name))
        if not members:
            continue
        bits = kind in BIT_KINDS
        max_gap = max_gap_bits if bits else max_gap_registers
        max_count = MAX_BITS_PER_REQUEST if bits else MAX_REGISTERS_PER_REQUEST
        requests.extend(_spans(kind, members, max_gap, max_count))
    return tuple(requests)


def split_without_gaps(request: ReadRequest) -> tuple[ReadRequest, ...]:
    """``request`` re-planned so that no request reads an address no point uses."""
    return plan_reads(request.points, max_gap_registers=0, max_gap_bits=0)


def _spans(
    kind: Kind, members: Sequence[PlannedPoint], max_gap: int, max_count: int
) -> list[ReadRequest]:
    spans: list[ReadRequest] = []
    current: list[PlannedPoint] = [members[0]]
    start, end, gaps = members[0].address.address, members[0].address.end, False
    for planned in members[1:]:
        address = planned.address
        gap = address.address - end
        new_end = max(end, address.end)
        if gap <= max_gap and new_end - start <= max_count:
            current.append(planned)
            gaps = gaps or gap > 0
            end = new_end
            continue
        spans.append(ReadRequest(kind, start, end - start, tuple(current), gaps))
        current, start, end, gaps = [planned], address.address, address.end, False
    spans.append(ReadRequest(kind, start, end - start, tuple(current), gaps))
    return spans
