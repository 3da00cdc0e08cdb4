"""Generic point writes and switching by contactor: parsing, profile keys, and end to end.

The end-to-end tests run the real agent against the Modbus simulator over TCP and a real
Mosquitto. The cabinet controller is a :class:`MemoryDevice` whose contactor feedback contacts
follow their coils (unless jammed) and which has one write-only register, standing for a point
with no value to read (an OPC UA method point).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.commands import MAX_WRITE_INT, Command, Rejected, parse_command
from agent.config import ConfigErrors, load_config, load_profile
from agent.runtime import Agent
from agent.sdk import PointRole, now_ms
from firmware_sim.modbus import EnergyMeter, LampController, MemoryDevice, ModbusSimulator
from tests.e2e import PREFIX, Publisher, acks_for, command, payloads, validator, write_config
from tests.support.mosquitto import MosquittoBroker, Subscriber

NOW = 1_800_000_000_000
GATEWAY = "write-gw"
BASE = f"{PREFIX}/{GATEWAY}"
WAIT_S = 15.0
CABINET_UNITS = {"cab-1": 20, "cab-2": 21}
WRITE_ONLY_REGISTER = 6

CABINET_PROFILE = """\
# A cabinet controller: two contactors with feedback contacts, settings, a write-only register.
[profile]
name = "cabinet-ctl"
driver = "modbus"

[points.circuit1_command]
writable = true
role = "switch"
kind = "coil"
address = 0

[points.circuit1_feedback]
role = "switch_state"
kind = "discrete"
address = 0

[points.circuit2_command]
writable = true
read_back = "circuit2_feedback"
kind = "coil"
address = 1

[points.circuit2_feedback]
kind = "discrete"
address = 1

[points.aux_relay]
writable = true
kind = "coil"
address = 2

[points.lux_threshold]
unit = "lx"
writable = true
kind = "holding"
address = 0
type = "uint16"

[points.gain]
writable = true
kind = "holding"
address = 2
type = "float32"

[points.reset_counters]
writable = true
kind = "holding"
address = 6
type = "uint16"

[points.temperature]
unit = "°C"
kind = "input"
address = 0
type = "int16"
scale = 0.1
"""


# ------------------------------------------------------------------------------- parsing


def write(**overrides: Any) -> bytes:
    document: dict[str, Any] = {
        "id": "w-1",
        "action": "write",
        "target": {"device": "cab-1"},
        "point": "circuit2_command",
        "value": True,
        "expires": NOW + 60_000,
    }
    document.update(overrides)
    return json.dumps({k: v for k, v in document.items() if v is not ...}).encode()


@pytest.mark.parametrize("value", [True, False, 0, 150, -3, 0.25, 2**64 - 1, -(2**63)])
def test_a_write_carries_its_point_and_value(value: bool | float) -> None:
    parsed = parse_command(write(value=value), NOW)
    assert (parsed.action, parsed.point, parsed.level) == ("write", "circuit2_command", None)
    assert parsed.value == value and type(parsed.value) is type(value)
    assert parsed.requested == value


def test_switch_carries_the_state_as_a_boolean_and_the_level() -> None:
    on = parse_command(write(action="switch", point=..., value=..., state="on"), NOW)
    off = parse_command(write(action="switch", point=..., value=..., state="off"), NOW)
    assert (on.value, on.level, off.value, off.level) == (True, 100.0, False, 0.0)
    assert on.requested == 100.0


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (write(value="1"), "invalid_value"),
        (write(value=None), "invalid_value"),
        (write(value=...), "invalid_value"),
        (write(value=[1]), "invalid_value"),
        (write(value={"v": 1}), "invalid_value"),
        (write(value=2**64), "invalid_value"),
        (write(value=-(2**63) - 1), "invalid_value"),
        (write().replace(b"true", b"NaN"), "invalid_value"),
        (write().replace(b"true", b"-Infinity"), "invalid_value"),
        (write(point=...), "malformed"),
        (write(point=7), "malformed"),
        (write(point="Circuit 2"), "unknown_point"),
        (write(point=""), "unknown_point"),
        (write(level=40), "malformed"),
        (write(fade_s=1), "malformed"),
        (write(state="on"), "malformed"),
        (write(action="dim", value=..., level=40), "malformed"),
        (write(action="switch", value=..., state="on"), "malformed"),
        # A 400-digit level used to escape as OverflowError instead of a rejection.
        (write(action="dim", point=..., value=..., level=10**400), "invalid_level"),
    ],
)
def test_write_rejections_name_their_reason(payload: bytes, code: str) -> None:
    with pytest.raises(Rejected) as caught:
        parse_command(payload, NOW)
    assert caught.value.code == code
    assert caught.value.reason and len(caught.value.reason) < 200
    assert caught.value.command_id == "w-1"


CMD_SCHEMA = validator("cmd")
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=MAX_WRITE_INT - 2, max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.sampled_from(["dim", "switch", "write", "on", "off", "circuit2_command"]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "id": st.sampled_from(["w-1", "x"]) | json_values,
        "action": st.sampled_from(["dim", "switch", "write"]) | json_values,
        "target": st.sampled_from([{"device": "cab-1"}, {"all": True}]) | json_values,
        "expires": st.sampled_from([NOW + 1000]) | json_values,
        "point": st.sampled_from(["circuit2_command", "a", "A"]) | json_values,
        "value": json_values,
        "level": json_values,
        "state": st.sampled_from(["on", "off"]) | json_values,
        "fade_s": json_values,
    },
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(documents)
def test_random_documents_are_rejected_or_valid_commands(document: dict[str, Any]) -> None:
    payload = json.dumps(document).encode()
    try:
        parsed = parse_command(payload, NOW)
    except Rejected as rejection:
        assert rejection.code and rejection.reason
        return
    assert isinstance(parsed, Command)
    # What the agent accepts, the published schema accepts too.
    CMD_SCHEMA.validate(document)
    assert parsed.expires_ms > NOW
    if parsed.action == "write":
        assert parsed.point == document["point"] and parsed.level is None
        assert isinstance(parsed.value, bool | int | float)
        assert not isinstance(parsed.value, float) or math.isfinite(parsed.value)
        assert parsed.value == document["value"]
    else:
        assert parsed.level is not None and 0 <= parsed.level <= 100
        assert parsed.point is None


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.binary(max_size=120).map(
        lambda tail: (
            b'{"id":"w-1","action":"write","target":{"all":true},"point":"p",'
            b'"expires":1800000060000,"value":' + tail
        )
    )
)
def test_random_bytes_after_a_value_never_crash_the_parser(payload: bytes) -> None:
    try:
        parse_command(payload, NOW)
    except Rejected as rejection:
        assert rejection.code in ("malformed", "invalid_value")


# ------------------------------------------------------------------------- profile keys


def profile_file(tmp_path: Path, text: str, name: str = "box") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'[profile]\ndriver = "modbus"\n\n{text}', encoding="utf-8")
    return path


def test_read_back_and_the_switch_roles_load_into_the_profile(tmp_path: Path) -> None:
    profile = load_profile(profile_file(tmp_path, CABINET_PROFILE.split("\n\n", 1)[1]))
    command_point = profile.points["circuit2_command"]
    assert command_point.read_back == "circuit2_feedback"
    assert profile.points["aux_relay"].read_back is None
    assert profile.point_with_role(PointRole.SWITCH) is profile.points["circuit1_command"]
    assert profile.point_with_role(PointRole.SWITCH_STATE) is profile.points["circuit1_feedback"]
    # The core key is not handed to the driver as an option.
    assert "read_back" not in command_point.options


def test_read_back_may_name_a_point_declared_further_down(tmp_path: Path) -> None:
    text = (
        '[points.cmd]\nwritable = true\nread_back = "later"\nkind = "coil"\naddress = 0\n\n'
        '[points.later]\nkind = "discrete"\naddress = 0\n'
    )
    assert load_profile(profile_file(tmp_path, text)).points["cmd"].read_back == "later"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (
            '[points.cmd]\nwritable = true\nread_back = "nope"\nkind = "coil"\naddress = 0\n',
            6,
            "points.cmd.read_back: no point 'nope' in this profile; expected one of: cmd",
        ),
        (
            '[points.state]\nread_back = "state"\nkind = "discrete"\naddress = 0\n',
            5,
            "points.state.read_back: only a writable point is read back after a write",
        ),
        (
            '[points.cmd]\nwritable = true\nread_back = "Bad-Name"\nkind = "coil"\naddress = 0\n',
            6,
            "points.cmd.read_back: expected a point name",
        ),
        (
            '[points.cmd]\nrole = "switch"\nkind = "coil"\naddress = 0\n',
            5,
            "points.cmd.role: a switch point must be writable: expected writable = true",
        ),
        (
            '[points.a]\nwritable = true\nrole = "switch"\nkind = "coil"\naddress = 0\n\n'
            '[points.b]\nwritable = true\nrole = "switch"\nkind = "coil"\naddress = 1\n',
            12,
            "points.b.role: role 'switch' is already taken by point 'a'",
        ),
    ],
)
def test_bad_read_back_and_switch_points_are_refused_with_file_and_line(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    path = profile_file(tmp_path, text)
    with pytest.raises(ConfigErrors) as caught:
        load_profile(path)
    (error,) = caught.value.errors
    assert error.where is not None and (error.where.file, error.where.line) == (str(path), line)
    assert message in error.message, error.message


# --------------------------------------------------------------------------- end to end


class CabinetController(MemoryDevice):
    """Coils drive contactors whose feedback contacts (discrete inputs at the same address)
    follow them, unless the contactor is in ``jammed``; holding register 6 takes writes but
    refuses reads, like a command register."""

    def __init__(self) -> None:
        super().__init__(size=8)
        self.jammed: set[int] = set()

    def store_coils(self, address: int, values: Sequence[bool]) -> None:
        super().store_coils(address, values)
        for offset, on in enumerate(values):
            if address + offset not in self.jammed:
                self.discrete[address + offset] = on

    def holding_registers(self) -> Mapping[int, int]:
        registers = dict(super().holding_registers())
        del registers[WRITE_ONLY_REGISTER]
        return registers


@dataclass
class Cabinet:
    sim: ModbusSimulator
    agent: Agent
    sub: Subscriber
    post: Publisher
    expires: int

    def controller(self, device: str) -> CabinetController:
        unit = self.sim.unit(CABINET_UNITS[device])
        assert isinstance(unit, CabinetController)
        return unit

    def lamp(self, unit: int) -> LampController:
        return self.sim.lamp(unit)

    def writes(self) -> list[int]:
        """Writes applied per unit so far, holding registers and coils together."""
        units = [1, 2, 10, *CABINET_UNITS.values()]
        return [
            sum(self.sim.unit(u).writes.values()) + sum(self.sim.unit(u).coil_writes.values())
            for u in units
        ]

    async def run(self, command_id: str, **fields: Any) -> dict[str, Any]:
        """Send a command and return its ack, checked against the hub schema."""
        return await self.send(command(command_id, self.expires, **fields), command_id)

    async def send(self, payload: bytes, command_id: str) -> dict[str, Any]:
        await self.post.send(f"{BASE}/cmd", payload)
        messages = await self.sub.wait_for_async(lambda m: bool(acks_for(m, command_id)), WAIT_S)
        (ack,) = acks_for(messages, command_id)
        validator("ack").validate(ack)
        return ack


@asynccontextmanager
async def cabinet(tmp_path: Path, broker: MosquittoBroker) -> AsyncIterator[Cabinet]:
    """Two lamps, a meter and two cabinet controllers on one Modbus TCP line, the agent, the
    broker."""
    sim = ModbusSimulator(
        {1: LampController(), 2: LampController(), 10: EnergyMeter()}
        | {unit: CabinetController() for unit in CABINET_UNITS.values()}
    )
    port = await sim.start_tcp("127.0.0.1", 0)
    (tmp_path / "cabinet-ctl.toml").write_text(CABINET_PROFILE, encoding="utf-8")
    extra = "".join(
        f'[devices.{device}]\nbus = "street-1"\nprofile = "cabinet-ctl.toml"\nunit = {unit}\n'
        "poll_interval_s = 0.3\n\n"
        for device, unit in CABINET_UNITS.items()
    )
    path = write_config(
        tmp_path, gateway=GATEWAY, sim_port=port, broker_port=broker.port, lamps=2, extra=extra
    )
    path.write_text(
        path.read_text().replace("[groups]\n", '[groups]\ncabinets = ["cab-1", "cab-2"]\n')
    )
    config = load_config(path)
    sub = Subscriber(broker, f"{BASE}/#")
    await asyncio.to_thread(sub.start)
    post = Publisher(broker.port)
    agent = Agent(config)
    task = asyncio.create_task(agent.run())
    try:
        await agent.started.wait()
        await sub.wait_for_async(lambda m: bool(payloads(m, "data")), WAIT_S)
        yield Cabinet(sim, agent, sub, post, now_ms() + 120_000)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        post.close()
        sub.stop()
        await sim.stop()


def test_write_acks_the_value_read_back(tmp_path: Path, broker: MosquittoBroker) -> None:
    async def body() -> None:
        async with cabinet(tmp_path, broker) as cab:
            cab1 = cab.controller("cab-1")

            # A contactor command, answered by its feedback contact (read_back).
            ack = await cab.run(
                "w-c2",
                action="write",
                target={"device": "cab-1"},
                point="circuit2_command",
                value=True,
            )
            assert ack["status"] == "ok"
            assert (ack["action"], ack["point"], ack["requested"]) == (
                "write",
                "circuit2_command",
                True,
            )
            assert ack["results"] == [{"device": "cab-1", "status": "ok", "value": True}]
            assert cab1.coil[1] is True and cab1.coil_writes == {1: 1}

            # The feedback tells the truth: a jammed contactor is a mismatch.
            cab1.jammed.add(1)
            ack = await cab.run(
                "w-jam",
                action="write",
                target={"device": "cab-1"},
                point="circuit2_command",
                value=False,
            )
            assert ack["status"] == "error"
            (result,) = ack["results"]
            assert (result["status"], result["value"]) == ("mismatch", True)
            assert "circuit2_feedback" in result["error"]
            assert cab1.coil[1] is False

            # A register without read_back reads itself back; integers must be equal.
            ack = await cab.run(
                "w-lux",
                action="write",
                target={"device": "cab-1"},
                point="lux_threshold",
                value=150,
            )
            assert ack["results"] == [{"device": "cab-1", "status": "ok", "value": 150}]
            assert cab1.holding[0] == 150

            # float32 does not hold 0.1 exactly: within one part in a million is done.
            ack = await cab.run(
                "w-gain", action="write", target={"device": "cab-1"}, point="gain", value=0.1
            )
            (result,) = ack["results"]
            assert result["status"] == "ok" and result["value"] != 0.1
            assert math.isclose(result["value"], 0.1, rel_tol=1e-6)

            # A point with nothing to read: written, status unknown, and the fix named.
            ack = await cab.run(
                "w-reset",
                action="write",
                target={"device": "cab-1"},
                point="reset_counters",
                value=1,
            )
            (result,) = ack["results"]
            assert (result["status"], result["value"]) == ("unknown", None)
            assert "give it a read_back point" in result["error"]
            assert cab1.writes[WRITE_ONLY_REGISTER] == 1 and cab1.holding[6] == 1

            # Values the point cannot take fail at the driver: an error, nothing written.
            before = cab.writes()
            ack = await cab.run(
                "w-big",
                action="write",
                target={"device": "cab-1"},
                point="lux_threshold",
                value=70000,
            )
            assert ack["status"] == "error" and ack["results"][0]["status"] == "error"
            ack = await cab.run(
                "w-half",
                action="write",
                target={"device": "cab-1"},
                point="aux_relay",
                value=0.5,
            )
            assert ack["results"][0]["status"] == "error"
            assert "coil" in ack["results"][0]["error"]
            assert cab.writes() == before

            # A group and all: every member that has the point, each read back.
            cab.controller("cab-2").jammed.add(1)
            ack = await cab.run(
                "w-group",
                action="write",
                target={"group": "cabinets"},
                point="circuit2_command",
                value=True,
            )
            # cab-1's contactor 2 is still jammed closed, which is what is asked now.
            assert [(r["device"], r["status"], r["value"]) for r in ack["results"]] == [
                ("cab-1", "ok", True),
                ("cab-2", "mismatch", False),
            ]
            ack = await cab.run(
                "w-all", action="write", target={"all": True}, point="lux_threshold", value=20
            )
            assert ack["status"] == "ok"
            assert [r["device"] for r in ack["results"]] == ["cab-1", "cab-2"]
            assert [cab.controller(d).holding[0] for d in CABINET_UNITS] == [20, 20]

            # The lamps are the same as ever, and can be written by point name too.
            ack = await cab.run(
                "w-lamp",
                action="write",
                target={"device": "lamp-1"},
                point="level_setpoint",
                value=35,
            )
            assert ack["results"] == [{"device": "lamp-1", "status": "ok", "value": 35}]
            assert cab.lamp(1).setpoint == 35

    asyncio.run(body())


def test_switch_drives_the_contactor_and_reads_its_feedback(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    async def body() -> None:
        async with cabinet(tmp_path, broker) as cab:
            cab1 = cab.controller("cab-1")
            ack = await cab.run("s-on", action="switch", target={"device": "cab-1"}, state="on")
            assert ack["status"] == "ok" and ack["requested"] == 100
            assert ack["results"] == [{"device": "cab-1", "status": "ok", "state": "on"}]
            assert cab1.coil[0] is True and cab1.coil_writes == {0: 1}

            # The contactor sticks: the feedback says so.
            cab1.jammed.add(0)
            ack = await cab.run("s-off", action="switch", target={"device": "cab-1"}, state="off")
            assert ack["status"] == "error"
            (result,) = ack["results"]
            assert (result["status"], result["state"]) == ("mismatch", "on")
            assert cab1.coil[0] is False
            cab1.jammed.clear()

            # All: contactors by state, lamps (no switch point) by level as before.
            cab.lamp(2).setpoint = 60
            ack = await cab.run("s-all", action="switch", target={"all": True}, state="off")
            assert ack["status"] == "ok"
            assert {r["device"]: r for r in ack["results"]} == {
                "lamp-1": {"device": "lamp-1", "status": "ok", "level": 0},
                "lamp-2": {"device": "lamp-2", "status": "ok", "level": 0},
                "cab-1": {"device": "cab-1", "status": "ok", "state": "off"},
                "cab-2": {"device": "cab-2", "status": "ok", "state": "off"},
            }
            assert [cab.lamp(u).setpoint for u in (1, 2)] == [0, 0]
            assert [cab.controller(d).discrete[0] for d in CABINET_UNITS] == [False, False]

            # A contactor that does not answer: an error, never "ok".
            cab.controller("cab-2").faults.no_answer = True
            ack = await cab.run("s-gone", action="switch", target={"group": "cabinets"}, state="on")
            by_device = {r["device"]: r for r in ack["results"]}
            assert by_device["cab-1"]["status"] == "ok"
            assert by_device["cab-2"]["status"] in ("error", "unknown")
            assert by_device["cab-2"]["state"] is None

    asyncio.run(body())


def test_rejected_writes_touch_nothing(tmp_path: Path, broker: MosquittoBroker) -> None:
    async def body() -> None:
        async with cabinet(tmp_path, broker) as cab:
            before = cab.writes()
            cases: list[tuple[str, dict[str, Any], str]] = [
                ("r-point", {"target": {"device": "cab-1"}, "point": "nope"}, "unknown_point"),
                (
                    "r-lamp-point",
                    {"target": {"device": "lamp-1"}, "point": "gain"},
                    "unknown_point",
                ),
                (
                    "r-ro",
                    {"target": {"device": "cab-1"}, "point": "temperature"},
                    "not_writable",
                ),
                (
                    "r-feedback",
                    {"target": {"device": "lamp-1"}, "point": "actual_level"},
                    "not_writable",
                ),
                (
                    "r-group",
                    {"target": {"group": "street"}, "point": "circuit2_command"},
                    "unsupported",
                ),
                (
                    "r-all",
                    {"target": {"all": True}, "point": "circuit1_feedback"},
                    "unsupported",
                ),
                (
                    "r-string",
                    {"target": {"device": "cab-1"}, "point": "lux_threshold", "value": "1"},
                    "invalid_value",
                ),
                (
                    "r-null",
                    {"target": {"device": "cab-1"}, "point": "lux_threshold", "value": None},
                    "invalid_value",
                ),
                (
                    "r-target",
                    {"target": {"device": "cab-9"}, "point": "lux_threshold"},
                    "unknown_target",
                ),
                ("r-nopoint", {"target": {"device": "cab-1"}, "point": ...}, "malformed"),
            ]
            for command_id, fields, code in cases:
                document = {"action": "write", "value": True, **fields}
                document = {k: v for k, v in document.items() if v is not ...}
                ack = await cab.run(command_id, **document)
                assert (ack["status"], ack["code"]) == ("rejected", code), ack
                assert ack["reason"]
            nan = command(
                "r-nan",
                cab.expires,
                action="write",
                target={"device": "cab-1"},
                point="gain",
                value=1.5,
            )
            ack = await cab.send(nan.replace(b"1.5", b"NaN"), "r-nan")
            assert ack["code"] == "invalid_value"
            # The meter has neither a switch nor a level point.
            ack = await cab.run("r-meter", action="switch", target={"device": "meter"}, state="on")
            assert ack["code"] == "unsupported"
            ack = await cab.run(
                "r-state", action="switch", target={"device": "cab-1"}, state="sideways"
            )
            assert ack["code"] == "invalid_state"
            assert cab.writes() == before

            # Still obeying.
            ack = await cab.run(
                "after",
                action="write",
                target={"device": "cab-2"},
                point="aux_relay",
                value=True,
            )
            assert ack["status"] == "ok" and cab.controller("cab-2").coil[2] is True

    asyncio.run(body())
