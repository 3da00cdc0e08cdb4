"""What a scenario may know or change of the equipment, besides what the hub shows.

A :class:`Target` brings up the equipment a gateway configuration describes and reports what it
can do: a :class:`SimulatedTarget` runs the Modbus simulators in-process, can read ground truth
(the set point a lamp really holds, how many writes it took) and inject faults; a
:class:`BenchTarget` is real equipment wired to the bench, which the runner can only observe
through the agent, and which it commands only when the operator allowed it.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import logging
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from agent.sdk import BusSpec, DeviceSpec, LampyreError

if TYPE_CHECKING:
    from agent.config import GatewayConfig
    from firmware_sim.modbus import LampController, ModbusDevice, ModbusSimulator

__all__ = [
    "BenchTarget",
    "Fault",
    "FaultInjectionUnsupported",
    "SimulatedTarget",
    "Target",
    "TargetError",
]

log = logging.getLogger(__name__)

METER_PROFILES = frozenset({"sdm630"})
"""Profiles the simulated target serves with an energy meter; every other device is a lamp."""


class TargetError(LampyreError):
    """The target cannot be brought up for this configuration."""


class FaultInjectionUnsupported(LampyreError):
    """The target cannot inject this fault (real equipment, or a device it does not simulate)."""


class Fault(enum.Enum):
    LAMP_FAILURE = "lamp_failure"
    """The lamp burns out: the controller answers, reports a failure and a zero level."""
    NO_ANSWER = "no_answer"
    """The device neither answers nor executes anything, as if unplugged."""


class Target(ABC):
    """The equipment under test. ``start`` returns the configuration the agent must use (the
    simulated target points the buses at its simulators); ``stop`` is idempotent."""

    name: str = "?"
    can_inject_faults: bool = False
    commands_allowed: bool = False
    """Whether scenarios may send commands that move the equipment."""

    @abstractmethod
    async def start(self, config: GatewayConfig) -> GatewayConfig: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    def describe(self) -> str:
        """One line for the operator: what equipment, where."""

    def setpoint(self, device_id: str) -> float | None:
        """The level the device really holds as its set point, when the target can know it."""
        return None

    def write_count(self, device_id: str) -> int | None:
        """How many writes the device has applied so far, when the target can know it."""
        return None

    async def inject(self, device_id: str, fault: Fault) -> None:
        raise FaultInjectionUnsupported(f"the {self.name} target cannot inject faults")

    async def clear(self, device_id: str, fault: Fault) -> None:
        raise FaultInjectionUnsupported(f"the {self.name} target cannot inject faults")


# --------------------------------------------------------------------------------------------
# Simulated equipment
# --------------------------------------------------------------------------------------------


class SimulatedTarget(Target):
    """Modbus simulators in this process, one per bus of the configuration: an energy meter
    for each device whose profile is in :data:`METER_PROFILES`, a lamp controller for every
    other device, at the device's unit id. TCP buses listen on loopback (the configured port
    when it is free, else any free port); RTU buses get a pseudo-terminal. The buses of the
    returned configuration point at them."""

    name = "sim"
    can_inject_faults = True
    commands_allowed = True

    def __init__(self) -> None:
        self._simulators: list[ModbusSimulator] = []
        self._devices: dict[str, ModbusDevice] = {}
        self._where: list[str] = []

    async def start(self, config: GatewayConfig) -> GatewayConfig:
        from firmware_sim.modbus import EnergyMeter, LampController, ModbusSimulator

        buses = dict(config.buses)
        try:
            for bus in config.buses.values():
                if bus.driver != "modbus":
                    raise TargetError(
                        f"bus {bus.id}: no simulator for driver {bus.driver!r} (only modbus)"
                    )
                devices = [d for d in config.devices.values() if d.bus == bus.id]
                lamps = {
                    _unit_of(d): LampController()
                    for d in devices
                    if d.profile.name not in METER_PROFILES
                }
                # A meter sees the lamps of its line, so its power follows their dimming.
                meters = {
                    _unit_of(d): EnergyMeter(lamps=list(lamps.values()))
                    for d in devices
                    if d.profile.name in METER_PROFILES
                }
                simulator = ModbusSimulator({**lamps, **meters})
                self._simulators.append(simulator)
                for device in devices:
                    self._devices[device.id] = simulator.unit(_unit_of(device))
                units = ",".join(str(u) for u in sorted({**lamps, **meters}))
                if str(bus.options.get("transport", "tcp")) == "rtu":
                    pty = await simulator.start_rtu()
                    buses[bus.id] = _with_options(bus, device=pty)
                    self._where.append(f"{bus.id}: Modbus RTU on {pty} (units {units})")
                else:
                    port = await _listen(simulator, bus)
                    buses[bus.id] = _with_options(bus, host="127.0.0.1", port=port)
                    self._where.append(f"{bus.id}: Modbus TCP on 127.0.0.1:{port} (units {units})")
        except BaseException:
            await self.stop()
            raise
        return dataclasses.replace(config, buses=buses)

    async def stop(self) -> None:
        simulators, self._simulators = self._simulators, []
        for simulator in simulators:
            await simulator.stop()

    def describe(self) -> str:
        return "simulated equipment: " + "; ".join(self._where)

    def device(self, device_id: str) -> ModbusDevice:
        """The simulated device behind ``device_id`` (KeyError when there is none)."""
        return self._devices[device_id]

    def _lamp(self, device_id: str) -> LampController | None:
        from firmware_sim.modbus import LampController

        device = self._devices.get(device_id)
        return device if isinstance(device, LampController) else None

    def setpoint(self, device_id: str) -> float | None:
        lamp = self._lamp(device_id)
        return None if lamp is None else float(lamp.setpoint)

    def write_count(self, device_id: str) -> int | None:
        device = self._devices.get(device_id)
        if device is None:
            return None
        return sum(device.writes.values()) + sum(device.coil_writes.values())

    async def inject(self, device_id: str, fault: Fault) -> None:
        self._apply(device_id, fault, on=True)

    async def clear(self, device_id: str, fault: Fault) -> None:
        self._apply(device_id, fault, on=False)

    def _apply(self, device_id: str, fault: Fault, *, on: bool) -> None:
        if fault is Fault.NO_ANSWER:
            device = self._devices.get(device_id)
            if device is None:
                raise FaultInjectionUnsupported(f"{device_id} is not simulated")
            device.faults.no_answer = on
            return
        lamp = self._lamp(device_id)
        if lamp is None:
            raise FaultInjectionUnsupported(f"{device_id} is not a simulated lamp controller")
        if on:
            lamp.fail_lamp()
        else:
            lamp.repair_lamp()


def _unit_of(device: DeviceSpec) -> int:
    unit = device.options.get("unit")
    if not isinstance(unit, int) or not 1 <= unit <= 247:
        raise TargetError(f"device {device.id}: the simulator serves unit ids 1..247, got {unit!r}")
    return unit


async def _listen(simulator: ModbusSimulator, bus: BusSpec) -> int:
    host = str(bus.options.get("host", "127.0.0.1"))
    wanted = bus.options.get("port", 502)
    if _is_loopback(host) and isinstance(wanted, int) and wanted >= 1024:
        try:
            return await simulator.start_tcp("127.0.0.1", wanted)
        except OSError:
            log.info("bus %s: port %s is taken; the simulator uses a free port", bus.id, wanted)
    return await simulator.start_tcp("127.0.0.1", 0)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _with_options(bus: BusSpec, **changes: object) -> BusSpec:
    options = dataclasses.replace(bus.options, data={**bus.options.data, **changes})
    return dataclasses.replace(bus, options=options)


# --------------------------------------------------------------------------------------------
# Real equipment
# --------------------------------------------------------------------------------------------


class BenchTarget(Target):
    """Real equipment on the buses of the configuration, used as configured. Nothing can be
    injected; commands that move lamps are sent only with ``allow_commands``."""

    name = "bench"
    can_inject_faults = False

    def __init__(self, *, allow_commands: bool = False) -> None:
        self.commands_allowed = allow_commands
        self._where: list[str] = []

    async def start(self, config: GatewayConfig) -> GatewayConfig:
        self._where = []
        for bus in config.buses.values():
            options = bus.options
            if str(options.get("transport", "tcp")) == "rtu":
                link = f"RTU {options.get('device')}"
            elif "host" in options:
                link = f"TCP {options.get('host')}:{options.get('port', 502)}"
            else:
                link = "as configured"
            count = sum(1 for d in config.devices.values() if d.bus == bus.id)
            self._where.append(f"{bus.id}: {bus.driver} {link} ({count} devices)")
        return config

    async def stop(self) -> None:
        return None

    def describe(self) -> str:
        commands = "commands allowed" if self.commands_allowed else "no commands sent"
        return f"real equipment ({commands}): " + "; ".join(self._where)
