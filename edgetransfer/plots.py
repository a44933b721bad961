"""Plots people would rather look at than tables: training curves with the confusion matrix
(``curves.png``), and bench's latency against accuracy (``bench.png``). matplotlib's object API
(``Figure``), no pyplot: nothing global, safe in threads and without a display."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .benchreport import BenchReport
from .report import recommendation_line
from .runtime.files import atomic_path

__all__ = ["plot_training", "plot_bench"]


def plot_training(metrics: dict[str, Any], path: Path) -> Path:
    """Loss and top-1 per epoch, and the validation confusion matrix, as one PNG."""
    history = metrics["epochs"]
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(15, 4.4))  # no pyplot: no backend, no global state
    loss_ax, acc_ax, cm_ax = fig.subplots(1, 3)
    loss_ax.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    loss_ax.plot(epochs, [r["val_loss"] for r in history], "o-", label="val")
    loss_ax.set(title="loss", xlabel="epoch")
    acc_ax.plot(epochs, [100 * r["train_top1"] for r in history], "o-", label="train")
    acc_ax.plot(epochs, [100 * r["val_top1"] for r in history], "o-", label="val (mean of the tasks)" if "tasks" in metrics else "val")
    for task in metrics.get("tasks", {}):
        acc_ax.plot(epochs, [100 * r["tasks"][task]["val_top1"] for r in history], ".--", label=f"val: {task}")
    if any(r.get("target_top1") is not None for r in history):
        acc_ax.plot(
            epochs,
            [100 * r["target_top1"] if r.get("target_top1") is not None else float("nan") for r in history],
            "o-",
            label="target (reported, not chosen on)",
        )
    if any("domain_top1" in r for r in history):
        acc_ax.plot(epochs, [100 * r.get("domain_top1", float("nan")) for r in history], "--", label="domain classifier")
    acc_ax.axvline(metrics["best_epoch"], color="grey", linestyle=":", label="best")
    acc_ax.set(title="top-1 (%)", xlabel="epoch")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    shown = metrics["final"].get("confusion_of")  # a multi-task run: its first task's
    _confusion(cm_ax, metrics["final"]["confusion_matrix"], metrics["tasks"][shown]["classes"] if shown else metrics["classes"])
    if shown:
        cm_ax.set_title(f"val confusion of task {shown} (rows: true)")
    fig.suptitle(f"{metrics['arch']} ({metrics['mode']}), val top-1 {100 * metrics['final']['top1']:.2f}%")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def _confusion(ax, matrix: list[list[int]], classes: list[str]) -> None:
    ax.imshow(matrix, cmap="Blues")
    ax.set(title="val confusion (rows: true)", xlabel="predicted", ylabel="true")
    if len(classes) <= 20:
        ticks = range(len(classes))
        ax.set_xticks(ticks, classes, rotation=90 if max(map(len, classes)) > 3 else 0)
        ax.set_yticks(ticks, classes)
        darkest = max(max(row) for row in matrix) or 1
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                if count:
                    colour = "white" if count > darkest / 2 else "black"
                    ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color=colour)


def plot_bench(report: BenchReport, path: Path) -> Path | None:
    """bench.png: top-1 against latency per variant, and the speed-up against eager."""
    measured = [r for r in report.results if r.measured]
    if not measured:
        return None
    batches = [str(b) for b in report.batch_sizes]
    fig = Figure(figsize=(13, 4.6))
    scatter, bars = fig.subplots(1, 2)
    for r in measured:
        x, y = r.latency[batches[0]].mean_ms, 100 * (r.accuracy.top1 if r.accuracy else float("nan"))
        scatter.scatter(x, y, s=60)
        scatter.annotate(r.variant, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    scatter.set(title=f"top-1 against latency (batch {batches[0]})", xlabel="mean latency (ms)", ylabel="top-1 (%)")
    scatter.grid(alpha=0.3)
    names = [r.variant for r in measured]
    width = 0.8 / len(batches)
    for i, batch in enumerate(batches):
        values = [r.speedup_vs_eager.get(batch, 0) for r in measured]
        bars.bar([j + i * width for j in range(len(names))], values, width, label=f"batch {batch}")
    bars.axhline(1.0, color="grey", linestyle=":")
    bars.set_xticks([j + width * (len(batches) - 1) / 2 for j in range(len(names))], names, rotation=30, ha="right")
    bars.set(title="speed-up against eager PyTorch", ylabel="×")
    bars.legend()
    fig.suptitle(recommendation_line(report), fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path
