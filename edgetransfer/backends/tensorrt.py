from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EdgeTransferError
from .base import Runner, SkipVariant

__all__ = ["TensorRTRunner"]


class TensorRTRunner(Runner):
    """A serialized TensorRT engine, refused when its build record does not match this machine."""

    provider = "TensorRT"

    def __init__(self, engine: Path) -> None:
        super().__init__(engine)
        self.engine_path = engine

    def activate(self) -> None:
        try:
            import tensorrt as trt
            import torch
        except ImportError:
            raise SkipVariant("TensorRT is not installed (pip install 'edgetransfer[tensorrt]')") from None
        if not torch.cuda.is_available():
            raise SkipVariant("no CUDA GPU")
        from ..optimize.tensorrt import check_engine

        try:
            check_engine(self.engine_path)
        except EdgeTransferError as exc:
            raise SkipVariant(str(exc)) from exc
        self.torch = torch
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(self.engine_path).read_bytes())
        self.context = self.engine.create_execution_context()
        self.input_name, self.output_name = self.engine.get_tensor_name(0), self.engine.get_tensor_name(1)
        self.stream = torch.cuda.Stream()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(batch).cuda()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return out.cpu().numpy()

    def deactivate(self) -> None:
        self.context = self.engine = None
