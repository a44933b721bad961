"""``edgetransfer info RUN``: a run on one screen. What it is (model, mode, size, state), its data
and splits, its accuracy with the image counts, and every artifact with its kind, size and state
(its file checked against the manifest's sha256), a variant's accuracy against the float model
and, for INT8 on ONNX Runtime, the share of multiply-accumulates in integer kernels.
``info RUN --json`` prints the manifest itself."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from .errors import RunError
from .results import Parity, VariantReport
from .rundir import RunDir
from .runtime.files import read_json, sha256_file
from .runtime.text import printable

__all__ = ["run_summary"]


def run_summary(run: RunDir) -> Group:
    """The run's summary as rich renderables (every value from a file is made printable).

    Raises:
        RunError: no manifest, or one this version cannot read.
    """
    manifest = run.manifest()
    metrics = _optional_json(run, RunDir.METRICS)
    return Group(_about(run, manifest.data, metrics), Text(""), _artifacts(run, manifest.artifacts))


def _optional_json(run: RunDir, name: str) -> dict[str, Any]:
    path = run / name
    if not path.is_file():
        return {}
    try:
        data = read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunError(f"{path} is not valid JSON (truncated or edited?): {exc}; restore it, or run the run again") from exc
    return data if isinstance(data, dict) else {}


def _about(run: RunDir, manifest: dict[str, Any], metrics: dict[str, Any]) -> Table:
    table = Table(title=Text(f"run: {printable(run.path)}"), title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = {
        "state": f"{manifest.get('status', '?')}, created {manifest.get('created', '?')}",
        "model": _model(metrics),
        "data": _data(metrics),
        "validation top-1": _top1(metrics.get("final", {}).get("top1"), metrics.get("val_images"))
        if "final" in metrics
        else _top1(metrics.get("val_top1"), None),
        "test top-1": _top1((metrics.get("test") or {}).get("top1"), (metrics.get("test") or {}).get("images")),
    }
    tasks = metrics.get("tasks")
    if isinstance(tasks, dict) and tasks:  # a multi-task run: its validation top-1 is the tasks' mean; each task's test top-1
        rows["validation top-1"] += " (mean of the tasks')"
        del rows["test top-1"]
        for name, task in tasks.items():
            test = task.get("test") if isinstance(task, dict) else None
            head = " (prototype head)" if isinstance(task, dict) and task.get("head") == "prototype" else ""
            rows[f"task {name}"] = "test top-1 " + _top1((test or {}).get("top1"), (test or {}).get("images")) + head
    parent = manifest.get("parent")
    if isinstance(parent, dict):
        rows["parent"] = str(parent.get("run", "?"))
    for key, value in rows.items():
        table.add_row(Text(printable(key)), Text(printable(value)))
    return table


def _model(metrics: dict[str, Any]) -> str:
    if not metrics:
        return "- (no metrics.json: the run has not finished training)"
    epochs = metrics.get("epochs") or metrics.get("history") or []
    trained = f", best epoch {metrics.get('best_epoch')} of {len(epochs)}" if epochs else ""
    how = ", ".join(str(metrics[key]) for key in ("precision", "layout") if metrics.get(key))
    return f"{metrics.get('arch', '?')} ({metrics.get('mode', '?')}), {metrics.get('image_size', '?')} px{trained}" + (f"; {how}" if how else "")


def _data(metrics: dict[str, Any]) -> str:
    classes = metrics.get("classes")
    if not isinstance(classes, list):
        return "-"
    splits = ", ".join(
        f"{metrics[f'{split}_images']:,} {split}" for split in ("train", "val", "test") if isinstance(metrics.get(f"{split}_images"), int)
    )
    skipped = metrics.get("skipped_images")
    return f"{len(classes)} classes; {splits} images" + (f"; {skipped} skipped" if skipped else "")


def _top1(value: Any, images: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{100 * value:.2f}%" + (f" of {images:,} images" if isinstance(images, int) else "")


def _artifacts(run: RunDir, artifacts: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="artifacts", title_justify="left")
    for column in ("name", "kind", "path", "size", "state", "accuracy (against the float model)", "integer MACs"):
        table.add_column(column, justify="right" if column in ("size", "integer MACs") else "left")
    for name, entry in artifacts.items():
        report = _report(entry)
        cells = [name, entry.get("kind", "?"), entry.get("path", "?"), _size(entry.get("bytes")), _state(run, entry)]
        cells += [_accuracy(report, entry.get("parity")), _coverage(report)]
        table.add_row(*(Text(printable(cell)) for cell in cells))
    return table


def _report(entry: dict[str, Any]) -> VariantReport | None:
    try:
        return VariantReport.from_dict(entry["report"]) if isinstance(entry.get("report"), dict) else None
    except (KeyError, TypeError, ValueError):  # a report this version cannot read: shown as "-"
        return None


def _size(count: Any) -> str:
    if not isinstance(count, int):
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def _state(run: RunDir, entry: dict[str, Any]) -> str:
    """``ok`` when the file is there with the recorded sha256; else what is wrong with it."""
    path = run / str(entry.get("path", ""))
    if not path.is_file():
        return "missing"
    return "ok" if sha256_file(path) == entry.get("sha256") else "changed since it was recorded"


def _accuracy(report: VariantReport | None, parity: Any) -> str:
    accuracy = report.accuracy if report is not None else None
    if accuracy is not None and accuracy.top1 is not None:
        change = accuracy.top1_change_points
        interval = accuracy.change_interval
        shown = f"{100 * accuracy.top1:.2f}% of {accuracy.images} {accuracy.split or ''} images".replace("  ", " ")
        if change is not None and interval is not None:
            shown += f" ({change:+.2f} points, 95% {interval[0]:+.2f} to {interval[1]:+.2f})"
        return shown
    if accuracy is not None:
        return f"top-1 agreement {100 * accuracy.top1_agreement:.2f}% of {accuracy.images} images"
    if isinstance(parity, dict):
        try:
            return f"parity: logits within {Parity.from_dict(parity).max_abs_diff:.1e}"
        except (KeyError, TypeError, ValueError):
            return "-"
    return "-"


def _coverage(report: VariantReport | None) -> str:
    if report is None or report.coverage is None or not report.coverage.macs:
        return "-"
    return f"{100 * report.coverage.share:.1f}%"
