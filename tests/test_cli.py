"""The command line: `run` refuses what `check-config` refuses; `demo` runs a whole cabinet."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.cli import main
from tests.e2e import PROFILES, REPO
from tests.support.mosquitto import MosquittoBroker, free_port


def demo_copy(tmp_path: Path, broker_port: int) -> Path:
    """config/demo.toml with its buffer in tmp_path and the hub on the test's broker."""
    text = (REPO / "config" / "demo.toml").read_text()
    text = text.replace('profile_dirs = ["profiles"]', f'profile_dirs = ["{PROFILES}"]')
    text = re.sub(r'path = ".*buffer.db"', 'path = "buffer.db"', text)
    text = text.replace("port = 1883", f"port = {broker_port}")
    path = tmp_path / "demo.toml"
    path.write_text(text)
    return path


def test_run_refuses_an_invalid_configuration_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = demo_copy(tmp_path, 1883)
    lines = path.read_text().splitlines()
    number = next(i for i, line in enumerate(lines) if line.startswith("poll_interval_s")) + 1
    lines[number - 1] = 'poll_interval_s = "fast"'
    path.write_text("\n".join(lines))

    assert main(["check-config", str(path)]) == 1
    checked = capsys.readouterr().err
    assert main(["run", "--config", str(path)]) == 1
    refused = capsys.readouterr().err
    assert refused == checked
    assert f"{path}:{number}:" in refused and "expected a number" in refused
    assert not (tmp_path / "buffer.db").exists()


def test_demo_runs_the_cabinet_and_prints_how_to_watch_it(
    tmp_path: Path, broker: MosquittoBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    path = demo_copy(tmp_path, broker.port)
    assert main(["demo", "--config", str(path), "--seconds", "7"]) == 0
    out = capsys.readouterr().out
    assert f"using the MQTT broker already running at 127.0.0.1:{broker.port}" in out
    assert f"mosquitto_sub -h 127.0.0.1 -p {broker.port} -t 'lampyre/v1/demo-cabinet/#' -v" in out
    assert "mosquitto_pub" in out and "lampyre/v1/demo-cabinet/cmd" in out
    status = [line for line in out.splitlines() if "uplink online" in line]
    assert status, out
    acked = int(re.search(r"uplink online: (\d+) acked", status[-1]).group(1))  # type: ignore[union-attr]
    assert acked > 0
    assert re.search(r"lamp-1\s+online", out) and re.search(r"meter\s+online", out)
    assert (tmp_path / "buffer.db").exists()
    assert oct((tmp_path / "buffer.db.key").stat().st_mode & 0o777) == "0o600"


def test_demo_starts_a_private_broker_when_none_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = demo_copy(tmp_path, free_port())
    assert main(["demo", "--config", str(path), "--seconds", "6"]) == 0
    out = capsys.readouterr().out
    match = re.search(r"started a private Mosquitto on 127\.0\.0\.1:(\d+)", out)
    assert match, out
    assert f"mosquitto_sub -h 127.0.0.1 -p {match.group(1)} " in out
    status = [line for line in out.splitlines() if "uplink online" in line]
    assert status and int(re.search(r"(\d+) acked", status[-1]).group(1)) > 0  # type: ignore[union-attr]
