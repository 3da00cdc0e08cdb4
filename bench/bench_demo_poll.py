"""The agent's footprint while polling the demo equipment (4 lamp controllers and an energy meter
on Modbus TCP, the demo's poll intervals), forwarding to Mosquitto on loopback. Not a test.

    python -m bench.bench_demo_poll [--seconds 60]

The simulator, the broker and the agent are separate processes; only the agent is measured.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tests.support.mosquitto import MosquittoBroker, free_port

REPO = Path(__file__).resolve().parent.parent
WARM_UP_S = 5.0


def demo_config(directory: Path, sim_port: int, broker_port: int) -> Path:
    text = (REPO / "config" / "demo.toml").read_text()
    text = text.replace(
        'profile_dirs = ["profiles"]', f'profile_dirs = ["{REPO / "config" / "profiles"}"]'
    )
    text = re.sub(r'path = ".*buffer.db"', 'path = "buffer.db"', text)
    text = text.replace("port = 5020", f"port = {sim_port}").replace(
        "port = 1883", f"port = {broker_port}"
    )
    path = directory / "demo.toml"
    path.write_text(text)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'firmware-sim'}{os.pathsep}{REPO}"}
    with tempfile.TemporaryDirectory(prefix="lampyre-bench-") as tmp:
        broker = MosquittoBroker(Path(tmp))
        broker.start()
        sim_port = free_port()
        sim = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "firmware_sim",
                "modbus",
                "--tcp",
                f"127.0.0.1:{sim_port}",
                "--lamps",
                "1-4",
                "--meter",
                "10",
            ],
            env=env,
            stdout=subprocess.PIPE,
        )
        assert sim.stdout is not None
        sim.stdout.readline()
        config = demo_config(Path(tmp), sim_port, broker.port)
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "run",
                "--config",
                str(config),
                "--log-level",
                "warning",
            ],
            env=env,
            cwd=REPO,
        )
        try:
            process = psutil.Process(agent.pid)
            time.sleep(WARM_UP_S)
            cpu0 = process.cpu_times()
            t0 = time.monotonic()
            rss = []
            while time.monotonic() - t0 < args.seconds:
                rss.append(process.memory_info().rss / 2**20)
                time.sleep(1.0)
            cpu1 = process.cpu_times()
            elapsed = time.monotonic() - t0
        finally:
            agent.terminate()
            agent.wait(timeout=20)
            sim.terminate()
            sim.wait(timeout=10)
            broker.stop()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    print(
        f"agent polling the demo cabinet for {elapsed:.0f} s: CPU {cpu:.2f} s "
        f"({100 * cpu / elapsed:.2f} % of one core), RSS median {statistics.median(rss):.1f} MiB, "
        f"peak {max(rss):.1f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
