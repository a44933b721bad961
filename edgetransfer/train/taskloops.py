"""What a multi-task epoch iterates over: each task's cached features (head mode), or each task's
images through the network (full mode, or head mode with unfrozen blocks).

Both give the trainer the same surface: the optimizer steps of an epoch, each task's validation
logits (its own columns), the test logits of its images and the parameters that train.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import FinetuneConfig
from ..data import Dataset
from ..distributed import SINGLE, Context
from ..prototype import fit_recorded
from ..rundir import RunDir
from ..taskheads import TaskHeads, task_slices
from ..training import seed_stage
from .loops import CachedHeadLoop, ImageLoop, autocast_for

__all__ = ["Step", "CachedTasks", "ImageTasks"]

Step = tuple[torch.Tensor, int, int]  # (the loss to step on, right answers, images)


class CachedTasks:
    """Head mode: each task's images through the frozen backbone once; an epoch visits every
    task's batches of cached features, interleaved task by task in a seeded order, and a step
    trains the head of its batch's task on that task's loss (the heads share no parameter).

    A prototype task's head is made once from its cached features (class means, see
    :mod:`edgetransfer.prototype`) and has no steps.
    """

    weighting = "none needed: a step trains one task's head on that task's loss; the heads share no parameter"
    amp = False  # a head on cached features is one small matrix product, kept in FP32

    def __init__(self, config: FinetuneConfig, built, heads: TaskHeads, datasets: dict[str, Dataset], device, run_dir: Path, dist: Context = SINGLE):
        self.config, self.heads, self.device, self.dist = config, heads, device, dist
        self.slices = task_slices(heads.sizes)
        self.loops = [
            CachedHeadLoop(config, built, dataset, device, run_dir, dist, cache=run_dir / RunDir.FEATURES_OF.format(task=name))
            for name, dataset in datasets.items()
        ]
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.trains = [not task.prototype for task in config.tasks] if config.tasks else [True] * len(self.loops)
        self.prototypes = {
            name: self._prototype_head(index) for index, name in enumerate(datasets) if not self.trains[index]
        }  # fresh: a resumed run loads the same head's state over it

    def _prototype_head(self, index: int) -> dict[str, Any]:
        """Task ``index``'s prototype head from its cached features, put in its place; its record."""
        loop = self.loops[index]
        head, record = fit_recorded(loop.train_x, loop.train_y, self.heads.sizes[index], loop.val_x, loop.val_y)
        self.heads.heads[index] = head.to(self.device)
        return record

    @property
    def steps_per_epoch(self) -> int:
        return sum(loop.steps_per_epoch for loop, trains in zip(self.loops, self.trains, strict=True) if trains)

    @property
    def features_s(self) -> float:
        return sum(loop.features_s for loop in self.loops)

    def frozen_record(self) -> list[dict[str, Any]]:
        return [loop.frozen_record() for loop in self.loops]

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.heads.parameters()), "lr": lr, "name": "heads"}]

    def steps(self, epoch: int) -> Iterator[Step]:
        generator = torch.Generator().manual_seed(seed_stage(self.config.seed, epoch, self.dist.rank))
        per_task = []
        for index, loop in enumerate(self.loops):
            order = torch.randperm(len(loop.train_y), generator=generator)
            per_task.append([(index, rows) for rows in order.split(self.config.batch_size)] if self.trains[index] else [])
        self.heads.train()
        for index, rows in (batch for group in itertools.zip_longest(*per_task) for batch in group if batch is not None):
            loop = self.loops[index]
            x, y = loop.train_x[rows].to(self.device), loop.train_y[rows].to(self.device)
            logits = self.heads.heads[index](x).float()
            yield self.criterion(logits, y), int((logits.argmax(1) == y).sum()), len(y)

    def val(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        loop = self.loops[index]
        return loop.val_logits()[0][:, self.slices[index]], loop.val_y

    def test_logits(self, index: int, samples) -> torch.Tensor:
        return self.loops[index].test_logits(samples)[:, self.slices[index]]


class ImageTasks:
    """Full mode (or unfrozen blocks): a step takes one batch of every task (a task with fewer
    batches starts again), runs them through the network together and steps on the weighted sum
    of the tasks' losses, each on its own images and its own columns. An epoch is one pass over
    the task with the most batches."""

    def __init__(self, config: FinetuneConfig, built, heads: TaskHeads, datasets: dict[str, Dataset], device, weights: list[float]):
        self.config, self.built, self.device, self.weights = config, built, device, weights
        self.slices = task_slices(heads.sizes)
        self.loops = [ImageLoop(config, built, dataset, device) for dataset in datasets.values()]
        self.features_s = 0.0
        self.amp = config.amp
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        names = list(datasets)
        self.weighting = {"method": "fixed weights on the sum of the tasks' losses", "weights": dict(zip(names, weights, strict=True))}

    @property
    def steps_per_epoch(self) -> int:
        return max(loop.steps_per_epoch for loop in self.loops)

    def frozen_record(self) -> None:
        return None  # no frozen pass: images go through the network

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return self.loops[0].param_groups(lr)  # the heads, and the blocks that train (the same for every task)

    def steps(self, epoch: int) -> Iterator[Step]:
        for index, loop in enumerate(self.loops):
            loop.generator.manual_seed(seed_stage(self.config.seed, epoch, index))
        iterators = [loop.train_batches() for loop in self.loops]
        for _ in range(self.steps_per_epoch):
            batches = [self._next(iterators, index) for index in range(len(self.loops))]
            x = torch.cat([x for x, _ in batches])
            with autocast_for(self.device, self.amp):
                logits = self.built.module(x).float()
            loss, right, start = torch.zeros((), device=self.device), 0, 0
            for (_, y), columns, weight in zip(batches, self.slices, self.weights, strict=True):
                mine = logits[start : start + len(y), columns]
                loss = loss + weight * self.criterion(mine, y)
                right, start = right + int((mine.argmax(1) == y).sum()), start + len(y)
            yield loss, right, start

    def _next(self, iterators: list, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch of task ``index`` (its images start again when they run out)."""
        try:
            x, y, _ = next(iterators[index])
        except StopIteration:
            iterators[index] = self.loops[index].train_batches()
            x, y, _ = next(iterators[index])
        return x, y

    def val(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits, labels = self.loops[index].val_logits()
        return logits[:, self.slices[index]], labels

    def test_logits(self, index: int, samples) -> torch.Tensor:
        return self.loops[index].test_logits(samples)[:, self.slices[index]]
