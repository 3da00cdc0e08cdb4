"""Built-in protocol drivers, one folder per protocol, found through the ``lampyre.drivers``
entry-point group like any vendor driver."""
