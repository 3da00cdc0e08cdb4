"""Wire-accurate Modbus TCP and RTU simulators of the equipment Lampyre talks to.

Typical use in a test::

    lamp = LampController()
    sim = ModbusSimulator({1: lamp, 10: EnergyMeter(lamps=[lamp])})
    port = await sim.start_tcp("127.0.0.1", 0)
    ...
    await sim.stop()
"""

from firmware_sim.modbus.devices import (
    EnergyMeter,
    Faults,
    LampController,
    MemoryDevice,
    ModbusDevice,
    from_registers,
    to_registers,
)
from firmware_sim.modbus.protocol import ExceptionCode, FunctionCode, ModbusException
from firmware_sim.modbus.server import ModbusSimulator

__all__ = [
    "EnergyMeter",
    "ExceptionCode",
    "Faults",
    "FunctionCode",
    "LampController",
    "MemoryDevice",
    "ModbusDevice",
    "ModbusException",
    "ModbusSimulator",
    "from_registers",
    "to_registers",
]
