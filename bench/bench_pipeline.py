"""Pipeline throughput: synthetic driver → scheduler → pipeline (→ HPKE seal + Ed25519 sign) →
encrypted buffer → uplink → Mosquitto on loopback → PUBACK → delete. Not a test: it prints
figures.

    python -m bench.bench_pipeline [--readings 200000] [--runs 3] [--seal both|on|off]

Runs with sealing off (``seal = "none"``) and on (``seal = "hpke"``, the default suite)
alternate in one process against one broker, so the ratio compares like with like. Prints, per
run and as medians per mode: readings/s and batches/s acknowledged by the broker, CPU seconds
(user + system of this process, which is the agent) per 100k readings, the on/off ratios, and
peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from agent.config import load_config
from agent.keys import create_gateway_signing_key, write_hub_keypair
from agent.runtime import Agent
from bench.synthetic import SyntheticDriver, write_synthetic_config
from tests.support.mosquitto import MosquittoBroker


async def one_run(
    broker_port: int, readings: int, window: int, batch: int, *, sealed: bool
) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="lampyre-bench-") as tmp:
        if sealed:
            keys = Path(tmp) / "keys"
            keys.mkdir(mode=0o700)
            create_gateway_signing_key(keys)
            write_hub_keypair(keys)  # the hub's private half is simply left unused here
        path = write_synthetic_config(
            Path(tmp),
            broker_port=broker_port,
            devices=20,
            points=50,
            poll_interval_s=0.005,
            batch_max_readings=batch,
            max_inflight=window,
            sealed=sealed,
        )
        config = load_config(path, drivers={"synthetic": SyntheticDriver})
        agent = Agent(config)
        task = asyncio.create_task(agent.run())
        await agent.started.wait()
        assert agent.uplink is not None and agent.pipeline is not None
        cpu0, t0 = time.process_time(), time.perf_counter()
        # Produce until `readings` were taken in, then stop the buses and let the rest drain.
        while agent.pipeline.readings_in < readings:
            await asyncio.sleep(0.01)
        for worker in agent.workers.values():
            worker.pause_polling()
        produced = agent.pipeline.readings_in
        while True:
            await asyncio.sleep(0.01)
            stats = await agent.buffer.stats() if agent.buffer else None
            if stats is not None and stats.records == 0 and not agent.pipeline.backlog():
                break
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        acked = agent.uplink.stats.acked
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return {
        "readings_per_s": produced / elapsed,
        "batches_per_s": acked / elapsed,
        "cpu_s_per_100k": cpu / produced * 100_000,
        "readings": produced,
        "elapsed_s": elapsed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--seal", choices=("both", "on", "off"), default="both")
    args = parser.parse_args()
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.seal]
    results: dict[bool, list[dict[str, float]]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="lampyre-bench-broker-") as tmp:
        broker = MosquittoBroker(Path(tmp))
        broker.start()
        try:
            for run in range(args.runs):
                for sealed in modes:
                    result = asyncio.run(
                        one_run(broker.port, args.readings, args.window, args.batch, sealed=sealed)
                    )
                    results[sealed].append(result)
                    print(
                        f"run {run + 1}, sealing {'on ' if sealed else 'off'}: "
                        f"{result['readings_per_s']:,.0f} readings/s, "
                        f"{result['batches_per_s']:,.1f} batches/s, "
                        f"{result['cpu_s_per_100k']:.2f} CPU s per 100k readings "
                        f"({result['readings']:,.0f} readings in {result['elapsed_s']:.1f} s)",
                        flush=True,
                    )
        finally:
            broker.stop()
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    medians: dict[bool, dict[str, float]] = {}
    for sealed, runs in results.items():
        medians[sealed] = {
            key: statistics.median(r[key] for r in runs)
            for key in ("readings_per_s", "batches_per_s", "cpu_s_per_100k")
        }
        m = medians[sealed]
        print(
            f"sealing {'on ' if sealed else 'off'}, median of {args.runs}: "
            f"{m['readings_per_s']:,.0f} readings/s, {m['batches_per_s']:,.1f} batches/s "
            f"(batch {args.batch}, window {args.window}), "
            f"{m['cpu_s_per_100k']:.2f} CPU s per 100k readings"
        )
    if len(medians) == 2:
        on, off = medians[True], medians[False]
        print(
            f"sealing on / off: throughput x{on['readings_per_s'] / off['readings_per_s']:.2f}, "
            f"CPU per reading x{on['cpu_s_per_100k'] / off['cpu_s_per_100k']:.2f}"
        )
    print(f"peak RSS {peak_rss_mib:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
