"""BLE advertisement decoders and the duplicate/replay filter: the published test vectors of
each format (bthome.io, docs.ruuvi.com, and the bthome-ble, ruuvitag-ble and Aranet4-Python
test suites), encrypted BTHome, Hypothesis robustness and round-trip properties (with small
encoders written here from the specifications), and the filter's rules."""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESCCM
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.ble.dedupe import (
    BTHOME_SAME_PACKET_AFTER_S,
    COUNTER_RESET_BELOW,
    E1_PREFERRED_FOR_S,
    ReplayGuard,
)
from drivers.ble.formats import (
    ARANET_COMPANY_ID,
    BTHOME_UUID,
    QUANTITIES,
    RUUVI_COMPANY_ID,
    Advertisement,
    Decoded,
    DecodeError,
    DecryptionFailed,
    EncryptionKeyMissing,
    NotThisFormat,
    SequenceFilter,
    decode,
    decode_aranet4,
    decode_bthome,
    decode_ruuvi,
    quantity_unit,
    recognise,
)

EXAMPLES = settings(max_examples=200, deadline=None)

# bthome.io/encryption and bthome-ble's tests: one key and one sensor for every encrypted vector.
BIND_KEY = bytes.fromhex("231d39c1d7cc1ab1aee224cd096db932")
WRONG_KEY = bytes.fromhex("814aac74c4f17b6c1581e1ab87816b99")  # bthome-ble test_bindkey_wrong
SENSOR_MAC = "54:48:E6:8F:80:A5"


def bthome(service_data: bytes | str, address: str = SENSOR_MAC) -> Advertisement:
    data = bytes.fromhex(service_data) if isinstance(service_data, str) else service_data
    return Advertisement(address, -60, None, {}, {BTHOME_UUID: data})


def ruuvi(raw_hex: str) -> Advertisement:
    return Advertisement(
        "CB:B8:33:4C:88:4F", -70, None, {RUUVI_COMPANY_ID: bytes.fromhex(raw_hex)}, {}
    )


def aranet(payload: bytes | str, name: str | None = "Aranet4 12345") -> Advertisement:
    data = bytes.fromhex(payload) if isinstance(payload, str) else payload
    return Advertisement("00:11:22:33:44:55", -65, name, {ARANET_COMPANY_ID: data}, {})


def assert_values(actual: Mapping[str, object], expected: Mapping[str, object]) -> None:
    """Same keys; floats within a tolerance far below each format's resolution; None is None;
    booleans and integers exactly (a bool is never taken for 0/1)."""
    assert set(actual) == set(expected), f"{sorted(actual)} != {sorted(expected)}"
    for name, want in expected.items():
        got = actual[name]
        if want is None or isinstance(want, bool):
            assert got is want, f"{name}: {got!r} != {want!r}"
        elif isinstance(want, float):
            assert isinstance(got, float) and not isinstance(got, bool), f"{name}: {got!r}"
            assert got == pytest.approx(want, abs=1e-6), f"{name}: {got} != {want}"
        else:
            assert type(got) is int and got == want, f"{name}: {got!r} != {want!r}"


# --------------------------------------------------------------------------------------------
# BTHome v2: plain vectors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service_data", "values", "packet_id"),
    [
        # bthome.io/format worked example
        ("4002c40903bf13", {"temperature": 25.0, "humidity": 50.55}, None),
        # bthome-ble tests/test_parser_v2.py
        ("4002ca0903bf13", {"temperature": 25.06, "humidity": 50.55}, None),
        (
            "400009015d025d0903b718",
            {"battery": 93, "temperature": 23.97, "humidity": 63.27},
            9,
        ),
        ("4012e204", {"co2": 1250}, None),
        ("400d120c0e021c", {"pm2_5": 3090, "pm10": 7170}, None),
        ("40133301", {"tvoc": 307}, None),
        # trigger-based device (bit 2) decodes the same way
        ("4404138a01", {"pressure": 1008.83}, None),
    ],
)
def test_bthome_vectors(
    service_data: str, values: dict[str, object], packet_id: int | None
) -> None:
    decoded = decode_bthome(bthome(service_data))
    assert decoded.format == "bthome"
    assert_values(decoded.values, values)
    assert decoded.sequence == packet_id
    assert decoded.sequence_modulo == (None if packet_id is None else 256)
    assert decoded.counter is None
    assert not decoded.encrypted


# Every row of the bthome.io/format tables: object bytes -> quantity and value, in the unit of
# QUANTITIES (mm, mL and lb converted to m, L and kg; precipitation with the 0.1 factor bthome.io
# adopted in May 2025, home-assistant/bthome.io#58).
SPEC_TABLE_EXAMPLES = [
    ("518756", "acceleration", 22.151),
    ("0161", "battery", 97),
    ("12e204", "co2", 1250),
    ("56e803", "conductivity", 1000),
    ("0960", "count", 96),
    ("3d0960", "count", 24585),
    ("3e2a2c0960", "count", 1611213866),
    ("59ea", "count", -22),
    ("5aeaea", "count", -5398),
    ("5bea0234ea", "count", -365690134),
    ("434e34", "current", 13.39),
    ("5d02ea", "current", -5.63),
    ("08ca06", "dew_point", 17.38),
    ("400c00", "distance", 0.012),
    ("414e00", "distance", 7.8),
    ("424e3400", "duration", 13.39),
    ("4d12138a14", "energy", 344593.17),
    ("0a138a14", "energy", 1346.067),
    ("4b138a14", "gas", 1346.067),
    ("4c41018a01", "gas", 25821.505),
    ("528756", "gyroscope", 22.151),
    ("03bf13", "humidity", 50.55),
    ("2e23", "humidity", 35),
    ("05138a14", "illuminance", 13460.67),
    ("065e1f", "mass", 80.3),
    ("073e1d", "mass", 33.9559),  # 74.86 lb
    ("14020c", "moisture", 30.74),
    ("2f23", "moisture", 35),
    ("0d120c", "pm2_5", 3090),
    ("0e021c", "pm10", 7170),
    ("0b021b00", "power", 69.14),
    ("5c02fbffff", "power", -12.78),
    ("04138a01", "pressure", 1008.83),
    ("3f020c", "rotation", 307.4),
    ("444e34", "speed", 133.9),
    ("57ea", "temperature", -22),
    ("58ea", "temperature", -7.7),
    ("451101", "temperature", 27.3),
    ("02ca09", "temperature", 25.06),
    ("505d396164", "timestamp", 1684093277),
    ("133301", "tvoc", 307),
    ("0c020c", "voltage", 3.074),
    ("4a020c", "voltage", 307.4),
    ("4e87562a01", "volume", 19551.879),
    ("478756", "volume", 2215.1),
    ("48dc87", "volume", 34.78),  # 34780 mL
    ("5587562a01", "volume_storage", 19551.879),
    ("49dc87", "volume_flow_rate", 34.78),
    ("4632", "uv_index", 5.0),
    ("4f87562a01", "water", 19551.879),
    ("5e9f8c", "direction", 359.99),
    ("5fa00f", "precipitation", 400.0),
    ("1501", "battery_low", True),
    ("1601", "battery_charging", True),
    ("1700", "carbon_monoxide", False),
    ("1801", "cold", True),
    ("1900", "connectivity", False),
    ("1a00", "door", False),
    ("1b01", "garage_door", True),
    ("1c01", "gas_detected", True),
    ("0f01", "generic_boolean", True),
    ("1d00", "heat", False),
    ("1e01", "light", True),
    ("1f01", "lock", True),
    ("2001", "moisture_detected", True),
    ("2100", "motion", False),
    ("2201", "moving", True),
    ("2301", "occupancy", True),
    ("1100", "opening", False),
    ("2400", "plug", False),
    ("1001", "power_on", True),
    ("2500", "presence", False),
    ("2601", "problem", True),
    ("2701", "running", True),
    ("2800", "safety", False),
    ("2901", "smoke", True),
    ("2a00", "sound", False),
    ("2b00", "tamper", False),
    ("2c01", "vibration", True),
    ("2d01", "window", True),
    ("3a01", "button", 1),  # press
    ("3a80", "button", 0x80),  # hold press
    ("3c0000", "dimmer", 0),
    ("3c0103", "dimmer", -3),  # rotate left 3 steps
    ("3c020a", "dimmer", 10),  # rotate right 10 steps
]


@pytest.mark.parametrize(("objects", "quantity", "value"), SPEC_TABLE_EXAMPLES)
def test_bthome_spec_table_examples(objects: str, quantity: str, value: object) -> None:
    decoded = decode_bthome(bthome("40" + objects))
    if isinstance(value, float):
        assert decoded.values[quantity] == pytest.approx(value, abs=1e-4)
        assert set(decoded.values) == {quantity}
    else:
        assert_values(decoded.values, {quantity: value})


def test_bthome_skips_text_raw_and_device_information_by_their_lengths() -> None:
    # text "Hello World!" (0x53), raw (0x54), then a temperature after each, then the device
    # information objects: nothing is emitted for them, and what follows is still read.
    payload = "40" + "530c48656c6c6f20576f726c6421" + "57ea" + "54020102" + "2e23" + "f00100"
    payload += "f100010204" + "f2000106"
    decoded = decode_bthome(bthome(payload))
    assert_values(decoded.values, {"temperature": -22, "humidity": 35})


def test_bthome_stops_at_an_unknown_object_id_and_keeps_what_came_before() -> None:
    # 0x3B is not in the spec: its length is unknown, so the CO2 after it cannot be located.
    decoded = decode_bthome(bthome("40" + "02ca09" + "0161" + "3b0102" + "12e204"))
    assert_values(decoded.values, {"temperature": 25.06, "battery": 97})


def test_bthome_repeated_quantities_get_a_suffix_in_payload_order() -> None:
    # Two 0.01 °C temperatures, a 0.1 °C one (same quantity), then two humidities (uint16, uint8).
    decoded = decode_bthome(bthome("40" + "02ca09" + "02c409" + "451101" + "03bf13" + "2e23"))
    assert_values(
        decoded.values,
        {
            "temperature": 25.06,
            "temperature_2": 25.0,
            "temperature_3": 27.3,
            "humidity": 50.55,
            "humidity_2": 35,
        },
    )
    assert quantity_unit("temperature_3") == "°C"
    assert quantity_unit("humidity_2") == "%"
    assert quantity_unit("temperature_1") is None  # repeats start at 2
    assert quantity_unit("no_such_thing_2") is None


@pytest.mark.parametrize(
    ("service_data", "message"),
    [
        ("", "empty"),
        ("e102000c04", "version 7"),  # bthome-ble test_has_incorrect_version
        ("2002ca09", "version 1"),
        ("4002ca", "needs 2 bytes, 1 left"),
        ("40530548656c", "needs 5 bytes"),
        ("4053", "no length"),
        ("41" + "00112233", "too short"),
    ],
)
def test_bthome_malformed_frames_raise_decode_error(service_data: str, message: str) -> None:
    encrypted = service_data.startswith("41")
    with pytest.raises(DecodeError, match=message):
        decode_bthome(bthome(service_data), key=BIND_KEY if encrypted else None)


def test_bthome_plain_frame_for_a_sensor_with_a_bind_key_is_refused() -> None:
    # An attacker needs no key to send a plain frame with the sensor's address.
    with pytest.raises(DecryptionFailed, match="plain"):
        decode_bthome(bthome("4002ca0903bf13"), key=BIND_KEY)
    with pytest.raises(DecryptionFailed, match="plain"):
        decode(bthome("4002ca0903bf13"), bthome_key=BIND_KEY)


def test_bthome_absent_and_v1_service_data_are_not_this_format() -> None:
    with pytest.raises(NotThisFormat, match="0xFCD2"):
        decode_bthome(Advertisement(SENSOR_MAC, None, None, {}, {}))
    v1 = Advertisement(
        SENSOR_MAC, None, None, {}, {"0000181c-0000-1000-8000-00805f9b34fb": b"\x02"}
    )
    with pytest.raises(NotThisFormat, match="v1"):
        decode_bthome(v1)


def test_bthome_plain_mac_included_variant() -> None:
    # bit 1 set and bytes 1-6 hold the sender's address reversed (bthome-ble's reading).
    decoded = decode_bthome(bthome("42" + "a5808fe64854" + "02ca0903bf13"))
    assert_values(decoded.values, {"temperature": 25.06, "humidity": 50.55})
    # The same bytes from another sender: an address or objects? Refused rather than guessed.
    with pytest.raises(DecodeError, match="bit 1"):
        decode_bthome(bthome("42" + "a5808fe64854" + "02ca0903bf13", address="11:22:33:44:55:66"))


# --------------------------------------------------------------------------------------------
# BTHome v2: encrypted frames
# --------------------------------------------------------------------------------------------

ENCRYPTED_VECTORS = [
    # (service data, counter as little-endian uint32)
    # bthome-ble test_bindkey_correct / tests/test_v2_encryption.py
    ("41a47266c95f730011223378237214", 0x33221100),
    # bthome.io/encryption (current page): counter 1122867
    ("41e445f3c9962b332211006c7c4519", 1122867),
    # bthome-ble test_increasing_encryption_counter: the next frame, counter 1122868
    ("413e932cc7175f34221100553876af", 1122868),
    # bthome-ble test_bthome_with_mac_encrypted: MAC in the payload (device info bit 1)
    ("43a5808fe64854f196c06ffb4900112233f08ecbde", 0x33221100),
]


@pytest.mark.parametrize(("service_data", "counter"), ENCRYPTED_VECTORS)
def test_bthome_encrypted_vectors_decrypt_with_the_bind_key(
    service_data: str, counter: int
) -> None:
    decoded = decode_bthome(bthome(service_data), key=BIND_KEY)
    assert decoded.encrypted
    assert decoded.counter == counter
    assert_values(decoded.values, {"temperature": 25.06, "humidity": 50.55})
    assert decoded.sequence is None


@pytest.mark.parametrize(("service_data", "counter"), ENCRYPTED_VECTORS)
def test_bthome_encrypted_vectors_refuse_a_wrong_or_missing_key(
    service_data: str, counter: int
) -> None:
    with pytest.raises(DecryptionFailed):
        decode_bthome(bthome(service_data), key=WRONG_KEY)
    with pytest.raises(EncryptionKeyMissing):
        decode_bthome(bthome(service_data))
    with pytest.raises(EncryptionKeyMissing):
        decode(bthome(service_data))
    with pytest.raises(ValueError, match="16 bytes"):
        decode_bthome(bthome(service_data), key=BIND_KEY[:15])


@pytest.mark.parametrize(("service_data", "counter"), ENCRYPTED_VECTORS)
def test_bthome_any_flipped_bit_fails_authentication(service_data: str, counter: int) -> None:
    """A flipped bit anywhere after the device information byte (address, ciphertext,
    counter or MIC) is caught by the MIC; so is a frame heard from another address."""
    frame = bytes.fromhex(service_data)
    for bit in range(8, len(frame) * 8):
        altered = bytearray(frame)
        altered[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(DecryptionFailed):
            decode_bthome(bthome(bytes(altered)), key=BIND_KEY)
    if not frame[0] & 0x02:  # the address is in the nonce, not in the frame
        with pytest.raises(DecryptionFailed):
            decode_bthome(bthome(frame, address="54:48:E6:8F:80:A6"), key=BIND_KEY)


def test_bthome_encrypted_frame_from_an_address_that_is_not_a_mac() -> None:
    with pytest.raises(DecodeError, match="not a MAC"):
        decode_bthome(bthome(ENCRYPTED_VECTORS[1][0], address="not-an-address"), key=BIND_KEY)


# --------------------------------------------------------------------------------------------
# Ruuvi: official vectors (docs.ruuvi.com), XX (reserved) as FF
# --------------------------------------------------------------------------------------------

RUUVI5_NOT_AVAILABLE = dict.fromkeys(
    [
        "temperature", "humidity", "pressure", "acceleration_x", "acceleration_y",
        "acceleration_z", "battery_voltage", "tx_power", "movement_counter",
    ]
)  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "values", "sequence"),
    [
        (  # valid
            "0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F",
            {
                "temperature": 24.3, "humidity": 53.49, "pressure": 1000.44,
                "acceleration_x": 0.004, "acceleration_y": -0.004, "acceleration_z": 1.036,
                "battery_voltage": 2.977, "tx_power": 4, "movement_counter": 66,
            },
            205,
        ),
        (  # maximum
            "057FFFFFFEFFFE7FFF7FFF7FFFFFDEFEFFFECBB8334C884F",
            {
                "temperature": 163.835, "humidity": 163.835, "pressure": 1155.34,
                "acceleration_x": 32.767, "acceleration_y": 32.767, "acceleration_z": 32.767,
                "battery_voltage": 3.646, "tx_power": 20, "movement_counter": 254,
            },
            65534,
        ),
        (  # minimum
            "058001000000008001800180010000000000CBB8334C884F",
            {
                "temperature": -163.835, "humidity": 0.0, "pressure": 500.0,
                "acceleration_x": -32.767, "acceleration_y": -32.767,
                "acceleration_z": -32.767, "battery_voltage": 1.6, "tx_power": -40,
                "movement_counter": 0,
            },
            0,
        ),
        ("058000FFFFFFFF800080008000FFFFFFFFFFFFFFFFFFFFFF", RUUVI5_NOT_AVAILABLE, None),
    ],
)  # fmt: skip
def test_ruuvi5_vectors(raw: str, values: dict[str, object], sequence: int | None) -> None:
    decoded = decode_ruuvi(ruuvi(raw))
    assert decoded.format == "ruuvi5"
    assert_values(decoded.values, values)
    assert decoded.sequence == sequence
    assert decoded.sequence_modulo == (None if sequence is None else 65536)
    assert (decoded.counter, decoded.encrypted) == (None, False)


@pytest.mark.parametrize(
    ("raw", "values", "sequence"),
    [
        (  # valid
            "06170C5668C79E007000C90501D9FFCD004C884F",
            {
                "temperature": 29.5, "humidity": 55.3, "pressure": 1011.02, "pm2_5": 11.2,
                "co2": 201, "voc_index": 10, "nox_index": 2, "illuminance": 13026.67,
                "calibrating": False,
            },
            205,
        ),
        (  # maximum (the doc's raw ends 4C8F4F, its table says 4C 88 4F: the MAC is not decoded)
            "067FFF9C40FFFE27109C40FAFAFEFFFF074C8F4F",
            {
                "temperature": 163.835, "humidity": 100.0, "pressure": 1155.34, "pm2_5": 1000.0,
                "co2": 40000, "voc_index": 500, "nox_index": 500, "illuminance": 65535.0,
                "calibrating": True,
            },
            255,
        ),
        (  # minimum
            "0680010000000000000000000000FF00004C884F",
            {
                "temperature": -163.835, "humidity": 0.0, "pressure": 500.0, "pm2_5": 0.0,
                "co2": 0, "voc_index": 0, "nox_index": 0, "illuminance": 0.0,
                "calibrating": False,
            },
            0,
        ),
        (  # invalid: every value not available; the sequence has no such value; flags all set
            "068000FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF",
            {
                "temperature": None, "humidity": None, "pressure": None, "pm2_5": None,
                "co2": None, "voc_index": None, "nox_index": None, "illuminance": None,
                "calibrating": True,
            },
            255,
        ),
    ],
)  # fmt: skip
def test_ruuvi6_vectors(raw: str, values: dict[str, object], sequence: int) -> None:
    decoded = decode_ruuvi(ruuvi(raw))
    assert decoded.format == "ruuvi6"
    assert_values(decoded.values, values)
    assert (decoded.sequence, decoded.sequence_modulo) == (sequence, 256)


# Real Ruuvi Air captures from ruuvitag-ble tests/test_v6.py. That library rounds to 2 decimals
# and luminosity to an integer, hence the tolerances.
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            "06144E40F8C915000602193200A34BBDC0FF00FF",
            {"co2": 537, "humidity": 41.58, "illuminance": 1232, "nox_index": 1, "pm2_5": 0.6,
             "pressure": 1014.77, "temperature": 25.99, "voc_index": 101},
        ),
        (
            "0614DA863CC90300090DF9A600A057F690FF00FF",
            {"co2": 3577, "humidity": 85.91, "illuminance": 1080, "nox_index": 1, "pm2_5": 0.9,
             "pressure": 1014.59, "temperature": 26.69, "voc_index": 332},
        ),
        (
            "0615113E08C9030007057B3E00A44D6290FF00FF",
            {"co2": 1403, "humidity": 39.7, "illuminance": 1287, "nox_index": 1, "pm2_5": 0.7,
             "pressure": 1014.59, "temperature": 26.96, "voc_index": 124},
        ),
        ("0614974158C9110005020C56007C4B9580FF00FF", {"illuminance": 224}),
    ],
)  # fmt: skip
def test_ruuvi6_real_captures(raw: str, expected: dict[str, float]) -> None:
    values = decode_ruuvi(ruuvi(raw)).values
    for name, want in expected.items():
        got = values[name]
        assert isinstance(got, int | float)
        assert got == pytest.approx(want, abs=0.5 if name == "illuminance" else 0.006), name
    assert values["calibrating"] is False


# E1: the notes' valid and maximum vectors with XX as FF, and ruuvitag-ble's corrected 40-byte
# versions of all four (tests/test_e1.py; reserved bytes 00). The doc's own minimum and invalid
# raw strings have the wrong number of X's.
E1_VALID = {
    "temperature": 29.5, "humidity": 55.3, "pressure": 1011.02, "pm1_0": 10.1, "pm2_5": 11.2,
    "pm4_0": 121.3, "pm10": 455.4, "co2": 201, "voc_index": 20, "nox_index": 4,
    "illuminance": 13027.0, "calibrating": True,
}  # fmt: skip
E1_MAX = {
    "temperature": 163.835, "humidity": 100.0, "pressure": 1155.34, "pm1_0": 1000.0,
    "pm2_5": 1000.0, "pm4_0": 1000.0, "pm10": 1000.0, "co2": 40000, "voc_index": 500,
    "nox_index": 500, "illuminance": 144284.0, "calibrating": True,
}  # fmt: skip
E1_MIN = {
    "temperature": -163.835, "humidity": 0.0, "pressure": 500.0, "pm1_0": 0.0, "pm2_5": 0.0,
    "pm4_0": 0.0, "pm10": 0.0, "co2": 0, "voc_index": 0, "nox_index": 0, "illuminance": 0.0,
    "calibrating": False,
}  # fmt: skip
E1_INVALID = dict.fromkeys(E1_MIN) | {"calibrating": True}


@pytest.mark.parametrize(
    ("raw", "values", "sequence"),
    [
        (
            "E1170C5668C79E0065007004BD11CA00C90A0213E0ACFFFFFFDECDEE01FFFFFFFFFFCBB8334C884F",
            E1_VALID,
            14601710,
        ),
        (
            "E17FFF9C40FFFE27102710271027109C40FAFADC28F0FFFFFFFFFFFE3FFFFFFFFFFFCBB8334C884F",
            E1_MAX,
            16777214,
        ),
        (
            "E1170C5668C79E0065007004BD11CA00C90A0213E0AC000000DECDEE110000000000CBB8334C884F",
            E1_VALID,
            14601710,
        ),
        (
            "E17FFF9C40FFFE27102710271027109C40FAFADC28F0000000FFFFFE3F0000000000CBB8334C884F",
            E1_MAX,
            16777214,
        ),
        (
            "E1800100000000000000000000000000000000000000000000000000000000000000CBB8334C884F",
            E1_MIN,
            0,
        ),
        (
            "E18000" + "FF" * 37,
            E1_INVALID,
            None,
        ),
    ],
)
def test_ruuvie1_vectors(raw: str, values: dict[str, object], sequence: int | None) -> None:
    decoded = decode_ruuvi(ruuvi(raw))
    assert decoded.format == "ruuvie1"
    assert_values(decoded.values, values)
    assert decoded.sequence == sequence
    assert decoded.sequence_modulo == (None if sequence is None else 2**24)


@pytest.mark.parametrize(
    ("raw", "error", "message"),
    [
        ("", DecodeError, "empty"),
        ("0512FC5394", DecodeError, "needs 24 bytes, got 5"),
        ("06" + "00" * 18, DecodeError, "needs 20 bytes, got 19"),
        ("E1" + "00" * 20, DecodeError, "needs 40 bytes"),
        ("03" + "00" * 13, NotThisFormat, "0x03 is not supported"),  # RAWv1
        ("C5" + "00" * 20, NotThisFormat, "0xC5"),
    ],
)
def test_ruuvi_refusals(raw: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        decode_ruuvi(ruuvi(raw))


def test_ruuvi_without_ruuvi_data_is_not_this_format() -> None:
    with pytest.raises(NotThisFormat, match="0x0499"):
        decode_ruuvi(aranet("210503010005000143049f018b27350c023c00100055"))


# --------------------------------------------------------------------------------------------
# Aranet4 (Aranet4-Python tests/test_advertisements.py)
# --------------------------------------------------------------------------------------------

ARANET4_VECTOR = "210503010005000143049f018b27350c023c00100055"
ARANET4_VALUES = {
    "co2": 1091,
    "temperature": 20.75,  # 415 x 0.05; Aranet4-Python rounds it to 20.8
    "pressure": 1012.3,
    "humidity": 53,
    "battery": 12,
    "calibrating": False,
    "measurement_interval": 60,
    "measurement_age": 16,
}


@pytest.mark.parametrize("name", ["Aranet4 12345", None, ""])
def test_aranet4_vector(name: str | None) -> None:
    decoded = decode_aranet4(aranet(ARANET4_VECTOR, name=name))
    assert decoded.format == "aranet4"
    assert_values(decoded.values, ARANET4_VALUES)
    assert (decoded.sequence, decoded.sequence_modulo, decoded.counter) == (None, None, None)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("210a0400000000", "v0.4.10 advertises no readings: firmware 1.2.0"),
        ("01000201000000", "v1.2.0 advertises no readings: enable 'Smart Home integrations'"),
    ],
)
@pytest.mark.parametrize("name", ["Aranet4 12345", None])
def test_aranet4_payloads_without_readings_are_not_this_format(
    payload: str, message: str, name: str | None
) -> None:
    with pytest.raises(NotThisFormat, match=message):
        decode_aranet4(aranet(payload, name=name))


def test_aranet4_invalid_bits_give_none() -> None:
    payload = bytearray.fromhex(ARANET4_VECTOR)
    payload[9] |= 0x80  # CO2 bit 15
    payload[11] |= 0x40  # temperature bit 14
    payload[13] |= 0x80  # pressure bit 15
    values = decode_aranet4(aranet(bytes(payload))).values
    assert (values["co2"], values["temperature"], values["pressure"]) == (None, None, None)
    assert values["humidity"] == 53


def test_aranet4_calibration_state_and_refusals() -> None:
    payload = bytearray.fromhex(ARANET4_VECTOR)
    payload[0] |= 2 << 2  # calibration state 2: in progress
    assert decode_aranet4(aranet(bytes(payload))).values["calibrating"] is True
    # Aranet4-Python's "short" payload: the last byte of the readings is missing.
    with pytest.raises(DecodeError, match="truncated"):
        decode_aranet4(aranet(ARANET4_VECTOR[:40]))
    with pytest.raises(DecodeError, match="no header"):
        decode_aranet4(aranet("010002"))
    # Aranet2 (device type 1 first) from Aranet4-Python's vectors: another model.
    aranet2 = "01210404010000000000990100000a02003b007800520064"
    with pytest.raises(NotThisFormat, match="another model"):
        decode_aranet4(aranet(aranet2, name="Aranet2 278F8"))
    with pytest.raises(NotThisFormat, match="another model"):
        decode_aranet4(aranet(aranet2, name=None))
    with pytest.raises(NotThisFormat, match="0x0702"):
        decode_aranet4(ruuvi("0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F"))


# --------------------------------------------------------------------------------------------
# decode() and recognise()
# --------------------------------------------------------------------------------------------


def test_decode_dispatches_and_recognise_agrees() -> None:
    cases = [
        (bthome("4012e204"), "bthome"),
        (ruuvi("0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F"), "ruuvi5"),
        (ruuvi("06170C5668C79E007000C90501D9FFCD004C884F"), "ruuvi6"),
        (ruuvi("E18000" + "FF" * 37), "ruuvie1"),
        (aranet(ARANET4_VECTOR, name=None), "aranet4"),
    ]
    for adv, name in cases:
        assert recognise(adv) == name
        assert decode(adv).format == name
    encrypted = bthome(ENCRYPTED_VECTORS[0][0])
    assert recognise(encrypted) == "bthome"
    assert decode(encrypted, bthome_key=BIND_KEY).counter == 0x33221100


def test_decode_of_an_unknown_device_says_why_each_decoder_declined() -> None:
    apple = Advertisement("11:22:33:44:55:66", -80, None, {0x004C: b"\x02\x15" + bytes(21)}, {})
    assert recognise(apple) is None
    with pytest.raises(NotThisFormat, match=r"0xFCD2.*0x0499.*0x0702"):
        decode(apple)
    no_readings = aranet("01000201000000")
    assert recognise(no_readings) == "aranet4"  # known, even though it carries no readings
    with pytest.raises(NotThisFormat, match="Smart Home integrations"):
        decode(no_readings)
    assert recognise(ruuvi("03" + "00" * 13)) is None


# --------------------------------------------------------------------------------------------
# Hypothesis: arbitrary bytes never escape the error contract
# --------------------------------------------------------------------------------------------

mac_address = st.binary(min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02X}" for x in b))
payload_bytes = st.binary(max_size=64)
bthome_frames = st.one_of(
    payload_bytes,
    # Mostly well-formed headers, so that the object parser and the decryption are reached.
    st.tuples(st.sampled_from([0x40, 0x41, 0x42, 0x43, 0x44, 0x45]), payload_bytes).map(
        lambda parts: bytes([parts[0]]) + parts[1]
    ),
)
aranet_names = st.sampled_from([None, "", "Aranet4 0A1B2", "Aranet2 278F8", "AranetRn 1", "x"])


def check_contract(call: Any, adv: Advertisement, **kwargs: Any) -> Decoded | None:
    """Decoded, NotThisFormat or DecodeError; and every emitted name has a unit."""
    try:
        decoded = call(adv, **kwargs)
    except (NotThisFormat, DecodeError):
        return None
    assert isinstance(decoded, Decoded)
    for name, value in decoded.values.items():
        assert quantity_unit(name) is not None, name
        assert value is None or isinstance(value, bool | int | float)
        assert not (isinstance(value, float) and math.isnan(value)), name
    if decoded.sequence is not None:
        assert decoded.sequence_modulo is not None
        assert 0 <= decoded.sequence < decoded.sequence_modulo
    return decoded


@EXAMPLES
@given(frame=bthome_frames, address=st.one_of(mac_address, st.text(max_size=20)))
def test_bthome_never_raises_anything_else(frame: bytes, address: str) -> None:
    adv = bthome(frame, address=address)
    check_contract(decode_bthome, adv)
    check_contract(decode_bthome, adv, key=BIND_KEY)


@EXAMPLES
@given(
    data=st.one_of(
        payload_bytes,
        st.tuples(st.sampled_from([0x05, 0x06, 0xE1]), payload_bytes).map(
            lambda parts: bytes([parts[0]]) + parts[1]
        ),
    )
)
def test_ruuvi_never_raises_anything_else(data: bytes) -> None:
    check_contract(
        decode_ruuvi, Advertisement(SENSOR_MAC, None, None, {RUUVI_COMPANY_ID: data}, {})
    )


@EXAMPLES
@given(data=payload_bytes, name=aranet_names)
def test_aranet4_never_raises_anything_else(data: bytes, name: str | None) -> None:
    check_contract(decode_aranet4, aranet(data, name=name))


@EXAMPLES
@given(
    manufacturer=st.dictionaries(
        st.one_of(st.sampled_from([RUUVI_COMPANY_ID, ARANET_COMPANY_ID]), st.integers(0, 0xFFFF)),
        payload_bytes,
        max_size=3,
    ),
    service=st.dictionaries(
        st.sampled_from(
            [
                BTHOME_UUID,
                "0000181e-0000-1000-8000-00805f9b34fb",
                "0000fe95-0000-1000-8000-00805f9b34fb",
            ]
        ),
        bthome_frames,
        max_size=2,
    ),
    name=aranet_names,
    address=mac_address,
    key=st.one_of(st.none(), st.just(BIND_KEY)),
)
def test_decode_never_raises_anything_else_and_agrees_with_recognise(
    manufacturer: dict[int, bytes],
    service: dict[str, bytes],
    name: str | None,
    address: str,
    key: bytes | None,
) -> None:
    adv = Advertisement(address, None, name, manufacturer, service)
    decoded = check_contract(decode, adv, bthome_key=key)
    if decoded is not None:
        assert recognise(adv) == decoded.format


# --------------------------------------------------------------------------------------------
# Round trips through encoders written here from the specifications
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecObject:
    """One row of the bthome.io sensor table, as this test encodes it."""

    object_id: int
    quantity: str
    size: int
    signed: bool
    factor: float  # raw -> the unit of QUANTITIES


SPEC_OBJECTS = [
    SpecObject(0x01, "battery", 1, False, 1),
    SpecObject(0x02, "temperature", 2, True, 0.01),
    SpecObject(0x03, "humidity", 2, False, 0.01),
    SpecObject(0x04, "pressure", 3, False, 0.01),
    SpecObject(0x05, "illuminance", 3, False, 0.01),
    SpecObject(0x0C, "voltage", 2, False, 0.001),
    SpecObject(0x0D, "pm2_5", 2, False, 1),
    SpecObject(0x0E, "pm10", 2, False, 1),
    SpecObject(0x12, "co2", 2, False, 1),
    SpecObject(0x13, "tvoc", 2, False, 1),
    SpecObject(0x2E, "humidity", 1, False, 1),
    SpecObject(0x3E, "count", 4, False, 1),
    SpecObject(0x40, "distance", 2, False, 0.001),  # mm -> m
    SpecObject(0x45, "temperature", 2, True, 0.1),
    SpecObject(0x4C, "gas", 4, False, 0.001),
    SpecObject(0x58, "temperature", 1, True, 0.35),
    SpecObject(0x5C, "power", 4, True, 0.01),
    SpecObject(0x5F, "precipitation", 2, False, 0.1),
    SpecObject(0x62, "speed", 4, True, 0.000001),
    SpecObject(0x63, "acceleration", 4, True, 0.000001),
]


@st.composite
def spec_objects(draw: st.DrawFn) -> list[tuple[SpecObject, int]]:
    chosen = draw(st.lists(st.sampled_from(SPEC_OBJECTS), max_size=8))
    chosen.sort(key=lambda spec: spec.object_id)  # the spec asks for ascending ids
    result = []
    for spec in chosen:
        bits = spec.size * 8
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if spec.signed else (0, 2**bits - 1)
        result.append((spec, draw(st.integers(low, high))))
    return result


def encode_objects(objects: list[tuple[SpecObject, int]], packet_id: int | None) -> bytes:
    out = bytearray() if packet_id is None else bytearray([0x00, packet_id])
    for spec, raw in objects:
        out.append(spec.object_id)
        out += raw.to_bytes(spec.size, "little", signed=spec.signed)
    return bytes(out)


def encrypt_frame(plaintext: bytes, mac: str, counter: int, key: bytes) -> bytes:
    """bthome.io/encryption: nonce = MAC (display order) | D2 FC | info | counter (LE)."""
    info = 0x41
    counter_le = counter.to_bytes(4, "little")
    nonce = bytes.fromhex(mac.replace(":", "")) + b"\xd2\xfc" + bytes([info]) + counter_le
    sealed = AESCCM(key, tag_length=4).encrypt(nonce, plaintext, None)
    return bytes([info]) + sealed[:-4] + counter_le + sealed[-4:]


@EXAMPLES
@given(
    objects=spec_objects(),
    packet_id=st.one_of(st.none(), st.integers(0, 255)),
    encryption=st.one_of(
        st.none(), st.tuples(st.integers(0, 2**32 - 1), st.binary(min_size=16, max_size=16))
    ),
    address=mac_address,
)
def test_bthome_round_trip(
    objects: list[tuple[SpecObject, int]],
    packet_id: int | None,
    encryption: tuple[int, bytes] | None,
    address: str,
) -> None:
    plaintext = encode_objects(objects, packet_id)
    if encryption is None:
        decoded = decode_bthome(bthome(b"\x40" + plaintext, address=address))
        assert decoded.counter is None
    else:
        counter, key = encryption
        frame = encrypt_frame(plaintext, address, counter, key)
        decoded = decode_bthome(bthome(frame, address=address), key=key)
        assert decoded.counter == counter
    assert decoded.encrypted is (encryption is not None)
    assert decoded.sequence == packet_id
    expected: dict[str, float] = {}
    for spec, raw in objects:
        name, n = spec.quantity, 2
        while name in expected:
            name, n = f"{spec.quantity}_{n}", n + 1
        expected[name] = raw * spec.factor
    assert set(decoded.values) == set(expected)
    for name, want in expected.items():
        got = decoded.values[name]
        assert isinstance(got, int | float)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-6), name


@EXAMPLES
@given(
    objects=spec_objects(),
    unknown_id=st.sampled_from([0x30, 0x39, 0x3B, 0x65, 0xEF, 0xFF]),
    tail=payload_bytes,
)
def test_bthome_unknown_id_keeps_the_known_prefix(
    objects: list[tuple[SpecObject, int]], unknown_id: int, tail: bytes
) -> None:
    prefix = encode_objects(objects, None)
    whole = decode_bthome(bthome(b"\x40" + prefix + bytes([unknown_id]) + tail))
    assert whole.values == decode_bthome(bthome(b"\x40" + prefix)).values


def maybe_na(values: st.SearchStrategy[int], not_available: int) -> st.SearchStrategy[int]:
    return st.one_of(values, st.just(not_available))


@EXAMPLES
@given(
    temperature=maybe_na(st.integers(-32767, 32767), -32768),
    humidity=maybe_na(st.integers(0, 65534), 65535),
    pressure=maybe_na(st.integers(0, 65534), 65535),
    acceleration=st.tuples(*[maybe_na(st.integers(-32767, 32767), -32768)] * 3),
    battery=maybe_na(st.integers(0, 2046), 2047),
    tx=maybe_na(st.integers(0, 30), 31),
    movement=maybe_na(st.integers(0, 254), 255),
    sequence=maybe_na(st.integers(0, 65534), 65535),
)
def test_ruuvi5_round_trip(
    temperature: int,
    humidity: int,
    pressure: int,
    acceleration: tuple[int, int, int],
    battery: int,
    tx: int,
    movement: int,
    sequence: int,
) -> None:
    raw = struct.pack(
        ">BhHHhhhHBH6s", 5, temperature, humidity, pressure, *acceleration,
        (battery << 5) | tx, movement, sequence, bytes.fromhex("CBB8334C884F"),
    )  # fmt: skip
    decoded = decode_ruuvi(ruuvi(raw.hex()))
    values = decoded.values

    def expect(name: str, raw_value: int, not_available: int, scaled: float) -> None:
        if raw_value == not_available:
            assert values[name] is None, name
        else:
            assert values[name] == pytest.approx(scaled, abs=1e-9), name

    expect("temperature", temperature, -32768, temperature * 0.005)
    expect("humidity", humidity, 65535, humidity * 0.0025)
    expect("pressure", pressure, 65535, (pressure + 50000) / 100)
    for axis, value in zip("xyz", acceleration, strict=True):
        expect(f"acceleration_{axis}", value, -32768, value / 1000)
    expect("battery_voltage", battery, 2047, (battery + 1600) / 1000)
    expect("tx_power", tx, 31, -40 + 2 * tx)
    expect("movement_counter", movement, 255, movement)
    assert decoded.sequence == (None if sequence == 65535 else sequence)


@EXAMPLES
@given(
    pm=st.tuples(*[maybe_na(st.integers(0, 65534), 65535)] * 4),
    co2=maybe_na(st.integers(0, 65534), 65535),
    voc=maybe_na(st.integers(0, 510), 511),
    nox=maybe_na(st.integers(0, 510), 511),
    lux=maybe_na(st.integers(0, 2**24 - 2), 2**24 - 1),
    sequence=maybe_na(st.integers(0, 2**24 - 2), 2**24 - 1),
    calibrating=st.booleans(),
)
def test_ruuvie1_round_trip(
    pm: tuple[int, int, int, int],
    co2: int,
    voc: int,
    nox: int,
    lux: int,
    sequence: int,
    calibrating: bool,
) -> None:
    flags = (voc & 1) << 6 | (nox & 1) << 7 | int(calibrating)
    raw = (
        bytes([0xE1])
        + struct.pack(">hHH", 0, 0, 0)
        + struct.pack(">HHHHH", *pm, co2)
        + bytes([voc >> 1, nox >> 1])
        + lux.to_bytes(3, "big")
        + b"\xff" * 3
        + sequence.to_bytes(3, "big")
        + bytes([flags])
        + b"\xff" * 5
        + bytes.fromhex("CBB8334C884F")
    )
    decoded = decode_ruuvi(ruuvi(raw.hex()))
    values = decoded.values
    for name, value in zip(("pm1_0", "pm2_5", "pm4_0", "pm10"), pm, strict=True):
        assert values[name] == (None if value == 65535 else pytest.approx(value / 10))
    assert values["co2"] == (None if co2 == 65535 else co2)
    assert values["voc_index"] == (None if voc == 511 else voc)
    assert values["nox_index"] == (None if nox == 511 else nox)
    assert values["illuminance"] == (None if lux == 2**24 - 1 else pytest.approx(lux / 100))
    assert values["calibrating"] is calibrating
    assert decoded.sequence == (None if sequence == 2**24 - 1 else sequence)


# --------------------------------------------------------------------------------------------
# SequenceFilter / ReplayGuard
# --------------------------------------------------------------------------------------------


def frame(
    fmt: str,
    sequence: int | None = None,
    *,
    counter: int | None = None,
    values: Mapping[str, Any] | None = None,
) -> Decoded:
    modulo = {"bthome": 256, "ruuvi5": 65536, "ruuvi6": 256, "ruuvie1": 2**24}.get(fmt)
    return Decoded(
        format=fmt,
        values=dict(values or {}),
        sequence=sequence,
        sequence_modulo=None if sequence is None else modulo,
        counter=counter,
        encrypted=counter is not None,
    )


def test_bthome_packet_ids_repeats_late_frames_and_wrap_around() -> None:
    guard = SequenceFilter()
    assert guard.accept(frame("bthome", 250), 0.0)
    assert not guard.accept(frame("bthome", 250), 0.5)  # the same frame sent again
    assert "250" in (guard.last_rejection or "")
    assert guard.accept(frame("bthome", 251), 1.0)
    assert not guard.accept(frame("bthome", 249), 1.5)  # an older frame arriving late
    assert guard.accept(frame("bthome", 5), 2.0)  # 251 -> 5 wraps: 10 ahead
    assert guard.last_rejection is None
    assert guard.accept(frame("bthome", 68), 2.5)  # 63 ahead: the end of the window
    assert not guard.accept(frame("bthome", 132), 3.0)  # 64 ahead: outside
    # The sensor's data did not change, so its packet id does not either: heard again > 4 s.
    assert not guard.accept(frame("bthome", 68), 2.5 + BTHOME_SAME_PACKET_AFTER_S)
    assert guard.accept(frame("bthome", 68), 2.5 + BTHOME_SAME_PACKET_AFTER_S + 0.01)


def test_bthome_without_packet_id_is_never_dropped() -> None:
    guard = SequenceFilter()
    assert all(guard.accept(frame("bthome"), 0.0) for _ in range(3))


def test_ruuvi_same_sequence_is_the_same_measurement_whatever_the_time() -> None:
    guard = SequenceFilter()
    assert guard.accept(frame("ruuvi5", 65534), 0.0)
    assert not guard.accept(frame("ruuvi5", 65534), 1.0)
    assert not guard.accept(frame("ruuvi5", 65534), 1000.0)
    assert guard.accept(frame("ruuvi5", 0), 1001.0)  # wrapped
    assert guard.accept(frame("ruuvi5", 7), 1002.0)  # a restart, or lost frames
    assert guard.accept(frame("ruuvi5"), 1003.0)  # sequence not available: nothing to compare
    assert guard.accept(frame("ruuvi5"), 1003.0)


def test_ruuvi6_is_dropped_while_the_sensor_sends_e1() -> None:
    guard = SequenceFilter()
    assert guard.accept(frame("ruuvi6", 0xED), 0.0)  # before any E1: taken
    assert guard.accept(frame("ruuvie1", 0xDECDEE), 1.0)
    assert not guard.accept(frame("ruuvie1", 0xDECDEE), 1.5)
    assert not guard.accept(frame("ruuvi6", 0xEE), 2.0)
    assert "E1" in (guard.last_rejection or "")
    assert not guard.accept(frame("ruuvi6", 0xEF), 1.5 + E1_PREFERRED_FOR_S)  # E1 seen at 1.5
    assert guard.accept(frame("ruuvi6", 0xF0), 1.6 + E1_PREFERRED_FOR_S)  # E1 no longer heard


def test_encrypted_counter_replay_and_device_reset() -> None:
    guard = ReplayGuard()
    assert guard.accept(frame("bthome", counter=1122867), 0.0)
    assert guard.accept(frame("bthome", counter=1122868), 1.0)
    assert not guard.accept(frame("bthome", counter=1122868), 2.0)  # the same frame again
    assert "repeated" in (guard.last_rejection or "")
    assert not guard.accept(frame("bthome", counter=1122867), 10.0)  # replayed much later
    assert "replay" in (guard.last_rejection or "")
    assert not guard.accept(frame("bthome", counter=COUNTER_RESET_BELOW), 11.0)
    # The sensor restarted (battery change): its counter starts again near zero.
    assert guard.accept(frame("bthome", counter=0), 12.0)
    assert guard.accept(frame("bthome", counter=1), 13.0)
    assert not guard.accept(frame("bthome", counter=1), 14.0)
    # Below 100 and below the last one: taken as another restart. This is the rule's known
    # weakness (documented): frames with a counter under 100 can be replayed.
    assert guard.accept(frame("bthome", counter=0), 15.0)
    assert guard.accept(frame("bthome", counter=500), 16.0)
    assert not guard.accept(frame("bthome", counter=COUNTER_RESET_BELOW), 17.0)
    assert guard.accept(frame("bthome", counter=COUNTER_RESET_BELOW - 1), 18.0)


def test_an_authenticated_counter_is_remembered_even_when_its_packet_id_repeats() -> None:
    guard = ReplayGuard()
    assert guard.accept(frame("bthome", 5, counter=10), 0.0)
    assert not guard.accept(frame("bthome", 5, counter=11), 1.0)  # same data, new frame
    # Replayed after the 4 s packet-id window: the counter still gives it away.
    assert not guard.accept(frame("bthome", 5, counter=11), 10.0)
    assert "repeated" in (guard.last_rejection or "")
    assert guard.accept(frame("bthome", 5, counter=12), 10.5)


def test_aranet4_same_measurement_by_its_age() -> None:
    guard = SequenceFilter()

    def reading(age: int, interval: int = 60) -> Decoded:
        return frame("aranet4", values={"measurement_age": age, "measurement_interval": interval})

    assert guard.accept(reading(16), 100.0)  # measured at 84
    assert not guard.accept(reading(20), 104.0)  # still the one measured at 84
    assert not guard.accept(reading(59), 143.5)
    assert guard.accept(reading(1), 145.0)  # measured at 144: the next one
    assert guard.accept(reading(1, interval=0), 146.0)  # no interval: nothing to compare


@settings(max_examples=100, deadline=None)
@given(
    fmt=st.sampled_from(["bthome", "ruuvi5", "ruuvi6", "ruuvie1", "aranet4"]),
    sequence=st.integers(0, 255),
    counter=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    history=st.lists(st.tuples(st.integers(0, 255), st.floats(0, 100)), max_size=5),
    now=st.floats(100, 200),
)
def test_a_frame_just_accepted_is_refused_if_it_arrives_again(
    fmt: str,
    sequence: int,
    counter: int | None,
    history: list[tuple[int, float]],
    now: float,
) -> None:
    def make(number: int, counter: int | None = None) -> Decoded:
        if fmt == "aranet4":  # no sequence: the measurement's age tells
            return frame(fmt, values={"measurement_age": number, "measurement_interval": 60})
        return frame(fmt, number, counter=counter)

    guard = SequenceFilter()
    for earlier, at in history:
        guard.accept(make(earlier), at)
    latest = make(sequence, counter if fmt == "bthome" else None)  # only BTHome is encrypted
    if guard.accept(latest, now):
        assert not guard.accept(latest, now)
        assert guard.last_rejection


def test_quantities_have_units_and_the_brief_names() -> None:
    for name in (
        "temperature", "humidity", "pressure", "co2", "pm1_0", "pm2_5", "pm4_0", "pm10", "tvoc",
        "voc_index", "nox_index", "illuminance", "battery", "battery_voltage", "tx_power",
        "acceleration_x", "acceleration_y", "acceleration_z", "movement_counter", "calibrating",
    ):  # fmt: skip
        assert name in QUANTITIES
    assert QUANTITIES["pressure"] == "hPa"
    assert QUANTITIES["pm2_5"] == QUANTITIES["tvoc"] == "µg/m³"
    with pytest.raises(TypeError):
        QUANTITIES["pressure"] = "Pa"  # type: ignore[index]
