"""The Modbus driver: configuration checks, read planning, and behaviour against the Modbus
simulator over TCP on loopback and over RTU on a pseudo-terminal."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import load_profile
from agent.sdk import (
    BusSpec,
    BusUnavailable,
    ConfigError,
    ConfigTable,
    DeviceSpec,
    DeviceUnreachable,
    FatalDriverError,
    PointSpec,
    Profile,
    Quality,
    Reading,
)
from drivers.modbus import ModbusDriver, link
from drivers.modbus.plan import (
    MAX_BITS_PER_REQUEST,
    MAX_GAP_REGISTERS,
    MAX_REGISTERS_PER_REQUEST,
    PlannedPoint,
    parse_point,
    plan_reads,
)
from firmware_sim.modbus import (
    EnergyMeter,
    ExceptionCode,
    LampController,
    MemoryDevice,
    ModbusSimulator,
)

PROFILES = Path(__file__).resolve().parent.parent / "config" / "profiles"
TIMEOUT_S = 0.3
TEST_BOUND_S = 15.0
TRANSPORTS = pytest.mark.parametrize("transport", ["tcp", "rtu"])

LAMP_1, LAMP_2, METER, MEMORY, HOLEY, ABSENT = 1, 2, 10, 20, 30, 99


# Helpers ---------------------------------------------------------------------------------------
@cache
def profile(name: str) -> Profile:
    return load_profile(PROFILES / f"{name}.toml", drivers={"modbus": ModbusDriver})


def point(name: str, unit: str = "", *, writable: bool = False, **options: Any) -> PointSpec:
    table = ConfigTable(data=options, file="test.toml", path=f"points.{name}")
    return PointSpec(name, unit, writable, None, table)


def make_profile(name: str, points: Sequence[PointSpec]) -> Profile:
    return Profile(name, "modbus", {p.name: p for p in points}, "test.toml")


MEMORY_PROFILE = make_profile(
    "memory",
    [
        point(
            "counter",
            "",
            writable=True,
            kind="holding",
            address=10,
            type="int32",
            word_order="little",
        ),
        point("gain", "", writable=True, kind="holding", address=12, type="float32"),
        point("trim", "V", writable=True, kind="holding", address=14, type="int16", scale=0.1),
        point("relay", "", writable=True, kind="coil", address=3),
        point("door_open", "", kind="discrete", address=5),
        point("door_closed", "", kind="discrete", address=6, type="bool"),
        point("runtime", "s", kind="input", address=100, type="uint32"),
        point("setting", "", kind="holding", address=20),
    ],
)
# Input registers 0..2 and 6 exist, 3..5 do not (see HoleyDevice).
HOLEY_PROFILE = make_profile(
    "holey",
    [
        point("a", kind="input", address=0),
        point("b", kind="input", address=1, type="uint32"),
        point("c", kind="input", address=6),
    ],
)


class HoleyDevice(MemoryDevice):
    """A register map with a hole, as meters have: reading through it is refused."""

    def input_registers(self) -> Mapping[int, int]:
        return {0: 11, 1: 0, 2: 22, 6: 66}


class FrozenClock:
    """Simulated devices' clock, stopped so counters and temperatures hold still."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


class Context:
    logger = logging.getLogger("test.modbus")

    def emit(self, readings: Sequence[Reading]) -> None:
        raise AssertionError("a polled driver emits nothing")

    def event(self, kind: str, device: str | None, detail: Mapping[str, Any]) -> None:
        raise AssertionError("not expected")


def device(device_id: str, unit: int, prof: Profile) -> DeviceSpec:
    options = ConfigTable(data={"unit": unit}, file="test.toml", path=f"devices.{device_id}")
    return DeviceSpec(device_id, "line-1", prof, 1.0, options)


def bus(**options: Any) -> BusSpec:
    return BusSpec(
        "line-1", "modbus", ConfigTable(data=options, file="test.toml", path="buses.line-1")
    )


@dataclass
class Rig:
    sim: ModbusSimulator
    driver: ModbusDriver
    bus: BusSpec
    lamp1: LampController
    lamp2: LampController
    meter: EnergyMeter
    memory: MemoryDevice
    devices: dict[str, DeviceSpec]

    async def read(
        self, device_id: str, points: Sequence[PointSpec] | None = None
    ) -> dict[str, Reading]:
        spec = self.devices[device_id]
        chosen = list(spec.profile.points.values()) if points is None else points
        readings = await self.driver.read(spec, chosen)
        assert len(readings) == len(chosen)
        return {r.point: r for r in readings}

    def values(self, readings: dict[str, Reading]) -> dict[str, Any]:
        assert all(r.quality is Quality.GOOD for r in readings.values()), readings
        return {name: r.value for name, r in readings.items()}


@asynccontextmanager
async def rig(transport: str, **sim_options: Any) -> AsyncIterator[Rig]:
    clock = FrozenClock()
    lamp1 = LampController(setpoint=40, energy_wh=1234.9, burning_hours=56.78, clock=clock)
    lamp2 = LampController(setpoint=70, energy_wh=10.0, clock=clock)
    meter = EnergyMeter(lamps=[lamp1, lamp2], clock=clock, seed=7)
    memory = MemoryDevice(size=200)
    sim = ModbusSimulator(
        {LAMP_1: lamp1, LAMP_2: lamp2, METER: meter, MEMORY: memory, HOLEY: HoleyDevice()},
        **sim_options,
    )
    devices = {
        "lamp-1": device("lamp-1", LAMP_1, profile("lamp-controller")),
        "lamp-2": device("lamp-2", LAMP_2, profile("lamp-controller")),
        "meter": device("meter", METER, profile("sdm630")),
        "memory": device("memory", MEMORY, MEMORY_PROFILE),
        "holey": device("holey", HOLEY, HOLEY_PROFILE),
        "absent": device("absent", ABSENT, profile("lamp-controller")),
    }
    driver: ModbusDriver | None = None
    try:
        if transport == "tcp":
            port = await sim.start_tcp("127.0.0.1", 0)
            spec = bus(transport="tcp", host="127.0.0.1", port=port, timeout_s=TIMEOUT_S)
        else:
            path = await sim.start_rtu()
            spec = bus(transport="rtu", device=path, baudrate=19200, timeout_s=TIMEOUT_S)
        ModbusDriver.validate_bus(spec)
        driver = ModbusDriver(spec, list(devices.values()), Context())
        await driver.connect()
        yield Rig(sim, driver, spec, lamp1, lamp2, meter, memory, devices)
    finally:
        if driver is not None:
            await driver.close()
        await sim.stop()
        assert sim.internal_errors == 0


def run(body: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(TEST_BOUND_S):
            await body()

    asyncio.run(bounded())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# Configuration ---------------------------------------------------------------------------------
def test_bus_tables_for_tcp_and_rtu_are_accepted() -> None:
    ModbusDriver.validate_bus(bus(transport="tcp", host="10.0.0.5"))
    ModbusDriver.validate_bus(
        bus(
            transport="rtu",
            device="/dev/ttyUSB0",
            baudrate=9600,
            parity="E",
            stopbits=1,
            bytesize=8,
            timeout_s=0.5,
            inter_request_gap_s=0.01,
        )
    )


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (
            {"transport": "tcp", "host": "h", "baud": 9600},
            "test.toml:7: buses.line-1.baud: unknown key; expected one of:",
        ),
        ({"transport": "tcp", "host": "h", "baudrate": 9600}, "buses.line-1.baudrate: unknown"),
        ({"transport": "rtu", "device": "/dev/x", "host": "h"}, "buses.line-1.host: unknown"),
        ({"transport": "udp", "host": "h"}, "expected one of 'tcp', 'rtu', got 'udp'"),
        ({"host": "h"}, "missing key 'transport'"),
        ({"transport": "tcp"}, "missing key 'host'"),
        ({"transport": "tcp", "host": " "}, "buses.line-1.host: expected a host name"),
        ({"transport": "tcp", "host": "h", "port": 0}, "expected a value from 1 to 65535"),
        ({"transport": "tcp", "host": "h", "timeout_s": 0}, "expected a number above 0.0"),
        ({"transport": "tcp", "host": "h", "inter_request_gap_s": -1}, "at least 0.0"),
        ({"transport": "rtu", "device": "/dev/x", "parity": "X"}, "'N', 'E', 'O', got 'X'"),
        ({"transport": "rtu", "device": "/dev/x", "stopbits": 3}, "from 1 to 2"),
        ({"transport": "rtu", "device": "/dev/x", "bytesize": 6}, "from 7 to 8"),
        ({"transport": "rtu"}, "missing key 'device'"),
    ],
)
def test_bad_bus_tables_are_refused_with_file_line_and_key(
    options: dict[str, Any], fragment: str
) -> None:
    lines = {key: 7 for key in options}
    table = ConfigTable(data=options, file="test.toml", path="buses.line-1", key_lines=lines)
    with pytest.raises(ConfigError) as info:
        ModbusDriver.validate_bus(BusSpec("line-1", "modbus", table))
    assert fragment in str(info.value)


def test_device_tables_need_a_unit_id_in_range() -> None:
    ModbusDriver.validate_device(device("d", 247, profile("lamp-controller")))
    cases: list[tuple[dict[str, Any], str]] = [
        ({"unit": 248}, "devices.d.unit: expected a value from 0 to 247, got 248"),
        ({}, "missing key 'unit'"),
        ({"unit": 1, "slave": 2}, "devices.d.slave: unknown key; expected one of: unit"),
        ({"unit": "1"}, "expected an integer"),
    ]
    for options, fragment in cases:
        table = ConfigTable(data=options, file="test.toml", path="devices.d")
        spec = DeviceSpec("d", "line-1", profile("lamp-controller"), 1.0, table)
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            ModbusDriver.validate_device(spec)


def test_the_shipped_profiles_validate() -> None:
    assert len(profile("lamp-controller").points) == 7
    assert len(profile("sdm630").points) == 14


@pytest.mark.parametrize(
    ("options", "writable", "fragment"),
    [
        ({"kind": "register", "address": 0}, False, "expected one of 'holding', 'input'"),
        ({"kind": "holding"}, False, "missing key 'address'"),
        ({"kind": "holding", "address": 65536}, False, "from 0 to 65535"),
        ({"kind": "holding", "address": 65535, "type": "uint32"}, False, "goes past 65535"),
        ({"kind": "holding", "address": 0, "type": "bool"}, False, "expected one of 'int16'"),
        ({"kind": "coil", "address": 0, "type": "uint16"}, False, "expected one of 'bool'"),
        ({"kind": "coil", "address": 0, "scale": 2.0}, False, "not used by coil points"),
        ({"kind": "holding", "address": 0, "word_order": "big"}, False, "only applies to 32-bit"),
        (
            {"kind": "input", "address": 0, "type": "int32", "word_order": "mid"},
            False,
            "'big', 'little'",
        ),
        ({"kind": "holding", "address": 0, "scale": 0}, False, "non-zero"),
        ({"kind": "holding", "address": 0, "adress": 1}, False, "points.p.adress: unknown key"),
        ({"kind": "input", "address": 0}, True, "input points are read-only"),
        ({"kind": "discrete", "address": 0}, True, "discrete points are read-only"),
    ],
)
def test_bad_points_are_refused(options: dict[str, Any], writable: bool, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        ModbusDriver.validate_point(point("p", writable=writable, **options))
    assert fragment in str(info.value)


# Read planning ---------------------------------------------------------------------------------
def spans(points: Sequence[PointSpec]) -> list[tuple[str, int, int]]:
    planned = plan_reads(PlannedPoint(p, parse_point(p)) for p in points)
    return [(r.kind, r.address, r.count) for r in planned]


def test_the_lamp_controller_is_read_in_two_requests() -> None:
    assert spans(list(profile("lamp-controller").points.values())) == [
        ("holding", 0, 1),
        ("input", 0, 8),
    ]


def test_the_meter_is_read_in_one_request_per_register_block() -> None:
    assert spans(list(profile("sdm630").points.values())) == [
        ("input", 0, 18),
        ("input", 52, 2),
        ("input", 70, 6),
        ("input", 342, 2),
    ]


def test_small_gaps_are_read_through_and_large_ones_are_not() -> None:
    near = [
        point("a", kind="holding", address=0),
        point("b", kind="holding", address=1 + MAX_GAP_REGISTERS),
    ]
    far = [
        point("a", kind="holding", address=0),
        point("b", kind="holding", address=2 + MAX_GAP_REGISTERS),
    ]
    assert spans(near) == [("holding", 0, 2 + MAX_GAP_REGISTERS)]
    assert len(spans(far)) == 2


def test_requests_respect_the_protocol_limits() -> None:
    registers = [point(f"r{i}", kind="input", address=i * 2, type="uint32") for i in range(200)]
    coils = [point(f"c{i}", kind="coil", address=i) for i in range(4500)]
    assert [c for _, _, c in spans(registers)] == [124, 124, 124, 28]
    assert [c for _, _, c in spans(coils)] == [2000, 2000, 500]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["holding", "input", "coil", "discrete"]),
            st.integers(min_value=0, max_value=400),
            st.sampled_from(["uint16", "int32", "float32"]),
        ),
        min_size=1,
        max_size=60,
    )
)
def test_every_point_is_read_once_within_limits(raw: list[tuple[str, int, str]]) -> None:
    points = []
    for index, (kind, address, type_) in enumerate(raw):
        options: dict[str, Any] = {"kind": kind, "address": address}
        if kind in ("holding", "input"):
            options["type"] = type_
        points.append(point(f"p{index}", **options))
    requests = plan_reads(PlannedPoint(p, parse_point(p)) for p in points)
    seen = [planned.spec.name for r in requests for planned in r.points]
    assert sorted(seen) == sorted(p.name for p in points)
    for request in requests:
        bits = request.kind in ("coil", "discrete")
        assert 1 <= request.count <= (MAX_BITS_PER_REQUEST if bits else MAX_REGISTERS_PER_REQUEST)
        for planned in request.points:
            assert planned.address.kind == request.kind
            assert request.address <= planned.address.address
            assert planned.address.end <= request.address + request.count
    # Requests of one kind never overlap, so no register is read twice.
    for kind in ("holding", "input", "coil", "discrete"):
        ranges = sorted((r.address, r.address + r.count) for r in requests if r.kind == kind)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(ranges))


# Reading and writing against the simulator ----------------------------------------------------
@TRANSPORTS
def test_every_lamp_point_matches_the_simulator_in_one_request_per_span(transport: str) -> None:
    async def body() -> None:
        async with rig(transport) as r:
            r.lamp2.fail_lamp()
            one = r.values(await r.read("lamp-1"))
            assert one == {
                "level_setpoint": 40,
                "actual_level": 40,
                "lamp_power": 24.0,
                "energy": 1234,
                "burning_hours": 56.78,
                "lamp_failure": 0,
                "driver_temperature": 20.0,
            }
            assert r.lamp1.requests_by_function == {3: 1, 4: 1}
            two = r.values(await r.read("lamp-2"))
            assert (two["level_setpoint"], two["actual_level"], two["lamp_failure"]) == (70, 0, 1)
            assert two["lamp_power"] == 0.0
            readings = await r.read("lamp-1")
            assert readings["lamp_power"].unit == "W"
            assert readings["driver_temperature"].unit == "°C"
            assert readings["lamp_power"].ts_ms > 0
            assert r.lamp1.requests_by_function == {3: 2, 4: 2}

    run(body)


@TRANSPORTS
def test_every_meter_point_matches_the_simulator(transport: str) -> None:
    async def body() -> None:
        async with rig(transport) as r:
            values = r.values(await r.read("meter"))
            assert r.meter.requests_by_function == {4: 4}
            # lamp 1 (24 W) on L1 with the cabinet's 12 W, lamp 2 (42 W) on L2
            assert (values["power_l1"], values["power_l2"], values["power_l3"]) == (36, 42, 0)
            assert values["total_power"] == 78.0
            for phase in ("l1", "l2", "l3"):
                voltage = values[f"voltage_{phase}"]
                assert 225.0 < voltage < 235.0
                expected = values[f"power_{phase}"] / (voltage * 0.95)
                assert values[f"current_{phase}"] == pytest.approx(expected, rel=1e-5)
            assert 49.5 < values["frequency"] < 50.5
            assert values["import_energy"] == pytest.approx(r.meter.import_kwh, rel=1e-6)
            assert values["export_energy"] == 0.0
            assert values["total_energy"] == pytest.approx(r.meter.import_kwh, rel=1e-6)

    run(body)


@TRANSPORTS
def test_writing_the_set_point_then_reading_back(transport: str) -> None:
    async def body() -> None:
        async with rig(transport) as r:
            lamp = r.devices["lamp-1"]
            setpoint = lamp.profile.points["level_setpoint"]
            await r.driver.write(lamp, setpoint, 85)
            assert r.lamp1.setpoint == 85
            assert r.lamp1.writes == {0: 1}
            assert r.lamp1.requests_by_function[6] == 1
            r.lamp1.max_level = 60
            values = r.values(await r.read("lamp-1"))
            assert (values["level_setpoint"], values["actual_level"]) == (85, 60)

            with pytest.raises(FatalDriverError, match="ILLEGAL DATA VALUE"):
                await r.driver.write(lamp, setpoint, 101)
            assert r.lamp1.setpoint == 85
            requests = r.lamp1.requests
            with pytest.raises(
                ValueError, match=re.escape("lamp-1.level_setpoint: 70000 is out of range")
            ):
                await r.driver.write(lamp, setpoint, 70000)
            with pytest.raises(FatalDriverError, match="not writable"):
                await r.driver.write(lamp, lamp.profile.points["actual_level"], 1)
            assert r.lamp1.requests == requests  # refused before anything was sent

    run(body)


@TRANSPORTS
def test_32_bit_registers_coils_and_discrete_inputs(transport: str) -> None:
    async def body() -> None:
        async with rig(transport) as r:
            memory = r.devices["memory"]
            points = memory.profile.points
            await r.driver.write(memory, points["counter"], -123456)
            await r.driver.write(memory, points["gain"], 12.5)
            await r.driver.write(memory, points["trim"], -5.3)
            await r.driver.write(memory, points["relay"], True)
            assert r.memory.get_value("holding", 10, "int32", "little") == -123456
            assert r.memory.get_value("holding", 12, "float32") == 12.5
            assert r.memory.get_value("holding", 14, "int16") == -53
            assert r.memory.coil[3] is True
            assert r.memory.requests_by_function == {16: 2, 6: 1, 5: 1}
            r.memory.discrete[6] = True
            r.memory.set_value("input", 100, 4_000_000_000, "uint32")
            r.memory.holding[20] = 7
            values = r.values(await r.read("memory"))
            assert values == {
                "counter": -123456,
                "gain": 12.5,
                "trim": -5.3,
                "relay": True,
                "door_open": False,
                "door_closed": True,
                "runtime": 4_000_000_000,
                "setting": 7,
            }
            await r.driver.write(memory, points["relay"], 0)
            assert r.memory.coil[3:4] == [False]
            with pytest.raises(ValueError, match="a coil takes true/false"):
                await r.driver.write(memory, points["relay"], 0.5)

    run(body)


@TRANSPORTS
def test_an_exception_reply_makes_only_its_points_bad(transport: str) -> None:
    async def body() -> None:
        async with rig(transport) as r:
            nowhere = point("nowhere", "V", kind="input", address=200, type="float32")
            meter = r.devices["meter"]
            chosen = [
                meter.profile.points["voltage_l1"],
                nowhere,
                meter.profile.points["frequency"],
            ]
            readings = await r.read("meter", chosen)
            assert readings["nowhere"].quality is Quality.BAD
            assert readings["nowhere"].value is None
            assert readings["nowhere"].unit == "V"
            assert readings["voltage_l1"].quality is Quality.GOOD
            assert readings["frequency"].quality is Quality.GOOD

            r.lamp1.faults.exception_code = ExceptionCode.SERVER_DEVICE_FAILURE
            errors = r.driver.health().errors
            readings = await r.read("lamp-1")
            assert {reading.quality for reading in readings.values()} == {Quality.BAD}
            assert r.driver.health().errors == errors + 2
            assert r.driver.health().last_error == "unit 1: SERVER DEVICE FAILURE"

    run(body)


@TRANSPORTS
def test_a_span_refused_for_its_hole_is_reread_in_parts_from_then_on(transport: str) -> None:
    async def body() -> None:
        async with rig(transport) as r:
            holey = r.sim.unit(HOLEY)
            assert r.values(await r.read("holey")) == {"a": 11, "b": 22, "c": 66}
            assert holey.requests_by_function == {4: 3}  # 0..6 refused, then 0..2 and 6
            assert r.values(await r.read("holey")) == {"a": 11, "b": 22, "c": 66}
            assert holey.requests_by_function == {4: 5}

    run(body)


@TRANSPORTS
def test_no_answer_is_device_unreachable_and_the_line_keeps_working(transport: str) -> None:
    async def body() -> None:
        async with rig(transport) as r:
            r.lamp1.faults.no_answer = True
            with pytest.raises(
                DeviceUnreachable, match=re.escape("lamp-1: unit 1: no reply within 0.3 s")
            ):
                await r.read("lamp-1")
            assert r.values(await r.read("lamp-2"))["level_setpoint"] == 70
            health = r.driver.health()
            assert (health.timeouts, health.connected) == (1, True)
            with pytest.raises(DeviceUnreachable):
                await r.read("absent")

    run(body)


@TRANSPORTS
def test_a_late_reply_is_never_taken_for_the_next_requests(
    transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Generous margins so the test does not depend on how busy the machine is: the late
    # reply comes 0.1 s after the timeout, the driver waits 0.3 s before using the line again.
    monkeypatch.setattr(link, "AFTER_TIMEOUT_GAP_S", 0.3)

    async def body() -> None:
        async with rig(transport) as r:
            r.lamp1.faults.delay_s = TIMEOUT_S + 0.1
            with pytest.raises(DeviceUnreachable, match="no reply"):
                await r.read("lamp-1")
            # Another unit on the same line gets its own values, not lamp 1's late ones.
            assert r.values(await r.read("lamp-2"))["level_setpoint"] == 70
            # The same unit and function too: the stale reply (40) must not be taken.
            with pytest.raises(DeviceUnreachable, match="no reply"):
                await r.read("lamp-1")
            r.lamp1.faults.delay_s = 0.0
            r.lamp1.setpoint = 55
            assert r.values(await r.read("lamp-1"))["level_setpoint"] == 55

    run(body)


@TRANSPORTS
def test_a_late_reply_to_another_function_is_not_taken_as_the_answer(
    transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the pause after a timeout, only the reply checks stand between a late FC04
    # reply (actual level 10) and the FC03 request that follows (set point 40).
    monkeypatch.setattr(link, "AFTER_TIMEOUT_GAP_S", 0.0)

    async def body() -> None:
        async with rig(transport) as r:
            points = r.devices["lamp-1"].profile.points
            r.lamp1.max_level = 10
            r.lamp1.faults.delay_s = TIMEOUT_S + 0.1
            with pytest.raises(DeviceUnreachable, match="no reply"):
                await r.read("lamp-1", [points["actual_level"]])
            r.lamp1.faults.delay_s = 0.0
            try:
                readings = await r.read("lamp-1", [points["level_setpoint"]])
            except DeviceUnreachable as exc:
                assert "function code 4, expected 3" in str(exc)
            else:
                assert r.values(readings) == {"level_setpoint": 40}
            await asyncio.sleep(TIMEOUT_S)
            assert r.values(await r.read("lamp-1", [points["level_setpoint"]])) == {
                "level_setpoint": 40
            }

    run(body)


@TRANSPORTS
def test_a_cancelled_read_does_not_leave_its_reply_for_the_next_one(
    transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(link, "AFTER_TIMEOUT_GAP_S", 0.4)

    async def body() -> None:
        async with rig(transport) as r:
            r.lamp1.faults.delay_s = 0.15
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await r.read("lamp-1")
            r.lamp1.faults.delay_s = 0.0
            r.lamp1.setpoint = 33
            assert r.values(await r.read("lamp-1"))["level_setpoint"] == 33

    run(body)


@TRANSPORTS
def test_concurrent_reads_on_one_line_each_get_their_own_reply(transport: str) -> None:
    async def body() -> None:
        async with rig(transport) as r:
            one, two, meter = await asyncio.gather(
                r.read("lamp-1"), r.read("lamp-2"), r.read("meter")
            )
            assert r.values(one)["level_setpoint"] == 40
            assert r.values(two)["level_setpoint"] == 70
            assert r.values(meter)["total_power"] == 78.0

    run(body)


@TRANSPORTS
def test_garbage_is_device_unreachable_and_the_driver_stays_usable(transport: str) -> None:
    async def body() -> None:
        async with rig(transport) as r:
            r.lamp1.faults.garbage = True
            with pytest.raises(DeviceUnreachable):
                await r.read("lamp-1")
            r.lamp1.faults.garbage = False
            assert r.values(await r.read("lamp-1"))["level_setpoint"] == 40
            assert r.driver.health().connected

    run(body)


def test_a_bad_crc_is_device_unreachable_and_the_driver_stays_usable() -> None:
    async def body() -> None:
        async with rig("rtu") as r:
            r.lamp1.faults.bad_crc = True
            with pytest.raises(DeviceUnreachable):
                await r.read("lamp-1")
            r.lamp1.faults.bad_crc = False
            assert r.values(await r.read("lamp-1"))["level_setpoint"] == 40
            assert r.values(await r.read("lamp-2"))["level_setpoint"] == 70

    run(body)


def test_a_gateway_saying_the_device_is_silent_is_device_unreachable() -> None:
    async def body() -> None:
        async with rig("tcp", gateway_exception=0x0B) as r:
            with pytest.raises(DeviceUnreachable, match="GATEWAY TARGET DEVICE FAILED"):
                await r.read("absent")
            with pytest.raises(DeviceUnreachable, match="GATEWAY TARGET DEVICE FAILED"):
                await r.driver.write(
                    r.devices["absent"], profile("lamp-controller").points["level_setpoint"], 1
                )

    run(body)


# Connection lifecycle --------------------------------------------------------------------------
def test_server_gone_is_bus_unavailable_and_close_connect_recovers() -> None:
    async def body() -> None:
        async with rig("tcp") as r:
            port = r.sim.tcp_ports[0]
            await r.sim.stop_tcp()
            with pytest.raises(BusUnavailable, match=re.escape(f"127.0.0.1:{port}")):
                await r.read("lamp-1")
            assert not r.driver.health().connected
            await r.driver.close()
            with pytest.raises(BusUnavailable, match=re.escape("cannot connect to 127.0.0.1")):
                await r.driver.connect()
            assert not r.driver.health().connected
            await r.sim.start_tcp("127.0.0.1", port)
            await r.driver.close()
            await r.driver.connect()
            assert r.values(await r.read("lamp-1"))["level_setpoint"] == 40
            health = r.driver.health()
            assert (health.connected, health.reconnects) == (True, 1)

    run(body)


def test_a_dropped_connection_is_bus_unavailable() -> None:
    async def body() -> None:
        async with rig("tcp") as r:
            await r.sim.drop_connections(abort=True)
            with pytest.raises(BusUnavailable):
                await r.read("lamp-1")
            await r.driver.connect()
            assert r.values(await r.read("lamp-1"))["level_setpoint"] == 40

    run(body)


def test_the_serial_line_going_away_is_bus_unavailable() -> None:
    async def body() -> None:
        async with rig("rtu") as r:
            await r.sim.stop_rtu()
            with pytest.raises(BusUnavailable):
                await r.read("lamp-1")
            assert not r.driver.health().connected

    run(body)


def test_connect_refused_raises_bus_unavailable_and_leaves_nothing_open() -> None:
    async def body() -> None:
        port = free_port()
        driver = ModbusDriver(bus(transport="tcp", host="127.0.0.1", port=port), [], Context())
        with pytest.raises(
            BusUnavailable,
            match=re.escape(f"cannot connect to 127.0.0.1:{port}: connection refused"),
        ):
            await driver.connect()
        assert not driver.health().connected
        assert driver.health().last_error is not None
        with pytest.raises(BusUnavailable, match="not connected"):
            await driver.read(
                device("d", 1, profile("lamp-controller")),
                list(profile("lamp-controller").points.values()),
            )
        await driver.close()
        await driver.close()

    run(body)


def test_a_missing_serial_port_raises_bus_unavailable(tmp_path: Path) -> None:
    async def body() -> None:
        missing = tmp_path / "ttyMissing"
        driver = ModbusDriver(bus(transport="rtu", device=str(missing)), [], Context())
        with pytest.raises(BusUnavailable, match=re.escape(f"cannot open serial port {missing}")):
            await driver.connect()
        assert not driver.health().connected
        await driver.close()

    run(body)


@TRANSPORTS
def test_close_is_idempotent_and_health_counts(transport: str) -> None:
    async def body() -> None:
        async with rig(transport) as r:
            await r.read("lamp-1")
            health = r.driver.health()
            assert (health.connected, health.transactions, health.timeouts) == (True, 2, 0)
            assert health.as_dict()["errors"] == 0
            await r.driver.close()
            await r.driver.close()
            assert not r.driver.health().connected
            with pytest.raises(BusUnavailable):
                await r.read("lamp-1")

    run(body)


def test_no_io_in_the_constructor() -> None:
    # Built outside any event loop: a constructor that opened anything would fail here.
    driver = ModbusDriver(bus(transport="tcp", host="192.0.2.1"), [], Context())
    assert driver.health().as_dict() == {
        "connected": False,
        "transactions": 0,
        "timeouts": 0,
        "errors": 0,
        "reconnects": 0,
        "last_error": None,
    }
    assert math.isclose(driver.settings.timeout_s, 1.0)
