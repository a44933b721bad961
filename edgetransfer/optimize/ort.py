"""ONNX Runtime variants: offline graph optimisation, FP16 conversion, static INT8 (QDQ)."""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._enums import Choice
from .._io import atomic_path
from ..cpu import CpuFeatures, cpu_features
from ..errors import MissingDependencyError, QuantizationError
from ..progress import console, progress
from ..results import VariantReport
from .calibration import BatchStream, describe_samples
from .coverage import integer_coverage
from .guard import hold_budget, hold_prequantized, quantized_nodes
from . import rounding
from .qdq import prune, sort_nodes
from .rounding import Rounding
from .targets import Precision, Target, TargetSpec, Variant, register

if TYPE_CHECKING:
    from .context import BuildContext

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
    "build_variant",
    "build_onnx",
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
        from onnxruntime.quantization import CalibrationMethod

        return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile}[self.value]


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
    import onnx

    source = src if isinstance(src, onnx.ModelProto) else onnx.load(str(src), load_external_data=False)
    target = onnx.load(str(dst))
    onnx.helper.set_model_props(target, {p.key: p.value for p in source.metadata_props})
    onnx.save_model(target, str(dst))


def optimize_graph(src: Path, dst: Path) -> None:
    """ONNX Runtime's offline graph optimisation (extended level: portable across x86 CPUs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    copy_metadata(src, dst)


def to_fp16(src: Path, dst: Path) -> None:
    """Float16 weights and compute; float32 inputs and outputs; overflow-prone ops kept in float."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=DEFAULT_OP_BLOCK_LIST + FP16_KEEP_FLOAT,
                                    node_block_list=prototype_nodes(src))  # a prototype head stays float, as in INT8
    onnx.save_model(half, str(dst))


def preprocess_for_quantization(src: Path, dst: Path) -> None:
    """ONNX Runtime's quantisation pre-processing: shape inference and fusions (Conv+BN…)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)


def calibrate(model: Path, stream: BatchStream, method: CalibMethod, symmetric: bool, cache: Path) -> Path:
    """Collect activation ranges chunk by chunk and save them as ONNX Runtime's calibration cache.

    Raises:
        EdgeTransferError: no readable calibration image.
    """
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    options: dict = {"symmetric": symmetric}
    if method is not CalibMethod.MINMAX:
        # With quantize_static's defaults the histogram has as many bins as the quantised range
        # and entropy gives minmax's scales; a finer histogram makes both methods real.
        options.update(num_bins=2048, num_quantized_bins=128, percentile=99.999)
    with tempfile.TemporaryDirectory(prefix="edgetransfer-calib-") as tmp:
        calibrator = create_calibrator(
            model, None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=method.ort(), providers=["CPUExecutionProvider"], extra_options=options,
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
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    quantize_static(
        model, dst, None,
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
    import onnx

    model = onnx.load(str(dst))
    if float_outputs(model):
        onnx.save_model(model, str(dst))


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
    import onnx

    from ..export import PROTOTYPE_NODE

    return [node.name for node in onnx.load(str(model), load_external_data=False).graph.node if node.name.startswith(PROTOTYPE_NODE + "/")]


def quantize_dynamic(model: Path, dst: Path) -> None:
    """Dynamic (weights-only) quantisation: only when asked; usually slower for CNNs."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    ort_quantize_dynamic(model, dst, weight_type=QuantType.QInt8, nodes_to_exclude=prototype_nodes(model))


def run_logits(model: Path | bytes, arrays: np.ndarray, batch: int = 64, threads: int | None = None) -> np.ndarray:
    """Logits of an ONNX model on CPU for prepared inputs, in batches."""
    from ..runtime.sessions import fixed_batch, open_session, run_batched

    session = open_session(model, threads=threads)
    name = session.get_inputs()[0].name
    return run_batched(lambda chunk: session.run(None, {name: chunk})[0], arrays, batch, fixed_batch(session))


def build_variant(context: BuildContext, target: Target, precision: Precision) -> Variant:
    """An ONNX Runtime variant of the run's model: ``<target>-<precision>.onnx`` in the run."""
    return build_onnx(context, target, precision, context.run / f"{target.value}-{precision.value}.onnx")


def build_onnx(context: BuildContext, target: Target, precision: Precision, output: Path) -> Variant:
    """Optimise (fp32), convert (fp16) or quantise (int8) the run's ONNX model into ``output``,
    measured against the float model on the held-out images (CPU)."""
    report = VariantReport(evaluated_on="CPUExecutionProvider")
    with atomic_path(output) as tmp, tempfile.TemporaryDirectory(prefix="edgetransfer-opt-") as work:
        if precision is Precision.FP32:
            if target is Target.ORT_CPU:
                optimize_graph(context.base, tmp)
            else:
                shutil.copyfile(context.base, tmp)
        elif precision is Precision.FP16:
            if target is Target.ORT_CPU:
                report.warnings.append("FP16 will not be faster on a CPU: ONNX Runtime's CPU kernels compute most ops in FP32")
            to_fp16(context.base, tmp)
            report.kept_in_float = list(FP16_KEEP_FLOAT)
        else:
            _int8(context, target, tmp, Path(work), report)
            if target is Target.ORT_CPU:
                report.coverage = _coverage(tmp, report)
        report.accuracy = context.compare(run_logits(tmp, context.held_out))
    return Variant(output.name.removesuffix(".onnx"), target, precision, output, report)


COVERAGE_WARNING = 0.99  # below this share of MACs in integer kernels, say which layers run in float


def _coverage(model: Path, report: VariantReport):
    """The INT8 model's integer coverage in ONNX Runtime, with a warning naming the float layers
    when much of it runs in float (those cost more than FP32: a DQ before and a Q after each)."""
    coverage = integer_coverage(model)
    if coverage.share < COVERAGE_WARNING:
        report.warnings.append(f"ONNX Runtime runs only {coverage.summary()}")
    return coverage


def _int8(context: BuildContext, target: Target, output: Path, work: Path, report: VariantReport) -> None:
    quant = context.quant
    if context.prequantized:
        _prequantized(context, target, output, report)
        return
    if quant.dynamic:
        report.warnings.append("dynamic quantisation of a CNN is usually slower than FP32; static INT8 is the default for a reason")
        quantize_dynamic(context.base, output)
        report.details["mode"] = "dynamic"
        return
    rounding = _rounding(quant.rounding, report)  # before minutes of calibration, not after
    scheme = quant_scheme(target.value, cpu_features())
    report.warnings.extend(scheme.warnings)
    samples, source = context.calibration_samples()
    prepared = work / "prepared.onnx"
    preprocess_for_quantization(context.base, prepared)
    stream = context.stream(samples, quant.calib_batch)
    with console.status("ONNX Runtime: calibrating"):
        cache = calibrate(prepared, stream, quant.method, scheme.symmetric_activations, work / "calibration.json")
        quantize_qdq(prepared, output, cache, quant.method, scheme, prototype_nodes(prepared))
    subject = _OrtQuantized(prepared, output)
    adaround = _adaround(context, samples, scheme, subject)
    rounded = adaround() if rounding is Rounding.ADAROUND else None  # always; with auto, only when the budget is missed
    selection = context.selection()
    held = hold_budget(subject, selection, quant.max_accuracy_drop, quant.max_float_layers, lambda text: console.print(text, markup=False),
                       adaround if rounding is Rounding.AUTO else None)
    rounded = rounded or held.recovery
    if held.kept or rounded:  # the model the guard measured is the one that ships
        import onnx

        onnx.save_model(subject.candidate(held.kept), str(output))
    copy_metadata(context.base, output)
    report.kept_in_float, report.guard_steps = held.kept, held.steps
    report.details.update(
        mode="static QDQ", scheme=scheme.to_dict(), max_accuracy_drop_points=quant.max_accuracy_drop,
        calibration={"source": source, "method": quant.method.value, "images": stream.used, "batch": quant.calib_batch,
                     "files": describe_samples(samples)},
        rounding=rounded or {"method": "nearest", "asked": quant.rounding.value},
        guard=held.record(selection, quant.max_accuracy_drop, quant.max_float_layers),
    )


def _rounding(asked: Rounding, report: VariantReport) -> Rounding:
    """The rounding this build uses: ``auto`` without AMD Quark rounds to nearest and says so.

    Raises:
        MissingDependencyError: ``adaround`` asked for, and AMD Quark is not installed.
    """
    if asked is Rounding.ADAROUND:
        rounding.require()
    if asked is Rounding.AUTO and not rounding.available():
        report.warnings.append(f"learned rounding (AdaRound) needs AMD Quark ({rounding.INSTALL}); weights are rounded to nearest,"
                               " so more layers may have to stay in float")
        return Rounding.NEAREST
    return asked


def _adaround(context: BuildContext, samples, scheme: QuantScheme, subject: _OrtQuantized):
    """AdaRound on every quantised layer of ``subject``'s model, which it then holds; returns the record."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    quant = context.quant
    limits = tuple(int(v) for v in get_qmin_qmax_for_qType(TensorProto.INT8, reduce_range=scheme.reduce_range, symmetric=True))

    def recover() -> dict:
        images = samples[: max(quant.adaround_images, quant.calib_batch)]
        batches = list(iter(context.stream(images, quant.calib_batch).get_next, None))
        with progress() as bar:
            task = bar.add_task("AdaRound (AMD Quark)", total=None, status=f"{quant.adaround_iterations} iterations a layer")
            result = rounding.adaround(subject.float_model, subject.quantized, batches, quant.adaround_iterations, limits,
                                       lambda done, total: bar.update(task, completed=done, total=total))
            bar.update(task, completed=result.layers, total=result.layers)
        subject.quantized = result.model
        console.print(f"AdaRound: {result.moved} of {result.weights} weights in {result.layers} layers moved one step"
                      f" ({result.seconds:.0f} s)", markup=False)
        return result.record()

    return recover


def _prequantized(context: BuildContext, target: Target, output: Path, report: VariantReport) -> None:
    """A QAT run's QDQ model, shipped as it is (not quantised again) once the guard has measured it."""
    quant = context.quant
    if target is Target.ORT_CPU:  # weights folded to int8 initializers and integer kernels fused: 13.1 -> 3.7 MB on the demo
        optimize_graph(context.base, output)
    else:
        shutil.copyfile(context.base, output)
    selection = context.selection()
    held = hold_prequantized("INT8 (QAT)", lambda images: run_logits(output, images), selection, quant.max_accuracy_drop)
    report.kept_in_float, report.guard_steps = [], held.steps
    trained_for = context.run.read_config()["qat"]["options"]["target"]
    if target is Target.ORT_CPU and trained_for in ("tensorrt", "ort-cuda", "ort-trt"):
        report.warnings.append(f"this QAT run was trained for {trained_for} (int8 activations): ONNX Runtime's CPU kernels fuse few of its"
                               " convolutions; run the QAT with --qat-target ort-cpu for this target")
    report.details.update(mode="static QDQ from quantisation-aware training, shipped as it is",
                          qat=context.run.read_config()["qat"], guard=held.record(selection, quant.max_accuracy_drop, 0))


def keep_in_float(qdq, float_model, names: Sequence[str]):
    """A copy of the QDQ model ``qdq`` in which the named nodes are back in float: each reads the
    float tensors its twin in ``float_model`` (the model that was quantised) reads, weights and
    bias included; dequantisations nothing reads any more are removed. The nodes' outputs stay
    quantised for the nodes after them. Needs no calibration: it is a graph edit.

    Raises:
        QuantizationError: a name that is not a node of both models.
    """
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    graph = model.graph
    nodes = {node.name: node for node in graph.node}
    twins = {node.name: node for node in float_model.graph.node}
    float_weights = {init.name: init for init in float_model.graph.initializer}
    float_producers = {out: node for node in float_model.graph.node for out in node.output}
    present = {init.name for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}

    def float_weight(tensor: str) -> str:
        # ONNX Runtime names a weight's dequantised output after the weight: the float copy needs its own name
        renamed = f"{tensor}_float" if tensor in producers else tensor
        if renamed not in present:
            weight = onnx.TensorProto()
            weight.CopyFrom(float_weights[tensor])
            weight.name = renamed
            graph.initializer.append(weight)
            present.add(renamed)
        return renamed

    def float_activation(tensor: str) -> str:
        # The quantiser drops a Relu or Clip whose range the quantised tensor already enforces, and
        # the layer before it writes the dropped node's output: put the dropped node back for this reader.
        twin, here = float_producers.get(tensor), producers.get(tensor)
        if twin is None or here is None or here.name == twin.name:
            return tensor
        restored = f"{tensor}_float"
        if restored not in producers:
            extra = [float_weight(t) if t in float_weights else t for t in twin.input[1:]]
            node = onnx.helper.make_node(twin.op_type, [tensor, *extra], [restored], name=f"{twin.name}_float")
            node.attribute.extend(twin.attribute)
            graph.node.append(node)
            producers[restored] = node
        return restored

    for name in names:
        if name not in nodes or name not in twins:
            raise QuantizationError(f"no node named {name!r} in the quantised model")
        inputs = [float_weight(t) if t in float_weights else float_activation(t) if t else t for t in twins[name].input]
        del nodes[name].input[:]
        nodes[name].input.extend(inputs)
    prune(graph)
    sort_nodes(graph)
    return model


class _OrtQuantized:
    """ONNX Runtime's static QDQ model under the guard: a layer is kept in float by
    :func:`keep_in_float` (a graph edit on the quantised model, no new calibration)."""

    name = "INT8"
    fallback = "fp32/fp16"

    def __init__(self, prepared: Path, quantized: Path) -> None:
        import onnx

        self.float_model = onnx.load(str(prepared))
        self.quantized = onnx.load(str(quantized))

    def layers(self) -> list[str]:
        return quantized_nodes(self.quantized)

    def candidate(self, kept: Sequence[str]):
        return keep_in_float(self.quantized, self.float_model, kept) if kept else self.quantized

    def logits(self, kept: Sequence[str], images: np.ndarray) -> np.ndarray:
        return run_logits(self.candidate(kept).SerializeToString(), images)


def _check_provider(target: Target, provider: str | None):
    def check(precisions: list[Precision]) -> None:
        if provider is None:
            return
        from ..runtime import probe_provider

        problem = probe_provider(provider)
        if problem:
            raise MissingDependencyError(
                f"target {target.value} needs ONNX Runtime's {provider}, but {problem};"
                " build it on the machine with the NVIDIA GPU it will run on (onnxruntime-gpu)"
            )

    return check


def _runner(provider: str):
    def open_runner(path: Path, threads: int | None):
        from ..backends import OrtRunner

        return OrtRunner(path, provider, threads)

    return open_runner


_HINTS = {Precision.BF16: "bf16 is built for --target openvino"}
for _target, _provider in ((Target.ORT_CPU, None), (Target.ORT_CUDA, "CUDAExecutionProvider"), (Target.ORT_TRT, "TensorrtExecutionProvider")):
    register(TargetSpec(
        _target, (Precision.FP32, Precision.FP16, Precision.INT8), "onnx", (".onnx",), build_variant,
        _runner(_provider or "CPUExecutionProvider"), _check_provider(_target, _provider), _provider or "CPUExecutionProvider", _HINTS,
    ))
