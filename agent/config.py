"""The gateway configuration: load, validate up front, report every error with file and line.

The core tables are declared once, in the field tables below (:data:`CONFIG_SPEC` and
:data:`PROFILE_SPEC`); the same declarations drive validation, the JSON Schemas in
``config/schema/`` and the defaults. Driver-specific keys (everything in a bus, device or point
table that the core does not declare) are validated by the driver classes themselves, through
:meth:`Driver.validate_bus`, :meth:`Driver.validate_device` and :meth:`Driver.validate_point`.

:func:`load_config` raises :class:`ConfigErrors` holding *every* error it could find, so a
technician fixes a file in one pass; each error names the file, the line and what was expected.
It reads files synchronously: call it before the event loop starts or through
``asyncio.to_thread``.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from agent.envelope import KEY_ID_PATTERN, SUITE_NAMES
from agent.mqtt import MqttSettings, TlsSettings, is_loopback_host
from agent.sdk import (
    BusSpec,
    ConfigError,
    ConfigTable,
    DeviceSpec,
    Driver,
    PointRole,
    PointSpec,
    Profile,
)
from agent.tomlmap import load_located

__all__ = [
    "CONFIG_SPEC",
    "PROFILE_SPEC",
    "BufferConfig",
    "Circuit",
    "ConfigErrors",
    "Field",
    "GatewayConfig",
    "HubConfig",
    "KeysConfig",
    "Kind",
    "TableSpec",
    "config_schema",
    "load_config",
    "load_profile",
    "profile_schema",
    "schema_json",
]

logger = logging.getLogger(__name__)

JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
SECRET_MODE_MASK: Final = 0o077
"""Permission bits a secret file must not have: no access at all for group and others."""

ID_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
ID_TEXT: Final = "an id: 1 to 64 letters, digits, '_' or '-', starting with a letter or digit"
POINT_NAME_PATTERN: Final = r"[a-z][a-z0-9_]*"
POINT_NAME_TEXT: Final = "a point name: a lowercase letter, then lowercase letters, digits or '_'"
PROFILE_NAME_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
# MQTT topic levels: no wildcards, no empty level, no leading '$' (reserved for the broker).
TOPIC_PREFIX_PATTERN: Final = r"[^/+#$\x00][^/+#\x00]*(/[^/+#\x00]+)*"
TOPIC_PREFIX_TEXT: Final = (
    "an MQTT topic prefix: levels separated by '/', none empty, no '+' or '#' wildcards, "
    "not starting with '$'"
)
PATH_NOTE: Final = "A relative path is relative to the configuration file's folder."
PLAINTEXT_REFUSED: Final = (
    "hub.host is not on this machine and TLS is off: enable [hub.tls] or set "
    "allow_plaintext = true (not for production)"
)
DRIVER_KEYS_NOTE: Final = (
    "Driver-specific key: validated by the driver, documented in docs/configuration.md."
)


# --------------------------------------------------------------------------------------------
# The declarative field table.
# --------------------------------------------------------------------------------------------


class Kind(StrEnum):
    STR = "string"
    INT = "integer"
    FLOAT = "number"
    BOOL = "boolean"
    STR_LIST = "list of strings"
    PATH = "path"
    TABLE = "table"
    MAP = "map"
    """A table whose keys are ids chosen by the user, each holding an ``item``."""


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Final[Any] = _Required()
"""Default of a field that must be present."""


@dataclass(frozen=True)
class Field:
    """One key of a core table: its type, default, constraints and meaning.

    ``default`` is :data:`REQUIRED`, ``None`` (optional; ``default_text`` may explain a default
    computed from other keys) or the value used when the key is absent.
    """

    name: str
    kind: Kind
    description: str
    default: Any = REQUIRED
    default_text: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple[str, ...] = ()
    pattern: str | None = None
    """For strings, list items and map keys: the whole value must match (no anchors here)."""
    pattern_text: str = ""
    min_length: int = 0
    min_items: int = 0
    unique_items: bool = False
    table: TableSpec | None = None
    """For TABLE fields, and for MAP fields whose items are tables."""
    item: Field | None = None
    """For MAP fields: what each entry holds (a TABLE or STR_LIST field, its name unused)."""


@dataclass(frozen=True)
class TableSpec:
    """A core table. ``driver_keys``: keys not declared here go to the driver."""

    name: str
    description: str
    fields: tuple[Field, ...]
    driver_keys: bool = False
    requires: tuple[tuple[str, str], ...] = ()
    """(a, b): when key ``a`` is present, key ``b`` must be too."""

    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def field(self, name: str) -> Field:
        for item in self.fields:
            if item.name == name:
                return item
        raise KeyError(name)


GATEWAY_SPEC: Final = TableSpec(
    "gateway",
    "This gateway.",
    (
        Field(
            "id",
            Kind.STR,
            "Gateway id, used in MQTT topics.",
            pattern=ID_PATTERN,
            pattern_text=ID_TEXT,
        ),
        Field(
            "profile_dirs",
            Kind.STR_LIST,
            "Folders searched, in order, for device profiles named <name>.toml. " + PATH_NOTE,
            default=("profiles",),
            min_items=1,
        ),
    ),
)

TLS_SPEC: Final = TableSpec(
    "hub.tls",
    "TLS to the broker: used when this table is present and enabled is true.",
    (
        Field(
            "enabled",
            Kind.BOOL,
            "Use TLS (true when the table is present and the key absent).",
            default=True,
        ),
        Field(
            "ca_file",
            Kind.PATH,
            "CA certificates (PEM) trusted for the broker's certificate; the system CAs when "
            "absent. " + PATH_NOTE,
            default=None,
        ),
        Field(
            "cert_file",
            Kind.PATH,
            "Client certificate (PEM) for mutual TLS; needs key_file. " + PATH_NOTE,
            default=None,
        ),
        Field(
            "key_file",
            Kind.PATH,
            "Client private key (PEM) for mutual TLS; needs cert_file; the file must not be "
            "accessible by group or others (mode 0600). " + PATH_NOTE,
            default=None,
        ),
    ),
    requires=(("cert_file", "key_file"), ("key_file", "cert_file")),
)

HUB_SPEC: Final = TableSpec(
    "hub",
    "The MQTT broker (the hub) readings are forwarded to and commands come from.",
    (
        Field("host", Kind.STR, "Broker host name or address.", default="127.0.0.1", min_length=1),
        Field(
            "port",
            Kind.INT,
            "Broker TCP port (8883 is usual with TLS).",
            default=1883,
            minimum=1,
            maximum=65535,
        ),
        Field(
            "prefix",
            Kind.STR,
            "Topic prefix: topics are {prefix}/{gateway.id}/{status|data|event|cmd|ack}.",
            default="lampyre/v1",
            pattern=TOPIC_PREFIX_PATTERN,
            pattern_text=TOPIC_PREFIX_TEXT,
        ),
        Field(
            "client_id",
            Kind.STR,
            "MQTT client id.",
            default=None,
            default_text='"lampyre-" + gateway.id',
            min_length=1,
        ),
        Field(
            "keepalive_s",
            Kind.INT,
            "MQTT keep-alive interval in seconds.",
            default=30,
            minimum=1,
            maximum=65535,
        ),
        Field(
            "max_inflight",
            Kind.INT,
            "Publish window: QoS 1 messages awaiting PUBACK.",
            default=64,
            minimum=1,
            maximum=65535,
        ),
        Field("username", Kind.STR, "MQTT user name.", default=None, min_length=1),
        Field(
            "password_file",
            Kind.PATH,
            "File holding the MQTT password; needs username; the file must not be accessible "
            "by group or others (mode 0600). " + PATH_NOTE,
            default=None,
        ),
        Field("tls", Kind.TABLE, TLS_SPEC.description, default=None, table=TLS_SPEC),
        Field(
            "allow_plaintext",
            Kind.BOOL,
            "Allow MQTT without TLS to a broker that is not on this machine (host not "
            "localhost, 127.0.0.0/8 or ::1); readings, commands and the password then cross the "
            "network in clear. For test benches, never for production.",
            default=False,
        ),
        Field(
            "seal",
            Kind.STR,
            "How readings and events leave the gateway: hpke seals each batch for the hub alone "
            "and signs it with the gateway key ([keys], docs/envelope.md); none publishes plain "
            "JSON, only for a hub that cannot open envelopes (the broker then reads everything).",
            default="hpke",
            choices=("hpke", "none"),
        ),
        Field(
            "receipts",
            Kind.BOOL,
            "Keep each sealed batch and event in the buffer until the hub's signed receipt "
            "covers it, not just until the broker's PUBACK; the hub's receipt-*.pub must be in "
            "the key folder.",
            default=False,
        ),
        Field(
            "receipt_timeout_s",
            Kind.FLOAT,
            "With receipts: a record the broker took but no receipt covered after this long is "
            "sent again (the hub drops the duplicate and receipts it).",
            default=120.0,
            minimum=0.0,
            exclusive_minimum=True,
        ),
    ),
    requires=(("password_file", "username"),),
)

COMMANDS_SPEC: Final = TableSpec(
    "commands",
    "Remote commands from the control post (docs/command-signing.md).",
    (
        Field(
            "allow_unsigned",
            Kind.BOOL,
            "Also accept plain JSON commands, not signed by a control-post key: anyone who can "
            "publish on the cmd topic then commands the lamps. Demo benches only.",
            default=False,
        ),
        Field(
            "clock_synchronized",
            Kind.STR,
            "Whether the gateway clock can be trusted for the time window of signed commands: "
            "auto asks systemd (timedatectl NTPSynchronized, any failure counts as no); yes "
            "where time is kept some other way; no always applies the strict ordering rule "
            "of docs/command-signing.md.",
            default="auto",
            choices=("auto", "yes", "no"),
        ),
    ),
)

BUFFER_SPEC: Final = TableSpec(
    "buffer",
    "The encrypted store-and-forward buffer (SQLite).",
    (
        Field("path", Kind.PATH, "Buffer database file. " + PATH_NOTE, default="buffer.db"),
        Field(
            "key_file",
            Kind.PATH,
            "Buffer encryption key, created with mode 0600 on first run; an existing file must "
            "not be accessible by group or others. " + PATH_NOTE,
            default=None,
            default_text='path + ".key"',
        ),
        Field(
            "max_bytes",
            Kind.INT,
            "Size cap of the stored records, in bytes.",
            default=64 * 1024 * 1024,
            minimum=65536,
        ),
        Field(
            "batch_max_readings",
            Kind.INT,
            "Readings per data batch.",
            default=200,
            minimum=1,
        ),
        Field(
            "batch_max_delay_s",
            Kind.FLOAT,
            "A batch is closed after this many seconds.",
            default=1.0,
            minimum=0.0,
            exclusive_minimum=True,
        ),
    ),
)

KEYS_SPEC: Final = TableSpec(
    "keys",
    "The gateway's signing key and the public keys it trusts: the hub's, to seal readings to, "
    "and the control posts', to verify commands (lampyre keys init and show).",
    (
        Field(
            "dir",
            Kind.PATH,
            "Key folder: gateway-signing.key (created by lampyre keys init, mode 0600), "
            "gateway-signing.pub, hub-<name>.pub (hub keys) and post-<name>.pub (control-post "
            "keys); it must not be writable by group or others. " + PATH_NOTE,
            default="keys",
        ),
        Field(
            "hub_keys",
            Kind.STR_LIST,
            "Hub public key files (HPKE) to use instead of the folder's hub-*.pub files. "
            + PATH_NOTE,
            default=None,
            default_text="every hub-*.pub file in dir",
            min_items=1,
            unique_items=True,
        ),
        Field(
            "current_hub_key",
            Kind.STR,
            "Key id of the hub key new batches are sealed to, as lampyre keys show prints it; "
            "the other hub keys stay known during a rotation.",
            default=None,
            default_text="the only hub key, when there is exactly one",
            pattern=KEY_ID_PATTERN,
            pattern_text="a key id: 16 lowercase hex digits",
        ),
        Field(
            "suite",
            Kind.STR,
            "HPKE suite readings are sealed with; its KEM must be the current hub key's.",
            default=None,
            default_text="the hub key's KEM with HKDF-SHA256 and ChaCha20-Poly1305",
            choices=SUITE_NAMES,
        ),
    ),
)

BUS_SPEC: Final = TableSpec(
    "buses.<id>",
    "One physical link (serial line, TCP endpoint, ...), served by one driver.",
    (Field("driver", Kind.STR, "Name of the driver serving this bus (e.g. modbus)."),),
    driver_keys=True,
)

DEVICE_SPEC: Final = TableSpec(
    "devices.<id>",
    "One piece of equipment on a bus, an instance of a profile.",
    (
        Field(
            "bus",
            Kind.STR,
            "Id of the bus the device is on.",
            pattern=ID_PATTERN,
            pattern_text=ID_TEXT,
        ),
        Field(
            "profile",
            Kind.STR,
            "A profile name (looked up as <profile_dir>/<name>.toml) or a path ending in .toml "
            "(relative to the configuration file's folder).",
            min_length=1,
        ),
        Field(
            "poll_interval_s",
            Kind.FLOAT,
            "Seconds between two polls of the device.",
            default=10.0,
            minimum=0.0,
            exclusive_minimum=True,
        ),
        Field(
            "circuit",
            Kind.STR,
            "Name of the switched circuit (under [circuits]) that powers the device: while the "
            "cabinet has it off, the device not answering is no alarm.",
            default=None,
            pattern=ID_PATTERN,
            pattern_text=ID_TEXT,
        ),
    ),
    driver_keys=True,
)

CIRCUIT_SPEC: Final = TableSpec(
    "circuits.<name>",
    "A switched lighting circuit of the cabinet, and the point that tells whether it is on.",
    (
        Field(
            "device",
            Kind.STR,
            "Id of the device that reports the circuit's state (a contactor, a controller).",
            pattern=ID_PATTERN,
            pattern_text=ID_TEXT,
        ),
        Field(
            "point",
            Kind.STR,
            "Name of that device's point that is true (non-zero) while the circuit is on.",
            pattern=POINT_NAME_PATTERN,
            pattern_text=POINT_NAME_TEXT,
        ),
    ),
)

CONFIG_SPEC: Final = TableSpec(
    "",
    "Lampyre gateway configuration.",
    (
        Field("gateway", Kind.TABLE, GATEWAY_SPEC.description, table=GATEWAY_SPEC),
        Field("hub", Kind.TABLE, HUB_SPEC.description, default=None, table=HUB_SPEC),
        Field("buffer", Kind.TABLE, BUFFER_SPEC.description, default=None, table=BUFFER_SPEC),
        Field("keys", Kind.TABLE, KEYS_SPEC.description, default=None, table=KEYS_SPEC),
        Field(
            "commands", Kind.TABLE, COMMANDS_SPEC.description, default=None, table=COMMANDS_SPEC
        ),
        Field(
            "buses",
            Kind.MAP,
            "Buses by id.",
            default=None,
            item=Field("bus", Kind.TABLE, BUS_SPEC.description, table=BUS_SPEC),
            pattern=ID_PATTERN,
            pattern_text=ID_TEXT,
        ),
        Field(
            "devices",
            Kind.MAP,
            "Devices by id.",
            default=None,
            item=Field("device", Kind.TABLE, DEVICE_SPEC.description, table=DEVICE_SPEC),
            pattern=ID_PATTERN,
            pattern_text=ID_TEXT,
        ),
        Field(
            "groups",
            Kind.MAP,
            "Groups of devices by name, for commands addressed to several devices.",
            default=None,
            item=Field(
                "group",
                Kind.STR_LIST,
                "Ids of the devices in the group.",
                min_items=1,
                unique_items=True,
                pattern=ID_PATTERN,
                pattern_text=ID_TEXT,
            ),
            pattern=ID_PATTERN,
            pattern_text=ID_TEXT,
        ),
        Field(
            "circuits",
            Kind.MAP,
            "Switched circuits by name (devices name theirs with `circuit`).",
            default=None,
            item=Field("circuit", Kind.TABLE, CIRCUIT_SPEC.description, table=CIRCUIT_SPEC),
            pattern=ID_PATTERN,
            pattern_text=ID_TEXT,
        ),
    ),
)

PROFILE_HEAD_SPEC: Final = TableSpec(
    "profile",
    "What the profile describes.",
    (
        Field(
            "name",
            Kind.STR,
            "Profile name; must equal the file's stem, which is what configurations refer to.",
            default=None,
            default_text="the file's stem",
            pattern=PROFILE_NAME_PATTERN,
            pattern_text="a profile name: letters, digits, '.', '_' or '-'",
        ),
        Field("driver", Kind.STR, "Name of the driver that understands the points' options."),
        Field("description", Kind.STR, "Free text.", default=""),
    ),
)

POINT_SPEC: Final = TableSpec(
    "points.<name>",
    "One named quantity of the device.",
    (
        Field("unit", Kind.STR, 'Engineering unit ("" for none).', default=""),
        Field("writable", Kind.BOOL, "Whether commands may write the point.", default=False),
        Field(
            "role",
            Kind.STR,
            "What the core knows the point means; at most one point per role, and a "
            "dim_level or switch point must be writable.",
            default=None,
            choices=tuple(role.value for role in PointRole),
        ),
        Field(
            "read_back",
            Kind.STR,
            "Writable points only: the point of this profile that commands read after writing "
            "this one, to learn what the equipment really did (a contactor command reads its "
            "feedback contact).",
            default=None,
            default_text="the point itself",
            pattern=POINT_NAME_PATTERN,
            pattern_text=POINT_NAME_TEXT,
        ),
    ),
    driver_keys=True,
)

WRITABLE_ROLES: Final = (PointRole.DIM_LEVEL, PointRole.SWITCH)
"""Roles the command path writes: a point holding one must be writable."""

PROFILE_SPEC: Final = TableSpec(
    "",
    "Lampyre device profile.",
    (
        Field("profile", Kind.TABLE, PROFILE_HEAD_SPEC.description, table=PROFILE_HEAD_SPEC),
        Field(
            "points",
            Kind.MAP,
            "Points by name.",
            item=Field("point", Kind.TABLE, POINT_SPEC.description, table=POINT_SPEC),
            pattern=POINT_NAME_PATTERN,
            pattern_text=POINT_NAME_TEXT,
        ),
    ),
)


# --------------------------------------------------------------------------------------------
# The data model.
# --------------------------------------------------------------------------------------------


class ConfigErrors(ConfigError):
    """Every error found in one configuration, in the order found; ``str()`` has one per line."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        unique: dict[str, ConfigError] = {}
        for error in errors:
            unique.setdefault(str(error), error)
        self.errors: list[ConfigError] = list(unique.values())
        super().__init__(None, "\n".join(unique))
        self.where = self.errors[0].where if self.errors else None


@dataclass(frozen=True)
class HubConfig:
    mqtt: MqttSettings
    prefix: str
    max_inflight: int
    seal: bool = True
    """Seal readings and events (``seal = "hpke"``); False only for ``seal = "none"``."""
    receipts: bool = False
    receipt_timeout_s: float = 120.0


@dataclass(frozen=True)
class BufferConfig:
    path: Path
    key_file: Path
    max_bytes: int
    batch_max_readings: int
    batch_max_delay_s: float


@dataclass(frozen=True)
class KeysConfig:
    """The ``[keys]`` table, paths resolved (the files are read by ``agent.keys``)."""

    dir: Path
    hub_keys: tuple[Path, ...] | None = None
    """Hub public key files; None: every ``hub-*.pub`` of ``dir``."""
    current_hub_key: str | None = None
    suite: str | None = None


@dataclass(frozen=True)
class Circuit:
    """A switched circuit: the device and point that say whether it is on, and what it feeds."""

    name: str
    device: str
    point: str
    feeds: tuple[str, ...]


@dataclass(frozen=True)
class GatewayConfig:
    file: Path
    gateway_id: str
    hub: HubConfig
    buffer: BufferConfig
    buses: Mapping[str, BusSpec]
    devices: Mapping[str, DeviceSpec]
    groups: Mapping[str, tuple[str, ...]]
    drivers: Mapping[str, type[Driver]]
    """Driver name -> class, for the drivers the buses use."""
    circuits: Mapping[str, Circuit] = field(default_factory=dict)
    """Switched circuits by name, each with the devices it feeds."""
    keys: KeysConfig = field(default_factory=lambda: KeysConfig(dir=Path("keys")))
    """The key folder and the choice of hub key and suite."""
    allow_unsigned_commands: bool = False
    """``[commands] allow_unsigned``: plain JSON commands accepted too (demo benches only)."""
    clock_synchronized: bool | None = None
    """``[commands] clock_synchronized``: None asks systemd, else the configured answer."""


# --------------------------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------------------------


def load_config(
    path: str | os.PathLike[str],
    drivers: Mapping[str, type[Driver]] | None = None,
) -> GatewayConfig:
    """Load and validate the gateway configuration at ``path``, its profiles included.

    ``drivers`` replaces entry-point discovery (name -> driver class), for tests and tools.
    Raises :class:`ConfigErrors` with every error found, or :class:`OSError` when the file itself
    cannot be read.
    """
    loader = _Loader(path, drivers)
    return loader.load_config()


def load_profile(
    path: str | os.PathLike[str],
    drivers: Mapping[str, type[Driver]] | None = None,
) -> Profile:
    """Load and validate one profile file on its own (its driver validates the points).

    Raises :class:`ConfigErrors`, or :class:`OSError` when the file cannot be read.
    """
    loader = _Loader(path, drivers)
    table = loader.parse(path)
    profile = loader.profile_from(table, Path(path))
    if loader.errors or profile is None:
        raise ConfigErrors(loader.errors)
    return profile


@dataclass
class _Section:
    """A table's validated core values (those that were valid) and the table itself."""

    table: ConfigTable
    values: dict[str, Any] = field(default_factory=dict)


def _empty_table(parent: ConfigTable, key: str) -> ConfigTable:
    return ConfigTable(data={}, file=parent.file, path=parent.name_of(key), line=parent.line)


def _entries(table: ConfigTable, spec: Field, errors: list[ConfigError]) -> Iterator[str]:
    """Keys of a MAP table whose names are valid (the others are reported)."""
    for key in table:
        if spec.pattern is not None and not re.fullmatch(spec.pattern, key):
            errors.append(table.error(key, f"expected {spec.pattern_text}, got {key!r}"))
            continue
        yield key


class _Loader:
    """One validation pass: collects errors, caches drivers and profiles."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        drivers: Mapping[str, type[Driver]] | None,
    ) -> None:
        self.typed = path
        self.file = Path(path)
        # Messages name files the way the user reached them; runtime paths are absolute so a
        # later change of working directory cannot move the buffer.
        self.shown_dir = Path(os.fspath(path)).parent
        self.base_dir = self.file.absolute().parent
        self.override = drivers
        self.errors: list[ConfigError] = []
        self.driver_cache: dict[str, type[Driver] | str] = {}
        self.profile_cache: dict[str, Profile | None] = {}

    # Generic reading -----------------------------------------------------------------------
    def parse(self, path: str | os.PathLike[str]) -> ConfigTable:
        try:
            return load_located(path)
        except ConfigError as exc:
            raise ConfigErrors([exc]) from None

    def read(self, table: ConfigTable, spec: TableSpec) -> _Section:
        section = _Section(table)
        for item in spec.fields:
            try:
                value = self.read_field(table, item)
            except ConfigError as exc:
                self.errors.append(exc)
                continue
            section.values[item.name] = value
        if not spec.driver_keys:
            self.reject_unknown(table, spec)
        for key, needed in spec.requires:
            if key in table and needed not in table:
                self.errors.append(table.error(key, f"needs '{needed}' in the same table"))
        return section

    def reject_unknown(self, table: ConfigTable, spec: TableSpec) -> None:
        expected = ", ".join(spec.names())
        for key in table:
            if key not in spec.names():
                self.errors.append(table.error(key, f"unknown key; expected one of: {expected}"))

    def read_field(self, table: ConfigTable, spec: Field) -> Any:
        name = spec.name
        if name not in table:
            if spec.default is REQUIRED and spec.kind in (Kind.TABLE, Kind.MAP):
                raise table.error(None, f"missing table [{table.name_of(name)}]")
            if spec.default is REQUIRED:
                raise table.error(None, f"missing key '{name}' ({spec.description})")
            if spec.kind is Kind.TABLE and spec.table is not None:
                return None
            return list(spec.default) if isinstance(spec.default, tuple) else spec.default
        if spec.kind is Kind.TABLE:
            assert spec.table is not None
            return self.read(table.table(name), spec.table)
        if spec.kind is Kind.MAP:
            return table.table(name)
        return _check_value(table, spec, name)

    def section(self, root: ConfigTable, name: str, spec: TableSpec) -> _Section:
        """A core table of the root; an absent optional table reads as empty (all defaults)."""
        try:
            value = self.read_field(root, CONFIG_SPEC.field(name))
        except ConfigError as exc:
            self.errors.append(exc)
            return _Section(_empty_table(root, name))
        if value is None:
            return self.read(_empty_table(root, name), spec)
        assert isinstance(value, _Section)
        return value

    def map_table(self, root: ConfigTable, spec: TableSpec, name: str) -> ConfigTable | None:
        try:
            value = self.read_field(root, spec.field(name))
        except ConfigError as exc:
            self.errors.append(exc)
            return None
        return value if isinstance(value, ConfigTable) else None

    def validate(self, check: Callable[[], None], table: ConfigTable, driver: str) -> None:
        """Run a driver's validation method, keeping its errors (and its bugs) as data."""
        try:
            check()
        except ConfigErrors as exc:
            self.errors.extend(exc.errors)
        except ConfigError as exc:
            if exc.where is None or exc.where.line is None:
                exc = ConfigError(table.where(), exc.message)
            self.errors.append(exc)
        except Exception as exc:
            # A driver bug must not hide the other errors of the file, nor crash check-config.
            logger.warning("driver %s failed validating %s", driver, table.where(), exc_info=True)
            self.errors.append(
                table.error(None, f"driver {driver!r} failed to validate this table: {exc!r}")
            )

    # Drivers -------------------------------------------------------------------------------
    def driver(self, table: ConfigTable, key: str, name: str) -> type[Driver] | None:
        if name not in self.driver_cache:
            self.driver_cache[name] = self.find_driver(name)
        found = self.driver_cache[name]
        if isinstance(found, str):
            self.errors.append(table.error(key, found))
            return None
        return found

    def find_driver(self, name: str) -> type[Driver] | str:
        if self.override is not None:
            if name in self.override:
                return self.override[name]
            installed = ", ".join(sorted(self.override)) or "none"
            return f"unknown driver {name!r}; installed drivers: {installed}"
        from agent.registry import UnknownDriver, available_drivers, load_driver

        try:
            return load_driver(name)
        except UnknownDriver:
            installed = ", ".join(available_drivers()) or "none"
            return f"unknown driver {name!r}; installed drivers: {installed}"
        except Exception as exc:
            logger.warning("driver %s could not be loaded", name, exc_info=True)
            return f"driver {name!r} is installed but could not be loaded: {exc!r}"

    # The gateway configuration -------------------------------------------------------------
    def load_config(self) -> GatewayConfig:
        root = self.parse(self.typed)
        self.reject_unknown(root, CONFIG_SPEC)
        gateway = self.section(root, "gateway", GATEWAY_SPEC)
        hub = self.section(root, "hub", HUB_SPEC)
        buffer = self.section(root, "buffer", BUFFER_SPEC)
        keys = self.section(root, "keys", KEYS_SPEC)
        commands = self.section(root, "commands", COMMANDS_SPEC)
        buses, bus_classes = self.buses(root)
        profile_dirs = gateway.values.get("profile_dirs", ["profiles"])
        devices, device_ids = self.devices(root, buses, bus_classes, profile_dirs)
        groups = self.groups(root, device_ids)
        circuits = self.circuits(root, devices)
        gateway_id = gateway.values.get("id")
        hub_config = self.hub(hub, gateway_id)
        buffer_config = self.buffer(buffer)
        keys_config = self.keys(keys)
        if self.errors or gateway_id is None or hub_config is None or buffer_config is None:
            raise ConfigErrors(self.in_file_order())
        drivers = {bus.driver: bus_classes[bus_id] for bus_id, bus in buses.items()}
        return GatewayConfig(
            file=self.file,
            gateway_id=gateway_id,
            hub=hub_config,
            buffer=buffer_config,
            buses=MappingProxyType(buses),
            devices=MappingProxyType(devices),
            groups=MappingProxyType(groups),
            drivers=MappingProxyType({k: v for k, v in drivers.items() if v is not None}),
            circuits=MappingProxyType(circuits),
            keys=keys_config or KeysConfig(dir=self.resolve("keys")),
            allow_unsigned_commands=bool(commands.values.get("allow_unsigned", False)),
            clock_synchronized={"yes": True, "no": False}.get(
                commands.values.get("clock_synchronized", "auto")
            ),
        )

    def in_file_order(self) -> list[ConfigError]:
        """The configuration file's errors by line, then each profile's, as met."""
        ranks: dict[str, int] = {os.fspath(self.typed): 0}
        for error in self.errors:
            ranks.setdefault(error.where.file if error.where else "", len(ranks))

        def key(error: ConfigError) -> tuple[int, int]:
            where = error.where
            return (ranks[where.file if where else ""], (where.line or 0) if where else 0)

        return sorted(self.errors, key=key)

    def resolve(self, value: str) -> Path:
        # normpath, not resolve(): "../var" is folded for messages, symlinks are left alone.
        return Path(os.path.normpath(self.base_dir / Path(value).expanduser()))

    def check_file(self, table: ConfigTable, key: str, path: Path, *, secret: bool) -> None:
        try:
            info = path.stat()
        except FileNotFoundError:
            self.errors.append(table.error(key, f"expected an existing file, {path} not found"))
            return
        except OSError as exc:
            self.errors.append(table.error(key, f"cannot use {path}: {exc.strerror}"))
            return
        if not stat.S_ISREG(info.st_mode):
            self.errors.append(table.error(key, f"expected a regular file, {path} is not one"))
        elif secret and info.st_mode & SECRET_MODE_MASK:
            mode = stat.S_IMODE(info.st_mode)
            self.errors.append(
                table.error(
                    key,
                    f"{path} is accessible by group or others (mode {mode:04o}); "
                    "expected mode 0600 (chmod 600)",
                )
            )
        elif not os.access(path, os.R_OK):
            self.errors.append(table.error(key, f"{path} is not readable by this user"))

    def hub(self, hub: _Section, gateway_id: str | None) -> HubConfig | None:
        values, table = hub.values, hub.table
        password_file: Path | None = None
        if values.get("password_file") is not None:
            password_file = self.resolve(values["password_file"])
            self.check_file(table, "password_file", password_file, secret=True)
        tls: TlsSettings | None = None
        tls_section = values.get("tls")
        if isinstance(tls_section, _Section) and tls_section.values.get("enabled"):
            tls_values, tls_table = tls_section.values, tls_section.table
            paths: dict[str, Path | None] = {}
            for key in ("ca_file", "cert_file", "key_file"):
                given = tls_values.get(key)
                paths[key] = None if given is None else self.resolve(given)
                if given is not None:
                    self.check_file(tls_table, key, self.resolve(given), secret=key == "key_file")
            tls = TlsSettings(
                ca_file=paths["ca_file"], cert_file=paths["cert_file"], key_file=paths["key_file"]
            )
        host = values.get("host")
        # Only the literal is judged, never what DNS says today (see is_loopback_host).
        if (
            tls is None
            and isinstance(host, str)
            and not is_loopback_host(host)
            and values.get("allow_plaintext") is False
        ):
            self.errors.append(ConfigError(table.where("host"), PLAINTEXT_REFUSED))
        needed = ("host", "port", "prefix", "keepalive_s", "max_inflight")
        if gateway_id is None or any(key not in values for key in needed):
            return None
        mqtt = MqttSettings(
            host=values["host"],
            port=values["port"],
            client_id=values.get("client_id") or f"lampyre-{gateway_id}",
            keepalive_s=values["keepalive_s"],
            username=values.get("username"),
            password_file=password_file,
            tls=tls,
        )
        return HubConfig(
            mqtt=mqtt,
            prefix=values["prefix"],
            max_inflight=values["max_inflight"],
            seal=values.get("seal", "hpke") == "hpke",
            receipts=bool(values.get("receipts", False)),
            receipt_timeout_s=float(values.get("receipt_timeout_s", 120.0)),
        )

    def buffer(self, buffer: _Section) -> BufferConfig | None:
        values, table = buffer.values, buffer.table
        if any(key not in values for key in BUFFER_SPEC.names()):
            return None
        path = self.resolve(values["path"])
        if values["key_file"] is None:
            key_file = path.with_name(path.name + ".key")
        else:
            key_file = self.resolve(values["key_file"])
        if key_file.exists():
            # Created 0600 on first run; one that others can read is a leaked key.
            where = "key_file" if "key_file" in table else "path"
            self.check_file(table, where, key_file, secret=True)
        return BufferConfig(
            path=path,
            key_file=key_file,
            max_bytes=values["max_bytes"],
            batch_max_readings=values["batch_max_readings"],
            batch_max_delay_s=values["batch_max_delay_s"],
        )

    def keys(self, keys: _Section) -> KeysConfig | None:
        values, table = keys.values, keys.table
        if any(key not in values for key in KEYS_SPEC.names()):
            return None
        folder = self.resolve(values["dir"])
        if folder.exists() and not folder.is_dir():
            self.errors.append(table.error("dir", f"expected a folder, {folder} is not one"))
        signing_key = folder / "gateway-signing.key"
        if signing_key.exists():
            # Created 0600 by lampyre keys init; one that others can read is a leaked key.
            self.check_file(table, "dir", signing_key, secret=True)
        hub_keys: tuple[Path, ...] | None = None
        if values["hub_keys"] is not None:
            hub_keys = tuple(self.resolve(item) for item in values["hub_keys"])
            for path in hub_keys:
                self.check_file(table, "hub_keys", path, secret=False)
        return KeysConfig(
            dir=folder,
            hub_keys=hub_keys,
            current_hub_key=values["current_hub_key"],
            suite=values["suite"],
        )

    def buses(self, root: ConfigTable) -> tuple[dict[str, BusSpec], dict[str, type[Driver] | None]]:
        buses: dict[str, BusSpec] = {}
        classes: dict[str, type[Driver] | None] = {}
        table = self.map_table(root, CONFIG_SPEC, "buses")
        if table is None:
            return buses, classes
        for bus_id in _entries(table, CONFIG_SPEC.field("buses"), self.errors):
            try:
                bus_table = table.table(bus_id)
            except ConfigError as exc:
                self.errors.append(exc)
                continue
            section = self.read(bus_table, BUS_SPEC)
            driver_name = section.values.get("driver")
            if driver_name is None:
                continue
            cls = self.driver(bus_table, "driver", driver_name)
            bus = BusSpec(bus_id, driver_name, bus_table.without(*BUS_SPEC.names()))
            buses[bus_id] = bus
            classes[bus_id] = cls
            if cls is not None:
                self.validate(partial(cls.validate_bus, bus), bus_table, driver_name)
        return buses, classes

    def devices(
        self,
        root: ConfigTable,
        buses: Mapping[str, BusSpec],
        bus_classes: Mapping[str, type[Driver] | None],
        profile_dirs: Sequence[str],
    ) -> tuple[dict[str, DeviceSpec], set[str]]:
        devices: dict[str, DeviceSpec] = {}
        declared: set[str] = set()
        table = self.map_table(root, CONFIG_SPEC, "devices")
        if table is None:
            return devices, declared
        bus_names = root.get("buses")
        known_buses = ", ".join(bus_names) if isinstance(bus_names, dict) and bus_names else None
        # Groups may name a device whose id is malformed: that is reported once, here.
        declared.update(table)
        for device_id in _entries(table, CONFIG_SPEC.field("devices"), self.errors):
            try:
                device_table = table.table(device_id)
            except ConfigError as exc:
                self.errors.append(exc)
                continue
            before = len(self.errors)
            values = self.read(device_table, DEVICE_SPEC).values
            bus_id = values.get("bus")
            bus = buses.get(bus_id) if bus_id is not None else None
            if bus_id is not None and bus is None and not _declared(root, "buses", bus_id):
                expected = f"one of: {known_buses}" if known_buses else "a bus under [buses]"
                self.errors.append(
                    device_table.error("bus", f"unknown bus {bus_id!r}; expected {expected}")
                )
            profile = None
            if values.get("profile") is not None:
                profile = self.profile(device_table, values["profile"], profile_dirs)
            known_driver = bus is not None and bus_classes.get(bus.id) is not None
            if (
                profile is not None
                and bus is not None
                and known_driver
                and (profile.driver != bus.driver)
            ):
                self.errors.append(
                    device_table.error(
                        "profile",
                        f"profile {profile.name!r} ({profile.file}) is for driver "
                        f"{profile.driver!r} but bus {bus.id!r} uses driver {bus.driver!r}",
                    )
                )
            if len(self.errors) != before or bus is None or profile is None:
                continue
            device = DeviceSpec(
                id=device_id,
                bus=bus.id,
                profile=profile,
                poll_interval_s=values["poll_interval_s"],
                options=device_table.without(*DEVICE_SPEC.names()),
            )
            devices[device_id] = device
            cls = bus_classes.get(bus.id)
            if cls is not None:
                self.validate(partial(cls.validate_device, device), device_table, bus.driver)
        return devices, declared

    def groups(self, root: ConfigTable, device_ids: set[str]) -> dict[str, tuple[str, ...]]:
        groups: dict[str, tuple[str, ...]] = {}
        table = self.map_table(root, CONFIG_SPEC, "groups")
        if table is None:
            return groups
        spec = CONFIG_SPEC.field("groups")
        assert spec.item is not None
        for name in _entries(table, spec, self.errors):
            try:
                members = _check_value(table, spec.item, name)
            except ConfigError as exc:
                self.errors.append(exc)
                continue
            unknown = [m for m in members if m not in device_ids]
            if unknown:
                listed = ", ".join(map(repr, unknown))
                self.errors.append(
                    table.error(
                        name, f"unknown device {listed}; expected ids of devices under [devices]"
                    )
                )
                continue
            groups[name] = tuple(members)
        return groups

    def circuits(self, root: ConfigTable, devices: Mapping[str, DeviceSpec]) -> dict[str, Circuit]:
        circuits: dict[str, Circuit] = {}
        table = self.map_table(root, CONFIG_SPEC, "circuits")
        if table is not None:
            for name in _entries(table, CONFIG_SPEC.field("circuits"), self.errors):
                try:
                    circuit_table = table.table(name)
                except ConfigError as exc:
                    self.errors.append(exc)
                    continue
                before = len(self.errors)
                values = self.read(circuit_table, CIRCUIT_SPEC).values
                device = devices.get(values.get("device", ""))
                if "device" in values and device is None:
                    self.errors.append(
                        circuit_table.error(
                            "device", f"unknown device {values['device']!r}; expected a device id"
                        )
                    )
                elif device is not None and values.get("point") not in device.profile.points:
                    known = ", ".join(device.profile.points)
                    self.errors.append(
                        circuit_table.error(
                            "point",
                            f"device {device.id!r} has no point {values.get('point')!r}; "
                            f"expected one of: {known}",
                        )
                    )
                if len(self.errors) == before and device is not None:
                    circuits[name] = Circuit(name, device.id, values["point"], ())
        # Each device's `circuit` must name one of them.
        devices_table = self.map_table(root, CONFIG_SPEC, "devices")
        feeds: dict[str, list[str]] = {name: [] for name in circuits}
        for device_id in devices:
            assert devices_table is not None
            circuit = devices_table.table(device_id).get("circuit")
            if circuit is None:
                continue
            if circuit in feeds:
                feeds[circuit].append(device_id)
            elif not _declared(root, "circuits", circuit):
                self.errors.append(
                    devices_table.table(device_id).error(
                        "circuit",
                        f"unknown circuit {circuit!r}; expected a circuit under [circuits]",
                    )
                )
        return {
            name: Circuit(c.name, c.device, c.point, tuple(feeds[name]))
            for name, c in circuits.items()
        }

    # Profiles ------------------------------------------------------------------------------
    def profile(
        self, device: ConfigTable, reference: str, profile_dirs: Sequence[str]
    ) -> Profile | None:
        if reference.endswith(".toml"):
            candidates = [self.shown_dir / Path(reference).expanduser()]
        elif re.fullmatch(PROFILE_NAME_PATTERN, reference) and ".." not in reference:
            candidates = [self.shown_dir / folder / f"{reference}.toml" for folder in profile_dirs]
        else:
            self.errors.append(
                device.error(
                    "profile",
                    "expected a profile name (letters, digits, '.', '_', '-') or a path "
                    f"ending in .toml, got {reference!r}",
                )
            )
            return None
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            searched = ", ".join(str(c.parent) for c in candidates) or "no folder"
            self.errors.append(
                device.error("profile", f"profile {reference!r} not found; searched: {searched}")
            )
            return None
        key = str(found.absolute())
        if key not in self.profile_cache:
            self.profile_cache[key] = self.load_profile(device, found)
        return self.profile_cache[key]

    def load_profile(self, device: ConfigTable, path: Path) -> Profile | None:
        try:
            table = load_located(path)
        except ConfigError as exc:
            self.errors.append(exc)
            return None
        except OSError as exc:
            self.errors.append(
                device.error("profile", f"cannot read profile file {path}: {exc.strerror}")
            )
            return None
        return self.profile_from(table, path)

    def profile_from(self, root: ConfigTable, path: Path) -> Profile | None:
        before = len(self.errors)
        self.reject_unknown(root, PROFILE_SPEC)
        head = self.section_of(root, PROFILE_SPEC, "profile")
        name = head.values.get("name")
        if name is not None and name != path.stem:
            self.errors.append(
                head.table.error("name", f"expected the file's stem {path.stem!r}, got {name!r}")
            )
        driver_name = head.values.get("driver")
        cls = self.driver(head.table, "driver", driver_name) if driver_name else None
        points: dict[str, PointSpec] = {}
        table = self.map_table(root, PROFILE_SPEC, "points")
        if table is not None:
            points = self.points(table, cls, driver_name or "")
            if not table:
                self.errors.append(table.error(None, "expected at least one point"))
        if len(self.errors) != before or driver_name is None:
            return None
        return Profile(
            name=path.stem,
            driver=driver_name,
            points=MappingProxyType(points),
            file=str(path),
            description=head.values.get("description", ""),
        )

    def section_of(self, root: ConfigTable, spec: TableSpec, name: str) -> _Section:
        try:
            value = self.read_field(root, spec.field(name))
        except ConfigError as exc:
            self.errors.append(exc)
            return _Section(_empty_table(root, name))
        assert isinstance(value, _Section)
        return value

    def points(
        self, table: ConfigTable, cls: type[Driver] | None, driver_name: str
    ) -> dict[str, PointSpec]:
        points: dict[str, PointSpec] = {}
        roles: dict[PointRole, str] = {}
        for name in _entries(table, PROFILE_SPEC.field("points"), self.errors):
            try:
                point_table = table.table(name)
            except ConfigError as exc:
                self.errors.append(exc)
                continue
            before = len(self.errors)
            values = self.read(point_table, POINT_SPEC).values
            role = PointRole(values["role"]) if values.get("role") is not None else None
            if role is not None and role in roles:
                first = roles[role]
                self.errors.append(
                    point_table.error(
                        "role",
                        f"role {role.value!r} is already taken by point {first!r} "
                        f"(line {table.children[first].where('role').line}); "
                        "expected at most one point per role",
                    )
                )
            elif role is not None:
                roles[role] = name
            if role is not None and role in WRITABLE_ROLES and values.get("writable") is False:
                self.errors.append(
                    point_table.error(
                        "role",
                        f"a {role.value} point must be writable: expected writable = true",
                    )
                )
            read_back = values.get("read_back")
            if read_back is not None:
                self.check_read_back(table, point_table, read_back, values.get("writable"))
            if len(self.errors) != before:
                continue
            point = PointSpec(
                name=name,
                unit=values["unit"],
                writable=values["writable"],
                role=role,
                options=point_table.without(*POINT_SPEC.names()),
                read_back=read_back,
            )
            points[name] = point
            if cls is not None:
                self.validate(partial(cls.validate_point, point), point_table, driver_name)
        return points

    def check_read_back(
        self, points: ConfigTable, point: ConfigTable, read_back: str, writable: bool | None
    ) -> None:
        """``read_back`` names another point of the same profile, on a writable point only."""
        if writable is False:
            self.errors.append(
                point.error(
                    "read_back",
                    "only a writable point is read back after a write: expected writable = true "
                    "or no read_back",
                )
            )
        elif read_back not in points:
            known = ", ".join(points)
            self.errors.append(
                point.error(
                    "read_back",
                    f"no point {read_back!r} in this profile; expected one of: {known}",
                )
            )


def _declared(root: ConfigTable, table: str, key: str) -> bool:
    value = root.get(table)
    return isinstance(value, dict) and key in value


def _check_value(table: ConfigTable, spec: Field, key: str) -> Any:
    """The value at ``key``, checked against a scalar or list field declaration."""
    if spec.kind in (Kind.STR, Kind.PATH):
        value = table.get_str(key, choices=spec.choices)
        if spec.kind is Kind.PATH and not value:
            raise table.error(key, "expected a path, got an empty string")
        if len(value) < spec.min_length:
            raise table.error(key, "expected a non-empty string")
        if spec.pattern is not None and not re.fullmatch(spec.pattern, value):
            raise table.error(key, f"expected {spec.pattern_text}, got {value!r}")
        return value
    if spec.kind is Kind.INT:
        return table.get_int(
            key,
            minimum=None if spec.minimum is None else int(spec.minimum),
            maximum=None if spec.maximum is None else int(spec.maximum),
        )
    if spec.kind is Kind.FLOAT:
        return table.get_float(
            key,
            minimum=spec.minimum,
            maximum=spec.maximum,
            exclusive_minimum=spec.exclusive_minimum,
        )
    if spec.kind is Kind.BOOL:
        return table.get_bool(key)
    if spec.kind is Kind.STR_LIST:
        items: list[str] = table.get_str_list(key)
        if len(items) < spec.min_items:
            raise table.error(key, f"expected at least {spec.min_items} item(s)")
        if spec.pattern is not None:
            for item in items:
                if not re.fullmatch(spec.pattern, item):
                    raise table.error(
                        key, f"expected items that are {spec.pattern_text}, got {item!r}"
                    )
        if spec.unique_items and len(set(items)) != len(items):
            twice = sorted({i for i in items if items.count(i) > 1})
            raise table.error(key, f"expected each item once, got {', '.join(twice)} twice")
        return items
    raise AssertionError(f"field {spec.name} of kind {spec.kind} is not a value")


# --------------------------------------------------------------------------------------------
# JSON Schemas, generated from the same declarations.
# --------------------------------------------------------------------------------------------


def _field_schema(spec: Field) -> dict[str, Any]:
    description = spec.description
    if spec.default_text is not None:
        description = f"{description} Default: {spec.default_text}."
    schema: dict[str, Any] = {"description": description}
    if spec.kind in (Kind.STR, Kind.PATH):
        schema["type"] = "string"
        if spec.choices:
            schema["enum"] = list(spec.choices)
        if spec.kind is Kind.PATH or spec.min_length:
            schema["minLength"] = max(1, spec.min_length)
        if spec.pattern is not None:
            schema["pattern"] = f"^{spec.pattern}$"
    elif spec.kind in (Kind.INT, Kind.FLOAT):
        schema["type"] = "integer" if spec.kind is Kind.INT else "number"
        if spec.minimum is not None:
            schema["exclusiveMinimum" if spec.exclusive_minimum else "minimum"] = spec.minimum
        if spec.maximum is not None:
            schema["maximum"] = spec.maximum
    elif spec.kind is Kind.BOOL:
        schema["type"] = "boolean"
    elif spec.kind is Kind.STR_LIST:
        items: dict[str, Any] = {"type": "string"}
        if spec.pattern is not None:
            items["pattern"] = f"^{spec.pattern}$"
        schema.update(type="array", items=items)
        if spec.min_items:
            schema["minItems"] = spec.min_items
        if spec.unique_items:
            schema["uniqueItems"] = True
    elif spec.kind is Kind.TABLE:
        assert spec.table is not None
        schema.update(_table_schema(spec.table))
        schema["description"] = description
    elif spec.kind is Kind.MAP:
        assert spec.item is not None
        schema["type"] = "object"
        if spec.pattern is not None:
            schema["propertyNames"] = {"pattern": f"^{spec.pattern}$"}
        schema["additionalProperties"] = _field_schema(spec.item)
    if spec.default is not REQUIRED and spec.default is not None:
        schema["default"] = list(spec.default) if isinstance(spec.default, tuple) else spec.default
    return schema


def _table_schema(spec: TableSpec) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "description": spec.description}
    schema["properties"] = {f.name: _field_schema(f) for f in spec.fields}
    required = [f.name for f in spec.fields if f.default is REQUIRED]
    if required:
        schema["required"] = required
    if spec.requires:
        dependent: dict[str, list[str]] = {}
        for key, needed in spec.requires:
            dependent.setdefault(key, []).append(needed)
        schema["dependentRequired"] = dependent
    schema["additionalProperties"] = (
        {"description": DRIVER_KEYS_NOTE} if spec.driver_keys else False
    )
    return schema


def _document_schema(spec: TableSpec, title: str, schema_id: str) -> dict[str, Any]:
    schema: dict[str, Any] = {"$schema": JSON_SCHEMA_DIALECT, "$id": schema_id, "title": title}
    schema.update(_table_schema(spec))
    return schema


def config_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of the gateway configuration file."""
    return _document_schema(
        CONFIG_SPEC, "Lampyre gateway configuration", "lampyre-config.schema.json"
    )


def profile_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a device profile file."""
    return _document_schema(PROFILE_SPEC, "Lampyre device profile", "profile.schema.json")


def schema_json(*, profile: bool = False) -> str:
    """The text of ``config/schema/lampyre-config.schema.json`` (or ``profile.schema.json``)."""
    import json

    schema = profile_schema() if profile else config_schema()
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
