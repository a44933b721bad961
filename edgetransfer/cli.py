"""The ``edgetransfer`` command: a thin layer over the library.

Each command parses its options, calls one library function and prints the result. Library
errors (:class:`EdgeTransferError`) become one line on stderr and exit status 1.
"""

from __future__ import annotations

import functools
import os
import sys
from datetime import datetime
from pathlib import Path

import click

from . import __version__
from .errors import EdgeTransferError

RESUME_EXIT = 130


def _friendly(command):
    """Turn library errors into one clean line and Ctrl-C into a hint, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except EdgeTransferError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgetransfer")
def main() -> None:
    """Fine-tune a pretrained CNN, export it, optimise it and benchmark it for the edge."""


_FINETUNE_DEFAULTS_NOTE = "default: chosen from the mode (head 30 epochs at 1e-2, full 10 at 1e-3)"


@main.command()
@click.option("--data", default="digits", show_default=True, help="Image folder (class subfolders, or train/ and val/), or 'digits' for the embedded demo.")
@click.option("--arch", default="timm:efficientnet_lite0", show_default=True, help="torchvision builder name (resnet18, …) or timm:NAME.")
@click.option("--weights", default=None, help="embedded | DEFAULT | a torchvision weights name | PATH | none. [default: embedded for timm:efficientnet_lite0, else DEFAULT]")
@click.option("--mode", type=click.Choice(["head", "full"]), default="head", show_default=True, help="head: frozen features, new classifier; full: train everything.")
@click.option("--unfreeze", "unfreeze_blocks", type=int, default=0, show_default=True, help="With --mode head, also train the last K blocks of the backbone.")
@click.option("--epochs", type=int, default=None, help=_FINETUNE_DEFAULTS_NOTE)
@click.option("--lr", type=float, default=None, help="Learning rate of the new classifier (the backbone gets lr x --backbone-lr-scale).")
@click.option("--backbone-lr-scale", type=float, default=None, help="[default: 0.1; 1 with --weights none]")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True)
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--warmup-epochs", type=float, default=1.0, show_default=True)
@click.option("--label-smoothing", type=float, default=0.1, show_default=True)
@click.option("--augment", type=click.Choice(["none", "crop", "crop-flip"]), default="crop", show_default=True, help="Train-time augmentation when images go through the backbone.")
@click.option("--probe-epochs", type=int, default=None, help="Before training images end to end, train the new classifier on frozen features for N epochs. [default: 10; 0 in cached head mode]")
@click.option("--train-bn-stats/--freeze-bn-stats", default=None, help="Whether BatchNorm updates its running statistics while training images. [default: frozen for pretrained weights, updated with --weights none]")
@click.option("--image-size", type=int, default=None, help="Train (and later export and bench) at this size. [default: 64 for the demo, else the weights' size]")
@click.option("--val-fraction", type=float, default=0.2, show_default=True, help="Validation share per class for a folder without train/ and val/.")
@click.option("--limit-per-class", type=int, default=None, help="Use at most N images per class (quick runs).")
@click.option("--patience", type=int, default=None, help="Stop after N epochs without a better val top-1.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--no-amp", is_flag=True, help="Disable mixed precision on CUDA.")
@click.option("--workers", type=int, default=None, help="Data loader processes. [default: 0 for the demo, else up to 4]")
@click.option("--threads", type=int, default=None, help="torch CPU threads (torch.set_num_threads).")
@click.option("--strict", is_flag=True, help="Fail on unreadable images instead of skipping them.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run directory. [default: runs/<time>-<arch>-<mode>]")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path), default=None, help="Continue the interrupted run in this directory (its own settings are used).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
@_friendly
def finetune(ctx: click.Context, **options) -> None:
    """Fine-tune a pretrained CNN on an image folder (or the demo digits) into runs/.

    \b
    Examples:
      edgetransfer finetune                          # embedded EfficientNet-Lite0 on digits, offline
      edgetransfer finetune --data photos/ --mode full --epochs 15
      edgetransfer finetune --data photos/ --arch resnet18 --weights IMAGENET1K_V1
      edgetransfer finetune --resume runs/20261128-101500-efficientnet_lite0-head
    """
    from .data import DataSpec
    from .finetune import FinetuneConfig, finetune as run_finetune
    from .progress import console, set_quiet
    from .report import epochs_table, finetune_summary_table

    set_quiet(options.pop("quiet"))
    resume_dir = options.pop("resume_dir")
    threads = options.pop("threads")
    if threads:
        import torch

        torch.set_num_threads(threads)
    if resume_dir is not None:
        _refuse_options_with_resume(ctx)
        config, run_dir = FinetuneConfig(), resume_dir
    else:
        config = _config_from_options(options, DataSpec, FinetuneConfig)
        run_dir = options["out"] or _default_run_dir(config.arch, config.mode.value)
    try:
        result = run_finetune(config, run_dir, resume=resume_dir is not None)
    except KeyboardInterrupt:
        console.print(f"\ninterrupted; finished epochs are saved. Continue with: edgetransfer finetune --resume {run_dir}")
        sys.exit(RESUME_EXIT)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports
    console.print(epochs_table(result.metrics["epochs"]))
    console.print(finetune_summary_table(result.metrics, result.run_dir))
    click.echo(str(result.run_dir))


def _config_from_options(options, DataSpec, FinetuneConfig):
    data = DataSpec(
        source=options["data"],
        val_fraction=options["val_fraction"],
        seed=options["seed"],
        limit_per_class=options["limit_per_class"],
        strict=options["strict"],
    )
    return FinetuneConfig(
        data=data,
        arch=options["arch"],
        weights=options["weights"],
        mode=options["mode"],
        unfreeze_blocks=options["unfreeze_blocks"],
        image_size=options["image_size"],
        epochs=options["epochs"],
        batch_size=options["batch_size"],
        lr=options["lr"],
        backbone_lr_scale=options["backbone_lr_scale"],
        optimizer=options["optimizer"],
        weight_decay=options["weight_decay"],
        warmup_epochs=options["warmup_epochs"],
        label_smoothing=options["label_smoothing"],
        augment=options["augment"],
        probe_epochs=options["probe_epochs"],
        train_bn_stats=options["train_bn_stats"],
        patience=options["patience"],
        seed=options["seed"],
        device=options["device"],
        amp=not options["no_amp"],
        workers=options["workers"],
    )


def _refuse_options_with_resume(ctx: click.Context) -> None:
    allowed = {"resume_dir", "quiet", "threads"}
    given = [
        name for name in ctx.params
        if name not in allowed and ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    ]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise EdgeTransferError(f"--resume continues with the run's own settings; drop {flags}")


def _default_run_dir(arch: str, mode: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{arch.removeprefix('timm:')}-{mode}"


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--batch-sizes", default="1,8", show_default=True, help="Comma-separated batch sizes to time.")
@click.option("--threads", default=None, help="CPU threads for torch and ONNX Runtime, or 'auto' (try 1..cores per variant). [default: the machine's cores]")
@click.option("--variant", "variants", multiple=True, help="Only these variants from the run's manifest (eager is always measured).")
@click.option("--model", "models", multiple=True, type=click.Path(path_type=Path), help="Also bench this ONNX file or OpenVINO .xml (CPU).")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="Evaluate on this image folder (same classes as the model). [default: the run's validation split]")
@click.option("--eval-images", type=int, default=None, help="Evaluate on at most N images.")
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--iterations", type=int, default=30, show_default=True, help="Timed runs per variant and batch size (at least).")
@click.option("--min-seconds", type=float, default=0.0, show_default=True, help="Also keep timing until this much time has passed.")
@click.option("--max-accuracy-drop", type=float, default=1.0, show_default=True, help="Top-1 points a recommended variant may lose against eager.")
@click.option("--fail-over-budget", is_flag=True, help="Exit with status 2 when no variant is within the budget.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Where bench.json/.md/.png go. [default: RUN_DIR]")
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@_friendly
def bench(run_dir: Path, batch_sizes: str, threads, variants, models, data, eval_images, warmup, iterations,
          min_seconds, max_accuracy_drop, fail_over_budget, out, quiet) -> None:
    """Benchmark every variant of a run against eager PyTorch, on the same data, in the same run.

    \b
    Examples:
      edgetransfer bench runs/demo
      edgetransfer bench runs/demo --batch-sizes 1,8,32 --threads auto --min-seconds 2
      edgetransfer bench runs/demo --max-accuracy-drop 0.5 --fail-over-budget   # gate your CI
    """
    from .bench import BenchOptions, bench_run
    from .progress import console, set_quiet
    from .report import bench_table, recommendation_line

    set_quiet(quiet)
    try:
        sizes = tuple(int(b) for b in batch_sizes.split(",") if b.strip())
    except ValueError:
        raise EdgeTransferError(f"--batch-sizes takes comma-separated whole numbers, got {batch_sizes!r}") from None
    auto = threads == "auto"
    if threads is not None and not auto and not str(threads).isdigit():
        raise EdgeTransferError(f"--threads takes a number or 'auto', got {threads!r}")
    options = BenchOptions(
        batch_sizes=sizes, threads=None if auto or threads is None else int(threads), auto_threads=auto,
        warmup=warmup, iterations=iterations, min_seconds=min_seconds, max_accuracy_drop=max_accuracy_drop,
        variants=tuple(variants), models=tuple(models), data=data, eval_images=eval_images,
    )
    report = bench_run(run_dir, options, out)
    console.print(bench_table(report))
    console.print(recommendation_line(report))
    click.echo(str(Path(out or run_dir) / "bench.json"))
    if fail_over_budget and report["recommendation"] is None:
        sys.exit(2)


@main.command()
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
@click.option("--timm", "include_timm", is_flag=True, help="List every timm architecture too.")
@_friendly
def info(run_dir: Path | None, include_timm: bool) -> None:
    """Show a run's manifest, or (without RUN_DIR) the architectures that can be fine-tuned.

    \b
    Examples:
      edgetransfer info
      edgetransfer info runs/20261128-101500-efficientnet_lite0-head
    """
    if run_dir is None:
        from .models import DEFAULT_ARCH, list_architectures

        names = list_architectures(include_timm=include_timm)
        click.echo(f"{DEFAULT_ARCH} (default, embedded offline weights)")
        click.echo("\n".join(names if include_timm else names + ["timm:<any timm model> (edgetransfer info --timm)"]))
        return
    from .manifest import Manifest
    from .errors import RunError

    if not Manifest.exists(run_dir):
        raise RunError(f"no run at {run_dir} (no manifest.json)")
    import json

    click.echo(json.dumps(Manifest.load(run_dir).data, indent=2))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--opset", type=int, default=None, help="ONNX opset. [default: 18]")
@click.option("--static-batch", type=int, default=None, help="Fix the batch dimension to N (default: dynamic).")
@click.option("--fuse-preprocess", is_flag=True, help="Input uint8 NHWC images at the model's size; scaling and normalisation run inside the graph.")
@click.option("--atol", type=float, default=1e-3, show_default=True, help="Largest logit difference ONNX Runtime may show against PyTorch.")
@click.option("--verify-images", type=int, default=64, show_default=True, help="Validation images the parity check uses.")
@click.option("--no-verify", is_flag=True, help="Skip the parity check.")
@click.option("--output", type=click.Path(path_type=Path), default=None, help="Where to write. [default: RUN_DIR/model.onnx]")
@click.option("--target", "targets", multiple=True, help="Also build variants for: ort-cpu, ort-cuda, ort-trt, tensorrt, openvino (repeatable).")
@click.option("--precision", "precisions", multiple=True, help="fp32, fp16, int8; bf16 for openvino (repeatable). [default: fp32]")
@click.option("--calib", type=click.Path(path_type=Path), default=None, help="INT8 (every target): calibrate on this image folder (classes optional). [default: the run's training data]")
@click.option("--calib-size", type=int, default=256, show_default=True, help="INT8: class-balanced images taken from the run's training data.")
@click.option("--calib-batch", type=int, default=8, show_default=True)
@click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax", show_default=True, help="ONNX Runtime INT8 ranges (NNCF sets OpenVINO's itself).")
@click.option("--max-accuracy-drop", type=float, default=1.0, show_default=True, help="INT8: top-1 points it may lose against float; sensitive layers stay in float to hold it.")
@click.option("--max-float-layers", type=int, default=32, show_default=True, help="INT8: the most layers the accuracy guard may keep in float.")
@click.option("--dynamic-int8", is_flag=True, help="INT8 by dynamic quantisation (usually slower for CNNs).")
@click.option("--trt-batch", nargs=3, type=int, default=(1, 1, 16), show_default=True, help="TensorRT profile: min opt max batch.")
@click.option("--trt-workspace-mib", type=int, default=2048, show_default=True)
@click.option("--trt-timing-cache", type=click.Path(path_type=Path), default=None, help="Reuse this timing cache. [default: RUN_DIR/tensorrt.timing-cache]")
@_friendly
def export(run_dir: Path, **options) -> None:
    """Export a fine-tuned run to ONNX, check it against PyTorch, and build optimised variants.

    \b
    Examples:
      edgetransfer export runs/20261128-101500-efficientnet_lite0-head
      edgetransfer export runs/demo --fuse-preprocess      # uint8 NHWC input, for apps
      edgetransfer export runs/demo --target ort-cpu --precision fp32 --precision int8
      edgetransfer export runs/demo --target tensorrt --precision fp16 --trt-batch 1 8 32
      edgetransfer export runs/demo --target openvino --precision fp32 --precision bf16 --precision int8
    """
    from .progress import console
    from .report import parity_table, variants_table

    targets, precisions = _parse_variants(options.pop("targets"), options.pop("precisions"))
    if targets:
        from .optimize.variants import check_combinations

        check_combinations(targets, precisions, _quant_options(options))
    if not targets or not (run_dir / "model.onnx").is_file() or _export_options_given():
        export_options = _export_options(options)
        with console.status("exporting to ONNX and checking parity"):
            from .export import export_onnx

            result = export_onnx(run_dir, export_options)
        console.print(parity_table(result))
        click.echo(str(result.path))
    if targets:
        from .optimize import build_variants, cpu_features

        console.print(f"CPU: {cpu_features().summary()}")
        variants = build_variants(run_dir, targets, precisions, _quant_options(options), _tensorrt_options(options))
        console.print(variants_table(variants))
        for variant in variants:
            click.echo(str(variant.path))


def _export_options_given() -> bool:
    ctx = click.get_current_context()
    names = ("opset", "static_batch", "fuse_preprocess", "atol", "verify_images", "no_verify", "output")
    return any(ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT for n in names)


def _parse_variants(targets, precisions):
    from .optimize import Precision, Target

    parsed_targets = [Target.parse(t) for t in targets]
    parsed_precisions = [Precision.parse(p) for p in precisions] or [Precision.FP32]
    if precisions and not targets:
        raise EdgeTransferError("--precision goes with --target (ort-cpu, ort-cuda, ort-trt, tensorrt or openvino)")
    return parsed_targets, parsed_precisions


def _export_options(options):
    from .export import DEFAULT_OPSET, ExportOptions

    return ExportOptions(
        opset=options["opset"] or DEFAULT_OPSET, static_batch=options["static_batch"],
        fuse_preprocess=options["fuse_preprocess"], verify=not options["no_verify"], atol=options["atol"],
        verify_images=options["verify_images"], output=options["output"],
    )


def _quant_options(options):
    from .optimize import CalibMethod, QuantOptions

    return QuantOptions(
        calib=options["calib"], calib_size=options["calib_size"], calib_batch=options["calib_batch"],
        method=CalibMethod.parse(options["calib_method"]), max_accuracy_drop=options["max_accuracy_drop"],
        max_float_layers=options["max_float_layers"], dynamic=options["dynamic_int8"],
    )


def _tensorrt_options(options):
    from .optimize import TensorRTOptions

    low, opt, high = options["trt_batch"]
    return TensorRTOptions(min_batch=low, opt_batch=opt, max_batch=high, workspace_mib=options["trt_workspace_mib"],
                           timing_cache=options["trt_timing_cache"])


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-k", "--top-k", type=int, default=3, show_default=True)
@click.option("--provider", "providers", multiple=True, help="cpu, cuda, tensorrt or a full provider name; repeat for a fallback order. [default: cpu]")
@click.option("--allow-fallback", is_flag=True, help="Accept a later provider when the first cannot load.")
@click.option("--device", default="CPU", show_default=True, help="OpenVINO device, for an .xml model (CPU, GPU, AUTO).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_friendly
def predict(model: Path, images: tuple[Path, ...], top_k: int, providers, allow_fallback: bool, device: str, as_json: bool) -> None:
    """Classify images with an exported model (torch-free runtime).

    \b
    Examples:
      edgetransfer predict runs/demo/model.onnx cat.jpg dog.png
      edgetransfer predict model.onnx photos/*.jpg --top-k 1 --json
      edgetransfer predict model.onnx img.png --provider cuda --provider cpu --allow-fallback
      edgetransfer predict runs/demo/openvino-int8.xml cat.jpg     # OpenVINO IR (edgetransfer[openvino])
    """
    import json

    from .runtime import Predictor

    predictor = Predictor(model, providers=list(providers) or None, allow_fallback=allow_fallback, device=device)
    results = predictor.predict([str(p) for p in images], top_k=top_k)
    if as_json:
        rows = [
            {"image": str(path), "predictions": [{"label": p.label, "index": p.index, "probability": p.probability} for p in preds]}
            for path, preds in zip(images, results)
        ]
        click.echo(json.dumps({"provider": predictor.provider, "results": rows}, indent=2))
        return
    from .progress import console
    from .report import predictions_table

    console.print(predictions_table(images, results, predictor.provider), soft_wrap=True)
