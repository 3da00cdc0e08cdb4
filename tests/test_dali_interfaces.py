"""The serial DALI interface transports (Foxtron DALI232, Tridonic SCI2) against the simulator's
interface emulators over real pseudo-terminals: the documents' vectors both ways, answer / no
answer / collision, send-twice, faults on either side of the wire, bus power events, and the
parsers under arbitrary bytes."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import reduce
from operator import xor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agent.sdk import BusUnavailable, TransientError
from drivers.dali import interface
from drivers.dali.interface import (
    BusEvent,
    DaliAnswer,
    DaliBusPowerError,
    DaliInterface,
    DaliInterfaceError,
    DiscardedBytes,
    GarbledReport,
    InterfaceEvent,
    InterfaceRefusal,
    InterfaceReply,
    Outcome,
    SerialDaliInterface,
    UnknownInterface,
    available_interfaces,
    load_interface,
)
from drivers.dali.interfaces import FoxtronInterface, Sci2Interface, foxtron, sci2
from drivers.dali.interfaces.foxtron import FoxtronParser
from drivers.dali.interfaces.sci2 import Sci2Parser
from firmware_sim.dali.interfaces import (
    EMULATORS,
    FoxtronEmulator,
    InterfaceEmulator,
    Sci2Emulator,
    foxtron_message,
    sci2_frame,
)

TEST_BOUND_S = 20.0
RESPONSE_TIMEOUT_S = 0.3
AFTER_FAILURE_QUIET_S = 0.3
LATE_REPLY_S = 0.45
"""Later than the response timeout, inside the quiet window that follows it."""
BOTH = pytest.mark.parametrize("kind", ["foxtron", "sci2"])
HOSTS: dict[str, type[SerialDaliInterface]] = {"foxtron": FoxtronInterface, "sci2": Sci2Interface}

QUERY_ACTUAL_LEVEL_5 = 0x0BA0
DAPC_254_5 = 0x0AFE
RESET_BROADCAST = 0xFF20
LAMP_FAILURE_BROADCAST = 0xFF92


@pytest.fixture(autouse=True, scope="module")
def _short_timeouts() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(foxtron, "RESPONSE_TIMEOUT_S", RESPONSE_TIMEOUT_S)
        patch.setattr(sci2, "RESPONSE_TIMEOUT_S", RESPONSE_TIMEOUT_S)
        patch.setattr(interface, "AFTER_FAILURE_QUIET_S", AFTER_FAILURE_QUIET_S)
        yield


# A tiny DALI line: fixed answers per frame --------------------------------------------------
@dataclass(frozen=True)
class LineResult:
    answers: tuple[int, ...] = ()
    power_ok: bool = True


class TableLine:
    """A DALI line whose gear answer each frame from a fixed table (several answers = a
    collision); it records every frame it carried."""

    def __init__(self, answers: Mapping[int, tuple[int, ...]] | None = None) -> None:
        self.answers = dict(answers or {})
        self.power_ok = True
        self.sent: list[tuple[int, int, bool]] = []
        self.hold: asyncio.Event | None = None

    async def transact(self, frame: int, bits: int = 16, send_twice: bool = False) -> LineResult:
        self.sent.append((frame, bits, send_twice))
        if self.hold is not None:
            await self.hold.wait()
        await asyncio.sleep(0)
        if not self.power_ok:
            return LineResult((), power_ok=False)
        return LineResult(self.answers.get(frame, ()))


def run(body: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(TEST_BOUND_S):
            await body()

    asyncio.run(bounded())


@asynccontextmanager
async def connected(
    kind: str, line: TableLine, events: list[BusEvent] | None = None
) -> AsyncIterator[tuple[InterfaceEmulator, SerialDaliInterface]]:
    emulator = EMULATORS[kind](line)
    path = await emulator.start()
    host = HOSTS[kind](path, on_event=None if events is None else events.append)
    try:
        await host.open()
        try:
            yield emulator, host
        finally:
            await host.close()
    finally:
        await emulator.stop()


async def eventually(condition: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.005)
    assert condition(), what


def fox(text: str) -> bytes:
    return b"\x01" + text.encode("ascii") + b"\x17"


class RawPort:
    """The slave side of an emulator's pty, without pyserial: exact bytes in and out."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    async def receive(self, size: int) -> bytes:
        data = bytearray()
        async with asyncio.timeout(5):
            while len(data) < size:
                try:
                    data += os.read(self.fd, size - len(data))
                except BlockingIOError:
                    await asyncio.sleep(0.002)
        return bytes(data)

    async def receive_foxtron(self) -> bytes:
        data = bytearray()
        async with asyncio.timeout(5):
            while not data.endswith(b"\x17"):
                try:
                    data += os.read(self.fd, 1)
                except BlockingIOError:
                    await asyncio.sleep(0.002)
        return bytes(data)

    def close(self) -> None:
        os.close(self.fd)


# The documents' vectors, encoder by encoder ---------------------------------------------------
def test_foxtron_checksum_matches_the_documents_own_example() -> None:
    wire = bytes.fromhex("0130313030313046463130444617")
    assert foxtron.encode_message(bytes.fromhex("010010FF10")) == wire
    assert foxtron_message(bytes.fromhex("010010FF10")) == wire


FOXTRON_VECTORS = [
    # (data part, ASCII between SOH and ETB)
    ("0B 00 10 0A FE 00", "0B00100AFE00DC"),
    ("0B 00 10 FF 20 01", "0B0010FF2001C4"),
    ("0B 00 10 0B A0 00", "0B00100BA00039"),
    ("0D 10 0B A0 08 FE", "0D100BA008FE31"),
    ("0E 10 0B A0", "0E100BA036"),
    ("0D 10 FF 92 00", "0D10FF920051"),
]


@pytest.mark.parametrize(("data", "ascii"), FOXTRON_VECTORS)
def test_foxtron_vector_table(data: str, ascii: str) -> None:
    assert foxtron.encode_message(bytes.fromhex(data)) == fox(ascii)
    assert foxtron_message(bytes.fromhex(data)) == fox(ascii)


def test_foxtron_send_requests() -> None:
    assert foxtron.encode_send(DAPC_254_5) == fox("0B00100AFE00DC")
    assert foxtron.encode_send(RESET_BROADCAST, send_twice=True) == fox("0B0010FF2001C4")
    assert foxtron.encode_send(QUERY_ACTUAL_LEVEL_5) == fox("0B00100BA00039")
    # The document's "group 2 OFF" example carries the frame 85 00.
    assert foxtron.encode_send(0x8500) == foxtron_message(bytes.fromhex("0B0010850000"))
    assert foxtron.encode_send(0x123456, 24) == foxtron_message(bytes.fromhex("0B001812345600"))


@pytest.mark.parametrize(
    ("ascii", "expected"),
    [
        ("0D100BA008FE31", InterfaceReply(DaliAnswer(Outcome.ANSWER, 0xFE), b"", 0x0BA0, 16)),
        ("0E100BA036", InterfaceReply(DaliAnswer(Outcome.NO_ANSWER), b"", 0x0BA0, 16)),
        ("0D10FF920051", InterfaceReply(DaliAnswer(Outcome.COLLISION), b"", 0xFF92, 16)),
    ],
)
def test_foxtron_reply_vectors_decode(ascii: str, expected: InterfaceReply) -> None:
    (report,) = FoxtronParser().feed(fox(ascii))
    assert isinstance(report, InterfaceReply)
    assert (report.answer, report.frame, report.bits) == (
        expected.answer,
        expected.frame,
        expected.bits,
    )
    assert report.raw == fox(ascii)


def test_foxtron_document_lamp_failure_answer() -> None:
    # "query lamp failure at address 12 answered YES = 0D 10 19 92 08 FF"
    (report,) = FoxtronParser().feed(foxtron.encode_message(bytes.fromhex("0D10199208FF")))
    assert isinstance(report, InterfaceReply)
    assert (report.frame, report.answer) == (0x1992, DaliAnswer(Outcome.ANSWER, 0xFF))


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (0, [InterfaceEvent]),
        (1, [InterfaceEvent]),
        (4, [InterfaceRefusal]),
        (5, [InterfaceRefusal]),
        (6, [InterfaceRefusal]),
    ],
)
def test_foxtron_events_decode(code: int, expected: list[type]) -> None:
    reports = FoxtronParser().feed(foxtron_message(bytes((0x05, code))))
    assert [type(r) for r in reports] == expected


def test_sci2_vectors() -> None:
    assert sci2.encode_send(DAPC_254_5) == bytes.fromhex("A3000AFE57")
    assert sci2.encode_send(QUERY_ACTUAL_LEVEL_5, expect_answer=True) == bytes.fromhex("83000BA028")
    assert sci2_frame(0xA3, 0x00, 0x0A, 0xFE) == bytes.fromhex("A3000AFE57")
    assert sci2_frame(0x62, 0, 0, 0xFE) == bytes.fromhex("620000FE9C")
    assert sci2_frame(0x61, 0, 0, 0) == bytes.fromhex("6100000061")
    answer, no_answer = Sci2Parser().feed(bytes.fromhex("620000FE9C 6100000061"))
    assert isinstance(answer, InterfaceReply)
    assert answer.answer == DaliAnswer(Outcome.ANSWER, 0xFE)
    assert isinstance(no_answer, InterfaceReply)
    assert no_answer.answer == DaliAnswer(Outcome.NO_ANSWER)
    # Send twice is CTRL bit 4; a 24-bit frame is mode 8 with all three data bytes.
    assert sci2.encode_send(RESET_BROADCAST, send_twice=True)[0] == 0xB3
    assert sci2.encode_send(0x123456, 24, expect_answer=True)[:4] == bytes.fromhex("88123456")


@pytest.mark.parametrize(
    ("code", "kind"),
    [(1, InterfaceRefusal), (2, InterfaceEvent), (3, InterfaceReply), (4, InterfaceRefusal)],
)
def test_sci2_error_codes_decode(code: int, kind: type) -> None:
    (report,) = Sci2Parser().feed(sci2_frame(0x67, 0, 0, code))
    assert isinstance(report, kind)
    if isinstance(report, InterfaceReply):
        assert report.answer.outcome is Outcome.COLLISION
    if isinstance(report, InterfaceEvent):
        assert report.event is BusEvent.SHORT_CIRCUIT


# Both ways over a pty ---------------------------------------------------------------------
@dataclass(frozen=True)
class WireCase:
    kind: str
    frame: int
    send_twice: bool
    expect_answer: bool
    answers: tuple[int, ...]
    request: bytes
    reply: bytes
    answer: DaliAnswer


WIRE_CASES = [
    WireCase("foxtron", DAPC_254_5, False, False, (), fox("0B00100AFE00DC"), b"",
             DaliAnswer(Outcome.NO_ANSWER)),
    WireCase("foxtron", RESET_BROADCAST, True, False, (), fox("0B0010FF2001C4"), b"",
             DaliAnswer(Outcome.NO_ANSWER)),
    WireCase("foxtron", QUERY_ACTUAL_LEVEL_5, False, True, (0xFE,), fox("0B00100BA00039"),
             fox("0D100BA008FE31"), DaliAnswer(Outcome.ANSWER, 0xFE)),
    WireCase("foxtron", QUERY_ACTUAL_LEVEL_5, False, True, (), fox("0B00100BA00039"),
             fox("0E100BA036"), DaliAnswer(Outcome.NO_ANSWER)),
    WireCase("foxtron", LAMP_FAILURE_BROADCAST, False, True, (0xFF, 0xFF), b"",
             fox("0D10FF920051"), DaliAnswer(Outcome.COLLISION)),
    WireCase("sci2", DAPC_254_5, False, False, (), bytes.fromhex("A3000AFE57"),
             bytes.fromhex("6000000060"), DaliAnswer(Outcome.NO_ANSWER)),
    WireCase("sci2", RESET_BROADCAST, True, False, (), sci2_frame(0xB3, 0, 0xFF, 0x20),
             bytes.fromhex("6000000060"), DaliAnswer(Outcome.NO_ANSWER)),
    WireCase("sci2", QUERY_ACTUAL_LEVEL_5, False, True, (0xFE,), bytes.fromhex("83000BA028"),
             bytes.fromhex("620000FE9C"), DaliAnswer(Outcome.ANSWER, 0xFE)),
    WireCase("sci2", QUERY_ACTUAL_LEVEL_5, False, True, (), bytes.fromhex("83000BA028"),
             bytes.fromhex("6100000061"), DaliAnswer(Outcome.NO_ANSWER)),
    WireCase("sci2", LAMP_FAILURE_BROADCAST, False, True, (0xFF, 0xFF), b"",
             sci2_frame(0x67, 0, 0, 3), DaliAnswer(Outcome.COLLISION)),
]  # fmt: skip


@pytest.mark.parametrize(
    "case", WIRE_CASES, ids=[f"{c.kind}-{c.frame:04X}-{c.answer.outcome.value}" for c in WIRE_CASES]
)
def test_vectors_over_the_wire(case: WireCase) -> None:
    async def body() -> None:
        line = TableLine({case.frame: case.answers})
        async with connected(case.kind, line) as (emulator, host):
            answer = await host.send(
                case.frame, send_twice=case.send_twice, expect_answer=case.expect_answer
            )
            assert answer == case.answer
            assert line.sent == [(case.frame, 16, case.send_twice)]
            if case.request:
                assert list(emulator.received) == [case.request]
            if case.reply:
                assert emulator.sent[-1] == case.reply
            assert host.stats.transactions == 1

    run(body)


@BOTH
def test_24_bit_frames_and_many_transactions_in_order(kind: str) -> None:
    async def body() -> None:
        line = TableLine({0x0100 + n * 2 + 1: (n,) for n in range(20)})
        async with connected(kind, line) as (_, host):
            answer = await host.send(0xC1FE00, bits=24, expect_answer=True)
            assert answer == DaliAnswer(Outcome.NO_ANSWER)
            assert line.sent == [(0xC1FE00, 24, False)]
            # Concurrent callers are served one at a time, each with its own answer.
            frames = [0x0100 + n * 2 + 1 for n in range(20)]
            answers = await asyncio.gather(
                *(host.send(frame, expect_answer=True) for frame in frames)
            )
            assert [a.value for a in answers] == list(range(20))
            assert [frame for frame, _, _ in line.sent[1:]] == frames
            assert host.stats.answers == 20

    run(body)


@BOTH
def test_frame_and_bits_are_checked_before_anything_is_sent(kind: str) -> None:
    async def body() -> None:
        line = TableLine()
        async with connected(kind, line) as (_, host):
            with pytest.raises(ValueError, match="bits"):
                await host.send(0x12, bits=8)
            with pytest.raises(ValueError, match="does not fit"):
                await host.send(0x10000)
            assert line.sent == []

    run(body)


# Faults on the interface side -------------------------------------------------------------
async def assert_next_transaction_correct(
    host: SerialDaliInterface, line: TableLine, value: int
) -> None:
    line.answers[QUERY_ACTUAL_LEVEL_5] = (value,)
    answer = await host.send(QUERY_ACTUAL_LEVEL_5, expect_answer=True)
    assert answer == DaliAnswer(Outcome.ANSWER, value)


@BOTH
def test_noise_before_a_reply_is_discarded_and_the_reply_read(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        line = TableLine({QUERY_ACTUAL_LEVEL_5: (0x42,)})
        async with connected(kind, line) as (emulator, host):
            emulator.faults.garbage_before_reply = b"\x00\xff\x13\x37\x55"
            answer = await host.send(QUERY_ACTUAL_LEVEL_5, expect_answer=True)
            assert answer == DaliAnswer(Outcome.ANSWER, 0x42)
            assert host.stats.discarded_bytes == 5
            await assert_next_transaction_correct(host, line, 0x43)

    with caplog.at_level(logging.WARNING, logger="drivers.dali.interface"):
        run(body)
    assert "discarded 5 byte(s) 00 ff 13 37 55" in caplog.text


@BOTH
@pytest.mark.parametrize("fault", ["bad_checksum_replies", "truncated_replies", "dropped_replies"])
def test_a_damaged_or_missing_reply_fails_only_its_transaction(
    kind: str, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        line = TableLine({QUERY_ACTUAL_LEVEL_5: (0x10,)})
        async with connected(kind, line) as (emulator, host):
            setattr(emulator.faults, fault, 1)
            with pytest.raises(DaliInterfaceError) as caught:
                await host.send(QUERY_ACTUAL_LEVEL_5, expect_answer=True)
            assert isinstance(caught.value, TransientError)
            await assert_next_transaction_correct(host, line, 0x20)
            await assert_next_transaction_correct(host, line, 0x30)
            assert line.sent == [(QUERY_ACTUAL_LEVEL_5, 16, False)] * 3

    with caplog.at_level(logging.WARNING, logger="drivers.dali.interface"):
        run(body)
    if fault == "bad_checksum_replies" and kind == "foxtron":
        assert "garbled report" in caplog.text and "checksum" in caplog.text
    elif fault != "dropped_replies":
        assert "discarded" in caplog.text


@BOTH
def test_a_late_reply_is_not_taken_for_the_next_transactions(kind: str) -> None:
    async def body() -> None:
        line = TableLine({QUERY_ACTUAL_LEVEL_5: (0x10,)})
        async with connected(kind, line) as (emulator, host):
            emulator.faults.reply_delay_s = LATE_REPLY_S
            with pytest.raises(DaliInterfaceError, match="no report"):
                await host.send(QUERY_ACTUAL_LEVEL_5, expect_answer=True)
            emulator.faults.reply_delay_s = 0.0
            # Same frame, new answer: the late 0x10 must not answer it.
            await assert_next_transaction_correct(host, line, 0x20)
            assert host.stats.unexpected_reports == 1
            assert host.stats.timeouts == 1

    run(body)


@BOTH
def test_unsolicited_reports_are_logged_and_ignored(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        line = TableLine()
        async with connected(kind, line) as (emulator, host):
            stray = fox("0D100BA008FE31") if kind == "foxtron" else bytes.fromhex("620000FE9C")
            emulator.inject(stray)
            await eventually(lambda: host.stats.unexpected_reports == 1, "stray report seen")
            await assert_next_transaction_correct(host, line, 0x07)

    with caplog.at_level(logging.WARNING, logger="drivers.dali.interface"):
        run(body)
    assert "answers no pending transaction" in caplog.text


def test_foxtron_report_for_another_frame_does_not_settle_ours() -> None:
    async def body() -> None:
        line = TableLine({QUERY_ACTUAL_LEVEL_5: (0x33,)})
        async with connected("foxtron", line) as (emulator, host):
            # A well-formed report for another frame arrives while we wait: it is not ours.
            emulator.faults.garbage_before_reply = foxtron_message(bytes.fromhex("0D100DA00811"))
            answer = await host.send(QUERY_ACTUAL_LEVEL_5, expect_answer=True)
            assert answer == DaliAnswer(Outcome.ANSWER, 0x33)
            assert host.stats.unexpected_reports == 1

    run(body)


def test_foxtron_other_masters_traffic_is_counted_and_ignored() -> None:
    async def body() -> None:
        line = TableLine({QUERY_ACTUAL_LEVEL_5: (0x01,)})
        async with connected("foxtron", line) as (emulator, host):
            emulator.faults.garbage_before_reply = foxtron_message(
                bytes.fromhex("03100BA00899")
            ) + foxtron_message(bytes.fromhex("0400"))
            await assert_next_transaction_correct(host, line, 0x02)
            assert host.stats.other_traffic == 2
            assert host.stats.unexpected_reports == 0

    run(body)


@pytest.mark.parametrize(("code", "reason"), [(4, "buffer full"), (6, "invalid command")])
def test_foxtron_refusal_fails_the_transaction(code: int, reason: str) -> None:
    async def body() -> None:
        line = TableLine()
        async with connected("foxtron", line) as (emulator, host):
            # The refusal comes first; the report that follows it then answers nothing.
            emulator.faults.garbage_before_reply = foxtron_message(bytes((0x05, code)))
            with pytest.raises(DaliInterfaceError, match=reason):
                await host.send(DAPC_254_5)
            await assert_next_transaction_correct(host, line, 0x09)

    run(body)


# Garbage from the host side, answered as the real interfaces do ------------------------------
def test_foxtron_emulator_answers_bad_requests_and_keeps_the_next() -> None:
    async def body() -> None:
        line = TableLine()
        emulator = FoxtronEmulator(line)
        port = RawPort(await emulator.start())
        try:
            checksum_error = foxtron_message(b"\x05\x05")
            invalid = foxtron_message(b"\x05\x06")
            port.send(fox("0B00100AFE00DD"))  # wrong checksum
            assert await port.receive_foxtron() == checksum_error
            port.send(fox("0b00100afe00dc"))  # lowercase hex is not the protocol
            assert await port.receive_foxtron() == invalid
            port.send(foxtron_message(bytes.fromhex("2A0010")))  # unknown type
            assert await port.receive_foxtron() == invalid
            port.send(foxtron_message(bytes.fromhex("0B00100AFE")))  # send without param
            assert await port.receive_foxtron() == invalid
            port.send(b"\x00noise\x01\x30\x42")  # noise, then a request cut short
            port.send(fox("0B00100AFE00DC"))
            assert await port.receive_foxtron() == foxtron_message(bytes.fromhex("0E100AFE"))
            assert line.sent == [(DAPC_254_5, 16, False)]
            port.send(foxtron_message(b"\x06\x02"))  # configuration: firmware version
            assert await port.receive_foxtron() == foxtron_message(b"\x07\x02\x01\x07")
        finally:
            port.close()
            await emulator.stop()

    run(body)


def test_foxtron_emulator_reports_legacy_sends_like_other_masters() -> None:
    async def body() -> None:
        line = TableLine({QUERY_ACTUAL_LEVEL_5: (0x80,)})
        emulator = FoxtronEmulator(line)
        port = RawPort(await emulator.start())
        try:
            port.send(foxtron_message(bytes.fromhex("0100100BA0")))
            assert await port.receive_foxtron() == foxtron_message(bytes.fromhex("03100BA00880"))
        finally:
            port.close()
            await emulator.stop()

    run(body)


def test_foxtron_emulator_reports_a_full_queue() -> None:
    async def body() -> None:
        line = TableLine()
        line.hold = asyncio.Event()
        emulator = FoxtronEmulator(line)
        port = RawPort(await emulator.start())
        try:
            # One frame on the bus, 16 queued, the 18th refused.
            port.send(foxtron.encode_send(DAPC_254_5))
            await eventually(lambda: bool(line.sent), "first frame on the bus")
            port.send(foxtron.encode_send(DAPC_254_5) * 17)
            assert await port.receive_foxtron() == foxtron_message(b"\x05\x04")
            line.hold.set()
            replies = [await port.receive_foxtron() for _ in range(17)]
            assert set(replies) == {foxtron_message(bytes.fromhex("0E100AFE"))}
            assert emulator.stats.queue_overflows == 1
        finally:
            port.close()
            await emulator.stop()

    run(body)


def test_sci2_emulator_answers_bad_requests_and_keeps_the_next() -> None:
    async def body() -> None:
        line = TableLine({QUERY_ACTUAL_LEVEL_5: (0x99,)})
        emulator = Sci2Emulator(line)
        port = RawPort(await emulator.start())
        try:
            checksum_error = sci2_frame(0x67, 0, 0, 1)
            port.send(bytes.fromhex("83000BA029"))  # wrong XOR
            assert await port.receive(5) == checksum_error
            port.send(b"\x83\x00")  # truncated
            assert await port.receive(5) == checksum_error
            port.send(sci2_frame(0x85, 0, 0x0B, 0xA0))  # mode 5 (DSI) is not supported
            assert await port.receive(5) == sci2_frame(0x67, 0, 0, 4)
            port.send(b"\x13\x37" + bytes.fromhex("83000BA028"))  # noise right before a request
            assert await port.receive(5) == sci2_frame(0x62, 0, 0, 0x99)
            port.send(sci2_frame(0x40, 0, 0, 0))  # link check: answered, nothing on the bus
            assert await port.receive(5) == sci2_frame(0x60, 0, 0, 0)
            assert line.sent == [(QUERY_ACTUAL_LEVEL_5, 16, False)]
        finally:
            port.close()
            await emulator.stop()

    run(body)


# Bus power ---------------------------------------------------------------------------------
def test_foxtron_spontaneous_power_events() -> None:
    async def body() -> None:
        events: list[BusEvent] = []
        line = TableLine()
        async with connected("foxtron", line, events) as (emulator, host):
            emulator.emit_event(BusEvent.POWER_LOST)
            await eventually(lambda: events == [BusEvent.POWER_LOST], "power lost reported")
            assert host.bus_power is BusEvent.POWER_LOST
            with pytest.raises(DaliBusPowerError, match="power lost"):
                await host.send(DAPC_254_5)
            assert line.sent == []  # the interface refused to send without bus power
            emulator.emit_event(BusEvent.POWER_OK)
            await eventually(lambda: events[-1:] == [BusEvent.POWER_OK], "power back")
            assert await host.send(DAPC_254_5) == DaliAnswer(Outcome.NO_ANSWER)
            assert events == [BusEvent.POWER_LOST, BusEvent.POWER_OK]

    run(body)


@BOTH
def test_line_power_loss_fails_transactions_and_recovery_is_reported(kind: str) -> None:
    async def body() -> None:
        events: list[BusEvent] = []
        line = TableLine({QUERY_ACTUAL_LEVEL_5: (0x05,)})
        async with connected(kind, line, events) as (_, host):
            line.power_ok = False
            for _ in range(2):
                with pytest.raises(DaliBusPowerError):
                    await host.send(QUERY_ACTUAL_LEVEL_5, expect_answer=True)
            lost = BusEvent.POWER_LOST if kind == "foxtron" else BusEvent.SHORT_CIRCUIT
            assert events == [lost]  # reported once, on the change
            line.power_ok = True
            await assert_next_transaction_correct(host, line, 0x06)
            assert events == [lost, BusEvent.POWER_OK]
            assert host.stats.power_errors == 2

    run(body)


def test_sci2_short_circuit_shows_in_the_next_reply() -> None:
    async def body() -> None:
        events: list[BusEvent] = []
        line = TableLine()
        async with connected("sci2", line, events) as (emulator, host):
            emulator.emit_event(BusEvent.SHORT_CIRCUIT)
            with pytest.raises(DaliBusPowerError, match="short circuit"):
                await host.send(DAPC_254_5)  # echo mode: refused at once
            with pytest.raises(DaliBusPowerError):
                await host.send(QUERY_ACTUAL_LEVEL_5, expect_answer=True)
            emulator.emit_event(BusEvent.POWER_OK)
            assert await host.send(DAPC_254_5) == DaliAnswer(Outcome.NO_ANSWER)
            assert events == [BusEvent.SHORT_CIRCUIT, BusEvent.POWER_OK]

    run(body)


# Port lifecycle --------------------------------------------------------------------------
@BOTH
def test_open_failure_close_and_reopen(kind: str, tmp_path: Path) -> None:
    async def body() -> None:
        missing = HOSTS[kind](str(tmp_path / "no-such-tty"))
        with pytest.raises(BusUnavailable, match="cannot open serial port"):
            await missing.open()
        assert not missing.is_open
        await missing.close()  # idempotent, even never opened
        with pytest.raises(BusUnavailable, match="not open"):
            await missing.send(DAPC_254_5)

        line = TableLine({QUERY_ACTUAL_LEVEL_5: (0x01,)})
        async with connected(kind, line) as (emulator, host):
            # The port is locked: a second opener is refused.
            second = HOSTS[kind](emulator.path)
            with pytest.raises(BusUnavailable):
                await second.open()
            await host.close()
            await host.close()
            with pytest.raises(BusUnavailable):
                await host.send(DAPC_254_5)
            await host.open()
            await assert_next_transaction_correct(host, line, 0x02)

    run(body)


@BOTH
def test_port_vanishing_fails_the_transaction_in_flight(kind: str) -> None:
    async def body() -> None:
        line = TableLine()
        line.hold = asyncio.Event()
        emulator = EMULATORS[kind](line)
        host = HOSTS[kind](await emulator.start())
        await host.open()
        try:
            sending = asyncio.create_task(host.send(QUERY_ACTUAL_LEVEL_5, expect_answer=True))
            await eventually(lambda: bool(line.sent), "frame on the line")
            await emulator.stop()  # the interface is unplugged
            with pytest.raises(BusUnavailable):
                await sending
            assert not host.is_open
            with pytest.raises(BusUnavailable):
                await host.send(DAPC_254_5)
            # Plugged back in (a new pty here): the same object opens again.
            line.hold = None
            await emulator.start()
            host.device = emulator.path
            await host.open()
            assert await host.send(DAPC_254_5) == DaliAnswer(Outcome.NO_ANSWER)
        finally:
            await host.close()
            await emulator.stop()

    run(body)


def test_close_fails_a_transaction_in_flight() -> None:
    async def body() -> None:
        line = TableLine()
        line.hold = asyncio.Event()
        async with connected("sci2", line) as (_, host):
            sending = asyncio.create_task(host.send(QUERY_ACTUAL_LEVEL_5, expect_answer=True))
            await eventually(lambda: bool(line.sent), "frame on the line")
            await host.close()
            with pytest.raises(BusUnavailable, match="closed"):
                await sending

    run(body)


# Registry ----------------------------------------------------------------------------------
def test_built_in_interfaces_are_registered() -> None:
    assert {"foxtron", "sci2"} <= set(available_interfaces())
    assert load_interface("foxtron") is FoxtronInterface
    assert load_interface("sci2") is Sci2Interface
    for name, emulator in EMULATORS.items():
        assert load_interface(name).name == emulator.name
    with pytest.raises(UnknownInterface, match="no DALI interface named 'dali9000'"):
        load_interface("dali9000")


VENDOR_MODULE = """
from drivers.dali.interfaces.sci2 import Sci2Interface

class AcmeInterface(Sci2Interface):
    name = "acme"
    default_baudrate = 9600

class Misnamed(Sci2Interface):
    name = "other"

NotAnInterface = object
"""


def test_a_vendor_interface_is_found_through_its_entry_point(tmp_path: Path) -> None:
    (tmp_path / "acme_dali.py").write_text(VENDOR_MODULE)
    dist = tmp_path / "acme_dali-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-dali\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[lampyre.dali_interfaces]\n"
        "acme = acme_dali:AcmeInterface\n"
        "misnamed = acme_dali:Misnamed\n"
        "broken = acme_dali:NotAnInterface\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        cls = load_interface("acme")
        assert issubclass(cls, DaliInterface)
        assert (cls.name, cls.default_baudrate, cls("/dev/ttyS9").baudrate) == ("acme", 9600, 9600)
        with pytest.raises(TypeError, match="named 'other'"):
            load_interface("misnamed")
        with pytest.raises(TypeError, match="not a lampyre DaliInterface"):
            load_interface("broken")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("acme_dali", None)


# Properties --------------------------------------------------------------------------------
frames_16 = st.integers(0, 0xFFFF)
answers = st.lists(st.integers(0, 0xFF), max_size=3).map(tuple)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["foxtron", "sci2"]),
    bits=st.sampled_from([16, 24]),
    data=st.data(),
    send_twice=st.booleans(),
    gear_answers=answers,
)
def test_round_trip_through_both_implementations(
    kind: str, bits: int, data: st.DataObject, send_twice: bool, gear_answers: tuple[int, ...]
) -> None:
    frame = data.draw(st.integers(0, (1 << bits) - 1))

    async def body() -> None:
        line = TableLine({frame: gear_answers})
        async with connected(kind, line) as (_, host):
            answer = await host.send(frame, bits=bits, send_twice=send_twice, expect_answer=True)
            assert line.sent == [(frame, bits, send_twice)]
            if not gear_answers:
                assert answer == DaliAnswer(Outcome.NO_ANSWER)
            elif len(gear_answers) == 1:
                assert answer == DaliAnswer(Outcome.ANSWER, gear_answers[0])
            else:
                assert answer == DaliAnswer(Outcome.COLLISION)

    run(body)


@settings(max_examples=200, deadline=None)
@given(frame=frames_16, bits=st.sampled_from([8, 16, 24]), value=st.integers(0, 0xFF))
def test_foxtron_reply_decoding_round_trips(frame: int, bits: int, value: int) -> None:
    frame &= (1 << bits) - 1
    echo = bytes((bits,)) + frame.to_bytes(bits // 8, "big")
    cases = {
        foxtron_message(b"\x0d" + echo + bytes((8, value))): DaliAnswer(Outcome.ANSWER, value),
        foxtron_message(b"\x0d" + echo + b"\x00"): DaliAnswer(Outcome.COLLISION),
        foxtron_message(b"\x0e" + echo): DaliAnswer(Outcome.NO_ANSWER),
    }
    for wire, expected in cases.items():
        (report,) = FoxtronParser().feed(wire)
        assert isinstance(report, InterfaceReply)
        assert (report.answer, report.frame, report.bits, report.raw) == (
            expected,
            frame,
            bits,
            wire,
        )


def _valid_sci2_reply(window: bytes) -> bool:
    return (
        window[0] >> 4 == 6
        and window[0] & 0x0F in {0, 1, 2, 3, 4, 5, 6, 7, 8}
        and reduce(xor, window) == 0
    )


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.lists(st.integers(1, 20), max_size=6))
def test_parsers_never_raise_nor_invent_a_reply(data: bytes, cuts: list[int]) -> None:
    for parser in (FoxtronParser(), Sci2Parser()):
        reports = []
        rest = data
        for cut in cuts:  # arbitrary chunking: a report may arrive in pieces
            reports += parser.feed(rest[:cut])
            rest = rest[cut:]
        reports += parser.feed(rest)
        reports += parser.flush()
        assert parser.buffered == 0
        for report in reports:
            if isinstance(report, InterfaceReply):
                # Only a complete, check-passing report present in the input is an answer.
                assert report.raw in data
                if isinstance(parser, FoxtronParser):
                    inner = bytes.fromhex(report.raw[1:-1].decode())
                    assert foxtron_message(inner[:-1]) == report.raw
                else:
                    assert _valid_sci2_reply(report.raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=60), st.integers(0, 0xFF))
def test_parsers_resynchronise_on_the_next_valid_reply(noise: bytes, value: int) -> None:
    reply = foxtron_message(bytes.fromhex("0D100BA008") + bytes((value,)))
    reports = FoxtronParser().feed(noise + reply)
    assert isinstance(reports[-1], InterfaceReply)
    assert reports[-1].answer == DaliAnswer(Outcome.ANSWER, value)
    # SCI2 has no frame delimiter: noise is separated from the reply by a quiet gap (a flush).
    parser = Sci2Parser()
    parser.feed(noise)
    parser.flush()
    (report,) = parser.feed(sci2_frame(0x62, 0, 0, value))
    assert isinstance(report, InterfaceReply)
    assert report.answer == DaliAnswer(Outcome.ANSWER, value)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["foxtron", "sci2"]), noise=st.binary(min_size=1, max_size=40))
def test_noise_before_the_reply_never_yields_a_wrong_answer(kind: str, noise: bytes) -> None:
    if kind == "sci2":
        # Without delimiters, noise that lines up into a valid reply is indistinguishable from
        # one; what must hold is that nothing else is ever taken for an answer.
        stream = noise + sci2_frame(0x62, 0, 0, 0x5A)
        assume(
            not any(
                _valid_sci2_reply(stream[i : i + 5])
                for i in range(len(stream) - 4)
                if i != len(noise)
            )
        )

    async def body() -> None:
        line = TableLine({QUERY_ACTUAL_LEVEL_5: (0x5A,)})
        async with connected(kind, line) as (emulator, host):
            emulator.faults.garbage_before_reply = noise
            try:
                answer: Any = await host.send(QUERY_ACTUAL_LEVEL_5, expect_answer=True)
            except DaliInterfaceError as exc:
                answer = exc
            assert answer == DaliAnswer(Outcome.ANSWER, 0x5A) or isinstance(
                answer, DaliInterfaceError
            )

    run(body)


def test_reports_have_the_expected_kinds_for_garbage() -> None:
    # Checksum-valid but impossible content is garbled (fails the transaction at once); bytes
    # outside a report are merely discarded (the reply may still follow).
    reports = FoxtronParser().feed(
        b"xx" + foxtron_message(bytes.fromhex("0D100BA009FE")) + b"\x01\x30"
    )
    assert [type(r) for r in reports] == [DiscardedBytes, GarbledReport]
    parser = FoxtronParser()
    assert parser.feed(b"\x01\x30\x44") == []
    assert parser.buffered == 3
    assert parser.flush() == [DiscardedBytes("report without its end", b"\x01\x30\x44")]
