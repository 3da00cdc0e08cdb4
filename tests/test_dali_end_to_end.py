"""End to end on a DALI line: the real agent, a real Mosquitto, the simulated line behind the
Foxtron emulator on a pty. Readings arrive on ``data``; a lamp failure is an alarm on ``event``
raised within one poll cycle and cleared when repaired; a dim command to a configured group goes
out as one group frame, pre-empts the poll in progress and is acknowledged with the levels read
back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from agent.config import load_config
from agent.runtime import Agent
from agent.sdk import now_ms
from drivers.dali import DaliDriver, codec
from drivers.modbus import ModbusDriver
from firmware_sim.dali import DaliLine
from firmware_sim.dali.interfaces import EMULATORS, InterfaceEmulator
from tests.e2e import (
    PLAIN_COMMANDS,
    PLAIN_HUB,
    PREFIX,
    PROFILES,
    Publisher,
    acks_for,
    command,
    events,
    payloads,
    validator,
)
from tests.support.mosquitto import MosquittoBroker, Received, Subscriber

GATEWAY = "cab-dali"
BASE = f"{PREFIX}/{GATEWAY}"
WAIT_S = 15.0
LAMPS = 4
GROUP_MEMBERS = ("lamp-0", "lamp-1")
DALI_GROUP = 1


def write_config(directory: Path, device: str, broker_port: int) -> Path:
    lines = [
        "[gateway]",
        f'id = "{GATEWAY}"',
        f'profile_dirs = ["{PROFILES}"]',
        "",
        "[hub]",
        'host = "127.0.0.1"',
        f"port = {broker_port}",
        "keepalive_s = 5",
        *PLAIN_HUB,
        "",
        "[buffer]",
        'path = "buffer.db"',
        "batch_max_delay_s = 0.1",
        "batch_max_readings = 50",
        "",
        *PLAIN_COMMANDS,
        "[buses.dali-1]",
        'driver = "dali"',
        'interface = "foxtron"',
        f'device = "{device}"',
        "metrics_interval_s = 0.5",
        "",
    ]
    for index in range(LAMPS):
        groups = f"[{DALI_GROUP}]" if f"lamp-{index}" in GROUP_MEMBERS else "[]"
        lines += [
            f"[devices.lamp-{index}]",
            'bus = "dali-1"',
            'profile = "dali-d4i-led"',
            f"address = {index}",
            f"groups = {groups}",
            "poll_interval_s = 0.2",
            "",
        ]
    members = ", ".join(f'"{m}"' for m in GROUP_MEMBERS)
    lines += ["[groups]", f"north = [{members}]", ""]
    path = directory / "gateway.toml"
    path.write_text("\n".join(lines))
    return path


@dataclass
class Cabinet:
    line: DaliLine
    emulator: InterfaceEmulator
    agent: Agent
    sub: Subscriber
    post: Publisher

    async def send(self, payload: bytes) -> None:
        await self.post.send(f"{BASE}/cmd", payload)

    async def wait(self, predicate: object, timeout_s: float = WAIT_S) -> list[Received]:
        return await self.sub.wait_for_async(predicate, timeout_s)  # type: ignore[arg-type]


@asynccontextmanager
async def cabinet(tmp_path: Path, broker: MosquittoBroker) -> AsyncIterator[Cabinet]:
    line = DaliLine.random(
        LAMPS, seed=21, time_scale=0.02, groups={0: [DALI_GROUP], 1: [DALI_GROUP]}
    )
    emulator = EMULATORS["foxtron"](line)
    path = await emulator.start()
    config = load_config(
        write_config(tmp_path, path, broker.port), {"dali": DaliDriver, "modbus": ModbusDriver}
    )
    sub = Subscriber(broker, f"{BASE}/#")
    await asyncio.to_thread(sub.start)
    post = Publisher(broker.port)
    agent = Agent(config)
    task = asyncio.create_task(agent.run())
    try:
        yield Cabinet(line, emulator, agent, sub, post)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        post.close()
        sub.stop()
        await emulator.stop()


def good_readings(messages: list[Received]) -> list[dict[str, object]]:
    return [
        r
        for batch in payloads(messages, "data")
        for r in batch["readings"]
        if r["quality"] == "good"
    ]


def test_readings_and_bus_metrics_arrive(tmp_path: Path, broker: MosquittoBroker) -> None:
    async def body() -> None:
        async with cabinet(tmp_path, broker) as cab:
            wanted = {(f"lamp-{i}", "active_power") for i in range(LAMPS)} | {
                ("dali-1", "utilisation")
            }

            def seen(messages: list[Received]) -> bool:
                return wanted <= {(r["device"], r["point"]) for r in good_readings(messages)}

            messages = await cab.wait(seen)
            readings = good_readings(messages)
            level = [r for r in readings if r["device"] == "lamp-2" and r["point"] == "level"]
            assert level[-1]["value"] == 100.0 and level[-1]["unit"] == "%"
            power = [
                r for r in readings if r["device"] == "lamp-2" and r["point"] == "active_power"
            ]
            assert power[-1]["unit"] == "W"
            assert abs(float(power[-1]["value"]) - cab.line.gear[2].power_w) < 0.5  # type: ignore[arg-type]
            utilisation = [r for r in readings if r["point"] == "utilisation"][-1]
            assert utilisation["unit"] == "%" and 0 < float(utilisation["value"]) <= 100  # type: ignore[arg-type]
            for batch in payloads(messages, "data"):
                validator("data").validate(batch)

    asyncio.run(asyncio.wait_for(body(), 60))


def test_lamp_failure_is_raised_and_cleared(tmp_path: Path, broker: MosquittoBroker) -> None:
    async def body() -> None:
        async with cabinet(tmp_path, broker) as cab:
            await cab.wait(lambda m: any(r["device"] == "lamp-3" for r in good_readings(m)))
            cab.line.gear[3].fail_lamp()
            messages = await cab.wait(lambda m: bool(events(m, "lamp_failure", "lamp-3")))
            (raised,) = events(messages, "lamp_failure", "lamp-3")
            assert raised["state"] == "raised"
            validator("event").validate(raised)
            assert events(messages, "lamp_failure", "lamp-2") == []
            cab.line.gear[3].repair_lamp()
            messages = await cab.wait(lambda m: len(events(m, "lamp_failure", "lamp-3")) == 2)
            assert [e["state"] for e in events(messages, "lamp_failure", "lamp-3")] == [
                "raised",
                "cleared",
            ]

    asyncio.run(asyncio.wait_for(body(), 60))


def _short_of(frame: int) -> int | None:
    parsed = codec.parse_address_byte(frame >> 8)
    if parsed is None or not isinstance(parsed[0], codec.Short):
        return None
    return parsed[0].number


def test_group_dim_preempts_the_poll_and_acks_read_back_levels(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    async def body() -> None:
        async with cabinet(tmp_path, broker) as cab:
            await cab.wait(lambda m: bool(good_readings(m)))
            group_byte = 0x80 | DALI_GROUP << 1
            preempted = 0
            for attempt, arc in enumerate((200, 180, 160)):
                level = round(codec.arc_to_percent(arc), 3)
                # Send while a bank read is in progress (the line is busy with polls anyway).
                reads = cab.line.frames_by_command["ReadMemoryLocation"]
                while cab.line.frames_by_command["ReadMemoryLocation"] == reads:
                    await asyncio.sleep(0.001)
                command_id = f"dim-{attempt}"
                await cab.send(
                    command(
                        command_id,
                        now_ms() + 60_000,
                        action="dim",
                        target={"group": "north"},
                        level=level,
                    )
                )
                messages = await cab.wait(lambda m, c=command_id: bool(acks_for(m, c)))
                (ack,) = acks_for(messages, command_id)
                validator("ack").validate(ack)
                assert ack["status"] == "ok", ack
                assert [(r["device"], r["level"]) for r in ack["results"]] == [
                    (m, level) for m in GROUP_MEMBERS
                ]
                assert [g.target_level for g in cab.line.gear] == [arc, arc, 254, 254]
                history = list(cab.line.history)
                dapcs = [i for i, r in enumerate(history) if r.command == "DAPC"]
                assert len(dapcs) == attempt + 1  # one group frame per command
                at = dapcs[-1]
                assert history[at].frame == group_byte << 8 | arc
                # The poll in progress went on with the same gear after the command and its
                # read-backs: the command pre-empted it rather than waiting for its end.
                before = next(
                    s for r in reversed(history[:at]) if (s := _short_of(r.frame)) is not None
                )
                after = next(
                    (
                        s
                        for r in history[at + 1 + len(GROUP_MEMBERS) :]
                        if (s := _short_of(r.frame)) is not None
                    ),
                    None,
                )
                preempted += before == after
            # A command can also land between two polls; with the line this busy, nearly all
            # land inside one.
            assert preempted >= 1

    asyncio.run(asyncio.wait_for(body(), 60))
