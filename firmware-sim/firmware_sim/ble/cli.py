"""``python -m firmware_sim ble``: simulated BLE sensors advertising through a mock BlueZ on a
private D-Bus system bus, for the demo, benches and trying the agent's BLE driver without a
radio."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from pathlib import Path

from firmware_sim.ble.bluez import MockBluez, MockBluezError
from firmware_sim.ble.sensors import (
    DEFAULT_KINDS,
    KINDS,
    TICK_S,
    EncryptedBthomeSensor,
    SensorFleet,
    SimulatedSensor,
    make_sensors,
)
from firmware_sim.cli import SimulatorCommand

__all__ = ["COMMAND"]

MAX_SENSORS = 5000
READY_LINE = "Advertising; Ctrl-C stops."
"""Printed after the configuration, when the sensors start advertising."""
STATUS_INTERVAL_S = 10.0
"""How often the injection figures are printed."""


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(kind.strip() for kind in text.split(",") if kind.strip())
    unknown = [kind for kind in kinds if kind not in KINDS]
    if not kinds or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown kind(s) {unknown or text!r}; choose from {', '.join(KINDS)}"
        )
    return kinds


def _sensor_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= count <= MAX_SENSORS:
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_SENSORS} sensors, got {count}")
    return count


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sensors",
        type=_sensor_count,
        default=len(DEFAULT_KINDS),
        metavar="N",
        help=f"number of sensors, taking the kinds in turn (default {len(DEFAULT_KINDS)})",
    )
    parser.add_argument(
        "--interval-s",
        type=_positive_seconds,
        default=1.0,
        metavar="S",
        help="seconds between two advertisements of a sensor (default 1.0)",
    )
    parser.add_argument(
        "--kinds",
        type=_kinds,
        default=DEFAULT_KINDS,
        metavar="KIND,...",
        help=f"sensor kinds (default {','.join(DEFAULT_KINDS)}; also: "
        f"{','.join(k for k in KINDS if k not in DEFAULT_KINDS)})",
    )
    parser.add_argument("--adapter", default="hci0", help="adapter name (default hci0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of values and bind keys")
    parser.add_argument(
        "--key-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="write each encrypted sensor's bind key to DIR/<address>.key (mode 0600) and "
        "name it as bind_key_file in the printed configuration",
    )


def _configuration(sensors: list[SimulatedSensor], bus: str, key_dir: Path | None) -> str:
    """A TOML fragment with one ``[devices.…]`` table per sensor."""
    lines = []
    for sensor in sensors:
        described = sensor.describe()
        name = f"sim-{sensor.kind}-{sensor.address[-5:].replace(':', '').lower()}"
        lines += [
            f"[devices.{name}]",
            f'bus = "{bus}"',
            f'address = "{described["address"]}"',
            f'format = "{described["format"]}"    # simulated kind: {sensor.kind}',
        ]
        if "bind_key" in described:
            if key_dir is not None:
                lines.append(f'bind_key_file = "{_key_file(key_dir, sensor)}"')
            lines.append(f"# bind key: {described['bind_key']}")
        lines.append("")
    return "\n".join(lines)


def _key_file(key_dir: Path, sensor: SimulatedSensor) -> Path:
    return key_dir / f"{sensor.address.replace(':', '').lower()}.key"


def _write_keys(key_dir: Path, sensors: list[SimulatedSensor]) -> None:
    key_dir.mkdir(parents=True, exist_ok=True)
    for sensor in sensors:
        if isinstance(sensor, EncryptedBthomeSensor):
            path = _key_file(key_dir, sensor)
            path.touch(mode=0o600, exist_ok=True)
            path.chmod(0o600)
            path.write_text(sensor.bind_key.hex() + "\n", encoding="ascii")


async def _run(args: argparse.Namespace) -> int:
    sensors = make_sensors(
        args.sensors,
        args.kinds,
        interval_s=args.interval_s,
        seed=args.seed,
        start_at=time.monotonic(),
    )
    if args.key_dir is not None:
        await asyncio.to_thread(_write_keys, args.key_dir, sensors)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    bluez = MockBluez(adapters=(args.adapter,))
    try:
        try:
            await bluez.start()
        except MockBluezError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 1
        print(f"DBUS_SYSTEM_BUS_ADDRESS={bluez.address}", flush=True)
        print(
            f"Adapter: {args.adapter}; {len(sensors)} sensors, one advert each every "
            f"{args.interval_s:g} s",
            flush=True,
        )
        print(_configuration(sensors, "ble", args.key_dir), flush=True)
        print(READY_LINE, flush=True)
        fleet = SensorFleet(bluez, sensors, adapter=args.adapter)
        async with asyncio.TaskGroup() as group:
            runner = group.create_task(fleet.run(tick_s=min(TICK_S, args.interval_s)))
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STATUS_INTERVAL_S):
                        await stop.wait()
                stats = fleet.stats
                print(
                    f"Injected {stats.adverts} adverts ({stats.rate_per_s(time.monotonic()):.0f}"
                    f"/s) in {stats.batches} batches; injector capacity "
                    f"{stats.capacity_per_s:.0f} adverts/s",
                    flush=True,
                )
                if runner.done():
                    break
            runner.cancel()
    finally:
        await bluez.stop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(signum)
    print("Stopped.", file=sys.stderr, flush=True)
    return 0


COMMAND = SimulatorCommand(
    name="ble",
    help="BLE air-quality sensors advertising through a mock BlueZ on a private D-Bus bus",
    configure=_configure,
    run=_run,
)
