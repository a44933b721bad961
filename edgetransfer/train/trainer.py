"""The epoch loop: training steps (with AMP on CUDA and DANN's domain loss), validation, the best
checkpoint, the resume state after every epoch, and the final metrics."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapt import dann_lr_factor, summary
from ..checkpoint import save_checkpoint
from ..config import AdaptMethod, FinetuneConfig, OptimizerName
from ..data import Dataset
from ..distributed import SINGLE, Context
from ..metrics import confusion_matrix, per_class_accuracy, topk_accuracy
from ..models import BuiltModel
from ..plots import plot_training
from ..progress import console, progress
from ..rundir import RunDir
from ..runtime.files import write_bytes, write_json
from ..safeload import safe_load
from ..training import cosine_with_warmup, seed_stage
from .adaptation import Adaptation
from .allocator import kept_blocks
from .loops import autocast_for, default_form, precision_for

__all__ = ["Trainer", "EpochCallback", "make_optimizer", "epoch_loop"]

CHECKPOINT, LAST, METRICS, CURVES = RunDir.CHECKPOINT, RunDir.LAST, RunDir.METRICS, RunDir.CURVES
EpochCallback = Callable[[dict[str, Any]], None]


class Trainer:
    def __init__(
        self,
        config: FinetuneConfig,
        built: BuiltModel,
        loop,
        run_dir: Path,
        classes: list[str],
        dist: Context = SINGLE,
        adaptation: Adaptation | None = None,
    ) -> None:
        self.config, self.built, self.loop, self.run_dir, self.classes = config, built, loop, run_dir, classes
        self.dist = dist
        self.adaptation = adaptation
        self.dann = adaptation is not None and adaptation.discriminator is not None
        assert config.lr is not None and config.epochs is not None and config.warmup_epochs is not None, "a resolved FinetuneConfig"
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        groups = loop.param_groups(config.lr) + (adaptation.parameter_groups(config.lr) if adaptation else [])
        self.optimizer = make_optimizer(config, groups)
        self.epochs = config.epochs
        self.total_steps = max(1, config.epochs * loop.steps_per_epoch)
        if self.dann:  # the paper's annealing, not cosine: its reversal schedule is tuned with it
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: dann_lr_factor(step / self.total_steps))
        else:
            self.scheduler = cosine_with_warmup(self.optimizer, config.epochs, config.warmup_epochs, loop.steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.amp and loop.device.type == "cuda")
        # bf16 pays in convolutions; a head on cached features is one small matrix product, kept in FP32 on a CPU
        self.amp = config.amp and not (config.caches_features and loop.device.type == "cpu")
        self.history: list[dict[str, Any]] = []
        self.best_top1, self.best_epoch, self.stale = -1.0, 0, 0
        self.probe: dict[str, Any] | None = None
        self.allocator: dict[str, Any] | None = None  # what the training steps' C allocator kept (see allocator.py)

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
        with kept_blocks() as allocator:
            self.allocator = allocator.record
            epoch_loop(self.config, len(self.history) + 1, self._epoch, lambda: self.stale, on_epoch)

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
            with autocast_for(self.loop.device, self.amp):
                if self.dann:
                    assert self.adaptation is not None
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
        summed_loss, right, count = self.dist.sum(total_loss, correct, seen)
        return summed_loss / count, right / count

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
        default_form(self.built.module)  # trained in channels-last (and bf16 with FP32 depthwise) on a CPU: as built again
        self.built.module.load_state_dict(best["state_dict"])
        adapted = self._adapt_batchnorm(dataset) if self.adaptation is not None and not self.dann else {}
        logits, labels = self.loop.val_logits()
        logits_np, labels_np = logits.numpy(), labels.numpy()
        matrix = confusion_matrix(logits_np.argmax(1), labels_np, len(self.classes))
        metrics = {
            "arch": self.config.arch,
            "weights": self.config.weights,
            "mode": self.config.mode.value if self.config.mode else None,
            "image_size": self.config.image_size,
            "classes": self.classes,
            "train_images": len(dataset.train),
            "val_images": len(dataset.val),
            "test_images": len(dataset.test),
            "skipped_images": len(dataset.skipped),
            "epochs": self.history,
            "best_epoch": self.best_epoch,
            "stopped_early": len(self.history) < self.epochs,
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
            **self._computed_how(),
        }
        if self.dist.main:
            write_json(self.run_dir / METRICS, metrics)
            plot_training(metrics, self.run_dir / CURVES)
        return metrics

    def _computed_how(self) -> dict[str, Any]:
        """How the run computed: the frozen pass, training's precision and layout, evaluation's
        precision, the allocator."""
        return {
            "frozen_pass": self.loop.frozen_record(),
            "precision": precision_for(self.loop.device, self.amp),
            "layout": self.loop.layout,
            "depthwise_fp32": getattr(self.loop, "depthwise_fp32", False),
            "evaluated_in": precision_for(self.loop.device, getattr(self.loop, "evaluate_amp", self.amp)),
            "allocator": self.allocator,
        }

    def _target_top1(self) -> float | None:
        samples = self.adaptation.eval if self.adaptation is not None else []
        if not samples or self.adaptation is None:
            return None
        return topk_accuracy(self.loop.logits_of(samples).numpy(), self.adaptation.eval_labels.numpy(), 1)

    def _adapt_batchnorm(self, dataset: Dataset) -> dict[str, Any]:
        """AdaBN on the chosen checkpoint, which is written again with the target's statistics.
        Recomputed from the checkpoint each time, so a resumed run repeats it exactly."""
        assert self.adaptation is not None
        before = self._target_top1()
        layers, seconds = self.adaptation.adapt_batchnorm()
        self.loop.backbone_changed(dataset)
        if self.dist.main:
            save_checkpoint(self.run_dir / CHECKPOINT, self.built, self.classes, epoch=self.best_epoch, adapted=AdaptMethod.ADABN.value)
        return {"target_top1_before": before, "batchnorm_layers": layers, "seconds": seconds}

    def _adapt_summary(self, adapted: dict[str, Any]) -> dict[str, Any] | None:
        if self.adaptation is None or self.config.adapt_method is None:
            return None

        return summary(
            self.config.adapt_method,
            self.adaptation.target,
            len(self.adaptation.eval),
            target=self.config.adapt,
            target_top1=self._target_top1(),
            **adapted,
        )

    def _test(self, dataset: Dataset) -> dict[str, Any] | None:
        """The chosen checkpoint's top-1 on the test split, measured once, after every choice."""
        if not dataset.test:
            return None
        labels = torch.tensor([sample.label for sample in dataset.test])
        right = int((self.loop.test_logits(dataset.test).argmax(1) == labels).sum())
        return {"images": len(dataset.test), "top1": right / len(dataset.test)}


def epoch_loop(
    config: FinetuneConfig,
    first: int,
    one_epoch: Callable[[int], dict[str, Any]],
    stale: Callable[[], int],
    on_epoch: EpochCallback | None,
    label: str = "epochs",
    measure: str = "val top-1",
) -> None:
    """Epochs ``first`` to ``config.epochs`` with a progress bar, each record passed to
    ``on_epoch``, stopping early after ``config.patience`` epochs without a better ``measure``."""
    assert config.epochs is not None, "a resolved FinetuneConfig"
    with progress() as bar:
        task = bar.add_task(label, total=config.epochs, completed=first - 1, status="")
        for epoch in range(first, config.epochs + 1):
            record = one_epoch(epoch)
            bar.update(task, advance=1, status=f"{measure} {100 * record['val_top1']:.2f}%")
            if on_epoch is not None:
                on_epoch(record)
            if config.patience and stale() >= config.patience:
                console.print(f"early stop: no better {measure} for {stale()} epochs")
                break


def make_optimizer(config: FinetuneConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    assert config.lr is not None, "a resolved FinetuneConfig"
    if config.optimizer is OptimizerName.SGD:
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
