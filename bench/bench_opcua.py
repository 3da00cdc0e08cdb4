"""OPC UA subscription throughput: monitored items changing every second, through the agent to
Mosquitto on loopback. Not a test: it prints figures.

    python -m bench.bench_opcua [--points 1000] [--seconds 60] [--window-s 10]
                                [--policy Basic256Sha256|None|...]

Besides this process: a private Mosquitto, the cabinet simulator with ``--bench-points N``
(``python -m firmware_sim opcua``, its own process so its CPU is not the agent's) and the agent
(``python -m agent run``). The generated gateway has one OPC UA bus (Basic256Sha256
SignAndEncrypt by default, both certificates pinned, set up with ``lampyre opcua cert`` and
``lampyre opcua trust``) and one device whose profile subscribes to every bench point; every
point changes every second. This process counts the readings arriving on the ``data`` topic.

Printed, per window and as medians over the windows after a warm-up: readings/s arriving at the
broker, the agent's CPU (% of one core) and RSS, the simulator's CPU, and the delay from the
simulator's source timestamp (the reading's ``ts``: the driver keeps the server's source
timestamp) to arrival at a subscriber; that delay includes the wait for the subscription's next
publishing cycle (0 to 1 s, set by the phase between the simulator's update and the cycle), so
the spread between the first and the last reading of one update is printed too. Then the data
messages' rate and size, changes missed and duplicates. A run takes about 90 s by default.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.mosquitto import MosquittoBroker

REPO = Path(__file__).resolve().parent.parent
GATEWAY = "bench-ua"
BUS = "plc"
DEVICE = "bench"
PROFILE = "opcua-bench"
CLIENT_URI = "urn:lampyre:bench:gateway"
STARTUP_TIMEOUT_S = 120.0
"""From starting the agent to the first bench reading at the broker: session, 1,000 monitored
items, first values."""
WARM_UP_S = 10.0
"""After the first reading, before measuring: the initial-value burst and the first batches."""
SAMPLE_EVERY_S = 1.0
AGENT_STOP_TIMEOUT_S = 20.0
SIM_STOP_TIMEOUT_S = 10.0
LOG_TAIL_CHARS = 4000
POLICIES = ("Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss", "None")


@dataclass
class Arrivals:
    """What reached the broker's ``data`` topic, recorded in paho's thread."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    readings: list[tuple[float, int]] = field(default_factory=list)
    """(arrival, monotonic s; bench readings in the message)."""
    delays_ms: list[tuple[float, float]] = field(default_factory=list)
    """(arrival, monotonic s; arrival wall clock minus the reading's ts, ms) per reading."""
    values: list[tuple[float, int, int]] = field(default_factory=list)
    """(arrival, point index, simulator tick) per good reading: point i holds tick + i."""
    not_good: list[float] = field(default_factory=list)
    """Arrival (monotonic s) of each reading that is not good."""
    first: threading.Event = field(default_factory=threading.Event)


class DataCounter:
    """A paho subscriber to the gateway's ``data`` topic that tallies the bench readings."""

    def __init__(self, port: int, topic: str) -> None:
        self.arrivals = Arrivals()
        self._topic = topic
        self._subscribed = threading.Event()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._port = port

    def start(self) -> None:
        self._client.connect("127.0.0.1", self._port, keepalive=30, clean_start=True)
        self._client.loop_start()
        if not self._subscribed.wait(10.0):
            raise RuntimeError(f"not subscribed to {self._topic} within 10 s")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: paho.Client, *_args: Any) -> None:
        client.subscribe(self._topic, qos=1)

    def _on_subscribe(self, *_args: Any) -> None:
        self._subscribed.set()

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        arrived, arrived_ms = time.monotonic(), time.time() * 1000
        batch = json.loads(msg.payload)
        count = 0
        delays: list[tuple[float, float]] = []
        values: list[tuple[float, int, int]] = []
        not_good: list[float] = []
        for reading in batch["readings"]:
            if reading["device"] != DEVICE:
                continue
            count += 1
            delays.append((arrived, arrived_ms - reading["ts"]))
            if reading["quality"] != "good" or reading["value"] is None:
                not_good.append(arrived)
                continue
            index = int(reading["point"][1:])
            values.append((arrived, index, round(reading["value"]) - index))
        with self.arrivals.lock:
            self.arrivals.readings.append((arrived, count))
            self.arrivals.delays_ms.extend(delays)
            self.arrivals.values.extend(values)
            self.arrivals.not_good.extend(not_good)
        if count:
            self.arrivals.first.set()


def point_name(index: int) -> str:
    return f"p{index:04d}"


def write_gateway(
    directory: Path,
    endpoint: str,
    broker_port: int,
    points: int,
    policy: str,
    publishing_interval_s: float,
) -> Path:
    """The gateway configuration and the bench profile (one point per bench node)."""
    profiles = directory / "profiles"
    profiles.mkdir()
    profile = [
        "[profile]",
        f'name = "{PROFILE}"',
        'driver = "opcua"',
        'description = "Cabinet simulator bench points, all subscribed"',
        "",
    ]
    for index in range(points):
        profile += [f"[points.{point_name(index)}]", f'node = "ns=2;s=Cabinet.Bench.P{index:04d}"']
    (profiles / f"{PROFILE}.toml").write_text("\n".join(profile) + "\n")
    security = [f'security_policy = "{policy}"']
    if policy != "None":
        security.append('security_mode = "SignAndEncrypt"')
    lines = [
        "[gateway]",
        f'id = "{GATEWAY}"',
        'profile_dirs = ["profiles"]',
        "",
        "[hub]",
        'host = "127.0.0.1"',
        f"port = {broker_port}",
        'seal = "none"  # the bench reads the readings on the broker',
        "",
        "[commands]",
        "allow_unsigned = true",
        "",
        "[buffer]",
        'path = "buffer.db"',
        "",
        f"[buses.{BUS}]",
        'driver = "opcua"',
        f'endpoint = "{endpoint}"',
        *security,
        f'application_uri = "{CLIENT_URI}"',
        f"publishing_interval_s = {publishing_interval_s!r}",
        f"keepalive_s = {max(5.0, publishing_interval_s)!r}",
        "",
        f"[devices.{DEVICE}]",
        f'bus = "{BUS}"',
        f'profile = "{PROFILE}"',
        "poll_interval_s = 60.0",
        "",
    ]
    path = directory / "gateway.toml"
    path.write_text("\n".join(lines))
    return path


def run_tool(env: dict[str, str], *args: str) -> str:
    """``python -m agent ARGS`` (the ``lampyre`` command); its output, or exit with it."""
    done = subprocess.run(
        [sys.executable, "-m", "agent", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        print(f"lampyre {' '.join(args)} failed ({done.returncode}):", file=sys.stderr)
        print(done.stdout + done.stderr, file=sys.stderr)
        raise SystemExit(1)
    return done.stdout


def start_simulator(
    env: dict[str, str], directory: Path, points: int, policy: str
) -> tuple[subprocess.Popen[str], str, Path]:
    """The simulator process, its endpoint, and the folder of client certificates it trusts."""
    trusted = directory / "sim-trusted"
    trusted.mkdir()
    command = [
        sys.executable,
        "-m",
        "firmware_sim",
        "opcua",
        "--port",
        "0",
        "--cert-dir",
        str(directory / "sim-pki"),
        "--trust-dir",
        str(trusted),
        "--bench-points",
        str(points),
    ]
    if policy == "None":
        command.append("--allow-none")
    with (directory / "sim.log").open("w") as log:
        sim = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    assert sim.stdout is not None
    first = sim.stdout.readline()
    if not first.startswith("OPC UA endpoint: "):
        sim.kill()
        raise SystemExit(f"simulator did not start: {first!r}; see its log")
    return sim, first.removeprefix("OPC UA endpoint: ").strip(), trusted


def stop_process(name: str, process: subprocess.Popen[Any], timeout_s: float) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout_s``: never leave one behind."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"the {name} did not stop within {timeout_s:g} s of SIGTERM: killed", file=sys.stderr)
        process.kill()
        process.wait()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def cpu_s(times: Any) -> float:
    return float(times.user + times.system)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1000, help="monitored items (default 1000)")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured time (default 60)")
    parser.add_argument("--window-s", type=float, default=10.0, help="window length (default 10)")
    parser.add_argument("--policy", default="Basic256Sha256", choices=POLICIES)
    parser.add_argument(
        "--publishing-interval-s",
        type=float,
        default=1.0,
        help="the bus's publishing_interval_s (default 1.0, the driver's default)",
    )
    args = parser.parse_args()
    # SIGTERM (a timeout wrapper, say) unwinds like Ctrl-C, so the child processes are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    windows = max(1, round(args.seconds / args.window_s))
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'firmware-sim'}{os.pathsep}{REPO}"}
    mode = "" if args.policy == "None" else " SignAndEncrypt"
    print(
        f"machine: {os.cpu_count()} cores, {platform.machine()}, Python "
        f"{platform.python_version()}, asyncua {version('asyncua')}",
        flush=True,
    )
    print(
        f"{args.points} monitored items changing every second, {args.policy}{mode}, "
        f"publishing interval {args.publishing_interval_s:g} s; "
        f"{windows} windows of {args.window_s:g} s after a {WARM_UP_S:g} s warm-up",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="lampyre-bench-") as tmp:
        directory = Path(tmp)
        (directory / "broker").mkdir()
        broker = MosquittoBroker(directory / "broker", verbose_log=False)
        broker.start()
        sim: subprocess.Popen[str] | None = None
        agent: subprocess.Popen[bytes] | None = None
        counter = DataCounter(broker.port, f"lampyre/v1/{GATEWAY}/data")
        agent_log, sim_log_path = directory / "agent.log", directory / "sim.log"
        completed = False
        try:
            started = time.monotonic()
            sim, endpoint, sim_trusted = start_simulator(env, directory, args.points, args.policy)
            print(f"simulator up in {time.monotonic() - started:.1f} s on {endpoint}", flush=True)
            config = write_gateway(
                directory,
                endpoint,
                broker.port,
                args.points,
                args.policy,
                args.publishing_interval_s,
            )
            run_tool(env, "opcua", "cert", "--config", str(config), "--bus", BUS)
            client_cert = directory / "pki" / BUS / "client.der"
            (sim_trusted / "gateway.der").write_bytes(client_cert.read_bytes())
            run_tool(
                env,
                "opcua",
                "trust",
                "--dir",
                str(directory / "pki" / BUS / "trusted"),
                "--yes",
                str(directory / "sim-pki" / "server-cert.der"),
            )
            print(run_tool(env, "check-config", str(config)).strip(), flush=True)
            counter.start()
            started = time.monotonic()
            with agent_log.open("w") as log:
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
                    stderr=log,
                )
            if not counter.arrivals.first.wait(STARTUP_TIMEOUT_S) or agent.poll() is not None:
                print(f"no reading within {STARTUP_TIMEOUT_S:g} s", file=sys.stderr)
                return 1
            print(
                f"first reading at the broker {time.monotonic() - started:.1f} s after "
                "starting the agent",
                flush=True,
            )
            agent_process, sim_process = psutil.Process(agent.pid), psutil.Process(sim.pid)
            time.sleep(WARM_UP_S)
            bounds = [time.monotonic()]
            agent_cpu = [cpu_s(agent_process.cpu_times())]
            sim_cpu = [cpu_s(sim_process.cpu_times())]
            rss_mib: list[float] = []
            for window in range(windows):
                end = bounds[0] + (window + 1) * args.window_s
                while (now := time.monotonic()) < end:
                    rss_mib.append(agent_process.memory_info().rss / 2**20)
                    time.sleep(min(SAMPLE_EVERY_S, end - now))
                bounds.append(time.monotonic())
                agent_cpu.append(cpu_s(agent_process.cpu_times()))
                sim_cpu.append(cpu_s(sim_process.cpu_times()))
                if agent.poll() is not None:
                    print("the agent exited", file=sys.stderr)
                    return 1
                with counter.arrivals.lock:
                    arrived = sum(
                        n for t, n in counter.arrivals.readings if bounds[-2] <= t < bounds[-1]
                    )
                elapsed = bounds[-1] - bounds[-2]
                print(
                    f"window {window + 1}: {arrived / elapsed:,.1f} readings/s, agent CPU "
                    f"{100 * (agent_cpu[-1] - agent_cpu[-2]) / elapsed:.1f} %, simulator CPU "
                    f"{100 * (sim_cpu[-1] - sim_cpu[-2]) / elapsed:.1f} %",
                    flush=True,
                )
            logged = agent_log.read_text()
            agent_complaints = logged.count(" WARNING ") + logged.count(" ERROR ")
            completed = True
        finally:
            if not completed:
                for name, path in (("agent", agent_log), ("simulator", sim_log_path)):
                    if path.exists():
                        print(f"--- end of the {name}'s log:", file=sys.stderr)
                        print(path.read_text()[-LOG_TAIL_CHARS:], file=sys.stderr)
            if agent is not None:
                stop_process("agent", agent, AGENT_STOP_TIMEOUT_S)
            if sim is not None:
                stop_process("simulator", sim, SIM_STOP_TIMEOUT_S)
            counter.stop()  # after the agent: no backlog left for its thread to work through
            broker.stop()
        sim_log = sim_log_path.read_text()
    report(args, bounds, agent_cpu, sim_cpu, rss_mib, counter.arrivals, sim_log, agent_complaints)
    return 0


def report(
    args: argparse.Namespace,
    bounds: list[float],
    agent_cpu: list[float],
    sim_cpu: list[float],
    rss_mib: list[float],
    arrivals: Arrivals,
    sim_log: str,
    agent_complaints: int,
) -> None:
    start, end = bounds[0], bounds[-1]
    rates, agent_pct, sim_pct = [], [], []
    for index in range(len(bounds) - 1):
        low, high = bounds[index], bounds[index + 1]
        arrived = sum(n for t, n in arrivals.readings if low <= t < high)
        rates.append(arrived / (high - low))
        agent_pct.append(100 * (agent_cpu[index + 1] - agent_cpu[index]) / (high - low))
        sim_pct.append(100 * (sim_cpu[index + 1] - sim_cpu[index]) / (high - low))
    delays = [d for t, d in arrivals.delays_ms if start <= t < end]
    messages = [n for t, n in arrivals.readings if start <= t < end and n]
    # Changes missed: per point, the simulator ticks between the first and the last value seen
    # in the measured time that never arrived; duplicates: a (point, tick) seen twice.
    ticks: dict[int, list[int]] = {}
    # Per simulator update: when its first and its last reading arrived. The spread is the
    # agent's work on one publish of every point, whatever the publishing phase.
    update_span: dict[int, tuple[float, float, int]] = {}
    for t, point, tick in arrivals.values:
        if start <= t < end:
            ticks.setdefault(point, []).append(tick)
            first, last, count = update_span.get(tick, (t, t, 0))
            update_span[tick] = (min(first, t), max(last, t), count + 1)
    missed = sum(max(seen) - min(seen) + 1 - len(set(seen)) for seen in ticks.values())
    duplicates = sum(len(seen) - len(set(seen)) for seen in ticks.values())
    spreads_ms = [
        1000 * (last - first) for first, last, count in update_span.values() if count == args.points
    ]
    spread = (
        f"median {statistics.median(spreads_ms):.0f} ms, max {max(spreads_ms):.0f} ms "
        f"({len(spreads_ms)} complete updates)"
        if spreads_ms
        else "no update arrived complete within the measured time"
    )
    overruns = sim_log.count("tick overran")
    not_good = sum(1 for t in arrivals.not_good if start <= t < end)
    total = end - start
    print(
        f"\nmedian of {len(rates)} windows of {args.window_s:g} s "
        f"({os.cpu_count()} cores, {args.policy}):\n"
        f"  readings at the broker: {statistics.median(rates):,.1f}/s "
        f"(expected {args.points:,}/s; min {min(rates):,.1f}, max {max(rates):,.1f})\n"
        f"  agent CPU:     {statistics.median(agent_pct):.1f} % of one core "
        f"({100 * (agent_cpu[-1] - agent_cpu[0]) / total:.1f} % over {total:.0f} s)\n"
        f"  agent RSS:     median {statistics.median(rss_mib):.1f} MiB, "
        f"peak {max(rss_mib):.1f} MiB\n"
        f"  simulator CPU: {statistics.median(sim_pct):.1f} % of one core "
        f"(not the agent's; {overruns} ticks overran the 1 s interval)\n"
        f"  source timestamp -> broker arrival: median {statistics.median(delays):.0f} ms, "
        f"p95 {percentile(delays, 0.95):.0f} ms, max {max(delays):.0f} ms "
        f"({len(delays):,} readings; includes the wait for the server's next publishing "
        f"cycle, 0 to {args.publishing_interval_s:g} s depending on its phase)\n"
        f"  first to last reading of one update at the broker: {spread} (the agent's "
        "work on one publish; a batch left part-filled by one update waits for the next "
        "update or batch_max_delay_s, 1 s)\n"
        f"  data messages: {len(messages) / total:.1f}/s, "
        f"{statistics.median(messages):.0f} readings each (median; batch_max_readings 200)\n"
        f"  points heard: {len(ticks)}/{args.points}; changes missed: {missed}; "
        f"duplicates: {duplicates}; not good: {not_good}; "
        f"agent warnings and errors logged: {agent_complaints}"
    )


if __name__ == "__main__":
    sys.exit(main())
