"""The control post, ``lampyre post`` and ``lampyre keys post-init``: commands signed and
published through a real Mosquitto, acks verified. First against the gateway side played by
``agent.jws`` (a verifier that answers with signed, forged or plain acks on demand), then end to
end against the real agent with simulated lamps."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import secrets
import shutil
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cli import main
from agent.commands import parse_command
from agent.jws import (
    ClockState,
    CommandRejected,
    CommandVerifier,
    MemoryReplayStore,
    VerifiedCommand,
    sign_ack,
)
from agent.keys import (
    ed25519_key_id,
    load_ed25519_private_key,
    read_ed25519_public_key,
    write_ed25519_keypair,
    write_hub_keypair,
)
from agent.mqtt import Message, MqttSession, MqttSettings
from agent.post import (
    CommandError,
    IssuedAtFile,
    PostKey,
    dim_command,
    parse_level,
    parse_value,
    sign_post_command,
    switch_command,
    target_json,
    write_command,
)
from agent.runtime import Agent
from firmware_sim.modbus import EnergyMeter, LampController, ModbusSimulator
from tests.e2e import PREFIX, start_agent_online, stop_agent, validator, write_config
from tests.support.mosquitto import MosquittoBroker, Subscriber

GATEWAY = "post-gw"
BASE = f"{PREFIX}/{GATEWAY}"
WAIT_S = 15.0
SHORT_TIMEOUT = "1.5"
"""--timeout of the runs that are expected to get no trustworthy ack."""
LAMPYRE = Path(sys.executable).with_name("lampyre")


# --------------------------------------------------------------------------------------------
# Running the command line
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    code: int
    out: str
    err: str


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> Run:
    """``lampyre ARGS`` in this process (argparse's usage errors included)."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 2
    out, err = capsys.readouterr()
    return Run(code, out, err)


async def acli(capsys: pytest.CaptureFixture[str], *args: str) -> Run:
    """``lampyre ARGS`` in a thread (it runs its own event loop) while this loop goes on."""
    return await asyncio.to_thread(cli, capsys, *args)


async def subprocess_cli(*args: str) -> Run:
    """The installed ``lampyre`` entry point, as an operator runs it."""
    process = await asyncio.create_subprocess_exec(
        str(LAMPYRE),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


def run(body: Callable[[], Awaitable[None]], timeout_s: float = 45.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout_s):
            await body()

    asyncio.run(bounded())


def no_traceback(result: Run) -> None:
    assert "Traceback" not in result.err and "Traceback" not in result.out, result.err


# --------------------------------------------------------------------------------------------
# Keys, made the way operators make them
# --------------------------------------------------------------------------------------------


@dataclass
class Post:
    """A control post's key, made by ``lampyre keys post-init``."""

    folder: Path
    key_file: Path
    kid: str
    public_file: Path

    def signer(self) -> Ed25519PrivateKey:
        return load_ed25519_private_key(self.key_file)


def post_init(capsys: pytest.CaptureFixture[str], folder: Path) -> Post:
    made = cli(capsys, "keys", "post-init", "--out", str(folder))
    assert made.code == 0, made.err
    (public_file,) = folder.glob("post-*.pub")
    kid = public_file.name.removeprefix("post-").removesuffix(".pub")
    return Post(folder, folder / "post-signing.key", kid, public_file)


@dataclass
class GatewayKey:
    """A gateway's signing key and its enrolment folder at the control post."""

    signer: Ed25519PrivateKey
    kid: str
    enrolled: Path
    """``enrolled/<gateway>/gateway-signing.pub``: what ``--gateways`` is given."""


def gateway_key(root: Path, gateway: str = GATEWAY) -> GatewayKey:
    keys = root / f"{gateway}-keys"
    keys.mkdir(mode=0o700)
    kid, public_file = write_ed25519_keypair(keys / "gateway-signing.key", keys, "gateway")
    enrolled = root / "enrolled"
    (enrolled / gateway).mkdir(parents=True, exist_ok=True)
    shutil.copy(public_file, enrolled / gateway / "gateway-signing.pub")
    return GatewayKey(load_ed25519_private_key(keys / "gateway-signing.key"), kid, enrolled)


def post_args(post: Post, enrolled: Path | None, broker: MosquittoBroker, *extra: str) -> list[str]:
    args = ["--gateway", GATEWAY, "--key", str(post.key_file), "--port", str(broker.port)]
    if enrolled is not None:
        args += ["--gateways", str(enrolled)]
    return [*args, *extra]


# --------------------------------------------------------------------------------------------
# Parsing values and levels (what the gateway would refuse is refused before signing)
# --------------------------------------------------------------------------------------------


def _json_oracle(text: str) -> Any:
    """What the gateway accepts as a ``write`` value, by the standard JSON parser: a boolean
    or a finite number fitting in 64 bits, written in at most 64 characters."""
    stripped = text.strip(" \t\r\n")
    if len(stripped) > 64:
        raise ValueError("too long")

    def no_constant(name: str) -> Any:
        raise ValueError(name)

    value = json.loads(stripped, parse_constant=no_constant)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and -(2**63) <= value <= 2**64 - 1:
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise ValueError("not a write value")


JSONISH = st.one_of(
    st.text(max_size=30),
    st.from_regex(r"\A[ \t]?-?[0-9]{1,25}(\.[0-9]{0,5})?([eE][+-]?[0-9]{1,4})?[ \n]?\Z"),
    st.sampled_from(
        [
            "true",
            "false",
            "null",
            "NaN",
            "Infinity",
            "-Infinity",
            '"5"',
            "[1]",
            "{}",
            "1e999",
            "-0",
            "01",
            "+1",
            ".5",
            "5.",
            "0x10",
            "1_000",
            "True",
            " true ",
            "\u00a05",
            "٣",
        ]
    ),
)


@settings(max_examples=500, deadline=None)
@given(JSONISH)
def test_write_values_are_parsed_exactly_as_json_booleans_and_finite_numbers(text: str) -> None:
    try:
        expected = _json_oracle(text)
    except ValueError:
        with pytest.raises(CommandError):
            parse_value(text)
        return
    got = parse_value(text)
    assert got == expected and type(got) is type(expected)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
    )
)
def test_every_write_value_round_trips_through_its_json_text(value: bool | int | float) -> None:
    parsed = parse_value(json.dumps(value))
    assert parsed == value and type(parsed) is type(value)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.floats(allow_nan=True), st.integers(min_value=-1000, max_value=1000)))
def test_levels_from_0_to_100_only(level: float) -> None:
    text = json.dumps(level)  # NaN and Infinity as Python's JSON writes them
    if math.isfinite(level) and 0 <= level <= 100:
        assert parse_level(text) == level
    else:
        with pytest.raises(CommandError):
            parse_level(text)


# --------------------------------------------------------------------------------------------
# Signing: what the post signs, the gateway's verifier accepts and the spine parses
# --------------------------------------------------------------------------------------------

TARGETS = st.one_of(
    st.builds(lambda d: {"device": d}, st.sampled_from(["lamp-1", "cab-1", "x"])),
    st.builds(lambda g: {"group": g}, st.sampled_from(["street", "even"])),
    st.just({"all": True}),
)
BODIES = st.one_of(
    st.builds(
        lambda t, level, fade: dim_command(t, level, fade_s=fade),
        TARGETS,
        st.one_of(st.integers(0, 100), st.floats(0, 100)),
        st.one_of(st.none(), st.floats(0, 90.5)),
    ),
    st.builds(switch_command, TARGETS, st.booleans()),
    st.builds(
        lambda point, value: write_command({"device": "cab-1"}, point, value),
        st.from_regex(r"\A[a-z][a-z0-9_]{0,20}\Z"),
        st.one_of(
            st.booleans(),
            st.integers(-(2**63), 2**64 - 1),
            st.floats(allow_nan=False, allow_infinity=False),
        ),
    ),
)
POST_KEY = PostKey.from_private_key(Ed25519PrivateKey.generate())


@settings(max_examples=150, deadline=None)
@given(BODIES, st.integers(21, 300), st.integers(0, 20))
def test_a_signed_command_verifies_at_the_gateway_and_its_body_parses(
    body: dict[str, Any], ttl_s: int, age_s: int
) -> None:
    now_s = int(time.time())
    signed = sign_post_command(
        body, key=POST_KEY, gateway=GATEWAY, issued_at_s=now_s - age_s, lifetime_s=ttl_s
    )
    verifier = CommandVerifier(
        keys={POST_KEY.kid: POST_KEY.public_key}, audience=GATEWAY, replay=MemoryReplayStore()
    )
    verified = asyncio.run(
        verifier.verify(signed.token, now_ms=now_s * 1000, clock=ClockState(True))
    )
    assert verified.jti == signed.command_id == body["id"]
    assert verified.kid == POST_KEY.kid and verified.audience == GATEWAY
    assert verified.expires_at_s - verified.issued_at_s == ttl_s
    command = parse_command(verified.body_json(), verified.reference_time_ms)
    assert command.id == body["id"] and command.action == body["action"]
    assert command.target.as_json() == body["target"]
    assert command.expires_ms == signed.expires_at_s * 1000


def test_bodies_the_gateway_would_refuse_are_not_signed() -> None:
    device = {"device": "lamp-1"}
    refused: list[Callable[[], object]] = [
        lambda: dim_command(device, 100.5),
        lambda: dim_command(device, -1),
        lambda: dim_command(device, float("nan")),
        lambda: dim_command(device, 50, fade_s=91),
        lambda: dim_command(device, 50, command_id="-leading-dash"),
        lambda: dim_command(device, 50, command_id="x" * 65),
        lambda: write_command(device, "Level", 1),
        lambda: write_command(device, "level", 2**64),
        lambda: write_command(device, "level", float("inf")),
        target_json,
        lambda: target_json(device="a", group="b"),
        lambda: sign_post_command(
            dim_command(device, 5), key=POST_KEY, gateway="a/b", issued_at_s=1
        ),
        lambda: sign_post_command(
            dim_command(device, 5), key=POST_KEY, gateway=GATEWAY, issued_at_s=1, lifetime_s=301
        ),
    ]
    for make in refused:
        with pytest.raises(CommandError):
            make()


def test_issued_at_strictly_increases_per_key_across_runs(tmp_path: Path) -> None:
    async def body() -> None:
        path = tmp_path / "post-signing.iat"
        first, second = IssuedAtFile(path, "kid-a"), IssuedAtFile(path, "kid-a")
        now = 1_764_300_000
        # Two runs (two objects on one file) within the same second: iat still increases.
        assert [await first.next(now), await second.next(now), await first.next(now)] == [
            now,
            now + 1,
            now + 2,
        ]
        assert await second.next(now + 60) == now + 60
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        # Another key starts from its own clock.
        assert await IssuedAtFile(path, "kid-b").next(now) == now
        # A latest iat far ahead (a clock that was wrong once) is not followed.
        path.write_text(f"kid-a {now + 3600}\n")
        assert await first.next(now) == now
        # Where no file can be kept, the process still signs increasing iat and says why.
        blocked = IssuedAtFile(tmp_path / "post-signing.iat" / "nested", "kid-a")
        assert [await blocked.next(now), await blocked.next(now)] == [now, now + 1]
        assert blocked.problem is not None and "cannot keep the latest iat" in blocked.problem

    asyncio.run(body())


# --------------------------------------------------------------------------------------------
# lampyre keys post-init
# --------------------------------------------------------------------------------------------


def test_post_init_makes_a_private_key_and_a_public_key_to_enrol(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "post"
    made = cli(capsys, "keys", "post-init", "--out", str(folder))
    assert made.code == 0, made.err
    private = folder / "post-signing.key"
    (public,) = folder.glob("post-*.pub")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    key = load_ed25519_private_key(private)
    kid = ed25519_key_id(key.public_key())
    assert public.name == f"post-{kid}.pub"
    assert read_ed25519_public_key(public) == key.public_key()
    raw = key.public_key().public_bytes_raw()
    assert f"key id:      {kid}" in made.out
    assert f"fingerprint: sha256:{hashlib.sha256(raw).hexdigest()}" in made.out
    assert "BEGIN PUBLIC KEY" in made.out and "PRIVATE" not in made.out
    # Never overwritten: a second run refuses and leaves both files as they were.
    before = (private.read_bytes(), public.read_bytes())
    again = cli(capsys, "keys", "post-init", "--out", str(folder))
    assert again.code == 1 and "never overwritten" in again.err
    assert (private.read_bytes(), public.read_bytes()) == before
    assert sorted(p.name for p in folder.iterdir()) == sorted([private.name, public.name])
    # A folder others may write to is refused: they could swap the key.
    open_folder = tmp_path / "open"
    open_folder.mkdir()
    open_folder.chmod(0o777)
    refused = cli(capsys, "keys", "post-init", "--out", str(open_folder))
    assert refused.code == 1 and "chmod 700" in refused.err
    assert list(open_folder.iterdir()) == []
    no_traceback(refused)


# --------------------------------------------------------------------------------------------
# Against a real Mosquitto, with the gateway played by agent.jws
# --------------------------------------------------------------------------------------------


@dataclass
class JwsGateway:
    """The gateway side in a few lines of ``agent.jws``: verifies each command token and answers
    on the ack topic with ``answer(verified or rejection)``, signed by ``signer`` (a forged ack
    when that is not the enrolled key), or plain JSON when ``signer`` is None."""

    broker: MosquittoBroker
    post_keys: dict[str, Any]
    signer: Ed25519PrivateKey | None
    kid: str
    answer_after: asyncio.Event | None = None
    """Answer only once this is set (to order the answer after a forged one)."""
    reported_level: float | None = None
    """Claim this level in the results, whatever was asked (what a forger would lie about)."""
    received: list[VerifiedCommand] = field(default_factory=list)
    seq: int = 0
    answered: int = 0
    """Acks published and acknowledged by the broker."""
    session: MqttSession | None = None
    verifier: CommandVerifier | None = None

    async def start(self) -> None:
        self.verifier = CommandVerifier(
            keys=self.post_keys, audience=GATEWAY, replay=MemoryReplayStore()
        )
        self.session = MqttSession(
            MqttSettings(port=self.broker.port, client_id=f"jws-gw-{secrets.token_hex(4)}")
        )
        self.session.on_message(self._on_command)
        await self.session.connect(None)
        await self.session.subscribe(f"{BASE}/cmd")

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.disconnect()

    async def _on_command(self, message: Message) -> None:
        assert self.session is not None and self.verifier is not None
        self.seq += 1
        try:
            verified = await self.verifier.verify(
                message.payload, now_ms=int(time.time() * 1000), clock=ClockState(True)
            )
        except CommandRejected as exc:
            body: dict[str, Any] = {
                "id": exc.command_id,
                "status": "rejected",
                "code": exc.code.value,
                "reason": exc.reason,
            }
        else:
            self.received.append(verified)
            level = verified.body.get("level", 0)
            if self.reported_level is not None:
                level = self.reported_level
            body = {
                "id": verified.jti,
                "status": "ok",
                "action": verified.body["action"],
                "target": verified.body["target"],
                "requested": float(level),
                "results": [{"device": "lamp-1", "status": "ok", "level": float(level)}],
            }
        ack = {"v": 1, "gateway": GATEWAY, "seq": self.seq, "ts": int(time.time() * 1000), **body}
        payload = (
            json.dumps(ack).encode()
            if self.signer is None
            else sign_ack(ack, self.signer, self.kid).encode()
        )
        if self.answer_after is not None:
            self._later = asyncio.get_running_loop().create_task(self._answer_later(payload))
            return
        await self.session.publish(f"{BASE}/ack", payload)
        self.answered += 1

    async def _answer_later(self, payload: bytes) -> None:
        assert self.session is not None and self.answer_after is not None
        await self.answer_after.wait()
        await self.session.publish(f"{BASE}/ack", payload)
        self.answered += 1


@asynccontextmanager
async def jws_gateway(
    broker: MosquittoBroker,
    post: Post,
    signer: Ed25519PrivateKey | None,
    kid: str,
    answer_after: asyncio.Event | None = None,
    reported_level: float | None = None,
) -> AsyncIterator[JwsGateway]:
    public = read_ed25519_public_key(post.public_file)
    gateway = JwsGateway(broker, {post.kid: public}, signer, kid, answer_after, reported_level)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


def test_the_post_gets_the_gateways_signed_ack_through_a_real_broker(
    tmp_path: Path, broker: MosquittoBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    post = post_init(capsys, tmp_path / "post")
    gw = gateway_key(tmp_path)

    async def body() -> None:
        async with jws_gateway(broker, post, gw.signer, gw.kid) as gateway:
            args = post_args(post, gw.enrolled, broker)
            done = await acli(capsys, "post", "dim", "--device", "lamp-1", "--level", "40", *args)
            assert done.code == 0, done.err
            assert done.out.splitlines()[0].startswith(f"ok: gateway {GATEWAY}, command post-")
            assert f"signed by gateway key {gw.kid}" in done.out
            assert "lamp-1: ok, level 40 %" in done.out
            assert done.err == ""
            as_json = await acli(
                capsys, "post", "dim", "--device", "lamp-1", "--level", "12.5", "--json",
                "--id", "json-1", *args,
            )  # fmt: skip
            assert as_json.code == 0, as_json.err
            (line,) = as_json.out.splitlines()
            ack = json.loads(line)
            assert ack["id"] == "json-1" and ack["results"][0]["level"] == 12.5
            assert ack["gateway"] == GATEWAY and ack["status"] == "ok"
            # What reached the gateway: tokens signed by the post's key for this gateway, with
            # increasing iat (kept beside the key), each verified before its body was read.
            first, second = gateway.received
            assert (first.kid, first.audience) == (post.kid, GATEWAY)
            assert second.jti == "json-1" and second.issued_at_s > first.issued_at_s
            assert second.expires_at_s - second.issued_at_s == 60
            assert (post.folder / "post-signing.iat").read_text().split() == [
                post.kid,
                str(second.issued_at_s),
            ]

    run(body)


def test_a_forged_ack_is_reported_never_taken_for_the_answer(
    tmp_path: Path, broker: MosquittoBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    post = post_init(capsys, tmp_path / "post")
    gw = gateway_key(tmp_path)
    forger = Ed25519PrivateKey.generate()
    forger_kid = ed25519_key_id(forger.public_key())

    async def body() -> None:
        args = post_args(post, gw.enrolled, broker)
        # Only forgeries answer: one signed by another key under the gateway's kid, one
        # under the forger's own kid. Nothing is taken: exit 3, and stdout stays empty.
        async with (
            jws_gateway(broker, post, forger, gw.kid, reported_level=99),
            jws_gateway(broker, post, forger, forger_kid, reported_level=99),
        ):
            forged = await acli(
                capsys, "post", "dim", "--group", "street", "--level", "99",
                "--timeout", SHORT_TIMEOUT, *args,
            )  # fmt: skip
        assert forged.code == 3, forged.err
        assert forged.out == ""
        assert "bad_signature" in forged.err and "unknown_key" in forged.err
        assert "may still have run" in forged.err
        no_traceback(forged)

        # A forgery first, then the gateway's real answer: the real one is printed.
        forged_first = asyncio.Event()
        async with (
            jws_gateway(broker, post, gw.signer, gw.kid, answer_after=forged_first),
            jws_gateway(broker, post, forger, gw.kid, reported_level=99) as fake,
        ):

            async def release_after_the_forgery() -> None:
                while fake.answered == 0:
                    await asyncio.sleep(0.01)
                # The fake answered (its PUBACK came back) before the gateway publishes.
                forged_first.set()

            releaser = asyncio.create_task(release_after_the_forgery())
            genuine = await acli(
                capsys, "post", "dim", "--device", "lamp-1", "--level", "30", "--json", *args
            )
            await releaser
        assert genuine.code == 0, genuine.err
        ack = json.loads(genuine.out)
        assert ack["results"] == [{"device": "lamp-1", "status": "ok", "level": 30.0}]
        assert "bad_signature" in genuine.err and "still waiting" in genuine.err

    run(body)


# --------------------------------------------------------------------------------------------
# Option, key and broker errors: one line, exit 2, nothing published
# --------------------------------------------------------------------------------------------


def test_option_and_key_errors_say_what_to_fix_and_send_nothing(
    tmp_path: Path, broker: MosquittoBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    post = post_init(capsys, tmp_path / "post")
    gw = gateway_key(tmp_path)
    open_key = tmp_path / "open.key"
    shutil.copy(post.key_file, open_key)
    open_key.chmod(0o644)
    not_a_key = tmp_path / "not-a-key"
    not_a_key.write_text("hello")
    not_a_key.chmod(0o600)
    good = post_args(post, gw.enrolled, broker)
    gateway_only = ["--gateway", GATEWAY, "--port", str(broker.port)]
    enrolled = ["--gateways", str(gw.enrolled)]
    dim = ["post", "dim", "--device", "lamp-1", "--level", "40"]

    # (arguments, text expected on stderr). Each exits 2 and publishes nothing.
    usage = [
        (["post", "dim", "--level", "40", *good], "one of the arguments --device --group --all"),
        (["post", "dim", "--device", "a", "--group", "b", "--level", "4", *good], "not allowed"),
        (["post", "dim", "--device", "a", "--level", "140", *good], "from 0 to 100"),
        (["post", "dim", "--device", "a", "--level", "NaN", *good], "expected a number"),
        (["post", "dim", "--device", "a", "--level", "4", "--fade", "91", *good], "0 to 90.5"),
        ([*dim, *good, "--ttl", "301"], "from 1 to 300"),
        ([*dim, *good, "--ttl", "0"], "from 1 to 300"),
        ([*dim, *good, "--timeout", "0"], "above 0"),
        ([*dim, *good, "--id=-x"], "starting with a letter or digit"),
        (["post", "switch", "--all", *good], "one of the arguments --on --off"),
        (["post", "switch", "--all", "--on", "--off", *good], "not allowed"),
        (["post", "write", "--group", "g", "--point", "p", "--value", "1", *good], "--device"),
        (["post", "write", "--device", "d", "--point", "P", "--value", "1", *good], "point name"),
        (["post", "write", "--device", "d", "--point", "p", "--value", "on", *good], "true, false"),
        (["post", "write", "--device", "d", "--point", "p", "--value", "NaN", *good], "JSON"),
        (["post", "dim", "--all", "--level", "4", "--key", str(post.key_file),
          "--gateway", "a/b"], "gateway id"),
        (["post", "dim", "--all", "--level", "4", "--gateway", GATEWAY], "--key"),
    ]  # fmt: skip
    refused = [
        ([*dim, *gateway_only, *enrolled, "--key", str(tmp_path / "missing.key")], "post-init"),
        ([*dim, *gateway_only, *enrolled, "--key", str(open_key)], f"chmod 600 {open_key}"),
        ([*dim, *gateway_only, *enrolled, "--key", str(not_a_key)], "not an unencrypted PEM"),
        ([*dim, *gateway_only, "--key", str(post.key_file)], "give --gateways DIR"),
        ([*dim, *gateway_only, "--key", str(post.key_file), "--gateways", str(tmp_path / "x")],
         "not a folder"),
        (["post", "dim", "--all", "--level", "4", "--gateway", "other-gw", "--key",
          str(post.key_file), "--port", str(broker.port), *enrolled],
         f"gateway other-gw is not enrolled in {gw.enrolled}"),
        ([*dim, *good, "--host", "192.0.2.7"], "--allow-plaintext"),
        ([*dim, *good, "--cert-file", str(not_a_key)], "--key-file"),
        ([*dim, *good, "--prefix", "lampyre/#"], "wildcard"),
    ]  # fmt: skip

    async def body() -> None:
        with Subscriber(broker, "#") as everything:
            for args, expected in usage:
                result = await acli(capsys, *args)
                assert (result.code, expected in result.err) == (2, True), (args, result.err)
                no_traceback(result)
            for args, expected in refused:
                result = await acli(capsys, *args)
                assert (result.code, expected in result.err) == (2, True), (args, result.err)
                (line,) = result.err.splitlines()
                assert line.startswith("lampyre post: ")
                assert result.out == ""
            # The broker is not there: not sent, exit 2.
            stopped = MosquittoBroker(tmp_path / "gone")
            unreachable = await acli(
                capsys, *dim, "--gateway", GATEWAY, "--key", str(post.key_file), *enrolled,
                "--port", str(stopped.port),
            )  # fmt: skip
            assert unreachable.code == 2 and "not sent" in unreachable.err, unreachable.err
            no_traceback(unreachable)
            await asyncio.sleep(0.2)
            assert everything.messages == []

    run(body)


# --------------------------------------------------------------------------------------------
# End to end: the real agent, simulated lamps, real Mosquitto
# --------------------------------------------------------------------------------------------


@dataclass
class Site:
    sim: ModbusSimulator
    config_path: Path
    post: Post
    enrolled: Path | None
    gateway_kid: str | None
    broker: MosquittoBroker
    agent: Agent | None = None
    task: asyncio.Task[None] | None = None

    def lamp(self, unit: int) -> LampController:
        device = self.sim.unit(unit)
        assert isinstance(device, LampController)
        return device

    def args(self, *extra: str, post: Post | None = None) -> list[str]:
        return post_args(post or self.post, self.enrolled, self.broker, *extra)

    async def start_agent(self) -> None:
        self.agent, self.task = await start_agent_online(self.config_path, WAIT_S)

    async def stop_agent(self) -> None:
        assert self.task is not None
        await stop_agent(self.task)


@asynccontextmanager
async def agent_site(
    tmp_path: Path,
    broker: MosquittoBroker,
    capsys: pytest.CaptureFixture[str],
    *,
    clock: str = "yes",
    signed: bool = True,
) -> AsyncIterator[Site]:
    """A simulated cabinet and the real agent. ``signed``: production settings (sealed
    readings, signed commands and acks), its keys made by ``lampyre keys init``. Not signed: a
    demo bench (plain JSON readings and acks, no gateway signing key), which still verifies
    signed commands from the enrolled post."""
    sim = ModbusSimulator(
        {1: LampController(setpoint=100), 2: LampController(), 3: LampController(),
         10: EnergyMeter()}
    )  # fmt: skip
    port = await sim.start_tcp("127.0.0.1", 0)
    config_path = write_config(
        tmp_path,
        gateway=GATEWAY,
        sim_port=port,
        broker_port=broker.port,
        sealed=signed,
        extra=(
            f'[commands]\nclock_synchronized = "{clock}"\n'
            if signed
            else f'clock_synchronized = "{clock}"\n'  # inside the demo's [commands] table
        ),
    )
    keys = tmp_path / "keys"
    post = post_init(capsys, tmp_path / "post")
    enrolled: Path | None = None
    gateway_kid: str | None = None
    if signed:
        made = cli(capsys, "keys", "init", "--config", str(config_path))
        assert made.code == 0, made.err
        hub = tmp_path / "hub"
        _, _, hub_public = write_hub_keypair(hub)
        shutil.copy(hub_public, keys / hub_public.name)
        enrolled = tmp_path / "enrolled"
        (enrolled / GATEWAY).mkdir(parents=True)
        shutil.copy(keys / "gateway-signing.pub", enrolled / GATEWAY / "gateway-signing.pub")
        gateway_kid = ed25519_key_id(read_ed25519_public_key(keys / "gateway-signing.pub"))
    else:
        keys.mkdir(mode=0o700)
        # The post's enrolment knows some key for this bench (from an earlier life of it): the
        # tool then checks acks, and this gateway's plain JSON ones are refused.
        enrolled = tmp_path / "enrolled"
        (enrolled / GATEWAY).mkdir(parents=True)
        write_ed25519_keypair(tmp_path / "old-gateway.key", enrolled / GATEWAY, "gateway")
    shutil.copy(post.public_file, keys / post.public_file.name)
    site = Site(sim, config_path, post, enrolled, gateway_kid, broker)
    await site.start_agent()
    try:
        yield site
    finally:
        await site.stop_agent()
        await sim.stop()


def test_dim_a_device_a_group_switch_and_write_end_to_end(
    tmp_path: Path, broker: MosquittoBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    async def body() -> None:
        async with agent_site(tmp_path, broker, capsys) as site:
            one = await acli(capsys, "post", "dim", "--device", "lamp-1", "--level", "40",
                             *site.args())  # fmt: skip
            assert one.code == 0, one.err
            assert f"signed by gateway key {site.gateway_kid}" in one.out
            assert "dim device lamp-1 to 40 %" in one.out
            assert "lamp-1: ok, level 40 %" in one.out  # read back from the controller
            assert site.lamp(1).setpoint == 40

            group = await acli(capsys, "post", "dim", "--group", "street", "--level", "25",
                               "--json", *site.args())  # fmt: skip
            assert group.code == 0, group.err
            (line,) = group.out.splitlines()
            ack = json.loads(line)
            validator("ack").validate(ack)
            assert ack["target"] == {"group": "street"} and ack["requested"] == 25.0
            assert ack["results"] == [
                {"device": f"lamp-{u}", "status": "ok", "level": 25.0} for u in (1, 2, 3)
            ]
            assert [site.lamp(u).setpoint for u in (1, 2, 3)] == [25, 25, 25]

            off = await acli(capsys, "post", "switch", "--all", "--off", *site.args())
            assert off.code == 0, off.err
            assert "switch every device off" in off.out
            assert [site.lamp(u).setpoint for u in (1, 2, 3)] == [0, 0, 0]

            # The installed entry point, in its own process, writes a point and reads it back.
            write = await subprocess_cli(
                "post", "write", "--device", "lamp-2", "--point", "level_setpoint",
                "--value", "55", *site.args(),
            )  # fmt: skip
            assert write.code == 0, write.err
            assert "write level_setpoint = 55 on device lamp-2" in write.out
            assert "lamp-2: ok, value 55" in write.out
            assert site.lamp(2).setpoint == 55
            no_traceback(write)

    run(body)


def test_rejections_and_errors_come_back_with_code_and_reason(
    tmp_path: Path, broker: MosquittoBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    async def body() -> None:
        async with agent_site(tmp_path, broker, capsys) as site:
            writes_before = sum(site.lamp(u).writes.get(0, 0) for u in (1, 2, 3))
            unknown = await acli(capsys, "post", "dim", "--device", "lamp-9", "--level", "40",
                                 *site.args())  # fmt: skip
            assert unknown.code == 1, unknown.err
            assert unknown.out.startswith("rejected: ")
            assert "\n  unknown_target: unknown device 'lamp-9'" in unknown.out

            # A post key the gateway never enrolled: the gateway cannot authenticate the token,
            # so its (signed) rejection names no command; the tool says so.
            stranger = post_init(capsys, tmp_path / "stranger")
            foreign = await acli(capsys, "post", "dim", "--all", "--level", "10",
                                 *site.args(post=stranger))  # fmt: skip
            assert foreign.code == 1, foreign.err
            assert f"\n  unknown_key: kid: no trusted key {stranger.kid}" in foreign.out
            assert "names no command" in foreign.err

            # The same id twice: the second token is a replay, nothing runs twice.
            again = [
                await acli(capsys, "post", "dim", "--device", "lamp-2", "--level", "60",
                           "--id", "once-only", "--json", *site.args())
                for _ in range(2)
            ]  # fmt: skip
            assert [r.code for r in again] == [0, 1], again
            replayed = json.loads(again[1].out)
            assert (replayed["status"], replayed["code"]) == ("rejected", "replayed")
            assert site.lamp(2).setpoint == 60

            # Executed but not as asked: a controller limited to 80 % (status error, exit 1).
            site.lamp(3).max_level = 80
            limited = await acli(capsys, "post", "dim", "--device", "lamp-3", "--level", "90",
                                 *site.args())  # fmt: skip
            assert limited.code == 1, limited.err
            assert limited.out.startswith("error: ")
            assert "lamp-3: mismatch, level 80 %" in limited.out
            writes_after = sum(site.lamp(u).writes.get(0, 0) for u in (1, 2, 3))
            assert writes_after == writes_before + 2  # the once-only dim and the limited one
            for result in (unknown, foreign, *again, limited):
                no_traceback(result)

    run(body)


def test_no_agent_no_ack_exit_3_and_the_command_was_sent(
    tmp_path: Path, broker: MosquittoBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    post = post_init(capsys, tmp_path / "post")
    gw = gateway_key(tmp_path)

    async def body() -> None:
        with Subscriber(broker, f"{BASE}/cmd") as commands:
            result = await subprocess_cli(
                "post", "dim", "--device", "lamp-1", "--level", "40", "--id", "lost-1",
                "--timeout", SHORT_TIMEOUT, *post_args(post, gw.enrolled, broker),
            )  # fmt: skip
            assert result.code == 3, result.err
            assert result.out == ""
            assert f"no verified ack from {GATEWAY} for command lost-1 within 1.5 s" in result.err
            assert "may still have run; its id lost-1 is spent" in result.err
            assert f"no status seen from {GATEWAY}" in result.err
            no_traceback(result)
            # It did go out, once, not retained: a gateway coming back later can still run it.
            (sent,) = await commands.wait_for_async(lambda m: len(m) == 1, WAIT_S)
            assert not sent.retain
            verifier = CommandVerifier(
                keys={post.kid: read_ed25519_public_key(post.public_file)},
                audience=GATEWAY,
                replay=MemoryReplayStore(),
            )
            verified = await verifier.verify(
                sent.payload, now_ms=int(time.time() * 1000), clock=ClockState(True)
            )
            assert verified.jti == "lost-1"

    run(body)


def test_an_ack_the_enrolled_key_does_not_verify_is_refused(
    tmp_path: Path, broker: MosquittoBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    async def body() -> None:
        async with agent_site(tmp_path, broker, capsys) as site:
            # The post's enrolment holds another key for this gateway (a stale enrolment, or a
            # gateway impersonated): the agent's genuine ack does not verify and is not shown.
            assert site.enrolled is not None
            wrong = tmp_path / "wrong"
            (wrong / GATEWAY).mkdir(parents=True)
            other_kid, other_public = write_ed25519_keypair(
                tmp_path / "other.key", wrong / GATEWAY, "gateway"
            )
            args = post_args(site.post, wrong, broker, "--timeout", SHORT_TIMEOUT)
            result = await acli(capsys, "post", "dim", "--device", "lamp-1", "--level", "33",
                                *args)  # fmt: skip
            assert result.code == 3, result.err
            assert result.out == ""
            assert f"unknown_key: kid: no trusted key {site.gateway_kid}" in result.err
            assert "the gateway's last status: online" in result.err
            # The command did run: exit 3 means "unknown", and the message says it may have.
            assert site.lamp(1).setpoint == 33
            assert other_kid != site.gateway_kid and other_public.exists()

    run(body)


def test_unsigned_acks_are_refused_unless_accepted(
    tmp_path: Path, broker: MosquittoBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    async def body() -> None:
        async with agent_site(tmp_path, broker, capsys, signed=False) as site:
            # Without a signing key the demo gateway answers plain JSON: taken only on request.
            taken = await acli(capsys, "post", "dim", "--device", "lamp-1", "--level", "45",
                               "--accept-unsigned-ack", "--json", *site.args())  # fmt: skip
            assert taken.code == 0, taken.err
            ack = json.loads(taken.out)
            assert ack["status"] == "ok" and ack["results"][0]["level"] == 45.0
            assert "UNVERIFIED" in taken.err
            not_taken = await acli(capsys, "post", "dim", "--device", "lamp-1", "--level", "46",
                                   "--timeout", SHORT_TIMEOUT, *site.args())  # fmt: skip
            assert not_taken.code == 3, not_taken.err
            assert not_taken.out == ""
            assert "plain JSON, not signed by the gateway" in not_taken.err
            assert "--accept-unsigned-ack" in not_taken.err
            assert site.lamp(1).setpoint == 46  # it ran; the tool could not trust the answer
            shown = await acli(capsys, "post", "dim", "--device", "lamp-1", "--level", "47",
                               "--accept-unsigned-ack", *site.args())  # fmt: skip
            assert shown.code == 0, shown.err
            assert "(UNVERIFIED)" in shown.out and "lamp-1: ok, level 47 %" in shown.out

    run(body)


def test_with_an_unsynchronised_gateway_clock_back_to_back_posts_both_run(
    tmp_path: Path, broker: MosquittoBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    async def body() -> None:
        async with agent_site(tmp_path, broker, capsys, clock="no") as site:
            # The gateway then requires iat to increase per post key. Two runs within the same
            # second still sign increasing iat: the latest is kept beside the key (here it was
            # a few seconds ahead already, so a run that ignored it would be a replay).
            ahead = int(time.time()) + 5
            (site.post.folder / "post-signing.iat").write_text(f"{site.post.kid} {ahead}\n")
            first = await acli(capsys, "post", "dim", "--device", "lamp-1", "--level", "21",
                               "--json", *site.args())  # fmt: skip
            second = await acli(capsys, "post", "dim", "--device", "lamp-1", "--level", "22",
                                "--json", *site.args())  # fmt: skip
            assert (first.code, second.code) == (0, 0), (first, second)
            for result in (first, second):
                assert "not synchronised" in json.loads(result.out)["clock_warning"]
            assert site.lamp(1).setpoint == 22
            kept = (site.post.folder / "post-signing.iat").read_text().split()
            assert kept == [site.post.kid, str(ahead + 2)]

    run(body)


def test_the_page_documents_every_option_and_its_links_resolve() -> None:
    repo = Path(__file__).resolve().parent.parent
    page = (repo / "docs" / "control-post.md").read_text(encoding="utf-8")
    for option in (
        "--gateway", "--key", "--gateways", "--ttl", "--timeout", "--id", "--json",
        "--accept-unsigned-ack", "--device", "--group", "--all", "--level", "--fade", "--on",
        "--off", "--point", "--value", "--host", "--port", "--prefix", "--ca-file",
        "--cert-file", "--key-file", "--tls", "--username", "--password-file", "--client-id",
        "--allow-plaintext",
    ):  # fmt: skip
        assert f"`{option}" in page, option
    assert "`lampyre keys post-init --out DIR`" in page and "## Rotating the post key" in page
    for link in re.findall(r"\]\(([^)#]+)", page):
        assert (repo / "docs" / link).exists(), link


def test_the_in_process_issued_at_clock_stays_strict_in_a_burst() -> None:
    """A gateway with an unsynchronised clock refuses an iat that is not above the last one:
    a burst signed within one second must keep increasing, however far it runs ahead."""
    from agent.post import IssuedAtClock

    async def body() -> None:
        clock = IssuedAtClock()
        issued = [await clock.next(1_800_000_000) for _ in range(50)]
        assert issued == list(range(1_800_000_000, 1_800_000_050))

    asyncio.run(body())
