"""The pipeline: batches close by size or by age, events and acks go at once on their lanes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence

from agent.buffer import Lane
from agent.pipeline import Pipeline
from agent.sdk import Quality, Reading


class MemoryBuffer:
    """Stores what the pipeline appends (the storage seam; the real buffer has its own tests)."""

    def __init__(self) -> None:
        self.records: list[tuple[int, Lane, str, dict[str, object]]] = []
        self.stored = asyncio.Event()

    async def append_many(
        self, items: Sequence[tuple[Lane, str, Callable[[int], bytes]]]
    ) -> list[int]:
        seqs = []
        for lane, topic, make in items:
            seq = len(self.records) + 1
            self.records.append((seq, lane, topic, json.loads(make(seq))))
            seqs.append(seq)
        self.stored.set()
        return seqs


def reading(n: int) -> Reading:
    return Reading("lamp-1", f"p{n}", n, "W", 1_000 + n, Quality.GOOD)


def run(body: Callable[[Pipeline, MemoryBuffer], object], **kwargs: float) -> MemoryBuffer:
    async def main() -> MemoryBuffer:
        buffer = MemoryBuffer()
        pipeline = Pipeline(
            "gw",
            buffer,
            batch_max_readings=int(kwargs.get("batch", 10)),
            batch_max_delay_s=kwargs.get("delay", 0.05),
        )
        task = asyncio.create_task(pipeline.run())
        try:
            async with asyncio.timeout(10):
                await body(pipeline, buffer)  # type: ignore[misc]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return buffer

    return asyncio.run(main())


def test_a_lone_reading_is_sent_after_the_batch_delay() -> None:
    async def body(pipeline: Pipeline, buffer: MemoryBuffer) -> None:
        pipeline.submit([reading(1)])
        await buffer.stored.wait()

    buffer = run(body, batch=1000, delay=0.05)
    ((seq, lane, topic, payload),) = buffer.records
    assert (lane, topic) == (Lane.TELEMETRY, "data")
    assert payload["seq"] == seq and payload["gateway"] == "gw"
    assert payload["readings"] == [
        {"device": "lamp-1", "point": "p1", "value": 1, "unit": "W", "ts": 1001, "quality": "good"}
    ]


def test_full_batches_are_cut_at_the_size_limit_and_nothing_is_lost() -> None:
    async def body(pipeline: Pipeline, buffer: MemoryBuffer) -> None:
        pipeline.submit([reading(n) for n in range(25)])
        while sum(len(r[3]["readings"]) for r in buffer.records) < 25:  # type: ignore[arg-type]
            await asyncio.sleep(0.01)

    buffer = run(body, batch=10, delay=0.05)
    sizes = [len(r[3]["readings"]) for r in buffer.records]  # type: ignore[arg-type]
    assert sizes[:2] == [10, 10] and sum(sizes) == 25
    points = [x["point"] for r in buffer.records for x in r[3]["readings"]]  # type: ignore[attr-defined]
    assert points == [f"p{n}" for n in range(25)]


def test_events_and_acks_are_stored_at_once_on_their_lanes() -> None:
    async def body(pipeline: Pipeline, buffer: MemoryBuffer) -> None:
        pipeline.event("lamp_failure", "lamp-1", "raised", {"point": "lamp_failure"})
        pipeline.ack({"id": "c1", "status": "ok"})
        while len(buffer.records) < 2:
            await asyncio.sleep(0.01)

    buffer = run(body, batch=10, delay=60)
    lanes = {topic: (lane, payload) for _, lane, topic, payload in buffer.records}
    assert lanes["event"][0] is Lane.ALARM
    assert lanes["event"][1]["kind"] == "lamp_failure"
    assert lanes["event"][1]["severity"] == "alarm"
    assert lanes["ack"][0] is Lane.ACK and lanes["ack"][1]["id"] == "c1"


def test_cancellation_stores_what_was_already_measured() -> None:
    async def body(pipeline: Pipeline, buffer: MemoryBuffer) -> None:
        await asyncio.sleep(0.01)  # the pipeline is running, waiting for the batch to age
        pipeline.submit([reading(1), reading(2)])
        await asyncio.sleep(0.01)
        assert not buffer.records

    buffer = run(body, batch=100, delay=60)
    assert [len(r[3]["readings"]) for r in buffer.records] == [2]  # type: ignore[arg-type]
