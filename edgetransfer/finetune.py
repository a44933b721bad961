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
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from .adapt import (
    DomainClassifier,
    adabn,
    batchnorm_layers,
    dann_lr_factor,
    reversal_weight,
    summary,
    target_eval_images,
    target_images,
)
from .checkpoint import save_checkpoint
from .config import AdaptMethod, FinetuneConfig, Mode, OptimizerName
from .data import Dataset, TorchImages, eval_transform, load_dataset, train_transform
from .distributed import SINGLE, Context, setup
from .errors import EdgeTransferError, ModelError, RunError, unknown_name
from .metrics import confusion_matrix, per_class_accuracy, topk_accuracy
from .models import BuiltModel, build, trunk_blocks
from .progress import console, progress, set_quiet
from .prototype import PROTOTYPE, fit_head, install_prototype_head
from .report import plot_training
from .rundir import Manifest, RunDir, now
from .runtime.files import write_bytes, write_json
from .safeload import safe_load
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


EpochCallback = Callable[[dict[str, Any]], None]


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
    with RunDir(run_dir).lock() if dist.main else contextlib.nullcontext():
        return _finetune(config, run_dir, resume, on_epoch, dist)


def _finetune(config: FinetuneConfig, run_dir: Path, resume: bool, on_epoch: EpochCallback | None, dist: Context) -> FinetuneResult:
    existed = run_dir.exists()
    config, manifest, state = _open_run_everywhere(dist, run_dir, config, resume)
    started = time.perf_counter()
    try:
        dataset = _with_shots(load_dataset(config.data, workers=max(1, config.workers)), config)
        seed_stage(config.seed)  # before building: the new classifier's initial weights come from it
        built = build(config.arch, len(dataset.classes), config.weights, config.image_size)
        if config.image_size is None:
            config = replace(config, image_size=built.preprocessing.input_size)
        device = _device(config.device, dist)
        built.module.to(device)
        built.check_size()
        if config.mode is Mode.PROTOTYPE:
            return _prototype_run(config, built, dataset, device, run_dir, manifest, dist, started)
        adaptation = _Adaptation(config, built, dataset, device) if config.adapt else None
        probe = _probe_head(config, built, dataset, device, run_dir, dist) if state is None else None
        loop = _make_loop(config, built, dataset, device, run_dir, dist)
    except EdgeTransferError:
        if dist.main and not resume:
            _discard(run_dir, existed)  # bad data, architecture or weights: leave no half-made run behind
        raise
    trainer = _Trainer(config, built, loop, run_dir, dataset.classes, dist, adaptation)
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
    settings = {"arch": config.arch, "weights": config.weights, "mode": config.mode.value, "image_size": config.image_size}
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
    if metrics.get("adapt"):
        manifest.data["finetune"]["adapt"] = {k: metrics["adapt"][k] for k in ("method", "target", "target_images", "target_top1", "eval_images")}
    manifest.data["status"] = "complete"
    manifest.save()
    (run_dir / LAST).unlink(missing_ok=True)


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
    loop = _CachedHeadLoop(config, built, dataset, device, run_dir, dist)
    prototyping = time.perf_counter()
    classes = len(dataset.classes)
    head = fit_head(loop.train_x, loop.train_y, classes, loop.val_x, loop.val_y).to(device)
    scale = float(head.scale)
    install_prototype_head(built, head)
    loop.head = head
    shots = torch.bincount(loop.train_y, minlength=classes)
    seconds = time.perf_counter() - prototyping
    if dist.main:
        save_checkpoint(run_dir / CHECKPOINT, built, dataset.classes, head=PROTOTYPE, scale=scale,
                        shots_per_class=shots.tolist())
    trainer = _Trainer(config, built, loop, run_dir, dataset.classes, dist)
    metrics = trainer.finish(dataset, time.perf_counter() - started)
    metrics["prototype"] = {"scale": scale, "whitened": head.whitens, "shots_per_class": shots.tolist(), "seconds": seconds}
    if dist.main:
        write_json(run_dir / METRICS, metrics)
        _record(manifest, config, metrics, run_dir)
    dist.barrier()
    return FinetuneResult(run_dir, metrics, config, dist.main)


# ---------------------------------------------------------------------------------------------
# Setup helpers


def _device(name: str, dist: Context = SINGLE) -> torch.device:
    if name == "auto" or (dist.active and name == "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank) if dist.active else torch.device("cuda")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EdgeTransferError(f"device {name!r} asked for, but torch sees no CUDA GPU; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise unknown_name("device", name, ["auto", "cpu", "cuda", "cuda:0"]) from None


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.float16, enabled=enabled and device.type == "cuda")


def _loader(samples, transform, config: FinetuneConfig, shuffle: bool, generator: torch.Generator | None = None):
    """A DataLoader that draws only from ``generator`` (a fixed one when none is given), never from
    torch's global generator. A shuffling loader's workers start afresh each epoch, so that they
    are seeded from the epoch's generator and not from the epochs before."""
    return DataLoader(
        TorchImages(samples, transform),
        batch_size=config.batch_size,
        shuffle=shuffle,
        num_workers=config.workers,
        generator=generator if generator is not None else torch.Generator().manual_seed(0),
        persistent_workers=config.workers > 0 and not shuffle,
        pin_memory=torch.cuda.is_available(),
    )


def _make_loop(config, built, dataset, device, run_dir, dist: Context = SINGLE):
    if config.caches_features:
        return _CachedHeadLoop(config, built, dataset, device, run_dir, dist)
    return _ImageLoop(config, built, dataset, device, dist)


def _probe_head(config: FinetuneConfig, built: BuiltModel, dataset: Dataset, device, run_dir: Path, dist: Context = SINGLE):
    """Linear probe before fine-tuning: train the new head on cached frozen features first, so
    the backbone is never updated through the gradients of a random classifier."""
    if config.caches_features or not config.probe_epochs:
        return None
    started = time.perf_counter()
    try:
        loop = _CachedHeadLoop(replace(config, batch_size=64), built, dataset, device, run_dir, dist)
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


# ---------------------------------------------------------------------------------------------
# What an epoch iterates over: cached features, or images through the network


class _CachedHeadLoop:
    """Head mode: the frozen backbone runs once per image; epochs train the head on features."""

    def __init__(self, config, built: BuiltModel, dataset: Dataset, device, run_dir: Path, dist: Context = SINGLE) -> None:
        self.config, self.built, self.device, self.dist = config, built, device, dist
        for param in built.module.parameters():
            param.requires_grad_(False)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.train_pass_s = 0.0  # one backbone pass over the training images (0 when cached)
        started = time.perf_counter()
        self.train_x, self.train_y, self.val_x, self.val_y, widths = self._features(dataset, run_dir)
        self.features_s = time.perf_counter() - started
        self.head = built.head(widths)
        for param in self.head.parameters():
            param.requires_grad_(True)
        self._other: tuple[list, torch.Tensor] | None = None

    def _features(self, dataset: Dataset, run_dir: Path):
        path = run_dir / FEATURES
        key = {"train": [s.name for s in dataset.train], "val": [s.name for s in dataset.val]}
        if path.is_file():
            try:
                cached = safe_load(path)
            except RunError as exc:  # a cache is only a cache: a corrupt one is computed again
                console.print("[yellow]warning:[/]", escape(f"{exc}; computing the features again"))
                cached = {}
            if isinstance(cached, dict) and cached.get("key") == key:
                widths = cached.get("widths", [cached["train_x"].shape[1]])
                return cached["train_x"], cached["train_y"], cached["val_x"], cached["val_y"], widths
        transform = eval_transform(self.built.preprocessing)
        started = time.perf_counter()
        train_x, train_y, widths = self._extract(dataset.train, transform, "features (train)")
        self.train_pass_s = time.perf_counter() - started
        val_x, val_y, _ = self._extract(dataset.val, transform, "features (val)")
        payload = {"key": key, "train_x": train_x, "train_y": train_y, "val_x": val_x, "val_y": val_y, "widths": widths}
        if self.dist.main:
            write_bytes(path, lambda f: torch.save(payload, f))
        return train_x, train_y, val_x, val_y, widths

    def _extract(self, samples, transform, label: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """What the heads read for ``samples`` (side by side, for several heads), the labels and
        each head's width; under torchrun each rank computes its share and all gather."""
        total, samples = len(samples), self.dist.shard(samples)
        heads = self.built.heads
        captured: list[list[torch.Tensor]] = [[] for _ in heads]
        hooks = [
            head.register_forward_pre_hook(lambda m, args, into=into: into.append(args[0].float().cpu()))
            for head, into in zip(heads, captured, strict=True)
        ]
        labels, first_logits = [], None
        self.built.module.eval()
        try:
            with progress() as bar, torch.no_grad():
                task = bar.add_task(label, total=len(samples), status="")
                for x, y in _loader(samples, transform, self.config, shuffle=False):
                    with _autocast(self.device, self.config.amp):
                        logits = self.built.module(x.to(self.device, non_blocking=True))
                    first_logits = logits.float().cpu() if first_logits is None else first_logits
                    labels.append(y)
                    bar.advance(task, len(y))
        finally:
            for hook in hooks:
                hook.remove()
        if first_logits is not None:  # the check runs the heads: only once their hooks are gone
            self._check_head([part[0] for part in captured], first_logits)
        widths = [part[0].shape[1] for part in captured]
        features = torch.cat([torch.cat(part) for part in captured], dim=1)
        return self.dist.unshard(features, total), self.dist.unshard(torch.cat(labels), total), widths

    def _check_head(self, inputs: list[torch.Tensor], logits: torch.Tensor) -> None:
        """Refuse a model whose logits are not what its heads make of their cached inputs (a
        model that changes the logits after its classifier): training on cached features would
        train something else than the model that is exported."""
        head = self.built.head([x.shape[1] for x in inputs])
        with torch.no_grad():
            remade = head.to(self.device)(torch.cat(inputs, dim=1).to(self.device)).float().cpu()
        tolerance = (2e-2 if self.config.amp and self.device.type == "cuda" else 1e-3) * max(1.0, float(logits.abs().max()))
        if remade.shape != logits.shape or not torch.allclose(remade, logits, rtol=0, atol=tolerance):
            raise ModelError(
                f"{self.config.arch}'s logits are not its classifier's output on cached features, so head mode cannot"
                " train it on them; use --unfreeze-blocks 1 or --mode full"
            )

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_y) / self.config.batch_size)

    def logits_of(self, samples) -> torch.Tensor:
        """The head's logits for other images (the labelled target images); their frozen features
        are computed once."""
        if self._other is None or self._other[0] is not samples:
            features, _, _ = self._extract(samples, eval_transform(self.built.preprocessing), "features (target eval)")
            self._other = (samples, features)
        self.head.eval()
        with torch.no_grad():
            return torch.cat([self.head(x.to(self.device)).float().cpu() for x in self._other[1].split(1024)])

    def backbone_changed(self, dataset: Dataset) -> None:
        """The backbone's BatchNorm statistics were adapted: validation features are computed again."""
        self.val_x, self.val_y, _ = self._extract(dataset.val, eval_transform(self.built.preprocessing), "features (val, adapted)")
        self._other = None

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.head.parameters()), "lr": lr, "name": "head"}]

    def train_batches(self):
        self.head.train()
        order = torch.randperm(len(self.train_y), generator=self.generator)
        for start in range(0, len(order), self.config.batch_size):
            index = order[start : start + self.config.batch_size]
            yield self.train_x[index].to(self.device), self.train_y[index].to(self.device), self.head

    def val_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.head.eval()
        with torch.no_grad():
            logits = [self.head(x.to(self.device)).float().cpu() for x in self.val_x.split(1024)]
        return torch.cat(logits), self.val_y



class _ImageLoop:
    """Full mode, or head mode with unfrozen blocks: images go through the network every epoch."""

    def __init__(self, config, built: BuiltModel, dataset: Dataset, device, dist: Context = SINGLE) -> None:
        self.config, self.built, self.device, self.dist = config, built, device, dist
        self.features_s = 0.0
        self.epoch = 0
        self.generator = torch.Generator().manual_seed(config.seed)
        transform = train_transform(built.preprocessing, config.augment)
        if dist.active:
            images = TorchImages(dataset.train, transform)
            self.sampler = DistributedSampler(images, dist.world, dist.rank, shuffle=True, seed=config.seed)
            self.train = DataLoader(images, batch_size=config.batch_size, sampler=self.sampler, num_workers=config.workers,
                                    generator=self.generator, pin_memory=torch.cuda.is_available())
        else:
            self.train = _loader(dataset.train, transform, config, True, self.generator)
        self.val_total = len(dataset.val)
        self.val = _loader(dist.shard(dataset.val), eval_transform(built.preprocessing), config, False)
        self.trainable = self._select_trainable()
        self.model = built.module
        if dist.active:  # gradients averaged over ranks; parameters start from rank 0's

            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(built.module, device_ids=ids)

    def _select_trainable(self) -> list[nn.Module]:
        """Modules that train (and so run BatchNorm in train mode); all others stay frozen."""
        module, heads = self.built.module, self.built.heads
        if self.config.mode is Mode.FULL:
            for param in module.parameters():
                param.requires_grad_(True)
            return [module]
        blocks = trunk_blocks(self.built)
        unfrozen = blocks[-self.config.unfreeze_blocks :] if self.config.unfreeze_blocks else []
        for param in module.parameters():
            param.requires_grad_(False)
        for part in [*unfrozen, *heads]:
            for param in part.parameters():
                param.requires_grad_(True)
        return [*unfrozen, *heads]

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        head = [p for layer in self.built.heads for p in layer.parameters()]
        head_ids = {id(p) for p in head}
        backbone = [p for p in self.built.module.parameters() if p.requires_grad and id(p) not in head_ids]
        groups = [{"params": head, "lr": lr, "name": "head"}]
        if backbone:
            groups.append({"params": backbone, "lr": lr * self.config.backbone_lr_scale, "name": "backbone"})
        return groups

    def train_batches(self):
        self.built.module.eval()
        for part in self.trainable:
            part.train()
        if not self.config.train_bn_stats:
            # Batch statistics of a small, shifted dataset wreck pretrained features; BatchNorm
            # keeps its running statistics and only its affine parameters train.
            for layer in self.built.module.modules():
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    layer.eval()
        if self.dist.active:
            self.sampler.set_epoch(self.epoch)
        for x, y in self.train:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), self.model

    def logits_of(self, samples) -> torch.Tensor:
        """The model's logits for other images (the labelled target images)."""
        self.built.module.eval()
        with torch.no_grad():
            return torch.cat([
                self.built.module(x.to(self.device)).float().cpu()
                for x, _ in _loader(samples, eval_transform(self.built.preprocessing), self.config, False)
            ])

    def backbone_changed(self, dataset: Dataset) -> None:
        pass  # images go through the network for every measurement

    def val_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.built.module.eval()
        logits, labels = [], []
        with torch.no_grad():
            for x, y in self.val:
                with _autocast(self.device, self.config.amp):
                    logits.append(self.built.module(x.to(self.device)).float().cpu())
                labels.append(y)
        return self.dist.unshard(torch.cat(logits), self.val_total), self.dist.unshard(torch.cat(labels), self.val_total)



# ---------------------------------------------------------------------------------------------
# Domain adaptation (--adapt): see edgetransfer.adapt


class _Adaptation:
    """The unlabelled target images, the labelled ones measured on, and (dann) the domain
    classifier, which exists only during training."""

    def __init__(self, config: FinetuneConfig, built: BuiltModel, dataset: Dataset, device) -> None:
        self.config, self.built, self.device = config, built, device
        self.method = config.adapt_method
        if self.method is AdaptMethod.ADABN and not batchnorm_layers(built.module):
            raise ModelError(f"adabn recomputes BatchNorm statistics and {config.arch} has none; use --adapt-method dann")
        self.discriminator = None
        if self.method is AdaptMethod.DANN:
            head = built.heads[0]
            if not isinstance(head, nn.Linear):
                raise ModelError(f"dann reads the features {config.arch}'s classifier takes, and its classifier is a"
                                 f" {type(head).__name__}, not a Linear layer; use --adapt-method adabn")
            self.discriminator = DomainClassifier(head.in_features).to(device)
        workers = max(1, config.workers)
        self.target = target_images(config.adapt, config.data, workers)
        if self.target.labelled_folders:
            console.print(escape(f"note: the target folder has {self.target.labelled_folders} subfolder(s); their names are"
                                 " not read, every image counts as unlabelled"), markup=False)
        if self.target.skipped:
            console.print("[yellow]warning:[/]", escape(f"skipped {len(self.target.skipped)} unreadable target image(s);"
                                                         f" first: {self.target.skipped[0][1]}"))
        self.eval = target_eval_images(config.adapt_eval, config.data, dataset.classes, workers) if config.adapt_eval else []
        self.eval_labels = torch.tensor([s.label for s in self.eval])
        self.transform = train_transform(built.preprocessing, config.augment)
        self.generator = torch.Generator()
        self._batches = None
        self.domain_loss, self.domain_right, self.domain_seen = 0.0, 0, 0

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.discriminator.parameters()), "lr": lr, "name": "domain"}] if self.discriminator else []

    def start_epoch(self, seed: int) -> None:
        self.generator.manual_seed(seed)
        self._batches = None
        self.domain_loss, self.domain_right, self.domain_seen = 0.0, 0, 0
        if self.discriminator is not None:
            self.discriminator.train()

    def _target_batch(self) -> torch.Tensor:
        """The next batch of target images; their order is drawn from the epoch's generator and
        starts again when they run out (the source images set an epoch's length)."""
        while True:
            if self._batches is None:
                self._batches = iter(_loader(self.target.samples, self.transform, self.config, True, self.generator))
            try:
                return next(self._batches)[0].to(self.device, non_blocking=True)
            except StopIteration:
                self._batches = None

    def forward(self, model: nn.Module, x: torch.Tensor, progress: float) -> tuple[torch.Tensor, torch.Tensor]:
        """DANN's step: source and target images in one batch; the logits of the source images and
        the domain classifier's loss on the features of both, read through gradient reversal."""
        target = self._target_batch()
        captured: list[torch.Tensor] = []
        hook = self.built.heads[0].register_forward_pre_hook(lambda m, args: captured.append(args[0]))
        try:
            logits = model(torch.cat([x, target]))
        finally:
            hook.remove()
        domain = self.discriminator(captured[-1].flatten(1).float(), reversal_weight(progress))
        truth = torch.cat([torch.zeros(len(x)), torch.ones(len(target))]).to(domain.device)
        loss = nn.functional.binary_cross_entropy_with_logits(domain, truth)
        self.domain_loss += float(loss.detach()) * len(truth)
        self.domain_right += int(((domain > 0).float() == truth).sum())
        self.domain_seen += len(truth)
        return logits[: len(x)], loss

    def epoch_record(self) -> dict[str, float]:
        if not self.domain_seen:
            return {}
        return {"domain_loss": self.domain_loss / self.domain_seen, "domain_top1": self.domain_right / self.domain_seen}

    def adapt_batchnorm(self) -> tuple[int, float]:
        """AdaBN on the model: one pass over the target images; returns the layers and seconds."""
        started = time.perf_counter()
        loader = _loader(self.target.samples, eval_transform(self.built.preprocessing), self.config, False)
        layers = adabn(self.built.module, (x.to(self.device) for x, _ in loader), self.config.arch)
        return layers, time.perf_counter() - started

    def state(self) -> dict[str, Any] | None:
        return self.discriminator.state_dict() if self.discriminator is not None else None

    def restore(self, state: dict[str, Any] | None) -> None:
        if self.discriminator is not None and state is not None:
            self.discriminator.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# The epoch loop, checkpoints and resume


class _Trainer:
    def __init__(self, config: FinetuneConfig, built: BuiltModel, loop, run_dir: Path, classes: list[str], dist: Context = SINGLE,
                 adaptation: _Adaptation | None = None) -> None:
        self.config, self.built, self.loop, self.run_dir, self.classes = config, built, loop, run_dir, classes
        self.dist = dist
        self.adaptation = adaptation
        self.dann = adaptation is not None and adaptation.discriminator is not None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        groups = loop.param_groups(config.lr) + (adaptation.parameter_groups(config.lr) if adaptation else [])
        self.optimizer = _optimizer(config, groups)
        self.total_steps = max(1, config.epochs * loop.steps_per_epoch)
        if self.dann:  # the paper's annealing, not cosine: its reversal schedule is tuned with it

            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: dann_lr_factor(step / self.total_steps))
        else:
            self.scheduler = cosine_with_warmup(self.optimizer, config.epochs, config.warmup_epochs, loop.steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.amp and loop.device.type == "cuda")
        self.history: list[dict[str, Any]] = []
        self.best_top1, self.best_epoch, self.stale = -1.0, 0, 0
        self.probe: dict[str, Any] | None = None

    def restore(self, state: dict[str, Any]) -> None:
        self.built.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.history = state["history"]
        self.best_top1, self.best_epoch, self.stale = state["best_top1"], state["best_epoch"], state["stale"]
        if self.adaptation is not None:
            self.adaptation.restore(state.get("adaptation"))
        console.print(f"resuming {self.run_dir} after epoch {len(self.history)} of {self.config.epochs}", markup=False)

    def run(self, on_epoch: EpochCallback | None) -> None:
        with progress() as bar:
            task = bar.add_task("epochs", total=self.config.epochs, completed=len(self.history), status="")
            for epoch in range(len(self.history) + 1, self.config.epochs + 1):
                record = self._epoch(epoch)
                bar.update(task, advance=1, status=f"val top-1 {100 * record['val_top1']:.2f}%")
                if on_epoch is not None:
                    on_epoch(record)
                if self.config.patience and self.stale >= self.config.patience:
                    console.print(f"early stop: no better val top-1 for {self.stale} epochs")
                    break

    def _epoch(self, epoch: int) -> dict[str, Any]:
        started = time.perf_counter()
        self.loop.epoch = epoch
        self.loop.generator.manual_seed(seed_stage(self.config.seed, epoch, self.dist.rank))  # ranks augment differently
        if self.adaptation is not None:
            self.adaptation.start_epoch(int(self.loop.generator.initial_seed()) ^ 0x7A56E7)
        train_loss, train_top1 = self._train_one_epoch()
        logits, labels = self.loop.val_logits()
        val_loss = float(nn.functional.cross_entropy(logits, labels))
        val_top1 = topk_accuracy(logits.numpy(), labels.numpy(), 1)
        record = {
            "epoch": epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": train_loss,
            "train_top1": train_top1,
            "val_loss": val_loss,
            "val_top1": val_top1,
        }
        if self.adaptation is not None:
            record.update(self.adaptation.epoch_record())
            record["target_top1"] = self._target_top1()  # reported only: the checkpoint is chosen on source val
        record["seconds"] = time.perf_counter() - started
        self.history.append(record)
        if val_top1 > self.best_top1:
            self.best_top1, self.best_epoch, self.stale = val_top1, epoch, 0
            if self.dist.main:
                save_checkpoint(self.run_dir / CHECKPOINT, self.built, self.classes, epoch=epoch, val_top1=val_top1)
        else:
            self.stale += 1
        if self.dist.main:
            self._save_state()
        return record

    def _train_one_epoch(self) -> tuple[float, float]:
        total_loss, correct, seen = 0.0, 0, 0
        for x, y, model in self.loop.train_batches():
            with _autocast(self.loop.device, self.config.amp):
                if self.dann:
                    logits, domain_loss = self.adaptation.forward(model, x, self.scheduler.last_epoch / self.total_steps)
                    loss = self.criterion(logits.float(), y) + domain_loss
                else:
                    logits = model(x)
                    loss = self.criterion(logits.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            total_loss += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        total_loss, correct, seen = self.dist.sum(total_loss, correct, seen)
        return total_loss / seen, correct / seen

    def _save_state(self) -> None:
        state = {
            "model": self.built.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": self.history,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "stale": self.stale,
            "probe": self.probe,
            "adaptation": self.adaptation.state() if self.adaptation is not None else None,
        }
        write_bytes(self.run_dir / LAST, lambda f: torch.save(state, f))

    def finish(self, dataset: Dataset, total_s: float) -> dict[str, Any]:
        """Evaluate the best checkpoint, write metrics.json and curves.png (rank 0)."""
        self.dist.barrier()  # rank 0 has written the best checkpoint
        best = safe_load(self.run_dir / CHECKPOINT)
        self.built.module.load_state_dict(best["state_dict"])
        adapted = self._adapt_batchnorm(dataset) if self.adaptation is not None and not self.dann else {}
        logits, labels = self.loop.val_logits()
        logits_np, labels_np = logits.numpy(), labels.numpy()
        matrix = confusion_matrix(logits_np.argmax(1), labels_np, len(self.classes))
        metrics = {
            "arch": self.config.arch,
            "weights": self.config.weights,
            "mode": self.config.mode.value,
            "image_size": self.config.image_size,
            "classes": self.classes,
            "train_images": len(dataset.train),
            "val_images": len(dataset.val),
            "test_images": len(dataset.test),
            "skipped_images": len(dataset.skipped),
            "epochs": self.history,
            "best_epoch": self.best_epoch,
            "stopped_early": len(self.history) < self.config.epochs,
            "probe": self.probe,
            "final": {
                "top1": topk_accuracy(logits_np, labels_np, 1),
                "top5": topk_accuracy(logits_np, labels_np, 5),
                "loss": float(nn.functional.cross_entropy(logits, labels)),
                "confusion_matrix": matrix.tolist(),
                "per_class_top1": [None if math.isnan(v) else float(v) for v in per_class_accuracy(matrix)],
            },
            "test": self._test(dataset),
            "adapt": self._adapt_summary(adapted),
            "timing": {
                "features_s": self.loop.features_s + (self.probe or {}).get("seconds", 0.0),
                "train_pass_s": getattr(self.loop, "train_pass_s", None),
                "epochs_s": sum(r["seconds"] for r in self.history),
                "total_s": total_s,
                "torch_threads": torch.get_num_threads(),
                "processes": self.dist.world,
                "device": str(self.loop.device),
            },
        }
        if self.dist.main:
            write_json(self.run_dir / METRICS, metrics)
            plot_training(metrics, self.run_dir / CURVES)
        return metrics


    def _target_top1(self) -> float | None:
        samples = self.adaptation.eval if self.adaptation is not None else []
        if not samples:
            return None
        return topk_accuracy(self.loop.logits_of(samples).numpy(), self.adaptation.eval_labels.numpy(), 1)

    def _adapt_batchnorm(self, dataset: Dataset) -> dict[str, Any]:
        """AdaBN on the chosen checkpoint, which is written again with the target's statistics.
        Recomputed from the checkpoint each time, so a resumed run repeats it exactly."""
        before = self._target_top1()
        layers, seconds = self.adaptation.adapt_batchnorm()
        self.loop.backbone_changed(dataset)
        if self.dist.main:
            save_checkpoint(self.run_dir / CHECKPOINT, self.built, self.classes, epoch=self.best_epoch, adapted=AdaptMethod.ADABN.value)
        return {"target_top1_before": before, "batchnorm_layers": layers, "seconds": seconds}

    def _adapt_summary(self, adapted: dict[str, Any]) -> dict[str, Any] | None:
        if self.adaptation is None:
            return None

        return summary(self.config.adapt_method, self.adaptation.target, len(self.adaptation.eval),
                       target=self.config.adapt, target_top1=self._target_top1(), **adapted)

    def _test(self, dataset: Dataset) -> dict[str, Any] | None:
        """The chosen checkpoint's top-1 on the test split, measured once, after every choice."""
        if not dataset.test:
            return None
        module = self.built.module
        module.eval()
        right = 0
        with torch.no_grad():
            for x, y in _loader(dataset.test, eval_transform(self.built.preprocessing), self.config, False):
                with _autocast(self.loop.device, self.config.amp):
                    right += int((module(x.to(self.loop.device)).float().cpu().argmax(1) == y).sum())
        return {"images": len(dataset.test), "top1": right / len(dataset.test)}


def _optimizer(config: FinetuneConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if config.optimizer is OptimizerName.SGD:
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
