"""The readings envelope: round trips for every suite, every tamper refused with its reason, any
bytes refused with an EnvelopeError only, and docs/envelope.md checked by the code and by a
second implementation written from the page (RFC 9180 and X-Wing from primitives)."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.envelope import (
    HPKE_INFO_LABEL,
    MAGIC,
    MAX_HEADER_BYTES,
    SIGNATURE_LABEL,
    SUITE_NAMES,
    SUITES,
    BadSignature,
    DecryptFailed,
    EnvelopeError,
    EnvelopeHeader,
    GatewaySigner,
    HeaderMismatch,
    HubPrivateKey,
    Kem,
    Malformed,
    Sealer,
    UnknownKey,
    UnsupportedVersion,
    gateway_keyring,
    hpke_info,
    hub_keyring,
    open_envelope,
    parse_envelope,
    seal,
    signature_input,
    verify_only,
)
from agent.keys import decode_hub_public_key, encode_hub_public_key

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "envelope.md"
GATEWAY = "cab-0042"
SEQ = 1_764_300_000_000_001
T0 = 1_764_300_000_123
BODY = b'{"v":1,"gateway":"cab-0042","readings":[]}'

# Keys are slow enough to make (ML-KEM) that each test module makes them once.
SIGNER = GatewaySigner.generate()
OTHER_SIGNER = GatewaySigner.generate()
HUB_KEYS = {kem: HubPrivateKey.generate(kem) for kem in Kem}
OTHER_HUB_KEYS = {kem: HubPrivateKey.generate(kem) for kem in Kem}


def sealer_for(suite: str, signer: GatewaySigner = SIGNER) -> Sealer:
    return Sealer(GATEWAY, HUB_KEYS[SUITES[suite].kem].public, signer, suite)


def gateways() -> dict[str, dict[str, Ed25519PublicKey]]:
    return gateway_keyring([(GATEWAY, SIGNER.public_key)])


def hubs(suite: str) -> dict[str, HubPrivateKey]:
    return hub_keyring([HUB_KEYS[SUITES[suite].kem]])


def sealed(suite: str = "x25519-hkdf256-chacha20poly1305", body: bytes = BODY) -> bytes:
    return sealer_for(suite).seal("data", SEQ, SEQ + 3, T0, T0 + 500, body)


def reframe(blob: bytes, header: bytes, signer: GatewaySigner | None = None) -> bytes:
    """``blob`` with another header and the same ciphertext; the old signature kept, or a new
    one by ``signer`` (an attacker holding that key)."""
    parsed = parse_envelope(blob)
    prefix = MAGIC + bytes((1,)) + struct.pack(">H", len(header)) + header
    signed = prefix + struct.pack(">I", len(parsed.ciphertext)) + parsed.ciphertext
    signature = parsed.signature if signer is None else signer.sign(signature_input(signed))
    return signed + signature


# --------------------------------------------------------------------------------------------
# Round trips.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITE_NAMES)
@pytest.mark.parametrize("body", [b"", BODY, bytes(range(256)) * 200])
def test_round_trip_for_every_suite(suite: str, body: bytes) -> None:
    blob = sealer_for(suite).seal("event", SEQ, SEQ, T0, T0, body)
    header, opened = open_envelope(blob, hubs(suite), gateways(), gateway=GATEWAY, stream="event")
    assert opened == body
    assert header == EnvelopeHeader(
        GATEWAY, "event", SEQ, SEQ, T0, T0, HUB_KEYS[SUITES[suite].kem].kid, SIGNER.skid, suite
    )
    assert verify_only(blob, gateways()) == header
    assert blob.startswith(b"LMPE\x01")
    if body:
        assert body not in blob  # what the broker sees is ciphertext


@settings(max_examples=40, deadline=None)
@given(
    suite=st.sampled_from(SUITE_NAMES),
    stream=st.from_regex(r"[a-z][a-z0-9_]{0,31}", fullmatch=True),
    gateway=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", fullmatch=True),
    seqs=st.lists(st.integers(0, 2**53 - 1), min_size=2, max_size=2).map(sorted),
    times=st.lists(st.integers(0, 2**53 - 1), min_size=2, max_size=2).map(sorted),
    body=st.binary(max_size=2048),
)
def test_round_trip_property(
    suite: str, stream: str, gateway: str, seqs: list[int], times: list[int], body: bytes
) -> None:
    hub_key = HUB_KEYS[SUITES[suite].kem]
    sealer = Sealer(gateway, hub_key.public, SIGNER, suite)
    blob = sealer.seal(stream, seqs[0], seqs[1], times[0], times[1], body)
    ring = gateway_keyring([(gateway, SIGNER.public_key)])
    header, opened = open_envelope(blob, hub_keyring([hub_key]), ring)
    assert opened == body
    assert (header.gateway, header.stream, [header.seq_first, header.seq_last]) == (
        gateway,
        stream,
        seqs,
    )
    assert [header.t_first_ms, header.t_last_ms] == times


def test_two_seals_of_the_same_batch_differ_and_both_open() -> None:
    first, second = sealed(), sealed()
    assert first != second  # HPKE's fresh ephemeral key per envelope
    assert open_envelope(first, hubs(SUITE_NAMES[0]), gateways())[1] == BODY
    assert open_envelope(second, hubs(SUITE_NAMES[0]), gateways())[1] == BODY


def test_default_suite_follows_the_hub_key() -> None:
    assert Sealer(GATEWAY, HUB_KEYS[Kem.X25519].public, SIGNER).suite.name == (
        "x25519-hkdf256-chacha20poly1305"
    )
    assert Sealer(GATEWAY, HUB_KEYS[Kem.MLKEM768_X25519].public, SIGNER).suite.name == (
        "mlkem768x25519-hkdf256-chacha20poly1305"
    )


# --------------------------------------------------------------------------------------------
# Tampering: never silent.
# --------------------------------------------------------------------------------------------

SUITE = "x25519-hkdf256-chacha20poly1305"
OTHER_AEAD_SUITE = "x25519-hkdf256-aes256gcm"


def tamper_cases() -> list[tuple[str, Any, GatewaySigner]]:
    """(field, new value, the key a forger re-signs with: the one the new header names)."""
    other_hub = OTHER_HUB_KEYS[Kem.X25519]
    return [
        ("gateway", "cab-0043", SIGNER),
        ("stream", "event", SIGNER),
        ("seq_first", SEQ - 1, SIGNER),
        ("seq_last", SEQ + 4, SIGNER),
        ("t_first_ms", T0 - 1, SIGNER),
        ("t_last_ms", T0 + 501, SIGNER),
        ("rkid", other_hub.kid, SIGNER),
        ("skid", OTHER_SIGNER.skid, OTHER_SIGNER),
        ("suite", OTHER_AEAD_SUITE, SIGNER),
    ]


def permissive_keys() -> tuple[dict[str, HubPrivateKey], dict[str, dict[str, Ed25519PublicKey]]]:
    """A hub that holds two keys and enrolled both signing keys for both gateways: so that a
    tampered header always finds a key, and only the cryptography can refuse it."""
    hub = hub_keyring([HUB_KEYS[Kem.X25519], OTHER_HUB_KEYS[Kem.X25519]])
    ring = gateway_keyring(
        [(gw, key.public_key) for gw in ("cab-0042", "cab-0043") for key in (SIGNER, OTHER_SIGNER)]
    )
    return hub, ring


@pytest.mark.parametrize(("field", "value", "forger"), tamper_cases(), ids=lambda c: str(c)[:12])
def test_every_header_field_tamper_is_refused(
    field: str, value: Any, forger: GatewaySigner
) -> None:
    blob = sealed(SUITE)
    hub, ring = permissive_keys()
    original = parse_envelope(blob).header
    changed = dataclasses.replace(original, **{field: value}).encode()

    # The header alone changed: the signature covers it.
    with pytest.raises(BadSignature):
        open_envelope(reframe(blob, changed), hub, ring)
    # Re-signed by someone who holds the gateway key: the HPKE info binds the header.
    with pytest.raises(DecryptFailed):
        open_envelope(reframe(blob, changed, forger), hub, ring)
    # The untouched envelope still opens with the same keys.
    assert open_envelope(blob, hub, ring)[1] == BODY


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_byte_changed_is_refused(data: st.DataObject) -> None:
    blob = bytearray(sealed(SUITE))
    position = data.draw(st.integers(0, len(blob) - 1))
    blob[position] ^= data.draw(st.integers(1, 255))
    with pytest.raises(EnvelopeError):
        open_envelope(bytes(blob), hubs(SUITE), gateways())


def test_wrong_hub_key_is_refused() -> None:
    blob = sealed(SUITE)
    with pytest.raises(UnknownKey) as unknown:
        open_envelope(blob, hub_keyring([OTHER_HUB_KEYS[Kem.X25519]]), gateways())
    assert unknown.value.role == "hub" and unknown.value.kid == HUB_KEYS[Kem.X25519].kid
    # A key filed under the right id but not the right key: it does not open.
    wrong = {HUB_KEYS[Kem.X25519].kid: OTHER_HUB_KEYS[Kem.X25519]}
    with pytest.raises(DecryptFailed):
        open_envelope(blob, wrong, gateways())
    # A key of another KEM under that id.
    wrong = {HUB_KEYS[Kem.X25519].kid: OTHER_HUB_KEYS[Kem.MLKEM768_X25519]}
    with pytest.raises(DecryptFailed):
        open_envelope(blob, wrong, gateways())


def test_wrong_gateway_key_is_refused() -> None:
    blob = sealed(SUITE)
    impostor = {GATEWAY: {SIGNER.skid: OTHER_SIGNER.public_key}}
    with pytest.raises(BadSignature):
        open_envelope(blob, hubs(SUITE), impostor)
    with pytest.raises(UnknownKey) as unknown:
        open_envelope(blob, hubs(SUITE), gateway_keyring([(GATEWAY, OTHER_SIGNER.public_key)]))
    assert unknown.value.role == "gateway" and unknown.value.kid == SIGNER.skid
    # The key is enrolled, but for another gateway: it never vouches for this one.
    with pytest.raises(UnknownKey):
        open_envelope(blob, hubs(SUITE), gateway_keyring([("cab-0043", SIGNER.public_key)]))


def test_envelope_on_another_topic_is_refused() -> None:
    blob = sealed(SUITE)
    with pytest.raises(HeaderMismatch):
        open_envelope(blob, hubs(SUITE), gateways(), gateway="cab-0043")
    with pytest.raises(HeaderMismatch):
        verify_only(blob, gateways(), stream="event")


# --------------------------------------------------------------------------------------------
# Malformed input.
# --------------------------------------------------------------------------------------------


def test_every_truncation_and_an_extra_byte_are_malformed() -> None:
    blob = sealed(SUITE)
    for length in range(len(blob)):
        with pytest.raises(Malformed):
            parse_envelope(blob[:length])
    with pytest.raises(Malformed):
        open_envelope(blob + b"\x00", hubs(SUITE), gateways())


def test_framing_errors() -> None:
    blob = sealed(SUITE)
    with pytest.raises(Malformed, match="magic"):
        parse_envelope(b"XMPE" + blob[4:])
    with pytest.raises(UnsupportedVersion):
        parse_envelope(blob[:4] + b"\x02" + blob[5:])
    header = parse_envelope(blob).header_bytes
    with pytest.raises(Malformed, match="header length"):
        parse_envelope(blob[:5] + b"\x00\x00" + blob[7:])
    with pytest.raises(Malformed, match="header length"):
        parse_envelope(blob[:5] + struct.pack(">H", 513) + blob[7:])
    # A ciphertext shorter than the KEM's encapsulated key and the tag.
    signed = (
        MAGIC
        + b"\x01"
        + struct.pack(">H", len(header))
        + header
        + struct.pack(">I", 47)
        + bytes(47)
    )
    with pytest.raises(Malformed, match="too short"):
        parse_envelope(signed + bytes(64))


def header_document() -> dict[str, object]:
    return json.loads(parse_envelope(sealed(SUITE)).header_bytes)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "text",
    [
        # Valid meaning, other spelling: only the canonical bytes are accepted.
        lambda d: json.dumps(d, sort_keys=True),
        lambda d: json.dumps(dict(reversed(d.items())), separators=(",", ":")),
        lambda d: json.dumps(d, sort_keys=True, separators=(",", ":")).replace("cab", "\\u0063ab"),
        lambda d: json.dumps({**d, "v": 1.0}, sort_keys=True, separators=(",", ":")),
        # Wrong values.
        lambda d: json.dumps({**d, "v": True}, sort_keys=True, separators=(",", ":")),
        lambda d: json.dumps({**d, "seq_first": -1}, sort_keys=True, separators=(",", ":")),
        lambda d: json.dumps({**d, "seq_last": 2**53}, sort_keys=True, separators=(",", ":")),
        lambda d: json.dumps({**d, "seq_first": 2**52}, sort_keys=True, separators=(",", ":")),
        lambda d: json.dumps({**d, "t_first_ms": 2**52}, sort_keys=True, separators=(",", ":")),
        lambda d: json.dumps({**d, "gw": "cab 42"}, sort_keys=True, separators=(",", ":")),
        lambda d: json.dumps({**d, "stream": "Data"}, sort_keys=True, separators=(",", ":")),
        lambda d: json.dumps(
            {**d, "rkid": "ABCDEF0123456789"}, sort_keys=True, separators=(",", ":")
        ),
        lambda d: json.dumps({**d, "suite": "rot13"}, sort_keys=True, separators=(",", ":")),
        lambda d: json.dumps({**d, "extra": 1}, sort_keys=True, separators=(",", ":")),
        lambda d: json.dumps({k: v for k, v in d.items() if k != "skid"}, sort_keys=True),
        lambda d: "[1,2,3]",
        lambda d: '{"gw":"\xe9"}',
    ],
)
def test_non_canonical_or_invalid_headers_are_malformed(text: object) -> None:
    assert callable(text)
    data = text(header_document()).encode("utf-8")
    with pytest.raises(Malformed):
        EnvelopeHeader.decode(data)
    with pytest.raises(Malformed):
        open_envelope(reframe(sealed(SUITE), data), hubs(SUITE), gateways())


def test_header_of_a_later_version_is_unsupported() -> None:
    document = {**header_document(), "v": 2}
    data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(UnsupportedVersion):
        EnvelopeHeader.decode(data)


@settings(max_examples=400, deadline=None)
@given(blob=st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_envelope_errors(blob: bytes) -> None:
    with pytest.raises(EnvelopeError):
        open_envelope(blob, hubs(SUITE), gateways())


@settings(max_examples=400, deadline=None)
@given(
    header=st.binary(max_size=600),
    ciphertext=st.binary(max_size=200),
    signature=st.binary(min_size=64, max_size=64),
    version=st.sampled_from([1, 1, 1, 0, 2, 255]),
)
def test_well_framed_garbage_raises_only_envelope_errors(
    header: bytes, ciphertext: bytes, signature: bytes, version: int
) -> None:
    blob = (
        MAGIC
        + bytes((version,))
        + struct.pack(">H", len(header))
        + header
        + struct.pack(">I", len(ciphertext))
        + ciphertext
        + signature
    )
    with pytest.raises(EnvelopeError):
        open_envelope(blob, hubs(SUITE), gateways())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(sorted(header_document())), json_values))
def test_headers_with_any_json_values_are_refused_or_exact(changes: dict[str, object]) -> None:
    """Whatever values a header holds, decoding raises Malformed/UnsupportedVersion or gives a
    header that encodes back to the same bytes."""
    data = json.dumps({**header_document(), **changes}, sort_keys=True, separators=(",", ":"))
    try:
        header = EnvelopeHeader.decode(data.encode("utf-8"))
    except (Malformed, UnsupportedVersion):
        return
    assert header.encode() == data.encode()


# --------------------------------------------------------------------------------------------
# Sealing checks and key hygiene.
# --------------------------------------------------------------------------------------------


def test_seal_refuses_a_header_that_does_not_name_its_keys() -> None:
    sealer = sealer_for(SUITE)
    header = sealer.header("data", SEQ, SEQ, T0, T0)
    hub_key = HUB_KEYS[Kem.X25519].public
    with pytest.raises(ValueError, match="rkid"):
        seal(header, BODY, OTHER_HUB_KEYS[Kem.X25519].public, SIGNER)
    with pytest.raises(ValueError, match="skid"):
        seal(header, BODY, hub_key, OTHER_SIGNER)
    hybrid = dataclasses.replace(header, suite="mlkem768x25519-hkdf256-aes256gcm")
    with pytest.raises(ValueError, match="KEM"):
        seal(hybrid, BODY, hub_key, SIGNER)
    with pytest.raises(ValueError, match="needs a mlkem768x25519 hub key"):
        Sealer(GATEWAY, hub_key, SIGNER, "mlkem768x25519-hkdf256-aes256gcm")
    with pytest.raises(ValueError, match="unknown suite"):
        Sealer(GATEWAY, hub_key, SIGNER, "x25519-hkdf256-rot13")
    with pytest.raises(ValueError, match="seq_first is after seq_last"):
        sealer.seal("data", SEQ + 1, SEQ, T0, T0, BODY)
    with pytest.raises(ValueError, match="stream"):
        sealer.seal("no/slash", SEQ, SEQ, T0, T0, BODY)


def test_reprs_hide_private_keys() -> None:
    for kem in Kem:
        key = HUB_KEYS[kem]
        secret = key.private_bytes()
        assert secret.hex() not in repr(key) and "hidden" in repr(key)
    assert "hidden" in repr(SIGNER) and SIGNER.skid in repr(SIGNER)


def test_hybrid_key_expansion_matches_the_x_wing_test_vector() -> None:
    """draft-connolly-cfrg-xwing-kem, appendix C, first vector: seed -> public key."""
    seed = bytes.fromhex("7f9c2ba4e88f827d616045507605853ed73b8093f6efbc88eb1a6eacfa66ef26")
    public = HubPrivateKey(Kem.MLKEM768_X25519, seed).public.raw
    assert len(public) == 1216
    assert public[:16].hex() == "e2236b35a8c24b39b10aa1323a96a919"
    assert public[-16:].hex() == "23593d4ba32d9abac8cd049040ef6534"


# --------------------------------------------------------------------------------------------
# A second implementation, written from docs/envelope.md and RFC 9180 (primitives only).
# --------------------------------------------------------------------------------------------


def doc_suite_ids() -> dict[str, tuple[int, int, int]]:
    """(kem_id, kdf_id, aead_id) of each suite, read from the table of docs/envelope.md."""
    ids = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = re.match(
            r"\| `([a-z0-9-]+)`.*?\(`0x(\w{4})`\).*?\(`0x(\w{4})`\).*?\(`0x(\w{4})`\)", line
        )
        if match:
            ids[match[1]] = (int(match[2], 16), int(match[3], 16), int(match[4], 16))
    return ids


def _hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()


def _hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes((counter,)), hashlib.sha256).digest()
        out, counter = out + block, counter + 1
    return out[:length]


def _labeled_extract(suite_id: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return _hkdf_extract(salt, b"HPKE-v1" + suite_id + label + ikm)


def _labeled_expand(suite_id: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    return _hkdf_expand(
        prk, length.to_bytes(2, "big") + b"HPKE-v1" + suite_id + label + info, length
    )


def independent_open(
    envelope: bytes, hub_secret: bytes, gateway_public: bytes, ids: tuple[int, int, int]
) -> tuple[bytes, bytes]:
    """(header bytes, body) by the page alone; raises on any failure."""
    kem_id, kdf_id, aead_id = ids
    assert envelope[:5] == b"LMPE\x01"
    (h,) = struct.unpack(">H", envelope[5:7])
    header = envelope[7 : 7 + h]
    (c,) = struct.unpack(">I", envelope[7 + h : 11 + h])
    ciphertext = envelope[11 + h : 11 + h + c]
    signature = envelope[11 + h + c :]
    assert len(signature) == 64
    Ed25519PublicKey.from_public_bytes(gateway_public).verify(
        signature, b"lampyre/envelope/v1/signature\x00" + envelope[: 11 + h + c]
    )
    if kem_id == 0x0020:  # DHKEM(X25519, HKDF-SHA256), RFC 9180 section 4.1
        enc, sealed_part = ciphertext[:32], ciphertext[32:]
        private = x25519.X25519PrivateKey.from_private_bytes(hub_secret)
        dh = private.exchange(x25519.X25519PublicKey.from_public_bytes(enc))
        kem_suite = b"KEM" + kem_id.to_bytes(2, "big")
        prk = _labeled_extract(kem_suite, b"", b"eae_prk", dh)
        context = enc + private.public_key().public_bytes_raw()
        shared = _labeled_expand(kem_suite, prk, b"shared_secret", context, 32)
    else:  # MLKEM768-X25519 (X-Wing)
        assert kem_id == 0x647A
        enc, sealed_part = ciphertext[:1120], ciphertext[1120:]
        expanded = hashlib.shake_256(hub_secret).digest(96)
        lattice = MLKEM768PrivateKey.from_seed_bytes(expanded[:64])
        classic = x25519.X25519PrivateKey.from_private_bytes(expanded[64:])
        ss_m = lattice.decapsulate(enc[:1088])
        ct_x = enc[1088:]
        ss_x = classic.exchange(x25519.X25519PublicKey.from_public_bytes(ct_x))
        pk_x = classic.public_key().public_bytes_raw()
        shared = hashlib.sha3_256(ss_m + ss_x + ct_x + pk_x + b"\\.//^\\").digest()
    suite_id = b"HPKE" + b"".join(n.to_bytes(2, "big") for n in (kem_id, kdf_id, aead_id))
    info = b"lampyre/envelope/v1/hpke-info\x00" + header
    context = (
        b"\x00"
        + _labeled_extract(suite_id, b"", b"psk_id_hash", b"")
        + _labeled_extract(suite_id, b"", b"info_hash", info)
    )
    secret = _labeled_extract(suite_id, shared, b"secret", b"")
    key = _labeled_expand(suite_id, secret, b"key", context, 32)
    nonce = _labeled_expand(suite_id, secret, b"base_nonce", context, 12)
    aead = AESGCM(key) if aead_id == 0x0002 else ChaCha20Poly1305(key)
    return header, aead.decrypt(nonce, sealed_part, b"")


def test_doc_lists_every_suite_and_the_labels() -> None:
    assert set(doc_suite_ids()) == set(SUITE_NAMES)
    text = DOC.read_text(encoding="utf-8")
    assert HPKE_INFO_LABEL == b"lampyre/envelope/v1/hpke-info\x00"
    assert SIGNATURE_LABEL == b"lampyre/envelope/v1/signature\x00"
    assert '"lampyre/envelope/v1/hpke-info" || 0x00 || header' in text
    assert '"lampyre/envelope/v1/signature" || 0x00 || envelope[0 : 11 + H + C]' in text
    assert HPKE_INFO_LABEL.hex() in text


@pytest.mark.parametrize("suite", SUITE_NAMES)
def test_fresh_envelopes_open_with_the_independent_implementation(suite: str) -> None:
    hub_key = HUB_KEYS[SUITES[suite].kem]
    blob = sealer_for(suite).seal("data", SEQ, SEQ + 1, T0, T0 + 9, BODY)
    header, body = independent_open(
        blob, hub_key.private_bytes(), SIGNER.public_bytes, doc_suite_ids()[suite]
    )
    assert body == BODY and header == parse_envelope(blob).header_bytes


def doc_vectors() -> list[dict[str, str]]:
    """The ``text`` blocks of docs/envelope.md that start with ``vector:``."""
    vectors = []
    for block in re.findall(r"```text\n(vector:.*?)```", DOC.read_text(encoding="utf-8"), re.S):
        fields: dict[str, str] = {}
        name = ""
        for line in block.splitlines():
            if line.startswith("  "):
                fields[name] += line.strip()
            else:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
        vectors.append(fields)
    return vectors


def test_doc_has_a_vector_per_kem() -> None:
    assert {SUITES[v["vector"]].kem for v in doc_vectors()} == set(Kem)


@pytest.mark.parametrize("vector", doc_vectors(), ids=lambda v: v["vector"])
def test_documented_vectors(vector: dict[str, str]) -> None:
    suite = SUITES[vector["vector"]]
    hub_key = HubPrivateKey(suite.kem, bytes.fromhex(vector["hub_private_key"]))
    if "hub_public_key" in vector:
        assert hub_key.public.raw.hex() == vector["hub_public_key"]
    assert hub_key.public.fingerprint == vector["hub_public_key_sha256"]
    assert hub_key.kid == vector["rkid"]
    signer = GatewaySigner(
        Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vector["gateway_private_key"]))
    )
    assert signer.public_bytes.hex() == vector["gateway_public_key"]
    assert signer.skid == vector["skid"]

    envelope = bytes.fromhex(vector["envelope"])
    parsed = parse_envelope(envelope)
    assert parsed.header_bytes == vector["header"].encode("ascii")
    assert len(parsed.header_bytes) == int(vector["header_length"])
    assert len(parsed.ciphertext) == int(vector["ciphertext_length"])
    assert hpke_info(parsed.header_bytes) == HPKE_INFO_LABEL + parsed.header_bytes
    # "This signature verifies with this public key", by cryptography alone.
    Ed25519PublicKey.from_public_bytes(signer.public_bytes).verify(
        parsed.signature, SIGNATURE_LABEL + envelope[: len(envelope) - 64]
    )
    # "Open this with this private key -> this plaintext", by the code...
    ring = gateway_keyring([(parsed.header.gateway, signer.public_key)])
    header, body = open_envelope(envelope, hub_keyring([hub_key]), ring, stream="data")
    assert body == vector["body"].encode("ascii")
    assert header.encode() == parsed.header_bytes and header.suite == suite.name
    # ... and by the page.
    assert independent_open(
        envelope, hub_key.private_bytes(), signer.public_bytes, doc_suite_ids()[suite.name]
    ) == (parsed.header_bytes, body)


def test_documented_public_key_file_line_decodes() -> None:
    vector = next(v for v in doc_vectors() if SUITES[v["vector"]].kem is Kem.X25519)
    key = HubPrivateKey(Kem.X25519, bytes.fromhex(vector["hub_private_key"])).public
    line = encode_hub_public_key(key)
    assert line.startswith(b"hpke-public-key x25519 ") and decode_hub_public_key(line) == key


def test_the_longest_valid_header_fits_with_room_to_spare() -> None:
    longest = EnvelopeHeader(
        "A" * 64, "a" * 32, *[2**53 - 1] * 4, "f" * 16, "f" * 16,
        max(SUITE_NAMES, key=len),
    ).encode()  # fmt: skip
    assert len(longest) == 341 <= MAX_HEADER_BYTES
    assert len(hpke_info(longest)) <= 1024  # OpenSSL's OSSL_HPKE_MAX_INFOLEN
