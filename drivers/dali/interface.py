"""The seam between the DALI driver and the serial DALI interfaces that reach a DALI line.

A serial DALI interface (Foxtron DALI232, Tridonic SCI2, …) turns bytes on a serial port into
forward frames on the DALI bus and reports back what happened: the answer byte, "no answer",
a collision of several answers, bus power events. Each interface is one small class:

* :class:`DaliInterface` is the contract the driver programs against (open, close, send).
* :class:`SerialDaliInterface` does everything that is the same for every serial interface:
  opening the port in a thread, reading it from the event loop, one transaction at a time,
  a response timeout, resynchronisation after garbage, bus power events, counters. A subclass
  only encodes a request (:meth:`SerialDaliInterface.encode_request`) and parses the
  interface's bytes into :data:`Report` values (:meth:`SerialDaliInterface.new_parser`).

Interfaces are found through the entry-point group ``lampyre.dali_interfaces``
(:func:`load_interface`); the entry-point name is the class's :attr:`DaliInterface.name`, so a
vendor adds an interface by shipping a package with one entry point, like a driver.

The types here (:class:`Outcome`, :class:`DaliAnswer`, :class:`BusEvent`) are also what the
simulator's interface emulators speak, so this module imports nothing from the driver.

Reading uses ``loop.add_reader`` on the port's file descriptor, so it needs a POSIX system (the
gateways are Linux).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import termios
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar, Final, Protocol

import serial

from agent.sdk import BusUnavailable, TransientError

__all__ = [
    "AFTER_FAILURE_QUIET_S",
    "ENTRY_POINT_GROUP",
    "BusEvent",
    "DaliAnswer",
    "DaliBusPowerError",
    "DaliInterface",
    "DaliInterfaceError",
    "DiscardedBytes",
    "GarbledReport",
    "InterfaceEvent",
    "InterfaceNotice",
    "InterfaceRefusal",
    "InterfaceReply",
    "InterfaceStats",
    "OtherTraffic",
    "Outcome",
    "Report",
    "ReportParser",
    "SerialDaliInterface",
    "UnknownInterface",
    "available_interfaces",
    "load_interface",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP: Final = "lampyre.dali_interfaces"

AFTER_FAILURE_QUIET_S: Final = 0.2
"""After a transaction that failed (no report, garbled report, cancelled), wait this long and
discard whatever arrived before sending again: a report that was merely late lands in this
window instead of being taken for the next transaction's."""
READ_CHUNK_BYTES: Final = 4096
MAX_PENDING_OUTPUT_BYTES: Final = 4096
"""A request waits in our own buffer while the port cannot take it; past this the port is
considered stuck."""


# --------------------------------------------------------------------------------------------
# The contract
# --------------------------------------------------------------------------------------------


class Outcome(enum.Enum):
    """What came back on the DALI bus after a forward frame."""

    ANSWER = "answer"
    """One backward frame (its byte is :attr:`DaliAnswer.value`)."""
    NO_ANSWER = "no_answer"
    """Nothing answered in the answer window (or, for a command, the interface confirmed it)."""
    COLLISION = "collision"
    """A framing error in the answer window: several gear answered at once. For a yes/no query
    this means "yes, from more than one"."""


@dataclass(frozen=True, slots=True)
class DaliAnswer:
    """The result of one transaction. ``value`` is the backward frame (0..255), only for
    :attr:`Outcome.ANSWER`."""

    outcome: Outcome
    value: int | None = None

    def __post_init__(self) -> None:
        if self.outcome is Outcome.ANSWER:
            if self.value is None or not 0 <= self.value <= 0xFF:
                raise ValueError(f"an answer carries a byte 0..255, got {self.value!r}")
        elif self.value is not None:
            raise ValueError(f"{self.outcome.value} carries no value, got {self.value!r}")


class BusEvent(enum.Enum):
    """Bus power as the interface reports it."""

    POWER_LOST = "power_lost"
    POWER_OK = "power_ok"
    SHORT_CIRCUIT = "short_circuit"


class DaliInterfaceError(TransientError):
    """The interface's report was missing, garbled or a refusal. The bus itself may be fine;
    the transaction can be retried."""


class DaliBusPowerError(TransientError):
    """The interface reports that the DALI bus has no power (lost, or short-circuited)."""


class DaliInterface(abc.ABC):
    """One serial DALI interface. Construct (no I/O), :meth:`open`, :meth:`send` as often as
    needed (one transaction at a time; concurrent callers queue), :meth:`close`.

    ``on_event`` is called on the event loop, whenever the interface reports a change of bus
    power (also while no transaction is running); it must not block.
    """

    name: ClassVar[str]
    """Entry-point name in ``lampyre.dali_interfaces`` and the ``interface = "…"`` value."""
    default_baudrate: ClassVar[int]
    default_parity: ClassVar[str]
    """pyserial parity letter: ``"N"``, ``"E"`` or ``"O"``."""

    def __init__(
        self,
        device: str,
        *,
        baudrate: int | None = None,
        on_event: Callable[[BusEvent], None] | None = None,
    ) -> None:
        self.device = device
        self.baudrate = baudrate if baudrate is not None else self.default_baudrate
        self.on_event = on_event

    @abc.abstractmethod
    async def open(self) -> None:
        """Open the port. All or nothing: on failure nothing stays open and
        :class:`~agent.sdk.BusUnavailable` is raised."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the port; idempotent. A transaction in flight fails with
        :class:`~agent.sdk.BusUnavailable`."""

    @abc.abstractmethod
    async def send(
        self,
        frame: int,
        *,
        bits: int = 16,
        send_twice: bool = False,
        expect_answer: bool = False,
    ) -> DaliAnswer:
        """Send one forward frame (MSB first, ``bits`` long) and wait for the interface's report.

        Returns :attr:`Outcome.ANSWER` with the backward byte, :attr:`Outcome.NO_ANSWER` when
        nothing answered (or ``expect_answer`` is false and the interface only confirmed the
        frame), :attr:`Outcome.COLLISION` on a framing error in the answer window. Raises
        :class:`DaliInterfaceError` for a missing, garbled or refused report,
        :class:`DaliBusPowerError` when the interface reports the bus unpowered, and
        :class:`~agent.sdk.BusUnavailable` when the port is closed or gone."""

    async def __aenter__(self) -> DaliInterface:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


# --------------------------------------------------------------------------------------------
# What an interface's byte stream decodes to
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InterfaceReply:
    """The interface's result for a frame it sent. ``frame``/``bits`` are the forward frame the
    interface echoes, when its protocol does (then a reply only settles the transaction whose
    frame it names)."""

    answer: DaliAnswer
    raw: bytes
    frame: int | None = None
    bits: int | None = None


@dataclass(frozen=True, slots=True)
class InterfaceEvent:
    """Bus power reported, spontaneously or instead of a reply."""

    event: BusEvent
    raw: bytes


@dataclass(frozen=True, slots=True)
class InterfaceRefusal:
    """The interface did not carry out the request (checksum error, unknown command, buffer
    full, forward frame collided)."""

    reason: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class InterfaceNotice:
    """Something the interface reported that needs a log line but changes no transaction."""

    detail: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class OtherTraffic:
    """Traffic that is not about our transaction (another master's frames, monitor frames,
    configuration replies)."""

    detail: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class GarbledReport:
    """A complete report that fails its checks (checksum, length, field values). It was most
    likely the reply we wait for, so the transaction fails at once."""

    detail: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class DiscardedBytes:
    """Bytes dropped while looking for the start of a report (noise, a truncated report). The
    transaction goes on waiting: its real report may still follow."""

    detail: str
    raw: bytes


Report = (
    InterfaceReply
    | InterfaceEvent
    | InterfaceRefusal
    | InterfaceNotice
    | OtherTraffic
    | GarbledReport
    | DiscardedBytes
)


class ReportParser(Protocol):
    """Turns the interface's byte stream into reports. Never raises: bad input becomes
    :class:`GarbledReport` or :class:`DiscardedBytes`."""

    def feed(self, data: bytes) -> list[Report]:
        """Take more bytes; return the reports they complete."""

    def flush(self) -> list[Report]:
        """Drop a partial report (called after the line went quiet)."""

    @property
    def buffered(self) -> int:
        """Bytes of a partial report held back."""


@dataclass(slots=True)
class InterfaceStats:
    """Counters about one interface, cheap to read (the driver folds them into its health)."""

    transactions: int = 0
    answers: int = 0
    no_answers: int = 0
    collisions: int = 0
    timeouts: int = 0
    garbled: int = 0
    refusals: int = 0
    power_errors: int = 0
    discarded_bytes: int = 0
    unexpected_reports: int = 0
    other_traffic: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# The serial base class
# --------------------------------------------------------------------------------------------

_POWER_FAILURES: Final = (BusEvent.POWER_LOST, BusEvent.SHORT_CIRCUIT)


@dataclass(eq=False, slots=True)
class _Pending:
    frame: int
    bits: int
    future: asyncio.Future[DaliAnswer]

    def fail(self, error: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(error)


@dataclass(eq=False)
class _Port:
    serial: Any
    fd: int
    loop: asyncio.AbstractEventLoop
    out: bytearray = field(default_factory=bytearray)
    lost: str | None = None
    idle_timer: asyncio.TimerHandle | None = None


class SerialDaliInterface(DaliInterface):
    """A :class:`DaliInterface` on a pyserial port (8 data bits, 1 stop bit).

    A subclass sets :attr:`name`, :attr:`default_baudrate` and :attr:`default_parity` and
    implements :meth:`encode_request`, :meth:`new_parser`, :meth:`response_timeout_s` and
    :meth:`idle_flush_s`; it overrides :meth:`matches` when its replies echo the frame.
    """

    supported_bits: ClassVar[frozenset[int]] = frozenset({16, 24})

    def __init__(
        self,
        device: str,
        *,
        baudrate: int | None = None,
        on_event: Callable[[BusEvent], None] | None = None,
    ) -> None:
        super().__init__(device, baudrate=baudrate, on_event=on_event)
        self.stats = InterfaceStats()
        self.bus_power: BusEvent | None = None
        """The last bus power state the interface reported (None until it says)."""
        self._port: _Port | None = None
        self._parser: ReportParser = self.new_parser()
        self._pending: _Pending | None = None
        self._lock = asyncio.Lock()
        self._dirty = False

    # Protocol hooks ---------------------------------------------------------------------
    @abc.abstractmethod
    def encode_request(self, frame: int, bits: int, send_twice: bool, expect_answer: bool) -> bytes:
        """The bytes that make the interface send ``frame`` once (or twice)."""

    @abc.abstractmethod
    def new_parser(self) -> ReportParser:
        """A fresh parser for the interface's byte stream."""

    @abc.abstractmethod
    def response_timeout_s(self, send_twice: bool) -> float:
        """How long to wait for the interface's report after writing a request."""

    @abc.abstractmethod
    def idle_flush_s(self) -> float:
        """Silence after which a partial report is dropped (the rest of it is not coming)."""

    def matches(self, reply: InterfaceReply, frame: int, bits: int) -> bool:
        """Whether ``reply`` is the report for the transaction of ``frame``."""
        if reply.frame is None:
            return True
        return reply.frame == frame and (reply.bits is None or reply.bits == bits)

    # Lifecycle --------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._port is not None and self._port.lost is None

    def _open_serial(self) -> Any:
        # Runs in a worker thread: opening and configuring a tty can block.
        try:
            port = self._serial(self.default_parity)
        except termios.error:
            if self.default_parity == serial.PARITY_NONE or not _is_pseudo_terminal(self.device):
                raise
            # Linux pseudo-terminals (the simulator, socat or ser2net bridges) keep no parity
            # bit: the first open silently drops it, a reopen asking for it again fails with
            # EINVAL because nothing else changes. Parity means nothing on a pty anyway.
            logger.info(
                "%s: %s is a pseudo-terminal without parity; opened as 8N1",
                self.name,
                self.device,
            )
            port = self._serial(serial.PARITY_NONE)
        try:
            port.reset_input_buffer()  # whatever sat in the port belongs to no request of ours
            os.set_blocking(port.fileno(), False)
        except BaseException:
            port.close()
            raise
        return port

    def _serial(self, parity: str) -> Any:
        return serial.Serial(
            port=self.device,
            baudrate=self.baudrate,
            bytesize=serial.EIGHTBITS,
            parity=parity,
            stopbits=serial.STOPBITS_ONE,
            timeout=0,
            write_timeout=0,
            exclusive=True,
        )

    async def open(self) -> None:
        if self._port is not None and self._port.lost is not None:
            await self.close()  # what is left of a port that vanished
        if self._port is not None:
            raise RuntimeError(f"{self.name} interface on {self.device} is already open")
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, self._open_serial)
        try:
            port = await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(_close_opened_port)
            raise
        except (serial.SerialException, OSError, ValueError, termios.error) as exc:
            raise BusUnavailable(
                f"{self.name} interface: cannot open serial port {self.device}: {exc}"
            ) from exc
        try:
            fd = port.fileno()
            state = _Port(serial=port, fd=fd, loop=loop)
            loop.add_reader(fd, self._on_readable, state)
        except BaseException:
            port.close()
            raise
        self._port = state
        self._parser = self.new_parser()
        self._dirty = False
        logger.info(
            "%s interface on %s open (%s baud, parity %s)",
            self.name,
            self.device,
            self.baudrate,
            self.default_parity,
        )

    async def close(self) -> None:
        state, self._port = self._port, None
        if state is None:
            return
        self._detach(state)
        if self._pending is not None:
            self._pending.fail(BusUnavailable(f"{self.name} interface on {self.device} closed"))
        await state.loop.run_in_executor(None, state.serial.close)
        logger.info("%s interface on %s closed", self.name, self.device)

    # Transactions -----------------------------------------------------------------------
    async def send(
        self,
        frame: int,
        *,
        bits: int = 16,
        send_twice: bool = False,
        expect_answer: bool = False,
    ) -> DaliAnswer:
        if bits not in self.supported_bits:
            supported = ", ".join(map(str, sorted(self.supported_bits)))
            raise ValueError(
                f"{self.name} interface sends frames of {supported} bits, not {bits} bits"
            )
        if not 0 <= frame < 1 << bits:
            raise ValueError(f"frame {frame:#x} does not fit in {bits} bits")
        request = self.encode_request(frame, bits, send_twice, expect_answer)
        async with self._lock:
            state = self._usable_port()
            if self._dirty:
                await self._settle(state)
                state = self._usable_port()
            pending = _Pending(frame, bits, state.loop.create_future())
            self._pending = pending
            self.stats.transactions += 1
            settled = False
            try:
                self._write(state, request)
                timeout_s = self.response_timeout_s(send_twice)
                try:
                    async with asyncio.timeout(timeout_s):
                        answer = await pending.future
                except TimeoutError:
                    self.stats.timeouts += 1
                    raise DaliInterfaceError(
                        f"{self.name} interface on {self.device}: no report within "
                        f"{timeout_s} s for frame {_hex_frame(frame, bits)}"
                    ) from None
                settled = True
            except DaliBusPowerError:
                settled = True  # the interface answered; nothing late to wait for
                raise
            finally:
                self._pending = None
                if not settled:
                    self._dirty = True
        if answer.outcome is Outcome.ANSWER:
            self.stats.answers += 1
        elif answer.outcome is Outcome.NO_ANSWER:
            self.stats.no_answers += 1
        else:
            self.stats.collisions += 1
        return answer

    def _usable_port(self) -> _Port:
        state = self._port
        if state is None:
            raise BusUnavailable(f"{self.name} interface on {self.device} is not open")
        if state.lost is not None:
            raise BusUnavailable(f"{self.name} interface on {self.device}: {state.lost}")
        return state

    async def _settle(self, state: _Port) -> None:
        await asyncio.sleep(AFTER_FAILURE_QUIET_S)
        self._handle(self._parser.flush())
        self._dirty = False

    # Port I/O (event loop callbacks) ----------------------------------------------------
    def _write(self, state: _Port, data: bytes) -> None:
        if state.out:
            if len(state.out) + len(data) > MAX_PENDING_OUTPUT_BYTES:
                self._lose(state, "the port takes no more output")
                raise BusUnavailable(f"{self.name} interface on {self.device}: {state.lost}")
            state.out += data
            return
        try:
            written = os.write(state.fd, data)
        except (BlockingIOError, InterruptedError):
            written = 0
        except OSError as exc:
            self._lose(state, f"write failed: {exc}")
            raise BusUnavailable(f"{self.name} interface on {self.device}: {state.lost}") from exc
        if written < len(data):
            state.out += data[written:]
            state.loop.add_writer(state.fd, self._on_writable, state)

    def _on_writable(self, state: _Port) -> None:
        try:
            written = os.write(state.fd, state.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lose(state, f"write failed: {exc}")
            return
        del state.out[:written]
        if not state.out:
            state.loop.remove_writer(state.fd)

    def _on_readable(self, state: _Port) -> None:
        try:
            data = os.read(state.fd, READ_CHUNK_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lose(state, f"read failed: {exc}")
            return
        if not data:
            self._lose(state, "the port was closed under us")
            return
        self._handle(self._parser.feed(data))
        if state.idle_timer is not None:
            state.idle_timer.cancel()
            state.idle_timer = None
        if self._parser.buffered and state.lost is None:
            state.idle_timer = state.loop.call_later(self.idle_flush_s(), self._on_idle, state)

    def _on_idle(self, state: _Port) -> None:
        state.idle_timer = None
        self._handle(self._parser.flush())

    def _lose(self, state: _Port, reason: str) -> None:
        if state.lost is not None:
            return
        state.lost = reason
        self._detach(state)
        logger.error("%s interface on %s lost: %s", self.name, self.device, reason)
        if self._pending is not None:
            self._pending.fail(BusUnavailable(f"{self.name} interface on {self.device}: {reason}"))

    @staticmethod
    def _detach(state: _Port) -> None:
        state.loop.remove_reader(state.fd)
        state.loop.remove_writer(state.fd)
        if state.idle_timer is not None:
            state.idle_timer.cancel()
            state.idle_timer = None

    # Reports ----------------------------------------------------------------------------
    def _handle(self, reports: Sequence[Report]) -> None:
        for report in reports:
            try:
                self._handle_one(report)
            except Exception:  # one bad report must not take the reader down
                logger.exception("%s interface: handling %r failed", self.name, report)

    def _handle_one(self, report: Report) -> None:
        pending = self._pending
        waiting = pending is not None and not pending.future.done()
        match report:
            case InterfaceReply():
                if (
                    pending is not None
                    and waiting
                    and self.matches(report, pending.frame, pending.bits)
                ):
                    if self.bus_power in _POWER_FAILURES:
                        # A frame went through the bus, so its power is back.
                        self._bus_power(BusEvent.POWER_OK)
                    pending.future.set_result(report.answer)
                    return
                self.stats.unexpected_reports += 1
                logger.warning(
                    "%s interface on %s: report %s (%s) answers no pending transaction%s; ignored",
                    self.name,
                    self.device,
                    report.raw.hex(" "),
                    _describe_reply(report),
                    f" (waiting for frame {_hex_frame(pending.frame, pending.bits)})"
                    if pending is not None and waiting
                    else "",
                )
            case InterfaceEvent():
                self._bus_power(report.event)
                if report.event in _POWER_FAILURES:
                    self.stats.power_errors += 1
                    if pending is not None and waiting:
                        pending.fail(
                            DaliBusPowerError(
                                f"{self.name} interface on {self.device}: DALI bus "
                                f"{_EVENT_TEXT[report.event]}"
                            )
                        )
            case InterfaceRefusal():
                self.stats.refusals += 1
                logger.warning(
                    "%s interface on %s refused a request: %s (%s)",
                    self.name,
                    self.device,
                    report.reason,
                    report.raw.hex(" "),
                )
                if pending is not None and waiting:
                    pending.fail(
                        DaliInterfaceError(
                            f"{self.name} interface on {self.device} refused frame "
                            f"{_hex_frame(pending.frame, pending.bits)}: {report.reason}"
                        )
                    )
            case GarbledReport():
                self.stats.garbled += 1
                logger.warning(
                    "%s interface on %s: garbled report %s: %s",
                    self.name,
                    self.device,
                    report.raw.hex(" "),
                    report.detail,
                )
                if pending is not None and waiting:
                    pending.fail(
                        DaliInterfaceError(
                            f"{self.name} interface on {self.device}: garbled report for "
                            f"frame {_hex_frame(pending.frame, pending.bits)}: {report.detail}"
                        )
                    )
            case DiscardedBytes():
                self.stats.discarded_bytes += len(report.raw)
                logger.warning(
                    "%s interface on %s: discarded %d byte(s) %s: %s",
                    self.name,
                    self.device,
                    len(report.raw),
                    report.raw.hex(" "),
                    report.detail,
                )
            case InterfaceNotice():
                logger.warning(
                    "%s interface on %s: %s (%s)",
                    self.name,
                    self.device,
                    report.detail,
                    report.raw.hex(" "),
                )
            case OtherTraffic():
                self.stats.other_traffic += 1
                logger.debug(
                    "%s interface on %s: %s (%s)",
                    self.name,
                    self.device,
                    report.detail,
                    report.raw.hex(" "),
                )

    def _bus_power(self, event: BusEvent) -> None:
        if event is self.bus_power:
            return
        self.bus_power = event
        if event is BusEvent.POWER_OK:
            logger.info("%s interface on %s: DALI bus power OK", self.name, self.device)
        else:
            logger.warning(
                "%s interface on %s: DALI bus %s", self.name, self.device, _EVENT_TEXT[event]
            )
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                logger.exception("%s interface: on_event(%s) failed", self.name, event)


_EVENT_TEXT: Final = {
    BusEvent.POWER_LOST: "power lost",
    BusEvent.SHORT_CIRCUIT: "short circuit",
    BusEvent.POWER_OK: "power OK",
}


def _close_opened_port(future: asyncio.Future[Any]) -> None:
    # open() was cancelled while the worker thread was opening the port: close what it opened.
    if future.cancelled() or future.exception() is not None:
        return
    with contextlib.suppress(Exception):
        future.result().close()


UNIX98_PTY_SLAVE_MAJORS: Final = range(136, 144)
"""Linux device majors of pseudo-terminal slaves (/dev/pts/N)."""


def _is_pseudo_terminal(device: str) -> bool:
    try:
        return os.major(os.stat(device).st_rdev) in UNIX98_PTY_SLAVE_MAJORS
    except (OSError, ValueError):
        return False


def _hex_frame(frame: int, bits: int) -> str:
    return f"{frame:0{bits // 4}X}"


def _describe_reply(reply: InterfaceReply) -> str:
    answer = reply.answer
    text = answer.outcome.value if answer.value is None else f"answer {answer.value:#04x}"
    if reply.frame is not None:
        text += f" to frame {_hex_frame(reply.frame, reply.bits or 16)}"
    return text


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


class UnknownInterface(LookupError):
    """No installed package registers a DALI interface of that name."""


def available_interfaces() -> list[str]:
    """Names of every registered DALI interface, sorted."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def load_interface(name: str) -> type[DaliInterface]:
    """The interface class registered as ``name`` in ``lampyre.dali_interfaces``."""
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, DaliInterface)):
            raise TypeError(
                f"entry point {name!r} ({ep.value}) is not a lampyre DaliInterface subclass"
            )
        if cls.name != name:
            raise TypeError(f"entry point {name!r} loads an interface named {cls.name!r}")
        return cls
    known = ", ".join(available_interfaces()) or "none"
    raise UnknownInterface(f"no DALI interface named {name!r} is installed (installed: {known})")
