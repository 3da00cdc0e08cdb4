"""paho-mqtt 2.x wrapped at one seam for asyncio.

paho is a callback library with its own idea of a session. This module is the only place that
touches it; everything above sees coroutines that resolve on the broker's acknowledgements and
typed errors derived from :class:`agent.sdk.LampyreError`.

How paho is driven (the pattern of paho's ``examples/loop_asyncio.py``, without paho's thread):

* The blocking part of a connection attempt (DNS, TCP connect, TLS handshake, sending CONNECT)
  runs in an executor thread while no socket callback is installed, so nothing else touches the
  client meanwhile. From then on every paho call happens on the event loop: the socket is watched
  with ``add_reader``/``add_writer`` and ``loop_misc()`` runs every second for keep-alive.
* One paho ``Client`` per connection attempt, MQTT 5, clean start, session expiry 0 (unless
  :attr:`MqttSettings.session_expiry_s` asks for a persistent session) and
  ``manual_ack=True``. paho keeps its session only in memory and re-sends QoS>0 messages on a
  reconnect even with a clean session (paho issue #733); a fresh client per connection means paho
  never re-sends anything on its own: the caller's durable store is the source of truth.
* Outgoing QoS 1 messages resolve a future keyed by message id when the PUBACK arrives. The
  future is stored before control returns to the loop, and an acknowledgement that arrives for a
  mid not yet registered is parked (paho #361/#482: ``on_publish`` can fire before ``publish()``
  returns) so no acknowledgement is lost either way. Every pending future fails with
  :class:`MqttDisconnected` when the connection goes.
* The session, not paho, keeps the QoS 1 publish window: at most ``max_inflight`` messages (and
  never more than the broker's Receive Maximum from CONNACK) await their PUBACK; the rest wait
  in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import ssl
import stat
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.sdk import LampyreError

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DISCONNECT_TIMEOUT_S",
    "MISC_INTERVAL_S",
    "SUBSCRIBE_TIMEOUT_S",
    "Message",
    "MqttConnectError",
    "MqttDisconnected",
    "MqttError",
    "MqttSession",
    "MqttSettings",
    "PublishRejected",
    "SubscribeRejected",
    "TlsSettings",
    "build_tls_context",
    "is_loopback_host",
    "read_secret_file",
]

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
"""Whole connection attempt: DNS, TCP, TLS handshake and CONNACK."""
SUBSCRIBE_TIMEOUT_S = 10.0
DISCONNECT_TIMEOUT_S = 2.0
"""How long a clean DISCONNECT may take to leave before the socket is simply closed."""
MISC_INTERVAL_S = 1.0
"""Period of paho's ``loop_misc()`` (keep-alive PINGREQ and its timeout)."""

_SERVER_RECEIVE_MAXIMUM_DEFAULT = 65535  # MQTT 5 §3.2.2.3.3: absent means 65,535


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class MqttError(LampyreError):
    """Base of the errors of the MQTT seam."""


class MqttConnectError(MqttError):
    """A connection attempt failed. ``kind`` groups causes for logs and backoff decisions:
    ``dns``, ``refused``, ``timeout``, ``network``, ``tls``, ``config``, ``rejected`` (a CONNACK
    failure reason code, e.g. bad credentials) or ``closed`` (the broker hung up before CONNACK,
    which is how a TLS 1.3 broker reports a missing client certificate)."""

    def __init__(self, reason: str, kind: str = "network") -> None:
        self.reason = reason
        self.kind = kind
        super().__init__(f"MQTT connection failed ({kind}): {reason}")


class MqttDisconnected(MqttError):
    """The connection was lost (or closed) before the operation completed."""

    def __init__(self, reason: str = "not connected") -> None:
        self.reason = reason
        super().__init__(f"MQTT connection lost: {reason}")


class PublishRejected(MqttError):
    """The broker answered a PUBLISH with a failure reason code (e.g. 0x87 Not authorized)."""

    def __init__(self, reason_code: int, reason: str) -> None:
        self.reason_code = reason_code
        self.reason = reason
        super().__init__(f"PUBLISH rejected by the broker: 0x{reason_code:02X} {reason}")


class SubscribeRejected(MqttError):
    """The broker answered a SUBSCRIBE with a failure reason code."""

    def __init__(self, topic: str, reason_code: int, reason: str) -> None:
        self.topic = topic
        self.reason_code = reason_code
        self.reason = reason
        super().__init__(f"SUBSCRIBE to {topic!r} rejected: 0x{reason_code:02X} {reason}")


# --------------------------------------------------------------------------------------------
# Settings (built by the config loader)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsSettings:
    """TLS to the broker. ``ca_file`` None → the system's CAs. ``cert_file`` with ``key_file``
    → mutual TLS. TLS ≥ 1.2 and the host name check are not optional."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class MqttSettings:
    """Where and how to connect. The password itself is never held here: it is read from
    ``password_file`` at each connection attempt."""

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "lampyre"
    keepalive_s: int = 30
    username: str | None = None
    password_file: Path | None = None
    tls: TlsSettings | None = None
    session_expiry_s: int = 0
    """0: clean start and session expiry 0 (the agent: its buffer, not the broker, outlives an
    outage). More: clean start off and this session expiry, so the broker keeps the
    subscriptions and queues QoS 1 messages for this client id while it is away (a hub
    consumer); the client id must then be the same at every connection."""


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` names this machine without asking anyone: an address of 127.0.0.0/8 or
    ::1 (also IPv4-mapped), or the name ``localhost``. Any other name counts as elsewhere, even
    one that resolves to a loopback address today: what a name resolves to is up to DNS and the
    hosts file, which may change after the configuration was checked."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


@dataclass(frozen=True)
class Message:
    """An incoming application message."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


# --------------------------------------------------------------------------------------------
# Blocking helpers (run them in an executor)
# --------------------------------------------------------------------------------------------


def read_secret_file(path: Path, what: str) -> bytes:
    """Read a secret (password, private key) refusing a file that group or others may read.

    Checked on the open descriptor, so the file checked is the file read. Blocking.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise MqttConnectError(f"cannot open {what} {path}: {exc.strerror}", "config") from exc
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise MqttConnectError(
                f"{what} {path} is accessible by group or others (mode "
                f"{stat.S_IMODE(mode):04o}); make it readable by its owner only (chmod 600)",
                "config",
            )
        return handle.read()


def _read_password(path: Path) -> str:
    raw = read_secret_file(path, "password file")
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise MqttConnectError(f"password file {path} is not UTF-8", "config") from exc


class _ClosingSSLSocket(ssl.SSLSocket):
    """paho leaves the socket open when the handshake fails (bad certificate, wrong name):
    close it here rather than leak a descriptor per reconnection attempt."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def build_tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """An SSL context for the broker: TLS ≥ 1.2, certificate and host name verified, optional
    client certificate. Blocking (reads files)."""
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.sslsocket_class = _ClosingSSLSocket
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        if tls.cert_file is not None or tls.key_file is not None:
            if tls.cert_file is None or tls.key_file is None:
                raise MqttConnectError("mutual TLS needs both cert_file and key_file", "config")
            read_secret_file(tls.key_file, "TLS key file")  # permission check only
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise MqttConnectError(f"cannot load TLS material: {exc}", "config") from exc
    return context


# --------------------------------------------------------------------------------------------
# paho's log, kept for error messages
# --------------------------------------------------------------------------------------------


class _PahoLog(logging.Logger):
    """Receives paho's log calls. paho reports the cause of a dropped connection only in its log
    ("failed to receive on socket: [SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] …"), so its last
    error is kept for our own messages; everything is forwarded at DEBUG, because this module
    logs the outcome itself."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__(target.name)
        self._target = target
        self.last_error: str | None = None

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if level >= logging.ERROR:
            try:
                self.last_error = str(msg) % args if args else str(msg)
            except (TypeError, ValueError):
                self.last_error = str(msg)
        if self._target.isEnabledFor(logging.DEBUG):
            self._target.debug(msg, *args)


_paho_logger = logging.getLogger(__name__ + ".paho")


def _connect_error_from(exc: BaseException) -> MqttConnectError:
    if isinstance(exc, MqttConnectError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        return MqttConnectError(f"server certificate rejected: {exc.verify_message}", "tls")
    if isinstance(exc, ssl.CertificateError | ssl.SSLError):
        return MqttConnectError(f"TLS handshake failed: {exc}", "tls")
    if isinstance(exc, socket.gaierror):
        return MqttConnectError(f"cannot resolve the broker's name: {exc.strerror}", "dns")
    if isinstance(exc, ConnectionRefusedError):
        return MqttConnectError("connection refused", "refused")
    if isinstance(exc, TimeoutError):
        return MqttConnectError("timed out", "timeout")
    if isinstance(exc, OSError):
        return MqttConnectError(exc.strerror or str(exc), "network")
    return MqttConnectError(f"{type(exc).__name__}: {exc}", "network")


# --------------------------------------------------------------------------------------------
# The session
# --------------------------------------------------------------------------------------------


@dataclass
class _Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    future: asyncio.Future[None]


@dataclass
class _Connection:
    """Everything that belongs to one connection (one paho Client)."""

    client: paho.Client
    paho_log: _PahoLog
    sock: Any = None
    connack: asyncio.Future[None] | None = None
    misc_timer: asyncio.TimerHandle | None = None
    publishes: dict[int, tuple[asyncio.Future[None], int]] = field(default_factory=dict)
    early_acks: dict[int, ReasonCode] = field(default_factory=dict)
    subscribes: dict[int, tuple[asyncio.Future[None], str]] = field(default_factory=dict)
    waiting: deque[_Outgoing] = field(default_factory=deque)
    inflight: int = 0
    window: int = 1
    closing: bool = False
    closed: bool = False


class MqttSession:
    """One MQTT 5 connection at a time, driven from the event loop.

    ``connect()`` may be called again after the connection is lost or closed: each call uses a
    new paho client. Call :meth:`disconnect` once done with a connection, lost or not: it
    releases the socket and stops the message dispatcher.
    """

    def __init__(self, settings: MqttSettings, *, max_inflight: int = 64) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self.settings = settings
        self.max_inflight = max_inflight
        self._conn: _Connection | None = None
        self._callback: Callable[[Message], Awaitable[None]] | None = None
        self._incoming: asyncio.Queue[tuple[Message, int, _Connection]] | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._disconnected = asyncio.Event()
        self._disconnected.set()
        self.connected = False
        self.disconnect_reason: str | None = None
        self.server_receive_maximum = _SERVER_RECEIVE_MAXIMUM_DEFAULT

    def __repr__(self) -> str:
        s = self.settings
        return f"<MqttSession {s.client_id}@{s.host}:{s.port} connected={self.connected}>"

    @property
    def window(self) -> int:
        """How many QoS 1 messages may await their PUBACK at once on this connection."""
        return min(self.max_inflight, self.server_receive_maximum)

    @property
    def inflight(self) -> int:
        conn = self._conn
        return 0 if conn is None else conn.inflight

    # Connection ------------------------------------------------------------------------
    async def connect(
        self,
        will_topic: str | None,
        will_payload: bytes = b"",
        will_retain: bool = True,
        timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        """Connect with a QoS 1 last will (none when ``will_topic`` is None: the operator tools,
        whose absence nobody watches); return once the broker accepted (CONNACK success).

        All or nothing: on failure nothing stays open and :class:`MqttConnectError` says why.
        """
        if self._conn is not None and not self._conn.closed:
            raise RuntimeError("MqttSession.connect() while a connection is open")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                await self._connect(loop, will_topic, will_payload, will_retain, timeout_s)
        except MqttConnectError as exc:
            self._teardown("connection attempt failed")
            tls = self.settings.tls
            if tls is None or exc.kind != "closed":
                raise
            # The broker hung up during or right after the TLS handshake. With TLS 1.3 that is
            # how a refused (or missing) client certificate looks from this side.
            hint = (
                "the broker may require a client certificate: set cert_file and key_file"
                if tls.cert_file is None
                else "the broker may not trust the client certificate (check its CA)"
            )
            raise MqttConnectError(f"{exc.reason}; {hint}", "tls") from exc
        except TimeoutError as exc:
            self._teardown("connection attempt timed out")
            raise MqttConnectError(
                f"no CONNACK from {self.settings.host}:{self.settings.port} within {timeout_s} s",
                "timeout",
            ) from exc
        except BaseException:
            self._teardown("connection attempt failed")
            raise

    async def _connect(
        self,
        loop: asyncio.AbstractEventLoop,
        will_topic: str | None,
        will_payload: bytes,
        will_retain: bool,
        timeout_s: float,
    ) -> None:
        settings = self.settings
        password, tls_context = await asyncio.to_thread(self._load_secrets)

        paho_log = _PahoLog(_paho_logger)
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=paho.MQTTv5,
            reconnect_on_failure=False,
            manual_ack=True,
        )
        client.enable_logger(paho_log)
        client.connect_timeout = timeout_s
        # The session keeps the window (it knows the broker's Receive Maximum); paho must not
        # hold messages back on its own.
        client.max_inflight_messages = 0
        if will_topic is not None:
            client.will_set(will_topic, will_payload, qos=1, retain=will_retain)
        if settings.username is not None:
            client.username_pw_set(settings.username, password)
        if tls_context is not None:
            client.tls_set_context(tls_context)

        conn = _Connection(client=client, paho_log=paho_log, connack=loop.create_future())
        self._conn = conn
        self.connected = False
        self.disconnect_reason = None
        self.server_receive_maximum = _SERVER_RECEIVE_MAXIMUM_DEFAULT
        self._disconnected = asyncio.Event()

        client.on_connect = lambda c, u, f, rc, p: self._on_connect(conn, rc, p)
        client.on_disconnect = lambda c, u, f, rc, p: self._on_disconnect(conn, rc)
        client.on_publish = lambda c, u, mid, rc, p: self._on_publish(conn, mid, rc)
        client.on_subscribe = lambda c, u, mid, rcs, p: self._on_subscribe(conn, mid, rcs)
        client.on_message = lambda c, u, msg: self._on_message(conn, msg)

        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = settings.session_expiry_s

        # Blocking part, in a thread. No socket callback is installed yet, so paho writes the
        # CONNECT packet itself from that thread and nothing else uses the client meanwhile.
        blocking = loop.run_in_executor(
            None,
            lambda: client.connect(
                settings.host,
                settings.port,
                keepalive=settings.keepalive_s,
                clean_start=settings.session_expiry_s == 0,
                properties=properties,
            ),
        )
        try:
            rc = await asyncio.shield(blocking)
        except asyncio.CancelledError:
            # The thread cannot be interrupted: close whatever it opens once it is done.
            blocking.add_done_callback(lambda f: _abandon_connect(f, client))
            raise
        except Exception as exc:
            raise _connect_error_from(exc) from exc
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            detail = paho.error_string(rc)
            if paho_log.last_error:
                detail = f"{detail} ({paho_log.last_error})"
            raise MqttConnectError(detail, "closed")

        sock = client.socket()
        if sock is None:
            raise MqttConnectError("paho returned without a socket", "network")
        conn.sock = sock
        client.on_socket_close = lambda c, u, s: self._unwatch(conn)
        client.on_socket_register_write = lambda c, u, s: self._watch_write(conn, True)
        client.on_socket_unregister_write = lambda c, u, s: self._watch_write(conn, False)
        loop.add_reader(sock, self._on_readable, conn)
        if client.want_write():
            self._watch_write(conn, True)
        conn.misc_timer = loop.call_later(MISC_INTERVAL_S, self._on_misc, conn)

        assert conn.connack is not None
        await conn.connack
        self.connected = True
        self._disconnected.clear()
        self._start_dispatcher()
        logger.info(
            "MQTT connected to %s:%s as %s (window %s)",
            settings.host,
            settings.port,
            settings.client_id,
            self.window,
        )

    def _load_secrets(self) -> tuple[str | None, ssl.SSLContext | None]:
        settings = self.settings
        password = None
        if settings.password_file is not None:
            password = _read_password(settings.password_file)
        context = build_tls_context(settings.tls) if settings.tls is not None else None
        return password, context

    async def disconnect(self) -> None:
        """Send DISCONNECT (normal disconnection: the broker discards the will), wait for it to
        leave (bounded), close the socket and stop the dispatcher. Idempotent."""
        conn = self._conn
        if conn is not None and not conn.closed and self.connected:
            conn.closing = True
            conn.client.disconnect()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
                    await self._disconnected.wait()
        self._teardown("disconnected by the agent")
        dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is not None:
            dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dispatcher
        self._incoming = None

    async def wait_disconnected(self) -> None:
        """Return once the current connection is gone (at once when not connected)."""
        await self._disconnected.wait()

    # Publish / subscribe ----------------------------------------------------------------
    def publish_nowait(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None]:
        """Queue a PUBLISH now (order of calls is order on the wire) and return a future that
        resolves on PUBACK (QoS 1) or once written (QoS 0). It fails with
        :class:`PublishRejected` or :class:`MqttDisconnected`."""
        if qos not in (0, 1):
            raise ValueError("only QoS 0 and 1 are supported")
        conn = self._conn
        if conn is None or conn.closed or not self.connected:
            raise MqttDisconnected(self.disconnect_reason or "not connected")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        outgoing = _Outgoing(topic, payload, qos, retain, future)
        if qos == 0 or (not conn.waiting and conn.inflight < conn.window):
            self._send(conn, outgoing)
        else:
            conn.waiting.append(outgoing)
        return future

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish and wait for the PUBACK (QoS 1). Raises :class:`PublishRejected` on a failure
        reason code, :class:`MqttDisconnected` if the connection drops first."""
        await self.publish_nowait(topic, payload, qos, retain)

    async def subscribe(
        self, topic: str, qos: int = 1, timeout_s: float = SUBSCRIBE_TIMEOUT_S
    ) -> None:
        """Subscribe and wait for the SUBACK; raises :class:`SubscribeRejected` on failure."""
        conn = self._conn
        if conn is None or conn.closed or not self.connected:
            raise MqttDisconnected(self.disconnect_reason or "not connected")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        rc, mid = conn.client.subscribe(topic, qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise MqttDisconnected(paho.error_string(rc))
        conn.subscribes[mid] = (future, topic)
        try:
            async with asyncio.timeout(timeout_s):
                await future
        finally:
            conn.subscribes.pop(mid, None)

    def on_message(self, callback: Callable[[Message], Awaitable[None]]) -> None:
        """Set the handler of incoming messages. It runs in the event loop, one message at a
        time in arrival order; the PUBACK of a QoS 1 message is sent after it returns (or
        raises: a failing handler is logged and the message acknowledged anyway, so the broker
        never redelivers it forever)."""
        self._callback = callback

    # paho callbacks (always on the event loop thread) -----------------------------------
    def _on_connect(self, conn: _Connection, reason: ReasonCode, props: Properties) -> None:
        future = conn.connack
        if future is None or future.done():
            return
        if reason.is_failure:
            future.set_exception(
                MqttConnectError(f"broker refused: 0x{reason.value:02X} {reason}", "rejected")
            )
            return
        receive_maximum = getattr(props, "ReceiveMaximum", None)
        if isinstance(receive_maximum, int) and receive_maximum > 0:
            self.server_receive_maximum = receive_maximum
        conn.window = self.window
        future.set_result(None)

    def _on_disconnect(self, conn: _Connection, reason: ReasonCode) -> None:
        if reason.is_failure:
            detail = f"0x{reason.value:02X} {reason}"
        else:
            detail = "disconnected by the agent" if conn.closing else "closed by the broker"
        if reason.is_failure and conn.paho_log.last_error:
            detail = f"{detail} ({conn.paho_log.last_error})"
        self._teardown(detail, conn)

    def _on_publish(self, conn: _Connection, mid: int, reason: ReasonCode) -> None:
        entry = conn.publishes.pop(mid, None)
        if entry is None:
            conn.early_acks[mid] = reason
            return
        future, qos = entry
        self._settle(conn, future, qos, reason)

    def _settle(
        self, conn: _Connection, future: asyncio.Future[None], qos: int, reason: ReasonCode
    ) -> None:
        if qos > 0:
            conn.inflight -= 1
        if not future.done():
            if reason.is_failure:
                future.set_exception(PublishRejected(reason.value, str(reason)))
            else:
                future.set_result(None)
        self._pump(conn)

    def _on_subscribe(self, conn: _Connection, mid: int, reasons: list[ReasonCode]) -> None:
        entry = conn.subscribes.get(mid)
        if entry is None:
            return
        future, topic = entry
        if future.done():
            return
        failed = [r for r in reasons if r.is_failure]
        if failed:
            future.set_exception(SubscribeRejected(topic, failed[0].value, str(failed[0])))
        else:
            future.set_result(None)

    def _on_message(self, conn: _Connection, msg: paho.MQTTMessage) -> None:
        message = Message(msg.topic, bytes(msg.payload), msg.qos, msg.retain)
        if self._incoming is None:
            # A message read in the same turn as the CONNACK (a persistent session's queue is
            # sent right after it) arrives before the dispatcher starts: keep it for the
            # dispatcher instead of acknowledging it unhandled.
            self._incoming = asyncio.Queue()
        self._incoming.put_nowait((message, msg.mid, conn))

    # Sending -----------------------------------------------------------------------------
    def _send(self, conn: _Connection, out: _Outgoing) -> None:
        if out.future.done():  # cancelled while waiting for a slot
            return
        info = conn.client.publish(out.topic, out.payload, qos=out.qos, retain=out.retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            out.future.set_exception(MqttDisconnected(paho.error_string(info.rc)))
            return
        if out.qos > 0:
            conn.inflight += 1
        early = conn.early_acks.pop(info.mid, None)
        if early is not None:
            self._settle(conn, out.future, out.qos, early)
        else:
            conn.publishes[info.mid] = (out.future, out.qos)

    def _pump(self, conn: _Connection) -> None:
        while conn.waiting and conn.inflight < conn.window and not conn.closed:
            self._send(conn, conn.waiting.popleft())

    # Incoming ----------------------------------------------------------------------------
    def _start_dispatcher(self) -> None:
        if self._dispatcher is None or self._dispatcher.done():
            if self._incoming is None:
                self._incoming = asyncio.Queue()
            self._dispatcher = asyncio.get_running_loop().create_task(
                self._dispatch(self._incoming), name="mqtt-dispatch"
            )

    async def _dispatch(self, queue: asyncio.Queue[tuple[Message, int, _Connection]]) -> None:
        while True:
            message, mid, conn = await queue.get()
            callback = self._callback
            try:
                if callback is not None:
                    await callback(message)
            except Exception:
                logger.exception(
                    "handler of MQTT message on %s failed; acknowledging it anyway",
                    message.topic,
                )
            finally:
                self._ack(conn, mid, message.qos)

    def _ack(self, conn: _Connection, mid: int, qos: int) -> None:
        # After a reconnect the old connection's acknowledgements mean nothing: with a clean
        # session the broker has already forgotten the message.
        if qos > 0 and not conn.closed and conn is self._conn:
            conn.client.ack(mid, qos)

    # Socket plumbing ---------------------------------------------------------------------
    def _on_readable(self, conn: _Connection) -> None:
        client = conn.client
        try:
            client.loop_read()
            # TLS may hold decrypted records the kernel no longer signals as readable.
            sock = conn.sock
            while (
                not conn.closed
                and client.socket() is sock
                and isinstance(sock, ssl.SSLSocket)
                and sock.pending() > 0
            ):
                client.loop_read()
        except Exception:
            logger.exception("MQTT read handling failed; dropping the connection")
            self._teardown("internal error while reading", conn)

    def _on_writable(self, conn: _Connection) -> None:
        try:
            conn.client.loop_write()
        except Exception:
            logger.exception("MQTT write handling failed; dropping the connection")
            self._teardown("internal error while writing", conn)

    def _on_misc(self, conn: _Connection) -> None:
        if conn.closed:
            return
        try:
            conn.client.loop_misc()
        except Exception:
            logger.exception("MQTT keep-alive handling failed; dropping the connection")
            self._teardown("internal error in keep-alive", conn)
            return
        if not conn.closed:
            conn.misc_timer = asyncio.get_running_loop().call_later(
                MISC_INTERVAL_S, self._on_misc, conn
            )

    def _watch_write(self, conn: _Connection, on: bool) -> None:
        if conn.closed or conn.sock is None:
            return
        loop = asyncio.get_running_loop()
        if on:
            loop.add_writer(conn.sock, self._on_writable, conn)
        else:
            loop.remove_writer(conn.sock)

    def _unwatch(self, conn: _Connection) -> None:
        sock, conn.sock = conn.sock, None
        if sock is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock)
        loop.remove_writer(sock)

    def _teardown(self, reason: str, conn: _Connection | None = None) -> None:
        """Forget a connection: stop watching its socket, close it, fail whatever waits on it."""
        conn = conn if conn is not None else self._conn
        if conn is None or conn.closed:
            return
        conn.closed = True
        was_connected = self.connected and conn is self._conn
        if conn is self._conn:
            self.connected = False
            self.disconnect_reason = reason
        if conn.misc_timer is not None:
            conn.misc_timer.cancel()
        self._unwatch(conn)
        _close_client_socket(conn.client)
        error = MqttDisconnected(reason)
        if conn.connack is not None and not conn.connack.done():
            conn.connack.set_exception(
                MqttConnectError(f"connection closed before CONNACK: {reason}", "closed")
            )
        pending = [f for f, _ in conn.publishes.values()] + [o.future for o in conn.waiting]
        pending += [f for f, _ in conn.subscribes.values()]
        conn.publishes.clear()
        conn.waiting.clear()
        conn.early_acks.clear()
        conn.inflight = 0
        for future in pending:
            if not future.done():
                future.set_exception(error)
                # Nobody may be awaiting it any more (the caller gave up): do not warn.
                future.exception()
        if conn.connack is not None and conn.connack.done() and not conn.connack.cancelled():
            conn.connack.exception()
        if conn is self._conn:
            self._disconnected.set()
        if was_connected:
            logger.info(
                "MQTT connection to %s:%s closed: %s",
                self.settings.host,
                self.settings.port,
                reason,
            )


def _abandon_connect(future: asyncio.Future[Any], client: paho.Client) -> None:
    if not future.cancelled():
        future.exception()  # whatever happened, nobody waits for it any more
    _close_client_socket(client)


def _close_client_socket(client: paho.Client) -> None:
    sock = client.socket()
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()
