"""Durable, encrypted store-and-forward buffer (SQLite through aiosqlite).

The buffer is the source of truth: a record leaves it only when :meth:`Buffer.ack` is called,
which the uplink does once the broker acknowledged the publish with a success reason code. MQTT
is only transport. Delivery is at least once: after a crash or a reconnect a record may be sent
again, and the hub drops duplicates by (gateway, seq).

Design notes, schema and durability choices are in ``docs/buffer.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import secrets
import sqlite3
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from agent.crypto import RecordCipher, RecordTampered
from agent.sdk import LampyreError, now_ms

__all__ = [
    "Buffer",
    "BufferStats",
    "BufferStorageError",
    "DropReport",
    "Lane",
    "QuarantineReport",
    "Record",
]

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5_000
"""How long SQLite waits for a lock held by another connection (a CLI reading stats, say)."""
JOURNAL_SIZE_LIMIT_BYTES = 4 * 1024 * 1024
"""The WAL file is truncated back to this size after a checkpoint (SD cards: less to rewrite)."""
DROP_TO_FRACTION = 0.9
"""When the cap is exceeded, telemetry is dropped until the stored bytes are at most this
fraction of the cap. Dropping in chunks instead of one record per append keeps drop reports
(each becomes an alarm event, which is never dropped) rare while the uplink is down."""
SEQ_START_PER_MS = 1_000
"""A new buffer file starts its sequence at wall-clock milliseconds times this, so a buffer
rebuilt after corruption or deleted by hand does not re-issue seqs the hub has already seen
(the hub would drop them as duplicates). 1000 per ms stays below 2**53 (exact in JSON) until
the year 2255 and is far above any sustained record rate."""
SCHEMA_VERSION = 1

_AAD_RECORD = b"lampyre/buffer/record/v1\x00"
_AAD_COMMAND = b"lampyre/buffer/command/v1\x00"
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26

_T = TypeVar("_T")


class Lane(enum.IntEnum):
    """Priority lane of a record: lower values drain first; alarms are never dropped by the cap."""

    ALARM = 0
    """Events (device offline, lamp failure, buffer drops, ...)."""
    ACK = 1
    """Command acknowledgements."""
    TELEMETRY = 2
    """Reading batches."""


@dataclass(frozen=True, slots=True)
class Record:
    """One buffered record, decrypted."""

    seq: int
    """Gateway-unique, strictly increasing, never reused (also after restarts and deletes)."""
    lane: Lane
    topic: str
    """Topic suffix: ``data``, ``event`` or ``ack``."""
    payload: bytes
    created_ms: int


@dataclass(frozen=True, slots=True)
class BufferStats:
    """A snapshot of the buffer, cheap to take."""

    records: int
    bytes: int
    """Stored (sealed) bytes of the records, the quantity the cap applies to."""
    by_lane: dict[Lane, int]
    """Record count per lane (every lane present)."""
    dropped_total: int
    """Records dropped by the cap since the buffer file was created."""
    max_bytes: int
    oldest_ms: int | None
    """Creation time of the oldest stored record, None when empty."""
    quarantined_total: int = 0
    """Records that failed to decrypt and were moved to the quarantine table."""


@dataclass(frozen=True, slots=True)
class DropReport:
    """What one cap enforcement dropped (always oldest telemetry, a contiguous seq range
    within the telemetry lane)."""

    count: int
    bytes: int
    first_seq: int
    last_seq: int
    dropped_total: int


@dataclass(frozen=True, slots=True)
class QuarantineReport:
    """Records that failed authentication and were set aside (never sent)."""

    seqs: tuple[int, ...]
    quarantined_total: int


class BufferStorageError(LampyreError):
    """SQLite failed (disk full, I/O error, file locked by another process, ...)."""


@dataclass(slots=True)
class _State:
    """What the buffer keeps in memory between transactions (initialised at open)."""

    db_id: bytes = b""
    last_seq: int = 0
    dropped_total: int = 0
    quarantined_total: int = 0
    bytes: int = 0
    count_by_lane: dict[Lane, int] = field(default_factory=lambda: dict.fromkeys(Lane, 0))
    bytes_by_lane: dict[Lane, int] = field(default_factory=lambda: dict.fromkeys(Lane, 0))
    over_cap_warned: bool = False


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS records (
    seq        INTEGER PRIMARY KEY,
    lane       INTEGER NOT NULL,
    topic      TEXT    NOT NULL,
    created_ms INTEGER NOT NULL,
    blob       BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_lane ON records (lane, seq);
CREATE TABLE IF NOT EXISTS quarantine (
    seq            INTEGER PRIMARY KEY,
    lane           INTEGER NOT NULL,
    topic          TEXT    NOT NULL,
    created_ms     INTEGER NOT NULL,
    blob           BLOB    NOT NULL,
    quarantined_ms INTEGER NOT NULL,
    reason         TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS commands (
    command_id TEXT PRIMARY KEY,
    expires_ms INTEGER NOT NULL,
    blob       BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS commands_by_expiry ON commands (expires_ms);
"""


Finish = Callable[[], _T]
"""What a transaction body returns: applied only once COMMIT succeeded (in-memory state
updates, log lines, the method's result), so a rolled-back transaction leaves no trace."""


class _Corrupt(Exception):
    """Internal: the database file is damaged (not a database, or quick_check failed)."""


class Buffer:
    """The durable store-and-forward buffer. One instance per database file, one writer.

    Every method runs on a single aiosqlite connection, one transaction at a time. A write
    transaction runs in a task the buffer owns and is shielded: cancelling the caller does not
    cancel a transaction half-way (a statement goes on in SQLite's thread anyway, and a later
    transaction must not start inside an unfinished one). The transaction completes and
    :meth:`close` waits for it.
    """

    def __init__(self, path: Path, cipher: RecordCipher, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.path = path
        self.max_bytes = max_bytes
        self._cipher = cipher
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._state = _State()
        self._drop_callbacks: list[Callable[[DropReport], None]] = []
        self._quarantine_callbacks: list[Callable[[QuarantineReport], None]] = []

    # ------------------------------------------------------------------------------------
    # Lifecycle
    # ------------------------------------------------------------------------------------
    async def open(self) -> None:
        """Open (or create) the database: WAL, ``synchronous=FULL``, ``quick_check``.

        A file that fails ``quick_check`` or is not a database is moved aside as
        ``<name>.corrupt-<timestamp>`` (with its WAL) and a new one is started, which carries
        on the sequence. All or nothing: on failure nothing stays open.
        """
        if self._conn is not None:
            raise RuntimeError(f"buffer {self.path} is already open")
        await self._prepare_file()
        salvaged_seq = 0
        corrupt: _Corrupt | None = None
        try:
            conn = await self._connect_checked()
        except _Corrupt as exc:
            corrupt = exc
        if corrupt is not None:
            salvaged_seq = await asyncio.to_thread(_salvage_last_seq, self.path)
            try:
                aside = await asyncio.to_thread(_move_aside, self.path)
            except OSError as exc:
                raise BufferStorageError(
                    f"buffer {self.path} is corrupt ({corrupt}) and cannot be moved aside: {exc}"
                ) from exc
            log.error(
                "buffer database %s is corrupt (%s): moved it to %s and started a new one; "
                "its unsent records will not be forwarded",
                self.path,
                corrupt,
                aside,
            )
            await self._prepare_file()
            try:
                conn = await self._connect_checked()
            except _Corrupt as again:
                raise BufferStorageError(
                    f"buffer {self.path}: a new database is corrupt at once ({again})"
                ) from None
        try:
            await _run_in_transaction(conn, lambda c: _create_schema(c, salvaged_seq))
            quarantined = await _run_in_transaction(conn, _quarantine_unknown_lanes)
            self._state = await _load_state(conn)
        except sqlite3.Error as exc:
            await conn.close()
            raise BufferStorageError(f"cannot open buffer {self.path}: {exc}") from exc
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        if quarantined:
            log.error(
                "buffer %s: %d records had an unknown lane and were quarantined",
                self.path,
                quarantined,
            )
        log.info(
            "buffer %s open: %d records, %d bytes, last seq %d",
            self.path,
            sum(self._state.count_by_lane.values()),
            self._state.bytes,
            self._state.last_seq,
        )

    async def close(self) -> None:
        """Let running transactions finish, then close the connection. Idempotent."""
        conn, self._conn = self._conn, None
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if conn is not None:
            # Always awaited: aiosqlite's worker thread is not a daemon and would hang the exit.
            await conn.close()

    async def _prepare_file(self) -> None:
        try:
            await asyncio.to_thread(_prepare_file, self.path)
        except OSError as exc:
            raise BufferStorageError(f"cannot create buffer {self.path}: {exc}") from exc

    async def _connect_checked(self) -> aiosqlite.Connection:
        """A configured connection to a database that passed ``quick_check``."""
        try:
            # isolation_level=None: transactions are begun and committed explicitly.
            conn = await aiosqlite.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise BufferStorageError(f"cannot open buffer {self.path}: {exc}") from exc
        try:
            await _execute(conn, f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = await _fetch_value(conn, "PRAGMA journal_mode = WAL")
            if str(mode).lower() != "wal":
                log.warning("buffer %s: WAL journal not available (got %s)", self.path, mode)
            # FULL syncs the WAL at every commit: NORMAL survives a process crash but can lose
            # the last committed transactions on power loss.
            await _execute(conn, "PRAGMA synchronous = FULL")
            await _execute(conn, f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT_BYTES}")
            async with conn.execute("PRAGMA quick_check") as cursor:
                problems = [str(row[0]) for row in await cursor.fetchall()]
        except sqlite3.DatabaseError as exc:
            await conn.close()
            if exc.sqlite_errorcode & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
                raise _Corrupt(str(exc)) from None
            raise BufferStorageError(f"cannot open buffer {self.path}: {exc}") from exc
        except BaseException:
            await conn.close()
            raise
        if problems != ["ok"]:
            await conn.close()
            raise _Corrupt("quick_check: " + "; ".join(problems[:5]))
        return conn

    # ------------------------------------------------------------------------------------
    # Callbacks
    # ------------------------------------------------------------------------------------
    def on_drop(self, callback: Callable[[DropReport], None]) -> None:
        """Call ``callback`` after a cap enforcement dropped records (after the commit)."""
        self._drop_callbacks.append(callback)

    def on_quarantine(self, callback: Callable[[QuarantineReport], None]) -> None:
        """Call ``callback`` after records failed to decrypt and were quarantined."""
        self._quarantine_callbacks.append(callback)

    # ------------------------------------------------------------------------------------
    # Records
    # ------------------------------------------------------------------------------------
    async def append(self, lane: Lane, topic: str, make_payload: Callable[[int], bytes]) -> int:
        """Store one record; ``make_payload(seq)`` builds its payload. Returns the seq."""
        (seq,) = await self.append_many([(lane, topic, make_payload)])
        return seq

    async def append_many(
        self, items: Sequence[tuple[Lane, str, Callable[[int], bytes]]]
    ) -> list[int]:
        """Store several records in one transaction (one fsync). Returns their seqs, in order.

        If ``make_payload`` raises, nothing is stored and the exception propagates."""
        if not items:
            return []
        seqs, drop = await self._write(lambda conn: self._append_txn(conn, items))
        if drop is not None:
            _notify(self._drop_callbacks, drop)
        return seqs

    async def _append_txn(
        self,
        conn: aiosqlite.Connection,
        items: Sequence[tuple[Lane, str, Callable[[int], bytes]]],
    ) -> Finish[tuple[list[int], DropReport | None]]:
        state = self._state
        created = now_ms()
        rows: list[tuple[int, int, str, int, bytes]] = []
        added_bytes = dict.fromkeys(Lane, 0)
        seq = state.last_seq
        for lane_arg, topic, make_payload in items:
            seq += 1
            lane = Lane(lane_arg)
            aad = self._record_aad(seq, lane, topic, created)
            blob = self._cipher.seal(make_payload(seq), aad)
            rows.append((seq, lane.value, topic, created, blob))
            added_bytes[lane] += len(blob)
        last_seq = seq
        await conn.executemany(
            "INSERT INTO records (seq, lane, topic, created_ms, blob) VALUES (?, ?, ?, ?, ?)",
            rows,
        )
        await _execute(conn, "UPDATE meta SET value = ? WHERE key = 'last_seq'", (last_seq,))
        total = state.bytes + sum(added_bytes.values())
        dropped: tuple[int, int, int, int] | None = None
        if total > self.max_bytes:
            telemetry = state.bytes_by_lane[Lane.TELEMETRY] + added_bytes[Lane.TELEMETRY]
            dropped = await self._drop_oldest_telemetry(conn, total, telemetry)

        def finish() -> tuple[list[int], DropReport | None]:
            state.last_seq = last_seq
            for row in rows:
                state.count_by_lane[Lane(row[1])] += 1
            for lane, size in added_bytes.items():
                state.bytes_by_lane[lane] += size
            state.bytes = total
            report = None
            if dropped is not None:
                count, size, first, last = dropped
                state.bytes -= size
                state.bytes_by_lane[Lane.TELEMETRY] -= size
                state.count_by_lane[Lane.TELEMETRY] -= count
                state.dropped_total += count
                log.warning(
                    "buffer cap of %d bytes reached: dropped the %d oldest telemetry records "
                    "(seq %d..%d, %d bytes)",
                    self.max_bytes,
                    count,
                    first,
                    last,
                    size,
                )
                report = DropReport(count, size, first, last, state.dropped_total)
            self._warn_if_over_cap()
            return [row[0] for row in rows], report

        return finish

    async def _drop_oldest_telemetry(
        self, conn: aiosqlite.Connection, total: int, telemetry_bytes: int
    ) -> tuple[int, int, int, int] | None:
        """Delete the oldest telemetry until ``total`` is down to the low-water mark (or no
        telemetry is left). Returns (count, bytes, first_seq, last_seq) of what went."""
        need = min(total - int(self.max_bytes * DROP_TO_FRACTION), telemetry_bytes)
        if need <= 0:
            return None
        freed = count = first = last = 0
        async with conn.execute(
            "SELECT seq, length(blob) FROM records WHERE lane = ? ORDER BY seq",
            (Lane.TELEMETRY.value,),
        ) as cursor:
            cursor.iter_chunk_size = 512
            async for seq, size in cursor:
                first = first or seq
                last = seq
                count += 1
                freed += size
                if freed >= need:
                    break
        if count == 0:
            return None
        await _execute(
            conn, "DELETE FROM records WHERE lane = ? AND seq <= ?", (Lane.TELEMETRY.value, last)
        )
        await _execute(
            conn, "UPDATE meta SET value = value + ? WHERE key = 'dropped_total'", (count,)
        )
        return count, freed, first, last

    def _warn_if_over_cap(self) -> None:
        state = self._state
        if state.bytes <= self.max_bytes:
            state.over_cap_warned = False
        elif not state.over_cap_warned:
            # Once per excursion above the cap, not once per append.
            state.over_cap_warned = True
            log.warning(
                "buffer holds %d bytes, above its cap of %d, and no telemetry is left to drop: "
                "alarm and ack records are never dropped",
                state.bytes,
                self.max_bytes,
            )

    async def pending(self, limit: int, exclude: Collection[int] = ()) -> list[Record]:
        """Up to ``limit`` records to send, oldest first by (lane, seq), skipping the seqs in
        ``exclude`` (those in flight). Records that fail to decrypt are quarantined (logged
        once, counted, reported to :meth:`on_quarantine` callbacks) and never returned."""
        if limit <= 0:
            return []
        records, report = await self._write(lambda conn: self._pending_txn(conn, limit, exclude))
        if report is not None:
            _notify(self._quarantine_callbacks, report)
        return records

    async def _pending_txn(
        self, conn: aiosqlite.Connection, limit: int, exclude: Collection[int]
    ) -> Finish[tuple[list[Record], QuarantineReport | None]]:
        records: list[Record] = []
        bad: list[tuple[int, Lane, int]] = []
        skip = {int(seq) for seq in exclude}
        while len(records) < limit:
            wanted = limit - len(records)
            rows = await _oldest_rows(conn, wanted, skip)
            failed: list[tuple[int, Lane, int]] = []
            for seq, lane_value, topic, created_ms, blob in rows:
                lane = Lane(lane_value)  # unknown lanes were quarantined at open
                aad = self._record_aad(seq, lane, topic, created_ms)
                try:
                    payload = self._cipher.open(blob, aad)
                except RecordTampered:
                    failed.append((seq, lane, len(blob)))
                    continue
                records.append(Record(seq, lane, topic, payload, created_ms))
                skip.add(seq)
            if failed:
                await _quarantine(conn, [seq for seq, _, _ in failed], "failed to decrypt")
                bad.extend(failed)
            # Refill the page past rows set aside: a run of bad rows must not make the buffer
            # look empty to the uplink.
            if not failed or len(rows) < wanted:
                break

        def finish() -> tuple[list[Record], QuarantineReport | None]:
            if not bad:
                return records, None
            state = self._state
            for seq, lane, size in bad:
                state.bytes -= size
                state.bytes_by_lane[lane] -= size
                state.count_by_lane[lane] -= 1
                # Logged once: the row leaves the records table now. Never the payload.
                log.error("buffer record seq %d failed to decrypt: quarantined, not sent", seq)
            state.quarantined_total += len(bad)
            self._warn_if_over_cap()
            report = QuarantineReport(tuple(seq for seq, _, _ in bad), state.quarantined_total)
            return records, report

        return finish

    async def ack(self, seqs: Iterable[int]) -> int:
        """Delete records the broker acknowledged; returns how many rows went. Seqs that are
        not stored (already acked, dropped, quarantined, never issued) are ignored."""
        wanted = [int(seq) for seq in seqs]
        if not wanted:
            return 0
        return await self._write(lambda conn: self._ack_txn(conn, wanted))

    async def _ack_txn(self, conn: aiosqlite.Connection, seqs: list[int]) -> Finish[int]:
        async with conn.execute(
            "DELETE FROM records WHERE seq IN (SELECT value FROM json_each(?)) "
            "RETURNING lane, length(blob)",
            (json.dumps(seqs),),
        ) as cursor:
            gone = [(Lane(lane), int(size)) for lane, size in await cursor.fetchall()]

        def finish() -> int:
            state = self._state
            for lane, size in gone:
                state.bytes -= size
                state.bytes_by_lane[lane] -= size
                state.count_by_lane[lane] -= 1
            self._warn_if_over_cap()
            return len(gone)

        return finish

    async def ack_ranges(
        self, ranges: Sequence[tuple[int, int]], topics: Collection[str]
    ) -> list[int]:
        """Delete the records of ``topics`` whose seq lies in one of the inclusive ``ranges``
        (a hub receipt); returns the seqs that went. Seqs not stored are ignored."""
        if not ranges or not topics:
            return []
        wanted = [(int(first), int(last)) for first, last in ranges]
        names = sorted(set(topics))
        return await self._write(lambda conn: self._ack_ranges_txn(conn, wanted, names))

    async def _ack_ranges_txn(
        self, conn: aiosqlite.Connection, ranges: list[tuple[int, int]], topics: list[str]
    ) -> Finish[list[int]]:
        marks = ", ".join("?" * len(topics))
        gone: list[tuple[int, Lane, int]] = []
        for first, last in ranges:
            async with conn.execute(
                f"DELETE FROM records WHERE seq BETWEEN ? AND ? AND topic IN ({marks}) "  # noqa: S608
                "RETURNING seq, lane, length(blob)",
                (first, last, *topics),
            ) as cursor:
                gone.extend(
                    (int(seq), Lane(lane), int(size)) for seq, lane, size in await cursor.fetchall()
                )

        def finish() -> list[int]:
            state = self._state
            for _, lane, size in gone:
                state.bytes -= size
                state.bytes_by_lane[lane] -= size
                state.count_by_lane[lane] -= 1
            self._warn_if_over_cap()
            return sorted(seq for seq, _, _ in gone)

        return finish

    @property
    def last_seq(self) -> int:
        """The highest sequence number issued so far (0 before :meth:`open`)."""
        return self._state.last_seq

    async def stats(self) -> BufferStats:
        """Counts and sizes (kept in memory) and the age of the oldest record (one lookup)."""
        conn = self._require_open()
        async with self._lock:
            oldest = await _fetch_value(conn, "SELECT created_ms FROM records ORDER BY seq LIMIT 1")
        state = self._state
        return BufferStats(
            records=sum(state.count_by_lane.values()),
            bytes=state.bytes,
            by_lane=dict(state.count_by_lane),
            dropped_total=state.dropped_total,
            max_bytes=self.max_bytes,
            oldest_ms=None if oldest is None else int(oldest),
            quarantined_total=state.quarantined_total,
        )

    # ------------------------------------------------------------------------------------
    # Command de-duplication
    # ------------------------------------------------------------------------------------
    async def remember_command(self, command_id: str, ack_payload: bytes, expires_ms: int) -> None:
        """Keep the answer to ``command_id`` until ``expires_ms``, so a duplicate of the command
        is answered again instead of executed again (also after a restart)."""

        async def txn(conn: aiosqlite.Connection) -> Finish[None]:
            blob = self._cipher.seal(ack_payload, self._command_aad(command_id, expires_ms))
            await _execute(
                conn,
                "INSERT OR REPLACE INTO commands (command_id, expires_ms, blob) VALUES (?, ?, ?)",
                (command_id, expires_ms, blob),
            )
            return lambda: None

        await self._write(txn)

    async def recall_command(self, command_id: str) -> bytes | None:
        """The answer kept for ``command_id``, or None if there is none (never seen, or
        forgotten). Raises :class:`~agent.crypto.RecordTampered` if the stored entry does not
        authenticate: the command was seen, so the caller must not execute it."""
        conn = self._require_open()
        async with (
            self._lock,
            conn.execute(
                "SELECT expires_ms, blob FROM commands WHERE command_id = ?", (command_id,)
            ) as cursor,
        ):
            row = await cursor.fetchone()
        if row is None:
            return None
        try:
            return self._cipher.open(row[1], self._command_aad(command_id, int(row[0])))
        except RecordTampered as exc:
            tampered = exc
        log.error("buffer: the kept answer to command %r failed to decrypt", command_id)
        raise tampered

    async def forget_commands(self, now_ms: int) -> int:
        """Delete the entries that expired before ``now_ms``; returns how many went."""

        async def txn(conn: aiosqlite.Connection) -> Finish[int]:
            async with conn.execute(
                "DELETE FROM commands WHERE expires_ms < ?", (now_ms,)
            ) as cursor:
                count = cursor.rowcount
            return lambda: count

        return await self._write(txn)

    # ------------------------------------------------------------------------------------
    # Plumbing
    # ------------------------------------------------------------------------------------
    def _record_aad(self, seq: int, lane: Lane, topic: str, created_ms: int) -> bytes:
        # Binds the row's identity: a blob copied to another row, lane, topic or database
        # (db_id) no longer opens.
        fixed = struct.pack(">qBq", seq, lane.value, created_ms)
        return _AAD_RECORD + self._state.db_id + fixed + topic.encode()

    def _command_aad(self, command_id: str, expires_ms: int) -> bytes:
        fixed = struct.pack(">q", expires_ms)
        return _AAD_COMMAND + self._state.db_id + fixed + command_id.encode()

    def _require_open(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise BufferStorageError(f"buffer {self.path} is not open")
        return self._conn

    async def _write(self, body: Callable[[aiosqlite.Connection], Awaitable[Finish[_T]]]) -> _T:
        """Run ``body`` as one transaction in a task the buffer owns (``self._tasks``, awaited
        by :meth:`close`), shielded from the caller's cancellation."""
        conn = self._require_open()
        task = asyncio.create_task(self._locked(conn, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    async def _locked(
        self,
        conn: aiosqlite.Connection,
        body: Callable[[aiosqlite.Connection], Awaitable[Finish[_T]]],
    ) -> _T:
        async with self._lock:
            try:
                finish = await _run_in_transaction(conn, body)
            except sqlite3.Error as exc:
                raise BufferStorageError(f"buffer {self.path}: {exc}") from exc
            return finish()


# ----------------------------------------------------------------------------------------
# Helpers (module level: no buffer state)
# ----------------------------------------------------------------------------------------


async def _execute(conn: aiosqlite.Connection, sql: str, params: Sequence[object] = ()) -> None:
    async with conn.execute(sql, params):
        pass


async def _fetch_value(conn: aiosqlite.Connection, sql: str) -> Any:
    async with conn.execute(sql) as cursor:
        row = await cursor.fetchone()
    return None if row is None else row[0]


async def _run_in_transaction(
    conn: aiosqlite.Connection, body: Callable[[aiosqlite.Connection], Awaitable[_T]]
) -> _T:
    # IMMEDIATE takes the write lock up front: no deadlock upgrading a read transaction.
    await _execute(conn, "BEGIN IMMEDIATE")
    try:
        result = await body(conn)
        await _execute(conn, "COMMIT")
    except BaseException:
        try:
            await _execute(conn, "ROLLBACK")
        except sqlite3.Error:
            # SQLite may already have rolled back (disk full, I/O error): nothing to undo.
            log.debug("buffer: rollback after a failed transaction also failed", exc_info=True)
        raise
    return result


async def _create_schema(conn: aiosqlite.Connection, salvaged_seq: int) -> None:
    # Statement by statement: executescript() would COMMIT the open transaction first.
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            await _execute(conn, statement)
    defaults: list[tuple[str, object]] = [
        ("schema_version", SCHEMA_VERSION),
        ("db_id", secrets.token_bytes(16)),
        ("last_seq", max(salvaged_seq, now_ms() * SEQ_START_PER_MS)),
        ("dropped_total", 0),
        ("quarantined_total", 0),
    ]
    await conn.executemany("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", defaults)
    version = await _fetch_value(conn, "SELECT value FROM meta WHERE key = 'schema_version'")
    if version != SCHEMA_VERSION:
        raise BufferStorageError(
            f"buffer schema version {version!r} is not the supported {SCHEMA_VERSION}"
        )


async def _oldest_rows(
    conn: aiosqlite.Connection, limit: int, skip: Collection[int]
) -> list[tuple[int, int, str, int, bytes]]:
    if skip:
        query = (
            "SELECT seq, lane, topic, created_ms, blob FROM records "
            "WHERE seq NOT IN (SELECT value FROM json_each(?)) ORDER BY lane, seq LIMIT ?"
        )
        params: tuple[object, ...] = (json.dumps(list(skip)), limit)
    else:
        query = "SELECT seq, lane, topic, created_ms, blob FROM records ORDER BY lane, seq LIMIT ?"
        params = (limit,)
    async with conn.execute(query, params) as cursor:
        return [tuple(row) for row in await cursor.fetchall()]


async def _quarantine(conn: aiosqlite.Connection, seqs: Sequence[int], reason: str) -> None:
    encoded = json.dumps(list(seqs))
    await _execute(
        conn,
        "INSERT OR REPLACE INTO quarantine "
        "(seq, lane, topic, created_ms, blob, quarantined_ms, reason) "
        "SELECT seq, lane, topic, created_ms, blob, ?, ? FROM records "
        "WHERE seq IN (SELECT value FROM json_each(?))",
        (now_ms(), reason, encoded),
    )
    await _execute(
        conn, "DELETE FROM records WHERE seq IN (SELECT value FROM json_each(?))", (encoded,)
    )
    await _execute(
        conn, "UPDATE meta SET value = value + ? WHERE key = 'quarantined_total'", (len(seqs),)
    )


async def _quarantine_unknown_lanes(conn: aiosqlite.Connection) -> int:
    async with conn.execute(
        "SELECT seq FROM records WHERE lane NOT IN (SELECT value FROM json_each(?))",
        (json.dumps([lane.value for lane in Lane]),),
    ) as cursor:
        seqs = [int(row[0]) for row in await cursor.fetchall()]
    if seqs:
        await _quarantine(conn, seqs, "unknown lane")
    return len(seqs)


async def _load_state(conn: aiosqlite.Connection) -> _State:
    state = _State()
    async with conn.execute("SELECT key, value FROM meta") as cursor:
        meta = {str(key): value for key, value in await cursor.fetchall()}
    state.db_id = bytes(meta["db_id"])
    state.last_seq = int(meta["last_seq"])
    state.dropped_total = int(meta["dropped_total"])
    state.quarantined_total = int(meta["quarantined_total"])
    async with conn.execute(
        "SELECT lane, COUNT(*), COALESCE(SUM(length(blob)), 0), MAX(seq) FROM records GROUP BY lane"
    ) as cursor:
        for lane_value, count, size, max_seq in await cursor.fetchall():
            lane = Lane(lane_value)
            state.count_by_lane[lane] = int(count)
            state.bytes_by_lane[lane] = int(size)
            # Belt and braces: never issue a seq at or below one that is stored.
            state.last_seq = max(state.last_seq, int(max_seq))
    state.bytes = sum(state.bytes_by_lane.values())
    return state


def _notify(callbacks: Sequence[Callable[[_T], None]], report: _T) -> None:
    for callback in callbacks:
        try:
            callback(report)
        except Exception:
            # The records are committed already; a failing observer must not undo or hide that.
            log.exception("buffer callback %r failed", callback)


def _prepare_file(path: Path) -> None:
    """Create the folder (0700) and the database file (0600) before SQLite does: SQLite would
    use 0644, and gives its -wal and -shm files the mode of the database file."""
    folder = path.parent
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BufferStorageError(f"buffer {path} is not a regular file")
        if stat.S_IMODE(info.st_mode) & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning(
                "buffer %s had mode %04o; restricting it to 0600", path, stat.S_IMODE(info.st_mode)
            )
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            companion = path.with_name(path.name + suffix)
            if stat.S_IMODE(companion.lstat().st_mode) & (stat.S_IRWXG | stat.S_IRWXO):
                companion.chmod(0o600)


def _salvage_last_seq(path: Path) -> int:
    """Best effort: the highest seq the damaged file knows, so the new file carries on above
    it. Any failure gives 0 (the clock-based start then applies alone)."""
    best = 0
    queries = (
        "SELECT value FROM meta WHERE key = 'last_seq'",
        "SELECT MAX(seq) FROM records",
        "SELECT MAX(seq) FROM quarantine",
    )
    try:
        conn = sqlite3.connect(path)
    except sqlite3.Error:
        return 0
    try:
        for query in queries:
            try:
                row = conn.execute(query).fetchone()
            except sqlite3.Error:
                continue
            value = None if row is None else row[0]
            # A damaged page can hold anything: only believe a plausible sequence number.
            if isinstance(value, int) and 0 < value < 2**53:
                best = max(best, value)
    finally:
        conn.close()
    return best


def _move_aside(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    number = 1
    while aside.exists():
        number += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{number}")
    # The WAL keeps its "-wal" suffix next to the moved file so the pair can still be opened
    # for a post-mortem; the -shm index is rebuilt from the WAL, so it can go.
    with contextlib.suppress(FileNotFoundError):
        os.replace(path.with_name(path.name + "-wal"), aside.with_name(aside.name + "-wal"))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path.with_name(path.name + "-shm"))
    os.replace(path, aside)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return aside
