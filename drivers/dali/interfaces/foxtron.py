"""Foxtron DALI232 / DALI232e / DALInet ASCII protocol (Foxtron "Communication protocol" v1.7).

Every message is ``SOH`` (0x01), its bytes as uppercase ASCII hex, a checksum byte as hex
(``~sum(bytes) & 0xFF``), then ``ETB`` (0x17); the line is 19200 baud 8E1 and DTR powers the
converter (pyserial raises DTR on open). The converter does the DALI timing and multi-master
arbitration itself and reports each of our frames once, after its answer window:

* we send type ``0B`` ("send with sender differentiation"): ``0B prio bits data… param`` where
  ``param`` bit 0 asks for send-twice;
* ``0D bits data… 08 ans``: our frame, answered with ``ans``; ``0D bits data… 00``: answered
  but unreadable, i.e. a collision of several answers;
* ``0E bits data…``: our frame, nothing answered;
* ``03``/``04``: the same for other masters' frames (counted, ignored);
* ``05 code``: events: 0 bus power OK, 1 bus power lost or short circuit, 2 mains voltage on the
  bus, 3 unsuitable bus power supply, 4 transmit buffer full, 5 checksum error, 6 invalid
  command;
* ``07 item hi lo``: answer to a configuration query (we send none).

Replies echo the frame, so a late report for another frame is never taken for ours.
"""

from __future__ import annotations

from typing import ClassVar, Final

from drivers.dali.interface import (
    BusEvent,
    DaliAnswer,
    DiscardedBytes,
    GarbledReport,
    InterfaceEvent,
    InterfaceNotice,
    InterfaceRefusal,
    InterfaceReply,
    OtherTraffic,
    Outcome,
    Report,
    ReportParser,
    SerialDaliInterface,
)

__all__ = [
    "ETB",
    "IDLE_FLUSH_S",
    "RESPONSE_TIMEOUT_S",
    "SOH",
    "FoxtronInterface",
    "FoxtronParser",
    "checksum",
    "decode_message",
    "encode_message",
    "encode_send",
]

SOH: Final = 0x01
ETB: Final = 0x17

RESPONSE_TIMEOUT_S: Final = 0.5
"""The converter reports after the frame (17 ms, twice for send-twice), the answer window
(≤ 22 ms) and settling; it may also be finishing another master's frame or a queued one."""
IDLE_FLUSH_S: Final = 0.05
"""A report is at most 16 characters, under 10 ms at 19200 baud: a report still open after
this much silence lost its end."""
MAX_MESSAGE_CHARS: Final = 40
"""Hex characters between SOH and ETB in the longest report (a 24-bit ``0D`` is 14)."""

TYPE_LEGACY_SEND: Final = 0x01
TYPE_OTHER_ANSWERED: Final = 0x03
TYPE_OTHER_NO_ANSWER: Final = 0x04
TYPE_EVENT: Final = 0x05
TYPE_CONFIG_QUERY: Final = 0x06
TYPE_CONFIG_REPLY: Final = 0x07
TYPE_SEND: Final = 0x0B
TYPE_ANSWERED: Final = 0x0D
TYPE_NO_ANSWER: Final = 0x0E

PRIORITY_AUTO: Final = 0
PARAM_SEND_TWICE: Final = 0x01
ANSWER_BITS: Final = 8
COLLISION_BITS: Final = 0
_FRAME_BITS: Final = frozenset({8, 16, 24})
_HEX_DIGITS: Final = frozenset(b"0123456789ABCDEF")


def checksum(data: bytes) -> int:
    """``~(sum % 256) & 0xFF`` over the message bytes (type byte included)."""
    return ~sum(data) & 0xFF


def encode_message(data: bytes) -> bytes:
    """One message on the wire: SOH, hex of ``data`` and its checksum, ETB."""
    body = (data + bytes((checksum(data),))).hex().upper().encode("ascii")
    return bytes((SOH,)) + body + bytes((ETB,))


def encode_send(
    frame: int, bits: int = 16, *, send_twice: bool = False, priority: int = PRIORITY_AUTO
) -> bytes:
    """A type ``0B`` request for one forward frame."""
    param = PARAM_SEND_TWICE if send_twice else 0
    data = frame.to_bytes(bits // 8, "big")
    return encode_message(bytes((TYPE_SEND, priority, bits)) + data + bytes((param,)))


def decode_message(data: bytes, raw: bytes) -> list[Report]:
    """The reports in one checksum-valid message (``data`` excludes the checksum)."""
    kind = data[0]
    if kind in (TYPE_ANSWERED, TYPE_NO_ANSWER, TYPE_OTHER_ANSWERED, TYPE_OTHER_NO_ANSWER):
        return [_decode_frame_report(kind, data, raw)]
    if kind == TYPE_EVENT:
        if len(data) != 2:
            return [GarbledReport(f"event message of {len(data)} bytes, expected 2", raw)]
        return _decode_event(data[1], raw)
    if kind == TYPE_CONFIG_REPLY:
        return [OtherTraffic(f"configuration reply {data[1:].hex(' ')}", raw)]
    return [InterfaceNotice(f"message of unknown type {kind:#04x}", raw)]


def _decode_frame_report(kind: int, data: bytes, raw: bytes) -> Report:
    ours = kind in (TYPE_ANSWERED, TYPE_NO_ANSWER)
    if len(data) < 2:
        return GarbledReport(f"type {kind:#04x} message without a bit count", raw)
    bits = data[1]
    if kind == TYPE_OTHER_NO_ANSWER and bits == 0:
        return OtherTraffic("framing error on the bus (another master)", raw)
    if bits not in _FRAME_BITS:
        return GarbledReport(f"frame of {bits} bits", raw)
    end = 2 + bits // 8
    frame = int.from_bytes(data[2:end], "big")
    rest = data[end:]
    if kind in (TYPE_NO_ANSWER, TYPE_OTHER_NO_ANSWER):
        if len(data) < end or rest:
            return GarbledReport(f"no-answer report of {len(data)} bytes", raw)
        answer = DaliAnswer(Outcome.NO_ANSWER)
    elif rest == bytes((COLLISION_BITS,)):
        answer = DaliAnswer(Outcome.COLLISION)
    elif len(rest) == 2 and rest[0] == ANSWER_BITS:
        answer = DaliAnswer(Outcome.ANSWER, rest[1])
    else:
        return GarbledReport(f"answer part {rest.hex(' ') or 'missing'}", raw)
    if not ours:
        return OtherTraffic(
            f"another master's frame {frame:0{bits // 4}X}: {answer.outcome.value}", raw
        )
    return InterfaceReply(answer, raw, frame=frame, bits=bits)


def _decode_event(code: int, raw: bytes) -> list[Report]:
    if code == 0:
        return [InterfaceEvent(BusEvent.POWER_OK, raw)]
    if code == 1:
        return [InterfaceEvent(BusEvent.POWER_LOST, raw)]
    if code == 2:
        # The bus cannot carry DALI with mains on it; what matters downstream is "no bus".
        return [
            InterfaceNotice("mains voltage on the DALI bus", raw),
            InterfaceEvent(BusEvent.POWER_LOST, raw),
        ]
    if code == 3:
        return [InterfaceNotice("unsuitable DALI bus power supply", raw)]
    if code == 4:
        return [InterfaceRefusal("transmit buffer full", raw)]
    if code == 5:
        return [InterfaceRefusal("checksum error in the request", raw)]
    if code == 6:
        return [InterfaceRefusal("invalid command", raw)]
    return [InterfaceNotice(f"unknown event code {code}", raw)]


class FoxtronParser:
    """SOH … ETB framing. Bytes outside a message are noise; a new SOH inside a message means
    its end was lost. Only uppercase hex with a valid checksum is decoded."""

    def __init__(self) -> None:
        self._message: bytearray | None = None
        self._noise = bytearray()

    @property
    def buffered(self) -> int:
        return 0 if self._message is None else 1 + len(self._message)

    def feed(self, data: bytes) -> list[Report]:
        reports: list[Report] = []
        for byte in data:
            message = self._message
            if byte == SOH:
                self._drop_noise(reports)
                if message is not None:
                    reports.append(
                        DiscardedBytes("report cut short by the next one", bytes((SOH,)) + message)
                    )
                self._message = bytearray()
            elif message is None:
                self._noise.append(byte)
            elif byte == ETB:
                self._message = None
                reports.extend(_decode_wire(bytes(message)))
            else:
                message.append(byte)
                if len(message) > MAX_MESSAGE_CHARS:
                    self._message = None
                    reports.append(
                        DiscardedBytes("report longer than any valid one", bytes((SOH,)) + message)
                    )
        self._drop_noise(reports)
        return reports

    def flush(self) -> list[Report]:
        reports: list[Report] = []
        self._drop_noise(reports)
        if self._message is not None:
            reports.append(DiscardedBytes("report without its end", bytes((SOH,)) + self._message))
            self._message = None
        return reports

    def _drop_noise(self, reports: list[Report]) -> None:
        if self._noise:
            reports.append(DiscardedBytes("bytes outside SOH…ETB", bytes(self._noise)))
            self._noise.clear()


def _decode_wire(body: bytes) -> list[Report]:
    raw = bytes((SOH,)) + body + bytes((ETB,))
    if len(body) < 4 or len(body) % 2 or not _HEX_DIGITS.issuperset(body):
        return [GarbledReport("not a whole number of uppercase hex bytes", raw)]
    data = bytes.fromhex(body.decode("ascii"))
    payload, received = data[:-1], data[-1]
    expected = checksum(payload)
    if received != expected:
        return [GarbledReport(f"checksum {received:02X}, expected {expected:02X}", raw)]
    return decode_message(payload, raw)


class FoxtronInterface(SerialDaliInterface):
    """Foxtron DALI232 / DALI232e on RS-232, 19200 8E1."""

    name: ClassVar[str] = "foxtron"
    default_baudrate: ClassVar[int] = 19200
    default_parity: ClassVar[str] = "E"
    supported_bits: ClassVar[frozenset[int]] = frozenset({16, 24})

    def encode_request(self, frame: int, bits: int, send_twice: bool, expect_answer: bool) -> bytes:
        # The converter always reports answer or no answer; expect_answer changes nothing here.
        return encode_send(frame, bits, send_twice=send_twice)

    def new_parser(self) -> ReportParser:
        return FoxtronParser()

    def response_timeout_s(self, send_twice: bool) -> float:
        return RESPONSE_TIMEOUT_S

    def idle_flush_s(self) -> float:
        return IDLE_FLUSH_S
