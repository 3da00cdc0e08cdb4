"""The bench runner (hil/): every scenario against the simulated target, with a plain JSON
(demo-style) gateway and with one with the production settings (sealed data and events, signed
acks, signed commands only); the CLI with its key options and JSON report; what the control post
refuses to take from the wire; and the bench target's refusals (fault scenarios and, without
--allow-commands, command scenarios are "not applicable", never "passed") and failures."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

import hil.scenarios
from agent.config import load_config
from agent.envelope import MAGIC, GatewaySigner, HubPrivateKey, Sealer
from agent.jws import ClockState, MemoryReplayStore, sign_ack, verify_command
from agent.keys import (
    SIGNING_PUBLIC_FILE,
    create_gateway_signing_key,
    load_ed25519_private_key,
    load_gateway_signer,
    load_hub_private_keys,
    write_ed25519_keypair,
    write_hub_keypair,
)
from agent.mqtt import MqttSettings
from agent.post import PostKey
from agent.sdk import now_ms
from firmware_sim.modbus import EnergyMeter, LampController, ModbusSimulator
from hil.__main__ import main
from hil.hub import ControlPost, HubMessage, Protection
from hil.keys import BenchKeyError, BenchKeys, load_bench_keys
from hil.runner import parse_broker, result_lines, run_hil
from hil.scenarios import SCENARIOS, Status
from hil.targets import BenchTarget, SimulatedTarget
from tests.e2e import PREFIX, Publisher, write_config
from tests.support.mosquitto import MosquittoBroker, free_port

GATEWAY = "hil-gw"
RUN_TIMEOUT_S = 60.0
LAMPS = ("lamp-1", "lamp-2", "lamp-3")
SYNCHRONISED_CLOCK = '[commands]\nclock_synchronized = "yes"\n'
"""The production settings with a clock the gateway trusts (no timedatectl asked)."""


@dataclass
class KeyFiles:
    """The files of every party, made the way lampyre keys init, hub-init and post-init make
    them; the gateway's key folder (``keys`` next to its configuration) trusts the hub key and
    the post key, and the enrolment folder holds the gateway's public key."""

    gateway_dir: Path
    post_key: Path
    hub_dir: Path
    gateway_public: Path
    enrolment: Path


def make_key_files(root: Path, gateway: str = GATEWAY) -> KeyFiles:
    gateway_dir = root / "keys"
    gateway_dir.mkdir(mode=0o700)
    create_gateway_signing_key(gateway_dir)
    hub_dir = root / "hub"
    hub_dir.mkdir(mode=0o700)
    _, _, hub_public = write_hub_keypair(hub_dir)
    shutil.copy(hub_public, gateway_dir / hub_public.name)
    post_dir = root / "post"
    post_dir.mkdir(mode=0o700)
    post_key = post_dir / "post-signing.key"
    _, post_public = write_ed25519_keypair(post_key, post_dir, "post")
    shutil.copy(post_public, gateway_dir / post_public.name)
    enrolment = root / "enrolled"
    enrolment.mkdir(mode=0o700)
    (enrolment / gateway).mkdir(mode=0o700)
    shutil.copy(gateway_dir / SIGNING_PUBLIC_FILE, enrolment / gateway / SIGNING_PUBLIC_FILE)
    return KeyFiles(
        gateway_dir=gateway_dir,
        post_key=post_key,
        hub_dir=hub_dir,
        gateway_public=gateway_dir / SIGNING_PUBLIC_FILE,
        enrolment=enrolment,
    )


def sealed_config(tmp_path: Path, broker_port: int, **options: Any) -> Path:
    """A gateway with the production settings (the keys are made by :func:`make_key_files`)."""
    return write_config(
        tmp_path,
        gateway=GATEWAY,
        sim_port=free_port(),
        broker_port=broker_port,
        sealed=True,
        extra=SYNCHRONISED_CLOCK,
        **options,
    )


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
        results = {r.name: r for r in report.results}
        for result in report.results:
            if result.name != "rejects_bad_tokens":
                assert result.status is Status.PASSED, (result.name, result.details)
        # Plain JSON commands: the token checks cannot be exercised, and that is said, not
        # passed.
        tokens = results["rejects_bad_tokens"]
        assert tokens.status is Status.NOT_APPLICABLE
        assert "--post-key" in tokens.details[0]
        assert report.ok
        # Everything on the wire was plain JSON, and all of it was read.
        assert set(report.traffic) == {"status", "data", "event", "ack"}
        for kind, forms in report.traffic.items():
            assert set(forms) == {Protection.PLAIN}, (kind, forms)
        assert "plain JSON" in report.security

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
        assert rejects["cases"] == 12 and rejects["skipped"] == {}
        assert "not JSON" in rejects["codes"] and rejects["codes"]["not JSON"] == "malformed"
        assert rejects["codes"]["not dimmable"] == "unsupported"
        assert rejects["codes"]["expired"] == "expired"

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


def test_every_scenario_passes_against_a_sealed_and_signed_gateway(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    """The production settings: the runner opens every envelope with the hub's key, verifies
    every ack with the gateway's enrolled key, and signs every command; the scenarios see the
    same JSON as with a plain gateway."""
    files = make_key_files(tmp_path)

    async def body() -> None:
        config = load_config(sealed_config(tmp_path, broker.port))
        assert config.hub.seal and not config.allow_unsigned_commands
        keys = await asyncio.to_thread(
            load_bench_keys,
            GATEWAY,
            post_key=files.post_key,
            hub_keys=files.hub_dir,
            gateways=files.enrolment,
        )
        target = SimulatedTarget()
        async with asyncio.timeout(RUN_TIMEOUT_S):
            report = await run_hil(config, target, broker=("127.0.0.1", broker.port), keys=keys)

        assert report.error is None
        assert [r.name for r in report.results] == list(SCENARIOS)
        for result in report.results:
            assert result.status is Status.PASSED, (result.name, result.details)
        assert report.ok
        results = {r.name: r for r in report.results}
        assert keys.post is not None and keys.post.kid in report.security

        # What crossed the broker: envelopes and signed acks only, every one opened or verified.
        assert report.traffic["data"]["sealed"] > 0 and set(report.traffic["data"]) == {"sealed"}
        assert set(report.traffic["event"]) == {"sealed"}
        assert report.traffic["ack"]["signed"] > 0 and set(report.traffic["ack"]) == {"signed"}
        assert report.traffic["status"] == {"plain": report.traffic["status"]["plain"]}

        flow = results["readings_flow"].figures["devices"]
        assert set(flow) == {*LAMPS, "meter"}
        dim = results["dim_round_trip"].figures
        assert dim["ack_latency_ms"]["count"] == 2 * len(LAMPS)
        for lamp in LAMPS:
            assert dim["devices"][lamp]["read_back"] == 40
            assert dim["devices"][lamp]["restored"] == 0
            assert target.setpoint(lamp) == 0

        # The spine's checks, through validly signed tokens whose bodies are wrong; the one
        # case a signed token cannot carry is left out, with the reason.
        rejects = results["rejects_bad_commands"].figures
        assert set(rejects["skipped"]) == {"not JSON"}
        assert rejects["cases"] == 11
        assert rejects["codes"]["extra field"] == "malformed"
        assert rejects["codes"]["expired"] == "expired"
        assert rejects["codes"]["level not a number"] == "invalid_level"
        assert rejects["codes"]["not dimmable"] == "unsupported"

        tokens = results["rejects_bad_tokens"].figures
        assert tokens["skipped"] == {}
        assert tokens["codes"] == {
            "unsigned": "unsigned",
            "not a token": "malformed",
            "too large": "too_large",
            "altered": "bad_signature",
            "unknown key": "unknown_key",
            "wrong audience": "wrong_audience",
            "expired token": "expired",
            "replayed: first": "invalid_level",
            "replayed": "replayed",
        }

        assert set(results["lamp_failure_alarm"].figures["raised_after_s"]) == set(LAMPS)
        assert results["device_offline_alarm"].figures["bad_readings"] > 0
        for lamp in LAMPS:
            device = target.device(lamp)
            assert isinstance(device, LampController)
            assert not device.lamp_failed and not device.faults.no_answer

    asyncio.run(body())


def test_a_gateway_key_that_is_not_the_gateways_fails_the_run_and_says_why(
    tmp_path: Path, broker: MosquittoBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Envelopes that do not verify are refused, never read: the scenario fails, naming the
    refusal, instead of passing on data nobody can trust."""
    monkeypatch.setattr(hil.scenarios, "READINGS_SLACK_S", 1.0)
    files = make_key_files(tmp_path)

    async def body() -> None:
        config = load_config(sealed_config(tmp_path, broker.port))
        keys = await asyncio.to_thread(load_bench_keys, GATEWAY, hub_keys=files.hub_dir)
        impostor = GatewaySigner.generate()
        keys = BenchKeys(hub=keys.hub, gateway={impostor.skid: impostor.public_key})
        async with asyncio.timeout(RUN_TIMEOUT_S):
            report = await run_hil(
                config,
                SimulatedTarget(),
                scenarios=["readings_flow", "dim_round_trip"],
                broker=("127.0.0.1", broker.port),
                keys=keys,
            )
        results = {r.name: r for r in report.results}
        flow = results["readings_flow"]
        assert flow.status is Status.FAILED
        assert any("unknown_gateway_key" in d and "could not be opened" in d for d in flow.details)
        assert all(f["good_polls"] == 0 for f in flow.figures["devices"].values())
        # Without the post key, the gateway (signed commands only) cannot be commanded: said.
        dim = results["dim_round_trip"]
        assert dim.status is Status.NOT_APPLICABLE and "--post-key" in dim.details[0]
        assert set(report.traffic["data"]) == {"refused"}
        assert not report.ok

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


def test_cli_reads_a_sealed_gateway_with_its_key_options(
    tmp_path: Path, broker: MosquittoBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    files = make_key_files(tmp_path)
    config = sealed_config(tmp_path, broker.port, lamps=2, meter=False)
    report_path = tmp_path / "report.json"
    pymodbus = logging.getLogger("pymodbus")
    level = pymodbus.level
    try:
        status = main(
            [
                "--config",
                str(config),
                "--broker",
                f"127.0.0.1:{broker.port}",
                "--post-key",
                str(files.post_key),
                "--hub-keys",
                str(files.hub_dir),
                "--gateway-key",
                str(files.gateway_public),
                "--scenario",
                "readings_flow",
                "rejects_bad_tokens",
                "--json",
                str(report_path),
            ]
        )
    finally:
        pymodbus.setLevel(level)
    out, err = capsys.readouterr()
    assert status == 0, out + err
    report = json.loads(report_path.read_text())
    assert report["counts"] == {"passed": 2, "failed": 0, "not-applicable": 0}
    assert "security: data and events sealed" in out
    assert report["security"].startswith("data and events sealed")
    assert set(report["traffic"]["data"]) == {"sealed"}
    assert set(report["traffic"]["ack"]) == {"signed"}


def test_cli_says_which_keys_a_sealed_gateway_needs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = make_key_files(tmp_path)
    config = sealed_config(tmp_path, free_port())
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "--hub-keys DIR" in err and "--gateway-key FILE or --gateways DIR" in err

    # A private key others may read is refused, like everywhere else in the project.
    files.post_key.chmod(0o644)
    assert main(["--config", str(config), "--post-key", str(files.post_key)]) == 2
    assert "control-post key" in capsys.readouterr().err

    # An enrolment folder without this gateway.
    shutil.rmtree(files.enrolment / GATEWAY)
    with pytest.raises(BenchKeyError, match=f"no key for gateway {GATEWAY}"):
        load_bench_keys(GATEWAY, gateways=files.enrolment)


def test_the_control_post_opens_and_verifies_what_it_can_and_refuses_the_rest(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    """Without an agent: crafted messages on the gateway's topics. Only what opens with the
    hub's key and verifies with the gateway's is read; the rest is kept with the reason and
    never taken for a reading or an answer. Commands are tokens the gateway's verifier takes,
    with strictly increasing iat even in a burst."""
    files = make_key_files(tmp_path)
    base = f"{PREFIX}/{GATEWAY}"
    signer = load_gateway_signer(files.gateway_dir)
    hub_keys = load_hub_private_keys(files.hub_dir)
    (hub_key,) = hub_keys.values()
    post_private = load_ed25519_private_key(files.post_key)
    keys = BenchKeys(
        post=load_bench_keys(GATEWAY, post_key=files.post_key).post,
        hub=hub_keys,
        gateway={signer.skid: signer.public_key},
    )
    sealer = Sealer(GATEWAY, hub_key.public, signer)
    stranger = GatewaySigner.generate()

    def batch(seq: int) -> bytes:
        reading = {
            "device": "lamp-1",
            "point": "actual_level",
            "value": 40.0,
            "unit": "%",
            "ts": now_ms(),
            "quality": "good",
        }
        document = {"v": 1, "gateway": GATEWAY, "seq": seq, "batch": f"b{seq}"}
        return json.dumps({**document, "readings": [reading]}).encode()

    def ack(command_id: str, seq: int, gateway: str = GATEWAY) -> dict[str, Any]:
        document = {"v": 1, "gateway": gateway, "seq": seq, "ts": now_ms()}
        return {**document, "id": command_id, "status": "ok"}

    good_ack = sign_ack(ack("c-ok", 10), signer, signer.skid).encode()
    header, _, signature = good_ack.split(b".")
    other_payload = base64.urlsafe_b64encode(json.dumps(ack("c-altered", 11)).encode())
    sealed = sealer.seal("data", 1, 1, 0, 0, batch(1))
    sent: list[tuple[str, bytes]] = [
        ("data", sealed),
        ("data", sealed),  # a re-delivery: dropped
        (
            "data",
            Sealer(GATEWAY, HubPrivateKey.generate().public, signer).seal(
                "data", 2, 2, 0, 0, batch(2)
            ),
        ),
        ("data", Sealer(GATEWAY, hub_key.public, stranger).seal("data", 3, 3, 0, 0, batch(3))),
        ("event", json.dumps({"v": 1, "gateway": GATEWAY, "seq": 4, "kind": "x"}).encode()),
        ("data", b"not an envelope"),
        ("ack", good_ack),
        ("ack", sign_ack(ack("c-forged", 12), stranger, stranger.skid).encode()),
        ("ack", b".".join((header, other_payload.rstrip(b"="), signature))),
        ("ack", json.dumps(ack("c-plain", 13)).encode()),
        ("ack", sign_ack(ack("c-elsewhere", 14, "other-gw"), signer, signer.skid).encode()),
    ]

    async def body() -> None:
        post = ControlPost(
            MqttSettings(host="127.0.0.1", port=broker.port, client_id="hil-test-post"),
            prefix=PREFIX,
            gateway_id=GATEWAY,
            keys=keys,
            require_sealed=True,
            require_signed_acks=True,
        )
        await post.connect()
        publisher = Publisher(broker.port)
        try:
            for kind, payload in sent:
                await publisher.send(f"{base}/{kind}", payload)
            await post.wait_for(
                lambda: len(post.messages()) + post.duplicates >= len(sent), 10.0, "messages"
            )
            # Commands: signed tokens the gateway's own verifier accepts, on strict ordering of
            # iat (a clock it does not trust), for a burst longer than the iat look-ahead.
            replay = MemoryReplayStore()
            for number in range(12):
                command = {"id": f"c-{number}", "action": "dim", "target": {"all": True}}
                token = await post.command_payload({**command, "level": 10})
                verified = await verify_command(
                    token,
                    keys={keys.post.kid: post_private.public_key()} if keys.post else {},
                    audience=GATEWAY,
                    now_ms=now_ms(),
                    clock=ClockState(False),
                    replay=replay,
                )
                assert verified.body["level"] == 10
                assert verified.body["expires"] == verified.expires_at_s * 1000
        finally:
            publisher.close()
            await post.close()

        assert post.duplicates == 1
        messages = post.messages()
        by_kind: dict[str, list[HubMessage]] = {}
        for message in messages:
            by_kind.setdefault(message.kind, []).append(message)
        data = by_kind["data"]
        assert [m.protection for m in data] == ["sealed", "refused", "refused", "refused"]
        assert data[0].payload.startswith(MAGIC)
        assert data[0].doc["readings"][0]["value"] == 40.0
        assert [r["seq"] for r in (m.doc for m in data if m.doc)] == [1]
        assert data[1].refusal is not None and data[1].refusal.startswith("unknown_hub_key")
        assert data[2].refusal is not None and data[2].refusal.startswith("unknown_gateway_key")
        assert data[3].refusal is not None and data[3].refusal.startswith("malformed")
        (event,) = by_kind["event"]
        assert event.refusal is not None and event.refusal.startswith("plaintext")
        assert [r["device"] for r in post.readings()] == ["lamp-1"]

        acks = by_kind["ack"]
        assert [m.protection for m in acks] == ["signed", *["refused"] * 4]
        assert [(m.refusal or "").split(":")[0] for m in acks[1:]] == [
            "unknown_key",
            "bad_signature",
            "unsigned",
            "wrong_audience",
        ]
        assert [m.doc["id"] for m in post.acks("c-ok")] == ["c-ok"]
        for refused in ("c-forged", "c-altered", "c-plain", "c-elsewhere"):
            assert post.acks(refused) == []
        assert len(post.refused()) == 8
        assert post.traffic() == {
            "data": {"sealed": 1, "refused": 3},
            "event": {"refused": 1},
            "ack": {"signed": 1, "refused": 4},
        }

    asyncio.run(body())


def test_without_a_post_key_commands_are_plain_json_with_their_expiry(
    broker: MosquittoBroker,
) -> None:
    async def body() -> None:
        post = ControlPost(
            MqttSettings(host="127.0.0.1", port=broker.port, client_id="hil-test-plain"),
            prefix=PREFIX,
            gateway_id=GATEWAY,
        )
        assert not post.signs_commands
        body = {"id": "c-1", "action": "dim", "target": {"all": True}, "level": 10}
        document = json.loads(await post.command_payload(body))
        assert document == {**body, "expires": document["expires"]}
        assert document["expires"] > now_ms()
        issued_at_s = int(time.time()) - 70
        backdated = json.loads(await post.command_payload(body, issued_at_s=issued_at_s))
        assert backdated["expires"] == (issued_at_s + 60) * 1000
        with pytest.raises(ValueError, match="no control-post key"):
            await post.sign(body)
        # A key given explicitly still signs (the token checks' "unknown key" case).
        other = PostKey.from_private_key(Ed25519PrivateKey.generate())
        assert len((await post.sign(body, key=other)).split(b".")) == 3

    asyncio.run(body())


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
            "rejects_bad_tokens": Status.NOT_APPLICABLE,
            "lamp_failure_alarm": Status.NOT_APPLICABLE,
            "device_offline_alarm": Status.NOT_APPLICABLE,
        }
        assert report.ok
        results = {r.name: r for r in report.results}
        assert "--allow-commands" in results["dim_round_trip"].details[0]
        assert "--allow-commands" in results["rejects_bad_tokens"].details[0]
        assert "fault injection" in results["lamp_failure_alarm"].details[0]
        (line,) = result_lines(results["device_offline_alarm"])
        assert line.startswith("NOT APPLICABLE") and "bench target" in line
        # Nothing was written to the equipment.
        assert all(not equipment.unit(u).writes for u in (1, 2, 3))
        document = report.as_json()
        assert document["counts"] == {"passed": 1, "failed": 0, "not-applicable": 5}
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
