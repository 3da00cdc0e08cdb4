"""DALI (IEC 62386-102) forward frames, addresses, answers and the dimming curve. Pure, no I/O.

A 16-bit forward frame is ``address byte << 8 | data byte``. The address byte selects the
target and, in its lowest bit (the *selector* S), what the data byte means: S = 0 makes it a
direct arc power level (DAPC), S = 1 a command opcode. Odd address bytes 0xA1..0xC9 are not
addresses at all: they are the *special commands* every control gear hears (addressing, DTRs,
memory writes), and the data byte is their argument::

    0AAAAAAS  short address 0..63          100GGGGS  group 0..15
    1111110S  gear without short address   1111111S  broadcast
    101CCCC1 / 110CCCC1  special command CCCC, data byte = argument

Gear answer with one 8-bit backward frame or stay silent. A yes/no query is answered YES
(0xFF) or not at all (NO); when several gear answer at once the frames collide and the
interface reports a framing error, which for a yes/no query means "yes, from more than one"
(:func:`yes_no`). Numeric answers are 0..255, where 255 is often MASK ("no value").

Everything here is the subset of parts 102 (general gear) and 207 (DT6, LED) that Lampyre
uses; :class:`Command` carries what a transport needs to run a frame (send twice? expect an
answer? of which kind?), so the interfaces and the driver need no opcode tables of their own.
"""

from __future__ import annotations

import bisect
import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Final, Literal

__all__ = [
    "BROADCAST",
    "BROADCAST_UNADDRESSED",
    "DEVICE_TYPE_LED",
    "FADE_TIMES_S",
    "FRAME_BITS",
    "LEVEL_MAX",
    "LEVEL_MIN",
    "MASK",
    "YES",
    "Address",
    "AnswerKind",
    "Broadcast",
    "BroadcastUnaddressed",
    "Command",
    "DecodedFrame",
    "Dt6Opcode",
    "FrameKind",
    "Group",
    "LedFailureStatus",
    "Opcode",
    "Short",
    "Special",
    "Status",
    "address_byte",
    "arc_to_percent",
    "command",
    "compare",
    "dapc",
    "decode_frame",
    "describe",
    "dt6",
    "dtr0",
    "dtr1",
    "dtr2",
    "enable_device_type",
    "fade_time_code",
    "groups_from_answers",
    "initialise",
    "parse_address_byte",
    "percent_to_arc",
    "ping",
    "program_short_address",
    "query_failure_status",
    "query_short_address",
    "randomise",
    "search_address",
    "searchaddr_h",
    "searchaddr_l",
    "searchaddr_m",
    "terminate",
    "verify_short_address",
    "withdraw",
    "write_memory_location",
    "write_memory_location_no_reply",
    "yes_no",
]

FRAME_BITS: Final = 16
MASK: Final = 0xFF
"""DAPC level 255 ("stop fading, keep the level") and the "no value" answer of numeric queries."""
YES: Final = 0xFF
"""The backward frame of a YES answer."""
LEVEL_MIN: Final = 1
LEVEL_MAX: Final = 254

DEVICE_TYPE_LED: Final = 6


# --------------------------------------------------------------------------------------------
# Addresses
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value: int, low: int, high: int) -> None:
    # bool is an int to Python; True as a short address is always a caller's bug.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer {low}..{high}, got {value!r}")


@dataclass(frozen=True, slots=True)
class Short:
    """A short address 0..63: one control gear."""

    number: int

    def __post_init__(self) -> None:
        _check_int("short address", self.number, 0, 63)

    def __str__(self) -> str:
        return f"short {self.number}"


@dataclass(frozen=True, slots=True)
class Group:
    """A group address 0..15: every gear that is a member of the group."""

    number: int

    def __post_init__(self) -> None:
        _check_int("group", self.number, 0, 15)

    def __str__(self) -> str:
        return f"group {self.number}"


@dataclass(frozen=True, slots=True)
class Broadcast:
    """Every control gear on the line."""

    def __str__(self) -> str:
        return "broadcast"


@dataclass(frozen=True, slots=True)
class BroadcastUnaddressed:
    """Every control gear that has no short address (commissioning)."""

    def __str__(self) -> str:
        return "broadcast unaddressed"


Address = Short | Group | Broadcast | BroadcastUnaddressed
BROADCAST: Final = Broadcast()
BROADCAST_UNADDRESSED: Final = BroadcastUnaddressed()


def address_byte(address: Address, *, selector: bool) -> int:
    """The address byte of a forward frame to ``address``; ``selector`` False for DAPC (the
    data byte is a level), True for a command (the data byte is an opcode)."""
    s = int(selector)
    match address:
        case Short(number):
            return number << 1 | s
        case Group(number):
            return 0x80 | number << 1 | s
        case Broadcast():
            return 0xFE | s
        case BroadcastUnaddressed():
            return 0xFC | s
    raise TypeError(f"not a DALI address: {address!r}")


def parse_address_byte(byte: int) -> tuple[Address, bool] | None:
    """``(address, selector)`` of an address byte, or ``None`` for special commands (0xA0..0xCB)
    and the reserved bytes 0xCC..0xFB."""
    _check_int("address byte", byte, 0, 0xFF)
    selector = bool(byte & 1)
    if byte < 0x80:
        return Short(byte >> 1), selector
    if byte < 0xA0:
        return Group((byte >> 1) & 0x0F), selector
    if byte >= 0xFE:
        return BROADCAST, selector
    if byte >= 0xFC:
        return BROADCAST_UNADDRESSED, selector
    return None


# --------------------------------------------------------------------------------------------
# Opcodes
# --------------------------------------------------------------------------------------------


class AnswerKind(enum.Enum):
    """What a command's backward frame means, so a runner knows whether to wait for one."""

    NONE = "none"
    """No answer is expected."""
    YES_NO = "yes_no"
    """YES (0xFF) or silence; a collision means YES from several gear (:func:`yes_no`)."""
    NUMERIC = "numeric"
    """A number 0..255; 255 is MASK for level-like queries."""
    BITMAP = "bitmap"
    """Eight independent bits (:class:`Status`, :class:`LedFailureStatus`, group membership)."""


class Opcode(enum.IntEnum):
    """Standard (part 102) command opcodes, the data byte of a frame whose selector bit is 1.

    Members with a parameter (scene or group 0..15) hold the opcode of parameter 0; build
    frames with :func:`command`, which adds the parameter. :attr:`send_twice` says which are
    configuration commands, :attr:`answer` which are queries.
    """

    OFF = 0x00
    UP = 0x01
    DOWN = 0x02
    STEP_UP = 0x03
    STEP_DOWN = 0x04
    RECALL_MAX_LEVEL = 0x05
    RECALL_MIN_LEVEL = 0x06
    STEP_DOWN_AND_OFF = 0x07
    ON_AND_STEP_UP = 0x08
    ENABLE_DAPC_SEQUENCE = 0x09
    GO_TO_LAST_ACTIVE_LEVEL = 0x0A
    CONTINUOUS_UP = 0x0B
    CONTINUOUS_DOWN = 0x0C
    GO_TO_SCENE = 0x10
    RESET = 0x20
    STORE_ACTUAL_LEVEL_IN_DTR0 = 0x21
    SAVE_PERSISTENT_VARIABLES = 0x22
    SET_OPERATING_MODE = 0x23
    RESET_MEMORY_BANK = 0x24
    IDENTIFY_DEVICE = 0x25
    SET_MAX_LEVEL = 0x2A
    SET_MIN_LEVEL = 0x2B
    SET_SYSTEM_FAILURE_LEVEL = 0x2C
    SET_POWER_ON_LEVEL = 0x2D
    SET_FADE_TIME = 0x2E
    SET_FADE_RATE = 0x2F
    SET_EXTENDED_FADE_TIME = 0x30
    SET_SCENE = 0x40
    REMOVE_FROM_SCENE = 0x50
    ADD_TO_GROUP = 0x60
    REMOVE_FROM_GROUP = 0x70
    SET_SHORT_ADDRESS = 0x80
    ENABLE_WRITE_MEMORY = 0x81
    QUERY_STATUS = 0x90
    QUERY_CONTROL_GEAR_PRESENT = 0x91
    QUERY_LAMP_FAILURE = 0x92
    QUERY_LAMP_POWER_ON = 0x93
    QUERY_LIMIT_ERROR = 0x94
    QUERY_RESET_STATE = 0x95
    QUERY_MISSING_SHORT_ADDRESS = 0x96
    QUERY_VERSION_NUMBER = 0x97
    QUERY_CONTENT_DTR0 = 0x98
    QUERY_DEVICE_TYPE = 0x99
    QUERY_PHYSICAL_MINIMUM = 0x9A
    QUERY_POWER_FAILURE = 0x9B
    QUERY_CONTENT_DTR1 = 0x9C
    QUERY_CONTENT_DTR2 = 0x9D
    QUERY_OPERATING_MODE = 0x9E
    QUERY_LIGHT_SOURCE_TYPE = 0x9F
    QUERY_ACTUAL_LEVEL = 0xA0
    QUERY_MAX_LEVEL = 0xA1
    QUERY_MIN_LEVEL = 0xA2
    QUERY_POWER_ON_LEVEL = 0xA3
    QUERY_SYSTEM_FAILURE_LEVEL = 0xA4
    QUERY_FADE_TIME_FADE_RATE = 0xA5
    QUERY_MANUFACTURER_SPECIFIC_MODE = 0xA6
    QUERY_NEXT_DEVICE_TYPE = 0xA7
    QUERY_EXTENDED_FADE_TIME = 0xA8
    QUERY_CONTROL_GEAR_FAILURE = 0xAA
    QUERY_SCENE_LEVEL = 0xB0
    QUERY_GROUPS_0_7 = 0xC0
    QUERY_GROUPS_8_15 = 0xC1
    QUERY_RANDOM_ADDRESS_H = 0xC2
    QUERY_RANDOM_ADDRESS_M = 0xC3
    QUERY_RANDOM_ADDRESS_L = 0xC4
    READ_MEMORY_LOCATION = 0xC5

    @property
    def send_twice(self) -> bool:
        """Configuration commands only take effect when the same frame arrives twice within
        2.4..94 ms (IEC 62386-101 send-twice window), so one corrupted frame cannot
        reconfigure a gear."""
        return 0x20 <= self.value <= 0x81

    @property
    def answer(self) -> AnswerKind:
        return _OPCODE_ANSWERS.get(self, AnswerKind.NONE)

    @property
    def takes_param(self) -> bool:
        """True for the scene/group commands whose low nibble is the scene or group number."""
        return self in _PARAM_OPCODES

    @property
    def label(self) -> str:
        """The standard's name, as in logs: ``QUERY ACTUAL LEVEL``."""
        return _LABELS.get(self, self.name.replace("_", " "))


_PARAM_OPCODES: Final = frozenset(
    {
        Opcode.GO_TO_SCENE,
        Opcode.SET_SCENE,
        Opcode.REMOVE_FROM_SCENE,
        Opcode.ADD_TO_GROUP,
        Opcode.REMOVE_FROM_GROUP,
        Opcode.QUERY_SCENE_LEVEL,
    }
)
_YES_NO_OPCODES: Final = (
    Opcode.QUERY_CONTROL_GEAR_PRESENT,
    Opcode.QUERY_LAMP_FAILURE,
    Opcode.QUERY_LAMP_POWER_ON,
    Opcode.QUERY_LIMIT_ERROR,
    Opcode.QUERY_RESET_STATE,
    Opcode.QUERY_MISSING_SHORT_ADDRESS,
    Opcode.QUERY_POWER_FAILURE,
    Opcode.QUERY_MANUFACTURER_SPECIFIC_MODE,
    Opcode.QUERY_CONTROL_GEAR_FAILURE,
)
_BITMAP_OPCODES: Final = (Opcode.QUERY_STATUS, Opcode.QUERY_GROUPS_0_7, Opcode.QUERY_GROUPS_8_15)
_OPCODE_ANSWERS: Final[dict[Opcode, AnswerKind]] = {
    **{op: AnswerKind.NUMERIC for op in Opcode if 0x90 <= op.value <= 0xC5},
    **{op: AnswerKind.YES_NO for op in _YES_NO_OPCODES},
    **{op: AnswerKind.BITMAP for op in _BITMAP_OPCODES},
}
_LABELS: Final[dict[Opcode, str]] = {
    Opcode.QUERY_GROUPS_0_7: "QUERY GROUPS 0-7",
    Opcode.QUERY_GROUPS_8_15: "QUERY GROUPS 8-15",
    Opcode.QUERY_FADE_TIME_FADE_RATE: "QUERY FADE TIME/FADE RATE",
}


class Dt6Opcode(enum.IntEnum):
    """Part 207 (device type 6, LED) application-extended opcodes (0xE0..0xFF).

    The same byte means something else for another device type, so every one of these must
    be sent right after ENABLE DEVICE TYPE 6 (:func:`dt6` marks the :class:`Command`,
    :func:`query_failure_status` returns the pair).
    """

    REFERENCE_SYSTEM_POWER = 0xE0
    ENABLE_CURRENT_PROTECTOR = 0xE1
    DISABLE_CURRENT_PROTECTOR = 0xE2
    SELECT_DIMMING_CURVE = 0xE3
    STORE_DTR_AS_FAST_FADE_TIME = 0xE4
    QUERY_GEAR_TYPE = 0xED
    QUERY_DIMMING_CURVE = 0xEE
    QUERY_POSSIBLE_OPERATING_MODES = 0xEF
    QUERY_FEATURES = 0xF0
    QUERY_FAILURE_STATUS = 0xF1
    QUERY_SHORT_CIRCUIT = 0xF2
    QUERY_OPEN_CIRCUIT = 0xF3
    QUERY_LOAD_DECREASE = 0xF4
    QUERY_LOAD_INCREASE = 0xF5
    QUERY_CURRENT_PROTECTOR_ACTIVE = 0xF6
    QUERY_THERMAL_SHUTDOWN = 0xF7
    QUERY_THERMAL_OVERLOAD = 0xF8
    QUERY_REFERENCE_RUNNING = 0xF9
    QUERY_REFERENCE_MEASUREMENT_FAILED = 0xFA
    QUERY_CURRENT_PROTECTOR_ENABLED = 0xFB
    QUERY_OPERATING_MODE = 0xFC
    QUERY_FAST_FADE_TIME = 0xFD
    QUERY_MIN_FAST_FADE_TIME = 0xFE
    QUERY_EXTENDED_VERSION_NUMBER = 0xFF

    @property
    def send_twice(self) -> bool:
        return self.value <= 0xE4

    @property
    def answer(self) -> AnswerKind:
        if self.value <= 0xE4:
            return AnswerKind.NONE
        if 0xF2 <= self.value <= 0xFB:
            return AnswerKind.YES_NO
        if self in _DT6_BITMAPS:
            return AnswerKind.BITMAP
        return AnswerKind.NUMERIC

    @property
    def label(self) -> str:
        return self.name.replace("_", " ")


_DT6_BITMAPS: Final = frozenset(
    {
        Dt6Opcode.QUERY_GEAR_TYPE,
        Dt6Opcode.QUERY_POSSIBLE_OPERATING_MODES,
        Dt6Opcode.QUERY_FEATURES,
        Dt6Opcode.QUERY_FAILURE_STATUS,
        Dt6Opcode.QUERY_OPERATING_MODE,
    }
)


_DT6_VALUES: Final = frozenset(op.value for op in Dt6Opcode)


class Special(enum.IntEnum):
    """Special commands: the first byte of the frame; the second byte is the argument. They
    reach every gear on the line whatever its address."""

    TERMINATE = 0xA1
    DTR0 = 0xA3
    INITIALISE = 0xA5
    RANDOMISE = 0xA7
    COMPARE = 0xA9
    WITHDRAW = 0xAB
    PING = 0xAD
    SEARCHADDRH = 0xB1
    SEARCHADDRM = 0xB3
    SEARCHADDRL = 0xB5
    PROGRAM_SHORT_ADDRESS = 0xB7
    VERIFY_SHORT_ADDRESS = 0xB9
    QUERY_SHORT_ADDRESS = 0xBB
    ENABLE_DEVICE_TYPE = 0xC1
    DTR1 = 0xC3
    DTR2 = 0xC5
    WRITE_MEMORY_LOCATION = 0xC7
    WRITE_MEMORY_LOCATION_NO_REPLY = 0xC9

    @property
    def send_twice(self) -> bool:
        return self in (Special.INITIALISE, Special.RANDOMISE)

    @property
    def answer(self) -> AnswerKind:
        if self in (Special.COMPARE, Special.VERIFY_SHORT_ADDRESS):
            return AnswerKind.YES_NO
        if self in (Special.QUERY_SHORT_ADDRESS, Special.WRITE_MEMORY_LOCATION):
            return AnswerKind.NUMERIC
        return AnswerKind.NONE

    @property
    def label(self) -> str:
        return self.name.replace("_", " ")


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """One forward frame and how to run it.

    ``device_type`` is set for application-extended commands (opcodes 0xE0..0xFF): the runner
    must send ENABLE DEVICE TYPE ``device_type`` immediately before, with nothing in between.
    """

    frame: int
    send_twice: bool = False
    answer: AnswerKind = AnswerKind.NONE
    device_type: int | None = None

    def __post_init__(self) -> None:
        _check_int("forward frame", self.frame, 0, 0xFFFF)
        if self.device_type is not None:
            _check_int("device type", self.device_type, 0, 0xFF)

    @property
    def bits(self) -> int:
        return FRAME_BITS

    @property
    def expects_answer(self) -> bool:
        return self.answer is not AnswerKind.NONE

    def __str__(self) -> str:
        text = describe(self.frame, device_type=self.device_type)
        return f"{text} (twice)" if self.send_twice else text


def dapc(address: Address, level: int) -> Command:
    """Direct arc power control: go to ``level`` (0 off, 1..254 on the log curve, 255 = MASK:
    stop a running fade and stay) with the gear's fade time."""
    _check_int("arc power level", level, 0, 0xFF)
    return Command(address_byte(address, selector=False) << 8 | level)


def command(address: Address, opcode: Opcode, param: int | None = None) -> Command:
    """A standard command to ``address``; ``param`` is the scene or group number (0..15) for
    the opcodes that take one (:attr:`Opcode.takes_param`) and must be omitted otherwise."""
    opcode = Opcode(opcode)
    if opcode.takes_param:
        if param is None:
            raise ValueError(f"{opcode.label} needs a scene/group number 0..15")
        _check_int(f"{opcode.label} number", param, 0, 15)
        data = opcode.value | param
    elif param is not None:
        raise ValueError(f"{opcode.label} takes no parameter, got {param!r}")
    else:
        data = opcode.value
    return Command(
        address_byte(address, selector=True) << 8 | data,
        send_twice=opcode.send_twice,
        answer=opcode.answer,
    )


def dt6(address: Address, opcode: Dt6Opcode) -> Command:
    """A part 207 (LED) command; send ENABLE DEVICE TYPE 6 right before it."""
    opcode = Dt6Opcode(opcode)
    return Command(
        address_byte(address, selector=True) << 8 | opcode.value,
        send_twice=opcode.send_twice,
        answer=opcode.answer,
        device_type=DEVICE_TYPE_LED,
    )


def query_failure_status(address: Address) -> tuple[Command, Command]:
    """ENABLE DEVICE TYPE 6 then DT6 QUERY FAILURE STATUS (answer: :class:`LedFailureStatus`)."""
    return enable_device_type(DEVICE_TYPE_LED), dt6(address, Dt6Opcode.QUERY_FAILURE_STATUS)


def _special(special: Special, data: int = 0) -> Command:
    _check_int(f"{special.label} argument", data, 0, 0xFF)
    return Command(special.value << 8 | data, send_twice=special.send_twice, answer=special.answer)


def terminate() -> Command:
    """Ends the addressing state INITIALISE opened (and any physical selection)."""
    return _special(Special.TERMINATE)


def dtr0(value: int) -> Command:
    return _special(Special.DTR0, value)


def dtr1(value: int) -> Command:
    return _special(Special.DTR1, value)


def dtr2(value: int) -> Command:
    return _special(Special.DTR2, value)


def initialise(target: Literal["all", "unaddressed"] | int) -> Command:
    """INITIALISE (send twice): opens the 15-minute addressing window for every gear
    (``"all"``), the gear without short address (``"unaddressed"``) or one short address."""
    if target == "all":
        data = 0x00
    elif target == "unaddressed":
        data = 0xFF
    elif isinstance(target, int) and not isinstance(target, bool):
        _check_int("INITIALISE short address", target, 0, 63)
        data = target << 1 | 1
    else:
        raise ValueError(f"INITIALISE target must be 'all', 'unaddressed' or 0..63, got {target!r}")
    return _special(Special.INITIALISE, data)


def randomise() -> Command:
    """RANDOMISE (send twice): gear in the addressing window pick a new 24-bit random address."""
    return _special(Special.RANDOMISE)


def compare() -> Command:
    """YES from every initialised gear whose random address is <= the search address."""
    return _special(Special.COMPARE)


def withdraw() -> Command:
    """The gear whose random address equals the search address stops answering COMPARE."""
    return _special(Special.WITHDRAW)


def ping() -> Command:
    return _special(Special.PING)


def searchaddr_h(value: int) -> Command:
    return _special(Special.SEARCHADDRH, value)


def searchaddr_m(value: int) -> Command:
    return _special(Special.SEARCHADDRM, value)


def searchaddr_l(value: int) -> Command:
    return _special(Special.SEARCHADDRL, value)


def search_address(random_address: int) -> tuple[Command, Command, Command]:
    """SEARCHADDRH/M/L setting the 24-bit search address."""
    _check_int("search address", random_address, 0, 0xFFFFFF)
    return (
        searchaddr_h(random_address >> 16),
        searchaddr_m((random_address >> 8) & 0xFF),
        searchaddr_l(random_address & 0xFF),
    )


def program_short_address(short: int | None) -> Command:
    """Gives the selected gear (random address == search address) short address ``short``;
    ``None`` deletes its short address."""
    if short is None:
        return _special(Special.PROGRAM_SHORT_ADDRESS, MASK)
    _check_int("short address", short, 0, 63)
    return _special(Special.PROGRAM_SHORT_ADDRESS, short << 1 | 1)


def verify_short_address(short: int) -> Command:
    """YES from the initialised gear that has short address ``short``."""
    _check_int("short address", short, 0, 63)
    return _special(Special.VERIFY_SHORT_ADDRESS, short << 1 | 1)


def query_short_address() -> Command:
    """The selected gear answers ``short << 1 | 1`` (MASK when it has none)."""
    return _special(Special.QUERY_SHORT_ADDRESS)


def enable_device_type(device_type: int) -> Command:
    return _special(Special.ENABLE_DEVICE_TYPE, device_type)


def write_memory_location(value: int) -> Command:
    """Writes DTR1:DTR0 (bank:location) of gear whose memory write is enabled; they answer."""
    return _special(Special.WRITE_MEMORY_LOCATION, value)


def write_memory_location_no_reply(value: int) -> Command:
    return _special(Special.WRITE_MEMORY_LOCATION_NO_REPLY, value)


# --------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------


def yes_no(value: int | None, *, collision: bool = False) -> bool:
    """The meaning of the answer to a yes/no query: any backward frame is YES (gear send
    0xFF, but a damaged YES is still somebody answering), and so is a collision (several gear
    said YES at once). Only silence is NO."""
    return collision or value is not None


def _unpack_bits(name: str, value: int) -> tuple[bool, ...]:
    _check_int(f"{name} answer", value, 0, 0xFF)
    return tuple(bool(value >> bit & 1) for bit in range(8))


def _pack_bits(flags: Iterable[bool]) -> int:
    return sum(1 << bit for bit, flag in enumerate(flags) if flag)


@dataclass(frozen=True, slots=True)
class Status:
    """The answer to QUERY STATUS (part 102); fields in bit order, bit 0 first."""

    gear_failure: bool = False
    lamp_failure: bool = False
    lamp_on: bool = False
    """Lamp arc power on."""
    limit_error: bool = False
    fade_running: bool = False
    reset_state: bool = False
    short_address_missing: bool = False
    power_cycle_seen: bool = False
    """No RESET or arc power command since the gear was powered."""

    @classmethod
    def from_byte(cls, value: int) -> Status:
        return cls(*_unpack_bits("QUERY STATUS", value))

    def to_byte(self) -> int:
        return _pack_bits(getattr(self, f.name) for f in fields(self))

    def set_names(self) -> tuple[str, ...]:
        """The names of the bits that are set, for logs."""
        return tuple(f.name for f in fields(self) if getattr(self, f.name))


@dataclass(frozen=True, slots=True)
class LedFailureStatus:
    """The answer to DT6 QUERY FAILURE STATUS (part 207); fields in bit order, bit 0 first."""

    short_circuit: bool = False
    open_circuit: bool = False
    load_decrease: bool = False
    load_increase: bool = False
    current_protector_active: bool = False
    thermal_shutdown: bool = False
    thermal_overload: bool = False
    """Thermal overload with light output reduced."""
    reference_measurement_failed: bool = False

    @classmethod
    def from_byte(cls, value: int) -> LedFailureStatus:
        return cls(*_unpack_bits("QUERY FAILURE STATUS", value))

    def to_byte(self) -> int:
        return _pack_bits(getattr(self, f.name) for f in fields(self))

    def set_names(self) -> tuple[str, ...]:
        """The names of the bits that are set, for logs."""
        return tuple(f.name for f in fields(self) if getattr(self, f.name))


def groups_from_answers(groups_0_7: int, groups_8_15: int) -> frozenset[int]:
    """The groups a gear belongs to, from its answers to QUERY GROUPS 0-7 and 8-15."""
    _check_int("QUERY GROUPS 0-7 answer", groups_0_7, 0, 0xFF)
    _check_int("QUERY GROUPS 8-15 answer", groups_8_15, 0, 0xFF)
    mask = groups_8_15 << 8 | groups_0_7
    return frozenset(g for g in range(16) if mask >> g & 1)


# --------------------------------------------------------------------------------------------
# Fade time
# --------------------------------------------------------------------------------------------

FADE_TIMES_S: Final[tuple[float, ...]] = (0.0, *(0.5 * math.sqrt(2**n) for n in range(1, 16)))
"""Fade time by SET FADE TIME code: n = 1..15 gives 0.5·√(2ⁿ) s (0.707 s .. 90.5 s); 0 means
"use the extended fade time", which is 0 (no fade) unless someone set one."""


def fade_time_code(seconds: float) -> int:
    """The SET FADE TIME code (the DTR0 value) whose fade time is nearest to ``seconds``
    (ties go to the shorter fade). Raises :class:`ValueError` beyond 0..90.51 s."""
    if not math.isfinite(seconds) or not 0 <= seconds <= round(FADE_TIMES_S[-1], 2):
        raise ValueError(f"fade time must be 0..{FADE_TIMES_S[-1]:.2f} s, got {seconds!r}")
    return min(range(16), key=lambda code: (abs(FADE_TIMES_S[code] - seconds), code))


# --------------------------------------------------------------------------------------------
# Dimming curve
# --------------------------------------------------------------------------------------------


def _curve(level: int) -> float:
    # 10^(3(n-1)/253 - 1): 0.1 % at level 1, 100 % at 254, three decades over 253 steps.
    # Written as 3(n-1)/253 rather than (n-1)/(253/3) so that level 254 gives exactly 100.0.
    return math.pow(10.0, 3 * (level - 1) / 253 - 1)


_PERCENTS: Final[tuple[float, ...]] = tuple(_curve(n) for n in range(LEVEL_MIN, LEVEL_MAX + 1))


def arc_to_percent(level: int) -> float:
    """Light output in percent for arc power level ``level`` on the IEC 62386-102 logarithmic
    curve: 0 → 0.0 (off), 1 → 0.1, 254 → 100.0. 255 (MASK) is not a level: ValueError."""
    _check_int("arc power level", level, 0, LEVEL_MAX)
    return 0.0 if level == 0 else _PERCENTS[level - LEVEL_MIN]


def percent_to_arc(percent: float) -> int:
    """The arc power level whose light output is closest to ``percent`` (0..100).

    0 → 0 (off); any other value gives the level whose :func:`arc_to_percent` is nearest
    (ties go to the lower level), and never less than 1, so a non-zero request never switches
    the lamp off. ``percent_to_arc(arc_to_percent(n)) == n`` for every level.
    """
    if isinstance(percent, bool) or not isinstance(percent, int | float):
        raise TypeError(f"percent must be a number, got {percent!r}")
    if not math.isfinite(percent) or not 0 <= percent <= 100:
        raise ValueError(f"percent must be 0..100, got {percent!r}")
    if percent == 0:
        return 0
    above = bisect.bisect_left(_PERCENTS, percent)  # first level index with output >= percent
    if above == 0:
        return LEVEL_MIN
    if above == len(_PERCENTS):
        return LEVEL_MAX
    below = above - 1
    closer_below = percent - _PERCENTS[below] <= _PERCENTS[above] - percent
    return (below if closer_below else above) + LEVEL_MIN


# --------------------------------------------------------------------------------------------
# Decoding frames (logs, bus monitor, simulator cross-checks)
# --------------------------------------------------------------------------------------------


class FrameKind(enum.Enum):
    DAPC = "dapc"
    COMMAND = "command"
    EXTENDED = "extended"
    """An application-extended opcode 0xE0..0xFF: its meaning depends on the device type
    enabled just before."""
    SPECIAL = "special"
    RESERVED = "reserved"


@dataclass(frozen=True, slots=True)
class DecodedFrame:
    """What a 16-bit forward frame says. Only the fields of its ``kind`` are set."""

    frame: int
    kind: FrameKind
    address: Address | None = None
    level: int | None = None
    """DAPC level."""
    opcode: Opcode | None = None
    param: int | None = None
    """Scene or group number of a parameterised opcode."""
    special: Special | None = None
    data: int | None = None
    """The opcode byte of EXTENDED and RESERVED frames; the argument of special commands."""


def _decode_opcode(byte: int) -> tuple[Opcode, int | None] | None:
    for base in _PARAM_OPCODES:
        if base.value <= byte <= base.value + 15:
            return base, byte - base.value
    try:
        return Opcode(byte), None
    except ValueError:
        return None


_NO_ARGUMENT: Final = frozenset(
    {
        Special.TERMINATE,
        Special.RANDOMISE,
        Special.COMPARE,
        Special.WITHDRAW,
        Special.PING,
        Special.QUERY_SHORT_ADDRESS,
    }
)


def _is_short_argument(data: int) -> bool:
    """The ``0AAAAAA1`` form special commands use for a short address."""
    return data & 0x81 == 0x01


def _special_argument_valid(special: Special, data: int) -> bool:
    if special in _NO_ARGUMENT:
        return data == 0
    if special is Special.INITIALISE:
        return data in (0x00, 0xFF) or _is_short_argument(data)
    if special in (Special.PROGRAM_SHORT_ADDRESS, Special.VERIFY_SHORT_ADDRESS):
        return data == MASK or _is_short_argument(data)
    return True


def decode_frame(frame: int) -> DecodedFrame:
    """Parse a 16-bit forward frame (``ValueError`` outside 0..0xFFFF).

    RESERVED covers reserved address bytes, reserved opcodes (``address`` and ``data`` set) and
    special commands with an argument the standard does not define (``special`` and ``data``
    set): gear ignore all of them.
    """
    _check_int("forward frame", frame, 0, 0xFFFF)
    first, second = frame >> 8, frame & 0xFF
    parsed = parse_address_byte(first)
    if parsed is None:
        try:
            special = Special(first)
        except ValueError:
            return DecodedFrame(frame, FrameKind.RESERVED, data=second)
        kind = FrameKind.SPECIAL if _special_argument_valid(special, second) else FrameKind.RESERVED
        return DecodedFrame(frame, kind, special=special, data=second)
    address, selector = parsed
    if not selector:
        return DecodedFrame(frame, FrameKind.DAPC, address=address, level=second)
    if second >= 0xE0:
        return DecodedFrame(frame, FrameKind.EXTENDED, address=address, data=second)
    decoded = _decode_opcode(second)
    if decoded is None:
        return DecodedFrame(frame, FrameKind.RESERVED, address=address, data=second)
    opcode, param = decoded
    return DecodedFrame(frame, FrameKind.COMMAND, address=address, opcode=opcode, param=param)


def _special_text(special: Special, data: int) -> str:
    if special is Special.INITIALISE:
        if data == 0x00:
            return "INITIALISE all"
        if data == 0xFF:
            return "INITIALISE unaddressed"
        return f"INITIALISE short {data >> 1}"
    if special is Special.PROGRAM_SHORT_ADDRESS and data == MASK:
        return f"{special.label} none (delete)"
    if special is Special.VERIFY_SHORT_ADDRESS and data == MASK:
        return f"{special.label} MASK"
    if special in (Special.PROGRAM_SHORT_ADDRESS, Special.VERIFY_SHORT_ADDRESS):
        return f"{special.label} {data >> 1}"
    if special in _NO_ARGUMENT:
        return special.label
    if special is Special.ENABLE_DEVICE_TYPE:
        return f"{special.label} {data}"
    return f"{special.label} 0x{data:02X} ({data})"


def describe(frame: int, bits: int = FRAME_BITS, *, device_type: int | None = None) -> str:
    """A one-line human reading of a forward frame for logs and the bus monitor, e.g.
    ``DAPC 254 (100.000 %) to short 5`` or ``QUERY ACTUAL LEVEL to short 5``.

    ``device_type`` names application-extended opcodes (0xE0..0xFF) when the caller knows
    which device type was enabled (only DT6 is known here). Never raises for a 16-bit value.
    """
    if bits != FRAME_BITS:
        width = max(1, (bits + 3) // 4)
        return f"{bits}-bit frame 0x{frame:0{width}X}"
    decoded = decode_frame(frame)
    target = f" to {decoded.address}" if decoded.address is not None else ""
    match decoded.kind:
        case FrameKind.DAPC:
            assert decoded.level is not None
            if decoded.level == MASK:
                return f"DAPC MASK (stop fade){target}"
            if decoded.level == 0:
                return f"DAPC 0 (off){target}"
            return f"DAPC {decoded.level} ({arc_to_percent(decoded.level):.3f} %){target}"
        case FrameKind.COMMAND:
            assert decoded.opcode is not None
            param = f" {decoded.param}" if decoded.param is not None else ""
            return f"{decoded.opcode.label}{param}{target}"
        case FrameKind.EXTENDED:
            assert decoded.data is not None
            if device_type == DEVICE_TYPE_LED and decoded.data in _DT6_VALUES:
                return f"DT6 {Dt6Opcode(decoded.data).label}{target}"
            return f"APPLICATION EXTENDED 0x{decoded.data:02X}{target}"
        case FrameKind.SPECIAL:
            assert decoded.special is not None and decoded.data is not None
            return _special_text(decoded.special, decoded.data)
    if decoded.special is not None:
        return f"{decoded.special.label} with undefined argument 0x{decoded.data:02X} (ignored)"
    if decoded.address is not None:
        return f"RESERVED OPCODE 0x{decoded.data:02X}{target}"
    return f"RESERVED 0x{frame:04X}"
