"""The control post: sign a command, publish it, wait for the gateway's signed ack, verify it.

``lampyre post`` (``agent/post_cli.py``) is the command line; tests, the bench runner and the
benchmarks use :class:`PostSession` in-process. ``docs/control-post.md`` describes the tool,
``docs/command-signing.md`` the token and ``docs/hub-protocol.md`` the command and the ack.

One command goes like this:

1. The body (``dim``, ``switch`` or ``write``, checked here as the gateway will check it, so a
   command that would be refused is not even signed) becomes the claims of a compact JWS
   (:func:`agent.jws.command_claims`), signed with the post's Ed25519 key under its key id.
   ``iat`` strictly increases per post key (:class:`IssuedAtClock`, :class:`IssuedAtFile`): a
   gateway whose clock is not synchronised requires it.
2. The session subscribes to ``{prefix}/{gateway}/ack`` (and ``status``) and waits for the
   SUBACK **before** publishing, so the ack cannot go by unseen.
3. The token goes to ``{prefix}/{gateway}/cmd`` at QoS 1, not retained; the broker's PUBACK says
   it took it.
4. Each message on the ack topic is verified with the gateway's enrolled keys
   (:func:`agent.jws.verify_ack`, which also checks that the ack names that gateway). A verified
   ack whose ``id`` is the command's answers it; acks for other commands are ignored. An ack that
   does not verify, or a plain JSON one (unless the caller accepts unsigned acks, for demo
   benches), is never taken for the answer: it is recorded as refused, and the session keeps
   waiting for the real one until the timeout.

A rejection the gateway issues before the token authenticated (``unknown_key``: the post key is
not enrolled there) carries ``id: null``, because the gateway never echoes an unauthenticated id.
Such a signed rejection is taken as the answer when exactly one command to that gateway is
waiting in this session (the command line's case), and marked as not named
(:attr:`AckOutcome.named`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fcntl
import json
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.envelope import GATEWAY_ID_PATTERN
from agent.jws import (
    DEFAULT_LIFETIME_S,
    JTI_PATTERN,
    MAX_LIFETIME_S,
    AckRejected,
    command_claims,
    sign_command,
    verify_ack,
)
from agent.keys import ed25519_key_id, load_ed25519_private_key
from agent.mqtt import (
    Message,
    MqttConnectError,
    MqttDisconnected,
    MqttError,
    MqttSession,
    MqttSettings,
    PublishRejected,
    SubscribeRejected,
)
from agent.sdk import LampyreError

__all__ = [
    "ACK_STATUSES",
    "DEFAULT_PREFIX",
    "DEFAULT_TIMEOUT_S",
    "MAX_FADE_S",
    "MAX_ISSUED_AHEAD_S",
    "POST_SIGNING_KEY_FILE",
    "AckOutcome",
    "AckTimeout",
    "CommandError",
    "IssuedAtClock",
    "IssuedAtFile",
    "IssuedAtSource",
    "NotSent",
    "OutcomeUnknown",
    "PostError",
    "PostKey",
    "PostSession",
    "RefusedAck",
    "SignedCommand",
    "dim_command",
    "issued_at_file_for",
    "new_command_id",
    "parse_level",
    "parse_value",
    "prefix_problem",
    "sign_post_command",
    "switch_command",
    "target_json",
    "write_command",
]

DEFAULT_PREFIX: Final = "lampyre/v1"
DEFAULT_TIMEOUT_S: Final = 30.0
"""How long :meth:`PostSession.send` waits for the ack by default."""
POST_SIGNING_KEY_FILE: Final = "post-signing.key"
"""The control post's private key file, as ``lampyre keys post-init`` names it."""
ISSUED_AT_SUFFIX: Final = ".iat"
"""The latest ``iat`` a post key signed is kept beside the key, in ``<key file stem>.iat``."""
MAX_ISSUED_AHEAD_S: Final = 10
"""``iat`` is ``max(now, latest + 1)``, but never more than this ahead of the post's clock: a
latest ``iat`` further ahead (the clock was wrong once, then corrected) is not followed, or every
later token would be ``not_yet_valid`` for a synchronised gateway."""
MAX_FADE_S: Final = 90.5
"""The longest fade a gateway accepts (``agent.commands.MAX_FADE_S``)."""
MIN_WRITE_INT: Final = -(2**63)
MAX_WRITE_INT: Final = 2**64 - 1
"""A ``write`` integer must fit in 64 bits, signed or not (``agent.commands``)."""
MAX_VALUE_CHARS: Final = 64
"""A ``--value`` longer than this is refused before it is parsed."""
ACK_STATUSES: Final = ("ok", "error", "rejected")

_GATEWAY_ID = re.compile(GATEWAY_ID_PATTERN)
_POINT_NAME = re.compile(r"[a-z][a-z0-9_]*")
"""A profile's point names (``agent.commands.POINT_NAME_PATTERN``)."""
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
"""A JSON number (RFC 8259 §6), nothing around it."""


# -------------------------------------------------------------------------------------- errors


class PostError(LampyreError):
    """Base of the control post's errors."""


class CommandError(PostError):
    """A command the post refuses to sign: the gateway would reject it (the message says why)."""


class NotSent(PostError):
    """The command was not published: the broker is unreachable, refused the connection, the
    subscription or the message. Nothing can have run; sending again is safe."""


class OutcomeUnknown(PostError):
    """The command was published (or may have been) but no trustworthy ack came back: it may
    have run, and its id is spent (sign a new command, never send the same token again)."""

    def __init__(
        self,
        message: str,
        *,
        gateway: str,
        command_id: str,
        refused: tuple[RefusedAck, ...] = (),
        unattributed: tuple[Mapping[str, Any], ...] = (),
        gateway_status: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.gateway = gateway
        self.command_id = command_id
        self.refused = refused
        """Acks that claimed to answer this command but were refused (forged, unsigned...)."""
        self.unattributed = unattributed
        """Verified rejections naming no command, received while several commands waited."""
        self.gateway_status = gateway_status
        """The gateway's last ``status`` message seen (retained: online, offline...), if any."""


class AckTimeout(OutcomeUnknown):
    """No verified ack for the command within the timeout."""


# ---------------------------------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class PostKey:
    """The control post's signing key and its key id (the ``kid`` of every token it signs, the
    name under which gateways trust its ``post-<kid>.pub``)."""

    private_key: Ed25519PrivateKey = field(repr=False)
    kid: str

    @classmethod
    def from_private_key(cls, private_key: Ed25519PrivateKey) -> PostKey:
        return cls(private_key, ed25519_key_id(private_key.public_key()))

    @classmethod
    def load(cls, path: Path) -> PostKey:
        """The key in ``path`` (PEM PKCS#8, refused when group or others have any access).
        Blocking. Raises :class:`FileNotFoundError` or :class:`agent.sdk.KeyFileError`."""
        return cls.from_private_key(load_ed25519_private_key(path))

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()


# ------------------------------------------------------------------------------------- iat


class IssuedAtSource(Protocol):
    """Gives each token its ``iat``: strictly greater than the previous one of the same key."""

    async def next(self, now_s: int) -> int: ...


def _next_issued_at(now_s: int, latest_s: int | None) -> int:
    if latest_s is None or latest_s >= now_s + MAX_ISSUED_AHEAD_S:
        return now_s
    return max(now_s, latest_s + 1)


class IssuedAtClock:
    """``iat`` = ``max(now, latest + 1)`` within this process (one instance per post key)."""

    def __init__(self) -> None:
        self._latest: int | None = None

    async def next(self, now_s: int) -> int:
        # Strict within a process, even in a burst that runs ahead of the clock: a gateway
        # whose clock is not synchronised refuses an iat that is not above the last one. (The
        # reset of a value far ahead is for the file, where it can only be a stale clock.)
        issued = now_s if self._latest is None else max(now_s, self._latest + 1)
        self._latest = issued
        return issued


class IssuedAtFile:
    """``iat`` = ``max(now, latest + 1)`` across processes: the latest is kept in a small file
    (``<kid> <iat>``, mode 0600) under an exclusive lock, so two ``lampyre post`` runs within one
    second still sign increasing ``iat`` values.

    When the file cannot be used (a read-only folder), the latest of this process is used instead
    and :attr:`problem` says why: tokens still go out, but two runs within one second may then
    be refused as ``replayed`` by a gateway whose clock is not synchronised.
    """

    def __init__(self, path: Path, kid: str) -> None:
        self.path = path
        self.kid = kid
        self.problem: str | None = None
        self._fallback = IssuedAtClock()

    async def next(self, now_s: int) -> int:
        try:
            return await asyncio.to_thread(self._next_locked, now_s)
        except OSError as exc:
            self.problem = f"cannot keep the latest iat in {self.path}: {exc.strerror or exc}"
            return await self._fallback.next(now_s)

    def _next_locked(self, now_s: int) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.path, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = os.pread(fd, 256, 0)
            issued = _next_issued_at(now_s, self._latest_in(data))
            line = f"{self.kid} {issued}\n".encode("ascii")
            os.ftruncate(fd, 0)
            os.pwrite(fd, line, 0)
            os.fsync(fd)
            return issued
        finally:
            os.close(fd)  # also releases the lock

    def _latest_in(self, data: bytes) -> int | None:
        words = data.split()
        if len(words) != 2 or words[0].decode("ascii", "replace") != self.kid:
            return None  # another key's, or nothing yet: start from the clock
        if not words[1].isdigit() or len(words[1]) > 12:
            return None
        return int(words[1])


def issued_at_file_for(key_file: Path, kid: str) -> IssuedAtFile:
    """The :class:`IssuedAtFile` kept beside ``key_file`` (``post-signing.iat`` for
    ``post-signing.key``)."""
    return IssuedAtFile(key_file.with_name(key_file.stem + ISSUED_AT_SUFFIX), kid)


# ------------------------------------------------------------------------------------ bodies


def new_command_id() -> str:
    """A fresh command id (``post-`` and 16 random hex digits): never reused, so an old ack can
    never be taken for the answer to a new command."""
    return f"post-{secrets.token_hex(8)}"


def target_json(
    *, device: str | None = None, group: str | None = None, all_devices: bool = False
) -> dict[str, Any]:
    """A command target: exactly one of a device, a group or every device."""
    chosen = [device is not None, group is not None, all_devices]
    if chosen.count(True) != 1:
        raise CommandError("target: give exactly one of a device, a group or all devices")
    if device is not None:
        _check_name(device, "device")
        return {"device": device}
    if group is not None:
        _check_name(group, "group")
        return {"group": group}
    return {"all": True}


def _check_name(name: str, what: str) -> None:
    if not name or len(name) > 256 or not name.isprintable():
        raise CommandError(f"{what}: expected a {what} name of the gateway's configuration")


def _command_id(command_id: str | None) -> str:
    if command_id is None:
        return new_command_id()
    if not JTI_PATTERN.fullmatch(command_id):
        raise CommandError(
            "id: expected 1-64 letters, digits, '.', '_', ':' or '-', starting with a letter or "
            "digit"
        )
    return command_id


def parse_level(text: str) -> int | float:
    """A level in percent from the command line: a JSON number from 0 to 100."""
    value = _number(text, "level")
    if isinstance(value, bool) or not 0 <= value <= 100:
        raise CommandError(f"level: expected a number from 0 to 100, got {text[:24]!r}")
    return value


_JSON_WHITESPACE: Final = " \t\r\n"


def _number(text: str, what: str) -> int | float:
    stripped = text.strip(_JSON_WHITESPACE)
    if len(stripped) > MAX_VALUE_CHARS or not _NUMBER.fullmatch(stripped):
        raise CommandError(f"{what}: expected a number, got {text[:24]!r}")
    if any(mark in stripped for mark in ".eE"):
        number = float(stripped)
        if not math.isfinite(number):
            raise CommandError(f"{what}: expected a finite number, got {text[:24]!r}")
        return number
    return int(stripped)


def parse_value(text: str) -> bool | int | float:
    """A ``write`` value from the command line, as JSON: ``true``, ``false`` or a finite number
    (an integer must fit in 64 bits). Strings, null, lists, objects, NaN and Infinity are
    refused, as the gateway refuses them."""
    stripped = text.strip(_JSON_WHITESPACE)
    if stripped == "true":
        return True
    if stripped == "false":
        return False
    try:
        value = _number(stripped, "value")
    except CommandError:
        raise CommandError(
            f"value: expected true, false or a JSON number (e.g. 12, -3.5, 1e3), got {text[:24]!r}"
        ) from None
    if isinstance(value, int) and not MIN_WRITE_INT <= value <= MAX_WRITE_INT:
        raise CommandError("value: an integer must fit in 64 bits")
    return value


def dim_command(
    target: Mapping[str, Any],
    level: float,
    *,
    fade_s: float | None = None,
    command_id: str | None = None,
) -> dict[str, Any]:
    """The body of a ``dim`` command (without ``expires``: signing sets it)."""
    if (
        isinstance(level, bool)
        or not isinstance(level, int | float)
        or not (math.isfinite(level) and 0 <= level <= 100)
    ):
        raise CommandError("level: expected a number from 0 to 100")
    body: dict[str, Any] = {
        "id": _command_id(command_id),
        "action": "dim",
        "target": dict(target),
        "level": level,
    }
    if fade_s is not None:
        if (
            isinstance(fade_s, bool)
            or not isinstance(fade_s, int | float)
            or not (math.isfinite(fade_s) and 0 <= fade_s <= MAX_FADE_S)
        ):
            raise CommandError(f"fade: expected seconds from 0 to {MAX_FADE_S}")
        body["fade_s"] = fade_s
    return body


def switch_command(
    target: Mapping[str, Any], on: bool, *, command_id: str | None = None
) -> dict[str, Any]:
    """The body of a ``switch`` command."""
    return {
        "id": _command_id(command_id),
        "action": "switch",
        "target": dict(target),
        "state": "on" if on else "off",
    }


def write_command(
    target: Mapping[str, Any],
    point: str,
    value: bool | int | float,
    *,
    command_id: str | None = None,
) -> dict[str, Any]:
    """The body of a ``write`` command: ``value`` to the point named ``point``."""
    if not _POINT_NAME.fullmatch(point) or len(point) > 64:
        raise CommandError(
            "point: expected a point name (a lowercase letter, then lowercase letters, digits "
            "or '_')"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise CommandError("value: expected a finite number")
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and not MIN_WRITE_INT <= value <= MAX_WRITE_INT
    ):
        raise CommandError("value: an integer must fit in 64 bits")
    return {
        "id": _command_id(command_id),
        "action": "write",
        "target": dict(target),
        "point": point,
        "value": value,
    }


# ----------------------------------------------------------------------------------- signing


@dataclass(frozen=True, slots=True)
class SignedCommand:
    """A command token ready to publish."""

    gateway: str
    command_id: str
    """The body's ``id``, the token's ``jti``, the ack's ``id``."""
    action: str
    target: Mapping[str, Any]
    token: str = field(repr=False)
    issued_at_s: int
    expires_at_s: int
    kid: str


def sign_post_command(
    body: Mapping[str, Any],
    *,
    key: PostKey,
    gateway: str,
    issued_at_s: int,
    lifetime_s: int = DEFAULT_LIFETIME_S,
) -> SignedCommand:
    """Sign ``body`` for ``gateway``: claims by :func:`agent.jws.command_claims` (``jti`` = the
    body's ``id``, ``exp`` = ``iat`` + ``lifetime_s``, the body's ``expires`` = ``exp`` in ms)."""
    if not _GATEWAY_ID.fullmatch(gateway):
        raise CommandError(
            "gateway: expected a gateway id (1-64 letters, digits, '_' or '-', starting with a "
            "letter or digit)"
        )
    if isinstance(lifetime_s, bool) or not 1 <= lifetime_s <= MAX_LIFETIME_S:
        raise CommandError(f"ttl: expected whole seconds from 1 to {MAX_LIFETIME_S}")
    command_id = body.get("id")
    if not isinstance(command_id, str) or not JTI_PATTERN.fullmatch(command_id):
        raise CommandError("id: the body needs a command id")
    claims = command_claims(body, audience=gateway, issued_at_s=issued_at_s, lifetime_s=lifetime_s)
    return SignedCommand(
        gateway=gateway,
        command_id=command_id,
        action=str(body.get("action")),
        target=dict(body.get("target") or {}),
        token=sign_command(claims, key.private_key, key.kid),
        issued_at_s=issued_at_s,
        expires_at_s=int(claims["exp"]),
        kid=key.kid,
    )


# --------------------------------------------------------------------------------------- acks


@dataclass(frozen=True, slots=True)
class RefusedAck:
    """A message on the ack topic that claimed to answer the command but is not trusted."""

    code: str
    """``unsigned`` (plain JSON), or the :class:`agent.jws.RejectionCode` of the failed check
    (``bad_signature``: forged or altered; ``unknown_key``: signed by a key not enrolled for that
    gateway; ``wrong_audience``: signed for another gateway; ``malformed``...)."""
    reason: str
    named: bool
    """The message named this command's id (unverified, so it proves nothing); False when it
    named none or could not be read."""


@dataclass(frozen=True, slots=True)
class AckOutcome:
    """The gateway's answer to a command."""

    gateway: str
    command_id: str
    ack: Mapping[str, Any]
    """The ack object exactly as the gateway sent it."""
    verified: bool
    """True: signed by a key enrolled for that gateway. False only for a plain JSON ack taken
    because the session accepts unsigned acks (a demo bench)."""
    signed_by: str | None
    """The key id of the gateway key that signed the ack."""
    named: bool = True
    """False when the ack is a rejection naming no command (``id`` null: the gateway could not
    authenticate the token), taken as this command's because it was the only one waiting."""
    refused: tuple[RefusedAck, ...] = ()
    """Messages refused while waiting (forged or unsigned acks claiming this command)."""

    @property
    def status(self) -> str:
        """``ok``, ``error``, ``rejected``; ``invalid`` for an ack without a valid status."""
        status = self.ack.get("status")
        return status if status in ACK_STATUSES else "invalid"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _b64url_json(part: bytes) -> Any:
    try:
        raw = base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4))
        return json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):
        return None


def _unverified_id(token: bytes) -> tuple[bool, str | None]:
    """What a token that failed verification claims as its ``id``: (readable, id). Used only to
    decide whether to report the refusal; nothing of it is trusted or shown."""
    parts = token.split(b".")
    document = _b64url_json(parts[1]) if len(parts) == 3 else None
    if not isinstance(document, dict):
        return False, None
    claimed = document.get("id")
    return True, claimed if isinstance(claimed, str) else None


def _signing_kid(token: bytes) -> str | None:
    """The ``kid`` of a token whose signature has been verified (its header is then trusted)."""
    header = _b64url_json(token.split(b".", 1)[0])
    kid = header.get("kid") if isinstance(header, dict) else None
    return kid if isinstance(kid, str) else None


def _looks_like_json(payload: bytes) -> bool:
    return payload.lstrip(b" \t\r\n")[:1] == b"{"


def prefix_problem(prefix: str) -> str | None:
    """Why ``prefix`` cannot be a topic prefix, or None."""
    if not prefix or prefix.startswith(("/", "$")) or prefix.endswith("/"):
        return "expected levels separated by '/', not starting with '/' or '$' nor ending in '/'"
    if any(char in prefix for char in "+#\x00") or "//" in prefix:
        return "no wildcard, NUL or empty level allowed"
    return None


@dataclass(eq=False)
class _Pending:
    command: SignedCommand
    future: asyncio.Future[AckOutcome]
    on_refused: Callable[[RefusedAck], None] | None
    sent: bool = False
    refused: list[RefusedAck] = field(default_factory=list)
    unattributed: list[Mapping[str, Any]] = field(default_factory=list)

    def refuse(self, refusal: RefusedAck) -> None:
        self.refused.append(refusal)
        if self.on_refused is not None:
            self.on_refused(refusal)

    def resolve(
        self, ack: Mapping[str, Any], *, verified: bool, signed_by: str | None, named: bool
    ) -> None:
        if self.future.done():
            return
        self.future.set_result(
            AckOutcome(
                gateway=self.command.gateway,
                command_id=self.command.command_id,
                ack=ack,
                verified=verified,
                signed_by=signed_by,
                named=named,
                refused=tuple(self.refused),
            )
        )


# ------------------------------------------------------------------------------------ session


class PostSession:
    """One MQTT connection of the control post: signs, publishes and waits for verified acks.

    ``gateway_keys`` is the enrolment, gateway id -> {key id: public key}, as
    :func:`agent.keys.load_enrolled_gateway_keys` reads it. Several commands, to one gateway or
    several, may wait at once. Use it as an async context manager, or ``connect()``/``close()``.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        key: PostKey,
        gateway_keys: Mapping[str, Mapping[str, Ed25519PublicKey]],
        prefix: str = DEFAULT_PREFIX,
        accept_unsigned_ack: bool = False,
        issued_at: IssuedAtSource | None = None,
    ) -> None:
        problem = prefix_problem(prefix)
        if problem is not None:
            raise ValueError(f"topic prefix {prefix!r}: {problem}")
        self.settings = settings
        self.key = key
        self.prefix = prefix
        self.accept_unsigned_ack = accept_unsigned_ack
        self._gateway_keys = gateway_keys
        self._issued_at: IssuedAtSource = issued_at or IssuedAtClock()
        self._mqtt = MqttSession(settings)
        self._mqtt.on_message(self._on_message)
        self._watched: set[str] = set()
        self._watching: dict[str, asyncio.Lock] = {}
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._status: dict[str, Mapping[str, Any]] = {}

    async def __aenter__(self) -> PostSession:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect (no last will: nobody watches the post's presence); :class:`NotSent` when the
        broker cannot be reached or refuses."""
        try:
            await self._mqtt.connect(None)
        except MqttConnectError as exc:
            raise NotSent(str(exc)) from exc
        except LampyreError as exc:  # a password file or TLS file refused
            raise NotSent(str(exc)) from exc

    async def close(self) -> None:
        for pending in self._pending.values():
            pending.future.cancel()
        self._pending.clear()
        await self._mqtt.disconnect()

    @property
    def connected(self) -> bool:
        return self._mqtt.connected

    def gateway_status(self, gateway: str) -> Mapping[str, Any] | None:
        """The gateway's last ``status`` message seen (retained by the broker), if any."""
        return self._status.get(gateway)

    def topic(self, gateway: str, kind: str) -> str:
        return f"{self.prefix}/{gateway}/{kind}"

    async def watch(self, gateway: str) -> None:
        """Subscribe to the gateway's ``ack`` and ``status`` and wait for the SUBACKs (done once
        per gateway). :class:`NotSent` when the broker refuses."""
        lock = self._watching.setdefault(gateway, asyncio.Lock())
        async with lock:
            if gateway in self._watched:
                return
            try:
                await self._mqtt.subscribe(self.topic(gateway, "ack"), qos=1)
                await self._mqtt.subscribe(self.topic(gateway, "status"), qos=1)
            except (SubscribeRejected, MqttDisconnected) as exc:
                raise NotSent(str(exc)) from exc
            except TimeoutError as exc:
                raise NotSent("the broker did not answer the subscription (no SUBACK)") from exc
            self._watched.add(gateway)

    async def sign(
        self,
        gateway: str,
        body: Mapping[str, Any],
        *,
        lifetime_s: int = DEFAULT_LIFETIME_S,
        now_s: int | None = None,
    ) -> SignedCommand:
        """Sign ``body`` for ``gateway`` with the session's key and the next ``iat``."""
        clock_s = int(time.time()) if now_s is None else now_s
        issued_at_s = await self._issued_at.next(clock_s)
        return sign_post_command(
            body, key=self.key, gateway=gateway, issued_at_s=issued_at_s, lifetime_s=lifetime_s
        )

    async def post(
        self,
        gateway: str,
        body: Mapping[str, Any],
        *,
        lifetime_s: int = DEFAULT_LIFETIME_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        on_refused: Callable[[RefusedAck], None] | None = None,
    ) -> AckOutcome:
        """Sign, publish and wait for the verified ack (see :meth:`send`)."""
        signed = await self.sign(gateway, body, lifetime_s=lifetime_s)
        return await self.send(signed, timeout_s=timeout_s, on_refused=on_refused)

    async def send(
        self,
        command: SignedCommand,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        on_refused: Callable[[RefusedAck], None] | None = None,
    ) -> AckOutcome:
        """Publish ``command`` and return the gateway's verified answer.

        Raises :class:`NotSent` when nothing went out (subscription or PUBLISH refused, no
        connection) and :class:`OutcomeUnknown` (:class:`AckTimeout`) when it did, or may have,
        but no trustworthy ack came back. ``on_refused`` is called for each untrusted message
        claiming to answer the command, as it arrives.
        """
        await self.watch(command.gateway)
        key = (command.gateway, command.command_id)
        if key in self._pending:
            raise CommandError(f"command {command.command_id} is already waiting for its ack")
        loop = asyncio.get_running_loop()
        pending = _Pending(command, loop.create_future(), on_refused)
        # Registered before publishing: the ack may come back before the PUBACK does.
        self._pending[key] = pending
        try:
            pending.sent = True
            try:
                published = self._mqtt.publish_nowait(
                    self.topic(command.gateway, "cmd"), command.token.encode("ascii"), qos=1
                )
            except MqttDisconnected as exc:
                raise NotSent(str(exc)) from exc
            try:
                await published
            except PublishRejected as exc:
                raise NotSent(str(exc)) from exc
            except MqttError as exc:
                raise self._unknown(
                    pending, f"the connection to the broker was lost while publishing ({exc})"
                ) from exc
            return await self._wait(pending, timeout_s)
        finally:
            self._pending.pop(key, None)
            if not pending.future.done():
                pending.future.cancel()

    async def _wait(self, pending: _Pending, timeout_s: float) -> AckOutcome:
        lost: asyncio.Future[Any] = asyncio.ensure_future(self._mqtt.wait_disconnected())
        either: set[asyncio.Future[Any]] = {pending.future, lost}
        try:
            done, _ = await asyncio.wait(
                either, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            lost.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lost
        if pending.future in done:
            return pending.future.result()
        command = pending.command
        if lost in done:
            raise self._unknown(
                pending,
                "the connection to the broker was lost while waiting for the ack "
                f"({self._mqtt.disconnect_reason})",
            )
        raise AckTimeout(
            f"no verified ack from {command.gateway} for command {command.command_id} within "
            f"{timeout_s:g} s",
            gateway=command.gateway,
            command_id=command.command_id,
            refused=tuple(pending.refused),
            unattributed=tuple(pending.unattributed),
            gateway_status=self._status.get(command.gateway),
        )

    def _unknown(self, pending: _Pending, message: str) -> OutcomeUnknown:
        command = pending.command
        return OutcomeUnknown(
            message,
            gateway=command.gateway,
            command_id=command.command_id,
            refused=tuple(pending.refused),
            unattributed=tuple(pending.unattributed),
            gateway_status=self._status.get(command.gateway),
        )

    # Incoming ----------------------------------------------------------------------------
    async def _on_message(self, message: Message) -> None:
        base = self.prefix + "/"
        if not message.topic.startswith(base):
            return
        parts = message.topic[len(base) :].split("/")
        if len(parts) != 2:
            return
        gateway, kind = parts
        if kind == "status":
            self._on_status(gateway, message.payload)
            return
        if kind != "ack" or message.retain:
            # An ack is never retained: a retained one is somebody's leftover, not an answer.
            return
        waiting = [p for (g, _), p in self._pending.items() if g == gateway and not p.future.done()]
        if not waiting:
            return
        if _looks_like_json(message.payload):
            self._on_plain_ack(gateway, message.payload, waiting)
        else:
            self._on_token(gateway, message.payload, waiting)

    def _on_status(self, gateway: str, payload: bytes) -> None:
        try:
            document = json.loads(payload)
        except (ValueError, RecursionError):
            return
        if isinstance(document, dict):
            self._status[gateway] = document

    def _on_token(self, gateway: str, token: bytes, waiting: list[_Pending]) -> None:
        try:
            ack = verify_ack(token, keys=self._gateway_keys.get(gateway, {}), gateway=gateway)
        except AckRejected as exc:
            readable, claimed = _unverified_id(token)
            for pending in waiting:
                named = claimed == pending.command.command_id
                if named or claimed is None:
                    pending.refuse(RefusedAck(exc.code.value, exc.reason, named and readable))
            return
        self._deliver(ack, waiting, verified=True, signed_by=_signing_kid(token))

    def _on_plain_ack(self, gateway: str, payload: bytes, waiting: list[_Pending]) -> None:
        try:
            ack = json.loads(payload)
        except (ValueError, RecursionError):
            ack = None
        if not isinstance(ack, dict):
            for pending in waiting:
                pending.refuse(RefusedAck("malformed", "a plain message that is no ack", False))
            return
        claimed = ack.get("id")
        if not self.accept_unsigned_ack:
            for pending in waiting:
                named = claimed == pending.command.command_id
                if named or claimed is None:
                    pending.refuse(
                        RefusedAck(
                            "unsigned",
                            "a plain JSON ack, not signed by the gateway (a gateway without a "
                            "signing key: accept it only on a demo bench)",
                            named,
                        )
                    )
            return
        if ack.get("gateway") != gateway:
            for pending in waiting:
                if claimed == pending.command.command_id:
                    pending.refuse(
                        RefusedAck("wrong_audience", "plain ack naming another gateway", True)
                    )
            return
        self._deliver(ack, waiting, verified=False, signed_by=None)

    def _deliver(
        self,
        ack: Mapping[str, Any],
        waiting: list[_Pending],
        *,
        verified: bool,
        signed_by: str | None,
    ) -> None:
        ack_id = ack.get("id")
        for pending in waiting:
            if ack_id == pending.command.command_id:
                pending.resolve(ack, verified=verified, signed_by=signed_by, named=True)
                return
        if ack_id is not None or ack.get("status") != "rejected":
            return  # another command's answer
        # A rejection naming no command: the gateway could not authenticate a token. Ours if we
        # are the only one waiting on that gateway; otherwise it cannot be told whose it is.
        sent = [p for p in waiting if p.sent]
        if len(sent) == 1:
            sent[0].resolve(ack, verified=verified, signed_by=signed_by, named=False)
        else:
            for pending in sent:
                pending.unattributed.append(ack)
