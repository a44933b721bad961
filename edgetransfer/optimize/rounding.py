"""Learned weight rounding for ONNX Runtime's INT8 model: AdaRound (Nagel et al. 2020, "Up or
Down? Adaptive Rounding for Post-Training Quantization") through Qualcomm's AIMET (``aimet-onnx``).

Rounding each weight to the nearest step is not what keeps a layer's output closest to float:
AdaRound chooses, per weight, to round up or down so that the layer's output on calibration
images moves least. Depthwise convolutions, with nine weights per channel, are where nearest
rounding hurts most, and they are what EfficientNet-like models are made of.

What it changes, and what it leaves alone: ONNX Runtime's quantiser still decides everything
about the model (which tensors are quantised, every scale and zero point, the graph); AIMET is
given ONNX Runtime's per-channel weight scales, frozen, and only re-rounds the int8 weights of
the layers named. Each weight moves by at most one step from nearest rounding and stays in ONNX
Runtime's integer range (7-bit on x86 without VNNI), so the model is exactly as fast as before.

Cost: AIMET samples each layer's inputs through its own quantisation simulator, then optimises
one layer at a time; on a 2-core CPU about 15 s per early layer of EfficientNet-Lite0 at 224 px
for 200 iterations. So only the layers the guard ranks as the most damaging are re-rounded
(``--adaround-layers``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import MissingDependencyError, QuantizationError, first_line

__all__ = ["RoundingResult", "adaround", "require", "weight_steps"]


def require() -> None:
    """Raises MissingDependencyError when aimet-onnx is not installed."""
    try:
        import aimet_onnx  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            "--adaround-layers needs AIMET's ONNX package: pip install 'edgetransfer[adaround]'"
            f" ({first_line(exc)})"
        ) from exc


@dataclass(frozen=True)
class RoundingResult:
    """The re-rounded model and what was done to it (the manifest's record)."""

    model: object  # onnx.ModelProto
    layers: list[str]
    iterations: int
    images: int
    moved: int  # int8 weights whose value changed
    weights: int  # int8 weights of the layers it re-rounded
    seconds: float

    def record(self) -> dict:
        return {"method": "AdaRound (aimet-onnx) on ONNX Runtime's frozen weight scales", "layers": list(self.layers),
                "iterations": self.iterations, "images": self.images, "weights_moved": self.moved,
                "weights": self.weights, "seconds": round(self.seconds, 2), "aimet_onnx": _version()}


def weight_steps(qdq, layers: Sequence[str]) -> dict[str, tuple[str, str, str]]:
    """For each named Conv of a QDQ model whose weight is a dequantised int8 initializer: the
    float weight's name (as in the model that was quantised), the int8 initializer and its scale."""
    inits = {init.name for init in qdq.graph.initializer}
    producers = {out: node for node in qdq.graph.node for out in node.output}
    found = {}
    for node in qdq.graph.node:
        if node.name not in layers or node.op_type != "Conv" or len(node.input) < 2:
            continue
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        float_name = dq.input[0].removesuffix("_quantized")
        found[node.name] = (float_name, dq.input[0], dq.input[1])
    return found


def adaround(prepared, qdq, layers: Sequence[str], batches: list[dict[str, np.ndarray]], iterations: int,
             limits: tuple[int, int]):
    """``qdq`` (ONNX Runtime's QDQ model of ``prepared``) with the int8 weights of ``layers``
    re-rounded by AdaRound on ``batches``; everything else is unchanged.

    Args:
        prepared: the float ModelProto that was quantised (its weights are the float weights).
        qdq: ONNX Runtime's QDQ ModelProto; not modified.
        layers: node names to re-round (Convs with int8 weights; others are skipped).
        batches: calibration inputs, ``{input name: array}`` each.
        iterations: AdaRound optimisation steps per layer.
        limits: the integer range the weights must stay in (ONNX Runtime's, e.g. -64..64).

    Raises:
        QuantizationError: AIMET fails on the model (its reason, on one line).
    """
    import onnx
    from onnx import numpy_helper

    require()
    started = time.perf_counter()
    steps = weight_steps(qdq, layers)
    if not steps:
        return RoundingResult(qdq, [], iterations, 0, 0, 0, time.perf_counter() - started)
    wanted = {scale for _, _, scale in steps.values()}
    scales = {init.name: numpy_helper.to_array(init) for init in qdq.graph.initializer if init.name in wanted}
    encodings = [{"name": float_name, "output_dtype": "int8", "y_scale": np.atleast_1d(scales[scale]).tolist(),
                  "y_zero_point": [0] * np.atleast_1d(scales[scale]).size, "axis": 0}
                 for float_name, _, scale in steps.values()]
    try:
        rounded = _aimet_adaround(prepared, encodings, list(steps), batches, iterations)
    except Exception as exc:
        raise QuantizationError(f"AIMET AdaRound failed on the model: {first_line(exc)}") from exc
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    low, high = limits
    moved = total = 0
    by_int8 = {int8: (float_name, scale) for float_name, int8, scale in steps.values()}
    for init in model.graph.initializer:
        if init.name not in by_int8:
            continue
        float_name, scale = by_int8[init.name]
        old = numpy_helper.to_array(init)
        step = np.atleast_1d(scales[scale]).reshape(-1, *([1] * (old.ndim - 1)))
        new = np.clip(np.round(rounded[float_name] / step), low, high).astype(old.dtype)
        if np.any(np.abs(new.astype(np.int32) - old.astype(np.int32)) > 1):
            raise QuantizationError(f"AdaRound moved a weight of {init.name} by more than one step; the model was left as it was")
        moved += int(np.count_nonzero(new != old))
        total += old.size
        init.CopyFrom(numpy_helper.from_array(new, init.name))
    return RoundingResult(model, list(steps), iterations, sum(len(next(iter(b.values()))) for b in batches), moved, total,
                          time.perf_counter() - started)


def _aimet_adaround(prepared, encodings: list[dict], layers: list[str], batches: list[dict], iterations: int) -> dict[str, np.ndarray]:
    """AIMET's AdaRound on a simulator of ``prepared`` whose weight encodings are ``encodings``
    (frozen); activations get AIMET's own ranges on ``batches``. The layers' re-rounded float
    weights, by weight name."""
    import onnx
    from onnx import numpy_helper

    for name in ("AIMET", "Quant", "Utils"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("aimet_onnx").setLevel(logging.ERROR)
    from aimet_onnx import apply_adaround
    from aimet_onnx.quantsim import QuantizationSimModel, load_encodings_to_sim

    import torch

    model = onnx.ModelProto()
    model.CopyFrom(prepared)
    numpy_state = np.random.get_state()
    # AIMET draws each iteration's images from torch's and numpy's global generators: seeded here
    # (and given back after) so that the same model and images give the same weights
    with torch.random.fork_rng(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.manual_seed(0)
        np.random.seed(0)
        sim = QuantizationSimModel(model, param_type="int8", activation_type="int8", providers=["CPUExecutionProvider"])
        load_encodings_to_sim(sim, {"version": "2.0.0", "encodings": encodings}, strict=False, allow_overwrite=False,
                              disable_missing_quantizers=False)
        sim.compute_encodings(batches)
        try:
            apply_adaround(sim, batches, num_iterations=iterations, nodes_to_include=layers)
        finally:
            np.random.set_state(numpy_state)
    wanted = {encoding["name"] for encoding in encodings}
    return {init.name: numpy_helper.to_array(init) for init in sim.model.model.graph.initializer if init.name in wanted}


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aimet-onnx")
    except PackageNotFoundError:
        return None
