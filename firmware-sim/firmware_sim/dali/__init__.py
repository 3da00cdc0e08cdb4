"""A simulated DALI line (IEC 62386) behind a pseudo-terminal: control gear on the line model
(``line``) and emulators of the serial DALI interfaces that reach it (``interfaces``), each
speaking its interface's byte protocol exactly so the agent's real serial code runs against it.

Typical use in a test::

    line = DaliLine.random(24, addressed=16, seed=7, time_scale=0.01)
    result = await line.transact(0x0BA0)          # QUERY ACTUAL LEVEL, short address 5
    result.answers                                # (254,)
    line.gear[3].fail_lamp()
"""

from firmware_sim.dali.gear import (
    DEVICE_TYPE_LED,
    MASK,
    YES,
    ControlGear,
    InitialisationState,
    LampFault,
    arc_power_percent,
)
from firmware_sim.dali.line import BusPower, DaliLine, LineRecord, LineResult

__all__ = [
    "DEVICE_TYPE_LED",
    "MASK",
    "YES",
    "BusPower",
    "ControlGear",
    "DaliLine",
    "InitialisationState",
    "LampFault",
    "LineRecord",
    "LineResult",
    "arc_power_percent",
]
