"""The BLE driver: air-quality sensors' advertisements through one long-lived BlueZ scanner
per adapter (bleak), decoded by :mod:`drivers.ble.formats`.

One bus is one adapter. The scanner is started once per connection and never replaced by a
``discover()`` loop. BlueZ is known to stop delivering advertisements without any error, and to
refuse a start or stop with ``InProgress`` / ``NotReady``; so :meth:`BleDriver.run` watches:

- **the adapter**: no advertisement from anyone for ``silence_restart_s`` → the scan is
  restarted (event ``scanner_stalled`` raised, step ``restart``); still nothing
  ``silence_reset_s`` later → the configured reset hook runs (step ``reset``) and the scan is
  restarted again; still nothing → ``BusUnavailable``, and the runtime closes and reconnects
  the bus with backoff (``bus_offline``). The first advertisement clears ``scanner_stalled``.
- **each sensor**: silent for longer than its ``offline_after_s`` → ``device_offline`` (through
  :meth:`DriverContext.device_silent`); its next reading clears it.

A start or stop refused with ``InProgress``/``NotReady`` is "stop, wait, retry". Advertisements
from unknown addresses are counted (metric) and dropped before any decoding; repeated packet ids
or sequences are dropped (:class:`drivers.ble.formats.SequenceFilter`); an encrypted BTHome
sensor whose bind key does not open its frames raises ``decryption_failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from bleak import BleakScanner
from bleak.args.bluez import BlueZScannerArgs, OrPattern
from bleak.assigned_numbers import AdvertisementDataType
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakDBusError, BleakError

from agent.sdk import (
    BusHealth,
    BusSpec,
    BusUnavailable,
    DeviceSpec,
    Driver,
    DriverContext,
    FatalDriverError,
    KeyFileError,
    PointSpec,
    Quality,
    Reading,
    now_ms,
    read_private_file,
)

from . import formats
from .formats import (
    QUANTITIES,
    Advertisement,
    Decoded,
    DecodeError,
    DecryptionFailed,
    EncryptionKeyMissing,
    NotThisFormat,
    SequenceFilter,
    quantity_unit,
)
from .settings import (
    BusSettings,
    SensorSettings,
    parse_bus,
    parse_point,
    parse_sensor,
)

__all__ = ["BleBusHealth", "BleDriver", "load_bind_key"]

logger = logging.getLogger(__name__)

KNOWN_QUANTITIES: Final = frozenset(QUANTITIES)
WATCH_INTERVAL_S: Final = 1.0
"""How often run() checks for silence (of the adapter and of each sensor)."""
START_ATTEMPTS: Final = 4
RETRY_PAUSE_S: Final = 1.5
"""Pause after a start refused with InProgress/NotReady before trying again (habluetooth
waits the same after UnknownObject)."""
STOP_TIMEOUT_S: Final = 5.0
RETRYABLE_BLUEZ_ERRORS: Final = (
    "org.bluez.Error.InProgress",
    "org.bluez.Error.NotReady",
    "org.bluez.Error.Failed",
    "org.freedesktop.DBus.Error.UnknownObject",
)
PASSIVE_PATTERNS: Final = [
    # "Match all devices": every advertisement carrying a Flags AD with one of the usual values
    # (habluetooth's choice). A sensor that sends no Flags AD is invisible in passive mode.
    OrPattern(0, AdvertisementDataType.FLAGS, b"\x06"),
    OrPattern(0, AdvertisementDataType.FLAGS, b"\x1a"),
    OrPattern(0, AdvertisementDataType.FLAGS, b"\x02"),
]
DECODERS: Final[Mapping[str, Callable[..., Decoded]]] = {
    "bthome": formats.decode_bthome,
    "ruuvi": formats.decode_ruuvi,
    "aranet4": formats.decode_aranet4,
}


def load_bind_key(path: Any) -> bytes:
    """A BTHome bind key: 32 hex digits in a file that group and others cannot read.
    Blocking (file I/O). Never includes the key in a message."""
    try:
        text = read_private_file(path, limit=256).decode("ascii", errors="replace").strip()
    except FileNotFoundError:
        raise KeyFileError(f"no bind key file at {path}") from None
    try:
        key = bytes.fromhex(text.replace(":", "").replace(" ", ""))
    except ValueError:
        raise KeyFileError(f"bind key file {path} does not hold hex digits") from None
    if len(key) != 16:
        raise KeyFileError(f"bind key file {path} must hold 16 bytes (32 hex digits)")
    return key


@dataclass(slots=True)
class BleBusHealth(BusHealth):
    """:class:`BusHealth` plus what the scanner saw."""

    scanning_mode: str = ""
    adverts: int = 0
    adverts_per_min: float = 0.0
    ignored: int = 0
    duplicates: int = 0
    decode_errors: int = 0
    scan_restarts: int = 0
    adapter_resets: int = 0

    def as_dict(self) -> dict[str, Any]:
        body = BusHealth.as_dict(self)
        body.update(
            scanning_mode=self.scanning_mode,
            adverts=self.adverts,
            adverts_per_min=self.adverts_per_min,
            ignored=self.ignored,
            duplicates=self.duplicates,
            decode_errors=self.decode_errors,
            scan_restarts=self.scan_restarts,
            adapter_resets=self.adapter_resets,
        )
        return body


@dataclass(slots=True)
class _Sensor:
    device: DeviceSpec
    settings: SensorSettings
    points: list[tuple[PointSpec, str]]
    """(point, quantity) pairs."""
    key: bytes | None = None
    filter: SequenceFilter = field(default_factory=SequenceFilter)
    last_seen: float | None = None
    silent_reported: bool = False
    decrypt_alarm: bool = False
    last: dict[str, Reading] = field(default_factory=dict)


class BleDriver(Driver):
    """BLE advertisement sensors on one adapter. See ``docs/drivers/ble.md``."""

    name = "ble"
    one_transaction_at_a_time = False

    # Configuration-time validation -----------------------------------------------------
    @classmethod
    def validate_bus(cls, bus: BusSpec) -> None:
        parse_bus(bus.options)

    @classmethod
    def validate_point(cls, point: PointSpec) -> None:
        parse_point(point, quantity_unit, KNOWN_QUANTITIES)

    @classmethod
    def validate_device(cls, device: DeviceSpec) -> None:
        parse_sensor(device.options)

    # Lifecycle ---------------------------------------------------------------------------
    def __init__(self, bus: BusSpec, devices: Sequence[DeviceSpec], context: DriverContext) -> None:
        super().__init__(bus, devices, context)
        self.settings: BusSettings = parse_bus(bus.options)
        self._sensors: dict[str, _Sensor] = {}
        for device in devices:
            settings = parse_sensor(device.options)
            points = [
                (spec, parse_point(spec, quantity_unit, KNOWN_QUANTITIES).quantity)
                for spec in device.profile.points.values()
            ]
            if settings.address in self._sensors:
                raise FatalDriverError(
                    f"devices {self._sensors[settings.address].device.id} and {device.id} "
                    f"share the address {settings.address}"
                )
            self._sensors[settings.address] = _Sensor(device, settings, points)
        self._scanner: BleakScanner | None = None
        self._health = BleBusHealth()
        self._mode = ""
        self._last_any: float | None = None
        self._stage = 0
        self._stage_since = 0.0
        self._window_start = time.monotonic()
        self._window_adverts = 0
        self._connected_before = False

    @property
    def _log(self) -> logging.Logger:
        return self.context.logger

    def polled_points(self, device: DeviceSpec) -> Sequence[PointSpec]:
        return []  # everything arrives by advertisement

    async def connect(self) -> None:
        for sensor in self._sensors.values():
            path = sensor.settings.bind_key_file
            if path is not None:
                try:
                    sensor.key = await asyncio.to_thread(load_bind_key, path)
                except KeyFileError as exc:
                    raise BusUnavailable(f"device {sensor.device.id}: {exc}") from None
        self._scanner = await self._start_scanner()
        now = time.monotonic()
        self._stage, self._stage_since = 0, now
        for sensor in self._sensors.values():
            # A sensor never heard yet is timed from its first chance to be heard.
            if sensor.last_seen is None:
                sensor.last_seen = now
        if self._connected_before:
            self._health.reconnects += 1
        self._connected_before = True
        self._health.connected = True
        self._health.last_error = None

    async def close(self) -> None:
        scanner, self._scanner = self._scanner, None
        self._health.connected = False
        if scanner is not None:
            await self._stop_scanner(scanner)

    # Scanner -------------------------------------------------------------------------------
    def _new_scanner(self, mode: str) -> BleakScanner:
        bluez: BlueZScannerArgs = {"adapter": self.settings.adapter}
        if mode == "passive":
            bluez["or_patterns"] = list(PASSIVE_PATTERNS)
        return BleakScanner(self._on_advert, scanning_mode=mode, bluez=bluez)  # type: ignore[arg-type]

    async def _start_scanner(self) -> BleakScanner:
        """A started scanner, or BusUnavailable. ``auto`` tries passive scanning first and
        falls back to active when BlueZ cannot scan passively (it needs BlueZ ≥ 5.56 with
        --experimental and the advertisement monitor API)."""
        mode = "passive" if self.settings.scanning in ("auto", "passive") else "active"
        last_error = "no attempt"
        for attempt in range(1, START_ATTEMPTS + 1):
            scanner = self._new_scanner(mode)
            try:
                async with asyncio.timeout(self.settings.start_timeout_s):
                    await scanner.start()
            except BleakDBusError as exc:
                last_error = f"{exc.dbus_error}: {exc.dbus_error_details or ''}".rstrip(": ")
                self._health.errors += 1
                if exc.dbus_error not in RETRYABLE_BLUEZ_ERRORS:
                    break
                # "Stop, wait, retry": BlueZ may still hold a discovery session.
                self._log.warning(
                    "bus %s: starting the scan on %s failed (%s), attempt %d of %d",
                    self.bus.id,
                    self.settings.adapter,
                    last_error,
                    attempt,
                    START_ATTEMPTS,
                )
                await self._stop_scanner(scanner)
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            except TimeoutError:
                last_error = f"no answer from BlueZ within {self.settings.start_timeout_s:g} s"
                self._health.timeouts += 1
                await self._stop_scanner(scanner)
                continue
            except BleakError as exc:
                last_error = str(exc) or type(exc).__name__
                if mode == "passive" and self.settings.scanning == "auto":
                    self._log.warning(
                        "bus %s: passive scanning is not available on %s (%s); scanning actively",
                        self.bus.id,
                        self.settings.adapter,
                        last_error,
                    )
                    mode = "active"
                    continue
                break
            except (OSError, EOFError) as exc:
                # No system bus, BlueZ not running: nothing a retry here will change.
                last_error = f"cannot reach BlueZ: {exc or type(exc).__name__}"
                break
            self._mode = self._health.scanning_mode = mode
            self._log.info("bus %s: scanning %s on %s", self.bus.id, mode, self.settings.adapter)
            return scanner
        self._health.last_error = last_error
        raise BusUnavailable(f"cannot scan on {self.settings.adapter}: {last_error}")

    async def _stop_scanner(self, scanner: BleakScanner) -> None:
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await scanner.stop()
        except (BleakError, TimeoutError, OSError, EOFError, AttributeError) as exc:
            # Stopping a scan BlueZ already dropped raises InProgress/NotReady; nothing to do.
            self._log.debug("bus %s: stopping the scan: %s", self.bus.id, exc)

    async def _restart_scanner(self) -> None:
        scanner, self._scanner = self._scanner, None
        if scanner is not None:
            await self._stop_scanner(scanner)
        self._scanner = await self._start_scanner()
        self._health.scan_restarts += 1

    # Advertisements ----------------------------------------------------------------------
    def _on_advert(self, device: BLEDevice, data: AdvertisementData) -> None:
        now = time.monotonic()
        self._last_any = now
        self._health.adverts += 1
        self._window_adverts += 1
        if self._stage:
            self._recovered()
        sensor = self._sensors.get(device.address.upper())
        if sensor is None:
            self._health.ignored += 1
            return
        advert = Advertisement(
            address=sensor.settings.address,
            rssi=data.rssi,
            local_name=data.local_name,
            manufacturer_data=data.manufacturer_data,
            service_data=data.service_data,
        )
        try:
            decoded = self._decode(sensor, advert)
        except NotThisFormat as exc:
            self._health.decode_errors += 1
            self._log.debug("device %s: unrecognised advertisement: %s", sensor.device.id, exc)
            return
        except (EncryptionKeyMissing, DecryptionFailed) as exc:
            self._decryption_failed(sensor, str(exc))
            return
        except DecodeError as exc:
            self._health.decode_errors += 1
            self._log.debug("device %s: malformed advertisement: %s", sensor.device.id, exc)
            return
        if sensor.decrypt_alarm:
            sensor.decrypt_alarm = False
            self.context.event(
                "decryption_failed",
                sensor.device.id,
                {"state": "cleared", "address": advert.address},
            )
        if not sensor.filter.accept(decoded, now):
            self._health.duplicates += 1
            return
        sensor.last_seen = now
        sensor.silent_reported = False
        readings = self._readings(sensor, decoded, advert)
        if readings:
            self.context.emit(readings)

    def _decode(self, sensor: _Sensor, advert: Advertisement) -> Decoded:
        expected = sensor.settings.format
        if expected == "bthome":
            return formats.decode_bthome(advert, key=sensor.key)
        if expected is not None:
            return DECODERS[expected](advert)
        return formats.decode(advert, bthome_key=sensor.key)

    def _readings(self, sensor: _Sensor, decoded: Decoded, advert: Advertisement) -> list[Reading]:
        ts = now_ms()
        device_id = sensor.device.id
        readings: list[Reading] = []
        for point, quantity in sensor.points:
            if quantity == "rssi":
                value: Any = advert.rssi
            elif quantity in decoded.values:
                value = decoded.values[quantity]
            else:
                continue  # this advertisement does not carry it (BTHome sends what it has)
            # "Not available" is a value the sensor reports as missing: never a zero.
            quality = Quality.GOOD if value is not None else Quality.BAD
            reading = Reading(device_id, point.name, value, point.unit, ts, quality)
            sensor.last[point.name] = reading
            readings.append(reading)
        return readings

    def _decryption_failed(self, sensor: _Sensor, reason: str) -> None:
        self._health.decode_errors += 1
        if sensor.decrypt_alarm:
            return
        sensor.decrypt_alarm = True
        self._log.warning("device %s: %s", sensor.device.id, reason)
        self.context.event(
            "decryption_failed",
            sensor.device.id,
            {
                "state": "raised",
                "severity": "alarm",
                "address": sensor.settings.address,
                "reason": reason,
            },
        )

    # Watchdog ----------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            now = time.monotonic()
            self._watch_sensors(now)
            self._publish_metrics(now)
            await self._watch_adapter(now)

    def _watch_sensors(self, now: float) -> None:
        for sensor in self._sensors.values():
            last = sensor.last_seen
            if last is None or sensor.silent_reported:
                continue
            silent = now - last
            if silent > sensor.settings.offline_after_s:
                sensor.silent_reported = True
                self.context.device_silent(
                    sensor.device.id,
                    f"no advertisement from {sensor.settings.address} for {silent:.0f} s",
                )

    async def _watch_adapter(self, now: float) -> None:
        heard = max(self._last_any or 0.0, self._stage_since)
        silent = now - heard
        settings = self.settings
        if self._stage == 0 and silent > settings.silence_restart_s:
            self._stalled("restart", silent)
            self._stage, self._stage_since = 1, time.monotonic()
            await self._restart_scanner()
        elif self._stage == 1 and silent > settings.silence_reset_s:
            if settings.reset_command:
                self._stalled("reset", silent)
                await self._reset_adapter()
                self._stage, self._stage_since = 2, time.monotonic()
                await self._restart_scanner()
            else:
                raise BusUnavailable(self._silence_reason(silent))
        elif self._stage == 2 and silent > settings.silence_restart_s:
            raise BusUnavailable(self._silence_reason(silent))

    def _silence_reason(self, silent: float) -> str:
        return (
            f"no advertisement on {self.settings.adapter} for {silent:.0f} s after "
            f"{'a scan restart and an adapter reset' if self._stage == 2 else 'a scan restart'}"
        )

    def _stalled(self, step: str, silent: float) -> None:
        self._log.warning(
            "bus %s: no advertisement on %s for %.0f s: %s",
            self.bus.id,
            self.settings.adapter,
            silent,
            "restarting the scan" if step == "restart" else "resetting the adapter",
        )
        self.context.event(
            "scanner_stalled",
            None,
            {
                "state": "raised" if step == "restart" else "info",
                "severity": "warning",
                "bus": self.bus.id,
                "adapter": self.settings.adapter,
                "step": step,
                "silent_s": round(silent, 1),
            },
        )

    def _recovered(self) -> None:
        self._log.info(
            "bus %s: advertisements flow again on %s", self.bus.id, self.settings.adapter
        )
        self._stage = 0
        self.context.event(
            "scanner_stalled",
            None,
            {"state": "cleared", "bus": self.bus.id, "adapter": self.settings.adapter},
        )

    async def _reset_adapter(self) -> None:
        """Run the configured reset hook (e.g. ``btmgmt --index 0 power off/on`` through a
        small script, or a restart of bluetooth.service). Its failure is logged, not fatal:
        the next step is a reconnection by the runtime anyway."""
        command = self.settings.reset_command
        self._health.adapter_resets += 1
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            self._log.error("bus %s: reset command %s failed: %s", self.bus.id, command[0], exc)
            return
        try:
            async with asyncio.timeout(self.settings.reset_timeout_s):
                _, stderr = await process.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            self._log.error(
                "bus %s: reset command %s did not finish in %g s",
                self.bus.id,
                command[0],
                self.settings.reset_timeout_s,
            )
            return
        if process.returncode != 0:
            self._log.error(
                "bus %s: reset command %s exited with %d: %s",
                self.bus.id,
                command[0],
                process.returncode,
                stderr.decode(errors="replace").strip()[:200],
            )

    def _publish_metrics(self, now: float) -> None:
        elapsed = now - self._window_start
        if elapsed < self.settings.metrics_interval_s:
            return
        rate = self._window_adverts * 60.0 / elapsed
        self._window_start, self._window_adverts = now, 0
        self._health.adverts_per_min = round(rate, 1)
        ts = now_ms()
        self.context.emit(
            [
                Reading(self.bus.id, "adverts_per_min", round(rate, 1), "1/min", ts),
                Reading(self.bus.id, "scan_restarts", self._health.scan_restarts, "", ts),
                Reading(self.bus.id, "adapter_resets", self._health.adapter_resets, "", ts),
            ]
        )

    # I/O -----------------------------------------------------------------------------------
    async def read(self, device: DeviceSpec, points: Sequence[PointSpec]) -> list[Reading]:
        """The latest advertised values (sensors cannot be asked)."""
        sensor = next(s for s in self._sensors.values() if s.device.id == device.id)
        ts = now_ms()
        return [
            sensor.last.get(p.name) or Reading(device.id, p.name, None, p.unit, ts, Quality.BAD)
            for p in points
        ]

    async def write(
        self,
        device: DeviceSpec,
        point: PointSpec,
        value: float | int | bool,
        *,
        fade_s: float | None = None,
    ) -> None:
        raise FatalDriverError("BLE sensors only advertise; nothing can be written")

    def health(self) -> BusHealth:
        return self._health
