"""The hub side of one gateway, as a control post sees it: every message under
``{prefix}/{gateway}/#``, and commands published on ``cmd``.

Built on :class:`agent.mqtt.MqttSession`, the project's one seam over paho, so the runner needs no
second MQTT wrapper. Messages are kept in arrival order with their arrival time (monotonic), and
``data``/``event``/``ack`` duplicates are dropped by ``seq`` exactly as the hub protocol asks a hub
to do: a scenario never counts a re-delivered batch twice.

Both wire forms are read, so the scenarios see the same plain JSON object (``HubMessage.doc``)
either way:

- ``data`` and ``event``: an envelope (it starts with :data:`agent.envelope.MAGIC`) is verified
  and opened with :func:`agent.envelope.open_envelope` (the hub's keys and the gateway's public
  key, :class:`hil.keys.BenchKeys`); a plain JSON object is taken as it is, unless the gateway
  is configured to seal (then it is refused: a sealing gateway must never send plaintext).
- ``ack``: a compact JWS is verified with :func:`agent.jws.verify_ack` and the gateway's public
  key; a plain JSON ack is taken unless the gateway is configured to sign its acks.

A message that cannot be opened or verified is **refused**: kept with the reason
(``HubMessage.refusal``, ``doc`` None), logged, never counted as the gateway's answer or
reading. Commands are compact JWS signed with the control post's key
(:func:`agent.post.sign_post_command`) when the runner holds one, plain JSON otherwise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from agent.envelope import (
    MAGIC,
    BadSignature,
    DecryptFailed,
    EnvelopeError,
    HeaderMismatch,
    Malformed,
    UnknownKey,
    UnsupportedVersion,
    open_envelope,
)
from agent.hub import Refusal
from agent.jws import DEFAULT_LIFETIME_S, AckRejected, verify_ack
from agent.mqtt import Message, MqttSession, MqttSettings
from agent.post import MAX_ISSUED_AHEAD_S, IssuedAtClock, PostKey, sign_post_command
from agent.sdk import now_ms
from hil.keys import BenchKeys

__all__ = [
    "COMMAND_LIFETIME_S",
    "CONNECT_TIMEOUT_S",
    "PUBLISH_TIMEOUT_S",
    "WAKE_INTERVAL_S",
    "ControlPost",
    "HubMessage",
    "HubTimeout",
    "Protection",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

CONNECT_TIMEOUT_S = 10.0
PUBLISH_TIMEOUT_S = 10.0
"""Bound on the broker's PUBACK for one command."""
WAKE_INTERVAL_S = 0.5
"""A waiting predicate is evaluated at least this often, even when no message arrives."""

COMMAND_LIFETIME_S: Final = DEFAULT_LIFETIME_S
"""A command is valid this long from its issue (``exp - iat`` of a token, ``expires`` of a plain
command): 60 s, which a gateway whose clock is not synchronised still accepts."""

_SEQUENCED = ("data", "event", "ack")
_STREAMS = ("data", "event")
_GATEWAY_KINDS = ("status", "data", "event", "ack")
"""What the gateway publishes (counted in :meth:`ControlPost.traffic`)."""


class Protection:
    """How a message's ``doc`` was obtained (``HubMessage.protection``)."""

    PLAIN = "plain"
    """Plain JSON, taken as it is."""
    SEALED = "sealed"
    """An envelope, verified with the gateway's key and opened with the hub's."""
    SIGNED = "signed"
    """A compact JWS ack, verified with the gateway's key."""
    REFUSED = "refused"
    """Could not be opened or verified, or plain where the gateway must protect it: ``doc`` is
    None and ``refusal`` says why."""
    OPAQUE = "opaque"
    """Not JSON and not read further (the runner's own signed commands, for instance)."""


class HubTimeout(Exception):
    """What a scenario waited for did not show up on the hub in time."""

    def __init__(self, what: str, timeout_s: float) -> None:
        self.what = what
        self.timeout_s = timeout_s
        super().__init__(f"no {what} within {timeout_s:.1f} s")


@dataclass(frozen=True, slots=True)
class HubMessage:
    """One message seen on the hub. ``kind`` is the last topic level (``status``, ``data``,
    ``event``, ``ack``, ``cmd``); ``doc`` is the plain JSON object (parsed, opened from its
    envelope or taken from its verified JWS), or None when there is none."""

    kind: str
    topic: str
    payload: bytes
    """As received (an envelope, a token or JSON)."""
    doc: Any
    received_s: float
    """``time.monotonic()`` when the message reached the runner."""
    retained: bool
    protection: str = Protection.PLAIN
    """One of :class:`Protection`."""
    refusal: str | None = None
    """Why the message was refused (``<code>: <reason>``), when it was."""


class ControlPost:
    """Watches one gateway's topics and sends it commands.

    ``connect()`` subscribes before returning, so nothing the gateway publishes afterwards is
    missed; ``close()`` is idempotent.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        prefix: str,
        gateway_id: str,
        keys: BenchKeys | None = None,
        require_sealed: bool = False,
        require_signed_acks: bool = False,
    ) -> None:
        """``keys``: what opens, verifies and signs (none: plain JSON only).
        ``require_sealed``: refuse plain JSON ``data``/``event`` (the gateway seals them);
        ``require_signed_acks``: refuse plain JSON acks (the gateway signs them)."""
        self.settings = settings
        self.gateway_id = gateway_id
        self.base = f"{prefix}/{gateway_id}"
        self.keys = keys if keys is not None else BenchKeys()
        self.require_sealed = require_sealed
        self.require_signed_acks = require_signed_acks
        self._session = MqttSession(settings)
        self._messages: list[HubMessage] = []
        self._seen: set[tuple[str, int]] = set()
        self._changed = asyncio.Event()
        self._issued_at = IssuedAtClock()
        self._latest_iat: int | None = None
        self._signing = asyncio.Lock()
        self.duplicates = 0
        """Re-delivered data/event/ack messages dropped (at-least-once delivery at work)."""

    @property
    def cmd_topic(self) -> str:
        return f"{self.base}/cmd"

    async def connect(self) -> None:
        # MqttSession always sets a will. It goes to a topic of the runner's own below the
        # gateway's tree (never ``status``, which belongs to the agent), not retained.
        self._session.on_message(self._on_message)
        await self._session.connect(
            f"{self.base}/hil",
            b'{"state":"offline","runner":"hil"}',
            will_retain=False,
            timeout_s=CONNECT_TIMEOUT_S,
        )
        try:
            await self._session.subscribe(f"{self.base}/#", qos=1)
        except BaseException:
            await self._session.disconnect()
            raise
        log.info(
            "control post watching %s/# on %s:%s", self.base, self.settings.host, self.settings.port
        )

    async def close(self) -> None:
        await self._session.disconnect()

    @property
    def connected(self) -> bool:
        return self._session.connected

    async def _on_message(self, message: Message) -> None:
        kind = message.topic.rsplit("/", 1)[-1]
        try:
            doc, protection, refusal = self._read(kind, message.payload)
        except Exception as exc:  # whatever arrives, the runner goes on and says why
            log.debug("reading a %s message failed", kind, exc_info=True)
            doc, protection, refusal = _refused(f"error: {type(exc).__name__}: {exc}")
        if kind in _SEQUENCED and isinstance(doc, dict) and isinstance(doc.get("seq"), int):
            key = (kind, doc["seq"])
            if key in self._seen:
                self.duplicates += 1
                return
            self._seen.add(key)
        if refusal is not None:
            log.warning("refused a %s message from %s: %s", kind, self.gateway_id, refusal)
        self._messages.append(
            HubMessage(
                kind,
                message.topic,
                message.payload,
                doc,
                time.monotonic(),
                message.retain,
                protection,
                refusal,
            )
        )
        self._changed.set()

    # Opening and verifying -----------------------------------------------------------------
    def _read(self, kind: str, payload: bytes) -> tuple[Any, str, str | None]:
        """``(doc, protection, refusal)`` of one message."""
        if kind in _STREAMS:
            if payload.startswith(MAGIC):
                return self._open(kind, payload)
            doc = _json(payload)
            if not isinstance(doc, dict):
                return _refused(f"{Refusal.MALFORMED}: neither an envelope nor a JSON object")
            if self.require_sealed:
                return _refused(
                    f"{Refusal.PLAINTEXT}: a plain JSON payload, but the gateway is configured "
                    "to seal its data and events"
                )
            return doc, Protection.PLAIN, None
        if kind == "ack":
            if not _looks_like_json(payload):
                return self._verify_ack(payload)
            doc = _json(payload)
            if not isinstance(doc, dict):
                return _refused("malformed: a plain JSON ack that is not a JSON object")
            if self.require_signed_acks:
                return _refused(
                    "unsigned: a plain JSON ack, but the gateway is configured to sign its acks"
                )
            return doc, Protection.PLAIN, None
        doc = _json(payload)
        if doc is _NOT_JSON:
            return None, Protection.OPAQUE, None
        return doc, Protection.PLAIN, None

    def _open(self, stream: str, payload: bytes) -> tuple[Any, str, str | None]:
        try:
            header, body = open_envelope(
                payload,
                self.keys.hub,
                {self.gateway_id: self.keys.gateway},
                gateway=self.gateway_id,
                stream=stream,
            )
        except EnvelopeError as exc:
            return _refused(f"{_envelope_code(exc)}: {exc}{self._hint(exc)}")
        doc = _json(body)
        # One record per envelope: the body must be the very gateway and seq its authenticated
        # header names (as the reference hub checks).
        if (
            not isinstance(doc, dict)
            or doc.get("gateway") != header.gateway
            or type(doc.get("seq")) is not int
            or not doc["seq"] == header.seq_first == header.seq_last
        ):
            return _refused(
                f"{Refusal.BAD_BODY}: the opened body is not the JSON object of {header.gateway} "
                f"seq {header.seq_first}-{header.seq_last} its header names"
            )
        return doc, Protection.SEALED, None

    def _hint(self, exc: EnvelopeError) -> str:
        if isinstance(exc, UnknownKey) and exc.role == "gateway" and not self.keys.gateway:
            return " (the runner was given no gateway key: --gateway-key or --gateways)"
        if isinstance(exc, UnknownKey) and exc.role == "hub" and not self.keys.hub:
            return " (the runner was given no hub key: --hub-keys)"
        return ""

    def _verify_ack(self, token: bytes) -> tuple[Any, str, str | None]:
        try:
            ack = verify_ack(token, keys=self.keys.gateway, gateway=self.gateway_id)
        except AckRejected as exc:
            hint = (
                "" if self.keys.gateway else " (no gateway key given: --gateway-key or --gateways)"
            )
            return _refused(f"{exc.code.value}: {exc.reason}{hint}")
        return ack, Protection.SIGNED, None

    # Reading what arrived ------------------------------------------------------------------
    def messages(self, kind: str | None = None, since_s: float = 0.0) -> list[HubMessage]:
        """Messages of ``kind`` (all kinds when None) received at or after ``since_s``."""
        return [
            m
            for m in self._messages
            if (kind is None or m.kind == kind) and m.received_s >= since_s
        ]

    def refused(self, since_s: float = 0.0) -> list[HubMessage]:
        """Messages received at or after ``since_s`` that could not be opened or verified."""
        return [m for m in self.messages(since_s=since_s) if m.protection == Protection.REFUSED]

    def traffic(self) -> dict[str, dict[str, int]]:
        """What the gateway published, by kind (``status``, ``data``, ``event``, ``ack``) and
        :class:`Protection`, duplicates not counted."""
        counts: dict[str, dict[str, int]] = {}
        for message in self._messages:
            if message.kind in _GATEWAY_KINDS:
                per_kind = counts.setdefault(message.kind, {})
                per_kind[message.protection] = per_kind.get(message.protection, 0) + 1
        return counts

    def readings(self, since_ms: int = 0) -> Iterator[dict[str, Any]]:
        """Every reading of every ``data`` batch whose ``ts`` is at or after ``since_ms``."""
        for message in self._messages:
            if message.kind != "data" or not isinstance(message.doc, dict):
                continue
            for reading in message.doc.get("readings", ()):
                if isinstance(reading, dict) and int(reading.get("ts", 0)) >= since_ms:
                    yield reading

    def events(
        self, kind: str, device: str | None = None, since_s: float = 0.0
    ) -> list[tuple[HubMessage, dict[str, Any]]]:
        return [
            (m, m.doc)
            for m in self.messages("event", since_s)
            if isinstance(m.doc, dict)
            and m.doc.get("kind") == kind
            and (device is None or m.doc.get("device") == device)
        ]

    def acks(self, command_id: str | None, since_s: float = 0.0) -> list[HubMessage]:
        """Acks for ``command_id`` (None: acks whose id could not be read)."""
        return [
            m
            for m in self.messages("ack", since_s)
            if isinstance(m.doc, dict) and m.doc.get("id") == command_id
        ]

    async def wait_for(self, predicate: Callable[[], T | None], timeout_s: float, what: str) -> T:
        """Return the first truthy value of ``predicate()``, evaluated after each message;
        raise :class:`HubTimeout` naming ``what`` when ``timeout_s`` passes first."""
        deadline = time.monotonic() + timeout_s
        while True:
            # Cleared before the check: a message arriving after it sets the event again.
            self._changed.clear()
            value = predicate()
            if value:
                return value
            if not self._session.connected:
                raise HubTimeout(
                    f"{what} (the runner lost its broker connection: "
                    f"{self._session.disconnect_reason})",
                    timeout_s,
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HubTimeout(what, timeout_s)
            try:
                async with asyncio.timeout(min(remaining, WAKE_INTERVAL_S)):
                    await self._changed.wait()
            except TimeoutError:
                pass

    # Sending ---------------------------------------------------------------------------------
    async def send(self, payload: bytes) -> float:
        """Publish a command (QoS 1) and wait for the broker's PUBACK; returns the monotonic time
        taken just before publishing, the start of the command's round trip."""
        sent_s = time.monotonic()
        async with asyncio.timeout(PUBLISH_TIMEOUT_S):
            await self._session.publish(self.cmd_topic, payload, qos=1)
        return sent_s

    @property
    def signs_commands(self) -> bool:
        """Commands go as tokens signed by the control post's key (else plain JSON)."""
        return self.keys.post is not None

    async def command_payload(
        self,
        body: Mapping[str, Any],
        *,
        issued_at_s: int | None = None,
        lifetime_s: int = COMMAND_LIFETIME_S,
    ) -> bytes:
        """What goes on ``cmd`` for ``body`` (a command object with its ``id``, without
        ``expires``), valid for ``lifetime_s`` from ``issued_at_s`` (default now): a signed
        token when the runner holds the post key, else plain JSON whose ``expires`` is that
        end. The same backdated ``issued_at_s`` makes an expired command in both forms."""
        if self.keys.post is None:
            start_ms = now_ms() if issued_at_s is None else issued_at_s * 1000
            document = {**body, "expires": start_ms + lifetime_s * 1000}
            return json.dumps(document).encode()
        return await self.sign(body, issued_at_s=issued_at_s, lifetime_s=lifetime_s)

    async def sign(
        self,
        body: Mapping[str, Any],
        *,
        issued_at_s: int | None = None,
        lifetime_s: int = COMMAND_LIFETIME_S,
        audience: str | None = None,
        key: PostKey | None = None,
    ) -> bytes:
        """A command token for ``body`` (:func:`agent.post.sign_post_command`: claims by
        :func:`agent.jws.command_claims`, signed by :func:`agent.jws.sign_command`).

        ``key`` defaults to the runner's post key, whose tokens get strictly increasing ``iat``
        values within the run unless ``issued_at_s`` is given (a deliberately backdated token);
        ``audience`` defaults to this gateway."""
        signer = key if key is not None else self.keys.post
        if signer is None:
            raise ValueError("no control-post key to sign with")
        if issued_at_s is None:
            issued_at_s = (
                await self._next_issued_at() if signer is self.keys.post else int(time.time())
            )
        signed = sign_post_command(
            body,
            key=signer,
            gateway=audience if audience is not None else self.gateway_id,
            issued_at_s=issued_at_s,
            lifetime_s=lifetime_s,
        )
        return signed.token.encode("ascii")

    async def _next_issued_at(self) -> int:
        """The next ``iat`` of the post key: strictly above the previous one, which a gateway
        whose clock is not synchronised requires. :class:`agent.post.IssuedAtClock` gives
        ``max(now, latest + 1)``, which a burst pushes ahead of the clock; a synchronised
        gateway accepts an ``iat`` at most 30 s ahead, so a burst waits here rather than run
        more than ``MAX_ISSUED_AHEAD_S`` ahead."""
        async with self._signing:
            if self._latest_iat is not None:
                wait_s = self._latest_iat - MAX_ISSUED_AHEAD_S + 1 - time.time()
                if wait_s > 0:
                    await asyncio.sleep(wait_s + 0.01)
            issued = await self._issued_at.next(int(time.time()))
            self._latest_iat = issued
            return issued

    async def send_command(
        self,
        body: Mapping[str, Any],
        *,
        issued_at_s: int | None = None,
        lifetime_s: int = COMMAND_LIFETIME_S,
    ) -> float:
        """Publish ``body`` as :meth:`command_payload` makes it; returns as :meth:`send`."""
        payload = await self.command_payload(body, issued_at_s=issued_at_s, lifetime_s=lifetime_s)
        return await self.send(payload)


_NOT_JSON: Final[Any] = object()


def _json(payload: bytes) -> Any:
    """The parsed JSON, or ``_NOT_JSON``."""
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _looks_like_json(payload: bytes) -> bool:
    return payload.lstrip(b" \t\r\n")[:1] == b"{"


def _refused(reason: str) -> tuple[Any, str, str | None]:
    return None, Protection.REFUSED, reason


_ENVELOPE_CODES: Final = (
    (Malformed, Refusal.MALFORMED),
    (UnsupportedVersion, Refusal.UNSUPPORTED_VERSION),
    (BadSignature, Refusal.BAD_SIGNATURE),
    (HeaderMismatch, Refusal.HEADER_MISMATCH),
    (DecryptFailed, Refusal.DECRYPT_FAILED),
)


def _envelope_code(exc: EnvelopeError) -> str:
    """The reason code ``lampyre hub listen`` counts this refusal under."""
    if isinstance(exc, UnknownKey):
        return Refusal.UNKNOWN_HUB_KEY if exc.role == "hub" else Refusal.UNKNOWN_GATEWAY_KEY
    for kind, code in _ENVELOPE_CODES:
        if isinstance(exc, kind):
            return code
    return Refusal.ENVELOPE
