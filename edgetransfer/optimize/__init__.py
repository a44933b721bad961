"""Optimised and quantised variants of a run's ONNX model, for ONNX Runtime, OpenVINO and TensorRT."""

from ..cpu import CpuFeatures, cpu_features

# isort: off
# Importing a target's module registers its records, in the order export and bench list them.
from . import ort_target  # noqa: F401
from . import openvino  # noqa: F401
from . import tensorrt  # noqa: F401

# isort: on
from .context import QuantOptions, TensorRTOptions
from .ort import CalibMethod
from .targets import Precision, Target, TargetSpec, Variant, registered, spec
from .variants import build_variants, check_combinations

__all__ = [
    "CpuFeatures",
    "cpu_features",
    "CalibMethod",
    "Precision",
    "QuantOptions",
    "Target",
    "TargetSpec",
    "TensorRTOptions",
    "Variant",
    "build_variants",
    "check_combinations",
    "registered",
    "spec",
]
