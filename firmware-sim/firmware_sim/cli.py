"""``python -m firmware_sim <simulator> …``: one sub-command per simulator.

Simulators register explicitly in :data:`SIMULATORS` (no import side effects): a new one (DALI,
OPC UA, BLE) adds a module exposing a :class:`SimulatorCommand` and one line here.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SIMULATORS", "SimulatorCommand", "build_parser", "main"]


@dataclass(frozen=True)
class SimulatorCommand:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    """Adds the simulator's own options."""
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, int]]
    """Serves until cancelled (Ctrl-C, SIGTERM); returns the exit status."""


def _simulators() -> tuple[SimulatorCommand, ...]:
    from firmware_sim.ble.cli import COMMAND as BLE
    from firmware_sim.dali.cli import COMMAND as DALI
    from firmware_sim.modbus.cli import COMMAND as MODBUS
    from firmware_sim.opcua.cli import COMMAND as OPCUA

    return (MODBUS, DALI, OPCUA, BLE)


SIMULATORS: Callable[[], tuple[SimulatorCommand, ...]] = _simulators


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m firmware_sim",
        description="Wire-accurate device simulators for Lampyre (tests, demo, benches).",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    commands = parser.add_subparsers(dest="simulator", required=True, metavar="SIMULATOR")
    for command in SIMULATORS():
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        command.configure(sub)
        sub.set_defaults(_command=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command: SimulatorCommand = args._command
    try:
        return asyncio.run(command.run(args))
    except KeyboardInterrupt:
        return 0
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
