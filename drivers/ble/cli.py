"""``lampyre ble scan``: what is advertising around the gateway, for a technician.

Registered through the ``lampyre.cli`` entry-point group (``ble = "drivers.ble.cli:register"``).
Listens for ``--seconds`` on one adapter and prints, per address: the last RSSI, the name, the
recognised format and the decoded values (encrypted BTHome sensors with ``--key
ADDRESS=FILE`` or the ``bind_key_file`` of a configured device). With ``--config FILE --bus
ID`` it also says which configured device each address is, and which configured devices were
not heard. bleak is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from agent.sdk import ConfigTable, KeyFileError, LampyreError

from . import formats
from .formats import Advertisement, DecodeError, NotThisFormat
from .settings import normalise_address, parse_bus, parse_sensor

__all__ = ["Heard", "main", "register", "render"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    pass


@dataclass(slots=True)
class Heard:
    """What one address advertised during the scan."""

    address: str
    rssi: int | None = None
    name: str | None = None
    adverts: int = 0
    format: str | None = None
    values: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None
    device: str | None = None


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``ble`` and its ``scan`` subcommand to the ``lampyre`` command line."""
    parser = commands.add_parser(
        "ble",
        help="BLE tools: scan for sensors",
        description="Tools for BLE sensors. Scanning here runs beside the agent (BlueZ "
        "shares the adapter between scanners).",
    )
    build(parser)


def build(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="ble_command", metavar="ACTION", required=True)
    scan = sub.add_parser(
        "scan",
        help="list the sensors advertising nearby, with their decoded values",
        description="Listen for advertisements and list each address with its RSSI, its "
        "format and the values it sends.",
    )
    scan.add_argument("--adapter", default=None, help="Bluetooth adapter (default hci0)")
    scan.add_argument("--seconds", type=float, default=10.0, help="how long to listen")
    scan.add_argument(
        "--passive",
        action="store_true",
        help="scan passively (needs BlueZ >= 5.56 with --experimental)",
    )
    scan.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="ADDRESS=FILE",
        help="bind key file (mode 0600, 32 hex digits) of an encrypted BTHome sensor",
    )
    scan.add_argument("--config", metavar="FILE", help="gateway configuration")
    scan.add_argument("--bus", metavar="ID", help="BLE bus id in the configuration")
    scan.add_argument("--all", action="store_true", help="also list devices of no known format")
    scan.add_argument("--json", action="store_true", help="print JSON instead of a table")
    scan.set_defaults(handler=_scan_handler)


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """``lampyre ble …`` on its own (for tests and scripts)."""
    parser = argparse.ArgumentParser(prog="lampyre ble")
    build(parser)
    args = parser.parse_args(argv)
    handler: Callable[..., int] = args.handler
    return handler(args, out=out)


# ------------------------------------------------------------------------------ set-up


@dataclass(frozen=True, slots=True)
class _Plan:
    adapter: str
    passive: bool
    keys: Mapping[str, bytes]
    devices: Mapping[str, str]
    """Address → configured device id."""


def _from_config(path: Path, bus_id: str) -> tuple[str, dict[str, str], dict[str, Path]]:
    try:
        with path.open("rb") as file:
            root: dict[str, Any] = tomllib.load(file)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: {exc}") from None
    buses = root.get("buses")
    bus = buses.get(bus_id) if isinstance(buses, dict) else None
    if not isinstance(bus, dict) or bus.get("driver") != "ble":
        raise UsageError(f"{path}: no BLE bus {bus_id!r}")
    options = {k: v for k, v in bus.items() if k != "driver"}
    adapter = parse_bus(ConfigTable(options, file=str(path))).adapter
    devices: dict[str, str] = {}
    keys: dict[str, Path] = {}
    raw_devices = root.get("devices")
    for device_id, table in raw_devices.items() if isinstance(raw_devices, dict) else []:
        if not isinstance(table, dict) or table.get("bus") != bus_id:
            continue
        options = {k: v for k, v in table.items() if k not in ("bus", "profile", "poll_interval_s")}
        sensor = parse_sensor(ConfigTable(options, file=str(path)))
        devices[sensor.address] = device_id
        if sensor.bind_key_file is not None:
            keys[sensor.address] = sensor.bind_key_file
    return adapter, devices, keys


def _plan(args: argparse.Namespace) -> _Plan:
    from .driver import load_bind_key

    adapter = "hci0"
    devices: dict[str, str] = {}
    key_files: dict[str, Path] = {}
    if args.config or args.bus:
        if not (args.config and args.bus):
            raise UsageError("give both --config FILE and --bus ID")
        try:
            adapter, devices, key_files = _from_config(Path(args.config), args.bus)
        except LampyreError as exc:
            raise UsageError(str(exc)) from None
    for item in args.key:
        address, sep, file = item.partition("=")
        if not sep or not file:
            raise UsageError(f"--key: expected ADDRESS=FILE, got {item!r}")
        key_files[normalise_address(address)] = Path(file)
    keys: dict[str, bytes] = {}
    for address, path in key_files.items():
        try:
            keys[address] = load_bind_key(path)
        except KeyFileError as exc:
            raise UsageError(str(exc)) from None
    return _Plan(args.adapter or adapter, args.passive, keys, devices)


# ------------------------------------------------------------------------------ scanning


def _observe(heard: dict[str, Heard], plan: _Plan, advert: Advertisement) -> None:
    entry = heard.setdefault(
        advert.address, Heard(advert.address, device=plan.devices.get(advert.address))
    )
    entry.adverts += 1
    entry.rssi = advert.rssi
    entry.name = advert.local_name or entry.name
    kind = formats.recognise(advert)
    if kind is None:
        return
    entry.format = kind
    try:
        decoded = formats.decode(advert, bthome_key=plan.keys.get(advert.address))
    except (NotThisFormat, DecodeError) as exc:
        entry.problem = str(exc) or type(exc).__name__
        return
    entry.problem = None
    entry.format = decoded.format
    entry.values.update(decoded.values)


async def scan(plan: _Plan, seconds: float) -> dict[str, Heard]:
    """Listen for ``seconds`` and return what each address sent."""
    from bleak import BleakScanner
    from bleak.args.bluez import BlueZScannerArgs
    from bleak.backends.device import BLEDevice
    from bleak.backends.scanner import AdvertisementData

    from .driver import PASSIVE_PATTERNS

    heard: dict[str, Heard] = {}

    def on_advert(device: BLEDevice, data: AdvertisementData) -> None:
        advert = Advertisement(
            address=device.address.upper(),
            rssi=data.rssi,
            local_name=data.local_name,
            manufacturer_data=data.manufacturer_data,
            service_data=data.service_data,
        )
        _observe(heard, plan, advert)

    bluez: BlueZScannerArgs = {"adapter": plan.adapter}
    if plan.passive:
        bluez["or_patterns"] = list(PASSIVE_PATTERNS)
    scanner = BleakScanner(
        on_advert, scanning_mode="passive" if plan.passive else "active", bluez=bluez
    )
    await scanner.start()
    try:
        await asyncio.sleep(seconds)
    finally:
        await scanner.stop()
    return heard


# ------------------------------------------------------------------------------ output


def _value_text(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def render(
    heard: Mapping[str, Heard], plan_devices: Mapping[str, str], *, show_all: bool
) -> list[str]:
    """The table a technician reads: strongest signal first, then what was not heard."""
    rows = sorted(
        (h for h in heard.values() if show_all or h.format is not None),
        key=lambda h: -(h.rssi if h.rssi is not None else -999),
    )
    lines = [f"{'ADDRESS':<17}  {'RSSI':>4}  {'FORMAT':<8}  {'DEVICE':<14}  VALUES"]
    for h in rows:
        if h.problem is not None:
            values = f"({h.problem})"
        elif h.values:
            values = " ".join(
                f"{name}={_value_text(v)}{'' if v is None else formats.quantity_unit(name) or ''}"
                for name, v in sorted(h.values.items())
            )
        else:
            values = f"(name {h.name!r})" if h.name else "(no known format)"
        rssi = "" if h.rssi is None else str(h.rssi)
        lines.append(
            f"{h.address:<17}  {rssi:>4}  {h.format or '-':<8}  {h.device or '-':<14}  {values}"
        )
    missing = sorted(device for address, device in plan_devices.items() if address not in heard)
    if missing:
        lines.append(f"configured but not heard: {', '.join(missing)}")
    return lines


def _scan_handler(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        plan = _plan(args)
    except UsageError as exc:
        print(f"lampyre ble scan: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        heard = asyncio.run(scan(plan, args.seconds))
    except Exception as exc:  # bleak raises several types; none must end in a traceback
        print(
            f"lampyre ble scan: cannot scan on {plan.adapter}: {exc or type(exc).__name__}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if args.json:
        body = [
            {
                "address": h.address,
                "rssi": h.rssi,
                "name": h.name,
                "format": h.format,
                "device": h.device,
                "adverts": h.adverts,
                "values": h.values,
                "problem": h.problem,
            }
            for h in heard.values()
            if args.all or h.format is not None
        ]
        print(json.dumps(body, indent=2, ensure_ascii=False), file=out)
    else:
        for line in render(heard, plan.devices, show_all=args.all):
            print(line, file=out)
    return EXIT_OK
