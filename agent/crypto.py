"""Encryption at rest of buffered records, and the key file that holds the record key.

Every record the buffer stores is sealed with :class:`RecordCipher` (AEAD). Callers bind the
record's identity (sequence number, lane, ...) into the associated data, so a sealed row that is
copied onto another row, replayed or altered fails to open and raises :class:`RecordTampered`.

The key lives in a raw 32-byte file created on first run by :func:`load_or_create_key` with mode
0600; a key file that others could read is refused rather than silently used.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.sdk import LampyreError

__all__ = [
    "FORMAT_VERSION",
    "KEY_BYTES",
    "NONCE_BYTES",
    "OVERHEAD_BYTES",
    "TAG_BYTES",
    "KeyFileError",
    "RecordCipher",
    "RecordTampered",
    "load_or_create_key",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""First byte of every sealed blob; a new layout or algorithm gets a new number."""
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD_BYTES = 1 + NONCE_BYTES + TAG_BYTES
"""How many bytes :meth:`RecordCipher.seal` adds to a plaintext."""

# Bits that give group or others any access: a key file with one of them set is refused.
_OPEN_TO_OTHERS = stat.S_IRWXG | stat.S_IRWXO


class RecordTampered(LampyreError):
    """A sealed record did not open: altered, truncated, moved to another row, or another key."""


class KeyFileError(LampyreError):
    """The key file cannot be used as it is (permissions, type or size). Start-up must stop."""


class RecordCipher:
    """AES-256-GCM with a fresh random 96-bit nonce per record.

    Why AES-256-GCM: gateways are x86 boxes with AES-NI or ARMv8 boards with the crypto
    extensions, where OpenSSL's GCM is the fastest AEAD available and constant-time.
    ChaCha20-Poly1305 is the alternative for cores without AES instructions (older ARMv7, some
    Cortex-A53 builds without the extensions); the version byte leaves room for switching.

    Random nonces are safe here: a key seals far fewer than 2**32 records over its life (the
    birthday bound for 96-bit nonces), since the buffer holds at most tens of MiB at a time.

    Blob layout: ``version (1) || nonce (12) || ciphertext || tag (16)``. The version byte is
    authenticated too (it is prepended to the caller's associated data).
    """

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a record key is {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        # Never let the key reach a log line or a traceback through repr().
        return "RecordCipher(<AES-256-GCM key hidden>)"

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt and authenticate ``plaintext``, bound to ``aad`` (not stored in the blob)."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        header = bytes((FORMAT_VERSION,))
        return header + nonce + self._aead.encrypt(nonce, plaintext, header + aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        """The plaintext of ``blob`` sealed with the same ``aad``; :class:`RecordTampered`
        on any failure (the message never includes record contents)."""
        if len(blob) < OVERHEAD_BYTES:
            raise RecordTampered(f"sealed record too short ({len(blob)} bytes)")
        if blob[0] != FORMAT_VERSION:
            raise RecordTampered(f"unknown sealed record version {blob[0]}")
        nonce = blob[1 : 1 + NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, blob[1 + NONCE_BYTES :], blob[:1] + aad)
        except InvalidTag:
            raise RecordTampered("sealed record failed authentication") from None


def load_or_create_key(path: Path) -> bytes:
    """The record key stored at ``path``, created (32 random bytes, mode 0600) on first run.

    Blocking (file system and fsync); the runtime calls it through ``asyncio.to_thread``.
    Raises :class:`KeyFileError` if ``path`` is a symlink or not a regular file, if its mode
    gives any access to group or others, or if it does not hold exactly 32 bytes.
    """
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    # FileExistsError: another process created it between our read and our create; use theirs.
    with contextlib.suppress(FileExistsError):
        _create_key(path)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KeyFileError(
                f"key file {path} is a symbolic link; point the configuration at the real file"
            ) from None
        if isinstance(exc, FileNotFoundError):
            raise
        raise KeyFileError(f"cannot open key file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & _OPEN_TO_OTHERS:
            raise KeyFileError(
                f"key file {path} has mode {mode:04o}, which lets group or others use it; "
                f"fix with: chmod 600 {path}"
            )
        # Read one byte more than a key so an over-long file is noticed.
        data = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_BYTES:
        raise KeyFileError(
            f"key file {path} holds {len(data)}{'+' if len(data) > KEY_BYTES else ''} bytes, "
            f"expected exactly {KEY_BYTES}; restore the right file (a new key cannot open "
            "records sealed with the old one)"
        )
    return data


def _create_key(path: Path) -> None:
    """Write a new key so that ``path`` either does not exist or holds a complete key.

    The key is written and fsynced under a temporary name, then hard-linked to ``path``:
    linking fails if ``path`` exists (like O_EXCL), and a crash or power cut can never leave a
    short key file behind that would block the next start.
    """
    folder = path.parent
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    temp = folder / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            # The umask may not remove more than 0600 allows, but be explicit anyway.
            os.fchmod(fd, 0o600)
            view = memoryview(secrets.token_bytes(KEY_BYTES))
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    _fsync_dir(folder)
    log.info("created a new record key file %s (mode 0600)", path)


def _remove_stale_temporaries(path: Path) -> None:
    # Left by a crash between writing a temporary key and removing it; harmless, but tidy up.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
