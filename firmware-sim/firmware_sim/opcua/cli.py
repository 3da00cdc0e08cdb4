"""``python -m firmware_sim opcua``: a street-lighting cabinet controller served over OPC UA."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from firmware_sim.cli import SimulatorCommand
from firmware_sim.opcua.server import (
    MAX_BENCH_POINTS,
    CabinetSimulator,
    certificate_fingerprint,
    certificate_subject,
)

__all__ = ["COMMAND"]

DEFAULT_PORT = 4840
DEFAULT_CERT_DIR = Path("opcua-sim-pki")


def _user(text: str) -> tuple[str, str]:
    name, sep, password = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME:PASSWORD, got {text!r}")
    return name, password


def _bench_points(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= count <= MAX_BENCH_POINTS:
        raise argparse.ArgumentTypeError(f"expected 0 to {MAX_BENCH_POINTS}, got {count}")
    return count


def _read_certificate(path: Path) -> bytes:
    """A user certificate file as DER (the file may be DER or PEM)."""
    data = path.read_bytes()
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
    return data


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
    parser.add_argument(
        "--user",
        type=_user,
        action="append",
        metavar="NAME:PASSWORD",
        help="accept this user name and password (repeatable; a test tool: the password shows "
        "in the process list). With --user or --user-cert only the listed identities are "
        "accepted; with neither, any user name and any user certificate are",
    )
    parser.add_argument(
        "--user-cert",
        type=Path,
        action="append",
        metavar="FILE",
        help="accept this user certificate, DER or PEM (repeatable)",
    )
    parser.add_argument("--no-anonymous", action="store_true", help="refuse anonymous sessions")
    parser.add_argument(
        "--bench-points",
        type=_bench_points,
        default=0,
        metavar="N",
        help="add Cabinet.Bench.P0000… (N Double variables that all change every second)",
    )


async def _run(args: argparse.Namespace) -> int:
    user_certificates = None
    if args.user_cert:
        user_certificates = [
            await asyncio.to_thread(_read_certificate, path) for path in args.user_cert
        ]
    sim = CabinetSimulator(
        args.cert_dir,
        trust_dir=args.trust_dir,
        port=args.port,
        allow_none=args.allow_none,
        seed=args.seed,
        users=dict(args.user) if args.user else None,
        user_certificates=user_certificates,
        allow_anonymous=not args.no_anonymous,
        bench_points=args.bench_points,
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
        print(f"User identities: {_identities(sim)}", flush=True)
        if sim.bench_points:
            last = sim.bench_points - 1
            print(
                f"Bench points: {sim.bench_points} (ns=2;s=Cabinet.Bench.P0000 … P{last:04d}), "
                "all changing every second",
                flush=True,
            )
        await stop.wait()
    finally:
        await sim.stop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(signum)
    print("Stopped.", file=sys.stderr, flush=True)
    return 0


def _identities(sim: CabinetSimulator) -> str:
    if sim.users is None and sim.user_certificates is None:
        accepted = ["any user name", "any user certificate"]
    else:
        accepted = [f"user {name}" for name in sorted(sim.users or {})]
        accepted += [
            f"certificate {certificate_subject(der)}" for der in sim.user_certificates or ()
        ]
    if sim.allow_anonymous:
        accepted.insert(0, "anonymous")
    return ", ".join(accepted) or "none"


COMMAND = SimulatorCommand(
    name="opcua",
    help="a street-lighting cabinet controller served over OPC UA (secure endpoints)",
    configure=_configure,
    run=_run,
)
