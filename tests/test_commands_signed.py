"""The command service's verification path, fuzzed: whatever arrives on the ``cmd`` topic, the
service answers exactly once, never raises, and never reaches a bus unless the token is an
authentic, fresh command for this gateway."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.commands import CommandService, fixed_clock_state
from agent.config import load_profile
from agent.jws import CommandTableReplayStore, CommandVerifier, command_claims, sign_command
from agent.keys import ed25519_key_id
from agent.sdk import DeviceSpec, Driver

T = TypeVar("T")

GATEWAY = "fuzz-gw"
POST_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
POST_KID = ed25519_key_id(POST_KEY.public_key())


class CommandTable:
    """The buffer's command table, in memory (the real one is tested in test_buffer)."""

    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}

    async def remember_command(self, command_id: str, ack_payload: bytes, expires_ms: int) -> None:
        self.entries[command_id] = ack_payload

    async def recall_command(self, command_id: str) -> bytes | None:
        return self.entries.get(command_id)


class NoBus:
    """Counts every attempt to reach a bus: the property is that none happens."""

    def __init__(self) -> None:
        self.calls = 0

    async def run_on_bus(self, bus: str, job: Callable[[Driver], Awaitable[T]]) -> T:
        self.calls += 1
        raise AssertionError(f"a rejected command reached bus {bus}")


LAMP_PROFILE = load_profile(
    Path(__file__).resolve().parent.parent / "config" / "profiles" / "lamp-controller.toml"
)


def lamp() -> DeviceSpec:
    return DeviceSpec(
        id="lamp-1",
        bus="street-1",
        profile=LAMP_PROFILE,
        poll_interval_s=1.0,
        options=MappingProxyType({"unit": 1}),
    )


def service() -> tuple[CommandService, NoBus, list[Mapping[str, Any]], list[tuple[Any, ...]]]:
    acks: list[Mapping[str, Any]] = []
    events: list[tuple[Any, ...]] = []
    table = CommandTable()
    bus = NoBus()
    commands = CommandService(
        {"lamp-1": lamp()},
        {},
        bus,
        table,
        acks.append,
        lambda *args, **kwargs: events.append((*args, kwargs.get("severity"))),
        verifier=CommandVerifier(
            keys={POST_KID: POST_KEY.public_key()},
            audience=GATEWAY,
            replay=CommandTableReplayStore(table),
        ),
        clock=fixed_clock_state(True),
    )
    return commands, bus, acks, events


def valid_token() -> str:
    claims = command_claims(
        {"id": "cmd-1", "action": "dim", "target": {"device": "lamp-1"}, "level": 40},
        audience=GATEWAY,
        issued_at_s=int(time.time()),
    )
    return sign_command(claims, POST_KEY, POST_KID)


VALID = valid_token()


def mutated(token: str) -> st.SearchStrategy[bytes]:
    """Valid tokens with one byte changed, inserted or removed, or cut short."""
    raw = token.encode()
    index = st.integers(0, len(raw) - 1)
    return st.one_of(
        st.tuples(index, st.integers(0, 255)).map(
            lambda p: raw[: p[0]] + bytes([p[1]]) + raw[p[0] + 1 :]
        ),
        st.tuples(index, st.integers(0, 255)).map(
            lambda p: raw[: p[0]] + bytes([p[1]]) + raw[p[0] :]
        ),
        index.map(lambda i: raw[:i] + raw[i + 1 :]),
        index.map(lambda i: raw[:i]),
    ).filter(lambda candidate: candidate != raw)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        mutated(VALID),
        st.binary(max_size=10_000),
        st.text(alphabet="ABCDEFabcdef0123456789-_.", max_size=300).map(str.encode),
    )
)
def test_no_input_but_a_valid_token_reaches_a_bus(payload: bytes) -> None:
    async def body() -> None:
        commands, bus, acks, events = service()
        await commands.handle(payload)
        await commands.close()
        assert bus.calls == 0
        assert len(acks) == 1 and acks[0]["status"] == "rejected"
        assert isinstance(acks[0]["code"], str) and acks[0]["reason"]
        assert [event[0] for event in events] == ["security"]

    asyncio.run(body())


def test_the_valid_token_does_reach_the_bus_once() -> None:
    """The control for the property above: the unmutated token is executed (here, the bus
    refuses on purpose, and the ack reports it)."""

    async def body() -> None:
        commands, bus, acks, _ = service()
        # Signed now: VALID was signed at collection, possibly minutes before this test runs.
        token = valid_token().encode()
        await commands.handle(token)
        await commands.close()
        assert bus.calls == 1
        assert acks[-1]["id"] == "cmd-1"
        await commands.handle(token)
        assert bus.calls == 1
        assert acks[-1]["code"] == "replayed"

    asyncio.run(body())


def test_without_an_enrolled_post_key_every_signed_command_is_refused() -> None:
    async def body() -> None:
        acks: list[Mapping[str, Any]] = []
        bus = NoBus()
        commands = CommandService(
            {"lamp-1": lamp()}, {}, bus, CommandTable(), acks.append, lambda *a, **k: None
        )
        await commands.handle(VALID.encode())
        assert bus.calls == 0
        assert acks[0]["code"] == "unknown_key" and "no control-post key" in acks[0]["reason"]

    asyncio.run(body())


def test_unsigned_commands_only_with_allow_unsigned() -> None:
    async def body() -> None:
        plain = (
            b'{"id":"p-1","action":"dim","target":{"device":"lamp-1"},"level":5,'
            b'"expires":' + str(int(time.time() * 1000) + 60_000).encode() + b"}"
        )
        commands, bus, acks, _ = service()
        await commands.handle(plain)
        assert bus.calls == 0 and acks[0]["code"] == "unsigned"

        allowed_acks: list[Mapping[str, Any]] = []
        allowed_bus = NoBus()
        allowed = CommandService(
            {"lamp-1": lamp()},
            {},
            allowed_bus,
            CommandTable(),
            allowed_acks.append,
            lambda *a, **k: None,
            allow_unsigned=True,
        )
        await allowed.handle(plain)
        await allowed.close()
        assert allowed_bus.calls == 1

    asyncio.run(body())
