"""Build the variants a user asks for (target x precision) from the run's verified ONNX model.

How each target builds its variants lives in its own module (:mod:`.ort`, :mod:`.openvino`,
:mod:`.tensorrt`) behind the record :mod:`.targets` keeps for it; this module checks the request,
builds in turn and records each variant in the run's manifest.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.markup import escape

from ..config import GPU_TARGETS
from ..errors import OptionError
from ..progress import console
from ..rundir import RunDir
from ..runtime.files import sha256_file
from .context import QuantOptions, TensorRTOptions, open_context
from .targets import Precision, Target, Variant, spec

__all__ = ["Variant", "build_variants", "check_combinations"]


def build_variants(
    run_dir: str | Path | RunDir,
    targets: list[Target],
    precisions: list[Precision],
    quant: QuantOptions = QuantOptions(),
    tensorrt: TensorRTOptions = TensorRTOptions(),
) -> list[Variant]:
    """Make every (target, precision) variant of the run's ONNX model and record it.

    Raises:
        RunError: no run, or its ``model.onnx`` was not exported from its checkpoint.
        OptionError: a precision or option the target does not have.
        MissingDependencyError, EdgeTransferError: a target whose library or provider is missing here.
        QuantizationError: INT8 cannot meet ``quant.max_accuracy_drop``; unusable calibration data.
    """
    run = RunDir(run_dir)
    _check_qat(run, targets, precisions)
    run.require_checkpoint()
    check_combinations(targets, precisions, quant)
    for target in targets:
        spec(target).check_available(precisions)
    with run.lock():
        return _build(run, targets, precisions, quant, tensorrt)


def _build(run: RunDir, targets: list[Target], precisions: list[Precision], quant: QuantOptions, tensorrt: TensorRTOptions) -> list[Variant]:
    context = open_context(run, quant, tensorrt)
    variants = []
    for target in targets:
        for precision in precisions:
            started = time.perf_counter()
            variant = spec(target).build(context, target, precision)
            variant.report.seconds = round(time.perf_counter() - started, 2)
            for message in variant.report.warnings:
                console.print("[yellow]warning:[/]", escape(message))
            _record(run, variant, quant, tensorrt)
            variants.append(variant)
    return variants


def check_combinations(targets: list[Target], precisions: list[Precision], quant: QuantOptions) -> None:
    """Refuse a (target, precision) pair or option the target does not have, before any work.

    Raises:
        OptionError: with what the target has instead.
    """
    for target in targets:
        for precision in precisions:
            spec(target).check_precision(precision)
    if quant.dynamic and Target.OPENVINO in targets and Precision.INT8 in precisions:
        raise OptionError("--dynamic-int8 is an ONNX Runtime option; OpenVINO INT8 is static (NNCF): drop --dynamic-int8")


def _check_qat(run: RunDir, targets: list[Target], precisions: list[Precision]) -> None:
    """A QAT run's model is INT8 already: its variants are INT8 ones, for targets that take its scheme."""
    record = run.qat_record()
    if record is None:
        return
    run.require_complete()  # an interrupted QAT run says how to finish it
    others = [p.value for p in precisions if p is not Precision.INT8]
    if others:
        raise OptionError(
            f"{run} is a QAT run: its model is INT8 already, so it has no {'/'.join(others)} variant;"
            f" build those from its parent run, {record.get('parent')}, or use --precision int8 here"
        )
    trained_for = record.get("options", {}).get("target")
    for target in targets:
        if target.on_gpu and trained_for not in GPU_TARGETS:
            raise OptionError(
                f"{run} was trained for {trained_for}, with uint8 activations, which {target.value} does not take;"
                f" run the QAT again with --qat-target {target.value}"
            )


def _record(run: RunDir, variant: Variant, quant: QuantOptions, tensorrt: TensorRTOptions) -> None:
    target = spec(variant.target)
    manifest = run.manifest()
    settings: dict = {"target": variant.target.value, "precision": variant.precision.value}
    if variant.precision is Precision.INT8:
        settings["quantization"] = quant.settings()
    if variant.target is Target.TENSORRT:
        settings["tensorrt"] = tensorrt.settings()
    entry = manifest.record(variant.name, variant.path.relative_to(run.path), target.kind, parent="onnx", settings=settings)
    extra = variant.files[1:2] if target.kind == "openvino" else []
    for weights in extra:
        entry["weights"] = {"path": str(weights.relative_to(run.path)), "sha256": sha256_file(weights), "bytes": weights.stat().st_size}
    entry["report"] = variant.report.to_dict()
    manifest.save()
