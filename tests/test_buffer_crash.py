"""kill -9 of a process writing to the buffer: nothing it reported committed is lost.

A child process appends (and sometimes acks) in a loop and prints each seq once the call that
committed it has returned. The test kills it with SIGKILL at random moments, reopens the buffer
and checks every reported seq against the file. This tests the application's transaction logic
(a process crash); power cuts are what ``synchronous=FULL`` is for and need a bench.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import sys
from pathlib import Path

from agent.buffer import Buffer, Lane
from agent.crypto import RecordCipher, load_or_create_key

ROUNDS = 5
CHILD_START_TIMEOUT_S = 30.0
REPO_ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import asyncio, sys
from pathlib import Path
from agent.buffer import Buffer, Lane
from agent.crypto import RecordCipher, load_or_create_key

async def main(folder):
    cipher = RecordCipher(load_or_create_key(folder / "buffer.key"))
    buffer = Buffer(folder / "buffer.db", cipher, 64 * 1024 * 1024)
    await buffer.open()
    print("open", flush=True)
    step = 0
    while True:
        step += 1
        if step % 7 == 0:
            pending = await buffer.pending(3)
            seqs = [r.seq for r in pending]
            # Printed before the call: if killed now, these may or may not be gone.
            print("acking", *seqs, flush=True)
            await buffer.ack(seqs)
            print("acked", *seqs, flush=True)
        elif step % 3 == 0:
            seqs = await buffer.append_many(
                [(Lane.TELEMETRY, "data", lambda seq: b"batch %d" % seq)] * 5
            )
            print("committed", *seqs, flush=True)
        else:
            lane = Lane.ALARM if step % 2 else Lane.TELEMETRY
            seq = await buffer.append(lane, "event", lambda seq: b"record %d" % seq)
            print("committed", seq, flush=True)

asyncio.run(main(Path(sys.argv[1])))
"""


async def run_child_and_kill(folder: Path, rng: random.Random) -> list[list[str]]:
    """Start the child, let it commit a random number of times, SIGKILL it; its output lines."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(folder),
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    assert child.stdout is not None
    lines: list[list[str]] = []
    try:
        async with asyncio.timeout(CHILD_START_TIMEOUT_S):
            commits_before_kill = rng.randint(1, 40)
            commits = 0
            while commits < commits_before_kill:
                raw = await child.stdout.readline()
                assert raw, "the child exited on its own"
                lines.append(raw.decode().split())
                commits += lines[-1][0] == "committed"
            # Land the kill at a random point of the next transactions, not just after a print.
            await asyncio.sleep(rng.uniform(0.0, 0.02))
    finally:
        if child.returncode is None:
            child.send_signal(signal.SIGKILL)
        async with asyncio.timeout(CHILD_START_TIMEOUT_S):
            rest, _ = await child.communicate()
    assert child.returncode == -signal.SIGKILL
    # A line cut by the kill has no newline: only complete lines count as reported.
    complete = rest.decode().split("\n")[:-1]
    lines.extend(line.split() for line in complete)
    return lines


def test_sigkill_never_loses_a_committed_record(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)

    async def body(folder: Path) -> None:
        committed: set[int] = set()
        maybe_acked: set[int] = set()
        acked: set[int] = set()
        highest = 0
        for round_number in range(ROUNDS):
            lines = await run_child_and_kill(folder, rng)
            assert lines[0] == ["open"]
            reported: list[int] = []
            for kind, *values in lines[1:]:
                seqs = [int(v) for v in values]
                if kind == "committed":
                    reported.extend(seqs)
                elif kind == "acking":
                    maybe_acked.update(seqs)
                elif kind == "acked":
                    acked.update(seqs)
            context = f"round {round_number}, seed {seed}"
            assert reported, context
            # Sequence keeps increasing, also across the kill and restart.
            assert reported == sorted(reported), context
            assert reported[0] > highest, context
            highest = reported[-1]
            committed.update(reported)

            db = folder / "buffer.db"
            conn = sqlite3.connect(db)
            try:
                assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)], context
                stored = {seq for (seq,) in conn.execute("SELECT seq FROM records")}
            finally:
                conn.close()
            missing = committed - stored - maybe_acked
            assert not missing, f"{context}: committed but lost: {sorted(missing)}"
            assert not (stored & acked), f"{context}: acked but back: {sorted(stored & acked)}"

        # The buffer itself opens, decrypts everything and carries on above every seq seen.
        cipher = RecordCipher(load_or_create_key(folder / "buffer.key"))
        buffer = Buffer(folder / "buffer.db", cipher, 64 * 1024 * 1024)
        async with asyncio.timeout(CHILD_START_TIMEOUT_S):
            await buffer.open()
            try:
                records = await buffer.pending(100_000)
                assert {r.seq for r in records} >= committed - maybe_acked
                assert (await buffer.stats()).quarantined_total == 0
                assert all(r.payload.endswith(b" %d" % r.seq) for r in records)
                after = await buffer.append(Lane.ALARM, "event", lambda seq: b"after")
                assert after > highest
            finally:
                await buffer.close()

    asyncio.run(body(tmp_path))
