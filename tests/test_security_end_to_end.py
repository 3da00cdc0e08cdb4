"""End to end with the production security settings: a simulated cabinet, the real agent and a
real Mosquitto. Readings leave sealed for the hub alone; only commands signed by an enrolled
control-post key move a lamp; every refusal is a signed ``rejected`` ack plus a security event,
and nothing reaches the bus."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.buffer import Lane
from agent.envelope import MAGIC, HubPrivateKey, open_envelope
from agent.hub import HubConsumer, HubSettings
from agent.jws import command_claims, sign_command, verify_ack
from agent.keys import (
    create_gateway_signing_key,
    load_ed25519_private_key,
    load_hub_private_keys,
    write_ed25519_keypair,
    write_hub_keypair,
)
from agent.mqtt import MqttSettings
from agent.runtime import Agent
from firmware_sim.modbus import EnergyMeter, LampController, ModbusSimulator
from tests.e2e import PREFIX, Publisher, start_agent_online, stop_agent, validator, write_config
from tests.support.mosquitto import MosquittoBroker, Received, Subscriber

GATEWAY = "sec-gw"
BASE = f"{PREFIX}/{GATEWAY}"
WAIT_S = 15.0
SETPOINT_REGISTER = 0
"""The lamp controller's set-point holding register (config/profiles/lamp-controller.toml)."""


@dataclass
class Keys:
    """Every party's keys, made the way the tools make them."""

    gateway_dir: Path
    hub_dir: Path
    gateway_public: dict[str, Ed25519PublicKey]
    hub_private: dict[str, HubPrivateKey]
    post: Ed25519PrivateKey
    post_kid: str
    stranger: Ed25519PrivateKey
    """A post key the gateway never enrolled."""
    stranger_kid: str


def make_keys(root: Path) -> Keys:
    gateway_dir = root / "keys"
    gateway_dir.mkdir(mode=0o700)
    signer, _ = create_gateway_signing_key(gateway_dir)
    hub_dir = root / "hub"
    hub_dir.mkdir(mode=0o700)
    _, _, hub_public_file = write_hub_keypair(hub_dir)
    shutil.copy(hub_public_file, gateway_dir / hub_public_file.name)
    _, receipt_public = write_ed25519_keypair(hub_dir / "receipt-signing.key", hub_dir, "receipt")
    shutil.copy(receipt_public, gateway_dir / receipt_public.name)
    post_dir = root / "post"
    post_dir.mkdir(mode=0o700)
    post_kid, post_public = write_ed25519_keypair(post_dir / "post-signing.key", post_dir, "post")
    shutil.copy(post_public, gateway_dir / post_public.name)
    stranger_dir = root / "stranger"
    stranger_dir.mkdir(mode=0o700)
    stranger_kid, _ = write_ed25519_keypair(stranger_dir / "post-signing.key", stranger_dir, "post")
    return Keys(
        gateway_dir=gateway_dir,
        hub_dir=hub_dir,
        gateway_public={signer.skid: signer.public_key},
        hub_private=load_hub_private_keys(hub_dir),
        post=load_ed25519_private_key(post_dir / "post-signing.key"),
        post_kid=post_kid,
        stranger=load_ed25519_private_key(stranger_dir / "post-signing.key"),
        stranger_kid=stranger_kid,
    )


@dataclass
class Site:
    sim: ModbusSimulator
    keys: Keys
    sub: Subscriber
    post: Publisher
    config_path: Path
    agent: Agent | None = None
    task: asyncio.Task[None] | None = None

    def lamp(self, unit: int) -> LampController:
        device = self.sim.unit(unit)
        assert isinstance(device, LampController)
        return device

    def setpoint_writes(self) -> int:
        return sum(self.lamp(u).writes.get(SETPOINT_REGISTER, 0) for u in (1, 2, 3))

    async def start_agent(self) -> None:
        self.agent, self.task = await start_agent_online(self.config_path, WAIT_S)

    async def stop_agent(self) -> None:
        assert self.task is not None
        await stop_agent(self.task)

    def token(
        self,
        command_id: str,
        *,
        key: Ed25519PrivateKey | None = None,
        kid: str | None = None,
        audience: str = GATEWAY,
        issued_at_s: int | None = None,
        lifetime_s: int = 60,
        **body: Any,
    ) -> bytes:
        claims = command_claims(
            {"id": command_id, "action": "dim", "target": {"device": "lamp-1"}, **body},
            audience=audience,
            issued_at_s=issued_at_s if issued_at_s is not None else _now_s(),
            lifetime_s=lifetime_s,
        )
        signed = sign_command(claims, key or self.keys.post, kid or self.keys.post_kid)
        return signed.encode()

    async def send(self, payload: bytes) -> None:
        await self.post.send(f"{BASE}/cmd", payload)

    def acks(self, messages: list[Received]) -> list[dict[str, Any]]:
        """Every ack on the broker, each verified with the gateway's enrolled key."""
        return [
            verify_ack(m.payload, keys=self.keys.gateway_public, gateway=GATEWAY)
            for m in messages
            if m.topic == f"{BASE}/ack"
        ]

    def open_all(self, messages: list[Received], stream: str) -> list[dict[str, Any]]:
        """The bodies of the sealed ``stream`` messages, opened as the hub would."""
        bodies = []
        for message in messages:
            if message.topic != f"{BASE}/{stream}":
                continue
            header, plain = open_envelope(
                message.payload,
                self.keys.hub_private,
                {GATEWAY: self.keys.gateway_public},
                gateway=GATEWAY,
                stream=stream,
            )
            document = json.loads(plain)
            assert (header.seq_first, header.seq_last) == (document["seq"], document["seq"])
            bodies.append(document)
        return bodies

    async def ack_for(self, command_id: str | None, count: int = 1) -> list[dict[str, Any]]:
        messages = await self.sub.wait_for_async(
            lambda m: len([a for a in self.acks(m) if a.get("id") == command_id]) >= count,
            WAIT_S,
        )
        return [a for a in self.acks(messages) if a.get("id") == command_id]


def _now_s() -> int:
    import time

    return int(time.time())


@asynccontextmanager
async def site(
    tmp_path: Path, broker: MosquittoBroker, *, clock: str = "yes", hub_extra: str = ""
) -> AsyncIterator[Site]:
    sim = ModbusSimulator(
        {
            1: LampController(setpoint=100),
            2: LampController(),
            3: LampController(),
            10: EnergyMeter(),
        }
    )
    port = await sim.start_tcp("127.0.0.1", 0)
    keys = make_keys(tmp_path)
    config_path = write_config(
        tmp_path,
        gateway=GATEWAY,
        sim_port=port,
        broker_port=broker.port,
        sealed=True,
        hub_extra=hub_extra,
        extra=f'[commands]\nclock_synchronized = "{clock}"\n',
    )
    sub = Subscriber(broker, f"{BASE}/#")
    await asyncio.to_thread(sub.start)
    post = Publisher(broker.port)
    place = Site(sim, keys, sub, post, config_path)
    await place.start_agent()
    try:
        yield place
    finally:
        await place.stop_agent()
        post.close()
        sub.stop()
        await sim.stop()


def test_the_broker_sees_only_envelopes_and_the_hub_key_opens_every_reading(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    async def body() -> None:
        async with site(tmp_path, broker) as place:
            wanted = {"lamp-1", "lamp-2", "lamp-3", "meter"}

            def every_device(messages: list[Received]) -> bool:
                seen = {
                    r["device"] for b in place.open_all(messages, "data") for r in b["readings"]
                }
                return wanted <= seen

            messages = await place.sub.wait_for_async(every_device, WAIT_S)
            sealed = [m for m in messages if m.topic.rsplit("/", 1)[-1] in ("data", "event")]
            assert sealed
            for message in sealed:
                # What the broker (or anyone it serves) holds: an envelope, no plaintext.
                assert message.payload.startswith(MAGIC)
                assert b"lamp-1" not in message.payload and b"readings" not in message.payload
            batches = place.open_all(messages, "data")
            readings = [r for b in batches for r in b["readings"]]
            level = [
                r["value"]
                for r in readings
                if (r["device"], r["point"]) == ("lamp-1", "actual_level")
            ]
            assert level and level[-1] == 100
            for batch in batches:
                assert batch["gateway"] == GATEWAY
            # The status is for everyone (is the gateway up?) and stays plain JSON.
            status = [json.loads(m.payload) for m in messages if m.topic == f"{BASE}/status"]
            assert status[0]["state"] == "online"
            # The buffer holds the same envelopes: nothing it stores opens without the hub key.
            assert place.agent is not None and place.agent.buffer is not None
            for record in await place.agent.buffer.pending(100):
                if record.topic in ("data", "event"):
                    assert record.payload.startswith(MAGIC)

    asyncio.run(body())


def test_a_signed_command_is_executed_and_its_ack_is_signed(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    async def body() -> None:
        async with site(tmp_path, broker) as place:
            await place.send(place.token("dim-ok-1", level=40))
            (ack,) = await place.ack_for("dim-ok-1")
            assert ack["status"] == "ok", ack
            assert ack["results"] == [{"device": "lamp-1", "status": "ok", "level": 40.0}]
            assert place.lamp(1).setpoint == 40
            assert "clock_warning" not in ack

    asyncio.run(body())


def test_every_bad_token_is_rejected_with_its_reason_and_nothing_reaches_the_bus(
    tmp_path: Path, broker: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sent: list[bytes] = []

    async def body() -> None:
        async with site(tmp_path, broker) as place:
            now = _now_s()
            good = place.token("replay-me", level=30).decode()
            header, payload, signature = good.split(".")
            flipped = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1]
            cases: list[tuple[str, bytes, str | None, bool]] = [
                # (code, what is sent, the ack's id, whether the token was authentic). The
                # audience is checked before the claims are read, so that ack has no id.
                ("bad_signature", f"{header}.{flipped}.{signature}".encode(), None, False),
                (
                    "unknown_key",
                    place.token(
                        "c-stranger", key=place.keys.stranger, kid=place.keys.stranger_kid, level=10
                    ),
                    None,
                    False,
                ),
                (
                    "expired",
                    place.token("c-expired", issued_at_s=now - 600, level=10),
                    "c-expired",
                    True,
                ),
                (
                    "not_yet_valid",
                    place.token("c-future", issued_at_s=now + 600, level=10),
                    "c-future",
                    True,
                ),
                (
                    "wrong_audience",
                    place.token("c-aud", audience="other-gw", level=10),
                    None,
                    True,
                ),
                ("malformed", b"not-a.token", None, False),
                ("too_large", b"A" * 9000, None, False),
                (
                    "unsigned",
                    json.dumps(
                        {
                            "id": "c-plain",
                            "action": "dim",
                            "target": {"device": "lamp-1"},
                            "level": 10,
                            "expires": (now + 60) * 1000,
                        }
                    ).encode(),
                    None,
                    False,
                ),
            ]
            writes_before = place.setpoint_writes()
            for _, payload_bytes, _, _ in cases:
                await place.send(payload_bytes)
            sent.extend(payload for _, payload, _, _ in cases)
            sent.append(good.encode())

            def all_answered(messages: list[Received]) -> bool:
                codes = [a.get("code") for a in place.acks(messages)]
                return all(code in codes for code, _, _, _ in cases)

            messages = await place.sub.wait_for_async(all_answered, WAIT_S)
            acks = place.acks(messages)
            for ack in acks:
                validator("ack").validate(ack)
            for code, _, command_id, _ in cases:
                (ack,) = [a for a in acks if a.get("code") == code]
                assert ack["status"] == "rejected" and ack["reason"], ack
                assert ack["id"] == command_id, (code, ack)
            events = [e for e in place.open_all(messages, "event") if e["kind"] == "security"]
            for code, _, _, authentic in cases:
                (event,) = [e for e in events if e["detail"]["code"] == code]
                assert event["detail"]["what"] == "command_rejected"
                assert event["detail"]["authenticated"] is authentic
                assert event["severity"] == ("warning" if authentic else "alarm")
                validator("event").validate(event)

            # The good token works once; the same token again is a replay...
            await place.send(good.encode())
            (done,) = await place.ack_for("replay-me")
            assert done["status"] == "ok" and place.lamp(1).setpoint == 30
            await place.send(good.encode())
            replays = await place.ack_for("replay-me", count=2)
            assert replays[1]["status"] == "rejected" and replays[1]["code"] == "replayed"
            # ...also after a restart: the jti record is in the buffer's command table.
            await place.stop_agent()
            await place.start_agent()
            await place.send(good.encode())
            after_restart = await place.ack_for("replay-me", count=3)
            assert after_restart[2]["code"] == "replayed"
            # Only the one accepted command wrote the set point.
            assert place.setpoint_writes() == writes_before + 1
            assert place.lamp(1).setpoint == 30

    asyncio.run(body())
    # Nothing secret reached the logs: no private key, no token, no signature.
    logged = caplog.text
    for key_file in (*tmp_path.glob("*/*.key"), tmp_path / "buffer.db.key"):
        secret = key_file.read_bytes()
        for line in secret.splitlines():
            if len(line) >= 16 and not line.startswith(b"-----"):
                assert line.decode("latin-1") not in logged, key_file.name
    for payload in sent:
        for part in payload.split(b"."):
            if len(part) >= 40:
                assert part.decode("latin-1") not in logged


def test_with_an_unsynchronised_clock_ordering_replaces_the_time_window(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    async def body() -> None:
        async with site(tmp_path, broker, clock="no") as place:
            # The gateway's clock cannot be trusted: an old but never-seen token is accepted on
            # ordering, and the ack says so; one issued before it is then refused.
            old = _now_s() - 3600
            await place.send(place.token("late-2", issued_at_s=old, level=20))
            (ack,) = await place.ack_for("late-2")
            assert ack["status"] == "ok" and "not synchronised" in ack["clock_warning"]
            await place.send(place.token("late-1", issued_at_s=old - 10, level=70))
            (refused,) = await place.ack_for("late-1")
            assert refused["code"] == "replayed"
            assert place.lamp(1).setpoint == 20

    asyncio.run(body())


def test_the_security_policy_has_a_disclosure_policy_and_its_links_resolve() -> None:
    repo = Path(__file__).resolve().parent.parent
    text = (repo / "SECURITY.md").read_text(encoding="utf-8")
    assert "## Reporting a vulnerability" in text and "## Supported versions" in text
    links = re.findall(r"\]\(([^)#]+)", text)
    assert links
    for link in links:
        assert (repo / link).exists(), link


def test_hub_listen_recovers_every_reading_and_receipts_keep_batches_until_stored(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    """A broker subscriber sees only envelopes while the hub consumer stores every reading; with
    receipts, nothing leaves the gateway's buffer before the hub stored it, across a restart of
    the hub consumer."""
    out = tmp_path / "readings.jsonl"
    state = tmp_path / "hub-state.db"

    def consumer(place: Site) -> HubConsumer:
        return HubConsumer(
            HubSettings(
                mqtt=MqttSettings(host="127.0.0.1", port=broker.port, client_id="hub-test"),
                group="hubgroup0secret",
                out=out,
                state=state,
                receipt_interval_s=0.2,
            ),
            hub_keys=place.keys.hub_private,
            gateway_keys={GATEWAY: place.keys.gateway_public},
            receipt_key=load_ed25519_private_key(place.keys.hub_dir / "receipt-signing.key"),
        )

    async def sealed_buffered(place: Site) -> int:
        assert place.agent is not None and place.agent.buffer is not None
        stats = await place.agent.buffer.stats()
        return stats.by_lane[Lane.TELEMETRY] + stats.by_lane[Lane.ALARM]

    async def wait_until(predicate: Callable[[], Awaitable[bool]]) -> None:
        async with asyncio.timeout(WAIT_S):
            while not await predicate():
                await asyncio.sleep(0.05)

    async def body() -> None:
        hub_extra = "receipts = true\nreceipt_timeout_s = 1.0"
        async with site(tmp_path, broker, hub_extra=hub_extra) as place:
            assert place.agent is not None and place.agent.uplink is not None
            uplink = place.agent.uplink

            # 1. No hub consumer yet: the broker takes every batch (PUBACK), the buffer keeps
            #    them, and after the timeout they go again.
            async def resent() -> bool:
                return uplink.stats.receipt_timeouts > 0 and await sealed_buffered(place) > 0

            await wait_until(resent)
            assert uplink.stats.receipts == 0

            # 2. The hub consumer starts: it stores, fsyncs and receipts; the buffer empties.
            first = consumer(place)
            first_run = asyncio.create_task(first.run())
            for worker in place.agent.workers.values():
                worker.pause_polling()

            async def drained() -> bool:
                return uplink.stats.receipts > 0 and await sealed_buffered(place) == 0

            await wait_until(drained)
            first.stop()
            await first_run

            # 3. The consumer is down again: new batches pile up in the buffer...
            for worker in place.agent.workers.values():
                worker.resume_polling()

            async def piling_up() -> bool:
                return await sealed_buffered(place) >= 3

            await wait_until(piling_up)
            receipts_before = uplink.stats.receipts
            # ...and a new consumer with the same state file takes over.
            for worker in place.agent.workers.values():
                worker.pause_polling()
            second = consumer(place)
            second_run = asyncio.create_task(second.run())
            await wait_until(drained)
            assert uplink.stats.receipts > receipts_before
            second.stop()
            await second_run
            assert uplink.stats.receipts_refused == 0

            # What crossed the broker was ciphertext only, and the hub has every reading of it,
            # once.
            messages = place.sub.messages
            for message in messages:
                if message.topic.rsplit("/", 1)[-1] in ("data", "event"):
                    assert message.payload.startswith(MAGIC)
            seen = {
                (r["device"], r["point"], r["ts"], b["seq"])
                for b in place.open_all(messages, "data")
                for r in b["readings"]
            }
            lines = [json.loads(line) for line in out.read_text().splitlines()]
            stored = [
                (line["device"], line["point"], line["ts"], line["seq"])
                for line in lines
                if line["type"] == "reading"
            ]
            assert seen and seen == set(stored)
            assert len(stored) == len(set(stored)), "a reading was stored twice"

    asyncio.run(body())
