"""Transport security on the gateway's side: plain MQTT only to a broker on this machine unless
``hub.allow_plaintext`` says so (checked up front, with file and line; warned about at start),
and TLS below 1.2 refused by the agent whatever the broker offers."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import warnings
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from pathlib import Path

import pytest

from agent.cli import main
from agent.config import ConfigErrors, load_config
from agent.mqtt import MqttConnectError, MqttSession, MqttSettings, TlsSettings, is_loopback_host
from agent.sdk import Driver
from agent.uplink import RecordLike, Uplink
from tests.support.mosquitto import HOST, MosquittoBroker, Pki, Subscriber, make_pki

WAIT_S = 10.0
POLL_S = 0.02

REFUSAL = (
    "hub.host is not on this machine and TLS is off: enable [hub.tls] or set "
    "allow_plaintext = true (not for production)"
)
DRIVERS: dict[str, type[Driver]] = {}


def run(body: Callable[[], Awaitable[None]], timeout_s: float = 30.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout_s):
            await body()

    asyncio.run(bounded())


def write_config(folder: Path, hub_lines: Sequence[str]) -> tuple[Path, int]:
    """A minimal gateway configuration with the given ``[hub]`` lines; returns the file and the
    line number of its ``host`` key (0 when there is none)."""
    lines = ["[gateway]", 'id = "cab-0001"', "", "[hub]", *hub_lines, "", "[buffer]"]
    lines.append('path = "buffer.db"')
    path = folder / "gateway.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    host_line = next((n for n, text in enumerate(lines, 1) if text.startswith("host =")), 0)
    return path, host_line


# --------------------------------------------------------------------------------------------
# What counts as this machine: the literal only, never a name resolution.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["localhost", "LocalHost", "localhost.", "127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"],
)
def test_loopback_literals(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize(
    "host",
    [
        "hub.example.net",
        "localhost.example.net",  # a name that merely starts like localhost
        "127.0.0.1.nip.io",  # resolves to 127.0.0.1 through public DNS: still a name
        "10.0.0.5",
        "0.0.0.0",
        "::",
        "::ffff:10.0.0.5",
        "fe80::1",
        "127.1",  # inet_aton would take it; the configuration does not guess
    ],
)
def test_everything_else_is_elsewhere(host: str) -> None:
    assert not is_loopback_host(host)


# --------------------------------------------------------------------------------------------
# check-config
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hub_lines",
    [
        ['host = "hub.example.net"', "port = 1883"],
        ['host = "192.0.2.10"', "port = 1883"],
        # A TLS table that is switched off is no TLS.
        ['host = "hub.example.net"', "port = 8883", "[hub.tls]", "enabled = false"],
        ['host = "hub.example.net"', "allow_plaintext = false"],
    ],
    ids=["name", "address", "tls-disabled", "explicitly-false"],
)
def test_plaintext_to_another_machine_is_refused_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], hub_lines: list[str]
) -> None:
    path, host_line = write_config(tmp_path, hub_lines)

    with pytest.raises(ConfigErrors) as info:
        load_config(path, drivers=DRIVERS)
    assert [str(error) for error in info.value.errors] == [f"{path}:{host_line}: {REFUSAL}"]

    assert main(["check-config", str(path)]) != 0
    assert capsys.readouterr().err == f"{path}:{host_line}: {REFUSAL}\n"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.53"])
def test_plaintext_to_this_machine_is_allowed(tmp_path: Path, host: str) -> None:
    path, _ = write_config(tmp_path, [f'host = "{host}"'])
    config = load_config(path, drivers=DRIVERS)
    assert config.hub.mqtt.host == host
    assert config.hub.mqtt.tls is None


def test_default_host_is_this_machine(tmp_path: Path) -> None:
    path, _ = write_config(tmp_path, ["port = 1883"])
    assert load_config(path, drivers=DRIVERS).hub.mqtt.tls is None


def test_tls_to_another_machine_needs_no_permission(tmp_path: Path) -> None:
    path, _ = write_config(tmp_path, ['host = "hub.example.net"', "port = 8883", "[hub.tls]"])
    config = load_config(path, drivers=DRIVERS)
    assert config.hub.mqtt.tls == TlsSettings()


def test_allow_plaintext_must_be_a_boolean(tmp_path: Path) -> None:
    path, _ = write_config(tmp_path, ['host = "hub.example.net"', 'allow_plaintext = "yes"'])
    with pytest.raises(ConfigErrors) as info:
        load_config(path, drivers=DRIVERS)
    [error] = info.value.errors
    assert str(error) == (
        f"{path}:6: hub.allow_plaintext: expected true or false, got a string ('yes')"
    )


# --------------------------------------------------------------------------------------------
# allow_plaintext = true: the agent connects in clear and says so at start.
# --------------------------------------------------------------------------------------------


class NoRecords:
    """An empty buffer (the uplink's storage seam)."""

    async def pending(self, limit: int, exclude: Collection[int] = ()) -> Sequence[RecordLike]:
        return []

    async def ack(self, seqs: list[int]) -> object:
        return None


async def _ignore_command(payload: bytes) -> None:
    return None


def test_allowed_plaintext_connects_and_warns_at_start(
    tmp_path: Path, broker: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    # 0.0.0.0 is not a loopback literal, so it stands for "another machine" in the
    # configuration; Linux connects it to this host, where the test's plain broker listens.
    path, _ = write_config(
        tmp_path, ['host = "0.0.0.0"', f"port = {broker.port}", "allow_plaintext = true"]
    )
    config = load_config(path, drivers=DRIVERS)
    assert config.hub.mqtt.tls is None

    async def body() -> None:
        uplink = Uplink(
            config.hub.mqtt,
            prefix=config.hub.prefix,
            gateway_id=config.gateway_id,
            buffer=NoRecords(),
            on_command=_ignore_command,
        )
        with Subscriber(broker, "lampyre/v1/cab-0001/status") as status:
            task = asyncio.create_task(uplink.run())
            try:
                await status.wait_for_async(
                    lambda msgs: any(b'"online"' in m.payload for m in msgs), WAIT_S
                )
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

    with caplog.at_level(logging.WARNING, logger="agent.uplink"):
        run(body)
    warnings_logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        f"MQTT to 0.0.0.0:{broker.port} without TLS (hub.allow_plaintext = true): readings, "
        "commands and any password cross the network in clear and the broker is not "
        "authenticated; enable [hub.tls] for production"
    ) in warnings_logged


def test_plaintext_on_loopback_does_not_warn(
    broker: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    settings = MqttSettings(host=HOST, port=broker.port, client_id="lampyre-cab-0001")

    async def body() -> None:
        uplink = Uplink(
            settings,
            prefix="lampyre/v1",
            gateway_id="cab-0001",
            buffer=NoRecords(),
            on_command=_ignore_command,
        )
        with Subscriber(broker, "lampyre/v1/cab-0001/status") as status:
            task = asyncio.create_task(uplink.run())
            try:
                await status.wait_for_async(
                    lambda msgs: any(b'"online"' in m.payload for m in msgs), WAIT_S
                )
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

    with caplog.at_level(logging.WARNING, logger="agent.uplink"):
        run(body)
    assert not [r for r in caplog.records if "without TLS" in r.getMessage()]


# --------------------------------------------------------------------------------------------
# The agent's TLS floor: a broker that offers only TLS 1.1 is refused by the agent itself.
# --------------------------------------------------------------------------------------------


class TlsListener:
    """A TLS server on a free loopback port that completes (or fails) handshakes and then
    closes: a real peer for the agent's handshake, speaking no MQTT. ``highest`` caps the TLS
    version it accepts."""

    def __init__(self, pki: Pki, highest: ssl.TLSVersion) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with warnings.catch_warnings():
            # Python deprecates TLSVersion.TLSv1_1; offering it is the point of this peer.
            warnings.simplefilter("ignore", DeprecationWarning)
            self.context.minimum_version = ssl.TLSVersion.TLSv1_1
            self.context.maximum_version = highest
        # OpenSSL 3 only negotiates TLS 1.1 at security level 0.
        self.context.set_ciphers("DEFAULT:@SECLEVEL=0")
        self.context.load_cert_chain(pki.server_cert, pki.server_key)
        self.handshake_errors: list[str] = []
        self.handshakes_completed = 0
        self._server = socket.create_server((HOST, 0))
        self.port: int = self._server.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return  # shut down by __exit__
            with connection:
                connection.settimeout(WAIT_S)
                try:
                    with self.context.wrap_socket(connection, server_side=True):
                        self.handshakes_completed += 1
                except (ssl.SSLError, OSError) as exc:
                    self.handshake_errors.append(str(exc))

    def __enter__(self) -> TlsListener:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        # shutdown() wakes the accept() blocked in the thread; close() alone would not.
        self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._thread.join(WAIT_S)


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[Pki]:
    yield make_pki(tmp_path / "pki")


def test_agent_refuses_a_broker_limited_to_tls_1_1(pki: Pki) -> None:
    tls = TlsSettings(pki.ca_file, pki.client_cert, pki.client_key)

    async def attempt(port: int) -> MqttConnectError:
        session = MqttSession(MqttSettings(host=HOST, port=port, client_id="cab-0001", tls=tls))
        with pytest.raises(MqttConnectError) as info:
            await session.connect("lampyre/v1/cab-0001/status", b"offline", timeout_s=WAIT_S)
        await session.disconnect()
        return info.value

    async def body() -> None:
        with TlsListener(pki, highest=ssl.TLSVersion.TLSv1_1) as old:
            error = await attempt(old.port)
            assert error.kind == "tls"
            assert "PROTOCOL_VERSION" in error.reason.upper()
            assert old.handshakes_completed == 0
        # The same peer allowed TLS 1.2 completes the handshake: what was refused above was
        # the version, not the certificate. (It then hangs up without a CONNACK.)
        with TlsListener(pki, highest=ssl.TLSVersion.TLSv1_2) as current:
            await attempt(current.port)
            await _wait_until(lambda: current.handshakes_completed == 1)

    run(body)


async def _wait_until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_S):
        while not condition():
            await asyncio.sleep(POLL_S)
