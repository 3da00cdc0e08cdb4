"""`python -m firmware_sim dali` serves a DALI line that the agent's own interface code drives."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from drivers.dali.codec import Opcode, Short, command
from drivers.dali.interface import Outcome, load_interface
from tests.e2e import REPO


@pytest.mark.parametrize("interface", ["foxtron", "sci2"])
def test_simulator_command_serves_a_line_on_a_pty(interface: str) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'firmware-sim'}{os.pathsep}{REPO}"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "firmware_sim",
            "dali",
            "--interface",
            interface,
            "--gear",
            "4",
            "--time-scale",
            "0.1",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("DALI pty: "), first
        path = first.removeprefix("DALI pty: ").strip()

        async def query() -> tuple[list[int | None], Outcome]:
            iface = load_interface(interface)(path)
            await iface.open()
            try:
                levels = []
                for address in range(5):
                    q = command(Short(address), Opcode.QUERY_ACTUAL_LEVEL)
                    answer = await iface.send(q.frame, expect_answer=True)
                    levels.append(answer.value if answer.outcome is Outcome.ANSWER else None)
                present = command(Short(0), Opcode.QUERY_CONTROL_GEAR_PRESENT)
                broadcast = await iface.send(
                    (0xFF << 8) | (present.frame & 0xFF), expect_answer=True
                )
                return levels, broadcast.outcome
            finally:
                await iface.close()

        levels, broadcast = asyncio.run(asyncio.wait_for(query(), 20))
        # Four addressed gear at full level; nobody at short address 4; all answer a broadcast.
        assert levels == [254, 254, 254, 254, None]
        assert broadcast is Outcome.COLLISION
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
