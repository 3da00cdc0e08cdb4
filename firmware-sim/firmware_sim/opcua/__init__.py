"""A simulated street-lighting cabinet controller served over OPC UA (asyncua), with security,
a client trust list, user identities, bench points and recovery faults (restart, freeze, dropped
connections, dropped subscriptions).

Typical use in a test::

    sim = CabinetSimulator(tmp_path / "pki")
    url = await sim.start()          # opc.tcp://127.0.0.1:PORT/lampyre/cabinet
    sim.freeze(); ...; sim.thaw()
    await sim.restart()              # same port, same certificate
    await sim.drop_subscriptions()   # sessions stay, subscriptions go
    sim.writes["Circuit1.DimLevel"]
"""

from firmware_sim.opcua.server import (
    APPLICATION_URI,
    CIRCUITS,
    ENDPOINT_PATH,
    NAMESPACE_URI,
    PHASES,
    CabinetSimulator,
    CabinetState,
    CircuitState,
    bench_point_path,
    certificate_fingerprint,
    certificate_subject,
    make_self_signed,
    node_id,
)

__all__ = [
    "APPLICATION_URI",
    "CIRCUITS",
    "ENDPOINT_PATH",
    "NAMESPACE_URI",
    "PHASES",
    "CabinetSimulator",
    "CabinetState",
    "CircuitState",
    "bench_point_path",
    "certificate_fingerprint",
    "certificate_subject",
    "make_self_signed",
    "node_id",
]
