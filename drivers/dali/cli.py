"""``lampyre dali scan`` and ``lampyre dali commission``: field tools for a DALI line.

Registered through the ``lampyre.cli`` entry-point group (``dali = "drivers.dali.cli:register"``).
The line is named either by a gateway configuration and a bus id (``--config FILE --bus ID``,
the interface and port come from the bus table) or directly (``--interface NAME --device
PATH``). Stop the agent first: the serial port carries one master.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from agent.sdk import LampyreError

from .commissioning import CommissionReport, GearInfo, commission, scan
from .interface import UnknownInterface, available_interfaces, load_interface

__all__ = ["main", "register"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


@dataclass(frozen=True, slots=True)
class Target:
    interface: str
    device: str
    baudrate: int | None
    groups: dict[int, tuple[int, ...]] | None = None
    """Short address → configured groups (from the configuration only)."""


class UsageError(Exception):
    pass


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``dali`` and its subcommands to the ``lampyre`` command line."""
    parser = commands.add_parser(
        "dali",
        help="DALI line tools: scan, commission",
        description="Tools for a DALI line behind a serial DALI interface. Stop the agent "
        "using the port first.",
    )
    _build(parser)


def _build(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dali_command", metavar="ACTION", required=True)
    scan_parser = sub.add_parser("scan", help="list the control gear with a short address")
    _target_options(scan_parser)
    scan_parser.add_argument(
        "--no-banks", action="store_true", help="skip memory banks 0/1 (GTIN, luminaire data)"
    )
    scan_parser.set_defaults(handler=_scan_handler)
    com = sub.add_parser(
        "commission",
        help="give short addresses to gear that have none (addressed gear are left alone)",
    )
    _target_options(com)
    com.add_argument("--start-address", type=int, default=0, help="lowest address to give")
    com.add_argument(
        "--apply-groups",
        action="store_true",
        help="then set each configured device's DALI groups (needs --config)",
    )
    com.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    com.set_defaults(handler=_commission_handler)


def _target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="gateway configuration")
    parser.add_argument("--bus", metavar="ID", help="DALI bus id in the configuration")
    parser.add_argument(
        "--interface", metavar="NAME", help=f"interface ({', '.join(available_interfaces())})"
    )
    parser.add_argument("--device", metavar="PATH", help="serial port of the interface")
    parser.add_argument("--baudrate", type=int, default=None)


def main(argv: Sequence[str] | None = None, *, stdin: TextIO | None = None) -> int:
    """``lampyre dali …`` on its own (for tests and scripts)."""
    parser = argparse.ArgumentParser(prog="lampyre dali")
    _build(parser)
    args = parser.parse_args(argv)
    handler: Callable[..., int] = args.handler
    return handler(args, stdin=stdin)


def _target(args: argparse.Namespace) -> Target:
    if args.config:
        if not args.bus or args.interface or args.device:
            raise UsageError("--config needs --bus ID (and neither --interface nor --device)")
        return _target_from_config(args.config, args.bus)
    if not args.interface or not args.device:
        raise UsageError("name the line: --config FILE --bus ID, or --interface NAME --device PATH")
    try:
        load_interface(args.interface)
    except UnknownInterface as exc:
        raise UsageError(str(exc)) from None
    return Target(args.interface, args.device, args.baudrate)


def _target_from_config(path: str, bus_id: str) -> Target:
    from agent.config import load_config
    from agent.registry import available_drivers, load_driver

    from .driver import DaliDriver, parse_bus, parse_gear

    drivers: dict[str, Any] = {}
    for name in available_drivers():
        try:
            drivers[name] = load_driver(name)
        except Exception:  # noqa: S112 - a broken third-party driver only matters to its buses
            continue
    drivers["dali"] = DaliDriver
    try:
        config = load_config(path, drivers)
    except (OSError, LampyreError) as exc:
        raise UsageError(f"{exc}") from None
    bus = config.buses.get(bus_id)
    if bus is None:
        raise UsageError(f"{path}: no bus {bus_id!r} (buses: {', '.join(config.buses)})")
    if bus.driver != DaliDriver.name:
        raise UsageError(f"bus {bus_id!r} uses the {bus.driver!r} driver, not DALI")
    settings = parse_bus(bus.options)
    gear = {d.id: parse_gear(d.options) for d in config.devices.values() if d.bus == bus_id}
    return Target(
        settings.interface,
        settings.device,
        settings.baudrate,
        groups={g.address: tuple(sorted(g.groups)) for g in gear.values()},
    )


def _scan_handler(args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    try:
        target = _target(args)
    except UsageError as exc:
        print(f"lampyre dali scan: {exc}", file=sys.stderr)
        return EXIT_USAGE

    async def run() -> list[GearInfo]:
        interface = load_interface(target.interface)(target.device, baudrate=target.baudrate)
        async with interface:
            return await scan(interface, banks=not args.no_banks)

    try:
        found = asyncio.run(run())
    except LampyreError as exc:
        print(f"lampyre dali scan: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(format_scan(found))
    return EXIT_OK


def format_scan(found: Sequence[GearInfo]) -> str:
    """The scan as a table, one gear per line."""
    lines = [f"{'addr':>4}  {'type':<6} {'groups':<14} {'level':>7}  {'gtin':<14} {'fw':<5} ident"]
    for gear in found:
        level = "MASK" if gear.level_percent is None else f"{gear.level_percent:.1f}%"
        lines.append(
            f"{gear.address:>4}  {','.join(map(str, gear.device_types)) or '-':<6} "
            f"{','.join(map(str, sorted(gear.groups))) or '-':<14} {level:>7}  "
            f"{'-' if gear.gtin is None else str(gear.gtin):<14} {gear.firmware or '-':<5} "
            f"{'-' if gear.identification is None else f'{gear.identification:X}'}"
        )
    lines.append(f"{len(found)} gear with a short address")
    return "\n".join(lines)


def _commission_handler(args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    try:
        target = _target(args)
        if args.apply_groups and target.groups is None:
            raise UsageError("--apply-groups needs --config (the groups come from it)")
        if not 0 <= args.start_address <= 63:
            raise UsageError("--start-address must be 0..63")
    except UsageError as exc:
        print(f"lampyre dali commission: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not args.yes:
        print(
            f"Give short addresses to the unaddressed DALI gear on {target.device} "
            f"({target.interface})? Addressed gear are left alone. [y/N] ",
            end="",
            flush=True,
        )
        answer = (stdin or sys.stdin).readline().strip().lower()
        if answer not in ("y", "yes"):
            print("Nothing done.")
            return EXIT_FAILED

    async def run() -> CommissionReport:
        interface = load_interface(target.interface)(target.device, baudrate=target.baudrate)
        async with interface:
            return await commission(
                interface,
                start_address=args.start_address,
                groups=target.groups if args.apply_groups else None,
                progress=lambda text: print(f"  {text}", flush=True),
            )

    try:
        report = asyncio.run(run())
    except LampyreError as exc:
        print(f"lampyre dali commission: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(format_report(report))
    return EXIT_FAILED if report.problems else EXIT_OK


def format_report(report: CommissionReport) -> str:
    lines = [
        f"Already addressed: {', '.join(map(str, report.already_addressed)) or 'none'}",
        f"Programmed {len(report.programmed)} gear:",
    ]
    lines += [
        f"  random {random:06X} -> short address {short}" for random, short in report.programmed
    ]
    for change in report.groups:
        lines.append(
            f"  short address {change.address}: groups +{list(change.added)} "
            f"-{list(change.removed)} {'verified' if change.verified else 'NOT verified'}"
        )
    lines += [f"Problem: {problem}" for problem in report.problems]
    return "\n".join(lines)
