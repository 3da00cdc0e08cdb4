"""DALI bus utilisation and command latency at real DALI timing. Not a test: it prints figures.

    python -m bench.bench_dali [--gear 64] [--seconds 60] [--interface foxtron]

A simulated line of 64 D4i LED gear behind a serial interface on a pty runs at real DALI
timing (time scale 1.0) in a thread of its own; the agent polls every gear as often as the bus
allows and forwards to Mosquitto on loopback. Meanwhile a control post sends a dim command
every few seconds. Printed:

- bus utilisation: the share of time the simulated line was busy (frames, answer windows and
  settling times), and transactions per second against the theoretical DALI transaction rate;
- command latency: from publishing the command on the ``cmd`` topic to the DAPC frame starting
  on the line (median and worst), and to the acknowledgement arriving on ``ack``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from agent.config import load_config
from agent.mqtt import MqttSession, MqttSettings
from agent.runtime import Agent
from firmware_sim.dali.interfaces import EMULATORS
from firmware_sim.dali.line import (
    BACKWARD_FRAME_S,
    FORWARD_FRAME_16_S,
    SETTLING_S,
    DaliLine,
)
from tests.support.mosquitto import MosquittoBroker

REPO = Path(__file__).resolve().parent.parent
WARM_UP_S = 5.0
COMMAND_EVERY_S = 3.0
ANSWER_DELAY_TYPICAL_S = 0.008


class LineThread:
    """The simulated line and its interface emulator on an event loop of their own."""

    def __init__(self, gear: int, interface: str) -> None:
        self.line = DaliLine.random(gear, addressed=gear, seed=1, time_scale=1.0)
        self.interface = interface
        self.path = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="dali-line", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        emulator = EMULATORS[self.interface](self.line)
        self.path = await emulator.start()
        self._stop = asyncio.Event()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await emulator.stop()

    def start(self) -> str:
        self._thread.start()
        assert self._ready.wait(10), "the simulated line did not start"
        return self.path

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def write_config(directory: Path, pty: str, gear: int, broker_port: int) -> Path:
    lines = [
        "[gateway]",
        'id = "bench-dali"',
        f'profile_dirs = ["{REPO / "config" / "profiles"}"]',
        "",
        "[hub]",
        'host = "127.0.0.1"',
        f"port = {broker_port}",
        'seal = "none"',
        "",
        "[commands]",
        "allow_unsigned = true",
        "",
        "[buffer]",
        'path = "buffer.db"',
        "",
        "[buses.dali-1]",
        'driver = "dali"',
        'interface = "foxtron"',
        f'device = "{pty}"',
        "",
    ]
    for address in range(gear):
        lines += [
            f"[devices.lamp-{address}]",
            'bus = "dali-1"',
            'profile = "dali-d4i-led"',
            f"address = {address}",
            "poll_interval_s = 1.0",
            "",
        ]
    path = directory / "bench.toml"
    path.write_text("\n".join(lines))
    return path


async def run(args: argparse.Namespace, broker_port: int, tmp: Path) -> None:
    line = LineThread(args.gear, args.interface)
    pty = line.start()
    text = write_config(tmp, pty, args.gear, broker_port).read_text()
    (tmp / "bench.toml").write_text(text.replace('"foxtron"', f'"{args.interface}"'))
    config = load_config(tmp / "bench.toml")
    agent = Agent(config)
    task = asyncio.create_task(agent.run())
    post = MqttSession(MqttSettings(port=broker_port, client_id="bench-post"))
    acks: dict[str, float] = {}

    async def on_message(message: object) -> None:
        payload = json.loads(message.payload)  # type: ignore[attr-defined]
        acks.setdefault(str(payload.get("id")), time.monotonic())

    post.on_message(on_message)
    await post.connect("lampyre/v1/bench-dali/post-status", b"{}", will_retain=False)
    await post.subscribe("lampyre/v1/bench-dali/ack")
    try:
        await asyncio.sleep(WARM_UP_S)
        records = line.line
        busy0, tx0, t0 = records.busy_s, records.transactions, records.now()
        wall0 = time.monotonic()
        sent: list[tuple[str, int, float]] = []
        n = 0
        while time.monotonic() - wall0 < args.seconds:
            n += 1
            address = (n * 7) % args.gear
            command_id = f"bench-{n}"
            level = 30 if n % 2 else 70
            document = {
                "id": command_id,
                "action": "dim",
                "target": {"device": f"lamp-{address}"},
                "level": level,
                "expires": int(time.time() * 1000) + 60_000,
            }
            started = time.monotonic()
            await post.publish("lampyre/v1/bench-dali/cmd", json.dumps(document).encode())
            sent.append((command_id, address, started))
            await asyncio.sleep(COMMAND_EVERY_S)
        await asyncio.sleep(2.0)
        elapsed_line = records.now() - t0
        utilisation = (records.busy_s - busy0) / elapsed_line
        rate = (records.transactions - tx0) / elapsed_line
        history = list(records.history)
        to_line, to_ack = [], []
        for command_id, address, started in sent:
            frame_address = address << 1  # DAPC: short address, selector bit 0
            dapc = [
                r.started_at
                for r in history
                if r.kind == "dapc" and r.frame >> 8 == frame_address and r.started_at >= started
            ]
            if dapc:
                to_line.append(min(dapc) - started)
            if command_id in acks:
                to_ack.append(acks[command_id] - started)
        query_s = FORWARD_FRAME_16_S + ANSWER_DELAY_TYPICAL_S + BACKWARD_FRAME_S + SETTLING_S[1]
        print(
            f"{args.gear} gear, {args.interface}, real DALI timing, {elapsed_line:.0f} s measured: "
            f"bus busy {100 * utilisation:.1f} % of the time, {rate:.1f} transactions/s "
            f"(theoretical ceiling for queries with answers: {1 / query_s:.1f}/s, "
            f"{query_s * 1000:.1f} ms each)"
        )
        if to_line:
            print(
                f"command → DAPC on the line: median {1000 * statistics.median(to_line):.0f} ms, "
                f"worst {1000 * max(to_line):.0f} ms over {len(to_line)} commands"
            )
        if to_ack:
            print(
                f"command → ack on the hub: median {1000 * statistics.median(to_ack):.0f} ms, "
                f"worst {1000 * max(to_ack):.0f} ms"
            )
    finally:
        await post.disconnect()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        line.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gear", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interface", default="foxtron", choices=sorted(EMULATORS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lampyre-bench-") as tmp:
        broker = MosquittoBroker(Path(tmp), verbose_log=False)
        broker.start()
        try:
            asyncio.run(run(args, broker.port, Path(tmp)))
        finally:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
