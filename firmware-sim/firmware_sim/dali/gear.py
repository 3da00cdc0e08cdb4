"""Simulated DALI control gear: IEC 62386-102 behaviour, DT6 (part 207, LED) and the D4i memory
banks (DiiA parts 251, 252 and 253), for the commands a street-lighting gateway uses.

A :class:`ControlGear` is pure state. It knows nothing of interfaces, pseudo-terminals or
asyncio: :meth:`ControlGear.receive` takes one forward frame with its time on the line and
returns the backward frame the gear would send, or ``None``. The line
(:class:`firmware_sim.dali.line.DaliLine`) delivers every frame to every gear, as a real bus
does, and each gear decides whether it is addressed.

Frames are decoded with python-dali (``dali.command.Command.from_frame``), not with Lampyre's
own codec: the agent's encoder and this simulator are two independent readings of the
standard, so a mistake in one shows up as a disagreement in the tests.

Time is *line time* in seconds, read from a clock the line provides (:meth:`bind_clock`). The
line runs it at ``1 / time_scale`` of real time, so fades, counters and the 15-minute
INITIALISE window all shrink together in fast tests. Physical quantities (energy, operating
time, temperature) are integrated lazily whenever the gear's state changes or is read, so no
background task is needed.
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from dali import address as dali_address  # type: ignore[import-untyped, unused-ignore]
from dali import frame as dali_frame  # type: ignore[import-untyped, unused-ignore]
from dali.command import Command as DaliCommand  # type: ignore[import-untyped, unused-ignore]
from dali.gear import general as g102  # type: ignore[import-untyped, unused-ignore]
from dali.gear import led as g207  # type: ignore[import-untyped, unused-ignore]

__all__ = [
    "DEVICE_TYPE_LED",
    "INITIALISE_WINDOW_S",
    "MASK",
    "SEND_TWICE_MAX_GAP_S",
    "SEND_TWICE_MIN_GAP_S",
    "YES",
    "ControlGear",
    "InitialisationState",
    "LampFault",
    "arc_power_percent",
    "decode_frame",
]

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

MASK: Final = 0xFF
YES: Final = 0xFF
LEVEL_MAX: Final = 254
DEVICE_TYPE_LED: Final = 6
NO_DEVICE_TYPE: Final = 254
"""QUERY NEXT DEVICE TYPE's answer once every device type has been listed."""
VERSION_2_0: Final = 0x08
"""Version numbers are encoded major << 2 | minor: DALI-2 (2.0) is 0x08."""
LIGHT_SOURCE_LED: Final = 6

# Timings, in line seconds (shrunk by the line's time scale like everything else).
INITIALISE_WINDOW_S = 15 * 60.0
"""INITIALISE opens the addressing commands for 15 minutes (IEC 62386-102)."""
SEND_TWICE_MIN_GAP_S = 0.0024
SEND_TWICE_MAX_GAP_S = 0.094
"""A configuration command runs only when the same frame arrives again, with no frame in
between, 2.4 to 94 ms after the end of the first (IEC 62386-101:2022 Table 20)."""
UP_DOWN_FADE_S = 0.2
"""UP and DOWN fade at the fade rate for 200 ms."""
FADE_INTEGRATION_STEPS = 16
"""Energy over a fade is integrated in this many steps (the level changes along the way)."""

# Physics of the simulated LED driver.
THERMAL_RISE_C = 30.0
"""Gear temperature above ambient at rated power."""
THERMAL_TIME_CONSTANT_S = 600.0
LED_STRING_VOLTAGE_V = 36.0
SUPPLY_VOLTAGE_V = 230.0
SUPPLY_FREQUENCY_HZ = 50
POWER_FACTOR = 0.95

_EXTENDED_FADE_MULTIPLIER_S: Final = (0.0, 0.1, 1.0, 10.0, 60.0)
_DEFAULT_GTIN: Final = 0x0_4012_3456_7890  # six bytes, an arbitrary test value


class InitialisationState(enum.Enum):
    """Where the gear is in the addressing procedure (IEC 62386-102 ``initialisationState``)."""

    DISABLED = "disabled"
    ENABLED = "enabled"
    WITHDRAWN = "withdrawn"


class LampFault(enum.Enum):
    """What :meth:`ControlGear.fail_lamp` breaks, as the DT6 failure status bit it sets."""

    SHORT_CIRCUIT = 0
    OPEN_CIRCUIT = 1
    THERMAL_SHUTDOWN = 5


def arc_power_percent(level: int, *, linear: bool = False) -> float:
    """Light output in percent for an arc power level 0..254 on the standard logarithmic
    curve (level 1 = 0.1 %, 254 = 100 %), or on the DT6 linear curve."""
    if not 0 <= level <= LEVEL_MAX:
        raise ValueError(f"arc power level must be 0..254, got {level}")
    if level == 0:
        return 0.0
    if linear:
        return level * 100.0 / LEVEL_MAX
    return float(10 ** ((level - 1) / (253 / 3) - 1))


@functools.lru_cache(maxsize=4096)
def decode_frame(frame: int, device_type: int = 0) -> Any:
    """python-dali's decoding of a 16-bit forward frame (a ``dali.command.Command``; an
    ``UnknownGearCommand`` for reserved frames). ``device_type`` is the one enabled by the
    ENABLE DEVICE TYPE just before; it only changes the meaning of opcodes 0xE0..0xFF.
    Cached: a line of 64 gear decodes each frame once, not 64 times."""
    return DaliCommand.from_frame(dali_frame.ForwardFrame(16, frame), devicetype=device_type)


def _is_extended_opcode(frame: int) -> bool:
    """An addressed command with an application extended opcode (0xE0..0xFF)."""
    address_byte = frame >> 8
    addressed = address_byte <= 0x9F or address_byte >= 0xFC
    return addressed and bool(address_byte & 1) and (frame & 0xFF) >= 0xE0


def _fade_time_s(fade_time: int) -> float:
    """FADE TIME n (1..15): T = 0.5 * sqrt(2^n) seconds."""
    return 0.5 * math.sqrt(2**fade_time)


def _fade_rate_steps_per_s(fade_rate: int) -> float:
    """FADE RATE n (1..15): 506 / sqrt(2^n) steps per second."""
    return 506 / math.sqrt(2**fade_rate)


def _put(table: dict[int, int], first: int, length: int, value: int) -> None:
    """Store ``value`` big-endian in ``length`` bytes, saturating below TMASK/MASK (the two
    top values of every D4i field mean "temporarily unavailable" and "not available")."""
    top = (1 << (8 * length)) - 3
    clamped = max(0, min(int(value), top))
    for i, byte in enumerate(clamped.to_bytes(length, "big")):
        table[first + i] = byte


class _Bank:
    """One memory bank: its last address, whether it latches or locks, and where a write to a
    location is accepted (``writable``)."""

    def __init__(self, last: int, *, latch: bool, lock: bool, writable: range | None) -> None:
        self.last = last
        self.latch = latch
        self.lock = lock
        self.writable = writable
        self.lock_byte = 0xFF
        self.snapshot: dict[int, int] | None = None
        self.stored: dict[int, int] = {}
        """Bytes written over the bus (bank 1), on top of the computed contents."""


class ControlGear:
    """One DALI control gear (an LED driver, device type 6, with the D4i banks).

    Construction does no I/O and draws the 24-bit random ("long") address from a seeded RNG,
    as if the gear had been randomised before; RANDOMISE draws new ones from the same RNG.

    Fault injection: :meth:`fail_lamp` / :meth:`repair_lamp` (lamp failure, DT6 failure bits,
    bank 206 flags and counters; QUERY ACTUAL LEVEL answers MASK meanwhile),
    :attr:`gear_failed` (the control gear failure bit), :meth:`kill` / :meth:`revive` (a dead
    gear hears nothing and answers nothing), :meth:`mains_off` / :meth:`mains_on` (the cabinet
    switches the lamp circuit; powering up again behaves like a real power cycle).

    Ground truth for tests: :attr:`frames_received` (frames delivered while powered),
    :attr:`executed` (command names this gear acted on or answered, by python-dali class name).
    """

    def __init__(
        self,
        *,
        short_address: int | None = None,
        groups: Iterable[int] = (),
        random_address: int | None = None,
        seed: int | None = None,
        device_types: Sequence[int] = (DEVICE_TYPE_LED,),
        d4i: bool = True,
        rated_power_w: float = 60.0,
        physical_min_level: int = 1,
        level: int = LEVEL_MAX,
        ambient_c: float = 15.0,
        energy_wh: float = 0.0,
        operating_time_s: float = 0.0,
        light_on_time_s: float = 0.0,
        gear_starts: int = 1,
        light_starts: int = 0,
        gtin: int = _DEFAULT_GTIN,
        luminaire_id: int | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if short_address is not None and not 0 <= short_address <= 63:
            raise ValueError(f"short address must be 0..63 or None, got {short_address}")
        group_list = list(groups)
        if any(not 0 <= g <= 15 for g in group_list):
            raise ValueError(f"groups must be 0..15, got {group_list}")
        if not device_types or any(not 0 <= t <= 253 for t in device_types):
            raise ValueError(f"device types must be 0..253, got {device_types}")
        if not 1 <= physical_min_level <= LEVEL_MAX:
            raise ValueError(f"physical minimum must be 1..254, got {physical_min_level}")
        if not 0 <= level <= LEVEL_MAX:
            raise ValueError(f"level must be 0..254, got {level}")
        if rated_power_w <= 0:
            raise ValueError(f"rated power must be positive, got {rated_power_w}")
        self._rng = random.Random(seed)  # noqa: S311 - DALI random addresses, not security
        if random_address is None:
            random_address = self._rng.getrandbits(24)
        if not 0 <= random_address <= 0xFFFFFF:
            raise ValueError(f"random address must be 24 bits, got {random_address:#x}")
        self._clock = clock

        # Identity and configuration (non-volatile in a real gear).
        self.random_address = random_address
        self.short_address = short_address
        self.group_mask = sum(1 << g for g in set(group_list))
        self.scenes = [MASK] * 16
        self.device_types = tuple(sorted(set(device_types)))
        self.d4i = d4i
        self.rated_power_w = rated_power_w
        self.physical_min_level = physical_min_level
        self.min_level = physical_min_level
        self.max_level = LEVEL_MAX
        self.power_on_level = LEVEL_MAX
        self.system_failure_level = LEVEL_MAX
        self.fade_time = 0
        self.fade_rate = 7
        self.extended_fade_time = 0
        self.dimming_curve = 0
        self.gtin = gtin
        self.luminaire_id = luminaire_id if luminaire_id is not None else self._rng.getrandbits(48)
        self.identification = self._rng.getrandbits(63)
        self.ambient_c = ambient_c

        # Faults.
        self.gear_failed = False
        self.led_failure_status = 0
        self._dead = False
        self._mains = True

        # Volatile state.
        self.dtr0 = 0
        self.dtr1 = 0
        self.dtr2 = 0
        self.search_address = 0xFFFFFF
        self._initialisation = InitialisationState.DISABLED
        self._initialise_until = 0.0
        self._write_enabled = False
        self._enabled_device_type = 0
        self._next_device_type: int | None = None
        self._last_frame: int | None = None
        self._last_frame_end = -math.inf
        self._armed_twice = False
        self.limit_error = False
        self.power_cycle_seen = True
        self.identifying = False

        # Arc power: a fade from ``_from`` at ``_t0`` to ``_to`` at ``_t1``.
        now = self._clock()
        self._from = self._to = level
        self._t0 = self._t1 = now
        self.last_active_level = level if level > 0 else LEVEL_MAX

        # Counters and physics, integrated up to ``_t_counted``.
        self._t_counted = now
        self.energy_wh = energy_wh
        self.operating_time_s = operating_time_s
        self.light_on_time_s = light_on_time_s
        self.light_on_time_resettable_s = light_on_time_s
        self.gear_starts = gear_starts
        self.light_starts = light_starts
        self.light_starts_resettable = light_starts
        self.temperature_c = ambient_c + THERMAL_RISE_C * self._power_fraction(level)
        self.failure_counts: Counter[str] = Counter()

        self._banks = self._make_banks()

        # Ground truth.
        self.frames_received = 0
        self.executed: Counter[str] = Counter()

    def __repr__(self) -> str:
        short = "-" if self.short_address is None else str(self.short_address)
        return f"ControlGear(short={short}, random={self.random_address:#08x})"

    # ------------------------------------------------------------------------------------------
    # Time and state seen from outside
    # ------------------------------------------------------------------------------------------
    def bind_clock(self, clock: Clock) -> None:
        """Use ``clock`` (line seconds) from now on; the line calls this when the gear joins
        it. Levels and counters are carried over at the current time."""
        self._advance(self._clock())
        offset = clock() - self._clock()
        self._t0 += offset
        self._t1 += offset
        self._t_counted += offset
        self._initialise_until += offset
        self._last_frame_end += offset
        self._clock = clock

    @property
    def powered(self) -> bool:
        """Alive and on mains: only then does the gear hear frames and answer."""
        return self._mains and not self._dead

    @property
    def dead(self) -> bool:
        return self._dead

    @property
    def lamp_failed(self) -> bool:
        return bool(self.led_failure_status & _LAMP_FAILURE_BITS)

    @property
    def groups(self) -> frozenset[int]:
        return frozenset(g for g in range(16) if self.group_mask >> g & 1)

    @property
    def initialisation(self) -> InitialisationState:
        self._expire_initialisation(self._clock())
        return self._initialisation

    @property
    def actual_level(self) -> int:
        """The arc power level the gear is at now (0 when unpowered), fade included. It is
        what the gear would answer to QUERY ACTUAL LEVEL but for a lamp failure (MASK)."""
        return self._level_at(self._clock()) if self.powered else 0

    @property
    def target_level(self) -> int:
        return self._to

    @property
    def fade_running(self) -> bool:
        return self.powered and self._clock() < self._t1

    @property
    def power_w(self) -> float:
        """Active power drawn by the lamp now (rated power times the light output)."""
        return self._power_at(self._level_at(self._clock()))

    def counters(self) -> dict[str, float]:
        """Energy and the D4i counters, brought up to date."""
        self._advance(self._clock())
        return {
            "energy_wh": self.energy_wh,
            "operating_time_s": self.operating_time_s,
            "light_on_time_s": self.light_on_time_s,
            "gear_starts": self.gear_starts,
            "light_starts": self.light_starts,
            "temperature_c": self.temperature_c,
        }

    # ------------------------------------------------------------------------------------------
    # Fault injection and power
    # ------------------------------------------------------------------------------------------
    def fail_lamp(self, fault: LampFault = LampFault.OPEN_CIRCUIT) -> None:
        """The light source fails: lamp failure bit, DT6 failure status bit, bank 206 flags
        and counters. The gear keeps its level but the lamp gives no light and draws no power."""
        self._advance(self._clock())
        logger.debug("%r: lamp fails (%s)", self, fault.name)
        bit = 1 << fault.value
        if not self.led_failure_status & bit:
            self.failure_counts[fault.name.lower()] += 1
            if not self.lamp_failed:
                self.failure_counts["light_overall"] += 1
        self.led_failure_status |= bit

    def repair_lamp(self) -> None:
        """The light source works again; failure counters keep their counts."""
        self._advance(self._clock())
        logger.debug("%r: lamp repaired", self)
        lit_before = self._lit(self._level_at(self._clock()))
        self.led_failure_status = 0
        if not lit_before and self._lit(self._level_at(self._clock())):
            self._count_light_start()

    def set_gear_failed(self, failed: bool) -> None:
        """The control gear failure bit (QUERY STATUS bit 0, QUERY CONTROL GEAR FAILURE)."""
        if failed and not self.gear_failed:
            self.failure_counts["gear_overall"] += 1
        self.gear_failed = failed

    def kill(self) -> None:
        """The gear dies: it hears nothing and answers nothing; its lamp goes dark."""
        self._advance(self._clock())
        logger.debug("%r: dies", self)
        self._dead = True

    def revive(self) -> None:
        """A dead gear comes back, as after a power cycle."""
        if self._dead:
            self._dead = False
            if self._mains:
                self._power_up()

    def mains_off(self) -> None:
        """The cabinet switches the lamp circuit off: the gear is unpowered and silent."""
        self._advance(self._clock())
        self._mains = False

    def mains_on(self) -> None:
        """The circuit comes back: the gear powers up at POWER ON LEVEL, with the power
        cycle bit set and its volatile state (DTRs aside) reset."""
        if not self._mains:
            self._mains = True
            if not self._dead:
                self._power_up()

    def bus_power_lost(self) -> None:
        """The DALI bus lost its power (or is shorted). The gear, still on mains, goes to
        SYSTEM FAILURE LEVEL (unless MASK) and forgets its volatile bus state."""
        if not self.powered:
            return
        now = self._clock()
        self._advance(now)
        if self.system_failure_level != MASK:
            self._set_level(self._clamp(self.system_failure_level), now, count_arc=False)
        self._reset_volatile()

    def bus_power_restored(self) -> None:
        """Bus power is back; the gear stays where the failure put it (IEC 62386-102)."""
        self._reset_volatile()

    def _power_up(self) -> None:
        now = self._clock()
        self._advance(now)
        self.gear_starts += 1
        self._reset_volatile()
        self.power_cycle_seen = True
        self.limit_error = False
        level = self.power_on_level
        if level == MASK:
            level = self.last_active_level
        self._from = self._to = 0
        self._t0 = self._t1 = now
        self._set_level(self._clamp(level), now, count_arc=False)

    def _reset_volatile(self) -> None:
        self._initialisation = InitialisationState.DISABLED
        self.search_address = 0xFFFFFF
        self._write_enabled = False
        self._enabled_device_type = 0
        self._next_device_type = None
        self._last_frame = None
        self._armed_twice = False
        self.identifying = False
        for bank in self._banks.values():
            bank.snapshot = None
            bank.lock_byte = 0xFF

    # ------------------------------------------------------------------------------------------
    # The bus
    # ------------------------------------------------------------------------------------------
    def receive(self, frame: int, *, start: float, end: float, bits: int = 16) -> int | None:
        """One forward frame on the line, sent from ``start`` to ``end`` (line seconds); the
        gear acts at ``end``. Returns the backward frame (0..255) or ``None`` for no answer.

        Every frame goes to every gear: the gear decides whether it is addressed. A frame
        that is not 16 bits (a 24-bit control device frame) is not for gear, but it still
        breaks a send-twice pair."""
        if not self.powered:
            return None
        self.frames_received += 1
        previous, previous_end = self._last_frame, self._last_frame_end
        armed, self._armed_twice = self._armed_twice, False
        self._last_frame, self._last_frame_end = (frame if bits == 16 else None), end
        device_type, self._enabled_device_type = self._enabled_device_type, 0
        if bits != 16:
            return None
        now = end
        self._expire_initialisation(now)
        command = decode_frame(frame, device_type if _is_extended_opcode(frame) else 0)
        if not isinstance(command, _KEEPS_WRITE_ENABLE):
            # Any other frame on the bus ends write enable, addressed to this gear or not, so
            # a memory write must follow its ENABLE WRITE MEMORY without interleaving.
            self._write_enabled = False
        handler = _HANDLERS.get(type(command))
        if handler is None:
            return None
        destination = getattr(command, "destination", None)
        if destination is not None and not self._addressed(destination):
            return None
        if type(command).__module__ == g207.__name__ and DEVICE_TYPE_LED not in self.device_types:
            return None
        if command.sendtwice:
            gap = start - previous_end
            paired = (
                armed and previous == frame and SEND_TWICE_MIN_GAP_S <= gap <= SEND_TWICE_MAX_GAP_S
            )
            if not paired:
                # The first of a pair: wait for its twin (DT6 commands keep their enable).
                self._armed_twice = True
                self._enabled_device_type = device_type
                return None
        if not isinstance(command, _KEEPS_DEVICE_TYPE_LIST):
            self._next_device_type = None
        self.executed[type(command).__name__] += 1
        return handler(self, command, now)

    def _addressed(self, destination: Any) -> bool:
        if isinstance(destination, dali_address.GearShort):
            return bool(destination.address == self.short_address)
        if isinstance(destination, dali_address.GearGroup):
            return bool(self.group_mask >> destination.group & 1)
        if isinstance(destination, dali_address.GearBroadcastUnaddressed):
            return self.short_address is None
        return isinstance(destination, dali_address.GearBroadcast)

    def _expire_initialisation(self, now: float) -> None:
        if (
            self._initialisation is not InitialisationState.DISABLED
            and now > self._initialise_until
        ):
            self._initialisation = InitialisationState.DISABLED

    # ------------------------------------------------------------------------------------------
    # Arc power
    # ------------------------------------------------------------------------------------------
    def _level_at(self, t: float) -> int:
        if t >= self._t1:
            return self._to
        if t <= self._t0:
            return self._from
        # A lamp switched on by a fade lights at MIN LEVEL; one faded off goes out at the end.
        start = self._from or self.min_level
        stop = self._to or self.min_level
        return round(start + (stop - start) * (t - self._t0) / (self._t1 - self._t0))

    def _clamp(self, level: int) -> int:
        if level == 0:
            return 0
        return max(self.min_level, min(self.max_level, level))

    def _fade_duration_s(self) -> float:
        if self.fade_time:
            return _fade_time_s(self.fade_time)
        base = (self.extended_fade_time & 0x0F) + 1
        multiplier = self.extended_fade_time >> 4
        if multiplier >= len(_EXTENDED_FADE_MULTIPLIER_S):
            return 0.0
        return base * _EXTENDED_FADE_MULTIPLIER_S[multiplier]

    def _arc_command(self, level: int, now: float, *, fade_s: float | None = None) -> None:
        """An arc power command to ``level`` (0 or 1..254, not yet clamped)."""
        self.power_cycle_seen = False
        self.limit_error = level != 0 and not self.min_level <= level <= self.max_level
        target = self._clamp(level)
        duration = self._fade_duration_s() if fade_s is None else fade_s
        current = self._level_at(now)
        if duration <= 0 or current == target:
            self._set_level(target, now)
            return
        self._advance(now)
        if current == 0 and target > 0:
            self._count_light_start()
        self._from, self._to, self._t0, self._t1 = current, target, now, now + duration
        if target > 0:
            self.last_active_level = target

    def _set_level(self, level: int, now: float, *, count_arc: bool = True) -> None:
        """Go to ``level`` at once (no fade)."""
        self._advance(now)
        if count_arc:
            self.power_cycle_seen = False
        if self._level_at(now) == 0 and level > 0:
            self._count_light_start()
        self._from = self._to = level
        self._t0 = self._t1 = now
        if level > 0:
            self.last_active_level = level

    def _stop_fade(self, now: float) -> None:
        self._advance(now)
        level = self._level_at(now)
        self._from = self._to = level
        self._t0 = self._t1 = now

    def _count_light_start(self) -> None:
        if not self.lamp_failed:
            self.light_starts += 1
            self.light_starts_resettable += 1

    # ------------------------------------------------------------------------------------------
    # Physics and counters
    # ------------------------------------------------------------------------------------------
    def _lit(self, level: int) -> bool:
        return self.powered and level > 0 and not self.lamp_failed

    def _power_fraction(self, level: int) -> float:
        return arc_power_percent(level, linear=self.dimming_curve == 1) / 100.0

    def _power_at(self, level: int) -> float:
        return self.rated_power_w * self._power_fraction(level) if self._lit(level) else 0.0

    def _advance(self, now: float) -> None:
        """Integrate energy, times and temperature from the last update to ``now``."""
        t = self._t_counted
        if now <= t:
            return
        fade_from, fade_to = max(t, self._t0), min(now, self._t1)
        if fade_from < fade_to:
            if t < fade_from:
                self._accumulate(t, fade_from, self._level_at(t))
            step = (fade_to - fade_from) / FADE_INTEGRATION_STEPS
            for i in range(FADE_INTEGRATION_STEPS):
                a = fade_from + i * step
                self._accumulate(a, a + step, self._level_at(a + step / 2))
            if fade_to < now:
                self._accumulate(fade_to, now, self._level_at(now))
        else:
            self._accumulate(t, now, self._level_at(now if now >= self._t1 else t))
        self._t_counted = now

    def _accumulate(self, a: float, b: float, level: int) -> None:
        dt = b - a
        power = self._power_at(level)
        if self.powered:
            self.operating_time_s += dt
            self.energy_wh += power * dt / 3600.0
            if self._lit(level):
                self.light_on_time_s += dt
                self.light_on_time_resettable_s += dt
        target = self.ambient_c + THERMAL_RISE_C * power / self.rated_power_w
        self.temperature_c = target + (self.temperature_c - target) * math.exp(
            -dt / THERMAL_TIME_CONSTANT_S
        )

    # ------------------------------------------------------------------------------------------
    # Status
    # ------------------------------------------------------------------------------------------
    def status(self) -> int:
        """The QUERY STATUS byte (bit 0 gear failure … bit 7 power cycle seen)."""
        now = self._clock()
        level = self._level_at(now)
        bits = [
            self.gear_failed,
            self.lamp_failed,
            self._lit(level),
            self.limit_error,
            now < self._t1,
            self.in_reset_state,
            self.short_address is None,
            self.power_cycle_seen,
        ]
        return sum(1 << i for i, bit in enumerate(bits) if bit)

    @property
    def in_reset_state(self) -> bool:
        """Every resettable variable holds its RESET value (short address aside)."""
        return (
            self.power_on_level == LEVEL_MAX
            and self.system_failure_level == LEVEL_MAX
            and self.min_level == self.physical_min_level
            and self.max_level == LEVEL_MAX
            and self.fade_rate == 7
            and self.fade_time == 0
            and self.extended_fade_time == 0
            and self.random_address == 0xFFFFFF
            and self.search_address == 0xFFFFFF
            and self.group_mask == 0
            and all(s == MASK for s in self.scenes)
        )

    def _reset(self, now: float) -> None:
        self.power_on_level = self.system_failure_level = LEVEL_MAX
        self.min_level = self.physical_min_level
        self.max_level = LEVEL_MAX
        self.fade_rate, self.fade_time, self.extended_fade_time = 7, 0, 0
        self.search_address = self.random_address = 0xFFFFFF
        self.group_mask = 0
        self.scenes = [MASK] * 16
        self.dimming_curve = 0
        self.limit_error = False
        self._set_level(LEVEL_MAX, now)
        self.last_active_level = LEVEL_MAX

    # ------------------------------------------------------------------------------------------
    # Memory banks
    # ------------------------------------------------------------------------------------------
    def _make_banks(self) -> dict[int, _Bank]:
        banks = {
            0: _Bank(0x1A, latch=False, lock=False, writable=None),
            1: _Bank(0x77, latch=False, lock=True, writable=range(0x03, 0x78)),
        }
        if self.d4i:
            banks[202] = _Bank(0x0F, latch=True, lock=False, writable=None)
            banks[205] = _Bank(0x1C, latch=True, lock=True, writable=None)
            banks[206] = _Bank(0x20, latch=True, lock=True, writable=None)
        return banks

    def memory_bank(self, number: int) -> dict[int, int] | None:
        """The live contents of a bank (location → byte), ``None`` if not implemented. Reads
        over the bus come from a latched snapshot instead while the bank is latched."""
        bank = self._banks.get(number)
        if bank is None:
            return None
        now = self._clock()
        self._advance(now)
        table: dict[int, int] = {0x00: bank.last}
        if bank.latch or bank.lock:
            table[0x02] = bank.lock_byte
        builder = _BANK_BUILDERS[number]
        builder(self, table, now)
        table.update(bank.stored)
        return table

    def _bank_0(self, table: dict[int, int], now: float) -> None:
        table[0x02] = max(self._banks)
        _put(table, 0x03, 6, self.gtin)
        table[0x09], table[0x0A] = 1, 4  # firmware version 1.4
        _put(table, 0x0B, 8, self.identification)
        table[0x13], table[0x14] = 2, 0  # hardware version 2.0
        table[0x15] = table[0x16] = VERSION_2_0  # parts 101 and 102
        table[0x17] = MASK  # no part 103 (control device) inside
        table[0x18], table[0x19], table[0x1A] = 0, 1, 0  # one logical gear, index 0

    def _bank_1(self, table: dict[int, int], now: float) -> None:
        _put(table, 0x03, 6, self.gtin + 1)
        _put(table, 0x09, 8, self.luminaire_id)
        table[0x11], table[0x12] = 0x00, 0x03  # content format: DiiA part 251 v1.1
        table[0x13], table[0x14] = 24, 17  # 2024, week 17
        _put(table, 0x15, 2, round(self.rated_power_w))
        _put(table, 0x17, 2, round(self.rated_power_w * 0.1))
        _put(table, 0x19, 2, 198)
        _put(table, 0x1B, 2, 264)
        _put(table, 0x1D, 3, round(self.rated_power_w * 140))  # 140 lm/W
        table[0x20] = 70  # CRI
        _put(table, 0x21, 2, 3000)  # CCT in K
        table[0x23] = MASK
        for i in range(0x24, 0x3C):
            table[i] = 0x00
        text = b"Lampyre simulated luminaire"
        for i in range(0x3C, 0x78):
            table[i] = text[i - 0x3C] if i - 0x3C < len(text) else 0x00

    def _bank_202(self, table: dict[int, int], now: float) -> None:
        table[0x03] = 1  # bank version
        table[0x04] = 0  # energy in Wh (10^0)
        _put(table, 0x05, 6, math.floor(self.energy_wh))
        table[0x0B] = 0xFF  # power in 0.1 W (10^-1, signed)
        _put(table, 0x0C, 4, round(self._power_at(self._level_at(now)) * 10))

    def _bank_205(self, table: dict[int, int], now: float) -> None:
        level = self._level_at(now)
        table[0x03] = 1
        _put(table, 0x04, 4, math.floor(self.operating_time_s))
        _put(table, 0x08, 3, self.gear_starts)
        _put(table, 0x0B, 2, round(SUPPLY_VOLTAGE_V * 10))
        table[0x0D] = SUPPLY_FREQUENCY_HZ
        table[0x0E] = round(POWER_FACTOR * 100)
        table[0x0F] = int(self.gear_failed)
        table[0x10] = min(self.failure_counts["gear_overall"], 0xFD)
        for location in range(0x11, 0x1B):
            table[location] = 0  # no supply, limitation or thermal events simulated
        table[0x1B] = max(0, min(round(self.temperature_c) + 60, 0xFD))
        lit = self._lit(level)
        table[0x1C] = round(self._power_fraction(level) * 100) if lit else 0

    def _bank_206(self, table: dict[int, int], now: float) -> None:
        level = self._level_at(now)
        lit = self._lit(level)
        table[0x03] = 1
        _put(table, 0x04, 3, self.light_starts_resettable)
        _put(table, 0x07, 3, self.light_starts)
        _put(table, 0x0A, 4, math.floor(self.light_on_time_resettable_s))
        _put(table, 0x0E, 4, math.floor(self.light_on_time_s))
        _put(table, 0x12, 2, round(LED_STRING_VOLTAGE_V * 10) if lit else 0)
        current_ma = self._power_at(level) / LED_STRING_VOLTAGE_V * 1000
        _put(table, 0x14, 2, round(current_ma))
        counts = self.failure_counts
        flags = (
            (0x16, self.lamp_failed, counts["light_overall"]),
            (0x18, self._led_bit(LampFault.SHORT_CIRCUIT), counts["short_circuit"]),
            (0x1A, self._led_bit(LampFault.OPEN_CIRCUIT), counts["open_circuit"]),
            (0x1C, False, 0),
            (0x1E, self._led_bit(LampFault.THERMAL_SHUTDOWN), counts["thermal_shutdown"]),
        )
        for location, flag, count in flags:
            table[location] = int(flag)
            table[location + 1] = min(count, 0xFD)
        table[0x20] = max(0, min(round(self.temperature_c) + 5 + 60, 0xFD))

    def _led_bit(self, fault: LampFault) -> bool:
        return bool(self.led_failure_status >> fault.value & 1)

    def _read_memory(self) -> int | None:
        bank = self._banks.get(self.dtr1)
        if bank is None:
            return None
        location = self.dtr0
        contents = bank.snapshot if bank.snapshot is not None else self.memory_bank(self.dtr1)
        if location < 0xFF:
            self.dtr0 = location + 1
        if contents is None or location > bank.last:
            return None
        if location == 0x02 and bank.snapshot is not None:
            return bank.lock_byte
        return contents.get(location)

    def _write_memory(self, value: int) -> int | None:
        """WRITE MEMORY LOCATION: the byte written, or ``None`` if refused."""
        if not self._write_enabled:
            return None
        bank = self._banks.get(self.dtr1)
        if bank is None:
            return None
        location = self.dtr0
        if location < 0xFF:
            self.dtr0 = location + 1
        if location == 0x02 and (bank.latch or bank.lock):
            bank.lock_byte = value
            # 0xAA latches a snapshot of the whole bank for consistent multi-byte reads.
            bank.snapshot = None
            if bank.latch and value == 0xAA:
                bank.snapshot = self.memory_bank(self.dtr1)
            return value
        unlocked = not bank.lock or bank.lock_byte == 0x55
        if bank.writable is None or location not in bank.writable or not unlocked:
            return None
        bank.stored[location] = value
        return value


_LAMP_FAILURE_BITS: Final = sum(1 << fault.value for fault in LampFault)

_KEEPS_WRITE_ENABLE: Final = (
    g102.EnableWriteMemory,
    g102.WriteMemoryLocation,
    g102.WriteMemoryLocationNoReply,
    g102.DTR0,
    g102.DTR1,
    g102.DTR2,
    g102.QueryContentDTR0,
    g102.QueryContentDTR1,
    g102.QueryContentDTR2,
)
_KEEPS_DEVICE_TYPE_LIST: Final = (g102.QueryDeviceType, g102.QueryNextDeviceType)


# ----------------------------------------------------------------------------------------------
# Command handlers: (gear, python-dali command, line time) → backward frame or None
# ----------------------------------------------------------------------------------------------
Handler = Callable[[ControlGear, Any, float], int | None]


def _yes(condition: bool) -> int | None:
    return YES if condition else None


def _arc(level: Callable[[ControlGear, Any], int | None], *, fade: bool = True) -> Handler:
    """An arc power command going to ``level(gear, command)`` (``None``: nothing to do)."""

    def handle(gear: ControlGear, command: Any, now: float) -> None:
        target = level(gear, command)
        gear.power_cycle_seen = False
        if target is not None:
            gear._arc_command(target, now, fade_s=None if fade else 0.0)

    return handle


def _dapc(gear: ControlGear, command: Any, now: float) -> None:
    gear.power_cycle_seen = False
    if command.power == MASK:
        gear._stop_fade(now)  # DAPC(MASK) stops a running fade where it is
    else:
        gear._arc_command(command.power, now)


def _up_down(direction: int) -> Handler:
    def handle(gear: ControlGear, command: Any, now: float) -> None:
        gear.power_cycle_seen = False
        current = gear._level_at(now)
        if current == 0:
            return  # UP and DOWN never switch a lamp on or off
        steps = round(_fade_rate_steps_per_s(gear.fade_rate) * UP_DOWN_FADE_S)
        target = max(gear.min_level, min(gear.max_level, current + direction * max(steps, 1)))
        gear._arc_command(target, now, fade_s=UP_DOWN_FADE_S)

    return handle


def _step_down_and_off(gear: ControlGear, command: Any, now: float) -> None:
    current = gear._level_at(now)
    gear._set_level(0 if current <= gear.min_level else current - 1, now)


def _on_and_step_up(gear: ControlGear, command: Any, now: float) -> None:
    current = gear._level_at(now)
    gear._set_level(gear.min_level if current == 0 else min(gear.max_level, current + 1), now)


def _step(direction: int) -> Handler:
    def handle(gear: ControlGear, command: Any, now: float) -> None:
        current = gear._level_at(now)
        gear.power_cycle_seen = False
        if current > 0:
            gear._set_level(max(gear.min_level, min(gear.max_level, current + direction)), now)

    return handle


def _continuous(direction: int) -> Handler:
    def handle(gear: ControlGear, command: Any, now: float) -> None:
        gear.power_cycle_seen = False
        current = gear._level_at(now)
        if current == 0:
            return
        target = gear.max_level if direction > 0 else gear.min_level
        duration = abs(target - current) / _fade_rate_steps_per_s(gear.fade_rate)
        gear._arc_command(target, now, fade_s=duration)

    return handle


def _reset(gear: ControlGear, command: Any, now: float) -> None:
    gear._reset(now)


def _store_actual_level(gear: ControlGear, command: Any, now: float) -> None:
    gear.dtr0 = gear._level_at(now)


def _set_max_level(gear: ControlGear, command: Any, now: float) -> None:
    gear.max_level = max(gear.min_level, min(gear.dtr0, LEVEL_MAX))
    current = gear._level_at(now)
    if current > gear.max_level or gear.target_level > gear.max_level:
        # A lamp above the new limit, or fading past it, is brought down to it at once.
        gear._set_level(min(current, gear.max_level), now, count_arc=False)


def _set_min_level(gear: ControlGear, command: Any, now: float) -> None:
    gear.min_level = max(gear.physical_min_level, min(gear.dtr0, gear.max_level))
    current = gear._level_at(now)
    if 0 < current < gear.min_level or 0 < gear.target_level < gear.min_level:
        gear._set_level(max(current, gear.min_level), now, count_arc=False)


def _setter(attribute: str, convert: Callable[[int], int | None] = lambda v: v) -> Handler:
    """A configuration command storing ``convert(DTR0)`` (``None``: ignore the command)."""

    def handle(gear: ControlGear, command: Any, now: float) -> None:
        value = convert(gear.dtr0)
        if value is not None:
            setattr(gear, attribute, value)

    return handle


def _set_scene(gear: ControlGear, command: Any, now: float) -> None:
    gear.scenes[command.param] = gear.dtr0


def _remove_from_scene(gear: ControlGear, command: Any, now: float) -> None:
    gear.scenes[command.param] = MASK


def _add_to_group(gear: ControlGear, command: Any, now: float) -> None:
    gear.group_mask |= 1 << command.param


def _remove_from_group(gear: ControlGear, command: Any, now: float) -> None:
    gear.group_mask &= ~(1 << command.param)


def _short_address_from(value: int) -> int | bool | None:
    """0xFF deletes (``None``), 0AAAAAA1 sets, anything else is ignored (``False``)."""
    if value == MASK:
        return None
    if value & 0x81 == 0x01:
        return value >> 1
    return False


def _set_short_address(gear: ControlGear, command: Any, now: float) -> None:
    new = _short_address_from(gear.dtr0)
    if new is not False:
        gear.short_address = new


def _enable_write_memory(gear: ControlGear, command: Any, now: float) -> None:
    gear._write_enabled = True


def _reset_memory_bank(gear: ControlGear, command: Any, now: float) -> None:
    if gear.dtr0 in (0, 206) and 206 in gear._banks:
        gear._advance(now)
        gear.light_starts_resettable = 0
        gear.light_on_time_resettable_s = 0.0


def _nothing(gear: ControlGear, command: Any, now: float) -> None:
    return None


def _identify(gear: ControlGear, command: Any, now: float) -> None:
    gear.identifying = True


def _query_device_type(gear: ControlGear, command: Any, now: float) -> int:
    gear._next_device_type = 0
    types = gear.device_types
    return types[0] if len(types) == 1 else MASK


def _query_next_device_type(gear: ControlGear, command: Any, now: float) -> int | None:
    index = gear._next_device_type
    if index is None:
        return None  # only right after QUERY DEVICE TYPE or QUERY NEXT DEVICE TYPE
    types = gear.device_types if len(gear.device_types) > 1 else ()
    gear._next_device_type = index + 1
    return types[index] if index < len(types) else NO_DEVICE_TYPE


def _query_actual_level(gear: ControlGear, command: Any, now: float) -> int:
    return MASK if gear.lamp_failed else gear._level_at(now)


# Special commands --------------------------------------------------------------------------------


def _terminate(gear: ControlGear, command: Any, now: float) -> None:
    gear._initialisation = InitialisationState.DISABLED
    gear.identifying = False


def _dtr(register: str) -> Handler:
    def handle(gear: ControlGear, command: Any, now: float) -> None:
        setattr(gear, register, command.param)

    return handle


def _initialise(gear: ControlGear, command: Any, now: float) -> None:
    param = command.param
    reacts = (
        param == 0x00
        or (param == 0xFF and gear.short_address is None)
        or (param & 0x81 == 0x01 and param >> 1 == gear.short_address)
    )
    if reacts:
        gear._initialisation = InitialisationState.ENABLED
        gear._initialise_until = now + INITIALISE_WINDOW_S


def _initialising(gear: ControlGear) -> bool:
    return gear._initialisation is not InitialisationState.DISABLED


def _randomise(gear: ControlGear, command: Any, now: float) -> None:
    if _initialising(gear):
        gear.random_address = gear._rng.getrandbits(24)


def _compare(gear: ControlGear, command: Any, now: float) -> int | None:
    enabled = gear._initialisation is InitialisationState.ENABLED
    return _yes(enabled and gear.random_address <= gear.search_address)


def _withdraw(gear: ControlGear, command: Any, now: float) -> None:
    enabled = gear._initialisation is InitialisationState.ENABLED
    if enabled and gear.random_address == gear.search_address:
        gear._initialisation = InitialisationState.WITHDRAWN


def _search_address(shift: int) -> Handler:
    def handle(gear: ControlGear, command: Any, now: float) -> None:
        if _initialising(gear):
            mask = 0xFF << shift
            gear.search_address = (gear.search_address & ~mask) | (command.param << shift)

    return handle


def _selected(gear: ControlGear) -> bool:
    return _initialising(gear) and gear.random_address == gear.search_address


def _program_short_address(gear: ControlGear, command: Any, now: float) -> None:
    new = _short_address_from(command.param)
    if _selected(gear) and new is not False:
        gear.short_address = new


def _verify_short_address(gear: ControlGear, command: Any, now: float) -> int | None:
    new = _short_address_from(command.param)
    return _yes(_initialising(gear) and new is not False and new == gear.short_address)


def _query_short_address(gear: ControlGear, command: Any, now: float) -> int | None:
    if not _selected(gear):
        return None
    return MASK if gear.short_address is None else gear.short_address << 1 | 1


def _enable_device_type(gear: ControlGear, command: Any, now: float) -> None:
    gear._enabled_device_type = command.param


def _write_memory_location(reply: bool) -> Handler:
    def handle(gear: ControlGear, command: Any, now: float) -> int | None:
        written = gear._write_memory(command.param)
        return written if reply else None

    return handle


def _led_query(fault_bit: int) -> Handler:
    def handle(gear: ControlGear, command: Any, now: float) -> int | None:
        return _yes(bool(gear.led_failure_status >> fault_bit & 1))

    return handle


def _constant(value: int | None) -> Handler:
    def handle(gear: ControlGear, command: Any, now: float) -> int | None:
        return value

    return handle


def _select_dimming_curve(gear: ControlGear, command: Any, now: float) -> None:
    if gear.dtr0 in (0, 1):
        gear._advance(now)
        gear.dimming_curve = gear.dtr0


def _q(value: Callable[[ControlGear], int | bool | None]) -> Handler:
    """A query answering ``value(gear)``: a bool is YES / no answer, an int is the byte."""

    def handle(gear: ControlGear, command: Any, now: float) -> int | None:
        result = value(gear)
        if isinstance(result, bool):
            return _yes(result)
        return result

    return handle


_HANDLERS: Final[dict[type, Handler]] = {
    # Arc power (IEC 62386-102 Table 15)
    g102.DAPC: _dapc,
    g102.Off: _arc(lambda g, c: 0, fade=False),
    g102.Up: _up_down(+1),
    g102.Down: _up_down(-1),
    g102.StepUp: _step(+1),
    g102.StepDown: _step(-1),
    g102.RecallMaxLevel: _arc(lambda g, c: g.max_level, fade=False),
    g102.RecallMinLevel: _arc(lambda g, c: g.min_level, fade=False),
    g102.StepDownAndOff: _step_down_and_off,
    g102.OnAndStepUp: _on_and_step_up,
    g102.EnableDAPCSequence: _nothing,
    g102.GoToLastActiveLevel: _arc(lambda g, c: g.last_active_level),
    g102.ContinuousUp: _continuous(+1),
    g102.ContinuousDown: _continuous(-1),
    g102.GoToScene: _arc(lambda g, c: None if g.scenes[c.param] == MASK else g.scenes[c.param]),
    # Configuration (all sent twice)
    g102.Reset: _reset,
    g102.StoreActualLevelInDTR0: _store_actual_level,
    g102.SavePersistentVariables: _nothing,
    g102.SetOperatingMode: _nothing,
    g102.ResetMemoryBank: _reset_memory_bank,
    g102.IdentifyDevice: _identify,
    g102.SetMaxLevel: _set_max_level,
    g102.SetMinLevel: _set_min_level,
    g102.SetSystemFailureLevel: _setter("system_failure_level"),
    g102.SetPowerOnLevel: _setter("power_on_level"),
    g102.SetFadeTime: _setter("fade_time", lambda v: min(v, 15)),
    g102.SetFadeRate: _setter("fade_rate", lambda v: max(1, min(v, 15))),
    g102.SetExtendedFadeTime: _setter("extended_fade_time", lambda v: 0 if v > 0x4F else v),
    g102.SetScene: _set_scene,
    g102.RemoveFromScene: _remove_from_scene,
    g102.AddToGroup: _add_to_group,
    g102.RemoveFromGroup: _remove_from_group,
    g102.SetShortAddress: _set_short_address,
    g102.EnableWriteMemory: _enable_write_memory,
    # Queries
    g102.QueryStatus: _q(lambda g: g.status()),
    g102.QueryControlGearPresent: _constant(YES),
    g102.QueryLampFailure: _q(lambda g: g.lamp_failed),
    g102.QueryLampPowerOn: _q(lambda g: g._lit(g._level_at(g._clock()))),
    g102.QueryLimitError: _q(lambda g: g.limit_error),
    g102.QueryResetState: _q(lambda g: g.in_reset_state),
    g102.QueryMissingShortAddress: _q(lambda g: g.short_address is None),
    g102.QueryVersionNumber: _constant(VERSION_2_0),
    g102.QueryContentDTR0: _q(lambda g: g.dtr0),
    g102.QueryDeviceType: _query_device_type,
    g102.QueryPhysicalMinimum: _q(lambda g: g.physical_min_level),
    g102.QueryPowerFailure: _q(lambda g: g.power_cycle_seen),
    g102.QueryContentDTR1: _q(lambda g: g.dtr1),
    g102.QueryContentDTR2: _q(lambda g: g.dtr2),
    g102.QueryOperatingMode: _constant(0),
    g102.QueryLightSourceType: _constant(LIGHT_SOURCE_LED),
    g102.QueryActualLevel: _query_actual_level,
    g102.QueryMaxLevel: _q(lambda g: g.max_level),
    g102.QueryMinLevel: _q(lambda g: g.min_level),
    g102.QueryPowerOnLevel: _q(lambda g: g.power_on_level),
    g102.QuerySystemFailureLevel: _q(lambda g: g.system_failure_level),
    g102.QueryFadeTimeFadeRate: _q(lambda g: g.fade_time << 4 | g.fade_rate),
    g102.QueryManufacturerSpecificMode: _constant(None),
    g102.QueryNextDeviceType: _query_next_device_type,
    g102.QueryExtendedFadeTime: _q(lambda g: g.extended_fade_time),
    g102.QueryControlGearFailure: _q(lambda g: g.gear_failed),
    g102.QuerySceneLevel: lambda g, c, now: g.scenes[c.param],
    g102.QueryGroupsZeroToSeven: _q(lambda g: g.group_mask & 0xFF),
    g102.QueryGroupsEightToFifteen: _q(lambda g: g.group_mask >> 8),
    g102.QueryRandomAddressH: _q(lambda g: g.random_address >> 16),
    g102.QueryRandomAddressM: _q(lambda g: g.random_address >> 8 & 0xFF),
    g102.QueryRandomAddressL: _q(lambda g: g.random_address & 0xFF),
    g102.ReadMemoryLocation: lambda g, c, now: g._read_memory(),
    # Special commands (Table 16): heard by every gear
    g102.Terminate: _terminate,
    g102.DTR0: _dtr("dtr0"),
    g102.DTR1: _dtr("dtr1"),
    g102.DTR2: _dtr("dtr2"),
    g102.Initialise: _initialise,
    g102.Randomise: _randomise,
    g102.Compare: _compare,
    g102.Withdraw: _withdraw,
    g102.Ping: _nothing,
    g102.SearchaddrH: _search_address(16),
    g102.SearchaddrM: _search_address(8),
    g102.SearchaddrL: _search_address(0),
    g102.ProgramShortAddress: _program_short_address,
    g102.VerifyShortAddress: _verify_short_address,
    g102.QueryShortAddress: _query_short_address,
    g102.EnableDeviceType: _enable_device_type,
    g102.WriteMemoryLocation: _write_memory_location(reply=True),
    g102.WriteMemoryLocationNoReply: _write_memory_location(reply=False),
    # Device type 6, LED (part 207), after ENABLE DEVICE TYPE 6
    g207.ReferenceSystemPower: _nothing,
    g207.EnableCurrentProtector: _nothing,
    g207.DisableCurrentProtector: _nothing,
    g207.SelectDimmingCurve: _select_dimming_curve,
    g207.StoreDTRAsFastFadeTime: _nothing,
    g207.QueryGearType: _constant(0x05),  # integrated LED power supply, a.c. supply
    g207.QueryDimmingCurve: _q(lambda g: g.dimming_curve),
    g207.QueryPossibleOperatingModes: _constant(0x04),  # current controlled output
    g207.QueryFeatures: _constant(0x23),  # short/open circuit and thermal shutdown detection
    g207.QueryFailureStatus: _q(lambda g: g.led_failure_status),
    g207.QueryShortCircuit: _led_query(0),
    g207.QueryOpenCircuit: _led_query(1),
    g207.QueryLoadDecrease: _led_query(2),
    g207.QueryLoadIncrease: _led_query(3),
    g207.QueryCurrentProtectorActive: _led_query(4),
    g207.QueryThermalShutDown: _led_query(5),
    g207.QueryThermalOverload: _led_query(6),
    g207.QueryReferenceRunning: _constant(None),
    g207.QueryReferenceMeasurementFailed: _led_query(7),
    g207.QueryCurrentProtectorEnabled: _constant(None),
    g207.QueryOperatingMode: _constant(0x04),
    g207.QueryFastFadeTime: _constant(0),
    g207.QueryMinFastFadeTime: _constant(0),
    g207.QueryExtendedVersionNumber: _constant(VERSION_2_0),
}

_BANK_BUILDERS: Final[dict[int, Callable[[ControlGear, dict[int, int], float], None]]] = {
    0: ControlGear._bank_0,
    1: ControlGear._bank_1,
    202: ControlGear._bank_202,
    205: ControlGear._bank_205,
    206: ControlGear._bank_206,
}
