"""A real Mosquitto broker for tests, on a free loopback port, plus a small collecting subscriber.

Tests talk to the broker the agent will meet in the field instead of a fake: the behaviour under
test (retained status, last will, PUBACK reason codes, TLS refusals) is the broker's.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import ipaddress
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
SUBSCRIBE_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.02

_FALLBACK_BINARY = "/usr/sbin/mosquitto"


def mosquitto_binary() -> str:
    """The mosquitto executable. A missing broker is a broken test setup, never a reason to skip."""
    found = shutil.which("mosquitto") or (
        _FALLBACK_BINARY if os.access(_FALLBACK_BINARY, os.X_OK) else None
    )
    if found is None:
        raise RuntimeError(
            "mosquitto (>= 2.0) was not found on PATH nor in /usr/sbin: the MQTT tests need a real "
            "broker. Run the README's test command (packaging/dev.sh test), which installs it "
            "(e.g. `apt-get install mosquitto`), then run the test command again."
        )
    return found


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def mosquitto_password_line(username: str, password: str) -> str:
    """One line of a Mosquitto 2.0 password file (PBKDF2-SHA512, the ``$7$`` format), so tests
    need not shell out to mosquitto_passwd."""
    iterations = 101
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return (
        f"{username}:$7${iterations}${base64.b64encode(salt).decode()}"
        f"${base64.b64encode(digest).decode()}\n"
    )


@dataclass(frozen=True)
class BrokerTls:
    """TLS material for the broker's listener (PEM files)."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_certificate: bool = True


class MosquittoBroker:
    """A private Mosquitto process: ``start()``, ``stop()``, ``kill()``, ``start()`` again on
    the same port. Everything it writes stays in ``tmp_dir``."""

    def __init__(
        self,
        tmp_dir: Path,
        port: int | None = None,
        tls: BrokerTls | None = None,
        extra_conf: str = "",
        *,
        persistence: bool = False,
        verbose_log: bool = True,
    ) -> None:
        self.tmp_dir = Path(tmp_dir)
        self.persistence = persistence
        self.verbose_log = verbose_log
        self.host = HOST
        self.port = port if port is not None else free_port()
        self.tls = tls
        self.extra_conf = extra_conf
        self.conf_path = self.tmp_dir / "mosquitto.conf"
        self.log_path = self.tmp_dir / "mosquitto.log"
        self._stdout_path = self.tmp_dir / "mosquitto.stdout"
        self._process: subprocess.Popen[bytes] | None = None

    # Configuration --------------------------------------------------------------------
    def config_text(self) -> str:
        lines = [
            # Run as whoever runs the tests: as root, Mosquitto would otherwise switch to the
            # "mosquitto" user, which cannot write its log into the test's temporary folder.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "per_listener_settings false",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.tmp_dir}/",
            f"log_dest file {self.log_path}",
            # "all" logs every PUBLISH: precious when a test fails, too slow for benchmarks.
            "log_type all" if self.verbose_log else "log_type error\nlog_type warning",
            "log_timestamp true",
            "connection_messages true",
            f"listener {self.port} {self.host}",
        ]
        # Anonymous clients are fine on loopback in tests; a password_file in extra_conf still
        # makes Mosquitto check the credentials that are given.
        if "allow_anonymous" not in self.extra_conf:
            lines.append("allow_anonymous true")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca_file}",
                f"certfile {self.tls.cert_file}",
                f"keyfile {self.tls.key_file}",
                f"require_certificate {'true' if self.tls.require_certificate else 'false'}",
            ]
        if self.extra_conf:
            lines.append(self.extra_conf)
        return "\n".join(lines) + "\n"

    # Lifecycle ------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the broker and return once its port accepts connections (bounded)."""
        if self.running:
            return
        binary = mosquitto_binary()
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self.config_text())
        with self._stdout_path.open("ab") as out:
            self._process = subprocess.Popen(
                [binary, "-c", str(self.conf_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with code {self._process.returncode} at start-up:\n"
                    f"{self._startup_output()}"
                )
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
            except OSError:
                pass
            else:
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"mosquitto did not accept connections on {self.host}:{self.port} within "
                    f"{START_TIMEOUT_S} s:\n{self._startup_output()}"
                )
            time.sleep(POLL_INTERVAL_S)

    def stop(self) -> None:
        """Terminate the broker (SIGTERM: it closes connections cleanly and, with persistence,
        saves its sessions and queued messages) and wait for it."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)  # a paused broker cannot act on SIGTERM
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without a word, as on a crash."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT_S)

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered (a hung broker)."""
        if self.running:
            assert self._process is not None
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.running:
            assert self._process is not None
            self._process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Stop, then start again on the same port (retained messages are lost: no persistence)."""
        self.stop()
        self.start()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _startup_output(self) -> str:
        try:
            out = self._stdout_path.read_text(errors="replace")
        except FileNotFoundError:
            out = ""
        return out + self.log_text()

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# A collecting subscriber (test code: paho's own thread is fine here).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int


class Subscriber:
    """A paho client that subscribes to ``topic_filter`` and keeps every message it receives.

    ``with Subscriber(broker, "lampyre/#") as sub: ... sub.wait_for(lambda msgs: ..., 5.0)``;
    in async tests use ``await sub.wait_for_async(...)``, which does not block the loop.
    """

    def __init__(
        self,
        broker: MosquittoBroker | tuple[str, int],
        topic_filter: str | Sequence[str],
        *,
        qos: int = 1,
        client_id: str = "",
        tls_context: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
        persistent: bool = False,
    ) -> None:
        """``persistent=True`` keeps a broker session (clean start off, one hour expiry) so
        messages published while the subscriber is away are queued for it; it needs a
        ``client_id``. paho reconnects by itself after a broker restart."""
        if persistent and not client_id:
            raise ValueError("a persistent subscriber needs a client_id")
        self.persistent = persistent
        if isinstance(broker, MosquittoBroker):
            self.host, self.port = broker.host, broker.port
        else:
            self.host, self.port = broker
        self.filters = [topic_filter] if isinstance(topic_filter, str) else list(topic_filter)
        self.qos = qos
        self._lock = threading.Lock()
        self._messages: list[Received] = []
        self._subscribed = threading.Event()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        if tls_context is not None:
            self._client.tls_set_context(tls_context)
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    # paho callbacks (paho's thread) ------------------------------------------------------
    def _on_connect(
        self, client: paho.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        if not reason.is_failure:
            client.subscribe([(f, self.qos) for f in self.filters])

    def _on_subscribe(
        self, _client: paho.Client, _userdata: Any, _mid: int, reasons: list[ReasonCode], _p: Any
    ) -> None:
        if not any(r.is_failure for r in reasons):
            self._subscribed.set()

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self._messages.append(Received(msg.topic, bytes(msg.payload), msg.retain, msg.qos))

    # Use ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect and return once the subscription is acknowledged (bounded)."""
        properties = None
        if self.persistent:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 3600
        self._client.reconnect_delay_set(1, 2)
        self._client.connect(
            self.host,
            self.port,
            keepalive=10,
            clean_start=not self.persistent,
            properties=properties,
        )
        self._client.loop_start()
        if not self._subscribed.wait(SUBSCRIBE_TIMEOUT_S):
            self.stop()
            raise AssertionError(
                f"subscriber to {self.filters} not subscribed within {SUBSCRIBE_TIMEOUT_S} s"
            )

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish from this client (as a control post would); returns once the broker has it."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(SUBSCRIBE_TIMEOUT_S)

    @property
    def messages(self) -> list[Received]:
        with self._lock:
            return list(self._messages)

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()

    def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout_s: float
    ) -> list[Received]:
        """Wait until ``predicate(messages)`` holds; return the messages, or fail showing them."""
        deadline = time.monotonic() + timeout_s
        while True:
            messages = self.messages
            if predicate(messages):
                return messages
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"condition not met within {timeout_s} s; received {len(messages)}: "
                    f"{_summary(messages)}"
                )
            time.sleep(POLL_INTERVAL_S)

    async def wait_for_async(
        self, predicate: Callable[[list[Received]], bool], timeout_s: float
    ) -> list[Received]:
        """Like :meth:`wait_for`, without blocking the event loop."""
        deadline = time.monotonic() + timeout_s
        while True:
            messages = self.messages
            if predicate(messages):
                return messages
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"condition not met within {timeout_s} s; received {len(messages)}: "
                    f"{_summary(messages)}"
                )
            await asyncio.sleep(POLL_INTERVAL_S)

    def __enter__(self) -> Subscriber:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _summary(messages: list[Received], limit: int = 10) -> str:
    shown = [f"{m.topic} retain={m.retain} {m.payload[:80]!r}" for m in messages[-limit:]]
    return "; ".join(shown) if shown else "nothing"


# --------------------------------------------------------------------------------------------
# Test certificates (generated per test with `cryptography`; nothing is checked in).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A CA with a server and a client certificate, and an unrelated CA with its own client
    certificate (for "wrong CA" cases). Private keys are written with mode 0600."""

    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_file: Path
    other_client_cert: Path
    other_client_key: Path

    def broker_tls(self, require_certificate: bool = True) -> BrokerTls:
        return BrokerTls(self.ca_file, self.server_cert, self.server_key, require_certificate)


def make_pki(
    tmp_dir: Path,
    server_dns: Sequence[str] = ("localhost",),
    server_ips: Sequence[str] = ("127.0.0.1",),
) -> Pki:
    """Generate a small PKI in ``tmp_dir`` (EC P-256, valid from an hour ago for a day)."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        data = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return path

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(common_name))
            .issuer_name(name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
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

    def make_leaf(
        ca_key: ec.EllipticCurvePrivateKey,
        ca_cert: x509.Certificate,
        common_name: str,
        usage: x509.ObjectIdentifier,
        sans: list[x509.GeneralName],
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common_name))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    ca_key, ca_cert = make_ca("Lampyre test CA")
    other_key, other_cert = make_ca("Unrelated test CA")
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in server_dns]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]
    server_key, server_cert = make_leaf(
        ca_key, ca_cert, "lampyre-test-broker", ExtendedKeyUsageOID.SERVER_AUTH, sans
    )
    client_key, client_cert = make_leaf(
        ca_key, ca_cert, "cab-test", ExtendedKeyUsageOID.CLIENT_AUTH, []
    )
    o_client_key, o_client_cert = make_leaf(
        other_key, other_cert, "cab-intruder", ExtendedKeyUsageOID.CLIENT_AUTH, []
    )
    return Pki(
        ca_file=write_cert(ca_cert, tmp_dir / "ca.pem"),
        server_cert=write_cert(server_cert, tmp_dir / "server.pem"),
        server_key=write_key(server_key, tmp_dir / "server.key"),
        client_cert=write_cert(client_cert, tmp_dir / "client.pem"),
        client_key=write_key(client_key, tmp_dir / "client.key"),
        other_ca_file=write_cert(other_cert, tmp_dir / "other-ca.pem"),
        other_client_cert=write_cert(o_client_cert, tmp_dir / "other-client.pem"),
        other_client_key=write_key(o_client_key, tmp_dir / "other-client.key"),
    )


_DYNSEC_PLUGIN_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)


def subscribe_acl_conf(tmp_dir: Path, subscribe_allowed: Sequence[str]) -> str:
    """``extra_conf`` for a broker that refuses SUBSCRIBE (SUBACK 0x87) outside
    ``subscribe_allowed`` patterns for anonymous clients.

    Mosquitto 2.0's ``acl_file`` grants every SUBSCRIBE and only filters deliveries, so this
    uses the dynamic-security plugin shipped with Mosquitto, which checks subscriptions.
    """
    plugin = next((p for p in _DYNSEC_PLUGIN_CANDIDATES if os.path.exists(p)), None)
    if plugin is None:
        raise RuntimeError(
            "mosquitto_dynamic_security.so (shipped with Mosquitto >= 2.0) was not found; "
            "run the README's test command (packaging/dev.sh test), which installs Mosquitto"
        )
    config = {
        "defaultACLAccess": {
            "publishClientSend": True,
            "publishClientReceive": True,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": [],
        "groups": [{"groupname": "anonymous", "roles": [{"rolename": "sub"}], "clients": []}],
        "roles": [
            {
                "rolename": "sub",
                "acls": [
                    {"acltype": "subscribePattern", "topic": t, "priority": 0, "allow": True}
                    for t in subscribe_allowed
                ],
            }
        ],
        "anonymousGroup": "anonymous",
    }
    tmp_dir.mkdir(parents=True, exist_ok=True)
    path = tmp_dir / "dynamic-security.json"
    path.write_text(json.dumps(config))
    return f"plugin {plugin}\nplugin_opt_config_file {path}"
