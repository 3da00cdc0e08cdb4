"""The bench runner (hil/): every scenario against the simulated target, the CLI with its JSON
report, and the bench target's refusals (fault scenarios and, without --allow-commands, command
scenarios are "not applicable", never "passed") and failures."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hil.scenarios
from agent.config import load_config
from firmware_sim.modbus import EnergyMeter, LampController, ModbusSimulator
from hil.__main__ import main
from hil.runner import parse_broker, result_lines, run_hil
from hil.scenarios import SCENARIOS, Status
from hil.targets import BenchTarget, SimulatedTarget
from tests.e2e import write_config
from tests.support.mosquitto import MosquittoBroker, free_port

GATEWAY = "hil-gw"
RUN_TIMEOUT_S = 60.0
LAMPS = ("lamp-1", "lamp-2", "lamp-3")


def test_every_scenario_passes_against_the_simulated_cabinet(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    async def body() -> None:
        config = load_config(
            write_config(tmp_path, gateway=GATEWAY, sim_port=free_port(), broker_port=broker.port)
        )
        target = SimulatedTarget()
        async with asyncio.timeout(RUN_TIMEOUT_S):
            report = await run_hil(config, target, broker=("127.0.0.1", broker.port))

        assert report.error is None
        assert [r.name for r in report.results] == list(SCENARIOS)
        for result in report.results:
            assert result.status is Status.PASSED, (result.name, result.details)
        assert report.ok
        results = {r.name: r for r in report.results}

        flow = results["readings_flow"].figures["devices"]
        assert set(flow) == {*LAMPS, "meter"}
        for figures in flow.values():
            assert figures["good_polls"] >= hil.scenarios.READINGS_MIN_POLLS
            assert figures["interval_s"] > 0
            assert figures["configured_interval_s"] == 0.3

        dim = results["dim_round_trip"].figures
        assert dim["ack_latency_ms"]["count"] == 2 * len(LAMPS)
        assert dim["ack_latency_ms"]["max"] >= dim["ack_latency_ms"]["median"] > 0
        for lamp in LAMPS:
            assert dim["devices"][lamp]["read_back"] == 40
            assert dim["devices"][lamp]["restored"] == 0
            # Ground truth, read from the simulator itself: each lamp is back where it was.
            assert target.setpoint(lamp) == 0

        rejects = results["rejects_bad_commands"].figures
        assert rejects["cases"] >= 10
        assert "not JSON" in rejects["codes"] and rejects["codes"]["not JSON"] == "malformed"
        assert rejects["codes"]["not dimmable"] == "unsupported"

        assert set(results["lamp_failure_alarm"].figures["raised_after_s"]) == set(LAMPS)
        offline = results["device_offline_alarm"].figures
        assert offline["device"] == "lamp-1"
        assert offline["bad_readings"] > 0
        assert offline["peers_polled"] == ["lamp-2", "lamp-3", "meter"]
        # The faults were cleared on the way out.
        for lamp in LAMPS:
            device = target.device(lamp)
            assert isinstance(device, LampController)
            assert not device.lamp_failed and not device.faults.no_answer

    asyncio.run(body())


def test_cli_runs_the_simulated_target_with_a_private_broker_and_writes_a_json_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No broker given: the runner starts its own Mosquitto on a free loopback port.
    config = write_config(
        tmp_path, gateway=GATEWAY, sim_port=free_port(), broker_port=free_port(), lamps=2
    )
    report_path = tmp_path / "report.json"
    pymodbus = logging.getLogger("pymodbus")
    level = pymodbus.level
    try:
        status = main(
            [
                "--config",
                str(config),
                "--scenario",
                "dim_round_trip",
                "readings_flow",
                "--json",
                str(report_path),
            ]
        )
    finally:
        pymodbus.setLevel(level)
    out = capsys.readouterr().out
    assert status == 0, out
    report = json.loads(report_path.read_text())
    assert report["ok"] is True and report["error"] is None
    assert report["target"] == "sim" and report["gateway"] == GATEWAY
    assert report["broker"].startswith("127.0.0.1:")
    assert report["counts"] == {"passed": 2, "failed": 0, "not-applicable": 0}
    # Always in the canonical order, whatever the order on the command line.
    assert [s["name"] for s in report["scenarios"]] == ["readings_flow", "dim_round_trip"]
    dim = report["scenarios"][1]
    assert dim["status"] == "passed" and dim["figures"]["ack_latency_ms"]["count"] == 4
    assert set(report["scenarios"][0]["figures"]["devices"]) == {"lamp-1", "lamp-2", "meter"}
    verdicts = [line.split()[:2] for line in out.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert verdicts == [["PASSED", "readings_flow"], ["PASSED", "dim_round_trip"]]
    assert "2 passed, 0 failed, 0 not applicable on target sim" in out


def test_cli_refuses_an_invalid_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[gateway]\nid = "x"\n[buses.b]\ndriver = "modbus"\n')
    assert main(["--config", str(config)]) == 2
    assert "gateway.toml" in capsys.readouterr().err


def _cabinet(units: tuple[int, ...]) -> ModbusSimulator:
    lamps = {u: LampController() for u in units}
    return ModbusSimulator({**lamps, 10: EnergyMeter(lamps=list(lamps.values()))})


def test_bench_target_never_reports_what_it_cannot_check_as_passed(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    """Real equipment (here a simulator the runner knows nothing about): no fault injection,
    and no command without --allow-commands."""

    async def body() -> None:
        equipment = _cabinet((1, 2, 3))
        port = await equipment.start_tcp("127.0.0.1", 0)
        try:
            config = load_config(
                write_config(tmp_path, gateway=GATEWAY, sim_port=port, broker_port=broker.port)
            )
            async with asyncio.timeout(RUN_TIMEOUT_S):
                report = await run_hil(config, BenchTarget(), broker=("127.0.0.1", broker.port))
        finally:
            await equipment.stop()
        statuses = {r.name: r.status for r in report.results}
        assert statuses == {
            "readings_flow": Status.PASSED,
            "dim_round_trip": Status.NOT_APPLICABLE,
            "rejects_bad_commands": Status.NOT_APPLICABLE,
            "lamp_failure_alarm": Status.NOT_APPLICABLE,
            "device_offline_alarm": Status.NOT_APPLICABLE,
        }
        assert report.ok
        results = {r.name: r for r in report.results}
        assert "--allow-commands" in results["dim_round_trip"].details[0]
        assert "fault injection" in results["lamp_failure_alarm"].details[0]
        (line,) = result_lines(results["device_offline_alarm"])
        assert line.startswith("NOT APPLICABLE") and "bench target" in line
        # Nothing was written to the equipment.
        assert all(not equipment.unit(u).writes for u in (1, 2, 3))
        document = report.as_json()
        assert document["counts"] == {"passed": 1, "failed": 0, "not-applicable": 4}
        assert document["target"] == "bench"

    asyncio.run(body())


def test_bench_target_fails_when_a_configured_device_does_not_answer(
    tmp_path: Path, broker: MosquittoBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hil.scenarios, "READINGS_SLACK_S", 1.0)

    async def body() -> None:
        equipment = _cabinet((1, 2))  # lamp-3 is in the configuration, not on the line
        port = await equipment.start_tcp("127.0.0.1", 0)
        try:
            config = load_config(
                write_config(tmp_path, gateway=GATEWAY, sim_port=port, broker_port=broker.port)
            )
            async with asyncio.timeout(RUN_TIMEOUT_S):
                report = await run_hil(
                    config,
                    BenchTarget(allow_commands=True),
                    scenarios=["readings_flow", "dim_round_trip"],
                    broker=("127.0.0.1", broker.port),
                )
        finally:
            await equipment.stop()
        assert not report.ok
        results = {r.name: r for r in report.results}
        flow = results["readings_flow"]
        assert flow.status is Status.FAILED
        assert any(d.startswith("lamp-3: 0 good poll(s)") for d in flow.details), flow.details
        assert flow.figures["devices"]["lamp-3"]["bad_readings"] > 0
        assert flow.figures["devices"]["lamp-1"]["good_polls"] >= 3
        # The lamp whose level cannot be read is left alone; the others go there and back.
        dim = results["dim_round_trip"]
        assert dim.status is Status.FAILED
        assert any(d.startswith("lamp-3: no good level reading") for d in dim.details)
        assert set(dim.figures["devices"]) == {"lamp-1", "lamp-2"}
        assert [equipment.lamp(u).setpoint for u in (1, 2)] == [0, 0]
        assert all(equipment.lamp(u).writes for u in (1, 2))

    asyncio.run(body())


@settings(max_examples=50, deadline=None)
@given(
    host=st.one_of(
        st.from_regex(r"[a-z][a-z0-9.-]{0,30}", fullmatch=True),
        st.ip_addresses(v=4).map(str),
    ),
    port=st.integers(1, 65535),
)
def test_broker_addresses_parse(host: str, port: int) -> None:
    assert parse_broker(f"{host}:{port}") == (host, port)


@settings(max_examples=30, deadline=None)
@given(address=st.ip_addresses(v=6).map(str), port=st.integers(1, 65535))
def test_ipv6_broker_addresses_parse(address: str, port: int) -> None:
    assert parse_broker(f"[{address}]:{port}") == (address, port)


@pytest.mark.parametrize("text", ["localhost", "localhost:", ":1883", "h:0", "h:65536", "h:x"])
def test_malformed_broker_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_broker(text)
