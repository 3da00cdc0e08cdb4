"""Tridonic DALI RS232 PS/S "SCI2" and Lunatone DALI SCI RS232: a 5-byte binary protocol.

Host to interface ``[CTRL, DATA_HI, DATA_MID, DATA_LO, CHK]`` and back ``[STATUS, D1, D2, D3,
CHK]``, ``CHK`` being the XOR of the four bytes before it; 38400 baud 8N1.

* ``CTRL``: bit 7 monitor (forward bus traffic; set, as the published drivers do), bit 6 link
  check (nothing goes on the bus), bit 5 "echo" (1: confirm at once; 0: wait for an answer,
  then report), bit 4 send twice, bits 3-0 the frame mode (3 = 16-bit, 8 = 24-bit). A 16-bit
  frame travels in ``DATA_MID`` (address) and ``DATA_LO`` (opcode). Queries go as ``0x83``
  (wait), commands as ``0xA3`` (confirm at once): the interface queues frames in order, so a
  query after a command still reads the command's effect.
* ``STATUS``: high nibble the device id (6 for SCI2), low nibble 0 OK, 1 no answer, 2 backward
  frame (in ``D3``), 3/4/5/6/8 frames seen by the monitor, 7 error with the code in ``D3``:
  1 checksum, 2 bus short circuit, 3 receive error (a framing error: colliding answers),
  4 unknown command, 5 collision detected (our forward frame met another master's).

Replies do not echo the frame: a reply is matched to a transaction by order only, which is why
the base class waits out a quiet window after any failed transaction. To find frame
boundaries in noise the parser slides over the stream until five bytes pass the XOR check and
carry a known status of the expected device id; a partial frame is flushed after a short quiet
gap.
"""

from __future__ import annotations

from functools import reduce
from operator import xor
from typing import ClassVar, Final

from drivers.dali.interface import (
    BusEvent,
    DaliAnswer,
    DiscardedBytes,
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
    "DEVICE_ID",
    "IDLE_FLUSH_S",
    "RESPONSE_TIMEOUT_S",
    "Sci2Interface",
    "Sci2Parser",
    "encode_send",
    "xor_checksum",
]

RESPONSE_TIMEOUT_S: Final = 0.25
"""Worst case is a send-twice query: two 17 ms frames with up to 94 ms between them, the
interface's 10 ms answer wait and a 10 ms backward frame; commands are confirmed at once."""
IDLE_FLUSH_S: Final = 0.02
"""A reply's 5 bytes take 1.3 ms at 38400 baud: a frame still partial after this much silence
is not going to complete."""
DEVICE_ID: Final = 6
"""High nibble of every SCI2 status byte."""

FRAME_BYTES: Final = 5
CTRL_MONITOR: Final = 0x80
CTRL_LINK_CHECK: Final = 0x40
CTRL_ECHO: Final = 0x20
CTRL_SEND_TWICE: Final = 0x10
MODE_16_BIT: Final = 0x03
MODE_24_BIT: Final = 0x08

STATUS_OK: Final = 0x0
STATUS_NO_ANSWER: Final = 0x1
STATUS_BACKWARD_FRAME: Final = 0x2
STATUS_ERROR: Final = 0x7
MONITOR_STATUSES: Final = {0x3: "16-bit", 0x4: "eDALI", 0x5: "DSI", 0x6: "17-bit", 0x8: "24-bit"}

ERROR_CHECKSUM: Final = 1
ERROR_SHORT_CIRCUIT: Final = 2
ERROR_RECEIVE: Final = 3
ERROR_UNKNOWN_COMMAND: Final = 4
ERROR_COLLISION: Final = 5

_MODES: Final = {16: MODE_16_BIT, 24: MODE_24_BIT}
_KNOWN_STATUSES: Final = frozenset(
    {STATUS_OK, STATUS_NO_ANSWER, STATUS_BACKWARD_FRAME, STATUS_ERROR, *MONITOR_STATUSES}
)


def xor_checksum(data: bytes) -> int:
    return reduce(xor, data, 0)


def encode_send(
    frame: int, bits: int = 16, *, send_twice: bool = False, expect_answer: bool = False
) -> bytes:
    """The 5-byte request for one forward frame."""
    # Bit 7 is set as in every published driver's requests (0x83 / 0xA3): python-dali names it
    # "monitor enable"; frames the monitor forwards are counted as other traffic.
    ctrl = CTRL_MONITOR | _MODES[bits] | (0 if expect_answer else CTRL_ECHO)
    if send_twice:
        ctrl |= CTRL_SEND_TWICE
    body = bytes((ctrl,)) + frame.to_bytes(3, "big")
    return body + bytes((xor_checksum(body),))


def decode_reply(raw: bytes) -> Report:
    """The report in one XOR-valid 5-byte reply."""
    status = raw[0] & 0x0F
    value = raw[3]
    if status in (STATUS_OK, STATUS_NO_ANSWER):
        return InterfaceReply(DaliAnswer(Outcome.NO_ANSWER), raw)
    if status == STATUS_BACKWARD_FRAME:
        return InterfaceReply(DaliAnswer(Outcome.ANSWER, value), raw)
    if status in MONITOR_STATUSES:
        return OtherTraffic(f"monitor: {MONITOR_STATUSES[status]} frame on the bus", raw)
    if status == STATUS_ERROR:
        if value == ERROR_RECEIVE:
            return InterfaceReply(DaliAnswer(Outcome.COLLISION), raw)
        if value == ERROR_SHORT_CIRCUIT:
            return InterfaceEvent(BusEvent.SHORT_CIRCUIT, raw)
        if value == ERROR_CHECKSUM:
            return InterfaceRefusal("checksum error in the request", raw)
        if value == ERROR_UNKNOWN_COMMAND:
            return InterfaceRefusal("unknown command", raw)
        if value == ERROR_COLLISION:
            return InterfaceRefusal("forward frame collided with another master's", raw)
        return InterfaceRefusal(f"error code {value}", raw)
    return InterfaceNotice(f"unknown status {raw[0]:#04x}", raw)


class Sci2Parser:
    """Five-byte frames found by their XOR, a known status and the device id."""

    def __init__(self, device_id: int | None = DEVICE_ID) -> None:
        self.device_id = device_id
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def _is_frame(self, candidate: bytes) -> bool:
        status = candidate[0]
        if self.device_id is not None and status >> 4 != self.device_id:
            return False
        return (status & 0x0F) in _KNOWN_STATUSES and xor_checksum(candidate[:4]) == candidate[4]

    def feed(self, data: bytes) -> list[Report]:
        self._buffer += data
        reports: list[Report] = []
        dropped = bytearray()
        while len(self._buffer) >= FRAME_BYTES:
            candidate = bytes(self._buffer[:FRAME_BYTES])
            if self._is_frame(candidate):
                if dropped:
                    reports.append(DiscardedBytes("not a valid reply", bytes(dropped)))
                    dropped.clear()
                del self._buffer[:FRAME_BYTES]
                reports.append(decode_reply(candidate))
            else:
                dropped.append(self._buffer.pop(0))
        if dropped:
            reports.append(DiscardedBytes("not a valid reply", bytes(dropped)))
        return reports

    def flush(self) -> list[Report]:
        if not self._buffer:
            return []
        partial = bytes(self._buffer)
        self._buffer.clear()
        return [DiscardedBytes("incomplete reply", partial)]


class Sci2Interface(SerialDaliInterface):
    """Tridonic SCI2 / Lunatone SCI RS232, 38400 8N1."""

    name: ClassVar[str] = "sci2"
    default_baudrate: ClassVar[int] = 38400
    default_parity: ClassVar[str] = "N"
    supported_bits: ClassVar[frozenset[int]] = frozenset(_MODES)
    device_id: ClassVar[int | None] = DEVICE_ID
    """Status high nibble to accept; a clone reporting another id subclasses and sets it
    (``None`` accepts any, at the price of weaker resynchronisation)."""

    def encode_request(self, frame: int, bits: int, send_twice: bool, expect_answer: bool) -> bytes:
        return encode_send(frame, bits, send_twice=send_twice, expect_answer=expect_answer)

    def new_parser(self) -> ReportParser:
        return Sci2Parser(self.device_id)

    def response_timeout_s(self, send_twice: bool) -> float:
        return RESPONSE_TIMEOUT_S

    def idle_flush_s(self) -> float:
        return IDLE_FLUSH_S
