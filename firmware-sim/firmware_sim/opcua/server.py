"""An OPC UA street-lighting cabinet controller (asyncua server) behind a fault-injecting relay.

Clients connect to a small TCP relay on the public port; the relay forwards to the asyncua server
on an ephemeral loopback port. The relay is what makes the recovery faults reliable: ``freeze()``
stops forwarding without closing anything (a hung PLC or a network black hole), and
``drop_connections()`` cuts every TCP connection. ``restart()`` rebuilds the OPC UA server (all
sessions and subscriptions are lost, as on a real controller reboot) on the same public port
with the same certificate; the process image (levels, energy counters) survives.
``drop_subscriptions()`` deletes the subscriptions alone, sessions and connections staying up.

User identities (anonymous, user name and password, user certificate) are checked by a user
manager plugged into asyncua; ``bench_points`` adds a folder of variables that all change every
second, for throughput benches.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import ipaddress
import logging
import os
import random
import socket
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncua import ua
from asyncua.common.node import Node
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.internal_server import InternalServer
from asyncua.server.server import Server
from asyncua.server.user_managers import UserManager
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "APPLICATION_URI",
    "CIRCUITS",
    "ENDPOINT_PATH",
    "NAMESPACE_URI",
    "PHASES",
    "CabinetSimulator",
    "CabinetState",
    "CircuitState",
    "bench_point_path",
    "certificate_fingerprint",
    "certificate_subject",
    "make_self_signed",
    "node_id",
]

_LOGGER = logging.getLogger(__name__)

NAMESPACE_URI = "urn:lampyre:sim:cabinet"
APPLICATION_URI = "urn:lampyre:sim:cabinet:server"
ENDPOINT_PATH = "/lampyre/cabinet"
CIRCUITS = (1, 2)
PHASES = ("L1", "L2", "L3")
CERT_FILE = "server-cert.der"
KEY_FILE = "server-key.pem"

UPDATE_INTERVAL_S = 1.0
"""How often the electrical values, the schedule flag and the bench points change."""
BENCH_FOLDER = "Bench"
MAX_BENCH_POINTS = 10_000
"""The bench point names have four digits (``P0000``…``P9999``)."""
RELAY_CHUNK_BYTES = 65536
CERT_VALIDITY_DAYS = 3650
RSA_KEY_BITS = 2048
NOMINAL_VOLTAGE_V = 230.0
CIRCUIT_RATED_POWER_W = 1800.0
"""Full-level load of one lighting circuit, spread evenly over the three phases."""


def node_id(path: str) -> str:
    """The string node id of a cabinet node, ``"Circuit1.DimLevel"`` → ``ns=2;s=Cabinet.…``.

    The namespace index is 2 because the cabinet namespace is the first one registered after the
    server's own; profiles should still prefer the namespace URI."""
    suffix = f".{path}" if path else ""
    return f"ns=2;s=Cabinet{suffix}"


def bench_point_path(index: int) -> str:
    """The path of bench point ``index`` (``3`` → ``"Bench.P0003"``), for :func:`node_id` and
    :meth:`CabinetSimulator.value`."""
    return f"{BENCH_FOLDER}.P{index:04d}"


def make_self_signed(
    application_uri: str, common_name: str, *, hostname: str | None = None
) -> tuple[bytes, bytes]:
    """A self-signed OPC UA application certificate (DER) and its unencrypted key (PEM).

    CPU-heavy (RSA key generation): call it through ``asyncio.to_thread`` from async code."""
    hostname = hostname or socket.gethostname()
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Lampyre"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_VALIDITY_DAYS))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(application_uri),
                    *(x509.DNSName(name) for name in dict.fromkeys(("localhost", hostname))),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.DER), key_pem


def certificate_fingerprint(cert_der: bytes) -> str:
    """SHA-256 of the DER certificate as colon-separated upper-case hex (what UA tools show)."""
    digest = hashlib.sha256(cert_der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _load_or_create_identity(cert_dir: Path) -> tuple[bytes, bytes]:
    cert_path, key_path = cert_dir / CERT_FILE, cert_dir / KEY_FILE
    if cert_path.exists() and key_path.exists():
        return cert_path.read_bytes(), key_path.read_bytes()
    cert_dir.mkdir(parents=True, exist_ok=True)
    cert_der, key_pem = make_self_signed(APPLICATION_URI, "Lampyre cabinet simulator")
    # The key is created 0600 from the start, never world-readable even for an instant.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as key_file:
        key_file.write(key_pem)
    cert_path.write_bytes(cert_der)
    return cert_der, key_pem


def _load_trusted(trust_dir: Path) -> set[bytes]:
    """DER bytes of every certificate (``.der``/``.pem``/``.crt``) in the client trust folder."""
    trusted: set[bytes] = set()
    for path in sorted(trust_dir.iterdir()):
        data = path.read_bytes()
        if path.suffix in (".pem", ".crt") and b"-----BEGIN" in data:
            for cert in x509.load_pem_x509_certificates(data):
                trusted.add(cert.public_bytes(serialization.Encoding.DER))
        elif path.suffix == ".der":
            trusted.add(data)
    return trusted


@dataclass
class CircuitState:
    command: bool = True
    contactor: bool = True
    dim_level: int = 100
    actual_level: int = 100


@dataclass
class CabinetState:
    """The controller's process image: what the OPC UA nodes show, and the tests' ground truth."""

    circuits: dict[int, CircuitState] = field(
        default_factory=lambda: {number: CircuitState() for number in CIRCUITS}
    )
    voltage_v: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 230.0))
    current_a: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    power_w: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    energy_kwh: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    door_open: bool = False
    ambient_light_lux: float = 5.0
    sunrise: dt.datetime = field(
        default_factory=lambda: dt.datetime.combine(dt.date.today(), dt.time(6, 30), dt.UTC)
    )
    sunset: dt.datetime = field(
        default_factory=lambda: dt.datetime.combine(dt.date.today(), dt.time(18, 30), dt.UTC)
    )
    lights_on_by_schedule: bool = False


def certificate_subject(cert_der: bytes) -> str:
    """The subject of a DER certificate as an RFC 4514 string (``CN=…,O=…``)."""
    return x509.load_der_x509_certificate(cert_der).subject.rfc4514_string()


class _IdentityServer(InternalServer):
    """asyncua's internal server, remembering the certificate of a verified X509 identity token.

    asyncua hands the user manager ``certificate=`` for every token type: the token's certificate
    for an X509 token, but the secure channel's (application) certificate for anonymous and user
    name tokens, so the user manager alone cannot tell "anonymous" from "user certificate".
    ``InternalSession.activate_session`` is synchronous and calls ``verify_x509_token`` right
    before ``user_manager.get_user``, so a note taken here cannot be mixed up between sessions.
    """

    x509_token_certificate: bytes | None = None

    def verify_x509_token(
        self, isession: Any, token: ua.X509IdentityToken, signature: ua.SignatureData
    ) -> bytes:
        certificate: bytes = super().verify_x509_token(isession, token, signature)
        self.x509_token_certificate = certificate
        return certificate


class _CabinetUsers(UserManager):
    """Who may open a session. ``users``/``user_certificates`` of ``None`` mean "any" (asyncua's
    permissive default); the identity token types offered are set separately on the server, and
    asyncua refuses the others before asking here."""

    def __init__(
        self,
        users: Mapping[str, str] | None,
        user_certificates: Sequence[bytes] | None,
        logins: list[str],
        rejected: list[str],
    ) -> None:
        self.users = dict(users) if users is not None else None
        self.user_certificates = (
            frozenset(user_certificates) if user_certificates is not None else None
        )
        self.logins = logins
        self.rejected = rejected

    def get_user(
        self,
        iserver: InternalServer,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        token_certificate: bytes | None = None
        if isinstance(iserver, _IdentityServer):
            token_certificate, iserver.x509_token_certificate = iserver.x509_token_certificate, None
        if token_certificate is not None:
            login = f"cert:{certificate_subject(token_certificate)}"
            accepted = (
                self.user_certificates is None and self.users is None
            ) or token_certificate in (self.user_certificates or ())
        elif username is not None:
            login = f"user:{username}"
            if self.users is None:
                accepted = self.user_certificates is None
            else:
                expected = self.users.get(username)
                accepted = expected is not None and hmac.compare_digest(
                    expected.encode(), (password or "").encode()
                )
        else:
            login, accepted = "anonymous", True
        if not accepted:
            self.rejected.append(login)
            _LOGGER.warning("refused login %s", login)
            return None
        self.logins.append(login)
        # Role User: read, write, browse, subscribe, call (asyncua's SimpleRoleRuleset).
        return User(role=UserRole.User, name=login)


def _type_id(object_id: int) -> ua.NodeId:
    return ua.NodeId(ua.Int32(object_id))


def _value_of(data: ua.DataValue) -> Any:
    return None if data.Value is None else data.Value.Value


class _Relay:
    """Loopback TCP relay: forwards byte-for-byte, can hold all traffic or cut connections."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._serve, host, port)
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self.drop()
            await self._server.wait_closed()
            self._server = None

    def drop(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        pumps = {
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        }
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for end in (writer, up_writer):
                self._writers.discard(end)
                end.transport.abort()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(RELAY_CHUNK_BYTES):
                # While frozen the chunk is held here and TCP back-pressure does the rest:
                # the peer sees an open, silent connection.
                await self.flowing.wait()
                sink.write(data)
                await sink.drain()


class CabinetSimulator:
    """A cabinet controller served over OPC UA on ``opc.tcp://HOST:PORT/lampyre/cabinet``.

    ``cert_dir`` holds the server certificate and key (created on first start). ``trust_dir``,
    when given, is the client trust list: only client certificates found there (DER or PEM) may
    open a secure session; when ``None`` any client certificate is accepted. The ``None``
    security policy is offered only with ``allow_none=True``.

    User identities: ``users`` (name → password) offers the UserName token and accepts only those
    pairs; ``user_certificates`` (DER) offers the X509 token and accepts only those certificates;
    anonymous sessions are accepted unless ``allow_anonymous=False``. With neither ``users`` nor
    ``user_certificates``, any user name and password and any user certificate are accepted
    (asyncua's default). ``bench_points`` adds ``Cabinet.Bench.P0000``… Double variables that
    all change every :data:`UPDATE_INTERVAL_S`."""

    def __init__(
        self,
        cert_dir: Path,
        *,
        trust_dir: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        allow_none: bool = False,
        seed: int = 0,
        users: Mapping[str, str] | None = None,
        user_certificates: Sequence[bytes] | None = None,
        allow_anonymous: bool = True,
        bench_points: int = 0,
    ) -> None:
        if not 0 <= bench_points <= MAX_BENCH_POINTS:
            raise ValueError(f"bench_points: expected 0 to {MAX_BENCH_POINTS}, got {bench_points}")
        self.cert_dir = cert_dir
        self.trust_dir = trust_dir
        self.host = host
        self.port = port
        self.allow_none = allow_none
        self.users = dict(users) if users is not None else None
        self.user_certificates = list(user_certificates) if user_certificates is not None else None
        self.allow_anonymous = allow_anonymous
        self.bench_points = bench_points
        self.state = CabinetState()
        self.writes: Counter[str] = Counter()
        """Client writes accepted per node path (``"Circuit1.DimLevel"``)."""
        self.method_calls: list[tuple[str, tuple[Any, ...]]] = []
        self.rejected_certificates = 0
        self.logins: list[str] = []
        """Successful session activations, in order: ``"anonymous"``, ``"user:NAME"``,
        ``"cert:SUBJECT"`` (RFC 4514 subject of the user certificate)."""
        self.rejected_logins: list[str] = []
        """Refused identities (wrong password, unknown user or certificate), same format."""
        self.dropped_subscriptions = 0
        """Subscriptions deleted by :meth:`drop_subscriptions` so far."""
        self.bench_tick = 0
        """Bench point ``i`` holds ``bench_tick + i``; incremented at every tick."""
        self.overrun_ticks = 0
        """Periodic ticks that took longer than :data:`UPDATE_INTERVAL_S` (the server could not
        keep up, e.g. with too many bench points on a slow machine)."""
        self._random = random.Random(seed)  # noqa: S311 - noise, not crypto
        self._server: Server | None = None
        self._relay: _Relay | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._nodes: dict[str, Node] = {}
        self._cert_der = b""
        self._key_pem = b""
        self._internal_write = False
        self._frozen = False

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}{ENDPOINT_PATH}"

    @property
    def certificate_der(self) -> bytes:
        return self._cert_der

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> str:
        """Starts serving and returns the endpoint URL. After a restart the port is the same."""
        if self._server is not None:
            raise RuntimeError("simulator already running")
        self._cert_der, self._key_pem = await asyncio.to_thread(
            _load_or_create_identity, self.cert_dir
        )
        server = await self._build_server()
        try:
            await server.start()
            assert server.bserver is not None
            relay = _Relay(server.bserver.port)
            if self._frozen:
                relay.flowing.clear()
            self.port = await relay.start(self.host, self.port)
        except BaseException:
            await server.stop()
            raise
        self._server, self._relay = server, relay
        # The advertised URL is the relay's, so clients see one consistent endpoint.
        server.set_endpoint(self.endpoint)
        await self._publish()
        await self._publish_bench()
        self._ticker = asyncio.create_task(self._tick_forever(), name="opcua-sim-ticker")
        _LOGGER.info("OPC UA cabinet simulator on %s", self.endpoint)
        return self.endpoint

    async def stop(self) -> None:
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        relay, self._relay = self._relay, None
        if relay is not None:
            await relay.stop()
        server, self._server = self._server, None
        if server is not None:
            # asyncua's clock task sleeps a whole second between updates and stop() waits for
            # it; cancelling it first makes restarts (the recovery tests' bread) fast.
            clock = server.iserver.time_task
            if clock is not None:
                clock.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await clock
                server.iserver.time_task = None
            await server.stop()
        self._nodes.clear()

    async def restart(self) -> str:
        """A controller reboot: connections cut, sessions and subscriptions gone, same port."""
        await self.stop()
        return await self.start()

    def freeze(self) -> None:
        """Stops answering (and forwarding anything) without closing any connection."""
        self._frozen = True
        if self._relay is not None:
            self._relay.flowing.clear()

    def thaw(self) -> None:
        """Resumes traffic; what was held while frozen is delivered, as TCP would."""
        self._frozen = False
        if self._relay is not None:
            self._relay.flowing.set()

    def drop_connections(self) -> None:
        """Cuts every client TCP connection (RST); the server keeps listening."""
        if self._relay is not None:
            self._relay.drop()

    async def drop_subscriptions(self) -> int:
        """Deletes every subscription on the server side; sessions and connections stay open.

        What a controller does when it runs short of resources or loses subscriptions in a
        session-transfer bug: a client gets no more notifications and no keep-alives; its
        reads, writes and calls still work. Uses asyncua's
        ``iserver.subscription_service.delete_subscriptions`` (what a DeleteSubscriptions
        request runs), then answers the Publish requests each connection had parked with
        ``BadNoSubscription``, as OPC UA Part 4 (5.13.8) requires when a session's last
        subscription goes: asyncua's service would leave them unanswered. Later Publish
        requests fail with ``BadNoSubscription`` too. Returns how many subscriptions went."""
        server = self._server
        if server is None:
            raise RuntimeError("simulator not running")
        service = server.iserver.subscription_service
        ids = list(service.subscriptions)
        await service.delete_subscriptions(ids)
        if server.bserver is not None:
            for protocol in list(server.bserver.clients):
                processor = protocol.processor
                if processor is None:
                    continue
                # Private asyncua state (UaProcessor): the parked Publish requests and the
                # subscriptions waiting for one. No public API answers them.
                processor._publish_results_subs.clear()
                while processor._publish_requests:
                    parked = processor._publish_requests.popleft()
                    fault = ua.ServiceFault()
                    fault.ResponseHeader.ServiceResult = ua.StatusCode(
                        ua.UInt32(StatusCodes.BadNoSubscription)
                    )
                    processor.send_response(  # type: ignore[no-untyped-call]
                        parked.requesthdr.RequestHandle, parked.seqhdr, fault
                    )
        self.dropped_subscriptions += len(ids)
        _LOGGER.info("dropped %d subscriptions", len(ids))
        return len(ids)

    # Ground-truth setters for tests: the cabinet's sensors.

    async def set_door_open(self, is_open: bool) -> None:
        self.state.door_open = is_open
        await self._publish()

    async def set_ambient_light(self, lux: float) -> None:
        self.state.ambient_light_lux = lux
        await self._publish()

    async def tick(self, elapsed_s: float = UPDATE_INTERVAL_S) -> None:
        """Advances the electrical model by ``elapsed_s`` and publishes the new values; every
        bench point gets a new value."""
        self._advance(elapsed_s)
        await self._publish()
        self.bench_tick += 1
        await self._publish_bench()

    def value(self, path: str) -> Any:
        """The value the server holds right now for ``Cabinet.<path>``."""
        if self._server is None:
            raise RuntimeError("simulator not running")
        return _value_of(self._server.read_attribute_value(self._nodes[path].nodeid))

    async def _build_server(self) -> Server:
        users = _CabinetUsers(self.users, self.user_certificates, self.logins, self.rejected_logins)
        server = Server(iserver=_IdentityServer(user_manager=users))
        await server.init()
        permissive = self.users is None and self.user_certificates is None
        tokens: list[type] = []
        if self.allow_anonymous:
            tokens.append(ua.AnonymousIdentityToken)
        if self.users is not None or permissive:
            tokens.append(ua.UserNameIdentityToken)
        if self.user_certificates is not None or permissive:
            tokens.append(ua.X509IdentityToken)
        server.set_identity_tokens(tokens)
        server.set_endpoint(f"opc.tcp://{self.host}:0{ENDPOINT_PATH}")
        server.socket_address = ("127.0.0.1", 0)
        server.set_server_name("Lampyre cabinet simulator")
        await server.set_application_uri(APPLICATION_URI)
        policies = [
            ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
            ua.SecurityPolicyType.Basic256Sha256_Sign,
            ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt,
            ua.SecurityPolicyType.Aes128Sha256RsaOaep_Sign,
            ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
            ua.SecurityPolicyType.Aes256Sha256RsaPss_Sign,
        ]
        if self.allow_none:
            policies.append(ua.SecurityPolicyType.NoSecurity)
        server.set_security_policy(policies)
        await server.load_certificate(self._cert_der)
        await server.load_private_key(self._key_pem, format="pem")
        server.set_certificate_validator(self._validate_client)
        await self._build_address_space(server)
        return server

    async def _validate_client(
        self, cert: x509.Certificate, app: ua.ApplicationDescription
    ) -> None:
        if self.trust_dir is None:
            return
        trusted = await asyncio.to_thread(_load_trusted, self.trust_dir)
        if cert.public_bytes(serialization.Encoding.DER) not in trusted:
            self.rejected_certificates += 1
            _LOGGER.warning("refused untrusted client certificate of %s", app.ApplicationUri)
            raise ServiceError(StatusCodes.BadCertificateUntrusted)

    async def _build_address_space(self, server: Server) -> None:
        idx = await server.register_namespace(NAMESPACE_URI)
        nodes: dict[str, Node] = {}

        def nid(path: str) -> ua.NodeId:
            return ua.NodeId(ua.String(f"Cabinet.{path}" if path else "Cabinet"), ua.Int16(idx))

        async def folder(parent: Node, path: str) -> Node:
            # The root object is path "" and browse name "Cabinet" (browse paths start there).
            name = path.rsplit(".", 1)[-1] or "Cabinet"
            node = await parent.add_object(nid(path), ua.QualifiedName(name, idx))
            nodes[path] = node
            return node

        async def variable(
            parent: Node, path: str, initial: Any, vtype: ua.VariantType, *, writable: bool = False
        ) -> None:
            name = path.rsplit(".", 1)[-1]
            node = await parent.add_variable(
                nid(path), ua.QualifiedName(name, idx), ua.Variant(initial, vtype)
            )
            if writable:
                await node.set_writable()
            nodes[path] = node

        cabinet = await folder(server.nodes.objects, "")
        for number in CIRCUITS:
            circuit = await folder(cabinet, f"Circuit{number}")
            base = f"Circuit{number}"
            await variable(circuit, f"{base}.ContactorState", False, ua.VariantType.Boolean)
            await variable(circuit, f"{base}.Command", False, ua.VariantType.Boolean, writable=True)
            await variable(circuit, f"{base}.DimLevel", 0, ua.VariantType.Byte, writable=True)
            await variable(circuit, f"{base}.ActualLevel", 0, ua.VariantType.Byte)
        for quantity in ("Voltage", "Current", "Power", "Energy"):
            group = await folder(cabinet, quantity)
            for phase in PHASES:
                await variable(group, f"{quantity}.{phase}", 0.0, ua.VariantType.Double)
        await variable(cabinet, "DoorOpen", False, ua.VariantType.Boolean)
        await variable(cabinet, "AmbientLight", 0.0, ua.VariantType.Double)
        clock = await folder(cabinet, "Clock")
        epoch = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
        await variable(clock, "Clock.SunriseTime", epoch, ua.VariantType.DateTime)
        await variable(clock, "Clock.SunsetTime", epoch, ua.VariantType.DateTime)
        await variable(clock, "Clock.LightsOnBySchedule", False, ua.VariantType.Boolean)
        if self.bench_points:
            bench = await folder(cabinet, BENCH_FOLDER)
            for index in range(self.bench_points):
                await variable(bench, bench_point_path(index), float(index), ua.VariantType.Double)

        circuit_arg = ua.Argument(Name="circuit", DataType=_type_id(ObjectIds.Int32), ValueRank=-1)
        on_arg = ua.Argument(Name="on", DataType=_type_id(ObjectIds.Boolean), ValueRank=-1)
        result_arg = ua.Argument(
            Name="contactor", DataType=_type_id(ObjectIds.Boolean), ValueRank=-1
        )
        nodes["SwitchCircuit"] = await cabinet.add_method(
            nid("SwitchCircuit"),
            ua.QualifiedName("SwitchCircuit", idx),
            self._switch_circuit,
            [circuit_arg, on_arg],
            [result_arg],
        )
        self._nodes = nodes
        for number in CIRCUITS:
            for leaf in ("Command", "DimLevel"):
                path = f"Circuit{number}.{leaf}"
                server.iserver.aspace.add_datachange_callback(
                    nodes[path].nodeid, AttributeIds.Value, self._on_write_callback(path)
                )

    def _on_write_callback(self, path: str) -> Any:
        number = int(path[len("Circuit")])
        leaf = path.split(".", 1)[1]

        async def on_write(_handle: int, value: ua.DataValue) -> None:
            if self._internal_write or value.Value is None:
                return
            written = value.Value.Value
            self.writes[path] += 1
            circuit = self.state.circuits[number]
            if leaf == "Command":
                circuit.command = bool(written)
            else:
                # The controller clamps rather than refusing, like most dimming gateways.
                circuit.dim_level = max(0, min(100, int(written)))
            self._apply_circuits()
            await self._publish()

        return on_write

    async def _switch_circuit(
        self, _parent: ua.NodeId, circuit_arg: ua.Variant, on_arg: ua.Variant
    ) -> list[ua.Variant] | ua.StatusCode:
        circuit, on = circuit_arg.Value, on_arg.Value
        self.method_calls.append(("SwitchCircuit", (circuit, on)))
        if circuit not in self.state.circuits:
            return ua.StatusCode(ua.UInt32(StatusCodes.BadInvalidArgument))
        self.state.circuits[circuit].command = bool(on)
        self._apply_circuits()
        await self._publish()
        return [ua.Variant(self.state.circuits[circuit].contactor, ua.VariantType.Boolean)]

    def _apply_circuits(self) -> None:
        for circuit in self.state.circuits.values():
            circuit.contactor = circuit.command
            circuit.actual_level = circuit.dim_level if circuit.contactor else 0

    def _advance(self, elapsed_s: float) -> None:
        state = self.state
        load_w = sum(CIRCUIT_RATED_POWER_W * c.actual_level / 100 for c in state.circuits.values())
        for phase in PHASES:
            voltage = NOMINAL_VOLTAGE_V + self._random.uniform(-3.0, 3.0)
            power = load_w / len(PHASES) * self._random.uniform(0.98, 1.02) if load_w else 0.0
            state.voltage_v[phase] = round(voltage, 1)
            state.power_w[phase] = round(power, 1)
            state.current_a[phase] = round(power / voltage, 3)
            state.energy_kwh[phase] += power * elapsed_s / 3_600_000
        now = dt.datetime.now(dt.UTC)
        state.lights_on_by_schedule = not state.sunrise.time() <= now.time() < state.sunset.time()

    async def _publish(self) -> None:
        server = self._server
        if server is None or not self._nodes:
            return
        state = self.state
        values: dict[str, tuple[Any, ua.VariantType]] = {
            "DoorOpen": (state.door_open, ua.VariantType.Boolean),
            "AmbientLight": (float(state.ambient_light_lux), ua.VariantType.Double),
            "Clock.SunriseTime": (state.sunrise, ua.VariantType.DateTime),
            "Clock.SunsetTime": (state.sunset, ua.VariantType.DateTime),
            "Clock.LightsOnBySchedule": (state.lights_on_by_schedule, ua.VariantType.Boolean),
        }
        for number, circuit in state.circuits.items():
            base = f"Circuit{number}"
            values[f"{base}.ContactorState"] = (circuit.contactor, ua.VariantType.Boolean)
            values[f"{base}.Command"] = (circuit.command, ua.VariantType.Boolean)
            values[f"{base}.DimLevel"] = (circuit.dim_level, ua.VariantType.Byte)
            values[f"{base}.ActualLevel"] = (circuit.actual_level, ua.VariantType.Byte)
        for phase in PHASES:
            values[f"Voltage.{phase}"] = (state.voltage_v[phase], ua.VariantType.Double)
            values[f"Current.{phase}"] = (state.current_a[phase], ua.VariantType.Double)
            values[f"Power.{phase}"] = (state.power_w[phase], ua.VariantType.Double)
            values[f"Energy.{phase}"] = (round(state.energy_kwh[phase], 6), ua.VariantType.Double)
        now = ua.DateTime.now(dt.UTC)
        self._internal_write = True
        try:
            for path, (value, vtype) in values.items():
                node = self._nodes[path]
                if _value_of(server.read_attribute_value(node.nodeid)) == value:
                    continue  # unchanged values must not wake subscriptions
                await server.write_attribute_value(
                    node.nodeid,
                    ua.DataValue(
                        ua.Variant(value, vtype), SourceTimestamp=now, ServerTimestamp=now
                    ),
                )
        finally:
            self._internal_write = False

    async def _publish_bench(self) -> None:
        server = self._server
        if server is None or not self.bench_points or not self._nodes:
            return
        now = ua.DateTime.now(dt.UTC)
        for index in range(self.bench_points):
            node = self._nodes[bench_point_path(index)]
            await server.write_attribute_value(
                node.nodeid,
                ua.DataValue(
                    ua.Variant(float(self.bench_tick + index), ua.VariantType.Double),
                    SourceTimestamp=now,
                    ServerTimestamp=now,
                ),
            )

    async def _tick_forever(self) -> None:
        # A fixed rate rather than a fixed pause: with a thousand bench points a tick takes a
        # while, and every point must still change once per interval.
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            await self.tick(UPDATE_INTERVAL_S)
            deadline += UPDATE_INTERVAL_S
            now = loop.time()
            if now > deadline:
                self.overrun_ticks += 1
                _LOGGER.warning(
                    "tick overran the %.1f s interval by %.3f s", UPDATE_INTERVAL_S, now - deadline
                )
                deadline = now  # no burst of catch-up ticks
            await asyncio.sleep(deadline - now)
