"""The Modbus register codec: known vectors and round-trip properties."""

from __future__ import annotations

import math
import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.modbus import codec

EXAMPLES = settings(max_examples=150, deadline=None)

register = st.integers(min_value=0, max_value=0xFFFF)
word_order = st.sampled_from(codec.WORD_ORDERS)
integer_type = st.sampled_from(("int16", "uint16", "int32", "uint32"))
# Scales as people write them in profiles: decimal fractions and small integers.
scale = st.sampled_from((1.0, 0.1, 0.01, 0.001, 0.25, 0.5, 2.0, 10.0, -1.0, 0.05))


# Known vectors -------------------------------------------------------------------------------
def test_sdm630_voltage_is_float32_high_word_first() -> None:
    assert codec.decode([0x4366, 0x0000], "float32") == 230.0
    assert codec.encode(230.0, "float32") == [0x4366, 0x0000]


def test_little_word_order_swaps_the_two_registers() -> None:
    assert codec.decode([0x0000, 0x4366], "float32", "little") == 230.0
    assert codec.encode(230.0, "float32", "little") == [0x0000, 0x4366]
    assert codec.decode([0x5678, 0x1234], "uint32", "little") == 0x12345678
    assert codec.encode(0x12345678, "uint32", "big") == [0x1234, 0x5678]


@pytest.mark.parametrize(
    ("registers", "type_", "expected"),
    [
        ([0xFFFF], "int16", -1),
        ([0xFFFF], "uint16", 65535),
        ([0x8000], "int16", -32768),
        ([0xFFFF, 0xFFFE], "int32", -2),
        ([0xFFFF, 0xFFFE], "uint32", 0xFFFFFFFE),
        ([0x0001, 0x0000], "uint32", 65536),
        ([0xBF80, 0x0000], "float32", -1.0),
    ],
)
def test_known_values(registers: list[int], type_: codec.RegisterType, expected: float) -> None:
    assert codec.decode(registers, type_) == expected


def test_lamp_controller_scaled_points_decode_to_clean_decimals() -> None:
    # lamp_power 60.0 W at scale 0.1, burning_hours 12345.67 h at scale 0.01,
    # driver_temperature -5.3 °C as int16 at scale 0.1
    assert codec.decode([600], "uint16", scale=0.1) == 60.0
    assert codec.decode([1234567 >> 16, 1234567 & 0xFFFF], "uint32", scale=0.01) == 12345.67
    assert codec.decode([(-53) & 0xFFFF], "int16", scale=0.1) == -5.3


def test_unscaled_integers_stay_integers() -> None:
    value = codec.decode([50], "uint16")
    assert value == 50
    assert isinstance(value, int)
    assert isinstance(codec.decode([50], "uint16", scale=0.5), float)


def test_encode_divides_by_scale_and_rounds() -> None:
    assert codec.encode(60.0, "uint16", scale=0.1) == [600]
    assert codec.encode(49.96, "uint16", scale=0.1) == [500]
    assert codec.encode(-5.3, "int16", scale=0.1) == [(-53) & 0xFFFF]
    assert codec.encode(True, "uint16") == [1]


@pytest.mark.parametrize(
    ("value", "type_", "scale_", "fragment"),
    [
        (65536, "uint16", 1.0, "out of range for uint16 (0..65535)"),
        (-1, "uint16", 1.0, "out of range for uint16"),
        (32768, "int16", 1.0, "out of range for int16 (-32768..32767)"),
        (6553.6, "uint16", 0.1, "scale 0.1 = 65536 is out of range for uint16"),
        (2**32, "uint32", 1.0, "out of range for uint32"),
        (-(2**31) - 1, "int32", 1.0, "out of range for int32"),
        (1e39, "float32", 1.0, "out of range for float32"),
        (math.nan, "uint16", 1.0, "not a finite number"),
        (math.inf, "float32", 1.0, "not a finite number"),
    ],
)
def test_encode_refuses_what_does_not_fit(
    value: float, type_: codec.RegisterType, scale_: float, fragment: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        codec.encode(value, type_, scale=scale_)


def test_decode_checks_its_input() -> None:
    with pytest.raises(ValueError, match="needs 2 register"):
        codec.decode([1], "uint32")
    with pytest.raises(ValueError, match=re.escape("0..65535")):
        codec.decode([70000], "uint16")
    with pytest.raises(ValueError, match="unknown register type"):
        codec.decode([1], "uint8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown word order"):
        codec.decode([1, 2], "uint32", "middle")  # type: ignore[arg-type]


def test_register_count_and_ranges() -> None:
    assert [codec.register_count(t) for t in codec.REGISTER_TYPES] == [1, 1, 2, 2, 2]
    assert codec.raw_range("int16") == (-32768, 32767)
    assert codec.raw_range("float32") is None


def test_float32_nan_is_passed_through_for_the_caller_to_judge() -> None:
    assert math.isnan(codec.decode([0x7FC0, 0x0000], "float32"))


# Properties --------------------------------------------------------------------------------
@EXAMPLES
@given(type_=integer_type, order=word_order, data=st.data())
def test_registers_round_trip_through_integer_values(
    type_: codec.RegisterType, order: codec.WordOrder, data: st.DataObject
) -> None:
    registers = data.draw(st.lists(register, min_size=1, max_size=1))
    if codec.register_count(type_) == 2:
        registers = [*registers, data.draw(register)]
    value = codec.decode(registers, type_, order)
    assert codec.encode(value, type_, order) == registers


@EXAMPLES
@given(type_=integer_type, order=word_order, factor=scale, data=st.data())
def test_scaled_registers_round_trip(
    type_: codec.RegisterType, order: codec.WordOrder, factor: float, data: st.DataObject
) -> None:
    low, high = codec.raw_range(type_) or (0, 0)
    raw = data.draw(st.integers(min_value=low, max_value=high))
    registers = codec.encode(raw, type_, order)
    value = codec.decode(registers, type_, order, factor)
    assert codec.encode(value, type_, order, factor) == registers


@EXAMPLES
@given(registers=st.lists(register, min_size=2, max_size=2), order=word_order)
def test_float32_registers_round_trip_bit_exactly(
    registers: list[int], order: codec.WordOrder
) -> None:
    value = codec.decode(registers, "float32", order)
    if math.isfinite(value):
        assert codec.encode(value, "float32", order) == registers


@EXAMPLES
@given(value=st.floats(width=32, allow_nan=False, allow_infinity=False), order=word_order)
def test_float32_values_round_trip(value: float, order: codec.WordOrder) -> None:
    assert codec.decode(codec.encode(value, "float32", order), "float32", order) == value


@EXAMPLES
@given(value=st.integers(min_value=-(2**31), max_value=2**31 - 1))
def test_int32_matches_the_struct_reference(value: int) -> None:
    image = struct.pack(">i", value)
    expected = [int.from_bytes(image[:2], "big"), int.from_bytes(image[2:], "big")]
    assert codec.encode(value, "int32") == expected
    assert codec.encode(value, "int32", "little") == expected[::-1]
