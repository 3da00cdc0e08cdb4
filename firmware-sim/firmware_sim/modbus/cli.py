"""``python -m firmware_sim modbus``: serve simulated lamp controllers and meters."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from firmware_sim.cli import SimulatorCommand
from firmware_sim.modbus.devices import EnergyMeter, LampController, ModbusDevice
from firmware_sim.modbus.server import MAX_UNIT_ID, ModbusSimulator

__all__ = ["COMMAND", "parse_endpoint", "parse_units"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5020


def parse_units(text: str) -> list[int]:
    """``"1-4,7"`` → ``[1, 2, 3, 4, 7]``; an empty string is no unit."""
    units: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, _, last = part.partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a unit id or range: {part!r}") from None
        if not 1 <= low <= high <= MAX_UNIT_ID:
            raise argparse.ArgumentTypeError(f"unit ids must be 1..{MAX_UNIT_ID}: {part!r}")
        units.extend(range(low, high + 1))
    return units


def parse_endpoint(text: str) -> tuple[str, int]:
    """``"HOST:PORT"``, ``"PORT"`` (on loopback) or ``"[::1]:PORT"``."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = DEFAULT_HOST, text
    host = host.strip("[]") or DEFAULT_HOST
    try:
        port = int(port_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, got {port}")
    return host, port


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tcp",
        type=parse_endpoint,
        nargs="?",
        const=(DEFAULT_HOST, DEFAULT_PORT),
        metavar="[HOST:]PORT",
        help=f"serve Modbus TCP (default {DEFAULT_HOST}:{DEFAULT_PORT}; port 0 = any free port)",
    )
    parser.add_argument(
        "--rtu", action="store_true", help="serve Modbus RTU on a new pseudo-terminal"
    )
    parser.add_argument(
        "--lamps",
        type=parse_units,
        default=parse_units("1-4"),
        metavar="UNITS",
        help='unit ids of lamp controllers, e.g. "1-4" or "1,3,5-7" (default 1-4; "" for none)',
    )
    parser.add_argument(
        "--meter",
        type=parse_units,
        default=parse_units("10"),
        metavar="UNITS",
        help='unit id(s) of SDM630 energy meters, fed by all the lamps (default 10; "" for none)',
    )
    parser.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="simulated seconds per real second for counters and temperature (default 1)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the meters' noise")


def build_devices(args: argparse.Namespace) -> dict[int, ModbusDevice]:
    overlap = set(args.lamps) & set(args.meter)
    if overlap:
        raise ValueError(f"unit ids used twice: {sorted(overlap)}")
    lamps = {unit: LampController(time_scale=args.speed) for unit in args.lamps}
    devices: dict[int, ModbusDevice] = dict(lamps)
    for unit in args.meter:
        devices[unit] = EnergyMeter(
            lamps=list(lamps.values()), seed=args.seed, time_scale=args.speed
        )
    if not devices:
        raise ValueError("no units to serve (--lamps and --meter are both empty)")
    return devices


async def _run(args: argparse.Namespace) -> int:
    simulator = ModbusSimulator(build_devices(args))
    tcp = args.tcp
    if tcp is None and not args.rtu:
        tcp = (DEFAULT_HOST, DEFAULT_PORT)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with simulator:
            if tcp is not None:
                host, port = tcp
                bound = await simulator.start_tcp(host, port)
                shown = f"[{host}]" if ":" in host else host
                print(f"TCP listening: {shown}:{bound}", flush=True)
            if args.rtu:
                path = await simulator.start_rtu()
                print(f"RTU pty: {path}", flush=True)
            served = sorted(simulator.units.items())
            units = ", ".join(f"{unit}={type(device).__name__}" for unit, device in served)
            print(f"Units: {units}", flush=True)
            await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(signum)
    print("Stopped.", file=sys.stderr, flush=True)
    return 0


COMMAND = SimulatorCommand(
    name="modbus",
    help="Modbus TCP/RTU street-lamp controllers and SDM630 energy meters",
    configure=_configure,
    run=_run,
)
