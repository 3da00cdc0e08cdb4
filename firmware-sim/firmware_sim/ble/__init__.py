"""Simulated BLE sensors advertising through a mock BlueZ on a private D-Bus system bus, so that
bleak's real BlueZ backend (and the agent's BLE driver on it) runs without a radio.

Typical use in a test::

    async with MockBluez() as bluez:                      # dbus-daemon + dbusmock bluez5, hci0
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bluez.address
        sensor = BthomeSensor("A4:C1:38:00:00:01", seed=1)
        await bluez.advertise_many("hci0", [sensor.payload(time.monotonic())])
        await bluez.fail_next("hci0", "StartDiscovery", ERROR_IN_PROGRESS)
"""

from firmware_sim.ble.bluez import (
    ERROR_FAILED,
    ERROR_IN_PROGRESS,
    ERROR_NOT_READY,
    Advertisement,
    MockBluez,
    MockBluezError,
    MockBluezUnavailable,
    device_path,
    full_uuid,
)

__all__ = [
    "ERROR_FAILED",
    "ERROR_IN_PROGRESS",
    "ERROR_NOT_READY",
    "Advertisement",
    "MockBluez",
    "MockBluezError",
    "MockBluezUnavailable",
    "device_path",
    "full_uuid",
]
