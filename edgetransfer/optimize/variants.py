"""Build the variants a user asks for (target x precision) from the run's verified ONNX model."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_path, read_json, sha256_file
from ..data import DataSpec, load_dataset
from .._enums import Choice
from ..errors import EdgeTransferError, RunError
from ..manifest import Manifest
from ..metadata import ModelInfo
from ..metrics import topk_accuracy
from ..progress import console
from . import ort as ortq
from .calibration import BatchStream, balanced_sample, describe_samples, folder_samples
from .cpu import cpu_features
from .guard import Score, guard, quantized_nodes, score

__all__ = ["Target", "Precision", "QuantOptions", "TensorRTOptions", "Variant", "build_variants", "check_combinations", "QuantizationError"]


class QuantizationError(EdgeTransferError):
    """INT8 cannot meet the accuracy budget, or calibration data is unusable."""


class Target(Choice):
    ORT_CPU = "ort-cpu"
    ORT_CUDA = "ort-cuda"
    ORT_TRT = "ort-trt"
    TENSORRT = "tensorrt"
    OPENVINO = "openvino"

    @property
    def provider(self) -> str | None:
        return {"ort-cuda": "CUDAExecutionProvider", "ort-trt": "TensorrtExecutionProvider"}.get(self.value)


class Precision(Choice):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"


# What each target can build; anything else is refused before any work starts.
SUPPORTED = {
    Target.ORT_CPU: (Precision.FP32, Precision.FP16, Precision.INT8),
    Target.ORT_CUDA: (Precision.FP32, Precision.FP16, Precision.INT8),
    Target.ORT_TRT: (Precision.FP32, Precision.FP16, Precision.INT8),
    Target.TENSORRT: (Precision.FP32, Precision.FP16, Precision.INT8),
    Target.OPENVINO: (Precision.FP32, Precision.BF16, Precision.INT8),
}


@dataclass(frozen=True)
class QuantOptions:
    """INT8 settings.

    Attributes:
        calib: an image folder to calibrate on (classes optional); default: the run's training data.
        calib_size: how many images (class-balanced) to take from the run's training data.
        calib_batch: images per calibration batch.
        method: how activation ranges are chosen.
        max_accuracy_drop: top-1 points INT8 may lose against the float model on validation data.
        max_float_layers: the most layers the guard may keep in float before giving up.
        dynamic: dynamic (weights-only) quantisation instead of static; slower for CNNs.
        eval_images: cap on validation images for the accuracy check (all by default).
    """

    calib: Path | None = None
    calib_size: int = 256
    calib_batch: int = 8
    method: ortq.CalibMethod = ortq.CalibMethod.MINMAX
    max_accuracy_drop: float = 1.0
    max_float_layers: int = 32
    dynamic: bool = False
    eval_images: int | None = None

    def __post_init__(self) -> None:
        if self.calib_size < 1 or self.calib_batch < 1:
            raise EdgeTransferError(f"calibration size and batch must be at least 1 (got {self.calib_size}, {self.calib_batch})")
        if self.max_accuracy_drop < 0:
            raise EdgeTransferError(f"max accuracy drop must be 0 or more points, got {self.max_accuracy_drop}")


@dataclass(frozen=True)
class TensorRTOptions:
    """Engine build settings: the optimisation profile of the dynamic batch, workspace, timing cache."""

    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 16
    workspace_mib: int = 2048
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise EdgeTransferError(
                f"TensorRT batch profile needs 1 <= min <= opt <= max, got {self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )


@dataclass
class Variant:
    name: str
    target: Target
    precision: Precision
    path: Path
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        """Every file of the variant: an OpenVINO IR is its .xml and its .bin."""
        return [self.path, self.path.with_suffix(".bin")] if self.target is Target.OPENVINO else [self.path]

    @property
    def size_bytes(self) -> int | None:
        return sum(f.stat().st_size for f in self.files) if all(f.exists() for f in self.files) else None


@dataclass
class _Context:
    """What every variant needs: the base model, its metadata, validation data and its float logits."""

    run_dir: Path
    base: Path
    info: ModelInfo
    input_name: str
    val: np.ndarray
    labels: np.ndarray
    float_logits: np.ndarray
    dataset: Any


def build_variants(
    run_dir: str | Path,
    targets: list[Target],
    precisions: list[Precision],
    quant: QuantOptions = QuantOptions(),
    tensorrt: TensorRTOptions = TensorRTOptions(),
) -> list[Variant]:
    """Make every (target, precision) variant of the run's ONNX model and record it.

    Raises:
        RunError: no run, or its ``model.onnx`` was not exported from its checkpoint.
        EdgeTransferError: a target whose provider or library is missing here.
        QuantizationError: INT8 cannot meet ``quant.max_accuracy_drop``; unusable calibration data.
    """
    run_dir = Path(run_dir)
    check_combinations(targets, precisions, quant)
    for target in targets:
        _check_target_available(target, precisions)
    context = _context(run_dir, quant)
    variants = []
    for target in targets:
        for precision in precisions:
            started = time.perf_counter()
            variant = _build_one(context, target, precision, quant, tensorrt)
            variant.report["seconds"] = round(time.perf_counter() - started, 2)
            _record(run_dir, variant, quant, tensorrt)
            variants.append(variant)
    return variants


def check_combinations(targets: list[Target], precisions: list[Precision], quant: QuantOptions) -> None:
    """Refuse a (target, precision) pair or option the target does not have, before any work."""
    for target in targets:
        for precision in precisions:
            if precision not in SUPPORTED[target]:
                hint = {
                    Precision.BF16: "bf16 is built for --target openvino",
                    Precision.FP16: "OpenVINO's CPU plugin computes bf16, not fp16: use --precision bf16",
                }.get(precision, "")
                supported = ", ".join(p.value for p in SUPPORTED[target])
                raise EdgeTransferError(
                    f"target {target.value} has no {precision.value} variant (it has {supported}); {hint or 'pick one of those'}."
                    " Build other combinations with a second edgetransfer export"
                )
    if quant.dynamic and Target.OPENVINO in targets and Precision.INT8 in precisions:
        raise EdgeTransferError("--dynamic-int8 is an ONNX Runtime option; OpenVINO INT8 is static (NNCF): drop --dynamic-int8")


def _check_target_available(target: Target, precisions: list[Precision]) -> None:
    if target is Target.OPENVINO:
        from ..runtime._openvino import bf16_problem
        from .openvino import require

        require(nncf=Precision.INT8 in precisions)
        problem = bf16_problem() if Precision.BF16 in precisions else None
        if problem:
            raise EdgeTransferError(f"cannot build openvino-bf16: {problem}")
        return
    if target is Target.TENSORRT:
        from . import tensorrt as trt_build

        trt_build.require()
        return
    if target.provider:
        from ..runtime import probe_provider

        problem = probe_provider(target.provider)
        if problem:
            raise EdgeTransferError(
                f"target {target.value} needs ONNX Runtime's {target.provider}, but {problem};"
                " build it on the machine with the NVIDIA GPU it will run on (onnxruntime-gpu)"
            )


def _context(run_dir: Path, quant: QuantOptions) -> _Context:
    base = _run_onnx(run_dir)
    import onnx

    model = onnx.load(str(base), load_external_data=False)
    info = ModelInfo.from_props({p.key: p.value for p in model.metadata_props})
    dataset = load_dataset(DataSpec.from_dict(read_json(run_dir / "config.json")["data"]))
    val_samples = dataset.val[: quant.eval_images] if quant.eval_images else dataset.val
    stream = BatchStream(val_samples, info.preprocessing, model.graph.input[0].name, info.input_format, len(val_samples))
    val = stream.get_next()[model.graph.input[0].name]
    labels = np.array([s.label for s in val_samples])
    float_logits = ortq.run_logits(base, val)
    return _Context(run_dir, base, info, model.graph.input[0].name, val, labels, float_logits, dataset)


def _run_onnx(run_dir: Path) -> Path:
    """The run's exported model, checked to come from the run's checkpoint."""
    if not (run_dir / "model.pt").is_file():
        raise RunError(f"no fine-tuned run at {run_dir} (no model.pt); run edgetransfer finetune first")
    base = run_dir / "model.onnx"
    if not base.is_file():
        from ..export import export_onnx

        console.print("no model.onnx yet: exporting it first")
        export_onnx(run_dir)
    import onnx

    props = {p.key: p.value for p in onnx.load(str(base), load_external_data=False).metadata_props}
    if props.get("checkpoint_sha256") != sha256_file(run_dir / "model.pt"):
        raise RunError(
            f"{base} was not exported from this run's checkpoint; re-export it with: edgetransfer export {run_dir}"
        )
    return base


def _build_one(context: _Context, target: Target, precision: Precision, quant: QuantOptions, tensorrt: TensorRTOptions) -> Variant:
    name = f"{target.value}-{precision.value}"
    if target is Target.TENSORRT:
        from . import tensorrt as trt_build

        onnx_for_engine = _onnx_variant(context, target, precision, quant, name + ".onnx")
        engine = context.run_dir / f"{name}.engine"
        report = trt_build.build_engine(onnx_for_engine.path, engine, precision, tensorrt, context.info)
        report["onnx"] = onnx_for_engine.report
        return Variant(name, target, precision, engine, report)
    if target is Target.OPENVINO:
        return _openvino_variant(context, precision, quant)
    return _onnx_variant(context, target, precision, quant, f"{name}.onnx")


def _onnx_variant(context: _Context, target: Target, precision: Precision, quant: QuantOptions, filename: str) -> Variant:
    name = filename.removesuffix(".onnx")
    output = context.run_dir / filename
    warnings: list[str] = []
    with atomic_path(output) as tmp, tempfile.TemporaryDirectory(prefix="edgetransfer-opt-") as work:
        work_dir = Path(work)
        if precision is Precision.FP32:
            if target is Target.ORT_CPU:
                ortq.optimize_graph(context.base, tmp)
            else:
                shutil.copyfile(context.base, tmp)
            report: dict[str, Any] = {}
        elif precision is Precision.FP16:
            if target is Target.ORT_CPU:
                warnings.append("FP16 will not be faster on a CPU: ONNX Runtime's CPU kernels compute most ops in FP32")
            ortq.to_fp16(context.base, tmp)
            report = {"kept_in_float": ortq.FP16_KEEP_FLOAT}
        else:
            report = _int8(context, target, quant, tmp, work_dir, warnings)
        report.update(_accuracy(context, ortq.run_logits(tmp, context.val), "CPUExecutionProvider"))
    for message in warnings:
        console.print(f"[yellow]warning:[/] {message}")
    report["warnings"] = warnings + report.get("warnings", [])
    return Variant(name, target, precision, output, report)


def _accuracy(context: _Context, logits: np.ndarray, evaluated_on: str) -> dict[str, Any]:
    """Top-1 of the variant and of the float model on the same validation images (CPU)."""
    float_top1 = topk_accuracy(context.float_logits, context.labels, 1)
    top1 = topk_accuracy(logits, context.labels, 1)
    return {
        "val_images": int(len(context.labels)),
        "float_top1": float_top1,
        "top1": top1,
        "top1_drop_points": round(100 * (float_top1 - top1), 4),
        "top1_agreement": float((logits.argmax(1) == context.float_logits.argmax(1)).mean()),
        "max_abs_diff": float(np.abs(logits - context.float_logits).max()),
        "evaluated_on": evaluated_on,
    }


def _calibration_samples(context: _Context, quant: QuantOptions) -> tuple[list, str]:
    """The calibration images every INT8 target uses, and where they came from."""
    if quant.calib is not None:
        samples = folder_samples(Path(quant.calib))
        samples, source = balanced_sample(samples, quant.calib_size) if len(samples) > quant.calib_size else samples, str(quant.calib)
    else:
        samples, source = balanced_sample(context.dataset.train, quant.calib_size), "run training data (class-balanced)"
    if len(samples) < quant.calib_batch:
        raise QuantizationError(
            f"the calibration set has {len(samples)} image(s), fewer than the batch of {quant.calib_batch};"
            " add images or lower --calib-batch"
        )
    return samples, source


def _int8(context: _Context, target: Target, quant: QuantOptions, output: Path, work: Path, warnings: list[str]) -> dict[str, Any]:
    if quant.dynamic:
        warnings.append("dynamic quantisation of a CNN is usually slower than FP32; static INT8 is the default for a reason")
        ortq.quantize_dynamic(context.base, output)
        return {"mode": "dynamic"}
    scheme = ortq.quant_scheme(target.value, cpu_features())
    warnings.extend(scheme.warnings)
    samples, source = _calibration_samples(context, quant)
    prepared = work / "prepared.onnx"
    ortq.preprocess_for_quantization(context.base, prepared)
    stream = BatchStream(samples, context.info.preprocessing, context.input_name, context.info.input_format, quant.calib_batch)
    cache = ortq.calibrate(prepared, stream, quant.method, scheme.symmetric_activations, work / "calibration.json")
    guarded = _guarded_quantize(context, prepared, cache, scheme, quant, output)
    ortq.copy_metadata(context.base, output)
    return {
        "mode": "static QDQ",
        "scheme": scheme.to_dict(),
        "calibration": {"source": source, "method": quant.method.value, "images": stream.used, "batch": quant.calib_batch,
                        "files": describe_samples(samples)},
        "kept_in_float": guarded["kept_in_float"],
        "guard_steps": guarded["steps"],
        "max_accuracy_drop_points": quant.max_accuracy_drop,
    }


def _guarded_quantize(context: _Context, prepared: Path, cache: Path, scheme, quant: QuantOptions, output: Path) -> dict[str, Any]:
    """Quantise; while top-1 drops more than the budget, keep the most sensitive layers in float."""

    def score_with(excluded: list[str]) -> Score:
        ortq.quantize_qdq(prepared, output, cache, quant.method, scheme, excluded)
        return score(ortq.run_logits(output, context.val), context.float_logits, context.labels)

    unguarded = score_with([])
    if unguarded[0] <= quant.max_accuracy_drop:
        return {"kept_in_float": [], "drop_points": unguarded[0], "steps": []}
    console.print(f"INT8 loses {unguarded[0]:.2f} top-1 points (budget {quant.max_accuracy_drop}): finding the sensitive layers")
    kept, drop, steps = guard(score_with, quantized_nodes(output), quant.max_accuracy_drop, quant.max_float_layers, console.print, unguarded)
    if drop > quant.max_accuracy_drop:
        raise QuantizationError(
            f"INT8 loses {drop:.2f} top-1 points even with {len(kept)} layer(s) kept in float (budget"
            f" {quant.max_accuracy_drop}); nothing was written. Raise --max-accuracy-drop, or use fp32/fp16"
        )
    score_with(kept)  # leave the accepted model in place
    return {"kept_in_float": kept, "drop_points": drop, "steps": steps}


def _openvino_variant(context: _Context, precision: Precision, quant: QuantOptions) -> Variant:
    """An OpenVINO IR of the run's model: f32, bf16 (the same IR, run in bf16) or NNCF INT8."""
    from ..runtime._openvino import INFERENCE_PRECISION, save_ir
    from . import openvino as ovq

    name = f"openvino-{precision.value}"
    warnings: list[str] = []
    model = ovq.convert(context.base)
    hint = "bf16" if precision is Precision.BF16 else "f32"
    report: dict[str, Any] = {"inference_precision": hint}
    if precision is Precision.INT8:
        model, int8 = _openvino_int8(context, model, quant, warnings)
        report.update(int8)
    report.update(_accuracy(context, ovq.logits(model, context.val, hint), f"OpenVINO CPU ({hint})"))
    if precision is Precision.BF16 and report["top1_drop_points"] > quant.max_accuracy_drop:
        warnings.append(f"bf16 loses {report['top1_drop_points']:.2f} top-1 points, more than the"
                        f" {quant.max_accuracy_drop}-point budget; bench will not recommend it")
    props = {**context.info.to_props(), "precision": precision.value, INFERENCE_PRECISION: hint,
             "source_onnx_sha256": sha256_file(context.base)}
    output = save_ir(model, context.run_dir / f"{name}.xml", props)
    for message in warnings:
        console.print(f"[yellow]warning:[/] {message}")
    report["warnings"] = warnings
    return Variant(name, Target.OPENVINO, precision, output, report)


def _openvino_int8(context: _Context, model, quant: QuantOptions, warnings: list[str]) -> tuple[Any, dict[str, Any]]:
    """NNCF INT8 under the accuracy guard (see :mod:`.openvino` for how layers are kept in float)."""
    from . import openvino as ovq

    samples, source = _calibration_samples(context, quant)
    stream = BatchStream(samples, context.info.preprocessing, context.input_name, context.info.input_format, quant.calib_batch)
    batches = [feed[context.input_name] for feed in iter(stream.get_next, None)]
    if quant.method is not ortq.CalibMethod.MINMAX:
        warnings.append(f"--calib-method {quant.method.value} applies to ONNX Runtime INT8; NNCF chooses OpenVINO's ranges itself")
    cpu = cpu_features()
    overflow = ovq.overflow_fix(cpu)
    console.print(f"CPU: {cpu.summary()}; NNCF overflow fix: {overflow}")
    if cpu.x86 and not cpu.int8_fast:
        warnings.append(f"this CPU has no VNNI or AMX ({cpu.summary()}); OpenVINO INT8 may gain less here than on one that has")
    with console.status("NNCF: collecting statistics and correcting biases"):
        quantized = ovq.quantize(model, batches, compress_weights=False, overflow=overflow)

    def score_with(kept: list[str], candidate=None) -> Score:
        candidate = candidate if candidate is not None else ovq.keep_in_float(quantized, model, kept)
        return score(ovq.logits(candidate, context.val), context.float_logits, context.labels)

    report: dict[str, Any] = {
        "mode": "static (NNCF)", "nncf": {"preset": "mixed", "bias_correction": "full", "overflow_fix": overflow}, "cpu": cpu.to_dict(),
        "calibration": {"source": source, "images": stream.used, "batch": quant.calib_batch, "files": describe_samples(samples)},
        "max_accuracy_drop_points": quant.max_accuracy_drop, "kept_in_float": [], "guard_steps": [],
    }
    unguarded = score_with([])
    if unguarded[0] <= quant.max_accuracy_drop:
        return ovq.compress_weights(quantized), report
    console.print(f"INT8 loses {unguarded[0]:.2f} top-1 points (budget {quant.max_accuracy_drop}): finding the sensitive layers")
    kept, drop, steps = guard(score_with, ovq.quantized_ops(quantized), quant.max_accuracy_drop, quant.max_float_layers, console.print,
                              unguarded)
    if drop > quant.max_accuracy_drop:
        raise QuantizationError(
            f"OpenVINO INT8 loses {drop:.2f} top-1 points even with {len(kept)} layer(s) kept in float (budget"
            f" {quant.max_accuracy_drop}); nothing was written. Raise --max-accuracy-drop, or use fp32/bf16"
        )
    with console.status(f"NNCF: quantising again with {len(kept)} layer(s) in its ignored scope"):
        scoped = ovq.quantize(model, batches, kept, overflow=overflow)
    scoped_drop = score_with(kept, scoped)[0]
    report.update(kept_in_float=kept, guard_steps=steps, ignored_scope_drop_points=round(scoped_drop, 4))
    if scoped_drop <= quant.max_accuracy_drop:
        return scoped, {**report, "guard_method": "NNCF ignored scope"}
    console.print(f"with those layers in NNCF's ignored scope INT8 loses {scoped_drop:.2f} points; keeping the"
                  " measured model, quantised once with them reverted to float, instead")
    return ovq.compress_weights(ovq.keep_in_float(quantized, model, kept)), {**report, "guard_method": "reverted after quantisation"}


def _record(run_dir: Path, variant: Variant, quant: QuantOptions, tensorrt: TensorRTOptions) -> None:
    manifest = Manifest.load(run_dir)
    settings: dict[str, Any] = {"target": variant.target.value, "precision": variant.precision.value}
    if variant.precision is Precision.INT8:
        settings["quantization"] = {k: (str(v) if isinstance(v, Path) else getattr(v, "value", v)) for k, v in asdict(quant).items()}
    if variant.target is Target.TENSORRT:
        settings["tensorrt"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(tensorrt).items()}
    kind = "openvino" if variant.target is Target.OPENVINO else variant.path.suffix.lstrip(".")
    entry = manifest.record(variant.name, variant.path.relative_to(run_dir), kind, parent="onnx", settings=settings)
    if kind == "openvino":
        weights = variant.path.with_suffix(".bin")
        entry["weights"] = {"path": str(weights.relative_to(run_dir)), "sha256": sha256_file(weights), "bytes": weights.stat().st_size}
    entry["report"] = variant.report
    manifest.save()
