"""Signed commands (compact JWS, EdDSA/Ed25519): every rejection with its code, replay refused
also after a restart, the unsynchronised clock, fuzzing of the verification path, signed acks,
and the example published in docs/command-signing.md."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import jws
from agent.buffer import Buffer
from agent.commands import ID_PATTERN, parse_command
from agent.crypto import RecordCipher, RecordTampered, load_or_create_key
from agent.jws import (
    ACK_TYP,
    CLOCK_SKEW_S,
    COMMAND_TYP,
    MAX_ACK_TOKEN_BYTES,
    MAX_LIFETIME_S,
    MAX_TOKEN_BYTES,
    UNSYNCED_MAX_LIFETIME_S,
    AckRejected,
    ClockState,
    CommandRejected,
    CommandTableReplayStore,
    CommandVerifier,
    MemoryReplayStore,
    ReplayStore,
    VerifiedCommand,
    clock_state_from_timedatectl,
    command_claims,
    read_clock_state,
    sign_ack,
    sign_command,
    verify_ack,
    verify_command,
)
from agent.sdk import LampyreError

T = TypeVar("T")

GATEWAY = "cab-0042"
KID = "post-a"
OTHER_KID = "post-b"
# Fixed seeds: the tokens are deterministic (Ed25519 signing is), which keeps failures readable.
POST_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_POST_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
STRANGER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(64, 96)))
KEYS: dict[str, Ed25519PublicKey] = {
    KID: POST_KEY.public_key(),
    OTHER_KID: OTHER_POST_KEY.public_key(),
}

NOW_S = 1_800_000_000
NOW_MS = NOW_S * 1000 + 500
SYNCED = ClockState(True, "test")
UNSYNCED = ClockState(False, "test")
HEADER = {"alg": "EdDSA", "kid": KID, "typ": COMMAND_TYP}
STEP_TIMEOUT_S = 20.0

# RFC 8037 Appendix A.1: the published Ed25519 test key (test-only by definition).
RFC8037_D = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
RFC8037_X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
DOC = Path(__file__).resolve().parent.parent / "docs" / "command-signing.md"


def run(coroutine: Awaitable[T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(STEP_TIMEOUT_S):
            return await coroutine

    return asyncio.run(bounded())


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def body(**overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "id": "post-7f3a",
        "action": "dim",
        "target": {"device": "lamp-3"},
        "level": 40,
    }
    document.update(overrides)
    return {k: v for k, v in document.items() if v is not ...}


def claims(issued_at_s: int = NOW_S, lifetime_s: int = 60, **overrides: Any) -> dict[str, Any]:
    """Valid claims, then ``overrides`` (``...`` removes a claim)."""
    document = command_claims(
        body(), audience=GATEWAY, issued_at_s=issued_at_s, lifetime_s=lifetime_s
    )
    document.update(overrides)
    return {k: v for k, v in document.items() if v is not ...}


def with_id(command_id: str, issued_at_s: int = NOW_S, lifetime_s: int = 60) -> dict[str, Any]:
    return command_claims(
        body(id=command_id), audience=GATEWAY, issued_at_s=issued_at_s, lifetime_s=lifetime_s
    )


def token(
    document: Mapping[str, Any] | None = None,
    key: Ed25519PrivateKey = POST_KEY,
    kid: str = KID,
) -> str:
    return sign_command(claims() if document is None else document, key, kid)


def assemble(
    header: Mapping[str, Any] | bytes,
    payload: Mapping[str, Any] | bytes,
    *,
    key: Ed25519PrivateKey = POST_KEY,
    signature: bytes | None = None,
) -> str:
    """A token built by hand, signed (by ``key``) over whatever header and payload bytes."""
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    payload_bytes = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64(header_bytes)}.{b64(payload_bytes)}"
    if signature is None:
        signature = key.sign(signing_input.encode())
    return f"{signing_input}.{b64(signature)}"


def verify(
    candidate: bytes | str,
    *,
    now_ms: int = NOW_MS,
    clock: ClockState = SYNCED,
    replay: ReplayStore | None = None,
    keys: Mapping[str, Ed25519PublicKey] = KEYS,
) -> VerifiedCommand:
    return run(
        verify_command(
            candidate,
            keys=keys,
            audience=GATEWAY,
            now_ms=now_ms,
            clock=clock,
            replay=MemoryReplayStore() if replay is None else replay,
        )
    )


def rejection(candidate: bytes | str, **kwargs: Any) -> CommandRejected:
    with pytest.raises(CommandRejected) as caught:
        verify(candidate, **kwargs)
    return caught.value


def load_post_keys(folder: Path) -> dict[str, Ed25519PublicKey]:
    """Test-only loader: ``post-<kid>.pub`` PEM files (the agent has its own in agent.keys)."""
    keys: dict[str, Ed25519PublicKey] = {}
    for path in sorted(folder.glob("post-*.pub")):
        public_key = serialization.load_pem_public_key(path.read_bytes())
        assert isinstance(public_key, Ed25519PublicKey)
        keys[path.name.removeprefix("post-").removesuffix(".pub")] = public_key
    return keys


# ----------------------------------------------------------------------------------- accepted


def test_a_valid_token_verifies_and_its_body_is_the_spines_command() -> None:
    verified = verify(token())
    assert (verified.jti, verified.kid, verified.audience) == ("post-7f3a", KID, GATEWAY)
    assert (verified.issued_at_s, verified.expires_at_s) == (NOW_S, NOW_S + 60)
    assert verified.clock_synchronized
    assert verified.clock_warning is None
    assert verified.reference_time_ms == NOW_MS
    command = parse_command(verified.body_json(), verified.reference_time_ms)
    assert command.id == verified.jti
    assert command.expires_ms == verified.expires_at_s * 1000
    assert command.level == 40.0


def test_the_signer_reproduces_the_rfc8037_example_signature() -> None:
    # RFC 8037 Appendix A.4: {"alg":"EdDSA"} over "Example of Ed25519 signing" with the A.1 key.
    key = Ed25519PrivateKey.from_private_bytes(unb64(RFC8037_D))
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert b64(public) == RFC8037_X
    compact = jws._compact(b'{"alg":"EdDSA"}', b"Example of Ed25519 signing", key)
    assert compact == (
        "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc."
        "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
    )


def test_the_header_is_exactly_alg_kid_typ() -> None:
    header_part = token().split(".")[0]
    assert json.loads(unb64(header_part)) == {"alg": "EdDSA", "kid": KID, "typ": COMMAND_TYP}


def test_the_jti_rule_is_the_command_id_rule() -> None:
    assert jws.JTI_PATTERN.pattern == ID_PATTERN.pattern


def test_bytes_and_text_tokens_are_the_same() -> None:
    assert verify(token().encode()).jti == verify(token()).jti


def test_signing_refuses_a_kid_that_is_no_key_id() -> None:
    with pytest.raises(ValueError, match="kid"):
        sign_command(claims(), POST_KEY, "../post-a")


# ------------------------------------------------------------------------ signature and keys


def test_a_tampered_payload_is_a_bad_signature() -> None:
    header_part, _, signature_part = token().split(".")
    raised = claims(cmd=dict(claims()["cmd"], level=100))
    forged = f"{header_part}.{b64(json.dumps(raised).encode())}.{signature_part}"
    refused = rejection(forged)
    assert refused.code == "bad_signature"
    assert not refused.authenticated
    assert refused.command_id is None


def test_a_tampered_header_is_a_bad_signature() -> None:
    _, payload_part, signature_part = token().split(".")
    # The same members re-encoded (another key order) change the signed bytes.
    reordered = b64(json.dumps({"typ": COMMAND_TYP, "kid": KID, "alg": "EdDSA"}).encode())
    assert rejection(f"{reordered}.{payload_part}.{signature_part}").code == "bad_signature"
    # Pointing the token at another trusted key does not help either.
    moved = b64(json.dumps(dict(HEADER, kid=OTHER_KID)).encode())
    assert rejection(f"{moved}.{payload_part}.{signature_part}").code == "bad_signature"


def test_a_flipped_signature_bit_is_a_bad_signature() -> None:
    header_part, payload_part, signature_part = token().split(".")
    signature = bytearray(unb64(signature_part))
    signature[10] ^= 0x01
    assert (
        rejection(f"{header_part}.{payload_part}.{b64(bytes(signature))}").code == "bad_signature"
    )


def test_a_signature_of_the_wrong_length_is_a_bad_signature() -> None:
    header_part, payload_part, signature_part = token().split(".")
    short = b64(unb64(signature_part)[:63])
    assert rejection(f"{header_part}.{payload_part}.{short}").code == "bad_signature"
    assert rejection(f"{header_part}.{payload_part}.").code == "bad_signature"


def test_a_token_signed_by_another_key_is_a_bad_signature() -> None:
    assert rejection(token(key=STRANGER_KEY)).code == "bad_signature"
    # A trusted key signing under another trusted key's id: still refused.
    assert rejection(token(key=OTHER_POST_KEY, kid=KID)).code == "bad_signature"


@pytest.mark.parametrize(
    "header",
    [
        dict(HEADER, kid="post-z"),
        {"alg": "EdDSA", "typ": COMMAND_TYP},
        dict(HEADER, kid=7),
        dict(HEADER, kid="../../etc/post-a"),
        dict(HEADER, kid=""),
    ],
    ids=["unknown", "missing", "number", "path", "empty"],
)
def test_an_unknown_key_id_is_refused(header: dict[str, Any]) -> None:
    refused = rejection(assemble(header, claims()))
    assert refused.code == "unknown_key"
    assert "etc" not in refused.reason


def test_several_post_keys_rotate(tmp_path: Path) -> None:
    for kid, key in ((KID, POST_KEY), (OTHER_KID, OTHER_POST_KEY)):
        pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        (tmp_path / f"post-{kid}.pub").write_bytes(pem)
    keys = load_post_keys(tmp_path)
    assert set(keys) == {KID, OTHER_KID}
    replay = MemoryReplayStore()
    assert verify(token(with_id("old-1")), keys=keys, replay=replay).kid == KID
    assert (
        verify(token(with_id("new-1"), OTHER_POST_KEY, OTHER_KID), keys=keys, replay=replay).kid
        == OTHER_KID
    )
    # The old key retired: its tokens are refused, the new key's still pass.
    (tmp_path / f"post-{KID}.pub").unlink()
    keys = load_post_keys(tmp_path)
    assert rejection(token(with_id("old-2")), keys=keys, replay=replay).code == "unknown_key"
    assert verify(token(with_id("new-2"), OTHER_POST_KEY, OTHER_KID), keys=keys, replay=replay)


# ------------------------------------------------------------------------------- algorithms


def hs256_with_public_key() -> str:
    """The classic confusion: HMAC keyed with the verifier's public key bytes."""
    header = b64(json.dumps({"alg": "HS256", "kid": KID, "typ": COMMAND_TYP}).encode())
    payload = b64(json.dumps(claims()).encode())
    secret = POST_KEY.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    mac = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(mac)}"


@pytest.mark.parametrize(
    "forged",
    [
        assemble(dict(HEADER, alg="none"), claims(), signature=b""),
        assemble(dict(HEADER, alg="none"), claims()),
        hs256_with_public_key(),
        assemble(dict(HEADER, alg="RS256"), claims(), signature=bytes(256)),
        assemble(dict(HEADER, alg="ES256"), claims()),
        assemble(dict(HEADER, alg="eddsa"), claims()),
        assemble(dict(HEADER, alg="Ed448"), claims()),
        assemble(dict(HEADER, alg=["EdDSA"]), claims()),
        assemble({"kid": KID, "typ": COMMAND_TYP}, claims()),
    ],
    ids=[
        "none-empty",
        "none-signed",
        "HS256",
        "RS256",
        "ES256",
        "lowercase",
        "Ed448",
        "list",
        "no-alg",
    ],
)
def test_any_algorithm_but_eddsa_is_refused(forged: str) -> None:
    assert rejection(forged).code == "bad_alg"


@pytest.mark.parametrize(
    "header",
    [
        dict(HEADER, typ="JWT"),
        {"alg": "EdDSA", "kid": KID},
        dict(HEADER, typ=ACK_TYP),
        dict(HEADER, crit=["exp"], exp=1),
        dict(HEADER, b64=False),
        dict(HEADER, jwk={"kty": "OKP"}),
    ],
    ids=["jwt", "no-typ", "ack-typ", "crit", "b64", "jwk"],
)
def test_a_header_other_than_alg_kid_typ_is_malformed(header: dict[str, Any]) -> None:
    # Signed by the right key: the header alone makes it unacceptable.
    assert rejection(assemble(header, claims())).code == "malformed"


def test_an_ack_token_is_never_taken_for_a_command() -> None:
    # Even a gateway ack signed by a trusted key, carrying command-like claims.
    ack_shaped = sign_ack(claims(), POST_KEY, KID)
    assert rejection(ack_shaped).code == "malformed"


# -------------------------------------------------------------------------------- claims


@pytest.mark.parametrize(
    ("audience", "code"),
    [
        ("cab-0043", "wrong_audience"),
        ("", "wrong_audience"),
        (["cab-0042"], "malformed"),
        (..., "malformed"),
    ],
)
def test_the_audience_must_be_this_gateway(audience: Any, code: str) -> None:
    refused = rejection(token(claims(aud=audience)))
    assert refused.code == code
    assert refused.authenticated


@pytest.mark.parametrize("missing", ["jti", "iat", "exp", "cmd"])
def test_a_missing_claim_is_malformed(missing: str) -> None:
    refused = rejection(token(claims(**{missing: ...})))
    assert refused.code == "malformed"
    assert missing in refused.reason


@pytest.mark.parametrize(
    "document",
    [
        claims(nbf=NOW_S),
        claims(iss="post"),
        claims(iat=float(NOW_S)),
        claims(iat=str(NOW_S)),
        claims(iat=True),
        claims(exp=None),
        claims(iat=-1),
        claims(exp=10**12),
        claims(jti=7),
        claims(jti="has space"),
        claims(jti="x" * 65),
        claims(cmd=[1]),
        claims(cmd="dim"),
        claims(cmd=dict(claims()["cmd"], id="another")),
        claims(cmd={k: v for k, v in claims()["cmd"].items() if k != "id"}),
        claims(cmd=dict(claims()["cmd"], expires=(NOW_S + 60) * 1000 + 1)),
        claims(cmd=dict(claims()["cmd"], expires=str((NOW_S + 60) * 1000))),
        claims(cmd={k: v for k, v in claims()["cmd"].items() if k != "expires"}),
    ],
    ids=[
        "nbf",
        "iss",
        "float-iat",
        "string-iat",
        "bool-iat",
        "null-exp",
        "negative-iat",
        "exp-beyond-9999",
        "number-jti",
        "jti-space",
        "jti-long",
        "cmd-array",
        "cmd-string",
        "cmd-id-differs",
        "cmd-without-id",
        "cmd-expires-differs",
        "cmd-expires-string",
        "cmd-without-expires",
    ],
)
def test_claims_of_the_wrong_shape_are_malformed(document: dict[str, Any]) -> None:
    refused = rejection(token(document))
    assert refused.code == "malformed"
    assert refused.authenticated


def test_the_rejection_names_the_command_once_authenticated() -> None:
    refused = rejection(token(claims(issued_at_s=NOW_S - 600)))
    assert (refused.code, refused.command_id, refused.authenticated) == (
        "expired",
        "post-7f3a",
        True,
    )


@pytest.mark.parametrize(
    ("lifetime_s", "accepted"),
    [(MAX_LIFETIME_S, True), (MAX_LIFETIME_S + 1, False), (0, False), (-5, False)],
)
def test_the_lifetime_is_bounded(lifetime_s: int, accepted: bool) -> None:
    # Issued so that the window holds whatever the lifetime: only exp - iat matters.
    document = claims(issued_at_s=NOW_S - 1, lifetime_s=lifetime_s)
    if accepted:
        assert verify(token(document)).expires_at_s - NOW_S + 1 == lifetime_s
    else:
        assert rejection(token(document)).code == "malformed"


# ----------------------------------------------------------------------------- time window


@pytest.mark.parametrize(
    ("expires_at_s", "outcome"),
    [
        (NOW_S - CLOCK_SKEW_S, "expired"),  # now is 500 ms past exp + skew
        (NOW_S - CLOCK_SKEW_S + 1, "accepted"),  # 500 ms left within the skew
        (NOW_S, "accepted"),  # past exp by 500 ms: the skew covers it
        (NOW_S - 3600, "expired"),
    ],
)
def test_expiry_with_the_clock_skew(expires_at_s: int, outcome: str) -> None:
    document = claims(issued_at_s=expires_at_s - 60)
    if outcome == "accepted":
        assert verify(token(document)).expires_at_s == expires_at_s
    else:
        assert rejection(token(document)).code == "expired"


@pytest.mark.parametrize(
    ("issued_at_s", "outcome"),
    [
        (NOW_S + CLOCK_SKEW_S, "accepted"),  # 29.5 s ahead: within the skew
        (NOW_S + CLOCK_SKEW_S + 1, "not_yet_valid"),  # 30.5 s ahead
        (NOW_S + 3600, "not_yet_valid"),
    ],
)
def test_issue_time_ahead_of_the_gateway_clock_with_the_skew(
    issued_at_s: int, outcome: str
) -> None:
    document = claims(issued_at_s=issued_at_s)
    if outcome == "accepted":
        assert verify(token(document)).issued_at_s == issued_at_s
    else:
        assert rejection(token(document)).code == "not_yet_valid"


# ---------------------------------------------------------------------- unsynchronised clock


def test_an_unsynchronised_clock_does_not_reject_on_time_and_says_so() -> None:
    replay = MemoryReplayStore()
    # The gateway booted without a clock (1970) and later jumped a day ahead: no rejection.
    for command_id, now_ms, verdict in (
        ("c-1970", 0, "not yet valid"),
        ("c-ahead", NOW_MS + 86_400_000, "expired"),
        ("c-right", NOW_MS, "within its window"),
    ):
        document = with_id(command_id, issued_at_s=NOW_S + len(replay.jti_expiry_ms))
        verified = verify(token(document), now_ms=now_ms, clock=UNSYNCED, replay=replay)
        assert not verified.clock_synchronized
        assert verified.clock_warning is not None
        assert "not synchronised" in verified.clock_warning
        assert verdict in verified.clock_warning
        # parse_command is given the token's authenticated time, not the broken clock.
        assert verified.reference_time_ms == verified.issued_at_s * 1000
        assert parse_command(verified.body_json(), verified.reference_time_ms).id == command_id


def test_an_unsynchronised_clock_accepts_only_short_lived_tokens() -> None:
    long_lived = with_id("c-long", lifetime_s=UNSYNCED_MAX_LIFETIME_S + 1)
    refused = rejection(token(long_lived), clock=UNSYNCED)
    assert refused.code == "clock_unsynchronized"
    assert verify(token(long_lived), clock=SYNCED)
    short = with_id("c-short", lifetime_s=UNSYNCED_MAX_LIFETIME_S)
    assert verify(token(short), clock=UNSYNCED)


def test_an_unsynchronised_clock_requires_strictly_increasing_iat_per_key() -> None:
    replay = MemoryReplayStore()
    verify(token(with_id("c-1", NOW_S)), clock=UNSYNCED, replay=replay)
    for command_id, issued_at_s in (("c-2", NOW_S), ("c-3", NOW_S - 5)):
        refused = rejection(token(with_id(command_id, issued_at_s)), clock=UNSYNCED, replay=replay)
        assert refused.code == "replayed"
        assert "iat" in refused.reason
    assert verify(token(with_id("c-4", NOW_S + 1)), clock=UNSYNCED, replay=replay)
    # The order is per post key: another post's clock may lag behind.
    other = token(with_id("c-5", NOW_S - 10), OTHER_POST_KEY, OTHER_KID)
    assert verify(other, clock=UNSYNCED, replay=replay).kid == OTHER_KID


def test_a_synchronised_clock_accepts_out_of_order_tokens_within_the_window() -> None:
    replay = MemoryReplayStore()
    verify(token(with_id("c-1", NOW_S)), replay=replay)
    assert verify(token(with_id("c-2", NOW_S - 5)), replay=replay)
    assert verify(token(with_id("c-3", NOW_S)), replay=replay)


def test_a_captured_token_whose_jti_was_forgotten_is_still_refused_without_clock() -> None:
    """The gateway clock jumped ahead, the store purged the jti, then an attacker replays an old
    captured token while the clock is unsynchronised: the order of iat refuses it."""
    replay = MemoryReplayStore()
    captured = token(with_id("c-old", NOW_S))
    verify(captured, replay=replay)
    verify(token(with_id("c-later", NOW_S + 20)), replay=replay, now_ms=NOW_MS + 20_000)
    assert replay.forget(now_ms=NOW_MS + 10 * 86_400_000) == 2
    refused = rejection(captured, clock=UNSYNCED, replay=replay, now_ms=NOW_MS + 86_400_000)
    assert refused.code == "replayed"
    # Even the latest one: equal iat is not after the latest.
    assert rejection(token(with_id("c-later", NOW_S + 20)), clock=UNSYNCED, replay=replay).code == (
        "replayed"
    )


# --------------------------------------------------------------------------------- replay


def test_a_replayed_token_is_refused() -> None:
    replay = MemoryReplayStore()
    first = token()
    assert verify(first, replay=replay).jti == "post-7f3a"
    refused = rejection(first, replay=replay)
    assert (refused.code, refused.command_id, refused.authenticated) == (
        "replayed",
        "post-7f3a",
        True,
    )
    # A new token for the same command id (re-signed, another iat) is a replay too.
    assert rejection(token(claims(issued_at_s=NOW_S + 1)), replay=replay).code == "replayed"


def test_the_jti_is_kept_past_expiry_for_the_keep_margin() -> None:
    replay = MemoryReplayStore()
    verify(token(), replay=replay)
    kept_until_ms = replay.jti_expiry_ms["post-7f3a"]
    assert kept_until_ms == (NOW_S + 60 + CLOCK_SKEW_S + jws.REPLAY_KEEP_S) * 1000


def test_a_replay_is_refused_by_a_new_verifier_over_the_same_memory_store() -> None:
    replay = MemoryReplayStore()
    first = CommandVerifier(keys=KEYS, audience=GATEWAY, replay=replay)
    run(first.verify(token(), now_ms=NOW_MS, clock=SYNCED))
    restarted = CommandVerifier(keys=KEYS, audience=GATEWAY, replay=replay)
    with pytest.raises(CommandRejected) as caught:
        run(restarted.verify(token(), now_ms=NOW_MS, clock=SYNCED))
    assert caught.value.code == "replayed"


def open_buffer(folder: Path) -> Buffer:
    return Buffer(
        folder / "var" / "buffer.db",
        RecordCipher(load_or_create_key(folder / "buffer.key")),
        64 * 1024 * 1024,
    )


def test_a_replay_is_refused_after_a_restart_through_the_buffer_command_table(
    tmp_path: Path,
) -> None:
    captured = token(with_id("c-1", NOW_S))

    async def first_life() -> None:
        buffer = open_buffer(tmp_path)
        await buffer.open()
        try:
            verifier = CommandVerifier(
                keys=KEYS, audience=GATEWAY, replay=CommandTableReplayStore(buffer)
            )
            await verifier.verify(captured, now_ms=NOW_MS, clock=SYNCED)
            await verifier.verify(token(with_id("c-2", NOW_S + 5)), now_ms=NOW_MS, clock=SYNCED)
            # The markers do not pollute the spine's dedupe of command ids.
            assert await buffer.recall_command("c-1") is None
            # Purging what expired by now keeps them (they live past the token's expiry).
            assert await buffer.forget_commands(NOW_MS + 60_000) == 0
        finally:
            await buffer.close()

    async def second_life() -> tuple[CommandRejected, CommandRejected, VerifiedCommand]:
        buffer = open_buffer(tmp_path)
        await buffer.open()
        try:
            verifier = CommandVerifier(
                keys=KEYS, audience=GATEWAY, replay=CommandTableReplayStore(buffer)
            )
            with pytest.raises(CommandRejected) as replayed:
                await verifier.verify(captured, now_ms=NOW_MS + 1000, clock=SYNCED)
            # The latest iat survived too: an older, never-seen token is refused unsynced.
            with pytest.raises(CommandRejected) as older:
                await verifier.verify(token(with_id("c-0", NOW_S + 1)), now_ms=0, clock=UNSYNCED)
            newer = await verifier.verify(
                token(with_id("c-3", NOW_S + 6)), now_ms=0, clock=UNSYNCED
            )
            return replayed.value, older.value, newer
        finally:
            await buffer.close()

    run(first_life())
    replayed, older, newer = run(second_life())
    assert replayed.code == "replayed"
    assert older.code == "replayed"
    assert newer.jti == "c-3"


class SlowMemoryStore(MemoryReplayStore):
    """Yields to the loop between reading and writing, as a database would."""

    async def seen(self, jti: str) -> bool:
        await asyncio.sleep(0)
        answer = await super().seen(jti)
        await asyncio.sleep(0)
        return answer


def test_concurrent_deliveries_of_one_token_are_accepted_once() -> None:
    verifier = CommandVerifier(keys=KEYS, audience=GATEWAY, replay=SlowMemoryStore())

    async def both() -> list[VerifiedCommand | BaseException]:
        return await asyncio.gather(
            *(verifier.verify(token(), now_ms=NOW_MS, clock=SYNCED) for _ in range(5)),
            return_exceptions=True,
        )

    outcomes = run(both())
    accepted = [o for o in outcomes if isinstance(o, VerifiedCommand)]
    refused = [o for o in outcomes if isinstance(o, CommandRejected)]
    assert len(accepted) == 1
    assert [r.code for r in refused] == ["replayed"] * 4


class BrokenStore(MemoryReplayStore):
    async def seen(self, jti: str) -> bool:
        raise LampyreError("database is locked")


def test_a_failing_replay_store_fails_closed() -> None:
    store = BrokenStore()
    refused = rejection(token(), replay=store)
    assert refused.code == "unavailable"
    assert store.jti_expiry_ms == {}


class FakeCommandTable:
    """The buffer's two command-table methods over a dict; ``tampered`` ids fail to open."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[bytes, int]] = {}
        self.tampered: set[str] = set()

    async def remember_command(self, command_id: str, ack_payload: bytes, expires_ms: int) -> None:
        self.rows[command_id] = (ack_payload, expires_ms)
        self.tampered.discard(command_id)

    async def recall_command(self, command_id: str) -> bytes | None:
        if command_id in self.tampered:
            raise RecordTampered("does not open")
        row = self.rows.get(command_id)
        return None if row is None else row[0]


def test_the_command_table_store_fails_closed_on_tampered_entries() -> None:
    table = FakeCommandTable()
    store = CommandTableReplayStore(table)
    verify(token(), replay=store)
    assert set(table.rows) == {"jws/jti/post-7f3a", f"jws/iat/{KID}"}
    assert table.rows[f"jws/iat/{KID}"] == (str(NOW_S).encode(), store.KEEP_FOREVER_MS)
    # A jti entry that no longer authenticates: seen, so refused.
    table.tampered.add("jws/jti/c-9")
    assert rejection(token(with_id("c-9", NOW_S + 1)), replay=store).code == "replayed"
    # An unreadable latest iat: nothing is accepted while the clock is unsynchronised...
    table.rows[f"jws/iat/{KID}"] = (b"garbage", store.KEEP_FOREVER_MS)
    refused = rejection(token(with_id("c-10", NOW_S + 2)), clock=UNSYNCED, replay=store)
    assert refused.code == "unavailable"
    # ...and the next synchronised acceptance writes a sound one again.
    verify(token(with_id("c-11", NOW_S + 3)), replay=store)
    assert table.rows[f"jws/iat/{KID}"][0] == str(NOW_S + 3).encode()


def test_the_latest_iat_never_goes_back() -> None:
    table = FakeCommandTable()
    store = CommandTableReplayStore(table)

    async def steps() -> int | None:
        await store.advance_issued_at(KID, 100)
        await store.advance_issued_at(KID, 50)
        return await store.last_issued_at_s(KID)

    assert run(steps()) == 100


# ---------------------------------------------------------------------------- malformed tokens


def canonical_parts() -> tuple[str, str, str]:
    header_part, payload_part, signature_part = token().split(".")
    return header_part, payload_part, signature_part


def non_canonical(part: str) -> str:
    """The same bytes with a unused low bit set in the last character (if it has any)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return part[:-1] + alphabet[alphabet.index(part[-1]) + 1]


H, P, S = canonical_parts()


@pytest.mark.parametrize(
    "candidate",
    [
        "",
        "not a token",
        f"{H}.{P}",
        f"{H}.{P}.{S}.{S}",
        f"{H}..{P}.{S}",
        f"{H}=.{P}.{S}",
        f"{H}.{P}.{S}==",
        f"{H}.{P}.{S}\n",
        f" {H}.{P}.{S}",
        f"{H}.{P.replace('-', '+').replace('_', '/')}.{S}"
        if ("-" in P or "_" in P)
        else f"{H}.+{P}.{S}",
        f"{H}.{P}.{non_canonical(S)}",
        f"{H}.{P}.{S}AAA",  # a length no base64 has
        f"{H}.{P}.{S[:-1]}é",
        b64(b"not json") + f".{P}.{S}",
        b64(b'["EdDSA"]') + f".{P}.{S}",
        b64(b'{"alg":"EdDSA","alg":"EdDSA","kid":"post-a","typ":"lampyre-cmd+jwt"}') + f".{P}.{S}",
        b64(b'{"alg":"EdDSA","kid":"post-a","typ":"lampyre-cmd+jwt","n":NaN}') + f".{P}.{S}",
        b64(b"\xff\xfe{}") + f".{P}.{S}",
        b64(b"{" * 400) + f".{P}.{S}",
    ],
    ids=[
        "empty",
        "prose",
        "two-parts",
        "four-parts",
        "empty-part",
        "padding-header",
        "padding-signature",
        "trailing-newline",
        "leading-space",
        "standard-alphabet",
        "non-canonical",
        "impossible-length",
        "non-ascii",
        "header-not-json",
        "header-array",
        "header-duplicate",
        "header-nan",
        "header-not-utf8",
        "header-too-long",
    ],
)
def test_malformed_tokens_are_refused(candidate: str) -> None:
    refused = rejection(candidate)
    assert refused.code == "malformed"
    assert not refused.authenticated


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[1, 2]",
        b'"a string"',
        b"",
        b"\xff\xfe",
        b"\xef\xbb\xbf{}",
        json.dumps(claims()).encode()[:-1] + b',"aud":"cab-0042"}',
        json.dumps(claims()).encode().replace(b'"aud"', b'"aud":"cab-0042","aud"', 1),
        json.dumps(claims(iat=...)).encode()[:-1] + b',"iat":1' + b"0" * 5000 + b"}",
        json.dumps(claims(iat=...)).encode()[:-1] + b',"iat":1' + b"0" * 41 + b"}",
        json.dumps(claims(iat=...)).encode()[:-1] + b',"iat":1e400}',
        json.dumps(claims(iat=...)).encode()[:-1] + b',"iat":Infinity}',
        b"[" * 2000 + b"]" * 2000,
    ],
    ids=[
        "not-json",
        "array",
        "string",
        "empty",
        "not-utf8",
        "bom",
        "duplicate-claim",
        "duplicate-claim-first",
        "huge-integer",
        "long-integer",
        "huge-float",
        "infinity",
        "deep-nesting",
    ],
)
def test_a_signed_payload_that_is_not_a_plain_json_object_is_malformed(payload: bytes) -> None:
    refused = rejection(assemble(HEADER, payload))
    assert refused.code == "malformed"
    assert refused.authenticated


def test_the_signature_is_checked_before_the_payload_is_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parsed: list[str] = []
    real = jws._json_object

    def spy(data: bytes, what: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        parsed.append(what)
        return real(data, what, *args, **kwargs)

    monkeypatch.setattr(jws, "_json_object", spy)
    unsigned_garbage = assemble(HEADER, b"{not json", key=STRANGER_KEY)
    assert rejection(unsigned_garbage).code == "bad_signature"
    assert parsed == ["header"]


class CountingKey:
    """Stands for a public key and counts signature checks."""

    def __init__(self, key: Ed25519PublicKey) -> None:
        self.key = key
        self.calls = 0

    def verify(self, signature: bytes, data: bytes) -> None:
        self.calls += 1
        self.key.verify(signature, data)


@pytest.mark.parametrize("as_text", [True, False])
def test_an_oversized_token_is_refused_before_any_parsing(
    monkeypatch: pytest.MonkeyPatch, as_text: bool
) -> None:
    decoded: list[bytes] = []
    parsed: list[bytes] = []
    monkeypatch.setattr(jws, "_b64url_decode", lambda part, *_: decoded.append(part) or b"")
    monkeypatch.setattr(jws, "_json_object", lambda data, *_, **__: parsed.append(data) or {})
    counting = CountingKey(POST_KEY.public_key())
    keys = {KID: cast(Ed25519PublicKey, counting)}
    # A validly signed token, only too long: its size alone refuses it.
    big = sign_command(claims(cmd=dict(claims()["cmd"], pad="x" * MAX_TOKEN_BYTES)), POST_KEY, KID)
    candidate: str | bytes = big if as_text else big.encode()
    refused = rejection(candidate, keys=keys)
    assert refused.code == "too_large"
    assert (decoded, parsed, counting.calls) == ([], [], 0)
    # Garbage of the size is refused the same way, without a look inside.
    assert rejection(b"." * (MAX_TOKEN_BYTES + 1), keys=keys).code == "too_large"
    assert (decoded, parsed, counting.calls) == ([], [], 0)


def test_a_token_at_the_size_limit_is_not_too_large() -> None:
    def padded(length: int) -> str:
        return token(claims(cmd=dict(claims()["cmd"], pad="x" * length)))

    length = (MAX_TOKEN_BYTES - len(padded(0))) * 3 // 4 + 4
    while len(padded(length)) > MAX_TOKEN_BYTES:
        length -= 1
    candidate = padded(length)
    # Base64 skips one length in four: the largest token that fits is within 3 of the limit.
    assert MAX_TOKEN_BYTES - 3 <= len(candidate) <= MAX_TOKEN_BYTES
    # Verified: refusing a body this large is parse_command's business, not the verifier's.
    assert verify(candidate).body["pad"]


def test_the_verifier_refuses_an_oversized_token_without_waiting_for_its_lock() -> None:
    verifier = CommandVerifier(keys=KEYS, audience=GATEWAY, replay=MemoryReplayStore())

    async def while_locked() -> CommandRejected:
        async with verifier._lock:
            with pytest.raises(CommandRejected) as caught:
                await verifier.verify("a" * (MAX_TOKEN_BYTES + 1), now_ms=NOW_MS, clock=SYNCED)
            return caught.value

    assert run(while_locked()).code == "too_large"


def test_rejections_never_quote_the_token_and_nothing_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    valid = token()
    header_part, payload_part, signature_part = valid.split(".")
    candidates = [
        valid + "x",
        f"{header_part}.{payload_part}.{b64(bytes(64))}",
        token(claims(aud="cab-9999")),
        token(claims(issued_at_s=NOW_S - 600)),
        assemble(dict(HEADER, alg="<script>\nalert"), claims()),
        assemble(dict(HEADER, kid="evil\nline"), claims()),
    ]
    reasons = [rejection(candidate).reason for candidate in candidates]
    for reason in reasons:
        assert signature_part not in reason
        assert payload_part not in reason
        assert "\n" not in reason
        assert "<script>" not in reason
    assert [r for r in caplog.records if r.name.startswith("agent")] == []
    for record in caplog.records:
        assert signature_part not in record.getMessage()


# ------------------------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID = token()


def outcome(candidate: bytes | str) -> VerifiedCommand | CommandRejected:
    """Verification of ``candidate``: anything but a VerifiedCommand or CommandRejected fails."""
    try:
        return verify(candidate)
    except CommandRejected as refused:
        assert refused.code in set(jws.RejectionCode)
        assert len(refused.reason) < 400
        return refused


@FUZZ
@given(st.binary(max_size=2 * MAX_TOKEN_BYTES))
def test_fuzz_arbitrary_bytes_are_only_ever_rejected(candidate: bytes) -> None:
    assert isinstance(outcome(candidate), CommandRejected)


@FUZZ
@given(
    st.lists(
        st.text(
            alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/ ",
            max_size=300,
        ),
        min_size=1,
        max_size=5,
    )
)
def test_fuzz_dotted_base64_is_only_ever_rejected(parts: list[str]) -> None:
    assert isinstance(outcome(".".join(parts)), CommandRejected)


BASE64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@st.composite
def mutations(draw: st.DrawFn) -> str:
    """A valid token with a few bytes replaced, deleted, inserted or swapped; ``retail`` puts
    another base64url character at the end of a part, where only the unused low bits may
    change (a non-canonical encoding of the same bytes)."""
    raw = bytearray(VALID.encode())
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["replace", "delete", "insert", "swap", "retail"]))
        position = draw(st.integers(0, max(len(raw) - 1, 0)))
        if kind == "replace" and raw:
            raw[position] = draw(st.integers(0, 255))
        elif kind == "delete" and raw:
            del raw[position]
        elif kind == "insert":
            raw.insert(position, draw(st.sampled_from(b"Aa0-_.=+/ \x00\xff")))
        elif kind == "swap" and raw:
            other = draw(st.integers(0, len(raw) - 1))
            raw[position], raw[other] = raw[other], raw[position]
        elif kind == "retail" and raw:
            ends = [i - 1 for i, byte in enumerate(raw) if byte == ord(".") and i > 0]
            end = draw(st.sampled_from([*ends, len(raw) - 1]))
            # One of the four characters that differ from it in the two lowest bits only.
            index = BASE64URL_ALPHABET.find(raw[end])
            if index >= 0:
                raw[end] = BASE64URL_ALPHABET[(index & ~3) + draw(st.integers(0, 3))]
    return raw.decode("latin-1")


@FUZZ
@given(mutations())
def test_fuzz_a_mutated_valid_token_is_rejected_unless_unchanged(mutated: str) -> None:
    result = outcome(mutated)
    if mutated == VALID:
        assert isinstance(result, VerifiedCommand)
    else:
        assert isinstance(result, CommandRejected), "a changed token was accepted"


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def signed_claims(draw: st.DrawFn) -> dict[str, Any]:
    """Claims near the valid ones: each claim kept, dropped or replaced by any JSON value."""
    document: dict[str, Any] = claims()
    for name in list(document):
        choice = draw(st.sampled_from(["keep", "keep", "drop", "replace"]))
        if choice == "drop":
            del document[name]
        elif choice == "replace":
            document[name] = draw(JSON_VALUES)
    if draw(st.booleans()):
        document[draw(st.text(max_size=6))] = draw(JSON_VALUES)
    return document


@FUZZ
@given(signed_claims(), st.booleans())
def test_fuzz_signed_claims_are_accepted_only_when_every_rule_holds(
    document: dict[str, Any], synced: bool
) -> None:
    """Validly signed tokens over arbitrary claims: a VerifiedCommand only for claims that obey
    every rule, and then it reports exactly those claims."""
    try:
        verified = verify(token(document), clock=SYNCED if synced else UNSYNCED)
    except CommandRejected as refused:
        assert refused.authenticated
        return
    assert set(document) == {"jti", "iat", "exp", "aud", "cmd"}
    assert document["aud"] == GATEWAY
    assert verified.jti == document["jti"] == document["cmd"]["id"]
    assert verified.issued_at_s == document["iat"]
    assert verified.expires_at_s == document["exp"]
    assert document["cmd"]["expires"] == document["exp"] * 1000
    assert 0 < document["exp"] - document["iat"] <= MAX_LIFETIME_S
    assert verified.body == document["cmd"]


# ----------------------------------------------------------------------------------- acks

ACK = {
    "v": 1,
    "gateway": GATEWAY,
    "seq": 1_800_000_000_000_007,
    "ts": NOW_MS,
    "id": "post-7f3a",
    "status": "ok",
    "action": "dim",
    "target": {"device": "lamp-3"},
    "requested": 40.0,
    "results": [{"device": "lamp-3", "status": "ok", "level": 40.0}],
}
GATEWAY_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(96, 128)))
GATEWAY_KEYS = {"gw-1": GATEWAY_KEY.public_key()}


def test_a_signed_ack_round_trips() -> None:
    signed = sign_ack(ACK, GATEWAY_KEY, "gw-1")
    assert json.loads(unb64(signed.split(".")[0])) == {
        "alg": "EdDSA",
        "kid": "gw-1",
        "typ": ACK_TYP,
    }
    assert verify_ack(signed, keys=GATEWAY_KEYS, gateway=GATEWAY) == ACK
    assert verify_ack(signed.encode(), keys=GATEWAY_KEYS) == ACK


class HiddenKeySigner:
    """Signs without showing its key, like the gateway's signer."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


def test_an_ack_signed_through_a_signer_that_hides_its_key_verifies() -> None:
    signed = sign_ack(ACK, HiddenKeySigner(GATEWAY_KEY), "gw-1")
    assert signed == sign_ack(ACK, GATEWAY_KEY, "gw-1")
    assert verify_ack(signed, keys=GATEWAY_KEYS) == ACK


class NotEd25519:
    def sign(self, data: bytes) -> bytes:
        return hashlib.sha512(data).digest() * 2


def test_signing_refuses_a_signer_that_is_not_ed25519() -> None:
    with pytest.raises(ValueError, match="Ed25519"):
        sign_ack(ACK, NotEd25519(), "gw-1")


def test_a_forged_or_misdirected_ack_is_refused() -> None:
    signed = sign_ack(ACK, GATEWAY_KEY, "gw-1")
    header_part, _, signature_part = signed.split(".")
    changed = b64(json.dumps(dict(ACK, status="rejected")).encode())
    cases: list[tuple[Callable[[], object], str]] = [
        (
            lambda: verify_ack(f"{header_part}.{changed}.{signature_part}", keys=GATEWAY_KEYS),
            "bad_signature",
        ),
        (
            lambda: verify_ack(sign_ack(ACK, STRANGER_KEY, "gw-1"), keys=GATEWAY_KEYS),
            "bad_signature",
        ),
        (lambda: verify_ack(sign_ack(ACK, GATEWAY_KEY, "gw-2"), keys=GATEWAY_KEYS), "unknown_key"),
        (lambda: verify_ack(signed, keys=GATEWAY_KEYS, gateway="cab-0043"), "wrong_audience"),
        # A command token is not an ack, even signed by a key the tool trusts.
        (
            lambda: verify_ack(sign_command(ACK, GATEWAY_KEY, "gw-1"), keys=GATEWAY_KEYS),
            "malformed",
        ),
        (lambda: verify_ack("x" * (MAX_ACK_TOKEN_BYTES + 1), keys=GATEWAY_KEYS), "too_large"),
        (
            lambda: verify_ack(
                assemble({"alg": "none", "kid": "gw-1", "typ": ACK_TYP}, ACK, signature=b""),
                keys=GATEWAY_KEYS,
            ),
            "bad_alg",
        ),
    ]
    for attempt, code in cases:
        with pytest.raises(AckRejected) as caught:
            attempt()
        assert caught.value.code == code


def test_an_ack_larger_than_a_command_still_verifies() -> None:
    results = [{"device": f"lamp-{n}", "status": "ok", "level": 40.0} for n in range(400)]
    big = dict(ACK, target={"all": True}, results=results)
    signed = sign_ack(big, GATEWAY_KEY, "gw-1")
    assert len(signed) > MAX_TOKEN_BYTES
    assert verify_ack(signed, keys=GATEWAY_KEYS)["results"] == results


# ------------------------------------------------------------------------------ clock state


@pytest.mark.parametrize(
    ("output", "returncode", "synchronized"),
    [
        ("yes\n", 0, True),
        ("no\n", 0, False),
        ("", 1, False),
        ("maybe", 0, False),
        ("yes", None, False),
    ],
)
def test_the_timedatectl_answer(output: str, returncode: int | None, synchronized: bool) -> None:
    assert clock_state_from_timedatectl(output, returncode).synchronized is synchronized


@pytest.mark.parametrize(
    ("script", "timeout_s", "synchronized", "source"),
    [
        ("print('yes')", STEP_TIMEOUT_S / 2, True, "timedatectl"),
        ("print('no')", STEP_TIMEOUT_S / 2, False, "timedatectl"),
        ("import sys; sys.exit(1)", STEP_TIMEOUT_S / 2, False, "timedatectl gave no answer"),
        ("import time; time.sleep(60)", 0.5, False, "timedatectl timed out"),
    ],
)
def test_reading_the_clock_state(
    monkeypatch: pytest.MonkeyPatch,
    script: str,
    timeout_s: float,
    synchronized: bool,
    source: str,
) -> None:
    monkeypatch.setattr(jws, "TIMEDATECTL_ARGS", (sys.executable, "-c", script))
    monkeypatch.setattr(jws, "CLOCK_QUERY_TIMEOUT_S", timeout_s)
    assert run(read_clock_state()) == ClockState(synchronized, source)


def test_no_timedatectl_means_not_synchronised(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(jws, "TIMEDATECTL_ARGS", (str(tmp_path / "no-such-program"),))
    assert run(read_clock_state()) == ClockState(False, "timedatectl unavailable")


# ------------------------------------------------------------------------ the documentation


def doc_block(label: str) -> str:
    """The fenced block that follows the line ``<!-- label -->`` in the documentation."""
    found = re.search(
        rf"<!-- {re.escape(label)} -->\s*```[a-z]*\n(.*?)```", DOC.read_text(), re.DOTALL
    )
    assert found is not None, f"no block {label!r} in {DOC.name}"
    return found.group(1).strip()


def test_the_documented_example_verifies_with_the_published_test_key() -> None:
    public_key = Ed25519PublicKey.from_public_bytes(unb64(RFC8037_X))
    private_key = Ed25519PrivateKey.from_private_bytes(unb64(RFC8037_D))
    assert doc_block("example-private-key") == RFC8037_D
    assert doc_block("example-public-key") == RFC8037_X
    example = doc_block("example-token")
    header = json.loads(doc_block("example-header"))
    documented_claims = json.loads(doc_block("example-claims"))
    header_part, payload_part, _ = example.split(".")
    assert json.loads(unb64(header_part)) == header
    assert json.loads(unb64(payload_part)) == documented_claims
    # Ed25519 is deterministic: the documented token is exactly what sign_command makes.
    assert sign_command(documented_claims, private_key, header["kid"]) == example
    verified = run(
        verify_command(
            example,
            keys={header["kid"]: public_key},
            audience=documented_claims["aud"],
            now_ms=documented_claims["iat"] * 1000 + 1000,
            clock=SYNCED,
            replay=MemoryReplayStore(),
        )
    )
    assert verified.body == documented_claims["cmd"]
    command = parse_command(verified.body_json(), verified.reference_time_ms)
    assert command.id == documented_claims["jti"]


def test_the_documented_ack_example_verifies() -> None:
    public_key = Ed25519PublicKey.from_public_bytes(unb64(RFC8037_X))
    private_key = Ed25519PrivateKey.from_private_bytes(unb64(RFC8037_D))
    example = doc_block("example-ack-token")
    documented_ack = json.loads(doc_block("example-ack"))
    kid = json.loads(unb64(example.split(".")[0]))["kid"]
    assert sign_ack(documented_ack, private_key, kid) == example
    assert verify_ack(example, keys={kid: public_key}, gateway=documented_ack["gateway"]) == (
        documented_ack
    )


def test_the_documented_constants_match_the_code() -> None:
    text = DOC.read_text()
    for figure in (
        f"{MAX_TOKEN_BYTES} bytes",
        f"±{CLOCK_SKEW_S} s",
        f"{MAX_LIFETIME_S} s",
        f"{UNSYNCED_MAX_LIFETIME_S} s",
        f"`{COMMAND_TYP}`",
        f"`{ACK_TYP}`",
    ):
        assert figure in text, figure
    for code in jws.RejectionCode:
        assert f"`{code}`" in text, code
