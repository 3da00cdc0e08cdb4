"""End to end with an OPC UA cabinet controller: the real agent, a real Mosquitto and the cabinet
simulator over Basic256Sha256 SignAndEncrypt. Subscribed values reach the ``data`` topic; a
controller restart, a frozen controller and a lost subscription are each detected, the session
and subscription are re-created, and the time without values is published as a ``gap`` event;
commands write through the normal command path and are acknowledged with what was read back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import load_config
from agent.runtime import Agent
from agent.sdk import now_ms
from drivers.opcua import OpcUaDriver
from firmware_sim.opcua import CabinetSimulator
from tests.e2e import PREFIX, Publisher, acks_for, command, events, payloads, validator
from tests.opcua_site import simulator, write_config
from tests.support.mosquitto import MosquittoBroker, Received, Subscriber

GATEWAY = "cab-ua"
BASE = f"{PREFIX}/{GATEWAY}"
WAIT_S = 20.0


@dataclass
class Site:
    sim: CabinetSimulator
    agent: Agent
    sub: Subscriber
    post: Publisher

    async def wait(self, predicate: Any, timeout_s: float = WAIT_S) -> list[Received]:
        return await self.sub.wait_for_async(predicate, timeout_s)

    async def send(self, command_id: str, **fields: Any) -> None:
        await self.post.send(f"{BASE}/cmd", command(command_id, now_ms() + 60_000, **fields))


@asynccontextmanager
async def site(tmp_path: Path, broker: MosquittoBroker) -> AsyncIterator[Site]:
    async with simulator(tmp_path) as sim:
        config = load_config(
            write_config(tmp_path, sim.endpoint, broker_port=broker.port, gateway=GATEWAY),
            {"opcua": OpcUaDriver},
        )
        sub = Subscriber(broker, f"{BASE}/#")
        await asyncio.to_thread(sub.start)
        post = Publisher(broker.port)
        agent = Agent(config)
        task = asyncio.create_task(agent.run())
        try:
            yield Site(sim, agent, sub, post)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            post.close()
            sub.stop()


def readings(messages: list[Received]) -> list[dict[str, Any]]:
    return [r for batch in payloads(messages, "data") for r in batch["readings"]]


def latest(messages: list[Received], device: str, point: str) -> dict[str, Any] | None:
    found = [r for r in readings(messages) if r["device"] == device and r["point"] == point]
    return found[-1] if found else None


def value_is(device: str, point: str, value: Any) -> Any:
    def check(messages: list[Received]) -> bool:
        reading = latest(messages, device, point)
        return reading is not None and reading["value"] == value

    return check


def test_subscribed_values_reach_the_hub_with_source_timestamps(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    async def body() -> None:
        async with site(tmp_path, broker) as s:
            await s.wait(value_is("cabinet", "door_open", False))
            before = now_ms()
            await s.sim.set_door_open(True)
            messages = await s.wait(value_is("cabinet", "door_open", True))
            door = latest(messages, "cabinet", "door_open")
            assert door is not None and door["quality"] == "good"
            assert before - 1000 <= door["ts"] <= now_ms()
            sunset = latest(messages, "cabinet", "sunset")
            assert sunset is not None and str(sunset["value"]).endswith("Z")
            for batch in payloads(messages, "data"):
                validator("data").validate(batch)
            # Nothing subscribed is polled: a device's readings come once per change, not
            # every poll_interval_s (0.5 s here), so the door appears exactly twice.
            await asyncio.sleep(1.5)
            doors = [
                r
                for r in readings(s.sub.messages)
                if r["device"] == "cabinet" and r["point"] == "door_open"
            ]
            assert [r["value"] for r in doors] == [False, True]

    asyncio.run(asyncio.wait_for(body(), 90))


def _gap_events(messages: list[Received]) -> list[dict[str, Any]]:
    return events(messages, "gap", "cabinet")


def test_controller_restart_publishes_a_gap_and_values_flow_again(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    async def body() -> None:
        async with site(tmp_path, broker) as s:
            await s.wait(value_is("cabinet", "door_open", False))
            stopped = now_ms()
            await s.sim.stop()
            await s.wait(lambda m: bool(events(m, "bus_offline")))
            await asyncio.sleep(1.0)
            await s.sim.start()
            await s.sim.set_door_open(True)
            messages = await s.wait(lambda m: bool(_gap_events(m)))
            (gap,) = _gap_events(messages)
            validator("event").validate(gap)
            assert gap["severity"] == "warning" and gap["state"] == "info"
            detail = gap["detail"]
            assert detail["from_ms"] <= stopped + 500
            assert detail["to_ms"] >= stopped + 1000
            assert detail["duration_s"] >= 1.0
            messages = await s.wait(value_is("cabinet", "door_open", True))
            states = [e["state"] for e in events(messages, "bus_offline")]
            assert states == ["raised", "cleared"]
            assert len(_gap_events(messages)) == 1

    asyncio.run(asyncio.wait_for(body(), 90))


def test_frozen_controller_is_detected_and_recovered(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    async def body() -> None:
        async with site(tmp_path, broker) as s:
            await s.wait(value_is("cabinet", "door_open", False))
            s.sim.freeze()
            frozen = now_ms()
            messages = await s.wait(lambda m: bool(events(m, "bus_offline")))
            (offline,) = events(messages, "bus_offline")
            assert offline["state"] == "raised"
            # Detected by the session probe or the keep-alive watchdog, within seconds.
            assert offline["ts"] - frozen < 8_000
            await s.sim.set_door_open(True)  # a change the gateway cannot see yet
            s.sim.thaw()
            messages = await s.wait(value_is("cabinet", "door_open", True))
            messages = await s.wait(lambda m: bool(_gap_events(m)))
            (gap,) = _gap_events(messages)
            assert gap["detail"]["from_ms"] <= frozen + 500
            assert gap["detail"]["duration_s"] > 0

    asyncio.run(asyncio.wait_for(body(), 90))


def test_dim_command_is_acked_with_the_level_read_back(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    async def body() -> None:
        async with site(tmp_path, broker) as s:
            await s.wait(
                value_is("circuit-1", "actual_level", s.sim.state.circuits[1].actual_level)
            )
            await s.send("dim-1", action="dim", target={"device": "circuit-1"}, level=40)
            messages = await s.wait(lambda m: bool(acks_for(m, "dim-1")))
            (ack,) = acks_for(messages, "dim-1")
            validator("ack").validate(ack)
            assert ack["status"] == "ok"
            assert ack["results"] == [{"device": "circuit-1", "status": "ok", "level": 40.0}]
            assert s.sim.writes["Circuit1.DimLevel"] == 1
            # With the contactor open the controller cannot light the circuit: the ack says so.
            circuit = s.sim.state.circuits[2]
            circuit.command = circuit.contactor = False
            circuit.actual_level = 0
            await s.sim.tick(0.0)
            await s.send("dim-2", action="dim", target={"device": "circuit-2"}, level=70)
            messages = await s.wait(lambda m: bool(acks_for(m, "dim-2")))
            (ack,) = acks_for(messages, "dim-2")
            assert ack["status"] == "error"
            assert ack["results"][0]["status"] == "mismatch" and ack["results"][0]["level"] == 0.0

    asyncio.run(asyncio.wait_for(body(), 90))


def test_method_and_contactor_commands_are_acked_with_the_feedback(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    async def body() -> None:
        async with site(tmp_path, broker) as s:
            await s.wait(value_is("cabinet", "contactor_2", True))
            # A method point: SwitchCircuit(2, false), acked with contactor_2 read back.
            await s.send(
                "open-2",
                action="write",
                target={"device": "cabinet"},
                point="switch_circuit_2",
                value=False,
            )
            messages = await s.wait(lambda m: bool(acks_for(m, "open-2")))
            (ack,) = acks_for(messages, "open-2")
            validator("ack").validate(ack)
            assert ack["status"] == "ok" and ack["point"] == "switch_circuit_2"
            assert ack["results"] == [{"device": "cabinet", "status": "ok", "value": False}]
            assert s.sim.method_calls == [("SwitchCircuit", (2, False))]
            # A switch command on a circuit writes its contactor command, reads the feedback.
            await s.send("close-2", action="switch", target={"device": "circuit-2"}, state="on")
            messages = await s.wait(lambda m: bool(acks_for(m, "close-2")))
            (ack,) = acks_for(messages, "close-2")
            validator("ack").validate(ack)
            assert ack["status"] == "ok"
            assert ack["results"][0]["state"] == "on"
            assert s.sim.writes["Circuit2.Command"] == 1
            assert s.sim.state.circuits[2].contactor is True
            # A value the node's type cannot hold is refused before anything is sent.
            await s.send(
                "too-big",
                action="write",
                target={"device": "circuit-1"},
                point="level",
                value=300,
            )
            messages = await s.wait(lambda m: bool(acks_for(m, "too-big")))
            (ack,) = acks_for(messages, "too-big")
            assert ack["status"] == "error"
            assert "out of range for a Byte" in ack["results"][0]["error"]
            assert s.sim.writes["Circuit1.DimLevel"] == 0

    asyncio.run(asyncio.wait_for(body(), 90))


def test_lost_subscription_is_detected_recreated_and_reported_as_a_gap(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    async def body() -> None:
        async with site(tmp_path, broker) as s:
            await s.wait(value_is("cabinet", "door_open", False))
            dropped = now_ms()
            # The session and the TCP connection stay up; only the subscription is gone.
            assert await s.sim.drop_subscriptions() == 1
            await s.sim.set_door_open(True)
            messages = await s.wait(lambda m: bool(_gap_events(m)))
            (gap,) = _gap_events(messages)
            assert "subscription is dead" in gap["detail"]["reason"]
            assert gap["detail"]["from_ms"] <= dropped + 500
            messages = await s.wait(value_is("cabinet", "door_open", True))
            assert [e["state"] for e in events(messages, "bus_offline")] == ["raised", "cleared"]

    asyncio.run(asyncio.wait_for(body(), 90))
