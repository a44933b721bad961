"""Optimised and quantised variants of a run's ONNX model, for ONNX Runtime and TensorRT."""

from .cpu import CpuFeatures, cpu_features
from .ort import CalibMethod
from .variants import Precision, QuantOptions, Target, TensorRTOptions, Variant, build_variants

__all__ = [
    "CpuFeatures",
    "cpu_features",
    "CalibMethod",
    "Precision",
    "QuantOptions",
    "Target",
    "TensorRTOptions",
    "Variant",
    "build_variants",
]
