"""The uplink owns the MQTT session: birth and last-will status, the publish window, reconnection
with backoff, and commands coming down.

Contract with the buffer (at-least-once): a record leaves the buffer only after the broker
answered its PUBLISH with a success PUBACK. Records in flight when a connection drops are simply
forgotten here; they are still in the buffer and go again after the reconnect, so the hub may see
a record twice and drops duplicates by seq.

With hub receipts (``[hub] receipts``), a PUBACK is not enough for readings and events: they
stay in the buffer until a receipt signed by the hub covers their seq, and go again when none
did within ``receipt_timeout_s``. Acks still leave at the PUBACK (the control post reads them).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

import agent
from agent.backoff import backoff_delay_s
from agent.jws import ReceiptRejected, verify_receipt
from agent.mqtt import (
    CONNECT_TIMEOUT_S,
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
from agent.sdk import now_ms

__all__ = [
    "ACK_BATCH_MAX",
    "ACK_FLUSH_DELAY_S",
    "BACKOFF_BASE_S",
    "BACKOFF_CAP_S",
    "IDLE_POLL_S",
    "REJECT_RETRY_S",
    "SHUTDOWN_TIMEOUT_S",
    "STABLE_CONNECTION_S",
    "RecordLike",
    "RecordSource",
    "Uplink",
    "UplinkStats",
]

logger = logging.getLogger(__name__)

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
STABLE_CONNECTION_S = 60.0
"""A connection that stayed up this long resets the backoff to its base."""
IDLE_POLL_S = 1.0
"""With nothing to send, look at the buffer again after this long even without notify()."""
REJECT_RETRY_S = 30.0
"""A record the broker refused (PUBACK failure) is not offered again before this long."""
REJECT_LOG_INTERVAL_S = 10.0
"""At most one warning per interval for refused records (the rest go to DEBUG)."""
ACK_BATCH_MAX = 256
"""Delete acknowledged records from the buffer in batches of up to this many..."""
ACK_FLUSH_DELAY_S = 0.02
"""...or once the oldest acknowledged record has waited this long."""
SHUTDOWN_TIMEOUT_S = 3.0
"""Bound on the clean shutdown: last acks to the buffer, offline status and its PUBACK."""
STATUS_TIMEOUT_S = 10.0
"""Bound on the PUBACK of the online status and the SUBACK of the command topic."""


class RecordLike(Protocol):
    """What the uplink needs of a buffered record (``agent.buffer.Record`` fits)."""

    @property
    def seq(self) -> int: ...

    @property
    def topic(self) -> str:
        """Topic suffix under ``{prefix}/{gateway_id}/``: ``data``, ``event`` or ``ack``."""
        ...

    @property
    def payload(self) -> bytes: ...


class RecordSource(Protocol):
    """The storage seam (``agent.buffer.Buffer`` fits)."""

    async def pending(self, limit: int, exclude: Collection[int] = ()) -> Sequence[RecordLike]:
        """Up to ``limit`` records to send, alarm lane first, skipping ``exclude``."""
        ...

    async def ack(self, seqs: list[int]) -> object:
        """Delete records the broker acknowledged."""
        ...

    async def ack_ranges(
        self, ranges: Sequence[tuple[int, int]], topics: Collection[str]
    ) -> list[int]:
        """Delete the records of ``topics`` whose seq a hub receipt covers."""
        ...


RECEIPTED_TOPICS = ("data", "event")
"""What hub receipts cover: the sealed streams the hub stores."""


@dataclass(frozen=True, slots=True)
class ReceiptSettings:
    """Hub receipts: the hub's receipt-signing keys, and how long to wait for a receipt."""

    keys: Mapping[str, Ed25519PublicKey]
    timeout_s: float = 120.0


UplinkState = Literal["connecting", "online", "offline"]


@dataclass(slots=True)
class UplinkStats:
    """A snapshot of the uplink, for health reports."""

    state: UplinkState = "offline"
    connected_since_ms: int | None = None
    published: int = 0
    """Records handed to the broker (each attempt counts, re-sends included)."""
    acked: int = 0
    """Records the broker acknowledged with a success reason code."""
    rejected: int = 0
    """Records the broker refused with a failure reason code (each attempt counts)."""
    reconnects: int = 0
    """Connections established after the first one."""
    inflight: int = 0
    last_error: str | None = None
    awaiting_receipt: int = 0
    """Records the broker took that no hub receipt has covered yet (receipts mode)."""
    receipts: int = 0
    """Valid hub receipts received."""
    receipts_refused: int = 0
    """Messages on the receipt topic that did not verify (ignored)."""
    receipt_timeouts: int = 0
    """Records sent again because no receipt covered them in time."""


class _Flight:
    """Bookkeeping of one connection: what is in flight, acknowledged, waiting to be deleted."""

    def __init__(self) -> None:
        self.inflight: set[int] = set()
        self.acked: list[int] = []
        self.first_ack_at: float = 0.0
        self.deleting: set[int] = set()


class Uplink:
    """Forwards buffered records to the hub and hands commands to ``on_command``.

    ``run()`` runs until cancelled; cancelling it is the clean shutdown (offline status, clean
    DISCONNECT, so the broker does not fire the last will).
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        prefix: str,
        gateway_id: str,
        buffer: RecordSource,
        on_command: Callable[[bytes], Awaitable[None]],
        max_inflight: int = 64,
        receipts: ReceiptSettings | None = None,
    ) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self.settings = settings
        self.gateway_id = gateway_id
        self.buffer = buffer
        self.on_command = on_command
        self.max_inflight = max_inflight
        base = f"{prefix.rstrip('/')}/{gateway_id}"
        self.topic_base = base
        self.status_topic = f"{base}/status"
        self.cmd_topic = f"{base}/cmd"
        self.receipt_topic = f"{base}/receipt"
        self.receipts = receipts
        self._awaiting: dict[int, float] = {}
        """Receipts mode: seq -> when to send it again if no receipt covered it."""
        self._wake = asyncio.Event()
        self._stats = UplinkStats()
        self._session: MqttSession | None = None
        self._flight: _Flight | None = None
        self._held: dict[int, float] = {}
        self._last_reject_log = -REJECT_LOG_INTERVAL_S
        self._rejects_since_log = 0
        self._connections = 0

    # Public surface --------------------------------------------------------------------
    def notify(self) -> None:
        """New records are in the buffer: forward them without waiting for the idle poll."""
        self._wake.set()

    @property
    def stats(self) -> UplinkStats:
        """A copy of the counters, taken now."""
        flight = self._flight
        inflight = len(flight.inflight) if flight is not None and self._session else 0
        return dataclasses.replace(
            self._stats, inflight=inflight, awaiting_receipt=len(self._awaiting)
        )

    async def run(self) -> None:
        """Connect, forward, reconnect, until cancelled."""
        if self.settings.tls is None and not is_loopback_host(self.settings.host):
            # The configuration refuses this unless hub.allow_plaintext says so; say it once
            # more where the operator looks, since it must never reach production.
            logger.warning(
                "MQTT to %s:%s without TLS (hub.allow_plaintext = true): readings, commands and "
                "any password cross the network in clear and the broker is not authenticated; "
                "enable [hub.tls] for production",
                self.settings.host,
                self.settings.port,
            )
        attempt = 0
        last_failure: tuple[str, str] | None = None
        try:
            while True:
                self._stats.state = "connecting"
                session = MqttSession(self.settings, max_inflight=self.max_inflight)
                self._session = session
                try:
                    await session.connect(
                        self.status_topic,
                        self._status_payload("offline", reason="connection lost"),
                        will_retain=True,
                        timeout_s=CONNECT_TIMEOUT_S,
                    )
                except MqttConnectError as exc:
                    failure = (exc.kind, exc.reason)
                    if failure != last_failure:
                        logger.warning(
                            "cannot connect to the MQTT hub at %s:%s: %s (retrying with backoff; "
                            "repeats of this error are logged at DEBUG)",
                            self.settings.host,
                            self.settings.port,
                            exc,
                        )
                        last_failure = failure
                    else:
                        logger.debug("MQTT connection attempt failed again: %s", exc)
                    self._stats.state = "offline"
                    self._stats.last_error = str(exc)
                    await asyncio.sleep(backoff_delay_s(attempt, BACKOFF_BASE_S, BACKOFF_CAP_S))
                    attempt += 1
                    continue
                except Exception as exc:
                    logger.exception("unexpected error while connecting to the MQTT hub")
                    self._stats.state = "offline"
                    self._stats.last_error = f"{type(exc).__name__}: {exc}"
                    await asyncio.sleep(backoff_delay_s(attempt, BACKOFF_BASE_S, BACKOFF_CAP_S))
                    attempt += 1
                    continue

                last_failure = None
                if self._connections > 0:
                    self._stats.reconnects += 1
                self._connections += 1
                connected_at = time.monotonic()
                ended: str | None = None
                try:
                    await self._serve(session)
                except asyncio.CancelledError:
                    await self._shutdown(session)
                    raise
                except (MqttError, TimeoutError) as exc:
                    ended = str(exc) or "timed out waiting for the broker"
                except Exception as exc:
                    # The uplink must outlive a storage hiccup or a bug in one record: log it,
                    # drop the connection, and start again with backoff.
                    logger.exception("uplink session failed; reconnecting")
                    ended = f"{type(exc).__name__}: {exc}"
                finally:
                    if ended is None:
                        ended = session.disconnect_reason or "connection lost"
                    await session.disconnect()
                    self._session = None

                logger.warning("MQTT connection to the hub ended (%s); reconnecting", ended)
                self._stats.state = "offline"
                self._stats.connected_since_ms = None
                self._stats.last_error = ended
                if time.monotonic() - connected_at >= STABLE_CONNECTION_S:
                    attempt = 0
                await asyncio.sleep(backoff_delay_s(attempt, BACKOFF_BASE_S, BACKOFF_CAP_S))
                attempt += 1
        finally:
            self._stats.state = "offline"
            self._stats.connected_since_ms = None

    # One connection --------------------------------------------------------------------
    async def _serve(self, session: MqttSession) -> None:
        session.on_message(self._handle_message)
        async with asyncio.timeout(STATUS_TIMEOUT_S):
            try:
                await session.publish(
                    self.status_topic,
                    self._status_payload("online", version=agent.__version__),
                    qos=1,
                    retain=True,
                )
            except PublishRejected as exc:
                # Readings still matter without a status; the operator must fix the broker ACL.
                logger.error("the hub refused the online status: %s", exc)  # noqa: TRY400
                self._stats.last_error = str(exc)
            try:
                await session.subscribe(self.cmd_topic, qos=1)
            except SubscribeRejected as exc:
                # Readings still matter without commands; the operator must fix the broker ACL.
                logger.error("no commands will be received: %s", exc)  # noqa: TRY400
                self._stats.last_error = str(exc)
            if self.receipts is not None:
                try:
                    await session.subscribe(self.receipt_topic, qos=1)
                except SubscribeRejected as exc:
                    # Records then stay until receipt_timeout_s and go again: never lost.
                    logger.error("no hub receipts will be received: %s", exc)  # noqa: TRY400
                    self._stats.last_error = str(exc)
        self._stats.state = "online"
        self._stats.connected_since_ms = now_ms()
        logger.info("uplink online: %s (window %s)", self.topic_base, session.window)

        flight = _Flight()
        self._flight = flight
        watcher = asyncio.get_running_loop().create_task(
            self._wake_on_disconnect(session), name="uplink-disconnect-watch"
        )
        try:
            await self._forward(session, flight)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            # PUBACKed records must not be sent again needlessly: delete them now if we can.
            if not _current_task_cancelling():
                await self._flush_acks(flight, force=True)

    async def _wake_on_disconnect(self, session: MqttSession) -> None:
        await session.wait_disconnected()
        self._wake.set()

    async def _forward(self, session: MqttSession, flight: _Flight) -> None:
        while session.connected:
            self._wake.clear()
            await self._flush_acks(flight, force=False)
            free = session.window - len(flight.inflight)
            if free > 0:
                records = await self.buffer.pending(free, exclude=self._exclusions(flight))
                for record in records:
                    if not self._send(session, flight, record):
                        break
            if flight.acked:
                timeout_s = max(0.0, flight.first_ack_at + ACK_FLUSH_DELAY_S - time.monotonic())
            else:
                timeout_s = IDLE_POLL_S
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._wake.wait()

    def _exclusions(self, flight: _Flight) -> set[int]:
        excluded = flight.inflight | flight.deleting
        excluded.update(flight.acked)
        if self._held:
            now = time.monotonic()
            for seq, until in list(self._held.items()):
                if until <= now:
                    del self._held[seq]
            excluded.update(self._held)
        if self._awaiting:
            now = time.monotonic()
            expired = [seq for seq, until in self._awaiting.items() if until <= now]
            for seq in expired:
                del self._awaiting[seq]
            if expired:
                self._stats.receipt_timeouts += len(expired)
                logger.info(
                    "no hub receipt for %d record(s) within %s s: sending them again",
                    len(expired),
                    self.receipts.timeout_s if self.receipts else "?",
                )
            excluded.update(self._awaiting)
        return excluded

    def _send(self, session: MqttSession, flight: _Flight, record: RecordLike) -> bool:
        seq = record.seq
        try:
            future = session.publish_nowait(
                f"{self.topic_base}/{record.topic}", record.payload, qos=1
            )
        except MqttDisconnected:
            return False
        flight.inflight.add(seq)
        self._stats.published += 1
        future.add_done_callback(lambda f: self._on_publish_done(flight, seq, record.topic, f))
        return True

    def _on_publish_done(
        self, flight: _Flight, seq: int, topic: str, future: asyncio.Future[None]
    ) -> None:
        flight.inflight.discard(seq)
        self._wake.set()
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            self._stats.acked += 1
            if self.receipts is not None and topic in RECEIPTED_TOPICS:
                # Kept in the buffer until the hub's receipt (or sent again after the timeout).
                self._awaiting[seq] = time.monotonic() + self.receipts.timeout_s
                return
            if not flight.acked:
                flight.first_ack_at = time.monotonic()
            flight.acked.append(seq)
        elif isinstance(exc, PublishRejected):
            self._held[seq] = time.monotonic() + REJECT_RETRY_S
            self._stats.rejected += 1
            self._stats.last_error = str(exc)
            self._log_rejection(seq, topic, exc)
        # MqttDisconnected: the record is still in the buffer and goes again after reconnect.

    def _log_rejection(self, seq: int, topic: str, exc: PublishRejected) -> None:
        self._rejects_since_log += 1
        now = time.monotonic()
        if now - self._last_reject_log >= REJECT_LOG_INTERVAL_S:
            logger.warning(
                "hub broker refused record seq %s on %s/%s: reason code 0x%02X %s "
                "(%s refusal(s) since the last warning); kept in the buffer, retried in %s s",
                seq,
                self.topic_base,
                topic,
                exc.reason_code,
                exc.reason,
                self._rejects_since_log,
                REJECT_RETRY_S,
            )
            self._last_reject_log = now
            self._rejects_since_log = 0
        else:
            logger.debug(
                "hub broker refused record seq %s: 0x%02X %s", seq, exc.reason_code, exc.reason
            )

    async def _flush_acks(self, flight: _Flight, *, force: bool) -> None:
        if not flight.acked:
            return
        due = time.monotonic() - flight.first_ack_at >= ACK_FLUSH_DELAY_S
        if not (force or due or len(flight.acked) >= ACK_BATCH_MAX):
            return
        batch, flight.acked = flight.acked, []
        flight.deleting.update(batch)
        try:
            await self.buffer.ack(batch)
        except Exception:
            # They will be sent again: a duplicate, never a loss.
            logger.exception(
                "could not delete %s acknowledged record(s) from the buffer", len(batch)
            )
        finally:
            flight.deleting.difference_update(batch)

    # Commands --------------------------------------------------------------------------
    async def _handle_message(self, message: Message) -> None:
        if message.topic == self.receipt_topic and self.receipts is not None:
            await self._handle_receipt(message.payload)
            return
        if message.topic != self.cmd_topic:
            logger.debug("ignoring MQTT message on unexpected topic %s", message.topic)
            return
        try:
            await self.on_command(message.payload)
        except Exception:
            # Acknowledged anyway (by the session, after we return): a command that breaks the
            # handler must not be redelivered forever.
            logger.exception("command handler failed on a %s-byte command", len(message.payload))

    async def _handle_receipt(self, payload: bytes) -> None:
        assert self.receipts is not None
        try:
            receipt = verify_receipt(payload, keys=self.receipts.keys, gateway=self.gateway_id)
        except ReceiptRejected as exc:
            # Anyone allowed to publish there could try; nothing is deleted on their word.
            self._stats.receipts_refused += 1
            logger.warning("ignored a message on %s: %s", self.receipt_topic, exc.reason)
            return
        try:
            deleted = await self.buffer.ack_ranges(receipt.ranges, RECEIPTED_TOPICS)
        except Exception:
            # The records stay and go again after the timeout: a duplicate, never a loss.
            logger.exception("could not delete the records of a hub receipt from the buffer")
            return
        for first, last in receipt.ranges:
            # Walk whichever is smaller: a range may span millions of seqs (others' records
            # in between), or the awaiting set may be large after a long outage.
            if last - first < len(self._awaiting):
                for seq in range(first, last + 1):
                    self._awaiting.pop(seq, None)
            else:
                for seq in [s for s in self._awaiting if first <= s <= last]:
                    del self._awaiting[seq]
        self._stats.receipts += 1
        logger.debug(
            "hub receipt (key %s) up to seq %d: %d record(s) deleted",
            receipt.kid,
            receipt.seq,
            len(deleted),
        )
        self._wake.set()

    # Shutdown --------------------------------------------------------------------------
    async def _shutdown(self, session: MqttSession) -> None:
        """Clean exit: pending deletions, retained offline status (waiting for its PUBACK) and a
        normal DISCONNECT, so subscribers see "offline" at once and the will is not fired."""
        flight = self._flight
        try:
            async with asyncio.timeout(SHUTDOWN_TIMEOUT_S):
                if flight is not None:
                    await self._flush_acks(flight, force=True)
                if session.connected:
                    await session.publish(
                        self.status_topic,
                        self._status_payload("offline", reason="shutdown"),
                        qos=1,
                        retain=True,
                    )
        except (TimeoutError, MqttError) as exc:
            logger.warning("clean MQTT shutdown incomplete: %s", exc or "timed out")
        except Exception:
            logger.exception("clean MQTT shutdown failed")
        await session.disconnect()
        logger.info("uplink stopped: %s", self.topic_base)

    # Helpers ---------------------------------------------------------------------------
    def _status_payload(self, state: str, **extra: str) -> bytes:
        body: dict[str, object] = {"state": state, "gateway": self.gateway_id, **extra}
        body["ts"] = now_ms()
        return json.dumps(body, separators=(",", ":")).encode()


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
