"""The hub broker configuration shipped in packaging/mosquitto/, run by a real Mosquitto.

Each test starts Mosquitto with the shipped ``lampyre.conf`` (only its paths and its port are
changed, see :func:`render_shipped_config`) and the shipped ``acl`` file as it is, with
certificates generated here: the CA, gateways cab-0001 and cab-0002, the control post, the hub
consumer, a revoked gateway and a "cab-0001" signed by another CA. The clients are paho MQTT 5
clients with paho's own network thread.

What Mosquitto 2.0 does with an ACL file, as observed here and asserted below:

- a PUBLISH outside a client's "write" rules is dropped: QoS 1 gets PUBACK 0x87 Not authorized,
  QoS 0 nothing at all; the client stays connected. A will outside them is accepted at CONNECT
  and dropped when the broker would publish it.
- SUBSCRIBE is not checked against the file: every filter is granted (SUBACK 0x01), and the
  "read" rules are applied to each message the broker would deliver. So a gateway subscribed to
  another's commands receives nothing, but gets no SUBACK failure either.
- shared subscriptions ($share/<group>/<filter>) are no exception: the read check is made for
  the one member the broker picks for a message, and when that member may not read it the
  message goes to nobody. Hence the hub's group name must be a secret.

Ordering argument used by the negative assertions (never a sleep): Mosquitto runs one thread;
when it answers a QoS 1 PUBLISH it has already queued that message to every subscriber allowed
to read it, and each subscriber's queue is delivered in order. So once a subscriber has received
a "marker" message published after the forbidden one was acknowledged (or, for QoS 0, after a
later QoS 1 message of the same client was), it would already have received the forbidden one.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import pwd
import secrets
import signal
import ssl
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent.mqtt import MqttSettings, TlsSettings
from agent.uplink import Uplink
from tests.support.mosquitto import HOST, MosquittoBroker

REPO = Path(__file__).resolve().parent.parent
PACKAGING = REPO / "packaging" / "mosquitto"
SHIPPED_CONF = PACKAGING / "lampyre.conf"
SHIPPED_ACL = PACKAGING / "acl"
MAKE_PKI = PACKAGING / "make-pki.sh"

PREFIX = "lampyre/v1"
WAIT_S = 5.0
POLL_S = 0.01
COMMAND_RETRY_S = 0.05

SUCCESS = 0x00
NO_MATCHING_SUBSCRIBERS = 0x10  # a success code: the broker took the message
GRANTED_QOS_1 = 0x01
NOT_AUTHORIZED = 0x87

GATEWAY_1 = "cab-0001"
GATEWAY_2 = "cab-0002"
REVOKED_GATEWAY = "cab-0003"
CONTROL_POST = "control-post"
HUB = "hub"
INTRUDER = "intruder"
"""File name of a certificate with CN cab-0001 issued by another CA."""


def topic(gateway: str, kind: str) -> str:
    return f"{PREFIX}/{gateway}/{kind}"


# --------------------------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubPki:
    """A folder laid out as the shipped configuration expects (ca.pem, broker.pem, broker.key,
    crl.pem) plus ``<name>.pem``/``<name>.key`` for each client identity."""

    folder: Path

    def cert(self, name: str) -> Path:
        return self.folder / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.folder / f"{name}.key"

    @property
    def ca_file(self) -> Path:
        return self.folder / "ca.pem"

    def client_context(self, name: str | None) -> ssl.SSLContext:
        """A client context trusting the CA, with ``name``'s certificate (None: none)."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if name is not None:
            context.load_cert_chain(self.cert(name), self.key(name))
        return context


def make_hub_pki(folder: Path) -> HubPki:
    """EC P-256 keys, certificates valid from an hour ago for a day, keys with mode 0600."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def builder(subject: str, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def write(file: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
        (folder / f"{file}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            data = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            fd = os.open(folder / f"{file}.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)

    def make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            builder(common_name, name(common_name), key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def issue(
        ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
        common_name: str,
        usage: x509.ObjectIdentifier,
        sans: Sequence[x509.GeneralName] = (),
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        ca_key, ca_cert = ca
        key = ec.generate_private_key(ec.SECP256R1())
        cert_builder = (
            builder(common_name, ca_cert.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if sans:
            cert_builder = cert_builder.add_extension(
                x509.SubjectAlternativeName(list(sans)), critical=False
            )
        return key, cert_builder.sign(ca_key, hashes.SHA256())

    ca = make_ca("Lampyre hub test CA")
    write("ca", ca[1], None)
    broker_sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
    key, cert = issue(ca, "localhost", ExtendedKeyUsageOID.SERVER_AUTH, broker_sans)
    write("broker", cert, key)
    for identity in (GATEWAY_1, GATEWAY_2, REVOKED_GATEWAY, CONTROL_POST, HUB):
        key, cert = issue(ca, identity, ExtendedKeyUsageOID.CLIENT_AUTH)
        write(identity, cert, key)
    # Another CA's certificate claiming to be gateway cab-0001.
    key, cert = issue(make_ca("Unrelated CA"), GATEWAY_1, ExtendedKeyUsageOID.CLIENT_AUTH)
    write(INTRUDER, cert, key)

    revoked = x509.load_pem_x509_certificate((folder / f"{REVOKED_GATEWAY}.pem").read_bytes())
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca[1].subject)
        .last_update(now - datetime.timedelta(hours=1))
        .next_update(now + datetime.timedelta(days=1))
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(revoked.serial_number)
            .revocation_date(now - datetime.timedelta(minutes=5))
            .build()
        )
        .sign(ca[0], hashes.SHA256())
    )
    (folder / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return HubPki(folder)


# --------------------------------------------------------------------------------------------
# The shipped configuration, on a free loopback port
# --------------------------------------------------------------------------------------------

_PKI_FILES = ("cafile", "certfile", "keyfile", "crlfile")
_TEMPLATED = (*_PKI_FILES, "acl_file", "persistence_location", "log_dest", "listener")


def render_shipped_config(
    text: str, *, port: int, pki_folder: Path, state_folder: Path, log_file: Path
) -> str:
    """The shipped configuration with its paths and port changed, nothing else: the TLS files
    are looked up by name in ``pki_folder``, the ACL is the shipped file itself, persistence
    and the log go to the test's folder, the listener to ``port`` on loopback.

    One line is added in front: ``user`` = whoever runs the tests, because as root Mosquitto
    would otherwise switch to the ``mosquitto`` user, which cannot read the test's folder."""
    rendered: list[str] = [f"user {pwd.getpwuid(os.getuid()).pw_name}"]
    changed: list[str] = []
    for line in text.splitlines():
        directive, _, value = line.partition(" ")
        if directive in _PKI_FILES:
            replacement = f"{directive} {pki_folder / Path(value).name}"
        elif directive == "acl_file":
            replacement = f"acl_file {SHIPPED_ACL}"
        elif directive == "persistence_location":
            replacement = f"persistence_location {state_folder}/"
        elif directive == "log_dest":
            replacement = f"log_dest file {log_file}"
        elif directive == "listener":
            assert value == "8883", f"unexpected listener in the shipped file: {line!r}"
            replacement = f"listener {port} {HOST}"
        else:
            rendered.append(line)
            continue
        changed.append(directive)
        rendered.append(replacement)
    # Each templated line exactly once: in particular a single (TLS) listener.
    assert sorted(changed) == sorted(_TEMPLATED), changed
    return "\n".join(rendered) + "\n"


class ShippedBroker(MosquittoBroker):
    """Mosquitto running packaging/mosquitto/lampyre.conf and its acl, certificates from
    ``pki_folder``."""

    def __init__(self, tmp_dir: Path, pki_folder: Path) -> None:
        super().__init__(tmp_dir)
        self.pki_folder = pki_folder

    def config_text(self) -> str:
        return render_shipped_config(
            SHIPPED_CONF.read_text(encoding="utf-8"),
            port=self.port,
            pki_folder=self.pki_folder,
            state_folder=self.tmp_dir,
            log_file=self.log_path,
        )

    def wait_for_log(self, fragment: str) -> None:
        wait_until(lambda: fragment in self.log_text(), f"{fragment!r} in the broker's log")


# --------------------------------------------------------------------------------------------
# A paho client that reports what the broker answered
# --------------------------------------------------------------------------------------------


class RefusedConnection(Exception):
    """The broker (or the TLS layer) did not let the client in."""


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(POLL_S)


async def wait_until_async(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S} s: {what}")
        await asyncio.sleep(POLL_S)


class Client:
    """An MQTT 5 client over TLS (``context``) or in clear (None) that returns the broker's
    reason codes: ``publish`` the PUBACK's (None for QoS 0), ``subscribe`` the SUBACK's."""

    def __init__(
        self,
        port: int,
        context: ssl.SSLContext | None,
        *,
        client_id: str,
        will: tuple[str, bytes] | None = None,
        username: str | None = None,
    ) -> None:
        self.port = port
        self.client_id = client_id
        self._lock = threading.Lock()
        self._received: list[tuple[str, bytes]] = []
        self._pubacks: dict[int, int] = {}
        self._subacks: dict[int, int] = {}
        self._answered = threading.Event()
        self.connack: int | None = None
        self.disconnect_code: int | None = None
        # No reconnection behind the test's back: a refused or replaced client stays out.
        self._paho = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
            reconnect_on_failure=False,
        )
        if context is not None:
            self._paho.tls_set_context(context)
        if will is not None:
            self._paho.will_set(will[0], will[1], qos=1, retain=True)
        if username is not None:
            self._paho.username_pw_set(username, "")
        self._paho.on_connect = self._on_connect
        self._paho.on_disconnect = self._on_disconnect
        self._paho.on_publish = self._on_publish
        self._paho.on_subscribe = self._on_subscribe
        self._paho.on_message = self._on_message

    # paho callbacks (paho's thread) -------------------------------------------------------
    def _on_connect(self, _c: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self.connack = reason.value
        self._answered.set()

    def _on_disconnect(
        self, _c: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any
    ) -> None:
        self.disconnect_code = reason.value
        self._answered.set()

    def _on_publish(self, _c: paho.Client, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        with self._lock:
            self._pubacks[mid] = reason.value

    def _on_subscribe(
        self, _c: paho.Client, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any
    ) -> None:
        with self._lock:
            self._subacks[mid] = reasons[0].value

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self._received.append((message.topic, bytes(message.payload)))

    # Use ----------------------------------------------------------------------------------
    def connect(self) -> None:
        """Return once the broker accepted the connection; raise :class:`RefusedConnection`
        saying what happened otherwise."""
        try:
            self._paho.connect(HOST, self.port, keepalive=30)
        except OSError as exc:  # ssl.SSLError included: a handshake the peer refused
            raise RefusedConnection(f"{type(exc).__name__}: {exc}") from exc
        self._paho.loop_start()
        if not self._answered.wait(WAIT_S):
            self.close()
            raise AssertionError(f"{self.client_id}: neither CONNACK nor disconnection")
        if self.connack != SUCCESS:
            self.close()
            raise RefusedConnection(
                f"CONNACK {self.connack!r}, disconnection {self.disconnect_code!r}"
            )

    def publish(
        self, topic_name: str, payload: bytes = b"{}", *, qos: int = 1, retain: bool = False
    ) -> int | None:
        info = self._paho.publish(topic_name, payload, qos=qos, retain=retain)
        if qos == 0:
            info.wait_for_publish(WAIT_S)
            return None
        wait_until(lambda: info.mid in self._pubacks, f"PUBACK for {topic_name}")
        with self._lock:
            return self._pubacks[info.mid]

    def subscribe(self, topic_filter: str) -> int:
        _, mid = self._paho.subscribe(topic_filter, qos=1)
        assert mid is not None
        wait_until(lambda: mid in self._subacks, f"SUBACK for {topic_filter}")
        with self._lock:
            return self._subacks[mid]

    def received(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self._received)

    def topics(self) -> set[str]:
        return {name for name, _ in self.received()}

    def wait_for(self, topic_name: str) -> None:
        wait_until(lambda: topic_name in self.topics(), f"{self.client_id} receives {topic_name}")

    def disconnect_with_will(self) -> None:
        """Disconnect asking the broker to publish the will (MQTT 5 reason code 0x04)."""
        self._paho.disconnect(
            reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")
        )
        self._paho.loop_stop()

    def close(self) -> None:
        self._paho.disconnect()
        self._paho.loop_stop()

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def is_success(reason_code: int | None) -> bool:
    return reason_code is not None and reason_code < 0x80


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> HubPki:
    return make_hub_pki(tmp_path_factory.mktemp("hub-pki"))


@pytest.fixture
def broker(tmp_path: Path, pki: HubPki) -> Iterator[ShippedBroker]:
    instance = ShippedBroker(tmp_path / "broker", pki.folder)
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture
def connect(broker: ShippedBroker, pki: HubPki) -> Iterator[Callable[..., Client]]:
    """``connect(identity, client_id=..., will=..., username=...)``: a connected client,
    closed after the test."""
    opened: list[Client] = []

    def factory(
        identity: str,
        client_id: str | None = None,
        will: tuple[str, bytes] | None = None,
        username: str | None = None,
    ) -> Client:
        client = Client(
            broker.port,
            pki.client_context(identity),
            client_id=client_id or f"test-{identity}",
            will=will,
            username=username,
        )
        client.connect()
        opened.append(client)
        return client

    yield factory
    for client in opened:
        client.close()


# --------------------------------------------------------------------------------------------
# Gateways
# --------------------------------------------------------------------------------------------


def test_gateway_publishes_its_own_topics_and_the_hub_reads_them(
    connect: Callable[..., Client],
) -> None:
    hub = connect(HUB)
    assert hub.subscribe(f"{PREFIX}/#") == GRANTED_QOS_1
    gateway = connect(GATEWAY_1, client_id=f"lampyre-{GATEWAY_1}")

    status = gateway.publish(topic(GATEWAY_1, "status"), b'{"state":"online"}', retain=True)
    assert status == SUCCESS
    for kind in ("data", "event", "ack"):
        assert gateway.publish(topic(GATEWAY_1, kind)) == SUCCESS
    for kind in ("status", "data", "event", "ack"):
        hub.wait_for(topic(GATEWAY_1, kind))


def test_gateway_cannot_publish_as_another_gateway_nor_command_nor_receipt(
    connect: Callable[..., Client],
) -> None:
    hub = connect(HUB)
    hub.subscribe(f"{PREFIX}/#")
    # The user name in CONNECT is ignored: the certificate's CN is the identity.
    gateway = connect(GATEWAY_1, username=HUB)

    forbidden = [topic(GATEWAY_2, kind) for kind in ("status", "data", "event", "ack")]
    forbidden += [
        topic(GATEWAY_2, "cmd"),  # commanding another gateway
        topic(GATEWAY_1, "cmd"),  # forging a command to itself
        topic(GATEWAY_1, "receipt"),  # forging the hub's receipt
        f"{PREFIX}/{GATEWAY_1}",
        f"{PREFIX}/{GATEWAY_1}/data/extra",
        "elsewhere/data",
    ]
    for name in forbidden:
        assert gateway.publish(name) == NOT_AUTHORIZED, name
    # QoS 0: no PUBACK to refuse with; the broker drops the message and keeps the client.
    assert gateway.publish(topic(GATEWAY_2, "data"), qos=0) is None

    marker = topic(GATEWAY_1, "data")
    assert gateway.publish(marker) == SUCCESS  # still connected, its own topics still open
    hub.wait_for(marker)
    assert hub.topics() == {marker}


def test_gateway_receives_only_its_own_commands_and_receipts(
    connect: Callable[..., Client],
) -> None:
    post, hub = connect(CONTROL_POST), connect(HUB)
    gateway_1, gateway_2 = connect(GATEWAY_1), connect(GATEWAY_2)
    own = [topic(GATEWAY_1, "cmd"), topic(GATEWAY_1, "receipt")]
    attempts = [
        topic(GATEWAY_2, "cmd"),
        f"{PREFIX}/+/cmd",
        f"{PREFIX}/{GATEWAY_2}/#",
        f"$share/spies/{PREFIX}/{GATEWAY_2}/cmd",
        "#",
    ]
    # Mosquitto 2.0 does not check SUBSCRIBE against an ACL file: every filter is granted,
    # and what the gateway may not read is simply never delivered.
    for topic_filter in own + attempts:
        assert gateway_1.subscribe(topic_filter) == GRANTED_QOS_1, topic_filter
    for topic_filter in (topic(GATEWAY_2, "cmd"), topic(GATEWAY_2, "receipt")):
        gateway_2.subscribe(topic_filter)

    # Another gateway's traffic first, then gateway 1's own messages as markers.
    assert gateway_2.publish(topic(GATEWAY_2, "data")) == SUCCESS
    assert is_success(post.publish(topic(GATEWAY_2, "cmd"), b'{"to":2}'))
    assert is_success(hub.publish(topic(GATEWAY_2, "receipt"), b'{"to":2}'))
    assert is_success(post.publish(topic(GATEWAY_1, "cmd"), b'{"to":1}'))
    assert is_success(hub.publish(topic(GATEWAY_1, "receipt"), b'{"to":1}'))

    for name in own:
        gateway_1.wait_for(name)
    assert gateway_1.topics() == set(own)
    assert {payload for _, payload in gateway_1.received()} == {b'{"to":1}'}
    gateway_2.wait_for(topic(GATEWAY_2, "receipt"))
    assert gateway_2.topics() == {topic(GATEWAY_2, "cmd"), topic(GATEWAY_2, "receipt")}


def test_a_will_on_another_gateways_status_is_never_published(
    broker: ShippedBroker, connect: Callable[..., Client]
) -> None:
    hub = connect(HUB)
    hub.subscribe(f"{PREFIX}/+/status")
    # Accepted at CONNECT (Mosquitto 2.0 checks a will when it publishes it, not before)...
    forger = connect(GATEWAY_2, will=(topic(GATEWAY_1, "status"), b'{"state":"offline"}'))
    forger.disconnect_with_will()
    broker.wait_for_log(f"Client {GATEWAY_2} disconnected")
    # ...while a gateway's will on its own status goes out as usual.
    honest = connect(GATEWAY_2, will=(topic(GATEWAY_2, "status"), b'{"state":"offline"}'))
    honest.disconnect_with_will()
    hub.wait_for(topic(GATEWAY_2, "status"))
    assert hub.topics() == {topic(GATEWAY_2, "status")}


def test_a_gateway_cannot_take_over_another_ones_client_id(
    broker: ShippedBroker, connect: Callable[..., Client]
) -> None:
    """use_username_as_clientid: the broker replaces whatever client id a client asks for with
    its certificate's CN, so reusing another gateway's id does not disconnect it."""
    victim = connect(GATEWAY_1, client_id=f"lampyre-{GATEWAY_1}")
    connect(GATEWAY_2, client_id=f"lampyre-{GATEWAY_1}")
    assert victim.publish(topic(GATEWAY_1, "data")) in (SUCCESS, NO_MATCHING_SUBSCRIBERS)
    assert victim.disconnect_code is None

    # The other side of that rule: one connection per certificate. A second connection with
    # the same certificate replaces the first, whatever client ids they ask for.
    first = connect(HUB, client_id="hub-a")
    connect(HUB, client_id="hub-b")
    # Mosquitto 2.0 closes the old connection without a DISCONNECT packet (no 0x8E reason
    # code reaches the client); its log says why.
    wait_until(lambda: first.disconnect_code is not None, "the first hub connection is closed")
    broker.wait_for_log(f"Client {HUB} already connected, closing old connection.")
    assert f"Client {GATEWAY_1} already connected" not in broker.log_text()


# --------------------------------------------------------------------------------------------
# The control post and the hub consumer
# --------------------------------------------------------------------------------------------


def test_control_post_commands_every_gateway_and_reads_only_acks_and_statuses(
    connect: Callable[..., Client],
) -> None:
    post = connect(CONTROL_POST)
    assert post.subscribe(f"{PREFIX}/#") == GRANTED_QOS_1
    gateway_1, gateway_2 = connect(GATEWAY_1), connect(GATEWAY_2)
    gateway_1.subscribe(topic(GATEWAY_1, "cmd"))
    gateway_2.subscribe(topic(GATEWAY_2, "cmd"))

    assert post.publish(topic(GATEWAY_1, "cmd"), b'{"id":"c1"}') == SUCCESS
    assert post.publish(topic(GATEWAY_2, "cmd"), b'{"id":"c2"}') == SUCCESS
    gateway_1.wait_for(topic(GATEWAY_1, "cmd"))
    gateway_2.wait_for(topic(GATEWAY_2, "cmd"))

    for kind in ("status", "data", "event", "ack", "receipt"):
        assert post.publish(topic(GATEWAY_1, kind)) == NOT_AUTHORIZED, kind
    # Patterns apply to every user; the post's own deny line keeps "control-post" from
    # passing for a gateway.
    for kind in ("status", "data"):
        assert post.publish(topic(CONTROL_POST, kind)) == NOT_AUTHORIZED, kind

    gateway_1.publish(topic(GATEWAY_1, "status"), b'{"state":"online"}', retain=True)
    gateway_1.publish(topic(GATEWAY_1, "data"))
    gateway_1.publish(topic(GATEWAY_1, "event"))
    gateway_1.publish(topic(GATEWAY_1, "ack"), b'{"id":"c1","status":"ok"}')
    post.wait_for(topic(GATEWAY_1, "ack"))
    # Its own commands are not echoed either: the post may write cmd, not read it.
    assert post.topics() == {topic(GATEWAY_1, "status"), topic(GATEWAY_1, "ack")}


def test_hub_reads_through_a_shared_subscription_and_publishes_only_receipts(
    connect: Callable[..., Client],
) -> None:
    hub = connect(HUB)
    group = secrets.token_hex(16)
    assert hub.subscribe(f"$share/{group}/{PREFIX}/+/data") == GRANTED_QOS_1
    assert hub.subscribe(f"{PREFIX}/+/event") == GRANTED_QOS_1
    gateway_1, gateway_2 = connect(GATEWAY_1), connect(GATEWAY_2)

    assert gateway_1.publish(topic(GATEWAY_1, "data"), b"1") == SUCCESS
    assert gateway_2.publish(topic(GATEWAY_2, "data"), b"2") == SUCCESS
    gateway_2.publish(topic(GATEWAY_2, "event"))
    hub.wait_for(topic(GATEWAY_2, "event"))
    assert sorted(hub.received()) == [
        (topic(GATEWAY_1, "data"), b"1"),
        (topic(GATEWAY_2, "data"), b"2"),
        (topic(GATEWAY_2, "event"), b"{}"),
    ]

    assert is_success(hub.publish(topic(GATEWAY_1, "receipt")))
    for name in (topic(GATEWAY_1, "cmd"), topic(GATEWAY_1, "data"), topic(HUB, "data")):
        assert hub.publish(name) == NOT_AUTHORIZED, name


def test_a_gateway_in_the_hubs_share_group_swallows_messages(
    connect: Callable[..., Client],
) -> None:
    """Why the hub's share group must be a secret: the broker hands each message to one member
    of the group, checks "read" for that member only, and drops the message when it may not
    read it. A gateway that joins a guessable group makes the hub miss its turns."""
    hub = connect(HUB)
    hub.subscribe(f"$share/hubs/{PREFIX}/+/data")
    hub.subscribe(f"{PREFIX}/+/event")
    thief = connect(GATEWAY_2)
    assert thief.subscribe(f"$share/hubs/{PREFIX}/+/data") == GRANTED_QOS_1
    gateway = connect(GATEWAY_1)

    sent = 6
    for _ in range(sent):
        assert gateway.publish(topic(GATEWAY_1, "data")) == SUCCESS  # the gateway deletes it
    gateway.publish(topic(GATEWAY_1, "event"))
    hub.wait_for(topic(GATEWAY_1, "event"))
    delivered = [name for name, _ in hub.received() if name.endswith("/data")]
    assert 0 < len(delivered) < sent
    assert thief.received() == []


# --------------------------------------------------------------------------------------------
# Who gets in
# --------------------------------------------------------------------------------------------


def _tls_1_1_context(pki: HubPki) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.ca_file)
    context.load_cert_chain(pki.cert(GATEWAY_1), pki.key(GATEWAY_1))
    with warnings.catch_warnings():
        # Python deprecates TLSVersion.TLSv1_1; offering it is the point of this client.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    # OpenSSL 3 only offers TLS 1.1 at security level 0.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


REFUSALS: dict[str, tuple[Callable[[HubPki], ssl.SSLContext | None], str]] = {
    # case: (the client's TLS context, what the broker logs about it)
    "no certificate": (lambda pki: pki.client_context(None), "peer did not return a certificate"),
    "another CA": (lambda pki: pki.client_context(INTRUDER), "certificate verify failed"),
    "revoked": (lambda pki: pki.client_context(REVOKED_GATEWAY), "certificate verify failed"),
    "TLS 1.1": (_tls_1_1_context, "unsupported protocol"),
    "plain MQTT": (lambda pki: None, "wrong version number"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_clients_the_broker_refuses(broker: ShippedBroker, pki: HubPki, case: str) -> None:
    make_context, logged = REFUSALS[case]
    client = Client(broker.port, make_context(pki), client_id=f"refused-{case}")
    with pytest.raises(RefusedConnection):
        client.connect()
    client.close()
    # The broker's own account: refused for this reason, not by accident.
    broker.wait_for_log(logged)
    assert "New client connected" not in broker.log_text()


def test_tls_1_2_and_1_3_are_accepted(broker: ShippedBroker, pki: HubPki) -> None:
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        context = pki.client_context(GATEWAY_1)
        context.minimum_version = context.maximum_version = version
        with Client(broker.port, context, client_id=f"tls-{version.name}") as client:
            assert client.publish(topic(GATEWAY_1, "data")) == NO_MATCHING_SUBSCRIBERS


# --------------------------------------------------------------------------------------------
# The agent's own uplink through the shipped ACL
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredRecord:
    seq: int
    topic: str
    payload: bytes


class MemoryRecords:
    """The uplink's storage seam, in memory."""

    def __init__(self, records: Sequence[StoredRecord]) -> None:
        self.records = {record.seq: record for record in records}

    async def pending(self, limit: int, exclude: Collection[int] = ()) -> list[StoredRecord]:
        return [r for s, r in sorted(self.records.items()) if s not in exclude][:limit]

    async def ack(self, seqs: list[int]) -> int:
        return len([s for s in seqs if self.records.pop(s, None) is not None])


def test_the_agents_uplink_fits_the_acl(
    broker: ShippedBroker, pki: HubPki, connect: Callable[..., Client]
) -> None:
    hub = connect(HUB)
    hub.subscribe(f"{PREFIX}/#")
    post = connect(CONTROL_POST)
    records = MemoryRecords(
        [
            StoredRecord(1, "event", b'{"seq":1}'),
            StoredRecord(2, "data", b'{"seq":2}'),
            StoredRecord(3, "ack", b'{"seq":3}'),
        ]
    )
    commands: list[bytes] = []

    async def on_command(payload: bytes) -> None:
        commands.append(payload)

    settings = MqttSettings(
        host="localhost",
        port=broker.port,
        client_id=f"lampyre-{GATEWAY_1}",
        tls=TlsSettings(pki.ca_file, pki.cert(GATEWAY_1), pki.key(GATEWAY_1)),
    )

    async def body() -> None:
        uplink = Uplink(
            settings, prefix=PREFIX, gateway_id=GATEWAY_1, buffer=records, on_command=on_command
        )
        task = asyncio.create_task(uplink.run())
        try:
            await wait_until_async(lambda: not records.records, "every record acknowledged")
            await wait_until_async(
                lambda: "online" in _last_status(hub, GATEWAY_1), "the online status"
            )
            # It subscribes to cmd once its online status is acknowledged, and nothing shows
            # when that is done: command until one arrives (a command sent before is lost,
            # as commands are not retained).
            attempts = 0
            while not commands:
                assert attempts < WAIT_S / COMMAND_RETRY_S, "no command reached the uplink"
                assert post.publish(topic(GATEWAY_1, "cmd"), b'{"id":"c1"}') == SUCCESS
                attempts += 1
                await asyncio.sleep(COMMAND_RETRY_S)
            assert commands[0] == b'{"id":"c1"}'
            assert uplink.stats.rejected == 0
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(body())
    hub.wait_for(topic(GATEWAY_1, "ack"))
    assert {topic(GATEWAY_1, kind) for kind in ("status", "data", "event", "ack")} <= hub.topics()
    wait_until(lambda: "shutdown" in _last_status(hub, GATEWAY_1), "the shutdown status")


def test_a_certificate_for_another_gateway_id_is_refused_loudly(
    broker: ShippedBroker, pki: HubPki, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway configured as cab-0001 holding cab-0002's certificate: the broker refuses its
    status and its records, and the uplink says so (docs/uplink.md)."""
    records = MemoryRecords([StoredRecord(1, "data", b'{"seq":1}')])
    settings = MqttSettings(
        host=HOST,
        port=broker.port,
        client_id=f"lampyre-{GATEWAY_1}",
        tls=TlsSettings(pki.ca_file, pki.cert(GATEWAY_2), pki.key(GATEWAY_2)),
    )

    async def body() -> None:
        uplink = Uplink(
            settings, prefix=PREFIX, gateway_id=GATEWAY_1, buffer=records, on_command=_ignore
        )
        task = asyncio.create_task(uplink.run())
        try:
            await wait_until_async(lambda: uplink.stats.rejected > 0, "the record refused")
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(body())
    assert list(records.records) == [1]  # still in the buffer
    assert (
        "the hub refused the online status: PUBLISH rejected by the broker: 0x87 Not authorized"
        in caplog.messages
    )


async def _ignore(payload: bytes) -> None:
    return None


def _last_status(hub: Client, gateway: str) -> str:
    statuses = [p for name, p in hub.received() if name == topic(gateway, "status")]
    return statuses[-1].decode() if statuses else ""


# --------------------------------------------------------------------------------------------
# make-pki.sh: certificates the shipped configuration accepts, and revocation
# --------------------------------------------------------------------------------------------


def test_make_pki_script_issues_and_revokes(tmp_path: Path) -> None:
    folder = tmp_path / "pki"

    def make_pki(*args: str) -> None:
        subprocess.run(["bash", str(MAKE_PKI), str(folder), *args], check=True, capture_output=True)

    make_pki("init")
    make_pki("broker", "localhost", HOST)
    for identity in (GATEWAY_1, GATEWAY_2, HUB):
        make_pki("client", identity)
    for secret in ("ca.key", "broker.key", f"{GATEWAY_1}.key"):
        assert (folder / secret).stat().st_mode & 0o777 == 0o600
    refused = subprocess.run(
        ["bash", str(MAKE_PKI), str(folder), "client", f"{PREFIX}/#"],
        check=False,
        capture_output=True,
    )
    assert refused.returncode == 2 and b"not a valid name" in refused.stderr

    made = HubPki(folder)
    broker = ShippedBroker(tmp_path / "broker", folder)
    with broker:
        with Client(broker.port, made.client_context(HUB), client_id="hub") as hub:
            hub.subscribe(f"{PREFIX}/#")
            with Client(broker.port, made.client_context(GATEWAY_1), client_id="g1") as gateway:
                assert gateway.publish(topic(GATEWAY_1, "data")) == SUCCESS
                assert gateway.publish(topic(GATEWAY_2, "data")) == NOT_AUTHORIZED
            hub.wait_for(topic(GATEWAY_1, "data"))

        # A stolen gateway: revoke it, and have the broker reread the CRL (SIGHUP, which is
        # what `systemctl reload mosquitto` sends).
        make_pki("revoke", GATEWAY_1)
        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGHUP)
        broker.wait_for_log("Reloading config.")
        with pytest.raises(RefusedConnection):
            Client(broker.port, made.client_context(GATEWAY_1), client_id="g1-again").connect()
        broker.wait_for_log("certificate verify failed")
        with Client(broker.port, made.client_context(GATEWAY_2), client_id="g2") as other:
            assert is_success(other.publish(topic(GATEWAY_2, "data")))
