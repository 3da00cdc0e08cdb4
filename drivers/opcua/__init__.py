"""OPC UA client driver for cabinet controllers (entry point ``opcua``, asyncua): the bus,
device and point keys (``settings``), opening a secure session (``session``), the client
certificate and the server trust list (``security``), the driver with its subscription
watchdog (``driver``) and the ``lampyre opcua`` tools (``cli``)."""

from .driver import OpcUaDriver

__all__ = ["OpcUaDriver"]
