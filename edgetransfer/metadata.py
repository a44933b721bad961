"""Model metadata lives in the runtime (``edgetransfer.runtime.metadata``), which deployed apps install
without the toolkit; the toolkit imports it from there under this name too."""

from .runtime.metadata import *  # noqa: F401,F403
from .runtime.metadata import __all__  # noqa: F401
