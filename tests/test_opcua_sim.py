"""The OPC UA cabinet simulator, exercised with a real asyncua client over loopback TCP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from asyncua.crypto import security_policies as policies
from cryptography import x509

from firmware_sim.opcua import (
    APPLICATION_URI,
    NAMESPACE_URI,
    CabinetSimulator,
    bench_point_path,
    certificate_fingerprint,
    make_self_signed,
    node_id,
)
from firmware_sim.opcua import server as server_module
from tests.e2e import REPO

CLIENT_URI = "urn:lampyre:test:client"
STEP_S = 10.0
"""Bound of each network step; generous because the shared machine can be slow."""
SHORT_S = 1.0
"""How long a request waits on a frozen server before the test calls it hung."""


@dataclass(frozen=True)
class Pki:
    server_dir: Path
    client_cert: Path
    client_key: Path
    other_cert: Path
    """A client certificate that is in no trust list."""
    other_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("opcua-pki")
    client_cert, client_key = make_self_signed(CLIENT_URI, "test client")
    other_cert, other_key = make_self_signed(CLIENT_URI, "stranger")
    (root / "client.der").write_bytes(client_cert)
    (root / "client.pem").write_bytes(client_key)
    (root / "other.der").write_bytes(other_cert)
    (root / "other.pem").write_bytes(other_key)
    return Pki(
        root / "server",
        root / "client.der",
        root / "client.pem",
        root / "other.der",
        root / "other.pem",
    )


def trust_dir_with(tmp_path: Path, *certs: Path) -> Path:
    trust = tmp_path / "trusted"
    trust.mkdir()
    for cert in certs:
        (trust / cert.name).write_bytes(cert.read_bytes())
    return trust


async def secure_client(
    sim: CabinetSimulator,
    pki: Pki,
    tmp_path: Path,
    policy: type[policies.SecurityPolicy] = policies.SecurityPolicyBasic256Sha256,
    timeout_s: float = 4.0,
) -> Client:
    server_cert = tmp_path / "server-pinned.der"
    server_cert.write_bytes(sim.certificate_der)
    client = Client(sim.endpoint, timeout=timeout_s)
    client.application_uri = CLIENT_URI
    await client.set_security(
        policy,
        str(pki.client_cert),
        str(pki.client_key),
        server_certificate=str(server_cert),
        mode=ua.MessageSecurityMode.SignAndEncrypt,
    )
    return client


@contextlib.asynccontextmanager
async def connected(client: Client) -> AsyncIterator[Client]:
    async with asyncio.timeout(STEP_S):
        await client.connect()
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(STEP_S):
                await client.disconnect()


async def read(client: Client, path: str) -> Any:
    async with asyncio.timeout(STEP_S):
        return await client.get_node(node_id(path)).read_value()


def method_id(path: str) -> ua.NodeId:
    return ua.NodeId.from_string(node_id(path))


class Changes:
    """Subscription handler collecting (node id string, value) pairs."""

    def __init__(self) -> None:
        self.seen: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        self.seen.put_nowait((node.nodeid.to_string(), val))

    async def wait_for(self, path: str, value: Any) -> None:
        async with asyncio.timeout(STEP_S):
            while await self.seen.get() != (node_id(path), value):
                pass


def test_encrypted_session_reads_writes_calls_and_subscribes(pki: Pki, tmp_path: Path) -> None:
    async def body() -> None:
        trust = trust_dir_with(tmp_path, pki.client_cert)
        sim = CabinetSimulator(pki.server_dir, trust_dir=trust)
        async with asyncio.timeout(STEP_S):
            url = await sim.start()
        assert url == f"opc.tcp://127.0.0.1:{sim.port}/lampyre/cabinet"
        try:
            async with connected(await secure_client(sim, pki, tmp_path)) as client:
                assert await client.get_namespace_index(NAMESPACE_URI) == 2
                cabinet = client.get_node(node_id(""))
                async with asyncio.timeout(STEP_S):
                    names = {
                        (await child.read_browse_name()).Name
                        for child in await cabinet.get_children()
                    }
                assert {
                    "Circuit1",
                    "Circuit2",
                    "Voltage",
                    "Current",
                    "Power",
                    "Energy",
                    "DoorOpen",
                    "AmbientLight",
                    "Clock",
                    "SwitchCircuit",
                } <= names
                for phase in ("L1", "L2", "L3"):
                    assert 220 <= await read(client, f"Voltage.{phase}") <= 240
                assert await read(client, "Circuit1.ContactorState") is True
                assert await read(client, "Circuit1.ActualLevel") == 100
                assert isinstance(await read(client, "Clock.SunsetTime"), type(sim.state.sunset))

                dim = client.get_node(node_id("Circuit1.DimLevel"))
                async with asyncio.timeout(STEP_S):
                    await dim.write_value(ua.DataValue(ua.Variant(40, ua.VariantType.Byte)))
                assert await read(client, "Circuit1.ActualLevel") == 40
                assert sim.writes["Circuit1.DimLevel"] == 1
                assert sim.state.circuits[1].actual_level == 40

                contactor = client.get_node(node_id("Circuit1.ContactorState"))
                with pytest.raises(ua.UaStatusCodeError):
                    async with asyncio.timeout(STEP_S):
                        await contactor.write_value(ua.DataValue(ua.Variant(False)))

                async with asyncio.timeout(STEP_S):
                    result = await cabinet.call_method(
                        method_id("SwitchCircuit"), ua.Variant(1, ua.VariantType.Int32), False
                    )
                assert result is False
                assert await read(client, "Circuit1.ContactorState") is False
                assert await read(client, "Circuit1.ActualLevel") == 0
                assert sim.method_calls == [("SwitchCircuit", (1, False))]
                with pytest.raises(ua.uaerrors.BadInvalidArgument):
                    async with asyncio.timeout(STEP_S):
                        await cabinet.call_method(
                            method_id("SwitchCircuit"), ua.Variant(7, ua.VariantType.Int32), True
                        )

                changes = Changes()
                async with asyncio.timeout(STEP_S):
                    subscription = await client.create_subscription(50, changes)
                    await subscription.subscribe_data_change(
                        [client.get_node(node_id(p)) for p in ("AmbientLight", "DoorOpen")]
                    )
                await changes.wait_for("DoorOpen", False)  # the initial value
                await sim.set_ambient_light(1234.5)
                await changes.wait_for("AmbientLight", 1234.5)
                await sim.set_door_open(True)
                await changes.wait_for("DoorOpen", True)
        finally:
            await sim.stop()

    asyncio.run(body())


def test_newer_security_policies_are_served(pki: Pki, tmp_path: Path) -> None:
    async def body() -> None:
        sim = CabinetSimulator(pki.server_dir)
        async with asyncio.timeout(STEP_S):
            await sim.start()
        try:
            for policy in (
                policies.SecurityPolicyAes128Sha256RsaOaep,
                policies.SecurityPolicyAes256Sha256RsaPss,
            ):
                async with connected(await secure_client(sim, pki, tmp_path, policy)) as client:
                    assert await read(client, "Circuit2.DimLevel") == 100
        finally:
            await sim.stop()

    asyncio.run(body())


def test_untrusted_client_certificate_is_refused(pki: Pki, tmp_path: Path) -> None:
    async def body() -> None:
        trust = trust_dir_with(tmp_path, pki.other_cert)
        sim = CabinetSimulator(pki.server_dir, trust_dir=trust)
        async with asyncio.timeout(STEP_S):
            await sim.start()
        try:
            client = await secure_client(sim, pki, tmp_path)
            with pytest.raises(ua.uaerrors.BadCertificateUntrusted):
                async with asyncio.timeout(STEP_S):
                    await client.connect()
            assert sim.rejected_certificates == 1
            with contextlib.suppress(Exception):
                async with asyncio.timeout(STEP_S):
                    await client.disconnect()
        finally:
            await sim.stop()

    asyncio.run(body())


def test_none_policy_only_when_allowed(pki: Pki) -> None:
    async def attempt(allow_none: bool) -> Any:
        sim = CabinetSimulator(pki.server_dir, allow_none=allow_none)
        async with asyncio.timeout(STEP_S):
            await sim.start()
        try:
            client = Client(sim.endpoint, timeout=4.0)
            async with connected(client):
                return await read(client, "DoorOpen")
        finally:
            await sim.stop()

    async def body() -> None:
        with pytest.raises(ua.UaError):
            await attempt(allow_none=False)
        assert await attempt(allow_none=True) is False

    asyncio.run(body())


def test_restart_keeps_port_certificate_and_process_image(pki: Pki, tmp_path: Path) -> None:
    async def body() -> None:
        sim = CabinetSimulator(pki.server_dir)
        async with asyncio.timeout(STEP_S):
            url = await sim.start()
        certificate = sim.certificate_der
        try:
            async with connected(await secure_client(sim, pki, tmp_path)) as client:
                dim = client.get_node(node_id("Circuit2.DimLevel"))
                async with asyncio.timeout(STEP_S):
                    await dim.write_value(ua.DataValue(ua.Variant(25, ua.VariantType.Byte)))
                async with asyncio.timeout(STEP_S):
                    assert await sim.restart() == url
                # The old session died with the server: the client must notice, not hang.
                with pytest.raises((ua.UaError, ConnectionError, TimeoutError)):
                    await read(client, "Circuit2.DimLevel")
            assert sim.certificate_der == certificate
            async with connected(await secure_client(sim, pki, tmp_path)) as client:
                assert await read(client, "Circuit2.ActualLevel") == 25
        finally:
            await sim.stop()

    asyncio.run(body())


def test_freeze_hangs_requests_and_thaw_restores(pki: Pki, tmp_path: Path) -> None:
    async def body() -> None:
        sim = CabinetSimulator(pki.server_dir)
        async with asyncio.timeout(STEP_S):
            await sim.start()
        try:
            async with connected(await secure_client(sim, pki, tmp_path)) as client:
                node = client.get_node(node_id("Circuit1.Command"))
                sim.freeze()
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(SHORT_S):
                        await node.read_value()
                sim.thaw()
                assert await read(client, "Circuit1.Command") is True
        finally:
            await sim.stop()

    asyncio.run(body())


def test_dropped_connections_fail_fast_and_reconnect_works(pki: Pki, tmp_path: Path) -> None:
    async def body() -> None:
        sim = CabinetSimulator(pki.server_dir)
        async with asyncio.timeout(STEP_S):
            await sim.start()
        try:
            async with connected(await secure_client(sim, pki, tmp_path)) as client:
                assert await read(client, "DoorOpen") is False
                sim.drop_connections()
                with pytest.raises((ua.UaError, ConnectionError, TimeoutError)):
                    await read(client, "DoorOpen")
            async with connected(await secure_client(sim, pki, tmp_path)) as client:
                assert await read(client, "DoorOpen") is False
        finally:
            await sim.stop()

    asyncio.run(body())


async def as_user(client: Client, name: str, password: str) -> Client:
    client.set_user(name)
    client.set_password(password)
    return client


async def with_user_certificate(client: Client, cert: Path, key: Path) -> Client:
    await client.load_client_certificate(str(cert))
    await client.load_private_key(key)
    return client


async def refused(client: Client) -> BaseException:
    """Connects, expecting a refusal; returns the error after closing what was opened."""
    try:
        async with asyncio.timeout(STEP_S):
            await client.connect()
    except ua.UaStatusCodeError as exc:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(STEP_S):
                await client.disconnect()
        return exc
    with contextlib.suppress(Exception):
        async with asyncio.timeout(STEP_S):
            await client.disconnect()
    raise AssertionError("the session was accepted")


def test_user_names_and_passwords(pki: Pki, tmp_path: Path) -> None:
    async def body() -> None:
        sim = CabinetSimulator(
            pki.server_dir, users={"operator": "s3cret", "viewer": ""}, allow_anonymous=False
        )
        async with asyncio.timeout(STEP_S):
            await sim.start()
        try:
            client = await as_user(await secure_client(sim, pki, tmp_path), "operator", "s3cret")
            async with connected(client):
                assert await read(client, "DoorOpen") is False
                dim = client.get_node(node_id("Circuit1.DimLevel"))
                async with asyncio.timeout(STEP_S):
                    await dim.write_value(ua.DataValue(ua.Variant(55, ua.VariantType.Byte)))
            assert sim.state.circuits[1].dim_level == 55
            wrong = await as_user(await secure_client(sim, pki, tmp_path), "operator", "s3cre")
            assert isinstance(await refused(wrong), ua.uaerrors.BadUserAccessDenied)
            unknown = await as_user(await secure_client(sim, pki, tmp_path), "intruder", "s3cret")
            assert isinstance(await refused(unknown), ua.uaerrors.BadUserAccessDenied)
            anonymous = await secure_client(sim, pki, tmp_path)
            assert isinstance(await refused(anonymous), ua.uaerrors.BadIdentityTokenRejected)
            empty = await as_user(await secure_client(sim, pki, tmp_path), "viewer", "")
            async with connected(empty):
                assert await read(empty, "DoorOpen") is False
            assert sim.logins == ["user:operator", "user:viewer"]
            assert sim.rejected_logins == ["user:operator", "user:intruder"]
        finally:
            await sim.stop()

    asyncio.run(body())


def test_user_certificates(pki: Pki, tmp_path: Path) -> None:
    async def body() -> None:
        # The application certificate doubles as the user certificate, as on many gateways:
        # an anonymous session over that secure channel must still count as anonymous.
        sim = CabinetSimulator(pki.server_dir, user_certificates=[pki.client_cert.read_bytes()])
        async with asyncio.timeout(STEP_S):
            await sim.start()
        try:
            async with connected(await secure_client(sim, pki, tmp_path)) as client:
                assert await read(client, "DoorOpen") is False
            client = await with_user_certificate(
                await secure_client(sim, pki, tmp_path), pki.client_cert, pki.client_key
            )
            async with connected(client):
                assert await read(client, "Circuit2.ActualLevel") == 100
            stranger = await with_user_certificate(
                await secure_client(sim, pki, tmp_path), pki.other_cert, pki.other_key
            )
            assert isinstance(await refused(stranger), ua.uaerrors.BadUserAccessDenied)
            by_name = await as_user(await secure_client(sim, pki, tmp_path), "operator", "x")
            assert isinstance(await refused(by_name), ua.uaerrors.BadIdentityTokenRejected)
            assert sim.logins == ["anonymous", "cert:O=Lampyre,CN=test client"]
            assert sim.rejected_logins == ["cert:O=Lampyre,CN=stranger"]
        finally:
            await sim.stop()

    asyncio.run(body())


def test_every_bench_point_changes_every_second(pki: Pki, tmp_path: Path) -> None:
    count = 20
    paths = [bench_point_path(index) for index in range(count)]
    assert paths[0] == "Bench.P0000" and node_id(paths[-1]) == "ns=2;s=Cabinet.Bench.P0019"

    async def body() -> None:
        sim = CabinetSimulator(pki.server_dir, bench_points=count)
        async with asyncio.timeout(STEP_S):
            await sim.start()
        try:
            async with connected(await secure_client(sim, pki, tmp_path)) as client:
                nodes = [client.get_node(node_id(path)) for path in paths]
                async with asyncio.timeout(STEP_S):
                    first = await client.read_values(nodes)
                    await asyncio.sleep(1.2)
                    second = await client.read_values(nodes)
                    # Bounded wait rather than a timing assertion: a slow machine may miss a tick.
                    while not all(b > a for a, b in zip(first, second, strict=True)):
                        await asyncio.sleep(0.2)
                        second = await client.read_values(nodes)
                for index, value in enumerate(second):
                    assert isinstance(value, float)
                    assert (value - index).is_integer() and value - index >= 1
                bench = client.get_node(node_id("Bench"))
                async with asyncio.timeout(STEP_S):
                    names = {(await c.read_browse_name()).Name for c in await bench.get_children()}
                assert names == {f"P{index:04d}" for index in range(count)}
        finally:
            await sim.stop()

    asyncio.run(body())


def test_dropped_subscriptions_go_silent_while_the_session_lives(pki: Pki, tmp_path: Path) -> None:
    async def body() -> None:
        sim = CabinetSimulator(pki.server_dir)
        async with asyncio.timeout(STEP_S):
            await sim.start()
        try:
            async with connected(await secure_client(sim, pki, tmp_path)) as client:
                changes = Changes()
                async with asyncio.timeout(STEP_S):
                    subscription = await client.create_subscription(50, changes)
                    await subscription.subscribe_data_change(
                        client.get_node(node_id("AmbientLight"))
                    )
                await sim.set_ambient_light(100.0)
                await changes.wait_for("AmbientLight", 100.0)

                assert await sim.drop_subscriptions() == 1
                await sim.set_ambient_light(200.0)
                # Twenty publishing intervals of silence: the subscription is gone for good.
                await asyncio.sleep(1.0)
                assert changes.seen.empty()
                with pytest.raises(ua.uaerrors.BadNoSubscription):
                    async with asyncio.timeout(STEP_S):
                        await client.uaclient.publish([])
                # The session itself is alive, and a new subscription works.
                assert await read(client, "AmbientLight") == 200.0
                async with asyncio.timeout(STEP_S):
                    again = await client.create_subscription(50, changes)
                    await again.subscribe_data_change(client.get_node(node_id("AmbientLight")))
                await changes.wait_for("AmbientLight", 200.0)
            assert sim.dropped_subscriptions == 1
        finally:
            await sim.stop()

    asyncio.run(body())


def test_electrical_model_follows_the_load(pki: Pki) -> None:
    async def body() -> None:
        sim = CabinetSimulator(pki.server_dir, seed=3)
        async with asyncio.timeout(STEP_S):
            await sim.start()
        try:
            await sim.tick(3600.0)
            total_w = sum(sim.value(f"Power.{p}") for p in ("L1", "L2", "L3"))
            expected_w = 2 * server_module.CIRCUIT_RATED_POWER_W
            assert expected_w * 0.97 <= total_w <= expected_w * 1.03
            for phase in ("L1", "L2", "L3"):
                current = sim.value(f"Current.{phase}")
                power, voltage = sim.value(f"Power.{phase}"), sim.value(f"Voltage.{phase}")
                assert current == pytest.approx(power / voltage, abs=0.01)
                assert sim.value(f"Energy.{phase}") == pytest.approx(power / 1000, rel=0.01)
        finally:
            await sim.stop()

    asyncio.run(body())


def test_generated_identity_is_private_and_carries_the_application_uri(pki: Pki) -> None:
    async def body() -> None:
        sim = CabinetSimulator(pki.server_dir)
        async with asyncio.timeout(STEP_S):
            await sim.start()
        await sim.stop()

    asyncio.run(body())
    key = pki.server_dir / server_module.KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    cert = x509.load_der_x509_certificate((pki.server_dir / server_module.CERT_FILE).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert APPLICATION_URI in san.get_values_for_type(x509.UniformResourceIdentifier)


CLI_SCRIPT = """
import argparse, asyncio, sys
from firmware_sim.opcua.cli import COMMAND
parser = argparse.ArgumentParser()
COMMAND.configure(parser)
sys.exit(asyncio.run(COMMAND.run(parser.parse_args(sys.argv[1:]))))
"""


def test_cli_prints_endpoint_and_fingerprint(pki: Pki, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'firmware-sim'}{os.pathsep}{REPO}"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CLI_SCRIPT,
            "--port",
            "0",
            "--cert-dir",
            str(pki.server_dir),
            "--user",
            "operator:s3cret",
            "--no-anonymous",
            "--bench-points",
            "3",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        endpoint = process.stdout.readline()
        fingerprint = process.stdout.readline()
        assert endpoint.startswith("OPC UA endpoint: opc.tcp://127.0.0.1:"), endpoint
        assert endpoint.rstrip().endswith("/lampyre/cabinet")
        der = (pki.server_dir / server_module.CERT_FILE).read_bytes()
        assert fingerprint.strip() == f"Server certificate SHA-256: {certificate_fingerprint(der)}"
        assert process.stdout.readline().startswith("Security: Basic256Sha256")
        assert process.stdout.readline().strip() == "User identities: user operator"
        assert process.stdout.readline().startswith("Bench points: 3 (ns=2;s=Cabinet.Bench.P0000")
        url = endpoint.removeprefix("OPC UA endpoint: ").strip()

        async def probe() -> None:
            client = Client(url, timeout=4.0)
            async with asyncio.timeout(STEP_S):
                endpoints = await client.connect_and_get_server_endpoints()
            modes = {e.SecurityMode for e in endpoints}
            assert modes == {ua.MessageSecurityMode.Sign, ua.MessageSecurityMode.SignAndEncrypt}
            tokens = {t.TokenType for e in endpoints for t in e.UserIdentityTokens}
            assert tokens == {ua.UserTokenType.UserName}

        asyncio.run(probe())
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STEP_S)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0
