"""OPC UA driver for cabinet controllers (asyncua).

Only the security groundwork is here so far: the client certificate and the trust list of
server certificates (:mod:`drivers.opcua.security`) and the ``lampyre opcua cert`` /
``lampyre opcua trust`` key tools (:mod:`drivers.opcua.cli`). The driver itself comes next.
"""
