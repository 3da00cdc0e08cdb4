"""``MqttSettings.session_expiry_s`` against a real Mosquitto: 0 (the default) keeps the clean,
expiring session the agent has always used; more keeps a persistent session that the broker
fills while the client is away, and that gets back what was delivered but not acknowledged.

Ordering argument (no sleeps): Mosquitto delivers a client's messages in order, queued ones
first. So once a marker published last has arrived, anything queued before it has arrived too.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable

from agent.mqtt import Message, MqttSession, MqttSettings
from tests.support.mosquitto import MosquittoBroker

WAIT_S = 10.0
TOPIC = "se/data"


def run(body: Callable[[], Awaitable[None]], timeout_s: float = 30.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout_s):
            await body()

    asyncio.run(bounded())


class Consumer:
    """A subscriber on an MqttSession that records payloads; ``hold`` payloads are never
    acknowledged (their handler does not return until the disconnect cancels it)."""

    def __init__(self, broker: MosquittoBroker, client_id: str, expiry_s: int | None) -> None:
        settings = MqttSettings(host=broker.host, port=broker.port, client_id=client_id)
        if expiry_s is not None:
            settings = MqttSettings(
                host=broker.host, port=broker.port, client_id=client_id, session_expiry_s=expiry_s
            )
        self.session = MqttSession(settings)
        self.session.on_message(self._on_message)
        self.got: list[bytes] = []
        self.hold: set[bytes] = set()
        self._arrived = asyncio.Event()

    async def _on_message(self, message: Message) -> None:
        self.got.append(message.payload)
        self._arrived.set()
        if message.payload in self.hold:
            await asyncio.get_running_loop().create_future()

    async def start(self) -> None:
        await self.session.connect(None)
        await self.session.subscribe(TOPIC, qos=1)

    async def wait_for(self, payload: bytes) -> None:
        async with asyncio.timeout(WAIT_S):
            while payload not in self.got:
                self._arrived.clear()
                await self._arrived.wait()


async def publish(broker: MosquittoBroker, *payloads: bytes) -> None:
    session = MqttSession(MqttSettings(host=broker.host, port=broker.port, client_id="se-pub"))
    await session.connect(None)
    try:
        for payload in payloads:
            await session.publish(TOPIC, payload)
    finally:
        await session.disconnect()


def connect_flags(broker: MosquittoBroker, client_id: str) -> list[str]:
    """The clean-start flag of each CONNECT of ``client_id``, as Mosquitto logs it (c1/c0)."""
    return re.findall(rf"as {re.escape(client_id)} \(p5, (c[01]),", broker.log_text())


def test_default_is_a_clean_session_that_forgets_the_client(broker: MosquittoBroker) -> None:
    async def body() -> None:
        first = Consumer(broker, "se-clean", expiry_s=None)
        await first.start()
        first.hold.add(b"unacked")
        await publish(broker, b"unacked")
        await first.wait_for(b"unacked")
        await first.session.disconnect()
        await publish(broker, b"while away")

        second = Consumer(broker, "se-clean", expiry_s=None)
        await second.start()
        await publish(broker, b"marker")
        await second.wait_for(b"marker")
        await second.session.disconnect()
        # Nothing was kept: neither the unacknowledged message nor the one sent meanwhile.
        assert second.got == [b"marker"]

    run(body)
    assert connect_flags(broker, "se-clean") == ["c1", "c1"]


def test_a_session_expiry_keeps_the_session_while_the_client_is_away(
    broker: MosquittoBroker,
) -> None:
    async def body() -> None:
        first = Consumer(broker, "se-kept", expiry_s=60)
        await first.start()
        first.hold.add(b"unacked")
        await publish(broker, b"acked", b"unacked")
        await first.wait_for(b"unacked")
        await first.session.disconnect()  # the held handler is cancelled: no PUBACK
        await publish(broker, b"while away")

        second = Consumer(broker, "se-kept", expiry_s=60)
        await second.start()
        await publish(broker, b"marker")
        await second.wait_for(b"marker")
        await second.session.disconnect()
        # The broker re-sent what was delivered but not acknowledged, then what it queued.
        assert second.got == [b"unacked", b"while away", b"marker"]

    run(body)
    assert connect_flags(broker, "se-kept") == ["c0", "c0"]
