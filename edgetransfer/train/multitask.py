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
from ..progress import console
from ..rundir import RunDir
from ..runtime.files import write_bytes, write_json
from ..safeload import safe_load
from ..training import cosine_with_warmup
from .loops import default_form, precision_for
from .trainer import epoch_loop, make_optimizer

__all__ = ["MultiTaskTrainer", "task_labels"]

CHECKPOINT, LAST, METRICS, CURVES = RunDir.CHECKPOINT, RunDir.LAST, RunDir.METRICS, RunDir.CURVES
CHOSEN_ON = "mean of the tasks' validation top-1"


def task_labels(tasks: dict[str, list[str]]) -> list[str]:
    """Every task's classes as one list, ``task:class``, in the order of the logits."""
    return [f"{task}:{label}" for task, labels in tasks.items() for label in labels]


class MultiTaskTrainer:
    """Train the heads installed in ``built`` (and, in full mode, the backbone) on every task.

    Args:
        tasks: the epoch's steps and each task's measurements (:mod:`.taskloops`).
        save: write the checkpoint and the resume state (off for the linear probe before full mode).
    """

    def __init__(
        self, config: FinetuneConfig, built: BuiltModel, tasks, datasets: dict[str, Dataset], run_dir: Path, dist: Context = SINGLE, save: bool = True
    ):
        self.config, self.built, self.tasks, self.datasets, self.run_dir, self.dist = config, built, tasks, datasets, run_dir, dist
        self.save = save and dist.main
        self.names = list(datasets)
        assert config.lr is not None and config.epochs is not None and config.warmup_epochs is not None, "a resolved FinetuneConfig"
        self.optimizer = make_optimizer(config, tasks.param_groups(config.lr))
        self.scheduler = cosine_with_warmup(self.optimizer, config.epochs, config.warmup_epochs, tasks.steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda", enabled=tasks.amp and tasks.device.type == "cuda")
        self.history: list[dict[str, Any]] = []
        self.best_top1, self.best_epoch, self.stale = -1.0, 0, 0
        self.probe: dict[str, Any] | None = None

    def restore(self, state: dict[str, Any]) -> None:
        self.built.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.history, self.probe = state["history"], state.get("probe")
        self.best_top1, self.best_epoch, self.stale = state["best_top1"], state["best_epoch"], state["stale"]
        console.print(f"resuming {self.run_dir} after epoch {len(self.history)} of {self.config.epochs}", markup=False)

    def run(self, on_epoch=None, label: str = "epochs") -> None:
        epoch_loop(self.config, len(self.history) + 1, self._epoch, lambda: self.stale, on_epoch, label, "mean val top-1")

    def _epoch(self, epoch: int) -> dict[str, Any]:
        started = time.perf_counter()
        losses, right, seen = 0.0, 0, 0
        for loss, correct, images in self.tasks.steps(epoch):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            losses, right, seen = losses + loss.item() * images, right + correct, seen + images
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
            if self.save:
                self._save_checkpoint(epoch=epoch, val_top1=val_top1)
        else:
            self.stale += 1
        if self.save:
            self._save_state()
        return record

    def _save_checkpoint(self, **extra: Any) -> None:
        tasks = {name: list(dataset.classes) for name, dataset in self.datasets.items()}
        heads = {name: "prototype" if name in self._prototypes else "linear" for name in tasks}
        save_checkpoint(self.run_dir / CHECKPOINT, self.built, task_labels(tasks), tasks=tasks, task_heads=heads, **extra)

    @property
    def _prototypes(self) -> dict[str, dict[str, Any]]:
        """The prototype tasks' records (how their heads were made)."""
        return getattr(self.tasks, "prototypes", {})

    def _val(self) -> dict[str, dict[str, Any]]:
        """Each task's validation logits (its own columns), top-1 and loss."""
        measured = {}
        for index, name in enumerate(self.names):
            logits, labels = self.tasks.val(index)
            measured[name] = {
                "logits": logits,
                "labels": labels,
                "top1": topk_accuracy(logits.numpy(), labels.numpy(), 1),
                "loss": float(nn.functional.cross_entropy(logits, labels)),
            }
        return measured

    def _save_state(self) -> None:
        state = {
            "model": self.built.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "probe": self.probe,
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
        default_form(self.built.module)  # trained in channels-last (and bf16 with FP32 depthwise) on a CPU: as built again
        self.built.module.load_state_dict(safe_load(self.run_dir / CHECKPOINT)["state_dict"])
        val = self._val()
        tasks = {name: self._task_metrics(index, name, val[name]) for index, name in enumerate(self.names)}
        first = tasks[self.names[0]]
        metrics = {
            "arch": self.config.arch,
            "weights": self.config.weights,
            "mode": self.config.mode.value if self.config.mode else None,
            "image_size": self.config.image_size,
            "classes": task_labels({name: t["classes"] for name, t in tasks.items()}),
            "tasks": tasks,
            "chosen_on": CHOSEN_ON,
            "weighting": self.tasks.weighting,
            "probe": self.probe,
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
            "timing": self._timing(total_s),
            "frozen_pass": self.tasks.frozen_record(),
            "precision": precision_for(self.tasks.device, self.tasks.amp),
        }
        if self.dist.main:
            write_json(self.run_dir / METRICS, metrics)
            plot_training(metrics, self.run_dir / CURVES)
        return metrics

    def _timing(self, total_s: float) -> dict[str, Any]:
        return {
            "features_s": self.tasks.features_s + (self.probe or {}).get("seconds", 0.0),
            "epochs_s": sum(r["seconds"] for r in self.history),
            "total_s": total_s,
            "torch_threads": torch.get_num_threads(),
        }

    def _task_metrics(self, index: int, name: str, val: dict[str, Any]) -> dict[str, Any]:
        dataset = self.datasets[name]
        logits, labels = val["logits"].numpy(), val["labels"].numpy()
        test = None
        if dataset.test:
            test_labels = np.array([sample.label for sample in dataset.test])
            right = int((self.tasks.test_logits(index, dataset.test).numpy().argmax(1) == test_labels).sum())
            test = {"images": len(test_labels), "top1": right / len(test_labels), "interval": wilson_interval(right, len(test_labels))}
        return {
            "classes": list(dataset.classes),
            "head": "prototype" if name in self._prototypes else "linear",
            "prototype": self._prototypes.get(name),
            "train_images": len(dataset.train),
            "val_images": len(dataset.val),
            "val_top1": val["top1"],
            "val_top5": topk_accuracy(logits, labels, 5),
            "confusion_matrix": confusion_matrix(logits.argmax(1), labels, len(dataset.classes)).tolist(),
            "test": test,
        }
