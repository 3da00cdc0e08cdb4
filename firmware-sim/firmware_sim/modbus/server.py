"""The Modbus simulator's transports: Modbus TCP on asyncio streams and Modbus RTU on a
pseudo-terminal, both in front of the same set of devices keyed by unit id.

Written by hand rather than on a Modbus library's server on purpose: the driver's tests need
an independent implementation on the other side of the wire, and fault injection (silence,
late replies, damaged frames, dropped connections) must be exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import tty
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from firmware_sim.modbus.devices import EnergyMeter, LampController, ModbusDevice
from firmware_sim.modbus.protocol import (
    MAX_RTU_FRAME_BYTES,
    MBAP_HEADER_BYTES,
    ExceptionCode,
    FrameError,
    ModbusException,
    ReadRequest,
    decode_mbap_header,
    decode_request,
    decode_rtu_frame,
    encode_exception,
    encode_mbap,
    encode_rtu_frame,
    split_rtu_requests,
)

__all__ = ["GARBAGE_REPLY", "RTU_SILENCE_S", "ModbusSimulator"]

logger = logging.getLogger(__name__)

RTU_SILENCE_S = 0.003
"""End of an RTU frame: this long without a byte. The spec's 3.5 character times depend on a
baud rate a pseudo-terminal does not have, so a small fixed silence stands in for it."""
RTU_QUEUE_FRAMES = 64
"""Frames waiting while a slow unit holds the line; further ones are lost, as on a real bus."""
RTU_MAX_PENDING_OUTPUT_BYTES = 65536
"""Replies nobody reads pile up in the pty; past this they are dropped instead."""
GARBAGE_REPLY = b"\xde\xad\xbe\xef\x00\xff\x55\xaa\x13\x37"
"""Sent instead of a reply by the ``garbage`` fault. As TCP it is an MBAP header with a wrong
protocol id and a length promising more bytes than follow; as RTU it names another unit and
fails its CRC."""
BROADCAST_UNIT = 0
MAX_UNIT_ID = 247

_D = TypeVar("_D", bound=ModbusDevice)


@dataclass(frozen=True, slots=True)
class _Reply:
    pdu: bytes
    delay_s: float
    garbage: bool
    bad_crc: bool


@dataclass(eq=False)
class _Listener:
    server: asyncio.Server | None = None
    port: int = 0
    closed: bool = False


class ModbusSimulator:
    """Serves Modbus devices, keyed by unit id, over TCP and/or RTU on a pty.

    The constructor does no I/O; :meth:`start_tcp` and :meth:`start_rtu` open listeners (each
    may be called again after a stop, e.g. to restart TCP on the same port), :meth:`stop` is
    idempotent. Requests on one TCP connection, and all requests on the RTU line, are handled
    one after the other, so a slow unit delays what follows it, like a serial line does.

    Unit id 0 is a broadcast on both transports: writes are applied to every unit that is not
    faulted with ``no_answer`` or ``exception_code``, and nothing is answered. A request for a
    unit that is not served gets no answer, or over TCP the exception ``gateway_exception`` when
    one is given (0x0B is what TCP-to-RTU gateways send).
    """

    def __init__(
        self,
        devices: Mapping[int, ModbusDevice],
        *,
        gateway_exception: int | None = None,
    ) -> None:
        for unit_id in devices:
            if not 1 <= unit_id <= MAX_UNIT_ID:
                raise ValueError(f"unit ids must be 1..{MAX_UNIT_ID}, got {unit_id}")
        self._devices = dict(devices)
        self.gateway_exception = gateway_exception
        self.internal_errors = 0
        """Unexpected exceptions caught while serving (a healthy run keeps this at 0)."""
        self.rtu_bad_frames = 0
        """RTU frames dropped for a bad CRC or length, or lost while the line was busy."""
        self._listeners: list[_Listener] = []
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._rtu: _RtuLine | None = None

    # Devices --------------------------------------------------------------------------------
    @property
    def units(self) -> Mapping[int, ModbusDevice]:
        return self._devices

    def unit(self, unit_id: int) -> ModbusDevice:
        """The device served as ``unit_id`` (KeyError if none)."""
        return self._devices[unit_id]

    def lamp(self, unit_id: int) -> LampController:
        """:meth:`unit`, typed for a lamp controller."""
        return self._typed(unit_id, LampController)

    def meter(self, unit_id: int) -> EnergyMeter:
        """:meth:`unit`, typed for an energy meter."""
        return self._typed(unit_id, EnergyMeter)

    def _typed(self, unit_id: int, kind: type[_D]) -> _D:
        device = self._devices[unit_id]
        if not isinstance(device, kind):
            raise TypeError(f"unit {unit_id} is a {type(device).__name__}, not a {kind.__name__}")
        return device

    # Lifecycle ------------------------------------------------------------------------------
    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen for Modbus TCP on ``host``:``port`` (0 picks a free port); returns the port."""
        # Made first: a client retrying a fixed port may connect before start_server returns.
        listener = _Listener()

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve_client(listener, reader, writer)

        listener.server = await asyncio.start_server(on_client, host, port)
        bound = int(listener.server.sockets[0].getsockname()[1])
        listener.port = bound
        self._listeners.append(listener)
        if not _is_loopback(host):
            logger.warning("Modbus TCP simulator listening on non-loopback address %s", host)
        logger.info("Modbus TCP simulator listening on %s:%s", host, bound)
        return bound

    @property
    def tcp_ports(self) -> list[int]:
        return [listener.port for listener in self._listeners]

    @property
    def connection_count(self) -> int:
        """Open TCP client connections."""
        return len(self._connections)

    async def stop_tcp(self) -> None:
        """Close every TCP listener and connection; RTU keeps running."""
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener.closed = True
            if listener.server is not None:
                listener.server.close()
        await self.drop_connections()
        for listener in listeners:
            if listener.server is not None:
                await listener.server.wait_closed()

    async def drop_connections(self, *, abort: bool = False) -> None:
        """Close every TCP client connection (with a reset if ``abort``); listeners stay."""
        connections = list(self._connections.items())
        for task, writer in connections:
            if abort:
                writer.transport.abort()
            task.cancel()
        if connections:
            await asyncio.gather(*(task for task, _ in connections), return_exceptions=True)

    async def start_rtu(self) -> str:
        """Open a pseudo-terminal and serve Modbus RTU on it; returns the path a client opens
        (e.g. ``/dev/pts/7``) with any serial settings."""
        if self._rtu is not None:
            raise RuntimeError("RTU is already running")
        line = _RtuLine(self)
        path = line.open()
        self._rtu = line
        logger.info("Modbus RTU simulator on %s", path)
        return path

    @property
    def rtu_path(self) -> str | None:
        return self._rtu.path if self._rtu is not None else None

    async def stop_rtu(self) -> None:
        line, self._rtu = self._rtu, None
        if line is not None:
            await line.close()

    async def stop(self) -> None:
        """Close every listener, connection and the pty. Idempotent."""
        await self.stop_tcp()
        await self.stop_rtu()

    async def __aenter__(self) -> ModbusSimulator:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # Request dispatch -----------------------------------------------------------------------
    def _respond(self, unit_id: int, pdu: bytes, *, tcp: bool) -> _Reply | None:
        """What to send back for a request PDU to ``unit_id`` (None: stay silent)."""
        try:
            if unit_id == BROADCAST_UNIT:
                self._broadcast(pdu)
                return None
            device = self._devices.get(unit_id)
            if device is None:
                if tcp and self.gateway_exception is not None and pdu:
                    reply = encode_exception(pdu[0], self.gateway_exception)
                    return _Reply(reply, 0.0, garbage=False, bad_crc=False)
                return None
            device.requests += 1
            device.requests_by_function[pdu[0] if pdu else 0] += 1
            faults = device.faults
            if faults.no_answer:
                return None
            if faults.exception_code is not None:
                reply = encode_exception(pdu[0] if pdu else 0, faults.exception_code)
            else:
                reply = device.handle(pdu)
            return _Reply(reply, faults.delay_s, faults.garbage, faults.bad_crc)
        except Exception:
            self.internal_errors += 1
            logger.exception("Simulated unit %s failed on request %s", unit_id, pdu.hex())
            reply = encode_exception(pdu[0] if pdu else 0, ExceptionCode.SERVER_DEVICE_FAILURE)
            return _Reply(reply, 0.0, garbage=False, bad_crc=False)

    def _broadcast(self, pdu: bytes) -> None:
        try:
            request = decode_request(pdu)
        except ModbusException:
            return
        for device in self._devices.values():
            device.requests += 1
            device.requests_by_function[pdu[0]] += 1
            if isinstance(request, ReadRequest):
                continue  # reads cannot be broadcast; every unit ignores them
            if device.faults.no_answer or device.faults.exception_code is not None:
                continue
            with contextlib.suppress(ModbusException):
                device.execute(request)

    # TCP ------------------------------------------------------------------------------------
    async def _serve_client(
        self, listener: _Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        if listener.closed:
            # Accepted just before the listener closed: refuse rather than serve unseen.
            writer.transport.abort()
            return
        self._connections[task] = writer
        peer = writer.get_extra_info("peername")
        logger.debug("Modbus TCP client %s connected", peer)
        try:
            await self._serve_stream(reader, writer)
        except (asyncio.IncompleteReadError, OSError):
            pass  # the client went away, or the line was dropped
        except Exception:
            self.internal_errors += 1
            logger.exception("Modbus TCP connection from %s failed", peer)
        finally:
            del self._connections[task]
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            logger.debug("Modbus TCP client %s disconnected", peer)

    async def _serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            header_bytes = await reader.readexactly(MBAP_HEADER_BYTES)
            try:
                header = decode_mbap_header(header_bytes)
            except FrameError as exc:
                # A length no PDU can have: framing is lost, so is the connection (what
                # devices do; there is no way to find the next frame in a byte stream).
                logger.debug("Closing Modbus TCP connection: %s", exc)
                return
            pdu = await reader.readexactly(header.pdu_length)
            if header.protocol_id != 0:
                continue  # not Modbus: silently discarded, as the spec asks
            reply = self._respond(header.unit, pdu, tcp=True)
            if reply is None:
                continue
            if reply.delay_s > 0:
                await asyncio.sleep(reply.delay_s)
            if reply.garbage:
                writer.write(GARBAGE_REPLY)
            else:
                writer.write(encode_mbap(header.transaction_id, header.unit, reply.pdu))
            await writer.drain()


class _RtuLine:
    """Modbus RTU on the master side of a pseudo-terminal.

    Bytes are read with ``add_reader`` on the non-blocking master fd; a frame ends after
    :data:`RTU_SILENCE_S` of silence. One task handles frames in order, like a half-duplex line.
    The slave fd stays open for the line's life so the pty survives clients coming and going.
    """

    def __init__(self, simulator: ModbusSimulator) -> None:
        self._simulator = simulator
        self.path = ""
        self._master = -1
        self._slave = -1
        self._buffer = bytearray()
        self._overrun = False
        self._silence: asyncio.TimerHandle | None = None
        self._frames: asyncio.Queue[bytes] = asyncio.Queue(RTU_QUEUE_FRAMES)
        self._output = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def open(self) -> str:
        loop = asyncio.get_running_loop()
        master, slave = os.openpty()
        try:
            tty.setraw(slave)
            os.set_blocking(master, False)
            self.path = os.ttyname(slave)
            loop.add_reader(master, self._on_readable)
        except BaseException:
            os.close(master)
            os.close(slave)
            raise
        self._loop = loop
        self._master, self._slave = master, slave
        self._task = loop.create_task(self._process(), name=f"modbus-rtu {self.path}")
        return self.path

    async def close(self) -> None:
        if self._loop is None:
            return
        loop, self._loop = self._loop, None
        loop.remove_reader(self._master)
        loop.remove_writer(self._master)
        if self._silence is not None:
            self._silence.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        os.close(self._master)
        os.close(self._slave)
        logger.info("Modbus RTU simulator on %s closed", self.path)

    # Input ----------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            data = os.read(self._master, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            logger.debug("Reading the RTU pty failed: %s", exc)
            return
        if not data:
            return
        if len(self._buffer) + len(data) > MAX_RTU_FRAME_BYTES:
            self._overrun = True
        else:
            self._buffer += data
        if self._silence is not None:
            self._silence.cancel()
        assert self._loop is not None
        self._silence = self._loop.call_later(RTU_SILENCE_S, self._end_of_frame)

    def _end_of_frame(self) -> None:
        self._silence = None
        frame = bytes(self._buffer)
        self._buffer.clear()
        if self._overrun:
            self._overrun = False
            self._simulator.rtu_bad_frames += 1
            return
        for request in split_rtu_requests(frame):
            try:
                self._frames.put_nowait(request)
            except asyncio.QueueFull:
                self._simulator.rtu_bad_frames += 1

    async def _process(self) -> None:
        while True:
            frame = await self._frames.get()
            try:
                unit_id, pdu = decode_rtu_frame(frame)
            except FrameError as exc:
                self._simulator.rtu_bad_frames += 1
                logger.debug("Dropped RTU frame %s: %s", frame.hex(), exc)
                continue
            reply = self._simulator._respond(unit_id, pdu, tcp=False)
            if reply is None:
                continue
            if reply.delay_s > 0:
                await asyncio.sleep(reply.delay_s)
            if reply.garbage:
                self._send(GARBAGE_REPLY)
            elif reply.bad_crc:
                frame = encode_rtu_frame(unit_id, reply.pdu)
                self._send(frame[:-2] + bytes((frame[-2] ^ 0xFF, frame[-1] ^ 0xFF)))
            else:
                self._send(encode_rtu_frame(unit_id, reply.pdu))

    # Output ---------------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        if self._output:
            if len(self._output) + len(data) <= RTU_MAX_PENDING_OUTPUT_BYTES:
                self._output += data
            return
        try:
            written = os.write(self._master, data)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            logger.debug("Writing the RTU pty failed: %s", exc)
            return
        if written < len(data):
            self._output += data[written:]
            assert self._loop is not None
            self._loop.add_writer(self._master, self._on_writable)

    def _on_writable(self) -> None:
        try:
            written = os.write(self._master, self._output)
        except BlockingIOError:
            return
        except OSError as exc:
            logger.debug("Writing the RTU pty failed: %s", exc)
            written = len(self._output)
        del self._output[:written]
        if not self._output and self._loop is not None:
            self._loop.remove_writer(self._master)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
