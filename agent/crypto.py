"""Encryption at rest of buffered records, and the key file that holds the record key.

Every record the buffer stores is sealed with :class:`RecordCipher` (AEAD). Callers bind the
record's identity (sequence number, lane, ...) into the associated data, so a sealed row that is
copied onto another row, replayed or altered fails to open and raises :class:`RecordTampered`.

The key lives in a raw 32-byte file created on first run by :func:`load_or_create_key` with mode
0600; a key file that others could read is refused rather than silently used.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.sdk import KeyFileError, LampyreError, create_file_atomically, read_private_file

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


class RecordTampered(LampyreError):
    """A sealed record did not open: altered, truncated, moved to another row, or another key."""


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
    # One byte more than a key is read so an over-long file is noticed.
    data = read_private_file(path, limit=KEY_BYTES + 1)
    if len(data) != KEY_BYTES:
        raise KeyFileError(
            f"key file {path} holds {len(data)}{'+' if len(data) > KEY_BYTES else ''} bytes, "
            f"expected exactly {KEY_BYTES}; restore the right file (a new key cannot open "
            "records sealed with the old one)"
        )
    return data


def _create_key(path: Path) -> None:
    """Write a new key so that ``path`` either does not exist or holds a complete key."""
    create_file_atomically(path, secrets.token_bytes(KEY_BYTES))
    log.info("created a new record key file %s (mode 0600)", path)
