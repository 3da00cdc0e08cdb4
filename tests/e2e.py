"""Shared set-up for end-to-end tests: a simulated cabinet, a real Mosquitto, the real agent."""

from __future__ import annotations

import asyncio
import json
import threading
from asyncio import Task
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from jsonschema import Draft202012Validator
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import load_config
from agent.runtime import Agent
from tests.support.mosquitto import Received

REPO = Path(__file__).resolve().parent.parent
PROFILES = REPO / "config" / "profiles"
SCHEMAS = REPO / "config" / "schema" / "hub"
PREFIX = "lampyre/v1"
PLAIN_HUB = ['seal = "none"  # the broker reads payloads: tests look at them directly']
"""Lines for ``[hub]``: plain JSON readings (the sealed path is tested in test_security_*)."""
PLAIN_COMMANDS = ["[commands]", "allow_unsigned = true  # demo-style plain JSON commands", ""]
"""The ``[commands]`` table of a test that sends plain JSON commands."""


def write_config(
    directory: Path,
    *,
    gateway: str,
    sim_port: int,
    broker_port: int,
    lamps: int = 3,
    meter: bool = True,
    poll_interval_s: float = 0.3,
    batch_delay_s: float = 0.2,
    extra: str = "",
    rtu_device: str | None = None,
    buffer_extra: str = "",
    sealed: bool = False,
    hub_extra: str = "",
) -> Path:
    """A gateway configuration for the simulated cabinet, with short timings for tests: one
    Modbus line, over TCP to ``sim_port`` or over RTU through the pty ``rtu_device``.

    Not ``sealed`` (the spine's tests): plain JSON payloads and unsigned commands, switched on
    explicitly. ``sealed``: the production defaults, with the key folder ``keys`` next to the
    file (the test makes the keys)."""
    lines = [
        "[gateway]",
        f'id = "{gateway}"',
        f'profile_dirs = ["{PROFILES}"]',
        "",
        "[hub]",
        'host = "127.0.0.1"',
        f"port = {broker_port}",
        "keepalive_s = 5",
        *([] if sealed else PLAIN_HUB),
        hub_extra,
        "",
        "[buffer]",
        'path = "buffer.db"',
        f"batch_max_delay_s = {batch_delay_s}",
        "batch_max_readings = 50",
        buffer_extra,
        "",
        "[buses.street-1]",
        'driver = "modbus"',
        *(
            ['transport = "tcp"', 'host = "127.0.0.1"', f"port = {sim_port}"]
            if rtu_device is None
            else ['transport = "rtu"', f'device = "{rtu_device}"', "baudrate = 19200"]
        ),
        "timeout_s = 0.5",
        "",
    ]
    for unit in range(1, lamps + 1):
        lines += [
            f"[devices.lamp-{unit}]",
            'bus = "street-1"',
            'profile = "lamp-controller"',
            f"unit = {unit}",
            f"poll_interval_s = {poll_interval_s}",
            "",
        ]
    if meter:
        lines += [
            "[devices.meter]",
            'bus = "street-1"',
            'profile = "sdm630"',
            "unit = 10",
            f"poll_interval_s = {poll_interval_s}",
            "",
        ]
    lamp_ids = ", ".join(f'"lamp-{u}"' for u in range(1, lamps + 1))
    even = ", ".join(f'"lamp-{u}"' for u in range(2, lamps + 1, 2))
    lines += ["[groups]", f"street = [{lamp_ids}]", f"even = [{even}]", ""]
    if not sealed:
        lines += PLAIN_COMMANDS
    lines.append(extra)
    path = directory / "gateway.toml"
    path.write_text("\n".join(lines))
    return path


async def start_agent_online(config_path: Path, wait_s: float = 15.0) -> tuple[Agent, Task[None]]:
    """The real agent on ``config_path``, running, once its uplink is online: commands
    published before it subscribed would go to nobody."""
    agent = Agent(load_config(config_path))
    task = asyncio.create_task(agent.run())
    await agent.started.wait()
    async with asyncio.timeout(wait_s):
        while agent.uplink is None or agent.uplink.stats.state != "online":
            await asyncio.sleep(0.02)
    return agent, task


async def stop_agent(task: Task[None]) -> None:
    """Cancel the agent (its clean shutdown) and wait for it."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def validator(kind: str) -> Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{kind}.schema.json").read_text())
    return Draft202012Validator(schema)


def payloads(messages: list[Received], suffix: str) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in messages if m.topic.endswith("/" + suffix)]


def acks_for(messages: list[Received], command_id: str | None) -> list[dict[str, Any]]:
    return [a for a in payloads(messages, "ack") if a.get("id") == command_id]


def events(messages: list[Received], kind: str, device: str | None = None) -> list[dict[str, Any]]:
    return [
        e
        for e in payloads(messages, "event")
        if e["kind"] == kind and (device is None or e["device"] == device)
    ]


class Publisher:
    """The control post: publishes commands at QoS 1 and waits for the PUBACK."""

    def __init__(self, port: int) -> None:
        self._client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()
        self._lock = threading.Lock()

    def publish(self, topic: str, payload: bytes) -> None:
        with self._lock:
            info = self._client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=5)

    async def send(self, topic: str, payload: bytes) -> None:
        await asyncio.to_thread(self.publish, topic, payload)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def command(command_id: str, expires_ms: int, **fields: Any) -> bytes:
    document = {"id": command_id, "expires": expires_ms, **fields}
    return json.dumps(document).encode()


def seqs(messages: list[Received], topics: tuple[str, ...] = ("data", "event", "ack")) -> list[int]:
    out = []
    for message in messages:
        if message.topic.rsplit("/", 1)[-1] in topics:
            out.append(int(json.loads(message.payload)["seq"]))
    return out


def until(predicate: Callable[[], bool]) -> Callable[[list[Received]], bool]:
    return lambda _messages: predicate()
