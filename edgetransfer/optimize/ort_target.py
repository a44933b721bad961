"""The ONNX Runtime targets (``ort-cpu``, ``ort-cuda``, ``ort-trt``): a run's ONNX model optimised,
converted to FP16 or quantised to INT8 under the accuracy guard, and the runner bench uses."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto
from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

from ..backends import OrtRunner
from ..config import GPU_TARGETS
from ..cpu import cpu_features
from ..errors import MissingDependencyError
from ..progress import console, progress
from ..results import VariantReport
from ..runtime import probe_provider
from ..runtime.files import atomic_path
from . import rounding
from .calibration import describe_samples
from .context import BuildContext
from .coverage import integer_coverage
from .guard import hold_budget, hold_prequantized, quantized_nodes
from .ort import (
    FP16_KEEP_FLOAT,
    QuantScheme,
    calibrate,
    copy_metadata,
    keep_in_float,
    optimize_graph,
    preprocess_for_quantization,
    prototype_nodes,
    quant_scheme,
    quantize_dynamic,
    quantize_qdq,
    run_logits,
    to_fp16,
)
from .rounding import Rounding
from .targets import Precision, Target, TargetSpec, Variant, register

__all__ = ["build_variant", "build_onnx", "gpu_reference", "COVERAGE_WARNING", "OrtQuantized"]


def build_variant(context: BuildContext, target: Target, precision: Precision) -> Variant:
    """An ONNX Runtime variant of the run's model: ``<target>-<precision>.onnx`` in the run."""
    return build_onnx(context, target, precision, context.run / f"{target.value}-{precision.value}.onnx")


def build_onnx(context: BuildContext, target: Target, precision: Precision, output: Path) -> Variant:
    """Optimise (fp32), convert (fp16) or quantise (int8) the run's ONNX model into ``output``,
    measured against the float model on the held-out images (CPU). An INT8 model for a GPU is
    measured in its QDQ reference semantics on a CPU whose integer kernels would saturate its
    8-bit weights (:func:`gpu_reference`): what the GPU computes, not what this CPU would."""
    reference = gpu_reference(target, precision)
    report = VariantReport(evaluated_on="CPUExecutionProvider" + (" (QDQ reference semantics)" if reference else ""))
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
            _int8(context, target, tmp, Path(work), report, reference)
            if target is Target.ORT_CPU:
                report.coverage = _coverage(tmp, report)
        context.assess(report, run_logits(tmp, context.held_out, reference=reference))
    return Variant(output.name.removesuffix(".onnx"), target, precision, output, report)


def gpu_reference(target: Target, precision: Precision) -> bool:
    """Whether an INT8 model for ``target`` is measured here in its QDQ reference semantics: it is
    for a GPU (8-bit weights, symmetric int8) and this CPU's integer kernels saturate such weights."""
    return precision is Precision.INT8 and target is not Target.ORT_CPU and cpu_features().int8_saturates


COVERAGE_WARNING = 0.99  # below this share of MACs in integer kernels, say which layers run in float


def _coverage(model: Path, report: VariantReport):
    """The INT8 model's integer coverage in ONNX Runtime, with a warning naming the float layers
    when much of it runs in float (those cost more than FP32: a DQ before and a Q after each)."""
    coverage = integer_coverage(model)
    if coverage.share < COVERAGE_WARNING:
        report.warnings.append(f"ONNX Runtime runs only {coverage.summary()}")
    return coverage


def _int8(context: BuildContext, target: Target, output: Path, work: Path, report: VariantReport, reference: bool) -> None:
    quant = context.quant
    if context.prequantized:
        _prequantized(context, target, output, report, reference)
        return
    if quant.dynamic:
        _dynamic(context, output, report)
        return
    rounding = _rounding(quant.rounding, report)  # before minutes of calibration, not after
    scheme = quant_scheme(target.value, cpu_features())
    report.warnings.extend(scheme.warnings)
    samples, source = context.calibration_samples()
    prepared = _prepared(context.base, work / "prepared.onnx", report)
    stream = context.stream(samples, quant.calib_batch)
    with console.status("ONNX Runtime: calibrating"):
        cache = calibrate(prepared, stream, quant.method, scheme.symmetric_activations, work / "calibration.json")
        quantize_qdq(prepared, output, cache, quant.method, scheme, prototype_nodes(prepared))
    subject = OrtQuantized(prepared, output, reference)
    adaround = _adaround(context, samples, scheme, subject)
    rounded = adaround() if rounding is Rounding.ADAROUND else None  # always; with auto, only when the budget is missed
    selection = context.selection()
    held = hold_budget(
        subject,
        selection,
        quant.max_accuracy_drop,
        quant.max_float_layers,
        lambda text: console.print(text, markup=False),
        adaround if rounding is Rounding.AUTO else None,
    )
    rounded = rounded or held.recovery
    if held.kept or rounded:  # the model the guard measured is the one that ships
        onnx.save_model(subject.candidate(held.kept), str(output))
    copy_metadata(context.base, output)
    report.kept_in_float, report.guard_steps = held.kept, held.steps
    report.details.update(
        mode="static QDQ",
        scheme=scheme.to_dict(),
        max_accuracy_drop_points=quant.max_accuracy_drop,
        calibration={
            "source": source,
            "method": quant.method.value,
            "images": stream.used,
            "batch": quant.calib_batch,
            "files": describe_samples(samples),
        },
        rounding=rounded or {"method": "nearest", "asked": quant.rounding.value},
        guard=held.record(selection, quant.max_accuracy_drop, quant.max_float_layers),
    )


def _prepared(base: Path, prepared: Path, report: VariantReport) -> Path:
    """``base`` through ONNX Runtime's quantisation pre-processing, written to ``prepared``."""
    fallback = preprocess_for_quantization(base, prepared)
    if fallback:
        report.warnings.append(fallback)
    return prepared


def _dynamic(context: BuildContext, output: Path, report: VariantReport) -> None:
    report.warnings.append("dynamic quantisation of a CNN is usually slower than FP32; static INT8 is the default for a reason")
    quantize_dynamic(context.base, output)
    report.details["mode"] = "dynamic"


def _rounding(asked: Rounding, report: VariantReport) -> Rounding:
    """The rounding this build uses: ``auto`` without AMD Quark rounds to nearest and says so.

    Raises:
        MissingDependencyError: ``adaround`` asked for, and AMD Quark is not installed.
    """
    if asked is Rounding.ADAROUND:
        rounding.require()
    if asked is Rounding.AUTO and not rounding.available():
        report.warnings.append(
            f"learned rounding (AdaRound) needs AMD Quark ({rounding.INSTALL}); weights are rounded to nearest,"
            " so more layers may have to stay in float"
        )
        return Rounding.NEAREST
    return asked


def _adaround(context: BuildContext, samples, scheme: QuantScheme, subject: OrtQuantized):
    """AdaRound on every quantised layer of ``subject``'s model, which it then holds; returns the record."""
    quant = context.quant
    low, high = get_qmin_qmax_for_qType(TensorProto.INT8, reduce_range=scheme.reduce_range, symmetric=True)
    limits = (int(low), int(high))

    def recover() -> dict:
        images = samples[: max(quant.adaround_images, quant.calib_batch)]
        batches = list(iter(context.stream(images, quant.calib_batch).get_next, None))
        with progress() as bar:
            task = bar.add_task("AdaRound (AMD Quark)", total=None, status=f"{quant.adaround_iterations} iterations a layer")
            result = rounding.adaround(
                subject.float_model,
                subject.quantized,
                batches,
                quant.adaround_iterations,
                limits,
                lambda done, total: bar.update(task, completed=done, total=total),
            )
            bar.update(task, completed=result.layers, total=result.layers)
        subject.quantized = result.model
        console.print(
            f"AdaRound: {result.moved} of {result.weights} weights in {result.layers} layers moved one step ({result.seconds:.0f} s)", markup=False
        )
        return result.record()

    return recover


def _prequantized(context: BuildContext, target: Target, output: Path, report: VariantReport, reference: bool) -> None:
    """A QAT run's QDQ model, shipped as it is (not quantised again) once the guard has measured it."""
    quant = context.quant
    if target is Target.ORT_CPU:  # weights folded to int8 initializers and integer kernels fused: 13.1 -> 3.7 MB on the demo
        optimize_graph(context.base, output)
    else:
        shutil.copyfile(context.base, output)
    selection = context.selection()
    held = hold_prequantized("INT8 (QAT)", lambda images: run_logits(output, images, reference=reference), selection, quant.max_accuracy_drop)
    report.kept_in_float, report.guard_steps = [], held.steps
    record = context.run.qat_record()
    trained_for = record["options"]["target"] if record else None
    if target is Target.ORT_CPU and trained_for in GPU_TARGETS:
        report.warnings.append(
            f"this QAT run was trained for {trained_for} (int8 activations): ONNX Runtime's CPU kernels fuse few of its"
            " convolutions; run the QAT with --qat-target ort-cpu for this target"
        )
    report.details.update(
        mode="static QDQ from quantisation-aware training, shipped as it is",
        qat=context.run.qat_record(),
        guard=held.record(selection, quant.max_accuracy_drop, 0),
    )


class OrtQuantized:
    """ONNX Runtime's static QDQ model under the guard: a layer is kept in float by
    :func:`keep_in_float` (a graph edit on the quantised model, no new calibration)."""

    name = "INT8"
    fallback = "fp32/fp16"

    def __init__(self, prepared: Path, quantized: Path, reference: bool = False) -> None:
        self.float_model = onnx.load(str(prepared))
        self.quantized = onnx.load(str(quantized))
        self.reference = reference  # measured in QDQ reference semantics (:func:`gpu_reference`)

    def layers(self) -> list[str]:
        return quantized_nodes(self.quantized)

    def candidate(self, kept: Sequence[str]):
        return keep_in_float(self.quantized, self.float_model, kept) if kept else self.quantized

    def logits(self, kept: Sequence[str], images: np.ndarray) -> np.ndarray:
        return run_logits(self.candidate(kept).SerializeToString(), images, reference=self.reference)


def _check_provider(target: Target, provider: str | None):
    def check(precisions: list[Precision]) -> None:
        if provider is None:
            return
        problem = probe_provider(provider)
        if problem:
            raise MissingDependencyError(
                f"target {target.value} needs ONNX Runtime's {provider}, but {problem};"
                " build it on the machine with the NVIDIA GPU it will run on (onnxruntime-gpu)"
            )

    return check


def _runner(provider: str):
    def open_runner(path: Path, threads: int | None):
        return OrtRunner(path, provider, threads)

    return open_runner


_HINTS = {Precision.BF16: "bf16 is built for --target openvino"}
for _target, _provider in ((Target.ORT_CPU, None), (Target.ORT_CUDA, "CUDAExecutionProvider"), (Target.ORT_TRT, "TensorrtExecutionProvider")):
    register(
        TargetSpec(
            _target,
            (Precision.FP32, Precision.FP16, Precision.INT8),
            "onnx",
            (".onnx",),
            build_variant,
            _runner(_provider or "CPUExecutionProvider"),
            _check_provider(_target, _provider),
            _provider or "CPUExecutionProvider",
            _HINTS,
        )
    )
