"""``python -m firmware_sim dali``: a simulated DALI line behind a serial DALI interface on a
pseudo-terminal."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from firmware_sim.cli import SimulatorCommand
from firmware_sim.dali.interfaces import EMULATORS
from firmware_sim.dali.line import DaliLine

__all__ = ["COMMAND"]

MAX_GEAR = 64


def _gear_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= count <= MAX_GEAR:
        raise argparse.ArgumentTypeError(f"a DALI line holds 1 to {MAX_GEAR} gear")
    return count


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--interface",
        choices=sorted(EMULATORS),
        default="foxtron",
        help="serial DALI interface protocol spoken on the pty (default foxtron)",
    )
    parser.add_argument(
        "--gear", type=_gear_count, default=24, help="control gear on the line (default 24)"
    )
    parser.add_argument(
        "--addressed",
        type=int,
        default=None,
        help="how many of them have short addresses 0..N-1 (default all; 0 for a new line)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random long addresses seed")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="DALI timing factor: 1.0 is real time, 0.1 ten times faster",
    )


async def _run(args: argparse.Namespace) -> int:
    addressed = args.gear if args.addressed is None else args.addressed
    line = DaliLine.random(
        args.gear, addressed=addressed, seed=args.seed, time_scale=args.time_scale
    )
    emulator = EMULATORS[args.interface](line)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        path = await emulator.start()
        print(f"DALI pty: {path}", flush=True)
        print(
            f"Line: {args.gear} gear ({addressed} addressed), interface {args.interface}, "
            f"time scale {args.time_scale:g}",
            flush=True,
        )
        await stop.wait()
    finally:
        await emulator.stop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(signum)
    print("Stopped.", file=sys.stderr, flush=True)
    return 0


COMMAND = SimulatorCommand(
    name="dali",
    help="a DALI line of control gear behind a Foxtron or SCI2 serial interface (pty)",
    configure=_configure,
    run=_run,
)
