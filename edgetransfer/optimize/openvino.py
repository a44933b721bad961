"""OpenVINO variants: the run's ONNX model converted to OpenVINO IR by OpenVINO's own converter,
run in f32 or bf16, or quantised to INT8 by NNCF post-training quantisation.

NNCF settings, measured on a Xeon with AMX on EfficientNet-Lite0 fine-tuned on the digits at
224 px (top-1 of the float model 95.8%): the default fast bias correction gave 80.8%, full bias
correction 93.0% and with the mixed preset (asymmetric activations) 93.9%; both cost about 6 s
more per quantisation.

On x86 CPUs without VNNI or AMX, OpenVINO multiplies u8 activations by s8 weights with AVX2
instructions that add pairs of products in 16 bits, which saturate; NNCF's overflow fix (weights
in 7 bits) avoids that. By default NNCF applies it to the first layer only; on such CPUs it is
applied to every layer. On an AVX2-only EPYC, EfficientNet-Lite0 at 224 px lost 50.1 top-1
points in INT8 with the overflow fix off and 2.8 with it on every layer (mixed preset); on the
demo model it cut the INT8 logit error to a third (mean squared error 1.47 -> 0.47).

The accuracy guard works on NNCF's own terms. The model is quantised once with its weights left
in float behind FakeQuantize nodes; a layer is "kept in float" by wiring its inputs past their
FakeQuantize nodes (and restoring the bias that bias correction changed), which needs no new
calibration, so every layer's added error can be measured cheaply (:mod:`.guard`). The model
the guard measured is the one that ships, with its INT8 weights compressed.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import OpenVinoRunner
from ..cpu import CpuFeatures, cpu_features
from ..errors import (
    EdgeTransferError,
    ExportError,
    MissingDependencyError,
    OptionError,
    QuantizationError,
)
from ..onnxheads import PROTOTYPE_NODE
from ..progress import console
from ..results import VariantReport
from ..runtime import openvino_ir
from ..runtime.files import sha256_file
from ..runtime.openvino_ir import (
    EXTRA,
    INFERENCE_PRECISION,
    compile_config,
    import_openvino,
    one_line,
    save_ir,
)
from .calibration import describe_samples
from .context import BuildContext
from .guard import hold_budget, hold_prequantized
from .ort import CalibMethod
from .rounding import Rounding
from .targets import Precision, Target, TargetSpec, Variant, register

__all__ = ["require", "build_variant", "convert", "logits", "overflow_fix", "quantize", "quantized_ops", "keep_in_float", "compress_weights"]


def require(nncf: bool = False) -> None:
    """Raise :class:`MissingDependencyError` naming the extra when OpenVINO (or NNCF) is missing."""
    import_openvino()
    if nncf:
        try:
            import nncf as nncf_module  # noqa: F401  (optional heavy dependency, the openvino extra: imported here)
        except ImportError:
            raise MissingDependencyError(f"INT8 for OpenVINO needs NNCF, which is not installed: {EXTRA}") from None


def convert(onnx_model: Path):
    """The ONNX model as an ``openvino.Model`` (OpenVINO's converter).

    Raises:
        ExportError: OpenVINO cannot convert it; its own reason, on one line.
    """
    ov = import_openvino()
    try:
        return ov.convert_model(str(onnx_model))
    except Exception as exc:  # OpConversionFailure, GeneralFailure, ovc's Error: all "cannot convert"
        raise ExportError(f"OpenVINO cannot convert {Path(onnx_model).name}: {one_line(exc)}") from exc


def logits(model, arrays: np.ndarray, precision: str = "f32", threads: int | None = None, batch: int = 64) -> np.ndarray:
    """Run ``model`` on the CPU over ``arrays`` in batches, in ``precision`` ("f32" or "bf16")."""
    ov = import_openvino()
    compiled = ov.Core().compile_model(model, "CPU", compile_config(threads, precision, hint="THROUGHPUT"))
    request = compiled.create_infer_request()
    outputs = [request.infer({0: arrays[i : i + batch]})[0].copy() for i in range(0, len(arrays), batch)]
    return np.concatenate(outputs)


def overflow_fix(cpu: CpuFeatures) -> str:
    """NNCF's overflow fix for this CPU: ``"enable"`` (7-bit weights in every layer) on x86
    without VNNI or AMX, where u8 x s8 products saturate 16-bit sums; otherwise NNCF's default."""
    return "enable" if cpu.x86 and not cpu.int8_fast else "first_layer_only"


def quantize(model, batches: Sequence[np.ndarray], ignored: Sequence[str] = (), compress_weights: bool = True, overflow: str = "first_layer_only"):
    """NNCF post-training INT8 quantisation of ``model`` calibrated on ``batches``.

    Args:
        ignored: names of operations NNCF leaves in float (its ignored scope).
        compress_weights: store weights as int8; ``False`` keeps float weights behind
            FakeQuantize nodes, which :func:`keep_in_float` can undo layer by layer.
        overflow: NNCF's overflow fix, ``"enable"``, ``"first_layer_only"`` or ``"disable"``
            (see :func:`overflow_fix`).

    Raises:
        QuantizationError: NNCF fails on the model (its reason, on one line).
    """
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # NNCF imports it; no CUDA is fine
    import nncf  # optional heavy dependency (the openvino extra): imported here
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        OverflowFix,
    )

    nncf.set_log_level(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # NNCF's own progress bars; ours show instead
            return nncf.quantize(
                model,
                nncf.Dataset(list(batches)),
                preset=nncf.QuantizationPreset.MIXED,
                subset_size=len(batches),
                fast_bias_correction=False,
                ignored_scope=nncf.IgnoredScope(names=list(ignored)) if ignored else None,
                advanced_parameters=AdvancedQuantizationParameters(
                    overflow_fix=OverflowFix(overflow), backend_params={"compress_weights": compress_weights}
                ),
            )
    except EdgeTransferError:
        raise
    except Exception as exc:
        raise QuantizationError(f"NNCF could not quantise the model: {one_line(exc)}") from exc


def prototype_ops(model) -> list[str]:
    """The prototype head's operations, kept in float (see ``ort.prototype_nodes``)."""
    return [
        op.get_friendly_name()
        for op in model.get_ordered_ops()
        if op.get_friendly_name().startswith(PROTOTYPE_NODE + "/") and op.get_type_name() not in ("Constant", "Result", "Parameter")
    ]


def quantized_ops(model) -> list[str]:
    """Names of the operations that read a quantised tensor (what quantisation touched), in graph
    order: a FakeQuantize output, or weights decompressed from an integer constant (what
    :func:`compress_weights` makes of a FakeQuantize on weights: Constant -> Convert [-> Subtract]
    -> Multiply). Without the second, an operation whose activation NNCF quantised further up (the
    classifier's MatMul, quantised before the Reshape) would not count once its weights are int8."""
    return [
        op.get_friendly_name()
        for op in model.get_ordered_ops()
        if op.get_type_name() not in ("FakeQuantize", "Result") and any(_quantized(_source(i)) for i in op.inputs())
    ]


def _quantized(node) -> bool:
    if node.get_type_name() == "FakeQuantize":
        return True
    if node.get_type_name() != "Multiply":
        return False
    for port in node.inputs():  # Multiply(scale, Subtract(Convert(int8 Constant), zero point)) or Multiply(scale, Convert(...))
        source = _source(port)
        if source.get_type_name() == "Subtract":
            source = _source(source.input(0))
        if source.get_type_name() == "Convert" and _source(source.input(0)).get_type_name() == "Constant":
            if _source(source.input(0)).get_output_element_type(0).get_type_name() in ("i8", "u8", "i4", "u4"):
                return True
    return False


def keep_in_float(quantized, original, names: Sequence[str]):
    """A copy of ``quantized`` (made with ``compress_weights=False``) in which the named operations
    are back in float: they read their inputs and weights from before their FakeQuantize nodes,
    and a bias that NNCF's bias correction changed for them gets its value from ``original``.

    Raises:
        EdgeTransferError: a name that is not an operation of the model.
    """
    model = quantized.clone()
    ops = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
    originals = {op.get_friendly_name(): op for op in original.get_ordered_ops()}
    for name in names:
        if name not in ops:
            raise EdgeTransferError(f"no operation named {name!r} in the quantised model")
        for port in ops[name].inputs():
            fake = _source(port)
            if fake.get_type_name() == "FakeQuantize":
                port.replace_source_output(fake.input(0).get_source_output())
        _restore_bias(ops[name], originals)
    model.validate_nodes_and_infer_types()
    return model


def _restore_bias(op, originals: dict) -> None:
    """Bias correction folds the layer's quantisation error into the bias of the Add after it."""
    for target in op.output(0).get_target_inputs():
        add = target.get_node()
        twin = originals.get(add.get_friendly_name())
        if add.get_type_name() != "Add" or twin is None or twin.get_type_name() != "Add":
            continue
        for port, twin_port in zip(add.inputs(), twin.inputs(), strict=True):
            if _source(port).get_type_name() == "Constant" and _source(twin_port).get_type_name() == "Constant":
                port.replace_source_output(twin_port.get_source_output())


def _source(port):
    return port.get_source_output().get_node()


def compress_weights(model):
    """Store the float weights behind FakeQuantize nodes as int8 (what NNCF does by default)."""
    # optional heavy dependency (the openvino extra): imported here
    from openvino._offline_transformations import compress_quantize_weights_transformation

    compress_quantize_weights_transformation(model)
    return model


def build_variant(context: BuildContext, target: Target, precision: Precision) -> Variant:
    """An OpenVINO IR of the run's model: f32, bf16 (the same IR, run in bf16) or NNCF INT8."""
    name = f"openvino-{precision.value}"
    model = convert(context.base)
    hint = "bf16" if precision is Precision.BF16 else "f32"
    report = VariantReport(evaluated_on=f"OpenVINO CPU ({hint})", details={"inference_precision": hint})
    if precision is Precision.INT8:
        model = _int8(context, model, report)
    context.assess(report, logits(model, context.held_out, hint))
    budget = context.quant.max_accuracy_drop
    if precision is Precision.BF16 and (report.drop_points or 0.0) > budget:
        report.warnings.append(
            f"bf16 loses {report.drop_points:.2f} top-1 points ({_interval(report)}), more than the"
            f" {budget}-point budget; bench will not recommend it"
        )
    props = {**context.info.to_props(), "precision": precision.value, INFERENCE_PRECISION: hint, "source_onnx_sha256": sha256_file(context.base)}
    output = save_ir(model, context.run / f"{name}.xml", props)
    return Variant(name, Target.OPENVINO, precision, output, report)


def _int8(context: BuildContext, model, report: VariantReport) -> Any:
    """NNCF INT8 under the accuracy guard; the layers it keeps go to NNCF's ignored scope, and the
    measured reverted model ships where that scope misses the budget."""
    quant = context.quant
    if context.prequantized:  # a QAT run's QDQ model: OpenVINO reads its QDQ pairs as FakeQuantize; nothing is quantised again
        selection = context.selection()
        held = hold_prequantized("OpenVINO INT8 (QAT)", lambda images: logits(model, images), selection, quant.max_accuracy_drop)
        report.kept_in_float, report.guard_steps = [], held.steps
        report.details.update(
            mode="QDQ from quantisation-aware training, converted as it is",
            qat=context.run.qat_record(),
            guard=held.record(selection, quant.max_accuracy_drop, 0),
        )
        return compress_weights(model)
    samples, source = context.calibration_samples()
    stream = context.stream(samples, quant.calib_batch)
    batches = [feed[context.input_name] for feed in iter(stream.get_next, None)]
    if quant.method is not CalibMethod.MINMAX:
        report.warnings.append(f"--calib-method {quant.method.value} applies to ONNX Runtime INT8; NNCF chooses OpenVINO's ranges itself")
    if quant.rounding is Rounding.ADAROUND:
        report.warnings.append("--rounding adaround applies to ONNX Runtime INT8; NNCF corrects OpenVINO's biases itself")
    cpu = cpu_features()
    overflow = overflow_fix(cpu)
    console.print(f"CPU: {cpu.summary()}; NNCF overflow fix: {overflow}")
    if cpu.x86 and not cpu.int8_fast:
        report.warnings.append(f"this CPU has no VNNI or AMX ({cpu.summary()}); OpenVINO INT8 may gain less here than on one that has")
    with console.status("NNCF: collecting statistics and correcting biases"):
        quantized = quantize(model, batches, prototype_ops(model), compress_weights=False, overflow=overflow)
    report.details.update(
        mode="static (NNCF)",
        nncf={"preset": "mixed", "bias_correction": "full", "overflow_fix": overflow},
        cpu=cpu.to_dict(),
        calibration={"source": source, "images": stream.used, "batch": quant.calib_batch, "files": describe_samples(samples)},
        max_accuracy_drop_points=quant.max_accuracy_drop,
    )
    subject = _NncfQuantized(model, quantized)
    selection = context.selection()
    held = hold_budget(subject, selection, quant.max_accuracy_drop, quant.max_float_layers, lambda text: console.print(text, markup=False))
    report.kept_in_float, report.guard_steps = held.kept, held.steps
    report.details["guard"] = held.record(selection, quant.max_accuracy_drop, quant.max_float_layers)
    return compress_weights(subject.candidate(held.kept))  # the model the guard measured is the one that ships


class _NncfQuantized:
    """NNCF's quantisation under the guard: a layer is kept in float by wiring it past its
    FakeQuantize nodes (:func:`keep_in_float`), with no new calibration."""

    name = "OpenVINO INT8"
    fallback = "fp32/bf16"

    def __init__(self, original, quantized) -> None:
        self.original, self.quantized = original, quantized

    def layers(self) -> list[str]:
        return quantized_ops(self.quantized)

    def candidate(self, kept: Sequence[str]):
        return keep_in_float(self.quantized, self.original, kept) if kept else self.quantized

    def logits(self, kept: Sequence[str], images: np.ndarray) -> np.ndarray:
        return logits(self.candidate(kept), images)


def _interval(report: VariantReport) -> str:
    if report.accuracy is None or report.accuracy.change_interval is None:
        return "no interval: not measured"
    low, high = report.accuracy.change_interval
    return f"95% interval {-high:.2f} to {-low:.2f} on {report.accuracy.images} {report.accuracy.split} images"


def _check_available(precisions: list[Precision]) -> None:
    require(nncf=Precision.INT8 in precisions)
    problem = openvino_ir.bf16_problem() if Precision.BF16 in precisions else None  # looked up when called: tests replace it
    if problem:
        raise OptionError(f"cannot build openvino-bf16: {problem}")


def _runner(path: Path, threads: int | None):
    return OpenVinoRunner(path, threads)


register(
    TargetSpec(
        Target.OPENVINO,
        (Precision.FP32, Precision.BF16, Precision.INT8),
        "openvino",
        (".xml", ".bin"),
        build_variant,
        _runner,
        _check_available,
        missing_hints={Precision.FP16: "OpenVINO's CPU plugin computes bf16, not fp16: use --precision bf16"},
    )
)
