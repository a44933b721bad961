"""Several tasks on one frozen backbone: one Linear head per task, trained together on the cached
features of each task's own images.

Each task's images go through the frozen backbone once (the frozen pass of head mode, cached per
task). An epoch visits every task's training batches, interleaved task by task in a seeded
order; a step trains the head of its batch's task on that task's loss alone (the heads share no
parameter, so no weighting between tasks is needed: the record says so). The checkpoint is the
epoch with the best mean of the tasks' validation top-1; after it, each task's test top-1 is
measured once, with its image count and 95% interval. ``last.pt`` after every epoch lets a killed
run resume and repeat an uninterrupted one exactly.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import save_checkpoint
from ..config import FinetuneConfig
from ..data import Dataset
from ..distributed import SINGLE, Context
from ..metrics import confusion_matrix, topk_accuracy, wilson_interval
from ..models import BuiltModel
from ..plots import plot_training
from ..progress import console, progress
from ..rundir import RunDir
from ..runtime.files import write_bytes, write_json
from ..safeload import safe_load
from ..taskheads import TaskHeads, task_slices
from ..training import cosine_with_warmup, seed_stage
from .loops import CachedHeadLoop
from .trainer import make_optimizer

__all__ = ["MultiTaskTrainer", "task_labels", "WEIGHTING"]

CHECKPOINT, LAST, METRICS, CURVES = RunDir.CHECKPOINT, RunDir.LAST, RunDir.METRICS, RunDir.CURVES
WEIGHTING = "none needed: a step trains one task's head on that task's loss; the heads share no parameter"
CHOSEN_ON = "mean of the tasks' validation top-1"


def task_labels(tasks: dict[str, list[str]]) -> list[str]:
    """Every task's classes as one list, ``task:class``, in the order of the logits."""
    return [f"{task}:{label}" for task, labels in tasks.items() for label in labels]


class MultiTaskTrainer:
    """Train ``heads`` (installed in ``built``) on each task's cached features."""

    def __init__(
        self, config: FinetuneConfig, built: BuiltModel, heads: TaskHeads, datasets: dict[str, Dataset], device, run_dir: Path, dist: Context = SINGLE
    ):
        self.config, self.built, self.heads, self.datasets, self.run_dir, self.dist = config, built, heads, datasets, run_dir, dist
        self.names = list(datasets)
        self.slices = task_slices(heads.sizes)
        self.loops = [
            CachedHeadLoop(config, built, dataset, device, run_dir, dist, cache=run_dir / RunDir.FEATURES_OF.format(task=name))
            for name, dataset in datasets.items()
        ]
        assert config.lr is not None and config.epochs is not None and config.warmup_epochs is not None, "a resolved FinetuneConfig"
        self.steps_per_epoch = sum(loop.steps_per_epoch for loop in self.loops)
        self.optimizer = make_optimizer(config, [{"params": list(heads.parameters()), "lr": config.lr, "name": "heads"}])
        self.scheduler = cosine_with_warmup(self.optimizer, config.epochs, config.warmup_epochs, self.steps_per_epoch)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.history: list[dict[str, Any]] = []
        self.best_top1, self.best_epoch, self.stale = -1.0, 0, 0

    @property
    def features_s(self) -> float:
        return sum(loop.features_s for loop in self.loops)

    def restore(self, state: dict[str, Any]) -> None:
        self.built.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history = state["history"]
        self.best_top1, self.best_epoch, self.stale = state["best_top1"], state["best_epoch"], state["stale"]
        console.print(f"resuming {self.run_dir} after epoch {len(self.history)} of {self.config.epochs}", markup=False)

    def run(self, on_epoch=None) -> None:
        assert self.config.epochs is not None
        with progress() as bar:
            task = bar.add_task("epochs", total=self.config.epochs, completed=len(self.history), status="")
            for epoch in range(len(self.history) + 1, self.config.epochs + 1):
                record = self._epoch(epoch)
                bar.update(task, advance=1, status=f"mean val top-1 {100 * record['val_top1']:.2f}%")
                if on_epoch is not None:
                    on_epoch(record)
                if self.config.patience and self.stale >= self.config.patience:
                    console.print(f"early stop: no better mean val top-1 for {self.stale} epochs")
                    break

    def _batches(self, epoch: int):
        """(task index, rows) of every task's training batches, interleaved task by task."""
        generator = torch.Generator().manual_seed(seed_stage(self.config.seed, epoch, self.dist.rank))
        per_task = []
        for index, loop in enumerate(self.loops):
            order = torch.randperm(len(loop.train_y), generator=generator)
            per_task.append([(index, rows) for rows in order.split(self.config.batch_size)])
        return [batch for group in itertools.zip_longest(*per_task) for batch in group if batch is not None]

    def _epoch(self, epoch: int) -> dict[str, Any]:
        started = time.perf_counter()
        self.heads.train()
        losses, right, seen = 0.0, 0, 0
        for index, rows in self._batches(epoch):
            loop, head = self.loops[index], self.heads.heads[index]
            x, y = loop.train_x[rows].to(loop.device), loop.train_y[rows].to(loop.device)
            logits = head(x).float()
            loss = self.criterion(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            losses, right, seen = losses + loss.item() * len(y), right + int((logits.argmax(1) == y).sum()), seen + len(y)
        per_task = self._val()
        val_top1 = float(np.mean([t["top1"] for t in per_task.values()]))
        record = {
            "epoch": epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": losses / seen,
            "train_top1": right / seen,
            "val_loss": float(np.mean([t["loss"] for t in per_task.values()])),
            "val_top1": val_top1,
            "tasks": {name: {"val_top1": t["top1"]} for name, t in per_task.items()},
            "seconds": time.perf_counter() - started,
        }
        self.history.append(record)
        if val_top1 > self.best_top1:
            self.best_top1, self.best_epoch, self.stale = val_top1, epoch, 0
            if self.dist.main:
                self._save_checkpoint(epoch=epoch, val_top1=val_top1)
        else:
            self.stale += 1
        if self.dist.main:
            self._save_state()
        return record

    def _save_checkpoint(self, **extra: Any) -> None:
        tasks = {name: list(dataset.classes) for name, dataset in self.datasets.items()}
        save_checkpoint(self.run_dir / CHECKPOINT, self.built, task_labels(tasks), tasks=tasks, **extra)

    def _val(self) -> dict[str, dict[str, Any]]:
        """Each task's validation logits (its own columns), top-1 and loss."""
        measured = {}
        for name, loop, columns in zip(self.names, self.loops, self.slices, strict=True):
            logits = loop.val_logits()[0][:, columns]
            measured[name] = {
                "logits": logits,
                "labels": loop.val_y,
                "top1": topk_accuracy(logits.numpy(), loop.val_y.numpy(), 1),
                "loss": float(nn.functional.cross_entropy(logits, loop.val_y)),
            }
        return measured

    def _save_state(self) -> None:
        state = {
            "model": self.built.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": self.history,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "stale": self.stale,
        }
        write_bytes(self.run_dir / LAST, lambda f: torch.save(state, f))

    def finish(self, total_s: float) -> dict[str, Any]:
        """Evaluate the chosen checkpoint on every task's validation and test images; write
        metrics.json and curves.png (rank 0)."""
        self.dist.barrier()
        self.built.module.load_state_dict(safe_load(self.run_dir / CHECKPOINT)["state_dict"])
        val = self._val()
        tasks = {
            name: self._task_metrics(name, loop, columns, val[name]) for name, loop, columns in zip(self.names, self.loops, self.slices, strict=True)
        }
        first = tasks[self.names[0]]
        metrics = {
            "arch": self.config.arch,
            "weights": self.config.weights,
            "mode": self.config.mode.value if self.config.mode else None,
            "image_size": self.config.image_size,
            "classes": task_labels({name: t["classes"] for name, t in tasks.items()}),
            "tasks": tasks,
            "chosen_on": CHOSEN_ON,
            "weighting": WEIGHTING,
            "train_images": sum(t["train_images"] for t in tasks.values()),
            "val_images": sum(t["val_images"] for t in tasks.values()),
            "test_images": sum(t["test"]["images"] if t["test"] else 0 for t in tasks.values()),
            "epochs": self.history,
            "best_epoch": self.best_epoch,
            "stopped_early": len(self.history) < (self.config.epochs or 0),
            "final": {
                "top1": float(np.mean([t["val_top1"] for t in tasks.values()])),
                "top5": float(np.mean([t["val_top5"] for t in tasks.values()])),
                "confusion_matrix": first["confusion_matrix"],
                "confusion_of": self.names[0],
            },
            "test": None,
            "timing": {
                "features_s": self.features_s,
                "epochs_s": sum(r["seconds"] for r in self.history),
                "total_s": total_s,
                "torch_threads": torch.get_num_threads(),
            },
            "frozen_pass": [loop.frozen_record() for loop in self.loops],
        }
        if self.dist.main:
            write_json(self.run_dir / METRICS, metrics)
            plot_training(metrics, self.run_dir / CURVES)
        return metrics

    def _task_metrics(self, name: str, loop: CachedHeadLoop, columns: slice, val: dict[str, Any]) -> dict[str, Any]:
        dataset = self.datasets[name]
        logits, labels = val["logits"].numpy(), val["labels"].numpy()
        test = None
        if dataset.test:
            test_labels = np.array([sample.label for sample in dataset.test])
            right = int((loop.test_logits(dataset.test)[:, columns].numpy().argmax(1) == test_labels).sum())
            test = {"images": len(test_labels), "top1": right / len(test_labels), "interval": wilson_interval(right, len(test_labels))}
        return {
            "classes": list(dataset.classes),
            "train_images": len(dataset.train),
            "val_images": len(dataset.val),
            "val_top1": val["top1"],
            "val_top5": topk_accuracy(logits, labels, 5),
            "confusion_matrix": confusion_matrix(logits.argmax(1), labels, len(dataset.classes)).tolist(),
            "test": test,
        }
