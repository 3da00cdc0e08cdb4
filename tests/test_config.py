"""Gateway configuration: a valid file loads; every mistake is reported with its file and line."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cli import main
from agent.config import (
    BUFFER_SPEC,
    BUS_SPEC,
    CIRCUIT_SPEC,
    COMMANDS_SPEC,
    CONFIG_SPEC,
    DEVICE_SPEC,
    GATEWAY_SPEC,
    HUB_SPEC,
    KEYS_SPEC,
    POINT_SPEC,
    PROFILE_HEAD_SPEC,
    PROFILE_SPEC,
    TLS_SPEC,
    ConfigErrors,
    GatewayConfig,
    TableSpec,
    config_schema,
    load_config,
    load_profile,
    profile_schema,
    schema_json,
)
from agent.mqtt import TlsSettings
from agent.sdk import (
    BusHealth,
    BusSpec,
    ConfigError,
    DeviceSpec,
    Driver,
    PointRole,
    PointSpec,
    Reading,
)
from agent.tomlmap import line_count

REPO = Path(__file__).resolve().parent.parent


class FakeDriver(Driver):
    """A driver with a few keys of its own; only its validation class methods are used."""

    name = "fake"

    @classmethod
    def validate_bus(cls, bus: BusSpec) -> None:
        bus.options.check_keys(["endpoint"])
        bus.options.get_str("endpoint")

    @classmethod
    def validate_point(cls, point: PointSpec) -> None:
        point.options.check_keys(["channel"])
        point.options.get_int("channel", minimum=0)

    @classmethod
    def validate_device(cls, device: DeviceSpec) -> None:
        device.options.check_keys(["address"])
        device.options.get_int("address", minimum=0, maximum=63)

    async def connect(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        return

    async def read(self, device: DeviceSpec, points: Sequence[PointSpec]) -> list[Reading]:
        raise NotImplementedError

    async def write(
        self,
        device: DeviceSpec,
        point: PointSpec,
        value: float | int | bool,
        *,
        fade_s: float | None = None,
    ) -> None:
        raise NotImplementedError

    def health(self) -> BusHealth:
        return BusHealth()


class OtherDriver(FakeDriver):
    name = "other"


class BuggyDriver(FakeDriver):
    """A vendor driver with a bug in its validation."""

    name = "buggy"

    @classmethod
    def validate_bus(cls, bus: BusSpec) -> None:
        raise KeyError("oops")


DRIVERS: dict[str, type[Driver]] = {"fake": FakeDriver, "other": OtherDriver, "buggy": BuggyDriver}

CONFIG = """\
[gateway]
id = "cab-1"

[hub]
host = "127.0.0.1"
port = 1883
keepalive_s = 30

[buffer]
path = "var/buffer.db"

[buses.line-1]
driver = "fake"
endpoint = "sim"

[devices.lamp-1]
bus = "line-1"
profile = "lamp"
poll_interval_s = 2.0
address = 1

[devices.lamp-2]
bus = "line-1"
profile = "lamp"
address = 2

[groups]
street = ["lamp-1", "lamp-2"]
"""

PROFILE = """\
[profile]
name = "lamp"
driver = "fake"
description = "test lamp"

[points.level]
unit = "%"
writable = true
role = "dim_level"
channel = 0

[points.actual]
unit = "%"
role = "actual_level"
channel = 1

[points.power]
unit = "W"
channel = 2
"""

OTHER_PROFILE = """\
[profile]
driver = "other"

[points.level]
writable = true
role = "dim_level"
channel = 0
"""


@dataclass
class Setup:
    folder: Path
    config: Path
    profile: Path

    def write(self, config: str | None = None, profile: str | None = None) -> None:
        if config is not None:
            self.config.write_text(config, encoding="utf-8")
        if profile is not None:
            self.profile.write_text(profile, encoding="utf-8")

    def secret(self, name: str, mode: int, text: str = "secret\n") -> Path:
        path = self.folder / name
        path.write_text(text, encoding="utf-8")
        path.chmod(mode)
        return path


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    (tmp_path / "profiles").mkdir()
    result = Setup(tmp_path, tmp_path / "cab.toml", tmp_path / "profiles" / "lamp.toml")
    result.write(CONFIG, PROFILE)
    (tmp_path / "profiles" / "other-lamp.toml").write_text(OTHER_PROFILE, encoding="utf-8")
    return result


def errors_of(path: Path) -> list[ConfigError]:
    with pytest.raises(ConfigErrors) as caught:
        load_config(path, drivers=DRIVERS)
    return caught.value.errors


def line_of(path: Path, marker: str) -> int:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if marker in line:
            return number
    raise AssertionError(f"{marker!r} not in {path}")


# --------------------------------------------------------------------------------------------
# A valid configuration.
# --------------------------------------------------------------------------------------------


def test_valid_config_loads(setup: Setup) -> None:
    config = load_config(setup.config, drivers=DRIVERS)
    assert isinstance(config, GatewayConfig)
    assert config.file == setup.config
    assert config.gateway_id == "cab-1"
    assert config.hub.prefix == "lampyre/v1"
    assert config.hub.max_inflight == 64
    mqtt = config.hub.mqtt
    assert (mqtt.host, mqtt.port, mqtt.keepalive_s) == ("127.0.0.1", 1883, 30)
    assert mqtt.client_id == "lampyre-cab-1"
    assert mqtt.username is None and mqtt.password_file is None and mqtt.tls is None
    assert config.buffer.path == setup.folder / "var" / "buffer.db"
    assert config.buffer.key_file == setup.folder / "var" / "buffer.db.key"
    assert config.buffer.max_bytes == 64 * 1024 * 1024
    assert config.buffer.batch_max_readings == 200
    assert config.buffer.batch_max_delay_s == 1.0
    assert list(config.buses) == ["line-1"]
    assert config.buses["line-1"].driver == "fake"
    assert dict(config.buses["line-1"].options) == {"endpoint": "sim"}
    assert list(config.devices) == ["lamp-1", "lamp-2"]
    lamp1, lamp2 = config.devices["lamp-1"], config.devices["lamp-2"]
    assert (lamp1.bus, lamp1.poll_interval_s, dict(lamp1.options)) == (
        "line-1",
        2.0,
        {"address": 1},
    )
    assert lamp2.poll_interval_s == 10.0
    # One profile file, loaded once, shared by the devices that use it.
    assert lamp1.profile is lamp2.profile
    profile = lamp1.profile
    assert (profile.name, profile.driver, profile.description) == ("lamp", "fake", "test lamp")
    assert profile.file == str(setup.profile)
    assert list(profile.points) == ["level", "actual", "power"]
    level = profile.points["level"]
    assert (level.unit, level.writable, level.role) == ("%", True, PointRole.DIM_LEVEL)
    assert dict(level.options) == {"channel": 0}
    assert level.options.where("channel").line == line_of(setup.profile, "channel = 0")
    assert profile.points["power"].role is None and not profile.points["power"].writable
    assert profile.point_with_role(PointRole.ACTUAL_LEVEL) is profile.points["actual"]
    assert dict(config.groups) == {"street": ("lamp-1", "lamp-2")}
    assert dict(config.drivers) == {"fake": FakeDriver}


def test_defaults_of_an_almost_empty_config(tmp_path: Path) -> None:
    path = tmp_path / "min.toml"
    path.write_text('[gateway]\nid = "g"\n', encoding="utf-8")
    config = load_config(path, drivers=DRIVERS)
    assert config.buffer.path == tmp_path / "buffer.db"
    assert config.buffer.key_file == tmp_path / "buffer.db.key"
    assert config.hub.mqtt.host == "127.0.0.1" and config.hub.mqtt.port == 1883
    assert (dict(config.buses), dict(config.devices), dict(config.groups)) == ({}, {}, {})


def test_tls_and_credentials(setup: Setup) -> None:
    setup.secret("ca.pem", 0o644)
    setup.secret("client.pem", 0o644)
    setup.secret("client.key", 0o600)
    setup.secret("mqtt.password", 0o600)
    text = CONFIG.replace(
        "keepalive_s = 30\n",
        'keepalive_s = 30\nusername = "cab-1"\npassword_file = "mqtt.password"\n'
        'client_id = "custom"\n[hub.tls]\nca_file = "ca.pem"\ncert_file = "client.pem"\n'
        'key_file = "client.key"\n',
    )
    setup.write(text)
    mqtt = load_config(setup.config, drivers=DRIVERS).hub.mqtt
    assert mqtt.client_id == "custom"
    assert mqtt.username == "cab-1"
    assert mqtt.password_file == setup.folder / "mqtt.password"
    assert mqtt.tls == TlsSettings(
        ca_file=setup.folder / "ca.pem",
        cert_file=setup.folder / "client.pem",
        key_file=setup.folder / "client.key",
    )
    # A disabled TLS table is not used, and its files are not needed.
    setup.write(text.replace('ca_file = "ca.pem"', 'enabled = false\nca_file = "absent.pem"'))
    assert load_config(setup.config, drivers=DRIVERS).hub.mqtt.tls is None


def test_paths_are_relative_to_the_config_folder(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(setup.folder.parent)
    typed = f"./{setup.folder.name}/cab.toml"
    config = load_config(typed, drivers=DRIVERS)
    assert config.buffer.path == setup.folder / "var" / "buffer.db"
    assert config.buffer.path.is_absolute()
    setup.write(CONFIG.replace('id = "cab-1"', 'id = "cab 1"'))
    with pytest.raises(ConfigErrors) as caught:
        load_config(typed, drivers=DRIVERS)
    errors = caught.value.errors
    assert str(errors[0]).startswith(f"{typed}:2: gateway.id: expected an id")


def test_profile_by_path_and_several_profile_dirs(setup: Setup) -> None:
    (setup.folder / "vendor").mkdir()
    (setup.folder / "vendor" / "acme.toml").write_text(
        PROFILE.replace('name = "lamp"', 'name = "acme"'), encoding="utf-8"
    )
    text = CONFIG.replace('id = "cab-1"', 'id = "cab-1"\nprofile_dirs = ["vendor", "profiles"]')
    text = text.replace('profile = "lamp"\naddress = 2', 'profile = "acme"\naddress = 2')
    text = text.replace('profile = "lamp"\npoll', 'profile = "vendor/acme.toml"\npoll')
    setup.write(text)
    config = load_config(setup.config, drivers=DRIVERS)
    assert config.devices["lamp-1"].profile is config.devices["lamp-2"].profile
    assert config.devices["lamp-1"].profile.name == "acme"


def test_load_profile_alone(setup: Setup) -> None:
    assert list(load_profile(setup.profile, drivers=DRIVERS).points) == ["level", "actual", "power"]
    setup.write(profile=PROFILE.replace("channel = 1", "channel = -1"))
    with pytest.raises(ConfigErrors) as caught:
        load_profile(setup.profile, drivers=DRIVERS)
    (error,) = caught.value.errors
    assert error.where is not None
    assert error.where.line == line_of(setup.profile, "channel = -1")


# --------------------------------------------------------------------------------------------
# Each kind of error names the right file and line.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    old: str
    new: str
    marker: str
    fragment: str
    in_profile: bool = False
    files: tuple[tuple[str, int], ...] = ()
    """Files to create next to the config: (name, mode)."""


CASES = [
    # A missing table is reported at line 1 (the marker "" matches the first line).
    Case("missing gateway table", '[gateway]\nid = "cab-1"\n', "", "", "missing table [gateway]"),
    Case("missing gateway id", 'id = "cab-1"\n', "", "[gateway]", "[gateway]: missing key 'id'"),
    Case("wrong type", "port = 1883", 'port = "1883"', "port =", "hub.port: expected an integer"),
    Case("out of range", "port = 1883", "port = 70000", "port =", "from 1 to 65535, got 70000"),
    Case("unknown key", "keepalive_s = 30", "keep_alive_s = 30", "keep_alive", "unknown key"),
    Case("unknown table", "[buffer]", "[bufer]", "[bufer]", "bufer: unknown key; expected one of"),
    Case("bad gateway id", 'id = "cab-1"', 'id = "cab/1"', "id =", "gateway.id: expected an id"),
    Case("bad device id", "[devices.lamp-2]", '[devices."lamp 2"]', "lamp 2", "expected an id"),
    Case("bad bus id", "[buses.line-1]", '[buses."line.1"]', "[buses", "expected an id"),
    Case(
        "unknown bus",
        'bus = "line-1"\nprofile = "lamp"\naddress',
        'bus = "line-9"\nprofile = "lamp"\naddress',
        'bus = "line-9"',
        "unknown bus 'line-9'; expected one of: line-1",
    ),
    Case(
        "missing profile",
        'profile = "lamp"\naddress',
        'profile = "lampe"\naddress',
        "lampe",
        "profile 'lampe' not found; searched: ",
    ),
    Case(
        "missing profile path",
        'profile = "lamp"\naddress',
        'profile = "nowhere/x.toml"\naddress',
        "nowhere",
        "profile 'nowhere/x.toml' not found",
    ),
    Case(
        "bad profile name",
        'profile = "lamp"\naddress',
        'profile = "../lamp"\naddress',
        "../lamp",
        "expected a profile name",
    ),
    Case(
        "profile driver mismatch",
        'profile = "lamp"\naddress',
        'profile = "other-lamp"\naddress',
        "other-lamp",
        "is for driver 'other' but bus 'line-1' uses driver 'fake'",
    ),
    Case(
        "duplicate role",
        'unit = "W"',
        'unit = "W"\nwritable = true\nrole = "dim_level"  # again',
        "# again",
        "role 'dim_level' is already taken by point 'level'",
        in_profile=True,
    ),
    Case(
        "dim level not writable",
        "writable = true\n",
        "",
        'role = "dim_level"',
        "a dim_level point must be writable",
        in_profile=True,
    ),
    Case(
        "bad role",
        'role = "actual_level"',
        'role = "actual"',
        'role = "actual"',
        "expected one of",
        in_profile=True,
    ),
    Case(
        "bad point name",
        "[points.power]",
        "[points.Power]",
        "[points.Power]",
        "a point name",
        in_profile=True,
    ),
    Case(
        "profile name is not the stem",
        'name = "lamp"',
        'name = "lamp2"',
        'name = "lamp2"',
        "expected the file's stem 'lamp'",
        in_profile=True,
    ),
    Case(
        "unknown profile key",
        'description = "test lamp"',
        'descr = "x"',
        "descr",
        "unknown key",
        in_profile=True,
    ),
    Case(
        "profile syntax error",
        "channel = 1",
        "channel = ",
        "channel = \n",
        "invalid TOML",
        in_profile=True,
    ),
    Case(
        "profile without points",
        PROFILE[PROFILE.index("[points.level]") :],
        "[points]\n",
        "[points]",
        "expected at least one point",
        in_profile=True,
    ),
    Case(
        "driver-specific point key",
        "channel = 2",
        "channel = -2",
        "channel = -2",
        "points.power.channel: expected a value of at least 0",
        in_profile=True,
    ),
    Case(
        "unknown driver of a profile",
        'driver = "fake"',
        'driver = "dali"',
        'driver = "dali"',
        "unknown driver 'dali'; installed drivers: buggy, fake, other",
        in_profile=True,
    ),
    Case(
        "bad group member",
        'street = ["lamp-1", "lamp-2"]',
        'street = ["lamp-1", "lamp-3"]',
        "street =",
        "unknown device 'lamp-3'",
    ),
    Case(
        "group listing a device twice",
        'street = ["lamp-1", "lamp-2"]',
        'street = ["lamp-1", "lamp-1"]',
        "street =",
        "expected each item once",
    ),
    Case(
        "group not a list",
        'street = ["lamp-1", "lamp-2"]',
        'street = "lamp-1"',
        "street =",
        "expected a list of strings",
    ),
    Case(
        "empty group",
        'street = ["lamp-1", "lamp-2"]',
        "street = []",
        "street =",
        "expected at least 1",
    ),
    Case("syntax error", "port = 1883", "port = = 1883", "port = =", "invalid TOML"),
    Case("duplicate key", "port = 1883", "port = 1883\nport = 1884", "port = 1884", "invalid TOML"),
    Case(
        "unknown driver",
        'driver = "fake"',
        'driver = "dali"',
        'driver = "dali"',
        "buses.line-1.driver: unknown driver 'dali'; installed drivers: buggy, fake, other",
    ),
    Case("driver bug", 'driver = "fake"', 'driver = "buggy"', "[buses.line-1]", "KeyError('oops')"),
    Case(
        "driver-specific bus key",
        'endpoint = "sim"',
        'endpoint = "sim"\nbaud = 9600',
        "baud",
        "buses.line-1.baud: unknown key; expected one of: endpoint",
    ),
    Case(
        "driver-specific device value",
        "address = 2",
        "address = 99",
        "address = 99",
        "devices.lamp-2.address: expected a value from 0 to 63, got 99",
    ),
    Case(
        "poll interval not positive",
        "poll_interval_s = 2.0",
        "poll_interval_s = 0",
        "poll_interval_s",
        "expected a number above 0.0",
    ),
    Case("prefix wildcard", "keepalive_s = 30", 'prefix = "a/+/b"', "prefix", "MQTT topic prefix"),
    Case("prefix empty level", "keepalive_s = 30", 'prefix = "a//b"', "prefix", "none empty"),
    Case("buffer too small", 'path = "var/buffer.db"', "max_bytes = 1024", "max_bytes", "65536"),
    Case(
        "TLS cert without key",
        "keepalive_s = 30",
        'keepalive_s = 30\n[hub.tls]\ncert_file = "client.pem"',
        "cert_file",
        "hub.tls.cert_file: needs 'key_file' in the same table",
        files=(("client.pem", 0o644),),
    ),
    Case(
        "TLS CA file missing",
        "keepalive_s = 30",
        'keepalive_s = 30\n[hub.tls]\nca_file = "ca.pem"',
        "ca_file",
        "hub.tls.ca_file: expected an existing file",
    ),
    Case(
        "TLS key readable by others",
        "keepalive_s = 30",
        '[hub.tls]\ncert_file = "client.pem"\nkey_file = "client.key"',
        "key_file",
        "(mode 0644); expected mode 0600",
        files=(("client.pem", 0o644), ("client.key", 0o644)),
    ),
    Case(
        "tls not a table",
        "keepalive_s = 30",
        "tls = true",
        "tls = true",
        "hub.tls: expected a table",
    ),
    Case(
        "password file 0644",
        "keepalive_s = 30",
        'username = "u"\npassword_file = "mqtt.password"',
        "password_file",
        "hub.password_file: ",
        files=(("mqtt.password", 0o644),),
    ),
    Case(
        "password file missing",
        "keepalive_s = 30",
        'username = "u"\npassword_file = "mqtt.password"',
        "password_file",
        "not found",
    ),
    Case(
        "password without username",
        "keepalive_s = 30",
        'password_file = "mqtt.password"',
        "password_file",
        "needs 'username'",
        files=(("mqtt.password", 0o600),),
    ),
    Case(
        "buffer key readable by others",
        'path = "var/buffer.db"',
        'path = "var/buffer.db"\nkey_file = "buffer.key"',
        "key_file",
        "buffer.key_file: ",
        files=(("buffer.key", 0o640),),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_error_names_file_and_line(setup: Setup, case: Case) -> None:
    target = setup.profile if case.in_profile else setup.config
    text = target.read_text(encoding="utf-8")
    assert case.old in text, "the case must change something"
    target.write_text(text.replace(case.old, case.new, 1), encoding="utf-8")
    for name, mode in case.files:
        setup.secret(name, mode)
    errors = errors_of(setup.config)
    if case.marker.endswith("\n"):
        line = line_count(target.read_text(encoding="utf-8").split(case.marker)[0] + "x")
    else:
        line = line_of(target, case.marker)
    wanted = f"{target}:{line}: "
    matching = [e for e in errors if str(e).startswith(wanted) and case.fragment in str(e)]
    assert matching, "\n".join(map(str, errors))
    for error in errors:
        assert error.where is not None and error.where.line is not None, error


def test_password_file_mode_message(setup: Setup) -> None:
    setup.secret("mqtt.password", 0o644)
    setup.write(
        CONFIG.replace("keepalive_s = 30", 'username = "u"\npassword_file = "mqtt.password"')
    )
    (error,) = errors_of(setup.config)
    password = setup.folder / "mqtt.password"
    assert error.message == (
        f"hub.password_file: {password} is accessible by group or others (mode 0644); "
        "expected mode 0600 (chmod 600)"
    )
    assert "secret" not in str(error)


def test_several_errors_reported_together_in_file_order(setup: Setup) -> None:
    text = (
        CONFIG.replace('id = "cab-1"', 'id = ""')
        .replace("port = 1883", "port = true")
        .replace('[devices.lamp-1]\nbus = "line-1"', '[devices.lamp-1]\nbus = "line-2"')
        .replace("address = 2", "address = 64")
        .replace('path = "var/buffer.db"', 'path = "var/buffer.db"\nkey_file = "buffer.key"')
        .replace('street = ["lamp-1", "lamp-2"]', 'street = ["lamp-1", "lamp-x"]')
    )
    setup.write(text)
    setup.secret("buffer.key", 0o644)
    with pytest.raises(ConfigErrors) as caught:
        load_config(setup.config, drivers=DRIVERS)
    errors = caught.value.errors
    lines = [e.where.line for e in errors if e.where is not None]
    assert lines == [
        line_of(setup.config, 'id = ""'),
        line_of(setup.config, "port = true"),
        line_of(setup.config, 'key_file = "buffer.key"'),
        line_of(setup.config, 'bus = "line-2"'),
        line_of(setup.config, "address = 64"),
        line_of(setup.config, "street ="),
    ]
    assert str(caught.value) == "\n".join(str(e) for e in errors)
    assert isinstance(caught.value, ConfigError)


def test_an_invalid_profile_is_reported_once(setup: Setup) -> None:
    setup.write(profile=PROFILE.replace("channel = 1", "channel = -1"))
    errors = errors_of(setup.config)
    assert [str(e).split(": ")[0] for e in errors] == [
        f"{setup.profile}:{line_of(setup.profile, 'channel = -1')}"
    ]


def test_unreadable_config_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "absent.toml", drivers=DRIVERS)


# --------------------------------------------------------------------------------------------
# Property: corrupted files never fail with anything but located ConfigErrors.
# --------------------------------------------------------------------------------------------

OTHER_VALUES = [
    '"text"',
    "42",
    "-1",
    "0",
    "3.5",
    "true",
    "[1, 2]",
    "[]",
    '["lamp-1"]',
    "{ a = 1 }",
    "1979-05-27",
    '"../x.toml"',
    '"profiles"',
    '"other-lamp"',
    '""',
    "nan",
    '"line-1"',
]


@st.composite
def corruptions(draw: st.DrawFn, lines: list[str]) -> list[str]:
    result = list(lines)
    for _ in range(draw(st.integers(1, 3))):
        index = draw(st.integers(0, len(result) - 1)) if result else 0
        action = draw(st.sampled_from(["drop", "duplicate", "retype", "insert"]))
        if action == "drop" and result:
            del result[index]
        elif action == "duplicate" and result:
            result.insert(index, result[index])
        elif action == "retype" and result and " = " in result[index]:
            key = result[index].split(" = ", 1)[0]
            result[index] = f"{key} = {draw(st.sampled_from(OTHER_VALUES))}"
        else:
            printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
            result.insert(index, draw(printable))
    return result


def test_corrupted_configs_fail_only_with_located_errors(setup: Setup) -> None:
    lines = CONFIG.splitlines()
    texts = {setup.profile: PROFILE}

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(corrupted=corruptions(lines))
    def check(corrupted: list[str]) -> None:
        text = "\n".join(corrupted) + "\n"
        setup.write(text)
        texts[setup.config] = text
        try:
            load_config(setup.config, drivers=DRIVERS)
        except ConfigErrors as exc:
            assert exc.errors
            for error in exc.errors:
                assert error.where is not None, error
                assert error.where.line is not None, error
                file = Path(error.where.file)
                assert file in texts, error
                assert 1 <= error.where.line <= line_count(texts[file]), error

    check()


# --------------------------------------------------------------------------------------------
# Schemas, documentation and the command line.
# --------------------------------------------------------------------------------------------


def test_committed_schemas_are_up_to_date() -> None:
    schema_dir = REPO / "config" / "schema"
    assert (schema_dir / "lampyre-config.schema.json").read_text(encoding="utf-8") == schema_json()
    assert (schema_dir / "profile.schema.json").read_text(encoding="utf-8") == schema_json(
        profile=True
    )


def test_schema_describes_the_declared_fields() -> None:
    schema = config_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["required"] == ["gateway"]
    assert schema["additionalProperties"] is False
    hub = schema["properties"]["hub"]
    assert hub["properties"]["port"] == {
        "description": HUB_SPEC.field("port").description,
        "type": "integer",
        "minimum": 1,
        "maximum": 65535,
        "default": 1883,
    }
    assert hub["properties"]["tls"]["dependentRequired"] == {
        "cert_file": ["key_file"],
        "key_file": ["cert_file"],
    }
    bus = schema["properties"]["buses"]["additionalProperties"]
    assert bus["required"] == ["driver"]
    assert "validated by the driver" in bus["additionalProperties"]["description"]
    gateway_id = re.compile(schema["properties"]["gateway"]["properties"]["id"]["pattern"])
    assert gateway_id.match("cab-0042") and not gateway_id.match("cab 0042")
    prefix = re.compile(hub["properties"]["prefix"]["pattern"])
    assert prefix.match("lampyre/v1")
    assert not any(prefix.match(p) for p in ("a/+/b", "a/#", "a//b", "/a", "a/", "$SYS/x"))
    point = profile_schema()["properties"]["points"]["additionalProperties"]
    assert point["properties"]["role"]["enum"] == [
        "dim_level",
        "actual_level",
        "lamp_failure",
        "switch",
        "switch_state",
    ]


def _declared_fields(spec: TableSpec) -> list[str]:
    names = []
    for field in spec.fields:
        names.append(field.name)
        if field.table is not None:
            names.extend(_declared_fields(field.table))
    return names


def test_every_declared_key_is_documented() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    specs = [CONFIG_SPEC, GATEWAY_SPEC, HUB_SPEC, TLS_SPEC, BUFFER_SPEC, BUS_SPEC, DEVICE_SPEC]
    specs += [CIRCUIT_SPEC, KEYS_SPEC, COMMANDS_SPEC]
    specs += [PROFILE_SPEC, PROFILE_HEAD_SPEC, POINT_SPEC]
    for spec in specs:
        for name in _declared_fields(spec):
            assert f"`{name}`" in doc, name


def test_cli_check_config_ok(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    assert main(["check-config", "config/demo.toml"]) == 0
    out = capsys.readouterr()
    assert out.out == (
        "OK: config/demo.toml — gateway demo-cabinet, 1 buses, 5 devices, 2 groups\n"
    )
    assert out.err == ""


def test_cli_check_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[gateway]\nid = "a b"\n\n[buses.x]\ndriver = "nonesuch"\n', encoding="utf-8")
    assert main(["check-config", str(path)]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.splitlines()
    assert lines[0].startswith(f"{path}:2: gateway.id: expected an id")
    assert lines[1].startswith(f"{path}:5: buses.x.driver: unknown driver 'nonesuch'")
    assert "modbus" in lines[1]  # the installed drivers are listed
    assert len(lines) == 2


def test_cli_check_config_unreadable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(tmp_path / "absent.toml")]) == 2
    assert "cannot read the file" in capsys.readouterr().err
    assert main(["check-config", str(tmp_path)]) == 2


def test_cli_config_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config-schema"]) == 0
    assert json.loads(capsys.readouterr().out) == config_schema()
    assert main(["config-schema", "--profile"]) == 0
    assert json.loads(capsys.readouterr().out) == profile_schema()


def test_cli_without_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "check-config" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# What ships: every sample config and profile passes with the installed (real) drivers.
# --------------------------------------------------------------------------------------------

SHIPPED_CONFIGS = [
    REPO / "config" / "demo.toml",
    *sorted((REPO / "config" / "examples").glob("*.toml")),
]
SHIPPED_PROFILES = sorted((REPO / "config" / "profiles").glob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_valid(path: Path) -> None:
    config = load_config(path)
    assert config.devices
    assert all(bus.driver in config.drivers for bus in config.buses.values())


@pytest.mark.parametrize("path", SHIPPED_PROFILES, ids=lambda p: p.name)
def test_shipped_profile_is_valid(path: Path) -> None:
    assert load_profile(path).points


def test_shipped_files_exist() -> None:
    assert len(SHIPPED_CONFIGS) >= 2
    assert {p.stem for p in SHIPPED_PROFILES} >= {"lamp-controller", "sdm630"}


def test_demo_config_matches_the_demo_layout() -> None:
    config = load_config(REPO / "config" / "demo.toml")
    assert config.gateway_id == "demo-cabinet"
    assert (config.hub.mqtt.host, config.hub.mqtt.port) == ("127.0.0.1", 1883)
    assert config.buffer.path.resolve() == (REPO / "var" / "demo" / "buffer.db").resolve()
    units = {
        d.id: (d.options["unit"], d.profile.name, d.poll_interval_s)
        for d in config.devices.values()
    }
    assert units == {
        "lamp-1": (1, "lamp-controller", 2.0),
        "lamp-2": (2, "lamp-controller", 2.0),
        "lamp-3": (3, "lamp-controller", 2.0),
        "lamp-4": (4, "lamp-controller", 2.0),
        "meter": (10, "sdm630", 5.0),
    }
    assert dict(config.groups) == {
        "street-1": ("lamp-1", "lamp-2", "lamp-3", "lamp-4"),
        "even": ("lamp-2", "lamp-4"),
    }
    assert os.fspath(config.file).endswith("demo.toml")


# --------------------------------------------------------------------------------------------
# Switched circuits.
# --------------------------------------------------------------------------------------------

CIRCUITS = """
[circuits.street-a]
device = "lamp-2"
point = "power"
"""


def test_circuits_name_a_device_point_and_list_what_they_feed(setup: Setup) -> None:
    text = setup.config.read_text(encoding="utf-8").replace(
        "[devices.lamp-1]\n", '[devices.lamp-1]\ncircuit = "street-a"\n'
    )
    setup.write(text + CIRCUITS)
    config = load_config(setup.config, drivers=DRIVERS)
    circuit = config.circuits["street-a"]
    assert (circuit.device, circuit.point, circuit.feeds) == ("lamp-2", "power", ("lamp-1",))
    # The core key does not reach the driver.
    assert "circuit" not in config.devices["lamp-1"].options


@pytest.mark.parametrize(
    ("replace", "marker", "expected"),
    [
        ('device = "lamp-2"', 'device = "lamp-9"', "unknown device 'lamp-9'"),
        ('point = "power"', 'point = "volts"', "has no point 'volts'; expected one of"),
        ("", 'circuit = "nowhere"', "unknown circuit 'nowhere'"),
    ],
)
def test_circuit_errors_name_file_and_line(
    setup: Setup, replace: str, marker: str, expected: str
) -> None:
    circuits = CIRCUITS.replace(replace, marker) if replace else CIRCUITS
    text = setup.config.read_text(encoding="utf-8")
    if not replace:
        text = text.replace("[devices.lamp-1]\n", f"[devices.lamp-1]\n{marker}\n")
    setup.write(text + circuits)
    (error,) = errors_of(setup.config)
    assert error.where is not None
    assert (error.where.file, error.where.line) == (
        str(setup.config),
        line_of(setup.config, marker),
    )
    assert expected in str(error)
