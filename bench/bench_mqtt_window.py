"""Publish window benchmark: QoS 1 throughput and CPU against a private Mosquitto on loopback.
Not a test: it prints figures, used to choose the default ``hub.max_inflight``.

    python -m bench.bench_mqtt_window [--messages 50000] [--size 1024] [--runs 3]
                                      [--windows 1,8,64,256,1024,8192] [--mode session,paho]

Modes:
  session  the agent's seam (agent.mqtt.MqttSession, paho driven from the event loop), fed like
           the uplink feeds it: a new message as soon as a window slot frees;
  paho     plain paho-mqtt with its own network thread and ``max_inflight_messages_set(window)``
           (everything queued up front), for reference.

The broker runs with ``max_inflight_messages 0`` so that its Receive Maximum (65,535) does not
cap the window under test; its CPU is reported separately. Figures are medians of ``--runs``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psutil  # type: ignore[import-untyped]
from paho.mqtt import __version__ as paho_version
from paho.mqtt.enums import CallbackAPIVersion

from agent.mqtt import MqttSession, MqttSettings
from tests.support.mosquitto import MosquittoBroker

TOPIC = "bench/cab-0042/data"
RUN_TIMEOUT_S = 600.0


async def run_session(port: int, window: int, messages: int, payload: bytes) -> None:
    session = MqttSession(
        MqttSettings(port=port, client_id=f"bench-session-{window}"), max_inflight=window
    )
    await session.connect("bench/cab-0042/status", b"offline")
    try:
        assert session.window == window, (session.window, window)
        slots = asyncio.Semaphore(window)
        failures: list[BaseException] = []

        def release(future: asyncio.Future[None]) -> None:
            slots.release()
            if not future.cancelled() and future.exception() is not None:
                failures.append(future.exception())  # type: ignore[arg-type]

        for _ in range(messages):
            await slots.acquire()
            session.publish_nowait(TOPIC, payload, qos=1).add_done_callback(release)
        for _ in range(window):  # every slot back = every PUBACK received
            await slots.acquire()
        if failures:
            raise RuntimeError(f"{len(failures)} publishes failed: {failures[0]}")
    finally:
        await session.disconnect()


def run_paho(port: int, window: int, messages: int, payload: bytes) -> None:
    done = threading.Event()
    connected = threading.Event()
    count = 0

    def on_connect(*_args: Any) -> None:
        connected.set()

    def on_publish(*_args: Any) -> None:
        nonlocal count
        count += 1
        if count == messages:
            done.set()

    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"bench-paho-{window}", protocol=paho.MQTTv5
    )
    client.max_inflight_messages_set(window)
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise RuntimeError("paho did not connect")
        for _ in range(messages):
            client.publish(TOPIC, payload, qos=1)
        if not done.wait(RUN_TIMEOUT_S):
            raise RuntimeError(f"only {count}/{messages} acknowledged")
    finally:
        client.disconnect()
        client.loop_stop()


def one_run(
    mode: str, port: int, window: int, messages: int, size: int, broker_pid: int
) -> dict[str, float]:
    payload = os.urandom(size)
    broker_proc = psutil.Process(broker_pid)
    b0 = broker_proc.cpu_times()
    cpu0, t0 = time.process_time(), time.perf_counter()
    if mode == "session":
        asyncio.run(run_session(port, window, messages, payload))
    else:
        run_paho(port, window, messages, payload)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    b1 = broker_proc.cpu_times()
    broker_cpu = (b1.user - b0.user) + (b1.system - b0.system)
    return {"rate": messages / elapsed, "cpu": cpu, "broker_cpu": broker_cpu, "elapsed": elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=1024, help="payload bytes")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--windows", default="1,8,64,256,1024,8192")
    parser.add_argument("--mode", default="session,paho")
    args = parser.parse_args(argv)
    windows = [int(w) for w in args.windows.split(",")]
    modes = [m.strip() for m in args.mode.split(",")]
    for mode in modes:
        if mode not in ("session", "paho"):
            parser.error(f"unknown mode {mode!r}")

    print(
        f"# {time.strftime('%Y-%m-%d')} · Python {platform.python_version()} · "
        f"paho-mqtt {paho_version} · "
        f"{os.cpu_count()} CPUs · {args.messages} x {args.size} B QoS 1 · median of {args.runs}"
    )
    print("| mode | window | msg/s | client CPU s | client CPU µs/msg | broker CPU s |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="lampyre-bench-mqtt-") as tmp:
        broker = MosquittoBroker(Path(tmp), extra_conf="max_inflight_messages 0", verbose_log=False)
        broker.start()
        try:
            assert broker.pid is not None
            for mode in modes:
                for window in windows:
                    runs = [
                        one_run(mode, broker.port, window, args.messages, args.size, broker.pid)
                        for _ in range(args.runs)
                    ]
                    rate = statistics.median(r["rate"] for r in runs)
                    cpu = statistics.median(r["cpu"] for r in runs)
                    bcpu = statistics.median(r["broker_cpu"] for r in runs)
                    print(
                        f"| {mode} | {window} | {rate:,.0f} | {cpu:.2f} | "
                        f"{cpu / args.messages * 1e6:.0f} | {bcpu:.2f} |",
                        flush=True,
                    )
        finally:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
