"""The ``edgetransfer`` commands that train and describe runs (``finetune``, ``info``; torch and the
stages behind them); ``edgetransfer.cli`` loads this module when one of them runs."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

import click
import torch

from .clioptions import field_default, field_option, friendly, from_options
from .config import MAX_THREADS, QAT_TARGETS, FinetuneConfig, QatOptions
from .data import DataSpec
from .errors import OptionError
from .finetune import finetune as run_finetune
from .models import list_architectures
from .progress import console, out, set_quiet
from .qat import resume_qat, run_qat
from .report import epochs_table, finetune_summary_table, qat_summary_table
from .rundir import RunDir
from .runinfo import run_summary
from .tasks import TaskSpec, parse_task, tasks_option, with_heads, with_weights
from .weights import DEFAULT_ARCH

__all__ = ["finetune", "info"]

RESUME_EXIT = 130


@click.command()
@field_option(
    DataSpec,
    "source",
    "--data",
    help="Image folder (class subfolders, or train/ and val/), 'digits' for the embedded demo, 'digits-m' for the same digits on photo patches, or 'faces' (face or not).",
)
@click.option(
    "--task",
    "task_specs",
    multiple=True,
    metavar="NAME=FOLDER",
    help="One task of a multi-task model (repeat it): its name and its image folder (class subfolders, or digits/faces).",
)
@click.option(
    "--tasks",
    "tasks_from",
    metavar="demo|FILE.csv",
    default=None,
    help="Several tasks at once: 'demo' (digits: which digit; faces: face or not), or a CSV file with an 'image' column and one column per task.",
)
@click.option(
    "--task-weight",
    "task_weights",
    multiple=True,
    metavar="NAME=W",
    help="With several tasks in full mode (or --unfreeze): the weight of a task's loss in their sum. [default: 1 each]",
)
@click.option(
    "--task-head",
    "task_heads",
    multiple=True,
    metavar="NAME=linear|prototype",
    help="With several tasks in head mode: a task's head; prototype: class means of frozen features, no training, classes enrolled later into that task. [default: linear each]",
)
@field_option(FinetuneConfig, "arch", "--arch", help="torchvision builder name (resnet18, …) or timm:NAME.")
@field_option(
    FinetuneConfig,
    "weights",
    "--weights",
    help="embedded | DEFAULT | a torchvision weights name | PATH | none. [default: embedded for timm:efficientnet_lite0, else DEFAULT]",
)
@field_option(
    FinetuneConfig,
    "mode",
    "--mode",
    help="[default: head; full with --adapt (dann)] head: frozen features, new classifier; full: train everything; prototype: class means of frozen features, no training (classes can be enrolled later).",
)
@field_option(FinetuneConfig, "shots", "--shots", help="Use only K training images per class (few-shot); validation and test are unchanged.")
@field_option(
    FinetuneConfig,
    "adapt",
    "--adapt",
    metavar="TARGET_DIR",
    help="Adapt to the domain of this folder of unlabelled images (the deployed camera's frames; subfolder names are not read), or 'digits-m' for the demo.",
)
@field_option(
    FinetuneConfig,
    "adapt_method",
    "--adapt-method",
    help="dann: domain-adversarial training (trains the backbone: --mode full is the default with it); adabn: BatchNorm statistics recomputed on the target images. [default: dann]",
)
@field_option(
    FinetuneConfig,
    "adapt_eval",
    "--adapt-eval",
    metavar="LABELLED_DIR",
    help="Labelled target images (class subfolders) to report target top-1 on per epoch; never chosen on. [default: digits-m's test split with --adapt digits-m]",
)
@field_option(FinetuneConfig, "unfreeze_blocks", "--unfreeze", help="With --mode head, also train the last K blocks of the backbone.")
@field_option(
    FinetuneConfig,
    "epochs",
    "--epochs",
    help="[default: chosen from the mode (head 30 epochs at 1e-2, full 10 at 1e-3; 20 with --adapt-method dann)]",
)
@field_option(FinetuneConfig, "lr", "--lr", help="Learning rate of the new classifier (the backbone gets lr x --backbone-lr-scale).")
@field_option(FinetuneConfig, "backbone_lr_scale", "--backbone-lr-scale", help="[default: 0.1; 1 with --weights none]")
@field_option(FinetuneConfig, "batch_size", "--batch-size", help="Images per training step.")
@field_option(FinetuneConfig, "optimizer", "--optimizer", help="The optimiser.")
@field_option(FinetuneConfig, "weight_decay", "--weight-decay", help="Decoupled weight decay.")
@field_option(FinetuneConfig, "warmup_epochs", "--warmup-epochs", help="Linear learning-rate warm-up before the cosine decay.")
@field_option(FinetuneConfig, "label_smoothing", "--label-smoothing", help="Label smoothing of the cross-entropy loss.")
@field_option(FinetuneConfig, "augment", "--augment", help="Train-time augmentation when images go through the backbone.")
@field_option(
    FinetuneConfig,
    "probe_epochs",
    "--probe-epochs",
    help="Before training images end to end, train the new classifier on frozen features for N epochs. [default: 10; 0 in cached head mode]",
)
@field_option(
    FinetuneConfig,
    "train_bn_stats",
    "--train-bn-stats/--freeze-bn-stats",
    show_default=False,
    help="Whether BatchNorm updates its running statistics while training images. [default: frozen for pretrained weights, updated with --weights none]",
)
@field_option(
    FinetuneConfig,
    "image_size",
    "--image-size",
    help="Train (and later export and bench) at this size. [default: 64 for the demo, else the weights' size]",
)
@field_option(DataSpec, "val_fraction", "--val-fraction", help="Validation share per class for a folder without train/ and val/.")
@field_option(
    DataSpec,
    "test_fraction",
    "--test-fraction",
    help="Test share per class, held out from every choice; INT8 and bench report on it (a train/+val/ folder uses test/). 0: none.",
)
@field_option(DataSpec, "limit_per_class", "--limit-per-class", help="Use at most N images per class (quick runs).")
@field_option(FinetuneConfig, "patience", "--patience", help="Stop after N epochs without a better val top-1.")
@field_option(FinetuneConfig, "seed", "--seed", help="Seeds the split, the new classifier and training.")
@field_option(FinetuneConfig, "device", "--device", help="auto, cpu, cuda or cuda:N.")
@field_option(
    FinetuneConfig,
    "amp",
    "--amp/--no-amp",
    help="Mixed precision: fp16 on CUDA, bf16 on a CPU with native bf16 (avx512_bf16 or AMX); --no-amp trains in FP32.",
)
@field_option(
    FinetuneConfig,
    "feature_engine",
    "--feature-engine",
    help="What computes head mode's frozen features: onnxruntime (checked against PyTorch on the first batch), torch, or auto (onnxruntime when the pass is long enough to pay for its export).",
)
@field_option(FinetuneConfig, "workers", "--workers", help="Data loader processes. [default: 0 for the demo, else up to 4]")
@field_option(DataSpec, "strict", "--strict", help="Fail on unreadable images instead of skipping them.")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None, help="torch CPU threads (torch.set_num_threads).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run directory. [default: runs/<time>-<arch>-<mode>]")
@click.option(
    "--resume",
    "resume_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Continue the interrupted run in this directory (its own settings are used).",
)
@click.option(
    "--from",
    "from_run",
    type=click.Path(path_type=Path),
    default=None,
    help="With --qat: the finished run to fine-tune with INT8 fake quantisation (its data and settings are used).",
)
@click.option(
    "--qat", is_flag=True, help="Quantisation-aware fine-tuning of --from RUN into a child run (RUN/qat-TARGET) whose model is a QDQ INT8 ONNX model."
)
@click.option(
    "--qat-target",
    type=click.Choice(list(QAT_TARGETS)),
    default=field_default(QatOptions, "target"),
    show_default=True,
    help="Where the INT8 model will run; decides the quantisation scheme.",
)
@click.option(
    "--qat-epochs",
    type=click.IntRange(min=0),
    default=field_default(QatOptions, "epochs"),
    show_default=True,
    help="Epochs with fake quantisation; the best by quantised val top-1 is kept.",
)
@click.option("--qat-lr", type=float, default=field_default(QatOptions, "lr"), show_default=True, help="Learning rate of QAT (every weight).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
@friendly
def finetune(ctx: click.Context, **options) -> None:
    """Fine-tune a pretrained CNN on an image folder (or the demo digits) into runs/.

    \b
    Examples:
      edgetransfer finetune                          # embedded EfficientNet-Lite0 on digits, offline
      edgetransfer finetune --data photos/ --mode full --epochs 15
      edgetransfer finetune --data photos/ --arch resnet18 --weights IMAGENET1K_V1
      edgetransfer finetune --data photos/ --adapt camera-frames/ --adapt-eval labelled-frames/
      edgetransfer finetune --adapt digits-m       # digits -> digits on photo patches, with DANN
      edgetransfer finetune --tasks demo           # two tasks (digit, face) on one backbone
      edgetransfer finetune --tasks demo --task-head face=prototype   # face: class means, enrol more later
      edgetransfer finetune --task part=parts/ --task side=sides/ --mode full --task-weight side=0.5
      edgetransfer finetune --resume runs/20261128-101500-efficientnet_lite0-head
      edgetransfer finetune --from runs/20261128-101500-efficientnet_lite0-head --qat --qat-target openvino
    """

    set_quiet(options["quiet"])
    if options["threads"]:
        torch.set_num_threads(options["threads"])
    if options["qat"] or options["from_run"] is not None:
        _qat(ctx, options)
        return
    resume_dir = options["resume_dir"]
    if resume_dir is not None:
        _refuse_options_with_resume(ctx)
        if RunDir(resume_dir).qat_record() is not None:
            _qat(ctx, options, resume=Path(resume_dir))
            return
        config, run_dir = FinetuneConfig(), resume_dir
    else:
        data = from_options(DataSpec, options)
        config = from_options(FinetuneConfig, options, data=data, tasks=_tasks(ctx, options, data))
        run_dir = options["out"] or _default_run_dir(config.arch, config.mode.value)
    try:
        result = run_finetune(config, run_dir, resume=resume_dir is not None)
    except KeyboardInterrupt:
        console.print(f"\ninterrupted; finished epochs are saved. Continue with: edgetransfer finetune --resume {run_dir}", markup=False)
        sys.exit(RESUME_EXIT)
    if not result.main:
        return  # under torchrun, rank 0 reports
    if result.metrics["epochs"]:
        out.print(epochs_table(result.metrics["epochs"]))
    out.print(finetune_summary_table(result.metrics, result.run_dir))
    click.echo(str(result.run_dir))


def _qat(ctx: click.Context, options: dict, resume: Path | None = None) -> None:

    if resume is not None:
        try:
            result = resume_qat(resume)
        except KeyboardInterrupt:
            console.print(f"\ninterrupted; finished epochs are saved. Continue with: edgetransfer finetune --resume {resume}", markup=False)
            sys.exit(RESUME_EXIT)
        out.print(qat_summary_table(result.metrics, result.run_dir))
        click.echo(str(result.run_dir))
        return
    if not (options["qat"] and options["from_run"] is not None):
        raise OptionError("quantisation-aware fine-tuning needs both: --from RUN --qat")
    given = [
        name
        for name in ctx.params
        if name not in {"from_run", "qat", "qat_target", "qat_epochs", "qat_lr", "out", "quiet", "threads", "seed"}
        and ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    ]
    if given:
        raise OptionError(f"--from RUN --qat fine-tunes with RUN's own data and settings; drop {', '.join(_flag(ctx, n) for n in given)}")
    qat_options = QatOptions(target=options["qat_target"], epochs=options["qat_epochs"], lr=options["qat_lr"], seed=options["seed"])
    child = options["out"] or Path(options["from_run"]) / f"qat-{qat_options.target}"
    try:
        result = run_qat(options["from_run"], qat_options, child)
    except KeyboardInterrupt:
        if (child / "last.pt").is_file():
            console.print(f"\ninterrupted; finished epochs are saved. Continue with: edgetransfer finetune --resume {child}", markup=False)
            sys.exit(RESUME_EXIT)
        raise
    out.print(qat_summary_table(result.metrics, result.run_dir))
    click.echo(str(result.run_dir))


def _tasks(ctx: click.Context, options: dict, data: DataSpec) -> tuple[TaskSpec, ...]:
    """The tasks of ``--task`` and ``--tasks`` (split like ``--data`` would be), or none."""
    if not options["task_specs"] and options["tasks_from"] is None:
        if options["task_weights"] or options["task_heads"]:
            raise OptionError("--task-weight and --task-head go with several tasks (--task NAME=FOLDER or --tasks)")
        return ()
    if ctx.get_parameter_source("source") is not click.core.ParameterSource.DEFAULT:
        raise OptionError("--data names one task's images; with several tasks give each its own --task NAME=FOLDER (or --tasks)")
    found = tasks_option(options["tasks_from"], data) if options["tasks_from"] is not None else ()
    tasks = with_weights((*found, *(parse_task(text, data) for text in options["task_specs"])), options["task_weights"])
    return with_heads(tasks, options["task_heads"])


def _refuse_options_with_resume(ctx: click.Context) -> None:
    allowed = {"resume_dir", "quiet", "threads"}
    given = [name for name in ctx.params if name not in allowed and ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
    if given:
        flags = ", ".join(_flag(ctx, n) for n in given)
        raise OptionError(f"--resume continues with the run's own settings; drop {flags}")


def _flag(ctx: click.Context, name: str) -> str:
    return next(p.opts[0] for p in ctx.command.params if p.name == name)


def _default_run_dir(arch: str, mode: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{arch.removeprefix('timm:')}-{mode}"


@click.command()
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
@click.option("--timm", "include_timm", is_flag=True, help="List every timm architecture too.")
@click.option("--json", "as_json", is_flag=True, help="With RUN_DIR: print its manifest (JSON) instead of the summary.")
@friendly
def info(run_dir: Path | None, include_timm: bool, as_json: bool) -> None:
    """Summarise a run (model, data, accuracy, every artifact and its state), or (without RUN_DIR)
    list the architectures that can be fine-tuned.

    \b
    Examples:
      edgetransfer info
      edgetransfer info runs/20261128-101500-efficientnet_lite0-head
      edgetransfer info runs/20261128-101500-efficientnet_lite0-head --json
    """
    if run_dir is None:
        names = list_architectures(include_timm=include_timm)
        click.echo(f"{DEFAULT_ARCH} (default, embedded offline weights)")
        click.echo("\n".join(names if include_timm else names + ["timm:<any timm model> (edgetransfer info --timm)"]))
        return
    if as_json:
        click.echo(json.dumps(RunDir(run_dir).manifest().data, indent=2))
        return
    out.print(run_summary(RunDir(run_dir)))
