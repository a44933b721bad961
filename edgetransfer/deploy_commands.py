"""The ``edgetransfer`` commands that build and measure a run's variants (``export``, ``bench``);
``edgetransfer.cli`` loads this module when one of them runs."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from .bench import BenchOptions, bench_run
from .clioptions import field_default, field_option, friendly, from_options
from .config import ExportOptions
from .errors import OptionError
from .export import export_onnx, needs_export
from .optimize import Precision, QuantOptions, Target, TensorRTOptions, build_variants, check_combinations, cpu_features
from .progress import console, out, set_quiet
from .progress import out as stdout
from .report import bench_table, parity_table, recommendation_line, variants_table
from .rundir import RunDir
from .triton import TritonOptions, write_repository

__all__ = ["export", "bench"]


def _batch_sizes(ctx, param, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in value.split(",") if b.strip())
    except ValueError:
        raise click.BadParameter(f"takes comma-separated whole numbers, got {value!r}") from None


def _threads(ctx, param, value: str | None) -> str | None:
    if value is not None and value != "auto" and not value.isdigit():
        raise click.BadParameter(f"takes a number or 'auto', got {value!r}")
    return value


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@field_option(ExportOptions, "opset", "--opset", help="ONNX opset.")
@field_option(ExportOptions, "static_batch", "--static-batch", help="Fix the batch dimension to N (default: dynamic).")
@field_option(
    ExportOptions,
    "fuse_preprocess",
    "--fuse-preprocess",
    help="Input uint8 NHWC images at the model's size; scaling and normalisation run inside the graph.",
)
@field_option(ExportOptions, "atol", "--atol", help="Parity check: absolute logit difference ONNX Runtime may show against PyTorch.")
@field_option(ExportOptions, "rtol", "--rtol", help="Parity check: relative difference on top (|onnx - torch| <= atol + rtol * |torch|).")
@field_option(ExportOptions, "verify_images", "--verify-images", help="Validation images the parity check uses.")
@field_option(ExportOptions, "verify", "--verify/--no-verify", help="Check parity against PyTorch on validation images.")
@field_option(ExportOptions, "output", "--output", help="Where to write. [default: RUN_DIR/model.onnx]")
@click.option(
    "--target",
    "targets",
    multiple=True,
    type=click.Choice([*(t.value for t in Target), "triton"]),
    help="Also build variants for this target (repeatable); triton: a Triton model repository in RUN_DIR/triton/.",
)
@click.option(
    "--precision",
    "precisions",
    multiple=True,
    type=click.Choice([p.value for p in Precision]),
    help="Variant precision (repeatable); bf16 is for openvino. [default: fp32]",
)
@field_option(
    QuantOptions,
    "calib",
    "--calib",
    help="INT8 (every target): calibrate on this image folder (classes optional). [default: the run's training data]",
)
@field_option(QuantOptions, "calib_size", "--calib-size", help="INT8: class-balanced images taken from the run's training data.")
@field_option(QuantOptions, "calib_batch", "--calib-batch", help="INT8: images per calibration batch.")
@field_option(QuantOptions, "method", "--calib-method", help="ONNX Runtime INT8 ranges (NNCF sets OpenVINO's itself).")
@field_option(
    QuantOptions,
    "max_accuracy_drop",
    "--max-accuracy-drop",
    help="INT8: the share of images (points) whose top-1 may change against float, measured without labels on validation images; sensitive layers stay in float to hold it.",
)
@field_option(
    QuantOptions,
    "guard_images",
    "--guard-images",
    help="INT8: at most N validation images for the accuracy guard (no labels; reported accuracy comes from the test split).",
)
@field_option(QuantOptions, "max_float_layers", "--max-float-layers", help="INT8: the most layers the accuracy guard may keep in float.")
@field_option(
    QuantOptions,
    "rounding",
    "--rounding",
    help="ONNX Runtime INT8 weight rounding. auto: when nearest rounding misses the budget, every layer is re-rounded with AdaRound (AMD Quark; pip install 'edgetransfer[quark]') before any goes back to float; adaround: always; nearest: never.",
)
@field_option(QuantOptions, "adaround_iterations", "--adaround-iterations", help="ONNX Runtime INT8: AdaRound's optimisation steps per layer.")
@field_option(QuantOptions, "adaround_images", "--adaround-images", help="ONNX Runtime INT8: calibration images AdaRound optimises on.")
@field_option(QuantOptions, "dynamic", "--dynamic-int8", help="INT8 by dynamic quantisation (usually slower for CNNs).")
@click.option(
    "--trt-batch",
    nargs=3,
    type=int,
    show_default=True,
    default=tuple(field_default(TensorRTOptions, f) for f in ("min_batch", "opt_batch", "max_batch")),
    help="TensorRT profile: min opt max batch.",
)
@field_option(TensorRTOptions, "workspace_mib", "--trt-workspace-mib", help="TensorRT builder workspace.")
@field_option(TensorRTOptions, "timing_cache", "--trt-timing-cache", help="Reuse this timing cache. [default: RUN_DIR/tensorrt.timing-cache]")
@field_option(TritonOptions, "name", "--triton-name", help="Triton: the model's name in the repository. [default: RUN-PRECISION]")
@field_option(TritonOptions, "gpu", "--triton-gpu", help="Triton: KIND_GPU instances (fp16 and int8 from the ort-cuda variant).")
@field_option(TritonOptions, "uint8", "--triton-uint8", help="Triton: serve the fused-preprocess export (uint8 NHWC crops in; fp32 only).")
@field_option(TritonOptions, "instances", "--triton-instances", help="Triton: model instances side by side.")
@field_option(TritonOptions, "max_batch_size", "--triton-max-batch", help="Triton: the largest batch the dynamic batcher forms.")
@field_option(
    TritonOptions, "queue_delay_us", "--triton-delay-us", help="Triton: how long the dynamic batcher waits for a fuller batch (microseconds)."
)
@field_option(TritonOptions, "threads", "--triton-threads", help="Triton: ONNX Runtime intra-op threads per instance. [default: the backend's]")
@field_option(
    TritonOptions,
    "accelerator",
    "--triton-accelerator",
    type=click.Choice(["openvino", "tensorrt"]),
    help="Triton: the ONNX Runtime backend's execution accelerator (openvino on a CPU, tensorrt on a GPU).",
)
@click.pass_context
@friendly
def export(ctx: click.Context, run_dir: Path, targets, precisions, trt_batch, **options) -> None:
    """Export a fine-tuned run to ONNX, check it against PyTorch, and build optimised variants.

    \b
    Examples:
      edgetransfer export runs/20261128-101500-efficientnet_lite0-head
      edgetransfer export runs/demo --fuse-preprocess      # uint8 NHWC input, for apps
      edgetransfer export runs/demo --target ort-cpu --precision fp32 --precision int8
      edgetransfer export runs/demo --target tensorrt --precision fp16 --trt-batch 1 8 32
      edgetransfer export runs/demo --target openvino --precision fp32 --precision bf16 --precision int8
      edgetransfer export runs/demo --target triton --precision int8 --triton-max-batch 16 --triton-threads 2
    """

    if precisions and not targets:
        raise OptionError("--precision goes with --target (ort-cpu, ort-cuda, ort-trt, tensorrt, openvino or triton)")
    triton = "triton" in targets
    if _any_given(ctx, TritonOptions) and not triton:
        raise OptionError("the --triton-* options go with --target triton")
    targets = [Target(t) for t in targets if t != "triton"]
    precisions = [Precision(p) for p in precisions] or [Precision.FP32]
    quant = from_options(QuantOptions, options)
    tensorrt = from_options(TensorRTOptions, options, min_batch=trt_batch[0], opt_batch=trt_batch[1], max_batch=trt_batch[2])
    check_combinations(targets, precisions, quant)
    export_options = from_options(ExportOptions, options)
    triton_options = from_options(TritonOptions, options) if triton else None
    if needs_export(run_dir, bool(targets) or triton, _any_given(ctx, ExportOptions)):
        with console.status("exporting to ONNX and checking parity"):
            result = export_onnx(run_dir, export_options)
        out.print(parity_table(result))
        click.echo(str(result.path))
    if targets:
        console.print(f"CPU: {cpu_features().summary()}")
        variants = build_variants(run_dir, targets, precisions, quant, tensorrt)
        out.print(variants_table(variants))
        for variant in variants:
            click.echo(str(variant.path))
    if triton_options is not None:
        for folder in write_repository(run_dir, precisions, triton_options, quant):
            click.echo(str(folder))


def _any_given(ctx: click.Context, cls: type) -> bool:
    """Whether any option made from ``cls``'s fields was given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return any(ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT for n in ctx.params if n in names)


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--batch-sizes",
    default=",".join(map(str, field_default(BenchOptions, "batch_sizes"))),
    show_default=True,
    callback=_batch_sizes,
    help="Comma-separated batch sizes to time.",
)
@click.option(
    "--threads",
    default=None,
    callback=_threads,
    help="CPU threads for torch and ONNX Runtime, or 'auto' (try 1..cores per variant). [default: the machine's cores]",
)
@click.option("--variant", "variants", multiple=True, help="Only these variants from the run's manifest (eager is always measured).")
@click.option("--model", "models", multiple=True, type=click.Path(path_type=Path), help="Also bench this ONNX file or OpenVINO .xml (CPU).")
@click.option(
    "--replaces",
    multiple=True,
    type=click.Path(path_type=Path),
    help="A multi-task run: the single-task runs it replaces (one per task); their models are benched run in turn, as one variant.",
)
@field_option(BenchOptions, "data", "--data", help="Evaluate on this image folder (same classes as the model). [default: the run's test split]")
@field_option(BenchOptions, "eval_images", "--eval-images", help="Evaluate on at most N images (spread over the classes).")
@field_option(BenchOptions, "warmup", "--warmup", help="Untimed runs before timing.")
@field_option(BenchOptions, "iterations", "--iterations", help="Timed runs per variant and batch size (at least).")
@field_option(BenchOptions, "min_seconds", "--min-seconds", help="Also keep timing (whole rounds) until each variant has run this long.")
@field_option(
    BenchOptions,
    "rounds",
    "--rounds",
    help="Time the variants in turn, this many rounds over (A B C A B C ...); each one's spread across rounds is reported.",
)
@field_option(BenchOptions, "max_accuracy_drop", "--max-accuracy-drop", help="Top-1 points a recommended variant may lose against eager.")
@click.option("--fail-over-budget", is_flag=True, help="Exit with status 2 when no variant is within the budget.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Where bench.json/.md/.png go. [default: RUN_DIR]")
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@friendly
def bench(run_dir: Path, threads: str | None, fail_over_budget: bool, out: Path | None, quiet: bool, **options) -> None:
    """Benchmark every variant of a run against eager PyTorch, on the same data, in the same run.

    \b
    Examples:
      edgetransfer bench runs/demo
      edgetransfer bench runs/demo --batch-sizes 1,8,32 --threads auto --min-seconds 2
      edgetransfer bench runs/demo --max-accuracy-drop 0.5 --fail-over-budget   # gate your CI
      edgetransfer bench runs/two-task --replaces runs/digit --replaces runs/face  # multi-task against the two models
    """

    set_quiet(quiet)
    auto = threads == "auto"
    bench_options = from_options(BenchOptions, options, threads=None if auto or threads is None else int(threads), auto_threads=auto)
    report = bench_run(run_dir, bench_options, out)
    stdout.print(bench_table(report))
    stdout.print(recommendation_line(report), markup=False)
    console.print(f"written: {Path(out or run_dir) / RunDir.BENCH_JSON}", markup=False)
    if fail_over_budget and report.recommendation is None:
        sys.exit(2)
