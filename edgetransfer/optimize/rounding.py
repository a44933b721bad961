"""Learned weight rounding for ONNX Runtime's INT8 model: AdaRound (Nagel et al. 2020, "Up or
Down? Adaptive Rounding for Post-Training Quantization") through AMD Quark's fast finetuning
(``amd-quark``).

Rounding each weight to the nearest step is not what keeps a layer's output closest to float:
AdaRound chooses, per weight, to round up or down so that the layer's output moves least, layer
after layer, each one optimised on the inputs the already re-rounded layers before it give it
(so it also absorbs the error of the quantised activations it reads).

What it changes, and what it leaves alone: ONNX Runtime's quantiser still decides everything
about the model (which tensors are quantised, every scale and zero point, the graph); Quark is
given that QDQ model and the float model it came from, and only the int8 weights change, each by
at most one step from nearest rounding and inside ONNX Runtime's integer range (7-bit on x86
without VNNI), so the model is exactly as fast as before.

Measured on EfficientNet-Lite0 at 224 px (digits, a Zen 5 EPYC with VNNI, 64 calibration images,
the 359 selection images the guard decides on): nearest rounding changed the top-1 of 3.34% of
them (logit MSE 0.224); Quark's AdaRound at 200 iterations a layer, every layer, 1.11% (0.017) in
89 s. AIMET's AdaRound, which optimises in its own simulator with its own activation ranges,
made the same model worse (13.1%, MSE 0.71, 270 s for every layer), and Quark's cross-layer
equalisation did not help (3.90%).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..choice import Choice
from ..errors import MissingDependencyError, QuantizationError, first_line
from ..progress import console

__all__ = ["Rounding", "RoundingResult", "adaround", "available", "require", "INSTALL"]

INSTALL = "pip install 'edgetransfer[quark]'"
SEED = 1705472343  # Quark's own default: the same model and images give the same weights


class Rounding(Choice):
    """How ONNX Runtime INT8 rounds its weights."""

    AUTO = "auto"  # AdaRound when nearest rounding misses the accuracy budget (and Quark is installed)
    NEAREST = "nearest"
    ADAROUND = "adaround"  # always

    @classmethod
    def kind(cls) -> str:
        return "rounding"


def available() -> bool:
    """Whether AMD Quark can be imported (found without importing it: that takes seconds)."""
    return find_spec("quark") is not None


def require() -> None:
    """Raises MissingDependencyError when AMD Quark is not installed."""
    if not available():
        raise MissingDependencyError(f"AdaRound needs AMD Quark, which is not installed: {INSTALL}")


@dataclass(frozen=True)
class RoundingResult:
    """The re-rounded model and what was done to it (the manifest's record)."""

    model: onnx.ModelProto
    layers: int  # layers whose weights were re-rounded
    iterations: int
    images: int
    moved: int  # int8 weights whose value changed
    weights: int  # int8 weights of the quantised layers
    seconds: float

    def record(self) -> dict:
        return {
            "method": "AdaRound (AMD Quark fast finetuning) on ONNX Runtime's QDQ model, its scales unchanged",
            "layers": self.layers,
            "iterations": self.iterations,
            "images": self.images,
            "weights_moved": self.moved,
            "weights": self.weights,
            "seconds": round(self.seconds, 2),
            "amd_quark": _version(),
        }


def adaround(
    prepared,
    qdq,
    batches: list[dict[str, np.ndarray]],
    iterations: int,
    limits: tuple[int, int],
    on_layer: Callable[[int, int], None] = lambda done, total: None,
) -> RoundingResult:
    """``qdq`` (ONNX Runtime's QDQ model of ``prepared``) with the int8 weights of every quantised
    layer re-rounded by AdaRound on ``batches``; everything else is unchanged.

    Args:
        prepared: the float ModelProto that was quantised.
        qdq: ONNX Runtime's QDQ ModelProto; not modified.
        batches: calibration inputs, ``{input name: array}`` each.
        iterations: AdaRound optimisation steps per layer.
        limits: the integer range the weights must stay in (ONNX Runtime's, e.g. -64..64).
        on_layer: called with (layers done, layers in all) as Quark goes.

    Raises:
        MissingDependencyError: AMD Quark is not installed.
        QuantizationError: Quark fails on the model (its reason, on one line), or moves a weight
            further than one step.
    """

    require()
    started = time.perf_counter()
    before = _int8_weights(qdq)
    total = len(before)
    try:
        rounded = _fast_finetune(prepared, qdq, batches, iterations, lambda done: on_layer(done, total))
    except QuantizationError:
        raise
    except Exception as exc:  # Quark's own failures: ONNX Runtime, torch or its graph matching
        raise QuantizationError(f"AMD Quark's AdaRound failed on the model: {first_line(exc)}") from exc
    model, moved, weights = _checked_weights(rounded, before, limits)
    images = sum(len(next(iter(b.values()))) for b in batches)
    return RoundingResult(model, total, iterations, images, moved, weights, time.perf_counter() - started)


def _checked_weights(rounded, before: dict[str, np.ndarray], limits: tuple[int, int]):
    """A copy of ``rounded`` with its int8 weights clipped to ``limits``, each at most one step
    from its value ``before``; with how many weights moved, of how many.

    Raises:
        QuantizationError: a weight moved further than one step.
    """
    model = onnx.ModelProto()
    model.CopyFrom(rounded)
    low, high = limits
    moved = weights = 0
    for init in model.graph.initializer:
        if init.name not in before:
            continue
        old, new = before[init.name], numpy_helper.to_array(init)
        new = np.clip(new.astype(np.int32), low, high)
        if new.shape != old.shape or np.any(np.abs(new - old.astype(np.int32)) > 1):
            raise QuantizationError(f"AdaRound moved a weight of {init.name} by more than one step; the model was left as it was")
        moved += int(np.count_nonzero(new != old))
        weights += old.size
        init.CopyFrom(numpy_helper.from_array(new.astype(old.dtype), init.name))
    return model, moved, weights


def _int8_weights(qdq) -> dict[str, np.ndarray]:
    """The int8 weight initializers of the quantised Conv/Gemm/MatMul layers, by name."""
    inits = {init.name: init for init in qdq.graph.initializer}
    producers = {out: node for node in qdq.graph.node for out in node.output}
    found = {}
    for node in qdq.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        dq = producers.get(node.input[1])
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
            weight = numpy_helper.to_array(inits[dq.input[0]])
            if weight.dtype in (np.int8, np.uint8):
                found[dq.input[0]] = weight
    return found


class _Progress(logging.StreamHandler):
    """Takes over Quark's screen loggers: their lines are kept from the terminal, and "finetuning
    layer N" becomes progress. (A StreamHandler, so that Quark adds no handler of its own.)"""

    LAYER = re.compile(r"finetuning layer (\d+)")

    def __init__(self, on_layer: Callable[[int], None]) -> None:
        super().__init__(io.StringIO())
        self.on_layer = on_layer

    def emit(self, record: logging.LogRecord) -> None:
        found = self.LAYER.search(record.getMessage())
        if found:
            self.on_layer(int(found.group(1)))


@contextlib.contextmanager
def _quark_quiet(on_layer: Callable[[int], None]):
    handler = _Progress(on_layer)
    saved: dict[logging.Logger, list] = {}

    def take_over() -> None:
        for name, logger in list(logging.Logger.manager.loggerDict.items()):
            if isinstance(logger, logging.Logger) and name.endswith("_screen") and logger not in saved:
                saved[logger] = logger.handlers[:]
                logger.handlers[:] = [handler]

    pinned = console.file  # our progress keeps the real stderr while Quark's tqdm bar and prints go nowhere
    console.file = pinned
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            # optional heavy dependency (the quark extra: torch and a compiled extension): imported here
            from quark.onnx.algorithm.finetuning import fast_finetune
            from quark.onnx.utils import file_utils

            take_over()
            file_utils.update_crypto_mode(True)  # Quark's in-memory mode: no quantized_info.csv in the working directory
            try:
                yield fast_finetune.fast_finetune, take_over
            finally:
                file_utils.update_crypto_mode(False)
                for logger, handlers in saved.items():
                    logger.handlers[:] = handlers
    finally:
        console.file = None  # type: ignore[assignment]  # rich's documented way back to following sys.stderr


def _fast_finetune(prepared, qdq, batches: Sequence[dict], iterations: int, on_layer: Callable[[int], None]):
    class Reader:  # ONNX Runtime's calibration protocol, from the start again when Quark asks
        def __init__(self) -> None:
            self.rewind()

        def get_next(self):
            return next(self._batches, None)

        def rewind(self) -> None:
            self._batches = iter(batches)

        reset_iter = rewind

    options = {
        "FastFinetune": {
            "OptimAlgorithm": "adaround",
            "NumIterations": iterations,
            "LearningRate": 0.1,
            "BatchSize": 2,
            "DataSize": len(batches),
            "FixedSeed": SEED,
            "EarlyStop": True,
            "OptimDevice": "cpu",
            "InferDevice": "cpu",
        }
    }
    numpy_state = np.random.get_state()
    # Quark seeds torch's and numpy's global generators for its own reproducibility; given back after
    with torch.random.fork_rng(), _quark_quiet(lambda index: on_layer(index + 1)) as (fast_finetune, take_over):
        try:
            take_over()
            return fast_finetune(prepared, qdq, False, Reader(), options)
        finally:
            np.random.set_state(numpy_state)


def _version() -> str | None:
    try:
        return version("amd-quark")
    except PackageNotFoundError:
        return None
