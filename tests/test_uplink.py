"""The uplink against a real Mosquitto: status and will, forwarding, outages, refusals, commands."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import agent
from agent import uplink as uplink_module
from agent.backoff import backoff_delay_s
from agent.mqtt import MqttSettings, TlsSettings
from agent.uplink import Uplink
from tests.support.mosquitto import (
    MosquittoBroker,
    Received,
    Subscriber,
    free_port,
    make_pki,
)

WAIT_S = 15.0
PREFIX = "lampyre/v1"
GW = "cab-0042"
BASE = f"{PREFIX}/{GW}"
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# An in-memory record store: a fake at the storage seam, implementing RecordSource.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeRecord:
    seq: int
    lane: int
    topic: str
    payload: bytes


class MemorySource:
    def __init__(self) -> None:
        self.records: dict[int, FakeRecord] = {}
        self.deleted: list[int] = []
        self.fail_pending = 0  # how many next pending() calls raise, as a broken disk would
        self._next = 1

    def add(self, topic: str, payload: bytes | None = None, lane: int = 2) -> FakeRecord:
        seq = self._next
        self._next += 1
        record = FakeRecord(
            seq, lane, topic, payload if payload is not None else f"r{seq}".encode()
        )
        self.records[seq] = record
        return record

    async def pending(self, limit: int, exclude: Collection[int] = ()) -> list[FakeRecord]:
        if self.fail_pending > 0:
            self.fail_pending -= 1
            raise OSError("disk I/O error")
        excluded = set(exclude)
        ordered = sorted(self.records.values(), key=lambda r: (r.lane, r.seq))
        return [r for r in ordered if r.seq not in excluded][:limit]

    async def ack(self, seqs: list[int]) -> int:
        gone = [s for s in seqs if self.records.pop(s, None) is not None]
        self.deleted.extend(gone)
        return len(gone)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def run(body: Callable[[], Awaitable[None]], timeout_s: float = 60.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout_s):
            await body()

    asyncio.run(bounded())


@pytest.fixture(autouse=True)
def fast_timings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uplink_module, "BACKOFF_BASE_S", 0.05)
    monkeypatch.setattr(uplink_module, "BACKOFF_CAP_S", 0.3)
    monkeypatch.setattr(uplink_module, "IDLE_POLL_S", 0.2)


async def _ignore(_payload: bytes) -> None:
    return None


def make_uplink(
    broker: MosquittoBroker | int,
    source: MemorySource,
    on_command: Callable[[bytes], Awaitable[None]] = _ignore,
    max_inflight: int = 64,
    **settings: object,
) -> Uplink:
    port = broker if isinstance(broker, int) else broker.port
    base: dict[str, object] = {"host": "127.0.0.1", "port": port, "client_id": f"lampyre-{GW}"}
    base.update(settings)
    return Uplink(
        MqttSettings(**base),  # type: ignore[arg-type]
        prefix=PREFIX,
        gateway_id=GW,
        buffer=source,
        on_command=on_command,
        max_inflight=max_inflight,
    )


def statuses(messages: list[Received]) -> list[dict[str, object]]:
    return [json.loads(m.payload) for m in messages if m.topic == f"{BASE}/status"]


def has_status(state: str, reason: str | None = None) -> Callable[[list[Received]], bool]:
    def predicate(messages: list[Received]) -> bool:
        return any(
            s["state"] == state and (reason is None or s.get("reason") == reason)
            for s in statuses(messages)
        )

    return predicate


def data_payloads(messages: list[Received]) -> list[bytes]:
    return [m.payload for m in messages if m.topic != f"{BASE}/status"]


async def until(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while not predicate():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --------------------------------------------------------------------------------------------
# Status, will, shutdown
# --------------------------------------------------------------------------------------------


def test_online_status_is_retained_and_clean_shutdown_publishes_offline(
    broker: MosquittoBroker,
) -> None:
    async def body() -> None:
        source = MemorySource()
        up = make_uplink(broker, source)
        with Subscriber(broker, f"{BASE}/#") as sub:
            task = asyncio.create_task(up.run())
            got = await sub.wait_for_async(has_status("online"), WAIT_S)
            online = statuses(got)[-1]
            assert online["gateway"] == GW and online["version"] == agent.__version__
            assert isinstance(online["ts"], int)
            before = up.stats
            assert before.state == "online" and before.connected_since_ms is not None

            # A subscriber arriving later learns the state from the retained message.
            with Subscriber(broker, f"{BASE}/status") as late:
                got = await late.wait_for_async(lambda m: len(m) >= 1, WAIT_S)
                assert got[0].retain and json.loads(got[0].payload)["state"] == "online"

            await stop(task)
            got = await sub.wait_for_async(has_status("offline", "shutdown"), WAIT_S)
            after = up.stats
            assert after.state == "offline" and after.connected_since_ms is None

        # Clean DISCONNECT: the will ("connection lost") never fires; the retained state is the
        # shutdown one.
        with Subscriber(broker, f"{BASE}/status") as late:
            got = await late.wait_for_async(lambda m: len(m) >= 1, WAIT_S)
            assert json.loads(got[0].payload)["reason"] == "shutdown"
        assert not has_status("offline", "connection lost")(sub.messages)

    run(body)


_CHILD = """
import asyncio, sys
from agent.mqtt import MqttSettings
from agent.uplink import Uplink

class Empty:
    async def pending(self, limit, exclude=()):
        return []
    async def ack(self, seqs):
        return 0

async def ignore(payload):
    return None

async def main():
    up = Uplink(MqttSettings(port=int(sys.argv[1]), client_id="lampyre-child"),
                prefix=sys.argv[2], gateway_id=sys.argv[3], buffer=Empty(), on_command=ignore)
    await up.run()

asyncio.run(main())
"""


def test_last_will_marks_the_gateway_offline_when_the_agent_dies(
    broker: MosquittoBroker,
) -> None:
    async def body() -> None:
        with Subscriber(broker, f"{BASE}/status") as sub:
            child = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(broker.port), PREFIX, GW],
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
            try:
                await sub.wait_for_async(has_status("online"), WAIT_S)
                child.send_signal(signal.SIGKILL)  # no clean shutdown, the socket just dies
                await asyncio.to_thread(child.wait, 10)
                got = await sub.wait_for_async(has_status("offline", "connection lost"), WAIT_S)
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait(10)
        will = [m for m in got if json.loads(m.payload)["state"] == "offline"][-1]
        assert json.loads(will.payload)["gateway"] == GW
        # The will is retained too: a late subscriber sees the gateway offline.
        with Subscriber(broker, f"{BASE}/status") as late:
            got = await late.wait_for_async(lambda m: len(m) >= 1, WAIT_S)
            assert json.loads(got[0].payload)["reason"] == "connection lost"

    run(body)


# --------------------------------------------------------------------------------------------
# Forwarding
# --------------------------------------------------------------------------------------------


def test_records_are_forwarded_in_lane_order_and_deleted_after_puback(
    broker: MosquittoBroker,
) -> None:
    async def body() -> None:
        source = MemorySource()
        for i in range(30):
            source.add("data", lane=2)
            if i % 7 == 0:
                source.add("event", lane=0)
            if i % 11 == 0:
                source.add("ack", lane=1)
        expected = [
            r.payload for r in sorted(source.records.values(), key=lambda r: (r.lane, r.seq))
        ]
        topics = {r.payload: r.topic for r in source.records.values()}
        up = make_uplink(broker, source, max_inflight=8)
        with Subscriber(broker, f"{BASE}/#") as sub:
            task = asyncio.create_task(up.run())
            try:
                got = await sub.wait_for_async(
                    lambda m: len(data_payloads(m)) >= len(expected), WAIT_S
                )
                assert data_payloads(got) == expected
                for m in got:
                    if m.topic != f"{BASE}/status":
                        assert m.topic == f"{BASE}/{topics[m.payload]}" and not m.retain
                await until(lambda: not source.records, "every record deleted")
                assert sorted(source.deleted) == sorted(range(1, len(expected) + 1))
                stats = up.stats
                assert stats.acked == stats.published == len(expected)
                assert stats.rejected == 0 and stats.inflight == 0

                # New records are sent as soon as the uplink is notified.
                late = source.add("event", b"late alarm", lane=0)
                up.notify()
                await sub.wait_for_async(lambda m: b"late alarm" in data_payloads(m), WAIT_S)
                await until(lambda: late.seq not in source.records, "late record deleted")
            finally:
                await stop(task)

    run(body)


def test_records_stay_in_the_buffer_until_the_broker_acknowledges(
    broker: MosquittoBroker,
) -> None:
    async def body() -> None:
        source = MemorySource()
        up = make_uplink(broker, source)
        task = asyncio.create_task(up.run())
        try:
            await until(lambda: up.stats.state == "online", "online")
            broker.pause()  # PUBLISH packets reach the socket; no PUBACK comes back
            for _ in range(5):
                source.add("data")
            up.notify()
            await until(lambda: up.stats.published == 5, "records handed to the broker")
            await asyncio.sleep(0.3)  # ample time to (wrongly) delete without a PUBACK
            assert len(source.records) == 5 and source.deleted == []
            assert up.stats.inflight == 5 and up.stats.acked == 0
            broker.resume()
            await until(lambda: not source.records, "records deleted after PUBACK")
            assert sorted(source.deleted) == [1, 2, 3, 4, 5]
        finally:
            broker.resume()
            await stop(task)

    run(body)


def test_broker_restart_mid_stream_loses_nothing(tmp_path: Path) -> None:
    """The broker goes away with a full window in flight and comes back on the same port: the
    uplink reconnects by itself and every record reaches a persistent subscriber (duplicates
    allowed). The broker saves its sessions on a clean stop, so what it acknowledged is kept;
    what it did not acknowledge is still in our buffer."""
    window = 16

    async def body() -> None:
        broker = MosquittoBroker(tmp_path / "b", persistence=True)
        broker.start()
        source = MemorySource()
        up = make_uplink(broker, source, max_inflight=window)
        sub = Subscriber(broker, f"{BASE}/data", client_id="hub-sim", persistent=True)
        sub.start()
        task = asyncio.create_task(up.run())
        try:
            for _ in range(100):
                source.add("data")
            up.notify()
            await until(lambda: not source.records, "first records delivered")
            # Mid-stream: a hung broker leaves a full window unacknowledged, then goes away.
            broker.pause()
            for _ in range(300):
                source.add("data")
            up.notify()
            await until(lambda: up.stats.inflight == window, "a full window in flight")
            acked_before = up.stats.acked
            await asyncio.to_thread(broker.stop)
            for _ in range(300):  # produced while the hub is unreachable
                source.add("data")
            up.notify()
            await until(lambda: up.stats.state != "online", "uplink noticed the outage")
            await asyncio.to_thread(broker.start)
            await until(lambda: not source.records, "buffer drained after the restart", 30.0)
            expected = {f"r{seq}".encode() for seq in range(1, 701)}
            got = await sub.wait_for_async(lambda m: expected <= {x.payload for x in m}, 30.0)
            assert {m.payload for m in got} == expected
            assert acked_before == 100
            assert up.stats.reconnects >= 1 and up.stats.state == "online"
            # Whatever was in flight at the outage went again (at-least-once).
            assert up.stats.published >= 700
        finally:
            await stop(task)
            sub.stop()
            broker.stop()

    run(body, timeout_s=90.0)


def test_refused_record_stays_and_is_retried_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mosquitto 2.0.11 answers a PUBLISH its ACL denies with PUBACK 0x87 (Not authorized)
    under MQTT 5: the record stays in the buffer and is offered again after a pause."""
    monkeypatch.setattr(uplink_module, "REJECT_RETRY_S", 0.3)
    acl = tmp_path / "acl"
    acl.write_text(
        f"topic readwrite {BASE}/status\ntopic read {BASE}/cmd\ntopic write {BASE}/data\n"
    )

    async def body() -> None:
        with MosquittoBroker(tmp_path / "b", extra_conf=f"acl_file {acl}") as strict:
            source = MemorySource()
            refused = source.add("event", b"alarm nobody may publish", lane=0)
            for _ in range(5):
                source.add("data")
            up = make_uplink(strict, source)
            task = asyncio.create_task(up.run())
            try:
                await until(lambda: set(source.records) == {refused.seq}, "data records sent")
                await until(lambda: up.stats.rejected >= 3, "refused record retried")
                # Retried after a pause, not in a hot loop: a handful of attempts, not thousands.
                assert up.stats.rejected < 50
                assert refused.seq in source.records and refused.seq not in source.deleted
                assert "0x87" in (up.stats.last_error or "")
                assert up.stats.state == "online"
            finally:
                await stop(task)

    run(body)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("0x87" in w and "Not authorized" in w for w in warnings)
    # Rate-limited: one warning for several refusals.
    assert sum("refused record" in w for w in warnings) == 1


def test_a_failing_buffer_read_does_not_kill_the_uplink(
    broker: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        source = MemorySource()
        source.add("data", b"survivor")
        source.fail_pending = 1
        up = make_uplink(broker, source)
        with Subscriber(broker, f"{BASE}/data") as sub:
            task = asyncio.create_task(up.run())
            try:
                await sub.wait_for_async(lambda m: b"survivor" in data_payloads(m), WAIT_S)
                await until(lambda: not source.records, "record deleted")
                assert up.stats.reconnects >= 1
                assert not task.done()
            finally:
                await stop(task)

    run(body)
    assert any(r.exc_info and "uplink session failed" in r.message for r in caplog.records)


# --------------------------------------------------------------------------------------------
# Reconnection
# --------------------------------------------------------------------------------------------


def test_unreachable_hub_is_logged_once_then_connects_when_it_appears(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()

    async def body() -> None:
        source = MemorySource()
        source.add("data", b"kept while offline")
        up = make_uplink(port, source)
        task = asyncio.create_task(up.run())
        try:
            await until(
                lambda: sum("failed again" in r.getMessage() for r in caplog.records) >= 3,
                "several refused attempts",
            )
            assert up.stats.state in ("offline", "connecting")
            assert "refused" in (up.stats.last_error or "")
            with MosquittoBroker(tmp_path / "b", port=port) as late:
                with Subscriber(late, f"{BASE}/#") as sub:
                    await sub.wait_for_async(
                        lambda m: b"kept while offline" in data_payloads(m), WAIT_S
                    )
                await until(lambda: not source.records, "record deleted")
                assert up.stats.reconnects == 0  # the first connection, not a reconnection
                await stop(task)
        finally:
            if not task.done():
                await stop(task)

    run(body)
    refused = [
        r for r in caplog.records if r.levelname == "WARNING" and "cannot connect" in r.getMessage()
    ]
    assert len(refused) == 1


@settings(max_examples=200, deadline=None)
@given(attempt=st.integers(min_value=0, max_value=10_000), seed=st.integers(0, 2**32))
def test_backoff_is_full_jitter_under_an_exponential_ceiling(attempt: int, seed: int) -> None:
    import random

    delay = backoff_delay_s(attempt, base_s=0.5, cap_s=30.0, rng=random.Random(seed))
    assert 0.0 <= delay <= min(30.0, 0.5 * 2 ** min(attempt, 64))


def test_backoff_spreads_reconnections() -> None:
    import random

    rng = random.Random(1)
    delays = [backoff_delay_s(10, base_s=0.5, cap_s=30.0, rng=rng) for _ in range(200)]
    # Full jitter: a city's gateways do not come back in one wave.
    assert min(delays) < 5.0 and max(delays) > 25.0


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def test_commands_reach_the_handler_and_a_failing_handler_does_not_block_the_next(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        # One unacknowledged message per client: the second command arrives only if the first
        # was acknowledged, even though its handler raised.
        with MosquittoBroker(tmp_path / "b", extra_conf="max_inflight_messages 1") as one:
            received: list[bytes] = []

            async def on_command(payload: bytes) -> None:
                received.append(payload)
                if payload == b"bad":
                    raise ValueError("unparseable command")

            up = make_uplink(one, MemorySource(), on_command=on_command)
            task = asyncio.create_task(up.run())
            try:
                with Subscriber(one, f"{BASE}/status") as sender:
                    await sender.wait_for_async(has_status("online"), WAIT_S)
                    for payload in (b"bad", b'{"op":"dim","level":40}'):
                        sender.publish(f"{BASE}/cmd", payload, qos=1)
                    sender.publish(f"{PREFIX}/other-gw/cmd", b"not ours", qos=1)
                    await until(lambda: len(received) >= 2, "both commands handled")
                assert received == [b"bad", b'{"op":"dim","level":40}']
            finally:
                await stop(task)

    run(body)
    failures = [r for r in caplog.records if r.exc_info and "command handler failed" in r.message]
    assert len(failures) == 1


def test_uplink_over_mutual_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")

    async def body() -> None:
        with MosquittoBroker(tmp_path / "b", tls=pki.broker_tls()) as tls_broker:
            source = MemorySource()
            source.add("data", b"sealed over tls")
            tls = TlsSettings(pki.ca_file, pki.client_cert, pki.client_key)
            up = make_uplink(tls_broker, source, host="localhost", tls=tls)
            task = asyncio.create_task(up.run())
            try:
                await until(lambda: not source.records, "record sent over TLS")
                assert up.stats.state == "online"
            finally:
                await stop(task)

    run(body)
