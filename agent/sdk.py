"""The public driver SDK: the only module of `agent` that drivers import.

A driver knows one protocol and nothing else. It never imports MQTT, SQLite, the scheduler or
the command path; it receives what it needs through the types below and reports back through
return values, typed errors and its :class:`DriverContext`.

Contract in one paragraph: the runtime creates **one driver instance per bus** (one serial line,
one TCP endpoint, one OPC UA endpoint, one BLE adapter) with the bus's devices. Constructors do no
I/O. :meth:`Driver.connect` is all-or-nothing, :meth:`Driver.close` is idempotent. The runtime's
bus queue calls :meth:`Driver.read` and :meth:`Driver.write` **one at a time per bus**, commands
ahead of polls, so a driver never has to arbitrate its own line. Timeouts, retries, backoff of
offline devices and reconnection are the runtime's job: a driver raises :class:`DeviceUnreachable`
when a device does not answer and :class:`BusUnavailable` when the link itself is gone, and the
runtime decides what happens next. One failed point is data (a reading with ``Quality.BAD``), not
an exception. Pushed sources (subscriptions, advertisements) hand readings to
:meth:`DriverContext.emit` from the task the runtime runs as :meth:`Driver.run`.

Drivers are found through the entry-point group ``lampyre.drivers``; the entry-point name, the
driver's :attr:`Driver.name`, its folder under ``drivers/`` and the ``driver = "…"`` value in the
configuration are the same word.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import secrets
import stat
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

__all__ = [
    "BusHealth",
    "BusSpec",
    "BusUnavailable",
    "ConfigError",
    "ConfigTable",
    "DeviceSpec",
    "DeviceUnreachable",
    "Driver",
    "DriverContext",
    "DriverError",
    "FatalDriverError",
    "KeyFileError",
    "LampyreError",
    "PointRole",
    "PointSpec",
    "Profile",
    "Quality",
    "Reading",
    "TransientError",
    "Value",
    "Where",
    "create_file_atomically",
    "fsync_folder",
    "now_ms",
    "read_private_file",
    "read_public_file",
]

Value = float | int | bool | str | None
"""What a point carries. ``None`` means "no value" (with a quality that says why)."""


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds, the timestamp unit of every reading."""
    return time.time_ns() // 1_000_000


class Quality(StrEnum):
    """How far a reading's value can be trusted (the hub protocol's ``quality`` field)."""

    GOOD = "good"
    """Read from the equipment just now."""
    BAD = "bad"
    """The equipment was asked and did not give a usable value; ``value`` is ``None``."""
    UNCERTAIN = "uncertain"
    """A value exists but the source flags it (stale, out of range, substituted)."""


class PointRole(StrEnum):
    """What the core knows a point *means*; everything else about a point is opaque data.

    Roles let the protocol-neutral command path and alarm logic work on any device model
    without knowing its protocol: a ``dim`` command writes the ``DIM_LEVEL`` point and reads
    back ``ACTUAL_LEVEL`` (or, when the profile has no separate feedback point, the
    ``DIM_LEVEL`` point's ``read_back`` point, else the ``DIM_LEVEL`` point itself); a
    ``switch`` command writes true or false to the ``SWITCH`` point (a contactor command) and
    reads back ``SWITCH_STATE`` (its feedback contact) the same way, and on a device without a
    ``SWITCH`` point it dims to 100 or 0 %; a truthy ``LAMP_FAILURE`` point raises a
    lamp-failure alarm.
    """

    DIM_LEVEL = "dim_level"
    ACTUAL_LEVEL = "actual_level"
    LAMP_FAILURE = "lamp_failure"
    SWITCH = "switch"
    """A writable boolean point that switches the device or its circuit on (true) or off."""
    SWITCH_STATE = "switch_state"
    """The feedback of the ``SWITCH`` point: true while the device or circuit is on."""


@dataclass(frozen=True, slots=True)
class Reading:
    """One value of one point of one device at one time."""

    device: str
    point: str
    value: Value
    unit: str
    ts_ms: int
    quality: Quality = Quality.GOOD


# --------------------------------------------------------------------------------------------
# Errors: a small typed tree. Transient errors are retried by the runtime, fatal ones are not,
# configuration errors stop start-up and name the file and line.
# --------------------------------------------------------------------------------------------


class LampyreError(Exception):
    """Base of every error Lampyre raises on purpose."""


@dataclass(frozen=True, slots=True)
class Where:
    """A place in a configuration or profile file, for error messages."""

    file: str
    line: int | None = None

    def __str__(self) -> str:
        return self.file if self.line is None else f"{self.file}:{self.line}"


class ConfigError(LampyreError):
    """A configuration or profile value is wrong. The message says where and what was expected."""

    def __init__(self, where: Where | None, message: str) -> None:
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where is not None else message)


class DriverError(LampyreError):
    """Base of the errors drivers raise."""


class TransientError(DriverError):
    """Worth retrying later: the runtime backs off and tries again."""


class DeviceUnreachable(TransientError):
    """One device did not answer (timeout, no reply, garbled reply). Other devices may be fine."""


class BusUnavailable(TransientError):
    """The link itself is gone (port vanished, TCP refused or reset). The runtime will call
    :meth:`Driver.close` then :meth:`Driver.connect` again, with backoff."""


class FatalDriverError(DriverError):
    """Retrying will not help (for example the device rejects the address map)."""


# --------------------------------------------------------------------------------------------
# Files holding secrets (record keys, client certificate keys, bind keys): one implementation of
# the permission rules for the core and the drivers alike.
# --------------------------------------------------------------------------------------------

_OPEN_TO_OTHERS = stat.S_IRWXG | stat.S_IRWXO
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH
"""Bits that give group or others any access: a secret file with one of them set is refused."""


class KeyFileError(LampyreError):
    """A file holding a secret cannot be used as it is (link, type, permissions, size or
    content). Start-up must stop; the message says what to fix, never what the file holds."""


def read_private_file(path: Path, *, limit: int = 1 << 20) -> bytes:
    """The content of a file holding a secret, at most ``limit`` bytes.

    Blocking: call it through ``asyncio.to_thread`` from the event loop. Raises
    :class:`FileNotFoundError` when there is no file, and :class:`KeyFileError` when ``path``
    is a symbolic link, not a regular file, or gives group or others any access (the message
    names the fix, ``chmod 600 PATH``).
    """
    return _read_guarded_file(
        path,
        limit,
        _OPEN_TO_OTHERS,
        "key file {path} has mode {mode:04o}, which lets group or others use it; "
        "fix with: chmod 600 {path}",
    )


def read_public_file(path: Path, *, limit: int = 1 << 20) -> bytes:
    """The content of a file holding a public key or certificate that must not be replaced
    by someone else, at most ``limit`` bytes: as :func:`read_private_file`, but refused only
    when group or others may *write* it (0644 is fine)."""
    return _read_guarded_file(
        path,
        limit,
        _WRITABLE_BY_OTHERS,
        "public key file {path} has mode {mode:04o}, which lets group or others replace the "
        "key; fix with: chmod 644 {path}",
    )


def _read_guarded_file(path: Path, limit: int, forbidden: int, complaint: str) -> bytes:
    """Open without following a link, check type and mode on the open file (no race between
    the check and the read), read at most ``limit`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KeyFileError(
                f"key file {path} is a symbolic link; point the configuration at the real file"
            ) from None
        if isinstance(exc, FileNotFoundError):
            raise
        raise KeyFileError(f"cannot open key file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & forbidden:
            raise KeyFileError(complaint.format(path=path, mode=mode))
        chunks = []
        left = limit
        while left > 0 and (chunk := os.read(fd, left)):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def fsync_folder(folder: Path) -> None:
    """Make the names in ``folder`` durable (after creating, renaming or deleting a file in
    it). Blocking, like :func:`read_private_file`."""
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def create_file_atomically(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Create ``path`` holding ``data``, or raise :class:`FileExistsError`; never a partial file.
    ``mode`` is 0600 by default, for secrets (a public certificate may be 0644).

    The data is written and fsynced under a temporary name with its final mode, then
    hard-linked to ``path`` (linking fails if the name exists, like O_EXCL), and the folder
    (created 0700 when missing) is fsynced: a crash or power cut can never leave a short key
    that would block the next start. Blocking, like :func:`read_private_file`.
    """
    folder = path.parent
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Left by a crash between writing a temporary file and removing it: harmless, tidy up.
    for stale in folder.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()
    temp = folder / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask could only remove bits; be explicit anyway
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    fsync_folder(folder)


# --------------------------------------------------------------------------------------------
# Located configuration: a TOML table that remembers which line each key came from, with typed
# getters whose errors name the file, the line and what was expected.
# --------------------------------------------------------------------------------------------

_T = TypeVar("_T")
_MISSING: Any = object()


@dataclass(frozen=True)
class ConfigTable(Mapping[str, Any]):
    """A table of a configuration or profile file, with the line of each of its keys.

    ``data`` holds the parsed TOML values; nested tables are returned as ``ConfigTable`` by
    :meth:`table`. ``path`` is the dotted key path of this table (for messages).
    """

    data: Mapping[str, Any]
    file: str
    path: str = ""
    line: int | None = None
    key_lines: Mapping[str, int] = field(default_factory=dict)
    children: Mapping[str, ConfigTable] = field(default_factory=dict)

    # Mapping protocol ------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    # Locations -------------------------------------------------------------------------
    def where(self, key: str | None = None) -> Where:
        """The file and line of ``key`` (or of the table itself)."""
        if key is not None and key in self.key_lines:
            return Where(self.file, self.key_lines[key])
        if key is not None and key in self.children and self.children[key].line is not None:
            return Where(self.file, self.children[key].line)
        return Where(self.file, self.line)

    def name_of(self, key: str) -> str:
        """The dotted name of ``key`` in this file, e.g. ``devices.lamp-1.unit``."""
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str | None, expected: str) -> ConfigError:
        """A :class:`ConfigError` at ``key`` saying what was expected there."""
        if key is None:
            subject = f"[{self.path}]" if self.path else "the file"
            return ConfigError(self.where(), f"{subject}: {expected}")
        return ConfigError(self.where(key), f"{self.name_of(key)}: {expected}")

    # Structure -------------------------------------------------------------------------
    def check_keys(self, allowed: Sequence[str]) -> None:
        """Refuse keys this table does not know (typos must not be silently ignored)."""
        for key in self.data:
            if key not in allowed:
                known = ", ".join(sorted(allowed)) or "none"
                raise self.error(key, f"unknown key; expected one of: {known}")

    def without(self, *keys: str) -> ConfigTable:
        """This table less ``keys``: what remains for a driver to validate."""
        return ConfigTable(
            data={k: v for k, v in self.data.items() if k not in keys},
            file=self.file,
            path=self.path,
            line=self.line,
            key_lines={k: v for k, v in self.key_lines.items() if k not in keys},
            children={k: v for k, v in self.children.items() if k not in keys},
        )

    def table(self, key: str, default: ConfigTable | None = None) -> ConfigTable:
        """The sub-table at ``key``."""
        if key not in self.data:
            if default is not None:
                return default
            raise self.error(None, f"missing table [{self.name_of(key)}]")
        if key not in self.children:
            raise self.error(key, "expected a table")
        return self.children[key]

    def tables(self) -> Iterator[tuple[str, ConfigTable]]:
        """Every (key, sub-table) pair of this table, in file order."""
        for key in self.data:
            if key in self.children:
                yield key, self.children[key]
            else:
                raise self.error(key, "expected a table")

    # Typed getters ---------------------------------------------------------------------
    def _get(self, key: str, default: Any) -> Any:
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            raise self.error(None, f"missing key '{key}'")
        return default

    def get_str(self, key: str, default: Any = _MISSING, *, choices: Sequence[str] = ()) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_describe(value)}")
        if choices and value not in choices:
            raise self.error(key, f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    def get_int(
        self,
        key: str,
        default: Any = _MISSING,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {_describe(value)}")
        _check_range(self, key, value, minimum, maximum)
        return value

    def get_float(
        self,
        key: str,
        default: Any = _MISSING,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        exclusive_minimum: bool = False,
    ) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"expected a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise self.error(key, f"expected a finite number, got {value}")
        if exclusive_minimum and minimum is not None and value <= minimum:
            raise self.error(key, f"expected a number above {minimum}, got {value}")
        _check_range(self, key, value, minimum, maximum)
        return float(value)

    def get_bool(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_describe(value)}")
        return value

    def get_str_list(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, f"expected a list of strings, got {_describe(value)}")
        return list(value)


def _check_range(
    table: ConfigTable,
    key: str,
    value: float,
    minimum: float | None,
    maximum: float | None,
) -> None:
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        raise table.error(key, f"expected a value from {minimum} to {maximum}, got {value}")
    if minimum is not None and value < minimum:
        raise table.error(key, f"expected a value of at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise table.error(key, f"expected a value of at most {maximum}, got {value}")


def _describe(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    for kind, text in kinds.items():
        if type(value) is kind:
            return f"{text} ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    return type(value).__name__


# --------------------------------------------------------------------------------------------
# What a driver is given.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PointSpec:
    """One point of a device profile.

    ``name``, ``unit``, ``writable``, ``role`` and ``read_back`` are understood by the core; every
    other key of the point's profile table is in ``options``, for the driver to interpret
    (register address and type for Modbus, node id for OPC UA, …).
    """

    name: str
    unit: str
    writable: bool
    role: PointRole | None
    options: ConfigTable
    read_back: str | None = None
    """Writable points only: the point of the same profile that the command path reads after
    writing this one, to learn what the equipment really did (a contactor command reads back
    its feedback contact). None: the point itself."""


@dataclass(frozen=True)
class Profile:
    """A device model, loaded from a TOML file in ``config/profiles/``."""

    name: str
    driver: str
    points: Mapping[str, PointSpec]
    file: str
    description: str = ""

    def point_with_role(self, role: PointRole) -> PointSpec | None:
        for point in self.points.values():
            if point.role is role:
                return point
        return None


@dataclass(frozen=True)
class DeviceSpec:
    """One piece of equipment on a bus. ``options`` holds the driver-specific keys of its
    configuration table (a Modbus unit id, a DALI short address, a BLE MAC address, …)."""

    id: str
    bus: str
    profile: Profile
    poll_interval_s: float
    options: ConfigTable


@dataclass(frozen=True)
class BusSpec:
    """One physical link. ``options`` holds the driver-specific keys of its table."""

    id: str
    driver: str
    options: ConfigTable


@dataclass(slots=True)
class BusHealth:
    """Counters a driver keeps about its link; the runtime publishes them as metrics."""

    connected: bool = False
    transactions: int = 0
    timeouts: int = 0
    errors: int = 0
    reconnects: int = 0
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "transactions": self.transactions,
            "timeouts": self.timeouts,
            "errors": self.errors,
            "reconnects": self.reconnects,
            "last_error": self.last_error,
        }


class DriverContext(Protocol):
    """What the runtime gives a driver to report pushed values and events."""

    @property
    def logger(self) -> logging.Logger: ...

    def emit(self, readings: Sequence[Reading]) -> None:
        """Hand over readings the driver received without being asked (subscriptions,
        advertisements). Non-blocking; safe to call from the event loop only."""

    def event(self, kind: str, device: str | None, detail: Mapping[str, Any]) -> None:
        """Report something the hub should hear about (bus power lost, scan restarted, …).

        ``detail`` may carry ``"state"``: ``"raised"`` (the default) or ``"cleared"`` for an
        alarm that holds for a while, ``"info"`` for a one-off event, and ``"severity"``:
        ``"alarm"``, ``"warning"`` or ``"info"`` (the default); the rest of ``detail`` is
        published as the event's ``detail`` object."""

    def device_silent(self, device: str, reason: str) -> None:
        """Say that a pushed device has gone quiet (a sensor that stopped advertising): the
        runtime marks it offline and raises ``device_offline`` once; its next emitted reading
        brings it back online and clears the alarm. Polled devices need not call it: a
        failed poll does the same."""

    async def checkpoint(self) -> bool:
        """Let waiting commands use the bus now, between two transactions of a long read.

        A read that takes many transactions (a DALI memory-bank read is a dozen frames) calls
        this between them so a command starts within one transaction, not after the whole poll.
        Returns True when a command ran: the driver must then set up again any bus state its
        read relied on (DTR registers, a latched bank...). Call it only from inside ``read``.
        """
        ...


class Driver(ABC):
    """Base class of every protocol driver, built-in or vendor.

    Validation class methods run at configuration time (``lampyre check-config``) and must do no
    I/O; they raise :class:`ConfigError` through ``table.error(key, expected)`` so the message
    names the file and line.
    """

    name: ClassVar[str]
    """Entry-point name, folder name and ``driver = "…"`` value."""

    one_transaction_at_a_time: ClassVar[bool] = True
    """True for links that carry one request at a time (serial lines, and TCP gateways to
    them). The runtime serialises reads and writes per bus either way; this flag tells
    tools and metrics what the bus can physically do."""

    # Configuration-time validation (no I/O) --------------------------------------------
    @classmethod
    @abstractmethod
    def validate_bus(cls, bus: BusSpec) -> None:
        """Check the driver-specific keys of a bus table."""

    @classmethod
    @abstractmethod
    def validate_point(cls, point: PointSpec) -> None:
        """Check the driver-specific keys of one profile point."""

    @classmethod
    @abstractmethod
    def validate_device(cls, device: DeviceSpec) -> None:
        """Check the driver-specific keys of a device table."""

    # Lifecycle ---------------------------------------------------------------------------
    def __init__(self, bus: BusSpec, devices: Sequence[DeviceSpec], context: DriverContext) -> None:
        """Remember what to talk to. No I/O here."""
        self.bus = bus
        self.devices = {device.id: device for device in devices}
        self.context = context

    @abstractmethod
    async def connect(self) -> None:
        """Open the link. All or nothing: on failure, nothing stays open and an error is raised
        (:class:`BusUnavailable` if it may work later)."""

    @abstractmethod
    async def close(self) -> None:
        """Release the link. Idempotent; never raises for an already-closed link."""

    async def run(self) -> None:
        """Long-running work of pushed sources (subscriptions, scanners), started by the runtime
        after :meth:`connect` and cancelled before :meth:`close`. Polled drivers keep the
        default, which returns at once.

        Raising :class:`BusUnavailable` here says the pushed source died (a subscription that
        stopped delivering, a scanner that went silent): the runtime then closes and reconnects
        the bus with backoff, exactly as for a failed read."""
        return

    def polled_points(self, device: DeviceSpec) -> Sequence[PointSpec]:
        """The points of ``device`` the runtime polls through :meth:`read` every
        ``poll_interval_s``. All of them by default; a driver whose values are pushed
        (subscriptions, advertisements) returns only the points it cannot push, and a device
        with none is not polled at all. Commands still :meth:`read` any point for read-back."""
        return list(device.profile.points.values())

    # I/O ---------------------------------------------------------------------------------
    @abstractmethod
    async def read(self, device: DeviceSpec, points: Sequence[PointSpec]) -> list[Reading]:
        """Read ``points`` of ``device``: one reading per point, in any order. A point that
        fails alone is a reading with ``Quality.BAD``; a device that does not answer at all
        raises :class:`DeviceUnreachable`."""

    @abstractmethod
    async def write(
        self,
        device: DeviceSpec,
        point: PointSpec,
        value: float | int | bool,
        *,
        fade_s: float | None = None,
    ) -> None:
        """Write ``value`` (in the point's engineering unit) to a writable point. The runtime
        reads back afterwards to learn what the equipment really did.

        ``fade_s`` asks for a transition of that many seconds (DALI fade time); a driver whose
        equipment cannot fade applies the value at once, and the read-back shows it."""

    async def write_many(
        self,
        targets: Sequence[tuple[DeviceSpec, PointSpec]],
        value: float | int | bool,
        *,
        fade_s: float | None = None,
    ) -> Mapping[str, Exception]:
        """Write the same value to several devices of this bus; returns the failures by device
        id (empty when every write went out).

        The default writes one device after the other. A protocol with group or broadcast
        addressing (DALI) overrides it to reach many devices with one frame when the targets
        are exactly such a group: the runtime reads every device back either way."""
        failures: dict[str, Exception] = {}
        for device, point in targets:
            try:
                await self.write(device, point, value, fade_s=fade_s)
            except BusUnavailable:
                raise
            except Exception as exc:
                failures[device.id] = exc
        return failures

    @abstractmethod
    def health(self) -> BusHealth:
        """Counters about the link, cheap to call."""
