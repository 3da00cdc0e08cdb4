"""The reference hub consumer: opens the gateways' envelopes, stores readings and events as JSON
lines, drops duplicates and sends receipts. ``lampyre hub listen`` runs it (``agent/hub_cli.py``);
tests and benchmarks use :class:`HubConsumer` in-process. ``docs/hub-listen.md`` describes it.

The delivery contract it implements (at least once, see ``docs/hub-protocol.md``):

* A message is verified and opened (``agent.envelope.open_envelope``) before anything else;
  a refused one is counted and logged, never stored, and never stops the consumer.
* Lines are appended to the output and **fsynced before** the sequence numbers are recorded as
  stored, before any receipt names them and before the MQTT PUBACK of the message
  (``MqttSession`` sends it when the ``on_message`` handler returns, so the handler returns only
  once its lines are on disk).
* An envelope whose sequence numbers (per gateway: buffer sequence numbers are unique to a
  gateway and never reused) are all stored already is a duplicate: dropped, and receipted again,
  because the gateway re-sends only what no receipt covered.

Storage is group-committed: one writer task takes every record waiting, writes them with one
``write`` and one ``fsync`` in a thread, then records the ranges. ``MqttSession`` hands over one
message at a time and waits for its handler, so in practice a commit holds one message (up to a
whole batch of readings); waiting for more (a time window) would only delay every PUBACK.
Receipts do not hold a PUBACK back: they are batched by time and count.

Every blocking call (files, fsync, SQLite) runs in a thread; the envelope crypto runs on the
loop (tens of microseconds to a millisecond per envelope, see ``docs/envelope.md``).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import os
import re
import secrets
import sqlite3
import stat
import sys
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeGuard

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.backoff import backoff_delay_s
from agent.envelope import (
    GATEWAY_ID_PATTERN,
    BadSignature,
    DecryptFailed,
    EnvelopeError,
    GatewayKeys,
    HeaderMismatch,
    HubPrivateKey,
    Malformed,
    UnknownKey,
    UnsupportedVersion,
    open_envelope,
)
from agent.jws import MAX_RECEIPT_RANGES, merge_ranges, sign_receipt
from agent.keys import ed25519_key_id
from agent.mqtt import (
    Message,
    MqttConnectError,
    MqttDisconnected,
    MqttError,
    MqttSession,
    MqttSettings,
    PublishRejected,
    SubscribeRejected,
    is_loopback_host,
)
from agent.sdk import LampyreError, fsync_folder, now_ms

__all__ = [
    "DEFAULT_PREFIX",
    "GROUP_PATTERN",
    "RECEIPT_INTERVAL_S",
    "RECEIPT_MAX_SEQS",
    "STREAMS",
    "HubConsumer",
    "HubCounters",
    "HubError",
    "HubSettings",
    "JsonLinesOutput",
    "RangeSet",
    "RangeStore",
    "Refusal",
    "receipt_tokens",
]

log = logging.getLogger(__name__)

DEFAULT_PREFIX: Final = "lampyre/v1"
STREAMS: Final = ("data", "event")
"""The topic leaves the hub reads; each is one shared subscription."""
PAYLOAD_VERSION: Final = 1
"""The ``v`` of the data and event JSON bodies (docs/hub-protocol.md)."""
MAX_SEQ: Final = 2**53 - 1

RECEIPT_INTERVAL_S: Final = 0.5
"""A receipt goes out at most this long after the first sequence number it names was stored."""
RECEIPT_MAX_SEQS: Final = 256
"""...or as soon as this many sequence numbers wait for one."""

GROUP_PATTERN: Final = r"[A-Za-z0-9_-]{1,128}"
"""A share group name: no ``/``, ``+`` or ``#`` (MQTT 5 §4.8.2), nothing to quote anywhere."""
SHORT_GROUP_CHARS: Final = 16
"""A group name shorter than this is guessable: warned about (``openssl rand -hex 16``)."""

BACKOFF_BASE_S: Final = 0.5
BACKOFF_CAP_S: Final = 30.0
SHUTDOWN_TIMEOUT_S: Final = 5.0
"""How long a stop waits for the message being stored and for the last receipts' PUBACKs."""
DETAIL_CHARS: Final = 200
"""A refusal's reason is cut to this length in the log (it may quote header values)."""

_GATEWAY_RE: Final = re.compile(GATEWAY_ID_PATTERN)
_GROUP_RE: Final = re.compile(GROUP_PATTERN)
_READING_FIELDS: Final = frozenset(("device", "point", "value", "unit", "ts", "quality"))


class HubError(LampyreError):
    """The consumer cannot go on (storage failed, the broker refused the subscription, the
    options do not fit): the message says what to fix."""


# --------------------------------------------------------------------------------------------
# Settings and counters.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubSettings:
    """What the consumer reads and where it writes. Keys are given to :class:`HubConsumer`."""

    mqtt: MqttSettings
    prefix: str = DEFAULT_PREFIX
    group: str | None = None
    """The shared-subscription group, a secret. None: a random one, so this consumer shares
    with nobody (a fixed default would let anyone who guesses it join the group)."""
    out: Path | None = None
    """JSON lines are appended here; None: standard output."""
    state: Path | None = None
    """SQLite file keeping the stored ranges across restarts; None: in memory only."""
    accept_plaintext: bool = False
    receipt_interval_s: float = RECEIPT_INTERVAL_S
    receipt_max_seqs: int = RECEIPT_MAX_SEQS

    def __post_init__(self) -> None:
        problem = _prefix_problem(self.prefix)
        if problem is not None:
            raise ValueError(f"topic prefix {self.prefix!r}: {problem}")
        if self.group is not None and not _GROUP_RE.fullmatch(self.group):
            # The name itself is not shown: it is a secret, and may be one with a typo.
            raise ValueError(
                f"the share group name must be 1 to 128 letters, digits, '_' or '-' "
                f"(pattern {GROUP_PATTERN})"
            )
        if self.mqtt.session_expiry_s > 0 and self.group is None:
            # A persistent session keeps its subscriptions: a new random group at each start
            # would add a subscription (and a copy of every message) per restart.
            raise ValueError("a persistent session (session expiry > 0) needs a fixed group")
        if self.receipt_interval_s <= 0 or self.receipt_max_seqs < 1:
            raise ValueError("receipt_interval_s must be > 0 and receipt_max_seqs >= 1")


def _prefix_problem(prefix: str) -> str | None:
    if not prefix or prefix.startswith(("/", "$")) or prefix.endswith("/"):
        return "expected topic levels like lampyre/v1 (no leading '/' or '$', no trailing '/')"
    if any(char in prefix for char in "+#\x00") or "//" in prefix:
        return "no wildcard, NUL or empty level allowed"
    return None


@dataclass
class HubCounters:
    """What the consumer did since it started."""

    received: int = 0
    """Messages handed to the consumer (every one is stored, dropped as duplicate or refused)."""
    stored_messages: int = 0
    stored_readings: int = 0
    stored_events: int = 0
    duplicates: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    """Refused messages by reason (see :class:`Refusal`)."""
    receipts_sent: int = 0
    """Receipt tokens the broker acknowledged."""
    receipts_refused: int = 0
    """Receipt tokens the broker refused (an ACL without ``{prefix}/+/receipt`` for the hub)."""

    @property
    def refused_total(self) -> int:
        return sum(self.refused.values())

    def summary(self) -> str:
        """One line for the end of a run."""
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.refused.items()))
        return (
            f"received {self.received} messages; stored {self.stored_readings} readings and "
            f"{self.stored_events} events ({self.stored_messages} messages); "
            f"{self.duplicates} duplicates dropped; refused {self.refused_total}"
            f"{f' ({reasons})' if reasons else ''}; {self.receipts_sent} receipts sent"
            f"{f', {self.receipts_refused} refused by the broker' if self.receipts_refused else ''}"
        )


class Refusal:
    """The reasons a message is refused, as counted in :attr:`HubCounters.refused`."""

    MALFORMED = "malformed"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_GATEWAY_KEY = "unknown_gateway_key"
    """Signed by a key not enrolled for the envelope's gateway (or the gateway is unknown)."""
    BAD_SIGNATURE = "bad_signature"
    HEADER_MISMATCH = "header_mismatch"
    """An authentic message on another gateway's (or stream's) topic: a replay."""
    UNKNOWN_HUB_KEY = "unknown_hub_key"
    DECRYPT_FAILED = "decrypt_failed"
    ENVELOPE = "envelope"
    """Any other envelope refusal (a future EnvelopeError subclass)."""
    BAD_BODY = "bad_body"
    """Authentic, but the body is not the data or event JSON of the hub protocol."""
    PLAINTEXT = "plaintext"
    """A plaintext payload (``seal = "none"``) without ``accept_plaintext``."""
    BAD_TOPIC = "bad_topic"


def _envelope_reason(exc: EnvelopeError) -> str:
    if isinstance(exc, UnknownKey):
        return Refusal.UNKNOWN_HUB_KEY if exc.role == "hub" else Refusal.UNKNOWN_GATEWAY_KEY
    for kind, reason in (
        (Malformed, Refusal.MALFORMED),
        (UnsupportedVersion, Refusal.UNSUPPORTED_VERSION),
        (BadSignature, Refusal.BAD_SIGNATURE),
        (HeaderMismatch, Refusal.HEADER_MISMATCH),
        (DecryptFailed, Refusal.DECRYPT_FAILED),
    ):
        if isinstance(exc, kind):
            return reason
    return Refusal.ENVELOPE


class _Refused(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------------
# Stored ranges: in memory, and in SQLite.
# --------------------------------------------------------------------------------------------


class RangeSet:
    """A set of integers kept as sorted, disjoint, non-adjacent inclusive ranges."""

    __slots__ = ("_firsts", "_lasts")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        merged = merge_ranges(ranges)
        self._firsts = [first for first, _ in merged]
        self._lasts = [last for _, last in merged]

    def add(self, first: int, last: int) -> tuple[int, int]:
        """Add ``first..last``; return the range of the set that now holds it."""
        if first > last:
            raise ValueError(f"range {first}..{last}: first after last")
        # Ranges i..j-1 overlap or touch first..last: their last >= first - 1 and their
        # first <= last + 1 (both lists are sorted because the ranges are disjoint).
        i = bisect.bisect_left(self._lasts, first - 1)
        j = bisect.bisect_right(self._firsts, last + 1)
        if i < j:
            first = min(first, self._firsts[i])
            last = max(last, self._lasts[j - 1])
        self._firsts[i:j] = [first]
        self._lasts[i:j] = [last]
        return first, last

    def covers(self, first: int, last: int) -> bool:
        """Whether every integer of ``first..last`` is in the set."""
        i = bisect.bisect_right(self._firsts, first) - 1
        return i >= 0 and self._lasts[i] >= last

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._firsts, self._lasts, strict=True))

    def copy(self) -> RangeSet:
        other = RangeSet()
        other._firsts = list(self._firsts)
        other._lasts = list(self._lasts)
        return other

    def __len__(self) -> int:
        return len(self._firsts)

    def __repr__(self) -> str:
        return f"RangeSet({self.ranges()})"


class RangeStore:
    """The stored ranges of every gateway in SQLite, one row per range of :class:`RangeSet`
    (so a gateway that delivered everything has one row). Blocking: use it from a thread.

    WAL with ``synchronous=NORMAL``: a power cut may lose the last commits (never corrupt the
    file). That costs at most a duplicate line, never a loss: the output is fsynced before the
    ranges are recorded, so the window between the two exists anyway.
    """

    SCHEMA_VERSION: Final = 1

    def __init__(self, path: Path) -> None:
        self.path = path
        _create_private_file(path)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, self.SCHEMA_VERSION):
                raise HubError(f"state file {path} has schema version {version}, expected 1")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS stored ("
                " gateway TEXT NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL,"
                " PRIMARY KEY (gateway, first)) WITHOUT ROWID"
            )
            self._db.execute(f"PRAGMA user_version={self.SCHEMA_VERSION}")
        except BaseException:
            self._db.close()
            raise

    def load(self) -> dict[str, RangeSet]:
        ranges: dict[str, list[tuple[int, int]]] = {}
        for gateway, first, last in self._db.execute("SELECT gateway, first, last FROM stored"):
            ranges.setdefault(gateway, []).append((first, last))
        return {gateway: RangeSet(items) for gateway, items in ranges.items()}

    def record(self, rows: Sequence[tuple[str, int, int]]) -> None:
        """Record ``(gateway, first, last)`` ranges, each a range of the gateway's
        :class:`RangeSet` as it is now: it replaces every stored range inside it (the ones it
        merged), in one transaction."""
        if not rows:
            return
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for gateway, first, last in rows:
                db.execute(
                    "DELETE FROM stored WHERE gateway = ? AND first BETWEEN ? AND ?",
                    (gateway, first, last),
                )
                db.execute("INSERT INTO stored VALUES (?, ?, ?)", (gateway, first, last))
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def row_count(self) -> int:
        count: int = self._db.execute("SELECT count(*) FROM stored").fetchone()[0]
        return count

    def close(self) -> None:
        self._db.close()


def _create_private_file(path: Path) -> None:
    """Create ``path`` with mode 0600 if it does not exist (it holds what the gateways sent)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    os.close(fd)
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    # A new file's name is durable only once its folder is: a power cut must not lose the file
    # whose lines were receipted.
    with contextlib.suppress(OSError):
        fsync_folder(folder)


# --------------------------------------------------------------------------------------------
# The output.
# --------------------------------------------------------------------------------------------


class JsonLinesOutput:
    """Append-only JSON lines; :meth:`append` returns once the bytes are fsynced (when the
    output is a regular file). Blocking: use it from a thread."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is None:
            # Our own descriptor: writes go straight to the file, never through sys.stdout's
            # buffer, and closing it leaves standard output open.
            self._fd = os.dup(sys.stdout.fileno())
        else:
            existed = path.exists()
            # Read-write: a half-written last line is read back and cut (see below).
            self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if not existed:
                _fsync_folder(path.parent)
        self.durable = stat.S_ISREG(os.fstat(self._fd).st_mode)
        """A regular file: fsync makes the lines durable. A pipe or a terminal cannot."""
        if path is not None and self.durable:
            self._trim_partial_line()

    def _trim_partial_line(self) -> None:
        """Cut a last line without its newline (a crash in the middle of a write): those
        records were never recorded as stored, so they come again; appending after the half
        line would make one unreadable line of two records."""
        size = os.fstat(self._fd).st_size
        if size == 0 or os.pread(self._fd, 1, size - 1) == b"\n":
            return
        keep = size
        chunk = 4096
        while keep > 0:
            start = max(0, keep - chunk)
            data = os.pread(self._fd, keep - start, start)
            at = data.rfind(b"\n")
            if at >= 0:
                keep = start + at + 1
                break
            keep = start
        os.ftruncate(self._fd, keep)
        os.fsync(self._fd)
        log.warning(
            "output %s ended with an incomplete line (a crash while writing): cut %d bytes; "
            "those records were not acknowledged and will be stored when they come again",
            self.path,
            size - keep,
        )

    def append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        if self.durable:
            os.fsync(self._fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


# --------------------------------------------------------------------------------------------
# Receipts.
# --------------------------------------------------------------------------------------------


def receipt_tokens(
    gateway: str,
    ranges: Iterable[tuple[int, int]],
    key: Ed25519PrivateKey,
    kid: str,
    *,
    ts_ms: int,
) -> list[tuple[list[tuple[int, int]], str]]:
    """Receipt tokens naming ``ranges`` (merged), at most :data:`MAX_RECEIPT_RANGES` ranges
    each: ``(ranges of the token, token)`` pairs."""
    merged = merge_ranges(ranges)
    tokens: list[tuple[list[tuple[int, int]], str]] = []
    for start in range(0, len(merged), MAX_RECEIPT_RANGES):
        chunk = merged[start : start + MAX_RECEIPT_RANGES]
        tokens.append((chunk, sign_receipt(gateway, chunk, key, kid, ts_ms=ts_ms)))
    return tokens


# --------------------------------------------------------------------------------------------
# Bodies.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Accepted:
    """An authentic message, ready to store."""

    gateway: str
    first: int
    last: int
    lines: bytes
    readings: int
    events: int


class _NotPlainJson(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NotPlainJson(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _NotPlainJson("a number too large for a double")
    return value


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        document = json.loads(
            data.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, our own refusals and over-long integers; the
        # message names a position at most, never the text.
        what = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else "not JSON"
        raise _Refused(Refusal.BAD_BODY, f"body is {what}") from None
    if not isinstance(document, dict):
        raise _Refused(Refusal.BAD_BODY, "body is not a JSON object")
    return document


def _is_seq(value: object) -> TypeGuard[int]:
    return type(value) is int and 0 <= value <= MAX_SEQ


_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
"""ASCII output (escapes for the rest): one record per line whatever the strings hold. One
encoder for every line: building one per call costs more than encoding a reading."""


def _line(document: Mapping[str, Any]) -> bytes:
    return _ENCODER.encode(document).encode("ascii") + b"\n"


def _records(gateway: str, stream: str, seq: int, document: dict[str, Any]) -> _Accepted:
    """The output lines of an authentic body of ``gateway`` carrying ``seq``."""
    if document.get("v") != PAYLOAD_VERSION:
        raise _Refused(Refusal.BAD_BODY, f"body v is not {PAYLOAD_VERSION}")
    if stream == "event":
        return _Accepted(
            gateway,
            seq,
            seq,
            _line({"type": "event", "gateway": gateway, "seq": seq, "event": document}),
            0,
            1,
        )
    readings = document.get("readings")
    if not isinstance(readings, list):
        raise _Refused(Refusal.BAD_BODY, "data body without a readings list")
    lines: list[bytes] = []
    for reading in readings:
        if not isinstance(reading, dict) or not reading.keys() >= _READING_FIELDS:
            raise _Refused(
                Refusal.BAD_BODY, f"a reading without its fields {sorted(_READING_FIELDS)}"
            )
        value, unit, ts = reading["value"], reading["unit"], reading["ts"]
        if not (
            isinstance(reading["device"], str)
            and isinstance(reading["point"], str)
            and isinstance(reading["quality"], str)
            and (unit is None or isinstance(unit, str))
            and type(ts) is int
            and (value is None or isinstance(value, bool | int | float | str))
        ):
            raise _Refused(Refusal.BAD_BODY, "a reading field of the wrong type")
        lines.append(
            _line(
                {
                    "type": "reading",
                    "gateway": gateway,
                    "seq": seq,
                    "device": reading["device"],
                    "point": reading["point"],
                    "value": value,
                    "unit": unit,
                    "ts": ts,
                    "quality": reading["quality"],
                }
            )
        )
    return _Accepted(gateway, seq, seq, b"".join(lines), len(lines), 0)


def _commit(
    output: JsonLinesOutput, state: RangeStore | None, data: bytes, rows: list[tuple[str, int, int]]
) -> str | None:
    """Blocking: append and fsync ``data``, then record ``rows`` (in that order: a range is
    never recorded before its lines are durable). Raises OSError when the output fails; returns
    why the state failed, or None."""
    output.append(data)
    if state is not None:
        try:
            state.record(rows)
        except (OSError, sqlite3.Error) as exc:
            return str(exc)
    return None


# --------------------------------------------------------------------------------------------
# The consumer.
# --------------------------------------------------------------------------------------------


class _StorageFailed(Exception):
    pass


@dataclass(eq=False)
class _Commit:
    accepted: _Accepted
    future: asyncio.Future[None]


class HubConsumer:
    """Reads ``{prefix}/+/data`` and ``{prefix}/+/event`` through a shared subscription, opens
    each envelope, appends its records to the output and receipts them.

    ``hub_keys``: the hub's HPKE private keys by key id (``agent.keys.load_hub_private_keys``);
    ``gateway_keys``: the enrolment (``agent.keys.load_enrolled_gateway_keys``);
    ``receipt_key``: the hub's receipt-signing key, or None for no receipts.

    ``await consumer.run(count=..., seconds=...)`` returns the counters once stopped (by
    :meth:`stop`, ``count`` readings stored or ``seconds`` elapsed), once per consumer;
    :attr:`subscribed` is set while the subscriptions are in place (tests publish once it is).
    """

    def __init__(
        self,
        settings: HubSettings,
        *,
        hub_keys: Mapping[str, HubPrivateKey],
        gateway_keys: GatewayKeys,
        receipt_key: Ed25519PrivateKey | None = None,
    ) -> None:
        self.settings = settings
        self._hub_keys = hub_keys
        self._gateway_keys = gateway_keys
        self._receipt_key = receipt_key
        self._receipt_kid = (
            ed25519_key_id(receipt_key.public_key()) if receipt_key is not None else None
        )
        self._group = settings.group if settings.group is not None else secrets.token_hex(16)
        self.counters = HubCounters()
        self.subscribed = asyncio.Event()
        self._stop = asyncio.Event()
        self._stopping = False
        self._count: int | None = None
        self._started = False
        self._fatal: str | None = None
        self._session: MqttSession | None = None
        # Storage.
        self._output: JsonLinesOutput | None = None
        self._state: RangeStore | None = None
        self._stored: dict[str, RangeSet] = {}
        self._queue: list[_Commit] = []
        self._inflight: dict[str, list[_Commit]] = {}
        self._work = asyncio.Event()
        self._closing = False
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Receipts.
        self._receipt_pending: dict[str, list[tuple[int, int]]] = {}
        self._receipt_seqs = 0
        self._receipt_due = asyncio.Event()
        self._receipt_full = asyncio.Event()
        self._receipts_closing = False

    # Public surface ------------------------------------------------------------------------
    @property
    def receipts(self) -> bool:
        return self._receipt_key is not None

    def topic_filter(self, stream: str) -> str:
        """The shared subscription of ``stream``. It holds the group secret: never log it."""
        return f"$share/{self._group}/{self.settings.prefix}/+/{stream}"

    def stored_ranges(self) -> dict[str, list[tuple[int, int]]]:
        """The sequence numbers stored so far (this run and, with a state file, before)."""
        return {gateway: ranges.ranges() for gateway, ranges in self._stored.items()}

    def stop(self) -> None:
        """Stop: the message being stored is finished and acknowledged, pending receipts are
        sent, then the consumer disconnects. Safe to call from a signal handler."""
        self._stopping = True
        self._stop.set()

    async def run(self, *, count: int | None = None, seconds: float | None = None) -> HubCounters:
        """Consume until stopped; return the counters. Raises :class:`HubError` when storage
        fails or the broker refuses the subscription (after a clean stop)."""
        if self._started:
            raise RuntimeError("a HubConsumer runs once: make a new one to listen again")
        self._started = True
        self._count = count
        if self.settings.group is None:
            log.info(
                "no share group given: using a random one, so this consumer shares the "
                "messages with no other consumer"
            )
        elif len(self.settings.group) < SHORT_GROUP_CHARS:
            log.warning(
                "the share group name is shorter than %d characters: a gateway that guesses it "
                "joins the group and makes the hub miss messages",
                SHORT_GROUP_CHARS,
            )
        mqtt = self.settings.mqtt
        if mqtt.tls is None and not is_loopback_host(mqtt.host):
            log.warning(
                "MQTT to %s:%s without TLS: the broker is not authenticated and the receipts "
                "and any password cross the network in clear; use TLS for production",
                mqtt.host,
                mqtt.port,
            )
        try:
            await asyncio.to_thread(self._open_storage)
        except (OSError, sqlite3.Error) as exc:
            await asyncio.to_thread(self._close_storage)
            raise HubError(f"cannot open the hub's storage: {exc}") from None
        except BaseException:
            await asyncio.to_thread(self._close_storage)
            raise
        writer = asyncio.create_task(self._write_loop(), name="hub-writer")
        receipts = (
            asyncio.create_task(self._receipt_loop(), name="hub-receipts")
            if self.receipts
            else None
        )
        timer = (
            asyncio.get_running_loop().call_later(seconds, self.stop)
            if seconds is not None
            else None
        )
        try:
            await self._serve()
        finally:
            if timer is not None:
                timer.cancel()
            await self._shutdown(writer, receipts)
        if self._fatal is not None:
            raise HubError(self._fatal)
        return self.counters

    # Storage (threads) ----------------------------------------------------------------------
    def _open_storage(self) -> None:
        settings = self.settings
        if settings.state is not None:
            self._state = RangeStore(settings.state)
            self._stored = self._state.load()
            log.info(
                "state %s: stored ranges of %d gateways (%d ranges)",
                settings.state,
                len(self._stored),
                sum(len(ranges) for ranges in self._stored.values()),
            )
        self._output = JsonLinesOutput(settings.out)
        if self.receipts and not self._output.durable:
            raise HubError(
                "receipts need the output on a regular file (--out FILE): a receipt promises "
                "the records are on disk, and a pipe or a terminal cannot be fsynced"
            )

    def _close_storage(self) -> None:
        output, self._output = self._output, None
        if output is not None:
            output.close()
        state, self._state = self._state, None
        if state is not None:
            state.close()

    # Connection ----------------------------------------------------------------------------
    async def _serve(self) -> None:
        """Connect, subscribe, and reconnect with backoff until stopped."""
        mqtt = self.settings.mqtt
        attempt = 0
        last_failure: str | None = None
        while not self._stop.is_set():
            session = MqttSession(mqtt)
            session.on_message(self._on_message)
            try:
                if not await self._until_stopped(self._subscribe(session)):
                    await session.disconnect()
                    return
            except (MqttError, TimeoutError) as exc:
                await session.disconnect()
                if isinstance(exc, MqttConnectError) and exc.kind == "config":
                    raise HubError(str(exc)) from None
                failure = str(exc) or "timed out"
                if failure != last_failure:
                    log.warning(
                        "cannot listen on %s:%s: %s (retrying with backoff)",
                        mqtt.host,
                        mqtt.port,
                        failure,
                    )
                    last_failure = failure
                await self._pause(backoff_delay_s(attempt, BACKOFF_BASE_S, BACKOFF_CAP_S))
                attempt += 1
                continue
            except BaseException:
                await session.disconnect()
                raise
            attempt = 0
            last_failure = None
            self._session = session
            self.subscribed.set()
            log.info(
                "listening on %s:%s to %s/+/{%s} (shared subscription, QoS 1)%s",
                mqtt.host,
                mqtt.port,
                self.settings.prefix,
                ",".join(STREAMS),
                f"; receipts on {self.settings.prefix}/<gateway>/receipt" if self.receipts else "",
            )
            if self.receipts:
                self._receipt_due.set()  # receipts held back while disconnected go now
            stopping = asyncio.create_task(self._stop.wait())
            lost = asyncio.create_task(session.wait_disconnected())
            try:
                await asyncio.wait({stopping, lost}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
                lost.cancel()
            if self._stop.is_set():
                return  # the session stays for the shutdown: acks and receipts still go out
            self.subscribed.clear()
            self._session = None
            log.warning(
                "connection to %s:%s lost (%s); reconnecting",
                mqtt.host,
                mqtt.port,
                session.disconnect_reason,
            )
            await session.disconnect()
            await self._pause(backoff_delay_s(0, BACKOFF_BASE_S, BACKOFF_CAP_S))

    async def _subscribe(self, session: MqttSession) -> None:
        # No will: nobody watches the hub's presence, and the shipped ACL lets the hub
        # publish nothing but receipts (a will elsewhere would be dropped anyway).
        await session.connect(None)
        for stream in STREAMS:
            try:
                await session.subscribe(self.topic_filter(stream), qos=1)
            except SubscribeRejected as exc:
                # Said without the filter: it holds the group secret.
                raise HubError(
                    f"the broker refused the shared subscription to "
                    f"{self.settings.prefix}/+/{stream}: 0x{exc.reason_code:02X} {exc.reason}"
                ) from None

    async def _until_stopped(self, work: Coroutine[Any, Any, None]) -> bool:
        """Run ``work``; False if a stop came first (``work`` is then cancelled): a stop must
        not wait for a connection attempt to time out."""
        task = asyncio.ensure_future(work)
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, MqttError, TimeoutError):
                    await task
        if task.cancelled():
            return False
        task.result()
        return True

    async def _pause(self, delay_s: float) -> None:
        """Sleep, unless stopped meanwhile."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay_s):
                await self._stop.wait()

    async def _shutdown(
        self, writer: asyncio.Task[None], receipts: asyncio.Task[None] | None
    ) -> None:
        self.stop()
        # 1. The message being stored is finished, so its PUBACK goes out before DISCONNECT.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHUTDOWN_TIMEOUT_S):
                await self._idle.wait()
        # 2. Receipts for everything stored so far.
        if receipts is not None:
            self._receipts_closing = True
            self._receipt_due.set()
            self._receipt_full.set()
            try:
                async with asyncio.timeout(SHUTDOWN_TIMEOUT_S):
                    await receipts
            except TimeoutError:
                log.warning("stopping without the last receipts (the broker did not answer)")
            finally:
                receipts.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await receipts
        # 3. Disconnect: handlers still holding unstored messages are cancelled, unacknowledged.
        session, self._session = self._session, None
        if session is not None:
            await session.disconnect()
        self.subscribed.clear()
        # 4. Commits already submitted still reach the disk; then the files are closed.
        self._closing = True
        self._work.set()
        await writer
        await asyncio.to_thread(self._close_storage)

    # Messages ------------------------------------------------------------------------------
    async def _on_message(self, message: Message) -> None:
        """The MqttSession handler: its return sends the PUBACK, so it returns only when the
        message is refused, a duplicate, or stored durably."""
        if self._stopping:
            # Not stored, so not acknowledged: returning would PUBACK it. Held until the
            # disconnect cancels the handler; a persistent session delivers it again.
            await asyncio.get_running_loop().create_future()
            return
        self._busy += 1
        self._idle.clear()
        try:
            stored = await self._handle(message)
        finally:
            self._busy -= 1
            if self._busy == 0:
                self._idle.set()
        if not stored:
            await asyncio.get_running_loop().create_future()

    async def _handle(self, message: Message) -> bool:
        """Store, drop or refuse one message; False if it could not be stored (no PUBACK)."""
        self.counters.received += 1
        try:
            accepted = self._decode(message)
        except _Refused as refusal:
            self._count_refusal(message.topic, refusal)
            return True
        gateway, first, last = accepted.gateway, accepted.first, accepted.last
        while True:
            stored = self._stored.get(gateway)
            if stored is not None and stored.covers(first, last):
                self.counters.duplicates += 1
                log.debug("duplicate %s seq %d-%d dropped", gateway, first, last)
                self._receipt_add(gateway, first, last)
                return True
            pending = next(
                (
                    commit
                    for commit in self._inflight.get(gateway, ())
                    if commit.accepted.first <= last and first <= commit.accepted.last
                ),
                None,
            )
            if pending is None:
                break
            # The same records are being stored (only possible when messages are handled
            # concurrently): wait for that commit, then this one is a duplicate.
            try:
                await asyncio.shield(pending.future)
            except _StorageFailed:
                return False
        if self._fatal is not None:
            return False  # the writer is gone
        commit = _Commit(accepted, asyncio.get_running_loop().create_future())
        self._inflight.setdefault(gateway, []).append(commit)
        self._queue.append(commit)
        self._work.set()
        try:
            # Shielded: a handler cancelled by a disconnect must not cancel the commit.
            await asyncio.shield(commit.future)
        except _StorageFailed:
            return False
        return True

    def _decode(self, message: Message) -> _Accepted:
        """The records of an authentic message, or :class:`_Refused`."""
        gateway, stream = self._route(message.topic)
        payload = message.payload
        if payload[:1] == b"{":
            if not self.settings.accept_plaintext:
                raise _Refused(
                    Refusal.PLAINTEXT,
                    'a plaintext payload (a gateway with seal = "none"); refused without '
                    "--accept-plaintext",
                )
            document = _json_object(payload)
            seq = document.get("seq")
            if not _is_seq(seq):
                raise _Refused(Refusal.BAD_BODY, "plaintext payload without a valid seq")
            if document.get("gateway") != gateway:
                raise _Refused(
                    Refusal.HEADER_MISMATCH,
                    f"plaintext payload of another gateway arrived for {gateway}",
                )
            return _records(gateway, stream, seq, document)
        try:
            header, body = open_envelope(
                payload, self._hub_keys, self._gateway_keys, gateway=gateway, stream=stream
            )
        except EnvelopeError as exc:
            raise _Refused(_envelope_reason(exc), str(exc)) from None
        document = _json_object(body)
        seq = document.get("seq")
        # One record per envelope (the pipeline seals make(seq) with seq_first = seq_last =
        # seq): a body must name the very gateway and seq its authenticated header names.
        if (
            document.get("gateway") != header.gateway
            or type(seq) is not int
            or not seq == header.seq_first == header.seq_last
        ):
            raise _Refused(
                Refusal.BAD_BODY,
                f"the body's gateway and seq are not the header's ({header.gateway} seq "
                f"{header.seq_first}-{header.seq_last})",
            )
        return _records(gateway, stream, seq, document)

    def _route(self, topic: str) -> tuple[str, str]:
        prefix = self.settings.prefix + "/"
        parts = topic[len(prefix) :].split("/") if topic.startswith(prefix) else []
        if len(parts) != 2 or parts[1] not in STREAMS or not _GATEWAY_RE.fullmatch(parts[0]):
            raise _Refused(Refusal.BAD_TOPIC, f"unexpected topic {topic[:DETAIL_CHARS]!r}")
        return parts[0], parts[1]

    def _count_refusal(self, topic: str, refusal: _Refused) -> None:
        refused = self.counters.refused
        refused[refusal.reason] = refused.get(refusal.reason, 0) + 1
        if refusal.reason == Refusal.BAD_TOPIC:
            log.warning("refused a message: %s: %s", refusal.reason, refusal.detail)
            return
        gateway, stream = topic.rsplit("/", 2)[-2:]
        log.warning(
            "refused a message from gateway %s on %s: %s: %s",
            gateway,
            stream,
            refusal.reason,
            refusal.detail[:DETAIL_CHARS],
        )

    # The writer ----------------------------------------------------------------------------
    async def _write_loop(self) -> None:
        """Group commit: everything waiting goes out in one write and one fsync, then its
        ranges are recorded (one thread hop for both), then the handlers return (PUBACK)."""
        while True:
            if not self._queue:
                if self._closing:
                    return
                await self._work.wait()
                self._work.clear()
                continue
            batch, self._queue = self._queue, []
            output, state = self._output, self._state
            assert output is not None
            data = b"".join(commit.accepted.lines for commit in batch)
            rows = self._rows_after(batch) if state is not None else []
            try:
                state_error = await asyncio.to_thread(_commit, output, state, data, rows)
            except Exception as exc:
                if not isinstance(exc, OSError):
                    log.exception("storing %d messages failed", len(batch))
                self._storage_failed(f"cannot write the output: {exc}", batch)
                return
            for commit in batch:
                # The lines are on disk: these messages may be acknowledged, even if the
                # state failed (that only costs duplicates later).
                self._mark_stored(commit.accepted)
                self._finish(commit)
            if state_error is not None:
                assert state is not None
                self._storage_failed(
                    f"cannot record the stored ranges in {state.path}: {state_error}", []
                )
                return

    def _rows_after(self, batch: list[_Commit]) -> list[tuple[str, int, int]]:
        """The state rows once ``batch`` is stored: each new range as merged with the stored
        ones. Computed on copies: the ranges count as stored only once the lines are durable."""
        scratch: dict[str, RangeSet] = {}
        rows: list[tuple[str, int, int]] = []
        for commit in batch:
            accepted = commit.accepted
            ranges = scratch.get(accepted.gateway)
            if ranges is None:
                stored = self._stored.get(accepted.gateway)
                ranges = scratch[accepted.gateway] = RangeSet() if stored is None else stored.copy()
            rows.append((accepted.gateway, *ranges.add(accepted.first, accepted.last)))
        return rows

    def _mark_stored(self, accepted: _Accepted) -> None:
        """Count a durable commit, remember its range and queue its receipt."""
        counters = self.counters
        counters.stored_messages += 1
        counters.stored_readings += accepted.readings
        counters.stored_events += accepted.events
        self._stored.setdefault(accepted.gateway, RangeSet()).add(accepted.first, accepted.last)
        self._receipt_add(accepted.gateway, accepted.first, accepted.last)
        if self._count is not None and counters.stored_readings >= self._count:
            self.stop()

    def _finish(self, commit: _Commit, error: BaseException | None = None) -> None:
        inflight = self._inflight.get(commit.accepted.gateway)
        if inflight is not None:
            inflight.remove(commit)
            if not inflight:
                del self._inflight[commit.accepted.gateway]
        if not commit.future.done():
            if error is None:
                commit.future.set_result(None)
            else:
                commit.future.set_exception(error)
                commit.future.exception()  # the handler may be gone: no "never retrieved"

    def _storage_failed(self, reason: str, batch: list[_Commit]) -> None:
        log.error("%s; stopping (unstored messages are not acknowledged)", reason)
        self._fatal = reason
        self.stop()
        for commit in [*batch, *self._queue]:
            self._finish(commit, _StorageFailed(reason))
        self._queue = []

    # Receipts ------------------------------------------------------------------------------
    def _receipt_add(self, gateway: str, first: int, last: int) -> None:
        if self._receipt_key is None:
            return
        self._receipt_pending.setdefault(gateway, []).append((first, last))
        self._receipt_seqs += last - first + 1
        self._receipt_due.set()
        if self._receipt_seqs >= self.settings.receipt_max_seqs:
            self._receipt_full.set()

    async def _receipt_loop(self) -> None:
        interval = self.settings.receipt_interval_s
        while True:
            await self._receipt_due.wait()
            if not self._receipts_closing:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._receipt_full.wait()
            session = self._session
            if session is None or not session.connected:
                if self._receipts_closing:
                    return
                # Kept until the next connection (which sets _receipt_due again).
                self._receipt_due.clear()
                continue
            sent_all = await self._send_receipts(session)
            if self._receipts_closing and (sent_all or not self._receipt_pending):
                return
            if not sent_all:
                await asyncio.sleep(interval)  # the connection is going: do not spin

    async def _send_receipts(self, session: MqttSession) -> bool:
        """Sign and publish a receipt per gateway for what is pending; False when some have to
        wait for another connection."""
        pending, self._receipt_pending = self._receipt_pending, {}
        self._receipt_seqs = 0
        self._receipt_due.clear()
        self._receipt_full.clear()
        key, kid = self._receipt_key, self._receipt_kid
        assert key is not None and kid is not None
        published: list[tuple[str, list[tuple[int, int]], asyncio.Future[None]]] = []
        retry: list[tuple[str, list[tuple[int, int]]]] = []
        ts_ms = now_ms()
        for gateway, ranges in pending.items():
            topic = f"{self.settings.prefix}/{gateway}/receipt"
            for chunk, token in receipt_tokens(gateway, ranges, key, kid, ts_ms=ts_ms):
                try:
                    future = session.publish_nowait(topic, token.encode("ascii"), qos=1)
                except MqttDisconnected:
                    retry.append((gateway, chunk))
                    continue
                published.append((gateway, chunk, future))
        for gateway, chunk, future in published:
            try:
                await future
            except MqttDisconnected:
                retry.append((gateway, chunk))
            except PublishRejected as exc:
                self.counters.receipts_refused += 1
                log.warning(
                    "the broker refused the receipt for %s (0x%02X %s): check that the hub may "
                    "publish on %s/+/receipt",
                    gateway,
                    exc.reason_code,
                    exc.reason,
                    self.settings.prefix,
                )
            else:
                self.counters.receipts_sent += 1
                log.debug("receipt for %s: %s", gateway, chunk)
        for gateway, chunk in retry:
            for first, last in chunk:
                self._receipt_add(gateway, first, last)
        return not retry
