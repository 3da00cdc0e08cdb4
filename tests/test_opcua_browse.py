"""``lampyre opcua browse``: the address-space tree and the profile generator, against the OPC UA
cabinet simulator over Basic256Sha256 SignAndEncrypt on a loopback port.

The simulator runs on an event loop of its own thread for the whole module (it starts in about a
second); the command line runs in the test's thread with its own loop, as it does in the field.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import tomllib
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.attribute_ids import AttributeIds
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from agent.config import POINT_NAME_PATTERN, load_profile
from agent.sdk import (
    ConfigTable,
)
from drivers.opcua import browse, cli, settings
from drivers.opcua.driver import OpcUaDriver
from drivers.opcua.security import TrustList, ensure_client_certificate, fingerprint
from drivers.opcua.session import close_client, open_client
from firmware_sim.opcua import NAMESPACE_URI, CabinetSimulator

CLIENT_URI = "urn:lampyre:test:browse"
STEP_S = 20.0
"""Bound of each simulator step; generous because the shared machine can be slow."""

T = TypeVar("T")


@dataclass(frozen=True)
class Cabinet:
    sim: CabinetSimulator
    loop: asyncio.AbstractEventLoop
    endpoint: str
    server_certificate: x509.Certificate
    cert: Path
    key: Path
    trust_dir: Path

    def options(self, trust_dir: Path | None = None) -> list[str]:
        """The endpoint and the standalone connection options."""
        return [
            self.endpoint,
            "--cert",
            str(self.cert),
            "--key",
            str(self.key),
            "--trust-dir",
            str(trust_dir or self.trust_dir),
        ]

    def on_sim_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(STEP_S)


@pytest.fixture(scope="module")
def cabinet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cabinet]:
    root = tmp_path_factory.mktemp("opcua-browse")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="opcua-sim", daemon=True)
    thread.start()
    sim = CabinetSimulator(root / "server")
    try:
        endpoint = asyncio.run_coroutine_threadsafe(sim.start(), loop).result(STEP_S)
        cert, key = ensure_client_certificate(
            root / "pki" / "client.der",
            root / "pki" / "client-key.pem",
            application_uri=CLIENT_URI,
            common_name="Lampyre browse test",
        )
        server_certificate = x509.load_der_x509_certificate(sim.certificate_der)
        trust_dir = root / "pki" / "trusted"
        TrustList(trust_dir).add(server_certificate)
        yield Cabinet(sim, loop, endpoint, server_certificate, cert, key, trust_dir)
    finally:
        asyncio.run_coroutine_threadsafe(sim.stop(), loop).result(STEP_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(STEP_S)
        loop.close()


def run_cli(argv: Sequence[str]) -> int:
    return cli.main(["browse", *argv])


def find(node: dict[str, Any], path: str) -> dict[str, Any]:
    """The node of a ``--json`` tree at ``path``."""
    if node["path"] == path:
        return node
    for child in node.get("children", []):
        if path == child["path"] or path.startswith(child["path"] + "/"):
            return find(child, path)
    raise AssertionError(f"no {path} in the tree")


# --------------------------------------------------------------------------- the tree


def test_tree_shows_circuits_phases_and_the_method(
    cabinet: Cabinet, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(cabinet.options()) == 0
    out = capsys.readouterr().out

    def line(name: str, node: str, rest: str) -> re.Match[str]:
        found = re.search(rf"^ *{name} +{re.escape(node)} +{rest}$", out, re.MULTILINE)
        assert found is not None, f"no line for {node} matching {rest!r} in:\n{out}"
        return found

    assert f"Server {cabinet.endpoint} (Basic256Sha256, SignAndEncrypt)" in out
    assert "2 urn:lampyre:sim:cabinet" in out
    line("Circuit1", "ns=2;s=Cabinet.Circuit1", "Object")
    for number in (1, 2):
        state = cabinet.sim.state.circuits[number]
        base = f"ns=2;s=Cabinet.Circuit{number}"
        contactor = "true" if state.contactor else "false"
        line("ContactorState", f"{base}.ContactorState", rf"Variable +Boolean +r += {contactor}")
        line("Command", f"{base}.Command", r"Variable +Boolean +rw += (true|false)")
        line("DimLevel", f"{base}.DimLevel", rf"Variable +Byte +rw += {state.dim_level}")
        line("ActualLevel", f"{base}.ActualLevel", r"Variable +Byte +r += \d+")
    for quantity in ("Voltage", "Current", "Power", "Energy"):
        for phase in ("L1", "L2", "L3"):
            line(phase, f"ns=2;s=Cabinet.{quantity}.{phase}", r"Variable +Double +r += [0-9.]+")
    volts = line("L1", "ns=2;s=Cabinet.Voltage.L1", r"Variable +Double +r += ([0-9.]+)")
    assert 226.0 <= float(volts.group(1)) <= 234.0  # 230 V ± 3, as the simulator makes it
    line("SunriseTime", "ns=2;s=Cabinet.Clock.SunriseTime", r"Variable +DateTime +r += \S+")
    line(
        "SwitchCircuit",
        "ns=2;s=Cabinet.SwitchCircuit",
        re.escape("Method    (circuit: Int32, on: Boolean) -> (contactor: Boolean)"),
    )
    # The standard Server object only with --all.
    assert "i=2253" not in out
    assert run_cli([*cabinet.options(), "--all", "--depth", "1"]) == 0
    assert re.search(r"^  Server +i=2253 +Object", capsys.readouterr().out, re.MULTILINE)


def test_json_tree_root_and_depth(cabinet: Cabinet, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli([*cabinet.options(), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["namespaces"][2] == NAMESPACE_URI
    assert document["security_policy"] == "Basic256Sha256"
    dim = find(document["root"], "Cabinet/Circuit1/DimLevel")
    assert dim["node_id"] == "ns=2;s=Cabinet.Circuit1.DimLevel"
    assert dim["node_id_uri"] == f"nsu={NAMESPACE_URI};s=Cabinet.Circuit1.DimLevel"
    assert (dim["data_type"], dim["access"], dim["writable"], dim["status"]) == (
        "Byte",
        "rw",
        True,
        "Good",
    )
    assert dim["value"] == cabinet.sim.state.circuits[1].dim_level
    door = find(document["root"], "Cabinet/DoorOpen")
    assert (door["value"], door["access"], door["writable"]) == (False, "r", False)
    method = find(document["root"], "Cabinet/SwitchCircuit")
    assert method["node_class"] == "Method"
    assert method["inputs"] == [
        {"name": "circuit", "data_type": "Int32", "is_array": False},
        {"name": "on", "data_type": "Boolean", "is_array": False},
    ]
    assert method["outputs"] == [{"name": "contactor", "data_type": "Boolean", "is_array": False}]

    # A root by browse path, one level: the circuit and its four variables, paths kept whole.
    assert (
        run_cli([*cabinet.options(), "--json", "--root", "Cabinet/Circuit2", "--depth", "1"]) == 0
    )
    circuit = json.loads(capsys.readouterr().out)["root"]
    assert circuit["path"] == "Cabinet/Circuit2"
    assert [c["name"] for c in circuit["children"]] == [
        "ContactorState",
        "Command",
        "DimLevel",
        "ActualLevel",
    ]
    # The same root by node id (namespace URI form) gives the same paths.
    root_id = f"nsu={NAMESPACE_URI};s=Cabinet.Circuit2"
    assert run_cli([*cabinet.options(), "--json", "--root", root_id, "--depth", "1"]) == 0
    same = json.loads(capsys.readouterr().out)["root"]
    assert [c["path"] for c in same["children"]] == [c["path"] for c in circuit["children"]]
    # Depth 0: the root alone, marked as not expanded.
    assert run_cli([*cabinet.options(), "--json", "--root", "Cabinet", "--depth", "0"]) == 0
    alone = json.loads(capsys.readouterr().out)["root"]
    assert (alone["children"], alone["expanded"]) == ([], False)


def test_unknown_root_is_a_usage_error(
    cabinet: Cabinet, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli([*cabinet.options(), "--root", "Cabinet/Circuit9"]) == 2
    err = capsys.readouterr().err
    assert "no 'Circuit9' under Cabinet" in err
    assert "Circuit1" in err  # what is there instead
    assert run_cli([*cabinet.options(), "--root", "ns=2;s=Cabinet.Nothing"]) == 2
    assert "BadNodeIdUnknown" in capsys.readouterr().err


def test_config_bus_gives_the_connection(
    cabinet: Cabinet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
[gateway]
id = "cab-1"

[buses.plc]
driver = "opcua"
endpoint = "{cabinet.endpoint}"
security_policy = "Basic256Sha256"
certificate = "{cabinet.cert}"
private_key = "{cabinet.key}"
trust_dir = "{cabinet.trust_dir}"

[buses.rs485]
driver = "modbus"
transport = "rtu"
device = "/dev/ttyUSB0"
"""
    )
    assert run_cli(["--config", str(config), "--bus", "plc", "--root", "Cabinet/Clock"]) == 0
    out = capsys.readouterr().out
    assert "LightsOnBySchedule" in out and "ns=2;s=Cabinet.Clock.SunsetTime" in out
    assert run_cli(["--config", str(config), "--bus", "rs485"]) == 2
    assert "not opcua" in capsys.readouterr().err
    assert run_cli(["--config", str(config), "--bus", "nope"]) == 2
    assert "buses: plc, rs485" in capsys.readouterr().err


# --------------------------------------------------------------------------- trust


def test_untrusted_server_is_refused_with_its_fingerprint(
    cabinet: Cabinet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "trusted"
    empty.mkdir()
    assert run_cli(cabinet.options(empty)) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert fingerprint(cabinet.server_certificate) in captured.err
    assert f"lampyre opcua trust --dir {empty}" in captured.err
    assert list(empty.iterdir()) == []  # nothing trusted behind the technician's back

    # Trust on first use, asked for explicitly: the certificate is stored and used.
    assert run_cli([*cabinet.options(empty), "--trust-on-first-use", "--depth", "1"]) == 0
    assert "Cabinet" in capsys.readouterr().out
    (stored,) = empty.iterdir()
    assert stored.read_bytes() == cabinet.sim.certificate_der


# --------------------------------------------------------------------------- profile


@contextlib.asynccontextmanager
async def session(cabinet: Cabinet) -> AsyncIterator[tuple[Client, list[str]]]:
    """A secure session as the driver opens it, and the server's namespace table."""
    options = ConfigTable(
        data={
            "endpoint": cabinet.endpoint,
            "certificate": str(cabinet.cert),
            "private_key": str(cabinet.key),
            "trust_dir": str(cabinet.trust_dir),
        },
        file="test",
    )
    client = await open_client(settings.parse_bus(options, "test"), bus_id="test", name="test")
    try:
        yield client, await client.get_namespace_array()
    finally:
        await close_client(client)


def resolve(text: str, namespaces: list[str]) -> ua.NodeId:
    """A profile node id (namespace URI form) as the server's node id."""
    parsed = settings.parse_node_id(text)
    assert isinstance(parsed, ua.ExpandedNodeId)
    assert parsed.NamespaceUri == NAMESPACE_URI  # the profile names the URI, not ns=2
    index = ua.Int16(namespaces.index(parsed.NamespaceUri))
    return ua.NodeId(parsed.Identifier, index, parsed.NodeIdType)


def test_profile_for_a_circuit_and_the_method_loads_and_resolves(
    cabinet: Cabinet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cabinet-sim.toml"
    argv = [
        *cabinet.options(),
        "--profile",
        "cabinet-sim",
        "--select",
        "Cabinet/Circuit1/*",
        "--select",
        "Cabinet/SwitchCircuit",
        "--out",
        str(out),
    ]
    assert run_cli(argv) == 0
    captured = capsys.readouterr()
    assert f"5 points written to {out}" in captured.out
    assert '"$value" stands for the last input argument (on)' in captured.err

    profile = load_profile(out, {"opcua": OpcUaDriver})
    assert profile.driver == "opcua"
    assert list(profile.points) == [
        "circuit1_contactor_state",
        "circuit1_command",
        "circuit1_dim_level",
        "circuit1_actual_level",
        "switch_circuit",
    ]
    writable = {name for name, point in profile.points.items() if point.writable}
    assert writable == {"circuit1_command", "circuit1_dim_level", "switch_circuit"}
    text = out.read_text()
    assert "# Cabinet/Circuit1/DimLevel: Byte, rw, value seen: " in text
    assert '# role = "dim_level"' in text  # a hint only: roles are the technician's call

    variables = {
        name: settings.parse_point(point)
        for name, point in profile.points.items()
        if name != "switch_circuit"
    }
    for parsed in variables.values():
        assert parsed.node is not None
        assert parsed.node.text.startswith(f"nsu={NAMESPACE_URI};s=Cabinet.Circuit1.")
    method = settings.parse_point(profile.points["switch_circuit"])
    assert method.method is not None and method.object is not None
    assert method.arguments == (0, "$value")

    # Every node id of the profile resolves on the server: the variables read what the
    # simulator holds, the method and its object are the right nodes.
    texts = [p.node.text for p in variables.values() if p.node is not None]

    async def read_back() -> list[ua.DataValue]:
        async with session(cabinet) as (client, namespaces):
            nodes = [client.get_node(resolve(text, namespaces)) for text in texts]
            return await client.read_attributes(nodes, AttributeIds.Value)

    for text, value in zip(texts, asyncio.run(read_back()), strict=True):
        assert value.StatusCode is not None and value.StatusCode.is_good(), text
        assert value.Value is not None
        leaf = text.rsplit(".", 1)[1]
        assert value.Value.Value == cabinet.sim.value(f"Circuit1.{leaf}")

    async def call_method() -> Any:
        assert method.object is not None and method.method is not None
        async with session(cabinet) as (client, namespaces):
            owner = client.get_node(resolve(method.object.text, namespaces))
            # The placeholder set to circuit 1, "$value" to on = true (it already is on).
            return await owner.call_method(
                resolve(method.method.text, namespaces), ua.Variant(1, ua.VariantType.Int32), True
            )

    calls_before = len(cabinet.sim.method_calls)
    assert asyncio.run(call_method()) is True
    assert cabinet.sim.method_calls[calls_before:] == [("SwitchCircuit", (1, True))]


def test_profile_to_stdout_by_node_id_pattern(
    cabinet: Cabinet, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*cabinet.options(), "--profile", "phases", "--select", "ns=2;s=Cabinet.Voltage.L*"]
    assert run_cli(argv) == 0
    document = tomllib.loads(capsys.readouterr().out)
    assert document["profile"]["name"] == "phases"
    assert {name: p["node"] for name, p in document["points"].items()} == {
        "l1": f"nsu={NAMESPACE_URI};s=Cabinet.Voltage.L1",
        "l2": f"nsu={NAMESPACE_URI};s=Cabinet.Voltage.L2",
        "l3": f"nsu={NAMESPACE_URI};s=Cabinet.Voltage.L3",
    }


def test_existing_out_file_is_never_overwritten(
    cabinet: Cabinet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cabinet-sim.toml"
    out.write_text("# the technician's edited profile\n")
    argv = [*cabinet.options(), "--profile", "cabinet-sim", "--select", "Cabinet/*", "--out"]
    assert run_cli([*argv, str(out)]) == 2
    assert "already exists; it is never overwritten" in capsys.readouterr().err
    assert out.read_text() == "# the technician's edited profile\n"
    # The file name must be the profile's name, or the loader would not find it.
    assert run_cli([*argv, str(tmp_path / "other.toml")]) == 2
    assert "must be cabinet-sim.toml" in capsys.readouterr().err
    assert not (tmp_path / "other.toml").exists()


def test_select_that_matches_nothing_writes_nothing(
    cabinet: Cabinet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "p.toml"
    argv = [*cabinet.options(), "--profile", "p", "--select", "Cabinet/Circuit9/*"]
    assert run_cli([*argv, "--out", str(out)]) == 2
    assert "Cabinet/Circuit9/*: matched no variable or method" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give the server's ENDPOINT"),
        (["opc.tcp://127.0.0.1:4840"], "needs --cert FILE --key FILE --trust-dir DIR"),
        (["--bus", "plc"], "--bus needs --config"),
        (["--config", "gateway.toml"], "--config needs --bus"),
        (["opc.tcp://h:4840", "--policy", "None", "--select", "A/*"], "go with --profile"),
        (["opc.tcp://h:4840", "--policy", "None", "--profile", "p"], "at least one --select"),
        (
            ["opc.tcp://h:4840", "--policy", "None", "--profile", "bad name", "--select", "x"],
            "--profile",
        ),
        (["http://h:4840", "--policy", "None"], "opc.tcp://HOST:PORT/PATH"),
        (["opc.tcp://h:4840", "--policy", "None", "--mode", "Sign"], "security_mode"),
        (
            ["opc.tcp://h:4840", "--policy", "None", "--username", "u"],
            "--password-file go together",
        ),
        (["opc.tcp://h:4840", "--policy", "None", "--root", "ns=x;s="], "--root"),
    ],
)
def test_usage_errors_exit_2_before_connecting(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(argv) == 2
    assert message in capsys.readouterr().err


def test_parser_choices_are_the_drivers() -> None:
    assert browse.POLICY_CHOICES == settings.POLICIES
    assert browse.MODE_CHOICES == settings.MODES


# --------------------------------------------------------------------------- names, patterns


def test_point_names_drop_the_shared_prefix() -> None:
    paths = [["Cabinet", "Circuit1", "DimLevel"], ["Cabinet", "Circuit2", "DimLevel"]]
    assert browse.point_names(paths) == ["circuit1_dim_level", "circuit2_dim_level"]
    assert browse.point_names([["Cabinet", "Clock", "LightsOnBySchedule"]]) == [
        "lights_on_by_schedule"
    ]
    assert browse.point_names([["A", "HTTPStatus"], ["A", "Phase L1"], ["A", "3rd"]]) == [
        "http_status",
        "phase_l1",
        "point_3rd",
    ]
    assert browse.point_names([["X", "Température"], ["Y", "temperature"]]) == [
        "x_temperature",
        "y_temperature",
    ]
    assert browse.point_names([["A", "b-c"], ["A", "b_c"], ["A", "b c"]]) == [
        "b_c",
        "b_c_2",
        "b_c_3",
    ]


browse_paths = st.lists(
    st.lists(st.text(max_size=12), min_size=1, max_size=6), min_size=0, max_size=30
)


@given(browse_paths)
def test_any_browse_paths_give_valid_unique_point_names(paths: list[list[str]]) -> None:
    names = browse.point_names(paths)
    assert len(names) == len(paths)
    assert len(set(names)) == len(names)
    for name in names:
        assert re.fullmatch(POINT_NAME_PATTERN, name), name
        assert len(name) <= browse.MAX_POINT_NAME_CHARS
    assert browse.point_names(paths) == names  # the same server gives the same profile


plain_names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="*?[]/"),
    min_size=1,
    max_size=10,
)


@given(st.lists(plain_names, min_size=1, max_size=5), plain_names)
def test_a_path_without_wildcards_selects_itself_only(names: list[str], other: str) -> None:
    path = "/".join(names)
    matcher = browse.path_matcher(path)
    assert matcher.fullmatch(path)
    assert not matcher.fullmatch(f"{path}/{other}")
    # One star stays within one name; two stars cross names.
    parent = "/".join(names[:-1])
    star = f"{parent}/*" if parent else "*"
    assert browse.path_matcher(star).fullmatch(path)
    assert not browse.path_matcher(star).fullmatch(f"{path}/{other}")
    assert browse.path_matcher(f"{star}*").fullmatch(f"{path}/{other}")


def synthetic_variable(path: str, node_id_text: str) -> browse.BrowsedNode:
    return browse.BrowsedNode(
        node_id=f"ns=3;s={node_id_text}",
        node_id_uri=f"nsu=urn:vendor;s={node_id_text}",
        browse_name=f"3:{path.rsplit('/', 1)[-1]}",
        name=path.rsplit("/", 1)[-1],
        node_class="Variable",
        path=path,
        data_type="String",
        value=node_id_text,
        status="Good",
        access="rw",
        writable=True,
    )


identifiers = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="{}"),
    min_size=1,
    max_size=20,
).filter(lambda text: text.strip() == text and text != "")


@given(st.lists(st.tuples(st.lists(plain_names, min_size=1, max_size=4), identifiers), max_size=8))
def test_generated_profiles_are_valid_toml_the_driver_accepts(
    entries: list[tuple[list[str], str]],
) -> None:
    nodes = [synthetic_variable("/".join(names), ident) for names, ident in entries]
    profile = browse.generate_profile(
        "vendor", nodes, endpoint="opc.tcp://plc:4840", selections=["**"]
    )
    if not nodes:
        assert profile.points == ()
        return
    document = tomllib.loads(profile.text)
    assert [p["node"] for p in document["points"].values()] == [n.node_id_uri for n in nodes]
    browse.check_profile_points(profile, "vendor.toml")
