"""The gateway's keys on disk and `lampyre keys`: modes, refusals, never overwriting, never
printing a secret, and a wipe after which the buffer cannot be read."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.buffer import Buffer, Lane
from agent.cli import main
from agent.config import ConfigErrors, KeysConfig, load_config
from agent.crypto import RecordCipher, load_or_create_key
from agent.envelope import (
    SUITE_NAMES,
    SUITES,
    HubPrivateKey,
    HubPublicKey,
    Kem,
    gateway_keyring,
    key_id,
    open_envelope,
)
from agent.keys import (
    KeyFileError,
    KeySetupError,
    create_gateway_signing_key,
    crypto_erase,
    decode_hub_private_key,
    decode_hub_public_key,
    encode_hub_private_key,
    encode_hub_public_key,
    generate_hub_keypair,
    load_gateway_signer,
    load_hub_private_keys,
    load_hub_public_keys,
    load_post_public_keys,
    load_sealer,
    read_ed25519_public_key,
    select_hub_key,
    write_hub_keypair,
)

GATEWAY = "cab-0042"


def mode_of(path: Path) -> int:
    return path.stat().st_mode & 0o777


def write_config(folder: Path, keys_table: str = "") -> Path:
    path = folder / "gateway.toml"
    path.write_text(
        f'[gateway]\nid = "{GATEWAY}"\n\n[buffer]\npath = "var/buffer.db"\n\n{keys_table}',
        encoding="utf-8",
    )
    return path


def run_async(body: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(60):
            await body()

    asyncio.run(bounded())


# --------------------------------------------------------------------------------------------
# The signing key.
# --------------------------------------------------------------------------------------------


def test_signing_key_created_0600_and_never_overwritten(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    signer, created = create_gateway_signing_key(folder)
    assert created
    key_file, public_file = folder / "gateway-signing.key", folder / "gateway-signing.pub"
    assert (mode_of(folder), mode_of(key_file), mode_of(public_file)) == (0o700, 0o600, 0o644)
    assert b"PRIVATE KEY" in key_file.read_bytes()
    assert read_ed25519_public_key(public_file) == signer.public_key
    assert not list(folder.glob(".*.tmp"))
    before = (key_file.read_bytes(), key_file.stat().st_ino)

    again, created_again = create_gateway_signing_key(folder)
    assert not created_again and again.skid == signer.skid
    assert (key_file.read_bytes(), key_file.stat().st_ino) == before
    assert load_gateway_signer(folder).skid == signer.skid
    assert signer.skid == key_id(signer.public_key.public_bytes_raw())


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o610])
def test_signing_key_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    create_gateway_signing_key(tmp_path)
    (tmp_path / "gateway-signing.key").chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 600") as refused:
        load_gateway_signer(tmp_path)
    assert "PRIVATE" not in str(refused.value)
    with pytest.raises(KeyFileError):
        create_gateway_signing_key(tmp_path)  # refused, and not replaced either
    assert mode_of(tmp_path / "gateway-signing.key") == mode


def test_signing_key_refusals(tmp_path: Path) -> None:
    with pytest.raises(KeySetupError, match="lampyre keys init"):
        load_gateway_signer(tmp_path)
    key_file = tmp_path / "gateway-signing.key"
    key_file.write_bytes(b"not a key")
    key_file.chmod(0o600)
    with pytest.raises(KeyFileError, match="not an unencrypted PEM"):
        load_gateway_signer(tmp_path)
    key_file.write_bytes(
        x25519.X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(KeyFileError, match="Ed25519"):
        load_gateway_signer(tmp_path)
    key_file.unlink()
    real = tmp_path / "elsewhere.key"
    create_gateway_signing_key(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "gateway-signing.key", real)
    real.chmod(0o600)
    key_file.symlink_to(real)
    with pytest.raises(KeyFileError, match="symbolic link"):
        load_gateway_signer(tmp_path)


def test_folder_writable_by_others_is_refused(tmp_path: Path) -> None:
    create_gateway_signing_key(tmp_path / "keys")
    (tmp_path / "keys").chmod(0o777)
    with pytest.raises(KeyFileError, match="chmod 700"):
        load_gateway_signer(tmp_path / "keys")
    with pytest.raises(KeyFileError, match="chmod 700"):
        load_hub_public_keys(tmp_path / "keys")


def test_public_key_that_does_not_match_the_private_one_is_reported(tmp_path: Path) -> None:
    create_gateway_signing_key(tmp_path)
    other = Ed25519PrivateKey.generate().public_key()
    public_file = tmp_path / "gateway-signing.pub"
    public_file.write_bytes(
        other.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(KeyFileError, match="does not hold the public key"):
        create_gateway_signing_key(tmp_path)


# --------------------------------------------------------------------------------------------
# Hub and control-post keys.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITE_NAMES)
def test_hub_keypair_files(tmp_path: Path, suite: str) -> None:
    public, private_path, public_path = write_hub_keypair(tmp_path, suite)
    assert public.kem is SUITES[suite].kem
    assert private_path.name == f"hub-{public.kid}.key" and mode_of(private_path) == 0o600
    assert public_path.name == f"hub-{public.kid}.pub" and mode_of(public_path) == 0o644
    assert load_hub_public_keys(tmp_path) == {public.kid: public}
    assert load_hub_public_keys(public_path) == load_hub_public_keys([public_path])
    (private,) = load_hub_private_keys(tmp_path).values()
    assert private.public == public
    assert public_path.read_text().startswith(f"hpke-public-key {public.kem.value} ")
    private_text, public_text = generate_hub_keypair(suite)
    assert decode_hub_private_key(private_text).public == decode_hub_public_key(public_text)


def test_hub_key_text_round_trip_and_pem(tmp_path: Path) -> None:
    for kem in Kem:
        key = HubPrivateKey.generate(kem)
        assert decode_hub_public_key(encode_hub_public_key(key.public)) == key.public
        assert decode_hub_private_key(encode_hub_private_key(key)).public == key.public
    commented = b"# hub key of the city, 2026\n" + encode_hub_public_key(key.public)
    assert decode_hub_public_key(commented) == key.public
    scalar = x25519.X25519PrivateKey.generate()
    pem_public = scalar.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pem_private = scalar.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert decode_hub_public_key(pem_public) == decode_hub_private_key(pem_private).public
    assert decode_hub_public_key(pem_public).raw == scalar.public_key().public_bytes_raw()


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b"", "expected one line"),
        (b"hpke-public-key x25519\n", "expected one line"),
        (b"hpke-private-key x25519 " + base64.b64encode(bytes(32)) + b"\n", "expected one line"),
        (b"hpke-public-key p256 " + base64.b64encode(bytes(32)) + b"\n", "unknown KEM"),
        (b"hpke-public-key x25519 !!!!\n", "base64"),
        (b"hpke-public-key x25519 " + base64.b64encode(bytes(31)) + b"\n", "32 bytes"),
        (b"hpke-public-key mlkem768x25519 " + base64.b64encode(bytes(32)) + b"\n", "1216"),
        (b"\xff\xfe", "not text"),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "not a PEM"),
    ],
)
def test_bad_hub_key_files_are_refused(text: bytes, reason: str) -> None:
    with pytest.raises(KeyFileError, match=reason):
        decode_hub_public_key(text, "hub-x.pub")


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_public_key_files_writable_by_others_are_refused(tmp_path: Path, mode: int) -> None:
    _, _, public_path = write_hub_keypair(tmp_path)
    public_path.chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 644"):
        load_hub_public_keys(tmp_path)
    post = tmp_path / "post-desk.pub"
    post.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    post.chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 644"):
        load_post_public_keys(tmp_path)


def test_hub_private_key_open_to_others_is_refused(tmp_path: Path) -> None:
    _, private_path, _ = write_hub_keypair(tmp_path)
    private_path.chmod(0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_hub_private_keys(tmp_path)


def test_post_keys_by_key_id(tmp_path: Path) -> None:
    keys = [Ed25519PrivateKey.generate().public_key() for _ in range(2)]
    for name, key in zip(("desk", "van"), keys, strict=True):
        path = tmp_path / f"post-{name}.pub"
        path.write_bytes(
            key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        path.chmod(0o644)
    found = load_post_public_keys(tmp_path)
    assert found == {key_id(k.public_bytes_raw()): k for k in keys}
    assert load_post_public_keys(tmp_path / "none") == {}


def test_select_hub_key() -> None:
    first, second = HubPrivateKey.generate().public, HubPrivateKey.generate(Kem.MLKEM768_X25519)
    hybrid = second.public
    with pytest.raises(KeySetupError, match="no hub public key"):
        select_hub_key({}, None, None)
    only, suite = select_hub_key({first.kid: first}, None, None)
    assert only == first and suite.name == "x25519-hkdf256-chacha20poly1305"
    both: dict[str, HubPublicKey] = {first.kid: first, hybrid.kid: hybrid}
    with pytest.raises(KeySetupError, match="current_hub_key"):
        select_hub_key(both, None, None)
    with pytest.raises(KeySetupError, match="none of the hub keys"):
        select_hub_key(both, "0123456789abcdef", None)
    chosen, suite = select_hub_key(both, hybrid.kid, "mlkem768x25519-hkdf256-aes256gcm")
    assert chosen == hybrid and suite.aead == "aes256gcm"
    with pytest.raises(KeySetupError, match="does not fit"):
        select_hub_key(both, first.kid, "mlkem768x25519-hkdf256-aes256gcm")


# --------------------------------------------------------------------------------------------
# The [keys] configuration and load_sealer.
# --------------------------------------------------------------------------------------------


def test_load_sealer_from_the_configuration_seals_for_the_hub(tmp_path: Path) -> None:
    hub_folder = tmp_path / "hub"
    old, _, _ = write_hub_keypair(hub_folder)
    new, _, _ = write_hub_keypair(hub_folder, "mlkem768x25519-hkdf256-aes256gcm")
    create_gateway_signing_key(tmp_path / "keys")
    for path in hub_folder.glob("hub-*.pub"):
        shutil.copy(path, tmp_path / "keys" / path.name)
    config = load_config(
        write_config(tmp_path, f'[keys]\ncurrent_hub_key = "{new.kid}"\n'), drivers={}
    )
    assert config.keys == KeysConfig(tmp_path / "keys", None, new.kid, None)
    sealer = load_sealer(config.gateway_id, config.keys)
    assert sealer.hub_key == new and sealer.suite.name == "mlkem768x25519-hkdf256-chacha20poly1305"
    blob = sealer.seal("data", 5, 9, 100, 200, b"batch")
    gateway_public = read_ed25519_public_key(tmp_path / "keys" / "gateway-signing.pub")
    header, body = open_envelope(
        blob, load_hub_private_keys(hub_folder), gateway_keyring([(GATEWAY, gateway_public)])
    )
    assert body == b"batch" and header.rkid == new.kid and old.kid != new.kid


def test_keys_table_defaults_and_paths(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path), drivers={})
    assert config.keys == KeysConfig(tmp_path / "keys")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "hub-a.pub").write_bytes(
        encode_hub_public_key(HubPrivateKey.generate().public)
    )
    config = load_config(
        write_config(
            tmp_path,
            '[keys]\ndir = "../secrets"\nhub_keys = ["etc/hub-a.pub"]\n'
            'suite = "x25519-hkdf256-aes256gcm"\n',
        ),
        drivers={},
    )
    assert config.keys.dir == tmp_path.parent / "secrets"
    assert config.keys.hub_keys == (tmp_path / "etc" / "hub-a.pub",)
    assert config.keys.suite == "x25519-hkdf256-aes256gcm"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('current_hub_key = "ABC"', "keys.current_hub_key: expected a key id"),
        ('suite = "x25519-rot13"', "keys.suite"),
        ('hub_keys = ["missing.pub"]', "keys.hub_keys: expected an existing file"),
        ("colour = 1", "keys.colour: unknown key"),
    ],
)
def test_keys_table_errors_name_the_line(tmp_path: Path, table: str, message: str) -> None:
    path = write_config(tmp_path, f"[keys]\n{table}\n")
    with pytest.raises(ConfigErrors) as errors:
        load_config(path, drivers={})
    assert f"{path}:8: {message}" in str(errors.value)


def test_check_config_refuses_a_signing_key_open_to_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    create_gateway_signing_key(tmp_path / "keys")
    (tmp_path / "keys" / "gateway-signing.key").chmod(0o644)
    assert main(["check-config", str(path)]) == 1
    assert "mode 0644" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The command line.
# --------------------------------------------------------------------------------------------


def secrets_in(folder: Path) -> list[str]:
    """Every spelling of the private keys under ``folder`` that must never be printed."""
    found = []
    key_file = folder / "keys" / "gateway-signing.key"
    if key_file.exists():
        pem = key_file.read_text()
        found.append("".join(pem.splitlines()[1:-1]))
        private = serialization.load_pem_private_key(pem.encode(), None)
        assert isinstance(private, Ed25519PrivateKey)
        raw = private.private_bytes_raw()
        found += [raw.hex(), base64.b64encode(raw).decode()]
    buffer_key = folder / "var" / "buffer.db.key"
    if buffer_key.exists():
        raw = buffer_key.read_bytes()
        found += [raw.hex(), base64.b64encode(raw).decode()]
    return found


def test_cli_init_show_and_hub_init(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path = write_config(tmp_path)
    assert main(["keys", "init", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    signer = load_gateway_signer(tmp_path / "keys")
    assert f"key id:      {signer.skid}" in out and f"sha256:{signer.fingerprint}" in out
    assert "BEGIN PUBLIC KEY" in out and "PRIVATE" not in out
    assert "created" in out and "note: no hub public key" in out
    assert mode_of(tmp_path / "keys" / "gateway-signing.key") == 0o600
    assert mode_of(tmp_path / "var" / "buffer.db.key") == 0o600
    key_bytes = (tmp_path / "keys" / "gateway-signing.key").read_bytes()

    # Without a hub key, show says what is missing and fails.
    assert main(["keys", "show", "--config", str(path)]) == 1
    assert "no hub public key" in capsys.readouterr().out

    assert main(["keys", "hub-init", "--out", str(tmp_path / "hub")]) == 0
    hub_out = capsys.readouterr().out
    (public_file,) = (tmp_path / "hub").glob("hub-*.pub")
    hub_kid = public_file.stem.removeprefix("hub-")
    assert f"hub key {hub_kid} (x25519)" in hub_out
    private_text = next((tmp_path / "hub").glob("hub-*.key")).read_text().split()[-1]
    assert private_text not in hub_out
    shutil.copy(public_file, tmp_path / "keys")

    assert main(["keys", "show", "--config", str(path)]) == 0
    shown = capsys.readouterr().out
    assert (
        f"{hub_kid}  x25519" in shown
        and "<- current, suite x25519-hkdf256-chacha20poly1305" in shown
    )
    assert signer.fingerprint in shown and "(mode 0600)" in shown

    # Running init again keeps everything.
    assert main(["keys", "init", "--config", str(path)]) == 0
    assert "kept (already there)" in capsys.readouterr().out
    assert (tmp_path / "keys" / "gateway-signing.key").read_bytes() == key_bytes

    printed = out + hub_out + shown + caplog.text
    for secret in secrets_in(tmp_path):
        assert secret not in printed


def test_cli_show_lists_receipt_keys_and_follows_the_seal_and_receipt_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = write_config(tmp_path, '[hub]\nseal = "none"\nreceipts = true\n')
    assert main(["keys", "init", "--config", str(plain)]) == 0
    capsys.readouterr()
    # Plain JSON needs no hub key; receipts on need a receipt key.
    assert main(["keys", "show", "--config", str(plain)]) == 1
    shown = capsys.readouterr().out
    assert "no hub public key" not in shown
    assert "hub.receipts is on and the key folder holds no receipt-*.pub" in shown
    assert "every signed command will be refused" in shown

    assert main(["keys", "hub-init", "--out", str(tmp_path / "hub")]) == 0
    capsys.readouterr()
    (receipt_public,) = (tmp_path / "hub").glob("receipt-*.pub")
    shutil.copy(receipt_public, tmp_path / "keys")
    assert main(["keys", "show", "--config", str(plain)]) == 0
    shown = capsys.readouterr().out
    kid = receipt_public.stem.removeprefix("receipt-")
    assert "hub receipt keys (1):" in shown and f"{kid}  ed25519" in shown
    # A second hub-init in the same folder keeps the receipt key (one per hub).
    assert main(["keys", "hub-init", "--out", str(tmp_path / "hub")]) == 0
    assert f"hub receipt-signing key {kid} (Ed25519)" in capsys.readouterr().out
    assert list((tmp_path / "hub").glob("receipt-*.pub")) == [receipt_public]


def test_cli_show_reports_a_refused_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    assert main(["keys", "init", "--config", str(path)]) == 0
    _, _, public_path = write_hub_keypair(tmp_path / "keys")
    public_path.chmod(0o666)
    assert main(["keys", "show", "--config", str(path)]) == 1
    assert f"fix with: chmod 644 {public_path}" in capsys.readouterr().out


def test_cli_hub_init_refuses_an_unknown_suite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "hub-init", "--out", str(tmp_path), "--suite", "rot13"]) == 1
    assert "unknown suite" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def reading(index: int) -> Callable[[int], bytes]:
    return lambda seq: b"reading %d #%d" % (index, seq)


def fill_buffer(folder: Path, key_file: Path) -> list[int]:
    seqs: list[int] = []

    async def body() -> None:
        cipher = RecordCipher(load_or_create_key(key_file))
        buffer = Buffer(folder / "var" / "buffer.db", cipher, 1 << 20)
        await buffer.open()
        try:
            for index in range(5):
                seqs.append(await buffer.append(Lane.TELEMETRY, "data", reading(index)))
        finally:
            await buffer.close()

    run_async(body)
    return seqs


def test_cli_wipe_leaves_nothing_readable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path = write_config(tmp_path)
    assert main(["keys", "init", "--config", str(path)]) == 0
    key_file = tmp_path / "var" / "buffer.db.key"
    seqs = fill_buffer(tmp_path, key_file)
    secrets = secrets_in(tmp_path)
    signer = load_gateway_signer(tmp_path / "keys")
    # An image of the card taken before the wipe, and a second name for the key's bytes on disk.
    stolen = tmp_path / "stolen"
    stolen.mkdir()
    for name in os.listdir(tmp_path / "var"):
        if name.startswith("buffer.db") and not name.endswith(".key"):
            shutil.copy(tmp_path / "var" / name, stolen / name)
    old_key = key_file.read_bytes()
    os.link(key_file, tmp_path / "same-inode")
    capsys.readouterr()

    assert main(["keys", "wipe", "--config", str(path), "--yes"]) == 0
    out = capsys.readouterr().out
    assert f"Revoke signing key {signer.skid}" in out
    assert not (tmp_path / "keys" / "gateway-signing.key").exists()
    assert not (tmp_path / "keys" / "gateway-signing.pub").exists()
    assert not key_file.exists()
    assert not [p for p in (tmp_path / "var").iterdir() if p.name.startswith("buffer.db")]
    # The key's bytes were overwritten in place before the name went away.
    remains = (tmp_path / "same-inode").read_bytes()
    assert len(remains) == len(old_key) and remains != old_key

    # The stolen copy does not open with any key the gateway can make now.
    quarantined: list[int] = []

    async def read_stolen() -> None:
        buffer = Buffer(
            stolen / "buffer.db", RecordCipher(load_or_create_key(tmp_path / "new.key")), 1 << 20
        )
        await buffer.open()
        try:
            assert await buffer.pending(100) == []
            quarantined.append((await buffer.stats()).quarantined_total)
        finally:
            await buffer.close()

    run_async(read_stolen)
    assert quarantined == [len(seqs)]
    for secret in secrets:
        assert secret not in out + caplog.text


def test_cli_wipe_asks_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path)
    assert main(["keys", "init", "--config", str(path)]) == 0
    key_file = tmp_path / "keys" / "gateway-signing.key"
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    assert main(["keys", "wipe", "--config", str(path)]) == 1
    out = capsys.readouterr().out
    assert "Type 'yes' to erase" in out and "nothing erased" in out and key_file.exists()
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["keys", "wipe", "--config", str(path)]) == 1
    assert key_file.exists()
    monkeypatch.setattr("sys.stdin", io.StringIO("yes\n"))
    assert main(["keys", "wipe", "--config", str(path)]) == 0
    assert not key_file.exists()
    assert main(["keys", "wipe", "--config", str(path), "--yes"]) == 0
    assert "nothing to erase" in capsys.readouterr().out


def test_crypto_erase_deletes_links_without_following_them(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"not ours")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "gateway-signing.key").symlink_to(target)
    wiped = crypto_erase(tmp_path / "keys", tmp_path / "buffer.db", tmp_path / "buffer.db.key")
    assert [(w.path.name, w.overwritten) for w in wiped] == [("gateway-signing.key", False)]
    assert target.read_bytes() == b"not ours"


def test_crypto_erase_overwrites_a_read_only_key(tmp_path: Path) -> None:
    create_gateway_signing_key(tmp_path / "keys")
    key_file = tmp_path / "keys" / "gateway-signing.key"
    key_file.chmod(0o400)
    before = key_file.read_bytes()
    os.link(key_file, tmp_path / "same-inode")
    wiped = crypto_erase(tmp_path / "keys", tmp_path / "buffer.db", tmp_path / "buffer.db.key")
    assert [(w.path.name, w.overwritten) for w in wiped] == [
        ("gateway-signing.key", True),
        ("gateway-signing.pub", False),
    ]
    assert (tmp_path / "same-inode").read_bytes() != before
    assert load_hub_public_keys(tmp_path / "keys") == {}
