"""The DALI codec and memory-bank plans: the standard's frame values, python-dali as an
independent oracle (its encoder, decoder, memory maps and fake gear), and properties."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Any

import pytest
from dali import address as pd_address
from dali.command import Command as PdCommand
from dali.command import YesNoResponse
from dali.frame import BackwardFrame, ForwardFrame
from dali.gear import general as pd_general
from dali.gear import led as pd_led
from dali.memory import diagnostics as pd_diagnostics
from dali.memory import energy as pd_energy
from dali.memory import info as pd_info
from dali.memory import oem as pd_oem
from dali.memory.location import FlagValue
from dali.tests import fakes as pd_fakes
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.dali import codec, memory
from drivers.dali.codec import (
    BROADCAST,
    BROADCAST_UNADDRESSED,
    AnswerKind,
    Dt6Opcode,
    Group,
    Opcode,
    Short,
    Special,
)

EXAMPLES = settings(max_examples=200, deadline=None)

short = st.builds(Short, st.integers(0, 63))
group = st.builds(Group, st.integers(0, 15))
any_address = st.one_of(short, group, st.just(BROADCAST), st.just(BROADCAST_UNADDRESSED))
byte = st.integers(0, 0xFF)
frame16 = st.integers(0, 0xFFFF)


# --------------------------------------------------------------------------------------------
# Frame values from the standard (reference notes: PD-verified and Foxtron document examples)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "level", "frame"),
    [
        (Short(5), 254, 0x0AFE),
        (Short(5), 0, 0x0A00),
        (Short(5), 255, 0x0AFF),
        (Short(0), 128, 0x0080),
        (Short(63), 254, 0x7EFE),
        (Group(3), 100, 0x8664),
        (BROADCAST, 254, 0xFEFE),
        (BROADCAST_UNADDRESSED, 254, 0xFCFE),
    ],
)
def test_dapc_frames(address: codec.Address, level: int, frame: int) -> None:
    command = codec.dapc(address, level)
    assert command.frame == frame
    assert not command.send_twice
    assert not command.expects_answer


@pytest.mark.parametrize(
    ("address", "opcode", "param", "frame"),
    [
        (Short(5), Opcode.OFF, None, 0x0B00),
        (Short(5), Opcode.UP, None, 0x0B01),
        (Short(5), Opcode.RECALL_MAX_LEVEL, None, 0x0B05),
        (BROADCAST, Opcode.RECALL_MAX_LEVEL, None, 0xFF05),
        (Short(5), Opcode.RECALL_MIN_LEVEL, None, 0x0B06),
        (Short(5), Opcode.GO_TO_SCENE, 3, 0x0B13),
        (Group(2), Opcode.OFF, None, 0x8500),
        (Short(5), Opcode.RESET, None, 0x0B20),
        (BROADCAST, Opcode.RESET, None, 0xFF20),
        (Short(5), Opcode.ADD_TO_GROUP, 2, 0x0B62),
        (Short(5), Opcode.ENABLE_WRITE_MEMORY, None, 0x0B81),
        (Short(5), Opcode.QUERY_STATUS, None, 0x0B90),
        (Short(5), Opcode.QUERY_CONTROL_GEAR_PRESENT, None, 0x0B91),
        (BROADCAST, Opcode.QUERY_CONTROL_GEAR_PRESENT, None, 0xFF91),
        (Short(5), Opcode.QUERY_LAMP_FAILURE, None, 0x0B92),
        (Short(12), Opcode.QUERY_LAMP_FAILURE, None, 0x1992),
        (Short(5), Opcode.QUERY_LAMP_POWER_ON, None, 0x0B93),
        (Short(5), Opcode.QUERY_DEVICE_TYPE, None, 0x0B99),
        (Short(5), Opcode.QUERY_ACTUAL_LEVEL, None, 0x0BA0),
        (Short(5), Opcode.QUERY_MAX_LEVEL, None, 0x0BA1),
        (Short(5), Opcode.QUERY_MIN_LEVEL, None, 0x0BA2),
        (Short(5), Opcode.QUERY_CONTROL_GEAR_FAILURE, None, 0x0BAA),
        (Short(5), Opcode.READ_MEMORY_LOCATION, None, 0x0BC5),
    ],
)
def test_standard_command_frames(
    address: codec.Address, opcode: Opcode, param: int | None, frame: int
) -> None:
    assert codec.command(address, opcode, param).frame == frame


@pytest.mark.parametrize(
    ("command", "frame"),
    [
        (codec.terminate(), 0xA100),
        (codec.dtr0(0x20), 0xA320),
        (codec.dtr1(202), 0xC3CA),
        (codec.dtr2(7), 0xC507),
        (codec.initialise("all"), 0xA500),
        (codec.initialise("unaddressed"), 0xA5FF),
        (codec.initialise(5), 0xA50B),
        (codec.randomise(), 0xA700),
        (codec.compare(), 0xA900),
        (codec.withdraw(), 0xAB00),
        (codec.ping(), 0xAD00),
        (codec.searchaddr_h(0xFF), 0xB1FF),
        (codec.searchaddr_m(0x7F), 0xB37F),
        (codec.searchaddr_l(0x01), 0xB501),
        (codec.program_short_address(5), 0xB70B),
        (codec.program_short_address(0), 0xB701),
        (codec.program_short_address(None), 0xB7FF),
        (codec.verify_short_address(5), 0xB90B),
        (codec.verify_short_address(0), 0xB901),
        (codec.query_short_address(), 0xBB00),
        (codec.enable_device_type(6), 0xC106),
        (codec.write_memory_location(0x55), 0xC755),
        (codec.write_memory_location_no_reply(0xAA), 0xC9AA),
    ],
)
def test_special_command_frames(command: codec.Command, frame: int) -> None:
    assert command.frame == frame


def test_run_flags_follow_the_standard() -> None:
    reset = codec.command(BROADCAST, Opcode.RESET)
    assert reset.send_twice and not reset.expects_answer
    status = codec.command(Short(5), Opcode.QUERY_STATUS)
    assert status.answer is AnswerKind.BITMAP and not status.send_twice
    assert codec.command(Short(5), Opcode.QUERY_LAMP_FAILURE).answer is AnswerKind.YES_NO
    assert codec.command(Short(5), Opcode.QUERY_ACTUAL_LEVEL).answer is AnswerKind.NUMERIC
    assert codec.command(Short(5), Opcode.OFF).answer is AnswerKind.NONE
    assert codec.initialise("unaddressed").send_twice
    assert codec.randomise().send_twice
    assert codec.compare().answer is AnswerKind.YES_NO
    assert codec.verify_short_address(5).answer is AnswerKind.YES_NO
    assert codec.query_short_address().answer is AnswerKind.NUMERIC
    assert not codec.program_short_address(5).send_twice
    assert str(reset) == "RESET to broadcast (twice)"


def test_dt6_failure_status_is_enable_device_type_then_query() -> None:
    enable, query = codec.query_failure_status(Short(5))
    assert (enable.frame, query.frame) == (0xC106, 0x0BF1)
    assert query.device_type == 6
    assert query.answer is AnswerKind.BITMAP
    assert str(query) == "DT6 QUERY FAILURE STATUS to short 5"


def test_search_address_splits_24_bits_high_first() -> None:
    assert [c.frame for c in codec.search_address(0x123456)] == [0xB112, 0xB334, 0xB556]


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: Short(64), "short address must be an integer 0..63"),
        (lambda: Group(16), "group must be an integer 0..15"),
        (lambda: Short(True), "short address"),  # a bool is not an address
        (lambda: codec.dapc(Short(0), 256), "arc power level"),
        (lambda: codec.command(Short(0), Opcode.GO_TO_SCENE), "needs a scene/group number"),
        (lambda: codec.command(Short(0), Opcode.GO_TO_SCENE, 16), "0..15"),
        (lambda: codec.command(Short(0), Opcode.OFF, 1), "takes no parameter"),
        (lambda: codec.initialise(64), "0..63"),
        (lambda: codec.initialise("some"), "INITIALISE target"),  # type: ignore[arg-type]
        (lambda: codec.dtr0(256), "DTR0 argument"),
        (lambda: codec.search_address(1 << 24), "search address"),
        (lambda: codec.decode_frame(0x10000), "forward frame"),
    ],
)
def test_out_of_range_arguments_are_refused(call: Any, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        call()
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("frame", "text"),
    [
        (0x0AFE, "DAPC 254 (100.000 %) to short 5"),
        (0x0A55, "DAPC 85 (0.991 %) to short 5"),
        (0x0AFF, "DAPC MASK (stop fade) to short 5"),
        (0xFC00, "DAPC 0 (off) to broadcast unaddressed"),
        (0x0BA0, "QUERY ACTUAL LEVEL to short 5"),
        (0x8500, "OFF to group 2"),
        (0x0B13, "GO TO SCENE 3 to short 5"),
        (0xFF20, "RESET to broadcast"),
        (0x0BC0, "QUERY GROUPS 0-7 to short 5"),
        (0xA5FF, "INITIALISE unaddressed"),
        (0xA50B, "INITIALISE short 5"),
        (0xB70B, "PROGRAM SHORT ADDRESS 5"),
        (0xB7FF, "PROGRAM SHORT ADDRESS none (delete)"),
        (0xB90B, "VERIFY SHORT ADDRESS 5"),
        (0xC106, "ENABLE DEVICE TYPE 6"),
        (0xA320, "DTR0 0x20 (32)"),
        (0x0BF1, "APPLICATION EXTENDED 0xF1 to short 5"),
        (0x0B0D, "RESERVED OPCODE 0x0D to short 5"),
        (0xCD00, "RESERVED 0xCD00"),
        (0xA101, "TERMINATE with undefined argument 0x01 (ignored)"),
    ],
)
def test_describe(frame: int, text: str) -> None:
    assert codec.describe(frame) == text


def test_describe_names_dt6_opcodes_when_told_the_device_type() -> None:
    assert codec.describe(0x0BF1, device_type=6) == "DT6 QUERY FAILURE STATUS to short 5"
    assert codec.describe(0x0BE7, device_type=6) == "APPLICATION EXTENDED 0xE7 to short 5"
    assert codec.describe(0x123456, bits=24) == "24-bit frame 0x123456"


def test_describe_never_raises_on_any_16_bit_frame() -> None:
    # The whole space is small enough to walk, which is stronger than sampling it.
    texts = {codec.describe(frame) for frame in range(0x10000)}
    assert all(texts)


@EXAMPLES
@given(frame16, st.one_of(st.none(), byte))
def test_describe_with_any_device_type_never_raises(frame: int, device_type: int | None) -> None:
    assert codec.describe(frame, device_type=device_type)


# --------------------------------------------------------------------------------------------
# Addresses
# --------------------------------------------------------------------------------------------


@EXAMPLES
@given(any_address, st.booleans())
def test_address_byte_round_trip(address: codec.Address, selector: bool) -> None:
    assert codec.parse_address_byte(codec.address_byte(address, selector=selector)) == (
        address,
        selector,
    )


def test_every_address_byte_is_an_address_or_not() -> None:
    for value in range(0x100):
        parsed = codec.parse_address_byte(value)
        if 0xA0 <= value <= 0xFB:
            assert parsed is None, hex(value)
        else:
            assert parsed is not None, hex(value)
            address, selector = parsed
            assert codec.address_byte(address, selector=selector) == value


# --------------------------------------------------------------------------------------------
# python-dali as the oracle
# --------------------------------------------------------------------------------------------

PD_CLASSES: dict[Opcode, type[PdCommand]] = {
    Opcode.OFF: pd_general.Off,
    Opcode.UP: pd_general.Up,
    Opcode.DOWN: pd_general.Down,
    Opcode.STEP_UP: pd_general.StepUp,
    Opcode.STEP_DOWN: pd_general.StepDown,
    Opcode.RECALL_MAX_LEVEL: pd_general.RecallMaxLevel,
    Opcode.RECALL_MIN_LEVEL: pd_general.RecallMinLevel,
    Opcode.STEP_DOWN_AND_OFF: pd_general.StepDownAndOff,
    Opcode.ON_AND_STEP_UP: pd_general.OnAndStepUp,
    Opcode.ENABLE_DAPC_SEQUENCE: pd_general.EnableDAPCSequence,
    Opcode.GO_TO_LAST_ACTIVE_LEVEL: pd_general.GoToLastActiveLevel,
    Opcode.CONTINUOUS_UP: pd_general.ContinuousUp,
    Opcode.CONTINUOUS_DOWN: pd_general.ContinuousDown,
    Opcode.GO_TO_SCENE: pd_general.GoToScene,
    Opcode.RESET: pd_general.Reset,
    Opcode.STORE_ACTUAL_LEVEL_IN_DTR0: pd_general.StoreActualLevelInDTR0,
    Opcode.SAVE_PERSISTENT_VARIABLES: pd_general.SavePersistentVariables,
    Opcode.SET_OPERATING_MODE: pd_general.SetOperatingMode,
    Opcode.RESET_MEMORY_BANK: pd_general.ResetMemoryBank,
    Opcode.IDENTIFY_DEVICE: pd_general.IdentifyDevice,
    Opcode.SET_MAX_LEVEL: pd_general.SetMaxLevel,
    Opcode.SET_MIN_LEVEL: pd_general.SetMinLevel,
    Opcode.SET_SYSTEM_FAILURE_LEVEL: pd_general.SetSystemFailureLevel,
    Opcode.SET_POWER_ON_LEVEL: pd_general.SetPowerOnLevel,
    Opcode.SET_FADE_TIME: pd_general.SetFadeTime,
    Opcode.SET_FADE_RATE: pd_general.SetFadeRate,
    Opcode.SET_EXTENDED_FADE_TIME: pd_general.SetExtendedFadeTime,
    Opcode.SET_SCENE: pd_general.SetScene,
    Opcode.REMOVE_FROM_SCENE: pd_general.RemoveFromScene,
    Opcode.ADD_TO_GROUP: pd_general.AddToGroup,
    Opcode.REMOVE_FROM_GROUP: pd_general.RemoveFromGroup,
    Opcode.SET_SHORT_ADDRESS: pd_general.SetShortAddress,
    Opcode.ENABLE_WRITE_MEMORY: pd_general.EnableWriteMemory,
    Opcode.QUERY_STATUS: pd_general.QueryStatus,
    Opcode.QUERY_CONTROL_GEAR_PRESENT: pd_general.QueryControlGearPresent,
    Opcode.QUERY_LAMP_FAILURE: pd_general.QueryLampFailure,
    Opcode.QUERY_LAMP_POWER_ON: pd_general.QueryLampPowerOn,
    Opcode.QUERY_LIMIT_ERROR: pd_general.QueryLimitError,
    Opcode.QUERY_RESET_STATE: pd_general.QueryResetState,
    Opcode.QUERY_MISSING_SHORT_ADDRESS: pd_general.QueryMissingShortAddress,
    Opcode.QUERY_VERSION_NUMBER: pd_general.QueryVersionNumber,
    Opcode.QUERY_CONTENT_DTR0: pd_general.QueryContentDTR0,
    Opcode.QUERY_DEVICE_TYPE: pd_general.QueryDeviceType,
    Opcode.QUERY_PHYSICAL_MINIMUM: pd_general.QueryPhysicalMinimum,
    Opcode.QUERY_POWER_FAILURE: pd_general.QueryPowerFailure,
    Opcode.QUERY_CONTENT_DTR1: pd_general.QueryContentDTR1,
    Opcode.QUERY_CONTENT_DTR2: pd_general.QueryContentDTR2,
    Opcode.QUERY_OPERATING_MODE: pd_general.QueryOperatingMode,
    Opcode.QUERY_LIGHT_SOURCE_TYPE: pd_general.QueryLightSourceType,
    Opcode.QUERY_ACTUAL_LEVEL: pd_general.QueryActualLevel,
    Opcode.QUERY_MAX_LEVEL: pd_general.QueryMaxLevel,
    Opcode.QUERY_MIN_LEVEL: pd_general.QueryMinLevel,
    Opcode.QUERY_POWER_ON_LEVEL: pd_general.QueryPowerOnLevel,
    Opcode.QUERY_SYSTEM_FAILURE_LEVEL: pd_general.QuerySystemFailureLevel,
    Opcode.QUERY_FADE_TIME_FADE_RATE: pd_general.QueryFadeTimeFadeRate,
    Opcode.QUERY_MANUFACTURER_SPECIFIC_MODE: pd_general.QueryManufacturerSpecificMode,
    Opcode.QUERY_NEXT_DEVICE_TYPE: pd_general.QueryNextDeviceType,
    Opcode.QUERY_EXTENDED_FADE_TIME: pd_general.QueryExtendedFadeTime,
    Opcode.QUERY_CONTROL_GEAR_FAILURE: pd_general.QueryControlGearFailure,
    Opcode.QUERY_SCENE_LEVEL: pd_general.QuerySceneLevel,
    Opcode.QUERY_GROUPS_0_7: pd_general.QueryGroupsZeroToSeven,
    Opcode.QUERY_GROUPS_8_15: pd_general.QueryGroupsEightToFifteen,
    Opcode.QUERY_RANDOM_ADDRESS_H: pd_general.QueryRandomAddressH,
    Opcode.QUERY_RANDOM_ADDRESS_M: pd_general.QueryRandomAddressM,
    Opcode.QUERY_RANDOM_ADDRESS_L: pd_general.QueryRandomAddressL,
    Opcode.READ_MEMORY_LOCATION: pd_general.ReadMemoryLocation,
}
PD_SPECIALS: dict[Special, type[PdCommand]] = {
    Special.TERMINATE: pd_general.Terminate,
    Special.DTR0: pd_general.DTR0,
    Special.INITIALISE: pd_general.Initialise,
    Special.RANDOMISE: pd_general.Randomise,
    Special.COMPARE: pd_general.Compare,
    Special.WITHDRAW: pd_general.Withdraw,
    Special.PING: pd_general.Ping,
    Special.SEARCHADDRH: pd_general.SearchaddrH,
    Special.SEARCHADDRM: pd_general.SearchaddrM,
    Special.SEARCHADDRL: pd_general.SearchaddrL,
    Special.PROGRAM_SHORT_ADDRESS: pd_general.ProgramShortAddress,
    Special.VERIFY_SHORT_ADDRESS: pd_general.VerifyShortAddress,
    Special.QUERY_SHORT_ADDRESS: pd_general.QueryShortAddress,
    Special.ENABLE_DEVICE_TYPE: pd_general.EnableDeviceType,
    Special.DTR1: pd_general.DTR1,
    Special.DTR2: pd_general.DTR2,
    Special.WRITE_MEMORY_LOCATION: pd_general.WriteMemoryLocation,
    Special.WRITE_MEMORY_LOCATION_NO_REPLY: pd_general.WriteMemoryLocationNoReply,
}
PD_DT6: dict[Dt6Opcode, type[PdCommand]] = {
    Dt6Opcode.REFERENCE_SYSTEM_POWER: pd_led.ReferenceSystemPower,
    Dt6Opcode.ENABLE_CURRENT_PROTECTOR: pd_led.EnableCurrentProtector,
    Dt6Opcode.DISABLE_CURRENT_PROTECTOR: pd_led.DisableCurrentProtector,
    Dt6Opcode.SELECT_DIMMING_CURVE: pd_led.SelectDimmingCurve,
    Dt6Opcode.STORE_DTR_AS_FAST_FADE_TIME: pd_led.StoreDTRAsFastFadeTime,
    Dt6Opcode.QUERY_GEAR_TYPE: pd_led.QueryGearType,
    Dt6Opcode.QUERY_DIMMING_CURVE: pd_led.QueryDimmingCurve,
    Dt6Opcode.QUERY_POSSIBLE_OPERATING_MODES: pd_led.QueryPossibleOperatingModes,
    Dt6Opcode.QUERY_FEATURES: pd_led.QueryFeatures,
    Dt6Opcode.QUERY_FAILURE_STATUS: pd_led.QueryFailureStatus,
    Dt6Opcode.QUERY_SHORT_CIRCUIT: pd_led.QueryShortCircuit,
    Dt6Opcode.QUERY_OPEN_CIRCUIT: pd_led.QueryOpenCircuit,
    Dt6Opcode.QUERY_LOAD_DECREASE: pd_led.QueryLoadDecrease,
    Dt6Opcode.QUERY_LOAD_INCREASE: pd_led.QueryLoadIncrease,
    Dt6Opcode.QUERY_CURRENT_PROTECTOR_ACTIVE: pd_led.QueryCurrentProtectorActive,
    Dt6Opcode.QUERY_THERMAL_SHUTDOWN: pd_led.QueryThermalShutDown,
    Dt6Opcode.QUERY_THERMAL_OVERLOAD: pd_led.QueryThermalOverload,
    Dt6Opcode.QUERY_REFERENCE_RUNNING: pd_led.QueryReferenceRunning,
    Dt6Opcode.QUERY_REFERENCE_MEASUREMENT_FAILED: pd_led.QueryReferenceMeasurementFailed,
    Dt6Opcode.QUERY_CURRENT_PROTECTOR_ENABLED: pd_led.QueryCurrentProtectorEnabled,
    Dt6Opcode.QUERY_OPERATING_MODE: pd_led.QueryOperatingMode,
    Dt6Opcode.QUERY_FAST_FADE_TIME: pd_led.QueryFastFadeTime,
    Dt6Opcode.QUERY_MIN_FAST_FADE_TIME: pd_led.QueryMinFastFadeTime,
    Dt6Opcode.QUERY_EXTENDED_VERSION_NUMBER: pd_led.QueryExtendedVersionNumber,
}

OUR_ADDRESSES: tuple[codec.Address, ...] = (
    Short(0),
    Short(5),
    Short(63),
    Group(0),
    Group(15),
    BROADCAST,
    BROADCAST_UNADDRESSED,
)


def _pd_address(address: codec.Address) -> Any:
    match address:
        case Short(number):
            return pd_address.GearShort(number)
        case Group(number):
            return pd_address.GearGroup(number)
        case codec.Broadcast():
            return pd_address.GearBroadcast()
    return pd_address.GearBroadcastUnaddressed()


def _same_run_flags(ours: codec.Command, theirs: PdCommand) -> None:
    assert ours.send_twice == theirs.sendtwice
    assert ours.expects_answer == (theirs.response is not None)
    is_yes_no = theirs.response is not None and issubclass(theirs.response, YesNoResponse)
    assert (ours.answer is AnswerKind.YES_NO) == is_yes_no


def test_every_opcode_is_mapped_to_python_dali() -> None:
    assert set(PD_CLASSES) == set(Opcode)
    assert set(PD_SPECIALS) == set(Special)
    assert set(PD_DT6) == set(Dt6Opcode)


@pytest.mark.parametrize("opcode", list(Opcode), ids=lambda op: op.name)
def test_standard_commands_equal_python_dali_for_every_address_kind(opcode: Opcode) -> None:
    params: Sequence[int | None] = range(16) if opcode.takes_param else (None,)
    pd_class = PD_CLASSES[opcode]
    for address in OUR_ADDRESSES:
        for param in params:
            ours = codec.command(address, opcode, param)
            args = (_pd_address(address),) if param is None else (_pd_address(address), param)
            theirs = pd_class(*args)
            assert ours.frame == theirs.frame.as_integer, (address, param)
            _same_run_flags(ours, theirs)


@pytest.mark.parametrize("opcode", list(Dt6Opcode), ids=lambda op: op.name)
def test_dt6_commands_equal_python_dali(opcode: Dt6Opcode) -> None:
    for address in OUR_ADDRESSES:
        ours = codec.dt6(address, opcode)
        theirs = PD_DT6[opcode](_pd_address(address))
        assert ours.frame == theirs.frame.as_integer
        assert ours.device_type == theirs.devicetype == 6
        _same_run_flags(ours, theirs)


@EXAMPLES
@given(any_address, byte)
def test_dapc_equals_python_dali(address: codec.Address, level: int) -> None:
    assert codec.dapc(address, level).frame == (
        pd_general.DAPC(_pd_address(address), level).frame.as_integer
    )


@EXAMPLES
@given(byte)
def test_special_commands_with_a_data_byte_equal_python_dali(value: int) -> None:
    pairs = [
        (codec.dtr0(value), pd_general.DTR0(value)),
        (codec.dtr1(value), pd_general.DTR1(value)),
        (codec.dtr2(value), pd_general.DTR2(value)),
        (codec.searchaddr_h(value), pd_general.SearchaddrH(value)),
        (codec.searchaddr_m(value), pd_general.SearchaddrM(value)),
        (codec.searchaddr_l(value), pd_general.SearchaddrL(value)),
        (codec.enable_device_type(value), pd_general.EnableDeviceType(value)),
        (codec.write_memory_location(value), pd_general.WriteMemoryLocation(value)),
        (codec.write_memory_location_no_reply(value), pd_general.WriteMemoryLocationNoReply(value)),
    ]
    for ours, theirs in pairs:
        assert ours.frame == theirs.frame.as_integer
        _same_run_flags(ours, theirs)


def test_addressing_special_commands_equal_python_dali() -> None:
    pairs: list[tuple[codec.Command, PdCommand]] = [
        (codec.terminate(), pd_general.Terminate()),
        (codec.randomise(), pd_general.Randomise()),
        (codec.compare(), pd_general.Compare()),
        (codec.withdraw(), pd_general.Withdraw()),
        (codec.ping(), pd_general.Ping()),
        (codec.query_short_address(), pd_general.QueryShortAddress()),
        (codec.initialise("all"), pd_general.Initialise(broadcast=True)),
        (codec.initialise("unaddressed"), pd_general.Initialise(address=None)),
        (codec.program_short_address(None), pd_general.ProgramShortAddress("MASK")),
    ]
    for n in range(64):
        pairs += [
            (codec.initialise(n), pd_general.Initialise(address=n)),
            (codec.program_short_address(n), pd_general.ProgramShortAddress(n)),
            (codec.verify_short_address(n), pd_general.VerifyShortAddress(n)),
        ]
    for ours, theirs in pairs:
        assert ours.frame == theirs.frame.as_integer, theirs
        _same_run_flags(ours, theirs)


def _pd_destination(theirs: Any) -> codec.Address:
    destination = theirs.destination
    if isinstance(destination, pd_address.GearShort):
        return Short(destination.address)
    if isinstance(destination, pd_address.GearGroup):
        return Group(destination.group)
    if isinstance(destination, pd_address.GearBroadcast):
        return BROADCAST
    assert isinstance(destination, pd_address.GearBroadcastUnaddressed)
    return BROADCAST_UNADDRESSED


def test_decode_frame_agrees_with_python_dali_on_every_frame() -> None:
    by_class = {cls: op for op, cls in PD_CLASSES.items()}
    specials = {cls: sp for sp, cls in PD_SPECIALS.items()}
    for frame in range(0x10000):
        ours = codec.decode_frame(frame)
        theirs = PdCommand.from_frame(ForwardFrame(16, frame))
        kind = ours.kind
        if kind is codec.FrameKind.DAPC:
            assert isinstance(theirs, pd_general.DAPC), hex(frame)
            assert (ours.address, ours.level) == (_pd_destination(theirs), theirs.power)
        elif kind is codec.FrameKind.COMMAND:
            assert by_class.get(type(theirs)) is ours.opcode, hex(frame)
            assert ours.address == _pd_destination(theirs)
            assert ours.param == getattr(theirs, "param", None), hex(frame)
        elif kind is codec.FrameKind.SPECIAL:
            assert specials.get(type(theirs)) is ours.special, hex(frame)
        elif kind is codec.FrameKind.EXTENDED:
            # Without a device type python-dali knows only 0xFF (extended version number).
            assert isinstance(
                theirs, pd_general.UnknownGearCommand | pd_general.QueryExtendedVersionNumber
            ), hex(frame)
        else:
            assert isinstance(theirs, pd_general.UnknownGearCommand), hex(frame)


def test_dt6_decoding_agrees_with_python_dali() -> None:
    by_class = {cls: op for op, cls in PD_DT6.items()}
    for opcode_byte in range(0xE0, 0x100):
        theirs = PdCommand.from_frame(ForwardFrame(16, 0x0B00 | opcode_byte), devicetype=6)
        ours = codec.describe(0x0B00 | opcode_byte, device_type=6)
        if type(theirs) in by_class:
            assert ours == f"DT6 {by_class[type(theirs)].label} to short 5"
        else:
            assert ours.startswith("APPLICATION EXTENDED"), ours


# --------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------


def test_query_status_bits() -> None:
    assert codec.Status.from_byte(0x04) == codec.Status(lamp_on=True)
    assert codec.Status.from_byte(0x02).lamp_failure
    assert codec.Status.from_byte(0x02).set_names() == ("lamp_failure",)
    assert codec.Status.from_byte(0x41).set_names() == ("gear_failure", "short_address_missing")
    assert codec.Status.from_byte(0x80).power_cycle_seen


def test_status_bits_are_in_python_dali_order() -> None:
    # python-dali's older names for the same bits, bit 0 first.
    assert pd_general.QueryStatusResponse.bits == [
        "ballast status",
        "lamp failure",
        "arc power on",
        "limit error",
        "fade ready",
        "reset state",
        "missing short address",
        "power failure",
    ]
    for bit in range(8):
        pd_names = pd_general.QueryStatusResponse(BackwardFrame(1 << bit)).status
        assert pd_names == [pd_general.QueryStatusResponse.bits[bit]]
    for bit in range(8):
        assert codec.Status.from_byte(1 << bit).to_byte() == 1 << bit
        assert len(codec.Status.from_byte(1 << bit).set_names()) == 1
    assert codec.Status.from_byte(1 << 6).short_address_missing


def test_led_failure_status_bits() -> None:
    status = codec.LedFailureStatus.from_byte(0x02)
    assert status.open_circuit and not status.short_circuit
    assert codec.LedFailureStatus.from_byte(0x01).short_circuit
    assert codec.LedFailureStatus.from_byte(0x80).reference_measurement_failed
    ours = [f.name.replace("_", " ") for f in dataclasses.fields(codec.LedFailureStatus)]
    theirs = [b.replace("shut down", "shutdown") for b in pd_led.LEDFailureStatusResponse.bits]
    assert ours[:6] == theirs[:6]
    assert theirs[6].startswith(ours[6])
    assert ours[7] == theirs[7]


@given(byte)
def test_status_bytes_round_trip(value: int) -> None:
    assert codec.Status.from_byte(value).to_byte() == value
    assert codec.LedFailureStatus.from_byte(value).to_byte() == value


@given(st.frozensets(st.integers(0, 15)))
def test_groups_from_the_two_query_groups_answers(groups: frozenset[int]) -> None:
    mask = sum(1 << g for g in groups)
    assert codec.groups_from_answers(mask & 0xFF, mask >> 8) == groups


def test_yes_no_reads_a_collision_as_yes() -> None:
    assert codec.yes_no(0xFF)
    assert codec.yes_no(0x12)  # a damaged YES is still somebody answering
    assert codec.yes_no(None, collision=True)
    assert not codec.yes_no(None)


def test_fade_times() -> None:
    assert codec.FADE_TIMES_S[0] == 0.0
    assert codec.FADE_TIMES_S[1] == pytest.approx(0.707, abs=1e-3)
    assert codec.FADE_TIMES_S[4] == 2.0
    assert codec.FADE_TIMES_S[15] == pytest.approx(90.51, abs=1e-2)
    for code, seconds in enumerate(codec.FADE_TIMES_S):
        assert codec.fade_time_code(seconds) == code
    assert codec.fade_time_code(0.3) == 0
    assert codec.fade_time_code(2.3) == 4
    assert codec.fade_time_code(90.51) == 15
    for bad in (-0.1, 91.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="fade time must be"):
            codec.fade_time_code(bad)


# --------------------------------------------------------------------------------------------
# Dimming curve
# --------------------------------------------------------------------------------------------

# Beckhoff's IEC-based DALI_TO_PERCENT table, to its three decimals.
BECKHOFF = [
    (1, 0.100),
    (10, 0.128),
    (85, 0.991),
    (100, 1.492),
    (128, 3.206),
    (150, 5.845),
    (200, 22.892),
    (254, 100.0),
]
# Neighbouring levels differ by this factor: three decades over 253 steps.
STEP_RATIO = 10 ** (3 / 253)


@pytest.mark.parametrize(("level", "percent"), BECKHOFF)
def test_curve_matches_the_beckhoff_table(level: int, percent: float) -> None:
    assert round(codec.arc_to_percent(level), 3) == percent
    assert codec.percent_to_arc(percent) == level


def test_curve_ends() -> None:
    assert codec.arc_to_percent(0) == 0.0
    assert codec.arc_to_percent(1) == 0.1
    assert codec.arc_to_percent(254) == 100.0
    assert codec.percent_to_arc(0) == 0
    assert codec.percent_to_arc(100) == 254
    assert codec.percent_to_arc(1e-9) == 1  # any light asked for is at least level 1
    assert codec.percent_to_arc(50) == 229
    assert codec.percent_to_arc(1) == 85


@pytest.mark.parametrize("bad", [-0.001, 100.001, math.nan, math.inf, -math.inf])
def test_percent_out_of_range_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match=r"percent must be 0\.\.100"):
        codec.percent_to_arc(bad)


def test_mask_is_not_a_level() -> None:
    with pytest.raises(ValueError, match="arc power level"):
        codec.arc_to_percent(codec.MASK)
    with pytest.raises(TypeError):
        codec.percent_to_arc(True)


def test_curve_is_strictly_increasing_and_round_trips_every_level() -> None:
    percents = [codec.arc_to_percent(n) for n in range(255)]
    assert all(a < b for a, b in itertools.pairwise(percents))
    for level in range(255):
        assert codec.percent_to_arc(codec.arc_to_percent(level)) == level


@EXAMPLES
@given(st.floats(min_value=0, max_value=100))
def test_percent_maps_to_the_closest_level(percent: float) -> None:
    level = codec.percent_to_arc(percent)
    achieved = codec.arc_to_percent(level)
    error = abs(achieved - percent)
    if percent == 0:
        assert level == 0
        return
    assert 1 <= level <= 254
    for neighbour in (level - 1, level + 1):
        if 1 <= neighbour <= 254:
            assert error <= abs(codec.arc_to_percent(neighbour) - percent)
    # Documented bound: half a step of the curve (1.39 % of the value), or the gap below
    # level 1 for requests under 0.1 %.
    assert error <= max(percent * (STEP_RATIO - 1) / 2, 0.1 - percent) + 1e-12


@EXAMPLES
@given(st.floats(min_value=0, max_value=100), st.floats(min_value=0, max_value=100))
def test_percent_to_arc_is_monotonic(a: float, b: float) -> None:
    low, high = sorted((a, b))
    assert codec.percent_to_arc(low) <= codec.percent_to_arc(high)


# --------------------------------------------------------------------------------------------
# Memory banks
# --------------------------------------------------------------------------------------------


def _answers_for(plan: memory.BankRead, read_bytes: Sequence[int | None]) -> list[int | None]:
    """One entry per command of ``plan``: ``read_bytes`` at the READ MEMORY LOCATION steps."""
    answers: list[int | None] = []
    remaining = list(read_bytes)
    for command in plan.commands():
        is_read = command.frame & 0xFF == Opcode.READ_MEMORY_LOCATION and command.frame < 0x8000
        answers.append(remaining.pop(0) if is_read else None)
    assert not remaining
    return answers


def test_active_power_read_from_the_notes() -> None:
    plan = memory.plan_read(5, memory.BANK_202, ["active_power"], latch=False)
    assert plan.frames() == (0xC3CA, 0xA30B, 0x0BC5, 0x0BC5, 0x0BC5, 0x0BC5, 0x0BC5)
    assert plan.decode(_answers_for(plan, [0x00, 0x00, 0x00, 0x00, 0x23])) == {"active_power": 35}
    decoded = plan.decode(_answers_for(plan, [0xFF, 0x00, 0x00, 0x01, 0x5E]))
    assert decoded == {"active_power": 35.0}
    assert isinstance(decoded["active_power"], float)


def test_gear_temperature_read_from_the_notes() -> None:
    plan = memory.plan_read(5, memory.BANK_205, ["gear_temperature"], latch=False)
    assert plan.frames() == (0xC3CD, 0xA31B, 0x0BC5)
    assert plan.decode(_answers_for(plan, [95])) == {"gear_temperature": 35}
    assert memory.BANK_205.units["gear_temperature"] == "°C"


def test_latched_read_latches_reads_and_unlatches() -> None:
    plan = memory.plan_read(5, memory.BANK_202)
    assert plan.latch
    assert plan.frames() == (
        0xC3CA,  # DTR1 = 202
        0x0B81,  # ENABLE WRITE MEMORY (send twice)
        0xA302,  # DTR0 = 2, the lock byte
        0xC9AA,  # WRITE MEMORY LOCATION NO REPLY 0xAA: latch
        0xA304,  # DTR0 = 4, the first field
        *([0x0BC5] * 12),  # 0x04..0x0F
        0x0B81,  # writing was disabled by the reads: enable it again
        0xA302,
        0xC9FF,  # unlatch
    )
    assert [c.send_twice for c in plan.commands()].count(True) == 2
    values = plan.decode(_answers_for(plan, [0x00, 0, 0, 0, 0, 0x30, 0x39, 0xFE, 0, 0, 0x0D, 0xAC]))
    assert values == {"active_energy": 12345, "active_power": 35.0}  # 3500 x 10^-2


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ([0x00, 0xFF, 0xFF, 0xFF, 0xFF], None),  # MASK: not available
        ([0x00, 0xFF, 0xFF, 0xFF, 0xFE], None),  # TMASK: temporarily unavailable
        ([0x07, 0x00, 0x00, 0x00, 0x01], None),  # exponent outside -6..6
        ([0x03, 0x00, 0x00, 0x00, 0x02], 2000),
        ([0xFA, 0x00, 0x0F, 0x42, 0x40], 1.0),  # 1 000 000 µW
        ([0x00, 0x00, 0x00, None, 0x01], None),  # an unanswered byte
    ],
)
def test_active_power_special_values(raw: list[int | None], expected: float | None) -> None:
    assert memory.BANK_202.field("active_power").decode(raw) == expected


def test_flags_counters_and_fixed_scales() -> None:
    bank = memory.BANK_206
    assert bank.field("light_open_circuit").decode([1]) is True
    assert bank.field("light_open_circuit").decode([0]) is False
    assert bank.field("light_open_circuit").decode([2]) is None
    assert bank.field("light_open_circuit").decode([0xFE]) is None
    assert bank.field("light_open_circuit_count").decode([0xFD]) == 0xFD
    assert bank.field("light_open_circuit_count").decode([0xFE]) is None
    assert bank.field("light_voltage").decode([0x08, 0xFC]) == 230.0
    assert bank.field("light_current").decode([0x01, 0x5E]) == 0.35
    assert memory.BANK_205.field("gear_power_factor").decode([95]) == 0.95
    assert memory.BANK_205.field("gear_power_factor").decode([101]) is None
    assert memory.BANK_205.field("gear_temperature").decode([0]) == -60


def test_plan_errors() -> None:
    with pytest.raises(KeyError, match="no field 'power'"):
        memory.plan_read(5, memory.BANK_202, ["power"])
    with pytest.raises(ValueError, match="has no latch"):
        memory.plan_read(5, memory.BANK_0, latch=True)
    with pytest.raises(ValueError, match="short address"):
        memory.plan_read(64, memory.BANK_202)
    plan = memory.plan_read(5, memory.BANK_202)
    with pytest.raises(ValueError, match="one per command"):
        plan.decode([None])


answer = st.one_of(st.none(), byte)


@EXAMPLES
@given(st.sampled_from(sorted(memory.BANKS)), st.data())
def test_decode_never_raises_on_arbitrary_answers(number: int, data: st.DataObject) -> None:
    bank = memory.BANKS[number]
    plan = memory.plan_read(5, bank)
    answers = data.draw(
        st.lists(answer, min_size=len(plan.commands()), max_size=len(plan.commands()))
    )
    values = plan.decode(answers)
    assert set(values) == {f.name for f in bank.fields}
    assert all(v is None or isinstance(v, int | float) for v in values.values())


def test_field_names_are_unique_across_banks() -> None:
    names = [f.name for bank in memory.BANKS.values() for f in bank.fields]
    assert len(names) == len(set(names))


# Our fields against python-dali's memory maps: same locations, same decoded values.
PD_BANKS = {
    0: pd_info.BANK_0,
    1: pd_oem.BANK_1,
    202: pd_energy.BANK_202,
    203: pd_energy.BANK_203,
    204: pd_energy.BANK_204,
    205: pd_diagnostics.BANK_205,
    206: pd_diagnostics.BANK_206,
}
# Fields we split or do not map one-to-one onto a python-dali value.
SPLIT_FIELDS = {
    "firmware_version_major",
    "firmware_version_minor",
    "hardware_version_major",
    "hardware_version_minor",
}


def _pd_value_classes() -> dict[tuple[int, int, int], Any]:
    found: dict[tuple[int, int, int], Any] = {}
    for number, bank in PD_BANKS.items():
        for value in bank.values:
            offsets = [location.address for location in value.locations]
            found[(number, offsets[0], len(offsets))] = value
    return found


PD_VALUES = _pd_value_classes()


def test_bank_maps_match_python_dali_locations() -> None:
    for number, bank in memory.BANKS.items():
        assert bank.last_address >= max(f.last for f in bank.fields)
        for f in bank.fields:
            if f.name in SPLIT_FIELDS:
                continue
            assert (number, f.offset, f.length) in PD_VALUES, (number, f.name)


@EXAMPLES
@given(st.sampled_from(sorted(memory.BANKS)), st.data())
def test_field_values_match_python_dali(number: int, data: st.DataObject) -> None:
    bank = memory.BANKS[number]
    for f in bank.fields:
        if f.name in SPLIT_FIELDS:
            continue
        # Bias towards the special patterns: all 0xFF, 0xFF..FE, and edge values.
        raw = data.draw(
            st.one_of(
                st.lists(byte, min_size=f.length, max_size=f.length),
                st.just([0xFF] * f.length),
                st.just([0xFF] * (f.length - 1) + [0xFE]),
                st.lists(
                    st.sampled_from([0x00, 0x01, 0xFD, 0xFE, 0xFF]),
                    min_size=f.length,
                    max_size=f.length,
                ),
            )
        )
        theirs_class = PD_VALUES[(number, f.offset, f.length)]
        flag = theirs_class.check_raw(bytes(raw))
        ours = f.decode(raw)
        if flag is not None:
            assert isinstance(flag, FlagValue)
            assert ours is None, (f.name, raw, flag)
            continue
        theirs = theirs_class.raw_to_value(bytes(raw))
        if ours is None:
            # We are stricter in two places: an all-0xFF identification value (the factory
            # "not set", which python-dali returns as a number) and the special CCT codes
            # python-dali returns as text ("Part 209 implemented").
            unset = raw == [0xFF] * f.length and number in (0, 1)
            assert unset or isinstance(theirs, str), (f.name, raw, theirs)
        else:
            assert float(ours) == pytest.approx(float(theirs), rel=1e-12), (f.name, raw)


class _Bank202(pd_fakes.FakeMemoryBank):
    bank = pd_energy.BANK_202
    # 12 345 Wh (scale 0), 35.0 W (scale -1)
    initial_contents = [0x0F, None, 0xFF, 0x01, 0x00, 0, 0, 0, 0, 0x30, 0x39, 0xFF, 0, 0, 1, 0x5E]


class _Bank205(pd_fakes.FakeMemoryBank):
    bank = pd_diagnostics.BANK_205
    initial_contents = [
        0x1C, None, 0xFF, 0x01,
        0x00, 0x01, 0x51, 0x80,  # operating time 86 400 s
        0x00, 0x00, 0x2A,  # 42 starts
        0x08, 0xFC,  # 230.0 V
        50, 95,  # 50 Hz, PF 0.95
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,  # no failures
        95, 80,  # 35 °C, 80 %
    ]  # fmt: skip


def _run_on_fake_gear(gear: pd_fakes.Gear, plan: memory.BankRead) -> list[int | None]:
    """Our frames, decoded by python-dali and executed by its fake control gear."""
    bus = pd_fakes.Bus([gear])
    answers: list[int | None] = []
    for ours in plan.commands():
        theirs = PdCommand.from_frame(ForwardFrame(16, ours.frame))
        for _ in range(2 if ours.send_twice else 1):
            response = bus.send(theirs)
        raw = response.raw_value if response is not None else None
        answers.append(raw.as_integer if raw is not None else None)
    return answers


def test_plans_run_on_python_dali_fake_gear() -> None:
    gear = pd_fakes.Gear(
        shortaddr=5, memory_banks=(pd_fakes.FakeBank0, pd_fakes.FakeBank1, _Bank202, _Bank205)
    )
    energy = memory.plan_read(5, memory.BANK_202)
    assert energy.decode(_run_on_fake_gear(gear, energy)) == {
        "active_energy": 12345,
        "active_power": 35.0,
    }
    # The unlatch only works because the plan enables writing again after the reads.
    lock = next(b for b in gear.memory_banks.values() if b.bank is pd_energy.BANK_202)
    assert lock.contents[memory.LOCK_BYTE] == memory.UNLATCH
    diagnostics = memory.plan_read(5, memory.BANK_205)
    values = diagnostics.decode(_run_on_fake_gear(gear, diagnostics))
    assert values["gear_operating_time"] == 86400
    assert values["gear_start_count"] == 42
    assert values["gear_supply_voltage"] == 230.0
    assert values["gear_power_factor"] == 0.95
    assert values["gear_failure"] is False
    assert values["gear_temperature"] == 35
    assert values["gear_output_current"] == 80
    identity = memory.plan_read(5, memory.BANK_0)
    values = identity.decode(_run_on_fake_gear(gear, identity))
    assert values["gtin"] == 1234567654321
    assert (values["firmware_version_major"], values["firmware_version_minor"]) == (1, 0)
    assert values["identification_number"] == 1
    # Bank 1 holds only its factory defaults: every value is "not set" but the format id.
    luminaire = memory.plan_read(5, memory.BANK_1)
    values = luminaire.decode(_run_on_fake_gear(gear, luminaire))
    assert values.pop("content_format_id") == 3
    assert set(values.values()) == {None}
    # A bank the gear does not have answers nothing.
    absent = memory.plan_read(5, memory.BANK_206)
    assert set(absent.decode(_run_on_fake_gear(gear, absent)).values()) == {None}
    # Another short address: nobody answers.
    other = memory.plan_read(6, memory.BANK_202)
    assert set(other.decode(_run_on_fake_gear(gear, other)).values()) == {None}
