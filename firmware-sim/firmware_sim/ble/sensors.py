"""Simulated BLE air-quality sensors whose advertisements change, and a fleet that injects them
into a :class:`~firmware_sim.ble.bluez.MockBluez` in batches.

A sensor holds state only (no I/O, no asyncio): ``payload(now)`` takes a new measurement (the
values drift in a bounded random walk, seeded), advances the format's counters (BTHome packet id
and encryption counter, Ruuvi sequence, Aranet "seconds ago") and returns the
:class:`~firmware_sim.ble.bluez.Advertisement` that BlueZ would report. ``now`` is any monotonic
clock in seconds; it also schedules the next advertisement (``next_due``).

Kinds (the ``--kinds`` names of ``python -m firmware_sim ble``):

============  ==========================================================  ===============
kind          what it sends                                               driver format
============  ==========================================================  ===============
bthome        BTHome v2 plain: packet id, battery, T, RH, PM2.5, PM10,     bthome
              CO2, TVOC
bthome-enc    BTHome v2 AES-CCM with a bind key: packet id, battery, T,    bthome
              RH, CO2; counter +1 per advert
ruuvi5        RuuviTag data format 5                                       ruuvi
ruuvi6        Ruuvi Air data format 6 (Bluetooth 4 legacy advertising)     ruuvi
ruuvie1       Ruuvi Air data format E1 (Bluetooth 5 extended advertising)  ruuvi
aranet4       Aranet4, Smart Home integrations on (22 bytes, readings)     aranet4
aranet4-off   Aranet4, integrations off (7 bytes, no readings)             aranet4
============  ==========================================================  ===============
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final, Literal, TypedDict, Unpack

from firmware_sim.ble.bluez import Advertisement, MockBluez
from firmware_sim.ble.encoders import (
    ARANET_COMPANY_ID,
    ARANET_SERVICE_UUID,
    ARANET_STATUS_GREEN,
    ARANET_STATUS_RED,
    ARANET_STATUS_YELLOW,
    BTHOME_SERVICE_UUID,
    RUUVI_COMPANY_ID,
    Aranet4Reading,
    BthomeReading,
    Ruuvi5Reading,
    RuuviAirReading,
    encode_aranet4,
    encode_bthome,
    encode_ruuvi5,
    encode_ruuvi6,
    encode_ruuvi_e1,
)

__all__ = [
    "DEFAULT_KINDS",
    "KINDS",
    "Aranet4NoIntegrationsSensor",
    "Aranet4Sensor",
    "BthomeSensor",
    "EncryptedBthomeSensor",
    "InjectionStats",
    "Ruuvi5Sensor",
    "RuuviAirE1Sensor",
    "RuuviAirSensor",
    "SensorFleet",
    "SensorOptions",
    "SimulatedSensor",
    "make_sensor",
    "make_sensors",
]

TICK_S = 0.1
"""How often the fleet looks for due sensors; all due adverts of a tick go in one D-Bus call."""
RSSI_JITTER_DB = 4


class _Drift:
    """A bounded random walk: each step moves by at most ``step``, reflected at the bounds."""

    def __init__(
        self, rng: random.Random, start: float, low: float, high: float, step: float
    ) -> None:
        self._rng = rng
        self.value = start
        self._low = low
        self._high = high
        self._step = step

    def next(self) -> float:
        value = self.value + self._rng.uniform(-self._step, self._step)
        if value > self._high:
            value = 2 * self._high - value
        if value < self._low:
            value = 2 * self._low - value
        self.value = min(max(value, self._low), self._high)
        return self.value


class SensorOptions(TypedDict, total=False):
    """The keyword arguments every sensor takes."""

    interval_s: float
    """Seconds between advertisements."""
    seed: int
    """Seeds the values' random walk (with the address)."""
    rssi_dbm: int
    """Mean RSSI; each advert jitters it by ±RSSI_JITTER_DB."""
    first_at: float
    """When the first advertisement is due."""


class SimulatedSensor(ABC):
    """A sensor with a MAC address, an advertising interval and drifting values."""

    kind: ClassVar[str]
    driver_format: ClassVar[str]
    """The driver's ``format`` key for this sensor (``bthome``, ``ruuvi``, ``aranet4``)."""
    address_type: ClassVar[Literal["public", "random"]] = "public"

    def __init__(
        self,
        address: str,
        *,
        interval_s: float = 1.0,
        seed: int = 0,
        rssi_dbm: int = -65,
        first_at: float = 0.0,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.address = address.upper()
        self.interval_s = interval_s
        self.rssi_dbm = rssi_dbm
        self.next_due = first_at
        """When the next advertisement is due (same clock as ``now``)."""
        self.adverts_sent = 0
        # Not for secrets: seeded on purpose, so a fleet (bind keys included) is reproducible.
        self._rng = random.Random(f"{seed}:{self.address}")  # noqa: S311
        self._start_values(self._rng)

    @abstractmethod
    def _start_values(self, rng: random.Random) -> None:
        """Sets the initial values and counters (called by the constructor)."""

    def due(self, now: float) -> bool:
        """Whether an advertisement is due at ``now``."""
        return now >= self.next_due

    def payload(self, now: float) -> Advertisement:
        """Takes a new measurement and returns the next advertisement; schedules the next one
        one interval after the previous due time (no drift of the schedule)."""
        advert = self._advertisement(now)
        self.adverts_sent += 1
        self.next_due = max(self.next_due + self.interval_s, now)
        return advert

    def describe(self) -> dict[str, str]:
        """What a configuration needs: address, kind, driver format (and bind key)."""
        return {"address": self.address, "kind": self.kind, "format": self.driver_format}

    def _rssi(self) -> int:
        return self.rssi_dbm + self._rng.randint(-RSSI_JITTER_DB, RSSI_JITTER_DB)

    @abstractmethod
    def _advertisement(self, now: float) -> Advertisement: ...


class BthomeSensor(SimulatedSensor):
    """A BTHome v2 air-quality sensor (plain): every advert is a new measurement with the next
    packet id."""

    kind = "bthome"
    driver_format = "bthome"

    def _start_values(self, rng: random.Random) -> None:
        self.packet_id = rng.randrange(256)
        self._temperature = _Drift(rng, rng.uniform(15, 25), -20.0, 45.0, 0.2)
        self._humidity = _Drift(rng, rng.uniform(35, 65), 5.0, 95.0, 0.5)
        self._co2 = _Drift(rng, rng.uniform(450, 900), 400.0, 5000.0, 25.0)
        self._pm25 = _Drift(rng, rng.uniform(3, 20), 0.0, 500.0, 1.5)
        self._tvoc = _Drift(rng, rng.uniform(50, 300), 0.0, 2000.0, 10.0)
        self._battery = _Drift(rng, rng.uniform(70, 100), 1.0, 100.0, 0.05)

    def reading(self) -> BthomeReading:
        """The next measurement (advances the packet id)."""
        self.packet_id = (self.packet_id + 1) % 256
        pm25 = round(self._pm25.next())
        return BthomeReading(
            packet_id=self.packet_id,
            battery_pct=round(self._battery.next()),
            temperature_c=round(self._temperature.next(), 2),
            humidity_pct=round(self._humidity.next(), 2),
            pm25_ugm3=pm25,
            pm10_ugm3=pm25 + round(self._rng.uniform(0, 8)),
            co2_ppm=round(self._co2.next()),
            tvoc_ugm3=round(self._tvoc.next()),
        )

    def _advertisement(self, now: float) -> Advertisement:
        return Advertisement(
            address=self.address,
            rssi=self._rssi(),
            local_name=f"BTHome {self.address[-5:].replace(':', '')}",
            service_data={BTHOME_SERVICE_UUID: encode_bthome(self.reading())},
            address_type=self.address_type,
        )


class EncryptedBthomeSensor(BthomeSensor):
    """A BTHome v2 sensor with a bind key (AES-CCM); the counter goes up by one per advert."""

    kind = "bthome-enc"

    def __init__(
        self, address: str, *, bind_key: bytes | None = None, **options: Unpack[SensorOptions]
    ) -> None:
        super().__init__(address, **options)
        self.bind_key = bind_key or self._rng.randbytes(16)
        if len(self.bind_key) != 16:
            raise ValueError("a BTHome bind key is 16 bytes")
        self.counter = self._rng.randrange(1_000_000)

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "bind_key": self.bind_key.hex()}

    def _advertisement(self, now: float) -> Advertisement:
        full = self.reading()
        # A smaller object set than the plain sensor: what encrypted thermometers send.
        reading = BthomeReading(
            packet_id=full.packet_id,
            battery_pct=full.battery_pct,
            temperature_c=full.temperature_c,
            humidity_pct=full.humidity_pct,
            co2_ppm=full.co2_ppm,
        )
        self.counter = (self.counter + 1) % 2**32
        payload = encode_bthome(
            reading, bind_key=self.bind_key, address=self.address, counter=self.counter
        )
        return Advertisement(
            address=self.address,
            rssi=self._rssi(),
            local_name=f"BTHome {self.address[-5:].replace(':', '')}",
            service_data={BTHOME_SERVICE_UUID: payload},
            address_type=self.address_type,
        )


class Ruuvi5Sensor(SimulatedSensor):
    """A RuuviTag (data format 5): the sequence number goes up per measurement, the movement
    counter now and then."""

    kind = "ruuvi5"
    driver_format = "ruuvi"
    address_type = "random"

    def _start_values(self, rng: random.Random) -> None:
        self.sequence = rng.randrange(0xFFFF)
        self.movement_counter = rng.randrange(0xFF)
        self._temperature = _Drift(rng, rng.uniform(5, 25), -40.0, 60.0, 0.1)
        self._humidity = _Drift(rng, rng.uniform(40, 80), 0.0, 100.0, 0.3)
        self._pressure = _Drift(rng, rng.uniform(99_000, 102_500), 90_000.0, 110_000.0, 15.0)
        self._battery = _Drift(rng, rng.uniform(2800, 3100), 2000.0, 3300.0, 2.0)

    def reading(self) -> Ruuvi5Reading:
        """The next measurement (advances the sequence number)."""
        self.sequence = (self.sequence + 1) % 0xFFFF
        if self._rng.random() < 0.05:
            self.movement_counter = (self.movement_counter + 1) % 0xFF
        return Ruuvi5Reading(
            temperature_c=round(self._temperature.next(), 3),
            humidity_pct=round(self._humidity.next(), 2),
            pressure_pa=round(self._pressure.next()),
            acceleration_mg=(
                self._rng.randint(-20, 20),
                self._rng.randint(-20, 20),
                1000 + self._rng.randint(-20, 20),
            ),
            battery_mv=round(self._battery.next()),
            tx_power_dbm=4,
            movement_counter=self.movement_counter,
            sequence=self.sequence,
            address=self.address,
        )

    def _advertisement(self, now: float) -> Advertisement:
        return Advertisement(
            address=self.address,
            rssi=self._rssi(),
            manufacturer_data={RUUVI_COMPANY_ID: encode_ruuvi5(self.reading())},
            address_type=self.address_type,
        )


class RuuviAirSensor(SimulatedSensor):
    """A Ruuvi Air. ``formats`` picks what it sends: ``("6",)`` (what a Bluetooth 4 adapter
    hears), ``("e1",)``, or both alternating (``("e1", "6")``, a Bluetooth 5 adapter: BlueZ
    keeps one entry per company id, so ``manufacturer_data[0x0499]`` flips between them)."""

    kind = "ruuvi6"
    driver_format = "ruuvi"
    address_type = "random"

    def __init__(
        self,
        address: str,
        *,
        formats: Sequence[str] = ("6",),
        **options: Unpack[SensorOptions],
    ) -> None:
        unknown = set(formats) - {"6", "e1"}
        if not formats or unknown:
            raise ValueError(f"formats must be taken from '6' and 'e1', got {formats!r}")
        self.formats = tuple(formats)
        super().__init__(address, **options)

    def _start_values(self, rng: random.Random) -> None:
        self.sequence = rng.randrange(0xFFFFFE)
        self._temperature = _Drift(rng, rng.uniform(18, 24), -40.0, 60.0, 0.1)
        self._humidity = _Drift(rng, rng.uniform(30, 60), 0.0, 100.0, 0.3)
        self._pressure = _Drift(rng, rng.uniform(99_000, 102_500), 90_000.0, 110_000.0, 15.0)
        self._pm25 = _Drift(rng, rng.uniform(2, 15), 0.0, 1000.0, 0.8)
        self._co2 = _Drift(rng, rng.uniform(450, 1000), 400.0, 40_000.0, 20.0)
        self._voc = _Drift(rng, rng.uniform(80, 150), 1.0, 500.0, 3.0)
        self._nox = _Drift(rng, rng.uniform(1, 5), 1.0, 500.0, 0.5)
        self._lux = _Drift(rng, rng.uniform(50, 800), 0.0, 60_000.0, 20.0)

    def reading(self) -> RuuviAirReading:
        """The next measurement (advances the 24-bit sequence number)."""
        self.sequence = (self.sequence + 1) % 0xFFFFFF
        pm25 = round(self._pm25.next(), 1)
        return RuuviAirReading(
            temperature_c=round(self._temperature.next(), 3),
            humidity_pct=round(self._humidity.next(), 2),
            pressure_pa=round(self._pressure.next()),
            pm25_ugm3=pm25,
            co2_ppm=round(self._co2.next()),
            voc_index=round(self._voc.next()),
            nox_index=round(self._nox.next()),
            lux=round(self._lux.next(), 2),
            sequence=self.sequence,
            pm1_ugm3=round(pm25 * 0.8, 1),
            pm4_ugm3=round(pm25 * 1.1, 1),
            pm10_ugm3=round(pm25 * 1.2, 1),
            address=self.address,
        )

    def _advertisement(self, now: float) -> Advertisement:
        data_format = self.formats[self.adverts_sent % len(self.formats)]
        reading = self.reading()
        payload = encode_ruuvi_e1(reading) if data_format == "e1" else encode_ruuvi6(reading)
        return Advertisement(
            address=self.address,
            rssi=self._rssi(),
            local_name=f"Ruuvi {self.address[-5:].replace(':', '')}",
            manufacturer_data={RUUVI_COMPANY_ID: payload},
            address_type=self.address_type,
        )


class RuuviAirE1Sensor(RuuviAirSensor):
    """A Ruuvi Air heard through a Bluetooth 5 adapter, sending data format E1 only."""

    kind = "ruuvie1"

    def __init__(
        self,
        address: str,
        *,
        formats: Sequence[str] = ("e1",),
        **options: Unpack[SensorOptions],
    ) -> None:
        super().__init__(address, formats=formats, **options)


class Aranet4Sensor(SimulatedSensor):
    """An Aranet4 (firmware 1.3.5). It measures every ``measurement_interval_s`` and advertises
    much more often; "seconds since the last measurement" changes every advert. With
    ``integrations=False`` it sends the 7-byte payload without readings."""

    kind = "aranet4"
    driver_format = "aranet4"

    def __init__(
        self,
        address: str,
        *,
        integrations: bool = True,
        measurement_interval_s: int = 60,
        **options: Unpack[SensorOptions],
    ) -> None:
        self.integrations = integrations
        self.measurement_interval_s = measurement_interval_s
        super().__init__(address, **options)

    def _start_values(self, rng: random.Random) -> None:
        self._co2 = _Drift(rng, rng.uniform(450, 1200), 400.0, 9999.0, 40.0)
        self._temperature = _Drift(rng, rng.uniform(19, 24), 0.0, 50.0, 0.1)
        self._pressure = _Drift(rng, rng.uniform(990, 1025), 900.0, 1100.0, 0.3)
        self._humidity = _Drift(rng, rng.uniform(30, 60), 0.0, 100.0, 0.5)
        self._battery = _Drift(rng, rng.uniform(60, 100), 1.0, 100.0, 0.05)
        self.measurements = 0
        self._measured_at: float | None = None
        self._reading: Aranet4Reading | None = None

    def _measure(self, now: float) -> Aranet4Reading:
        co2 = round(self._co2.next())
        status = (
            ARANET_STATUS_GREEN
            if co2 < 1000
            else ARANET_STATUS_YELLOW
            if co2 < 1400
            else ARANET_STATUS_RED
        )
        self.measurements += 1
        self._measured_at = now
        return Aranet4Reading(
            co2_ppm=co2,
            temperature_c=round(self._temperature.next() / 0.05) * 0.05,
            pressure_hpa=round(self._pressure.next(), 1),
            humidity_pct=round(self._humidity.next()),
            battery_pct=round(self._battery.next()),
            status=status,
            interval_s=self.measurement_interval_s,
            integrations=self.integrations,
            counter=self.measurements,
        )

    def reading(self, now: float) -> Aranet4Reading:
        """The current reading: a new measurement once per measurement interval, with the
        seconds since it."""
        if (
            self._reading is None
            or self._measured_at is None
            or now - self._measured_at >= self.measurement_interval_s
        ):
            self._reading = self._measure(now)
        assert self._measured_at is not None
        ago = min(max(round(now - self._measured_at), 0), 0xFFFF)
        return dataclasses.replace(self._reading, ago_s=ago)

    def _advertisement(self, now: float) -> Advertisement:
        return Advertisement(
            address=self.address,
            rssi=self._rssi(),
            local_name=f"Aranet4 {self.address[-5:].replace(':', '')}",
            manufacturer_data={ARANET_COMPANY_ID: encode_aranet4(self.reading(now))},
            service_uuids=(ARANET_SERVICE_UUID,),
            address_type=self.address_type,
        )


class Aranet4NoIntegrationsSensor(Aranet4Sensor):
    """An Aranet4 whose "Smart Home integrations" switch is off: no readings on air."""

    kind = "aranet4-off"

    def __init__(
        self,
        address: str,
        *,
        measurement_interval_s: int = 60,
        **options: Unpack[SensorOptions],
    ) -> None:
        super().__init__(
            address,
            integrations=False,
            measurement_interval_s=measurement_interval_s,
            **options,
        )


KINDS: Final[dict[str, type[SimulatedSensor]]] = {
    cls.kind: cls
    for cls in (
        BthomeSensor,
        EncryptedBthomeSensor,
        Ruuvi5Sensor,
        RuuviAirSensor,
        RuuviAirE1Sensor,
        Aranet4Sensor,
        Aranet4NoIntegrationsSensor,
    )
}
DEFAULT_KINDS: Final = ("bthome", "bthome-enc", "ruuvi5", "ruuvi6", "ruuvie1", "aranet4")

_ADDRESS_PREFIXES: Final[dict[str, str]] = {
    # Telink OUI (common for BTHome thermometers); Ruuvi uses random static addresses (top bits
    # 11); the others are arbitrary but fixed so that a printed configuration stays valid.
    "bthome": "A4:C1:38:B0",
    "bthome-enc": "A4:C1:38:E0",
    "ruuvi5": "D5:00:00:50",
    "ruuvi6": "D6:00:00:60",
    "ruuvie1": "E1:00:00:E1",
    "aranet4": "F0:A4:00:40",
    "aranet4-off": "F0:A4:00:00",
}


def make_sensor(
    kind: str, index: int, *, interval_s: float = 1.0, seed: int = 0, first_at: float = 0.0
) -> SimulatedSensor:
    """Sensor ``index`` of a kind, with a stable address (``A4:C1:38:B0:00:07``)."""
    try:
        cls = KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown sensor kind {kind!r}; one of {sorted(KINDS)}") from None
    if not 0 <= index <= 0xFFFF:
        raise ValueError(f"sensor index out of range: {index}")
    address = f"{_ADDRESS_PREFIXES[kind]}:{index >> 8:02X}:{index & 0xFF:02X}"
    return cls(address, interval_s=interval_s, seed=seed, first_at=first_at)


def make_sensors(
    count: int,
    kinds: Sequence[str] = DEFAULT_KINDS,
    *,
    interval_s: float = 1.0,
    seed: int = 0,
    start_at: float = 0.0,
) -> list[SimulatedSensor]:
    """``count`` sensors taking the kinds in turn, their first adverts spread over one
    interval (so 200 sensors every second give 20 adverts per 0.1 s tick, not 200 at once)."""
    if not kinds:
        raise ValueError("no sensor kinds given")
    per_kind: dict[str, int] = {}
    sensors = []
    for number in range(count):
        kind = kinds[number % len(kinds)]
        index = per_kind.get(kind, 0)
        per_kind[kind] = index + 1
        first_at = start_at + interval_s * number / max(count, 1)
        sensors.append(
            make_sensor(kind, index, interval_s=interval_s, seed=seed, first_at=first_at)
        )
    return sensors


@dataclass
class InjectionStats:
    """What the fleet injected and how long the D-Bus calls took."""

    adverts: int = 0
    batches: int = 0
    busy_s: float = 0.0
    started_at: float = 0.0

    @property
    def capacity_per_s(self) -> float:
        """Adverts per second the injector could sustain if it did nothing else: adverts over
        the time spent in D-Bus calls (the mock's work included, since the call returns after
        it has emitted every signal)."""
        return self.adverts / self.busy_s if self.busy_s > 0 else 0.0

    def rate_per_s(self, now: float) -> float:
        """Adverts per second actually injected since ``started_at``."""
        elapsed = now - self.started_at
        return self.adverts / elapsed if elapsed > 0 else 0.0


class SensorFleet:
    """Sensors advertising through one adapter of a mock BlueZ: each tick, every due sensor's
    advert goes in one batched D-Bus call."""

    def __init__(
        self,
        bluez: MockBluez,
        sensors: Sequence[SimulatedSensor],
        *,
        adapter: str = "hci0",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bluez = bluez
        self.sensors = list(sensors)
        self.adapter = adapter
        self.clock = clock
        self.stats = InjectionStats(started_at=clock())

    async def step(self) -> int:
        """Sends every due advert now (one D-Bus call); returns how many."""
        now = self.clock()
        adverts = [sensor.payload(now) for sensor in self.sensors if sensor.due(now)]
        if not adverts:
            return 0
        began = time.perf_counter()
        await self.bluez.advertise_many(self.adapter, adverts)
        self.stats.busy_s += time.perf_counter() - began
        self.stats.adverts += len(adverts)
        self.stats.batches += 1
        return len(adverts)

    async def run(self, *, tick_s: float = TICK_S, duration_s: float | None = None) -> None:
        """Steps every ``tick_s`` until cancelled (or for ``duration_s``)."""
        ends_at = None if duration_s is None else self.clock() + duration_s
        while ends_at is None or self.clock() < ends_at:
            began = self.clock()
            await self.step()
            await asyncio.sleep(max(0.0, tick_s - (self.clock() - began)))
