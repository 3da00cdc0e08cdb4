"""Emulators of serial DALI interfaces, on the master side of a pseudo-terminal.

Each emulator speaks one interface's byte protocol exactly and turns each forward frame it is
asked to send into ``await line.transact(frame, bits, send_twice)`` on a simulated DALI line;
the agent opens the pty's slave path with its real serial code. Written independently of the
agent's interface classes (the simulator's job is to be a second implementation of the same
documents), sharing only the :class:`~drivers.dali.interface.BusEvent` names.

* :class:`FoxtronEmulator`: Foxtron DALI232 ASCII protocol (SOH, hex, checksum, ETB), queue of
  16 frames, ``0D``/``0E`` reports, ``05`` events (bus power, checksum error, invalid command,
  buffer full), ``07`` configuration replies, legacy type ``01`` sends reported as ``03``/``04``.
* :class:`Sci2Emulator`: Tridonic SCI2 5-byte binary protocol (XOR), echo and wait modes,
  status ``6x`` replies and error codes (checksum, short circuit, receive error, unknown command).

Fault injection (:class:`EmulatorFaults`): garbage before a reply, replies with a wrong checksum,
truncated, dropped or late replies, raw bytes at any time (:meth:`InterfaceEmulator.inject`) and
bus power events (:meth:`InterfaceEmulator.emit_event`). The DALI timing is the line's job; an
emulator only adds what the real interface adds (queueing, its own reports).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import tty
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce
from operator import xor
from typing import ClassVar, Final, Protocol

from drivers.dali.interface import BusEvent

__all__ = [
    "EMULATORS",
    "EmulatorFaults",
    "EmulatorStats",
    "FoxtronEmulator",
    "InterfaceEmulator",
    "LineLike",
    "LineResultLike",
    "Sci2Emulator",
    "foxtron_message",
    "sci2_frame",
]

logger = logging.getLogger(__name__)

QUEUE_FRAMES: Final = 16
"""Frames an interface holds while the bus is busy (the Foxtron document's figure; the SCI2's
is not published and is taken to be the same)."""
MAX_PENDING_OUTPUT_BYTES: Final = 65536
"""Reports nobody reads pile up in the pty; past this they are dropped."""
SCI2_QUIET_S: Final = 0.01
"""Silence after which the SCI2 emulator gives up on an incomplete or invalid request and
reports a checksum error (a 5-byte request takes 1.3 ms at 38400 baud)."""
FOXTRON_MAX_MESSAGE_CHARS: Final = 40
LOG_ENTRIES: Final = 256


class LineResultLike(Protocol):
    """What a DALI line returns for one forward frame."""

    @property
    def answers(self) -> tuple[int, ...]:
        """Backward frames of every gear that answered: none, one, or several (a collision)."""

    @property
    def power_ok(self) -> bool:
        """False when the bus had no power (nothing was sent)."""


class LineLike(Protocol):
    """The simulated DALI line an emulator drives (``firmware_sim.dali.line.DaliLine``)."""

    async def transact(
        self, frame: int, bits: int = 16, send_twice: bool = False
    ) -> LineResultLike: ...


@dataclass
class EmulatorFaults:
    """Faults applied to the emulator's replies. Counters are one-shot: each affected reply
    decrements its counter. Events sent on their own (``emit_event``) are not affected."""

    garbage_before_reply: bytes = b""
    """Sent just before the next reply, then cleared."""
    bad_checksum_replies: int = 0
    truncated_replies: int = 0
    """Only the first half of the reply is sent."""
    dropped_replies: int = 0
    """The frame still goes on the bus; only the report is lost."""
    reply_delay_s: float = 0.0
    """Every reply is sent this much later (persistent)."""


@dataclass
class EmulatorStats:
    requests: int = 0
    """Valid requests received."""
    bad_requests: int = 0
    """Requests answered with an error report or dropped as noise."""
    replies: int = 0
    queue_overflows: int = 0
    internal_errors: int = 0


@dataclass(frozen=True, slots=True)
class _Job:
    frame: int
    bits: int
    send_twice: bool
    report: bool = True
    """False when the reply was already given (SCI2 echo mode)."""
    legacy: bool = False
    """Foxtron type 01: reported like another master's frame."""


class InterfaceEmulator(abc.ABC):
    """A serial DALI interface on a pty in front of ``line``. :meth:`start` returns the path a
    client opens; :meth:`stop` is idempotent. Frames are carried one at a time, in order."""

    name: ClassVar[str]

    def __init__(self, line: LineLike) -> None:
        self.line = line
        self.faults = EmulatorFaults()
        self.stats = EmulatorStats()
        self.received: deque[bytes] = deque(maxlen=LOG_ENTRIES)
        """Valid requests as they came over the wire."""
        self.sent: deque[bytes] = deque(maxlen=LOG_ENTRIES)
        """Reports as the interface meant them (before faults)."""
        self.path = ""
        self._forced: BusEvent | None = None
        self._line_power_ok = True
        self._master = -1
        self._slave = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: asyncio.Queue[_Job] = asyncio.Queue(QUEUE_FRAMES)
        self._worker: asyncio.Task[None] | None = None
        self._output = bytearray()
        self._timers: set[asyncio.TimerHandle] = set()

    # Lifecycle ------------------------------------------------------------------------------
    async def start(self) -> str:
        if self._loop is not None:
            raise RuntimeError(f"{self.name} emulator is already running")
        loop = asyncio.get_running_loop()
        master, slave = os.openpty()
        try:
            tty.setraw(slave)
            os.set_blocking(master, False)
            path = os.ttyname(slave)
            loop.add_reader(master, self._on_readable)
        except BaseException:
            os.close(master)
            os.close(slave)
            raise
        self._loop = loop
        self._master, self._slave, self.path = master, slave, path
        self._worker = loop.create_task(self._work(), name=f"dali {self.name} emulator {path}")
        logger.info("DALI %s interface emulator on %s", self.name, path)
        return path

    async def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        loop.remove_reader(self._master)
        loop.remove_writer(self._master)
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        os.close(self._master)
        os.close(self._slave)
        logger.info("DALI %s interface emulator on %s closed", self.name, self.path)

    async def __aenter__(self) -> InterfaceEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # Fault injection ------------------------------------------------------------------------
    def inject(self, data: bytes) -> None:
        """Send raw bytes to the client now."""
        self._write(data)

    @abc.abstractmethod
    def emit_event(self, event: BusEvent) -> None:
        """The interface detects a bus power change: it reports it as its protocol does, and
        treats the bus as unpowered until ``POWER_OK``."""

    @property
    def bus_powered(self) -> bool:
        """Whether the interface currently believes the bus is powered."""
        return self._forced is None and self._line_power_ok

    # Protocol hooks -------------------------------------------------------------------------
    @abc.abstractmethod
    def _on_input(self, data: bytes) -> None:
        """Bytes from the client."""

    @abc.abstractmethod
    async def _execute(self, job: _Job) -> None:
        """Carry one frame over the line and report it."""

    @abc.abstractmethod
    def _with_bad_checksum(self, report: bytes) -> bytes: ...

    # Plumbing -------------------------------------------------------------------------------
    def _enqueue(self, job: _Job, on_overflow: Callable[[], None]) -> None:
        try:
            self._jobs.put_nowait(job)
        except asyncio.QueueFull:
            self.stats.queue_overflows += 1
            logger.warning("DALI %s emulator: queue full, frame %X lost", self.name, job.frame)
            on_overflow()

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    async def _work(self) -> None:
        while True:
            job = await self._jobs.get()
            try:
                await self._execute(job)
            except Exception:
                self.stats.internal_errors += 1
                logger.exception("DALI %s emulator failed on frame %X", self.name, job.frame)

    async def _transact(self, job: _Job) -> LineResultLike:
        return await self.line.transact(job.frame, job.bits, job.send_twice)

    def _reply(self, report: bytes) -> None:
        """Send a report that answers a request, through the faults."""
        self.sent.append(report)
        self.stats.replies += 1
        faults = self.faults
        if faults.dropped_replies > 0:
            faults.dropped_replies -= 1
            logger.debug("DALI %s emulator: dropped reply %s", self.name, report.hex(" "))
            return
        wire = report
        if faults.bad_checksum_replies > 0:
            faults.bad_checksum_replies -= 1
            wire = self._with_bad_checksum(wire)
        if faults.truncated_replies > 0:
            faults.truncated_replies -= 1
            wire = wire[: len(wire) // 2]
        if faults.garbage_before_reply:
            wire = faults.garbage_before_reply + wire
            faults.garbage_before_reply = b""
        if faults.reply_delay_s > 0 and self._loop is not None:
            timer: asyncio.TimerHandle

            def send_late() -> None:
                self._timers.discard(timer)
                self._write(wire)

            timer = self._loop.call_later(faults.reply_delay_s, send_late)
            self._timers.add(timer)
            return
        self._write(wire)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            logger.debug("DALI %s emulator: reading the pty failed: %s", self.name, exc)
            return
        if data:
            try:
                self._on_input(data)
            except Exception:
                self.stats.internal_errors += 1
                logger.exception("DALI %s emulator failed on input %s", self.name, data.hex(" "))

    def _write(self, data: bytes) -> None:
        if self._loop is None:
            return
        if self._output:
            if len(self._output) + len(data) <= MAX_PENDING_OUTPUT_BYTES:
                self._output += data
            return
        try:
            written = os.write(self._master, data)
        except (BlockingIOError, InterruptedError):
            written = 0
        except OSError as exc:
            logger.debug("DALI %s emulator: writing the pty failed: %s", self.name, exc)
            return
        if written < len(data):
            self._output += data[written:]
            self._loop.add_writer(self._master, self._on_writable)

    def _on_writable(self) -> None:
        try:
            written = os.write(self._master, self._output)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            logger.debug("DALI %s emulator: writing the pty failed: %s", self.name, exc)
            written = len(self._output)
        del self._output[:written]
        if not self._output and self._loop is not None:
            self._loop.remove_writer(self._master)


# --------------------------------------------------------------------------------------------
# Foxtron DALI232
# --------------------------------------------------------------------------------------------

_SOH: Final = 0x01
_ETB: Final = 0x17
_UPPER_HEX: Final = b"0123456789ABCDEF"


def foxtron_message(data: bytes) -> bytes:
    """A Foxtron message on the wire: SOH, uppercase hex of ``data`` and of its checksum
    (the complement of the byte sum), ETB."""
    total = (0xFF - sum(data) % 256) & 0xFF
    text = "".join(f"{byte:02X}" for byte in (*data, total))
    return b"\x01" + text.encode("ascii") + b"\x17"


class FoxtronEvent:
    """Codes of the Foxtron ``05`` event message."""

    BUS_POWER_OK: Final = 0
    BUS_POWER_LOST: Final = 1
    MAINS_ON_BUS: Final = 2
    UNSUITABLE_SUPPLY: Final = 3
    BUFFER_FULL: Final = 4
    CHECKSUM_ERROR: Final = 5
    INVALID_COMMAND: Final = 6


FOXTRON_SERIAL_NUMBER: Final = 0x2A17
FOXTRON_FIRMWARE: Final = 0x0107


class FoxtronEmulator(InterfaceEmulator):
    """Foxtron DALI232: one report per frame after the bus transaction."""

    name: ClassVar[str] = "foxtron"

    def __init__(self, line: LineLike) -> None:
        super().__init__(line)
        self._text: bytearray | None = None

    def emit_event(self, event: BusEvent) -> None:
        if event is BusEvent.POWER_OK:
            self._forced = None
            self._write(self._event(FoxtronEvent.BUS_POWER_OK))
        else:
            self._forced = event
            self._write(self._event(FoxtronEvent.BUS_POWER_LOST))

    @staticmethod
    def _event(code: int) -> bytes:
        return foxtron_message(bytes((0x05, code)))

    def _with_bad_checksum(self, report: bytes) -> bytes:
        good = int(report[-3:-1], 16)
        return report[:-3] + f"{good ^ 0x5A:02X}".encode("ascii") + report[-1:]

    def _on_input(self, data: bytes) -> None:
        for byte in data:
            if byte == _SOH:
                if self._text is not None:
                    self.stats.bad_requests += 1
                    logger.debug("Foxtron emulator: request cut short by a new SOH")
                self._text = bytearray()
            elif self._text is None:
                self.stats.bad_requests += 1
                logger.debug("Foxtron emulator: byte %02x outside a request ignored", byte)
            elif byte == _ETB:
                text, self._text = bytes(self._text), None
                self._on_message(text)
            else:
                self._text.append(byte)
                if len(self._text) > FOXTRON_MAX_MESSAGE_CHARS:
                    self._text = None
                    self._refuse(FoxtronEvent.INVALID_COMMAND, "request too long")

    def _refuse(self, code: int, why: str) -> None:
        self.stats.bad_requests += 1
        logger.debug("Foxtron emulator: %s", why)
        self._reply(self._event(code))

    def _on_message(self, text: bytes) -> None:
        if len(text) < 4 or len(text) % 2 or any(c not in _UPPER_HEX for c in text):
            self._refuse(FoxtronEvent.INVALID_COMMAND, f"not hex: {text!r}")
            return
        data = bytes(int(text[i : i + 2], 16) for i in range(0, len(text), 2))
        body, check = data[:-1], data[-1]
        if (sum(body) + check) % 256 != 0xFF:
            self._refuse(FoxtronEvent.CHECKSUM_ERROR, f"bad checksum in {text!r}")
            return
        kind = body[0]
        if kind in (0x0B, 0x01) and len(body) >= 3:
            priority, bits = body[1], body[2]
            size = bits // 8 if bits in (8, 16, 24) else -1
            tail = 1 if kind == 0x0B else 0
            if size < 0 or priority > 5 or len(body) != 3 + size + tail:
                self._refuse(FoxtronEvent.INVALID_COMMAND, f"bad send request {body.hex()}")
                return
            frame = int.from_bytes(body[3 : 3 + size], "big")
            twice = kind == 0x0B and bool(body[-1] & 0x01)
            job = _Job(frame, bits, twice, legacy=kind == 0x01)
            self.stats.requests += 1
            self.received.append(b"\x01" + text + b"\x17")
            self._enqueue(job, lambda: self._reply(self._event(FoxtronEvent.BUFFER_FULL)))
        elif kind == 0x06 and len(body) == 2:
            self.stats.requests += 1
            self.received.append(b"\x01" + text + b"\x17")
            self._configuration(body[1])
        else:
            self._refuse(FoxtronEvent.INVALID_COMMAND, f"unknown request {body.hex()}")

    def _configuration(self, item: int) -> None:
        values = {
            1: FOXTRON_SERIAL_NUMBER,
            2: FOXTRON_FIRMWARE,
            3: 1 if self.bus_powered else 0,
            4: self.queued,
        }
        if item not in values:
            self._refuse(FoxtronEvent.INVALID_COMMAND, f"unknown configuration item {item}")
            return
        self._reply(foxtron_message(bytes((0x07, item)) + values[item].to_bytes(2, "big")))

    async def _execute(self, job: _Job) -> None:
        if self._forced is not None:
            self._reply(self._event(FoxtronEvent.BUS_POWER_LOST))
            return
        result = await self._transact(job)
        if not result.power_ok:
            self._line_power_ok = False
            self._reply(self._event(FoxtronEvent.BUS_POWER_LOST))
            return
        if not self._line_power_ok:
            self._line_power_ok = True
            self._write(self._event(FoxtronEvent.BUS_POWER_OK))
        echo = bytes((job.bits,)) + job.frame.to_bytes(job.bits // 8, "big")
        answers = result.answers
        if not answers:
            kind, rest = (0x04 if job.legacy else 0x0E), b""
        elif len(answers) == 1:
            kind, rest = (0x03 if job.legacy else 0x0D), bytes((8, answers[0]))
        else:
            kind, rest = (0x03 if job.legacy else 0x0D), b"\x00"
        self._reply(foxtron_message(bytes((kind,)) + echo + rest))


# --------------------------------------------------------------------------------------------
# Tridonic SCI2
# --------------------------------------------------------------------------------------------

SCI2_DEVICE_ID: Final = 6


class Sci2Error:
    """Error codes of an SCI2 ``x7`` status reply."""

    CHECKSUM: Final = 1
    SHORT_CIRCUIT: Final = 2
    RECEIVE_ERROR: Final = 3
    UNKNOWN_COMMAND: Final = 4
    COLLISION: Final = 5


def sci2_frame(first: int, d1: int, d2: int, d3: int) -> bytes:
    """Five bytes: four and their XOR."""
    body = bytes((first, d1, d2, d3))
    return body + bytes((reduce(xor, body),))


def _sci2_status(code: int, value: int = 0) -> bytes:
    return sci2_frame((SCI2_DEVICE_ID << 4) | code, 0, 0, value)


class Sci2Emulator(InterfaceEmulator):
    """Tridonic SCI2: echo-mode requests are confirmed at once, wait-mode ones after the bus
    transaction and answer window."""

    name: ClassVar[str] = "sci2"

    def __init__(self, line: LineLike) -> None:
        super().__init__(line)
        self._buffer = bytearray()
        self._garbage = False
        self._quiet: asyncio.TimerHandle | None = None

    def emit_event(self, event: BusEvent) -> None:
        # The SCI2 protocol has no unsolicited message: the state shows in the next reply.
        self._forced = None if event is BusEvent.POWER_OK else event

    def _with_bad_checksum(self, report: bytes) -> bytes:
        return report[:4] + bytes((report[4] ^ 0x5A,))

    async def stop(self) -> None:
        self._cancel_quiet()
        await super().stop()

    def _cancel_quiet(self) -> None:
        if self._quiet is not None:
            self._quiet.cancel()
            self._quiet = None

    def _on_input(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 5:
            candidate = bytes(self._buffer[:5])
            if reduce(xor, candidate) == 0:
                # Noise just before a valid request is dropped without a report: the host is
                # waiting for this request's reply, not for one about the noise.
                self._garbage = False
                del self._buffer[:5]
                self._on_request(candidate)
            else:
                self._buffer.pop(0)
                self._garbage = True
        self._cancel_quiet()
        if (self._buffer or self._garbage) and self._loop is not None:
            self._quiet = self._loop.call_later(SCI2_QUIET_S, self._on_quiet)

    def _on_quiet(self) -> None:
        self._quiet = None
        logger.debug(
            "SCI2 emulator: invalid request bytes %s", (bytes(self._buffer) or b"").hex(" ")
        )
        self._buffer.clear()
        self._garbage = False
        self.stats.bad_requests += 1
        self._reply(_sci2_status(0x7, Sci2Error.CHECKSUM))

    def _on_request(self, request: bytes) -> None:
        ctrl = request[0]
        if ctrl & 0x40:  # link check: nothing goes on the bus
            self.stats.requests += 1
            self.received.append(request)
            self._reply(_sci2_status(0x0))
            return
        mode = ctrl & 0x0F
        if mode == 0x03:
            bits, frame = 16, int.from_bytes(request[2:4], "big")
        elif mode == 0x08:
            bits, frame = 24, int.from_bytes(request[1:4], "big")
        else:
            self.stats.bad_requests += 1
            logger.debug("SCI2 emulator: unsupported mode in %s", request.hex(" "))
            self._reply(_sci2_status(0x7, Sci2Error.UNKNOWN_COMMAND))
            return
        self.stats.requests += 1
        self.received.append(request)
        echo = bool(ctrl & 0x20)
        job = _Job(frame, bits, bool(ctrl & 0x10), report=not echo)
        if echo:
            if self.bus_powered:
                self._reply(_sci2_status(0x0))
            else:
                self._reply(_sci2_status(0x7, Sci2Error.SHORT_CIRCUIT))
        self._enqueue(job, lambda: None)

    async def _execute(self, job: _Job) -> None:
        if self._forced is not None:
            if job.report:
                self._reply(_sci2_status(0x7, Sci2Error.SHORT_CIRCUIT))
            return
        result = await self._transact(job)
        self._line_power_ok = result.power_ok
        if not job.report:
            return
        if not result.power_ok:
            self._reply(_sci2_status(0x7, Sci2Error.SHORT_CIRCUIT))
        elif not result.answers:
            self._reply(_sci2_status(0x1))
        elif len(result.answers) == 1:
            self._reply(_sci2_status(0x2, result.answers[0]))
        else:
            self._reply(_sci2_status(0x7, Sci2Error.RECEIVE_ERROR))


EMULATORS: Final[dict[str, type[InterfaceEmulator]]] = {
    FoxtronEmulator.name: FoxtronEmulator,
    Sci2Emulator.name: Sci2Emulator,
}
"""Emulator class per interface name (the names of the agent's interfaces)."""
