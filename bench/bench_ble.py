"""BLE advertisement throughput: simulated sensors advertising through a mock BlueZ, heard by
the agent's BLE driver (bleak's real BlueZ backend) and forwarded to Mosquitto on loopback. Not
a test: it prints figures.

    python -m bench.bench_ble [--sensors 200] [--interval-s 1] [--seconds 60] [--window-s 10]
                              [--scanning active|passive]

Besides this process: a private Mosquitto, the BLE simulator (``python -m firmware_sim ble``:
the injector, python-dbusmock's ``bluez5`` mock and a private D-Bus system bus, its own
processes so their CPU is not the agent's) and the agent (``python -m agent run``) started with
``DBUS_SYSTEM_BUS_ADDRESS`` on that bus. The sensors take the six kinds in turn (BTHome plain
and encrypted with bind key files, Ruuvi 5, 6 and E1, Aranet4); the generated gateway has one
BLE bus (``metrics_interval_s = 10``) and one device per sensor with the shipped profiles. This
process counts what arrives on the ``data`` topic.

Printed, per window and as medians over the windows after a warm-up: adverts/s injected (from
the simulator's own figures), adverts/s the driver counted (its ``adverts_per_min`` bus
readings), sensor advertisements forwarded per second (distinct (device, timestamp) groups of
readings at the broker: the driver timestamps an advert's readings on reception, so one group is
one decoded advert that reached the hub) and readings/s; the agent's CPU (% of one core) and
RSS; the injector's, the mock's and the D-Bus daemon's CPU. Then, per kind, adverts forwarded
against adverts asked, gaps in each sensor's forwarded adverts (drops) and repeats. Aranet4
sensors advertise every interval but measure once a minute, and the driver forwards each
measurement once: their adverts are counted by the driver and mostly dropped as repeats, by
design. A run takes about 90 s by default.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as paho
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.mosquitto import MosquittoBroker

REPO = Path(__file__).resolve().parent.parent
GATEWAY = "bench-ble"
BUS = "ble"
ADAPTER = "hci0"
KINDS = ("bthome", "bthome-enc", "ruuvi5", "ruuvi6", "ruuvie1", "aranet4")
PROFILES = {
    "bthome": "bthome-air",
    "bthome-enc": "bthome-air",
    "ruuvi5": "ruuvitag",
    "ruuvi6": "ruuvi-air",
    "ruuvie1": "ruuvi-air",
    "aranet4": "aranet4",
}
ARANET_MEASUREMENT_INTERVAL_S = 60.0
"""The simulated Aranet4 measures once a minute; the driver forwards each measurement once."""
METRICS_INTERVAL_S = 10.0
SIM_READY_LINE = "Advertising; Ctrl-C stops."
SIM_STATUS = re.compile(
    r"^Injected (?P<adverts>\d+) adverts \((?P<rate>\d+)/s\) in (?P<batches>\d+) batches; "
    r"injector capacity (?P<capacity>\d+) adverts/s"
)
SIM_KIND_COMMENT = re.compile(r"# simulated kind: (?P<kind>[\w-]+)")
SIM_STARTUP_TIMEOUT_S = 30.0
STARTUP_TIMEOUT_S = 60.0
"""From starting the agent to the first sensor reading at the broker."""
WARM_UP_S = 10.0
"""After the first reading, before measuring: every sensor heard once (new D-Bus objects, the
first advert of each), the first metrics window."""
SAMPLE_EVERY_S = 1.0
AGENT_STOP_TIMEOUT_S = 20.0
SIM_STOP_TIMEOUT_S = 15.0
LOG_TAIL_CHARS = 4000
KEEP_UP_FRACTION = 0.99
"""Injected below this fraction of the rate asked: the injector could not keep up. A late
injector delays adverts (it never skips one), so below this the gaps counted as missing adverts
are mostly its delays."""


@dataclass(frozen=True)
class SimulatedDevice:
    """One ``[devices.…]`` table the simulator printed, with the kind from its comment."""

    name: str
    address: str
    format: str
    kind: str
    bind_key_file: str | None


@dataclass
class Arrivals:
    """What reached the broker's ``data`` topic, recorded in paho's thread."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    readings: list[tuple[float, int]] = field(default_factory=list)
    """(arrival, monotonic s; sensor readings in the message)."""
    groups: dict[tuple[str, int], float] = field(default_factory=dict)
    """(device, ts) of each forwarded advert -> first arrival (monotonic s). A batch may split
    one advert's readings over two messages; the first part counts."""
    keys: set[tuple[str, str, int]] = field(default_factory=set)
    duplicate_readings: int = 0
    """(device, point, ts) arriving more than once: a redelivery, not a repeated advert."""
    delays_ms: list[tuple[float, float]] = field(default_factory=list)
    """(arrival; arrival wall clock minus the reading's ts, ms): the driver's reception to the
    broker."""
    adverts_per_min: list[tuple[float, float]] = field(default_factory=list)
    """(arrival; the bus's adverts_per_min reading)."""
    first: threading.Event = field(default_factory=threading.Event)


class DataCounter:
    """A paho subscriber to the gateway's ``data`` topic that tallies sensor readings and the
    bus metrics."""

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
        arrivals = self.arrivals
        with arrivals.lock:
            for reading in batch["readings"]:
                device, point, ts = reading["device"], reading["point"], int(reading["ts"])
                if device == BUS:
                    if point == "adverts_per_min" and reading["value"] is not None:
                        arrivals.adverts_per_min.append((arrived, float(reading["value"])))
                    continue
                count += 1
                key = (device, point, ts)
                if key in arrivals.keys:
                    arrivals.duplicate_readings += 1
                arrivals.keys.add(key)
                arrivals.groups.setdefault((device, ts), arrived)
                arrivals.delays_ms.append((arrived, arrived_ms - ts))
            arrivals.readings.append((arrived, count))
        if count:
            arrivals.first.set()


class SimulatorOutput:
    """Drains the simulator's stdout after its configuration (so the pipe never fills) and
    keeps its injection figures, printed every 10 s."""

    def __init__(self, stream: IO[str]) -> None:
        self.lock = threading.Lock()
        self.status: list[tuple[float, int, int]] = []
        """(arrival, monotonic s; adverts injected since the start; injector capacity/s)."""
        self._stream = stream
        self._thread = threading.Thread(target=self._drain, name="sim-stdout", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _drain(self) -> None:
        for line in self._stream:
            match = SIM_STATUS.match(line)
            if match:
                with self.lock:
                    self.status.append(
                        (time.monotonic(), int(match["adverts"]), int(match["capacity"]))
                    )


def parse_devices(fragment: str) -> list[SimulatedDevice]:
    """The simulator's device tables. The kind is only in a comment, so it is read from the
    text; the rest through tomllib."""
    kinds: dict[str, str] = {}
    table = None
    for line in fragment.splitlines():
        if line.startswith("[devices."):
            table = line.strip()[len("[devices.") : -1]
        elif (match := SIM_KIND_COMMENT.search(line)) and table is not None:
            kinds[table] = match["kind"]
    devices = []
    for name, values in tomllib.loads(fragment).get("devices", {}).items():
        devices.append(
            SimulatedDevice(
                name=name,
                address=values["address"],
                format=values["format"],
                kind=kinds[name],
                bind_key_file=values.get("bind_key_file"),
            )
        )
    return devices


def start_simulator(
    env: dict[str, str], directory: Path, sensors: int, interval_s: float
) -> tuple[subprocess.Popen[str], str, list[SimulatedDevice]]:
    """The simulator process, its private system bus address and the sensors' tables."""
    command = [
        sys.executable,
        "-m",
        "firmware_sim",
        "ble",
        "--sensors",
        str(sensors),
        "--interval-s",
        repr(interval_s),
        "--kinds",
        ",".join(KINDS),
        "--adapter",
        ADAPTER,
        "--key-dir",
        str(directory / "keys"),
    ]
    with (directory / "sim.log").open("w") as log:
        sim = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    assert sim.stdout is not None
    address = None
    fragment: list[str] = []
    # Its own session is not needed: the simulator's children die with it (PR_SET_PDEATHSIG).
    deadline = time.monotonic() + SIM_STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        line = sim.stdout.readline()
        if not line:
            break
        if line.startswith("DBUS_SYSTEM_BUS_ADDRESS="):
            address = line.strip().removeprefix("DBUS_SYSTEM_BUS_ADDRESS=")
        elif line.strip() == SIM_READY_LINE:
            break
        elif address is not None and not line.startswith("Adapter: "):
            fragment.append(line)
    else:
        line = ""
    if address is None or line.strip() != SIM_READY_LINE:
        stop_process("simulator", sim, SIM_STOP_TIMEOUT_S)
        raise SystemExit(f"the simulator did not start (last line {line!r}); see its log")
    return sim, address, parse_devices("".join(fragment))


def write_gateway(
    directory: Path, broker_port: int, devices: list[SimulatedDevice], scanning: str
) -> Path:
    """One BLE bus, one device per simulated sensor with the shipped profile of its kind."""
    lines = [
        "[gateway]",
        f'id = "{GATEWAY}"',
        f"profile_dirs = [{json.dumps(str(REPO / 'config' / 'profiles'))}]",
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
        'driver = "ble"',
        f'adapter = "{ADAPTER}"',
        f'scanning = "{scanning}"',
        f"metrics_interval_s = {METRICS_INTERVAL_S!r}",
        "",
    ]
    for device in devices:
        lines += [
            f"[devices.{device.name}]",
            f'bus = "{BUS}"',
            f'profile = "{PROFILES[device.kind]}"',
            f'address = "{device.address}"',
            f'format = "{device.format}"',
        ]
        if device.bind_key_file is not None:
            lines.append(f"bind_key_file = {json.dumps(device.bind_key_file)}")
        lines.append("")
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


def cpu_s(process: psutil.Process) -> float:
    """User + system CPU seconds; 0 for a process already gone."""
    try:
        times = process.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return float(times.user + times.system)


def simulator_parts(sim_pid: int) -> dict[str, psutil.Process]:
    """The simulator's processes: the injector (the CLI, which builds and sends the batches),
    the mock BlueZ (dbusmock) and the private dbus-daemon, which also carries every signal to
    the agent (on a gateway, the system's dbus-daemon and bluetoothd do that work)."""
    injector = psutil.Process(sim_pid)
    parts = {"injector": injector}
    for child in injector.children(recursive=True):
        command = " ".join(child.cmdline())
        if "dbus-daemon" in command:
            parts["dbus-daemon"] = child
        elif "dbusmock" in command:
            parts["mock"] = child
    return parts


def expected_gap_s(kind: str, interval_s: float) -> float:
    """Time between two forwarded adverts of one sensor: one interval, or for an Aranet4 the
    first advert at least a measurement interval after the last measurement."""
    if kind == "aranet4":
        return math.ceil(ARANET_MEASUREMENT_INTERVAL_S / interval_s - 1e-9) * interval_s
    return interval_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sensors", type=int, default=200, help="sensors (default 200)")
    parser.add_argument(
        "--interval-s", type=float, default=1.0, help="seconds between adverts (default 1)"
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="measured time (default 60)")
    parser.add_argument("--window-s", type=float, default=10.0, help="window length (default 10)")
    parser.add_argument(
        "--scanning",
        default="active",
        choices=("active", "passive"),
        help="the bus's scanning mode (default active; the mock reports every advert either way)",
    )
    args = parser.parse_args()
    # SIGTERM (a timeout wrapper, say) unwinds like Ctrl-C, so the child processes are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    windows = max(1, round(args.seconds / args.window_s))
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'firmware-sim'}{os.pathsep}{REPO}"}
    asked_per_s = args.sensors / args.interval_s
    print(
        f"machine: {os.cpu_count()} cores, {platform.machine()}, Python "
        f"{platform.python_version()}, bleak {version('bleak')}",
        flush=True,
    )
    print(
        f"{args.sensors} sensors ({', '.join(KINDS)} in turn), one advert each every "
        f"{args.interval_s:g} s ({asked_per_s:,.0f} adverts/s asked), {args.scanning} scanning; "
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
            sim, bus_address, devices = start_simulator(
                env, directory, args.sensors, args.interval_s
            )
            assert sim.stdout is not None
            sim_output = SimulatorOutput(sim.stdout)
            sim_output.start()
            print(
                f"simulator up in {time.monotonic() - started:.1f} s, {len(devices)} sensors",
                flush=True,
            )
            config = write_gateway(directory, broker.port, devices, args.scanning)
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
                    env={**env, "DBUS_SYSTEM_BUS_ADDRESS": bus_address},
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
            agent_process = psutil.Process(agent.pid)
            sim_parts = simulator_parts(sim.pid)
            time.sleep(WARM_UP_S)
            bounds = [time.monotonic()]
            agent_cpu = [cpu_s(agent_process)]
            sim_cpu = {name: [cpu_s(p)] for name, p in sim_parts.items()}
            rss_mib: list[float] = []
            for window in range(windows):
                end = bounds[0] + (window + 1) * args.window_s
                while (now := time.monotonic()) < end:
                    rss_mib.append(agent_process.memory_info().rss / 2**20)
                    time.sleep(min(SAMPLE_EVERY_S, end - now))
                bounds.append(time.monotonic())
                agent_cpu.append(cpu_s(agent_process))
                for name, process in sim_parts.items():
                    sim_cpu[name].append(cpu_s(process))
                if agent.poll() is not None or sim.poll() is not None:
                    print("the agent or the simulator exited", file=sys.stderr)
                    return 1
                low, high = bounds[-2], bounds[-1]
                elapsed = high - low
                with counter.arrivals.lock:
                    readings = sum(n for t, n in counter.arrivals.readings if low <= t < high)
                    forwarded = sum(1 for t in counter.arrivals.groups.values() if low <= t < high)
                print(
                    f"window {window + 1}: {forwarded / elapsed:,.1f} adverts forwarded/s, "
                    f"{readings / elapsed:,.1f} readings/s, agent CPU "
                    f"{100 * (agent_cpu[-1] - agent_cpu[-2]) / elapsed:.1f} %, simulator CPU "
                    + ", ".join(
                        f"{name} {100 * (cpu[-1] - cpu[-2]) / elapsed:.1f} %"
                        for name, cpu in sim_cpu.items()
                    ),
                    flush=True,
                )
            logged = agent_log.read_text()
            complaints = [
                line for line in logged.splitlines() if " WARNING " in line or " ERROR " in line
            ]
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
    with sim_output.lock:
        status = list(sim_output.status)
    report(
        args,
        devices,
        bounds,
        Usage(agent_cpu, sim_cpu, rss_mib),
        counter.arrivals,
        status,
        complaints,
    )
    return 0


@dataclass
class Usage:
    """CPU seconds at each window bound, and the agent's RSS samples."""

    agent_cpu: list[float]
    sim_cpu: dict[str, list[float]]
    rss_mib: list[float]


def injected_rate(
    status: list[tuple[float, int, int]], start: float, end: float
) -> tuple[float | None, float | None]:
    """Adverts/s the simulator injected between its first and last figures inside the measured
    time (it prints them every 10 s), and its injector capacity then; None without two."""
    inside = [s for s in status if start <= s[0] <= end]
    if len(inside) < 2:
        return None, None
    (first_t, first_n, _), (last_t, last_n, capacity) = inside[0], inside[-1]
    return (last_n - first_n) / (last_t - first_t), float(capacity)


def report(
    args: argparse.Namespace,
    devices: list[SimulatedDevice],
    bounds: list[float],
    usage: Usage,
    arrivals: Arrivals,
    status: list[tuple[float, int, int]],
    complaints: list[str],
) -> None:
    start, end = bounds[0], bounds[-1]
    total = end - start
    forwarded_rates, reading_rates, agent_pct = [], [], []
    sim_pct: dict[str, list[float]] = {name: [] for name in usage.sim_cpu}
    for index in range(len(bounds) - 1):
        low, high = bounds[index], bounds[index + 1]
        elapsed = high - low
        forwarded_rates.append(
            sum(1 for t in arrivals.groups.values() if low <= t < high) / elapsed
        )
        reading_rates.append(sum(n for t, n in arrivals.readings if low <= t < high) / elapsed)
        agent_pct.append(100 * (usage.agent_cpu[index + 1] - usage.agent_cpu[index]) / elapsed)
        for name, cpu in usage.sim_cpu.items():
            sim_pct[name].append(100 * (cpu[index + 1] - cpu[index]) / elapsed)
    asked_per_s = args.sensors / args.interval_s
    injected, capacity = injected_rate(status, start, end)
    # Each adverts_per_min reading covers the driver's previous metrics interval: keep those
    # that arrived after a full interval of measured time (so none covers the warm-up).
    counted = [
        v / 60 for t, v in arrivals.adverts_per_min if start + METRICS_INTERVAL_S <= t <= end
    ]
    delays = [d for t, d in arrivals.delays_ms if start <= t < end]

    # Per sensor: the reception timestamps of its forwarded adverts, for gaps and repeats.
    kind_of = {device.name: device.kind for device in devices}
    stamps: dict[str, list[int]] = {}
    for device, ts in arrivals.groups:
        stamps.setdefault(device, []).append(ts)
    in_span: dict[str, int] = {}
    for (device, _ts), arrived in arrivals.groups.items():
        if start <= arrived < end:
            in_span[device] = in_span.get(device, 0) + 1
    # Gaps between consecutive forwarded adverts of a sensor, both received in the measured
    # time (driver clock, ms): longer than 1.5 expected gaps = adverts lost on the way or
    # refused by the driver; shorter than half = the same advert forwarded twice.
    start_ms = (time.time() - (time.monotonic() - start)) * 1000
    end_ms = start_ms + total * 1000
    missed, early = 0, 0
    missed_by_kind: dict[str, int] = {}
    for device, seen in stamps.items():
        kind = kind_of[device]
        gap_ms = 1000 * expected_gap_s(kind, args.interval_s)
        inside = sorted(ts for ts in seen if start_ms <= ts < end_ms)
        for before, after in itertools.pairwise(inside):
            gap = after - before
            if gap > 1.5 * gap_ms:
                lost = round(gap / gap_ms) - 1
                missed += lost
                missed_by_kind[kind] = missed_by_kind.get(kind, 0) + lost
            elif gap < 0.5 * gap_ms:
                early += 1
    per_kind_lines = []
    for kind in KINDS:
        names = [d.name for d in devices if d.kind == kind]
        if not names:
            continue
        forwarded = sum(in_span.get(name, 0) for name in names)
        # What the sensors were asked to send: the injector sends that when it keeps up.
        asked = len(names) * total / args.interval_s
        new_measurements = len(names) * total / expected_gap_s(kind, args.interval_s)
        heard = sum(1 for name in names if in_span.get(name))
        note = (
            f", {new_measurements / total:,.2f}/s new measurements"
            if kind == "aranet4"
            else f" ({100 * forwarded / asked:.1f} %)"
        )
        per_kind_lines.append(
            f"    {kind:<11} {len(names):>4} sensors: asked {asked / total:,.1f}/s, forwarded "
            f"{forwarded / total:,.1f}/s{note}; forwarding {heard}/{len(names)}; "
            f"gaps {missed_by_kind.get(kind, 0)}"
        )
    # What the driver counted but did not forward: repeats it dropped (Aranet4 adverts between
    # measurements), decode errors and other addresses. Its health counters are not published.
    forwarded_median = statistics.median(forwarded_rates)
    counted_median = statistics.median(counted) if counted else None
    if injected is None:
        keep_up = "injected: fewer than two simulator figures in the measured time"
    elif injected < KEEP_UP_FRACTION * asked_per_s:
        keep_up = (
            f"THE INJECTOR CANNOT KEEP UP: {injected:,.1f} adverts/s injected of "
            f"{asked_per_s:,.0f}/s asked (capacity {capacity:,.0f}/s): the figures are for the "
            "rate injected, and its late adverts count as gaps below"
        )
    else:
        keep_up = f"the injector kept up ({injected:,.1f} of {asked_per_s:,.0f} adverts/s asked)"
    print(f"\n{keep_up}")
    if complaints:
        print(f"agent warnings and errors ({len(complaints)}), the first ones:")
        for line in complaints[:5]:
            print(f"  {line}")
    print(
        f"\nmedian of {len(forwarded_rates)} windows of {args.window_s:g} s "
        f"({os.cpu_count()} cores, {args.sensors} sensors every {args.interval_s:g} s, "
        f"{args.scanning} scanning):\n"
        f"  adverts injected:     "
        + (
            f"{injected:,.1f}/s (simulator's figures over the measured time; "
            f"injector capacity {capacity:,.0f}/s)"
            if injected is not None and capacity is not None
            else "unknown"
        )
        + "\n  adverts counted by the driver: "
        + (
            f"{counted_median:,.1f}/s (adverts_per_min / 60; {len(counted)} readings, "
            f"min {min(counted):,.1f}, max {max(counted):,.1f})"
            if counted_median is not None
            else "no adverts_per_min reading in the measured time"
        )
        + f"\n  adverts forwarded:    {forwarded_median:,.1f}/s (distinct device+ts groups at "
        f"the broker; min {min(forwarded_rates):,.1f}, max {max(forwarded_rates):,.1f})"
        + (
            f"\n  counted, not forwarded: {counted_median - forwarded_median:,.1f}/s (repeats "
            "the driver drops: Aranet4 adverts between measurements)"
            if counted_median is not None
            else ""
        )
        + f"\n  readings at the broker: {statistics.median(reading_rates):,.1f}/s\n"
        f"  agent CPU:     {statistics.median(agent_pct):.1f} % of one core "
        f"({100 * (usage.agent_cpu[-1] - usage.agent_cpu[0]) / total:.1f} % over "
        f"{total:.0f} s)\n"
        f"  agent RSS:     median {statistics.median(usage.rss_mib):.1f} MiB, "
        f"peak {max(usage.rss_mib):.1f} MiB\n"
        f"  simulator CPU (not the agent's): "
        + ", ".join(f"{name} {statistics.median(values):.1f} %" for name, values in sim_pct.items())
        + f" (total {sum(statistics.median(v) for v in sim_pct.values()):.1f} %)\n"
        f"  driver reception -> broker arrival: median {statistics.median(delays):.0f} ms, "
        f"p95 {percentile(delays, 0.95):.0f} ms, max {max(delays):.0f} ms\n"
        f"  per kind over {total:.0f} s:\n" + "\n".join(per_kind_lines) + "\n"
        f"  adverts missing (gaps over 1.5 intervals): {missed}; forwarded twice (gaps under "
        f"half an interval): {early}; readings delivered twice: {arrivals.duplicate_readings}; "
        f"agent warnings and errors logged: {len(complaints)}"
    )


if __name__ == "__main__":
    sys.exit(main())
