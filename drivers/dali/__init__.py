"""DALI (IEC 62386) over serial DALI interfaces (entry point ``dali``): the protocol codec
(``codec``), memory-bank read plans (``memory``), the interface transports (``interface``,
``interfaces``), profile point sources (``points``), the driver (``driver``), commissioning
(``commissioning``) and the ``lampyre dali`` tools (``cli``)."""

from .driver import DaliDriver

__all__ = ["DaliDriver"]
