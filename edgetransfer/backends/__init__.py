"""Runners for bench: one per backend, each a context manager with ``infer(batch) -> logits``.

Heavy libraries are imported inside the runner that needs them.
"""

from .base import Runner, SkipVariant
from .eager import EagerRunner
from .openvino import OpenVinoRunner
from .ort import InTurnRunner, OrtRunner
from .tensorrt import TensorRTRunner

__all__ = ["Runner", "SkipVariant", "EagerRunner", "OrtRunner", "InTurnRunner", "OpenVinoRunner", "TensorRTRunner"]
