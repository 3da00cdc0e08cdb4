"""Shared set-up for the OPC UA driver tests: the cabinet simulator on a loopback port, the
gateway's client certificate, the server certificate pinned in the gateway's trust list, and a
gateway configuration with short timings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from agent.sdk import Reading
from drivers.opcua.security import TrustList, ensure_client_certificate
from firmware_sim.opcua import CabinetSimulator
from tests.e2e import PLAIN_COMMANDS, PLAIN_HUB, PROFILES

BUS = "plc"
CLIENT_URI = "urn:lampyre:test:gateway"
FAST_BUS = {
    "publishing_interval_s": 0.1,
    "keepalive_s": 0.5,
    "request_timeout_s": 1.0,
    "session_timeout_s": 10.0,
}
"""Timings that make recovery tests take seconds: a keep-alive every 0.5 s, a dead subscription
declared after 2 x 0.5 + 1 s."""


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def write_config(
    directory: Path,
    endpoint: str,
    *,
    broker_port: int = 1,
    bus: dict[str, Any] | None = None,
    devices: dict[str, dict[str, Any]] | None = None,
    profile_dirs: Sequence[Path] = (),
    gateway: str = "cab-ua",
) -> Path:
    """A gateway configuration with one OPC UA bus to ``endpoint`` and, by default, the whole
    simulated cabinet: the controller and its two circuits."""
    bus_keys: dict[str, Any] = {"driver": "opcua", "endpoint": endpoint, **FAST_BUS, **(bus or {})}
    if devices is None:
        devices = {
            "cabinet": {"profile": "opcua-cabinet"},
            "circuit-1": {"profile": "opcua-cabinet-circuit", "params": {"circuit": "Circuit1"}},
            "circuit-2": {"profile": "opcua-cabinet-circuit", "params": {"circuit": "Circuit2"}},
        }
    dirs = ", ".join(toml_value(str(d)) for d in (*profile_dirs, PROFILES))
    lines = [
        "[gateway]",
        f'id = "{gateway}"',
        f"profile_dirs = [{dirs}]",
        "",
        "[hub]",
        'host = "127.0.0.1"',
        f"port = {broker_port}",
        "keepalive_s = 5",
        *PLAIN_HUB,
        "",
        "[buffer]",
        'path = "buffer.db"',
        "batch_max_delay_s = 0.1",
        "batch_max_readings = 200",
        "",
        *PLAIN_COMMANDS,
        f"[buses.{BUS}]",
        *(f"{key} = {toml_value(value)}" for key, value in bus_keys.items() if value is not None),
        "",
    ]
    for device_id, keys in devices.items():
        lines += [f"[devices.{device_id}]", f'bus = "{BUS}"', "poll_interval_s = 0.5"]
        lines += [f"{key} = {toml_value(value)}" for key, value in keys.items()]
        lines.append("")
    path = directory / "gateway.toml"
    path.write_text("\n".join(lines))
    return path


def client_files(directory: Path) -> tuple[Path, Path]:
    """The gateway's client certificate and key where the bus's defaults expect them."""
    return ensure_client_certificate(
        directory / "pki" / BUS / "client.der",
        directory / "pki" / BUS / "client-key.pem",
        application_uri=CLIENT_URI,
        common_name="Lampyre test gateway",
    )


def trust_server(directory: Path, sim: CabinetSimulator) -> None:
    TrustList(directory / "pki" / BUS / "trusted").add(
        x509.load_der_x509_certificate(sim.certificate_der)
    )


@asynccontextmanager
async def simulator(
    directory: Path, *, trusted: bool = True, **options: Any
) -> AsyncIterator[CabinetSimulator]:
    """A running cabinet simulator whose certificate the gateway in ``directory`` trusts."""
    sim = CabinetSimulator(directory / "sim", **options)
    await sim.start()
    try:
        await asyncio.to_thread(client_files, directory)
        if trusted:
            await asyncio.to_thread(trust_server, directory, sim)
        yield sim
    finally:
        await sim.stop()


class RecordingContext:
    """A DriverContext for driver-level tests: keeps what the driver emits and reports."""

    def __init__(self) -> None:
        import logging

        self.readings: list[Reading] = []
        self.events: list[tuple[str, str | None, dict[str, Any]]] = []
        self._logger = logging.getLogger("lampyre.bus.test")
        self.arrived = asyncio.Event()

    @property
    def logger(self) -> Any:
        return self._logger

    def emit(self, readings: Sequence[Reading]) -> None:
        self.readings.extend(readings)
        self.arrived.set()

    def event(self, kind: str, device: str | None, detail: Any) -> None:
        self.events.append((kind, device, dict(detail)))

    def device_silent(self, device: str, reason: str) -> None:
        self.events.append(("device_offline", device, {"reason": reason}))

    async def checkpoint(self) -> bool:
        return False

    def latest(self, device: str, point: str) -> Reading | None:
        for reading in reversed(self.readings):
            if reading.device == device and reading.point == point:
                return reading
        return None


@dataclass
class Waiter:
    """Polls a condition on the event loop until it holds."""

    timeout_s: float = 15.0

    async def until(self, condition: Any, what: str) -> None:
        async with asyncio.timeout(self.timeout_s):
            while not condition():
                await asyncio.sleep(0.02)
        del what
