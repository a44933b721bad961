from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime.metadata import FLOAT_NCHW, UINT8_NHWC
from ..runtime.openvino_ir import EXTRA, compile_ir, read_ir
from .base import Runner, SkipVariant

__all__ = ["OpenVinoRunner"]


class OpenVinoRunner(Runner):
    """An OpenVINO IR on the CPU plugin: latency hint, one stream, explicit threads, and the
    inference precision the IR records (f32 unless it was built as bf16)."""

    provider = "OpenVINO CPU"

    def __init__(self, xml: Path, threads: int | None = None) -> None:
        super().__init__(xml)
        self.xml, self.threads = xml, threads
        self.props: dict[str, str] = {}

    def activate(self) -> None:
        try:
            import openvino as ov  # optional heavy dependency (the openvino extra): imported here
        except ImportError:
            raise SkipVariant(f"OpenVINO is not installed: {EXTRA}") from None
        core = ov.Core()
        model, self.props = read_ir(self.xml, core)
        self.compiled = compile_ir(model, self.props, "CPU", self.threads, "LATENCY", core)
        self.request = self.compiled.create_infer_request()
        self.checkpoint_sha256 = self.props.get("checkpoint_sha256", "")
        self.input_format = UINT8_NHWC if model.input(0).get_element_type() == ov.Type.u8 else FLOAT_NCHW
        self.settings = {
            name: _text(self.compiled.get_property(name))
            for name in ("PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "ENABLE_CPU_PINNING")
        }
        self.provider = f"OpenVINO CPU ({self.settings['INFERENCE_PRECISION_HINT']})"

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.request.infer({0: batch}, share_inputs=True)[0]

    def deactivate(self) -> None:
        self.request = self.compiled = None


def _text(value) -> str:
    """OpenVINO property values as they are written in its docs: ``f32``, ``LATENCY``, ``2``."""
    if hasattr(value, "get_type_name"):  # an element type
        return value.get_type_name()
    return str(getattr(value, "name", value))
