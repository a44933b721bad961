"""ONNX Runtime's operations on a model: offline graph optimisation, FP16 conversion, calibration and
static INT8 (QDQ), a layer back in float, logits. The target that builds variants with them is
:mod:`.ort_target`."""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic
from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import (
    DEFAULT_OP_BLOCK_LIST,
    convert_float_to_float16,
)

from ..choice import Choice
from ..cpu import CpuFeatures
from ..errors import QuantizationError, first_line
from ..onnxheads import PROTOTYPE_NODE
from ..qdq import prune, sort_nodes
from ..runtime.sessions import fixed_batch, open_session, run_batched, write_optimized
from .calibration import BatchStream

__all__ = [
    "CalibMethod",
    "QuantScheme",
    "quant_scheme",
    "optimize_graph",
    "to_fp16",
    "preprocess_for_quantization",
    "calibrate",
    "quantize_qdq",
    "quantize_dynamic",
    "run_logits",
    "copy_metadata",
    "keep_in_float",
]

# Ops kept in float32 in FP16 models: they overflow (65504) or lose too much in half precision.
FP16_KEEP_FLOAT = ["Exp", "Pow", "Softmax", "LayerNormalization", "ReduceSum", "ReduceSumSquare", "ReduceL2", "Sqrt"]
CHUNK_BATCHES = 8  # calibrators hold this many batches of activations at a time


class CalibMethod(Choice):
    """How activation ranges are chosen from the calibration data."""

    MINMAX = "minmax"  # the observed range
    ENTROPY = "entropy"  # KL-divergence optimal clipping on a 2048-bin histogram
    PERCENTILE = "percentile"  # clip at the 99.999th percentile of |x|

    @classmethod
    def kind(cls) -> str:
        return "calibration method"

    def ort(self):
        return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[self.value]


@dataclass(frozen=True)
class QuantScheme:
    """Types and options of a static INT8 model, chosen for where it will run."""

    activation: str  # "uint8" or "int8"
    weight: str = "int8"
    per_channel: bool = True
    symmetric_activations: bool = False
    reduce_range: bool = False
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {**self.__dict__, "warnings": list(self.warnings)}


def quant_scheme(target: str, cpu: CpuFeatures) -> QuantScheme:
    """Pick INT8 settings from the target and this CPU's features."""
    if target in ("tensorrt", "ort-trt", "ort-cuda"):
        # TensorRT (and CUDA) want symmetric int8 activations and weights.
        return QuantScheme(activation="int8", symmetric_activations=True)
    if cpu.x86:
        if cpu.int8_fast:
            # VNNI/AMX: u8 activations x s8 weights is the fast path; s8 activations were no faster than FP32.
            return QuantScheme(activation="uint8")
        return QuantScheme(
            activation="uint8",
            reduce_range=True,  # u8s8 without VNNI can saturate 16-bit accumulators
            warnings=(f"this CPU has no VNNI or AMX ({cpu.summary()}); INT8 is unlikely to be faster than FP32 here",),
        )
    warnings = () if cpu.arm_dotprod else (f"no int8 dot-product instructions found on {cpu.summary()}; INT8 may not be faster",)
    return QuantScheme(activation="int8", warnings=warnings)


def copy_metadata(src, dst: Path) -> None:
    """Carry ``metadata_props`` from ``src`` (a path or ModelProto) over to the model at ``dst``."""
    source = src if isinstance(src, onnx.ModelProto) else onnx.load(str(src), load_external_data=False)
    target = onnx.load(str(dst))
    onnx.helper.set_model_props(target, {p.key: p.value for p in source.metadata_props})
    onnx.save_model(target, str(dst))


def optimize_graph(src: Path, dst: Path) -> None:
    """ONNX Runtime's offline graph optimisation (extended level: portable across x86 CPUs)."""
    write_optimized(src, dst, portable=True)
    copy_metadata(src, dst)


def to_fp16(src: Path, dst: Path) -> None:
    """Float16 weights and compute; float32 inputs and outputs; overflow-prone ops kept in float."""

    model = onnx.load(str(src))
    half = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=DEFAULT_OP_BLOCK_LIST + FP16_KEEP_FLOAT, node_block_list=prototype_nodes(src)
    )  # a prototype head stays float, as in INT8
    onnx.save_model(half, str(dst))


def preprocess_for_quantization(src: Path, dst: Path) -> str | None:
    """ONNX Runtime's quantisation pre-processing: shape inference and fusions (Conv+BN…).

    Its symbolic shape inference has no rule for some graphs (ConvNeXt-V2's ReduceMean at 64 px,
    EfficientFormer-V2's attention at 224 px); the step is then run again with ONNX's own shape
    inference, which quantisation needs no more than.

    Returns:
        A warning when the fallback was used, else ``None``.

    Raises:
        QuantizationError: the model cannot be prepared either way (naming ONNX Runtime's reason).
    """
    source, target = str(Path(src).resolve()), str(Path(dst).resolve())  # before the working directory changes
    try:
        with _scratch_directory():
            quant_pre_process(source, target, skip_symbolic_shape=False)
        return None
    except Exception as exc:  # TypeError, AssertionError, "Incomplete symbolic shape inference": a missing rule
        symbolic = f"{type(exc).__name__}: {first_line(exc, 160)}"
    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    except Exception as exc:  # the model is not one ONNX Runtime's quantiser can read
        raise QuantizationError(f"ONNX Runtime cannot prepare the model for INT8 ({type(exc).__name__}: {first_line(exc, 200)})") from exc
    return f"ONNX Runtime's symbolic shape inference failed ({symbolic}); INT8 was prepared with ONNX's shape inference instead"


@contextmanager
def _scratch_directory() -> Iterator[None]:
    """Run in a temporary working directory: ONNX Runtime's symbolic shape inference saves the
    model it could not finish into the current one (``sym_shape_infer_temp.onnx`` and its external
    data, 14 MB for EfficientFormer-V2-S0), which would land wherever the user ran the command."""
    previous = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="edgetransfer-shapes-") as scratch:
        os.chdir(scratch)
        try:
            yield
        finally:
            os.chdir(previous)


def calibrate(model: Path, stream: BatchStream, method: CalibMethod, symmetric: bool, cache: Path) -> Path:
    """Collect activation ranges chunk by chunk and save them as ONNX Runtime's calibration cache.

    Raises:
        EdgeTransferError: no readable calibration image.
    """
    options: dict = {"symmetric": symmetric}
    if method is not CalibMethod.MINMAX:
        # With quantize_static's defaults the histogram has as many bins as the quantised range
        # and entropy gives minmax's scales; a finer histogram makes both methods real.
        options.update(num_bins=2048, num_quantized_bins=128, percentile=99.999)
    with tempfile.TemporaryDirectory(prefix="edgetransfer-calib-") as tmp:
        calibrator = create_calibrator(
            model,
            None,
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=method.ort(),
            providers=["CPUExecutionProvider"],
            extra_options=options,
        )
        for chunk in stream.chunks(CHUNK_BATCHES):
            calibrator.collect_data(chunk)
        if stream.used == 0:
            raise QuantizationError("no calibration image could be read; check --calib")
        ranges = calibrator.compute_data()
        del calibrator
    save_tensors_data(ranges, cache)
    return cache


def quantize_qdq(model: Path, dst: Path, cache: Path, method: CalibMethod, scheme: QuantScheme, exclude: list[str]) -> None:
    """Static QDQ quantisation with ranges from ``cache``; ``exclude`` nodes stay in float."""
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    with _quiet_root_logging():
        quantize_static(
            model,
            dst,
            None,
            quant_format=QuantFormat.QDQ,
            per_channel=scheme.per_channel,
            reduce_range=scheme.reduce_range,
            activation_type=types[scheme.activation],
            weight_type=types[scheme.weight],
            nodes_to_exclude=list(exclude),
            calibrate_method=method.ort(),
            calibration_cache_path=cache,
            extra_options={"ActivationSymmetric": scheme.symmetric_activations, "WeightSymmetric": True},
        )
    model = onnx.load(str(dst))
    if float_outputs(model):
        onnx.save_model(model, str(dst))


@contextmanager
def _quiet_root_logging() -> Iterator[None]:
    """ONNX Runtime's quantiser logs on Python's root logger (one line per rank-1 weight it
    quantises per tensor, as LayerNorm's): kept off the terminal while it runs; what matters is
    in the variant's report."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def float_outputs(model) -> int:
    """Take the quantise-dequantise pair off each of the model's outputs, in place: the layer
    before writes the output in float. Quantising the logits saves no time (nothing reads them in
    the graph) and rounds them to 256 levels, which flips the top-1 of images whose two best
    classes are close: on EfficientNet-Lite0 at 224 px, 1 of 359 validation images with every
    layer in float. Returns how many outputs were changed."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    readers = Counter(tensor for node in graph.node for tensor in node.input)
    changed = 0
    for output in graph.output:
        dq = producers.get(output.name)
        q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or readers.get(q.output[0]) != 1 or readers.get(q.input[0]) != 1:
            continue
        layer = producers.get(q.input[0])
        if layer is None:
            continue
        layer.output[list(layer.output).index(q.input[0])] = output.name
        graph.node.remove(q)
        graph.node.remove(dq)
        changed += 1
    if changed:
        prune(graph)
    return changed


def prototype_nodes(model: Path) -> list[str]:
    """The prototype head's nodes, where the model has one: they stay in float. Its cosines are
    close to each other, so INT8 there would flip predictions, and enrolment rewrites a float
    prototype matrix."""
    return [node.name for node in onnx.load(str(model), load_external_data=False).graph.node if node.name.startswith(PROTOTYPE_NODE + "/")]


def quantize_dynamic(model: Path, dst: Path) -> None:
    """Dynamic (weights-only) quantisation: only when asked; usually slower for CNNs."""

    ort_quantize_dynamic(model, dst, weight_type=QuantType.QInt8, nodes_to_exclude=prototype_nodes(model))


def run_logits(model: Path | bytes, arrays: np.ndarray, batch: int = 64, threads: int | None = None, reference: bool = False) -> np.ndarray:
    """Logits of an ONNX model on CPU for prepared inputs, in batches; with ``reference``, a QDQ
    model in its reference semantics (graph optimisation off: exact int8 rounding computed in
    float, what a GPU's integer kernels give) rather than this CPU's integer kernels."""
    session = open_session(model, threads=threads, optimized=not reference)
    name = session.get_inputs()[0].name
    return run_batched(lambda chunk: session.run(None, {name: chunk})[0], arrays, batch, fixed_batch(session))


def keep_in_float(qdq, float_model, names: Sequence[str]):
    """A copy of the QDQ model ``qdq`` in which the named nodes are back in float: each reads the
    float tensors its twin in ``float_model`` (the model that was quantised) reads, weights and
    bias included; dequantisations nothing reads any more are removed. The nodes' outputs stay
    quantised for the nodes after them. Needs no calibration: it is a graph edit.

    Raises:
        QuantizationError: a name that is not a node of both models.
    """
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    nodes = {node.name: node for node in model.graph.node}
    twins = {node.name: node for node in float_model.graph.node}
    inputs = _FloatInputs(model.graph, float_model)
    for name in names:
        if name not in nodes or name not in twins:
            raise QuantizationError(f"no node named {name!r} in the quantised model")
        floats = [inputs.of(t) for t in twins[name].input]
        del nodes[name].input[:]
        nodes[name].input.extend(floats)
    prune(model.graph)
    sort_nodes(model.graph)
    return model


class _FloatInputs:
    """The float tensors a node put back in float reads, added to ``graph`` (a QDQ model's) from
    ``float_model`` (the model that was quantised) as they are asked for."""

    def __init__(self, graph, float_model) -> None:
        self.graph = graph
        self.float_weights = {init.name: init for init in float_model.graph.initializer}
        self.float_producers = {out: node for node in float_model.graph.node for out in node.output}
        self.present = {init.name for init in graph.initializer}
        self.producers = {out: node for node in graph.node for out in node.output}

    def of(self, tensor: str) -> str:
        """The float counterpart of the twin's input ``tensor`` (empty: an absent optional input)."""
        if not tensor:
            return tensor
        return self.weight(tensor) if tensor in self.float_weights else self.activation(tensor)

    def weight(self, tensor: str) -> str:
        # ONNX Runtime names a weight's dequantised output after the weight: the float copy needs its own name
        renamed = f"{tensor}_float" if tensor in self.producers else tensor
        if renamed not in self.present:
            weight = onnx.TensorProto()
            weight.CopyFrom(self.float_weights[tensor])
            weight.name = renamed
            self.graph.initializer.append(weight)
            self.present.add(renamed)
        return renamed

    def activation(self, tensor: str) -> str:
        # The quantiser drops a Relu or Clip whose range the quantised tensor already enforces, and
        # the layer before it writes the dropped node's output: put the dropped node back for this reader.
        twin, here = self.float_producers.get(tensor), self.producers.get(tensor)
        if twin is None or here is None or here.name == twin.name:
            return tensor
        restored = f"{tensor}_float"
        if restored not in self.producers:
            extra = [self.weight(t) if t in self.float_weights else t for t in twin.input[1:]]
            node = onnx.helper.make_node(twin.op_type, [tensor, *extra], [restored], name=f"{twin.name}_float")
            node.attribute.extend(twin.attribute)
            self.graph.node.append(node)
            self.producers[restored] = node
        return restored
