"""Encoders of the advertisement payloads Lampyre's BLE driver decodes, written from the specs
(bthome.io format and encryption pages, docs.ruuvi.com data formats 5, 6 and E1, Aranet4-Python's
advertisement layout). They are the independent counterpart of the agent's decoders: nothing
here imports ``drivers``.

Each encoder takes physical values and returns the bytes a sensor puts on air, exactly as bleak
hands them over: BTHome service data (``service_data["0000fcd2-…"]``), Ruuvi manufacturer data
after the company id (``manufacturer_data[0x0499]``) and Aranet manufacturer data
(``manufacturer_data[0x0702]``). ``None`` means "not available" and is encoded as the format's
not-available value.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives.ciphers.aead import AESCCM

__all__ = [
    "ARANET_COMPANY_ID",
    "ARANET_SERVICE_UUID",
    "BTHOME_SERVICE_UUID",
    "RUUVI_COMPANY_ID",
    "Aranet4Reading",
    "BthomeReading",
    "Ruuvi5Reading",
    "RuuviAirReading",
    "bthome_nonce",
    "encode_aranet4",
    "encode_bthome",
    "encode_ruuvi5",
    "encode_ruuvi6",
    "encode_ruuvi_e1",
    "mac_bytes",
    "ruuvi_lux_code",
]

BTHOME_SERVICE_UUID: Final = "0000fcd2-0000-1000-8000-00805f9b34fb"
BTHOME_UUID_ON_AIR: Final = b"\xd2\xfc"
BTHOME_VERSION_2: Final = 2 << 5
BTHOME_ENCRYPTED: Final = 0x01
BTHOME_TRIGGER_BASED: Final = 0x04
BTHOME_MIC_BYTES: Final = 4

RUUVI_COMPANY_ID: Final = 0x0499
ARANET_COMPANY_ID: Final = 0x0702
ARANET_SERVICE_UUID: Final = "0000fce0-0000-1000-8000-00805f9b34fb"

RUUVI_TEMPERATURE_STEP_C: Final = 0.005
RUUVI_HUMIDITY_STEP_PCT: Final = 0.0025
RUUVI_PRESSURE_OFFSET_PA: Final = 50_000
RUUVI_BATTERY_OFFSET_MV: Final = 1600
RUUVI_TX_POWER_OFFSET_DBM: Final = -40
RUUVI_LUX_CODE_MAX: Final = 254
"""DF6 light is a logarithmic code: lux = exp(code * ln(65536) / 254) - 1."""
RUUVI_AIR_INDEX_NA: Final = 0x1FF
"""9-bit VOC/NOx index "not available"."""


def mac_bytes(address: str) -> bytes:
    """The 6 address bytes in the order the address is displayed (``54:48:…`` → ``54 48 …``)."""
    raw = bytes.fromhex(address.replace(":", "").replace("-", ""))
    if len(raw) != 6:
        raise ValueError(f"not a Bluetooth address: {address!r}")
    return raw


def _scaled(value: float, step: float) -> int:
    return round(value / step)


def _checked(name: str, raw: int, low: int, high: int) -> int:
    if not low <= raw <= high:
        raise ValueError(f"{name} out of range: raw {raw} not in [{low}, {high}]")
    return raw


# ------------------------------------------------------------------------------------- BTHome


@dataclass(frozen=True)
class BthomeReading:
    """The BTHome v2 objects an air-quality sensor sends; ``None`` objects are left out."""

    packet_id: int | None = None
    battery_pct: int | None = None
    temperature_c: float | None = None
    humidity_pct: float | None = None
    pm25_ugm3: int | None = None
    pm10_ugm3: int | None = None
    co2_ppm: int | None = None
    tvoc_ugm3: int | None = None


def _bthome_objects(reading: BthomeReading) -> bytes:
    # Object ids in ascending order, as the spec requires (receivers stop at an unknown id).
    out = bytearray()
    if reading.packet_id is not None:
        out += struct.pack("<BB", 0x00, _checked("packet id", reading.packet_id, 0, 0xFF))
    if reading.battery_pct is not None:
        out += struct.pack("<BB", 0x01, _checked("battery", reading.battery_pct, 0, 100))
    if reading.temperature_c is not None:
        raw = _checked("temperature", _scaled(reading.temperature_c, 0.01), -0x8000, 0x7FFF)
        out += struct.pack("<Bh", 0x02, raw)
    if reading.humidity_pct is not None:
        raw = _checked("humidity", _scaled(reading.humidity_pct, 0.01), 0, 0xFFFF)
        out += struct.pack("<BH", 0x03, raw)
    for object_id, name, value in (
        (0x0D, "PM2.5", reading.pm25_ugm3),
        (0x0E, "PM10", reading.pm10_ugm3),
        (0x12, "CO2", reading.co2_ppm),
        (0x13, "TVOC", reading.tvoc_ugm3),
    ):
        if value is not None:
            out += struct.pack("<BH", object_id, _checked(name, value, 0, 0xFFFF))
    return bytes(out)


def bthome_nonce(address: str, device_info: int, counter: bytes) -> bytes:
    """The 13-byte AES-CCM nonce of BTHome v2: MAC (display order) + UUID ``D2 FC`` + the
    device-info byte + the 4 counter bytes as transmitted."""
    return mac_bytes(address) + BTHOME_UUID_ON_AIR + bytes([device_info]) + counter


def encode_bthome(
    reading: BthomeReading,
    *,
    bind_key: bytes | None = None,
    address: str | None = None,
    counter: int | None = None,
    trigger_based: bool = False,
) -> bytes:
    """BTHome v2 service data (after the 0xFCD2 UUID). With ``bind_key`` (16 bytes) it is
    encrypted per bthome.io/encryption: AES-CCM, 4-byte MIC, no associated data; ``address`` is
    the sensor's MAC and ``counter`` the uint32 sent little-endian."""
    info = BTHOME_VERSION_2 | (BTHOME_TRIGGER_BASED if trigger_based else 0)
    objects = _bthome_objects(reading)
    if bind_key is None:
        return bytes([info]) + objects
    if address is None or counter is None:
        raise ValueError("an encrypted BTHome payload needs the sensor's address and a counter")
    info |= BTHOME_ENCRYPTED
    counter_bytes = struct.pack("<I", _checked("counter", counter, 0, 0xFFFF_FFFF))
    nonce = bthome_nonce(address, info, counter_bytes)
    sealed = AESCCM(bind_key, tag_length=BTHOME_MIC_BYTES).encrypt(nonce, objects, None)
    ciphertext, mic = sealed[:-BTHOME_MIC_BYTES], sealed[-BTHOME_MIC_BYTES:]
    return bytes([info]) + ciphertext + counter_bytes + mic


# --------------------------------------------------------------------------------------- Ruuvi


def _ruuvi_temperature(value: float | None) -> int:
    if value is None:
        return -0x8000
    return _checked("temperature", _scaled(value, RUUVI_TEMPERATURE_STEP_C), -0x7FFF, 0x7FFF)


def _ruuvi_humidity(value: float | None, high: int = 0xFFFE) -> int:
    if value is None:
        return 0xFFFF
    return _checked("humidity", _scaled(value, RUUVI_HUMIDITY_STEP_PCT), 0, high)


def _ruuvi_pressure(value_pa: int | None) -> int:
    if value_pa is None:
        return 0xFFFF
    return _checked("pressure", value_pa - RUUVI_PRESSURE_OFFSET_PA, 0, 0xFFFE)


def _ruuvi_tenths(name: str, value: float | None, high: int = 0xFFFE) -> int:
    if value is None:
        return 0xFFFF
    return _checked(name, _scaled(value, 0.1), 0, high)


def _ruuvi_unsigned(name: str, value: int | None, high: int, not_available: int) -> int:
    return not_available if value is None else _checked(name, value, 0, high)


def _ruuvi_mac(address: str | None) -> bytes:
    return b"\xff" * 6 if address is None else mac_bytes(address)


@dataclass(frozen=True)
class Ruuvi5Reading:
    """RuuviTag data format 5 (RAWv2) fields."""

    temperature_c: float | None
    humidity_pct: float | None
    pressure_pa: int | None
    acceleration_mg: tuple[int | None, int | None, int | None] = (0, 0, 1000)
    battery_mv: int | None = 3000
    tx_power_dbm: int | None = 4
    movement_counter: int | None = 0
    sequence: int | None = 0
    address: str | None = None
    """The MAC in the payload; None sends the all-ones "not available" MAC."""


def encode_ruuvi5(reading: Ruuvi5Reading) -> bytes:
    """Ruuvi data format 5: 24 bytes, big-endian (manufacturer data of company 0x0499)."""
    acceleration = [
        -0x8000 if axis is None else _checked("acceleration", axis, -0x7FFF, 0x7FFF)
        for axis in reading.acceleration_mg
    ]
    battery = (
        0x7FF
        if reading.battery_mv is None
        else _checked("battery", reading.battery_mv - RUUVI_BATTERY_OFFSET_MV, 0, 0x7FE)
    )
    if reading.tx_power_dbm is None:
        tx_power = 0x1F
    else:
        steps, odd = divmod(reading.tx_power_dbm - RUUVI_TX_POWER_OFFSET_DBM, 2)
        if odd:
            raise ValueError(f"Ruuvi TX power goes in 2 dBm steps: {reading.tx_power_dbm}")
        tx_power = _checked("TX power", steps, 0, 0x1E)
    return struct.pack(
        ">BhHHhhhHBH6s",
        5,
        _ruuvi_temperature(reading.temperature_c),
        _ruuvi_humidity(reading.humidity_pct),
        _ruuvi_pressure(reading.pressure_pa),
        *acceleration,
        battery << 5 | tx_power,
        _ruuvi_unsigned("movement counter", reading.movement_counter, 0xFE, 0xFF),
        _ruuvi_unsigned("sequence", reading.sequence, 0xFFFE, 0xFFFF),
        _ruuvi_mac(reading.address),
    )


@dataclass(frozen=True)
class RuuviAirReading:
    """Ruuvi Air fields, shared by data formats 6 and E1 (format 6 carries only PM2.5)."""

    temperature_c: float | None
    humidity_pct: float | None
    pressure_pa: int | None
    pm25_ugm3: float | None
    co2_ppm: int | None
    voc_index: int | None = None
    nox_index: int | None = None
    lux: float | None = None
    sequence: int | None = 0
    """E1: 24-bit; format 6 sends its low byte."""
    calibrating: bool = False
    pm1_ugm3: float | None = None
    pm4_ugm3: float | None = None
    pm10_ugm3: float | None = None
    address: str | None = None
    other_flags: int = 0
    """Flag bits our notes do not name (format 6: bits 1-5; E1: bits 1-5), sent as given."""


def ruuvi_lux_code(lux: float | None) -> int:
    """The logarithmic 8-bit light code of format 6 (255 = not available)."""
    if lux is None:
        return 0xFF
    if lux < 0:
        raise ValueError(f"lux cannot be negative: {lux}")
    code = round(math.log(lux + 1.0) * RUUVI_LUX_CODE_MAX / math.log(65536))
    return min(code, RUUVI_LUX_CODE_MAX)


def _air_index(name: str, value: int | None) -> int:
    return RUUVI_AIR_INDEX_NA if value is None else _checked(name, value, 0, 500)


def _air_flags(reading: RuuviAirReading, voc: int, nox: int) -> int:
    if reading.other_flags & ~0x3E:
        raise ValueError(f"other_flags may only use bits 1-5: {reading.other_flags:#x}")
    return (1 if reading.calibrating else 0) | reading.other_flags | (voc & 1) << 6 | (nox & 1) << 7


def encode_ruuvi6(reading: RuuviAirReading, *, reserved: int = 0x00) -> bytes:
    """Ruuvi data format 6 (Ruuvi Air, Bluetooth 4 compatible): 20 bytes, big-endian."""
    voc = _air_index("VOC index", reading.voc_index)
    nox = _air_index("NOx index", reading.nox_index)
    sequence = 0xFF if reading.sequence is None else reading.sequence & 0xFF
    return struct.pack(
        ">BhHHHHBBBBBB3s",
        6,
        _ruuvi_temperature(reading.temperature_c),
        _ruuvi_humidity(reading.humidity_pct, high=40_000),
        _ruuvi_pressure(reading.pressure_pa),
        _ruuvi_tenths("PM2.5", reading.pm25_ugm3, high=10_000),
        _ruuvi_unsigned("CO2", reading.co2_ppm, 40_000, 0xFFFF),
        voc >> 1,
        nox >> 1,
        ruuvi_lux_code(reading.lux),
        reserved,
        sequence,
        _air_flags(reading, voc, nox),
        _ruuvi_mac(reading.address)[3:],
    )


def encode_ruuvi_e1(reading: RuuviAirReading, *, reserved: int = 0x00) -> bytes:
    """Ruuvi data format E1 (Ruuvi Air, Bluetooth 5 extended advertising): 40 bytes,
    big-endian."""
    voc = _air_index("VOC index", reading.voc_index)
    nox = _air_index("NOx index", reading.nox_index)
    lux = (
        0xFFFFFF
        if reading.lux is None
        else _checked("lux", _scaled(reading.lux, 0.01), 0, 0xFFFFFE)
    )
    sequence = _ruuvi_unsigned("sequence", reading.sequence, 0xFFFFFE, 0xFFFFFF)
    return (
        struct.pack(
            ">BhHHHHHHHBB",
            0xE1,
            _ruuvi_temperature(reading.temperature_c),
            _ruuvi_humidity(reading.humidity_pct, high=40_000),
            _ruuvi_pressure(reading.pressure_pa),
            _ruuvi_tenths("PM1.0", reading.pm1_ugm3, high=10_000),
            _ruuvi_tenths("PM2.5", reading.pm25_ugm3, high=10_000),
            _ruuvi_tenths("PM4.0", reading.pm4_ugm3, high=10_000),
            _ruuvi_tenths("PM10", reading.pm10_ugm3, high=10_000),
            _ruuvi_unsigned("CO2", reading.co2_ppm, 40_000, 0xFFFF),
            voc >> 1,
            nox >> 1,
        )
        + lux.to_bytes(3, "big")
        + bytes([reserved]) * 3
        + sequence.to_bytes(3, "big")
        + bytes([_air_flags(reading, voc, nox)])
        + bytes([reserved]) * 5
        + _ruuvi_mac(reading.address)
    )


# -------------------------------------------------------------------------------------- Aranet4


ARANET_FLAG_DISCONNECTED: Final = 0x01
ARANET_FLAG_INTEGRATIONS: Final = 0x20
ARANET_STATUS_GREEN: Final = 1
ARANET_STATUS_YELLOW: Final = 2
ARANET_STATUS_RED: Final = 3


@dataclass(frozen=True)
class Aranet4Reading:
    """Aranet4 manufacturer data (company 0x0702; the Aranet4 payload has no device-type
    byte)."""

    co2_ppm: int
    temperature_c: float
    pressure_hpa: float
    humidity_pct: int
    battery_pct: int
    status: int = ARANET_STATUS_GREEN
    interval_s: int = 60
    ago_s: int = 0
    firmware: tuple[int, int, int] = (1, 3, 5)
    """(major, minor, patch); readings are only advertised from 1.2.0 on."""
    integrations: bool = True
    """The app's "Smart Home integrations" switch: off, only 7 bytes and no readings."""
    disconnected: bool = True
    """Flag bit 0 (set in the reference capture)."""
    unknown_4_7: bytes = b"\x00\x05\x00\x01"
    """Bytes 4-7, not decoded by anybody; the reference capture's values by default."""
    counter: int = 0
    """Byte 21 (not described in our notes; it changes between captures)."""


def encode_aranet4(reading: Aranet4Reading) -> bytes:
    """Aranet4 advertisement payload: 22 bytes with integrations on, 7 bytes without."""
    flags = (ARANET_FLAG_DISCONNECTED if reading.disconnected else 0) | (
        ARANET_FLAG_INTEGRATIONS if reading.integrations else 0
    )
    major, minor, patch = reading.firmware
    header = bytes([flags, patch, minor, major])
    if not reading.integrations:
        return header + b"\x00\x00\x00"
    if len(reading.unknown_4_7) != 4:
        raise ValueError("unknown_4_7 must be 4 bytes")
    return (
        header
        + reading.unknown_4_7
        + struct.pack(
            "<HHHBBBHHB",
            _checked("CO2", reading.co2_ppm, 0, 0x7FFF),
            _checked("temperature", _scaled(reading.temperature_c, 0.05), 0, 0x3FFF),
            _checked("pressure", _scaled(reading.pressure_hpa, 0.1), 0, 0x7FFF),
            _checked("humidity", reading.humidity_pct, 0, 100),
            _checked("battery", reading.battery_pct, 0, 100),
            _checked("status", reading.status, 1, 3),
            _checked("interval", reading.interval_s, 0, 0xFFFF),
            _checked("ago", reading.ago_s, 0, 0xFFFF),
            reading.counter & 0xFF,
        )
    )
