"""ModelOpt's INT8 fake quantisers in QAT's epochs, computed in the layout of the tensor they read.

ModelOpt's ``TensorQuantizer`` makes every input contiguous before quantising it (its FP4 kernels
need that), so a QAT epoch in PyTorch's faster CPU layout (channels-last) converted each activation
to NCHW and back at every layer and gained nothing; its CPU fake quantisation also makes six
passes over the tensor. While QAT trains and measures, a quantizer in the plain static INT8 state
that QAT uses (calibrated ``amax``, per tensor or per channel; no blocks, bias, pre-scale, rotation
or calibration in progress) computes the same values in four passes in the tensor's own layout:
``round(x * s)`` clamped to the integer range, divided by ``s``, with ``s = bound / amax`` as
ModelOpt computes it (and 0 for a channel whose amax is zero), so the outputs are bitwise equal. The gradient is ModelOpt's: straight
through, masked where ``|x| > amax`` unless the quantizer passes it through. Any other quantizer
keeps ModelOpt's own forward, and the ONNX export always runs ModelOpt's own path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .qat_scheme import load_modelopt

__all__ = ["fast_quantizers", "plain_int8"]

_TINY = 1.0 / (1 << 24)  # ModelOpt treats an amax at or below this as zero (its own path handles it)


class _Int8FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, amax: torch.Tensor, low: float, high: float, clip: bool) -> torch.Tensor:
        if clip:
            ctx.save_for_backward(x, amax)
        ctx.clip = clip
        amax = amax.float()
        scale = torch.tensor(high, device=amax.device) / amax
        divisor = scale
        if float(amax.min()) <= _TINY:  # as ModelOpt: a channel with a zero range quantises to 0
            tiny = amax <= _TINY
            scale, divisor = scale.masked_fill(tiny, 0.0), scale.masked_fill(tiny, 1.0)
        return (x.float() * scale).round_().clamp_(low, high).div_(divisor).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        if ctx.clip:
            x, amax = ctx.saved_tensors
            grad = torch.where(x.abs() <= amax, grad, grad.new_zeros(1))
        return grad, None, None, None, None


def plain_int8(quantizer: Any) -> bool:
    """Whether ``quantizer`` is in the static INT8 state this module computes exactly (an
    attribute this ModelOpt does not have counts as not plain: its own forward then runs)."""
    state = {
        "_disabled": False,
        "_if_quant": True,
        "_if_calib": False,
        "_fake_quant": True,
        "_dynamic": False,
        "_use_constant_amax": False,
        "block_sizes": None,
        "pre_quant_scale": None,
        "bias_calibrator": None,
        "rotate_is_enabled": False,
        "rotate_back_is_enabled": False,
        "_num_bits": 8,
    }
    missing = object()
    values = {name: getattr(quantizer, name, missing) for name in state}
    same = all(values[name] is None if value is None else values[name] == value for name, value in state.items())
    return same and isinstance(getattr(quantizer, "_amax", None), torch.Tensor)


class _FastForward:
    """A quantizer's forward while :class:`fast_quantizers` is in effect."""

    def __init__(self, quantizer: Any) -> None:
        self.quantizer = quantizer
        unsigned, narrow = bool(quantizer._unsigned), bool(quantizer._narrow_range)
        self.high = 2.0 ** (7 + int(unsigned)) - 1.0
        self.low = 0.0 if unsigned else (-self.high if narrow else -self.high - 1.0)
        self.clip = not bool(getattr(quantizer, "_pass_through_bwd", False))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        quantizer = self.quantizer
        if x.device.type != "cpu" or not x.numel():
            return type(quantizer).forward(quantizer, x)
        return _Int8FakeQuant.apply(x, quantizer._amax.detach(), self.low, self.high, self.clip)


class fast_quantizers:
    """Context: every plain INT8 quantizer of ``module`` (see :func:`plain_int8`) runs the fast
    forward while inside; ModelOpt's own forward again after."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.replaced: list[Any] = []

    def __enter__(self) -> fast_quantizers:
        quantizer_type = load_modelopt().nn.TensorQuantizer
        for part in self.module.modules():
            if isinstance(part, quantizer_type) and plain_int8(part):
                part.forward = _FastForward(part)  # an instance attribute: nn.Module.__call__ runs it
                self.replaced.append(part)
        return self

    def __exit__(self, *exc: object) -> None:
        for part in self.replaced:
            part.__dict__.pop("forward", None)
        self.replaced.clear()
