"""The OPC UA driver's configuration keys: bus, device and point tables, validated without I/O.

Every error names the file and line (through :meth:`ConfigTable.error`) and says what was
expected. The keys are described in ``docs/drivers/opcua.md``.
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import urlsplit

from agent.sdk import ConfigTable, PointSpec

if TYPE_CHECKING:
    from asyncua import ua

__all__ = [
    "BUS_KEYS",
    "DEVICE_KEYS",
    "MODES",
    "POINT_KEYS",
    "POLICIES",
    "BusSettings",
    "DeviceSettings",
    "NodeTemplate",
    "PointSettings",
    "parse_bus",
    "parse_device",
    "parse_node_id",
    "parse_point",
]

POLICIES: Final = ("Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss", "None")
"""Security policies the driver offers. The deprecated Basic128Rsa15 and Basic256 are not among
them; ``None`` (no signature, no encryption) must be written out in the configuration."""
MODES: Final = ("SignAndEncrypt", "Sign")
IDENTITIES: Final = ("anonymous", "username", "certificate")

BUS_KEYS: Final = (
    "endpoint",
    "security_policy",
    "security_mode",
    "certificate",
    "private_key",
    "application_uri",
    "trust_dir",
    "trust_on_first_use",
    "identity",
    "username",
    "password_file",
    "user_certificate",
    "user_private_key",
    "request_timeout_s",
    "session_timeout_s",
    "publishing_interval_s",
    "keepalive_s",
    "max_items_per_request",
)
DEVICE_KEYS: Final = ("namespace", "params")
POINT_KEYS: Final = (
    "node",
    "browse_path",
    "namespace",
    "mode",
    "sampling_interval_s",
    "queue_size",
    "deadband",
    "deadband_percent",
    "method",
    "object",
    "arguments",
)

CLIENT_CERT_NAME: Final = "client.der"
CLIENT_KEY_NAME: Final = "client-key.pem"
BUS_DEFAULTS: Final = {
    "certificate": f"pki/{{bus}}/{CLIENT_CERT_NAME}",
    "private_key": f"pki/{{bus}}/{CLIENT_KEY_NAME}",
    "trust_dir": "pki/{bus}/trusted",
}
"""Where a bus keeps its files when its table does not say, relative to the configuration
file's folder (``{bus}`` is the bus id); ``lampyre opcua cert`` uses the same defaults."""

DEFAULT_REQUEST_TIMEOUT_S: Final = 4.0
DEFAULT_SESSION_TIMEOUT_S: Final = 60.0
DEFAULT_PUBLISHING_INTERVAL_S: Final = 1.0
DEFAULT_KEEPALIVE_S: Final = 5.0
DEFAULT_MAX_ITEMS_PER_REQUEST: Final = 500
"""Monitored items created, and nodes read, per service call: servers cap the operations per
request (MaxMonitoredItemsPerCall, MaxNodesPerRead); 500 is under the usual limits."""

VALUE_PLACEHOLDER: Final = "$value"
"""In a method point's ``arguments``, the place of the value a command writes."""

_PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class BusSettings:
    endpoint: str
    policy: str
    mode: str
    """``SignAndEncrypt``, ``Sign``, or ``None`` with the ``None`` policy."""
    certificate: Path
    private_key: Path
    application_uri: str | None
    """None: take it from the client certificate."""
    trust_dir: Path
    trust_on_first_use: bool
    identity: str
    username: str | None
    password_file: Path | None
    user_certificate: Path | None
    user_private_key: Path | None
    request_timeout_s: float
    session_timeout_s: float
    publishing_interval_s: float
    keepalive_s: float
    max_items_per_request: int

    @property
    def secure(self) -> bool:
        return self.policy != "None"

    @property
    def keepalive_count(self) -> int:
        """Publishing intervals without data after which the server sends a keep-alive."""
        return max(1, math.ceil(self.keepalive_s / self.publishing_interval_s))

    @property
    def stale_after_s(self) -> float:
        """Silence (no data, no keep-alive) after which the subscription is declared dead:
        two keep-alive periods plus one request timeout, so one late keep-alive is no outage."""
        return 2 * self.keepalive_count * self.publishing_interval_s + self.request_timeout_s


@dataclass(frozen=True, slots=True)
class DeviceSettings:
    namespace: str | None
    params: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class NodeTemplate:
    """A node id or browse path as written in a profile, before device parameters and
    namespace URIs are applied."""

    text: str
    is_browse_path: bool
    namespace: str | None

    def render(self, params: Mapping[str, str]) -> str:
        """The text with each ``{name}`` replaced by the device's parameter (KeyError if the
        device lacks one: :func:`missing_params` catches that at configuration time)."""
        return _PLACEHOLDER.sub(lambda match: params[match.group(1)], self.text)


@dataclass(frozen=True, slots=True)
class PointSettings:
    node: NodeTemplate | None
    """The variable read, subscribed and written; None for a method point."""
    subscribe: bool
    sampling_interval_s: float | None
    """None: the bus's publishing interval."""
    queue_size: int
    deadband: float | None
    deadband_percent: float | None
    method: NodeTemplate | None
    object: NodeTemplate | None
    arguments: tuple[Any, ...]

    @property
    def is_method(self) -> bool:
        return self.method is not None


# --------------------------------------------------------------------------------------------
# Bus
# --------------------------------------------------------------------------------------------


def _base_dir(options: ConfigTable) -> Path:
    return Path(options.file).parent


def _path(options: ConfigTable, key: str, default: str | None, bus_id: str) -> Path | None:
    raw = options.get_str(key, default)
    if raw is None:
        return None
    if not raw.strip():
        raise options.error(key, "expected a file path, got an empty string")
    value = raw.format(bus=bus_id) if raw == default else raw
    return Path(os.path.normpath(_base_dir(options) / Path(value).expanduser()))


def default_application_uri() -> str:
    return f"urn:lampyre:{socket.gethostname()}:opcua"


def parse_bus(options: ConfigTable, bus_id: str) -> BusSettings:
    """Validate a bus table's OPC UA keys (no I/O)."""
    options.check_keys(BUS_KEYS)
    endpoint = options.get_str("endpoint")
    parts = urlsplit(endpoint)
    if parts.scheme != "opc.tcp" or not parts.hostname:
        raise options.error(
            "endpoint", f"expected an opc.tcp://HOST:PORT/PATH address, got {endpoint!r}"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise options.error(
            "endpoint", f"expected a port from 1 to 65535 in {endpoint!r}"
        ) from None
    if parts.username is not None or parts.password is not None:
        raise options.error(
            "endpoint",
            "expected no user name or password in the address (they would be logged); "
            'use identity = "username" with password_file',
        )
    if "security_policy" not in options:
        policy = "Basic256Sha256"
    else:
        policy = options.get_str("security_policy", choices=POLICIES)
    if policy == "None":
        if "security_mode" in options:
            raise options.error(
                "security_mode", 'expected no security_mode with security_policy = "None"'
            )
        mode = "None"
    else:
        mode = options.get_str("security_mode", "SignAndEncrypt", choices=MODES)
    identity = options.get_str("identity", "anonymous", choices=IDENTITIES)
    username = options.get_str("username", None)
    password_file = _path(options, "password_file", None, bus_id)
    user_certificate = _path(options, "user_certificate", None, bus_id)
    user_private_key = _path(options, "user_private_key", None, bus_id)
    if identity == "username":
        if not username:
            raise options.error(None, 'identity = "username" needs username = "NAME"')
        if password_file is None:
            raise options.error(
                None,
                'identity = "username" needs password_file = "PATH" (a file of mode 0600 '
                "holding the password; passwords are never written in the configuration)",
            )
    else:
        for key in ("username", "password_file"):
            if key in options:
                raise options.error(key, 'only used with identity = "username"')
    if identity == "certificate":
        if user_certificate is None or user_private_key is None:
            raise options.error(
                None, 'identity = "certificate" needs user_certificate and user_private_key'
            )
    else:
        for key in ("user_certificate", "user_private_key"):
            if key in options:
                raise options.error(key, 'only used with identity = "certificate"')
    if policy == "None" and identity != "anonymous":
        raise options.error(
            "identity",
            'expected identity = "anonymous" with security_policy = "None": a password or user '
            "key would cross the network unprotected",
        )
    application_uri = options.get_str("application_uri", None)
    if application_uri is not None and ":" not in application_uri:
        raise options.error("application_uri", f"expected a URI (urn:...), got {application_uri!r}")
    request_timeout_s = options.get_float(
        "request_timeout_s", DEFAULT_REQUEST_TIMEOUT_S, minimum=0.1, maximum=120.0
    )
    publishing_interval_s = options.get_float(
        "publishing_interval_s", DEFAULT_PUBLISHING_INTERVAL_S, minimum=0.05, maximum=3600.0
    )
    keepalive_s = options.get_float("keepalive_s", DEFAULT_KEEPALIVE_S, minimum=0.1, maximum=600.0)
    if keepalive_s < publishing_interval_s:
        raise options.error(
            "keepalive_s",
            f"expected at least publishing_interval_s ({publishing_interval_s:g} s), "
            f"got {keepalive_s:g}",
        )
    session_timeout_s = options.get_float(
        "session_timeout_s", DEFAULT_SESSION_TIMEOUT_S, minimum=1.0, maximum=86400.0
    )
    if session_timeout_s < 2 * keepalive_s:
        raise options.error(
            "session_timeout_s",
            f"expected at least twice keepalive_s ({2 * keepalive_s:g} s), got "
            f"{session_timeout_s:g}: the session would expire between keep-alives",
        )
    certificate = _path(options, "certificate", BUS_DEFAULTS["certificate"], bus_id)
    private_key = _path(options, "private_key", BUS_DEFAULTS["private_key"], bus_id)
    trust_dir = _path(options, "trust_dir", BUS_DEFAULTS["trust_dir"], bus_id)
    assert certificate is not None and private_key is not None and trust_dir is not None
    return BusSettings(
        endpoint=endpoint,
        policy=policy,
        mode=mode,
        certificate=certificate,
        private_key=private_key,
        application_uri=application_uri,
        trust_dir=trust_dir,
        trust_on_first_use=options.get_bool("trust_on_first_use", False),
        identity=identity,
        username=username,
        password_file=password_file,
        user_certificate=user_certificate,
        user_private_key=user_private_key,
        request_timeout_s=request_timeout_s,
        session_timeout_s=session_timeout_s,
        publishing_interval_s=publishing_interval_s,
        keepalive_s=keepalive_s,
        max_items_per_request=options.get_int(
            "max_items_per_request", DEFAULT_MAX_ITEMS_PER_REQUEST, minimum=1, maximum=100_000
        ),
    )


# --------------------------------------------------------------------------------------------
# Device
# --------------------------------------------------------------------------------------------


def parse_device(options: ConfigTable) -> DeviceSettings:
    """Validate a device table's OPC UA keys: ``namespace`` (a namespace URI used by the
    profile's node ids and browse paths that name none) and ``params`` (values for the
    ``{name}`` placeholders of the profile's node ids, so one profile serves several circuits)."""
    options.check_keys(DEVICE_KEYS)
    namespace = options.get_str("namespace", None)
    if namespace is not None and not namespace.strip():
        raise options.error("namespace", "expected a namespace URI, got an empty string")
    raw = options.get("params", {})
    if not isinstance(raw, Mapping):
        raise options.error("params", 'expected a table of NAME = "value"')
    params: dict[str, str] = {}
    for name, value in raw.items():
        if not _PARAM_NAME.fullmatch(name):
            raise options.error("params", f"expected parameter names like circuit_1, got {name!r}")
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise options.error("params", f"params.{name}: expected a string or an integer")
        params[name] = str(value)
    return DeviceSettings(namespace, params)


# --------------------------------------------------------------------------------------------
# Point
# --------------------------------------------------------------------------------------------


def parse_node_id(text: str) -> ua.NodeId:
    """A node id in the OPC UA string form (``ns=2;s=Cabinet.DoorOpen``, ``i=2258``,
    ``nsu=urn:x;s=Name``); raises ValueError with the reason."""
    # Imported here: asyncua is slow to import, and the command line loads this module for
    # tools that never parse a node id.
    from asyncua import ua

    try:
        node = ua.NodeId.from_string(text)
    except Exception as exc:  # asyncua raises several types for bad strings
        raise ValueError(str(exc) or type(exc).__name__) from None
    if node.Identifier is None or node.Identifier == "":
        raise ValueError("empty identifier")
    return node


def parse_browse_path(text: str) -> list[tuple[int | None, str]]:
    """``Cabinet/Circuit1/2:DimLevel`` → [(None, "Cabinet"), (None, "Circuit1"), (2, "DimLevel")]:
    qualified names under the Objects folder; a name without ``N:`` uses the point's (or the
    device's) namespace URI, or namespace 0 when there is none."""
    elements = [e for e in text.strip().split("/") if e]
    if not elements:
        raise ValueError("expected names separated by '/'")
    out: list[tuple[int | None, str]] = []
    for element in elements:
        index, sep, name = element.partition(":")
        if sep and index.isdigit():
            out.append((int(index), name))
        else:
            out.append((None, element))
        if not out[-1][1]:
            raise ValueError(f"empty name in {element!r}")
    return out


def _placeholders(text: str) -> set[str]:
    return set(re.findall(r"\{([^{}]*)\}", text))


def _template(options: ConfigTable, key: str, *, browse: bool) -> NodeTemplate | None:
    text = options.get_str(key, None)
    if text is None:
        return None
    for name in _placeholders(text):
        if not _PARAM_NAME.fullmatch(name):
            raise options.error(
                key, f"expected {{name}} placeholders like {{circuit}}, got {{{name}}}"
            )
    probe = re.sub(r"\{[^{}]*\}", "1", text)
    try:
        if browse:
            parse_browse_path(probe)
        else:
            parse_node_id(probe)
    except ValueError as exc:
        what = (
            "a browse path like Cabinet/Circuit1/DimLevel"
            if browse
            else ("an OPC UA node id like ns=2;s=Cabinet.DoorOpen or nsu=URI;s=Name")
        )
        raise options.error(key, f"expected {what}, got {text!r} ({exc})") from None
    return NodeTemplate(text, browse, options.get_str("namespace", None))


def parse_point(point: PointSpec) -> PointSettings:
    """Validate one profile point's OPC UA keys.

    A point names a variable by ``node`` or ``browse_path``, or is a method point (``method``
    and ``object``, with ``arguments`` holding ``"$value"`` where a command's value goes).
    """
    options = point.options
    options.check_keys(POINT_KEYS)
    node = _template(options, "node", browse=False)
    browse = _template(options, "browse_path", browse=True)
    method = _template(options, "method", browse=False)
    owner = _template(options, "object", browse=False)
    if node is not None and browse is not None:
        raise options.error("browse_path", "expected either node or browse_path, not both")
    variable = node or browse
    if method is not None:
        if variable is not None:
            raise options.error(
                "method", "expected either a variable (node, browse_path) or a method, not both"
            )
        if owner is None:
            raise options.error(None, "a method point needs object = NODE_ID (its owner)")
        if not point.writable:
            raise options.error(
                None, "a method point is called by commands: expected writable = true"
            )
        for key in ("mode", "sampling_interval_s", "queue_size", "deadband", "deadband_percent"):
            if key in options:
                raise options.error(key, "a method point has no value to subscribe to or poll")
        raw_args = options.get("arguments", [VALUE_PLACEHOLDER])
        if not isinstance(raw_args, list) or any(
            not isinstance(a, bool | int | float | str) for a in raw_args
        ):
            raise options.error("arguments", "expected a list of numbers, booleans or strings")
        if sum(1 for a in raw_args if a == VALUE_PLACEHOLDER) != 1:
            raise options.error(
                "arguments", f'expected exactly one "{VALUE_PLACEHOLDER}" for the written value'
            )
        return PointSettings(
            node=None,
            subscribe=False,
            sampling_interval_s=None,
            queue_size=1,
            deadband=None,
            deadband_percent=None,
            method=method,
            object=owner,
            arguments=tuple(raw_args),
        )
    if variable is None:
        raise options.error(None, "expected node = NODE_ID or browse_path = PATH (or a method)")
    for key in ("object", "arguments"):
        if key in options:
            raise options.error(key, "only used by method points")
    mode = options.get_str("mode", "subscribe", choices=("subscribe", "poll"))
    deadband = options.get_float("deadband", None, minimum=0.0)
    deadband_percent = options.get_float("deadband_percent", None, minimum=0.0, maximum=100.0)
    if deadband is not None and deadband_percent is not None:
        raise options.error("deadband_percent", "expected either deadband or deadband_percent")
    if mode == "poll":
        for key in ("sampling_interval_s", "queue_size", "deadband", "deadband_percent"):
            if key in options:
                raise options.error(key, 'only used with mode = "subscribe"')
    return PointSettings(
        node=variable,
        subscribe=mode == "subscribe",
        sampling_interval_s=options.get_float("sampling_interval_s", None, minimum=0.0),
        queue_size=cast(int, options.get_int("queue_size", 1, minimum=1, maximum=10_000)),
        deadband=deadband,
        deadband_percent=deadband_percent,
        method=None,
        object=None,
        arguments=(),
    )


def missing_params(settings: PointSettings, params: Mapping[str, str]) -> list[str]:
    """Placeholders of the point's node ids that the device's ``params`` do not give."""
    names: set[str] = set()
    for template in (settings.node, settings.method, settings.object):
        if template is not None:
            names |= _placeholders(template.text)
    return sorted(names - set(params))
