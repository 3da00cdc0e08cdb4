"""Pipeline throughput: synthetic driver → scheduler → pipeline → encrypted buffer → uplink →
Mosquitto on loopback → PUBACK → delete. Not a test: it prints figures.

    python -m bench.bench_pipeline [--readings 200000] [--runs 3]

Prints, per run and as medians: readings/s and batches/s acknowledged by the broker, CPU seconds
(user + system of this process, which is the agent) per 100k readings, and peak RSS.
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
from agent.runtime import Agent
from bench.synthetic import SyntheticDriver, write_synthetic_config
from tests.support.mosquitto import MosquittoBroker


async def one_run(broker_port: int, readings: int, window: int, batch: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="lampyre-bench-") as tmp:
        path = write_synthetic_config(
            Path(tmp),
            broker_port=broker_port,
            devices=20,
            points=50,
            poll_interval_s=0.005,
            batch_max_readings=batch,
            max_inflight=window,
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lampyre-bench-broker-") as tmp:
        broker = MosquittoBroker(Path(tmp))
        broker.start()
        try:
            results = []
            for run in range(args.runs):
                result = asyncio.run(one_run(broker.port, args.readings, args.window, args.batch))
                results.append(result)
                print(
                    f"run {run + 1}: {result['readings_per_s']:,.0f} readings/s, "
                    f"{result['batches_per_s']:,.1f} batches/s, "
                    f"{result['cpu_s_per_100k']:.2f} CPU s per 100k readings "
                    f"({result['readings']:,.0f} readings in {result['elapsed_s']:.1f} s)",
                    flush=True,
                )
        finally:
            broker.stop()
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"median of {args.runs}: {statistics.median(r['readings_per_s'] for r in results):,.0f} "
        f"readings/s, {statistics.median(r['batches_per_s'] for r in results):,.1f} batches/s "
        f"(batch {args.batch}, window {args.window}), "
        f"{statistics.median(r['cpu_s_per_100k'] for r in results):.2f} CPU s per 100k readings; "
        f"peak RSS {peak_rss_mib:.1f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
