"""Modbus wire format: PDUs, RTU frames (CRC-16/MODBUS) and TCP frames (MBAP header).

Pure functions and small value types, no I/O: the simulator's servers use them, and the tests
check them with Hypothesis round trips. Both directions of each codec exist so that tests can
build requests a well-behaved client would refuse to send (oversized quantities, bad byte counts).

Request validation follows the order of the Modbus Application Protocol v1.1b3 state diagrams:
function code (exception 01), then quantity and byte count (03), then address range (02); the
device itself raises 02 for addresses it does not have and 03 for values it refuses.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

__all__ = [
    "MAX_PDU_BYTES",
    "MAX_READ_BITS",
    "MAX_READ_REGISTERS",
    "MAX_RTU_FRAME_BYTES",
    "MAX_WRITE_BITS",
    "MAX_WRITE_REGISTERS",
    "MBAP_HEADER_BYTES",
    "ExceptionCode",
    "FrameError",
    "FunctionCode",
    "MbapHeader",
    "ModbusException",
    "ReadRequest",
    "Request",
    "WriteMultipleCoils",
    "WriteMultipleRegisters",
    "WriteSingleCoil",
    "WriteSingleRegister",
    "crc16",
    "decode_mbap_header",
    "decode_request",
    "decode_rtu_frame",
    "encode_exception",
    "encode_mbap",
    "encode_read_bits_response",
    "encode_read_registers_response",
    "encode_request",
    "encode_rtu_frame",
    "encode_write_response",
    "pack_bits",
    "split_rtu_requests",
    "unpack_bits",
]

MAX_PDU_BYTES = 253
"""Function code plus data; what fits in a 256-byte RTU frame with unit id and CRC."""
MAX_RTU_FRAME_BYTES = 256
MBAP_HEADER_BYTES = 7
MAX_READ_BITS = 2000
MAX_READ_REGISTERS = 125
MAX_WRITE_BITS = 1968  # 0x7B0
MAX_WRITE_REGISTERS = 123  # 0x7B
_ADDRESS_SPACE = 0x10000
_COIL_ON = 0xFF00
_COIL_OFF = 0x0000


class FunctionCode(IntEnum):
    READ_COILS = 0x01
    READ_DISCRETE_INPUTS = 0x02
    READ_HOLDING_REGISTERS = 0x03
    READ_INPUT_REGISTERS = 0x04
    WRITE_SINGLE_COIL = 0x05
    WRITE_SINGLE_REGISTER = 0x06
    WRITE_MULTIPLE_COILS = 0x0F
    WRITE_MULTIPLE_REGISTERS = 0x10


_READ_BIT_FUNCTIONS = (FunctionCode.READ_COILS, FunctionCode.READ_DISCRETE_INPUTS)
_READ_REGISTER_FUNCTIONS = (
    FunctionCode.READ_HOLDING_REGISTERS,
    FunctionCode.READ_INPUT_REGISTERS,
)


class ExceptionCode(IntEnum):
    ILLEGAL_FUNCTION = 0x01
    ILLEGAL_DATA_ADDRESS = 0x02
    ILLEGAL_DATA_VALUE = 0x03
    SERVER_DEVICE_FAILURE = 0x04
    ACKNOWLEDGE = 0x05
    SERVER_DEVICE_BUSY = 0x06
    GATEWAY_PATH_UNAVAILABLE = 0x0A
    GATEWAY_TARGET_FAILED_TO_RESPOND = 0x0B


class ModbusException(Exception):
    """A request the device answers with a Modbus exception response."""

    def __init__(self, code: int) -> None:
        if not 1 <= code <= 0xFF:
            raise ValueError(f"exception code must be 1..255, got {code}")
        self.code = code
        super().__init__(f"Modbus exception {code:#04x}")


class FrameError(ValueError):
    """Bytes that are not a well-formed frame (too short, bad CRC, bad header)."""


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """Function 01, 02, 03 or 04."""

    function: FunctionCode
    address: int
    count: int


@dataclass(frozen=True, slots=True)
class WriteSingleCoil:
    address: int
    value: bool


@dataclass(frozen=True, slots=True)
class WriteSingleRegister:
    address: int
    value: int


@dataclass(frozen=True, slots=True)
class WriteMultipleCoils:
    address: int
    values: tuple[bool, ...]


@dataclass(frozen=True, slots=True)
class WriteMultipleRegisters:
    address: int
    values: tuple[int, ...]


Request = (
    ReadRequest
    | WriteSingleCoil
    | WriteSingleRegister
    | WriteMultipleCoils
    | WriteMultipleRegisters
)


def pack_bits(bits: tuple[bool, ...] | list[bool]) -> bytes:
    """Bits packed LSB first, the first bit in the lowest bit of the first byte."""
    out = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        if bit:
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def unpack_bits(data: bytes, count: int) -> tuple[bool, ...]:
    return tuple(bool(data[i // 8] >> (i % 8) & 1) for i in range(count))


def _check_range(address: int, count: int) -> None:
    if address + count > _ADDRESS_SPACE:
        raise ModbusException(ExceptionCode.ILLEGAL_DATA_ADDRESS)


def decode_request(pdu: bytes) -> Request:
    """Parse a request PDU (function code first).

    Raises :class:`ModbusException` with the code a conforming server answers: 01 for an unknown
    function, 03 for a malformed body or an out-of-spec quantity, 02 when the range runs past
    address 65535.
    """
    if not pdu:
        raise ModbusException(ExceptionCode.ILLEGAL_FUNCTION)
    try:
        function = FunctionCode(pdu[0])
    except ValueError:
        raise ModbusException(ExceptionCode.ILLEGAL_FUNCTION) from None
    body = pdu[1:]

    if function in _READ_BIT_FUNCTIONS or function in _READ_REGISTER_FUNCTIONS:
        if len(body) != 4:
            raise ModbusException(ExceptionCode.ILLEGAL_DATA_VALUE)
        address, count = struct.unpack(">HH", body)
        limit = MAX_READ_BITS if function in _READ_BIT_FUNCTIONS else MAX_READ_REGISTERS
        if not 1 <= count <= limit:
            raise ModbusException(ExceptionCode.ILLEGAL_DATA_VALUE)
        _check_range(address, count)
        return ReadRequest(function, address, count)

    if function is FunctionCode.WRITE_SINGLE_COIL:
        if len(body) != 4:
            raise ModbusException(ExceptionCode.ILLEGAL_DATA_VALUE)
        address, raw = struct.unpack(">HH", body)
        if raw not in (_COIL_ON, _COIL_OFF):
            raise ModbusException(ExceptionCode.ILLEGAL_DATA_VALUE)
        return WriteSingleCoil(address, raw == _COIL_ON)

    if function is FunctionCode.WRITE_SINGLE_REGISTER:
        if len(body) != 4:
            raise ModbusException(ExceptionCode.ILLEGAL_DATA_VALUE)
        address, value = struct.unpack(">HH", body)
        return WriteSingleRegister(address, value)

    # Write multiple coils / registers: address, quantity, byte count, data.
    if len(body) < 5:
        raise ModbusException(ExceptionCode.ILLEGAL_DATA_VALUE)
    address, count, byte_count = struct.unpack(">HHB", body[:5])
    data = body[5:]
    if function is FunctionCode.WRITE_MULTIPLE_COILS:
        expected_bytes = (count + 7) // 8
        if not 1 <= count <= MAX_WRITE_BITS or byte_count != expected_bytes:
            raise ModbusException(ExceptionCode.ILLEGAL_DATA_VALUE)
        if len(data) != byte_count:
            raise ModbusException(ExceptionCode.ILLEGAL_DATA_VALUE)
        _check_range(address, count)
        return WriteMultipleCoils(address, unpack_bits(data, count))
    if not 1 <= count <= MAX_WRITE_REGISTERS or byte_count != 2 * count:
        raise ModbusException(ExceptionCode.ILLEGAL_DATA_VALUE)
    if len(data) != byte_count:
        raise ModbusException(ExceptionCode.ILLEGAL_DATA_VALUE)
    _check_range(address, count)
    return WriteMultipleRegisters(address, struct.unpack(f">{count}H", data))


def encode_request(request: Request) -> bytes:
    """The PDU of ``request``; the inverse of :func:`decode_request` for valid requests."""
    match request:
        case ReadRequest(function, address, count):
            return struct.pack(">BHH", function, address, count)
        case WriteSingleCoil(address, value):
            return struct.pack(
                ">BHH", FunctionCode.WRITE_SINGLE_COIL, address, _COIL_ON if value else _COIL_OFF
            )
        case WriteSingleRegister(address, value):
            return struct.pack(">BHH", FunctionCode.WRITE_SINGLE_REGISTER, address, value)
        case WriteMultipleCoils(address, values):
            data = pack_bits(values)
            header = struct.pack(
                ">BHHB", FunctionCode.WRITE_MULTIPLE_COILS, address, len(values), len(data)
            )
            return header + data
        case WriteMultipleRegisters(address, values):
            header = struct.pack(
                ">BHHB",
                FunctionCode.WRITE_MULTIPLE_REGISTERS,
                address,
                len(values),
                2 * len(values),
            )
            return header + struct.pack(f">{len(values)}H", *values)
    raise TypeError(f"not a request: {request!r}")  # pragma: no cover - exhaustive match


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------


def encode_exception(function: int, code: int) -> bytes:
    return bytes((function & 0x7F | 0x80, code))


def encode_read_bits_response(function: int, bits: tuple[bool, ...] | list[bool]) -> bytes:
    data = pack_bits(bits)
    return bytes((function, len(data))) + data


def encode_read_registers_response(function: int, registers: tuple[int, ...] | list[int]) -> bytes:
    return bytes((function, 2 * len(registers))) + struct.pack(f">{len(registers)}H", *registers)


def encode_write_response(request: Request) -> bytes:
    """Writes of one item echo the request; writes of several echo address and quantity."""
    match request:
        case WriteSingleCoil() | WriteSingleRegister():
            return encode_request(request)
        case WriteMultipleCoils(address, values):
            return struct.pack(">BHH", FunctionCode.WRITE_MULTIPLE_COILS, address, len(values))
        case WriteMultipleRegisters(address, values):
            return struct.pack(">BHH", FunctionCode.WRITE_MULTIPLE_REGISTERS, address, len(values))
    raise TypeError(f"not a write request: {request!r}")


# ---------------------------------------------------------------------------------------------
# RTU framing
# ---------------------------------------------------------------------------------------------


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16(data: bytes) -> int:
    """CRC-16/MODBUS (reflected polynomial 0xA001, initial value 0xFFFF)."""
    crc = 0xFFFF
    for byte in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc


def encode_rtu_frame(unit: int, pdu: bytes) -> bytes:
    """Unit id, PDU, then the CRC low byte first (the one little-endian field of Modbus)."""
    body = bytes((unit,)) + pdu
    return body + struct.pack("<H", crc16(body))


def decode_rtu_frame(frame: bytes) -> tuple[int, bytes]:
    """(unit id, PDU) of an RTU frame; :class:`FrameError` if it is short, long or corrupt."""
    if len(frame) < 4:
        raise FrameError(f"RTU frame of {len(frame)} bytes is too short")
    if len(frame) > MAX_RTU_FRAME_BYTES:
        raise FrameError(f"RTU frame of {len(frame)} bytes is too long")
    (received,) = struct.unpack("<H", frame[-2:])
    if crc16(frame[:-2]) != received:
        raise FrameError("RTU frame CRC mismatch")
    return frame[0], frame[1:-2]


# ---------------------------------------------------------------------------------------------
# TCP framing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MbapHeader:
    transaction_id: int
    protocol_id: int
    length: int
    """Bytes that follow the length field: the unit id and the PDU."""
    unit: int

    @property
    def pdu_length(self) -> int:
        return self.length - 1


def encode_mbap(transaction_id: int, unit: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", transaction_id, 0, len(pdu) + 1, unit) + pdu


def decode_mbap_header(header: bytes) -> MbapHeader:
    """Parse the 7-byte MBAP header. A length that cannot be a Modbus PDU is a
    :class:`FrameError`: the stream has lost its framing and the connection must go."""
    if len(header) != MBAP_HEADER_BYTES:
        raise FrameError(f"MBAP header must be {MBAP_HEADER_BYTES} bytes, got {len(header)}")
    transaction_id, protocol_id, length, unit = struct.unpack(">HHHB", header)
    if not 2 <= length <= MAX_PDU_BYTES + 1:
        raise FrameError(f"MBAP length {length} out of range")
    return MbapHeader(transaction_id, protocol_id, length, unit)


def _request_frame_length(data: bytes) -> int | None:
    """Length of the RTU request frame at the start of ``data``, from its function code."""
    if len(data) < 2:
        return None
    if data[1] in range(FunctionCode.READ_COILS, FunctionCode.WRITE_SINGLE_REGISTER + 1):
        return 8
    if data[1] in (FunctionCode.WRITE_MULTIPLE_COILS, FunctionCode.WRITE_MULTIPLE_REGISTERS):
        return 9 + data[6] if len(data) > 6 else None
    return None


def split_rtu_requests(data: bytes) -> list[bytes]:
    """Split bytes received between two silences into request frames.

    Normally that is one frame. A master that sends again right after a broadcast (without the
    turnaround delay) glues two frames together, and a pseudo-terminal has no baud rate to make
    the gap audible; so leading frames whose length follows from their function code and whose
    CRC checks are split off, and whatever remains is one (probably bad) frame.
    """
    frames: list[bytes] = []
    rest = data
    while rest:
        length = _request_frame_length(rest)
        if length is None or length >= len(rest):
            frames.append(rest)
            break
        candidate = rest[:length]
        if crc16(candidate[:-2]) != struct.unpack("<H", candidate[-2:])[0]:
            frames.append(rest)
            break
        frames.append(candidate)
        rest = rest[length:]
    return frames
