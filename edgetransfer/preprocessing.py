"""Preprocessing lives in the runtime (``edgetransfer.runtime.preprocessing``), which deployed apps
install without the toolkit; the toolkit imports it from there under this name too."""

from .runtime.preprocessing import *  # noqa: F401,F403
from .runtime.preprocessing import MAX_ASPECT_RATIO, MAX_INPUT_SIZE, MAX_PIXELS, __all__  # noqa: F401
