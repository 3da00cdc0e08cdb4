"""The hub side of one gateway, as a control post sees it: every message under
``{prefix}/{gateway}/#``, and commands published on ``cmd``.

Built on :class:`agent.mqtt.MqttSession`, the project's one seam over paho, so the runner needs no
second MQTT wrapper. Messages are kept in arrival order with their arrival time (monotonic), and
``data``/``event``/``ack`` duplicates are dropped by ``seq`` exactly as the hub protocol asks a hub
to do: a scenario never counts a re-delivered batch twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from agent.mqtt import Message, MqttSession, MqttSettings

__all__ = [
    "CONNECT_TIMEOUT_S",
    "PUBLISH_TIMEOUT_S",
    "WAKE_INTERVAL_S",
    "ControlPost",
    "HubMessage",
    "HubTimeout",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

CONNECT_TIMEOUT_S = 10.0
PUBLISH_TIMEOUT_S = 10.0
"""Bound on the broker's PUBACK for one command."""
WAKE_INTERVAL_S = 0.5
"""A waiting predicate is evaluated at least this often, even when no message arrives."""

_SEQUENCED = ("data", "event", "ack")


class HubTimeout(Exception):
    """What a scenario waited for did not show up on the hub in time."""

    def __init__(self, what: str, timeout_s: float) -> None:
        self.what = what
        self.timeout_s = timeout_s
        super().__init__(f"no {what} within {timeout_s:.1f} s")


@dataclass(frozen=True, slots=True)
class HubMessage:
    """One message seen on the hub. ``kind`` is the last topic level (``status``, ``data``,
    ``event``, ``ack``, ``cmd``); ``doc`` is the parsed JSON, or None when it is not JSON."""

    kind: str
    topic: str
    payload: bytes
    doc: Any
    received_s: float
    """``time.monotonic()`` when the message reached the runner."""
    retained: bool


class ControlPost:
    """Watches one gateway's topics and sends it commands.

    ``connect()`` subscribes before returning, so nothing the gateway publishes afterwards is
    missed; ``close()`` is idempotent.
    """

    def __init__(self, settings: MqttSettings, *, prefix: str, gateway_id: str) -> None:
        self.settings = settings
        self.base = f"{prefix}/{gateway_id}"
        self._session = MqttSession(settings)
        self._messages: list[HubMessage] = []
        self._seen: set[tuple[str, int]] = set()
        self._changed = asyncio.Event()
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
            doc: Any = json.loads(message.payload)
        except ValueError:
            doc = None
        if kind in _SEQUENCED and isinstance(doc, dict) and isinstance(doc.get("seq"), int):
            key = (kind, doc["seq"])
            if key in self._seen:
                self.duplicates += 1
                return
            self._seen.add(key)
        self._messages.append(
            HubMessage(kind, message.topic, message.payload, doc, time.monotonic(), message.retain)
        )
        self._changed.set()

    # Reading what arrived ------------------------------------------------------------------
    def messages(self, kind: str | None = None, since_s: float = 0.0) -> list[HubMessage]:
        """Messages of ``kind`` (all kinds when None) received at or after ``since_s``."""
        return [
            m
            for m in self._messages
            if (kind is None or m.kind == kind) and m.received_s >= since_s
        ]

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

    async def send_command(self, document: dict[str, Any]) -> float:
        return await self.send(json.dumps(document).encode())
