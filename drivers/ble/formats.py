"""Decoders for the advertisements of BLE air-quality sensors: BTHome v2 (plain and encrypted),
Ruuvi data formats 5, 6 and E1, and Aranet4.

Pure functions over what bleak reports (:class:`Advertisement`): no I/O, no bleak import. Each
decoder returns a :class:`Decoded` whose ``values`` map quantity names (:data:`QUANTITIES`, in
one unit per quantity across formats) to numbers, booleans or ``None`` when the sensor says the
value is not available. A decoder raises :class:`NotThisFormat` for an advertisement that is not
its format (try the next one, or ignore the device) and :class:`DecodeError` for one that is its
format but malformed.

The formats, the test vectors and the choice of writing these decoders in-house are described
in ``docs/drivers/ble-formats.md``. References: bthome.io (format and encryption pages),
docs.ruuvi.com (data formats 5, 6, E1), Aranet4-Python (advertisement layout); the
bthome-ble, ruuvitag-ble and Aranet4-Python test suites for vectors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from .dedupe import ReplayGuard, SequenceFilter

__all__ = [
    "ARANET_COMPANY_ID",
    "BTHOME_UUID",
    "QUANTITIES",
    "RUUVI_COMPANY_ID",
    "Advertisement",
    "DecodeError",
    "Decoded",
    "DecryptionFailed",
    "EncryptionKeyMissing",
    "NotThisFormat",
    "ReplayGuard",
    "SequenceFilter",
    "Value",
    "decode",
    "decode_aranet4",
    "decode_bthome",
    "decode_ruuvi",
    "quantity_unit",
    "recognise",
]

Value = float | int | bool | None
"""A decoded value; ``None`` when the sensor reports it as not available."""

BTHOME_UUID: Final = "0000fcd2-0000-1000-8000-00805f9b34fb"
"""BTHome v2 service data UUID (0xFCD2), as bleak spells it."""
_BTHOME_V1_UUIDS: Final = frozenset(
    {"0000181c-0000-1000-8000-00805f9b34fb", "0000181e-0000-1000-8000-00805f9b34fb"}
)
RUUVI_COMPANY_ID: Final = 0x0499
"""Ruuvi Innovations' Bluetooth company identifier (bleak's manufacturer_data key 1177)."""
ARANET_COMPANY_ID: Final = 0x0702
"""SAF Tehnika (Aranet) Bluetooth company identifier (bleak's manufacturer_data key 1794)."""


# --------------------------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Advertisement:
    """What the driver hands a decoder, built from bleak's AdvertisementData."""

    address: str
    """The sender's address, ``"AA:BB:CC:DD:EE:FF"``, upper case."""
    rssi: int | None
    local_name: str | None
    manufacturer_data: Mapping[int, bytes]
    """Company id -> payload after the two id bytes, as bleak gives it."""
    service_data: Mapping[str, bytes]
    """Full 128-bit UUID in lower case -> payload after the UUID."""


@dataclass(frozen=True, slots=True)
class Decoded:
    """One decoded advertisement."""

    format: str
    """``"bthome"``, ``"ruuvi5"``, ``"ruuvi6"``, ``"ruuvie1"`` or ``"aranet4"``."""
    values: Mapping[str, Value]
    """Quantity -> value in the unit of :data:`QUANTITIES`; ``None`` = "not available"."""
    sequence: int | None
    """BTHome packet id, Ruuvi measurement sequence; ``None`` when the frame carries none."""
    sequence_modulo: int | None
    """Where :attr:`sequence` wraps (256, 65536, 2**24); ``None`` when there is no sequence."""
    counter: int | None
    """Encrypted BTHome frame counter (replay protection); ``None`` otherwise."""
    encrypted: bool


class NotThisFormat(Exception):
    """The advertisement is not (recognisably) this format: try the next decoder / ignore."""


class DecodeError(ValueError):
    """It is this format but the payload is malformed; the message says what is wrong."""


class EncryptionKeyMissing(DecodeError):
    """An encrypted BTHome frame and no bind key to open it."""


class DecryptionFailed(DecodeError):
    """The bind key does not open the frame: wrong key, or the frame was altered (MIC check)."""


# --------------------------------------------------------------------------------------------
# Quantities
# --------------------------------------------------------------------------------------------

_BINARY_QUANTITIES: Final = (
    "battery_charging", "battery_low", "carbon_monoxide", "cold", "connectivity", "door",
    "garage_door", "gas_detected", "generic_boolean", "heat", "light", "lock",
    "moisture_detected", "motion", "moving", "occupancy", "opening", "plug", "power_on",
    "presence", "problem", "running", "safety", "smoke", "sound", "tamper", "vibration",
    "window",
)  # fmt: skip

QUANTITIES: Final[Mapping[str, str]] = MappingProxyType(
    {
        # Air quality and climate (all formats).
        "temperature": "°C",
        "humidity": "%",
        "pressure": "hPa",
        "co2": "ppm",
        "pm1_0": "µg/m³",
        "pm2_5": "µg/m³",
        "pm4_0": "µg/m³",
        "pm10": "µg/m³",
        "tvoc": "µg/m³",
        "voc_index": "",
        "nox_index": "",
        "illuminance": "lx",
        "dew_point": "°C",
        # Sensor state.
        "battery": "%",
        "battery_voltage": "V",
        "tx_power": "dBm",
        "acceleration_x": "g",
        "acceleration_y": "g",
        "acceleration_z": "g",
        "movement_counter": "",
        "calibrating": "",
        "measurement_interval": "s",
        "measurement_age": "s",
        # The rest of the BTHome v2 sensor table.
        "acceleration": "m/s²",
        "channel": "",
        "conductivity": "µS/cm",
        "count": "",
        "current": "A",
        "direction": "°",
        "distance": "m",
        "duration": "s",
        "energy": "kWh",
        "gas": "m³",
        "gyroscope": "°/s",
        "light_level": "",
        "mass": "kg",
        "moisture": "%",
        "power": "W",
        "precipitation": "mm",
        "rotation": "°",
        "rotational_speed": "rpm",
        "speed": "m/s",
        "timestamp": "s",
        "uv_index": "",
        "voltage": "V",
        "volume": "L",
        "volume_flow_rate": "m³/h",
        "volume_storage": "L",
        "water": "L",
        # BTHome events: the button's event code, the dimmer's signed steps.
        "button": "",
        "dimmer": "",
        # BTHome binary sensors (True/False).
        **dict.fromkeys(_BINARY_QUANTITIES, ""),
    }
)
"""Every quantity a decoder emits -> its unit ("" for counts, indexes, flags and events).
A BTHome payload that carries the same quantity more than once names the repeats
``<quantity>_2``, ``<quantity>_3``... (see :func:`quantity_unit`)."""

_REPEAT_SUFFIX: Final = re.compile(r"^(?P<base>.+)_(?P<n>[2-9]|[1-9][0-9]+)$")


def quantity_unit(name: str) -> str | None:
    """The unit of a quantity name a decoder emits, repeats (``temperature_2``) included;
    ``None`` for a name no decoder emits."""
    if name in QUANTITIES:
        return QUANTITIES[name]
    match = _REPEAT_SUFFIX.match(name)
    if match is not None and match["base"] in QUANTITIES:
        return QUANTITIES[match["base"]]
    return None


# --------------------------------------------------------------------------------------------
# BTHome v2
# --------------------------------------------------------------------------------------------

_ObjectKind = Literal["number", "binary", "packet_id", "button", "dimmer", "skip", "sized"]


@dataclass(frozen=True, slots=True)
class _ObjectType:
    """One BTHome object id: how many value bytes follow the id and what they mean."""

    name: str | None  # the quantity emitted; None for objects parsed only to skip them
    size: int  # value bytes after the id; for "sized" objects a length byte comes first
    signed: bool = False
    factor: float = 1.0  # the table's factor, times a unit conversion where one is needed
    digits: int = 0  # decimals kept after scaling: the resolution the factor gives
    kind: _ObjectKind = "number"


def _unsigned(name: str, size: int, factor: float = 1.0, digits: int = 0) -> _ObjectType:
    return _ObjectType(name, size, False, factor, digits)


def _signed(name: str, size: int, factor: float = 1.0, digits: int = 0) -> _ObjectType:
    return _ObjectType(name, size, True, factor, digits)


def _binary(name: str) -> _ObjectType:
    return _ObjectType(name, 1, kind="binary")


_LB_TO_KG: Final = 0.45359237

# Object id -> type, from the bthome.io/format tables (sensor, binary sensor, event, device
# information and misc data) and bthome-ble's constant table (which carries ids 0x60-0x64 and
# the 0.1 precipitation factor that bthome.io adopted in 2025). Every id a sender may put before
# one we use must be here: the format has no length bytes, so an unknown id ends the parsing.
_BTHOME_OBJECTS: Final[Mapping[int, _ObjectType]] = MappingProxyType(
    {
        0x00: _ObjectType(None, 1, kind="packet_id"),
        0x01: _unsigned("battery", 1),
        0x02: _signed("temperature", 2, 0.01, 2),
        0x03: _unsigned("humidity", 2, 0.01, 2),
        0x04: _unsigned("pressure", 3, 0.01, 2),
        0x05: _unsigned("illuminance", 3, 0.01, 2),
        0x06: _unsigned("mass", 2, 0.01, 2),
        0x07: _unsigned("mass", 2, 0.01 * _LB_TO_KG, 4),  # sent in lb, emitted in kg
        0x08: _signed("dew_point", 2, 0.01, 2),
        0x09: _unsigned("count", 1),
        0x0A: _unsigned("energy", 3, 0.001, 3),
        0x0B: _unsigned("power", 3, 0.01, 2),
        0x0C: _unsigned("voltage", 2, 0.001, 3),
        0x0D: _unsigned("pm2_5", 2),
        0x0E: _unsigned("pm10", 2),
        0x0F: _binary("generic_boolean"),
        0x10: _binary("power_on"),
        0x11: _binary("opening"),
        0x12: _unsigned("co2", 2),
        0x13: _unsigned("tvoc", 2),
        0x14: _unsigned("moisture", 2, 0.01, 2),
        0x15: _binary("battery_low"),
        0x16: _binary("battery_charging"),
        0x17: _binary("carbon_monoxide"),
        0x18: _binary("cold"),
        0x19: _binary("connectivity"),
        0x1A: _binary("door"),
        0x1B: _binary("garage_door"),
        0x1C: _binary("gas_detected"),
        0x1D: _binary("heat"),
        0x1E: _binary("light"),
        0x1F: _binary("lock"),
        0x20: _binary("moisture_detected"),
        0x21: _binary("motion"),
        0x22: _binary("moving"),
        0x23: _binary("occupancy"),
        0x24: _binary("plug"),
        0x25: _binary("presence"),
        0x26: _binary("problem"),
        0x27: _binary("running"),
        0x28: _binary("safety"),
        0x29: _binary("smoke"),
        0x2A: _binary("sound"),
        0x2B: _binary("tamper"),
        0x2C: _binary("vibration"),
        0x2D: _binary("window"),
        0x2E: _unsigned("humidity", 1),
        0x2F: _unsigned("moisture", 1),
        0x3A: _ObjectType("button", 1, kind="button"),
        0x3C: _ObjectType("dimmer", 2, kind="dimmer"),
        0x3D: _unsigned("count", 2),
        0x3E: _unsigned("count", 4),
        0x3F: _signed("rotation", 2, 0.1, 1),
        0x40: _unsigned("distance", 2, 0.001, 3),  # sent in mm, emitted in m
        0x41: _unsigned("distance", 2, 0.1, 1),
        0x42: _unsigned("duration", 3, 0.001, 3),
        0x43: _unsigned("current", 2, 0.001, 3),
        0x44: _unsigned("speed", 2, 0.01, 2),
        0x45: _signed("temperature", 2, 0.1, 1),
        0x46: _unsigned("uv_index", 1, 0.1, 1),
        0x47: _unsigned("volume", 2, 0.1, 1),
        0x48: _unsigned("volume", 2, 0.001, 3),  # sent in mL, emitted in L
        0x49: _unsigned("volume_flow_rate", 2, 0.001, 3),
        0x4A: _unsigned("voltage", 2, 0.1, 1),
        0x4B: _unsigned("gas", 3, 0.001, 3),
        0x4C: _unsigned("gas", 4, 0.001, 3),
        0x4D: _unsigned("energy", 4, 0.001, 3),
        0x4E: _unsigned("volume", 4, 0.001, 3),
        0x4F: _unsigned("water", 4, 0.001, 3),
        0x50: _unsigned("timestamp", 4),  # seconds since 1970-01-01 UTC
        0x51: _unsigned("acceleration", 2, 0.001, 3),
        0x52: _unsigned("gyroscope", 2, 0.001, 3),
        0x53: _ObjectType(None, 0, kind="sized"),  # text (UTF-8): not a number, skipped
        0x54: _ObjectType(None, 0, kind="sized"),  # raw bytes: skipped
        0x55: _unsigned("volume_storage", 4, 0.001, 3),
        0x56: _unsigned("conductivity", 2),
        0x57: _signed("temperature", 1),
        0x58: _signed("temperature", 1, 0.35, 2),
        0x59: _signed("count", 1),
        0x5A: _signed("count", 2),
        0x5B: _signed("count", 4),
        0x5C: _signed("power", 4, 0.01, 2),
        0x5D: _signed("current", 2, 0.001, 3),
        0x5E: _unsigned("direction", 2, 0.01, 2),
        0x5F: _unsigned("precipitation", 2, 0.1, 1),
        0x60: _unsigned("channel", 1),
        0x61: _unsigned("rotational_speed", 2),
        0x62: _signed("speed", 4, 0.000001, 6),
        0x63: _signed("acceleration", 4, 0.000001, 6),
        0x64: _unsigned("light_level", 1),  # 0 dark, 1 twilight, 2 bright
        0xF0: _ObjectType(None, 2, kind="skip"),  # device type id
        0xF1: _ObjectType(None, 4, kind="skip"),  # firmware version a.b.c.d
        0xF2: _ObjectType(None, 3, kind="skip"),  # firmware version a.b.c
    }
)

_INFO_ENCRYPTED: Final = 0x01
_INFO_MAC_INCLUDED: Final = 0x02  # "reserved" on bthome.io; "MAC included" in bthome-ble
_BTHOME_VERSION: Final = 2
_BTHOME_UUID_ON_AIR: Final = b"\xd2\xfc"  # 0xFCD2, little-endian, as in the nonce
_MAC_LENGTH: Final = 6
_COUNTER_LENGTH: Final = 4
_MIC_LENGTH: Final = 4
_BIND_KEY_LENGTH: Final = 16
_PACKET_ID_MODULO: Final = 256
_DIMMER_LEFT: Final = 1
_DIMMER_RIGHT: Final = 2


def decode_bthome(adv: Advertisement, *, key: bytes | None = None) -> Decoded:
    """Decode BTHome v2 service data (UUID 0xFCD2), encrypted frames with ``key``.

    Objects are read in order until the payload ends or an object id this decoder does not
    know, whose length it cannot know: the values decoded before it are returned. A quantity
    sent more than once is named ``<quantity>``, ``<quantity>_2``... in payload order.

    Raises :class:`NotThisFormat` without BTHome v2 service data, :class:`DecodeError` for a
    malformed frame, :class:`EncryptionKeyMissing` for an encrypted frame without ``key``,
    :class:`DecryptionFailed` when ``key`` does not open it or when the frame is plain although
    a ``key`` is given (a downgrade), and :class:`ValueError` for a ``key`` that is not 16
    bytes (a configuration error, not a property of the frame).
    """
    data = adv.service_data.get(BTHOME_UUID)
    if data is None:
        if _BTHOME_V1_UUIDS.intersection(adv.service_data):
            raise NotThisFormat("BTHome v1 (UUID 0x181C/0x181E) is not supported: use v2")
        raise NotThisFormat("no BTHome service data (UUID 0xFCD2)")
    if not data:
        raise DecodeError("BTHome service data is empty: no device information byte")
    info = data[0]
    version = info >> 5
    if version != _BTHOME_VERSION:
        raise DecodeError(
            f"BTHome device information byte 0x{info:02X} says version {version}; expected 2"
        )
    if info & _INFO_ENCRYPTED:
        if key is None:
            raise EncryptionKeyMissing(
                "encrypted BTHome frame and no bind key configured for this sensor"
            )
        if len(key) != _BIND_KEY_LENGTH:
            raise ValueError(f"a BTHome bind key is 16 bytes, got {len(key)}")
        payload, counter = _bthome_decrypt(adv.address, data, key)
    elif key is not None:
        # Anyone can send a plain frame with the sensor's address; a sensor given a bind key
        # encrypts every frame, so a plain one is a downgrade, refused like a bad MIC.
        raise DecryptionFailed(
            "plain BTHome frame from a sensor configured with a bind key: refused"
        )
    else:
        payload, counter = _bthome_plain_objects(adv.address, data), None
    values, packet_id = _bthome_objects(payload)
    return Decoded(
        format="bthome",
        values=MappingProxyType(values),
        sequence=packet_id,
        sequence_modulo=None if packet_id is None else _PACKET_ID_MODULO,
        counter=counter,
        encrypted=counter is not None,
    )


def _mac_bytes(address: str) -> bytes | None:
    """The six address bytes in display order (``54:48:E6:8F:80:A5`` -> ``5448e68f80a5``)."""
    try:
        mac = bytes.fromhex(address.replace(":", "").replace("-", ""))
    except ValueError:
        return None
    return mac if len(mac) == _MAC_LENGTH else None


def _bthome_plain_objects(address: str, data: bytes) -> bytes:
    """The object bytes of a plain frame, after the device information byte and, for the
    "MAC included" variant, the sender's address."""
    if not data[0] & _INFO_MAC_INCLUDED:
        return data[1:]
    # bit 1 is "reserved" in the current spec and "MAC included" (bytes 1-6, reversed) in
    # bthome-ble. Unauthenticated bytes cannot tell the two readings apart, so the bytes are
    # taken as an address only when they are this sender's address, and never read as objects.
    embedded = data[1 : 1 + _MAC_LENGTH][::-1]
    if len(embedded) == _MAC_LENGTH and embedded == _mac_bytes(address):
        return data[1 + _MAC_LENGTH :]
    raise DecodeError(
        "BTHome device information bit 1 is set but bytes 1-6 are not the sender's address: "
        "cannot tell whether the frame carries a MAC (bthome-ble) or objects (bthome.io)"
    )


def _bthome_decrypt(address: str, data: bytes, key: bytes) -> tuple[bytes, int]:
    """Open an encrypted frame: ``info | ciphertext | counter (4, LE) | MIC (4)``. Returns the
    plaintext objects and the frame counter."""
    info = data[0]
    sender = _mac_bytes(address)
    # (address used in the nonce, encrypted part) for each reading of the frame.
    candidates: list[tuple[bytes, bytes]] = []
    if info & _INFO_MAC_INCLUDED:
        # Both readings of bit 1 are tried; the MIC authenticates exactly one. Two attempts
        # halve the work of forging a 4-byte MIC (2**-31 instead of 2**-32 per try).
        embedded = data[1 : 1 + _MAC_LENGTH][::-1]
        if len(embedded) == _MAC_LENGTH:
            candidates.append((embedded, data[1 + _MAC_LENGTH :]))
    if sender is not None:
        candidates.append((sender, data[1:]))
    trailer = _COUNTER_LENGTH + _MIC_LENGTH
    readable = [(mac, body) for mac, body in candidates if len(body) >= trailer]
    if not readable:
        if sender is None:
            raise DecodeError(f"cannot build the BTHome nonce: {address!r} is not a MAC address")
        raise DecodeError(
            f"encrypted BTHome frame of {len(data)} bytes is too short for its counter and MIC"
        )
    cipher = AESCCM(key, tag_length=_MIC_LENGTH)
    for mac, body in readable:
        counter_bytes = body[-trailer:-_MIC_LENGTH]
        ciphertext_and_mic = body[:-trailer] + body[-_MIC_LENGTH:]
        nonce = mac + _BTHOME_UUID_ON_AIR + bytes([info]) + counter_bytes
        try:
            plaintext = cipher.decrypt(nonce, ciphertext_and_mic, None)
        except InvalidTag:
            continue
        # The counter is a uint32, little-endian (bthome.io/encryption since December 2025).
        return plaintext, int.from_bytes(counter_bytes, "little")
    raise DecryptionFailed(
        "BTHome frame does not authenticate with the configured bind key "
        "(wrong key, or the frame was altered)"
    )


def _bthome_objects(payload: bytes) -> tuple[dict[str, Value], int | None]:
    """Values by quantity name and the packet id, from a plaintext object list."""
    decoded: list[tuple[str, Value]] = []
    packet_id: int | None = None
    offset = 0
    while offset < len(payload):
        object_id = payload[offset]
        spec = _BTHOME_OBJECTS.get(object_id)
        if spec is None:
            break  # unknown id, unknown length: what follows cannot be located
        start = offset + 1
        size = spec.size
        if spec.kind == "sized":
            if start >= len(payload):
                raise DecodeError(f"BTHome object 0x{object_id:02X} at byte {offset}: no length")
            size = payload[start]
            start += 1
        end = start + size
        if end > len(payload):
            raise DecodeError(
                f"BTHome object 0x{object_id:02X} at byte {offset} needs {size} bytes, "
                f"{len(payload) - start} left"
            )
        raw = payload[start:end]
        offset = end
        if spec.kind == "packet_id":
            if packet_id is None:
                packet_id = raw[0]
            continue
        if spec.name is None:
            continue
        decoded.append((spec.name, _bthome_value(spec, raw)))
    return _name_repeats(decoded), packet_id


def _bthome_value(spec: _ObjectType, raw: bytes) -> Value:
    if spec.kind == "binary":
        return raw[0] != 0
    if spec.kind == "button":
        return raw[0]  # 0 none, 1 press, 2 double, 3 triple, 4 long, 5/6 long double/triple
    if spec.kind == "dimmer":
        event, steps = raw[0], raw[1]
        if event == 0:
            return 0
        if event == _DIMMER_LEFT:
            return -steps
        if event == _DIMMER_RIGHT:
            return steps
        return None  # an event id the spec does not define
    number = int.from_bytes(raw, "little", signed=spec.signed)
    if spec.factor == 1.0:
        return number
    return round(number * spec.factor, spec.digits)


def _name_repeats(decoded: list[tuple[str, Value]]) -> dict[str, Value]:
    """``temperature``, ``temperature_2``, ... for a quantity sent more than once."""
    values: dict[str, Value] = {}
    seen: dict[str, int] = {}
    for name, value in decoded:
        count = seen.get(name, 0) + 1
        seen[name] = count
        values[name if count == 1 else f"{name}_{count}"] = value
    return values


# --------------------------------------------------------------------------------------------
# Ruuvi data formats 5, 6 and E1 (all fields big-endian)
# --------------------------------------------------------------------------------------------

_RUUVI_FORMATS: Final[Mapping[int, str]] = MappingProxyType(
    {0x05: "ruuvi5", 0x06: "ruuvi6", 0xE1: "ruuvie1"}
)
_RUUVI5_LENGTH: Final = 24
_RUUVI6_LENGTH: Final = 20
_RUUVIE1_LENGTH: Final = 40
_INT16_NA: Final = -0x8000
_UINT8_NA: Final = 0xFF
_UINT16_NA: Final = 0xFFFF
_UINT24_NA: Final = 0xFFFFFF
_INDEX9_NA: Final = 0x1FF
_BATTERY11_NA: Final = 0x7FF
_TX_POWER5_NA: Final = 0x1F
_LUX_CODE_MAX: Final = 254
_LUX_CODE_STEP: Final = math.log(65536) / _LUX_CODE_MAX  # Ruuvi DF6 logarithmic luminosity
_FLAG_CALIBRATING: Final = 0x01
_FLAG_VOC_LSB: Final = 0x40
_FLAG_NOX_LSB: Final = 0x80


def decode_ruuvi(adv: Advertisement) -> Decoded:
    """Decode Ruuvi manufacturer data (company 0x0499): data format 5 (RuuviTag), 6 and E1
    (Ruuvi Air). A device sending both 6 and E1 should be read from E1 (the filter in
    :mod:`drivers.ble.dedupe` drops 6 while E1 arrives)."""
    payload = adv.manufacturer_data.get(RUUVI_COMPANY_ID)
    if payload is None:
        raise NotThisFormat("no Ruuvi manufacturer data (company 0x0499)")
    if not payload:
        raise DecodeError("Ruuvi manufacturer data is empty: no data format byte")
    data_format = payload[0]
    name = _RUUVI_FORMATS.get(data_format)
    if name is None:
        raise NotThisFormat(
            f"Ruuvi data format 0x{data_format:02X} is not supported (5, 6 and E1 are)"
        )
    needed = {"ruuvi5": _RUUVI5_LENGTH, "ruuvi6": _RUUVI6_LENGTH}.get(name, _RUUVIE1_LENGTH)
    if len(payload) < needed:
        raise DecodeError(
            f"Ruuvi data format 0x{data_format:02X} needs {needed} bytes, got {len(payload)}"
        )
    if name == "ruuvi5":
        return _ruuvi5(payload)
    if name == "ruuvi6":
        return _ruuvi6(payload)
    return _ruuvie1(payload)


def _u(data: bytes, start: int, size: int) -> int:
    return int.from_bytes(data[start : start + size], "big")


def _s16(data: bytes, start: int) -> int:
    return int.from_bytes(data[start : start + 2], "big", signed=True)


def _scaled(raw: int, not_available: int, factor: float, digits: int) -> float | None:
    return None if raw == not_available else round(raw * factor, digits)


def _ruuvi_climate(data: bytes) -> dict[str, Value]:
    """Bytes 1-6, common to 5, 6 and E1: temperature, humidity, pressure."""
    pressure = _u(data, 5, 2)
    return {
        "temperature": _scaled(_s16(data, 1), _INT16_NA, 0.005, 3),
        "humidity": _scaled(_u(data, 3, 2), _UINT16_NA, 0.0025, 4),
        # Pa with a -50 000 Pa offset on air; hPa here, like every other format.
        "pressure": None if pressure == _UINT16_NA else round((pressure + 50_000) / 100, 2),
    }


def _ruuvi_index(high_bits: int, flags: int, lsb_flag: int) -> int | None:
    """A 9-bit VOC/NOx index: bits 8..1 in their own byte, bit 0 in the flags byte."""
    index = (high_bits << 1) | (1 if flags & lsb_flag else 0)
    return None if index == _INDEX9_NA else index


def _ruuvi5(data: bytes) -> Decoded:
    values = _ruuvi_climate(data)
    for axis, start in (("x", 7), ("y", 9), ("z", 11)):
        values[f"acceleration_{axis}"] = _scaled(_s16(data, start), _INT16_NA, 0.001, 3)
    power = _u(data, 13, 2)
    battery_mv, tx_code = power >> 5, power & 0x1F
    values["battery_voltage"] = (
        None if battery_mv == _BATTERY11_NA else round((battery_mv + 1600) / 1000, 3)
    )
    values["tx_power"] = None if tx_code == _TX_POWER5_NA else -40 + 2 * tx_code
    movement = data[15]
    values["movement_counter"] = None if movement == _UINT8_NA else movement
    sequence = _u(data, 16, 2)
    return Decoded(
        format="ruuvi5",
        values=MappingProxyType(values),
        sequence=None if sequence == _UINT16_NA else sequence,
        sequence_modulo=None if sequence == _UINT16_NA else 0x10000,
        counter=None,
        encrypted=False,
    )


def _ruuvi6(data: bytes) -> Decoded:
    values = _ruuvi_climate(data)
    flags = data[16]
    co2 = _u(data, 9, 2)
    lux_code = data[13]
    values |= {
        "pm2_5": _scaled(_u(data, 7, 2), _UINT16_NA, 0.1, 1),
        "co2": None if co2 == _UINT16_NA else co2,
        "voc_index": _ruuvi_index(data[11], flags, _FLAG_VOC_LSB),
        "nox_index": _ruuvi_index(data[12], flags, _FLAG_NOX_LSB),
        "illuminance": (
            None if lux_code == _UINT8_NA else round(math.exp(lux_code * _LUX_CODE_STEP) - 1, 2)
        ),
        "calibrating": bool(flags & _FLAG_CALIBRATING),
    }
    # Byte 15 has no "not available" value: it is the low byte of E1's 24-bit counter.
    return Decoded(
        format="ruuvi6",
        values=MappingProxyType(values),
        sequence=data[15],
        sequence_modulo=0x100,
        counter=None,
        encrypted=False,
    )


def _ruuvie1(data: bytes) -> Decoded:
    values = _ruuvi_climate(data)
    flags = data[28]
    co2 = _u(data, 15, 2)
    values |= {
        "pm1_0": _scaled(_u(data, 7, 2), _UINT16_NA, 0.1, 1),
        "pm2_5": _scaled(_u(data, 9, 2), _UINT16_NA, 0.1, 1),
        "pm4_0": _scaled(_u(data, 11, 2), _UINT16_NA, 0.1, 1),
        "pm10": _scaled(_u(data, 13, 2), _UINT16_NA, 0.1, 1),
        "co2": None if co2 == _UINT16_NA else co2,
        "voc_index": _ruuvi_index(data[17], flags, _FLAG_VOC_LSB),
        "nox_index": _ruuvi_index(data[18], flags, _FLAG_NOX_LSB),
        "illuminance": _scaled(_u(data, 19, 3), _UINT24_NA, 0.01, 2),
        "calibrating": bool(flags & _FLAG_CALIBRATING),
    }
    sequence = _u(data, 25, 3)
    return Decoded(
        format="ruuvie1",
        values=MappingProxyType(values),
        sequence=None if sequence == _UINT24_NA else sequence,
        sequence_modulo=None if sequence == _UINT24_NA else 0x1000000,
        counter=None,
        encrypted=False,
    )


# --------------------------------------------------------------------------------------------
# Aranet4 (all fields little-endian)
# --------------------------------------------------------------------------------------------

_ARANET4_HEADER_LENGTH: Final = 7  # flags, firmware version, 3 bytes: all old firmware sends
_ARANET4_NAMELESS_LENGTHS: Final = frozenset({_ARANET4_HEADER_LENGTH, 22})
_ARANET4_READINGS_END: Final = 21  # bytes 8-20 hold the readings
_ARANET_FLAG_INTEGRATIONS: Final = 0x20
_ARANET_CALIBRATION_SHIFT: Final = 2
_ARANET_CALIBRATING_STATES: Final = frozenset({1, 2})  # end requested, in progress
_ARANET_CO2_INVALID: Final = 0x8000
_ARANET_TEMPERATURE_INVALID: Final = 0x4000
_ARANET_PRESSURE_INVALID: Final = 0x8000


def _is_aranet4(local_name: str | None, payload: bytes) -> bool:
    """Aranet2, Radiation and Radon share the company id but start with a device type byte
    (1, 2, 3); the Aranet4 payload has none. As Aranet4-Python does: by name when there is
    one, else by the two lengths an Aranet4 sends (passive scans often carry no name)."""
    if local_name and local_name.startswith("Aranet"):
        return local_name.startswith("Aranet4")
    return len(payload) in _ARANET4_NAMELESS_LENGTHS


def decode_aranet4(adv: Advertisement) -> Decoded:
    """Decode Aranet4 manufacturer data (company 0x0702). Raises :class:`NotThisFormat`, with
    the reason, for another Aranet model, for a sensor whose "Smart Home integrations" are off
    and for firmware older than 1.2.0, none of which advertise readings."""
    payload = adv.manufacturer_data.get(ARANET_COMPANY_ID)
    if payload is None:
        raise NotThisFormat("no Aranet manufacturer data (company 0x0702)")
    if not _is_aranet4(adv.local_name, payload):
        raise NotThisFormat(
            f"Aranet advertisement of another model (name {adv.local_name!r}, {len(payload)} bytes)"
        )
    if len(payload) < 4:
        raise DecodeError(f"Aranet4 manufacturer data of {len(payload)} bytes has no header")
    flags = payload[0]
    version = f"v{payload[3]}.{payload[2]}.{payload[1]}"
    if not flags & _ARANET_FLAG_INTEGRATIONS:
        raise NotThisFormat(
            f"Aranet4 {version} advertises no readings: enable 'Smart Home integrations' "
            "in the Aranet app"
        )
    if len(payload) == _ARANET4_HEADER_LENGTH:
        raise NotThisFormat(
            f"Aranet4 {version} advertises no readings: firmware 1.2.0 or later is needed"
        )
    if len(payload) < _ARANET4_READINGS_END:
        raise DecodeError(
            f"Aranet4 manufacturer data of {len(payload)} bytes is truncated: the readings "
            f"end at byte {_ARANET4_READINGS_END}"
        )

    def le16(start: int) -> int:
        return int.from_bytes(payload[start : start + 2], "little")

    co2, temperature, pressure = le16(8), le16(10), le16(12)
    values: dict[str, Value] = {
        "co2": None if co2 & _ARANET_CO2_INVALID else co2,
        "temperature": (
            None if temperature & _ARANET_TEMPERATURE_INVALID else round(temperature * 0.05, 2)
        ),
        "pressure": None if pressure & _ARANET_PRESSURE_INVALID else round(pressure * 0.1, 1),
        "humidity": payload[14],
        "battery": payload[15],
        "calibrating": (
            ((flags >> _ARANET_CALIBRATION_SHIFT) & 0x03) in _ARANET_CALIBRATING_STATES
        ),
        "measurement_interval": le16(17),
        "measurement_age": le16(19),
    }
    return Decoded(
        format="aranet4",
        values=MappingProxyType(values),
        sequence=None,
        sequence_modulo=None,
        counter=None,
        encrypted=False,
    )


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def recognise(adv: Advertisement) -> str | None:
    """The format an advertisement is in, without decoding it (cheap): ``"bthome"``,
    ``"ruuvi5"``, ``"ruuvi6"``, ``"ruuvie1"``, ``"aranet4"`` or ``None``. A recognised
    advertisement may still fail to decode (malformed, encrypted, Aranet4 integrations off)."""
    if BTHOME_UUID in adv.service_data:
        return "bthome"
    ruuvi = adv.manufacturer_data.get(RUUVI_COMPANY_ID)
    if ruuvi:
        name = _RUUVI_FORMATS.get(ruuvi[0])
        if name is not None:
            return name
    aranet = adv.manufacturer_data.get(ARANET_COMPANY_ID)
    if aranet is not None and _is_aranet4(adv.local_name, aranet):
        return "aranet4"
    return None


def decode(adv: Advertisement, *, bthome_key: bytes | None = None) -> Decoded:
    """Decode with the first decoder whose format this is (BTHome, Ruuvi, Aranet4).

    Raises :class:`NotThisFormat` when none is, with each decoder's reason, and the
    :class:`DecodeError` of a decoder whose format it is but which cannot decode it.
    """
    decoders: tuple[Callable[[Advertisement], Decoded], ...] = (
        lambda advert: decode_bthome(advert, key=bthome_key),
        decode_ruuvi,
        decode_aranet4,
    )
    reasons: list[str] = []
    for decoder in decoders:
        try:
            return decoder(adv)
        except NotThisFormat as exc:
            reasons.append(str(exc))
    raise NotThisFormat("; ".join(reasons))
