"""Transfer learning: train a swapped classifier (``head``) or the whole network (``full``).

In ``head`` mode the frozen backbone's features are computed once and cached, so an epoch costs
about as much as a pass of a linear layer. Every file a run writes is written atomically and
``last.pt`` after each epoch lets an interrupted run continue with ``resume=True``.

Randomness is drawn per stage: the new classifier's initial weights, the linear probe and each
epoch seed every generator they use from the run's seed and the stage alone (``training.seed_stage``). Nothing a
stage draws depends on what ran before it (a feature cache hit, a cut-short epoch), so a run resumed
from any kill point repeats an uninterrupted one bit for bit on the same machine.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape
from torch import nn

from .checkpoint import save_checkpoint
from .config import FinetuneConfig, Mode, OptimizerName
from .data import Dataset, load_dataset
from .distributed import SINGLE, Context, setup
from .errors import EdgeTransferError, ModelError, RunError
from .metrics import topk_accuracy
from .models import BuiltModel, build
from .progress import console, set_quiet
from .prototype import PROTOTYPE, fit_recorded, install_prototype_head
from .rundir import Manifest, RunDir, now
from .runtime.files import write_json
from .safeload import safe_load
from .taskheads import install_task_heads
from .tasks import load_tasks
from .train.adaptation import Adaptation
from .train.loops import CachedHeadLoop, device_for, make_loop
from .train.multitask import MultiTaskTrainer
from .train.taskloops import CachedTasks, ImageTasks
from .train.trainer import EpochCallback, Trainer
from .training import cosine_with_warmup, seed_stage

__all__ = ["Mode", "OptimizerName", "FinetuneConfig", "FinetuneResult", "finetune"]

CONFIG, CHECKPOINT, LAST, METRICS, CURVES = RunDir.CONFIG, RunDir.CHECKPOINT, RunDir.LAST, RunDir.METRICS, RunDir.CURVES
FEATURES = RunDir.FEATURES
PROBE_LR = 1e-2
PROBE_STAGE = 0  # seed_stage's stage for the linear probe; epochs are stages 1, 2, ...


@dataclass
class FinetuneResult:
    """The run directory, its final metrics and resolved config; ``main`` is false on the other
    ranks of a distributed job, which leave reporting to rank 0."""

    run_dir: Path
    metrics: dict[str, Any]
    config: FinetuneConfig
    main: bool = True


def finetune(
    config: FinetuneConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    on_epoch: EpochCallback | None = None,
) -> FinetuneResult:
    """Fine-tune ``config.arch`` on ``config.data`` and write the run into ``run_dir``.

    Args:
        config: the run's settings (ignored with ``resume``: the run's own config is used).
        run_dir: the run directory; it must not hold another run.
        resume: continue the interrupted run in ``run_dir`` from its last finished epoch.
        on_epoch: called with each epoch's record after it is saved.

    Returns:
        The run directory, the final metrics and the resolved config.

    Raises:
        RunError: ``run_dir`` holds another run, or there is nothing to resume.
        DataError, ModelError, WeightsError: bad data, architecture or weights.
    """
    dist = setup(config.device)
    if not dist.main:
        set_quiet(True)  # one progress display per job, from rank 0
    run_dir = Path(dist.broadcast(str(run_dir)))  # a default name holds the time: take rank 0's
    with RunDir(run_dir).lock(create=not resume) if dist.main else contextlib.nullcontext():
        return _finetune(config, run_dir, resume, on_epoch, dist)


def _finetune(config: FinetuneConfig, run_dir: Path, resume: bool, on_epoch: EpochCallback | None, dist: Context) -> FinetuneResult:
    existed = run_dir.exists()
    config, manifest, state = _open_run_everywhere(dist, run_dir, config, resume)
    started = time.perf_counter()
    if config.multitask:
        return _multitask_run(config, run_dir, (manifest, state), on_epoch, dist, None if resume else existed)
    try:
        dataset = _with_shots(load_dataset(config.data, workers=max(1, config.workers or 0)), config)
        seed_stage(config.seed)  # before building: the new classifier's initial weights come from it
        built = build(config.arch, len(dataset.classes), config.weights, config.image_size)
        if config.image_size is None:
            config = replace(config, image_size=built.preprocessing.input_size)
        device = device_for(config.device, dist)
        built.module.to(device)
        built.check_size()
        if config.mode is Mode.PROTOTYPE:
            return _prototype_run(config, built, dataset, device, run_dir, manifest, dist, started)
        adaptation = Adaptation(config, built, dataset, device) if config.adapt else None
        probe = _probe_head(config, built, dataset, device, run_dir, dist) if state is None else None
        loop = make_loop(config, built, dataset, device, run_dir, dist)
    except EdgeTransferError:
        if dist.main and not resume:
            _discard(run_dir, existed)  # bad data, architecture or weights: leave no half-made run behind
        raise
    trainer = Trainer(config, built, loop, run_dir, dataset.classes, dist, adaptation)
    if state is not None:
        trainer.restore(state)
    trainer.probe = probe if probe is not None else (state or {}).get("probe")
    trainer.run(on_epoch)
    metrics = trainer.finish(dataset, time.perf_counter() - started)
    if dist.main:
        _record(manifest, config, metrics, run_dir)
    dist.barrier()
    return FinetuneResult(run_dir, metrics, config, dist.main)


# ---------------------------------------------------------------------------------------------
# The run directory


def _open_run(run_dir: Path, config: FinetuneConfig, resume: bool):
    """Return the config to use, the manifest and the saved training state (or None)."""
    if resume:
        if not (run_dir / CONFIG).is_file():
            raise RunError(f"nothing to resume in {run_dir}: no {CONFIG} (start it without --resume)")
        config = _saved_config(run_dir)
        run = RunDir(run_dir)
        manifest = run.manifest() if run.has_manifest() else run.new_manifest(config=config.to_dict())
        if manifest.data.get("status") == "complete":
            raise RunError(f"{run_dir} is already complete; nothing to resume")
        state = _load_state(run_dir / LAST) if (run_dir / LAST).is_file() else None
        return config, manifest, state
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir} is a file, not a folder; pick another --out")
    if run_dir.exists() and any(run_dir.iterdir()):
        held = "a run" if (run_dir / CONFIG).is_file() else "other files"
        raise RunError(f"{run_dir} already holds {held}; pick another --out, or --resume {run_dir} to continue it")
    config = config.resolved()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / CONFIG, config.to_dict())
    manifest = RunDir(run_dir).new_manifest(run=run_dir.name, status="training", config=config.to_dict())
    manifest.save()
    return config, manifest, None


def _discard(run_dir: Path, existed: bool) -> None:
    """Remove what opening a new run wrote, so that the same ``--out`` can be used again."""
    for name in (CONFIG, RunDir.MANIFEST):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / Path(FEATURES).parent, ignore_errors=True)
    if not existed and run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()


def _open_run_everywhere(dist: Context, run_dir: Path, config: FinetuneConfig, resume: bool):
    """Rank 0 opens (or resumes) the run directory; the other ranks read what it wrote."""
    if not dist.active:
        return _open_run(run_dir, config, resume)
    opened, problem = (None, None, None), None
    if dist.main:
        try:
            opened = _open_run(run_dir, config, resume)
        except EdgeTransferError as exc:
            problem = str(exc)
    problem = dist.broadcast(problem)
    if problem:
        raise RunError(problem)
    if dist.main:
        return opened
    config = _saved_config(run_dir)
    state = _load_state(run_dir / LAST) if resume and (run_dir / LAST).is_file() else None
    return config, None, state


def _saved_config(run_dir: Path) -> FinetuneConfig:
    """The config a run was started with.

    Raises:
        RunError: unreadable, or with settings this version does not know.
    """
    try:
        return FinetuneConfig.from_dict(RunDir(run_dir).read_config())
    except (TypeError, ValueError) as exc:
        raise RunError(f"{run_dir / CONFIG} holds settings this version cannot use ({exc}); start a new run") from exc


def _load_state(path: Path) -> dict[str, Any]:
    """The resume state, loaded like every other file: tensors and plain values only."""
    try:
        state = safe_load(path)
    except RunError as exc:
        raise RunError(f"cannot resume from {path.name}: {exc}; start a new run") from exc
    if not isinstance(state, dict) or not {"model", "optimizer", "history"} <= state.keys():
        raise RunError(f"{path} is not an edgetransfer resume state; start a new run")
    return state


def _record(manifest: Manifest, config: FinetuneConfig, metrics: dict[str, Any], run_dir: Path) -> None:
    settings = {"arch": config.arch, "weights": config.weights, "mode": config.mode.value if config.mode else None, "image_size": config.image_size}
    manifest.data["config"] = config.to_dict()
    manifest.record("checkpoint", CHECKPOINT, "torch-checkpoint", parent=None, settings=settings)
    manifest.record("metrics", METRICS, "metrics", parent="checkpoint")
    manifest.record("curves", CURVES, "plot", parent="metrics")
    manifest.data["finetune"] = {
        "val_top1": metrics["final"]["top1"],
        "val_top5": metrics["final"]["top5"],
        "best_epoch": metrics["best_epoch"],
        "classes": metrics["classes"],
        "data": config.data.to_dict(),
        "finished": now(),
    }
    if metrics.get("tasks"):
        manifest.data["finetune"]["tasks"] = {
            name: {"classes": task["classes"], "val_top1": task["val_top1"], "test": task["test"]} for name, task in metrics["tasks"].items()
        }
        manifest.data["finetune"]["data"] = {"tasks": [task.to_dict() for task in config.tasks]}
    if metrics.get("adapt"):
        manifest.data["finetune"]["adapt"] = {k: metrics["adapt"][k] for k in ("method", "target", "target_images", "target_top1", "eval_images")}
    manifest.data["status"] = "complete"
    manifest.save()
    (run_dir / LAST).unlink(missing_ok=True)


def _multitask_run(
    config: FinetuneConfig, run_dir: Path, opened, on_epoch: EpochCallback | None, dist: Context, existed: bool | None
) -> FinetuneResult:
    """Several tasks: one Linear head per task on one backbone (see :mod:`.train.multitask`).
    ``existed``: whether ``run_dir`` was there before this new run (``None`` when resuming)."""
    manifest, state = opened
    started = time.perf_counter()
    try:
        if dist.active and not config.caches_features:
            raise RunError("several tasks train the backbone in one process; run it without torchrun (head mode shares the frozen pass)")
        datasets = load_tasks(config.tasks, workers=max(1, config.workers or 0))
        sizes = [len(dataset.classes) for dataset in datasets.values()]
        seed_stage(config.seed)  # before building: the heads' initial weights come from it
        built = build(config.arch, sum(sizes), config.weights, config.image_size)
        heads = install_task_heads(built, sizes)
        if config.image_size is None:
            config = replace(config, image_size=built.preprocessing.input_size)
        device = device_for(config.device, dist)
        built.module.to(device)
        built.check_size()
        probe = _probe_tasks(config, built, heads, datasets, device, run_dir) if state is None else None
        tasks: CachedTasks | ImageTasks
        if config.caches_features:
            tasks = CachedTasks(config, built, heads, datasets, device, run_dir, dist)
        else:
            tasks = ImageTasks(config, built, heads, datasets, device, [task.weight for task in config.tasks])
        trainer = MultiTaskTrainer(config, built, tasks, datasets, run_dir, dist)
    except EdgeTransferError:
        if dist.main and existed is not None:
            _discard(run_dir, existed)
        raise
    if state is not None:
        trainer.restore(state)
    trainer.probe = probe if probe is not None else trainer.probe
    trainer.run(on_epoch)
    metrics = trainer.finish(time.perf_counter() - started)
    if dist.main:
        _record(manifest, config, metrics, run_dir)
    dist.barrier()
    return FinetuneResult(run_dir, metrics, config, dist.main)


def _probe_tasks(config: FinetuneConfig, built: BuiltModel, heads, datasets: dict[str, Dataset], device, run_dir: Path):
    """Before training the backbone for several tasks: each task's head trained on cached frozen
    features first (the linear probe of one task, for every head), so that the backbone is never
    updated through the gradients of random classifiers."""
    if config.caches_features or not config.probe_epochs:
        return None
    started = time.perf_counter()
    probe_config = replace(config, epochs=config.probe_epochs, lr=PROBE_LR, batch_size=64)
    cached = CachedTasks(probe_config, built, heads, datasets, device, run_dir)
    trainer = MultiTaskTrainer(probe_config, built, cached, datasets, run_dir, save=False)
    trainer.run(label="linear probe")
    for param in built.module.parameters():
        param.requires_grad_(True)
    return {"epochs": config.probe_epochs, "val_top1": trainer.history[-1]["val_top1"], "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------------------------------
# Prototype heads: class means, no training


def _with_shots(dataset: Dataset, config: FinetuneConfig) -> Dataset:
    """Keep ``config.shots`` training images per class (seeded; validation and test untouched)."""
    if config.shots is None:
        return dataset
    rng = random.Random(f"shots-{config.seed}")
    by_class: dict[int, list] = {}
    for sample in dataset.train:
        by_class.setdefault(sample.label, []).append(sample)
    kept = [s for label in sorted(by_class) for s in rng.sample(by_class[label], min(config.shots, len(by_class[label])))]
    return replace(dataset, train=kept)


def _prototype_run(config, built: BuiltModel, dataset: Dataset, device, run_dir: Path, manifest, dist: Context, started: float):
    """Mode ``prototype``: the frozen backbone's features of the training images become class
    prototypes (see :mod:`edgetransfer.prototype`); the scale is fit on validation images,
    which changes no top-1 figure."""
    install_prototype_head(built, built.heads[0])  # refuses a model with no single Linear classifier, before any work
    loop = CachedHeadLoop(config, built, dataset, device, run_dir, dist)
    head, record = fit_recorded(loop.train_x, loop.train_y, len(dataset.classes), loop.val_x, loop.val_y)
    install_prototype_head(built, head.to(device))
    loop.head = head
    if dist.main:
        save_checkpoint(
            run_dir / CHECKPOINT, built, dataset.classes, head=PROTOTYPE, scale=record["scale"], shots_per_class=record["shots_per_class"]
        )
    trainer = Trainer(config, built, loop, run_dir, dataset.classes, dist)
    metrics = trainer.finish(dataset, time.perf_counter() - started)
    metrics["prototype"] = record
    if dist.main:
        write_json(run_dir / METRICS, metrics)
        _record(manifest, config, metrics, run_dir)
    dist.barrier()
    return FinetuneResult(run_dir, metrics, config, dist.main)


def _probe_head(config: FinetuneConfig, built: BuiltModel, dataset: Dataset, device, run_dir: Path, dist: Context = SINGLE):
    """Linear probe before fine-tuning: train the new head on cached frozen features first, so
    the backbone is never updated through the gradients of a random classifier."""
    if config.caches_features or not config.probe_epochs:
        return None
    started = time.perf_counter()
    try:
        loop = CachedHeadLoop(replace(config, batch_size=64), built, dataset, device, run_dir, dist)
    except ModelError as exc:  # its classifier cannot be trained on cached features: train end to end only
        console.print("[yellow]warning:[/] no linear probe:", escape(str(exc).split(", so ")[0]))
        return None
    loop.generator.manual_seed(seed_stage(config.seed, PROBE_STAGE))
    optimizer = torch.optim.AdamW(loop.head.parameters(), lr=PROBE_LR, weight_decay=config.weight_decay)
    schedule = cosine_with_warmup(optimizer, config.probe_epochs, config.warmup_epochs, loop.steps_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    for _ in range(config.probe_epochs):
        for x, y, head in loop.train_batches():
            optimizer.zero_grad(set_to_none=True)
            criterion(head(x).float(), y).backward()
            optimizer.step()
            schedule.step()
    logits, labels = loop.val_logits()
    for param in built.module.parameters():
        param.requires_grad_(True)
    return {
        "epochs": config.probe_epochs,
        "val_top1": topk_accuracy(logits.numpy(), labels.numpy(), 1),
        "seconds": time.perf_counter() - started,
    }
