"""``python -m firmware_sim opcua``: a street-lighting cabinet controller served over OPC UA."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from firmware_sim.cli import SimulatorCommand
from firmware_sim.opcua.server import CabinetSimulator, certificate_fingerprint

__all__ = ["COMMAND"]

DEFAULT_PORT = 4840
DEFAULT_CERT_DIR = Path("opcua-sim-pki")


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"TCP port on 127.0.0.1 (default {DEFAULT_PORT}; 0 picks a free one)",
    )
    parser.add_argument(
        "--cert-dir",
        type=Path,
        default=DEFAULT_CERT_DIR,
        help="folder of the server certificate and key, created on first start "
        f"(default ./{DEFAULT_CERT_DIR})",
    )
    parser.add_argument(
        "--trust-dir",
        type=Path,
        default=None,
        help="accept only the client certificates (DER or PEM) in this folder "
        "(default: accept any client certificate)",
    )
    parser.add_argument(
        "--allow-none",
        action="store_true",
        help="also offer the unencrypted security policy None (off by default)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the electrical measurement noise"
    )


async def _run(args: argparse.Namespace) -> int:
    sim = CabinetSimulator(
        args.cert_dir,
        trust_dir=args.trust_dir,
        port=args.port,
        allow_none=args.allow_none,
        seed=args.seed,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        url = await sim.start()
        print(f"OPC UA endpoint: {url}", flush=True)
        print(
            f"Server certificate SHA-256: {certificate_fingerprint(sim.certificate_der)}",
            flush=True,
        )
        trust = args.trust_dir if args.trust_dir is not None else "any client certificate"
        policies = "Basic256Sha256, Aes128_Sha256_RsaOaep, Aes256_Sha256_RsaPss"
        extra = " + None" if args.allow_none else ""
        print(f"Security: {policies}{extra}; trusted clients: {trust}", flush=True)
        await stop.wait()
    finally:
        await sim.stop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(signum)
    print("Stopped.", file=sys.stderr, flush=True)
    return 0


COMMAND = SimulatorCommand(
    name="opcua",
    help="a street-lighting cabinet controller served over OPC UA (secure endpoints)",
    configure=_configure,
    run=_run,
)
