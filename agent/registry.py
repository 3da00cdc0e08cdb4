"""Driver discovery through the ``lampyre.drivers`` entry-point group.

Registration is explicit (entry points in a package's metadata), never an import side effect:
in-tree and vendor drivers are found the same way.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from agent.sdk import Driver

ENTRY_POINT_GROUP = "lampyre.drivers"


class UnknownDriver(LookupError):
    """No installed package registers a driver of that name."""


def available_drivers() -> list[str]:
    """Names of every registered driver, sorted."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def load_driver(name: str) -> type[Driver]:
    """The driver class registered as ``name``."""
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Driver)):
            raise TypeError(f"entry point {name!r} ({ep.value}) is not a lampyre Driver subclass")
        if cls.name != name:
            raise TypeError(f"entry point {name!r} loads a driver named {cls.name!r}")
        return cls
    known = ", ".join(available_drivers()) or "none"
    raise UnknownDriver(f"no driver named {name!r} is installed (installed: {known})")
