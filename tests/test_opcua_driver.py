"""The OPC UA driver against the cabinet simulator (a real asyncua server on a loopback port):
secure sessions with each policy, the trust list, start-up resolution of node ids and browse
paths, subscriptions, polling, writes and method calls; plus its configuration checks and the
mapping of OPC UA values and status codes to readings."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from hypothesis import given
from hypothesis import strategies as st

from agent.config import load_config
from agent.sdk import (
    BusUnavailable,
    ConfigError,
    ConfigTable,
    FatalDriverError,
    PointSpec,
    Quality,
)
from drivers.opcua import OpcUaDriver
from drivers.opcua.driver import to_reading
from drivers.opcua.security import fingerprint
from drivers.opcua.settings import parse_browse_path, parse_bus, parse_node_id
from tests.opcua_site import BUS, RecordingContext, Waiter, simulator, write_config

DRIVERS = {"opcua": OpcUaDriver}
WAIT = Waiter(15.0)


def _driver(directory: Path, endpoint: str, **keys: Any) -> tuple[OpcUaDriver, RecordingContext]:
    config = load_config(write_config(directory, endpoint, **keys), DRIVERS)
    context = RecordingContext()
    return OpcUaDriver(config.buses[BUS], list(config.devices.values()), context), context


async def _run_until(driver: OpcUaDriver, condition: Any, what: str) -> asyncio.Task[None]:
    """Connect, start run() and wait for ``condition``; returns the run task."""
    await driver.connect()
    task = asyncio.create_task(driver.run())
    try:
        await WAIT.until(condition, what)
    except BaseException:
        task.cancel()
        await driver.close()
        raise
    return task


async def _stop(driver: OpcUaDriver, task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await driver.close()


# ------------------------------------------------------------------ sessions and security


@pytest.mark.parametrize(
    ("policy", "mode"),
    [
        ("Basic256Sha256", "SignAndEncrypt"),
        ("Aes128_Sha256_RsaOaep", "SignAndEncrypt"),
        ("Aes256_Sha256_RsaPss", "SignAndEncrypt"),
        ("Basic256Sha256", "Sign"),
    ],
)
def test_secure_session_with_each_policy_delivers_subscribed_values(
    tmp_path: Path, policy: str, mode: str
) -> None:
    async def body() -> None:
        async with simulator(tmp_path) as sim:
            await sim.set_ambient_light(12.5)
            driver, context = _driver(
                tmp_path, sim.endpoint, bus={"security_policy": policy, "security_mode": mode}
            )
            task = await _run_until(
                driver,
                lambda: context.latest("cabinet", "ambient_light") is not None,
                "first values",
            )
            try:
                first = context.latest("cabinet", "ambient_light")
                assert first is not None and first.value == 12.5
                assert first.quality is Quality.GOOD and first.unit == "lx"
                await sim.set_door_open(True)
                await WAIT.until(
                    lambda: getattr(context.latest("cabinet", "door_open"), "value", None) is True,
                    "door change",
                )
                health = driver.health().as_dict()
                assert health["connected"] and health["monitored_items"] == 25
            finally:
                await _stop(driver, task)

    asyncio.run(body())


def test_untrusted_server_certificate_is_refused_with_its_fingerprint(tmp_path: Path) -> None:
    async def body() -> None:
        async with simulator(tmp_path, trusted=False) as sim:
            driver, _ = _driver(tmp_path, sim.endpoint)
            with pytest.raises(BusUnavailable) as caught:
                await driver.connect()
            from cryptography import x509

            expected = fingerprint(x509.load_der_x509_certificate(sim.certificate_der))
            message = str(caught.value)
            assert "not in the trust list" in message and expected in message
            assert "lampyre opcua trust" in message
            # Nothing was trusted behind the technician's back.
            assert not any((tmp_path / "pki" / BUS / "trusted").glob("*"))

    asyncio.run(body())


def test_trust_on_first_use_only_when_configured(tmp_path: Path) -> None:
    async def body() -> None:
        async with simulator(tmp_path, trusted=False) as sim:
            driver, context = _driver(tmp_path, sim.endpoint, bus={"trust_on_first_use": True})
            task = await _run_until(driver, lambda: bool(context.readings), "values")
            await _stop(driver, task)
            assert len(list((tmp_path / "pki" / BUS / "trusted").glob("*.der"))) == 1

    asyncio.run(body())


def test_server_that_does_not_trust_the_gateway_is_reported(tmp_path: Path) -> None:
    async def body() -> None:
        (tmp_path / "sim-trust").mkdir()
        async with simulator(tmp_path, trust_dir=tmp_path / "sim-trust") as sim:
            driver, _ = _driver(tmp_path, sim.endpoint)
            with pytest.raises(BusUnavailable, match="does not trust this gateway"):
                await driver.connect()
            assert sim.rejected_certificates >= 1

    asyncio.run(body())


def test_missing_client_certificate_names_the_command_that_makes_it(tmp_path: Path) -> None:
    async def body() -> None:
        async with simulator(tmp_path) as sim:
            for name in ("client.der", "client-key.pem"):
                (tmp_path / "pki" / BUS / name).unlink()
            driver, _ = _driver(tmp_path, sim.endpoint)
            with pytest.raises(BusUnavailable, match="lampyre opcua cert --config"):
                await driver.connect()

    asyncio.run(body())


def test_policy_none_works_only_when_written_and_the_server_offers_it(tmp_path: Path) -> None:
    async def body() -> None:
        async with simulator(tmp_path, allow_none=True) as sim:
            driver, context = _driver(tmp_path, sim.endpoint, bus={"security_policy": "None"})
            task = await _run_until(driver, lambda: bool(context.readings), "values")
            await _stop(driver, task)
        async with simulator(tmp_path / "strict") as sim:
            driver, _ = _driver(tmp_path, sim.endpoint, bus={"security_policy": "None"})
            with pytest.raises(BusUnavailable, match="offers no endpoint with None"):
                await driver.connect()

    asyncio.run(body())


# ------------------------------------------------------------------ start-up resolution


def test_unknown_nodes_are_reported_with_profile_file_and_line(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "broken-cabinet.toml").write_text(
        "\n".join(
            [
                "[profile]",
                'driver = "opcua"',
                "",
                "[points.door]",
                'node = "nsu=urn:lampyre:sim:cabinet;s=Cabinet.DoorOpen"',
                "",
                "[points.ghost]",
                'node = "nsu=urn:lampyre:sim:cabinet;s=Cabinet.NoSuchThing"',
                "",
                "[points.lost]",
                'browse_path = "Cabinet/Circuit9/DimLevel"',
                "",
                "[points.foreign]",
                'node = "nsu=urn:nowhere;s=Cabinet.DoorOpen"',
                "",
                "[points.level]",
                'browse_path = "Cabinet/Circuit1/DimLevel"',
                "",
            ]
        )
    )

    async def body() -> None:
        async with simulator(tmp_path) as sim:
            await sim.set_door_open(True)
            driver, context = _driver(
                tmp_path,
                sim.endpoint,
                profile_dirs=[profiles],
                devices={
                    "box": {"profile": "broken-cabinet", "namespace": "urn:lampyre:sim:cabinet"}
                },
            )
            task = await _run_until(
                driver,
                lambda: context.latest("box", "door") and context.latest("box", "level"),
                "the good points",
            )
            await _stop(driver, task)
        profile = str(profiles / "broken-cabinet.toml")
        unresolved = {
            detail["point"]: detail
            for kind, _, detail in context.events
            if kind == "point_unresolved"
        }
        assert set(unresolved) == {"ghost", "lost", "foreign"}
        assert unresolved["ghost"]["where"] == f"{profile}:8"
        assert "BadNodeIdUnknown" in unresolved["ghost"]["reason"]
        assert unresolved["lost"]["where"] == f"{profile}:11"
        assert "browse path not found" in unresolved["lost"]["reason"]
        assert unresolved["foreign"]["where"] == f"{profile}:14"
        assert "urn:nowhere" in unresolved["foreign"]["reason"]
        door = context.latest("box", "door")
        level = context.latest("box", "level")
        assert door is not None and door.value is True
        assert level is not None and level.value == sim.state.circuits[1].dim_level
        assert driver.health().as_dict()["unresolved_points"] == 3

    asyncio.run(body())


def test_polled_points_are_read_not_subscribed(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "mixed.toml").write_text(
        "\n".join(
            [
                "[profile]",
                'driver = "opcua"',
                "[points.voltage]",
                'unit = "V"',
                'node = "ns=2;s=Cabinet.Voltage.L1"',
                'mode = "poll"',
                "[points.door]",
                'node = "ns=2;s=Cabinet.DoorOpen"',
            ]
        )
    )

    async def body() -> None:
        async with simulator(tmp_path) as sim:
            driver, context = _driver(
                tmp_path,
                sim.endpoint,
                profile_dirs=[profiles],
                devices={"box": {"profile": "mixed"}},
            )
            device = next(iter(driver.devices.values()))
            assert [p.name for p in driver.polled_points(device)] == ["voltage"]
            task = await _run_until(driver, lambda: bool(context.readings), "values")
            try:
                assert {r.point for r in context.readings} == {"door"}
                (reading,) = await driver.read(device, driver.polled_points(device))
                assert reading.value == sim.value("Voltage.L1") and reading.unit == "V"
                assert driver.health().as_dict()["monitored_items"] == 1
            finally:
                await _stop(driver, task)

    asyncio.run(body())


# ------------------------------------------------------------------ writes and methods


def test_writes_and_method_calls_reach_the_controller(tmp_path: Path) -> None:
    async def body() -> None:
        async with simulator(tmp_path) as sim:
            driver, context = _driver(tmp_path, sim.endpoint)
            task = await _run_until(driver, lambda: bool(context.readings), "values")
            try:
                circuit = driver.devices["circuit-1"]
                cabinet = driver.devices["cabinet"]
                await driver.write(circuit, circuit.profile.points["level"], 40)
                assert sim.state.circuits[1].dim_level == 40
                (actual,) = await driver.read(circuit, [circuit.profile.points["actual_level"]])
                assert actual.value == 40
                await driver.write(cabinet, cabinet.profile.points["switch_circuit_2"], False)
                assert sim.method_calls[-1] == ("SwitchCircuit", (2, False))
                assert sim.state.circuits[2].contactor is False
                await WAIT.until(
                    lambda: (
                        getattr(context.latest("cabinet", "contactor_2"), "value", None) is False
                    ),
                    "contactor feedback",
                )
                writes_before = sum(sim.writes.values())
                with pytest.raises(FatalDriverError, match="out of range for a Byte"):
                    await driver.write(circuit, circuit.profile.points["level"], 300)
                with pytest.raises(FatalDriverError, match="whole number"):
                    await driver.write(circuit, circuit.profile.points["level"], 40.5)
                with pytest.raises(FatalDriverError, match="not writable"):
                    await driver.write(circuit, circuit.profile.points["contactor"], True)
                assert sum(sim.writes.values()) == writes_before
            finally:
                await _stop(driver, task)

    asyncio.run(body())


def test_method_with_the_wrong_number_of_arguments_is_unresolved(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "switcher.toml").write_text(
        "\n".join(
            [
                "[profile]",
                'driver = "opcua"',
                "[points.door]",
                'node = "ns=2;s=Cabinet.DoorOpen"',
                "[points.switch]",
                "writable = true",
                'method = "ns=2;s=Cabinet.SwitchCircuit"',
                'object = "ns=2;s=Cabinet"',
                'arguments = ["$value"]',
            ]
        )
    )

    async def body() -> None:
        async with simulator(tmp_path) as sim:
            driver, context = _driver(
                tmp_path,
                sim.endpoint,
                profile_dirs=[profiles],
                devices={"box": {"profile": "switcher"}},
            )
            task = await _run_until(driver, lambda: bool(context.readings), "values")
            try:
                box = driver.devices["box"]
                with pytest.raises(FatalDriverError, match="takes 2 argument"):
                    await driver.write(box, box.profile.points["switch"], True)
                assert sim.method_calls == []
            finally:
                await _stop(driver, task)

    asyncio.run(body())


# ------------------------------------------------------------------ configuration checks


def _bus_error(tmp_path: Path, **keys: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, "opc.tcp://127.0.0.1:4840/x", bus=keys), DRIVERS)
    return str(caught.value)


def test_bus_configuration_errors_name_file_line_and_expectation(tmp_path: Path) -> None:
    config = str(tmp_path / "gateway.toml")
    message = _bus_error(tmp_path, endpoint="http://plc:4840")
    assert config in message and "expected an opc.tcp://" in message
    assert "identity" in _bus_error(tmp_path, security_policy="None", identity="username")
    assert "password_file" in _bus_error(tmp_path, identity="username", username="ops")
    assert "never written in the configuration" in _bus_error(
        tmp_path, identity="username", username="ops"
    )
    assert "Basic128Rsa15" in _bus_error(tmp_path, security_policy="Basic128Rsa15")
    assert "no security_mode" in _bus_error(tmp_path, security_policy="None", security_mode="Sign")
    assert "at least publishing_interval_s" in _bus_error(
        tmp_path, publishing_interval_s=2.0, keepalive_s=1.0
    )
    assert "user name or password" in _bus_error(tmp_path, endpoint="opc.tcp://u:p@plc:4840/")


def test_default_policy_is_basic256sha256_sign_and_encrypt(tmp_path: Path) -> None:
    table = ConfigTable({"endpoint": "opc.tcp://plc:4840"}, file=str(tmp_path / "g.toml"))
    settings = parse_bus(table, "plc")
    assert (settings.policy, settings.mode, settings.secure) == (
        "Basic256Sha256",
        "SignAndEncrypt",
        True,
    )
    assert settings.certificate == tmp_path / "pki" / "plc" / "client.der"
    assert settings.trust_dir == tmp_path / "pki" / "plc" / "trusted"


def test_bad_node_id_in_a_profile_names_the_profile_and_line(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "typo.toml").write_text(
        '[profile]\ndriver = "opcua"\n\n[points.door]\nnode = "ns=two;s=Cabinet.DoorOpen"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(
            write_config(
                tmp_path,
                "opc.tcp://127.0.0.1:4840/x",
                profile_dirs=[profiles],
                devices={"box": {"profile": "typo"}},
            ),
            DRIVERS,
        )
    assert f"{profiles / 'typo.toml'}:5" in str(caught.value)
    assert "expected an OPC UA node id" in str(caught.value)


def test_missing_device_params_are_reported_at_the_device(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(
            write_config(
                tmp_path,
                "opc.tcp://127.0.0.1:4840/x",
                devices={"circuit-1": {"profile": "opcua-cabinet-circuit"}},
            ),
            DRIVERS,
        )
    message = str(caught.value)
    assert str(tmp_path / "gateway.toml") in message
    assert "{circuit}" in message and "params" in message


@given(st.text(max_size=60))
def test_node_id_and_browse_path_parsers_fail_only_with_value_error(text: str) -> None:
    for parse in (parse_node_id, parse_browse_path):
        with contextlib.suppress(ValueError):
            parse(text)


@given(st.sampled_from(["i", "s"]), st.integers(0, 5), st.integers(1, 10**6))
def test_node_id_round_trip(kind: str, namespace: int, number: int) -> None:
    identifier = str(number) if kind == "i" else f"Cabinet.P{number}"
    node = parse_node_id(f"ns={namespace};{kind}={identifier}")
    assert node.NamespaceIndex == namespace
    assert str(node.Identifier) == identifier


# ------------------------------------------------------------------ values and status codes


POINT = PointSpec("p", "V", False, None, ConfigTable({}, file="x.toml"))
SOURCE = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
SERVER = SOURCE + dt.timedelta(seconds=1)


def _data(value: Any, status: int = 0, *, source: bool = True, server: bool = True) -> ua.DataValue:
    return ua.DataValue(
        ua.Variant(value),
        StatusCode=ua.StatusCode(ua.UInt32(status)),
        SourceTimestamp=SOURCE if source else None,
        ServerTimestamp=SERVER if server else None,
    )


def test_status_codes_give_the_quality_and_timestamps_are_kept() -> None:
    good = to_reading("d", POINT, _data(231.5), 1)
    assert (good.value, good.quality, good.ts_ms) == (
        231.5,
        Quality.GOOD,
        int(SOURCE.timestamp() * 1000),
    )
    uncertain = to_reading("d", POINT, _data(231.5, 0x40000000), 1)
    assert uncertain.quality is Quality.UNCERTAIN and uncertain.value == 231.5
    bad = to_reading("d", POINT, _data(231.5, 0x80000000), 1)
    assert bad.quality is Quality.BAD and bad.value is None
    server_time = to_reading("d", POINT, _data(1, source=False), 1)
    assert server_time.ts_ms == int(SERVER.timestamp() * 1000)
    received = to_reading("d", POINT, _data(1, source=False, server=False), 1234)
    assert received.ts_ms == 1234


def test_values_are_converted_or_marked_bad() -> None:
    stamp = to_reading("d", POINT, _data(SOURCE), 1)
    assert stamp.value == "2026-11-28T12:00:00Z"
    text = to_reading("d", POINT, _data(ua.LocalizedText("on")), 1)
    assert text.value == "on"
    assert to_reading("d", POINT, _data(math.nan), 1).quality is Quality.BAD
    assert to_reading("d", POINT, _data(b"\x00\x01"), 1).quality is Quality.BAD
    assert to_reading("d", POINT, _data([1, 2, 3]), 1).quality is Quality.BAD


@given(
    st.one_of(
        st.booleans(),
        st.integers(-(2**31), 2**31 - 1),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=20),
    ),
    st.sampled_from([0, 0x40000000, 0x80000000, 0x80340000, 0x408F0000]),
)
def test_to_reading_never_raises_and_bad_means_no_value(value: Any, status: int) -> None:
    reading = to_reading("d", POINT, _data(value, status), 1)
    if reading.quality is Quality.BAD:
        assert reading.value is None
    else:
        assert reading.value == value


def test_the_shipped_example_configuration_loads() -> None:
    from tests.e2e import REPO

    config = load_config(REPO / "config" / "examples" / "cabinet-opcua.toml", DRIVERS)
    assert config.buses["plc"].driver == "opcua"
    circuits = [d for d in config.devices.values() if d.profile.name == "opcua-cabinet-circuit"]
    assert len(circuits) == 2


def test_deadband_keeps_small_changes_off_the_uplink(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "meter.toml").write_text(
        "\n".join(
            [
                "[profile]",
                'driver = "opcua"',
                "[points.calm]",
                'unit = "V"',
                'node = "ns=2;s=Cabinet.Voltage.L1"',
                "deadband = 50.0",
                "[points.every]",
                'unit = "V"',
                'node = "ns=2;s=Cabinet.Voltage.L2"',
            ]
        )
    )

    async def body() -> None:
        async with simulator(tmp_path) as sim:
            driver, context = _driver(
                tmp_path, sim.endpoint, profile_dirs=[profiles], devices={"m": {"profile": "meter"}}
            )

            def count(point: str) -> int:
                return sum(1 for r in context.readings if r.point == point)

            task = await _run_until(driver, lambda: count("calm") and count("every"), "values")
            try:
                for _ in range(4):  # each tick moves every voltage by up to ±3 V
                    await sim.tick()
                    await asyncio.sleep(0.3)
                await WAIT.until(lambda: count("every") >= 4, "small changes of L2")
                assert count("calm") == 1  # only its initial value: no change beat 50 V
            finally:
                await _stop(driver, task)

    asyncio.run(body())


def _password_file(directory: Path, password: str) -> Path:
    path = directory / "plc-password"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path


def test_user_name_identity_is_sent_and_a_wrong_password_is_refused(tmp_path: Path) -> None:
    async def body() -> None:
        async with simulator(tmp_path, users={"lampyre": "s3cret"}, allow_anonymous=False) as sim:
            bus = {
                "identity": "username",
                "username": "lampyre",
                "password_file": str(_password_file(tmp_path, "s3cret")),
            }
            driver, context = _driver(tmp_path, sim.endpoint, bus=bus)
            task = await _run_until(driver, lambda: bool(context.readings), "values")
            await _stop(driver, task)
            assert sim.logins == ["user:lampyre"]
            _password_file(tmp_path, "guess")
            driver, _ = _driver(tmp_path, sim.endpoint, bus=bus)
            with pytest.raises(BusUnavailable, match="refused the user name or password"):
                await driver.connect()
            assert len(sim.rejected_logins) == 1 and sim.logins == ["user:lampyre"]

    asyncio.run(body())


def test_a_password_file_others_can_read_is_refused(tmp_path: Path) -> None:
    async def body() -> None:
        async with simulator(tmp_path, users={"lampyre": "s3cret"}) as sim:
            path = _password_file(tmp_path, "s3cret")
            path.chmod(0o644)
            bus = {"identity": "username", "username": "lampyre", "password_file": str(path)}
            driver, _ = _driver(tmp_path, sim.endpoint, bus=bus)
            with pytest.raises(BusUnavailable, match="chmod 600"):
                await driver.connect()
            assert sim.logins == []

    asyncio.run(body())


def test_user_certificate_identity(tmp_path: Path) -> None:
    from drivers.opcua.security import ensure_client_certificate

    user_cert, user_key = ensure_client_certificate(
        tmp_path / "user" / "operator.der",
        tmp_path / "user" / "operator-key.pem",
        application_uri="urn:lampyre:test:operator",
        common_name="cabinet operator",
    )

    async def body() -> None:
        async with simulator(
            tmp_path, user_certificates=[user_cert.read_bytes()], allow_anonymous=False
        ) as sim:
            bus = {
                "identity": "certificate",
                "user_certificate": str(user_cert),
                "user_private_key": str(user_key),
            }
            driver, context = _driver(tmp_path, sim.endpoint, bus=bus)
            task = await _run_until(driver, lambda: bool(context.readings), "values")
            await _stop(driver, task)
            assert len(sim.logins) == 1 and sim.logins[0].startswith("cert:")
            assert "cabinet operator" in sim.logins[0]

    asyncio.run(body())
