"""QAT's fast path for ModelOpt's INT8 quantizers: the same values bit for bit and the same
gradients as ModelOpt's own forward, in the tensor's own layout; anything not plain INT8 keeps
ModelOpt's forward, and leaving the context hands every quantizer back."""

from __future__ import annotations

import pytest
import torch

from edgetransfer.cpu import CpuFeatures
from edgetransfer.models import build
from edgetransfer.qat_fast import fast_quantizers, plain_int8
from edgetransfer.qat_scheme import fold_batchnorm, inplace_off, load_modelopt, qat_scheme, quantize
from edgetransfer.weights import DEFAULT_ARCH, default_weights

ZEN4 = CpuFeatures("a Zen 4 EPYC", "x86_64", avx2=True, avx512=True, vnni=True, bf16=True)
SIZE = 64


@pytest.fixture(scope="module")
def quantized() -> torch.nn.Module:
    """The default model with ModelOpt's quantizers as QAT puts them (uint8 inputs after ReLU6,
    per-channel int8 weights), calibrated on real-valued noise."""
    torch.manual_seed(0)
    module = build(DEFAULT_ARCH, 3, default_weights(DEFAULT_ARCH), SIZE).module.eval()
    fold_batchnorm(module, SIZE)
    inplace_off(module)
    quantize(module, qat_scheme("ort-cpu", ZEN4), [torch.randn(4, 3, SIZE, SIZE)])
    return module


def quantizers(module: torch.nn.Module) -> list:
    kind = load_modelopt().nn.TensorQuantizer
    return [part for part in module.modules() if isinstance(part, kind) and part.is_enabled]


def test_the_model_computes_modelopts_values_bit_for_bit(quantized):
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        reference = quantized(x)
        with fast_quantizers(quantized) as fast:
            assert len(fast.replaced) == len(quantizers(quantized)) > 50  # every convolution's input and weight
            out = quantized(x)
    assert torch.equal(out, reference)
    assert not any("forward" in part.__dict__ for part in quantized.modules())  # ModelOpt's own forward again


@pytest.mark.parametrize("pass_through", [True, False])
@pytest.mark.parametrize("kind", ["activation, per tensor", "weight, per channel"])
def test_values_and_gradients_equal_modelopts_in_channels_last(quantized, kind, pass_through):
    found = quantizers(quantized)
    if kind.startswith("activation"):
        quantizer = next(q for q in found if q._amax.numel() == 1 and q._unsigned)
        x = torch.randn(2, 6, 5, 5).abs() * float(quantizer._amax) * 1.5  # unsigned (after ReLU6): some past amax, clamped
    else:
        quantizer = next(q for q in found if q._amax.numel() > 1)
        x = torch.randn(quantizer._amax.shape[0], 4, 3, 3) * quantizer._amax * 1.5
        x[0] = 0.01  # a channel whose range is zero (a folded BatchNorm can make one): quantised to 0
    x = x.contiguous(memory_format=torch.channels_last)
    upstream = torch.randn_like(x)
    saved, quantizer._pass_through_bwd = quantizer._pass_through_bwd, pass_through
    amax = quantizer._amax.clone()
    if kind.startswith("weight"):
        quantizer._amax[0] = 0.0
    try:
        theirs = x.clone().requires_grad_(True)
        expected = type(quantizer).forward(quantizer, theirs)
        (expected * upstream).sum().backward()
        with fast_quantizers(quantized):
            ours = x.clone().requires_grad_(True)
            out = quantizer(ours)
            (out * upstream).sum().backward()
    finally:
        quantizer._pass_through_bwd = saved
        quantizer._amax.copy_(amax)
    assert torch.equal(out, expected)
    assert out.grad_fn is not None and "ModelOpt" not in type(out.grad_fn).__name__ and "FakeTensor" not in type(out.grad_fn).__name__
    assert out.is_contiguous(memory_format=torch.channels_last)  # computed where it was, not copied to NCHW
    assert theirs.grad is not None and ours.grad is not None
    assert torch.equal(ours.grad, theirs.grad)
    assert pass_through or bool((ours.grad == 0).any())  # the clipped gradient is masked somewhere


def test_a_quantizer_that_is_not_plain_int8_keeps_modelopts_forward(quantized):
    calibrating, disabled = quantizers(quantized)[:2]
    calibrating._if_calib = True
    disabled.disable()
    try:
        assert not plain_int8(calibrating) and not plain_int8(disabled)
        with fast_quantizers(quantized) as fast:
            assert "forward" not in calibrating.__dict__ and "forward" not in disabled.__dict__
            assert len(fast.replaced) == len(quantizers(quantized)) - 1  # every other enabled one
    finally:
        calibrating._if_calib = False
        disabled.enable()
    assert plain_int8(calibrating) and plain_int8(disabled)
