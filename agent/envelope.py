"""The readings envelope (version 1): a batch sealed at the gateway for the hub alone, and signed.

A batch (the JSON payload the hub protocol describes) is encrypted once, at the source, with
HPKE (RFC 9180, Base mode) to the hub's public key, and the whole frame is signed with the
gateway's Ed25519 key. The broker, the cloud that hosts it and whoever copies the gateway's
storage see ciphertext; the gateway itself holds no key that can open a past batch.

The header (gateway, stream, sequence and time ranges, key ids, suite) travels in clear so the
buffer, the uplink and the hub can route and de-duplicate without decrypting, and it is bound
twice: into the HPKE ``info`` (so the ciphertext opens only under this exact header) and into the
signature (so nobody without the gateway's key can change a byte of the frame). The byte layout,
the canonical header encoding and test vectors are in ``docs/envelope.md``; this module is the
reference implementation of that page.

Why both HPKE and a signature: HPKE Base mode authenticates nothing about the sender (anyone
holding the hub's public key can seal), and ``cryptography``'s HPKE has no Auth mode. The
Ed25519 signature gives the hub origin authentication and non-repudiation; the ``info`` binding
makes a header edited by someone who does hold the gateway key (a compromised gateway re-signing)
fail to decrypt instead of passing silently.

Everything here is pure computation (no I/O): safe to call from the event loop for one batch
(tens of microseconds to a millisecond, see the figures in ``docs/envelope.md``).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.sdk import LampyreError

__all__ = [
    "DEFAULT_SUITE",
    "ENVELOPE_VERSION",
    "HPKE_INFO_LABEL",
    "KEY_ID_PATTERN",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "SIGNATURE_BYTES",
    "SIGNATURE_LABEL",
    "SUITES",
    "SUITE_NAMES",
    "BadSignature",
    "DecryptFailed",
    "EnvelopeError",
    "EnvelopeHeader",
    "GatewayKeys",
    "GatewaySigner",
    "HeaderMismatch",
    "HubPrivateKey",
    "HubPublicKey",
    "Kem",
    "Malformed",
    "ParsedEnvelope",
    "Sealer",
    "Suite",
    "UnknownKey",
    "UnsupportedVersion",
    "default_suite_for",
    "fingerprint",
    "gateway_keyring",
    "hpke_info",
    "hub_keyring",
    "key_id",
    "open_envelope",
    "parse_envelope",
    "seal",
    "signature_input",
    "verify_only",
]

# --------------------------------------------------------------------------------------------
# Format constants (docs/envelope.md, "Byte layout").
# --------------------------------------------------------------------------------------------

MAGIC: Final = b"LMPE"
"""First four bytes of every envelope. Its first byte is not ``{``, so a hub can tell an
envelope from a plaintext JSON payload (``seal = "none"``) on the same topic."""
ENVELOPE_VERSION: Final = 1
"""The frame's version byte and the header's ``v``; a new layout or label gets a new number."""
PREFIX_BYTES: Final = len(MAGIC) + 1 + 2
"""Magic, version byte and the header length field."""
CIPHERTEXT_LENGTH_BYTES: Final = 4
SIGNATURE_BYTES: Final = 64
FRAME_OVERHEAD_BYTES: Final = PREFIX_BYTES + CIPHERTEXT_LENGTH_BYTES + SIGNATURE_BYTES
"""Bytes of framing around the header and the ciphertext (75)."""
MAX_HEADER_BYTES: Final = 512
"""A valid header is at most 341 bytes; the cap keeps ``info`` well below the 1024 bytes
some HPKE libraries (OpenSSL's ``OSSL_HPKE_MAX_INFOLEN``) accept."""
MAX_CIPHERTEXT_BYTES: Final = 0xFFFF_FFFF
AEAD_TAG_BYTES: Final = 16

HPKE_INFO_LABEL: Final = b"lampyre/envelope/v1/hpke-info\x00"
"""``info`` = this label || the canonical header bytes."""
SIGNATURE_LABEL: Final = b"lampyre/envelope/v1/signature\x00"
"""The Ed25519 message = this label || every byte of the frame before the signature. The label
keeps a signature over an envelope from ever being valid for another message the same gateway key
signs (command acknowledgements, receipts): those use labels of their own."""

KEY_ID_HEX_DIGITS: Final = 16
"""A key id is the first 16 hex digits (64 bits) of the key's SHA-256 fingerprint."""

MAX_SAFE_INTEGER: Final = 2**53 - 1
"""Header integers stay exact in a JSON double, so a hub in JavaScript reads them right."""

GATEWAY_ID_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
STREAM_PATTERN: Final = r"[a-z][a-z0-9_]{0,31}"
KEY_ID_PATTERN: Final = rf"[0-9a-f]{{{KEY_ID_HEX_DIGITS}}}"


# --------------------------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------------------------


class EnvelopeError(LampyreError):
    """An envelope was refused. The message says why; it never contains key material or
    plaintext."""


class Malformed(EnvelopeError):
    """The bytes are not an envelope: wrong magic, lengths that do not add up, a header that is
    not the canonical encoding of a valid header, an unknown suite."""


class UnsupportedVersion(EnvelopeError):
    """An envelope of a format version this code does not know."""


class UnknownKey(EnvelopeError):
    """The header names a key this side does not hold: the gateway's signing key is not enrolled
    for that gateway, or the hub key id is not one of the hub's keys."""

    def __init__(self, message: str, *, role: str, kid: str) -> None:
        super().__init__(message)
        self.role = role
        """``"gateway"`` (the signing key) or ``"hub"`` (the recipient key)."""
        self.kid = kid


class BadSignature(EnvelopeError):
    """The signature does not verify: the frame was altered, or signed by another key."""


class DecryptFailed(EnvelopeError):
    """The signature is good but the ciphertext does not open with the named hub key under this
    header: sealed to another key, or a header re-signed after sealing."""


class HeaderMismatch(EnvelopeError):
    """An authentic envelope arrived where it does not belong (its gateway or stream is not the
    one of the topic it came from): a replay onto another topic."""


# --------------------------------------------------------------------------------------------
# Fingerprints and key ids.
# --------------------------------------------------------------------------------------------


def fingerprint(public_bytes: bytes) -> str:
    """SHA-256 of a public key's raw encoding, as 64 lowercase hex digits."""
    return hashlib.sha256(public_bytes).hexdigest()


def key_id(public_bytes: bytes) -> str:
    """The short id of a public key: the first 16 hex digits of its fingerprint."""
    return fingerprint(public_bytes)[:KEY_ID_HEX_DIGITS]


# --------------------------------------------------------------------------------------------
# Suites and hub keys.
# --------------------------------------------------------------------------------------------


class Kem(StrEnum):
    """The HPKE KEMs an envelope may use (the first word of a suite name)."""

    X25519 = "x25519"
    """DHKEM(X25519, HKDF-SHA256), RFC 9180 KEM id 0x0020."""
    MLKEM768_X25519 = "mlkem768x25519"
    """The hybrid post-quantum KEM MLKEM768-X25519 (X-Wing), KEM id 0x647A."""


@dataclass(frozen=True)
class _KemSpec:
    kem_id: int
    public_key_bytes: int
    private_key_bytes: int
    enc_bytes: int
    hpke_kem: hpke.KEM


_KEMS: Final[Mapping[Kem, _KemSpec]] = {
    Kem.X25519: _KemSpec(0x0020, 32, 32, 32, hpke.KEM.X25519),
    Kem.MLKEM768_X25519: _KemSpec(0x647A, 1216, 32, 1120, hpke.KEM.MLKEM768_X25519),
}
_MLKEM768_PUBLIC_BYTES: Final = 1184
_XWING_EXPANDED_BYTES: Final = 96


@dataclass(frozen=True)
class Suite:
    """A named HPKE cipher suite: ``<kem>-hkdf256-<aead>``."""

    name: str
    kem: Kem
    aead: str
    """``chacha20poly1305`` or ``aes256gcm``."""
    kdf_id: int
    aead_id: int

    @property
    def kem_id(self) -> int:
        return _KEMS[self.kem].kem_id

    @property
    def enc_bytes(self) -> int:
        """Length of the HPKE encapsulated key at the start of the ciphertext."""
        return _KEMS[self.kem].enc_bytes


_HKDF_SHA256_ID: Final = 0x0001
_AEADS: Final[Mapping[str, tuple[int, hpke.AEAD]]] = {
    "chacha20poly1305": (0x0003, hpke.AEAD.CHACHA20_POLY1305),
    "aes256gcm": (0x0002, hpke.AEAD.AES_256_GCM),
}

SUITES: Final[Mapping[str, Suite]] = {
    f"{kem.value}-hkdf256-{aead}": Suite(
        f"{kem.value}-hkdf256-{aead}", kem, aead, _HKDF_SHA256_ID, aead_id
    )
    for kem in Kem
    for aead, (aead_id, _) in _AEADS.items()
}
"""Every suite an envelope may name, by name."""
SUITE_NAMES: Final = tuple(SUITES)
DEFAULT_SUITE: Final = "x25519-hkdf256-chacha20poly1305"
"""ChaCha20-Poly1305 is constant-time and fast in software on cores without AES instructions;
on gateways with them AES-256-GCM is as good (compare in docs/envelope.md)."""

_HPKE_SUITES: Final[Mapping[str, hpke.Suite]] = {
    name: hpke.Suite(_KEMS[suite.kem].hpke_kem, hpke.KDF.HKDF_SHA256, _AEADS[suite.aead][1])
    for name, suite in SUITES.items()
}


def default_suite_for(kem: Kem) -> Suite:
    """The suite used with a hub key of this KEM when the configuration names none."""
    return SUITES[f"{kem.value}-hkdf256-chacha20poly1305"]


_HpkePublic = x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey
_HpkePrivate = x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey


class HubPublicKey:
    """A hub's HPKE public key: the KEM, its RFC 9180 serialisation and its key id.

    X25519: the 32-byte u-coordinate. MLKEM768-X25519: the ML-KEM-768 encapsulation key (1184
    bytes) followed by the X25519 public key (32 bytes), as in the X-Wing specification.
    """

    __slots__ = ("_key", "fingerprint", "kem", "kid", "raw")

    def __init__(self, kem: Kem, raw: bytes) -> None:
        spec = _KEMS[kem]
        if len(raw) != spec.public_key_bytes:
            raise ValueError(
                f"a {kem.value} public key is {spec.public_key_bytes} bytes, got {len(raw)}"
            )
        try:
            self._key: _HpkePublic = _public_from_raw(kem, raw)
        except ValueError:
            raise ValueError(f"not a valid {kem.value} public key") from None
        self.kem = kem
        self.raw = bytes(raw)
        self.fingerprint = fingerprint(self.raw)
        self.kid = self.fingerprint[:KEY_ID_HEX_DIGITS]

    def __repr__(self) -> str:
        return f"HubPublicKey({self.kem.value}, kid={self.kid})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HubPublicKey) and (other.kem, other.raw) == (self.kem, self.raw)

    def __hash__(self) -> int:
        return hash((self.kem, self.raw))


def _public_from_raw(kem: Kem, raw: bytes) -> _HpkePublic:
    if kem is Kem.X25519:
        return x25519.X25519PublicKey.from_public_bytes(raw)
    return hpke.MLKEM768X25519PublicKey(
        mlkem.MLKEM768PublicKey.from_public_bytes(raw[:_MLKEM768_PUBLIC_BYTES]),
        x25519.X25519PublicKey.from_public_bytes(raw[_MLKEM768_PUBLIC_BYTES:]),
    )


class HubPrivateKey:
    """A hub's HPKE private key (the hub side: the reference hub tool and tests).

    Serialised as in RFC 9180 / X-Wing: X25519, the 32-byte scalar; MLKEM768-X25519, the 32-byte
    X-Wing seed, expanded with SHAKE256 into the ML-KEM-768 seed (64 bytes) and the X25519 scalar
    (32 bytes). ``repr`` never shows the secret.
    """

    __slots__ = ("_key", "_secret", "kem", "public")

    def __init__(self, kem: Kem, secret: bytes) -> None:
        spec = _KEMS[kem]
        if len(secret) != spec.private_key_bytes:
            raise ValueError(
                f"a {kem.value} private key is {spec.private_key_bytes} bytes, got {len(secret)}"
            )
        self.kem = kem
        self._secret = bytes(secret)
        if kem is Kem.X25519:
            scalar = x25519.X25519PrivateKey.from_private_bytes(secret)
            self._key: _HpkePrivate = scalar
            public = scalar.public_key().public_bytes_raw()
        else:
            expanded = hashlib.shake_256(secret).digest(_XWING_EXPANDED_BYTES)
            lattice = mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64])
            classic = x25519.X25519PrivateKey.from_private_bytes(expanded[64:])
            self._key = hpke.MLKEM768X25519PrivateKey(lattice, classic)
            public = (
                lattice.public_key().public_bytes_raw() + classic.public_key().public_bytes_raw()
            )
        self.public = HubPublicKey(kem, public)

    @classmethod
    def generate(cls, kem: Kem = Kem.X25519) -> HubPrivateKey:
        if kem is Kem.X25519:
            return cls(kem, x25519.X25519PrivateKey.generate().private_bytes_raw())
        return cls(kem, secrets.token_bytes(_KEMS[kem].private_key_bytes))

    @property
    def kid(self) -> str:
        return self.public.kid

    def private_bytes(self) -> bytes:
        """The serialised secret, for writing the hub's key file (mode 0600)."""
        return self._secret

    def __repr__(self) -> str:
        return f"HubPrivateKey({self.kem.value}, kid={self.kid}, <secret hidden>)"


class GatewaySigner:
    """The gateway's Ed25519 signing key. ``repr`` never shows the secret."""

    __slots__ = ("_key", "fingerprint", "public_bytes", "public_key", "skid")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key: Ed25519PublicKey = private_key.public_key()
        self.public_bytes = self.public_key.public_bytes_raw()
        self.fingerprint = fingerprint(self.public_bytes)
        self.skid = self.fingerprint[:KEY_ID_HEX_DIGITS]

    @classmethod
    def generate(cls) -> GatewaySigner:
        return cls(Ed25519PrivateKey.generate())

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"GatewaySigner(skid={self.skid}, <secret hidden>)"


GatewayKeys = Mapping[str, Mapping[str, Ed25519PublicKey]]
"""The hub's enrolment: gateway id -> signing key id -> that gateway's Ed25519 public key. Keyed
by gateway first so that one gateway's key can never vouch for an envelope naming another."""


def gateway_keyring(
    enrolled: Iterable[tuple[str, Ed25519PublicKey]],
) -> dict[str, dict[str, Ed25519PublicKey]]:
    """A :data:`GatewayKeys` mapping from ``(gateway id, public key)`` pairs."""
    ring: dict[str, dict[str, Ed25519PublicKey]] = {}
    for gateway, public_key in enrolled:
        ring.setdefault(gateway, {})[key_id(public_key.public_bytes_raw())] = public_key
    return ring


def hub_keyring(keys: Iterable[HubPrivateKey]) -> dict[str, HubPrivateKey]:
    """Hub private keys by key id, as :func:`open_envelope` takes them."""
    return {key.kid: key for key in keys}


# --------------------------------------------------------------------------------------------
# The header.
# --------------------------------------------------------------------------------------------

_HEADER_KEYS: Final = frozenset(
    ("v", "gw", "stream", "seq_first", "seq_last", "t_first_ms", "t_last_ms", "rkid", "skid",
     "suite")
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class EnvelopeHeader:
    """What travels in clear, authenticated: who sealed which records, when, for which key.

    ``seq_first``/``seq_last``: the buffer sequence numbers the envelope covers (equal for a
    single record); ``t_first_ms``/``t_last_ms``: the oldest and newest timestamps inside,
    epoch milliseconds. ``rkid``: the hub key id sealed to; ``skid``: the gateway signing key id.
    """

    gateway: str
    stream: str
    seq_first: int
    seq_last: int
    t_first_ms: int
    t_last_ms: int
    rkid: str
    skid: str
    suite: str
    version: int = ENVELOPE_VERSION

    def __post_init__(self) -> None:
        problem = _header_problem(self)
        if problem is not None:
            raise ValueError(f"invalid envelope header: {problem}")

    def encode(self) -> bytes:
        """The canonical header bytes: JSON with sorted keys, no spaces, ASCII only (RFC 8785
        JCS gives the same bytes for this restricted value space)."""
        document = {
            "gw": self.gateway,
            "rkid": self.rkid,
            "seq_first": self.seq_first,
            "seq_last": self.seq_last,
            "skid": self.skid,
            "stream": self.stream,
            "suite": self.suite,
            "t_first_ms": self.t_first_ms,
            "t_last_ms": self.t_last_ms,
            "v": self.version,
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":")).encode("ascii")

    @classmethod
    def decode(cls, data: bytes) -> EnvelopeHeader:
        """Parse canonical header bytes; :class:`Malformed` for anything else (including a valid
        header written another way: only one byte string is accepted for one header)."""
        try:
            document = json.loads(data.decode("ascii"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise Malformed("envelope header is not ASCII JSON") from None
        if not isinstance(document, dict):
            raise Malformed("envelope header is not a JSON object")
        if set(document) != _HEADER_KEYS:
            missing = sorted(_HEADER_KEYS - set(document))
            extra = sorted(set(document) - _HEADER_KEYS)
            raise Malformed(f"envelope header keys wrong: missing {missing}, unexpected {extra}")
        version = document["v"]
        if type(version) is int and version != ENVELOPE_VERSION:
            raise UnsupportedVersion(f"envelope header version {version} is not supported")
        try:
            header = cls(
                gateway=document["gw"],
                stream=document["stream"],
                seq_first=document["seq_first"],
                seq_last=document["seq_last"],
                t_first_ms=document["t_first_ms"],
                t_last_ms=document["t_last_ms"],
                rkid=document["rkid"],
                skid=document["skid"],
                suite=document["suite"],
                version=version,
            )
        except ValueError as exc:
            raise Malformed(str(exc)) from None
        if header.encode() != data:
            raise Malformed("envelope header is not in canonical form")
        return header


def _header_problem(header: EnvelopeHeader) -> str | None:
    """Why ``header`` is not a valid version-1 header, or None."""
    for name, value, pattern in (
        ("gw", header.gateway, GATEWAY_ID_PATTERN),
        ("stream", header.stream, STREAM_PATTERN),
        ("rkid", header.rkid, KEY_ID_PATTERN),
        ("skid", header.skid, KEY_ID_PATTERN),
    ):
        if not isinstance(value, str) or not re.fullmatch(pattern, value):
            return f"{name} must match {pattern}"
    for name, number in (
        ("v", header.version),
        ("seq_first", header.seq_first),
        ("seq_last", header.seq_last),
        ("t_first_ms", header.t_first_ms),
        ("t_last_ms", header.t_last_ms),
    ):
        # type() rather than isinstance(): JSON true/false must not pass for 1/0.
        if type(number) is not int or not 0 <= number <= MAX_SAFE_INTEGER:
            return f"{name} must be an integer from 0 to 2^53-1"
    if header.version != ENVELOPE_VERSION:
        return f"v must be {ENVELOPE_VERSION}"
    if header.seq_first > header.seq_last:
        return "seq_first is after seq_last"
    if header.t_first_ms > header.t_last_ms:
        return "t_first_ms is after t_last_ms"
    if not isinstance(header.suite, str) or header.suite not in SUITES:
        return f"unknown suite; expected one of: {', '.join(SUITE_NAMES)}"
    return None


def hpke_info(header_bytes: bytes) -> bytes:
    """The HPKE ``info`` an envelope with these canonical header bytes is sealed under."""
    return HPKE_INFO_LABEL + header_bytes


def signature_input(signed_part: bytes) -> bytes:
    """The Ed25519 message for the frame bytes that precede the signature."""
    return SIGNATURE_LABEL + signed_part


# --------------------------------------------------------------------------------------------
# Sealing (the gateway).
# --------------------------------------------------------------------------------------------


def seal(
    header: EnvelopeHeader, body: bytes, hub_key: HubPublicKey, signer: GatewaySigner
) -> bytes:
    """The envelope of ``body``: sealed to ``hub_key`` under ``header``, signed by ``signer``.

    ``header.rkid``, ``header.skid`` and ``header.suite`` must name ``hub_key``, ``signer`` and
    a suite of ``hub_key``'s KEM (:class:`Sealer` fills them in); a mismatch is a programming
    error and raises :class:`ValueError`.
    """
    if header.rkid != hub_key.kid:
        raise ValueError(f"header rkid {header.rkid} is not the hub key's id {hub_key.kid}")
    if header.skid != signer.skid:
        raise ValueError(f"header skid {header.skid} is not the signing key's id {signer.skid}")
    suite = SUITES[header.suite]
    if suite.kem is not hub_key.kem:
        raise ValueError(f"suite {suite.name} does not use the hub key's KEM {hub_key.kem.value}")
    header_bytes = header.encode()
    ciphertext = _HPKE_SUITES[suite.name].encrypt(body, hub_key._key, info=hpke_info(header_bytes))
    if len(ciphertext) > MAX_CIPHERTEXT_BYTES:
        raise ValueError(f"a {len(body)}-byte body does not fit in one envelope")
    signed_part = b"".join(
        (
            MAGIC,
            bytes((ENVELOPE_VERSION,)),
            struct.pack(">H", len(header_bytes)),
            header_bytes,
            struct.pack(">I", len(ciphertext)),
            ciphertext,
        )
    )
    return signed_part + signer.sign(signature_input(signed_part))


class Sealer:
    """Seals batches of one gateway to the current hub key: what the pipeline holds.

    No I/O; the keys are loaded beforehand (``agent.keys.load_sealer``).
    """

    __slots__ = ("gateway", "hub_key", "signer", "suite")

    def __init__(
        self,
        gateway: str,
        hub_key: HubPublicKey,
        signer: GatewaySigner,
        suite: str | None = None,
    ) -> None:
        chosen = default_suite_for(hub_key.kem) if suite is None else SUITES.get(suite)
        if chosen is None:
            raise ValueError(f"unknown suite {suite!r}; expected one of: {', '.join(SUITE_NAMES)}")
        if chosen.kem is not hub_key.kem:
            raise ValueError(
                f"suite {chosen.name} needs a {chosen.kem.value} hub key, "
                f"hub key {hub_key.kid} is {hub_key.kem.value}"
            )
        if not re.fullmatch(GATEWAY_ID_PATTERN, gateway):
            raise ValueError(f"gateway id must match {GATEWAY_ID_PATTERN}")
        self.gateway = gateway
        self.hub_key = hub_key
        self.signer = signer
        self.suite = chosen

    def header(
        self, stream: str, seq_first: int, seq_last: int, t_first_ms: int, t_last_ms: int
    ) -> EnvelopeHeader:
        return EnvelopeHeader(
            gateway=self.gateway,
            stream=stream,
            seq_first=seq_first,
            seq_last=seq_last,
            t_first_ms=t_first_ms,
            t_last_ms=t_last_ms,
            rkid=self.hub_key.kid,
            skid=self.signer.skid,
            suite=self.suite.name,
        )

    def seal(
        self,
        stream: str,
        seq_first: int,
        seq_last: int,
        t_first_ms: int,
        t_last_ms: int,
        body: bytes,
    ) -> bytes:
        """The envelope of ``body`` (see :func:`seal`)."""
        header = self.header(stream, seq_first, seq_last, t_first_ms, t_last_ms)
        return seal(header, body, self.hub_key, self.signer)


# --------------------------------------------------------------------------------------------
# Opening (the hub).
# --------------------------------------------------------------------------------------------


class ParsedEnvelope(NamedTuple):
    """The parts of a well-formed envelope, nothing verified yet."""

    header: EnvelopeHeader
    header_bytes: bytes
    ciphertext: bytes
    signature: bytes
    signed_part: bytes
    """Every byte before the signature (what :func:`signature_input` labels)."""


def parse_envelope(blob: bytes) -> ParsedEnvelope:
    """Split an envelope into its parts; :class:`Malformed` or :class:`UnsupportedVersion`
    when the framing or the header is wrong. Verifies nothing cryptographic."""
    blob = bytes(blob)
    if len(blob) < FRAME_OVERHEAD_BYTES:
        raise Malformed(f"envelope too short ({len(blob)} bytes)")
    if blob[: len(MAGIC)] != MAGIC:
        raise Malformed("not a Lampyre envelope (wrong magic bytes)")
    if blob[len(MAGIC)] != ENVELOPE_VERSION:
        raise UnsupportedVersion(f"envelope format version {blob[len(MAGIC)]} is not supported")
    (header_length,) = struct.unpack_from(">H", blob, len(MAGIC) + 1)
    if not 0 < header_length <= MAX_HEADER_BYTES:
        raise Malformed(f"envelope header length {header_length} out of range")
    ciphertext_at = PREFIX_BYTES + header_length + CIPHERTEXT_LENGTH_BYTES
    if len(blob) < ciphertext_at + SIGNATURE_BYTES:
        raise Malformed(f"envelope too short ({len(blob)} bytes) for its header")
    (ciphertext_length,) = struct.unpack_from(">I", blob, ciphertext_at - CIPHERTEXT_LENGTH_BYTES)
    signature_at = ciphertext_at + ciphertext_length
    if signature_at + SIGNATURE_BYTES != len(blob):
        raise Malformed(
            f"envelope length {len(blob)} does not match its ciphertext length {ciphertext_length}"
        )
    header_bytes = blob[PREFIX_BYTES : PREFIX_BYTES + header_length]
    header = EnvelopeHeader.decode(header_bytes)
    suite = SUITES[header.suite]
    if ciphertext_length < suite.enc_bytes + AEAD_TAG_BYTES:
        raise Malformed(
            f"ciphertext of {ciphertext_length} bytes is too short for suite {suite.name}"
        )
    return ParsedEnvelope(
        header=header,
        header_bytes=header_bytes,
        ciphertext=blob[ciphertext_at:signature_at],
        signature=blob[signature_at:],
        signed_part=blob[:signature_at],
    )


def verify_only(
    blob: bytes,
    gateway_keys: GatewayKeys,
    *,
    gateway: str | None = None,
    stream: str | None = None,
) -> EnvelopeHeader:
    """The header of an envelope whose signature verifies, without decrypting it.

    For a relay or an archive that holds the gateways' public keys but not the hub's private
    key. ``gateway`` and ``stream``, when given (from the MQTT topic), must be the header's, else
    :class:`HeaderMismatch`.
    """
    parsed = parse_envelope(blob)
    _verify(parsed, gateway_keys, gateway, stream)
    return parsed.header


def open_envelope(
    blob: bytes,
    hub_keys: Mapping[str, HubPrivateKey],
    gateway_keys: GatewayKeys,
    *,
    gateway: str | None = None,
    stream: str | None = None,
) -> tuple[EnvelopeHeader, bytes]:
    """Verify, then decrypt: the authentic header and the body.

    Order: framing and header (:class:`Malformed`, :class:`UnsupportedVersion`), the signing key
    enrolled for the header's gateway (:class:`UnknownKey`), the signature
    (:class:`BadSignature`), the topic's gateway and stream if given (:class:`HeaderMismatch`),
    the hub key (:class:`UnknownKey`), then HPKE under this header (:class:`DecryptFailed`).
    Nothing but :class:`EnvelopeError` subclasses is raised, whatever the input bytes.
    """
    parsed = parse_envelope(blob)
    _verify(parsed, gateway_keys, gateway, stream)
    header = parsed.header
    hub_key = hub_keys.get(header.rkid)
    if hub_key is None:
        raise UnknownKey(
            f"envelope is sealed to hub key {header.rkid}, which this hub does not hold",
            role="hub",
            kid=header.rkid,
        )
    suite = SUITES[header.suite]
    if hub_key.kem is not suite.kem:
        raise DecryptFailed(
            f"hub key {header.rkid} is {hub_key.kem.value}, the envelope's suite is {suite.name}"
        )
    try:
        body = _HPKE_SUITES[suite.name].decrypt(
            parsed.ciphertext, hub_key._key, info=hpke_info(parsed.header_bytes)
        )
    except Exception:
        # InvalidTag, or ValueError for an encapsulated key that is not a valid point: either
        # way the sealed bytes do not open under this header with this key.
        raise DecryptFailed(
            f"envelope {header.gateway}/{header.stream} seq {header.seq_first}-{header.seq_last} "
            f"does not open with hub key {header.rkid}"
        ) from None
    return header, body


def _verify(
    parsed: ParsedEnvelope, gateway_keys: GatewayKeys, gateway: str | None, stream: str | None
) -> None:
    header = parsed.header
    public_key = gateway_keys.get(header.gateway, {}).get(header.skid)
    if public_key is None:
        raise UnknownKey(
            f"signing key {header.skid} is not enrolled for gateway {header.gateway}",
            role="gateway",
            kid=header.skid,
        )
    try:
        public_key.verify(parsed.signature, signature_input(parsed.signed_part))
    except InvalidSignature:
        raise BadSignature(
            f"envelope signature does not verify with key {header.skid} of gateway {header.gateway}"
        ) from None
    if gateway is not None and header.gateway != gateway:
        raise HeaderMismatch(f"envelope of gateway {header.gateway} arrived for {gateway}")
    if stream is not None and header.stream != stream:
        raise HeaderMismatch(f"envelope of stream {header.stream} arrived on {stream}")
