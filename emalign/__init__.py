"""emalign: serial-section EM alignment with 3D-convolutional registration networks.

Conventions: arrays ``z, y, x``; 2D fields ``(2, Y, X)`` with channels ``(dy, dx)`` in
full-resolution pixels, pull convention ``aligned(p) = raw(p + u(p))`` (see
:mod:`emalign.fields`).
"""

__version__ = "0.1.0"

from emalign.errors import EmalignError  # noqa: E402
from emalign.register import Registration, register_sections  # noqa: E402

__all__ = ["EmalignError", "Registration", "__version__", "register_sections"]
