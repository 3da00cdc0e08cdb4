"""The MQTT seam against a real Mosquitto: acknowledgements, window, manual acks, errors, TLS."""

from __future__ import annotations

import asyncio
import gc
import os
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.mqtt import (
    Message,
    MqttConnectError,
    MqttDisconnected,
    MqttSession,
    MqttSettings,
    PublishRejected,
    SubscribeRejected,
    TlsSettings,
)
from agent.sdk import LampyreError
from tests.support.mosquitto import (
    MosquittoBroker,
    Subscriber,
    free_port,
    make_pki,
    mosquitto_password_line,
    subscribe_acl_conf,
)

WAIT_S = 10.0


def run(body: Callable[[], Awaitable[None]], timeout_s: float = 30.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout_s):
            await body()

    asyncio.run(bounded())


def settings_for(broker: MosquittoBroker, **changes: object) -> MqttSettings:
    base: dict[str, object] = {"host": broker.host, "port": broker.port, "client_id": "test-gw"}
    base.update(changes)
    return MqttSettings(**base)  # type: ignore[arg-type]


async def connected(settings: MqttSettings, max_inflight: int = 64) -> MqttSession:
    session = MqttSession(settings, max_inflight=max_inflight)
    await session.connect("gw/status", b"offline")
    return session


# --------------------------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------------------------


def test_publish_resolves_on_puback_and_reaches_subscribers(broker: MosquittoBroker) -> None:
    async def body() -> None:
        with Subscriber(broker, "gw/#") as sub:
            session = await connected(settings_for(broker))
            try:
                assert session.connected
                await session.publish("gw/data", b"\x00\x01sealed", qos=1)
                await session.publish("gw/status", b"online", qos=1, retain=True)
                got = await sub.wait_for_async(lambda m: len(m) >= 2, WAIT_S)
                assert [(m.topic, m.payload) for m in got] == [
                    ("gw/data", b"\x00\x01sealed"),
                    ("gw/status", b"online"),
                ]
            finally:
                await session.disconnect()
        # The retained status is kept by the broker for whoever subscribes later.
        with Subscriber(broker, "gw/status") as late:
            got = await late.wait_for_async(lambda m: len(m) >= 1, WAIT_S)
            assert got[0].payload == b"online" and got[0].retain

    run(body)


_example = iter(range(1_000_000))


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=st.binary(max_size=4096), retain=st.booleans())
def test_binary_payloads_cross_the_broker_unchanged(
    broker: MosquittoBroker, payload: bytes, retain: bool
) -> None:
    # One topic per example: a retained message must not leak into the next example.
    topic = f"bin/{next(_example)}"

    async def body() -> None:
        with Subscriber(broker, topic) as sub:
            session = await connected(settings_for(broker, client_id="bin-gw"))
            try:
                await session.publish(topic, payload, retain=retain)
                got = await sub.wait_for_async(lambda m: len(m) >= 1, WAIT_S)
                assert [m.payload for m in got] == [payload]
            finally:
                await session.disconnect()

    run(body)


def test_window_never_exceeds_the_brokers_receive_maximum(tmp_path: Path) -> None:
    async def body() -> None:
        with (
            MosquittoBroker(tmp_path, extra_conf="max_inflight_messages 5") as small,
            Subscriber(small, "w/#") as sub,
        ):
            session = await connected(settings_for(small), max_inflight=64)
            try:
                assert session.server_receive_maximum == 5
                assert session.window == 5
                futures = [session.publish_nowait("w/x", str(i).encode()) for i in range(50)]
                # Nothing has been acknowledged yet: exactly one window is on the wire.
                assert session.inflight == 5
                await asyncio.gather(*futures)
                assert session.inflight == 0
                got = await sub.wait_for_async(lambda m: len(m) >= 50, WAIT_S)
                assert [m.payload for m in got] == [str(i).encode() for i in range(50)]
            finally:
                await session.disconnect()

    run(body)


def test_own_window_applies_when_smaller_than_the_brokers(broker: MosquittoBroker) -> None:
    async def body() -> None:
        session = await connected(settings_for(broker), max_inflight=3)
        try:
            assert session.window == 3
            futures = [session.publish_nowait("w/x", b"x") for _ in range(10)]
            assert session.inflight == 3
            await asyncio.gather(*futures)
        finally:
            await session.disconnect()

    run(body)


def test_puback_failure_reason_code_raises_publish_rejected(tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic write gw/allowed/#\ntopic read #\n")

    async def body() -> None:
        with MosquittoBroker(tmp_path / "b", extra_conf=f"acl_file {acl}") as strict:
            session = await connected(settings_for(strict))
            try:
                await session.publish("gw/allowed/x", b"ok")  # 0x10 "no subscribers" is success
                with pytest.raises(PublishRejected) as info:
                    await session.publish("gw/denied/x", b"no")
                assert info.value.reason_code == 0x87
                assert "Not authorized" in str(info.value)
                assert isinstance(info.value, LampyreError)
                # The connection survives a refused message.
                assert session.connected
                await session.publish("gw/allowed/y", b"ok")
            finally:
                await session.disconnect()

    run(body)


def test_subscribe_failure_raises_subscribe_rejected(tmp_path: Path) -> None:
    extra = subscribe_acl_conf(tmp_path / "dynsec", ["gw/#"])

    async def body() -> None:
        with MosquittoBroker(tmp_path / "b", extra_conf=extra) as strict:
            session = await connected(settings_for(strict))
            try:
                await session.subscribe("gw/cmd")
                with pytest.raises(SubscribeRejected) as info:
                    await session.subscribe("other/cmd")
                assert info.value.reason_code == 0x87
                assert session.connected
            finally:
                await session.disconnect()

    run(body)


# --------------------------------------------------------------------------------------------
# Incoming messages and manual acknowledgement
# --------------------------------------------------------------------------------------------


def test_incoming_message_acknowledged_only_after_the_handler_returns(tmp_path: Path) -> None:
    """With the broker allowed one unacknowledged message per client, the second command can
    only arrive once the first one's PUBACK went out: after its handler returned."""

    async def body() -> None:
        with MosquittoBroker(tmp_path, extra_conf="max_inflight_messages 1") as one:
            session = await connected(settings_for(one))
            release = asyncio.Event()
            received: list[Message] = []

            async def handler(message: Message) -> None:
                received.append(message)
                if message.payload == b"first":
                    await release.wait()

            session.on_message(handler)
            try:
                await session.subscribe("gw/cmd")
                with Subscriber(one, "unused/#") as sender:
                    sender.publish("gw/cmd", b"first", qos=1)
                    sender.publish("gw/cmd", b"second", qos=1)
                    while not received:
                        await asyncio.sleep(0.01)
                    # Give the broker every chance to (wrongly) deliver the second one.
                    await asyncio.sleep(0.3)
                    assert [m.payload for m in received] == [b"first"]
                    release.set()
                    while len(received) < 2:
                        await asyncio.sleep(0.01)
                assert [m.payload for m in received] == [b"first", b"second"]
                assert received[0].topic == "gw/cmd" and received[0].qos == 1
            finally:
                await session.disconnect()

    run(body)


def test_failing_handler_is_logged_and_message_acknowledged_anyway(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        with MosquittoBroker(tmp_path, extra_conf="max_inflight_messages 1") as one:
            session = await connected(settings_for(one))
            received: list[bytes] = []

            async def handler(message: Message) -> None:
                received.append(message.payload)
                if message.payload == b"boom":
                    raise ValueError("handler bug")

            session.on_message(handler)
            try:
                await session.subscribe("gw/cmd")
                with Subscriber(one, "unused/#") as sender:
                    sender.publish("gw/cmd", b"boom", qos=1)
                    sender.publish("gw/cmd", b"after", qos=1)
                    while len(received) < 2:
                        await asyncio.sleep(0.01)
                assert received == [b"boom", b"after"]
            finally:
                await session.disconnect()

    run(body)
    failures = [r for r in caplog.records if r.exc_info and "acknowledging it anyway" in r.message]
    assert len(failures) == 1
    assert isinstance(failures[0].exc_info[1], ValueError)  # type: ignore[index]


# --------------------------------------------------------------------------------------------
# Losing and closing the connection
# --------------------------------------------------------------------------------------------


def test_pending_publish_fails_when_the_broker_dies(broker: MosquittoBroker) -> None:
    async def body() -> None:
        session = await connected(settings_for(broker))
        try:
            broker.pause()  # the PUBLISH goes out, no PUBACK comes back
            pending = session.publish_nowait("gw/data", b"x")
            await asyncio.sleep(0.1)
            assert not pending.done()
            await asyncio.to_thread(broker.kill)
            with pytest.raises(MqttDisconnected):
                await pending
            await session.wait_disconnected()
            assert not session.connected
            with pytest.raises(MqttDisconnected):
                await session.publish("gw/data", b"y")
        finally:
            await session.disconnect()

    run(body)


def test_clean_disconnect_does_not_fire_the_will_and_is_idempotent(
    broker: MosquittoBroker,
) -> None:
    async def body() -> None:
        with Subscriber(broker, "gw/#") as sub:
            session = await connected(settings_for(broker))
            await session.disconnect()
            await session.disconnect()
            assert not session.connected
            sub.publish("gw/marker", b"m", qos=1)
            got = await sub.wait_for_async(lambda m: any(x.topic == "gw/marker" for x in m), WAIT_S)
            assert all(m.topic != "gw/status" for m in got)
            assert "disconnected" in broker.log_text()

    run(body)


def test_session_can_connect_again_after_losing_the_broker(broker: MosquittoBroker) -> None:
    async def body() -> None:
        session = await connected(settings_for(broker))
        await asyncio.to_thread(broker.stop)
        await session.wait_disconnected()
        await session.disconnect()
        await asyncio.to_thread(broker.start)
        await session.connect("gw/status", b"offline")
        try:
            await session.publish("gw/data", b"again")
        finally:
            await session.disconnect()

    run(body)


# --------------------------------------------------------------------------------------------
# Connection failures
# --------------------------------------------------------------------------------------------


def test_connection_refused_is_a_connect_error() -> None:
    async def body() -> None:
        session = MqttSession(MqttSettings(port=free_port()))
        with pytest.raises(MqttConnectError) as info:
            await session.connect("gw/status", b"offline")
        assert info.value.kind == "refused"
        assert not session.connected

    run(body)


def test_silent_server_times_out() -> None:
    async def body() -> None:
        accepted: list[asyncio.StreamWriter] = []

        async def hold(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)  # accept, never answer CONNECT

        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            session = MqttSession(MqttSettings(port=port))
            with pytest.raises(MqttConnectError) as info:
                await session.connect("gw/status", b"offline", timeout_s=0.5)
            assert info.value.kind == "timeout"
            assert accepted, "the TCP connection was made; CONNACK never came"
        finally:
            for writer in accepted:
                writer.close()
            server.close()
            await server.wait_closed()

    run(body)


def test_password_from_file_and_refusals(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cret-Pa55word"
    passwd = tmp_path / "passwd"
    passwd.write_text(mosquitto_password_line("cab-0042", secret))
    good = tmp_path / "good.password"
    good.write_text(secret + "\n")
    good.chmod(0o600)
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-it\n")
    wrong.chmod(0o600)
    loose = tmp_path / "loose.password"
    loose.write_text(secret + "\n")
    loose.chmod(0o644)

    async def body() -> None:
        with MosquittoBroker(
            tmp_path / "b", extra_conf=f"allow_anonymous false\npassword_file {passwd}"
        ) as auth:
            user = {"username": "cab-0042"}
            session = await connected(settings_for(auth, password_file=good, **user))
            await session.disconnect()

            with pytest.raises(MqttConnectError) as info:
                await connected(settings_for(auth, password_file=wrong, **user))
            assert info.value.kind == "rejected"
            assert "0x86" in str(info.value) or "0x87" in str(info.value)

            with pytest.raises(MqttConnectError) as info:
                await connected(settings_for(auth, password_file=loose, **user))
            assert info.value.kind == "config"
            assert "chmod 600" in str(info.value)

            with pytest.raises(MqttConnectError) as info:
                await connected(settings_for(auth, password_file=tmp_path / "absent", **user))
            assert info.value.kind == "config"

    run(body)
    assert secret not in caplog.text
    settings = settings_for(MosquittoBroker(tmp_path / "x"), password_file=good)
    assert secret not in repr(settings) and secret not in repr(MqttSession(settings))


# --------------------------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------------------------


def test_mutual_tls_connects_and_bad_clients_are_refused(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")

    async def body() -> None:
        with MosquittoBroker(tmp_path / "b", tls=pki.broker_tls()) as tls_broker:

            def tls_settings(tls: TlsSettings, host: str = "127.0.0.1") -> MqttSettings:
                return MqttSettings(host=host, port=tls_broker.port, client_id="tls-gw", tls=tls)

            good = TlsSettings(pki.ca_file, pki.client_cert, pki.client_key)
            for host in ("127.0.0.1", "localhost"):
                session = await connected(tls_settings(good, host))
                try:
                    await session.publish("gw/data", b"over tls")
                finally:
                    await session.disconnect()

            # No client certificate: the broker hangs up (TLS 1.3 reports it after the
            # handshake, TLS 1.2 during it); either way the error says why.
            with pytest.raises(MqttConnectError) as info:
                await connected(tls_settings(TlsSettings(pki.ca_file)))
            assert "certificate" in str(info.value).lower()
            assert info.value.kind in ("closed", "tls")

            # The client trusts another CA: the broker's certificate is refused.
            with pytest.raises(MqttConnectError) as info:
                await connected(
                    tls_settings(TlsSettings(pki.other_ca_file, pki.client_cert, pki.client_key))
                )
            assert info.value.kind == "tls"
            assert "server certificate rejected" in str(info.value)

            # A client certificate from an unknown CA is refused by the broker.
            with pytest.raises(MqttConnectError) as info:
                await connected(
                    tls_settings(
                        TlsSettings(pki.ca_file, pki.other_client_cert, pki.other_client_key)
                    )
                )
            assert info.value.kind in ("closed", "tls")

            # Plain MQTT to a TLS port does not get through.
            with pytest.raises(MqttConnectError):
                await connected(MqttSettings(port=tls_broker.port, client_id="plain"))

    run(body)


def test_tls_host_name_is_checked(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", server_dns=("broker.example",), server_ips=())

    async def body() -> None:
        with MosquittoBroker(tmp_path / "b", tls=pki.broker_tls()) as tls_broker:
            settings = MqttSettings(
                port=tls_broker.port,
                tls=TlsSettings(pki.ca_file, pki.client_cert, pki.client_key),
            )
            with pytest.raises(MqttConnectError) as info:
                await connected(settings)
            assert info.value.kind == "tls"
            assert "127.0.0.1" in str(info.value)

    run(body)


def test_tls_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    os.chmod(pki.client_key, 0o644)

    async def body() -> None:
        with MosquittoBroker(tmp_path / "b", tls=pki.broker_tls()) as tls_broker:
            settings = MqttSettings(
                port=tls_broker.port,
                tls=TlsSettings(pki.ca_file, pki.client_cert, pki.client_key),
            )
            with pytest.raises(MqttConnectError) as info:
                await connected(settings)
            assert info.value.kind == "config"
            assert "chmod 600" in str(info.value)

    run(body)


def test_failed_tls_handshakes_leave_no_socket_open(tmp_path: Path) -> None:
    """paho does not close its socket when the handshake fails; a gateway retrying against a
    broker with a wrong certificate must not leak one descriptor per attempt."""
    pki = make_pki(tmp_path / "pki")

    async def body() -> None:
        with MosquittoBroker(tmp_path / "b", tls=pki.broker_tls()) as tls_broker:
            settings = MqttSettings(
                port=tls_broker.port,
                tls=TlsSettings(pki.other_ca_file, pki.client_cert, pki.client_key),
            )
            for _ in range(3):
                with pytest.raises(MqttConnectError):
                    await connected(settings)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        run(body)
        gc.collect()
    leaks = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == [], [str(w.message) for w in leaks]
