"""OPC UA client certificate, server trust list and the ``lampyre opcua`` key tools.

The trust list is checked against a real asyncua server with Basic256Sha256 SignAndEncrypt on a
loopback port: the connection must fail while its certificate is unknown and work once trusted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from asyncua import ua
from asyncua.client.client import Client
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.server.server import Server
from asyncua.ua.object_ids import ObjectIds
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.opcua import cli
from drivers.opcua.security import (
    CertificateFileError,
    KeyFileError,
    ServerCertificateExpired,
    TrustList,
    UntrustedServerCertificate,
    certificate_application_uri,
    ensure_client_certificate,
    fingerprint,
    load_certificate,
)

CLIENT_URI = "urn:lampyre:test:client"
SERVER_URI = "urn:lampyre:test:server"
STEP_S = 20.0
"""Bound of each network step; generous because the shared machine can be slow."""

# One key for the hand-made certificates below: RSA generation is the slow part.
_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _make_cert(
    common_name: str = "some server",
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(_KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(days=1))
        .not_valid_after(not_after or now + dt.timedelta(days=30))
        .sign(_KEY, hashes.SHA256())
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- client certificate


def test_generated_certificate_suits_opc_ua(tmp_path: Path) -> None:
    cert_path, key_path = ensure_client_certificate(
        tmp_path / "pki" / "client.der",
        tmp_path / "pki" / "client-key.pem",
        application_uri=CLIENT_URI,
        common_name="Lampyre test",
    )
    assert _mode(key_path) == 0o600
    cert = x509.load_der_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size >= 2048
    assert cert.public_key() == key.public_key()
    assert certificate_application_uri(cert) == CLIENT_URI
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Lampyre test"
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and usage.data_encipherment
    assert usage.content_commitment  # nonRepudiation
    assert not usage.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    now = dt.datetime.now(dt.UTC)
    assert cert.not_valid_before_utc <= now
    assert cert.not_valid_after_utc - now > dt.timedelta(days=365)
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == "sha256"


def test_existing_pair_is_kept_and_pem_suffix_gives_pem(tmp_path: Path) -> None:
    cert_path, key_path = tmp_path / "c.pem", tmp_path / "k.pem"
    ensure_client_certificate(cert_path, key_path, application_uri=CLIENT_URI, common_name="a")
    assert cert_path.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    first_cert, first_key = cert_path.read_bytes(), key_path.read_bytes()
    ensure_client_certificate(cert_path, key_path, application_uri="urn:other", common_name="b")
    assert cert_path.read_bytes() == first_cert
    assert key_path.read_bytes() == first_key
    # A lost certificate is re-made from the existing key, not with a new key.
    cert_path.unlink()
    ensure_client_certificate(cert_path, key_path, application_uri=CLIENT_URI, common_name="a")
    assert key_path.read_bytes() == first_key
    assert (
        load_certificate(cert_path).public_key()
        == serialization.load_pem_private_key(first_key, password=None).public_key()
    )
    assert not list(tmp_path.glob(".*.tmp"))


def test_key_open_to_others_is_refused_with_its_path(tmp_path: Path) -> None:
    cert_path, key_path = tmp_path / "client.der", tmp_path / "client-key.pem"
    ensure_client_certificate(cert_path, key_path, application_uri=CLIENT_URI, common_name="a")
    key_path.chmod(0o644)
    with pytest.raises(KeyFileError) as caught:
        ensure_client_certificate(cert_path, key_path, application_uri=CLIENT_URI, common_name="a")
    assert str(key_path) in str(caught.value)
    assert "0644" in str(caught.value)
    link = tmp_path / "link.pem"
    link.symlink_to(key_path)
    with pytest.raises(KeyFileError, match="symbolic link"):
        ensure_client_certificate(cert_path, link, application_uri=CLIENT_URI, common_name="a")


def test_certificate_without_its_key_or_with_another_key_is_refused(tmp_path: Path) -> None:
    cert_path, key_path = tmp_path / "client.der", tmp_path / "client-key.pem"
    cert_path.write_bytes(_make_cert().public_bytes(serialization.Encoding.DER))
    with pytest.raises(CertificateFileError, match="private key"):
        ensure_client_certificate(cert_path, key_path, application_uri=CLIENT_URI, common_name="a")
    assert not key_path.exists()
    other_key = tmp_path / "other-key.pem"
    ensure_client_certificate(
        tmp_path / "other.der", other_key, application_uri=CLIENT_URI, common_name="a"
    )
    with pytest.raises(CertificateFileError, match="does not belong"):
        ensure_client_certificate(cert_path, other_key, application_uri=CLIENT_URI, common_name="a")


def test_not_a_key_is_refused_without_showing_its_content(tmp_path: Path) -> None:
    key_path = tmp_path / "client-key.pem"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"secret-looking-bytes")
    os.close(fd)
    with pytest.raises(KeyFileError) as caught:
        ensure_client_certificate(
            tmp_path / "c.der", key_path, application_uri=CLIENT_URI, common_name="a"
        )
    assert "secret-looking-bytes" not in str(caught.value)


# --------------------------------------------------------------------------- trust list


def test_fingerprint_is_colon_hex_sha256() -> None:
    cert = _make_cert()
    digest = cert.fingerprint(hashes.SHA256())
    assert fingerprint(cert) == ":".join(f"{b:02X}" for b in digest)


def test_trust_list_accepts_der_and_pem_copies(tmp_path: Path) -> None:
    der_cert, pem_cert = _make_cert("der one"), _make_cert("pem one")
    tmp_path.joinpath("a.der").write_bytes(der_cert.public_bytes(serialization.Encoding.DER))
    tmp_path.joinpath("b.pem").write_bytes(pem_cert.public_bytes(serialization.Encoding.PEM))
    tmp_path.joinpath("notes.txt").write_text("not a certificate")
    tmp_path.joinpath("broken.der").write_bytes(b"\x30\x03junk")
    trust = TrustList(tmp_path)
    trust.validate(der_cert)
    trust.validate(pem_cert)
    with pytest.raises(UntrustedServerCertificate):
        trust.validate(_make_cert("der one"))  # same subject and key, different certificate


def test_unknown_certificate_refused_with_fingerprint_subject_and_folder(tmp_path: Path) -> None:
    folder = tmp_path / "trusted"
    cert = _make_cert("cabinet plc")
    with pytest.raises(UntrustedServerCertificate) as caught:
        TrustList(folder).validate(cert)
    message = str(caught.value)
    assert fingerprint(cert) in message
    assert "CN=cabinet plc" in message
    assert str(folder) in message
    assert caught.value.certificate == cert
    assert not folder.exists()  # refusing writes nothing


def test_trust_on_first_use_only_when_enabled_and_empty(tmp_path: Path) -> None:
    first, second = _make_cert("first"), _make_cert("second")
    with pytest.raises(UntrustedServerCertificate):
        TrustList(tmp_path).validate(first)
    assert list(tmp_path.iterdir()) == []
    tofu = TrustList(tmp_path, trust_on_first_use=True)
    tofu.validate(first)
    stored = list(tmp_path.iterdir())
    assert len(stored) == 1
    assert x509.load_der_x509_certificate(stored[0].read_bytes()) == first
    TrustList(tmp_path).validate(first)  # now trusted without the flag
    with pytest.raises(UntrustedServerCertificate, match="already holds"):
        tofu.validate(second)
    assert len(list(tmp_path.iterdir())) == 1


def test_trusted_but_expired_certificate_refused(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    expired = _make_cert(
        not_before=now - dt.timedelta(days=10), not_after=now - dt.timedelta(days=1)
    )
    trust = TrustList(tmp_path)
    trust.add(expired)
    with pytest.raises(ServerCertificateExpired, match=fingerprint(expired)):
        trust.validate(expired)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(common_name=st.text(min_size=1, max_size=16))
def test_added_certificate_stays_inside_the_folder(tmp_path: Path, common_name: str) -> None:
    folder = tmp_path / "trust"
    cert = _make_cert(common_name)
    path = TrustList(folder).add(cert)
    assert path.parent == folder
    assert path.name.endswith(".der") and not path.name.startswith(".")
    assert "/" not in path.name
    TrustList(folder).validate(cert)


# --------------------------------------------------------------------------- against a real server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def _secure_server(cert: Path, key: Path) -> AsyncIterator[str]:
    server = Server()
    await server.init()
    endpoint = f"opc.tcp://127.0.0.1:{_free_port()}/lampyre-test/"
    server.set_endpoint(endpoint)
    await server.set_application_uri(SERVER_URI)
    server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
    await server.load_certificate(str(cert))
    await server.load_private_key(str(key), format="pem")
    async with asyncio.timeout(STEP_S):
        await server.start()
    try:
        yield endpoint
    finally:
        async with asyncio.timeout(STEP_S):
            await server.stop()


async def _connect(endpoint: str, client_files: tuple[Path, Path], trust: TrustList) -> str:
    """Connect with Basic256Sha256 SignAndEncrypt and read the server's application URI."""
    client = Client(endpoint, timeout=5)
    client.application_uri = CLIENT_URI
    client.certificate_validator = trust
    cert, key = client_files
    async with asyncio.timeout(STEP_S):
        await client.set_security(
            SecurityPolicyBasic256Sha256,
            str(cert),
            str(key),
            mode=ua.MessageSecurityMode.SignAndEncrypt,
        )
    try:
        async with asyncio.timeout(STEP_S):
            await client.connect()
            node = client.get_node(ObjectIds.Server_ServerArray)
            value = await node.read_value()
            return str(value[0])
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(STEP_S):
                await client.disconnect()


def test_validator_refuses_untrusted_server_then_accepts_it_once_trusted(tmp_path: Path) -> None:
    server_cert, server_key = ensure_client_certificate(
        tmp_path / "server" / "cert.der",
        tmp_path / "server" / "key.pem",
        application_uri=SERVER_URI,
        common_name="test cabinet server",
    )
    client_files = ensure_client_certificate(
        tmp_path / "client" / "client.der",
        tmp_path / "client" / "client-key.pem",
        application_uri=CLIENT_URI,
        common_name="Lampyre test client",
    )
    trust = TrustList(tmp_path / "trusted")

    async def body() -> None:
        async with _secure_server(server_cert, server_key) as endpoint:
            with pytest.raises(UntrustedServerCertificate) as caught:
                await _connect(endpoint, client_files, trust)
            assert fingerprint(load_certificate(server_cert)) in str(caught.value)
            trust.add(load_certificate(server_cert))
            assert await _connect(endpoint, client_files, trust) == SERVER_URI

    asyncio.run(body())


# --------------------------------------------------------------------------- command line


def test_cert_command_with_out_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pki"
    assert cli.main(["cert", "--out", str(out), "--application-uri", CLIENT_URI]) == cli.EXIT_OK
    cert = load_certificate(out / cli.CLIENT_CERT_NAME)
    assert certificate_application_uri(cert) == CLIENT_URI
    assert _mode(out / cli.CLIENT_KEY_NAME) == 0o600
    printed = capsys.readouterr().out
    assert fingerprint(cert) in printed
    assert str(out / cli.CLIENT_CERT_NAME) in printed
    # A second run keeps the pair and says so.
    assert cli.main(["cert", "--out", str(out)]) == cli.EXIT_OK
    assert "Existing" in capsys.readouterr().out
    assert load_certificate(out / cli.CLIENT_CERT_NAME) == cert
    (out / cli.CLIENT_KEY_NAME).chmod(0o640)
    assert cli.main(["cert", "--out", str(out)]) == cli.EXIT_FAILED
    assert str(out / cli.CLIENT_KEY_NAME) in capsys.readouterr().err


def test_cert_command_with_config_and_bus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[gateway]\nid = "cab-7"\n\n'
        '[buses.plc]\ndriver = "opcua"\napplication_uri = "urn:lampyre:cab-7:opcua"\n\n'
        '[buses.custom]\ndriver = "opcua"\ncertificate = "keys/c.der"\n'
        'private_key = "keys/k.pem"\n\n'
        '[buses.street-1]\ndriver = "modbus"\n'
    )
    assert cli.main(["cert", "--config", str(config), "--bus", "plc"]) == cli.EXIT_OK
    cert = load_certificate(tmp_path / "pki" / "plc" / cli.CLIENT_CERT_NAME)
    assert certificate_application_uri(cert) == "urn:lampyre:cab-7:opcua"
    assert "cab-7" in cert.subject.rfc4514_string()
    assert _mode(tmp_path / "pki" / "plc" / cli.CLIENT_KEY_NAME) == 0o600
    assert fingerprint(cert) in capsys.readouterr().out
    assert cli.main(["cert", "--config", str(config), "--bus", "custom"]) == cli.EXIT_OK
    assert (tmp_path / "keys" / "c.der").is_file()
    assert _mode(tmp_path / "keys" / "k.pem") == 0o600
    assert cli.main(["cert", "--config", str(config), "--bus", "street-1"]) == cli.EXIT_USAGE
    assert "not opcua" in capsys.readouterr().err
    assert cli.main(["cert", "--config", str(config), "--bus", "nope"]) == cli.EXIT_USAGE
    assert "no bus 'nope'" in capsys.readouterr().err
    assert cli.main(["cert"]) == cli.EXIT_USAGE
    args = ["cert", "--config", str(config), "--bus", "plc", "--out", str(tmp_path)]
    assert cli.main(args) == cli.EXIT_USAGE


def test_trust_command_asks_then_adds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert = _make_cert("plc in cabinet 7")
    cert_file = tmp_path / "server.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    folder = tmp_path / "trusted"
    args = ["trust", "--dir", str(folder), str(cert_file)]
    assert cli.main(args, stdin=io.StringIO("n\n")) == cli.EXIT_FAILED
    assert fingerprint(cert) in capsys.readouterr().out
    with pytest.raises(UntrustedServerCertificate):
        TrustList(folder).validate(cert)
    assert cli.main(args, stdin=io.StringIO("yes\n")) == cli.EXIT_OK
    assert "Trusted:" in capsys.readouterr().out
    TrustList(folder).validate(cert)
    not_cert = tmp_path / "junk.der"
    not_cert.write_bytes(b"junk")
    assert cli.main(["trust", "--dir", str(folder), "--yes", str(not_cert)]) == cli.EXIT_FAILED
    assert "no DER or PEM" in capsys.readouterr().err


def test_register_adds_opcua_to_a_command_line(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="lampyre")
    commands = parser.add_subparsers(dest="command", required=True)
    cli.register(commands)
    args = parser.parse_args(["opcua", "cert", "--out", str(tmp_path)])
    assert args.handler(args) == cli.EXIT_OK
    assert (tmp_path / cli.CLIENT_CERT_NAME).is_file()
