"""Showing results: terminal tables (rich) and PNG plots (matplotlib's Figure, headless: no pyplot)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from .benchreport import BenchReport
from .runtime.text import printable

__all__ = [
    "epochs_table",
    "finetune_summary_table",
    "parity_table",
    "predictions_table",
    "variants_table",
    "bench_table",
    "recommendation_line",
    "bench_markdown",
]


def epochs_table(history: list[dict[str, Any]], last: int = 12) -> Table:
    """Per-epoch loss, accuracy and time (the last ``last`` epochs)."""
    shown = f"last {last} of {len(history)} epochs" if len(history) > last else f"{len(history)} epochs"
    table = Table(title=f"training ({shown})", title_justify="left")
    domain = any("domain_top1" in row for row in history)
    target = any(row.get("target_top1") is not None for row in history)
    columns = ["epoch", "lr", "train loss", "train top-1", "val loss", "val top-1"]
    columns += ["domain top-1"] * domain + ["target top-1"] * target + ["seconds"]
    for column in columns:
        table.add_column(column, justify="right")
    for row in history[-last:]:
        cells = [
            str(row["epoch"]),
            f"{row['lr']:.2e}",
            f"{row['train_loss']:.4f}",
            f"{100 * row['train_top1']:.2f}%",
            f"{row['val_loss']:.4f}",
            f"{100 * row['val_top1']:.2f}%",
        ]
        if domain:
            cells.append(f"{100 * row.get('domain_top1', float('nan')):.1f}%")
        if target:
            cells.append(f"{100 * row['target_top1']:.2f}%" if row.get("target_top1") is not None else "-")
        table.add_row(*cells, f"{row['seconds']:.1f}")
    return table


def finetune_summary_table(metrics: dict[str, Any], run_dir: Path) -> Table:
    """The outcome of a fine-tuning run in a few rows."""
    final, timing = metrics["final"], metrics["timing"]
    table = Table(title=Text(f"result: {run_dir}"), title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", Text(f"{metrics['arch']} ({metrics['mode']}), {metrics['image_size']} px"))
    table.add_row(
        "data",
        f"{metrics['train_images']} train / {metrics['val_images']} val / {metrics.get('test_images', 0)} test, {len(metrics['classes'])} classes",
    )
    proto = metrics.get("prototype")
    if proto:
        shots = sorted(set(proto["shots_per_class"]))
        per_class = f"{shots[0]}" if len(shots) == 1 else f"{shots[0]} to {shots[-1]}"
        table.add_row(
            "head",
            f"prototypes of {per_class} images per class, {'whitened' if proto['whitened'] else 'not whitened'},"
            f" scale {proto['scale']:.1f}; no training",
        )
    else:
        table.add_row("best epoch", f"{metrics['best_epoch']} of {len(metrics['epochs'])}")
    if metrics.get("tasks"):
        _task_rows(table, metrics["tasks"])
    table.add_row("val top-1", f"{100 * final['top1']:.2f}%" + (" (mean of the tasks; chose the epoch)" if metrics.get("tasks") else ""))
    test = metrics.get("test")
    if test:
        table.add_row("test top-1", f"{100 * test['top1']:.2f}% of {test['images']} images no stage chose on")
    table.add_row("val top-5", f"{100 * final['top5']:.2f}%")
    adapt = metrics.get("adapt")
    if adapt:
        table.add_row("adapted", Text(f"{adapt['method']} to {adapt['target_images']} unlabelled images of {adapt['target']}"))
        if adapt.get("target_top1") is not None:
            before = adapt.get("target_top1_before")
            was = f" (before adabn {100 * before:.2f}%)" if before is not None else ""
            table.add_row(
                "target top-1",
                f"{100 * adapt['target_top1']:.2f}% of {adapt['eval_images']} labelled target images{was};"
                " reported only, the checkpoint is chosen on source val",
            )
    spent = f"prototypes {proto['seconds']:.2f} s" if proto else f"epochs {timing['epochs_s']:.1f} s"
    table.add_row("time", f"{timing['total_s']:.1f} s (features {timing['features_s']:.1f} s, {spent})")
    return table


def _task_rows(table: Table, tasks: dict[str, Any]) -> None:
    """One row per task of a multi-task run: its classes, val and test top-1 (with the interval)."""
    for name, task in tasks.items():
        test = task["test"]
        tested = f"; test {100 * test['top1']:.2f}% of {test['images']} [{test['interval'][0]:.1f}, {test['interval'][1]:.1f}]" if test else ""
        head = ", prototype head (no training)" if task.get("head") == "prototype" else ""
        table.add_row(
            Text(f"task {name}"), Text(f"{len(task['classes'])} classes{head}, val {100 * task['val_top1']:.2f}% of {task['val_images']}{tested}")
        )


def qat_summary_table(metrics: dict[str, Any], run_dir: Path) -> Table:
    """The outcome of a QAT run beside its parent's float model."""
    qat, parent = metrics["qat"], metrics.get("float") or {}
    table = Table(title=Text(f"QAT result: {run_dir}"), title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()

    def pct(value) -> str:
        return "-" if value is None else f"{100 * value:.2f}%"

    table.add_row("parent", Text(qat["parent"]))
    table.add_row("scheme", Text(f"{qat['scheme']['weights']}; {qat['scheme']['activations']} ({qat['options']['target']})"))
    table.add_row("layers", f"{qat['layers']} quantised, none in float; {metrics['folded_batchnorm']} BatchNorm folded")
    history = metrics["history"]
    table.add_row(
        "val top-1",
        f"{pct(metrics['val_top1'])} quantised (epoch {metrics['best_epoch']} of {len(history) - 1};"
        f" calibrated only: {pct(history[0]['val_top1'])}); float {pct(parent.get('val_top1'))}",
    )
    if metrics.get("test_top1") is not None:
        table.add_row(
            "test top-1",
            f"{pct(metrics['test_top1'])} quantised, float {pct(parent.get('test_top1'))}, on {metrics['test_images']} images no stage chose on",
        )
    table.add_row("time", f"{metrics['seconds']:.1f} s")
    return table


def parity_table(result) -> Table:
    """Where an export went and how closely ONNX Runtime matched PyTorch."""
    table = Table(title=Text(f"exported: {result.path}"), title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    tasks = result.info.tasks
    classes = f"{len(result.info.labels)} classes"
    if tasks:
        classes = "tasks " + ", ".join(f"{name} ({len(labels)} classes)" for name, labels in zip(tasks.names, tasks.labels, strict=True))
    table.add_row("model", Text(f"{result.info.arch}, {classes}, input {result.info.input_format}"))
    pre = result.info.preprocessing
    table.add_row(
        "preprocessing",
        f"resize {pre.resize_size} ({pre.interpolation.value}), crop {pre.input_size}, mean {_short(pre.mean)}, std {_short(pre.std)}",
    )
    if result.parity:
        p = result.parity
        table.add_row(
            "parity",
            f"max |logit diff| {p.max_abs_diff:.2e}, relative {p.max_rel_diff:.2e} (atol {p.atol:g},"
            f" rtol {p.rtol:g}), top-1 agreement {100 * p.top1_agreement:.1f}%"
            + (f" (the worst task's; every output checked: {', '.join(p.outputs)})" if p.outputs else ""),
        )
        table.add_row("checked on", f"{p.images} validation images, batches of {p.batch_size}, {p.provider}")
    else:
        table.add_row("parity", "not checked (--no-verify)")
    table.add_row("time", f"{result.seconds:.1f} s")
    return table


def predictions_table(images, results, provider: str) -> Table:
    """Top-k labels per image (a multi-task model's: one column per task)."""
    table = Table(title=Text(f"predictions ({provider})"), title_justify="left")
    tasks = list(results[0]) if results and isinstance(results[0], dict) else [None]
    table.add_column("image")
    table.add_column("rank", justify="right")
    for task in tasks:
        table.add_column(Text(printable(task)) if task else "label")
        table.add_column("probability", justify="right")
    for image, answer in zip(images, results, strict=True):
        ranked = [answer[task] for task in tasks] if tasks != [None] else [answer]
        for rank in range(max(map(len, ranked))):
            # paths and labels are shown as they are, never read as markup; control characters escaped
            cells: list = [Text(printable(image)) if rank == 0 else "", str(rank + 1)]
            for predictions in ranked:
                found = predictions[rank] if rank < len(predictions) else None
                cells += [Text(printable(found.label)), f"{found.probability:.4f}"] if found else ["", ""]
            table.add_row(*cells)
    return table


def _short(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


def _share(coverage) -> str:
    """A model's integer coverage as a cell: ``"100.0%"``, or "—" where it was not measured."""
    return "—" if coverage is None else f"{100 * coverage.share:.1f}%"


def _variant_tasks(per_task: dict | None) -> str:
    """A multi-task variant's top-1 change of each task against float, in points."""
    if not per_task:
        return ""
    return " (" + ", ".join(f"{name} {100 * (t['top1'] - t['float_top1']):+.2f}" for name, t in per_task.items()) + ")"


def variants_table(variants) -> Table:
    """Each optimised variant with its accuracy against the float model, on held-out images, with
    the 95% interval of the change (the two models ran on the same images)."""
    measured = next((v.report.accuracy for v in variants if v.report.accuracy), None)
    where = f"{measured.images} {measured.split} images" if measured else "no images"
    table = Table(title=f"variants (accuracy against the float model on {where}, CPU)", title_justify="left")
    for column in ("variant", "MB", "top-1", "Δ float", "95% interval", "agree", "float layers", "int8 MACs", "guard s", "s"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for v in variants:
        r, a = v.report, v.report.accuracy
        size = v.size_bytes / 2**20 if v.size_bytes is not None else float("nan")
        interval = a.change_interval if a else None
        guard = r.details.get("guard", {}).get("seconds")
        table.add_row(
            Text(v.name),
            f"{size:.1f}",
            (f"{100 * a.top1:.2f}%" if a and a.top1 is not None else "—") + _variant_tasks(r.details.get("per_task")),
            f"{a.top1_change_points:+.2f}" if a and a.top1_change_points is not None else "—",
            f"{interval[0]:+.2f} to {interval[1]:+.2f}" if interval else "—",
            f"{100 * a.top1_agreement:.1f}%" if a else "—",
            str(len(r.kept_in_float)) if v.precision.value == "int8" else "—",
            _share(r.coverage),
            f"{guard:.1f}" if guard is not None else "—",
            f"{r.seconds:.1f}",
        )
    return table


def _bench_rows(report: BenchReport):
    """(variant, batch, cells…) rows shared by the terminal table and the Markdown."""
    for r in report.results:
        if not r.measured:
            yield [r.variant, "—", r.status] + [""] * (len(_BENCH_COLUMNS) - 3)
            continue
        acc = r.accuracy
        interval = acc.top1_change_interval if acc else None
        for batch, t in r.latency.items():
            yield [
                r.variant,
                batch,
                (r.provider or "").replace("ExecutionProvider", ""),
                f"{t.mean_ms:.2f}",
                f"{t.p50_ms:.2f}",
                f"{t.p99_ms:.2f}",
                f"±{50 * t.spread:.0f}%" if t.spread is not None else "—",
                f"{t.throughput_ips:.0f}",
                f"{r.speedup_vs_eager.get(batch, float('nan')):.2f}×",
                f"{100 * acc.top1:.2f}%" + _per_task(acc.per_task) if acc else "— (other classes)",
                f"{acc.top1_change_points or 0.0:+.2f}" if acc else "—",
                f"{interval[0]:+.1f}…{interval[1]:+.1f}" if interval else "—",
                _share(r.coverage),
                f"{(r.size_bytes or 0) / 2**20:.1f}",
            ]


def _per_task(per_task: dict[str, dict[str, float]] | None) -> str:
    """A multi-task model's top-1 of each task, after the pooled one."""
    if not per_task:
        return ""
    return " (" + ", ".join(f"{name} {100 * task['top1']:.1f}% of {task['images']}" for name, task in per_task.items()) + ")"


_BENCH_COLUMNS = [
    "variant",
    "batch",
    "provider",
    "mean ms",
    "p50 ms",
    "p99 ms",
    "rounds",
    "img/s",
    "vs eager",
    "top-1",
    "Δ pt",
    "95% interval",
    "int8 MACs",
    "MB",
]
NOISY_BASELINE = 0.2  # eager's round medians further apart than this share of their median: its speed-ups are uncertain


def noisy_baseline(report: BenchReport) -> str | None:
    """A warning when eager's latency moved between rounds enough to make every "× eager" uncertain."""
    eager = report.row("eager")
    if eager is None or not eager.measured:
        return None
    moved = {b: t.spread for b, t in eager.latency.items() if t.spread is not None and t.spread > NOISY_BASELINE}
    if not moved:
        return None
    worst = max(moved, key=lambda batch: moved[batch])
    return (
        f"eager's latency moved by {100 * moved[worst]:.0f}% of its median between rounds at batch {worst}"
        " (another process, CPU frequency, or several thread pools in one process): its speed-ups are uncertain; compare"
        " the other variants with each other, or bench again with more --rounds"
    )


def _not_measured(report: BenchReport) -> list[str]:
    return [f"{r.variant} {r.status}: {r.reason}" for r in report.results if not r.measured]


def bench_table(report: BenchReport) -> Table:
    """The bench results in the terminal."""
    machine = report.machine
    table = Table(
        title=Text(f"bench: {machine.cpu.model}, {machine.threads} threads, {report.eval_images} {report.eval_split} images"), title_justify="left"
    )
    for column in _BENCH_COLUMNS:
        table.add_column(column, justify="left" if column in ("variant", "provider") else "right")
    for row in _bench_rows(report):
        table.add_row(*(Text(cell) for cell in row))
    table.caption = Text("\n".join(_not_measured(report) + [w for w in [noisy_baseline(report)] if w]))
    table.caption_justify = "left"
    return table


def recommendation_line(report: BenchReport) -> str:
    rec, budget = report.recommendation, report.budget
    if rec is None:
        return f"no variant is within {budget} top-1 points of eager"
    speedup = f"{rec.speedup_vs_eager:.2f}× eager" if rec.speedup_vs_eager is not None else "eager not measured"
    sure = ""
    if rec.top1_change_interval:
        low, high = rec.top1_change_interval
        sure = f", 95% interval {low:+.2f} to {high:+.2f} on {rec.eval_images} {rec.eval_split} images"
    return (
        f"recommended: {rec.variant} — {rec.mean_ms:.2f} ms at batch {rec.batch_size},"
        f" {speedup}, top-1 {rec.top1_change_points:+.2f} points{sure} (budget {budget})"
    )


def bench_markdown(report: BenchReport) -> str:
    """bench.md: the table, the recommendation and the machine, for a README or a PR."""
    machine = report.machine
    lines = [
        f"# edgetransfer bench: {Path(report.run).name}",
        "",
        recommendation_line(report),
        "",
        "| " + " | ".join(_BENCH_COLUMNS) + " |",
        "|" + "---|" * len(_BENCH_COLUMNS),
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in _bench_rows(report)]
    lines += [f"\n{line}" for line in _not_measured(report) + [w for w in [noisy_baseline(report)] if w]]
    lines += ["", "rounds: ± half the spread of the round medians (variants are timed in turn, round after round)."]
    cpu = machine.cpu
    flags = ", ".join(k for k in ("avx2", "avx512", "vnni", "amx") if getattr(cpu, k))
    lines += [
        "",
        f"Machine: {cpu.model} ({flags}), {machine.cores} cores, {machine.memory_gib} GiB, {machine.os};"
        f" {machine.threads} threads for torch and ONNX Runtime, spinning off; {report.eval_images} {report.eval_split} images"
        f"{' (no stage chose on them)' if report.eval_split == 'test' else ''};"
        f" versions: {', '.join(f'{k} {v}' for k, v in machine.versions.items() if k not in ('platform',))}.",
        "",
    ]
    return "\n".join(lines)
