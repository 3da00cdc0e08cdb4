"""The encrypted store-and-forward buffer, against real SQLite files."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import buffer as buffer_module
from agent.buffer import (
    Buffer,
    BufferStorageError,
    DropReport,
    Lane,
    QuarantineReport,
    Record,
)
from agent.crypto import OVERHEAD_BYTES, RecordCipher, RecordTampered, load_or_create_key

STEP_TIMEOUT_S = 20.0
BIG_CAP = 64 * 1024 * 1024


def payload_of(text: str) -> Callable[[int], bytes]:
    """A make_payload that embeds the seq, like the runtime does."""
    return lambda seq: f"{text}#{seq}".encode()


def filler(size: int) -> Callable[[int], bytes]:
    """A make_payload of ``size`` bytes that depends on the seq."""
    return lambda seq: bytes([seq % 251]) * size


def cipher_for(folder: Path) -> RecordCipher:
    return RecordCipher(load_or_create_key(folder / "buffer.key"))


@asynccontextmanager
async def opened(
    folder: Path, max_bytes: int = BIG_CAP, cipher: RecordCipher | None = None
) -> AsyncIterator[Buffer]:
    buffer = Buffer(folder / "var" / "buffer.db", cipher or cipher_for(folder), max_bytes)
    async with asyncio.timeout(STEP_TIMEOUT_S):
        await buffer.open()
    try:
        yield buffer
    finally:
        async with asyncio.timeout(STEP_TIMEOUT_S):
            await buffer.close()


def run(body: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(60):
            await body()

    asyncio.run(bounded())


def check_log_calls(caplog: pytest.LogCaptureFixture) -> None:
    """Every log call of the buffer formats (lazy %s arguments match the message)."""
    for record in caplog.records:
        record.getMessage()


def db_rows(path: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


# ----------------------------------------------------------------------------------------
# Sequence numbers
# ----------------------------------------------------------------------------------------


def test_make_payload_gets_its_own_seq_and_round_trips(tmp_path: Path) -> None:
    async def body() -> None:
        async with opened(tmp_path) as buffer:
            seqs = await buffer.append_many(
                [(Lane.TELEMETRY, "data", payload_of(f"batch-{i}")) for i in range(3)]
            )
            records = await buffer.pending(10)
        assert [r.seq for r in records] == seqs
        assert [r.payload for r in records] == [
            f"batch-{i}#{seq}".encode() for i, seq in enumerate(seqs)
        ]
        assert all(r.topic == "data" and r.lane is Lane.TELEMETRY for r in records)

    run(body)


def test_seq_is_monotonic_across_reopen_and_after_acking_the_newest(tmp_path: Path) -> None:
    async def body() -> None:
        async with opened(tmp_path) as buffer:
            first = await buffer.append_many(
                [(Lane.TELEMETRY, "data", payload_of("a")) for _ in range(5)]
            )
            assert first == sorted(first)
            assert len(set(first)) == 5
            assert first == list(range(first[0], first[0] + 5))
            # Acking the newest must not let its seq be issued again.
            assert await buffer.ack([first[-1], first[-2]]) == 2
            after_ack = await buffer.append(Lane.ALARM, "event", payload_of("b"))
            assert after_ack > first[-1]
            assert await buffer.ack([*first, after_ack]) == 4
        async with opened(tmp_path) as buffer:
            assert (await buffer.stats()).records == 0
            after_reopen = await buffer.append(Lane.ACK, "ack", payload_of("c"))
            assert after_reopen > after_ack

    run(body)


def test_a_failing_make_payload_stores_nothing(tmp_path: Path) -> None:
    def broken(seq: int) -> bytes:
        raise RuntimeError("cannot encode")

    async def body() -> None:
        async with opened(tmp_path) as buffer:
            before = await buffer.append(Lane.TELEMETRY, "data", payload_of("ok"))
            with pytest.raises(RuntimeError, match="cannot encode"):
                await buffer.append_many(
                    [(Lane.TELEMETRY, "data", payload_of("lost")), (Lane.ALARM, "event", broken)]
                )
            assert [r.seq for r in await buffer.pending(10)] == [before]
            stats = await buffer.stats()
            assert stats.records == 1
            after = await buffer.append(Lane.TELEMETRY, "data", payload_of("ok"))
            assert after > before

    run(body)


# ----------------------------------------------------------------------------------------
# Pending, ack
# ----------------------------------------------------------------------------------------


def test_pending_orders_alarm_then_ack_then_telemetry_by_seq(tmp_path: Path) -> None:
    async def body() -> None:
        async with opened(tmp_path) as buffer:
            t1 = await buffer.append(Lane.TELEMETRY, "data", payload_of("t1"))
            a1 = await buffer.append(Lane.ACK, "ack", payload_of("a1"))
            e1 = await buffer.append(Lane.ALARM, "event", payload_of("e1"))
            t2, e2, a2 = await buffer.append_many(
                [
                    (Lane.TELEMETRY, "data", payload_of("t2")),
                    (Lane.ALARM, "event", payload_of("e2")),
                    (Lane.ACK, "ack", payload_of("a2")),
                ]
            )
            records = await buffer.pending(100)
            assert [r.seq for r in records] == [e1, e2, a1, a2, t1, t2]
            assert [r.topic for r in records] == ["event", "event", "ack", "ack", "data", "data"]
            assert [r.seq for r in await buffer.pending(3)] == [e1, e2, a1]
            # Excluding in-flight seqs hands out the next ones.
            assert [r.seq for r in await buffer.pending(3, exclude={e1, e2, a1})] == [a2, t1, t2]
            assert [r.seq for r in await buffer.pending(2, exclude=[e2, t1, 12345])] == [e1, a1]
            assert await buffer.pending(0) == []
            # pending does not remove anything.
            assert (await buffer.stats()).records == 6

    run(body)


def test_ack_deletes_and_ignores_unknown_seqs(tmp_path: Path) -> None:
    async def body() -> None:
        async with opened(tmp_path) as buffer:
            seqs = await buffer.append_many(
                [(Lane.TELEMETRY, "data", payload_of(str(i))) for i in range(10)]
            )
            assert await buffer.ack(seqs[:4]) == 4
            assert await buffer.ack([seqs[0], seqs[5], 1, 2]) == 1
            assert await buffer.ack([]) == 0
            remaining = [r.seq for r in await buffer.pending(100)]
            assert remaining == seqs[4:5] + seqs[6:]
            stats = await buffer.stats()
            assert stats.records == 5
            assert stats.by_lane == {Lane.ALARM: 0, Lane.ACK: 0, Lane.TELEMETRY: 5}
        # Deleted for good, not only in memory.
        async with opened(tmp_path) as buffer:
            assert [r.seq for r in await buffer.pending(100)] == remaining

    run(body)


def test_stats_track_bytes_records_and_oldest(tmp_path: Path) -> None:
    async def body() -> None:
        async with opened(tmp_path, max_bytes=10_000_000) as buffer:
            empty = await buffer.stats()
            assert (empty.records, empty.bytes, empty.oldest_ms) == (0, 0, None)
            assert empty.max_bytes == 10_000_000
            seqs = await buffer.append_many(
                [
                    (Lane.TELEMETRY, "data", lambda seq: b"x" * 100),
                    (Lane.ALARM, "event", lambda seq: b"y" * 10),
                ]
            )
            stats = await buffer.stats()
            assert stats.records == 2
            assert stats.bytes == 110 + 2 * OVERHEAD_BYTES
            assert stats.by_lane == {Lane.ALARM: 1, Lane.ACK: 0, Lane.TELEMETRY: 1}
            records = await buffer.pending(10)
            assert stats.oldest_ms == min(r.created_ms for r in records)
            await buffer.ack(seqs[:1])
            assert (await buffer.stats()).bytes == 10 + OVERHEAD_BYTES
        async with opened(tmp_path, max_bytes=10_000_000) as buffer:
            assert (await buffer.stats()).bytes == 10 + OVERHEAD_BYTES

    run(body)


# ----------------------------------------------------------------------------------------
# Size cap
# ----------------------------------------------------------------------------------------


def test_cap_drops_oldest_telemetry_only_and_reports_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record_bytes = 100 + OVERHEAD_BYTES
    cap = 10 * record_bytes
    reports: list[DropReport] = []

    async def body() -> None:
        async with opened(tmp_path, max_bytes=cap) as buffer:
            buffer.on_drop(reports.append)
            alarm = await buffer.append(Lane.ALARM, "event", lambda seq: b"a" * 100)
            ack = await buffer.append(Lane.ACK, "ack", lambda seq: b"k" * 100)
            telemetry = await buffer.append_many(
                [(Lane.TELEMETRY, "data", lambda seq: b"t" * 100) for _ in range(8)]
            )
            assert reports == []  # exactly at the cap: nothing dropped
            newest = await buffer.append(Lane.TELEMETRY, "data", lambda seq: b"n" * 100)
            # Over the cap: the oldest telemetry goes, down to the low-water mark (90 %).
            assert len(reports) == 1
            report = reports[0]
            assert report.count == 2
            assert report.bytes == 2 * record_bytes
            assert (report.first_seq, report.last_seq) == (telemetry[0], telemetry[1])
            assert report.dropped_total == 2
            left = [r.seq for r in await buffer.pending(100)]
            assert left == [alarm, ack, *telemetry[2:], newest]
            stats = await buffer.stats()
            assert stats.dropped_total == 2
            assert stats.bytes == 9 * record_bytes
        # The drop counter is persisted.
        async with opened(tmp_path, max_bytes=cap) as buffer:
            assert (await buffer.stats()).dropped_total == 2

    with caplog.at_level(logging.WARNING, logger="agent.buffer"):
        run(body)
    assert any("dropped the 2 oldest telemetry" in r.getMessage() for r in caplog.records)
    check_log_calls(caplog)


def test_cap_never_drops_alarms_or_acks_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record_bytes = 100 + OVERHEAD_BYTES
    reports: list[DropReport] = []

    async def body() -> None:
        async with opened(tmp_path, max_bytes=3 * record_bytes) as buffer:
            buffer.on_drop(reports.append)
            telemetry = await buffer.append(Lane.TELEMETRY, "data", lambda seq: b"t" * 100)
            kept = await buffer.append_many(
                [
                    (Lane.ALARM, "event", lambda seq: b"a" * 100),
                    (Lane.ACK, "ack", lambda seq: b"k" * 100),
                    (Lane.ALARM, "event", lambda seq: b"a" * 100),
                    (Lane.ALARM, "event", lambda seq: b"a" * 100),
                ]
            )
            assert [(r.first_seq, r.last_seq, r.count) for r in reports] == [
                (telemetry, telemetry, 1)
            ]
            more = await buffer.append(Lane.ALARM, "event", lambda seq: b"a" * 100)
            assert len(reports) == 1  # nothing droppable left
            records = await buffer.pending(100)
            assert sorted(r.seq for r in records) == sorted([*kept, more])
            stats = await buffer.stats()
            assert stats.bytes == 5 * record_bytes > stats.max_bytes

    with caplog.at_level(logging.WARNING, logger="agent.buffer"):
        run(body)
    over = [r for r in caplog.records if "never dropped" in r.getMessage()]
    assert len(over) == 1  # once per excursion above the cap, not once per append
    check_log_calls(caplog)


def test_a_failing_drop_callback_does_not_fail_the_append(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[DropReport] = []

    def broken(report: DropReport) -> None:
        raise RuntimeError("observer bug")

    async def body() -> None:
        async with opened(tmp_path, max_bytes=200) as buffer:
            buffer.on_drop(broken)
            buffer.on_drop(seen.append)
            await buffer.append(Lane.TELEMETRY, "data", lambda seq: b"t" * 150)
            seq = await buffer.append(Lane.TELEMETRY, "data", lambda seq: b"t" * 150)
            assert [r.seq for r in await buffer.pending(10)] == [seq]

    run(body)
    assert len(seen) == 1
    assert any(r.exc_info for r in caplog.records if "callback" in r.getMessage())


# ----------------------------------------------------------------------------------------
# Tampering and quarantine
# ----------------------------------------------------------------------------------------


def flip_byte(path: Path, seq: int, offset: int = 20) -> None:
    conn = sqlite3.connect(path)
    try:
        (blob,) = conn.execute("SELECT blob FROM records WHERE seq = ?", (seq,)).fetchone()
        changed = bytearray(blob)
        changed[offset] ^= 0x01
        conn.execute("UPDATE records SET blob = ? WHERE seq = ?", (bytes(changed), seq))
        conn.commit()
    finally:
        conn.close()


def test_tampered_row_is_quarantined_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "var" / "buffer.db"
    reports: list[QuarantineReport] = []
    secret = "SECRET-READING"

    seqs: list[int] = []

    async def body() -> None:
        async with opened(tmp_path) as buffer:
            seqs[:] = await buffer.append_many(
                [(Lane.TELEMETRY, "data", payload_of(f"{secret}{i}")) for i in range(4)]
            )
        flip_byte(db, seqs[1])
        async with opened(tmp_path) as buffer:
            buffer.on_quarantine(reports.append)
            records = await buffer.pending(3)
            # The bad row is skipped and the page is still filled with good ones.
            assert [r.seq for r in records] == [seqs[0], seqs[2], seqs[3]]
            assert [r.seq for r in await buffer.pending(10)] == [seqs[0], seqs[2], seqs[3]]
            stats = await buffer.stats()
            assert stats.records == 3
            assert stats.quarantined_total == 1
        async with opened(tmp_path) as buffer:
            assert (await buffer.stats()).quarantined_total == 1
            assert [r.seq for r in await buffer.pending(10)] == [seqs[0], seqs[2], seqs[3]]

    with caplog.at_level(logging.DEBUG, logger="agent"):
        run(body)
    assert reports == [QuarantineReport((seqs[1],), 1)]
    assert db_rows(db, "SELECT seq, reason FROM quarantine") == [(seqs[1], "failed to decrypt")]
    assert db_rows(db, "SELECT COUNT(*) FROM records WHERE seq = ?", (seqs[1],)) == [(0,)]
    ours = [r for r in caplog.records if r.name.startswith("agent")]
    logged = [r for r in ours if str(seqs[1]) in r.getMessage()]
    assert len(logged) == 1  # logged once, although pending ran several times
    assert logged[0].levelno == logging.ERROR
    assert secret not in caplog.text
    check_log_calls(caplog)


def test_swapped_rows_do_not_open(tmp_path: Path) -> None:
    """A blob moved to another row (replay or reordering in the table) fails: seq is in the AAD."""
    db = tmp_path / "var" / "buffer.db"

    async def body() -> None:
        async with opened(tmp_path) as buffer:
            a, b, c = await buffer.append_many(
                [(Lane.TELEMETRY, "data", payload_of(str(i))) for i in range(3)]
            )
            e = await buffer.append(Lane.ALARM, "event", payload_of("alarm"))
        conn = sqlite3.connect(db)
        (blob_a,) = conn.execute("SELECT blob FROM records WHERE seq = ?", (a,)).fetchone()
        (blob_b,) = conn.execute("SELECT blob FROM records WHERE seq = ?", (b,)).fetchone()
        conn.execute("UPDATE records SET blob = ? WHERE seq = ?", (blob_b, a))
        conn.execute("UPDATE records SET blob = ? WHERE seq = ?", (blob_a, b))
        # Promoting telemetry to the alarm lane is caught as well.
        conn.execute("UPDATE records SET lane = 0 WHERE seq = ?", (c,))
        conn.commit()
        conn.close()
        async with opened(tmp_path) as buffer:
            assert [r.seq for r in await buffer.pending(10)] == [e]
            stats = await buffer.stats()
            assert (stats.records, stats.quarantined_total) == (1, 3)
            assert stats.by_lane == {Lane.ALARM: 1, Lane.ACK: 0, Lane.TELEMETRY: 0}

    run(body)


def test_unknown_lane_is_quarantined_at_open(tmp_path: Path) -> None:
    db = tmp_path / "var" / "buffer.db"

    async def body() -> None:
        async with opened(tmp_path) as buffer:
            bad, good = await buffer.append_many(
                [(Lane.TELEMETRY, "data", payload_of("x")), (Lane.ALARM, "event", payload_of("y"))]
            )
        conn = sqlite3.connect(db)
        conn.execute("UPDATE records SET lane = 7 WHERE seq = ?", (bad,))
        conn.commit()
        conn.close()
        async with opened(tmp_path) as buffer:
            assert [r.seq for r in await buffer.pending(10)] == [good]
            assert (await buffer.stats()).quarantined_total == 1

    run(body)


def test_another_key_quarantines_everything_instead_of_sending(tmp_path: Path) -> None:
    async def body() -> None:
        async with opened(tmp_path) as buffer:
            await buffer.append_many([(Lane.TELEMETRY, "data", payload_of("x"))] * 3)
        async with opened(tmp_path, cipher=RecordCipher(bytes(32))) as buffer:
            assert await buffer.pending(10) == []
            assert (await buffer.stats()).quarantined_total == 3

    run(body)


# ----------------------------------------------------------------------------------------
# Files, permissions, corruption
# ----------------------------------------------------------------------------------------


def test_database_file_and_folder_are_private_and_use_wal(tmp_path: Path) -> None:
    db = tmp_path / "var" / "buffer.db"

    async def body() -> None:
        async with opened(tmp_path) as buffer:
            await buffer.append(Lane.TELEMETRY, "data", payload_of("x"))
            for companion in (db, db.with_name("buffer.db-wal"), db.with_name("buffer.db-shm")):
                assert stat.S_IMODE(companion.stat().st_mode) == 0o600, companion
        assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
        assert db_rows(db, "PRAGMA journal_mode") == [("wal",)]
        # Payloads are stored sealed, never in clear.
        blobs = db_rows(db, "SELECT blob FROM records")
        assert blobs
        assert all(b"x#" not in blob for (blob,) in blobs)  # type: ignore[operator]

    run(body)


def test_an_existing_world_readable_database_is_tightened(tmp_path: Path) -> None:
    db = tmp_path / "var" / "buffer.db"

    async def body() -> None:
        async with opened(tmp_path):
            pass
        db.chmod(0o644)
        async with opened(tmp_path):
            assert stat.S_IMODE(db.stat().st_mode) == 0o600

    run(body)


def test_a_file_that_is_not_a_database_is_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "var" / "buffer.db"
    db.parent.mkdir(mode=0o700)
    db.write_bytes(b"this is not an SQLite database" * 200)

    async def body() -> None:
        async with opened(tmp_path) as buffer:
            seq = await buffer.append(Lane.ALARM, "event", payload_of("after"))
            assert [r.seq for r in await buffer.pending(10)] == [seq]

    run(body)
    aside = list(db.parent.glob("buffer.db.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes().startswith(b"this is not an SQLite database")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "corrupt" in r.message]
    assert errors and str(aside[0]) in errors[0].getMessage()


def test_a_corrupt_database_is_moved_aside_and_the_sequence_carries_on(tmp_path: Path) -> None:
    db = tmp_path / "var" / "buffer.db"

    async def body() -> None:
        async with opened(tmp_path) as buffer:
            old = await buffer.append_many(
                [(Lane.TELEMETRY, "data", lambda seq: bytes(3000)) for _ in range(40)]
            )
        # Damage the last pages (telemetry rows); the meta table, written first, survives.
        size = db.stat().st_size
        with db.open("r+b") as handle:
            handle.seek(size - 8192)
            handle.write(b"\xa5" * 8192)
        async with opened(tmp_path) as buffer:
            stats = await buffer.stats()
            assert stats.records == 0
            new = await buffer.append(Lane.TELEMETRY, "data", payload_of("new"))
            assert new > max(old)
        assert len(list(db.parent.glob("buffer.db.corrupt-*"))) == 1
        assert db_rows(db, "PRAGMA integrity_check") == [("ok",)]

    run(body)


def test_open_is_all_or_nothing_and_close_is_idempotent(tmp_path: Path) -> None:
    async def body() -> None:
        blocker = tmp_path / "file"
        blocker.write_bytes(b"")
        buffer = Buffer(blocker / "buffer.db", cipher_for(tmp_path), BIG_CAP)
        with pytest.raises(BufferStorageError, match="cannot create"):
            await buffer.open()
        await buffer.close()
        with pytest.raises(BufferStorageError):
            await buffer.append(Lane.ALARM, "event", payload_of("x"))
        async with opened(tmp_path) as good:
            await good.close()
            await good.close()
            with pytest.raises(BufferStorageError, match="not open"):
                await good.pending(1)

    run(body)


def test_a_cancelled_append_still_commits_and_close_waits(tmp_path: Path) -> None:
    async def body() -> None:
        async with opened(tmp_path) as buffer:
            task = asyncio.create_task(
                buffer.append_many(
                    [(Lane.TELEMETRY, "data", payload_of(str(i))) for i in range(50)]
                )
            )
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        async with opened(tmp_path) as buffer:
            # The transaction was not torn: all or nothing, and here all (it had started).
            assert (await buffer.stats()).records == 50
            seq = await buffer.append(Lane.ALARM, "event", payload_of("next"))
            assert seq == max(r.seq for r in await buffer.pending(100))

    run(body)


# ----------------------------------------------------------------------------------------
# Command de-duplication
# ----------------------------------------------------------------------------------------


def test_commands_are_remembered_recalled_forgotten_and_survive_reopen(tmp_path: Path) -> None:
    db = tmp_path / "var" / "buffer.db"

    async def body() -> None:
        async with opened(tmp_path) as buffer:
            assert await buffer.recall_command("c-1") is None
            await buffer.remember_command("c-1", b'{"status":"ok","level":40}', 1_000)
            await buffer.remember_command("c-2", b'{"status":"rejected"}', 2_000)
            assert await buffer.recall_command("c-1") == b'{"status":"ok","level":40}'
        # Sealed at rest too.
        assert all(b"status" not in blob for (blob,) in db_rows(db, "SELECT blob FROM commands"))  # type: ignore[operator]
        async with opened(tmp_path) as buffer:
            assert await buffer.recall_command("c-2") == b'{"status":"rejected"}'
            assert await buffer.forget_commands(1_500) == 1
            assert await buffer.recall_command("c-1") is None
            assert await buffer.recall_command("c-2") == b'{"status":"rejected"}'
            assert await buffer.forget_commands(1_500) == 0
            assert await buffer.forget_commands(2_001) == 1
            assert await buffer.recall_command("c-2") is None

    run(body)


def test_a_tampered_command_entry_raises_instead_of_allowing_a_rerun(tmp_path: Path) -> None:
    db = tmp_path / "var" / "buffer.db"

    async def body() -> None:
        async with opened(tmp_path) as buffer:
            await buffer.remember_command("c-1", b"answer", 5_000)
        conn = sqlite3.connect(db)
        # Extending the expiry is tampering too (the expiry is authenticated).
        conn.execute("UPDATE commands SET expires_ms = 9999999 WHERE command_id = 'c-1'")
        conn.commit()
        conn.close()
        async with opened(tmp_path) as buffer:
            with pytest.raises(RecordTampered):
                await buffer.recall_command("c-1")

    run(body)


# ----------------------------------------------------------------------------------------
# Model-based property: random appends, acks, pendings and reopens against a dict
# ----------------------------------------------------------------------------------------

LANES = st.sampled_from(list(Lane))
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(
            st.just("append"),
            st.lists(st.tuples(LANES, st.integers(0, 300)), min_size=1, max_size=6),
        ),
        st.tuples(st.just("ack"), st.lists(st.integers(0, 40), max_size=8)),
        st.tuples(st.just("pending"), st.integers(1, 12), st.lists(st.integers(0, 40), max_size=5)),
        st.tuples(st.just("reopen")),
    ),
    min_size=1,
    max_size=14,
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(operations=OPERATIONS, cap_records=st.integers(3, 30))
def test_buffer_behaves_like_its_model(
    operations: list[tuple[object, ...]], cap_records: int
) -> None:
    cap = cap_records * (100 + OVERHEAD_BYTES)
    low_water = int(cap * buffer_module.DROP_TO_FRACTION)

    async def body(folder: Path) -> None:
        cipher = cipher_for(folder)
        model: dict[int, Record] = {}
        issued: list[int] = []
        dropped_total = 0
        drops: list[DropReport] = []

        def size(record: Record) -> int:
            return len(record.payload) + OVERHEAD_BYTES

        def ordered() -> list[Record]:
            return sorted(model.values(), key=lambda r: (r.lane, r.seq))

        buffer = Buffer(folder / "buffer.db", cipher, cap)
        buffer.on_drop(drops.append)
        await buffer.open()
        try:
            for operation in operations:
                kind = operation[0]
                if kind == "append":
                    items = operation[1]
                    assert isinstance(items, list)
                    seqs = await buffer.append_many(
                        [(lane, "data", filler(n)) for lane, n in items]
                    )
                    assert len(seqs) == len(items)
                    assert all(s > max(issued, default=0) for s in seqs)
                    assert seqs == sorted(set(seqs))
                    issued.extend(seqs)
                    for seq, (lane, n) in zip(seqs, items, strict=True):
                        model[seq] = Record(seq, lane, "data", bytes([seq % 251]) * n, 0)
                    total = sum(size(r) for r in model.values())
                    if total > cap:
                        telemetry = sorted(s for s, r in model.items() if r.lane is Lane.TELEMETRY)
                        gone = []
                        for seq in telemetry:
                            if total <= low_water:
                                break
                            total -= size(model.pop(seq))
                            gone.append(seq)
                        if gone:
                            dropped_total += len(gone)
                            report = drops.pop(0)
                            assert (report.first_seq, report.last_seq) == (gone[0], gone[-1])
                            assert report.count == len(gone)
                            assert report.dropped_total == dropped_total
                    assert drops == []
                elif kind == "ack":
                    picks = operation[1]
                    assert isinstance(picks, list)
                    chosen = {issued[i % len(issued)] for i in picks} if issued else set()
                    expected = sum(1 for s in chosen if s in model)
                    assert await buffer.ack(chosen) == expected
                    for seq in chosen:
                        model.pop(seq, None)
                elif kind == "pending":
                    limit, picks = operation[1], operation[2]
                    assert isinstance(limit, int) and isinstance(picks, list)
                    exclude = {issued[i % len(issued)] for i in picks} if issued else set()
                    got = await buffer.pending(limit, exclude)
                    want = [r for r in ordered() if r.seq not in exclude][:limit]
                    assert [(r.seq, r.lane, r.payload) for r in got] == [
                        (r.seq, r.lane, r.payload) for r in want
                    ]
                else:
                    await buffer.close()
                    await buffer.open()
                stats = await buffer.stats()
                assert stats.records == len(model)
                assert stats.bytes == sum(size(r) for r in model.values())
                assert stats.dropped_total == dropped_total
                for lane in Lane:
                    assert stats.by_lane[lane] == sum(1 for r in model.values() if r.lane is lane)
        finally:
            await buffer.close()
        # The in-memory byte total matches what SQLite really holds.
        stored = db_rows(folder / "buffer.db", "SELECT COALESCE(SUM(length(blob)), 0) FROM records")
        assert stored == [(sum(size(r) for r in model.values()),)]

    with tempfile.TemporaryDirectory() as folder:

        async def bounded() -> None:
            async with asyncio.timeout(60):
                await body(Path(folder))

        asyncio.run(bounded())
