"""A private D-Bus system bus with python-dbusmock's ``bluez5`` template on it, driven so that
bleak's real BlueZ backend sees sensors advertise.

Three processes take part:

- a private ``dbus-daemon`` with a system-bus-like configuration, listening on a unix socket in a
  temporary folder that :class:`MockBluez` owns;
- the mock BlueZ, ``python3 -m dbusmock --template bluez5`` run by **Debian's python** (it needs
  dbus-python and PyGObject, which the project's venv cannot build) with a recent
  python-dbusmock (>= 0.32.1, for ``AdvertisementMonitorManager1``) put on its ``PYTHONPATH``;
- the process under test (bleak, the agent), which finds the bus through
  ``DBUS_SYSTEM_BUS_ADDRESS`` = :attr:`MockBluez.address`.

This side drives the mock with dbus-fast through python-dbusmock's control interface
(``org.freedesktop.DBus.Mock``: ``AddObject``, ``EmitSignal``, ``UpdateProperties``, ``AddMethod``,
``GetMethodCalls``) and the template's ``org.bluez.Mock.AddAdapter``. Advertisements reach bleak
the way BlueZ reports them: ``InterfacesAdded`` with a full ``org.bluez.Device1`` property dict
the first time a device is heard, then ``PropertiesChanged`` carrying only what changed.

Processes are plain :class:`subprocess.Popen` children, not asyncio subprocesses, so a started
mock outlives the event loop that started it: a synchronous pytest fixture can start it in one
``asyncio.run`` and the test body use it in another. Every control operation opens its own short
D-Bus connection in the running loop for the same reason (about 2 ms each). The children get
SIGKILL when the thread that started them dies (``PR_SET_PDEATHSIG``) and run in their own
session, so a crashed test leaves no daemon behind and Ctrl-C reaches only the parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.metadata
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Final, Literal, Self

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

__all__ = [
    "ADAPTER_IFACE",
    "DBUSMOCK_PATH_ENV",
    "DBUSMOCK_PYTHON_ENV",
    "DEVICE_IFACE",
    "ERROR_FAILED",
    "ERROR_IN_PROGRESS",
    "ERROR_NOT_READY",
    "MIN_DBUSMOCK_VERSION",
    "Advertisement",
    "MockBluez",
    "MockBluezError",
    "MockBluezUnavailable",
    "device_path",
    "full_uuid",
]

logger = logging.getLogger(__name__)

DBUSMOCK_PYTHON_ENV: Final = "LAMPYRE_DBUSMOCK_PYTHON"
"""Overrides the interpreter that runs the mock (default: Debian's ``/usr/bin/python3``)."""
DBUSMOCK_PATH_ENV: Final = "LAMPYRE_DBUSMOCK_PATH"
"""Overrides the folder holding python-dbusmock (default: ``dbusmock`` in the venv, where
``packaging/dev.sh`` installs it with ``pip install --target``)."""
DEFAULT_DBUSMOCK_PYTHON: Final = "/usr/bin/python3"
MIN_DBUSMOCK_VERSION: Final = (0, 32, 1)
"""The first python-dbusmock whose ``bluez5`` template has ``AdvertisementMonitorManager1``
(bleak's passive scanning)."""

START_TIMEOUT_S = 15.0
"""Bound on each start step (daemon address, mock name on the bus); generous for slow CI."""
STOP_TIMEOUT_S = 5.0
"""How long a child gets after SIGTERM before SIGKILL."""
CALL_TIMEOUT_S = 10.0
"""Bound on one control operation (a batch of 200 adverts takes a few ms)."""
POLL_INTERVAL_S = 0.02

ADAPTER_IFACE: Final = "org.bluez.Adapter1"
DEVICE_IFACE: Final = "org.bluez.Device1"
MONITOR_MANAGER_IFACE: Final = "org.bluez.AdvertisementMonitorManager1"
BLUEZ_SERVICE: Final = "org.bluez"
BLUEZ_MOCK_IFACE: Final = "org.bluez.Mock"
MOCK_IFACE: Final = "org.freedesktop.DBus.Mock"
OBJECT_MANAGER_IFACE: Final = "org.freedesktop.DBus.ObjectManager"
PROPERTIES_IFACE: Final = "org.freedesktop.DBus.Properties"
CONTROL_IFACE: Final = "org.lampyre.BluezMock"
"""Methods this module adds to the mock's root object (batching, failure injection)."""
ROOT_PATH: Final = "/"

ERROR_IN_PROGRESS: Final = "org.bluez.Error.InProgress"
ERROR_NOT_READY: Final = "org.bluez.Error.NotReady"
ERROR_FAILED: Final = "org.bluez.Error.Failed"

BLUETOOTH_BASE_UUID_SUFFIX: Final = "-0000-1000-8000-00805f9b34fb"
LE_GENERAL_DISCOVERABLE_FLAGS: Final = 0x06
"""The Flags AD that BTHome, Ruuvi and Aranet send (LE General Discoverable, BR/EDR not
supported); BlueZ exposes it as ``AdvertisingFlags``."""

FAILABLE_METHODS: Final = (
    (ADAPTER_IFACE, "StartDiscovery"),
    (ADAPTER_IFACE, "StopDiscovery"),
    (ADAPTER_IFACE, "SetDiscoveryFilter"),
    (MONITOR_MANAGER_IFACE, "RegisterMonitor"),
    (MONITOR_MANAGER_IFACE, "UnregisterMonitor"),
)
"""Adapter methods that :meth:`MockBluez.fail_next` can make fail."""

_LOG_FILES: Final = ("dbus-daemon.log", "dbusmock.log")

_INSTALL_HINT = (
    "Run the README's test command (packaging/dev.sh test), which installs them, or by hand: "
    "`apt-get install dbus python3-dbus python3-gi` and "
    "`.venv/bin/pip install --no-deps --target .venv/dbusmock 'python-dbusmock>=0.32.1'`."
)

# Code run inside the mock (Debian's python, dbus-python) through dbusmock's AddMethod. It is
# executed with dbusmock.mockobject's globals (``dbus``, ``objects``) and the locals ``self``
# (the object the method is on) and ``args`` (the call's arguments).
_PREPARE_ADAPTER_CODE: Final = f"""
adapter = objects[args[0]]
adapter.injected_failures = {{}}
def failable(name, original):
    def method(obj, *call_args):
        queue = obj.injected_failures.get(name)
        if queue:
            error_name, text = queue.pop(0)
            raise dbus.exceptions.DBusException(text, name=error_name)
        return original(obj, *call_args)
    return method
for interface, name in {list(FAILABLE_METHODS)!r}:
    known = adapter.methods.get(interface, {{}})
    if name in known:
        in_sig, out_sig, original, _ = known[name]
        adapter.AddMethod(interface, name, in_sig, out_sig, failable(name, original))
"""
_INJECT_FAILURE_CODE: Final = """
objects[args[0]].injected_failures.setdefault(str(args[1]), []).append(
    (str(args[2]), str(args[3])))
"""
_MONITORS_CODE: Final = """
ret = [dbus.ObjectPath(path) for path in getattr(objects[args[0]], 'monitors', [])]
"""
_ADVERTISE_CODE: Final = f"""
root = objects['/']
for path, is_new, props in args[0]:
    if is_new:
        root.AddObject(path, {DEVICE_IFACE!r}, props, [])
        root.EmitSignal({OBJECT_MANAGER_IFACE!r}, 'InterfacesAdded', 'oa{{sa{{sv}}}}', [
            dbus.ObjectPath(path),
            dbus.Dictionary({{{DEVICE_IFACE!r}: props}}, signature='sa{{sv}}')])
    else:
        device = objects[path]
        known = device.props[{DEVICE_IFACE!r}]
        for name, value in props.items():
            if name not in known:
                device.AddProperty({DEVICE_IFACE!r}, name, value)
        device.UpdateProperties({DEVICE_IFACE!r}, props)
ret = dbus.UInt32(len(args[0]))
"""
_CONTROL_METHODS: Final = (
    ("PrepareAdapter", "o", "", _PREPARE_ADAPTER_CODE),
    ("InjectFailure", "osss", "", _INJECT_FAILURE_CODE),
    ("Monitors", "o", "ao", _MONITORS_CODE),
    ("Advertise", "a(oba{sv})", "u", _ADVERTISE_CODE),
)

_DEVICE_SIGNATURES: Final[Mapping[str, str]] = {
    "Address": "s",
    "AddressType": "s",
    "Name": "s",
    "Alias": "s",
    "Adapter": "o",
    "Paired": "b",
    "Bonded": "b",
    "Trusted": "b",
    "Blocked": "b",
    "Connected": "b",
    "LegacyPairing": "b",
    "ServicesResolved": "b",
    "UUIDs": "as",
    "RSSI": "n",
    "TxPower": "n",
    "AdvertisingFlags": "ay",
    "ManufacturerData": "a{qv}",
    "ServiceData": "a{sv}",
}


class MockBluezError(RuntimeError):
    """A control call on the mock failed, or the mock died."""


class MockBluezUnavailable(MockBluezError):
    """Something the mock needs is not installed; the message says what and how to get it."""


@dataclass(frozen=True)
class Advertisement:
    """One advertisement as BlueZ reports it for a device: what bleak turns into
    ``AdvertisementData``. Service data keys may be 16-bit short forms (``"fcd2"``)."""

    address: str
    rssi: int
    local_name: str | None = None
    manufacturer_data: Mapping[int, bytes] = field(default_factory=dict)
    service_data: Mapping[str, bytes] = field(default_factory=dict)
    service_uuids: tuple[str, ...] = ()
    address_type: Literal["public", "random"] = "public"
    tx_power: int | None = None


def full_uuid(uuid: str) -> str:
    """The 128-bit form of a Bluetooth UUID, as BlueZ and bleak spell it (lower case)."""
    text = uuid.lower()
    if len(text) == 4:
        return f"0000{text}{BLUETOOTH_BASE_UUID_SUFFIX}"
    if len(text) == 8:
        return f"{text}{BLUETOOTH_BASE_UUID_SUFFIX}"
    return text


def device_path(adapter: str, address: str) -> str:
    """The D-Bus object path BlueZ gives a device (``/org/bluez/hci0/dev_AA_BB_…``)."""
    return f"/org/bluez/{adapter}/dev_{address.upper().replace(':', '_')}"


def _adapter_path(adapter: str) -> str:
    return f"/org/bluez/{adapter}"


def _variant(name: str, value: Any) -> Variant:
    signature = _DEVICE_SIGNATURES[name]
    if signature == "a{qv}":
        return Variant(signature, {key: Variant("ay", data) for key, data in value.items()})
    if signature == "a{sv}":
        return Variant(signature, {key: Variant("ay", data) for key, data in value.items()})
    return Variant(signature, value)


def _variants(props: Mapping[str, Any]) -> dict[str, Variant]:
    return {name: _variant(name, value) for name, value in props.items()}


def _dbus_daemon_config(socket_path: Path) -> str:
    # A system bus (type "system", EXTERNAL auth) that lets anybody own any name and call
    # anything: bleak must reach org.bluez, and the mock must own it, without a policy file.
    return f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <keep_umask/>
  <listen>unix:path={socket_path}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
"""


def _die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` asking the kernel to SIGKILL the child when the thread that forked it
    exits, so a test process killed with -9 leaves no daemon behind."""
    pr_set_pdeathsig = 1
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    kill = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, kill)

    return preexec


def _dbusmock_version(folder: Path) -> tuple[int, ...] | None:
    for distribution in importlib.metadata.distributions(path=[str(folder)]):
        if distribution.metadata["Name"].lower().replace("_", "-") == "python-dbusmock":
            numbers = re.findall(r"\d+", distribution.version)
            return tuple(int(number) for number in numbers[:3])
    return None


@dataclass
class _DeviceState:
    """What the mock currently shows for one device (plain Python values)."""

    props: dict[str, Any]


class MockBluez:
    """A private system bus with a mock BlueZ on it. No I/O in the constructor.

    ::

        async with MockBluez() as bluez:            # hci0, started
            os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bluez.address   # before bleak connects
            await bluez.advertise("hci0", "A4:C1:38:00:00:01", rssi=-60,
                                  service_data={"fcd2": b"\\x40\\x02\\xc4\\x09"})

    ``stop()`` (or leaving the ``async with``) ends both processes and removes the folder; it is
    idempotent. The methods are coroutines usable from any event loop.
    """

    def __init__(
        self,
        adapters: Sequence[str] = ("hci0",),
        *,
        enable_monitor_api: bool = True,
        python: str | None = None,
        dbusmock_path: Path | None = None,
    ) -> None:
        self._initial_adapters = tuple(adapters)
        self._enable_monitor_api = enable_monitor_api
        self._python = python or os.environ.get(DBUSMOCK_PYTHON_ENV) or DEFAULT_DBUSMOCK_PYTHON
        configured = os.environ.get(DBUSMOCK_PATH_ENV)
        self._dbusmock_path = dbusmock_path or (
            Path(configured) if configured else Path(sys.prefix) / "dbusmock"
        )
        self._folder: Path | None = None
        self._daemon: subprocess.Popen[bytes] | None = None
        self._mock: subprocess.Popen[bytes] | None = None
        self._address: str | None = None
        self._adapters: list[str] = []
        self._devices: dict[str, _DeviceState] = {}
        self._logs: dict[str, BinaryIO] = {}

    # ---------------------------------------------------------------- life cycle

    @property
    def address(self) -> str:
        """The bus address to put in ``DBUS_SYSTEM_BUS_ADDRESS``."""
        if self._address is None:
            raise MockBluezError("the mock BlueZ is not started")
        return self._address

    @property
    def environment(self) -> dict[str, str]:
        """The environment entries a client process needs to find this bus."""
        return {"DBUS_SYSTEM_BUS_ADDRESS": self.address}

    @property
    def process_ids(self) -> tuple[int, ...]:
        """The pids of the dbus-daemon and of the mock, while they run."""
        return tuple(proc.pid for proc in (self._daemon, self._mock) if proc is not None)

    @property
    def adapters(self) -> tuple[str, ...]:
        """The adapters added so far (``hci0``…)."""
        return tuple(self._adapters)

    @property
    def running(self) -> bool:
        """Both processes are alive."""
        return all(proc is not None and proc.poll() is None for proc in (self._daemon, self._mock))

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Starts the bus and the mock, and adds the adapters. All or nothing: on any failure
        everything started so far is stopped again."""
        if self._daemon is not None:
            raise MockBluezError("the mock BlueZ is already started")
        daemon_binary = shutil.which("dbus-daemon")
        if daemon_binary is None:
            raise MockBluezUnavailable(
                "dbus-daemon was not found on PATH: the BLE tests run bleak against a private "
                "D-Bus system bus. " + _INSTALL_HINT
            )
        await asyncio.to_thread(self._check_mock_installation)
        try:
            self._folder, config = await asyncio.to_thread(self._prepare_folder)
            self._address = await self._start_daemon(daemon_binary, config)
            await self._start_mock()
            self._close_logs()
            for adapter in self._initial_adapters:
                await self.add_adapter(adapter)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Ends the mock and the daemon (SIGTERM, then SIGKILL) and removes the folder.
        Idempotent."""
        mock, self._mock = self._mock, None
        daemon, self._daemon = self._daemon, None
        for proc in (mock, daemon):
            if proc is not None:
                await _terminate(proc)
        self._close_logs()
        folder, self._folder = self._folder, None
        if folder is not None:
            await asyncio.to_thread(shutil.rmtree, folder, True)
        self._address = None
        self._adapters.clear()
        self._devices.clear()

    def _check_mock_installation(self) -> None:
        if not os.access(self._python, os.X_OK):
            raise MockBluezUnavailable(
                f"{self._python} (Debian's python with python3-dbus and python3-gi) was not "
                f"found; it runs the mock BlueZ (set {DBUSMOCK_PYTHON_ENV} to use another). "
                + _INSTALL_HINT
            )
        if not (self._dbusmock_path / "dbusmock" / "__init__.py").is_file():
            raise MockBluezUnavailable(
                f"python-dbusmock was not found in {self._dbusmock_path} (set "
                f"{DBUSMOCK_PATH_ENV} to use another folder). " + _INSTALL_HINT
            )
        version = _dbusmock_version(self._dbusmock_path)
        if version is not None and version < MIN_DBUSMOCK_VERSION:
            found = ".".join(map(str, version))
            raise MockBluezUnavailable(
                f"python-dbusmock {found} in {self._dbusmock_path} is too old: the passive "
                "scanning API (AdvertisementMonitorManager1) needs >= 0.32.1. " + _INSTALL_HINT
            )

    def _prepare_folder(self) -> tuple[Path, Path]:
        folder = Path(tempfile.mkdtemp(prefix="lampyre-bluez-"))
        config = folder / "bus.conf"
        config.write_text(_dbus_daemon_config(folder / "system_bus_socket"), encoding="utf-8")
        # An empty data dir: dbusmock looks for templates in XDG_DATA_DIRS first, and an old
        # system-wide bluez5.py must not shadow the one shipped with the pinned version.
        (folder / "share").mkdir()
        # The children's stderr; the parent's copies are closed once the children hold theirs.
        self._logs = {name: (folder / name).open("ab") for name in _LOG_FILES}
        return folder, config

    def _close_logs(self) -> None:
        logs, self._logs = self._logs, {}
        for log in logs.values():
            log.close()

    async def _start_daemon(self, binary: str, config: Path) -> str:
        # Popen (a fork and exec, no wait) on the loop's thread, never in an executor thread:
        # PR_SET_PDEATHSIG fires when the forking *thread* exits, and executor threads end with
        # their loop. Not an asyncio subprocess: those are killed when their loop closes.
        self._daemon = subprocess.Popen(  # noqa: S603, ASYNC220 - fixed argv; see above
            [binary, f"--config-file={config}", "--nofork", "--print-address"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._logs["dbus-daemon.log"],
            start_new_session=True,
            preexec_fn=_die_with_parent(),  # noqa: PLW1509 - only prctl(), prepared beforehand
        )
        stdout = self._daemon.stdout
        assert stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                line = await asyncio.to_thread(stdout.readline)
        except TimeoutError:
            self._daemon.kill()
            raise MockBluezError(
                f"dbus-daemon printed no address within {START_TIMEOUT_S} s"
                + self._log_tail("dbus-daemon.log")
            ) from None
        finally:
            stdout.close()
        address = line.decode().strip()
        if not address:
            raise MockBluezError(
                "dbus-daemon exited before printing its address" + self._log_tail("dbus-daemon.log")
            )
        return address

    async def _start_mock(self) -> None:
        assert self._folder is not None
        parameters = json.dumps({"enable_monitor_api": self._enable_monitor_api})
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(self._dbusmock_path),
            "PYTHONNOUSERSITE": "1",
            "XDG_DATA_DIRS": str(self._folder / "share"),
            "DBUS_SYSTEM_BUS_ADDRESS": self.address,
        }
        # Same reasons as for the daemon.
        self._mock = subprocess.Popen(  # noqa: S603, ASYNC220 - fixed argv
            [
                self._python,
                "-m",
                "dbusmock",
                "--system",
                "--template",
                "bluez5",
                "--parameters",
                parameters,
            ],
            stdin=subprocess.DEVNULL,
            # The mock writes a line per method call to stdout: unbounded, so it is discarded.
            stdout=subprocess.DEVNULL,
            stderr=self._logs["dbusmock.log"],
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent(),  # noqa: PLW1509 - only prctl(), prepared beforehand
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        async with self._control() as bus:
            while True:
                reply = await bus.call(
                    Message(
                        destination="org.freedesktop.DBus",
                        path="/org/freedesktop/DBus",
                        interface="org.freedesktop.DBus",
                        member="NameHasOwner",
                        signature="s",
                        body=[BLUEZ_SERVICE],
                    )
                )
                if reply.message_type == MessageType.METHOD_RETURN and reply.body[0]:
                    break
                if self._mock.poll() is not None:
                    raise self._mock_start_error(f"exited with status {self._mock.returncode}")
                if time.monotonic() > deadline:
                    raise self._mock_start_error(
                        f"did not own {BLUEZ_SERVICE} within {START_TIMEOUT_S} s"
                    )
                await asyncio.sleep(POLL_INTERVAL_S)
            for name, in_signature, out_signature, code in _CONTROL_METHODS:
                await self._call(
                    bus,
                    ROOT_PATH,
                    MOCK_IFACE,
                    "AddMethod",
                    "sssss",
                    [CONTROL_IFACE, name, in_signature, out_signature, code],
                )

    def _mock_start_error(self, what: str) -> MockBluezError:
        tail = self._log_tail("dbusmock.log")
        missing_module = "No module named" in tail
        error_type = MockBluezUnavailable if missing_module else MockBluezError
        hint = " " + _INSTALL_HINT if missing_module else ""
        return error_type(
            f"the mock BlueZ ({self._python} -m dbusmock --template bluez5) {what}.{hint}{tail}"
        )

    def _log_tail(self, name: str) -> str:
        if self._folder is None:
            return ""
        try:
            text = (self._folder / name).read_text(errors="replace")
        except OSError:
            return ""
        lines = [line for line in text.splitlines() if "Failed to set fd limit" not in line]
        return ("\n" + "\n".join(lines[-15:])) if lines else ""

    # ---------------------------------------------------------------- control connection

    @contextlib.asynccontextmanager
    async def _control(self) -> AsyncIterator[MessageBus]:
        """A connection to the private bus in the running loop, closed on exit."""
        bus = MessageBus(bus_address=self.address, bus_type=BusType.SYSTEM)
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                await bus.connect()
            yield bus
        finally:
            bus.disconnect()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CALL_TIMEOUT_S):
                    await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]

    async def _call(
        self,
        bus: MessageBus,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
    ) -> list[Any]:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            reply = await bus.call(
                Message(
                    destination=BLUEZ_SERVICE,
                    path=path,
                    interface=interface,
                    member=member,
                    signature=signature,
                    body=body or [],
                )
            )
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body else ""
            raise MockBluezError(f"{interface}.{member} on {path}: {reply.error_name}: {text}")
        body_out: list[Any] = reply.body
        return body_out

    # ---------------------------------------------------------------- adapters

    async def add_adapter(self, name: str = "hci0", alias: str = "lampyre-sim") -> str:
        """Adds an adapter (``hci0``; the name must end with a digit) and returns its path.
        Its failable methods (:data:`FAILABLE_METHODS`) can then be made to fail with
        :meth:`fail_next`."""
        async with self._control() as bus:
            (path,) = await self._call(
                bus, ROOT_PATH, BLUEZ_MOCK_IFACE, "AddAdapter", "ss", [name, alias]
            )
            await self._call(bus, ROOT_PATH, CONTROL_IFACE, "PrepareAdapter", "o", [path])
        self._adapters.append(name)
        return str(path)

    async def remove_adapter(self, name: str = "hci0") -> None:
        """Removes the adapter and its devices, as when a USB dongle is unplugged
        (``InterfacesRemoved`` for each device, then for the adapter)."""
        async with self._control() as bus:
            await self._call(
                bus, ROOT_PATH, BLUEZ_MOCK_IFACE, "RemoveAdapterWithDevices", "s", [name]
            )
        self._adapters.remove(name)
        prefix = _adapter_path(name) + "/"
        for path in [path for path in self._devices if path.startswith(prefix)]:
            del self._devices[path]

    async def discovering(self, adapter: str = "hci0") -> bool:
        """The adapter's ``Discovering`` property (True between StartDiscovery and
        StopDiscovery)."""
        async with self._control() as bus:
            (value,) = await self._call(
                bus,
                _adapter_path(adapter),
                PROPERTIES_IFACE,
                "Get",
                "ss",
                [ADAPTER_IFACE, "Discovering"],
            )
        return bool(value.value)

    async def method_calls(self, adapter: str, method: str) -> list[list[Any]]:
        """The arguments of each call of ``method`` (``StartDiscovery``, ``RegisterMonitor``,
        ``SetDiscoveryFilter``…) on the adapter since the last :meth:`clear_calls`, failed calls
        included."""
        async with self._control() as bus:
            (calls,) = await self._call(
                bus, _adapter_path(adapter), MOCK_IFACE, "GetMethodCalls", "s", [method]
            )
        return [[argument.value for argument in arguments] for _, arguments in calls]

    async def call_count(self, adapter: str, method: str) -> int:
        """How many times ``method`` was called on the adapter since :meth:`clear_calls`."""
        return len(await self.method_calls(adapter, method))

    async def clear_calls(self, adapter: str = "hci0") -> None:
        """Forgets the adapter's recorded method calls."""
        async with self._control() as bus:
            await self._call(bus, _adapter_path(adapter), MOCK_IFACE, "ClearCalls")

    async def monitors(self, adapter: str = "hci0") -> list[str]:
        """The advertisement monitors registered on the adapter (bleak's passive scans)."""
        async with self._control() as bus:
            (paths,) = await self._call(
                bus, ROOT_PATH, CONTROL_IFACE, "Monitors", "o", [_adapter_path(adapter)]
            )
        return [str(path) for path in paths]

    async def fail_next(
        self,
        adapter: str,
        method: str,
        error: str = ERROR_IN_PROGRESS,
        message: str = "Operation already in progress",
        *,
        times: int = 1,
    ) -> None:
        """Makes the next ``times`` calls of ``method`` (one of :data:`FAILABLE_METHODS`, e.g.
        ``StartDiscovery``) fail with the D-Bus error ``error``, as BlueZ does (InProgress,
        NotReady, Failed). Calls after those behave normally again; a failed call changes
        nothing (``Discovering`` stays as it was)."""
        if method not in {name for _, name in FAILABLE_METHODS}:
            raise ValueError(f"{method} cannot be made to fail; one of {FAILABLE_METHODS}")
        async with self._control() as bus:
            for _ in range(times):
                await self._call(
                    bus,
                    ROOT_PATH,
                    CONTROL_IFACE,
                    "InjectFailure",
                    "osss",
                    [_adapter_path(adapter), method, error, message],
                )

    # ---------------------------------------------------------------- devices

    async def advertise(
        self,
        adapter: str,
        address: str,
        *,
        rssi: int,
        local_name: str | None = None,
        manufacturer_data: Mapping[int, bytes] | None = None,
        service_data: Mapping[str, bytes] | None = None,
        service_uuids: Sequence[str] = (),
        address_type: Literal["public", "random"] = "public",
        tx_power: int | None = None,
    ) -> bool:
        """Reports one advertisement of ``address`` heard on ``adapter``, through the mock's
        standard control API: the first time ``AddObject`` + ``InterfacesAdded`` with the whole
        ``Device1`` dict, later ``UpdateProperties`` (one ``PropertiesChanged``) of what
        changed. Returns False when nothing changed (no signal, as with BlueZ).

        As in BlueZ, manufacturer and service data entries are merged per company id / UUID
        (an entry stays until replaced), and the name, once heard, stays."""
        advert = Advertisement(
            address=address,
            rssi=rssi,
            local_name=local_name,
            manufacturer_data=dict(manufacturer_data or {}),
            service_data=dict(service_data or {}),
            service_uuids=tuple(service_uuids),
            address_type=address_type,
            tx_power=tx_power,
        )
        path, is_new, props, merged = self._prepare(adapter, advert)
        if not is_new and not props:
            return False
        async with self._control() as bus:
            if is_new:
                variants = _variants(props)
                await self._call(
                    bus,
                    ROOT_PATH,
                    MOCK_IFACE,
                    "AddObject",
                    "ssa{sv}a(ssss)",
                    [path, DEVICE_IFACE, variants, []],
                )
                await self._call(
                    bus,
                    ROOT_PATH,
                    MOCK_IFACE,
                    "EmitSignal",
                    "sssav",
                    [
                        OBJECT_MANAGER_IFACE,
                        "InterfacesAdded",
                        "oa{sa{sv}}",
                        [Variant("o", path), Variant("a{sa{sv}}", {DEVICE_IFACE: variants})],
                    ],
                )
            else:
                known = self._devices[path].props
                for name in props.keys() - known.keys():
                    await self._call(
                        bus,
                        path,
                        MOCK_IFACE,
                        "AddProperty",
                        "ssv",
                        [DEVICE_IFACE, name, _variant(name, props[name])],
                    )
                await self._call(
                    bus,
                    path,
                    MOCK_IFACE,
                    "UpdateProperties",
                    "sa{sv}",
                    [DEVICE_IFACE, _variants(props)],
                )
        self._commit(path, merged)
        return True

    async def advertise_many(self, adapter: str, adverts: Iterable[Advertisement]) -> int:
        """Reports many advertisements in **one** D-Bus call (the mock still emits one signal
        per device, as BlueZ does): what benches use for hundreds of sensors. Same semantics as
        :meth:`advertise`; returns how many signals were emitted."""
        batch: list[list[Any]] = []
        merged_by_path: dict[str, dict[str, Any]] = {}
        for advert in adverts:
            path, is_new, props, merged = self._prepare(adapter, advert, merged_by_path)
            merged_by_path[path] = merged
            if is_new or props:
                batch.append([path, is_new, _variants(props)])
        if batch:
            async with self._control() as bus:
                await self._call(bus, ROOT_PATH, CONTROL_IFACE, "Advertise", "a(oba{sv})", [batch])
        for path, merged in merged_by_path.items():
            self._commit(path, merged)
        return len(batch)

    async def remove(self, adapter: str, address: str) -> None:
        """Removes the device, through the adapter's ``RemoveDevice`` (``InterfacesRemoved``:
        bleak forgets it)."""
        path = device_path(adapter, address)
        async with self._control() as bus:
            await self._call(
                bus, _adapter_path(adapter), ADAPTER_IFACE, "RemoveDevice", "o", [path]
            )
        self._devices.pop(path, None)

    def device_properties(self, adapter: str, address: str) -> dict[str, Any] | None:
        """What the mock shows for a device (plain values), or None if it is not there."""
        state = self._devices.get(device_path(adapter, address))
        return dict(state.props) if state is not None else None

    def _prepare(
        self,
        adapter: str,
        advert: Advertisement,
        pending: Mapping[str, dict[str, Any]] | None = None,
    ) -> tuple[str, bool, dict[str, Any], dict[str, Any]]:
        """The device path, whether it is new, the properties to send and the full merged set
        of properties after this advertisement."""
        if adapter not in self._adapters:
            raise MockBluezError(f"no adapter {adapter!r}; added: {self._adapters}")
        path = device_path(adapter, advert.address)
        previous = (pending or {}).get(path)
        if previous is None and path in self._devices:
            previous = self._devices[path].props
        address = advert.address.upper()
        manufacturer = dict(previous["ManufacturerData"]) if previous else {}
        manufacturer.update({int(k): bytes(v) for k, v in advert.manufacturer_data.items()})
        services = dict(previous["ServiceData"]) if previous else {}
        services.update({full_uuid(k): bytes(v) for k, v in advert.service_data.items()})
        uuids = list(previous["UUIDs"]) if previous else []
        uuids += [u for u in map(full_uuid, advert.service_uuids) if u not in uuids]
        name = (
            advert.local_name
            if advert.local_name is not None
            else (previous.get("Name") if previous else None)
        )
        merged: dict[str, Any] = {
            "Address": address,
            "AddressType": advert.address_type,
            "Alias": name if name is not None else address.replace(":", "-"),
            "Adapter": _adapter_path(adapter),
            "Paired": False,
            "Bonded": False,
            "Trusted": False,
            "Blocked": False,
            "Connected": False,
            "LegacyPairing": False,
            "ServicesResolved": False,
            "UUIDs": uuids,
            "RSSI": int(advert.rssi),
            "AdvertisingFlags": bytes([LE_GENERAL_DISCOVERABLE_FLAGS]),
            "ManufacturerData": manufacturer,
            "ServiceData": services,
        }
        if name is not None:
            merged["Name"] = name
        tx_power = (
            advert.tx_power
            if advert.tx_power is not None
            else (previous.get("TxPower") if previous else None)
        )
        if tx_power is not None:
            merged["TxPower"] = int(tx_power)
        if previous is None:
            return path, True, merged, merged
        changed = {k: v for k, v in merged.items() if previous.get(k) != v}
        return path, False, changed, merged

    def _commit(self, path: str, merged: dict[str, Any]) -> None:
        self._devices[path] = _DeviceState(merged)


async def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, wait (in a thread, not on the loop), SIGKILL if needed, reap."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("pid %d ignored SIGTERM for %s s; killing it", proc.pid, STOP_TIMEOUT_S)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.to_thread(proc.wait)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
