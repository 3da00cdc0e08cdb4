"""The serial DALI interfaces built into Lampyre, one module each. They are registered in the
``lampyre.dali_interfaces`` entry-point group (see :func:`drivers.dali.interface.load_interface`);
importing this package registers nothing."""

from drivers.dali.interfaces.foxtron import FoxtronInterface
from drivers.dali.interfaces.sci2 import Sci2Interface

__all__ = ["FoxtronInterface", "Sci2Interface"]
