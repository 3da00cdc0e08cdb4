"""The reference hub consumer (``agent/hub.py``, ``lampyre hub listen``) against a real Mosquitto.

Envelopes are made by the gateway-side code (``agent.envelope.Sealer`` with keys written by
``agent.keys``) and published by an MQTT client as a gateway would. Nothing is mocked.

Ordering argument used by the "nothing else happened" assertions (never a sleep): one client
publishes in order, Mosquitto delivers a subscriber's messages in order, and the consumer
handles one message at a time. So once a message published *after* another one has been
stored, the earlier one has been handled too (stored, dropped or refused).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cli import main as cli_main
from agent.envelope import GatewayKeys, GatewaySigner, HubPrivateKey, HubPublicKey, Sealer
from agent.hub import (
    HubConsumer,
    HubCounters,
    HubError,
    HubSettings,
    RangeSet,
    RangeStore,
    receipt_tokens,
)
from agent.jws import MAX_RECEIPT_RANGES, verify_receipt
from agent.keys import (
    RECEIPT_SIGNING_KEY_FILE,
    create_gateway_signing_key,
    ed25519_key_id,
    load_ed25519_private_key,
    load_enrolled_gateway_keys,
    load_hub_private_keys,
    load_hub_public_keys,
    load_receipt_public_keys,
    write_ed25519_keypair,
    write_hub_keypair,
)
from agent.mqtt import Message, MqttSession, MqttSettings
from tests.support.mosquitto import (
    MosquittoBroker,
    Received,
    Subscriber,
    mosquitto_password_line,
)

PREFIX = "lampyre/v1"
GW1 = "cab-0001"
GW2 = "cab-0002"
WAIT_S = 10.0
POLL_S = 0.01
T0_MS = 1_764_300_000_000
LAMPYRE = Path(sys.executable).with_name("lampyre")


def run(body: Callable[[], Awaitable[None]], timeout_s: float = 30.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout_s):
            await body()

    asyncio.run(bounded())


async def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(POLL_S)


# --------------------------------------------------------------------------------------------
# A hub and two gateways, with keys on disk as the tools write them.
# --------------------------------------------------------------------------------------------


@dataclass
class Site:
    hub_dir: Path
    gateways_dir: Path
    hub_public: HubPublicKey
    hub_keys: dict[str, HubPrivateKey]
    receipt_key: Ed25519PrivateKey
    receipt_public: dict[str, Ed25519PublicKey]
    gateway_keys: GatewayKeys
    signers: dict[str, GatewaySigner]

    def sealer(self, gateway: str) -> Sealer:
        return Sealer(gateway, self.hub_public, self.signers[gateway])


def make_site(root: Path, gateways: tuple[str, ...] = (GW1, GW2)) -> Site:
    hub_dir = root / "hub"
    hub_dir.mkdir(mode=0o700)
    # What `lampyre keys hub-init --out DIR` writes (the CLI test runs the command itself).
    hub_public, _, _ = write_hub_keypair(hub_dir)
    write_ed25519_keypair(hub_dir / RECEIPT_SIGNING_KEY_FILE, hub_dir, "receipt")
    gateways_dir = root / "gateways"
    gateways_dir.mkdir(mode=0o755)
    signers: dict[str, GatewaySigner] = {}
    for gateway in gateways:
        signer, _ = create_gateway_signing_key(root / "gw" / gateway)
        signers[gateway] = signer
        enrolled = gateways_dir / gateway
        enrolled.mkdir(mode=0o755)
        shutil.copyfile(root / "gw" / gateway / "gateway-signing.pub", enrolled / "signing.pub")
    return Site(
        hub_dir=hub_dir,
        gateways_dir=gateways_dir,
        hub_public=hub_public,
        hub_keys=load_hub_private_keys(hub_dir),
        receipt_key=load_ed25519_private_key(hub_dir / RECEIPT_SIGNING_KEY_FILE),
        receipt_public=load_receipt_public_keys(hub_dir),
        gateway_keys=load_enrolled_gateway_keys(gateways_dir),
        signers=signers,
    )


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path)


def dumps(document: dict[str, Any]) -> bytes:
    # As the gateway's pipeline writes its bodies.
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def readings_of(seq: int, count: int = 3) -> list[dict[str, Any]]:
    readings: list[dict[str, Any]] = [
        {
            "device": f"lamp-{i + 1}",
            "point": "actual_level",
            "value": seq * 10 + i,
            "unit": "%",
            "ts": T0_MS + seq * 1000 + i,
            "quality": "good",
        }
        for i in range(count)
    ]
    if count >= 3:
        readings[1].update(point="lamp_power", value=None, unit="W", quality="bad")
        readings[2].update(point="voltage", value=230.5 + seq, unit="V")
    return readings


def data_body(gateway: str, seq: int, readings: list[dict[str, Any]]) -> bytes:
    return dumps(
        {"v": 1, "gateway": gateway, "seq": seq, "batch": f"{seq:032x}", "readings": readings}
    )


def sealed_data(sealer: Sealer, seq: int, count: int = 3) -> bytes:
    readings = readings_of(seq, count)
    stamps = [reading["ts"] for reading in readings] or [T0_MS]
    body = data_body(sealer.gateway, seq, readings)
    return sealer.seal("data", seq, seq, min(stamps), max(stamps), body)


def event_body(gateway: str, seq: int) -> dict[str, Any]:
    return {
        "v": 1,
        "gateway": gateway,
        "id": f"{seq:032x}",
        "ts": T0_MS + seq,
        "kind": "lamp_failure",
        "state": "raised",
        "severity": "alarm",
        "device": "lamp-3",
        "detail": {"point": "lamp_failure"},
        "seq": seq,
    }


def sealed_event(sealer: Sealer, seq: int) -> bytes:
    body = event_body(sealer.gateway, seq)
    return sealer.seal("event", seq, seq, body["ts"], body["ts"], dumps(body))


def topic(gateway: str, stream: str = "data") -> str:
    return f"{PREFIX}/{gateway}/{stream}"


def expected_reading_lines(gateway: str, seq: int, count: int = 3) -> list[dict[str, Any]]:
    return [
        {"type": "reading", "gateway": gateway, "seq": seq, **reading}
        for reading in readings_of(seq, count)
    ]


def output_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def seqs_in(path: Path, gateway: str) -> list[int]:
    return [line["seq"] for line in output_lines(path) if line["gateway"] == gateway]


def covered(ranges: list[tuple[int, int]]) -> set[int]:
    return {seq for first, last in ranges for seq in range(first, last + 1)}


# --------------------------------------------------------------------------------------------
# Running a consumer and a gateway in the test's event loop.
# --------------------------------------------------------------------------------------------


def hub_settings(broker: MosquittoBroker, out: Path, **changes: Any) -> HubSettings:
    mqtt = MqttSettings(
        host=broker.host,
        port=broker.port,
        client_id=changes.pop("client_id", f"hub-{secrets.token_hex(3)}"),
        session_expiry_s=changes.pop("session_expiry_s", 0),
    )
    return HubSettings(mqtt=mqtt, out=out, **changes)


def consumer_for(site: Site, settings: HubSettings, *, receipts: bool = False) -> HubConsumer:
    return HubConsumer(
        settings,
        hub_keys=site.hub_keys,
        gateway_keys=site.gateway_keys,
        receipt_key=site.receipt_key if receipts else None,
    )


@asynccontextmanager
async def listening(consumer: HubConsumer, **run_args: Any) -> AsyncIterator[None]:
    """The consumer runs (subscribed) inside the block and is stopped cleanly after it."""
    task = asyncio.create_task(consumer.run(**run_args))
    await wait_until(lambda: consumer.subscribed.is_set() or task.done(), "subscribed")
    if task.done():
        task.result()
    try:
        yield
    finally:
        consumer.stop()
        await task


@asynccontextmanager
async def gateway(broker: MosquittoBroker, client_id: str) -> AsyncIterator[MqttSession]:
    """An MQTT client publishing as a gateway does (QoS 1, one PUBACK per message)."""
    session = MqttSession(MqttSettings(host=broker.host, port=broker.port, client_id=client_id))
    await session.connect(None)
    try:
        yield session
    finally:
        await session.disconnect()


def stored(counters: HubCounters, messages: int) -> Callable[[], bool]:
    return lambda: counters.stored_messages >= messages


# --------------------------------------------------------------------------------------------
# Storing
# --------------------------------------------------------------------------------------------


def test_every_reading_and_event_is_stored_in_order_as_json_lines(
    broker: MosquittoBroker, site: Site, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    consumer = consumer_for(site, hub_settings(broker, out))

    async def body() -> None:
        async with listening(consumer), gateway(broker, GW1) as gw1, gateway(broker, GW2) as gw2:
            for seq in range(1, 5):
                await gw1.publish(topic(GW1), sealed_data(site.sealer(GW1), seq))
            await gw1.publish(topic(GW1, "event"), sealed_event(site.sealer(GW1), 5))
            await gw2.publish(topic(GW2), sealed_data(site.sealer(GW2), 1, count=1))
            await wait_until(stored(consumer.counters, 6), "6 messages stored")

    run(body)
    lines = output_lines(out)
    gw1_lines = [line for line in lines if line["gateway"] == GW1]
    expected = [line for seq in range(1, 5) for line in expected_reading_lines(GW1, seq)]
    expected.append({"type": "event", "gateway": GW1, "seq": 5, "event": event_body(GW1, 5)})
    assert gw1_lines == expected
    assert [line for line in lines if line["gateway"] == GW2] == expected_reading_lines(GW2, 1, 1)
    assert all(line.endswith("}") for line in out.read_text().splitlines())
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    counters = consumer.counters
    assert (counters.received, counters.stored_messages) == (6, 6)
    assert (counters.stored_readings, counters.stored_events) == (13, 1)
    assert (counters.duplicates, counters.refused, counters.receipts_sent) == (0, {}, 0)
    assert consumer.stored_ranges() == {GW1: [(1, 5)], GW2: [(1, 1)]}


def test_refused_envelopes_are_counted_logged_never_stored_and_the_consumer_goes_on(
    broker: MosquittoBroker, site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out.jsonl"
    consumer = consumer_for(site, hub_settings(broker, out))
    sealer = site.sealer(GW1)
    tampered = bytearray(sealed_data(sealer, 101))
    tampered[-100] ^= 0x01  # a ciphertext byte
    unenrolled = Sealer(GW1, site.hub_public, GatewaySigner.generate())
    other_hub = Sealer(GW1, HubPrivateKey.generate().public, site.signers[GW1])
    replayed = sealed_data(sealer, 104)
    refused = [
        (topic(GW1), bytes(tampered)),
        (topic(GW1), sealed_data(unenrolled, 102)),
        (topic(GW1), sealed_data(other_hub, 103)),
        (topic(GW2), replayed),  # an authentic envelope of cab-0001 on cab-0002's topic
        (topic(GW1, "event"), sealed_data(sealer, 105)),  # a data envelope on the event topic
        (topic(GW1), b"LMPE\x01garbage"),
    ]

    async def body() -> None:
        async with listening(consumer), gateway(broker, GW1) as gw1:
            for where, payload in refused:
                await gw1.publish(where, payload)
            await gw1.publish(topic(GW1), sealed_data(sealer, 1))
            # The replayed envelope was not marked as seen: on its own topic it is stored.
            await gw1.publish(topic(GW1), replayed)
            await wait_until(stored(consumer.counters, 2), "the good envelopes stored")

    with caplog.at_level(logging.WARNING, logger="agent.hub"):
        run(body)
    assert consumer.counters.refused == {
        "bad_signature": 1,
        "unknown_gateway_key": 1,
        "unknown_hub_key": 1,
        "header_mismatch": 2,
        "malformed": 1,
    }
    assert consumer.counters.received == len(refused) + 2
    assert seqs_in(out, GW1) == [1, 1, 1, 104, 104, 104]
    assert seqs_in(out, GW2) == []
    assert consumer.stored_ranges() == {GW1: [(1, 1), (104, 104)]}
    warnings = [r for r in caplog.records if r.name == "agent.hub" and r.levelno == logging.WARNING]
    assert len(warnings) == len(refused)
    messages = [record.getMessage() for record in warnings]
    for message, reason, (where, _) in zip(
        messages,
        [
            "bad_signature",
            "unknown_gateway_key",
            "unknown_hub_key",
            "header_mismatch",
            "header_mismatch",
            "malformed",
        ],
        refused,
        strict=True,
    ):
        _, gateway_id, stream = where.rsplit("/", 2)
        assert f"gateway {gateway_id} on {stream}: {reason}" in message
    # Never the payload: no envelope bytes, whatever their form.
    for _, payload in refused:
        assert not any(payload.hex()[:64] in m or repr(payload)[:40] in m for m in messages)


def test_duplicates_are_dropped_after_verification_also_across_a_restart(
    broker: MosquittoBroker, site: Site, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    state = tmp_path / "state" / "hub.db"
    state.parent.mkdir()
    sealer = site.sealer(GW1)
    envelopes = {seq: sealed_data(sealer, seq) for seq in range(1, 7)}
    first = consumer_for(site, hub_settings(broker, out, state=state))

    async def first_run() -> None:
        async with listening(first), gateway(broker, GW1) as gw1:
            for seq in (1, 2, 3, 2):
                await gw1.publish(topic(GW1), envelopes[seq])
            # A forged copy of seq 3 (signature broken) is refused, not taken for a duplicate.
            forged = bytearray(envelopes[3])
            forged[-1] ^= 0x01
            await gw1.publish(topic(GW1), bytes(forged))
            await gw1.publish(topic(GW1, "event"), sealed_event(sealer, 7))
            await wait_until(stored(first.counters, 4), "seqs 1, 2, 3 and 7 stored")

    run(first_run)
    assert first.counters.duplicates == 1
    assert first.counters.refused == {"bad_signature": 1}
    assert stat.S_IMODE(state.stat().st_mode) == 0o600

    second = consumer_for(site, hub_settings(broker, out, state=state))

    async def second_run() -> None:
        async with listening(second), gateway(broker, GW1) as gw1:
            await gw1.publish(topic(GW1, "event"), sealed_event(sealer, 7))
            for seq in (1, 3, 4, 6):
                await gw1.publish(topic(GW1), envelopes[seq])
            await wait_until(stored(second.counters, 2), "seqs 4 and 6 stored")

    run(second_run)
    assert second.counters.duplicates == 3
    assert second.counters.stored_messages == 2
    assert sorted(set(seqs_in(out, GW1))) == [1, 2, 3, 4, 6, 7]
    assert [seqs_in(out, GW1).count(seq) for seq in (1, 2, 3, 4, 6, 7)] == [3, 3, 3, 3, 3, 1]
    store = RangeStore(state)
    try:
        # Compact: one row per range of consecutive seqs, not one per seq.
        assert store.row_count() == 2
        assert {gw: r.ranges() for gw, r in store.load().items()} == {GW1: [(1, 4), (6, 7)]}
    finally:
        store.close()


def test_two_consumers_in_one_group_store_each_message_exactly_once(
    broker: MosquittoBroker, site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    group = secrets.token_hex(16)
    outs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "alone.jsonl"]
    sharing = [consumer_for(site, hub_settings(broker, out, group=group)) for out in outs[:2]]
    alone = consumer_for(site, hub_settings(broker, outs[2]))  # no group: a random one
    per_gateway = 20

    async def body() -> None:
        async with (
            listening(sharing[0]),
            listening(sharing[1]),
            listening(alone),
            gateway(broker, GW1) as gw1,
            gateway(broker, GW2) as gw2,
        ):
            for seq in range(1, per_gateway + 1):
                await gw1.publish(topic(GW1), sealed_data(site.sealer(GW1), seq, count=1))
                await gw2.publish(topic(GW2), sealed_data(site.sealer(GW2), seq, count=1))
            await wait_until(
                lambda: (
                    sum(c.counters.stored_messages for c in sharing) >= 2 * per_gateway
                    and alone.counters.stored_messages >= 2 * per_gateway
                ),
                "every message stored",
            )

    with caplog.at_level(logging.INFO, logger="agent.hub"):
        run(body)
    everything = {(gw, seq) for gw in (GW1, GW2) for seq in range(1, per_gateway + 1)}
    got = [{(line["gateway"], line["seq"]) for line in output_lines(out)} for out in outs]
    assert got[0] and got[1], "both consumers of the group took a share"
    assert not got[0] & got[1]
    assert got[0] | got[1] == everything
    assert sum(len(output_lines(out)) for out in outs[:2]) == 2 * per_gateway
    assert got[2] == everything
    assert any(
        "shares the messages with no other consumer" in r.getMessage() for r in caplog.records
    )


def test_plaintext_is_refused_unless_accepted(
    broker: MosquittoBroker, site: Site, tmp_path: Path
) -> None:
    plain = data_body(GW1, 1, readings_of(1))
    strict = consumer_for(site, hub_settings(broker, tmp_path / "strict.jsonl"))

    async def refused() -> None:
        async with listening(strict), gateway(broker, GW1) as gw1:
            await gw1.publish(topic(GW1), plain)
            await gw1.publish(topic(GW1), sealed_data(site.sealer(GW1), 2))
            await wait_until(stored(strict.counters, 1), "the sealed batch stored")

    run(refused)
    assert strict.counters.refused == {"plaintext": 1}
    assert seqs_in(tmp_path / "strict.jsonl", GW1) == [2, 2, 2]

    out = tmp_path / "lenient.jsonl"
    lenient = consumer_for(site, hub_settings(broker, out, accept_plaintext=True))

    async def accepted() -> None:
        async with listening(lenient), gateway(broker, GW1) as gw1:
            await gw1.publish(topic(GW1), plain)
            await gw1.publish(topic(GW1), plain)  # the same seq again: a duplicate
            await gw1.publish(topic(GW1), data_body(GW2, 5, readings_of(5)))  # not cab-0001's
            await gw1.publish(topic(GW1), b'{"v":1,"gateway":"cab-0001","readings":[]}')  # no seq
            await gw1.publish(topic(GW1, "event"), dumps(event_body(GW1, 3)))
            await gw1.publish(topic(GW1), sealed_data(site.sealer(GW1), 4))
            await wait_until(stored(lenient.counters, 3), "plaintext and sealed stored")

    run(accepted)
    assert lenient.counters.refused == {"header_mismatch": 1, "bad_body": 1}
    assert lenient.counters.duplicates == 1
    lines = output_lines(out)
    assert lines[:3] == expected_reading_lines(GW1, 1)
    assert lines[3] == {"type": "event", "gateway": GW1, "seq": 3, "event": event_body(GW1, 3)}
    assert [line["seq"] for line in lines[4:]] == [4, 4, 4]


def test_a_persistent_session_gets_what_was_published_while_the_consumer_was_down(
    broker: MosquittoBroker, site: Site, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    group = secrets.token_hex(16)

    def persistent() -> HubConsumer:
        settings = hub_settings(
            broker, out, group=group, client_id="hub-persistent", session_expiry_s=60
        )
        return consumer_for(site, settings)

    before, after = persistent(), persistent()

    async def body() -> None:
        async with listening(before):
            pass
        async with gateway(broker, GW1) as gw1:
            for seq in (1, 2, 3):
                await gw1.publish(topic(GW1), sealed_data(site.sealer(GW1), seq, count=1))
        async with listening(after):
            await wait_until(stored(after.counters, 3), "the queued messages stored")

    run(body)
    assert seqs_in(out, GW1) == [1, 2, 3]


def test_a_message_that_could_not_be_stored_is_not_acknowledged(
    broker: MosquittoBroker, site: Site, tmp_path: Path
) -> None:
    """Storage fails (the output device is full): the consumer stops with an error and never
    acknowledges the message, so the broker gives it to the next start (persistent session)."""
    group = secrets.token_hex(16)

    def persistent(out: Path) -> HubConsumer:
        settings = hub_settings(broker, out, group=group, client_id="hub-full", session_expiry_s=60)
        return consumer_for(site, settings)

    full, working = persistent(Path("/dev/full")), persistent(tmp_path / "out.jsonl")
    failure: list[str] = []

    async def body() -> None:
        task = asyncio.create_task(full.run())
        await wait_until(lambda: full.subscribed.is_set() or task.done(), "subscribed")
        async with gateway(broker, GW1) as gw1:
            await gw1.publish(topic(GW1), sealed_data(site.sealer(GW1), 1))
        with pytest.raises(HubError) as raised:
            await task
        failure.append(str(raised.value))
        async with listening(working):
            await wait_until(stored(working.counters, 1), "the message delivered again")

    run(body)
    assert "cannot write the output" in failure[0]
    assert full.counters.stored_messages == 0
    assert seqs_in(tmp_path / "out.jsonl", GW1) == [1, 1, 1]


# --------------------------------------------------------------------------------------------
# Receipts
# --------------------------------------------------------------------------------------------


def receipted(messages: list[Received], site: Site, gateway_id: str) -> list[set[int]]:
    """The seqs each verified receipt for ``gateway_id`` names, in arrival order."""
    named: list[set[int]] = []
    for message in messages:
        if message.topic != f"{PREFIX}/{gateway_id}/receipt":
            continue
        assert not message.retain and message.qos == 1
        receipt = verify_receipt(message.payload, keys=site.receipt_public, gateway=gateway_id)
        assert receipt.kid == ed25519_key_id(site.receipt_key.public_key())
        named.append(covered(list(receipt.ranges)))
    return named


def test_receipts_name_exactly_the_stored_seqs_and_duplicates_again(
    broker: MosquittoBroker, site: Site, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    consumer = consumer_for(site, hub_settings(broker, out, receipt_interval_s=0.05), receipts=True)
    sealer = site.sealer(GW1)
    tampered = bytearray(sealed_data(sealer, 6))
    tampered[-1] ^= 0x01
    seen_in_output: list[bool] = []

    def union(messages: list[Received], gateway_id: str) -> set[int]:
        return set().union(*receipted(messages, site, gateway_id))

    async def body() -> None:
        with Subscriber(broker, f"{PREFIX}/+/receipt") as receipts:
            async with (
                listening(consumer),
                gateway(broker, GW1) as gw1,
                gateway(broker, GW2) as gw2,
            ):
                await gw1.publish(topic(GW1), bytes(tampered))
                for seq in range(1, 6):
                    await gw1.publish(topic(GW1), sealed_data(sealer, seq))
                await gw2.publish(topic(GW2, "event"), sealed_event(site.sealer(GW2), 9))
                got = await receipts.wait_for_async(
                    lambda m: union(m, GW1) >= set(range(1, 6)) and union(m, GW2) >= {9}, WAIT_S
                )
                # A receipt is sent once the lines are on disk, never before.
                stored_seqs = {(line["gateway"], line["seq"]) for line in output_lines(out)}
                seen_in_output.append(
                    all((gw, seq) in stored_seqs for gw in (GW1, GW2) for seq in union(got, gw))
                )
                assert union(got, GW1) == set(range(1, 6))
                assert union(got, GW2) == {9}
                receipts.clear()
                # The gateway re-sends seq 3 (its receipt was lost): receipted again.
                await gw1.publish(topic(GW1), sealed_data(sealer, 3))
                again = await receipts.wait_for_async(
                    lambda m: bool(receipted(m, site, GW1)), WAIT_S
                )
                assert receipted(again, site, GW1) == [{3}]

    run(body)
    assert seen_in_output == [True]
    assert consumer.counters.duplicates == 1
    assert consumer.counters.refused == {"bad_signature": 1}
    assert consumer.counters.receipts_sent >= 3


def test_the_shipped_acl_lets_the_hub_identity_share_and_receipt(
    site: Site, tmp_path: Path
) -> None:
    """packaging/mosquitto/acl as shipped, with the hub and a gateway logging in by password
    (as on the shipped configuration's local listener): the hub reads through its shared
    subscription, publishes receipts without a will, and the gateway receives them."""
    passwords = {name: secrets.token_hex(8) for name in ("hub", GW1)}
    passwd = tmp_path / "passwd"
    passwd.write_text("".join(mosquitto_password_line(n, p) for n, p in passwords.items()))
    secret_files: dict[str, Path] = {}
    for name, password in passwords.items():
        secret_files[name] = tmp_path / f"{name}.password"
        secret_files[name].write_text(password)
        secret_files[name].chmod(0o600)
    acl = Path(__file__).resolve().parent.parent / "packaging" / "mosquitto" / "acl"
    extra = f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}"
    broker = MosquittoBroker(tmp_path / "broker", extra_conf=extra)
    out = tmp_path / "out.jsonl"

    def login(name: str, client_id: str) -> MqttSettings:
        return MqttSettings(
            host=broker.host,
            port=broker.port,
            client_id=client_id,
            username=name,
            password_file=secret_files[name],
        )

    async def body() -> None:
        hub_mqtt = login("hub", "hub-acl")
        consumer = HubConsumer(
            HubSettings(mqtt=hub_mqtt, out=out, group=secrets.token_hex(16)),
            hub_keys=site.hub_keys,
            gateway_keys=site.gateway_keys,
            receipt_key=site.receipt_key,
        )
        got: list[bytes] = []
        arrived = asyncio.Event()

        async def on_receipt(message: Message) -> None:
            got.append(message.payload)
            arrived.set()

        gw = MqttSession(login(GW1, GW1))
        gw.on_message(on_receipt)
        await gw.connect(None)
        try:
            await gw.subscribe(f"{PREFIX}/{GW1}/receipt")
            async with listening(consumer):
                for seq in (1, 2):
                    await gw.publish(topic(GW1), sealed_data(site.sealer(GW1), seq, count=1))
                await wait_until(stored(consumer.counters, 2), "stored under the ACL")
            await wait_until(
                lambda: (
                    covered(
                        [
                            item
                            for token in got
                            for item in verify_receipt(
                                token, keys=site.receipt_public, gateway=GW1
                            ).ranges
                        ]
                    )
                    == {1, 2}
                ),
                "the gateway received its receipts",
            )
        finally:
            await gw.disconnect()
        assert consumer.counters.receipts_refused == 0

    with broker:
        run(body)
    assert seqs_in(out, GW1) == [1, 2]


def test_receipt_tokens_hold_at_most_the_maximum_number_of_ranges(site: Site) -> None:
    ranges = [(seq * 10, seq * 10 + 2) for seq in range(2 * MAX_RECEIPT_RANGES + 5)]
    kid = ed25519_key_id(site.receipt_key.public_key())
    tokens = receipt_tokens(GW1, reversed(ranges), site.receipt_key, kid, ts_ms=T0_MS)
    assert [len(chunk) for chunk, _ in tokens] == [MAX_RECEIPT_RANGES, MAX_RECEIPT_RANGES, 5]
    named: list[tuple[int, int]] = []
    for chunk, token in tokens:
        receipt = verify_receipt(token, keys=site.receipt_public, gateway=GW1)
        assert list(receipt.ranges) == chunk
        named.extend(receipt.ranges)
    assert named == ranges


# --------------------------------------------------------------------------------------------
# The stored ranges (the state's merge), against a plain set of integers
# --------------------------------------------------------------------------------------------

_ranges = st.lists(
    st.tuples(st.integers(0, 60), st.integers(0, 6)).map(lambda t: (t[0], t[0] + t[1])),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(added=_ranges, probes=_ranges)
def test_range_set_is_a_set_of_integers(
    added: list[tuple[int, int]], probes: list[tuple[int, int]]
) -> None:
    model: set[int] = set()
    ranges = RangeSet()
    for first, last in added:
        merged = ranges.add(first, last)
        model.update(range(first, last + 1))
        assert merged[0] <= first and last <= merged[1]
        assert covered([merged]) <= model
    assert covered(ranges.ranges()) == model
    kept = ranges.ranges()
    assert kept == sorted(kept)
    # Disjoint and not even adjacent: the most compact form, one range per run of seqs.
    assert all(a_last + 1 < b_first for (_, a_last), (b_first, _) in itertools.pairwise(kept))
    for first, last in probes:
        assert ranges.covers(first, last) == (set(range(first, last + 1)) <= model)
    assert RangeSet(added).ranges() == kept


_state_example = iter(range(1_000_000))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from([GW1, GW2]), st.integers(0, 40), st.integers(0, 4), st.booleans()
        ),
        max_size=30,
    )
)
def test_the_state_file_keeps_exactly_the_merged_ranges(
    tmp_path: Path, steps: list[tuple[str, int, int, bool]]
) -> None:
    path = tmp_path / f"state-{next(_state_example)}.db"
    memory: dict[str, RangeSet] = {}
    store = RangeStore(path)
    try:
        for gateway_id, first, length, reopen in steps:
            merged = memory.setdefault(gateway_id, RangeSet()).add(first, first + length)
            store.record([(gateway_id, *merged)])
            if reopen:
                store.close()
                store = RangeStore(path)
        loaded = store.load()
        assert {gw: r.ranges() for gw, r in loaded.items()} == {
            gw: r.ranges() for gw, r in memory.items()
        }
        assert store.row_count() == sum(len(r) for r in memory.values())
    finally:
        store.close()


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


class Listener:
    """``lampyre hub listen`` as a subprocess, its standard error collected by a thread."""

    def __init__(self, args: list[str]) -> None:
        self.process = subprocess.Popen(
            [str(LAMPYRE), "hub", "listen", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._lines)

    async def wait_listening(self) -> None:
        await wait_until(
            lambda: "listening on" in self.stderr or self.process.poll() is not None,
            "lampyre hub listen subscribed",
        )
        assert self.process.poll() is None, self.stderr

    async def wait_exit(self) -> int:
        await wait_until(lambda: self.process.poll() is not None, "lampyre hub listen exited")
        self._reader.join(WAIT_S)
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(WAIT_S)


@pytest.fixture
def listener_args(broker: MosquittoBroker, tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """A hub folder made by `lampyre keys hub-init`, enrolment, a group file, and the options."""
    hub_dir = tmp_path / "cli-hub"
    made = subprocess.run(
        [str(LAMPYRE), "keys", "hub-init", "--out", str(hub_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    group_file = tmp_path / "group"
    group_file.write_text(secrets.token_hex(16) + "\n")
    group_file.chmod(0o600)
    yield hub_dir, [
        "--port", str(broker.port),
        "--hub-keys", str(hub_dir),
        "--group-file", str(group_file),
        "--log-level", "info",
    ]  # fmt: skip


def test_cli_listen_writes_json_lines_receipts_and_stops_after_count(
    broker: MosquittoBroker, site: Site, tmp_path: Path, listener_args: tuple[Path, list[str]]
) -> None:
    hub_dir, args = listener_args
    (hub_public,) = load_hub_public_keys(hub_dir).values()
    sealer = Sealer(GW1, hub_public, site.signers[GW1])
    out, state = tmp_path / "cli.jsonl", tmp_path / "cli.db"
    listener = Listener(
        [*args, "--gateways", str(site.gateways_dir), "--out", str(out), "--state", str(state),
         "--receipts", "--count", "6"]
    )  # fmt: skip
    receipt_keys = load_receipt_public_keys(hub_dir)

    def named(messages: list[Received]) -> set[int]:
        receipts = [verify_receipt(m.payload, keys=receipt_keys, gateway=GW1) for m in messages]
        return covered([item for receipt in receipts for item in receipt.ranges])

    async def body() -> None:
        with Subscriber(broker, f"{PREFIX}/+/receipt") as receipts:
            try:
                await listener.wait_listening()
                async with gateway(broker, GW1) as gw1:
                    await gw1.publish(topic(GW1), sealed_data(sealer, 1))
                    await gw1.publish(topic(GW1), sealed_data(sealer, 2))
                    assert await listener.wait_exit() == 0, listener.stderr
                got = await receipts.wait_for_async(lambda m: named(m) >= {1, 2}, WAIT_S)
            finally:
                listener.kill()
        assert named(got) == {1, 2}

    run(body)
    assert output_lines(out) == expected_reading_lines(GW1, 1) + expected_reading_lines(GW1, 2)
    stderr = listener.stderr
    assert "Traceback" not in stderr
    assert "stored 6 readings and 0 events (2 messages)" in stderr
    assert stat.S_IMODE(state.stat().st_mode) == 0o600


def test_cli_listen_stops_cleanly_on_sigterm(
    broker: MosquittoBroker, site: Site, tmp_path: Path, listener_args: tuple[Path, list[str]]
) -> None:
    hub_dir, args = listener_args
    (hub_public,) = load_hub_public_keys(hub_dir).values()
    out = tmp_path / "cli.jsonl"
    listener = Listener([*args, "--gateways", str(site.gateways_dir), "--out", str(out)])

    async def body() -> None:
        try:
            await listener.wait_listening()
            async with gateway(broker, GW1) as gw1:
                sealer = Sealer(GW1, hub_public, site.signers[GW1])
                await gw1.publish(topic(GW1), b"LMPE\x01garbage")
                await gw1.publish(topic(GW1), sealed_data(sealer, 1))
                await wait_until(lambda: out.exists() and len(output_lines(out)) == 3, "stored")
            listener.process.send_signal(signal.SIGTERM)
            assert await listener.wait_exit() == 0, listener.stderr
        finally:
            listener.kill()

    run(body)
    assert "Traceback" not in listener.stderr
    assert "stored 3 readings and 0 events (1 messages)" in listener.stderr
    assert "refused 1 (malformed 1)" in listener.stderr


def test_cli_refuses_plaintext_to_another_machine_without_a_traceback(tmp_path: Path) -> None:
    hub_dir = tmp_path / "hub"
    hub_dir.mkdir()
    refused = subprocess.run(
        [str(LAMPYRE), "hub", "listen", "--host", "192.0.2.7", "--hub-keys", str(hub_dir),
         "--gateways", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "--allow-plaintext" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_cli_option_and_key_errors_say_what_to_fix(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    no_receipt_key = tmp_path / "no-receipt"
    no_receipt_key.mkdir(mode=0o700)
    write_hub_keypair(no_receipt_key)
    open_group = tmp_path / "open-group"
    open_group.write_text(secrets.token_hex(16))
    open_group.chmod(0o644)
    base = ["hub", "listen", "--gateways", str(site.gateways_dir)]
    hub = ["--hub-keys", str(site.hub_dir)]

    def status(*args: str) -> tuple[int, str]:
        code = cli_main([*base, *args])
        return code, capsys.readouterr().err

    cases = [
        (["--hub-keys", str(empty)], 1, "no hub private key"),
        (["--hub-keys", str(tmp_path / "missing")], 1, "not a folder"),
        (["--hub-keys", str(no_receipt_key), "--receipts"], 1, "receipt-signing.key"),
        ([*hub, "--group-file", str(open_group)], 1, "chmod 600"),
        ([*hub, "--group", "a/b"], 2, "share group name"),
        ([*hub, "--prefix", "lampyre/#"], 2, "wildcard"),
        ([*hub, "--session-expiry", "60"], 2, "--client-id"),
        ([*hub, "--session-expiry", "60", "--client-id", "hub"], 2, "--group"),
        ([*hub, "--cert-file", str(empty / "c.pem")], 2, "--key-file"),
    ]
    for args, expected_status, expected_text in cases:
        code, err = status(*args)
        assert (code, expected_text in err) == (expected_status, True), (args, err)
        assert err.startswith("lampyre hub listen: ") and "Traceback" not in err
    with pytest.raises(SystemExit) as usage:
        cli_main(["hub", "listen", "--gateways", str(site.gateways_dir)])
    assert usage.value.code == 2
    assert "--hub-keys" in capsys.readouterr().err
    code, err = status("--hub-keys", str(site.hub_dir), "--gateways", str(tmp_path / "nowhere"))
    assert code == 1 and "not a folder" in err
    assert os.listdir(empty) == []
