"""Record encryption at rest and the key file."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.crypto import (
    KEY_BYTES,
    OVERHEAD_BYTES,
    KeyFileError,
    RecordCipher,
    RecordTampered,
    load_or_create_key,
)
from agent.sdk import LampyreError

KEY = bytes(range(32))
CIPHER = RecordCipher(KEY)


def test_errors_belong_to_the_lampyre_tree() -> None:
    assert issubclass(RecordTampered, LampyreError)
    assert issubclass(KeyFileError, LampyreError)


@settings(max_examples=60)
@given(plaintext=st.binary(max_size=2048), aad=st.binary(max_size=64))
def test_round_trip(plaintext: bytes, aad: bytes) -> None:
    blob = CIPHER.seal(plaintext, aad)
    assert len(blob) == len(plaintext) + OVERHEAD_BYTES
    assert blob[0] == 1
    assert CIPHER.open(blob, aad) == plaintext


@settings(max_examples=60)
@given(plaintext=st.binary(max_size=256), aad=st.binary(max_size=32), data=st.data())
def test_any_single_bit_flip_is_detected(plaintext: bytes, aad: bytes, data: st.DataObject) -> None:
    blob = bytearray(CIPHER.seal(plaintext, aad))
    bit = data.draw(st.integers(min_value=0, max_value=len(blob) * 8 - 1), label="bit")
    blob[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(RecordTampered):
        CIPHER.open(bytes(blob), aad)


@settings(max_examples=60)
@given(plaintext=st.binary(max_size=256), aad=st.binary(max_size=32), other=st.binary(max_size=32))
def test_a_different_aad_is_detected(plaintext: bytes, aad: bytes, other: bytes) -> None:
    if other == aad:
        other = aad + b"\x00"
    blob = CIPHER.seal(plaintext, aad)
    with pytest.raises(RecordTampered):
        CIPHER.open(blob, other)


@settings(max_examples=30)
@given(plaintext=st.binary(max_size=256), aad=st.binary(max_size=32))
def test_two_seals_of_the_same_plaintext_differ(plaintext: bytes, aad: bytes) -> None:
    assert CIPHER.seal(plaintext, aad) != CIPHER.seal(plaintext, aad)


@settings(max_examples=30)
@given(blob=st.binary(max_size=64))
def test_garbage_and_truncated_blobs_are_tampered(blob: bytes) -> None:
    with pytest.raises(RecordTampered):
        CIPHER.open(blob, b"")


def test_another_key_cannot_open() -> None:
    blob = CIPHER.seal(b"reading", b"aad")
    with pytest.raises(RecordTampered):
        RecordCipher(bytes(32)).open(blob, b"aad")


def test_cipher_refuses_a_short_key_and_hides_its_key() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        RecordCipher(b"short")
    assert KEY.hex() not in repr(CIPHER)


def test_key_file_is_created_0600_with_its_folder_0700(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "secrets" / "buffer.key"
    with caplog.at_level(logging.DEBUG):
        key = load_or_create_key(path)
    assert len(key) == KEY_BYTES
    assert path.read_bytes() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # Only the key file itself is left behind (no temporary), and the key is never logged.
    assert sorted(p.name for p in path.parent.iterdir()) == ["buffer.key"]
    assert key.hex() not in caplog.text
    assert repr(key) not in caplog.text
    # Later runs read the same key.
    assert load_or_create_key(path) == key


def test_key_file_creation_ignores_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "buffer.key"
        load_or_create_key(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_two_gateways_get_different_keys(tmp_path: Path) -> None:
    assert load_or_create_key(tmp_path / "a.key") != load_or_create_key(tmp_path / "b.key")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o610])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "buffer.key"
    load_or_create_key(path)
    path.chmod(mode)
    with pytest.raises(KeyFileError) as info:
        load_or_create_key(path)
    message = str(info.value)
    assert str(path) in message
    assert f"{mode:04o}" in message
    assert f"chmod 600 {path}" in message


def test_key_file_0400_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "buffer.key"
    key = load_or_create_key(path)
    path.chmod(0o400)
    assert load_or_create_key(path) == key


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_key_file_of_the_wrong_length_is_refused(tmp_path: Path, size: int) -> None:
    path = tmp_path / "buffer.key"
    path.write_bytes(b"k" * size)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="expected exactly 32") as info:
        load_or_create_key(path)
    assert str(path) in str(info.value)
    # Refusing must not replace it: the old records need the old key.
    assert path.read_bytes() == b"k" * size


def test_key_file_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    load_or_create_key(real)
    link = tmp_path / "buffer.key"
    link.symlink_to(real)
    with pytest.raises(KeyFileError, match="symbolic link") as info:
        load_or_create_key(link)
    assert str(link) in str(info.value)


def test_dangling_symlink_is_refused_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.key"
    link = tmp_path / "buffer.key"
    link.symlink_to(target)
    with pytest.raises(KeyFileError):
        load_or_create_key(link)
    assert not target.exists()


def test_key_path_that_is_a_folder_or_fifo_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "buffer.key"
    folder.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_or_create_key(folder)
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_or_create_key(fifo)


def test_stale_temporary_from_a_crash_is_cleaned_up(tmp_path: Path) -> None:
    stale = tmp_path / ".buffer.key.0123456789ab.tmp"
    stale.write_bytes(b"x" * 32)
    load_or_create_key(tmp_path / "buffer.key")
    assert not stale.exists()
