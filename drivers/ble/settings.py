"""The BLE driver's configuration keys: bus (one adapter), device (one sensor) and point
tables, validated without I/O; errors name the file and line. Described in
``docs/drivers/ble.md``."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast

from agent.sdk import ConfigTable, PointSpec

__all__ = [
    "BUS_KEYS",
    "DEVICE_KEYS",
    "FORMATS",
    "POINT_KEYS",
    "BusSettings",
    "PointSettings",
    "SensorSettings",
    "normalise_address",
    "parse_bus",
    "parse_point",
    "parse_sensor",
]

BUS_KEYS: Final = (
    "adapter",
    "scanning",
    "silence_restart_s",
    "silence_reset_s",
    "reset_command",
    "reset_timeout_s",
    "start_timeout_s",
    "metrics_interval_s",
)
DEVICE_KEYS: Final = ("address", "format", "bind_key_file", "offline_after_s")
POINT_KEYS: Final = ("quantity",)

FORMATS: Final = ("bthome", "ruuvi", "aranet4")
"""Formats a device may be pinned to; ``ruuvi`` covers data formats 5, 6 and E1."""
SCANNING: Final = ("auto", "active", "passive")
DEVICE_QUANTITIES: Final = ("rssi",)
"""Quantities the driver adds to whatever the advertisement carries."""

DEFAULT_SILENCE_RESTART_S: Final = 90.0
"""No advertisement from anyone for this long: restart the scan (habluetooth's figure)."""
DEFAULT_SILENCE_RESET_S: Final = 120.0
"""Still nothing this long after the restart: run the reset hook, then restart again."""
DEFAULT_START_TIMEOUT_S: Final = 15.0
DEFAULT_RESET_TIMEOUT_S: Final = 30.0
DEFAULT_METRICS_INTERVAL_S: Final = 60.0
DEFAULT_OFFLINE_AFTER_S: Final = 300.0

_ADDRESS = re.compile(r"[0-9A-Fa-f]{2}([:-]?[0-9A-Fa-f]{2}){5}")
_ADAPTER = re.compile(r"hci[0-9]{1,3}")


@dataclass(frozen=True, slots=True)
class BusSettings:
    adapter: str
    scanning: str
    silence_restart_s: float
    silence_reset_s: float
    reset_command: tuple[str, ...]
    reset_timeout_s: float
    start_timeout_s: float
    metrics_interval_s: float


@dataclass(frozen=True, slots=True)
class SensorSettings:
    address: str
    """Upper case with colons, as bleak reports it."""
    format: str | None
    bind_key_file: Path | None
    offline_after_s: float


@dataclass(frozen=True, slots=True)
class PointSettings:
    quantity: str


def normalise_address(text: str) -> str:
    digits = re.sub(r"[^0-9A-Fa-f]", "", text).upper()
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def _seconds(options: ConfigTable, key: str, default: float, minimum: float = 0.1) -> float:
    return cast(float, options.get_float(key, default, minimum=minimum, maximum=86_400.0))


def parse_bus(options: ConfigTable) -> BusSettings:
    """Validate a bus table's BLE keys (one bus = one adapter)."""
    options.check_keys(BUS_KEYS)
    adapter = options.get_str("adapter", "hci0")
    if not _ADAPTER.fullmatch(adapter):
        raise options.error("adapter", f"expected an adapter name like hci0, got {adapter!r}")
    command = options.get_str_list("reset_command", [])
    if command and not command[0].strip():
        raise options.error("reset_command", "expected a program and its arguments")
    restart = _seconds(options, "silence_restart_s", DEFAULT_SILENCE_RESTART_S, 1.0)
    return BusSettings(
        adapter=adapter,
        scanning=options.get_str("scanning", "auto", choices=SCANNING),
        silence_restart_s=restart,
        silence_reset_s=_seconds(options, "silence_reset_s", DEFAULT_SILENCE_RESET_S, 1.0),
        reset_command=tuple(command),
        reset_timeout_s=_seconds(options, "reset_timeout_s", DEFAULT_RESET_TIMEOUT_S),
        start_timeout_s=_seconds(options, "start_timeout_s", DEFAULT_START_TIMEOUT_S),
        metrics_interval_s=_seconds(options, "metrics_interval_s", DEFAULT_METRICS_INTERVAL_S),
    )


def parse_sensor(options: ConfigTable) -> SensorSettings:
    """Validate a device table's BLE keys: the sensor's MAC ``address``, an expected
    ``format``, the ``bind_key_file`` of an encrypted BTHome sensor, ``offline_after_s``."""
    options.check_keys(DEVICE_KEYS)
    address = options.get_str("address")
    if not _ADDRESS.fullmatch(address):
        raise options.error(
            "address", f"expected a MAC address like C4:7C:8D:6A:3E:21, got {address!r}"
        )
    key_file = options.get_str("bind_key_file", None)
    if key_file is not None and not key_file.strip():
        raise options.error("bind_key_file", "expected a file path, got an empty string")
    sensor_format = options.get_str("format", None, choices=FORMATS)
    if key_file is not None and sensor_format not in (None, "bthome"):
        raise options.error("bind_key_file", "only BTHome sensors are encrypted with a bind key")
    return SensorSettings(
        address=normalise_address(address),
        format=sensor_format,
        bind_key_file=(
            None
            if key_file is None
            else Path(os.path.normpath(Path(options.file).parent / Path(key_file).expanduser()))
        ),
        offline_after_s=_seconds(options, "offline_after_s", DEFAULT_OFFLINE_AFTER_S, 1.0),
    )


def parse_point(
    point: PointSpec, unit_of: Callable[[str], str | None], known: frozenset[str]
) -> PointSettings:
    """Validate a profile point: ``quantity`` names a value the formats decode (``unit_of``
    gives its unit; ``known`` are the base names, for the message), or ``rssi``."""
    options = point.options
    options.check_keys(POINT_KEYS)
    quantity = options.get_str("quantity")
    if unit_of(quantity) is None and quantity not in DEVICE_QUANTITIES:
        names = ", ".join(sorted(known | set(DEVICE_QUANTITIES)))
        raise options.error(
            "quantity", f"expected one of {names} (or name_2... for a repeat); got {quantity!r}"
        )
    if point.writable:
        raise options.error(None, "BLE sensors only advertise: expected writable = false")
    return PointSettings(quantity)
