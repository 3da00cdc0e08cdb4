"""A driver that answers instantly with synthetic values: the benchmarks' stand-in for equipment,
so they measure the agent's own cost (scheduler, pipeline, buffer, uplink), not a bus."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from agent.sdk import BusHealth, BusSpec, DeviceSpec, Driver, PointSpec, Reading, now_ms


class SyntheticDriver(Driver):
    name = "synthetic"
    one_transaction_at_a_time = False

    @classmethod
    def validate_bus(cls, bus: BusSpec) -> None:
        bus.options.check_keys(())

    @classmethod
    def validate_point(cls, point: PointSpec) -> None:
        point.options.check_keys(())

    @classmethod
    def validate_device(cls, device: DeviceSpec) -> None:
        device.options.check_keys(())

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._health = BusHealth()
        self._counter = 0

    async def connect(self) -> None:
        self._health.connected = True

    async def close(self) -> None:
        self._health.connected = False

    async def read(self, device: DeviceSpec, points: Sequence[PointSpec]) -> list[Reading]:
        self._counter += 1
        ts = now_ms()
        self._health.transactions += 1
        return [
            Reading(device.id, p.name, float(self._counter % 1000) / 10, p.unit, ts) for p in points
        ]

    async def write(
        self,
        device: DeviceSpec,
        point: PointSpec,
        value: float | int | bool,
        *,
        fade_s: float | None = None,
    ) -> None:
        self._health.transactions += 1

    def health(self) -> BusHealth:
        return self._health


def write_synthetic_config(
    directory: Path,
    *,
    broker_port: int,
    devices: int,
    points: int,
    poll_interval_s: float,
    batch_max_readings: int = 200,
    max_inflight: int = 64,
    sealed: bool = False,
) -> Path:
    """A gateway with ``devices`` synthetic devices of ``points`` points each. ``sealed``: the
    production default (the caller puts the keys in ``directory/keys``); else plain JSON."""
    profiles = directory / "profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    profile = ["[profile]", 'name = "synthetic"', 'driver = "synthetic"', ""]
    for index in range(points):
        profile += [f"[points.p{index}]", 'unit = "W"', ""]
    (profiles / "synthetic.toml").write_text("\n".join(profile))
    lines = [
        "[gateway]",
        'id = "bench-gw"',
        f'profile_dirs = ["{profiles}"]',
        "",
        "[hub]",
        'host = "127.0.0.1"',
        f"port = {broker_port}",
        f"max_inflight = {max_inflight}",
        *([] if sealed else ['seal = "none"', "", "[commands]", "allow_unsigned = true"]),
        "",
        "[buffer]",
        'path = "buffer.db"',
        f"batch_max_readings = {batch_max_readings}",
        "batch_max_delay_s = 0.2",
        "max_bytes = 1073741824",
        "",
        "[buses.synthetic]",
        'driver = "synthetic"',
        "",
    ]
    for index in range(devices):
        lines += [
            f"[devices.d{index}]",
            'bus = "synthetic"',
            'profile = "synthetic"',
            f"poll_interval_s = {poll_interval_s}",
            "",
        ]
    path = directory / "bench.toml"
    path.write_text("\n".join(lines))
    return path
