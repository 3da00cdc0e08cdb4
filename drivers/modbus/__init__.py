"""Modbus TCP / RTU driver (entry point ``modbus``)."""

from .driver import ModbusDriver

__all__ = ["ModbusDriver"]
