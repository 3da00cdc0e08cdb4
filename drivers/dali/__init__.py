"""DALI (IEC 62386) over serial DALI interfaces: the protocol codec (``codec``), memory-bank
read plans (``memory``), the interface transports and the driver."""
