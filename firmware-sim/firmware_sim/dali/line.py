"""A simulated DALI line: control gear on one bus, one transaction at a time, DALI timing.

The interface emulators (Foxtron, SCI2) turn their byte protocols into
:meth:`DaliLine.transact` calls. The line puts the forward frame on the bus, delivers it to
every gear (each decides whether it is addressed), gathers the backward frames and returns
them in a :class:`LineResult`: none (no answer), one, or several (a collision, which a real
receiver sees as a framing error).

**Time.** Everything on the line runs in *line time*, which goes ``1 / time_scale`` times as
fast as real time (``time_scale=1.0`` is real DALI timing; tests use 0.01 or less). A
transaction takes the modelled time of its frames (16.6 ms forward frame, 7.5 ms to the answer,
9.9 ms backward frame or the 12.4 ms answer window, 13.5 ms settling before the next forward
frame at priority 1, …), scaled, on average: short sleeps are pooled so that pacing stays right
even when each one is far below the event loop's timer resolution. Line time is a virtual
clock: it advances by the modelled duration during a transaction (Python overhead inside a
transaction does not count) and by real time / ``time_scale`` while the bus is idle. So the
15-minute INITIALISE window, fades and energy counters all follow the same scaled clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from dali import address as dali_address  # type: ignore[import-untyped, unused-ignore]
from dali.gear import general as g102  # type: ignore[import-untyped, unused-ignore]

from firmware_sim.dali.gear import ControlGear, decode_frame

__all__ = [
    "ANSWER_DELAY_S",
    "BACKWARD_FRAME_S",
    "BIT_S",
    "FORWARD_FRAME_16_S",
    "FORWARD_FRAME_24_S",
    "MAX_GEAR",
    "NO_ANSWER_WINDOW_S",
    "SEND_TWICE_GAP_S",
    "SETTLING_S",
    "BusPower",
    "DaliLine",
    "LineRecord",
    "LineResult",
    "forward_frame_s",
]

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

# DALI physical timing (IEC 62386-101:2022), in line seconds.
BIT_S = 1 / 1200
"""One bit at 1200 bit/s (two Manchester half bits of 416.7 µs)."""
STOP_CONDITION_S = 0.00245
"""A transmitter's stop condition after the last bit."""
FORWARD_FRAME_16_S = 17 * BIT_S + STOP_CONDITION_S
"""Start bit, 16 data bits, stop condition: 16.6 ms."""
FORWARD_FRAME_24_S = 25 * BIT_S + STOP_CONDITION_S
"""A 24-bit (control device) frame: 23.3 ms."""
BACKWARD_FRAME_S = 9 * BIT_S + STOP_CONDITION_S
"""Start bit, 8 data bits, stop condition: 9.9 ms."""
ANSWER_DELAY_S = 0.0075
"""Gear start answering 5.5 to 10.5 ms after a forward frame; the simulated ones take 7.5."""
NO_ANSWER_WINDOW_S = 0.0124
"""A receiver waits this long after a forward frame before declaring "no answer"."""
SETTLING_S: Final[Mapping[int, float]] = {1: 0.0135, 2: 0.0149, 3: 0.0163, 4: 0.0179, 5: 0.0195}
"""Minimum quiet time between the end of any frame and the next forward frame, by priority."""
SEND_TWICE_GAP_S = 0.0135
"""The gap an interface leaves between the two frames of a send-twice command (within the
2.4..94 ms the gear accept)."""
DEFAULT_PRIORITY = 1

MAX_GEAR = 64
HISTORY_LENGTH = 4096
MIN_SLEEP_S = 0.002
"""Pacing pools sleeps shorter than this (real seconds): the event loop's timers cannot do
them, and a thousand overshot 50 µs sleeps would make a fast test slow."""


def forward_frame_s(bits: int) -> float:
    """The duration of a forward frame of ``bits`` data bits (16 or 24)."""
    if bits not in (16, 24):
        raise ValueError(f"forward frames are 16 or 24 bits, got {bits}")
    return FORWARD_FRAME_16_S if bits == 16 else FORWARD_FRAME_24_S


@dataclass(frozen=True, slots=True)
class LineResult:
    """What the line saw after a forward frame: the backward frames of every gear that
    answered (``()`` no answer, one value, or several = a collision) and whether the bus had
    power (``False``: nothing was sent)."""

    answers: tuple[int, ...]
    power_ok: bool = True

    @property
    def collision(self) -> bool:
        """Several gear answered at once: a real receiver sees a framing error."""
        return len(self.answers) > 1

    @property
    def answer(self) -> int | None:
        """The backward frame when exactly one gear answered."""
        return self.answers[0] if len(self.answers) == 1 else None


class BusPower(enum.Enum):
    OK = "ok"
    LOST = "lost"
    SHORT_CIRCUIT = "short_circuit"


@dataclass(frozen=True, slots=True)
class LineRecord:
    """One transaction, for tests and benchmarks."""

    started_at: float
    """The line's ``clock`` when the (first) forward frame started, after settling."""
    line_time_s: float
    """Line time at the same moment."""
    frame: int
    bits: int
    send_twice: bool
    answers: tuple[int, ...]
    kind: str
    """``dapc``, ``command``, ``query``, ``special``, ``unknown`` or ``24-bit``."""
    command: str
    """python-dali's class name for the frame (``DAPC``, ``QueryStatus``, …)."""


class DaliLine:
    """A DALI bus with control gear on it. No I/O anywhere: the interface emulators own the
    pseudo-terminals and call :meth:`transact`.

    Ground truth for tests: :attr:`transactions`, :attr:`frames_by_kind`,
    :attr:`frames_by_command`, :attr:`collisions`, :attr:`refused` (transactions while the
    bus had no power), :attr:`busy_s` (line time the bus was occupied, settling included),
    :attr:`history` (the last :data:`HISTORY_LENGTH` transactions) and, per gear,
    ``gear.frames_received`` and ``gear.executed``.
    """

    def __init__(
        self,
        gear: Sequence[ControlGear],
        *,
        time_scale: float = 1.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if not time_scale > 0:
            raise ValueError(f"time_scale must be positive, got {time_scale}")
        self.time_scale = time_scale
        self._clock = clock
        self._line_t = 0.0
        self._mark = clock()
        self._in_transaction = False
        self._lock = asyncio.Lock()
        self._sleep_debt_s = 0.0
        self._bus_free_at = 0.0
        self._enabled_device_type = 0
        self._power = BusPower.OK
        self._power_listeners: list[Callable[[BusPower], None]] = []
        self.gear: tuple[ControlGear, ...] = tuple(gear)
        for unit in self.gear:
            unit.bind_clock(self.now)

        self.transactions = 0
        self.collisions = 0
        self.refused = 0
        self.busy_s = 0.0
        self.frames_by_kind: Counter[str] = Counter()
        self.frames_by_command: Counter[str] = Counter()
        self.history: deque[LineRecord] = deque(maxlen=HISTORY_LENGTH)

    @classmethod
    def random(
        cls,
        count: int,
        *,
        addressed: int | None = None,
        seed: int = 0,
        time_scale: float = 1.0,
        clock: Clock = time.monotonic,
        groups: Mapping[int, Iterable[int]] | None = None,
        **gear_options: Any,
    ) -> DaliLine:
        """A line of ``count`` gear with seeded random long addresses. The first
        ``addressed`` of them (all by default) have short addresses 0..addressed-1, the others
        none; ``groups`` maps a gear's index to its groups. ``gear_options`` go to every
        :class:`ControlGear`."""
        if not 0 <= count <= MAX_GEAR:
            raise ValueError(f"a DALI line holds 0..{MAX_GEAR} gear, got {count}")
        if addressed is None:
            addressed = count
        if not 0 <= addressed <= count:
            raise ValueError(f"addressed must be 0..{count}, got {addressed}")
        groups = groups or {}
        rng = random.Random(seed)  # noqa: S311 - reproducible test lines, not security
        gear = [
            ControlGear(
                short_address=index if index < addressed else None,
                groups=groups.get(index, ()),
                seed=rng.getrandbits(64),
                **gear_options,
            )
            for index in range(count)
        ]
        return cls(gear, time_scale=time_scale, clock=clock)

    # ------------------------------------------------------------------------------------------
    # Time
    # ------------------------------------------------------------------------------------------
    def now(self) -> float:
        """Line time in seconds (starts at 0)."""
        if self._in_transaction:
            return self._line_t
        return self._line_t + (self._clock() - self._mark) / self.time_scale

    def _sync(self) -> float:
        """Fold the idle time since the last mark into the line time."""
        self._line_t = self.now()
        self._mark = self._clock()
        return self._line_t

    async def _pace(self, line_s: float) -> None:
        """Let ``line_s`` of line time pass in real time (scaled), pooling short sleeps."""
        self._sleep_debt_s += line_s * self.time_scale
        if self._sleep_debt_s < MIN_SLEEP_S:
            await asyncio.sleep(0)
            return
        started = time.monotonic()
        await asyncio.sleep(self._sleep_debt_s)
        # An overshoot is paid back by the next sleeps, but never more than one pooled sleep's
        # worth: idle time between transactions is not owed to anyone.
        self._sleep_debt_s = max(self._sleep_debt_s - (time.monotonic() - started), -MIN_SLEEP_S)

    # ------------------------------------------------------------------------------------------
    # Transactions
    # ------------------------------------------------------------------------------------------
    async def transact(
        self,
        frame: int,
        bits: int = 16,
        send_twice: bool = False,
        *,
        priority: int = DEFAULT_PRIORITY,
    ) -> LineResult:
        """Send one forward frame (twice, ``SEND_TWICE_GAP_S`` apart, with ``send_twice``) and
        return the backward frames of the gear that answered. Returns once the answer is known
        (after the backward frame or the answer window); the settling time before the next
        forward frame is applied when the next transaction starts. ``priority`` (1..5) sets
        that settling time."""
        frame_s = forward_frame_s(bits)
        if not 0 <= frame < 1 << bits:
            raise ValueError(f"a {bits}-bit frame must be 0..{(1 << bits) - 1}, got {frame}")
        if priority not in SETTLING_S:
            raise ValueError(f"priority must be 1..5, got {priority}")
        async with self._lock:
            if self._power is not BusPower.OK:
                self.refused += 1
                await asyncio.sleep(0)
                return LineResult((), power_ok=False)
            idle_until = self._sync()
            self._in_transaction = True
            try:
                start = max(idle_until, self._bus_free_at)
                await self._pace(start - idle_until)
                started_at = self._clock()
                self._line_t = start + frame_s
                kind, name = self._classify(frame, bits)
                answers = self._deliver(frame, bits, start, start + frame_s)
                end = start + frame_s
                if send_twice:
                    second = end + SEND_TWICE_GAP_S
                    end = second + frame_s
                    self._line_t = end
                    answers = self._deliver(frame, bits, second, end)
                if answers:
                    answered = end + ANSWER_DELAY_S + BACKWARD_FRAME_S
                    done, self._bus_free_at = answered, answered + SETTLING_S[priority]
                else:
                    done = end + NO_ANSWER_WINDOW_S
                    self._bus_free_at = max(done, end + SETTLING_S[priority])
                self._count(frame, bits, send_twice, answers, kind, name, start, started_at)
                await self._pace(done - start)
                self._line_t = done
            finally:
                self._mark = self._clock()
                self._in_transaction = False
            return LineResult(answers)

    def _deliver(self, frame: int, bits: int, start: float, end: float) -> tuple[int, ...]:
        answers = []
        for unit in self.gear:
            answer = unit.receive(frame, start=start, end=end, bits=bits)
            if answer is not None:
                answers.append(answer)
        return tuple(answers)

    def _classify(self, frame: int, bits: int) -> tuple[str, str]:
        """The frame's kind and python-dali name, for the counters."""
        if bits != 16:
            self._enabled_device_type = 0
            return "24-bit", "24-bit"
        command = decode_frame(frame, self._enabled_device_type)
        self._enabled_device_type = (
            command.param if isinstance(command, g102.EnableDeviceType) else 0
        )
        name = type(command).__name__
        if isinstance(command, g102.UnknownGearCommand):
            logger.debug("frame %04x is not a command any gear implements", frame)
            return "unknown", name
        if isinstance(command, g102.DAPC):
            return "dapc", name
        if isinstance(getattr(command, "destination", None), dali_address.GearAddress):
            return ("query" if command.is_query else "command"), name
        return "special", name

    def _count(
        self,
        frame: int,
        bits: int,
        send_twice: bool,
        answers: tuple[int, ...],
        kind: str,
        name: str,
        start: float,
        started_at: float,
    ) -> None:
        self.transactions += 1
        frames = 2 if send_twice else 1
        self.frames_by_kind[kind] += frames
        self.frames_by_command[name] += frames
        if len(answers) > 1:
            self.collisions += 1
        self.busy_s += self._bus_free_at - start
        self.history.append(
            LineRecord(started_at, start, frame, bits, send_twice, answers, kind, name)
        )

    # ------------------------------------------------------------------------------------------
    # Bus power and mains
    # ------------------------------------------------------------------------------------------
    @property
    def power(self) -> BusPower:
        return self._power

    @property
    def power_ok(self) -> bool:
        return self._power is BusPower.OK

    def power_off(self, *, short_circuit: bool = False) -> None:
        """The bus loses its power (or is shorted): transactions are refused and every
        powered gear goes to its SYSTEM FAILURE LEVEL and forgets its volatile bus state."""
        state = BusPower.SHORT_CIRCUIT if short_circuit else BusPower.LOST
        was_ok = self._power is BusPower.OK
        self._sync()
        self._power = state
        if was_ok:
            for unit in self.gear:
                unit.bus_power_lost()
        self._notify(state)

    def power_on(self) -> None:
        """Bus power is back."""
        if self._power is BusPower.OK:
            return
        self._sync()
        self._power = BusPower.OK
        for unit in self.gear:
            unit.bus_power_restored()
        self._notify(BusPower.OK)

    def add_power_listener(self, listener: Callable[[BusPower], None]) -> Callable[[], None]:
        """Call ``listener`` on every bus power change (an emulator reports it as an event);
        returns the function that removes it."""
        self._power_listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._power_listeners.remove(listener)

        return remove

    def _notify(self, state: BusPower) -> None:
        for listener in list(self._power_listeners):
            try:
                listener(state)
            except Exception:
                logger.exception("bus power listener %r failed", listener)

    def switch_mains(self, on: bool, gear: Iterable[ControlGear] | None = None) -> None:
        """The cabinet switches the circuit feeding ``gear`` (all of them by default)."""
        for unit in self.gear if gear is None else gear:
            if on:
                unit.mains_on()
            else:
                unit.mains_off()

    # ------------------------------------------------------------------------------------------
    # Lookup
    # ------------------------------------------------------------------------------------------
    def by_short_address(self, short_address: int) -> ControlGear | None:
        """The (first) gear with this short address, or ``None``."""
        for unit in self.gear:
            if unit.short_address == short_address:
                return unit
        return None

    def __repr__(self) -> str:
        return f"DaliLine({len(self.gear)} gear, time_scale={self.time_scale})"
