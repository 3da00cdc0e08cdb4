"""The gateway's keys on disk: creation, loading, checks and crypto-erase.

The key folder (``[keys] dir``, default ``keys`` next to the configuration file) holds:

=========================  ==========================================================  ======
file                       what                                                        mode
=========================  ==========================================================  ======
``gateway-signing.key``    the gateway's Ed25519 private key, PEM PKCS#8, unencrypted  0600
``gateway-signing.pub``    its public key, PEM SubjectPublicKeyInfo (for enrolment)    0644
``hub-<name>.pub``         a hub HPKE public key (readings are sealed to it)           0644
``post-<name>.pub``        a control-post Ed25519 public key (commands signed by it)   0644
``receipt-<name>.pub``     a hub Ed25519 public key (hub receipts signed by it)        0644
=========================  ==========================================================  ======

The buffer's at-rest key stays where ``[buffer] key_file`` puts it (``agent/crypto.py`` creates
and checks it); ``lampyre keys init`` creates it there too when it is missing, and
``lampyre keys wipe`` erases it.

HPKE key files are one line of text, ``hpke-public-key <kem> <base64>`` (or
``hpke-private-key <kem> <base64>`` on the hub), holding the RFC 9180 serialisation of the key:
the X25519 and the hybrid MLKEM768-X25519 keys have no standard PEM form in ``cryptography``,
and every HPKE library takes these raw bytes. An X25519 key in PEM (``openssl genpkey
-algorithm X25519``) is accepted as well. See ``docs/envelope.md``.

Rules: a private key file gives no access to group or others (``read_private_file``); a public
key file, and the key folder, must not be writable by group or others, because whoever can
replace ``hub-*.pub`` reads every later reading and whoever can replace ``post-*.pub`` commands
the lamps. No key is ever overwritten, printed or logged: only public keys, fingerprints and
key ids are.

Everything here blocks (file system, fsync): call it before the event loop starts, from a CLI,
or through ``asyncio.to_thread``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.envelope import (
    DEFAULT_SUITE,
    GATEWAY_ID_PATTERN,
    SUITE_NAMES,
    SUITES,
    GatewaySigner,
    HubPrivateKey,
    HubPublicKey,
    Kem,
    Sealer,
    Suite,
    default_suite_for,
    key_id,
)
from agent.sdk import (
    KeyFileError,
    LampyreError,
    create_file_atomically,
    fsync_folder,
    read_private_file,
    read_public_file,
)

if TYPE_CHECKING:
    from agent.config import KeysConfig

__all__ = [
    "HUB_PRIVATE_GLOB",
    "HUB_PUBLIC_GLOB",
    "POST_PUBLIC_GLOB",
    "RECEIPT_PUBLIC_GLOB",
    "RECEIPT_SIGNING_KEY_FILE",
    "SIGNING_KEY_FILE",
    "SIGNING_PUBLIC_FILE",
    "AgentKeys",
    "KeyFileError",
    "KeySetupError",
    "WipedFile",
    "check_key_folder",
    "create_gateway_signing_key",
    "crypto_erase",
    "decode_hub_private_key",
    "decode_hub_public_key",
    "ed25519_key_id",
    "ed25519_public_pem",
    "encode_hub_private_key",
    "encode_hub_public_key",
    "erase_targets",
    "generate_hub_keypair",
    "hub_key_files",
    "load_agent_keys",
    "load_ed25519_private_key",
    "load_ed25519_public_keys",
    "load_enrolled_gateway_keys",
    "load_gateway_signer",
    "load_hub_private_keys",
    "load_hub_public_keys",
    "load_post_public_keys",
    "load_receipt_public_keys",
    "load_sealer",
    "read_ed25519_public_key",
    "read_hub_public_key",
    "select_hub_key",
    "write_ed25519_keypair",
    "write_hub_keypair",
]

log = logging.getLogger(__name__)

SIGNING_KEY_FILE: Final = "gateway-signing.key"
SIGNING_PUBLIC_FILE: Final = "gateway-signing.pub"
HUB_PUBLIC_GLOB: Final = "hub-*.pub"
HUB_PRIVATE_GLOB: Final = "hub-*.key"
POST_PUBLIC_GLOB: Final = "post-*.pub"
RECEIPT_PUBLIC_GLOB: Final = "receipt-*.pub"
RECEIPT_SIGNING_KEY_FILE: Final = "receipt-signing.key"
"""On the hub: the Ed25519 key that signs receipts (``lampyre keys hub-init`` creates it)."""
PUBLIC_FILE_MODE: Final = 0o644
MAX_KEY_FILE_BYTES: Final = 8192
"""Largest key file read (a hybrid HPKE public key is about 1.7 kB of text)."""

_PUBLIC_TAG: Final = "hpke-public-key"
_PRIVATE_TAG: Final = "hpke-private-key"
_WRITABLE_BY_OTHERS: Final = stat.S_IWGRP | stat.S_IWOTH


class KeySetupError(LampyreError):
    """The keys cannot be used together as configured (no signing key yet, no hub key, an
    unknown current hub key, a suite that does not fit the hub key). The message says what to
    do."""


# --------------------------------------------------------------------------------------------
# Reading public files and checking the folder.
# --------------------------------------------------------------------------------------------


def check_key_folder(folder: Path) -> None:
    """Refuse a key folder that group or others may write to (they could swap a hub or post
    key). A missing folder is fine: nothing in it can be trusted or refused yet."""
    try:
        info = folder.stat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        raise KeyFileError(f"key folder {folder} is not a folder")
    mode = stat.S_IMODE(info.st_mode)
    if mode & _WRITABLE_BY_OTHERS:
        raise KeyFileError(
            f"key folder {folder} has mode {mode:04o}, which lets group or others replace keys; "
            f"fix with: chmod 700 {folder}"
        )


def _read_public_file(path: Path) -> bytes:
    """A public key file's content; refused when group or others may write it."""
    data = read_public_file(path, limit=MAX_KEY_FILE_BYTES + 1)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"key file {path} is larger than {MAX_KEY_FILE_BYTES} bytes")
    return data


# --------------------------------------------------------------------------------------------
# Ed25519: the gateway's signing key and the control posts' keys.
# --------------------------------------------------------------------------------------------


def ed25519_public_pem(public_key: Ed25519PublicKey) -> bytes:
    """PEM SubjectPublicKeyInfo (RFC 8410), what ``gateway-signing.pub`` holds."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_gateway_signer(keys_dir: Path) -> GatewaySigner:
    """The gateway's signing key from ``keys_dir/gateway-signing.key``.

    Raises :class:`KeySetupError` when there is none yet (the message says to run ``lampyre
    keys init``) and :class:`KeyFileError` when the file or the folder is refused or the file is
    not an Ed25519 private key in PEM.
    """
    check_key_folder(keys_dir)
    path = keys_dir / SIGNING_KEY_FILE
    try:
        data = read_private_file(path, limit=MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise KeySetupError(
            f"no gateway signing key at {path}; create it with: lampyre keys init --config FILE"
        ) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(
            f"key file {path} is not an unencrypted PEM private key; restore the right file"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"key file {path} does not hold an Ed25519 private key")
    return GatewaySigner(key)


def create_gateway_signing_key(keys_dir: Path) -> tuple[GatewaySigner, bool]:
    """The gateway's signing key, created (mode 0600, atomically) if there is none; and whether
    it was created now. An existing key is never replaced. ``gateway-signing.pub`` is written
    from the private key when missing, and checked against it when present."""
    check_key_folder(keys_dir)
    path = keys_dir / SIGNING_KEY_FILE
    created = False
    if not path.exists() and not path.is_symlink():
        private_key = Ed25519PrivateKey.generate()
        pem = private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            create_file_atomically(path, pem, mode=0o600)
            created = True
            log.info("created the gateway signing key file %s (mode 0600)", path)
        except FileExistsError:
            pass  # another process made one meanwhile: use theirs
    signer = load_gateway_signer(keys_dir)
    public_path = keys_dir / SIGNING_PUBLIC_FILE
    expected = ed25519_public_pem(signer.public_key)
    try:
        create_file_atomically(public_path, expected, mode=PUBLIC_FILE_MODE)
    except FileExistsError:
        if read_ed25519_public_key(public_path) != signer.public_key:
            raise KeyFileError(
                f"{public_path} does not hold the public key of {path}; delete it and run "
                "lampyre keys init again to rewrite it from the private key"
            ) from None
    return signer, created


def read_ed25519_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (refused if group or others may write it)."""
    data = _read_public_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(f"key file {path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"key file {path} does not hold an Ed25519 public key")
    return key


def load_post_public_keys(keys_dir: Path) -> dict[str, Ed25519PublicKey]:
    """The control posts' Ed25519 public keys (every ``post-*.pub`` of ``keys_dir``), by key id
    (the first 16 hex digits of the SHA-256 of the raw 32-byte key). Empty when there are none.
    Raises :class:`KeyFileError` for a refused file or folder."""
    return load_ed25519_public_keys(keys_dir, POST_PUBLIC_GLOB)


def load_receipt_public_keys(keys_dir: Path) -> dict[str, Ed25519PublicKey]:
    """The hub's receipt-signing public keys (every ``receipt-*.pub`` of ``keys_dir``), by key
    id, as :func:`load_post_public_keys`."""
    return load_ed25519_public_keys(keys_dir, RECEIPT_PUBLIC_GLOB)


def load_ed25519_public_keys(folder: Path, pattern: str) -> dict[str, Ed25519PublicKey]:
    """Every Ed25519 public key of ``folder`` whose file name matches ``pattern``, by key id.
    Empty when the folder does not exist."""
    if not folder.exists():
        return {}
    check_key_folder(folder)
    keys: dict[str, Ed25519PublicKey] = {}
    for path in sorted(folder.glob(pattern)):
        key = read_ed25519_public_key(path)
        keys[key_id(key.public_bytes_raw())] = key
    return keys


def load_enrolled_gateway_keys(folder: Path) -> dict[str, dict[str, Ed25519PublicKey]]:
    """The hub side's enrolment: gateway id -> {key id: Ed25519 public key}, from
    ``folder/<gateway id>/*.pub`` (each gateway's ``gateway-signing.pub``, as ``lampyre keys
    show`` prints it; several files during a rotation). Folders whose name is not a gateway id
    are refused: a typo must not silently leave a gateway unenrolled."""
    check_key_folder(folder)
    enrolled: dict[str, dict[str, Ed25519PublicKey]] = {}
    for sub in sorted(folder.iterdir()):
        if not sub.is_dir():
            continue
        if not re.fullmatch(GATEWAY_ID_PATTERN, sub.name):
            raise KeyFileError(f"{sub}: the folder name is not a gateway id")
        keys = load_ed25519_public_keys(sub, "*.pub")
        if keys:
            enrolled[sub.name] = keys
    return enrolled


def ed25519_key_id(public_key: Ed25519PublicKey) -> str:
    """The key id of an Ed25519 public key (16 hex digits of the SHA-256 of its raw bytes)."""
    return key_id(public_key.public_bytes_raw())


def load_ed25519_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file, refused if group or others have any access."""
    data = read_private_file(path, limit=MAX_KEY_FILE_BYTES + 1)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(f"key file {path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"key file {path} does not hold an Ed25519 private key")
    return key


def write_ed25519_keypair(private_path: Path, public_dir: Path, prefix: str) -> tuple[str, Path]:
    """Create an Ed25519 key at ``private_path`` (mode 0600) and its public key as
    ``public_dir/<prefix>-<key id>.pub``; returns the key id and the public file. Never
    overwrites (:class:`FileExistsError`)."""
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    kid = ed25519_key_id(private_key.public_key())
    public_path = public_dir / f"{prefix}-{kid}.pub"
    create_file_atomically(private_path, pem, mode=0o600)
    create_file_atomically(
        public_path, ed25519_public_pem(private_key.public_key()), mode=PUBLIC_FILE_MODE
    )
    return kid, public_path


# --------------------------------------------------------------------------------------------
# HPKE keys: the hub's.
# --------------------------------------------------------------------------------------------


def encode_hub_public_key(key: HubPublicKey) -> bytes:
    """The text of a ``hub-*.pub`` file."""
    return f"{_PUBLIC_TAG} {key.kem.value} {base64.b64encode(key.raw).decode()}\n".encode()


def encode_hub_private_key(key: HubPrivateKey) -> bytes:
    """The text of a hub's private key file (keep it on the hub, mode 0600)."""
    encoded = base64.b64encode(key.private_bytes()).decode()
    return f"{_PRIVATE_TAG} {key.kem.value} {encoded}\n".encode()


def _key_line(data: bytes, tag: str, source: str) -> tuple[Kem, bytes]:
    """The KEM and raw bytes of a one-line HPKE key file."""
    try:
        lines = [
            line.strip()
            for line in data.decode("ascii").splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
    except UnicodeDecodeError:
        raise KeyFileError(f"key file {source} is not text") from None
    words = lines[0].split() if len(lines) == 1 else []
    if len(words) != 3 or words[0] != tag:
        raise KeyFileError(f"key file {source}: expected one line '{tag} <kem> <base64>'")
    try:
        kem = Kem(words[1])
    except ValueError:
        known = ", ".join(k.value for k in Kem)
        raise KeyFileError(f"key file {source}: unknown KEM; expected one of: {known}") from None
    try:
        raw = base64.b64decode(words[2], validate=True)
    except binascii.Error:
        raise KeyFileError(f"key file {source}: the key is not valid base64") from None
    return kem, raw


def decode_hub_public_key(data: bytes, source: str = "<bytes>") -> HubPublicKey:
    """A hub public key from the text of a ``hub-*.pub`` file (or an X25519 PEM public key)."""
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise KeyFileError(f"key file {source} is not a PEM public key") from None
        if not isinstance(key, x25519.X25519PublicKey):
            raise KeyFileError(f"key file {source}: a PEM hub key must be an X25519 key")
        return HubPublicKey(Kem.X25519, key.public_bytes_raw())
    kem, raw = _key_line(data, _PUBLIC_TAG, source)
    try:
        return HubPublicKey(kem, raw)
    except ValueError as exc:
        raise KeyFileError(f"key file {source}: {exc}") from None


def decode_hub_private_key(data: bytes, source: str = "<bytes>") -> HubPrivateKey:
    """A hub private key from the text of its file (or an X25519 PEM PKCS#8 private key)."""
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise KeyFileError(f"key file {source} is not an unencrypted PEM private key") from None
        if not isinstance(key, x25519.X25519PrivateKey):
            raise KeyFileError(f"key file {source}: a PEM hub key must be an X25519 key")
        return HubPrivateKey(Kem.X25519, key.private_bytes_raw())
    kem, raw = _key_line(data, _PRIVATE_TAG, source)
    try:
        return HubPrivateKey(kem, raw)
    except ValueError:
        raise KeyFileError(f"key file {source}: not a valid {kem.value} private key") from None


def generate_hub_keypair(suite: str = DEFAULT_SUITE) -> tuple[bytes, bytes]:
    """A new hub key pair for ``suite``'s KEM: ``(private key file, public key file)`` texts."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; expected one of: {', '.join(SUITE_NAMES)}")
    key = HubPrivateKey.generate(SUITES[suite].kem)
    return encode_hub_private_key(key), encode_hub_public_key(key.public)


def write_hub_keypair(out_dir: Path, suite: str = DEFAULT_SUITE) -> tuple[HubPublicKey, Path, Path]:
    """Create a hub key pair in ``out_dir``: ``hub-<kid>.key`` (mode 0600) and ``hub-<kid>.pub``
    (0644). Returns the public key and both paths. Never overwrites (a name clash raises
    :class:`FileExistsError`)."""
    private_text, public_text = generate_hub_keypair(suite)
    public = decode_hub_public_key(public_text)
    private_path = out_dir / f"hub-{public.kid}.key"
    public_path = out_dir / f"hub-{public.kid}.pub"
    create_file_atomically(private_path, private_text, mode=0o600)
    create_file_atomically(public_path, public_text, mode=PUBLIC_FILE_MODE)
    return public, private_path, public_path


def read_hub_public_key(path: Path) -> HubPublicKey:
    """A hub public key from its file (refused if group or others may write it)."""
    return decode_hub_public_key(_read_public_file(path), str(path))


def load_hub_public_keys(files: Path | Iterable[Path]) -> dict[str, HubPublicKey]:
    """Hub public keys by key id, from a folder (its ``hub-*.pub`` files), one file or a list
    of files.

    Raises :class:`FileNotFoundError` for a listed file that does not exist and
    :class:`KeyFileError` for a refused or unreadable one.
    """
    if isinstance(files, Path):
        files = _files_in(files, HUB_PUBLIC_GLOB)
    keys: dict[str, HubPublicKey] = {}
    for path in files:
        key = read_hub_public_key(path)
        keys[key.kid] = key
    return keys


def load_hub_private_keys(files: Path | Iterable[Path]) -> dict[str, HubPrivateKey]:
    """The hub side: private keys by key id, from a folder (its ``hub-*.key`` files), one file
    or a list of files, each refused if group or others have any access to it."""
    if isinstance(files, Path):
        files = _files_in(files, HUB_PRIVATE_GLOB)
    keys: dict[str, HubPrivateKey] = {}
    for path in files:
        key = decode_hub_private_key(read_private_file(path, limit=MAX_KEY_FILE_BYTES), str(path))
        keys[key.kid] = key
    return keys


def _files_in(path: Path, pattern: str) -> list[Path]:
    """The files of a key folder matching ``pattern``, or ``[path]`` when it is not a folder."""
    if not path.is_dir():
        return [path]
    check_key_folder(path)
    return sorted(path.glob(pattern))


# --------------------------------------------------------------------------------------------
# The configuration: which hub key, which suite.
# --------------------------------------------------------------------------------------------


def hub_key_files(keys: KeysConfig) -> list[Path]:
    """The hub public key files the configuration names: ``hub_keys``, else every
    ``hub-*.pub`` of the key folder."""
    if keys.hub_keys is not None:
        return list(keys.hub_keys)
    if not keys.dir.is_dir():
        return []
    return sorted(keys.dir.glob(HUB_PUBLIC_GLOB))


def select_hub_key(
    hub_keys: Mapping[str, HubPublicKey], current: str | None, suite: str | None
) -> tuple[HubPublicKey, Suite]:
    """The hub key new envelopes are sealed to, and the suite: ``current`` (a key id) or the
    only key; ``suite`` or the default suite of that key's KEM. :class:`KeySetupError` when the
    choice is impossible or ambiguous."""
    if not hub_keys:
        raise KeySetupError(
            "no hub public key: copy the hub's key file into the key folder as hub-<name>.pub "
            "(lampyre keys hub-init makes one for a test hub)"
        )
    if current is None:
        if len(hub_keys) > 1:
            raise KeySetupError(
                f"{len(hub_keys)} hub keys ({', '.join(sorted(hub_keys))}) and no "
                "keys.current_hub_key: name the one new batches are sealed to"
            )
        (key,) = hub_keys.values()
    elif current in hub_keys:
        key = hub_keys[current]
    else:
        raise KeySetupError(
            f"keys.current_hub_key {current} is none of the hub keys found "
            f"({', '.join(sorted(hub_keys))})"
        )
    chosen = default_suite_for(key.kem) if suite is None else SUITES.get(suite)
    if chosen is None:
        raise KeySetupError(f"unknown suite {suite!r}; expected one of: {', '.join(SUITE_NAMES)}")
    if chosen.kem is not key.kem:
        fitting = ", ".join(name for name, s in SUITES.items() if s.kem is key.kem)
        raise KeySetupError(
            f"keys.suite {chosen.name} does not fit hub key {key.kid} ({key.kem.value}); "
            f"expected one of: {fitting}"
        )
    return key, chosen


def load_sealer(gateway_id: str, keys: KeysConfig) -> Sealer:
    """Everything the pipeline needs to seal envelopes, from the ``[keys]`` configuration:
    the signing key, the current hub key and the suite. Blocking; raises
    :class:`KeySetupError` or :class:`KeyFileError` with the reason (start-up must stop)."""
    signer = load_gateway_signer(keys.dir)
    hub_key, suite = select_hub_key(
        load_hub_public_keys(hub_key_files(keys)), keys.current_hub_key, keys.suite
    )
    return Sealer(gateway_id, hub_key, signer, suite.name)


@dataclass(frozen=True)
class AgentKeys:
    """What the running agent holds, loaded once at start-up by :func:`load_agent_keys`."""

    signer: GatewaySigner | None
    """Signs envelopes and acks; None only when neither sealing nor signed commands are on and
    ``lampyre keys init`` was never run (plain JSON everywhere: a demo bench)."""
    sealer: Sealer | None
    """None with ``seal = "none"``."""
    post_keys: Mapping[str, Ed25519PublicKey]
    """Trusted control-post keys by key id (may be empty: every signed command is refused)."""
    receipt_keys: Mapping[str, Ed25519PublicKey]
    """The hub's receipt-signing keys (needed with receipts)."""


def load_agent_keys(
    gateway_id: str,
    keys: KeysConfig,
    *,
    seal: bool,
    signed_commands_only: bool,
    receipts: bool,
) -> AgentKeys:
    """Every key the agent needs, checked; blocking. :class:`KeySetupError` or
    :class:`KeyFileError` with the reason when one is missing or refused (start-up stops).

    The signing key is required when readings are sealed or commands must be signed (the acks
    are then signed too); otherwise it is used if present."""
    sealer = load_sealer(gateway_id, keys) if seal else None
    if sealer is not None:
        signer: GatewaySigner | None = sealer.signer
    elif signed_commands_only or (keys.dir / SIGNING_KEY_FILE).exists():
        signer = load_gateway_signer(keys.dir)
    else:
        signer = None
    post_keys = load_post_public_keys(keys.dir)
    receipt_keys = load_receipt_public_keys(keys.dir) if receipts else {}
    if receipts and not receipt_keys:
        raise KeySetupError(
            f"hub.receipts is on but {keys.dir} holds no receipt-*.pub: copy the hub's "
            "receipt-signing public key there (lampyre keys hub-init makes one for a test hub)"
        )
    return AgentKeys(signer, sealer, post_keys, receipt_keys)


# --------------------------------------------------------------------------------------------
# Crypto-erase.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WipedFile:
    path: Path
    overwritten: bool
    """The content was overwritten with random bytes before the file was deleted."""


def erase_targets(keys_dir: Path, buffer_path: Path, buffer_key: Path) -> list[tuple[Path, bool]]:
    """What :func:`crypto_erase` removes, as ``(path, overwrite first)``, existing files only:
    the signing key pair, the buffer key, the buffer database with its ``-wal``, ``-shm`` and
    ``-journal`` files, copies set aside as corrupt, and temporary files a crash may have left
    while creating a key."""
    targets: list[tuple[Path, bool]] = [
        (keys_dir / SIGNING_KEY_FILE, True),
        (buffer_key, True),
        (keys_dir / SIGNING_PUBLIC_FILE, False),
    ]
    for name in (SIGNING_KEY_FILE, buffer_key.name):
        folder = keys_dir if name == SIGNING_KEY_FILE else buffer_key.parent
        targets.extend((stale, True) for stale in sorted(folder.glob(f".{name}.*.tmp")))
    targets.extend(
        (buffer_path.with_name(buffer_path.name + suffix), False)
        for suffix in ("", "-wal", "-shm", "-journal")
    )
    targets.extend(
        (aside, False) for aside in sorted(buffer_path.parent.glob(f"{buffer_path.name}.corrupt-*"))
    )
    seen: set[Path] = set()
    found: list[tuple[Path, bool]] = []
    for path, overwrite in targets:
        if path in seen or not (path.is_file() or path.is_symlink()):
            continue
        seen.add(path)
        found.append((path, overwrite))
    return found


def crypto_erase(keys_dir: Path, buffer_path: Path, buffer_key: Path) -> list[WipedFile]:
    """Erase the gateway's secrets so that nothing it stored can be read or signed again.

    The private keys (the signing key, the buffer key) are overwritten with random bytes,
    fsynced and deleted; the buffer database files are deleted. What makes this an erase is
    deleting the **keys**, not overwriting: on an SD card or eMMC, the flash translation layer
    writes an overwrite to fresh pages and keeps the old ones until it garbage-collects them, and
    a journaling file system may hold copies of its own, so the old bytes of any file may survive
    on the chip whatever we write. Every buffered record is sealed with the buffer key (and, with
    sealing on, to the hub's key, which the gateway never had), so once the keys are gone no
    surviving copy of the database, a WAL fragment or a stolen card image can be opened. The
    overwrite only shortens the time a key stays readable on storage that does overwrite in
    place; the signing key's fingerprint must still be revoked at the hub, because an image
    taken before the wipe would still hold it.

    Stop the agent first: a running agent keeps its keys in memory and recreates its files.
    Blocking. Files that do not exist are skipped; returns what was removed.
    """
    wiped: list[WipedFile] = []
    folders: set[Path] = set()
    for path, secret in erase_targets(keys_dir, buffer_path, buffer_key):
        # A link is deleted, never followed: what it points to is not ours to erase.
        overwrite = secret and not path.is_symlink()
        if overwrite:
            _overwrite(path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        folders.add(path.parent)
        wiped.append(WipedFile(path, overwrite))
        log.info("erased %s", path)
    for folder in folders:
        _fsync_folder(folder)
    return wiped


def _overwrite(path: Path) -> None:
    """Write random bytes over the whole file, in place, and fsync (best effort, see
    :func:`crypto_erase`)."""
    # A key made read-only (0400) by hand must still be overwritten; it is deleted next anyway.
    with contextlib.suppress(OSError):
        path.chmod(0o600)
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        written = 0
        while written < size:
            written += os.write(fd, os.urandom(min(size - written, 1 << 16)))
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fsync_folder(folder)
