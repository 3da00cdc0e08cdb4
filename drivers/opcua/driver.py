"""The OPC UA driver: one client session per bus (one server endpoint), values by subscription.

What it promises (``docs/drivers/opcua.md``): it never looks connected while delivering
nothing. At each connection it builds a **new** asyncua client (a client object that lost its
server is never reused: reconnecting one can hang on a black-holed address), resolves every
point's node id or browse path, creates one subscription with a monitored item per node, and
then :meth:`OpcUaDriver.run` watches three things at once:

- the session: asyncua's own probe reads the server state every ``keepalive_s`` and reports a
  lost or frozen connection;
- the subscription: the server must answer a Publish request with data or a keep-alive at
  least every ``keepalive_s``; silence for :attr:`BusSettings.stale_after_s` (a deleted
  subscription, a server that stopped publishing) is a loss too;
- status changes the server sends about the subscription (timed out, closed).

Any of them raises ``BusUnavailable``: the runtime closes the session and reconnects with
backoff, the subscription is created again, and the time without values is published as one
``gap`` event per device once values flow again.

asyncua's own stale-subscription watchdog is turned off: it re-creates a silent subscription
quietly, and the hole in the data would go unreported.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar, cast

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.subscription import (
    DataChangeEvent,
    OverflowPolicy,
    StatusChangeEvent,
    Subscription,
)
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStatusCodeError

from agent.sdk import (
    BusHealth,
    BusSpec,
    BusUnavailable,
    ConfigError,
    DeviceSpec,
    DeviceUnreachable,
    Driver,
    DriverContext,
    FatalDriverError,
    PointSpec,
    Quality,
    Reading,
    Value,
    now_ms,
)

from .session import SessionError, close_client, open_client
from .settings import (
    VALUE_PLACEHOLDER,
    BusSettings,
    DeviceSettings,
    NodeTemplate,
    PointSettings,
    missing_params,
    parse_browse_path,
    parse_bus,
    parse_device,
    parse_node_id,
    parse_point,
)

__all__ = ["OpcUaBusHealth", "OpcUaDriver", "to_reading"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

WATCH_INTERVAL_S: Final = 0.5
"""How often run() looks at the subscription's last publish time when no data arrives."""
EVENT_QUEUE_MAX: Final = 20_000
"""Notifications waiting for the driver (4 s of a 5,000-item server). If the agent falls that
far behind, the session is dropped and re-created (asyncua's DISCONNECT policy), which ends in
a ``gap`` event, rather than values lost without a word or memory growing without bound."""
LIFETIME_KEEPALIVES: Final = 3
"""The subscription's lifetime count, in keep-alive periods (the specification's minimum)."""

# Standard data types that are subtypes of a built-in one (Part 3/5), for writes and methods.
_SUBTYPES: Final = {
    29: ua.VariantType.Int32,  # Enumeration: enumerated values travel as Int32
    290: ua.VariantType.Double,  # Duration
    294: ua.VariantType.DateTime,  # UtcTime
    295: ua.VariantType.String,  # LocaleId
}
_INTEGER_RANGES: Final = {
    ua.VariantType.SByte: (-(2**7), 2**7 - 1),
    ua.VariantType.Byte: (0, 2**8 - 1),
    ua.VariantType.Int16: (-(2**15), 2**15 - 1),
    ua.VariantType.UInt16: (0, 2**16 - 1),
    ua.VariantType.Int32: (-(2**31), 2**31 - 1),
    ua.VariantType.UInt32: (0, 2**32 - 1),
    ua.VariantType.Int64: (-(2**63), 2**63 - 1),
    ua.VariantType.UInt64: (0, 2**64 - 1),
}
_SESSION_GONE: Final = frozenset(
    {
        StatusCodes.BadSessionIdInvalid,
        StatusCodes.BadSessionClosed,
        StatusCodes.BadSessionNotActivated,
        StatusCodes.BadSecureChannelClosed,
        StatusCodes.BadSecureChannelIdInvalid,
        StatusCodes.BadConnectionClosed,
        StatusCodes.BadServerNotConnected,
        StatusCodes.BadShutdown,
        StatusCodes.BadCommunicationError,
        StatusCodes.BadTimeout,
    }
)


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


def _epoch_ms(when: dt.datetime | None) -> int | None:
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)  # OPC UA DateTime is UTC
    ms = int(when.timestamp() * 1000)
    return ms if ms > 0 else None  # DateTime.MinValue means "not set"


def _convert(raw: Any) -> tuple[Value, str | None]:
    """An OPC UA scalar as a reading value, or (None, why not)."""
    if raw is None or isinstance(raw, bool | int | str):
        return raw, None
    if isinstance(raw, float):
        if not math.isfinite(raw):
            return None, f"non-finite number {raw}"
        return raw, None
    if isinstance(raw, dt.datetime):
        when = raw if raw.tzinfo is not None else raw.replace(tzinfo=dt.UTC)
        return when.astimezone(dt.UTC).isoformat().replace("+00:00", "Z"), None
    if isinstance(raw, ua.LocalizedText):
        return raw.Text, None
    if isinstance(raw, ua.StatusCode):
        return raw.name, None
    return None, f"unsupported value type {type(raw).__name__}"


def to_reading(device: str, point: PointSpec, data: ua.DataValue, received_ms: int) -> Reading:
    """A DataValue as a reading: the status code gives the quality (Good, Uncertain, Bad),
    the source timestamp (else the server's, else reception) the time."""
    status = data.StatusCode if data.StatusCode is not None else ua.StatusCode(ua.UInt32(0))
    ts = _epoch_ms(data.SourceTimestamp) or _epoch_ms(data.ServerTimestamp) or received_ms
    if status.is_bad():
        return Reading(device, point.name, None, point.unit, ts, Quality.BAD)
    raw = data.Value.Value if data.Value is not None else None
    value, problem = _convert(raw)
    if problem is not None:
        return Reading(device, point.name, None, point.unit, ts, Quality.BAD)
    quality = Quality.UNCERTAIN if status.is_uncertain() else Quality.GOOD
    if value is None:
        quality = Quality.BAD
    return Reading(device, point.name, value, point.unit, ts, quality)


def _variant(value: float | int | bool | str, vtype: ua.VariantType) -> ua.Variant:
    """``value`` as the server's type; raises FatalDriverError when it does not fit."""
    if vtype is ua.VariantType.Boolean:
        if isinstance(value, str):
            raise FatalDriverError(f"expected a boolean for a Boolean node, got {value!r}")
        return ua.Variant(bool(value), vtype)
    if vtype in _INTEGER_RANGES:
        if isinstance(value, str) or (isinstance(value, float) and not value.is_integer()):
            raise FatalDriverError(
                f"expected a whole number for a {vtype.name} node, got {value!r}"
            )
        low, high = _INTEGER_RANGES[vtype]
        number = int(value)
        if not low <= number <= high:
            raise FatalDriverError(
                f"{number} is out of range for a {vtype.name} node ({low} to {high})"
            )
        return ua.Variant(number, vtype)
    if vtype in (ua.VariantType.Float, ua.VariantType.Double):
        if isinstance(value, str):
            raise FatalDriverError(f"expected a number for a {vtype.name} node, got {value!r}")
        return ua.Variant(float(value), vtype)
    if vtype is ua.VariantType.String:
        return ua.Variant(str(value), vtype)
    raise FatalDriverError(f"writing a {vtype.name} node is not supported")


def _builtin_type(data_type: ua.NodeId) -> ua.VariantType | None:
    if data_type.NamespaceIndex != 0 or not isinstance(data_type.Identifier, int):
        return None
    if 1 <= data_type.Identifier <= 25:
        return ua.VariantType(data_type.Identifier)
    return _SUBTYPES.get(data_type.Identifier)


# --------------------------------------------------------------------------------------------
# Health
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class OpcUaBusHealth(BusHealth):
    """:class:`BusHealth` plus the subscription's state."""

    monitored_items: int = 0
    notifications: int = 0
    gaps: int = 0
    last_gap_s: float | None = None
    unresolved_points: int = 0

    def as_dict(self) -> dict[str, Any]:
        body = BusHealth.as_dict(self)
        body.update(
            monitored_items=self.monitored_items,
            notifications=self.notifications,
            gaps=self.gaps,
            last_gap_s=self.last_gap_s,
            unresolved_points=self.unresolved_points,
        )
        return body


# --------------------------------------------------------------------------------------------
# Resolution of profile points against the server
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Point:
    """One (device, point) pair and what the server said about it at the last connection."""

    device: DeviceSpec
    spec: PointSpec
    settings: PointSettings
    node: ua.NodeId | None = None
    vtype: ua.VariantType | None = None
    method: ua.NodeId | None = None
    owner: ua.NodeId | None = None
    argument_types: list[ua.VariantType | None] = field(default_factory=list)
    problem: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.device.id, self.spec.name

    def where(self) -> str:
        options = self.spec.options
        for key in ("node", "browse_path", "method"):
            if key in options:
                return str(options.where(key))
        return str(options.where())


class _Unresolved(Exception):
    pass


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


class OpcUaDriver(Driver):
    """An OPC UA server's variables and methods. See ``docs/drivers/opcua.md``."""

    name = "opcua"
    one_transaction_at_a_time = False

    # Configuration-time validation -----------------------------------------------------
    @classmethod
    def validate_bus(cls, bus: BusSpec) -> None:
        parse_bus(bus.options, bus.id)

    @classmethod
    def validate_point(cls, point: PointSpec) -> None:
        parse_point(point)

    @classmethod
    def validate_device(cls, device: DeviceSpec) -> None:
        settings = parse_device(device.options)
        for point in device.profile.points.values():
            try:
                point_settings = parse_point(point)
            except ConfigError:
                # The profile's own check reports it, with the profile's file and line.
                logger.debug("point %s: invalid, reported with its profile", point.name)
                continue
            missing = missing_params(point_settings, settings.params)
            if missing:
                where = point.options.where()
                raise device.options.error(
                    "params" if "params" in device.options else None,
                    f"point {point.name!r} of profile {device.profile.name} ({where}) uses "
                    f"{', '.join('{' + m + '}' for m in missing)}; expected "
                    f"params = {{ {', '.join(f'{m} = ...' for m in missing)} }}",
                )

    # Lifecycle ---------------------------------------------------------------------------
    def __init__(self, bus: BusSpec, devices: Sequence[DeviceSpec], context: DriverContext) -> None:
        super().__init__(bus, devices, context)
        self.settings: BusSettings = parse_bus(bus.options, bus.id)
        self._device_settings: dict[str, DeviceSettings] = {
            d.id: parse_device(d.options) for d in devices
        }
        self._points: dict[tuple[str, str], _Point] = {}
        for device in devices:
            for spec in device.profile.points.values():
                point = _Point(device, spec, parse_point(spec))
                self._points[point.key] = point
        self._client: Client | None = None
        self._subscription: Subscription | None = None
        self._by_handle: dict[int, list[_Point]] = {}
        self._lost = asyncio.Event()
        self._lost_reason = ""
        self._reported: dict[tuple[str, str], str] = {}
        self._health = OpcUaBusHealth()
        self._last_heard_ms: int | None = None
        self._gap_from_ms: int | None = None
        self._gap_reason = ""
        self._subscribed_at = 0.0
        self._connected_before = False

    @property
    def _log(self) -> logging.Logger:
        return self.context.logger

    def polled_points(self, device: DeviceSpec) -> Sequence[PointSpec]:
        return [
            spec
            for spec in device.profile.points.values()
            if not (settings := self._points[(device.id, spec.name)].settings).subscribe
            and not settings.is_method
        ]

    async def connect(self) -> None:
        try:
            client = await open_client(self.settings, bus_id=self.bus.id, name=self.bus.id)
        except SessionError as exc:
            self._health.connected = False
            self._health.errors += 1
            self._health.last_error = str(exc)
            raise BusUnavailable(str(exc)) from None
        # Our own watchdog owns stale subscriptions (see the module docstring): asyncua's
        # would re-create them without a word. Its margin is read at every check.
        client._stale_check_margin = math.inf
        self._lost = asyncio.Event()
        self._lost_reason = ""
        client.connection_lost_callback = self._connection_lost
        try:
            await self._resolve(client)
            await self._subscribe(client)
        except BaseException as exc:
            await close_client(client)
            self._subscription = None
            if isinstance(exc, BusUnavailable | asyncio.CancelledError):
                raise
            raise BusUnavailable(f"setting up the session failed: {_describe(exc)}") from None
        self._client = client
        if self._connected_before:
            self._health.reconnects += 1
        self._connected_before = True
        self._health.connected = True
        self._health.last_error = None

    async def close(self) -> None:
        client, self._client = self._client, None
        subscription, self._subscription = self._subscription, None
        self._health.connected = False
        if client is None:
            return
        if subscription is not None and self._subscribed_points():
            self._note_gap_start()
        await close_client(client)

    async def _connection_lost(self, exc: Exception) -> None:
        self._signal_lost(f"connection lost: {_describe(exc)}")

    def _signal_lost(self, reason: str) -> None:
        if not self._lost.is_set():
            self._lost_reason = reason
            self._lost.set()

    def _failed(self, reason: str) -> BusUnavailable:
        """The error that ends run(); the first reason recorded is the one the gap reports."""
        self._signal_lost(reason)
        return BusUnavailable(self._lost_reason)

    def _subscribed_points(self) -> list[_Point]:
        return [p for p in self._points.values() if p.settings.subscribe and p.node is not None]

    # Pushed values -----------------------------------------------------------------------
    async def run(self) -> None:
        subscription = self._subscription
        if subscription is None:
            # Nothing subscribed (all points polled or unresolved): watch the session only.
            await self._lost.wait()
            raise BusUnavailable(self._lost_reason)
        stale_after = self.settings.stale_after_s
        while True:
            if self._lost.is_set():
                raise BusUnavailable(self._lost_reason)
            try:
                event = await subscription.next_event(timeout=WATCH_INTERVAL_S)
            except StopAsyncIteration:
                raise self._failed("the subscription was closed") from None
            if event is None:
                last = subscription.last_publish_at or self._subscribed_at
                silent = time.monotonic() - last
                if subscription.last_publish_at is not None:
                    # A keep-alive is a sign of life too. Read it here, while the queue is
                    # idle: asyncua also stamps the time when it reports a lost session.
                    heard = now_ms() - int(silent * 1000)
                    self._last_heard_ms = max(self._last_heard_ms or 0, heard)
                if silent > stale_after:
                    raise self._failed(
                        f"no data and no keep-alive from the server for {silent:.1f} s "
                        f"(expected one every {self.settings.keepalive_s:g} s): the "
                        "subscription is dead"
                    )
                continue
            if isinstance(event, DataChangeEvent):
                self._on_data(event)
            elif isinstance(event, StatusChangeEvent):
                status = event.notification.Status
                if status is not None and not status.is_good():
                    raise self._failed(f"the server ended the subscription: {status.name}")

    def _on_data(self, event: DataChangeEvent) -> None:
        received = now_ms()
        self._last_heard_ms = received
        self._health.notifications += 1
        if self._gap_from_ms is not None:
            self._report_gap(received)
        item = event.data.monitored_item
        handle = event.data.subscription_data.client_handle
        points = self._by_handle.get(handle, []) if handle is not None else []
        readings = [to_reading(p.device.id, p.spec, item.Value, received) for p in points]
        if readings:
            self.context.emit(readings)

    def _note_gap_start(self) -> None:
        if self._gap_from_ms is not None:
            return  # still in the gap that began earlier
        self._gap_from_ms = self._last_heard_ms or now_ms()
        self._gap_reason = self._lost_reason or "session closed"

    def _report_gap(self, until_ms: int) -> None:
        start = self._gap_from_ms
        assert start is not None
        self._gap_from_ms = None
        duration_s = max(0, until_ms - start) / 1000
        self._health.gaps += 1
        self._health.last_gap_s = duration_s
        self._log.warning(
            "bus %s: values flow again after a gap of %.1f s (%s)",
            self.bus.id,
            duration_s,
            self._gap_reason,
        )
        devices = sorted({p.device.id for p in self._subscribed_points()})
        for device_id in devices:
            self.context.event(
                "gap",
                device_id,
                {
                    "state": "info",
                    "severity": "warning",
                    "bus": self.bus.id,
                    "from_ms": start,
                    "to_ms": until_ms,
                    "duration_s": round(duration_s, 3),
                    "reason": self._gap_reason,
                },
            )

    # I/O -----------------------------------------------------------------------------------
    async def read(self, device: DeviceSpec, points: Sequence[PointSpec]) -> list[Reading]:
        client = self._require_client()
        received = now_ms()
        readings: list[Reading] = []
        wanted: list[_Point] = []
        for spec in points:
            point = self._points[(device.id, spec.name)]
            if point.node is None:
                readings.append(
                    Reading(device.id, spec.name, None, spec.unit, received, Quality.BAD)
                )
            else:
                wanted.append(point)
        for chunk in _chunks(wanted, self.settings.max_items_per_request):
            values = await self._call(client, _read_values(client, [p.node for p in chunk]))
            readings.extend(
                to_reading(device.id, p.spec, value, received)
                for p, value in zip(chunk, values, strict=True)
            )
        return readings

    async def write(
        self,
        device: DeviceSpec,
        point: PointSpec,
        value: float | int | bool,
        *,
        fade_s: float | None = None,
    ) -> None:
        client = self._require_client()
        target = self._points[(device.id, point.name)]
        if target.problem is not None:
            raise FatalDriverError(f"point {point.name} is not usable: {target.problem}")
        if not point.writable:
            raise FatalDriverError(f"point {point.name} is not writable")
        if target.method is not None:
            await self._call_method(client, target, value)
            return
        if target.node is None or target.vtype is None:
            raise FatalDriverError(f"point {point.name}: the node's data type cannot be written")
        variant = _variant(value, target.vtype)
        params = ua.WriteParameters()
        params.NodesToWrite = [
            ua.WriteValue(
                NodeId=target.node,
                AttributeId=AttributeIds.Value,
                Value=ua.DataValue(variant),
            )
        ]
        (status,) = await self._call(client, client.uaclient.write(params))
        if not status.is_good():
            raise FatalDriverError(f"the server refused the write to {point.name}: {status.name}")

    async def _call_method(self, client: Client, target: _Point, value: float | int | bool) -> None:
        assert target.method is not None and target.owner is not None
        arguments: list[ua.Variant] = []
        for raw, vtype in zip(target.settings.arguments, target.argument_types, strict=True):
            given = value if raw == VALUE_PLACEHOLDER else raw
            if vtype is None:
                raise FatalDriverError(
                    f"point {target.spec.name}: an input argument of the method has a data "
                    "type the driver cannot build"
                )
            arguments.append(_variant(given, vtype))
        request = ua.CallMethodRequest(
            ObjectId=target.owner, MethodId=target.method, InputArguments=arguments
        )
        (result,) = await self._call(client, client.uaclient.call([request]))
        if not result.StatusCode.is_good():
            bad_args = [
                f"argument {i + 1}: {code.name}"
                for i, code in enumerate(result.InputArgumentResults or [])
                if not code.is_good()
            ]
            detail = f" ({'; '.join(bad_args)})" if bad_args else ""
            raise FatalDriverError(
                f"method {target.spec.name} failed: {result.StatusCode.name}{detail}"
            )

    def health(self) -> BusHealth:
        self._health.unresolved_points = sum(1 for p in self._points.values() if p.problem)
        return self._health

    # Helpers -----------------------------------------------------------------------------
    def _require_client(self) -> Client:
        if self._client is None or self._lost.is_set():
            raise BusUnavailable(self._lost_reason or f"bus {self.bus.id} is not connected")
        return self._client

    async def _call(self, client: Client, request: Awaitable[T]) -> T:
        """One service call; transport and session failures become BusUnavailable so the
        runtime reconnects, other service errors DeviceUnreachable."""
        try:
            result = await request
        except (TimeoutError, ConnectionError, OSError) as exc:
            self._health.timeouts += 1
            reason = f"no answer from the server: {_describe(exc)}"
            self._signal_lost(reason)
            raise BusUnavailable(reason) from None
        except UaStatusCodeError as exc:
            self._health.errors += 1
            if exc.code in _SESSION_GONE:
                reason = f"the session is gone: {ua.StatusCode(ua.UInt32(exc.code)).name}"
                self._signal_lost(reason)
                raise BusUnavailable(reason) from None
            raise DeviceUnreachable(f"the server refused the request: {_describe(exc)}") from None
        except UaError as exc:
            self._health.errors += 1
            reason = f"OPC UA error: {_describe(exc)}"
            self._signal_lost(reason)
            raise BusUnavailable(reason) from None
        self._health.transactions += 1
        return result

    # Connection set-up -----------------------------------------------------------------------
    async def _resolve(self, client: Client) -> None:
        """Turn every point's node id, browse path or method into server node ids, check that
        the nodes exist and learn their data types; report points that do not resolve."""
        namespaces: list[str] = list(await self._call(client, client.get_namespace_array()))
        browse: list[tuple[_Point, ua.RelativePath]] = []
        for point in self._points.values():
            point.node = point.method = point.owner = None
            point.vtype = None
            point.argument_types = []
            point.problem = None
            params = self._device_settings[point.device.id].params
            namespace = self._namespace_of(point)
            try:
                settings = point.settings
                if settings.node is not None and settings.node.is_browse_path:
                    browse.append(
                        (point, _relative_path(settings.node, params, namespace, namespaces))
                    )
                elif settings.node is not None:
                    point.node = _node_id(settings.node, params, namespace, namespaces)
                if settings.method is not None and settings.object is not None:
                    point.method = _node_id(settings.method, params, namespace, namespaces)
                    point.owner = _node_id(settings.object, params, namespace, namespaces)
            except _Unresolved as exc:
                point.problem = str(exc)
        for chunk in _chunks(browse, self.settings.max_items_per_request):
            results = await self._call(
                client,
                client.translate_browsepaths(
                    ua.NodeId(ua.Int32(ObjectIds.ObjectsFolder)), [path for _, path in chunk]
                ),
            )
            for (point, _), result in zip(chunk, results, strict=True):
                if not result.StatusCode.is_good() or not result.Targets:
                    point.problem = (
                        f"browse path not found on the server ({result.StatusCode.name})"
                    )
                else:
                    target = result.Targets[0].TargetId
                    point.node = ua.NodeId(target.Identifier, target.NamespaceIndex)
        variables = [p for p in self._points.values() if p.node is not None]
        for batch in _chunks(variables, self.settings.max_items_per_request):
            nodes = [p.node for p in batch]
            types = await self._call(client, _read(client, nodes, AttributeIds.DataType))
            for point, data in zip(batch, types, strict=True):
                status = data.StatusCode
                if status is not None and not status.is_good():
                    assert point.node is not None
                    point.problem = f"node {point.node.to_string()} is not usable: {status.name}"
                    point.node = None
                elif point.spec.writable and data.Value is not None:
                    point.vtype = _builtin_type(data.Value.Value)
        for point in self._points.values():
            if point.method is not None:
                await self._resolve_method(client, point)
        self._report_problems()

    async def _resolve_method(self, client: Client, point: _Point) -> None:
        assert point.method is not None
        results = await self._call(
            client,
            client.translate_browsepaths(
                point.method, [ua.RelativePath.from_string("/0:InputArguments")]
            ),
        )
        declared: list[Any] = []
        if results and results[0].StatusCode.is_good() and results[0].Targets:
            target = results[0].Targets[0].TargetId
            (data,) = await self._call(
                client,
                _read(
                    client,
                    [ua.NodeId(target.Identifier, target.NamespaceIndex)],
                    AttributeIds.Value,
                ),
            )
            if data.Value is not None and isinstance(data.Value.Value, list):
                declared = data.Value.Value
        else:
            # No InputArguments property: the method takes no argument, or does not exist.
            (data,) = await self._call(
                client, _read(client, [point.method], AttributeIds.NodeClass)
            )
            if data.StatusCode is not None and not data.StatusCode.is_good():
                point.problem = (
                    f"method {point.method.to_string()} is not usable: {data.StatusCode.name}"
                )
                point.method = None
                return
        if len(declared) != len(point.settings.arguments):
            point.problem = (
                f"method {point.method.to_string()} takes {len(declared)} argument(s), the "
                f"profile gives {len(point.settings.arguments)}"
            )
            point.method = None
            return
        point.argument_types = [_builtin_type(arg.DataType) for arg in declared]

    def _namespace_of(self, point: _Point) -> str | None:
        template = point.settings.node or point.settings.method
        if template is not None and template.namespace is not None:
            return template.namespace
        return self._device_settings[point.device.id].namespace

    def _report_problems(self) -> None:
        for point in self._points.values():
            previous = self._reported.get(point.key)
            if point.problem is not None and point.problem != previous:
                self._reported[point.key] = point.problem
                self._log.error(
                    "bus %s: device %s point %s (%s): %s",
                    self.bus.id,
                    point.device.id,
                    point.spec.name,
                    point.where(),
                    point.problem,
                )
                self.context.event(
                    "point_unresolved",
                    point.device.id,
                    {
                        "state": "raised",
                        "severity": "warning",
                        "point": point.spec.name,
                        "where": point.where(),
                        "reason": point.problem,
                    },
                )
            elif point.problem is None and previous is not None:
                del self._reported[point.key]
                self._log.info(
                    "bus %s: device %s point %s resolves now",
                    self.bus.id,
                    point.device.id,
                    point.spec.name,
                )
                self.context.event(
                    "point_unresolved",
                    point.device.id,
                    {"state": "cleared", "point": point.spec.name},
                )

    async def _subscribe(self, client: Client) -> None:
        """One subscription, one monitored item per distinct node; values start flowing with
        each item's current value."""
        self._by_handle = {}
        points = self._subscribed_points()
        self._health.monitored_items = 0
        if not points:
            self._subscription = None
            return
        settings = self.settings
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=settings.publishing_interval_s * 1000,
            RequestedLifetimeCount=settings.keepalive_count * LIFETIME_KEEPALIVES,
            RequestedMaxKeepAliveCount=settings.keepalive_count,
            MaxNotificationsPerPublish=0,
            PublishingEnabled=True,
            Priority=0,
        )
        subscription = await self._call(
            client,
            client.create_subscription(
                params, None, queue_maxsize=EVENT_QUEUE_MAX, overflow=OverflowPolicy.DISCONNECT
            ),
        )
        self._subscription = subscription
        self._subscribed_at = time.monotonic()
        by_node: dict[ua.NodeId, list[_Point]] = {}
        for point in points:
            assert point.node is not None
            by_node.setdefault(point.node, []).append(point)
        requests: list[tuple[ua.MonitoredItemCreateRequest, list[_Point]]] = []
        for handle, (node, sharing) in enumerate(by_node.items(), start=1):
            requests.append((_monitored_item(node, handle, sharing[0].settings, settings), sharing))
        for chunk in _chunks(requests, settings.max_items_per_request):
            # Register the handles first: the first notifications can beat the reply.
            for request, sharing in chunk:
                self._by_handle[request.RequestedParameters.ClientHandle] = sharing
            results = await self._call(
                client, subscription.create_monitored_items([r for r, _ in chunk])
            )
            for (request, sharing), result in zip(chunk, results, strict=True):
                if isinstance(result, ua.StatusCode):
                    del self._by_handle[request.RequestedParameters.ClientHandle]
                    for point in sharing:
                        point.problem = f"the server refused to monitor {point.node}: {result.name}"
                else:
                    self._health.monitored_items += 1
        self._report_problems()


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    if isinstance(exc, UaStatusCodeError):
        return ua.StatusCode(ua.UInt32(exc.code)).name
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def _namespace_index(uri: str, namespaces: Sequence[str]) -> int:
    try:
        return namespaces.index(uri)
    except ValueError:
        raise _Unresolved(
            f"namespace {uri!r} is not on the server (it has: {', '.join(namespaces)})"
        ) from None


def _node_id(
    template: NodeTemplate,
    params: Mapping[str, str],
    namespace: str | None,
    namespaces: Sequence[str],
) -> ua.NodeId:
    text = template.render(params)
    try:
        node = parse_node_id(text)
    except ValueError as exc:
        raise _Unresolved(f"bad node id {text!r}: {exc}") from None
    uri = getattr(node, "NamespaceUri", None)
    if uri:
        index = _namespace_index(uri, namespaces)
    elif namespace is not None and "ns=" not in text:
        index = _namespace_index(namespace, namespaces)
    else:
        index = node.NamespaceIndex
    return ua.NodeId(node.Identifier, ua.Int16(index), node.NodeIdType)


def _relative_path(
    template: NodeTemplate,
    params: Mapping[str, str],
    namespace: str | None,
    namespaces: Sequence[str],
) -> ua.RelativePath:
    default = _namespace_index(namespace, namespaces) if namespace is not None else 0
    elements = []
    for index, name in parse_browse_path(template.render(params)):
        # asyncua types these flags as its own Boolean marker class; plain bools are what it
        # encodes (cast keeps mypy quiet without a runtime wrapper).
        elements.append(
            ua.RelativePathElement(
                ReferenceTypeId=ua.NodeId(ua.Int32(ObjectIds.HierarchicalReferences)),
                IsInverse=cast(ua.Boolean, False),
                IncludeSubtypes=cast(ua.Boolean, True),
                TargetName=ua.QualifiedName(
                    ua.String(name), ua.UInt16(default if index is None else index)
                ),
            )
        )
    return ua.RelativePath(Elements=elements)


def _monitored_item(
    node: ua.NodeId, handle: int, point: PointSettings, bus: BusSettings
) -> ua.MonitoredItemCreateRequest:
    parameters = ua.MonitoringParameters()
    parameters.ClientHandle = handle
    sampling = point.sampling_interval_s
    parameters.SamplingInterval = (
        bus.publishing_interval_s * 1000 if sampling is None else sampling * 1000
    )
    parameters.QueueSize = point.queue_size
    parameters.DiscardOldest = True
    if point.deadband is not None or point.deadband_percent is not None:
        data_filter = ua.DataChangeFilter()
        data_filter.Trigger = ua.DataChangeTrigger.StatusValue
        if point.deadband is not None:
            data_filter.DeadbandType = ua.DeadbandType.Absolute
            data_filter.DeadbandValue = point.deadband
        else:
            assert point.deadband_percent is not None
            data_filter.DeadbandType = ua.DeadbandType.Percent
            data_filter.DeadbandValue = point.deadband_percent
        parameters.Filter = data_filter
    request = ua.MonitoredItemCreateRequest()
    request.ItemToMonitor = ua.ReadValueId(NodeId=node, AttributeId=AttributeIds.Value)
    request.MonitoringMode = ua.MonitoringMode.Reporting
    request.RequestedParameters = parameters
    return request


async def _read(
    client: Client, nodes: Sequence[ua.NodeId | None], attribute: int
) -> list[ua.DataValue]:
    params = ua.ReadParameters()
    params.TimestampsToReturn = ua.TimestampsToReturn.Both
    params.NodesToRead = [ua.ReadValueId(NodeId=node, AttributeId=attribute) for node in nodes]
    return await client.uaclient.read(params)


def _read_values(
    client: Client, nodes: Sequence[ua.NodeId | None]
) -> Awaitable[list[ua.DataValue]]:
    return _read(client, nodes, AttributeIds.Value)
