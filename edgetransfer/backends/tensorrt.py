"""TensorRT engines on this machine: the runner bench times them with, and the check that an engine
was built for this TensorRT and GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import EdgeTransferError, EngineMismatchError, MissingDependencyError
from ..runtime.files import read_json
from .base import Runner, SkipVariant

__all__ = ["TensorRTRunner", "EXTRA", "require", "environment", "record_path", "check_engine"]

EXTRA = "pip install 'edgetransfer[tensorrt]' on a machine with an NVIDIA GPU and driver"


def require():
    """Import TensorRT, or say which extra installs it."""
    try:
        import tensorrt as trt  # optional heavy dependency (the tensorrt extra): imported here
    except ImportError:
        raise MissingDependencyError(f"target tensorrt needs TensorRT, which is not installed: {EXTRA}") from None
    return trt


def environment() -> dict[str, Any]:
    """TensorRT and CUDA versions, GPU name and compute capability of this machine."""
    trt = require()
    if not torch.cuda.is_available():
        raise EdgeTransferError("TensorRT engines are built on the GPU they run on, and torch sees no CUDA GPU here")
    major, minor = torch.cuda.get_device_capability(0)
    return {
        "tensorrt": trt.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0),
        "compute_capability": f"{major}.{minor}",
    }


def record_path(engine_path: Path) -> Path:
    """The JSON build record beside an engine (TensorRT, CUDA and GPU it was built with)."""
    return engine_path.with_suffix(".json")


def check_engine(engine_path: Path) -> dict[str, Any]:
    """The engine's build record, after checking it matches this machine.

    Raises:
        EngineMismatchError: built with another TensorRT version or for another GPU.
        EdgeTransferError: the record is missing.
    """
    path = record_path(Path(engine_path))
    if not path.is_file():
        raise EdgeTransferError(f"{engine_path} has no build record ({path.name}); rebuild it with edgetransfer export")
    record = read_json(path)
    here = environment()
    for key in ("tensorrt", "gpu", "compute_capability"):
        if record.get(key) != here.get(key):
            raise EngineMismatchError(
                f"{Path(engine_path).name} was built for {key} {record.get(key)}, this machine has {here.get(key)};"
                " rebuild it here with: edgetransfer export RUN --target tensorrt"
            )
    return record


class TensorRTRunner(Runner):
    """A serialized TensorRT engine, refused when its build record does not match this machine."""

    provider = "TensorRT"

    def __init__(self, engine: Path) -> None:
        super().__init__(engine)
        self.engine_path = engine

    def activate(self) -> None:
        try:
            import tensorrt as trt  # optional heavy dependency (the tensorrt extra): imported here
        except ImportError:
            raise SkipVariant("TensorRT is not installed (pip install 'edgetransfer[tensorrt]')") from None
        if not torch.cuda.is_available():
            raise SkipVariant("no CUDA GPU")
        try:
            check_engine(self.engine_path)
        except EdgeTransferError as exc:
            raise SkipVariant(str(exc)) from exc
        self.torch = torch
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(self.engine_path).read_bytes())
        self.context = self.engine.create_execution_context()
        # the input, then the logits, then (a multi-task model) each task's logits: every output needs an address
        self.input_name, *self.output_names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.stream = torch.cuda.Stream()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(batch).cuda()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        outputs = [torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=torch.float32, device="cuda") for name in self.output_names]
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        for name, out in zip(self.output_names, outputs, strict=True):
            self.context.set_tensor_address(name, out.data_ptr())
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return outputs[0].cpu().numpy()

    def deactivate(self) -> None:
        self.context = self.engine = None
