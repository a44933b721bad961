"""The fake-quantised QAT model as a QDQ ONNX model, and its check against PyTorch (part of
``edgetransfer export`` for a QAT run)."""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from .cpu import cpu_features
from .errors import ExportError, ParityError, first_line
from .qat_scheme import scheme_of
from .qdq import complete_placement
from .results import Parity, compare
from .runtime.sessions import open_session

__all__ = ["QDQ_FLOOR_FACTOR", "PARITY_IMAGES", "export_qdq", "verify_qdq", "qdq_limit", "logits_of"]

# How far the exported QDQ model may be from the fake-quantised PyTorch model: this many times
# as far as that model is from itself when only its float arithmetic changes (float64 instead of
# float32), plus 1e-3 of the largest logit. Both compute the same integer grid, but not in the
# same float order, and a rounding tie that falls the other way moves one activation by a whole
# quantisation step, which the following layers carry on; so the two cannot agree to 1e-4 as a
# float export does, and how far they drift depends on the model's margins. Measured: on the
# demo model ONNX Runtime's integer kernels differed by at most 1.19 in the logits where float64
# moved the model by 0.89 (ratio 1.3), and on a 120-image run by 0.45 where float64 moved it by
# 0.45; the top-1 changed for 1-2% and 5-7% of the images, float64 alone 1% and 5-7%. A broken
# export is far outside: 8-bit weights on a CPU without VNNI differed by 9.8 (11x).
QDQ_FLOOR_FACTOR = 3.0
PARITY_IMAGES = 512  # validation images the QDQ export is checked on (all of them, up to this)


def logits_of(module: nn.Module, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """The fake-quantised module's logits on prepared (normalised NCHW) images."""
    module.eval()
    with torch.no_grad():
        return np.concatenate([module(torch.from_numpy(images[i : i + batch])).numpy() for i in range(0, len(images), batch)])


# ---------------------------------------------------------------------------------------------
# Export: the fake-quantised module as a QDQ ONNX model


def export_qdq(built, path: Path, opset: int, record: dict[str, Any], names: tuple[str, str]) -> Any:
    """The fake-quantised module as a QDQ ONNX model (``names``: its input, NCHW float, and its
    output, the logits), with the placement ONNX Runtime fuses completely
    (:func:`~edgetransfer.qdq.complete_placement`).

    torch's TorchScript exporter is used: it writes each ModelOpt quantizer as the
    QuantizeLinear/DequantizeLinear pair ModelOpt defines for it, which the dynamo exporter does
    not know. Opset 13 at least (per-channel QuantizeLinear); 17 at most here (the TorchScript
    exporter's newest).

    Raises:
        ExportError: the exporter fails on the model.
    """
    size, (inputs, outputs) = built.preprocessing.input_size, names
    module = built.module.eval()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (torch.zeros(1, 3, size, size),),
                str(path),
                dynamo=False,
                opset_version=min(max(opset, 13), 17),
                input_names=[inputs],
                output_names=[outputs],
                dynamic_axes={inputs: {0: "batch"}, outputs: {0: "batch"}},
            )
    except Exception as exc:
        raise ExportError(f"cannot export the QAT model of {built.arch.name} to ONNX: {first_line(exc)}") from exc
    model = onnx.load(str(path))
    # every reader of a quantized tensor reads it quantized, biases in int32, one activation type: ONNX Runtime fuses every layer
    complete_placement(model, unsigned_activations=scheme_of(record).unsigned_activations)
    return model


def qdq_limit(module: nn.Module, images: np.ndarray, eager: np.ndarray) -> tuple[float, float]:
    """The largest logit difference an export of ``module`` may show on ``images``, and the floor
    it is made from: how far ``module`` moves when it runs in float64 (see QDQ_FLOOR_FACTOR)."""
    double = copy.deepcopy(module).double().eval()
    with torch.no_grad():
        floor = np.concatenate([double(torch.from_numpy(images[i : i + 64]).double()).float().numpy() for i in range(0, len(images), 64)])
    floor_diff = float(np.abs(floor - eager).max()) if len(images) else 0.0
    return QDQ_FLOOR_FACTOR * floor_diff + 1e-3 * float(np.abs(eager).max(initial=0.0)), floor_diff


def verify_qdq(built, path: Path, images: list, record: dict[str, Any]) -> Any:
    """ONNX Runtime (CPU, its default graph optimisation: the integer kernels that will run)
    against the fake-quantised PyTorch model on ``images``, within :func:`qdq_limit`. Where this
    CPU's integer kernels saturate the scheme's 8-bit weights (x86 without VNNI or AMX: a model
    trained for TensorRT or CUDA), the model runs in its QDQ reference semantics instead, which is
    what the GPU computes: the check is of the export, not of this CPU.

    Raises:
        ParityError: further apart.
    """
    pre = built.preprocessing
    normalized = np.stack([pre.normalize(np.asarray(pre.resize_crop(img), dtype=np.uint8)) for img in images])
    eager = logits_of(built.module, normalized)
    limit, floor = qdq_limit(built.module, normalized, eager)
    reference = cpu_features().int8_saturates and scheme_of(record).weight_levels > 63
    session = open_session(path, optimized=not reference)
    onnx_logits = np.concatenate(
        [session.run(None, {session.get_inputs()[0].name: normalized[i : i + 16]})[0] for i in range(0, len(normalized), 16)]
    )
    agreement = compare(onnx_logits, eager)
    ok = agreement.max_abs_diff <= limit
    provider = session.get_providers()[0] + (" (QDQ reference semantics: this CPU's int8 kernels saturate 8-bit weights)" if reference else "")
    parity = Parity(
        agreement.images, 16, agreement.max_abs_diff, agreement.top1_agreement, limit, provider, within_tolerance=ok, floor_max_abs_diff=floor
    )
    if not ok:
        raise ParityError(
            f"the QDQ model and the fake-quantised PyTorch model differ by up to {agreement.max_abs_diff:.3f} in the logits on"
            f" {agreement.images} images, over the {limit:.3f} allowed ({QDQ_FLOOR_FACTOR:g}x the {floor:.3f} that float64 alone moves"
            f" them; top-1 agreement {100 * agreement.top1_agreement:.1f}%); nothing was written. Report it with the model's architecture"
        )
    return parity
