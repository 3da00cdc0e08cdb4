"""Signed remote commands and signed acks: compact JWS (RFC 7515) with EdDSA/Ed25519 (RFC 8037).

A command arrives as ``BASE64URL(header) . BASE64URL(claims) . BASE64URL(signature)``. The
protected header is exactly ``{"alg":"EdDSA","kid":KEY ID,"typ":"lampyre-cmd+jwt"}``; the claims
are ``jti``, ``iat``, ``exp`` (JWT NumericDate: integer seconds), ``aud`` (the gateway id) and
``cmd``, the command body the spine already parses (``agent.commands.parse_command``), whose
``id`` must equal ``jti`` and whose ``expires`` (epoch milliseconds) must equal ``exp`` * 1000.

:func:`verify_command` checks, in this order, and raises :class:`CommandRejected` with a stable
``code`` at the first failure: size (before anything else), structure, algorithm, header, key
id, **signature (before the claims are parsed as JSON)**, audience, claims, lifetime, time
window (with :data:`CLOCK_SKEW_S`; relaxed to strict per-post ordering while the gateway clock
is not synchronised), replay. ``docs/command-signing.md`` is the reference for the format.

Why a hand-written verifier rather than a JOSE library: there is one algorithm and one key type,
so the whole of RFC 7515 that applies is a split, strict base64url, two small JSON objects and
one Ed25519 verification. Fixing the algorithm here removes by construction the classic JOSE
failures (``alg: none``, HMAC keyed with a public key, algorithm chosen by the token).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.crypto import RecordTampered
from agent.sdk import LampyreError

__all__ = [
    "ACK_TYP",
    "ALGORITHM",
    "CLOCK_SKEW_S",
    "COMMAND_TYP",
    "DEFAULT_LIFETIME_S",
    "MAX_ACK_TOKEN_BYTES",
    "MAX_LIFETIME_S",
    "MAX_RECEIPT_RANGES",
    "MAX_RECEIPT_TOKEN_BYTES",
    "MAX_TOKEN_BYTES",
    "RECEIPT_TYP",
    "REPLAY_KEEP_S",
    "UNSYNCED_MAX_LIFETIME_S",
    "AckRejected",
    "ClockState",
    "CommandRejected",
    "CommandTable",
    "CommandTableReplayStore",
    "CommandVerifier",
    "Ed25519Signer",
    "MemoryReplayStore",
    "Receipt",
    "ReceiptRejected",
    "RejectionCode",
    "ReplayStore",
    "TokenRejected",
    "VerifiedCommand",
    "clock_state_from_timedatectl",
    "command_claims",
    "merge_ranges",
    "read_clock_state",
    "sign_ack",
    "sign_command",
    "sign_receipt",
    "verify_ack",
    "verify_command",
    "verify_receipt",
]

ALGORITHM = "EdDSA"
"""The only ``alg`` accepted (RFC 8037 §3.1); the keys are Ed25519, never Ed448."""
COMMAND_TYP = "lampyre-cmd+jwt"
"""``typ`` of a command token (explicit typing, RFC 8725 §3.11): a gateway's signed ack, or any
other JWS signed by a key that happens to be trusted, is never taken for a command."""
ACK_TYP = "lampyre-ack+jwt"
"""``typ`` of an ack token."""
RECEIPT_TYP = "lampyre-receipt+jwt"
"""``typ`` of a hub receipt token."""
MAX_RECEIPT_TOKEN_BYTES = 65536
"""A receipt longer than this is refused before it is split."""
MAX_RECEIPT_RANGES = 1024
"""At most this many sequence ranges in one receipt (the hub sends another for the rest)."""
MAX_SEQ = 2**53 - 1
"""Sequence numbers stay exact in a JSON double (as in the envelope header)."""

MAX_TOKEN_BYTES = 8192
"""A command token longer than this is refused before it is even split. A 4096-byte command body
(the spine's limit) with its claims, header and signature fits in about 5,900."""
MAX_ACK_TOKEN_BYTES = 1024 * 1024
"""An ack lists one result per device of its target: it can be much larger than a command."""
MAX_HEADER_CHARS = 512
"""The protected header is decoded and parsed before the signature is checked: this bounds the
work an unauthenticated sender can cause (a real header is under 100 characters)."""
MAX_INTEGER_DIGITS = 40
"""A JSON integer longer than this is refused while parsing (a 64-bit value has at most 20
digits), so no huge number is ever converted."""
SIGNATURE_BYTES = 64

CLOCK_SKEW_S = 30
"""With a synchronised clock a command is accepted while ``iat - 30 s <= now < exp + 30 s``."""
MAX_LIFETIME_S = 300
"""``exp - iat`` may not exceed this: a captured token stays usable for that long at most."""
UNSYNCED_MAX_LIFETIME_S = 60
"""While the gateway clock is not synchronised, only tokens living at most this long."""
DEFAULT_LIFETIME_S = 60
"""What :func:`command_claims` uses: valid in both clock states."""
REPLAY_KEEP_S = 3600
"""A ``jti`` is remembered until this long after the token expired (plus the skew), so a clock
stepped back by NTP does not make a forgotten token acceptable again."""
MAX_NUMERIC_DATE_S = 253_402_300_799
"""9999-12-31T23:59:59Z: ``iat`` and ``exp`` beyond it are malformed."""

CLOCK_QUERY_TIMEOUT_S = 2.0
TIMEDATECTL_ARGS: tuple[str, ...] = (
    "timedatectl",
    "show",
    "--property=NTPSynchronized",
    "--value",
)
"""How :func:`read_clock_state` asks systemd whether the clock is synchronised."""

KID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A key id (the key loader uses a 16-hex-digit fingerprint): no ``/``, no leading dot or dash,
so it is safe in a file name, a store entry name and a log line."""
JTI_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
"""The rule for a command id (``agent.commands.ID_PATTERN``): ``jti`` is the command's id."""
_BASE64URL = re.compile(rb"[A-Za-z0-9_-]*")

HEADER_MEMBERS = frozenset({"alg", "kid", "typ"})
"""Nothing else in a protected header: no ``crit``, ``b64``, ``jku``, ``jwk``, ``x5u``..."""
CLAIM_NAMES = frozenset({"jti", "iat", "exp", "aud", "cmd"})
"""Exactly these claims: an unknown claim could carry meaning this gateway would ignore."""


class RejectionCode(StrEnum):
    """The stable ``code`` of a rejection (the ack's ``code``)."""

    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    BAD_ALG = "bad_alg"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    WRONG_AUDIENCE = "wrong_audience"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    CLOCK_UNSYNCHRONIZED = "clock_unsynchronized"
    REPLAYED = "replayed"
    UNAVAILABLE = "unavailable"


class TokenRejected(LampyreError):
    """A token that must not be acted on; ``code`` is stable for machines, ``reason`` for people.

    Reasons never quote the token, a key or an unauthenticated value beyond a checked key id.
    """

    def __init__(
        self,
        code: RejectionCode,
        reason: str,
        *,
        command_id: str | None = None,
        authenticated: bool = False,
    ) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.command_id = command_id
        """The command's id, only once the signature has been verified (else None)."""
        self.authenticated = authenticated
        """True when the token carried a valid signature by a trusted key (it was rejected on its
        claims): a security event can tell a forgery from a stale or replayed command."""


class CommandRejected(TokenRejected):
    """A command token refused by :func:`verify_command`."""


class AckRejected(TokenRejected):
    """An ack token refused by :func:`verify_ack`."""


class ReceiptRejected(TokenRejected):
    """A hub receipt token refused by :func:`verify_receipt`."""


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a verified hub receipt says: every sequence number in ``ranges`` is stored."""

    gateway: str
    ranges: tuple[tuple[int, int], ...]
    """Inclusive ``(first, last)`` ranges, sorted, not overlapping."""
    seq: int
    """The highest sequence number stored (the last range's ``last``)."""
    kid: str
    """The hub key that signed it."""


_Rejection = TypeVar("_Rejection", bound=TokenRejected)


class Ed25519Signer(Protocol):
    """What signs a token: an ``Ed25519PrivateKey``, or a wrapper that keeps the key hidden and
    signs with it (the gateway's signer)."""

    def sign(self, data: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class ClockState:
    """Whether the gateway's wall clock can be trusted for the time window of commands."""

    synchronized: bool
    source: str = "injected"
    """Where the answer came from, for logs and events (``timedatectl``, ``injected``...)."""


@dataclass(frozen=True, slots=True)
class VerifiedCommand:
    """A command token that passed every check of :func:`verify_command`."""

    jti: str
    kid: str
    """The control-post key that signed it."""
    audience: str
    issued_at_s: int
    expires_at_s: int
    body: Mapping[str, Any]
    """The ``cmd`` claim: the spine's command object (``id`` = ``jti``, ``expires`` = ``exp``
    in milliseconds), for :func:`agent.commands.parse_command` (see :meth:`body_json`)."""
    checked_at_ms: int
    """The gateway's clock when the token was verified."""
    clock_synchronized: bool
    clock_warning: str | None = None
    """Set when the gateway clock was not synchronised: the token was accepted on ordering
    alone, and this says so (and what the unreliable clock thought of the time window). The ack
    and a security event should carry it."""

    @property
    def reference_time_ms(self) -> int:
        """The time to give ``parse_command``: the gateway clock when it is synchronised, else
        the token's authenticated ``iat`` (an unsynchronised clock must not reject on time)."""
        if self.clock_synchronized:
            return self.checked_at_ms
        return self.issued_at_s * 1000

    def body_json(self) -> bytes:
        """The body as the bytes ``parse_command`` takes."""
        return json.dumps(self.body, separators=(",", ":"), allow_nan=False).encode()


class ReplayStore(Protocol):
    """Where seen ``jti`` values and each post's latest ``iat`` are kept, across restarts.

    :func:`verify_command` calls ``seen`` then ``remember`` (and the two ``issued_at`` methods):
    callers sharing one store must not verify concurrently (:class:`CommandVerifier` serialises).
    """

    async def seen(self, jti: str) -> bool: ...

    async def remember(self, jti: str, expires_ms: int) -> None:
        """Keep ``jti`` until ``expires_ms`` on the gateway clock (then it may be forgotten)."""

    async def last_issued_at_s(self, kid: str) -> int | None:
        """The highest ``iat`` accepted from key ``kid``, or None if none was."""

    async def advance_issued_at(self, kid: str, issued_at_s: int) -> None:
        """Raise the highest ``iat`` of ``kid`` to ``issued_at_s`` (never lower it)."""


class MemoryReplayStore:
    """A :class:`ReplayStore` in memory: for tests, and as the model of the persistent one."""

    def __init__(self) -> None:
        self.jti_expiry_ms: dict[str, int] = {}
        self.issued_at_s: dict[str, int] = {}

    async def seen(self, jti: str) -> bool:
        return jti in self.jti_expiry_ms

    async def remember(self, jti: str, expires_ms: int) -> None:
        self.jti_expiry_ms[jti] = max(expires_ms, self.jti_expiry_ms.get(jti, expires_ms))

    async def last_issued_at_s(self, kid: str) -> int | None:
        return self.issued_at_s.get(kid)

    async def advance_issued_at(self, kid: str, issued_at_s: int) -> None:
        self.issued_at_s[kid] = max(issued_at_s, self.issued_at_s.get(kid, issued_at_s))

    def forget(self, now_ms: int) -> int:
        """Drop the ``jti`` values kept until before ``now_ms``; returns how many went."""
        gone = [jti for jti, until in self.jti_expiry_ms.items() if until < now_ms]
        for jti in gone:
            del self.jti_expiry_ms[jti]
        return len(gone)


class CommandTable(Protocol):
    """The buffer's command table (``agent.buffer.Buffer`` has these two methods)."""

    async def remember_command(
        self, command_id: str, ack_payload: bytes, expires_ms: int
    ) -> None: ...

    async def recall_command(self, command_id: str) -> bytes | None: ...


class CommandTableReplayStore:
    """A :class:`ReplayStore` kept in the buffer's encrypted command table, so it survives a
    restart and the buffer's ``forget_commands`` purges it with the command ids.

    Entries use ids with a ``/``, a character command ids cannot contain, so they never collide
    with the spine's command dedupe entries: ``jws/jti/<jti>`` (value ``1``, kept until the
    token's expiry plus :data:`REPLAY_KEEP_S`) and ``jws/iat/<kid>`` (the highest ``iat`` in
    decimal, never purged: one entry per post key).
    """

    JTI_PREFIX = "jws/jti/"
    ISSUED_AT_PREFIX = "jws/iat/"
    KEEP_FOREVER_MS = 2**62
    """The expiry of the ``iat`` entries: after any plausible clock, inside a signed 64-bit."""

    def __init__(self, table: CommandTable) -> None:
        self._table = table

    async def seen(self, jti: str) -> bool:
        try:
            return await self._table.recall_command(self.JTI_PREFIX + jti) is not None
        except RecordTampered:
            # An entry exists but does not authenticate: the jti was seen, never accept it again.
            return True

    async def remember(self, jti: str, expires_ms: int) -> None:
        await self._table.remember_command(self.JTI_PREFIX + jti, b"1", expires_ms)

    async def last_issued_at_s(self, kid: str) -> int | None:
        stored = await self._table.recall_command(self.ISSUED_AT_PREFIX + kid)
        if stored is None:
            return None
        if not stored.isdigit() or len(stored) > MAX_INTEGER_DIGITS:
            raise LampyreError(f"the latest iat kept for post key {kid!r} is unreadable")
        return int(stored)

    async def advance_issued_at(self, kid: str, issued_at_s: int) -> None:
        try:
            previous = await self.last_issued_at_s(kid)
        except LampyreError:
            # An unreadable entry (tampered) is replaced: this call only follows an accepted
            # command, whose iat is a sound new lower bound.
            previous = None
        if previous is not None and previous >= issued_at_s:
            return
        await self._table.remember_command(
            self.ISSUED_AT_PREFIX + kid, str(issued_at_s).encode(), self.KEEP_FOREVER_MS
        )


# ------------------------------------------------------------------------------------ signing


def command_claims(
    body: Mapping[str, Any],
    *,
    audience: str,
    issued_at_s: int,
    lifetime_s: int = DEFAULT_LIFETIME_S,
) -> dict[str, Any]:
    """The claims of a command token for ``body`` (the spine's command object, with its ``id``).

    ``jti`` is the body's ``id``; ``exp`` is ``issued_at_s + lifetime_s``; the body's
    ``expires`` is set to ``exp`` in milliseconds, as :func:`verify_command` requires.
    """
    expires_at_s = issued_at_s + lifetime_s
    command = dict(body)
    command["expires"] = expires_at_s * 1000
    return {
        "jti": command["id"],
        "iat": issued_at_s,
        "exp": expires_at_s,
        "aud": audience,
        "cmd": command,
    }


def sign_command(claims: Mapping[str, Any], key: Ed25519Signer, kid: str) -> str:
    """The compact JWS of ``claims`` signed by a control-post key (see :func:`command_claims`).

    The claims are signed as given: whether they are acceptable is the verifier's business.
    """
    return _sign(claims, key, kid, COMMAND_TYP)


def sign_ack(ack: Mapping[str, Any], key: Ed25519Signer, kid: str) -> str:
    """The compact JWS of an ack object, signed by the gateway key ``kid``.

    The payload is the ack exactly as the hub protocol defines it (``v``, ``gateway``, ``seq``,
    ``ts``, ``id``, ``status``...); the header's ``typ`` is :data:`ACK_TYP`.
    """
    return _sign(ack, key, kid, ACK_TYP)


def sign_receipt(
    gateway: str,
    ranges: Sequence[tuple[int, int]],
    key: Ed25519Signer,
    kid: str,
    *,
    ts_ms: int,
) -> str:
    """The compact JWS of a hub receipt for ``gateway``: ``ranges`` of sequence numbers the
    hub has stored (merged and sorted here), signed by the hub's receipt key ``kid``."""
    merged = merge_ranges(ranges)
    if not merged:
        raise ValueError("a receipt names at least one range")
    if len(merged) > MAX_RECEIPT_RANGES:
        raise ValueError(f"at most {MAX_RECEIPT_RANGES} ranges in one receipt")
    document = {
        "v": 1,
        "gateway": gateway,
        "ranges": [list(item) for item in merged],
        "seq": merged[-1][1],
        "ts": ts_ms,
    }
    return _sign(document, key, kid, RECEIPT_TYP)


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inclusive ranges sorted, with overlapping and adjacent ones merged."""
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if first > last:
            raise ValueError(f"range {first}..{last}: first after last")
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def verify_receipt(
    token: bytes | str,
    *,
    keys: Mapping[str, Ed25519PublicKey],
    gateway: str,
) -> Receipt:
    """The ranges of a hub-signed receipt addressed to ``gateway``; :class:`ReceiptRejected`
    otherwise. Freshness is not checked, on purpose: sequence numbers are never reused, so an
    old receipt replayed only deletes records the hub did store."""
    kid, payload = _verify_signature(
        token, keys, RECEIPT_TYP, MAX_RECEIPT_TOKEN_BYTES, ReceiptRejected
    )
    document = _json_object(payload, "receipt", ReceiptRejected, authenticated=True)

    def malformed(reason: str) -> ReceiptRejected:
        return ReceiptRejected(RejectionCode.MALFORMED, f"receipt: {reason}", authenticated=True)

    if document.get("v") != 1:
        raise malformed("v: expected 1")
    if document.get("gateway") != gateway:
        raise ReceiptRejected(
            RejectionCode.WRONG_AUDIENCE,
            f"receipt: not for gateway {_shown(gateway)}",
            authenticated=True,
        )
    raw_ranges = document.get("ranges")
    if not isinstance(raw_ranges, list) or not 1 <= len(raw_ranges) <= MAX_RECEIPT_RANGES:
        raise malformed(f"ranges: expected a list of 1 to {MAX_RECEIPT_RANGES} [first, last]")
    ranges: list[tuple[int, int]] = []
    for item in raw_ranges:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(_is_seq(value) for value in item)
            or item[0] > item[1]
        ):
            raise malformed("ranges: each range is [first, last], integers, first <= last")
        ranges.append((item[0], item[1]))
    if any(ranges[i][1] >= ranges[i + 1][0] for i in range(len(ranges) - 1)):
        raise malformed("ranges: expected sorted, non-overlapping ranges")
    if document.get("seq") != ranges[-1][1]:
        raise malformed("seq: expected the last range's last sequence number")
    return Receipt(gateway, tuple(ranges), ranges[-1][1], kid)


def _is_seq(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SEQ


def _sign(document: Mapping[str, Any], key: Ed25519Signer, kid: str, typ: str) -> str:
    if not KID_PATTERN.fullmatch(kid):
        raise ValueError("kid: expected 1-64 letters, digits, '.', '_' or '-', not starting '.'")
    header = {"alg": ALGORITHM, "kid": kid, "typ": typ}
    return _compact(_json_bytes(header), _json_bytes(document), key)


def _compact(header: bytes, payload: bytes, key: Ed25519Signer) -> str:
    """RFC 7515 §7.1: the signature covers the ASCII of ``b64(header) '.' b64(payload)``."""
    signing_input = _b64url_encode(header) + b"." + _b64url_encode(payload)
    signature = key.sign(signing_input)
    if len(signature) != SIGNATURE_BYTES:
        raise ValueError("the signing key is not an Ed25519 key")
    return (signing_input + b"." + _b64url_encode(signature)).decode("ascii")


def _json_bytes(document: Mapping[str, Any]) -> bytes:
    # ASCII output: a lone surrogate in a string cannot make the UTF-8 encoding fail.
    return json.dumps(document, separators=(",", ":"), allow_nan=False).encode("ascii")


def _b64url_encode(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


# ------------------------------------------------------------------------------ verification


async def verify_command(
    token: bytes | str,
    *,
    keys: Mapping[str, Ed25519PublicKey],
    audience: str,
    now_ms: int,
    clock: ClockState,
    replay: ReplayStore,
) -> VerifiedCommand:
    """Check a command token completely; raise :class:`CommandRejected` at the first failure.

    ``keys`` maps key id to control-post public key (several for rotation); ``audience`` is this
    gateway's id; ``now_ms`` the gateway's wall clock; ``clock`` whether it is synchronised.
    On success the ``jti`` is remembered in ``replay`` before returning, so the same token is
    refused from then on, also after a restart if the store persists. Calls sharing ``replay``
    must not overlap (see :class:`CommandVerifier`).
    """
    kid, payload = _verify_signature(token, keys, COMMAND_TYP, MAX_TOKEN_BYTES, CommandRejected)

    def reject(code: RejectionCode, reason: str, command_id: str | None = None) -> CommandRejected:
        return CommandRejected(code, reason, command_id=command_id, authenticated=True)

    claims = _json_object(payload, "claims", CommandRejected, authenticated=True)

    aud = claims.get("aud")
    if not isinstance(aud, str):
        raise reject(RejectionCode.MALFORMED, "aud: expected the gateway id, a string")
    if aud != audience:
        raise reject(
            RejectionCode.WRONG_AUDIENCE,
            f"aud: addressed to {_shown(aud)}, this gateway is {_shown(audience)}",
        )
    unexpected = claims.keys() - CLAIM_NAMES
    if unexpected:
        raise reject(
            RejectionCode.MALFORMED,
            f"unexpected claim(s) {_names(unexpected)}; only {_names(CLAIM_NAMES)}",
        )
    missing = CLAIM_NAMES - claims.keys()
    if missing:
        raise reject(RejectionCode.MALFORMED, f"missing claim(s) {_names(missing)}")

    jti = claims["jti"]
    if not isinstance(jti, str) or not JTI_PATTERN.fullmatch(jti):
        raise reject(
            RejectionCode.MALFORMED,
            "jti: expected the command id, 1-64 letters, digits, '.', '_', ':' or '-'",
        )
    issued_at_s = _numeric_date(claims["iat"], "iat", jti)
    expires_at_s = _numeric_date(claims["exp"], "exp", jti)
    lifetime_s = expires_at_s - issued_at_s
    if lifetime_s <= 0:
        raise reject(RejectionCode.MALFORMED, "exp: must be after iat", jti)
    if lifetime_s > MAX_LIFETIME_S:
        raise reject(
            RejectionCode.MALFORMED,
            f"exp - iat is {lifetime_s} s; a command lives at most {MAX_LIFETIME_S} s",
            jti,
        )

    body = claims["cmd"]
    if not isinstance(body, dict):
        raise reject(RejectionCode.MALFORMED, "cmd: expected the command object", jti)
    if body.get("id") != jti:
        raise reject(RejectionCode.MALFORMED, "cmd.id: must equal jti", jti)
    body_expires = body.get("expires")
    if isinstance(body_expires, bool) or body_expires != expires_at_s * 1000:
        raise reject(
            RejectionCode.MALFORMED, "cmd.expires: must equal exp * 1000 (milliseconds)", jti
        )

    window_problem = _time_window_problem(issued_at_s, expires_at_s, now_ms)
    clock_warning: str | None = None
    if clock.synchronized:
        if window_problem is not None:
            code, description = window_problem
            raise reject(
                code,
                f"{description} by the gateway clock (skew allowed {CLOCK_SKEW_S} s)",
                jti,
            )
    else:
        if lifetime_s > UNSYNCED_MAX_LIFETIME_S:
            raise reject(
                RejectionCode.CLOCK_UNSYNCHRONIZED,
                f"the gateway clock is not synchronised ({clock.source}): a command may live "
                f"at most {UNSYNCED_MAX_LIFETIME_S} s, this one {lifetime_s} s",
                jti,
            )
        by_local_clock = "within its window" if window_problem is None else window_problem[1]
        clock_warning = (
            f"gateway clock not synchronised ({clock.source}): accepted on strict ordering of "
            f"iat for key {kid}; by the gateway clock the command is {by_local_clock}"
        )

    try:
        if await replay.seen(jti):
            raise reject(
                RejectionCode.REPLAYED, "jti: this command token was already received", jti
            )
        if not clock.synchronized:
            latest_s = await replay.last_issued_at_s(kid)
            if latest_s is not None and issued_at_s <= latest_s:
                raise reject(
                    RejectionCode.REPLAYED,
                    f"iat: not after the latest command accepted from key {kid}; with the "
                    "gateway clock not synchronised, iat must increase strictly",
                    jti,
                )
        # Kept relative to the gateway clock, which is what purges the store.
        keep_until_ms = max(expires_at_s * 1000, now_ms) + (CLOCK_SKEW_S + REPLAY_KEEP_S) * 1000
        await replay.remember(jti, keep_until_ms)
        await replay.advance_issued_at(kid, issued_at_s)
    except CommandRejected:
        raise
    except Exception as exc:
        # Fail closed: without a working replay record no command may run.
        raise reject(
            RejectionCode.UNAVAILABLE,
            f"the replay record could not be read or written ({type(exc).__name__})",
            jti,
        ) from exc

    return VerifiedCommand(
        jti=jti,
        kid=kid,
        audience=aud,
        issued_at_s=issued_at_s,
        expires_at_s=expires_at_s,
        body=body,
        checked_at_ms=now_ms,
        clock_synchronized=clock.synchronized,
        clock_warning=clock_warning,
    )


class CommandVerifier:
    """:func:`verify_command` with its fixed inputs, serialised over one replay store.

    Two deliveries of one token verified at once would both pass ``seen`` before either reaches
    ``remember``; the lock makes check-and-remember atomic within the process.
    """

    def __init__(
        self,
        *,
        keys: Mapping[str, Ed25519PublicKey],
        audience: str,
        replay: ReplayStore,
    ) -> None:
        self._keys = keys
        self._audience = audience
        self._replay = replay
        self._lock = asyncio.Lock()

    async def verify(
        self, token: bytes | str, *, now_ms: int, clock: ClockState
    ) -> VerifiedCommand:
        # The size check needs no lock: an oversized flood never queues behind it.
        if len(token) > MAX_TOKEN_BYTES:
            raise _too_large(len(token), MAX_TOKEN_BYTES, CommandRejected)
        async with self._lock:
            return await verify_command(
                token,
                keys=self._keys,
                audience=self._audience,
                now_ms=now_ms,
                clock=clock,
                replay=self._replay,
            )


def verify_ack(
    token: bytes | str,
    *,
    keys: Mapping[str, Ed25519PublicKey],
    gateway: str | None = None,
) -> dict[str, Any]:
    """The ack object of a gateway-signed ack token; :class:`AckRejected` if it does not verify.

    ``keys`` maps key id to gateway public key. With ``gateway``, the ack's ``gateway`` field
    must name it (``wrong_audience`` otherwise). Freshness is the caller's: match ``id`` to the
    command sent.
    """
    _, payload = _verify_signature(token, keys, ACK_TYP, MAX_ACK_TOKEN_BYTES, AckRejected)
    ack = _json_object(payload, "ack", AckRejected, authenticated=True)
    if gateway is not None and ack.get("gateway") != gateway:
        raise AckRejected(
            RejectionCode.WRONG_AUDIENCE,
            f"ack: not from gateway {_shown(gateway)}",
            authenticated=True,
        )
    return ack


def _verify_signature(
    token: object,
    keys: Mapping[str, Ed25519PublicKey],
    typ: str,
    max_bytes: int,
    error: type[_Rejection],
) -> tuple[str, bytes]:
    """Everything up to and including the signature; returns the key id and the raw payload.

    Work before the signature is bounded: the size check comes first, and only the (short)
    header is parsed as JSON; the payload is only base64-decoded.
    """
    if isinstance(token, str):
        if len(token) > max_bytes:
            raise _too_large(len(token), max_bytes, error)
        try:
            raw = token.encode("ascii")
        except UnicodeEncodeError:
            raise error(RejectionCode.MALFORMED, "token: not ASCII") from None
    elif isinstance(token, bytes):
        if len(token) > max_bytes:
            raise _too_large(len(token), max_bytes, error)
        raw = token
    else:
        raise error(RejectionCode.MALFORMED, "token: expected bytes or text")

    parts = raw.split(b".")
    if len(parts) != 3:
        raise error(
            RejectionCode.MALFORMED,
            f"token: expected 3 base64url parts separated by '.', got {len(parts)}",
        )
    header_part, payload_part, signature_part = parts
    if len(header_part) > MAX_HEADER_CHARS:
        raise error(RejectionCode.MALFORMED, f"header: longer than {MAX_HEADER_CHARS} characters")
    header_bytes = _b64url_decode(header_part, "header", error)
    payload = _b64url_decode(payload_part, "payload", error)
    signature = _b64url_decode(signature_part, "signature", error)

    header = _json_object(header_bytes, "header", error, authenticated=False)
    if header.get("alg") != ALGORITHM:
        raise error(RejectionCode.BAD_ALG, f"alg: only {ALGORITHM} (Ed25519) is accepted")
    if header.keys() - HEADER_MEMBERS:
        # RFC 7515 §4.1.11: an unknown "crit" must be refused; nothing else is needed either.
        raise error(RejectionCode.MALFORMED, f"header: only {_names(HEADER_MEMBERS)} are accepted")
    if header.get("typ") != typ:
        raise error(RejectionCode.MALFORMED, f"typ: expected {typ}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not KID_PATTERN.fullmatch(kid):
        raise error(RejectionCode.UNKNOWN_KEY, "kid: missing or not a key id")
    public_key = keys.get(kid)
    if public_key is None:
        raise error(RejectionCode.UNKNOWN_KEY, f"kid: no trusted key {kid}")

    if len(signature) != SIGNATURE_BYTES:
        raise error(
            RejectionCode.BAD_SIGNATURE,
            f"signature: an Ed25519 signature is {SIGNATURE_BYTES} bytes",
        )
    try:
        public_key.verify(signature, header_part + b"." + payload_part)
    except InvalidSignature:
        raise error(
            RejectionCode.BAD_SIGNATURE, f"signature: does not verify with key {kid}"
        ) from None
    return kid, payload


def _too_large(size: int, limit: int, error: type[_Rejection]) -> _Rejection:
    return error(RejectionCode.TOO_LARGE, f"token is {size} bytes; at most {limit}")


def _b64url_decode(part: bytes, what: str, error: type[TokenRejected]) -> bytes:
    """Strict base64url (RFC 7515 §2, RFC 4648 §5): URL alphabet, no padding, no whitespace, and
    canonical (unused low bits zero), so one value has exactly one encoding."""
    if not _BASE64URL.fullmatch(part) or len(part) % 4 == 1:
        raise error(RejectionCode.MALFORMED, f"{what}: not base64url without padding")
    try:
        decoded = base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise error(RejectionCode.MALFORMED, f"{what}: not base64url without padding") from None
    if _b64url_encode(decoded) != part:
        raise error(RejectionCode.MALFORMED, f"{what}: not canonical base64url")
    return decoded


class _DuplicateMember(ValueError):
    pass


class _NotPlainJson(ValueError):
    pass


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise _DuplicateMember
    return document


def _bounded_int(digits: str) -> int:
    if len(digits) > MAX_INTEGER_DIGITS:
        raise _NotPlainJson(f"an integer of more than {MAX_INTEGER_DIGITS} digits")
    return int(digits)


def _no_constant(name: str) -> Any:
    raise _NotPlainJson(f"{name} is not JSON")


def _json_object(
    data: bytes, what: str, error: type[_Rejection], *, authenticated: bool
) -> dict[str, Any]:
    """``data`` as a JSON object (RFC 8259, UTF-8): no duplicate member names, no NaN or
    Infinity, no huge integers."""
    try:
        document = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_object_without_duplicates,
            parse_int=_bounded_int,
            parse_constant=_no_constant,
        )
    except UnicodeDecodeError:
        raise error(
            RejectionCode.MALFORMED, f"{what}: not UTF-8", authenticated=authenticated
        ) from None
    except _DuplicateMember:
        raise error(
            RejectionCode.MALFORMED, f"{what}: duplicate member name", authenticated=authenticated
        ) from None
    except _NotPlainJson as exc:
        raise error(
            RejectionCode.MALFORMED, f"{what}: {exc}", authenticated=authenticated
        ) from None
    except json.JSONDecodeError as exc:
        # The message names a position only, never the text.
        raise error(
            RejectionCode.MALFORMED,
            f"{what}: not JSON ({exc.msg} at {exc.pos})",
            authenticated=authenticated,
        ) from None
    except (ValueError, RecursionError):
        raise error(
            RejectionCode.MALFORMED, f"{what}: not JSON", authenticated=authenticated
        ) from None
    if not isinstance(document, dict):
        raise error(
            RejectionCode.MALFORMED, f"{what}: expected a JSON object", authenticated=authenticated
        )
    return document


def _numeric_date(value: Any, name: str, jti: str) -> int:
    """JWT NumericDate (RFC 7519 §2), restricted to integer seconds."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise CommandRejected(
            RejectionCode.MALFORMED,
            f"{name}: expected integer seconds since the epoch",
            command_id=jti,
            authenticated=True,
        )
    if not 0 <= value <= MAX_NUMERIC_DATE_S:
        raise CommandRejected(
            RejectionCode.MALFORMED,
            f"{name}: out of range",
            command_id=jti,
            authenticated=True,
        )
    return value


def _time_window_problem(
    issued_at_s: int, expires_at_s: int, now_ms: int
) -> tuple[RejectionCode, str] | None:
    """What is wrong with ``now`` against ``iat - skew <= now < exp + skew`` (a code and a short
    description), or None if ``now`` is inside."""
    skew_ms = CLOCK_SKEW_S * 1000
    if issued_at_s * 1000 - skew_ms > now_ms:
        ahead_s = (issued_at_s * 1000 - now_ms) // 1000
        return RejectionCode.NOT_YET_VALID, f"not yet valid: issued {ahead_s} s ahead"
    if now_ms >= expires_at_s * 1000 + skew_ms:
        ago_s = (now_ms - expires_at_s * 1000) // 1000
        return RejectionCode.EXPIRED, f"expired {ago_s} s ago"
    return None


def _shown(text: str) -> str:
    """A string quoted in a reason: escaped, and never long whatever was sent."""
    return repr(text if len(text) <= 64 else text[:64] + "…")


def _names(names: frozenset[str] | set[str]) -> str:
    ordered = sorted(names)
    shown = ", ".join(_shown(name) for name in ordered[:5])
    return shown if len(ordered) <= 5 else f"{shown} and {len(ordered) - 5} more"


# ---------------------------------------------------------------------------------- clock state


def clock_state_from_timedatectl(output: str, returncode: int | None) -> ClockState:
    """The state reported by ``timedatectl show --property=NTPSynchronized --value``."""
    if returncode == 0 and output.strip() == "yes":
        return ClockState(True, "timedatectl")
    if returncode == 0 and output.strip() == "no":
        return ClockState(False, "timedatectl")
    return ClockState(False, "timedatectl gave no answer")


async def read_clock_state() -> ClockState:
    """Whether systemd considers the clock synchronised (``NTPSynchronized``, which the kernel
    reports for whichever NTP client runs). Any failure counts as not synchronised."""
    try:
        process = await asyncio.create_subprocess_exec(
            *TIMEDATECTL_ARGS,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return ClockState(False, "timedatectl unavailable")
    try:
        async with asyncio.timeout(CLOCK_QUERY_TIMEOUT_S):
            output, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        return ClockState(False, "timedatectl timed out")
    return clock_state_from_timedatectl(output.decode("utf-8", "replace"), process.returncode)
