"""Fixtures for BLE tests against a mock BlueZ (python-dbusmock's ``bluez5`` template on a
private D-Bus system bus), which bleak's real BlueZ backend talks to.

- ``bluez``: a started :class:`MockBluez` with adapter ``hci0``, and ``DBUS_SYSTEM_BUS_ADDRESS``
  pointing at it for the test (restored afterwards).
- ``bluez_factory``: starts more mocks (other adapters, ``enable_monitor_api=False``…); every
  one it started is stopped after the test.

Register them with ``pytest_plugins = ["tests.support.bluez"]`` in the test module (or in the
root conftest.py); do not import this module from a test module, pytest must import it first
to rewrite its asserts.

bleak reads ``DBUS_SYSTEM_BUS_ADDRESS`` when its per-event-loop BlueZ manager connects, i.e. at
the first scanner start inside the test's ``asyncio.run``. The mock's methods are coroutines
usable from that loop::

    def test_something(bluez: MockBluez) -> None:
        async def body() -> None:
            scanner = BleakScanner(callback, bluez={"adapter": "hci0"})
            await scanner.start()
            await bluez.advertise("hci0", "A4:C1:38:00:00:01", rssi=-60,
                                  service_data={"fcd2": bytes.fromhex("4002c409")})
            await bluez.fail_next("hci0", "StartDiscovery", ERROR_IN_PROGRESS)
            ...
        asyncio.run(body())

A missing dbus-daemon, Debian python3-dbus/python3-gi or python-dbusmock fails the test with
what to install (``packaging/dev.sh test`` installs all of them); nothing is skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence

import pytest

from firmware_sim.ble import MockBluez, MockBluezUnavailable

__all__ = ["BluezFactory", "bluez", "bluez_factory"]

BluezFactory = Callable[..., MockBluez]
"""``factory(adapters=("hci0",), *, enable_monitor_api=True) -> MockBluez`` (started)."""


def _start(adapters: Sequence[str], enable_monitor_api: bool) -> MockBluez:
    mock = MockBluez(adapters, enable_monitor_api=enable_monitor_api)
    try:
        asyncio.run(mock.start())
    except MockBluezUnavailable as exc:
        pytest.fail(f"the mock BlueZ cannot start: {exc}", pytrace=False)
    return mock


@pytest.fixture
def bluez_factory() -> Iterator[BluezFactory]:
    """Starts mock BlueZ instances on demand; stops all of them after the test."""
    started: list[MockBluez] = []

    def factory(
        adapters: Sequence[str] = ("hci0",), *, enable_monitor_api: bool = True
    ) -> MockBluez:
        mock = _start(adapters, enable_monitor_api)
        started.append(mock)
        return mock

    try:
        yield factory
    finally:
        for mock in started:
            asyncio.run(mock.stop())


@pytest.fixture
def bluez(bluez_factory: BluezFactory, monkeypatch: pytest.MonkeyPatch) -> MockBluez:
    """A started mock BlueZ with ``hci0``; ``DBUS_SYSTEM_BUS_ADDRESS`` set for the test and
    restored afterwards; both processes ended after the test, whatever happened in it."""
    mock = bluez_factory()
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", mock.address)
    return mock
