"""``edgetransfer bench``: every variant of a run against eager PyTorch, same data, same run.

For each variant and batch size: status, provider really used, size, cold start, latency
(mean, p50, p90, p99, and the spread across rounds: the variants stay open and are timed in
turn, round after round) and throughput after warm-up, process memory, top-1/top-5 on the
run's test images with the change against eager and its 95% interval, agreement with eager and
the largest logit difference, and the speed-up against eager measured here with the same threads.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.markup import escape

from .backends import EagerRunner, InTurnRunner, Runner, SkipVariant
from .benchreport import BenchAccuracy, BenchReport, BenchRow, Recommendation
from .config import BenchOptions
from .data import DataSpec, load_dataset, load_image
from .errors import DataError, OptionError, RunError, first_line, unknown_name
from .export import run_onnx
from .machine import gpu_memory_reset, machine_fingerprint, peak_rss_mb, rss_mb
from .optimize import spec
from .optimize.coverage import integer_coverage, is_quantized
from .optimize.targets import spec_for_artifact
from .plots import plot_bench
from .progress import console, progress
from .report import bench_markdown
from .rundir import RunDir, now
from .runtime.files import write_bytes, write_json
from .runtime.metadata import UINT8_NHWC
from .runtime.preprocessing import Preprocessing
from .runtime.tasks import Tasks
from .taskheads import tasks_of
from .timing import Timed, batched_logits, time_alone, time_in_rounds

__all__ = ["BenchOptions", "bench_run", "machine_fingerprint", "recommend"]


@dataclass
class _Variant:
    """A model to bench: where it is and how to open a runner for it."""

    name: str
    path: Path
    kind: str  # manifest kind: torch-checkpoint | onnx | openvino | engine
    open_runner: Callable[[Path, int | None], Runner]
    files: list[Path]
    from_manifest: bool = True  # built from this run's checkpoint (checked), not a --model file
    verify: Callable[[], object] | None = None  # checks its files against the manifest's sha256

    def runner(self, threads: int | None) -> Runner:
        return self.open_runner(self.path, threads)

    def size_bytes(self) -> int | None:
        return sum(f.stat().st_size for f in self.files) if all(f.exists() for f in self.files) else None


@dataclass
class _Data:
    pre: Preprocessing
    images: list
    labels: np.ndarray
    split: str
    cache: dict[str, np.ndarray] = field(default_factory=dict)
    tasks: Tasks | None = None  # a multi-task model: each image is measured on its own task's classes

    def inputs(self, input_format: str) -> np.ndarray:
        """All evaluation images, prepared once per input format (outside any timed region)."""
        if input_format not in self.cache:
            pixels = [np.asarray(self.pre.resize_crop(img), dtype=np.uint8) for img in self.images]
            self.cache[input_format] = np.stack(pixels if input_format == UINT8_NHWC else [self.pre.normalize(p) for p in pixels])
        return self.cache[input_format]


def _variants(run: RunDir, options: BenchOptions) -> list[_Variant]:
    """Eager, then every model the run's manifest records (its runner chosen by the target the
    manifest records for it), then the ``--model`` files."""

    found = [_Variant("eager", run.checkpoint, "torch-checkpoint", lambda path, threads: EagerRunner(path), [run.checkpoint])]
    for name, entry in run.manifest().artifacts.items():
        target = spec_for_artifact(entry)
        if target is not None:
            path = run / entry["path"]
            check = functools.partial(run.verify, name, run.rebuild_hint(name))
            found.append(_Variant(name, path, entry["kind"], target.runner, target.files(path), verify=check))
    found += _qat_variants(run)
    if options.variants:
        known = {v.name: v for v in found}
        for name in options.variants:
            if name not in known:
                raise unknown_name("variant", name, list(known))
        found = [found[0]] + [known[n] for n in options.variants if n != "eager"]
    for model in map(Path, options.models):
        target = spec("openvino" if model.suffix == ".xml" else "ort-cpu")
        found.append(_Variant(model.name, model, target.kind, target.runner, target.files(model), from_manifest=False))
    if options.replaces:
        found.append(_replaced(run, [RunDir(path) for path in options.replaces]))
    return found


def _replaced(run: RunDir, singles: list[RunDir]) -> _Variant:
    """The single-task runs a multi-task run replaces, as one variant run in turn (their models
    in the order of the tasks whose labels they output).

    Raises:
        OptionError: ``run`` has no tasks, a task without its single-task run, or models made
            for other input than the multi-task model's.
    """
    built, payload = run.load_checkpoint()
    tasks, pre = tasks_of(payload), built.preprocessing
    if tasks is None:
        raise OptionError(f"--replaces compares a multi-task run with the runs it replaces; {run} has one task")
    by_labels = {}
    for single in singles:
        built, payload = single.load_checkpoint()
        if built.preprocessing != pre:
            raise OptionError(
                f"{single} takes other input ({built.preprocessing.input_size} px, its own normalisation) than {run}; train it at the same size"
            )
        by_labels[tuple(payload["classes"])] = single
    missing = [name for name, labels in zip(tasks.names, tasks.labels, strict=True) if labels not in by_labels]
    if missing or len(singles) != len(tasks.names):
        raise OptionError(
            f"--replaces takes one single-task run per task, whose classes are the task's; none for {', '.join(missing) or 'every task'}"
        )
    models = [run_onnx(by_labels[labels]) for labels in tasks.labels]
    name = "in turn: " + " + ".join(by_labels[labels].name for labels in tasks.labels)
    return _Variant(name, models[0], "onnx", lambda path, threads: InTurnRunner(models, threads), models, from_manifest=False)


def _qat_variants(run: RunDir) -> list[_Variant]:
    """The variants of the run's QAT children (``qat-TARGET/NAME``), so that PTQ and QAT models are
    measured side by side on the same images; a child trained from an older checkpoint is left out."""
    found = []
    for entry in run.manifest().artifacts.values():
        if entry.get("kind") != "qat-run" or not isinstance(entry.get("run"), str):
            continue
        child = RunDir(run / entry["run"])
        if not child.has_manifest():
            console.print(f"[yellow]warning:[/] the QAT run {escape(str(child))} is gone; its variants are left out")
            continue
        if child.manifest().data.get("parent", {}).get("checkpoint_sha256") != run.checkpoint_sha256():
            console.print(f"[yellow]warning:[/] {escape(str(child))} was trained from another checkpoint of this run; its variants are left out")
            continue
        for name, child_entry in child.manifest().artifacts.items():
            target = spec_for_artifact(child_entry)
            if target is not None:
                path = child / child_entry["path"]
                check = functools.partial(child.verify, name, child.rebuild_hint(name))
                found.append(
                    _Variant(f"{child.name}/{name}", path, child_entry["kind"], target.runner, target.files(path), from_manifest=False, verify=check)
                )
    return found


def _evaluation_data(run: RunDir, options: BenchOptions, classes: list[str], pre: Preprocessing) -> _Data:
    if options.data is not None:
        dataset = load_dataset(DataSpec(str(options.data)))
        samples = dataset.train + dataset.val  # an evaluation folder: every image counts
        if dataset.classes != classes:
            raise DataError(f"the classes of {options.data} ({', '.join(dataset.classes[:5])}…) are not the model's ({', '.join(classes[:5])}…)")
        samples, split = (samples[: options.eval_images] if options.eval_images else samples), "folder"
    else:
        samples, split = run.held_out(options.eval_images)
    return _Data(pre, [load_image(s) for s in samples], np.array([s.label for s in samples]), split)


def bench_run(run_dir: str | Path | RunDir, options: BenchOptions = BenchOptions(), out_dir: Path | None = None) -> BenchReport:
    """Measure every variant of the run; write bench.json, bench.md and bench.png as it goes.

    Returns:
        The report (``bench.json`` is its ``to_dict()``), recorded in the run's manifest when
        written into the run.

    Raises:
        RunError: no run at ``run_dir``.
        DataError: evaluation data whose classes do not match the model.
        UnknownNameError: a variant name the run does not have.
    """
    run = RunDir(run_dir)
    run.require_checkpoint()
    with run.lock():
        return _bench(run, options, out_dir)


def _bench(run: RunDir, options: BenchOptions, out_dir: Path | None) -> BenchReport:
    run.require_complete()

    out_dir = Path(out_dir or run.path)
    if out_dir.exists() and not out_dir.is_dir():
        raise OptionError(f"--out {out_dir} is a file; bench writes bench.json, bench.md and bench.png into a folder: choose one")
    built, payload = run.load_checkpoint()
    data = _evaluation_data(run, options, payload["classes"], built.preprocessing)
    data.tasks = tasks_of(payload)
    threads = options.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    report = BenchReport(
        now(), str(run), options.to_dict(), machine_fingerprint(threads), int(len(data.labels)), run.checkpoint_sha256(), eval_split=data.split
    )
    variants = _variants(run, options)
    eager_logits: dict[str, np.ndarray] = {}
    with progress() as bar, contextlib.ExitStack() as open_runners:
        task = bar.add_task("bench", total=len(variants) + len(options.batch_sizes), status="")
        timed: list[Timed] = []
        for variant in variants:
            bar.update(task, status=f"{variant.name}: accuracy")
            row, runner = _measure(variant, data, options, threads, eager_logits, report, open_runners)
            report.results.append(row)
            if runner is not None:
                timed.append(Timed(row, runner, data.inputs(runner.input_format)))
            _finish(report, options, out_dir, final=False)
            bar.advance(task)
        for batch in options.batch_sizes:
            bar.update(task, status=f"timing batch {batch} in {options.rounds} rounds")
            time_in_rounds(timed, batch, options)
            bar.advance(task)
    for row in report.results:
        _speedups(row, report)
    _finish(report, options, out_dir, final=True)
    _record(run, out_dir)
    return report


def _record(run: RunDir, out_dir: Path) -> None:
    """bench.json in the manifest, its parents every model it measured (when written into the run)."""
    if out_dir.resolve() != run.path.resolve():
        return
    manifest = run.manifest()
    parents = ["checkpoint"] + [name for name, entry in manifest.artifacts.items() if entry["kind"] in ("onnx", "openvino", "engine")]
    manifest.record("bench", run.BENCH_JSON, "bench-report", parent=parents)
    manifest.save()


def _measure(
    variant: _Variant, data: _Data, options: BenchOptions, threads: int, eager: dict, report: BenchReport, open_runners: contextlib.ExitStack
) -> tuple[BenchRow, Runner | None]:
    """Open the variant, check it and measure its accuracy and memory; the runner stays open (in
    ``open_runners``) for the timing rounds. ``None`` for a variant skipped or failed."""
    row = BenchRow(variant.name, str(variant.path), variant.kind, variant.size_bytes())
    timed = variant.kind != "engine" and options.auto_threads
    row.threads = _choose_threads(variant, data, options, threads) if timed else threads
    rss_before = rss_mb()
    gpu = gpu_memory_reset()
    runner = None
    try:
        if variant.verify is not None:
            variant.verify()
        runner = open_runners.enter_context(variant.runner(row.threads))
        if variant.from_manifest:
            _check_checkpoint(runner, report)
        row.status, row.provider, row.cold_start_s = "measured", runner.provider, round(runner.cold_start_s, 4)
        row.backend_settings = runner.settings or None
        if variant.kind == "onnx" and runner.provider == "CPUExecutionProvider" and is_quantized(variant.path):
            row.coverage = integer_coverage(variant.path)
        inputs = data.inputs(runner.input_format)
        logits = batched_logits(runner, inputs, max(options.batch_sizes))
        reference = eager.get("logits")
        if reference is not None and logits.shape[1] != reference.shape[1]:  # a --model of other classes: timed only
            row.reason = f"latency only: it outputs {logits.shape[1]} classes, this run's model {reference.shape[1]}"
        else:
            logits = data.tasks.masked(logits, data.labels) if data.tasks is not None else logits
            row.accuracy = BenchAccuracy.measure(logits, data.labels, reference, data.tasks)
        if variant.name == "eager":
            eager["logits"] = logits
        row.rss_mb = round(rss_mb(), 1)
        row.rss_increase_mb = round(row.rss_mb - rss_before, 1)
        row.process_peak_rss_mb = round(peak_rss_mb(), 1)
        if gpu:
            row.gpu_peak_torch_mb = round(gpu.max_memory_allocated() / 2**20, 1)
    except SkipVariant as exc:
        row.status, row.reason, runner = "skipped", str(exc), None
    except Exception as exc:  # one broken variant never stops the rest; its error is reported
        row.status, row.reason, runner = "failed", f"{type(exc).__name__}: {first_line(exc)}", None
    return row, runner


def _check_checkpoint(runner: Runner, report: BenchReport) -> None:
    """A variant must come from the checkpoint eager runs (a re-trained run keeps stale files)."""
    recorded = runner.checkpoint_sha256
    if recorded and recorded != report.checkpoint_sha256:
        raise RunError(
            f"{Path(runner.source).name} was built from another checkpoint than this run's model.pt;"
            " rebuild it with edgetransfer export RUN_DIR --target … --precision …"
        )


def _choose_threads(variant: _Variant, data: _Data, options: BenchOptions, cores: int) -> int:
    best, best_ms = cores, float("inf")
    for count in range(1, (os.cpu_count() or 1) + 1):
        try:
            torch.set_num_threads(count)
            with variant.runner(count) as runner:
                inputs = data.inputs(runner.input_format)
                quick = time_alone(runner, inputs, options.batch_sizes[0], BenchOptions(warmup=2, iterations=10))
            if quick.p50_ms < best_ms:
                best, best_ms = count, quick.p50_ms
        except SkipVariant:
            return cores

    torch.set_num_threads(best)
    return best


def _speedups(row: BenchRow, report: BenchReport) -> None:
    baseline = row if row.variant == "eager" else report.row("eager")
    if not row.measured or baseline is None or not baseline.measured:
        return
    row.speedup_vs_eager = {b: round(baseline.latency[b].mean_ms / t.mean_ms, 3) for b, t in row.latency.items()}


def recommend(report: BenchReport, budget: float) -> Recommendation | None:
    """The fastest measured variant (mean latency at the first batch size) within ``budget`` of eager."""
    first = str(report.batch_sizes[0])
    candidates = [
        r
        for r in report.results
        if r.measured and r.variant != "eager" and first in r.latency and r.accuracy is not None and -(r.accuracy.top1_change_points or 0.0) <= budget
    ]
    if not candidates:
        return None
    best = min(candidates, key=lambda r: r.latency[first].mean_ms)
    accuracy = best.accuracy
    assert accuracy is not None  # the candidates have theirs
    return Recommendation(
        best.variant,
        int(first),
        best.latency[first].mean_ms,
        best.speedup_vs_eager.get(first),
        accuracy.top1_change_points or 0.0,
        budget,
        accuracy.top1_change_interval,
        report.eval_images,
        report.eval_split,
    )


def _finish(report: BenchReport, options: BenchOptions, out_dir: Path, final: bool) -> None:
    report.complete = final
    report.recommendation = recommend(report, options.max_accuracy_drop)
    write_json(out_dir / RunDir.BENCH_JSON, report.to_dict())
    if final:
        text = bench_markdown(report)
        write_bytes(out_dir / RunDir.BENCH_MD, lambda f: f.write(text.encode("utf-8")))
        plot_bench(report, out_dir / RunDir.BENCH_PNG)
