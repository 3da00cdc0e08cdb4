"""Per-sensor filter of decoded advertisements: drops repeats of a measurement already
accepted, and encrypted BTHome frames replayed with an old counter.

Sensors repeat each measurement in many advertisements (to be heard at all), and BlueZ reports
an advertisement again whenever its data changes, so the same reading reaches the driver
several times. Pure logic: the caller passes a monotonic time in seconds; one instance per
sensor. Rules (``docs/drivers/ble-formats.md``):

- **BTHome packet id** (8 bits): accepted when 1 to 63 ahead of the last accepted one (modulo
  256), or when more than 4 s have passed since the last accepted frame; otherwise a repeat or
  an older frame arriving late. This is bthome-ble's rule: it assumes fewer than 16 frames a
  second, and lets a sensor whose data does not change still be heard every 4 s.
- **Ruuvi measurement sequence**: the same sequence as the last accepted frame of that format
  is the same measurement. Data format 6 is dropped while E1 arrives from the same sensor
  (within :data:`E1_PREFERRED_FOR_S`): both carry the same measurement, E1 with more fields,
  and Ruuvi's documentation says to discard 6 when E1 is received.
- **Aranet4** (no sequence): a frame whose measurement time (now minus ``measurement_age``) is
  within half a ``measurement_interval`` of the last accepted one is the same measurement.
- **Encrypted BTHome counter**: a frame whose counter is not above the last authenticated
  counter is a replay and is rejected, unless its counter is below :data:`COUNTER_RESET_BELOW`
  and below the last one (the sensor restarted, or the 32-bit counter wrapped). A frame with
  the same counter as the last is always rejected. Only frames that the decoder authenticated
  (MIC checked) reach the filter, so every counter it sees was produced with the bind key.
  A captured frame with a counter below 100 can therefore be replayed after the sensor has sent
  a higher one: the price of accepting a sensor's restart without a new key, as bthome-ble does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from .formats import Decoded

__all__ = [
    "BTHOME_AHEAD_WINDOW",
    "BTHOME_SAME_PACKET_AFTER_S",
    "COUNTER_RESET_BELOW",
    "E1_PREFERRED_FOR_S",
    "ReplayGuard",
    "SequenceFilter",
]

BTHOME_AHEAD_WINDOW: Final = 63
"""A BTHome packet id 1..63 ahead (modulo 256) of the last accepted one is a new frame."""
BTHOME_SAME_PACKET_AFTER_S: Final = 4.0
"""After this long without an accepted frame, any BTHome packet id is accepted."""
COUNTER_RESET_BELOW: Final = 100
"""An encrypted BTHome counter below this, and below the last one, is taken as a restart."""
E1_PREFERRED_FOR_S: Final = 30.0
"""Ruuvi data format 6 is dropped for this long after the sensor's last E1 frame."""


@dataclass(slots=True)
class SequenceFilter:
    """Duplicate and replay filter for one sensor (see the module documentation for the rules).

    :meth:`accept` says whether a decoded frame is new; :attr:`last_rejection` says why the
    last refused one was refused (for logs and counters; it never holds secrets).
    """

    last_rejection: str | None = None
    _last_sequence: dict[str, int] = field(default_factory=dict)
    _last_accepted_s: dict[str, float] = field(default_factory=dict)
    _last_counter: int | None = None
    _last_e1_s: float | None = None
    _last_measured_at_s: float | None = None

    def accept(self, decoded: Decoded, now_s: float) -> bool:
        """True if ``decoded`` is a new measurement of this sensor, received at ``now_s``
        (monotonic seconds); False for a repeat, a late older frame or a replayed one."""
        self.last_rejection = self._rejection(decoded, now_s)
        if self.last_rejection is not None:
            return False
        self._remember(decoded, now_s)
        return True

    def _rejection(self, decoded: Decoded, now_s: float) -> str | None:
        # Also records what a frame teaches even when it is refused: an authenticated newer
        # counter, and that the sensor sends E1.
        if decoded.encrypted and decoded.counter is not None:
            refused = self._check_counter(decoded.counter)
            if refused is not None:
                return refused
        if decoded.format == "ruuvie1":
            self._last_e1_s = now_s
        elif (
            decoded.format == "ruuvi6"
            and self._last_e1_s is not None
            and now_s - self._last_e1_s <= E1_PREFERRED_FOR_S
        ):
            return "Ruuvi data format 6 while the sensor sends E1"
        if decoded.sequence is not None:
            return self._check_sequence(decoded, now_s)
        if decoded.format == "aranet4":
            return self._check_measurement_time(decoded, now_s)
        return None

    def _check_counter(self, counter: int) -> str | None:
        last = self._last_counter
        if last is None or counter > last or (counter < COUNTER_RESET_BELOW and counter < last):
            # Authenticated and newer (or a restart): remember it even if the frame turns out
            # to repeat a packet id, so that a later replay of this very frame is refused.
            self._last_counter = counter
            return None
        if counter == last:
            return f"encrypted frame {counter} repeated"
        return f"encrypted frame counter {counter} is below the last one ({last}): replay"

    def _check_sequence(self, decoded: Decoded, now_s: float) -> str | None:
        assert decoded.sequence is not None  # the caller checked
        last = self._last_sequence.get(decoded.format)
        if last is None:
            return None
        if decoded.format == "bthome":
            modulo = decoded.sequence_modulo or 256
            ahead = (decoded.sequence - last) % modulo
            elapsed = now_s - self._last_accepted_s.get(decoded.format, now_s)
            if 1 <= ahead <= BTHOME_AHEAD_WINDOW or elapsed > BTHOME_SAME_PACKET_AFTER_S:
                return None
            return f"packet id {decoded.sequence} repeats or precedes {last}"
        if decoded.sequence == last:
            return f"measurement sequence {last} already accepted"
        return None

    def _check_measurement_time(self, decoded: Decoded, now_s: float) -> str | None:
        age = decoded.values.get("measurement_age")
        interval = decoded.values.get("measurement_interval")
        previous = self._last_measured_at_s
        if (
            previous is None
            or not isinstance(age, int)
            or not isinstance(interval, int)
            or interval <= 0
        ):
            return None
        if abs((now_s - age) - previous) < interval / 2:
            return "same measurement as the last accepted one (measurement time)"
        return None

    def _remember(self, decoded: Decoded, now_s: float) -> None:
        if decoded.sequence is not None:
            self._last_sequence[decoded.format] = decoded.sequence
        self._last_accepted_s[decoded.format] = now_s
        age = decoded.values.get("measurement_age")
        if decoded.format == "aranet4" and isinstance(age, int):
            self._last_measured_at_s = now_s - age


ReplayGuard = SequenceFilter
"""The same filter, under the name that says what it does for encrypted BTHome sensors."""
