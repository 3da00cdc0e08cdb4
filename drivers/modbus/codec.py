"""Register codec: Modbus 16-bit registers ⇄ engineering values. Pure functions, no I/O.

Modbus carries 16-bit big-endian registers; wider values span two consecutive registers. Devices
disagree on which of the two comes first, hence ``word_order``: ``big`` puts the high word first
(the Modbus convention, and the Eastron meters'), ``little`` puts the low word first. The bytes
inside each register are always big-endian on the wire; pymodbus already hands us each register
as an integer, so only the word order is ours to handle.

Engineering value = raw * scale. Integer types with a scale of exactly 1 decode to ``int`` so a
dim level reads ``50`` and not ``50.0``; anything scaled decodes to ``float``, rounded to the
scale's decimal places so ``600 * 0.1`` is ``60.0`` and not ``60.00000000000001``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from decimal import Decimal
from functools import lru_cache
from typing import Final, Literal, get_args

__all__ = [
    "REGISTER_TYPES",
    "WORD_ORDERS",
    "RegisterType",
    "WordOrder",
    "decode",
    "encode",
    "raw_range",
    "register_count",
]

RegisterType = Literal["int16", "uint16", "int32", "uint32", "float32"]
WordOrder = Literal["big", "little"]

REGISTER_TYPES: Final[tuple[RegisterType, ...]] = get_args(RegisterType)
WORD_ORDERS: Final[tuple[WordOrder, ...]] = get_args(WordOrder)

# struct format of the big-endian byte image of each type (high word first).
_FORMATS: Final[dict[str, str]] = {
    "int16": ">h",
    "uint16": ">H",
    "int32": ">i",
    "uint32": ">I",
    "float32": ">f",
}
_RAW_RANGES: Final[dict[str, tuple[int, int]]] = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
}


def register_count(type: RegisterType) -> int:
    """How many 16-bit registers a value of ``type`` occupies."""
    _check_type(type)
    return struct.calcsize(_FORMATS[type]) // 2


def raw_range(type: RegisterType) -> tuple[int, int] | None:
    """The inclusive raw range of an integer type, ``None`` for float32."""
    _check_type(type)
    return _RAW_RANGES.get(type)


def decode(
    registers: Sequence[int],
    type: RegisterType,
    word_order: WordOrder = "big",
    scale: float = 1.0,
) -> int | float:
    """The engineering value held by ``registers`` (exactly ``register_count(type)`` of them).

    float32 registers may hold NaN or infinities; they are returned as such and the caller
    decides what a non-finite reading means.
    """
    count = register_count(type)
    _check_word_order(word_order)
    if len(registers) != count:
        raise ValueError(f"{type} needs {count} register(s), got {len(registers)}")
    if any(not 0 <= word <= 0xFFFF for word in registers):
        raise ValueError(f"registers must be 0..65535, got {list(registers)}")
    words = list(registers) if word_order == "big" else list(reversed(registers))
    raw = struct.unpack(_FORMATS[type], b"".join(w.to_bytes(2, "big") for w in words))[0]
    if type == "float32":
        return float(raw) * scale if scale != 1.0 else float(raw)
    if scale == 1.0:
        return int(raw)
    return float(round(raw * scale, _decimals(scale)))


def encode(
    value: float,
    type: RegisterType,
    word_order: WordOrder = "big",
    scale: float = 1.0,
) -> list[int]:
    """The registers that hold engineering ``value``: divide by ``scale``, round (integer types),
    range-check. Raises :class:`ValueError` naming the type and range when it does not fit."""
    _check_type(type)
    _check_word_order(word_order)
    if isinstance(value, bool):
        value = int(value)
    if not math.isfinite(value):
        raise ValueError(f"cannot write {value} as {type}: not a finite number")
    if scale == 0 or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite non-zero number, got {scale}")
    scaled = value / scale
    if type == "float32":
        try:
            image = struct.pack(">f", scaled)
        except OverflowError:
            raise ValueError(f"{value} is out of range for float32") from None
    else:
        raw = round(scaled)
        low, high = _RAW_RANGES[type]
        if not low <= raw <= high:
            shown = f"{value} / scale {scale} = {raw}" if scale != 1.0 else str(raw)
            raise ValueError(f"{shown} is out of range for {type} ({low}..{high})")
        image = struct.pack(_FORMATS[type], raw)
    words = [int.from_bytes(image[i : i + 2], "big") for i in range(0, len(image), 2)]
    return words if word_order == "big" else list(reversed(words))


@lru_cache(maxsize=256)
def _decimals(scale: float) -> int:
    """Decimal places of ``scale`` as written (0.1 → 1, 0.25 → 2, 10 → 0)."""
    exponent = Decimal(repr(scale)).normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def _check_type(type: str) -> None:
    if type not in _FORMATS:
        raise ValueError(f"unknown register type {type!r}; expected one of {REGISTER_TYPES}")


def _check_word_order(word_order: str) -> None:
    if word_order not in WORD_ORDERS:
        raise ValueError(f"unknown word order {word_order!r}; expected one of {WORD_ORDERS}")
