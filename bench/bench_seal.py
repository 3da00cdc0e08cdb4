"""Cost of sealing readings envelopes: HPKE to the hub + Ed25519 signature, per suite. Not a
test: it prints figures.

    python -m bench.bench_seal [--readings 200] [--iterations 2000] [--runs 5]

For each suite, on a batch of ``--readings`` readings rendered exactly as the pipeline renders
them (``agent.pipeline.reading_json``): the batch and envelope sizes, then the median over
``--runs`` runs of the time per batch and per reading to seal and sign (the gateway's cost), to
verify and open (the hub's), and to verify only. Single-threaded, keys loaded beforehand.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import uuid
from collections.abc import Callable
from functools import partial

from agent.envelope import (
    SUITES,
    GatewaySigner,
    HubPrivateKey,
    Sealer,
    gateway_keyring,
    hub_keyring,
    open_envelope,
    verify_only,
)
from agent.pipeline import PAYLOAD_VERSION, reading_json
from agent.sdk import Quality, Reading

GATEWAY = "cab-0042"
FIRST_SEQ = 1_764_300_000_000_001
POINTS = (("actual_level", "%"), ("lamp_power", "W"), ("energy", "kWh"), ("voltage", "V"))


def batch_body(readings: int, start_ms: int = 1_764_300_000_000) -> bytes:
    """A data payload of ``readings`` readings, as the pipeline writes it to the buffer."""
    rendered = []
    for index in range(readings):
        point, unit = POINTS[index % len(POINTS)]
        reading = Reading(
            device=f"lamp-{index // len(POINTS) + 1}",
            point=point,
            value=round(12.5 + index * 0.37, 2),
            unit=unit,
            ts_ms=start_ms + index * 5,
            quality=Quality.GOOD,
        )
        rendered.append(reading_json(reading))
    document = {
        "v": PAYLOAD_VERSION,
        "gateway": GATEWAY,
        "seq": FIRST_SEQ,
        "batch": uuid.uuid4().hex,
        "readings": rendered,
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def per_call_us(action: Callable[[], object], iterations: int, runs: int) -> float:
    """Median over ``runs`` of the mean time of one call, in microseconds."""
    action()  # warm-up: first-call costs (imports, caches) are not the steady state
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(iterations):
            action()
        samples.append((time.perf_counter() - started) / iterations * 1e6)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=200, help="readings per batch")
    parser.add_argument("--iterations", type=int, default=2000, help="calls per run")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    body = batch_body(args.readings)
    t_last = 1_764_300_000_000 + (args.readings - 1) * 5
    print(
        f"{platform.machine()}, Python {platform.python_version()}; batch of {args.readings} "
        f"readings = {len(body)} bytes of JSON; median of {args.runs} runs x "
        f"{args.iterations} calls"
    )
    header = (
        f"{'suite':<42}{'envelope':>9}{'overhead':>9}{'seal+sign':>11}{'/reading':>10}"
        f"{'verify+open':>13}{'verify':>9}"
    )
    print(header)
    print(f"{'':<42}{'bytes':>9}{'bytes':>9}{'us/batch':>11}{'us':>10}{'us/batch':>13}{'us':>9}")
    signer = GatewaySigner.generate()
    gateways = gateway_keyring([(GATEWAY, signer.public_key)])
    for name, suite in SUITES.items():
        hub_key = HubPrivateKey.generate(suite.kem)
        sealer = Sealer(GATEWAY, hub_key.public, signer, name)
        hubs = hub_keyring([hub_key])

        seal_once = partial(
            sealer.seal, "data", FIRST_SEQ, FIRST_SEQ, 1_764_300_000_000, t_last, body
        )
        blob = seal_once()
        assert open_envelope(blob, hubs, gateways)[1] == body
        seal_us = per_call_us(seal_once, args.iterations, args.runs)
        open_us = per_call_us(
            partial(open_envelope, blob, hubs, gateways), args.iterations, args.runs
        )
        verify_us = per_call_us(partial(verify_only, blob, gateways), args.iterations, args.runs)
        print(
            f"{name:<42}{len(blob):>9}{len(blob) - len(body):>9}{seal_us:>11.1f}"
            f"{seal_us / args.readings:>10.2f}{open_us:>13.1f}{verify_us:>9.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
