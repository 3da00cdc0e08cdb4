"""End to end: simulated Modbus lamps and meter → agent → real Mosquitto, and commands back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from agent.buffer import Lane
from agent.config import load_config
from agent.runtime import Agent
from agent.sdk import now_ms
from firmware_sim.modbus import EnergyMeter, LampController, MemoryDevice, ModbusSimulator
from tests.e2e import (
    PREFIX,
    Publisher,
    acks_for,
    command,
    events,
    payloads,
    validator,
    write_config,
)
from tests.support.mosquitto import MosquittoBroker, Received, Subscriber

GATEWAY = "e2e-gw"
BASE = f"{PREFIX}/{GATEWAY}"
WAIT_S = 15.0


@dataclass
class Cabinet:
    sim: ModbusSimulator
    agent: Agent
    sub: Subscriber
    post: Publisher

    def lamp(self, unit: int) -> LampController:
        device = self.sim.unit(unit)
        assert isinstance(device, LampController)
        return device

    async def send(self, payload: bytes) -> None:
        await self.post.send(f"{BASE}/cmd", payload)

    async def ack(self, command_id: str | None, count: int = 1) -> list[dict[str, object]]:
        messages = await self.sub.wait_for_async(
            lambda m: len(acks_for(m, command_id)) >= count, WAIT_S
        )
        return acks_for(messages, command_id)


@asynccontextmanager
async def cabinet(tmp_path: Path, broker: MosquittoBroker) -> AsyncIterator[Cabinet]:
    sim = ModbusSimulator(
        {1: LampController(), 2: LampController(), 3: LampController(), 10: EnergyMeter()}
    )
    port = await sim.start_tcp("127.0.0.1", 0)
    config = load_config(
        write_config(tmp_path, gateway=GATEWAY, sim_port=port, broker_port=broker.port)
    )
    sub = Subscriber(broker, f"{BASE}/#")
    await asyncio.to_thread(sub.start)
    post = Publisher(broker.port)
    agent = Agent(config)
    task = asyncio.create_task(agent.run())
    try:
        yield Cabinet(sim, agent, sub, post)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        post.close()
        sub.stop()
        await sim.stop()


def test_readings_arrive_and_match_the_equipment(tmp_path: Path, broker: MosquittoBroker) -> None:
    async def body() -> None:
        async with cabinet(tmp_path, broker) as cab:
            cab.lamp(1).setpoint = 70
            wanted = {"lamp-1", "lamp-2", "lamp-3", "meter"}

            def all_devices_seen(messages: list[Received]) -> bool:
                seen = {
                    r["device"]
                    for batch in payloads(messages, "data")
                    for r in batch["readings"]
                    if r["quality"] == "good"
                }
                return wanted <= seen

            messages = await cab.sub.wait_for_async(all_devices_seen, WAIT_S)
            status = payloads(messages, "status")
            assert status and status[0]["state"] == "online"
            readings = [r for b in payloads(messages, "data") for r in b["readings"]]
            lamp1 = [r for r in readings if r["device"] == "lamp-1" and r["quality"] == "good"]
            assert {"actual_level", "lamp_power", "energy", "lamp_failure"} <= {
                r["point"] for r in lamp1
            }
            assert [r["value"] for r in lamp1 if r["point"] == "actual_level"][-1] == 70
            power = [r for r in lamp1 if r["point"] == "lamp_power"][-1]
            assert power["unit"] == "W" and abs(power["value"] - 42.0) < 0.5
            voltage = [r for r in readings if r["device"] == "meter" and r["point"] == "voltage_l1"]
            assert voltage and 200 < voltage[-1]["value"] < 260 and voltage[-1]["unit"] == "V"
            data_schema = validator("data")
            for batch in payloads(messages, "data"):
                data_schema.validate(batch)
                assert batch["gateway"] == GATEWAY
            for doc in payloads(messages, "status"):
                validator("status").validate(doc)

    asyncio.run(body())


def test_dim_commands_are_executed_and_acknowledged_with_read_back(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    async def body() -> None:
        async with cabinet(tmp_path, broker) as cab:
            await cab.agent.started.wait()
            await cab.sub.wait_for_async(lambda m: bool(payloads(m, "data")), WAIT_S)
            expires = now_ms() + 60_000
            await cab.send(
                command("d1", expires, action="dim", target={"device": "lamp-1"}, level=40)
            )
            (ack,) = await cab.ack("d1")
            assert ack["status"] == "ok"
            assert ack["results"] == [{"device": "lamp-1", "status": "ok", "level": 40}]
            assert cab.lamp(1).setpoint == 40

            await cab.send(command("g1", expires, action="dim", target={"group": "even"}, level=25))
            (ack,) = await cab.ack("g1")
            assert ack["status"] == "ok"
            assert [(r["device"], r["level"]) for r in ack["results"]] == [("lamp-2", 25)]

            await cab.send(
                command("s1", expires, action="switch", target={"all": True}, state="off")
            )
            (ack,) = await cab.ack("s1")
            assert sorted(r["device"] for r in ack["results"]) == ["lamp-1", "lamp-2", "lamp-3"]
            assert all(r["level"] == 0 for r in ack["results"])
            assert [cab.lamp(u).setpoint for u in (1, 2, 3)] == [0, 0, 0]

            # The ack tells what the lamp did, not what was asked: a controller limited to 80 %.
            cab.lamp(3).max_level = 80
            await cab.send(
                command("c1", expires, action="dim", target={"device": "lamp-3"}, level=100)
            )
            (ack,) = await cab.ack("c1")
            assert ack["status"] == "error"
            assert ack["results"][0]["status"] == "mismatch"
            assert ack["results"][0]["level"] == 80

            # A lamp that does not answer: an error result, never "ok".
            cab.lamp(2).faults.no_answer = True
            await cab.send(
                command("n1", expires, action="dim", target={"device": "lamp-2"}, level=60)
            )
            (ack,) = await cab.ack("n1")
            assert ack["status"] == "error"
            assert ack["results"][0]["status"] in ("error", "unknown")
            assert ack["results"][0]["level"] is None
            cab.lamp(2).faults.no_answer = False

            ack_schema = validator("ack")
            for doc in payloads(cab.sub.messages, "ack"):
                ack_schema.validate(doc)

    asyncio.run(body())


def test_rejected_commands_execute_nothing_and_the_agent_keeps_running(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    async def body() -> None:
        async with cabinet(tmp_path, broker) as cab:
            await cab.sub.wait_for_async(lambda m: bool(payloads(m, "data")), WAIT_S)
            expires = now_ms() + 60_000
            await cab.send(
                command("dup", expires, action="dim", target={"device": "lamp-1"}, level=30)
            )
            (first,) = await cab.ack("dup")
            assert first["status"] == "ok"
            writes_before = [sum(cab.lamp(u).writes.values()) for u in (1, 2, 3)]

            cases: list[tuple[str | None, bytes, str]] = [
                (None, b"{this is not json", "malformed"),
                (
                    "r-action",
                    command("r-action", expires, action="explode", target={"all": True}),
                    "unknown_action",
                ),
                (
                    "r-device",
                    command(
                        "r-device", expires, action="dim", target={"device": "lamp-99"}, level=10
                    ),
                    "unknown_target",
                ),
                (
                    "r-group",
                    command("r-group", expires, action="dim", target={"group": "nope"}, level=10),
                    "unknown_target",
                ),
                (
                    "r-range",
                    command(
                        "r-range", expires, action="dim", target={"device": "lamp-1"}, level=140
                    ),
                    "invalid_level",
                ),
                (
                    "r-expired",
                    command(
                        "r-expired",
                        now_ms() - 1000,
                        action="dim",
                        target={"device": "lamp-1"},
                        level=10,
                    ),
                    "expired",
                ),
                (
                    "r-meter",
                    command("r-meter", expires, action="dim", target={"device": "meter"}, level=10),
                    "unsupported",
                ),
                (
                    "dup",
                    command("dup", expires, action="dim", target={"device": "lamp-1"}, level=90),
                    "duplicate",
                ),
            ]
            for command_id, payload, code in cases:
                await cab.send(payload)
                acks = await cab.ack(command_id, count=2 if command_id == "dup" else 1)
                ack = acks[-1]
                assert ack["status"] == "rejected", ack
                assert ack["code"] == code, ack
                assert ack["reason"]
                validator("ack").validate(ack)
            duplicate = acks_for(cab.sub.messages, "dup")[-1]
            assert duplicate["original"]["results"][0]["level"] == 30
            assert [sum(cab.lamp(u).writes.values()) for u in (1, 2, 3)] == writes_before
            assert cab.lamp(1).setpoint == 30
            rejected = events(cab.sub.messages, "command_rejected")
            assert len(rejected) >= len(cases)

            # Still alive and obeying.
            await cab.send(
                command("after", expires, action="dim", target={"device": "lamp-1"}, level=55)
            )
            (ack,) = await cab.ack("after")
            assert ack["status"] == "ok" and cab.lamp(1).setpoint == 55

    asyncio.run(body())


def test_lamp_failure_and_offline_device_raise_and_clear_alarms(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    async def body() -> None:
        async with cabinet(tmp_path, broker) as cab:
            await cab.sub.wait_for_async(lambda m: bool(payloads(m, "data")), WAIT_S)
            cab.lamp(1).setpoint = 100
            cab.lamp(1).fail_lamp()
            await cab.sub.wait_for_async(
                lambda m: any(e["state"] == "raised" for e in events(m, "lamp_failure", "lamp-1")),
                WAIT_S,
            )
            cab.lamp(1).repair_lamp()
            await cab.sub.wait_for_async(
                lambda m: any(e["state"] == "cleared" for e in events(m, "lamp_failure", "lamp-1")),
                WAIT_S,
            )
            cab.lamp(2).faults.no_answer = True
            messages = await cab.sub.wait_for_async(
                lambda m: any(
                    e["state"] == "raised" for e in events(m, "device_offline", "lamp-2")
                ),
                WAIT_S,
            )
            # The other lamps on the same line keep being polled while lamp-2 is backed off.
            last_seen = max(
                r["ts"]
                for b in payloads(messages, "data")
                for r in b["readings"]
                if r["device"] == "lamp-3" and r["quality"] == "good"
            )
            cab.lamp(2).faults.no_answer = False
            messages = await cab.sub.wait_for_async(
                lambda m: any(
                    e["state"] == "cleared" for e in events(m, "device_offline", "lamp-2")
                ),
                WAIT_S * 2,
            )
            # lamp-3 kept answering throughout; its batches follow the event, which has its
            # own, faster lane.
            messages = await cab.sub.wait_for_async(
                lambda m: any(
                    r["ts"] > last_seen
                    for b in payloads(m, "data")
                    for r in b["readings"]
                    if r["device"] == "lamp-3" and r["quality"] == "good"
                ),
                WAIT_S,
            )
            bad = [
                r
                for b in payloads(messages, "data")
                for r in b["readings"]
                if r["device"] == "lamp-2" and r["quality"] == "bad"
            ]
            assert bad and all(r["value"] is None for r in bad)
            schema = validator("event")
            for doc in payloads(messages, "event"):
                schema.validate(doc)
            alarm = events(messages, "lamp_failure", "lamp-1")[0]
            assert alarm["severity"] == "alarm"
            assert json.dumps(alarm)

    asyncio.run(body())


def test_rtu_cabinet_over_a_pseudo_terminal(tmp_path: Path, broker: MosquittoBroker) -> None:
    async def body() -> None:
        sim = ModbusSimulator({1: LampController(), 2: LampController(), 10: EnergyMeter()})
        pty = await sim.start_rtu()
        config = load_config(
            write_config(
                tmp_path,
                gateway=GATEWAY,
                sim_port=0,
                broker_port=broker.port,
                lamps=2,
                rtu_device=pty,
            )
        )
        sub = Subscriber(broker, f"{BASE}/#")
        await asyncio.to_thread(sub.start)
        post = Publisher(broker.port)
        task = asyncio.create_task(Agent(config).run())
        try:
            await sub.wait_for_async(
                lambda m: (
                    {"lamp-1", "lamp-2", "meter"}
                    <= {
                        r["device"]
                        for b in payloads(m, "data")
                        for r in b["readings"]
                        if r["quality"] == "good"
                    }
                ),
                WAIT_S,
            )
            expires = now_ms() + 60_000
            await post.send(
                f"{BASE}/cmd",
                command("rtu-1", expires, action="dim", target={"group": "street"}, level=65),
            )
            messages = await sub.wait_for_async(lambda m: bool(acks_for(m, "rtu-1")), WAIT_S)
            (ack,) = acks_for(messages, "rtu-1")
            assert ack["status"] == "ok"
            assert [(r["device"], r["level"]) for r in ack["results"]] == [
                ("lamp-1", 65),
                ("lamp-2", 65),
            ]
            assert [sim.lamp(u).setpoint for u in (1, 2)] == [65, 65]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            post.close()
            sub.stop()
            await sim.stop()

    asyncio.run(body())


def test_equipment_restart_is_reported_and_polling_resumes(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    async def body() -> None:
        async with cabinet(tmp_path, broker) as cab:
            await cab.sub.wait_for_async(lambda m: bool(payloads(m, "data")), WAIT_S)
            (port,) = cab.sim.tcp_ports
            await cab.sim.stop_tcp()
            await cab.sub.wait_for_async(
                lambda m: any(e["state"] == "raised" for e in events(m, "bus_offline")), WAIT_S
            )
            cab.sub.clear()
            await cab.sim.start_tcp("127.0.0.1", port)
            messages = await cab.sub.wait_for_async(
                lambda m: (
                    any(e["state"] == "cleared" for e in events(m, "bus_offline"))
                    and any(
                        r["device"] == "lamp-1" and r["quality"] == "good"
                        for b in payloads(m, "data")
                        for r in b["readings"]
                    )
                ),
                WAIT_S * 2,
            )
            assert events(messages, "device_offline", "lamp-1")[-1]["state"] == "cleared"

    asyncio.run(body())


def test_full_buffer_drops_oldest_readings_and_says_so(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    """With the hub unreachable and the smallest buffer allowed, the oldest readings go first,
    every drop is reported by an event, and the events survive to reach the hub later."""

    async def body() -> None:
        sim = ModbusSimulator({u: LampController() for u in (1, 2, 3)} | {10: EnergyMeter()})
        port = await sim.start_tcp("127.0.0.1", 0)
        # A hung hub (SIGSTOP): its port stays ours, so nothing else can answer there.
        broker.pause()
        config = load_config(
            write_config(
                tmp_path,
                gateway=GATEWAY,
                sim_port=port,
                broker_port=broker.port,
                poll_interval_s=0.02,
                batch_delay_s=0.05,
                buffer_extra="max_bytes = 65536",
            )
        )
        agent = Agent(config)
        task = asyncio.create_task(agent.run())
        try:
            async with asyncio.timeout(60):
                while agent.buffer is None or (await agent.buffer.stats()).dropped_total == 0:
                    await asyncio.sleep(0.1)
            stats = await agent.buffer.stats()
            assert stats.bytes <= 65536 or stats.by_lane[Lane.TELEMETRY] == 0
            assert stats.by_lane[Lane.ALARM] >= 1
            broker.resume()
            sub = Subscriber(broker, f"{BASE}/#")
            await asyncio.to_thread(sub.start)
            try:
                messages = await sub.wait_for_async(
                    lambda m: bool(events(m, "buffer_drop")), WAIT_S * 3
                )
                drop = events(messages, "buffer_drop")[0]
                assert drop["detail"]["count"] > 0
                assert drop["detail"]["first_seq"] <= drop["detail"]["last_seq"]
                validator("event").validate(drop)
            finally:
                sub.stop()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await sim.stop()

    asyncio.run(body())


def test_silent_lamp_on_a_switched_off_circuit_is_no_alarm(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    async def body() -> None:
        io = MemoryDevice(size=8)
        sim = ModbusSimulator({1: LampController(), 2: LampController(), 20: io})
        port = await sim.start_tcp("127.0.0.1", 0)
        path = write_config(
            tmp_path,
            gateway=GATEWAY,
            sim_port=port,
            broker_port=broker.port,
            lamps=2,
            meter=False,
            extra='[devices.cabinet-io]\nbus = "street-1"\nprofile = "cabinet-io"\nunit = 20\n'
            'poll_interval_s = 0.1\n\n[circuits.street]\ndevice = "cabinet-io"\n'
            'point = "contactor_1"\n',
        )
        text = path.read_text().replace(
            "[devices.lamp-2]\n", '[devices.lamp-2]\ncircuit = "street"\n'
        )
        path.write_text(text)
        config = load_config(path)
        sub = Subscriber(broker, f"{BASE}/#")
        await asyncio.to_thread(sub.start)
        task = asyncio.create_task(Agent(config).run())
        try:
            # By day: the contactor is open and lamp-2's controller is unpowered.
            io.discrete[0] = False
            sim.lamp(2).faults.no_answer = True
            await sub.wait_for_async(
                lambda m: (
                    sum(
                        1
                        for b in payloads(m, "data")
                        for r in b["readings"]
                        if r["device"] == "lamp-2" and r["quality"] == "bad"
                    )
                    >= 10
                ),
                WAIT_S,
            )
            assert not events(sub.messages, "device_offline", "lamp-2")
            # Dusk: the circuit is switched on, and lamp-2 still does not answer: an alarm.
            io.discrete[0] = True
            messages = await sub.wait_for_async(
                lambda m: bool(events(m, "device_offline", "lamp-2")), WAIT_S
            )
            assert events(messages, "device_offline", "lamp-2")[0]["state"] == "raised"
            assert not events(messages, "device_offline", "lamp-1")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            sub.stop()
            await sim.stop()

    asyncio.run(body())
