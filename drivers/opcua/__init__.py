"""OPC UA client driver for cabinet controllers (entry point ``opcua``, asyncua): the bus,
device and point keys (``settings``), opening a secure session (``session``), the client
certificate and the server trust list (``security``), the driver with its subscription
watchdog (``driver``) and the ``lampyre opcua`` tools (``cli``).

The driver class is imported on first use: asyncua takes about a second to import on a small
gateway, and the ``lampyre`` command line loads this package for its ``opcua`` tools even when
no OPC UA bus is configured."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .driver import OpcUaDriver

__all__ = ["OpcUaDriver"]


def __getattr__(name: str) -> Any:
    if name == "OpcUaDriver":
        from .driver import OpcUaDriver

        return OpcUaDriver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
