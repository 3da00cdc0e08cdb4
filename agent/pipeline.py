"""From readings, events and acks to buffered MQTT payloads.

Readings are batched (by count or by age); events and command acks are written at once on their
own lanes. Every payload is built knowing its buffer sequence number, so the hub can drop the
duplicates that at-least-once delivery produces.

With a :class:`~agent.envelope.Sealer`, each batch and each event is sealed for the hub and
signed when it is built, before it reaches the buffer: the buffer only ever holds envelopes the
gateway cannot open again. Acks are signed with the gateway key (compact JWS) and stay readable
by the control post, which holds no hub key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from agent.buffer import Lane
from agent.envelope import GatewaySigner, Sealer
from agent.jws import sign_ack
from agent.sdk import Reading, now_ms

log = logging.getLogger(__name__)

PAYLOAD_VERSION = 1

MAX_PENDING_BATCHES = 20
"""Readings kept in memory beyond this many full batches wait for the buffer (backpressure is
logged, not silent): ``submit`` never blocks a driver, but the flush runs as soon as it can."""


class BufferSink(Protocol):
    async def append_many(
        self, items: Sequence[tuple[Lane, str, Callable[[int], bytes]]]
    ) -> list[int]: ...


class Severity:
    """How urgent an event is for the control post."""

    ALARM = "alarm"
    WARNING = "warning"
    INFO = "info"


EVENT_SEVERITY = {
    "lamp_failure": Severity.ALARM,
    "device_offline": Severity.ALARM,
    "bus_offline": Severity.ALARM,
    "buffer_drop": Severity.WARNING,
    "buffer_tampered": Severity.ALARM,
    "command_rejected": Severity.INFO,
}


def _dumps(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None (strict JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def reading_json(reading: Reading) -> dict[str, Any]:
    return {
        "device": reading.device,
        "point": reading.point,
        "value": reading.value,
        "unit": reading.unit,
        "ts": reading.ts_ms,
        "quality": reading.quality.value,
    }


class Pipeline:
    """Batches readings and writes batches, events and acks to the buffer."""

    def __init__(
        self,
        gateway_id: str,
        buffer: BufferSink,
        *,
        batch_max_readings: int,
        batch_max_delay_s: float,
        on_stored: Callable[[], None] = lambda: None,
        sealer: Sealer | None = None,
        ack_signer: GatewaySigner | None = None,
    ) -> None:
        self.gateway_id = gateway_id
        self._sealer = sealer
        self._ack_signer = ack_signer
        self._buffer = buffer
        self._batch_max = batch_max_readings
        self._delay_s = batch_max_delay_s
        self._on_stored = on_stored
        self._readings: list[Reading] = []
        self._urgent: list[tuple[Lane, str, Callable[[int], bytes]]] = []
        self._wake = asyncio.Event()
        self._first_reading_at: float | None = None
        self._flushed = asyncio.Event()
        self.readings_in = 0
        self.batches_out = 0
        self.events_out = 0
        self._overflow_logged = False
        self._storing = 0

    # ---------------------------------------------------------------- inputs
    def submit(self, readings: Sequence[Reading]) -> None:
        """Take readings (non-blocking, from the event loop)."""
        if not readings:
            return
        if not self._readings:
            self._first_reading_at = asyncio.get_running_loop().time()
            # Let the flush loop start this batch's age deadline.
            self._wake.set()
        self._readings.extend(readings)
        self.readings_in += len(readings)
        if len(self._readings) >= self._batch_max:
            self._wake.set()
        if (
            len(self._readings) > self._batch_max * MAX_PENDING_BATCHES
            and not self._overflow_logged
        ):
            self._overflow_logged = True
            log.warning(
                "pipeline: %d readings waiting for the buffer; storage is slower than the buses",
                len(self._readings),
            )

    def event(
        self,
        kind: str,
        device: str | None,
        state: str,
        detail: Mapping[str, Any],
        severity: str | None = None,
    ) -> None:
        """Queue an event (alarm lane), written at the next turn of the loop. ``severity``
        defaults to the kind's in :data:`EVENT_SEVERITY`, else info."""
        body: dict[str, Any] = {
            "v": PAYLOAD_VERSION,
            "gateway": self.gateway_id,
            "id": uuid.uuid4().hex,
            "ts": now_ms(),
            "kind": kind,
            "state": state,
            "severity": severity or EVENT_SEVERITY.get(kind, Severity.INFO),
            "device": device,
            "detail": dict(detail),
        }
        log.info("event %s %s device=%s %s", kind, state, device, dict(detail))
        self._urgent.append((Lane.ALARM, "event", self._event_payload(body)))
        self.events_out += 1
        self._wake.set()

    def ack(self, body: Mapping[str, Any]) -> None:
        """Queue a command acknowledgement (ack lane)."""
        document = {"v": PAYLOAD_VERSION, "gateway": self.gateway_id, "ts": now_ms(), **body}
        self._urgent.append((Lane.ACK, "ack", self._ack_payload(document)))
        self._wake.set()

    def backlog(self) -> int:
        """Items taken in and not yet stored."""
        return len(self._readings) + len(self._urgent) + self._storing

    # ------------------------------------------------------------------ loop
    async def run(self) -> None:
        """Flush until cancelled; on cancellation, flush what is left."""
        try:
            while True:
                timeout = self._time_to_deadline()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                self._wake.clear()
                await self.flush(only_due=True)
        finally:
            # A cancelled agent still stores what it already measured (cancellation is delivered
            # once; this await runs to completion unless the caller cancels twice).
            await self.flush(only_due=False)

    def _time_to_deadline(self) -> float | None:
        if self._urgent:
            return 0
        if self._first_reading_at is None:
            return None
        elapsed = asyncio.get_running_loop().time() - self._first_reading_at
        return max(0.0, self._delay_s - elapsed)

    async def flush(self, *, only_due: bool = False) -> None:
        """Write urgent items and the batches that are full or old enough."""
        items = self._urgent
        self._urgent = []
        if self._readings:
            loop_time = asyncio.get_running_loop().time()
            age = loop_time - (self._first_reading_at or loop_time)
            take_all = not only_due or age >= self._delay_s
            cut = (
                len(self._readings)
                if take_all
                else (len(self._readings) // self._batch_max * self._batch_max)
            )
            if cut:
                readings, self._readings = self._readings[:cut], self._readings[cut:]
                self._first_reading_at = loop_time if self._readings else None
                for start in range(0, len(readings), self._batch_max):
                    items.append(
                        (
                            Lane.TELEMETRY,
                            "data",
                            self._batch(readings[start : start + self._batch_max]),
                        )
                    )
                    self.batches_out += 1
        if not items:
            return
        self._storing += len(items)
        try:
            await self._buffer.append_many(items)
        except Exception:
            # Put them back: nothing measured is dropped because storage hiccupped once.
            log.exception("pipeline: storing %d records failed; will retry", len(items))
            telemetry = [item for item in items if item[0] is Lane.TELEMETRY]
            self._urgent = [item for item in items if item[0] is not Lane.TELEMETRY] + self._urgent
            if telemetry:
                self._urgent.extend(telemetry)
            await asyncio.sleep(1.0)
            self._wake.set()
            return
        finally:
            self._storing -= len(items)
        self._overflow_logged = False
        self._on_stored()

    # -------------------------------------------------------------- payloads
    def _batch(self, readings: Sequence[Reading]) -> Callable[[int], bytes]:
        batch_id = uuid.uuid4().hex
        rendered = [reading_json(r) for r in readings]
        sealer = self._sealer
        t_first = min(r.ts_ms for r in readings)
        t_last = max(r.ts_ms for r in readings)

        def make(seq: int) -> bytes:
            body = _dumps(
                {
                    "v": PAYLOAD_VERSION,
                    "gateway": self.gateway_id,
                    "seq": seq,
                    "batch": batch_id,
                    "readings": rendered,
                }
            )
            if sealer is None:
                return body
            return sealer.seal("data", seq, seq, t_first, t_last, body)

        return make

    def _event_payload(self, body: Mapping[str, Any]) -> Callable[[int], bytes]:
        sealer = self._sealer
        ts = int(body["ts"])

        def make(seq: int) -> bytes:
            plain = _dumps({**body, "seq": seq})
            if sealer is None:
                return plain
            return sealer.seal("event", seq, seq, ts, ts, plain)

        return make

    def _ack_payload(self, body: Mapping[str, Any]) -> Callable[[int], bytes]:
        signer = self._ack_signer

        def make(seq: int) -> bytes:
            document = {**body, "seq": seq}
            if signer is None:
                return _dumps(document)
            # JWS payloads are strict JSON: a NaN read back from a device becomes null, or
            # the record could never be built (and would block the lane).
            return sign_ack(_json_safe(document), signer, signer.skid).encode("ascii")

        return make
