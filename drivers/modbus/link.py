"""The one seam between Lampyre and pymodbus: a Modbus link that does one transaction at a time.

pymodbus (pinned to 3.16 in pyproject, whose keyword names and internals this module was checked
against) is used without its own reliability logic: no automatic reconnect (``reconnect_delay=0``
starts no reconnect task in 3.16, so the busy loop of pymodbus issue #1794 cannot happen), no
retries (``retries=0``), no "disconnect after N silent requests". The runtime owns all of that.

What this module adds on top, and why:

* **Our own response timer.** pymodbus reports a timeout as a generic ``ModbusIOException``;
  running its timer as a backstop behind ours lets us tell "no answer" from "bad answer".
* **RTU line discipline** (pymodbus issue #1509, PR #2636: RTU frames carry no transaction id, so
  a reply arriving after its timeout is taken for the next request's): at least 3.5 character
  times of silence before every request, and after a timeout, a garbled reply or a cancelled
  transaction, a longer pause (``AFTER_TIMEOUT_GAP_S``) and a flush of whatever arrived late.
* **Reply checks pymodbus does not make**: the function code must match the request's (a late
  FC04 reply is not an answer to FC03) and the caller checks register counts.
* **Garbled frames stay local.** pymodbus raises from inside its protocol callback when a frame
  passes framing but not decoding; on a TCP transport asyncio treats that as fatal and drops the
  connection. We catch it there and fail only the pending transaction.
* **Connection loss fails the pending transaction at once** instead of letting it time out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient, ModbusBaseClient
from pymodbus.exceptions import ConnectionException, ModbusException
from pymodbus.pdu import ModbusPDU

from agent.sdk import BusHealth

__all__ = [
    "AFTER_TIMEOUT_GAP_S",
    "BadReply",
    "LinkDown",
    "LinkError",
    "LinkSettings",
    "ModbusLink",
    "NoReply",
    "rtu_silent_interval_s",
]

logger = logging.getLogger(__name__)

AFTER_TIMEOUT_GAP_S: Final = 0.1
"""Pause after a failed RTU transaction before the line is flushed and used again: a reply that
was merely late lands in this window and is discarded instead of answering the next request."""
BACKSTOP_MARGIN_S: Final = 1.0
"""pymodbus's own response timer runs this much longer than ours, so ours always fires first."""
NEVER_DISCONNECT_AFTER: Final = 2**31 - 1
"""pymodbus drops a TCP link after a few unanswered requests; one silent device behind a
gateway must not take the whole bus down, and reconnecting is the runtime's decision anyway."""
FAST_BAUD_SILENT_INTERVAL_S: Final = 0.00175
"""Modbus over serial line spec: above 19200 baud the 3.5-character gap is fixed at 1.75 ms."""

Transport = Literal["tcp", "rtu"]


class LinkError(Exception):
    """Base of what :class:`ModbusLink` raises; the driver maps these to SDK errors."""


class LinkDown(LinkError):
    """Not connected, connection lost, or the endpoint could not be opened."""


class NoReply(LinkError):
    """The device did not answer within the response timeout."""


class BadReply(LinkError):
    """Something came back that is not a valid answer to the request."""


class _Garbled(Exception):
    pass


class _Dropped(Exception):
    pass


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """A validated bus table."""

    transport: Transport
    timeout_s: float = 1.0
    inter_request_gap_s: float = 0.0
    host: str = ""
    port: int = 502
    device: str = ""
    baudrate: int = 9600
    parity: Literal["N", "E", "O"] = "N"
    stopbits: int = 1
    bytesize: int = 8

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}" if self.transport == "tcp" else self.device


def rtu_silent_interval_s(baudrate: int, bytesize: int, parity: str, stopbits: int) -> float:
    """The 3.5-character silence that delimits RTU frames at this line setting."""
    if baudrate > 19200:
        return FAST_BAUD_SILENT_INTERVAL_S
    bits_per_char = 1 + bytesize + (0 if parity == "N" else 1) + stopbits
    return 3.5 * bits_per_char / baudrate


ClientCall = Callable[[ModbusBaseClient], Awaitable[ModbusPDU]]
ReplyCheck = Callable[[ModbusPDU], str | None]


class ModbusLink:
    """One open Modbus TCP connection or serial line. Create, :meth:`open`, use, :meth:`close`;
    a closed link is not reopened (make a new one)."""

    def __init__(self, settings: LinkSettings, name: str, health: BusHealth) -> None:
        self.settings = settings
        self.name = name
        self.health = health
        self._client: ModbusBaseClient | None = None
        self._lock = asyncio.Lock()
        self._dirty = False
        self._in_flight = False
        self._last_activity = 0.0
        self._open_error: BaseException | None = None
        gap = settings.inter_request_gap_s
        if settings.transport == "rtu":
            gap = max(
                gap,
                rtu_silent_interval_s(
                    settings.baudrate, settings.bytesize, settings.parity, settings.stopbits
                ),
            )
        self._min_gap_s = gap

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    async def open(self) -> None:
        """Connect or open the port; raise :class:`LinkDown` with the reason, leaving nothing
        open."""
        if self._client is not None:
            raise RuntimeError("a ModbusLink is opened once")
        try:
            client = self._make_client()
        except (ModbusException, ValueError, RuntimeError) as exc:
            raise LinkDown(f"cannot set up {self.settings.endpoint}: {exc}") from exc
        self._client = client
        ok = False
        try:
            ok = await client.connect()
        except (ModbusException, OSError) as exc:
            self._open_error = exc
        finally:
            if not ok:
                self.close()
        if not ok:
            raise LinkDown(self._describe_open_failure())
        self._last_activity = asyncio.get_running_loop().time()
        logger.debug("%s: connected to %s", self.name, self.settings.endpoint)

    def close(self) -> None:
        """Close; idempotent. A transaction in flight fails with :class:`LinkDown`."""
        client, self._client = self._client, None
        if client is None:
            return
        self._fail_pending(client, _Dropped("link closed"))
        client.close()

    async def transact(
        self, unit: int, function_code: int, call: ClientCall, check: ReplyCheck
    ) -> ModbusPDU:
        """Run one request and return its reply, which may be an exception response
        (``reply.isError()``); ``check`` validates a normal reply and returns a complaint."""
        async with self._lock:
            client = self._client
            if client is None or not client.connected:
                raise LinkDown("not connected")
            await self._quiet_line(client)
            self._dirty = True
            self.health.transactions += 1
            loop = asyncio.get_running_loop()
            self._in_flight = True
            try:
                async with asyncio.timeout(self.settings.timeout_s):
                    reply = await call(client)
            except TimeoutError:
                if not client.connected:
                    raise self._failed(LinkDown, "connection lost") from None
                self.health.timeouts += 1
                raise self._failed(
                    NoReply, f"unit {unit}: no reply within {self.settings.timeout_s} s"
                ) from None
            except _Dropped as exc:
                raise self._failed(LinkDown, str(exc)) from None
            except ConnectionException as exc:
                raise self._failed(LinkDown, f"connection lost ({exc})") from None
            except _Garbled as exc:
                raise self._failed(BadReply, f"unit {unit}: garbled reply ({exc})") from None
            except ModbusException as exc:
                raise self._failed(BadReply, f"unit {unit}: {exc}") from None
            finally:
                self._in_flight = False
                self._last_activity = loop.time()
            complaint = _check_reply(reply, unit, function_code)
            if complaint is None and not reply.isError():
                complaint = check(reply)
            if complaint is not None:
                raise self._failed(BadReply, f"unit {unit}: {complaint}")
            self._dirty = False
            return reply

    # ------------------------------------------------------------------------------------
    def _make_client(self) -> ModbusBaseClient:
        s = self.settings
        common: dict[str, Any] = {
            "name": self.name,
            "reconnect_delay": 0,
            "reconnect_delay_max": 0,
            "timeout": s.timeout_s + BACKSTOP_MARGIN_S,
            "retries": 0,
            "trace_connect": self._on_connect_change,
        }
        client: ModbusBaseClient
        if s.transport == "tcp":
            client = AsyncModbusTcpClient(s.host, port=s.port, **common)
        else:
            client = AsyncModbusSerialClient(
                s.device,
                baudrate=s.baudrate,
                bytesize=s.bytesize,
                parity=s.parity,
                stopbits=s.stopbits,
                **common,
            )
        client.set_max_no_responses(NEVER_DISCONNECT_AFTER)
        self._guard_protocol(client)
        return client

    def _guard_protocol(self, client: ModbusBaseClient) -> None:
        # The two places where pymodbus's transaction manager is wrapped rather than used
        # through its API (see the module docstring); both are instance attributes in 3.16.
        ctx = client.ctx
        receive = ctx.callback_data
        create = ctx.call_create

        def guarded_receive(data: bytes, addr: tuple[Any, ...] | None = None) -> int:
            try:
                return receive(data, addr=addr)
            except Exception as exc:  # an exception here would make asyncio drop the socket
                logger.debug("%s: undecodable reply %s", self.name, data.hex(), exc_info=True)
                self._fail_pending(client, _Garbled(str(exc) or type(exc).__name__))
                return len(data)

        async def create_remembering_why() -> Any:
            try:
                return await create()
            except BaseException as exc:
                self._open_error = exc
                raise

        ctx.callback_data = guarded_receive  # type: ignore[method-assign]
        ctx.call_create = create_remembering_why

    def _on_connect_change(self, connected: bool) -> None:
        if not connected and self._client is not None:
            self._fail_pending(self._client, _Dropped("connection lost"))

    def _fail_pending(self, client: ModbusBaseClient, error: Exception) -> None:
        # pymodbus keeps a response future even when no request waits on it; failing that one
        # would only log "exception never retrieved".
        if not self._in_flight:
            return
        future: asyncio.Future[Any] | None = getattr(client.ctx, "response_future", None)
        if future is not None and not future.done():
            future.set_exception(error)

    async def _quiet_line(self, client: ModbusBaseClient) -> None:
        gap = self._min_gap_s
        if self._dirty and self.settings.transport == "rtu":
            gap = max(gap, AFTER_TIMEOUT_GAP_S)
        wait = self._last_activity + gap - asyncio.get_running_loop().time()
        if wait > 0:
            await asyncio.sleep(wait)
        if self._dirty:
            # Whatever arrived since the failed transaction belongs to no request of ours.
            client.ctx.recv_buffer = b""
            self._dirty = False

    def _failed(self, kind: type[LinkError], message: str) -> LinkError:
        if kind is not NoReply:
            self.health.errors += 1
        self.health.last_error = message
        return kind(message)

    def _describe_open_failure(self) -> str:
        error = self._open_error
        what = (
            f"cannot connect to {self.settings.endpoint}"
            if self.settings.transport == "tcp"
            else f"cannot open serial port {self.settings.endpoint}"
        )
        if isinstance(error, TimeoutError):
            return f"{what}: no answer within {self.settings.timeout_s + BACKSTOP_MARGIN_S} s"
        if isinstance(error, ConnectionRefusedError):
            return f"{what}: connection refused"
        if error is not None:
            return f"{what}: {error}"
        return what


def _check_reply(reply: ModbusPDU, unit: int, function_code: int) -> str | None:
    if unit and reply.dev_id != unit:
        return f"reply from unit {reply.dev_id}"
    if reply.function_code not in (function_code, function_code | 0x80):
        return f"reply has function code {reply.function_code}, expected {function_code}"
    return None
