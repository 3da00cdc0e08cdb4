"""The Modbus simulators, driven from the other side of the wire by pymodbus's clients (an
independent implementation) and by raw frames where a well-behaved client would refuse to send
what a test needs (oversized quantities, unknown function codes, arbitrary bytes)."""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import sys
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException

from firmware_sim.modbus import (
    EnergyMeter,
    LampController,
    MemoryDevice,
    ModbusDevice,
    ModbusSimulator,
    from_registers,
    to_registers,
)
from firmware_sim.modbus.protocol import (
    MAX_READ_BITS,
    MAX_READ_REGISTERS,
    MAX_WRITE_BITS,
    MAX_WRITE_REGISTERS,
    FrameError,
    FunctionCode,
    ModbusException,
    ReadRequest,
    Request,
    WriteMultipleCoils,
    WriteMultipleRegisters,
    WriteSingleCoil,
    WriteSingleRegister,
    crc16,
    decode_mbap_header,
    decode_request,
    decode_rtu_frame,
    encode_mbap,
    encode_request,
    encode_rtu_frame,
    split_rtu_requests,
)
from firmware_sim.modbus.server import GARBAGE_REPLY

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ROOT / "config" / "profiles"
TEST_TIMEOUT_S = 20.0
CLIENT_TIMEOUT_S = 0.3
QUIET_S = 0.3
"""How long a raw reader waits to conclude that nothing is coming."""
REPLY_WAIT_S = 2.0
"""How long a raw reader waits for a reply that must come (returns as soon as it has)."""


def run(body: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(TEST_TIMEOUT_S):
            await body()

    asyncio.run(bounded())


@asynccontextmanager
async def serving(
    devices: dict[int, ModbusDevice], **kwargs: Any
) -> AsyncIterator[ModbusSimulator]:
    sim = ModbusSimulator(devices, **kwargs)
    try:
        yield sim
    finally:
        await sim.stop()
    assert sim.internal_errors == 0


@asynccontextmanager
async def tcp_client(
    port: int, timeout_s: float = CLIENT_TIMEOUT_S
) -> AsyncIterator[AsyncModbusTcpClient]:
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=timeout_s, retries=0)
    assert await client.connect()
    try:
        yield client
    finally:
        client.close()


@asynccontextmanager
async def rtu_client(path: str) -> AsyncIterator[AsyncModbusSerialClient]:
    client = AsyncModbusSerialClient(
        path, framer=FramerType.RTU, baudrate=19200, timeout=CLIENT_TIMEOUT_S, retries=0
    )
    assert await client.connect()
    try:
        yield client
    finally:
        client.close()


class RawTcp:
    """A bare Modbus TCP connection: frames in, frames out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> RawTcp:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def request(self, tid: int, unit: int, pdu: bytes) -> tuple[int, int, bytes]:
        self.writer.write(encode_mbap(tid, unit, pdu))
        return await self.reply()

    async def reply(self) -> tuple[int, int, bytes]:
        header = decode_mbap_header(await self.reader.readexactly(7))
        assert header.protocol_id == 0
        return header.transaction_id, header.unit, await self.reader.readexactly(header.pdu_length)

    async def close(self) -> None:
        self.writer.close()
        with suppress(OSError):
            await self.writer.wait_closed()


class RawRtu:
    """The slave side of the simulator's pty, opened without pyserial."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    async def receive(self, quiet_s: float = QUIET_S) -> bytes:
        """Bytes until the line has been quiet for ``quiet_s`` (b"" if nothing came)."""
        data = bytearray()
        idle_s = 0.0
        while idle_s < quiet_s:
            try:
                chunk = os.read(self.fd, 512)
            except BlockingIOError:
                chunk = b""
            if chunk:
                data += chunk
                idle_s = 0.0
                quiet_s = min(quiet_s, 0.05)  # once a reply started, a short gap ends it
            else:
                await asyncio.sleep(0.005)
                idle_s += 0.005
        return bytes(data)

    async def request(self, unit: int, pdu: bytes) -> tuple[int, bytes]:
        self.send(encode_rtu_frame(unit, pdu))
        return decode_rtu_frame(await self.receive(quiet_s=REPLY_WAIT_S))

    def close(self) -> None:
        os.close(self.fd)


def read_pdu(function: int, address: int, count: int) -> bytes:
    return struct.pack(">BHH", function, address, count)


def load_profile(name: str) -> dict[str, Any]:
    with (PROFILES / f"{name}.toml").open("rb") as file:
        return tomllib.load(file)


async def read_point(client: AsyncModbusTcpClient, unit: int, point: dict[str, Any]) -> float:
    """Read one profile point the way the profile describes it, decoded by pymodbus."""
    kind, address, data_type = point["kind"], point["address"], point["type"]
    count = 2 if data_type.endswith("32") else 1
    read = {
        "holding": client.read_holding_registers,
        "input": client.read_input_registers,
    }[kind]
    response = await read(address, count=count, device_id=unit)
    assert not response.isError(), (point, response)
    value = client.convert_from_registers(
        response.registers,
        getattr(client.DATATYPE, data_type.upper()),
        word_order=point.get("word_order", "big"),
    )
    assert isinstance(value, int | float)
    scale: float = point.get("scale", 1.0)
    return value * scale


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


# ---------------------------------------------------------------------------------------------
# Codecs
# ---------------------------------------------------------------------------------------------


def test_crc16_matches_the_catalogued_check_value() -> None:
    # CRC-16/MODBUS "check" value from the CRC catalogue, and a frame from the spec's examples.
    assert crc16(b"123456789") == 0x4B37
    assert encode_rtu_frame(1, bytes.fromhex("0300000001"))[-2:] == bytes.fromhex("840a")


_addresses = st.integers(0, 0xFFFF)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    kind = draw(st.sampled_from(["bits", "registers", "coil", "register", "coils", "holding"]))
    if kind in ("bits", "registers"):
        limit = MAX_READ_BITS if kind == "bits" else MAX_READ_REGISTERS
        functions = (
            [FunctionCode.READ_COILS, FunctionCode.READ_DISCRETE_INPUTS]
            if kind == "bits"
            else [FunctionCode.READ_HOLDING_REGISTERS, FunctionCode.READ_INPUT_REGISTERS]
        )
        count = draw(st.integers(1, limit))
        return ReadRequest(
            draw(st.sampled_from(functions)), draw(st.integers(0, 0x10000 - count)), count
        )
    if kind == "coil":
        return WriteSingleCoil(draw(_addresses), draw(st.booleans()))
    if kind == "register":
        return WriteSingleRegister(draw(_addresses), draw(_addresses))
    if kind == "coils":
        bits = draw(st.lists(st.booleans(), min_size=1, max_size=MAX_WRITE_BITS))
        return WriteMultipleCoils(draw(st.integers(0, 0x10000 - len(bits))), tuple(bits))
    words = draw(st.lists(_addresses, min_size=1, max_size=MAX_WRITE_REGISTERS))
    return WriteMultipleRegisters(draw(st.integers(0, 0x10000 - len(words))), tuple(words))


@settings(max_examples=150)
@given(requests())
def test_request_pdus_round_trip(request: Request) -> None:
    assert decode_request(encode_request(request)) == request


@settings(max_examples=100)
@given(st.integers(0, 255), st.binary(min_size=1, max_size=253))
def test_rtu_frames_round_trip_and_any_flipped_bit_is_caught(unit: int, pdu: bytes) -> None:
    frame = encode_rtu_frame(unit, pdu)
    assert decode_rtu_frame(frame) == (unit, pdu)
    for bit in (0, 7, len(frame) * 8 - 1):
        damaged = bytearray(frame)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(FrameError):
            decode_rtu_frame(bytes(damaged))


@settings(max_examples=100)
@given(st.integers(0, 0xFFFF), st.integers(0, 255), st.binary(min_size=1, max_size=253))
def test_mbap_frames_round_trip(tid: int, unit: int, pdu: bytes) -> None:
    frame = encode_mbap(tid, unit, pdu)
    header = decode_mbap_header(frame[:7])
    assert (header.transaction_id, header.protocol_id, header.unit) == (tid, 0, unit)
    assert frame[7:] == pdu and header.pdu_length == len(pdu)


def test_mbap_lengths_no_pdu_can_have_are_framing_errors() -> None:
    for length in (0, 1, 255, 0xFFFF):
        with pytest.raises(FrameError):
            decode_mbap_header(struct.pack(">HHHB", 1, 0, length, 1))


@settings(max_examples=100)
@given(st.lists(st.tuples(st.integers(0, 247), requests()), min_size=1, max_size=4))
def test_glued_request_frames_split_back(frames: list[tuple[int, Request]]) -> None:
    encoded = [encode_rtu_frame(unit, encode_request(r)) for unit, r in frames]
    assert split_rtu_requests(b"".join(encoded)) == encoded


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_arbitrary_pdus_get_a_well_formed_answer_or_an_exception_code(pdu: bytes) -> None:
    try:
        decode_request(pdu)
    except ModbusException as exc:
        assert exc.code in (1, 2, 3)
    device = MemoryDevice(size=0x10000)
    if pdu:
        reply = device.handle(pdu)
        assert reply[0] in (pdu[0], pdu[0] | 0x80)
        assert len(reply) <= 253


@settings(max_examples=100)
@given(
    st.sampled_from(["int16", "uint16", "int32", "uint32"]),
    st.integers(-(2**31), 2**32 - 1),
    st.sampled_from(["big", "little"]),
)
def test_register_values_round_trip(data_type: Any, value: int, word_order: Any) -> None:
    bits = 16 if data_type.endswith("16") else 32
    signed = data_type.startswith("int")
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if not low <= value <= high:
        return
    words = to_registers(value, data_type, word_order)
    assert len(words) == bits // 16
    assert from_registers(words, data_type, word_order) == value


# ---------------------------------------------------------------------------------------------
# Devices over Modbus TCP
# ---------------------------------------------------------------------------------------------


def test_lamp_profile_points_read_over_tcp_follow_the_set_point() -> None:
    async def body() -> None:
        profile = load_profile("lamp-controller")
        points = profile["points"]
        lamp = LampController(energy_wh=70_000.5, burning_hours=1234.567, ambient_c=-5.0)
        async with serving({1: lamp}) as sim:
            port = await sim.start_tcp("127.0.0.1", 0)
            async with tcp_client(port) as client:
                response = await client.write_register(0, 80, device_id=1)
                assert not response.isError()
                values = {name: await read_point(client, 1, p) for name, p in points.items()}
        assert values["level_setpoint"] == 80
        assert values["actual_level"] == 80
        assert values["lamp_power"] == pytest.approx(48.0)
        # Above 65535: a wrong word order or a 16-bit read would show here.
        assert values["energy"] >= 70_000
        assert values["burning_hours"] == pytest.approx(1234.56, abs=0.02)
        assert values["lamp_failure"] == 0
        # Negative: int16 sign handling (a cold lamp at -5 °C ambient).
        assert -5.0 <= values["driver_temperature"] < 0
        assert lamp.writes == {0: 1}
        assert lamp.requests == 1 + len(points)

    run(body)


def test_lamp_clamps_to_max_level_and_reports_failure() -> None:
    async def body() -> None:
        lamp = LampController()
        async with serving({1: lamp}) as sim:
            port = await sim.start_tcp()
            async with tcp_client(port) as client:
                await client.write_register(0, 90, device_id=1)
                lamp.max_level = 60
                response = await client.read_input_registers(0, count=8, device_id=1)
                assert response.registers[0] == 60
                assert response.registers[1] == 360  # 36.0 W at 60 %
                lamp.fail_lamp()
                response = await client.read_input_registers(0, count=8, device_id=1)
                assert response.registers[0] == 0 and response.registers[1] == 0
                assert response.registers[6] == 1
                assert (await client.read_holding_registers(0, device_id=1)).registers == [90]
                lamp.repair_lamp()
                response = await client.read_input_registers(0, count=1, device_id=1)
                assert response.registers == [60]

    run(body)


def test_meter_profile_points_are_plausible_and_follow_the_lamps() -> None:
    async def body() -> None:
        points = load_profile("sdm630")["points"]
        lamps = [LampController(setpoint=100) for _ in range(3)]
        meter = EnergyMeter(lamps=lamps, seed=1)
        async with serving({10: meter}) as sim:
            port = await sim.start_tcp()
            async with tcp_client(port) as client:
                values = {name: await read_point(client, 10, p) for name, p in points.items()}
        for phase in (1, 2, 3):
            assert 225 < values[f"voltage_l{phase}"] < 235
            assert values[f"current_l{phase}"] == pytest.approx(
                values[f"power_l{phase}"] / (values[f"voltage_l{phase}"] * 0.95), rel=0.01
            )
        assert values["power_l1"] == pytest.approx(72.0)  # base load 12 W + one 60 W lamp
        assert values["power_l2"] == pytest.approx(60.0)
        assert values["total_power"] == pytest.approx(192.0)
        assert 49.9 < values["frequency"] < 50.1
        assert values["import_energy"] >= 1520.25
        assert values["export_energy"] == 0.0
        assert values["total_energy"] == pytest.approx(values["import_energy"], abs=0.01)

    run(body)


def test_meter_rejects_unknown_addresses_and_writes() -> None:
    async def body() -> None:
        async with serving({10: EnergyMeter()}) as sim:
            port = await sim.start_tcp()
            async with tcp_client(port) as client:
                response = await client.read_input_registers(0, count=18, device_id=10)
                assert not response.isError()
                for address, count in ((18, 2), (16, 4), (100, 2), (344, 2)):
                    response = await client.read_input_registers(address, count=count, device_id=10)
                    assert response.isError() and response.exception_code == 2, (address, count)
                response = await client.write_register(0, 1, device_id=10)
                assert response.isError() and response.exception_code == 2

    run(body)


def test_exception_codes_follow_the_spec() -> None:
    async def body() -> None:
        async with serving({1: LampController(), 5: MemoryDevice(size=2000)}) as sim:
            port = await sim.start_tcp()
            raw = await RawTcp.open(port)
            try:
                cases = [
                    (1, bytes([0x2B, 0x0E, 0x01, 0x00]), 0x01),  # function the sim lacks
                    (1, read_pdu(4, 8, 1), 0x02),  # past the lamp's input registers
                    (1, read_pdu(3, 0, 2), 0x02),  # only holding 0 exists
                    (1, struct.pack(">BHH", 6, 0, 101), 0x03),  # set point above 100 %
                    (1, struct.pack(">BHH", 6, 1, 5), 0x02),
                    (1, read_pdu(1, 0, 1), 0x02),  # the lamp has no coils
                    (5, read_pdu(3, 0, MAX_READ_REGISTERS + 1), 0x03),
                    (5, read_pdu(3, 0, 0), 0x03),
                    (5, read_pdu(1, 0, MAX_READ_BITS + 1), 0x03),
                    (5, read_pdu(3, 0xFFFF, 2), 0x02),  # runs past the address space
                    (5, struct.pack(">BHH", 5, 0, 0x1234), 0x03),  # coil value not FF00/0000
                    (5, struct.pack(">BHHB", 16, 0, 2, 3) + b"\0\0\0", 0x03),  # byte count
                    (5, bytes([0x10, 0x00]), 0x03),  # truncated
                ]
                for tid, (unit, pdu, code) in enumerate(cases, start=1):
                    got_tid, got_unit, reply = await raw.request(tid, unit, pdu)
                    assert (got_tid, got_unit) == (tid, unit)
                    assert reply == bytes([pdu[0] | 0x80, code]), (pdu.hex(), reply.hex())
                # The limits themselves are fine.
                _, _, reply = await raw.request(99, 5, read_pdu(3, 0, MAX_READ_REGISTERS))
                assert reply[:2] == bytes([3, 2 * MAX_READ_REGISTERS])
                _, _, reply = await raw.request(100, 5, read_pdu(2, 0, MAX_READ_BITS))
                assert reply[:2] == bytes([2, MAX_READ_BITS // 8])
            finally:
                await raw.close()

    run(body)


def test_tcp_frames_of_another_protocol_are_ignored_and_bad_lengths_close() -> None:
    async def body() -> None:
        lamp = LampController(setpoint=12)
        async with serving({1: lamp}) as sim:
            port = await sim.start_tcp()
            raw = await RawTcp.open(port)
            not_modbus = struct.pack(">HHHB", 1, 1, 6, 1) + read_pdu(3, 0, 1)
            raw.writer.write(not_modbus + encode_mbap(2, 1, read_pdu(3, 0, 1)))
            assert await raw.reply() == (2, 1, bytes([3, 2, 0, 12]))
            assert lamp.requests == 1
            raw.writer.write(struct.pack(">HHHB", 3, 0, 300, 1))  # no PDU is that long
            assert await raw.reader.read() == b""
            await raw.close()

    run(body)


def test_memory_device_serves_coils_and_typed_registers() -> None:
    async def body() -> None:
        memory = MemoryDevice()
        memory.discrete[3] = True
        memory.set_value("input", 10, -1.5, "float32", "little")
        memory.set_value("input", 12, 0x12345678, "uint32", "big")
        async with serving({7: memory}) as sim:
            port = await sim.start_tcp()
            async with tcp_client(port) as client:
                assert not (await client.write_coils(2, [True, False, True], device_id=7)).isError()
                assert not (await client.write_coil(9, True, device_id=7)).isError()
                bits = (await client.read_coils(0, count=10, device_id=7)).bits
                assert bits[:10] == [False, False, True, False, True] + [False] * 4 + [True]
                response = await client.read_discrete_inputs(0, count=4, device_id=7)
                assert response.bits[:4] == [False, False, False, True]
                words = client.convert_to_registers(3.25, client.DATATYPE.FLOAT32)
                assert not (await client.write_registers(20, words, device_id=7)).isError()
                registers = (await client.read_input_registers(10, count=4, device_id=7)).registers
                little = client.convert_from_registers(
                    registers[:2], client.DATATYPE.FLOAT32, word_order="little"
                )
                assert little == -1.5
                assert (
                    client.convert_from_registers(registers[2:], client.DATATYPE.UINT32)
                    == 0x12345678
                )
        assert memory.get_value("holding", 20, "float32") == 3.25
        assert memory.coil_writes == {2: 1, 3: 1, 4: 1, 9: 1}
        assert memory.writes == {20: 1, 21: 1}

    run(body)


def test_several_units_and_clients_on_one_tcp_endpoint() -> None:
    async def body() -> None:
        lamps = {unit: LampController() for unit in (1, 2, 3)}
        async with serving(dict(lamps)) as sim:
            port = await sim.start_tcp()
            async with tcp_client(port) as first, tcp_client(port) as second:
                await asyncio.gather(
                    first.write_register(0, 10, device_id=1),
                    second.write_register(0, 20, device_id=2),
                )
                await first.write_register(0, 30, device_id=3)
                assert sim.connection_count == 2
                for unit, client in ((1, second), (2, first), (3, second)):
                    response = await client.read_input_registers(0, device_id=unit)
                    assert response.registers == [unit * 10]
        assert [lamp.requests for lamp in lamps.values()] == [2, 2, 2]
        assert all(lamp.writes == {0: 1} for lamp in lamps.values())

    run(body)


def test_unknown_unit_is_silent_or_a_gateway_exception() -> None:
    async def body() -> None:
        async with serving({1: LampController()}) as sim:
            port = await sim.start_tcp()
            async with tcp_client(port) as client:
                with pytest.raises(ModbusIOException):
                    await client.read_input_registers(0, device_id=9)
        async with serving({1: LampController()}, gateway_exception=0x0B) as sim:
            port = await sim.start_tcp()
            async with tcp_client(port) as client:
                response = await client.read_input_registers(0, device_id=9)
                assert response.isError() and response.exception_code == 0x0B

    run(body)


# ---------------------------------------------------------------------------------------------
# Faults over TCP
# ---------------------------------------------------------------------------------------------


def test_tcp_faults() -> None:
    async def body() -> None:
        lamp, other = LampController(), LampController()
        async with serving({1: lamp, 2: other}) as sim:
            port = await sim.start_tcp()
            async with tcp_client(port) as client:
                lamp.faults.no_answer = True
                with pytest.raises(ModbusIOException):
                    await client.write_register(0, 50, device_id=1)
                assert lamp.setpoint == 0 and lamp.requests == 1  # heard nothing, did nothing
                lamp.faults.clear()

                lamp.faults.exception_code = 4
                response = await client.write_register(0, 50, device_id=1)
                assert response.isError() and response.exception_code == 4
                assert lamp.setpoint == 0
                lamp.faults.clear()

                # The other unit on the endpoint is unaffected throughout.
                assert (await client.read_input_registers(0, device_id=2)).registers == [0]

            # Garbage: the write is done, the reply is noise. A fresh connection recovers.
            lamp.faults.garbage = True
            raw = await RawTcp.open(port)
            raw.writer.write(encode_mbap(1, 1, struct.pack(">BHH", 6, 0, 40)))
            assert await raw.reader.readexactly(len(GARBAGE_REPLY)) == GARBAGE_REPLY
            await raw.close()
            assert lamp.setpoint == 40
            lamp.faults.clear()
            async with tcp_client(port) as client:
                assert (await client.read_holding_registers(0, device_id=1)).registers == [40]

    run(body)


def test_tcp_delay_times_out_a_client_then_the_late_reply_keeps_its_transaction_id() -> None:
    async def body() -> None:
        lamp = LampController()
        async with serving({1: lamp, 2: LampController(setpoint=7)}) as sim:
            port = await sim.start_tcp()
            lamp.faults.delay_s = 1.0
            async with tcp_client(port, timeout_s=0.1) as client:
                with pytest.raises(ModbusIOException):
                    await client.read_input_registers(0, device_id=1)
            # Requests on one connection are answered in order, each with its own id, so a
            # master that matches ids never takes the late reply for the next answer.
            lamp.faults.delay_s = 0.2
            raw = await RawTcp.open(port)
            raw.writer.write(encode_mbap(7, 1, read_pdu(4, 0, 1)))
            raw.writer.write(encode_mbap(8, 2, read_pdu(4, 0, 1)))
            assert await raw.reply() == (7, 1, bytes([4, 2, 0, 0]))
            assert await raw.reply() == (8, 2, bytes([4, 2, 0, 7]))
            await raw.close()

    run(body)


def test_drop_connections_closes_clients_and_the_listener_stays() -> None:
    async def body() -> None:
        async with serving({1: LampController(setpoint=5)}) as sim:
            port = await sim.start_tcp()
            for abort in (False, True):
                raw = await RawTcp.open(port)
                assert (await raw.request(1, 1, read_pdu(3, 0, 1)))[2] == bytes([3, 2, 0, 5])
                await sim.drop_connections(abort=abort)
                assert sim.connection_count == 0
                try:
                    assert await raw.reader.read() == b""
                except ConnectionResetError:
                    assert abort
                await raw.close()
            async with tcp_client(port) as client:
                assert (await client.read_holding_registers(0, device_id=1)).registers == [5]

    run(body)


def test_tcp_stop_and_start_on_the_same_port_keeps_device_state() -> None:
    async def body() -> None:
        lamp = LampController()
        async with serving({1: lamp}) as sim:
            port = await sim.start_tcp()
            async with tcp_client(port) as client:
                await client.write_register(0, 33, device_id=1)
            raw = await RawTcp.open(port)
            await sim.stop_tcp()
            assert await raw.reader.read() == b""  # open connections go with the server
            await raw.close()
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", port)
            assert await sim.start_tcp("127.0.0.1", port) == port
            async with tcp_client(port) as client:
                assert (await client.read_input_registers(0, device_id=1)).registers == [33]
            await sim.stop()
            await sim.stop()  # idempotent

    run(body)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_arbitrary_tcp_bytes_never_break_the_server(data: st.DataObject) -> None:
    # One simulator for all examples: it must survive every one of them in turn.
    with asyncio.Runner() as runner:
        sim = ModbusSimulator({1: LampController(), 2: MemoryDevice()})
        port = runner.run(sim.start_tcp())
        try:
            for index in range(3):
                junk = data.draw(st.binary(max_size=400), label=f"junk {index}")

                async def attempt(junk: bytes = junk, index: int = index) -> None:
                    async with asyncio.timeout(5):
                        raw = await RawTcp.open(port)
                        raw.writer.write(junk)
                        await raw.writer.drain()
                        await raw.close()
                        raw = await RawTcp.open(port)
                        reply = await raw.request(index, 1, read_pdu(4, 6, 1))
                        assert reply == (index, 1, bytes([4, 2, 0, 0]))
                        await raw.close()

                runner.run(attempt())
                assert sim.internal_errors == 0
        finally:
            runner.run(sim.stop())


# ---------------------------------------------------------------------------------------------
# Modbus RTU over a pseudo-terminal
# ---------------------------------------------------------------------------------------------


def test_rtu_reads_writes_and_several_units_with_pymodbus() -> None:
    async def body() -> None:
        lamps = {1: LampController(), 2: LampController(), 3: LampController()}
        meter = EnergyMeter(lamps=list(lamps.values()))
        async with serving({**lamps, 10: meter}) as sim:
            path = await sim.start_rtu()
            assert sim.rtu_path == path
            async with rtu_client(path) as client:
                for unit in lamps:
                    response = await client.write_register(0, 25 * unit, device_id=unit)
                    assert not response.isError()
                for unit in lamps:
                    response = await client.read_input_registers(0, count=8, device_id=unit)
                    assert response.registers[0] == 25 * unit
                    assert response.registers[1] == 150 * unit
                response = await client.read_input_registers(52, count=2, device_id=10)
                total = client.convert_from_registers(response.registers, client.DATATYPE.FLOAT32)
                assert total == pytest.approx(12.0 + 15 + 30 + 45)
                response = await client.write_register(0, 101, device_id=2)
                assert response.isError() and response.exception_code == 3
                response = await client.read_input_registers(8, count=1, device_id=2)
                assert response.isError() and response.exception_code == 2
        assert [lamp.writes for lamp in lamps.values()] == [{0: 1}] * 3

    run(body)


def test_rtu_faults_with_pymodbus() -> None:
    async def body() -> None:
        lamp, other = LampController(setpoint=10), LampController(setpoint=20)
        async with serving({1: lamp, 2: other}) as sim:
            path = await sim.start_rtu()
            async with rtu_client(path) as client:
                for fault in ("no_answer", "bad_crc", "garbage"):
                    setattr(lamp.faults, fault, True)
                    with pytest.raises(ModbusIOException):
                        await client.read_holding_registers(0, device_id=1)
                    lamp.faults.clear()
                    response = await client.read_holding_registers(0, device_id=2)
                    assert response.registers == [20], fault
                lamp.faults.exception_code = 6
                response = await client.read_holding_registers(0, device_id=1)
                assert response.isError() and response.exception_code == 6
                lamp.faults.clear()
                assert (await client.read_holding_registers(0, device_id=1)).registers == [10]
                with pytest.raises(ModbusIOException):
                    await client.read_holding_registers(0, device_id=42)  # not on the line
        assert lamp.requests == 5

    run(body)


def test_rtu_raw_frames_bad_crc_garbage_and_broadcast() -> None:
    async def body() -> None:
        lamp, other = LampController(), LampController()
        async with serving({1: lamp, 2: other}) as sim:
            raw = RawRtu(await sim.start_rtu())
            try:
                # A request with a bad CRC, or for another unit, is ignored.
                frame = encode_rtu_frame(1, read_pdu(3, 0, 1))
                raw.send(frame[:-1] + bytes([frame[-1] ^ 0x01]))
                assert await raw.receive() == b""
                raw.send(encode_rtu_frame(9, read_pdu(3, 0, 1)))
                assert await raw.receive() == b""
                assert sim.rtu_bad_frames == 1 and lamp.requests == 0

                # bad_crc: the right reply with a damaged CRC; the write itself happened.
                lamp.faults.bad_crc = True
                raw.send(encode_rtu_frame(1, struct.pack(">BHH", 6, 0, 55)))
                reply = await raw.receive()
                assert reply[:-2] == encode_rtu_frame(1, struct.pack(">BHH", 6, 0, 55))[:-2]
                with pytest.raises(FrameError):
                    decode_rtu_frame(reply)
                assert lamp.setpoint == 55
                lamp.faults.clear()

                lamp.faults.garbage = True
                raw.send(encode_rtu_frame(1, read_pdu(3, 0, 1)))
                assert await raw.receive() == GARBAGE_REPLY
                lamp.faults.clear()

                # Broadcast: applied by every unit that hears it, answered by none.
                other.faults.no_answer = True
                raw.send(encode_rtu_frame(0, struct.pack(">BHH", 6, 0, 70)))
                assert await raw.receive() == b""
                assert lamp.setpoint == 70 and other.setpoint == 0
                other.faults.clear()
                raw.send(encode_rtu_frame(0, read_pdu(3, 0, 1)))  # reads are not broadcast
                assert await raw.receive() == b""

                # A frame sent straight after a broadcast, without the turnaround delay.
                raw.send(
                    encode_rtu_frame(0, struct.pack(">BHH", 6, 0, 15))
                    + encode_rtu_frame(2, read_pdu(3, 0, 1))
                )
                assert decode_rtu_frame(await raw.receive()) == (2, bytes([3, 2, 0, 15]))
                assert lamp.setpoint == 15
            finally:
                raw.close()

    run(body)


def test_rtu_slow_unit_answers_late_and_in_order() -> None:
    async def body() -> None:
        lamp = LampController(setpoint=1)
        async with serving({1: lamp, 2: LampController(setpoint=2)}) as sim:
            raw = RawRtu(await sim.start_rtu())
            try:
                lamp.faults.delay_s = 0.2
                raw.send(encode_rtu_frame(1, read_pdu(3, 0, 1)))
                await asyncio.sleep(0.02)  # a silence, so the two are separate frames
                raw.send(encode_rtu_frame(2, read_pdu(3, 0, 1)))
                first = encode_rtu_frame(1, bytes([3, 2, 0, 1]))
                second = encode_rtu_frame(2, bytes([3, 2, 0, 2]))
                assert await raw.receive(REPLY_WAIT_S) + await raw.receive() == first + second
            finally:
                raw.close()

    run(body)


def test_rtu_pty_survives_clients_coming_and_going() -> None:
    async def body() -> None:
        async with serving({1: LampController(setpoint=3)}) as sim:
            path = await sim.start_rtu()
            for _ in range(2):
                async with rtu_client(path) as client:
                    assert (await client.read_holding_registers(0, device_id=1)).registers == [3]
            await sim.stop_rtu()
            assert sim.rtu_path is None
            path = await sim.start_rtu()
            async with rtu_client(path) as client:
                assert (await client.read_holding_registers(0, device_id=1)).registers == [3]

    run(body)


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_arbitrary_rtu_bytes_never_break_the_server(data: st.DataObject) -> None:
    with asyncio.Runner() as runner:
        sim = ModbusSimulator({1: LampController(setpoint=9), 2: MemoryDevice()})
        raw = RawRtu(runner.run(sim.start_rtu()))
        try:
            for index in range(2):
                junk = data.draw(st.binary(min_size=1, max_size=600), label=f"junk {index}")

                async def attempt(junk: bytes = junk) -> None:
                    async with asyncio.timeout(5):
                        raw.send(junk)
                        await raw.receive(quiet_s=0.05)  # whatever it may have answered
                        reply = await raw.request(1, read_pdu(3, 0, 1))
                        assert reply[0] == 1 and reply[1][:2] == bytes([3, 2])

                runner.run(attempt())
                assert sim.internal_errors == 0
        finally:
            raw.close()
            runner.run(sim.stop())


# ---------------------------------------------------------------------------------------------
# Physics (a fake clock: no waiting, no timing assertions)
# ---------------------------------------------------------------------------------------------


def test_lamp_counters_and_temperature_follow_the_actual_level() -> None:
    clock = FakeClock()
    lamp = LampController(setpoint=50, clock=clock, ambient_c=10.0)
    meter = EnergyMeter(lamps=[lamp], base_load_w=(0.0, 0.0, 0.0), import_kwh=0.0, clock=clock)
    clock.now_s += 3600
    assert lamp.energy_wh == pytest.approx(30.0)
    assert lamp.burning_hours == pytest.approx(1.0)
    assert lamp.temperature_c == pytest.approx(10.0 + 12.5, abs=0.01)  # settled after 12 τ
    lamp.fail_lamp()
    clock.now_s += 3600
    assert lamp.energy_wh == pytest.approx(30.0)  # a failed lamp draws nothing
    assert lamp.burning_hours == pytest.approx(1.0)
    assert lamp.temperature_c == pytest.approx(10.0, abs=0.01)
    assert meter.import_kwh == pytest.approx(0.030)
    registers = lamp.input_registers()
    assert (registers[2], registers[3], registers[4], registers[5]) == (0, 30, 0, 100)
    lamp.energy_wh = 0.0  # a rewound lamp counter must not run the meter backwards
    assert meter.import_kwh == pytest.approx(0.030)


def test_lamp_rejects_impossible_levels_from_python() -> None:
    lamp = LampController()
    with pytest.raises(ValueError):
        lamp.setpoint = 101
    with pytest.raises(ValueError):
        lamp.max_level = -1
    with pytest.raises(ValueError):
        ModbusSimulator({248: lamp})


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "firmware-sim"), env.get("PYTHONPATH", "")]
    )
    return env


def test_cli_help_lists_the_simulators() -> None:
    async def body() -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "firmware_sim",
            "--help",
            stdout=asyncio.subprocess.PIPE,
            env=_cli_env(),
        )
        out, _ = await process.communicate()
        assert process.returncode == 0
        assert b"modbus" in out

    run(body)


def test_cli_serves_tcp_and_rtu_until_interrupted() -> None:
    async def body() -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "firmware_sim",
            "modbus",
            "--tcp",
            "127.0.0.1:0",
            "--rtu",
            "--lamps",
            "1-2",
            "--meter",
            "10",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_cli_env(),
        )
        try:
            assert process.stdout is not None
            tcp_line = (await process.stdout.readline()).decode()
            rtu_line = (await process.stdout.readline()).decode()
            assert tcp_line.startswith("TCP listening: 127.0.0.1:"), tcp_line
            assert rtu_line.startswith("RTU pty: /dev/"), rtu_line
            port = int(tcp_line.rsplit(":", 1)[1])
            async with tcp_client(port) as client:
                await client.write_register(0, 100, device_id=2)
                response = await client.read_input_registers(12, count=6, device_id=10)
                float32 = client.DATATYPE.FLOAT32
                regs = response.registers
                powers = [
                    client.convert_from_registers(regs[i : i + 2], float32) for i in (0, 2, 4)
                ]
                assert powers == [pytest.approx(12.0), pytest.approx(60.0), 0.0]
            async with rtu_client(rtu_line.split(": ", 1)[1].strip()) as client:
                assert (await client.read_holding_registers(0, device_id=2)).registers == [100]
                with pytest.raises(ModbusIOException):
                    await client.read_holding_registers(0, device_id=3)  # not served
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGINT)
            await process.wait()
        assert process.returncode == 0

    run(body)
