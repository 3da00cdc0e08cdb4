"""`lampyre demo`: simulated cabinet equipment, the agent, local buffering, and forwarding to
an MQTT broker when one can be had.

Broker choice, in order: the configured hub (127.0.0.1:1883 in ``config/demo.toml``) when it
answers; else a private Mosquitto started on a free loopback port; else none — the agent keeps
buffering and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from agent.config import GatewayConfig
from agent.runtime import Agent, Snapshot
from agent.sdk import BusSpec, PointRole, Quality

STATUS_INTERVAL_S = 5.0
BROKER_START_TIMEOUT_S = 10.0


def port_is_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


class PrivateBroker:
    """A Mosquitto of our own on a free loopback port, for when no broker is running."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="lampyre-demo-broker-")
        conf = Path(self._dir.name) / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"log_dest file {Path(self._dir.name) / 'mosquitto.log'}\n"
        )
        self._process = subprocess.Popen(  # noqa: S603 - fixed argv, our own config file
            [self.binary, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while not port_is_open("127.0.0.1", self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the private Mosquitto did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def _with_port(bus: BusSpec, port: int) -> BusSpec:
    options = dataclasses.replace(bus.options, data={**bus.options.data, "port": port})
    return dataclasses.replace(bus, options=options)


def _demo_bus(config: GatewayConfig) -> BusSpec:
    tcp = [
        b
        for b in config.buses.values()
        if b.driver == "modbus" and b.options.get("transport", "tcp") == "tcp"
    ]
    if len(tcp) != 1:
        raise SystemExit("the demo expects exactly one Modbus TCP bus in its configuration")
    return tcp[0]


async def run_demo(config: GatewayConfig, *, duration_s: float | None, out: TextIO) -> int:
    from firmware_sim.modbus import EnergyMeter, LampController, ModbusSimulator

    bus = _demo_bus(config)
    units: dict[int, LampController | EnergyMeter] = {}
    for device in config.devices.values():
        if device.bus != bus.id:
            continue
        unit = int(device.options["unit"])
        # Lamps start at full level, as at night: the walk-through then dims one.
        units[unit] = (
            EnergyMeter() if device.profile.name == "sdm630" else LampController(setpoint=100)
        )
    simulator = ModbusSimulator(units)
    wanted = int(bus.options.get("port", 502))
    host = str(bus.options.get("host", "127.0.0.1"))
    sim_port = wanted if not port_is_open(host, wanted) else 0
    sim_port = await simulator.start_tcp(host, sim_port)
    if sim_port != wanted:
        config = dataclasses.replace(
            config, buses={**config.buses, bus.id: _with_port(bus, sim_port)}
        )

    broker: PrivateBroker | None = None
    mqtt = config.hub.mqtt
    hub_note = ""
    if port_is_open(mqtt.host, mqtt.port):
        hub_note = f"using the MQTT broker already running at {mqtt.host}:{mqtt.port}"
    elif (binary := mosquitto_binary()) is not None:
        broker = PrivateBroker(binary)
        await asyncio.to_thread(broker.start)
        mqtt = dataclasses.replace(mqtt, host="127.0.0.1", port=broker.port)
        config = dataclasses.replace(config, hub=dataclasses.replace(config.hub, mqtt=mqtt))
        hub_note = f"no broker answered; started a private Mosquitto on 127.0.0.1:{broker.port}"
    else:
        hub_note = (
            f"no broker at {mqtt.host}:{mqtt.port} and Mosquitto is not installed: readings are "
            "buffered (encrypted) and will be forwarded when a broker answers there"
        )

    base = f"{config.hub.prefix}/{config.gateway_id}"
    lamp = next(
        (
            d.id
            for d in config.devices.values()
            if d.profile.point_with_role(PointRole.DIM_LEVEL) is not None
        ),
        "lamp-1",
    )
    print(f"Lampyre demo — gateway {config.gateway_id}", file=out)
    print(
        f"  simulated equipment: Modbus TCP on {host}:{sim_port}, units {sorted(units)}", file=out
    )
    print(f"  hub: {hub_note}", file=out)
    print(f"  buffer: {config.buffer.path} (encrypted, key {config.buffer.key_file})", file=out)
    print("  watch the data:", file=out)
    print(f"    mosquitto_sub -h {mqtt.host} -p {mqtt.port} -t '{base}/#' -v", file=out)
    print("  dim a lamp to 40 % (the answer arrives on .../ack):", file=out)
    print(
        f"    mosquitto_pub -h {mqtt.host} -p {mqtt.port} -q 1 -t '{base}/cmd' -m "
        f'"{{\\"id\\":\\"demo-$(date +%s)\\",\\"action\\":\\"dim\\",'
        f'\\"target\\":{{\\"device\\":\\"{lamp}\\"}},\\"level\\":40,'
        f'\\"expires\\":$(( $(date +%s) * 1000 + 60000 ))}}"',
        file=out,
    )
    print("  stop with Ctrl-C", file=out, flush=True)

    agent = Agent(config)
    try:
        async with asyncio.TaskGroup() as group:
            agent_task = group.create_task(agent.run(), name="agent")
            status = group.create_task(_print_status(agent, out), name="status")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop.set)
            waiters = [asyncio.ensure_future(stop.wait()), agent_task]
            await asyncio.wait(waiters, timeout=duration_s, return_when=asyncio.FIRST_COMPLETED)
            waiters[0].cancel()
            status.cancel()
            agent_task.cancel()
    finally:
        await simulator.stop()
        if broker is not None:
            await asyncio.to_thread(broker.stop)
    print("demo stopped; buffered data stays in", config.buffer.path, file=out)
    return 0


async def _print_status(agent: Agent, out: TextIO) -> None:
    await agent.started.wait()
    while True:
        await asyncio.sleep(STATUS_INTERVAL_S)
        with contextlib.suppress(AssertionError):
            snapshot = await agent.snapshot()
            for line in render_status(snapshot):
                print(line, file=out)
            out.flush()


def render_status(snapshot: Snapshot) -> Iterator[str]:
    up = snapshot.uplink
    buf = snapshot.buffer
    yield (
        f"[{time.strftime('%H:%M:%S')}] uplink {up.state}: {up.acked} acked, "
        f"{up.inflight} in flight, {up.reconnects} reconnects · buffer {buf.records} records "
        f"({buf.bytes / 1024:.1f} KiB, {buf.dropped_total} dropped) · {snapshot.readings_in} "
        f"readings in {snapshot.batches_out} batches · commands {snapshot.commands_accepted} "
        f"done, {snapshot.commands_rejected} rejected"
    )
    for device_id, state in sorted(snapshot.devices.items()):
        online = {True: "online ", False: "OFFLINE", None: "…      "}[state.online]
        values = []
        for reading in list(state.last_readings.values())[:4]:
            if reading.quality is Quality.GOOD:
                value = reading.value
                text = f"{value:.1f}" if isinstance(value, float) else str(value)
                values.append(f"{reading.point}={text}{reading.unit}")
        yield f"    {device_id:<10} {online} {'  '.join(values)}"


def main_demo(config: GatewayConfig, duration_s: float | None) -> int:
    return asyncio.run(run_demo(config, duration_s=duration_s, out=sys.stdout))
