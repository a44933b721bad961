"""Atomic writes and hashing live in the runtime (``edgetransfer.runtime._io``), which deployed apps
install without the toolkit; the toolkit imports them from there under this name too."""

from .runtime._io import *  # noqa: F401,F403
from .runtime._io import __all__  # noqa: F401
