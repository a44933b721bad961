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
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from rich.markup import escape

from .backends import EagerRunner, Runner, SkipVariant
from .cpu import cpu_features
from .data import DataSpec, load_dataset, load_image
from .errors import DataError, OptionError, RunError, first_line, unknown_name
from .optimize import spec
from .optimize.coverage import integer_coverage, is_quantized
from .optimize.targets import spec_for_artifact
from .progress import console, progress
from .report import bench_markdown, plot_bench
from .results import (
    BenchAccuracy,
    BenchReport,
    BenchRow,
    Latency,
    Machine,
    Recommendation,
)
from .rundir import RunDir, now, versions
from .runtime.files import write_bytes, write_json
from .runtime.metadata import UINT8_NHWC
from .runtime.preprocessing import Preprocessing

__all__ = ["BenchOptions", "bench_run", "machine_fingerprint", "recommend"]


@dataclass(frozen=True)
class BenchOptions:
    """How to measure.

    Attributes:
        batch_sizes: batch sizes to time.
        threads: CPU threads for torch and ONNX Runtime (default: the machine's cores).
        auto_threads: try 1..cores per variant and keep the fastest at the first batch size.
        warmup: untimed runs before timing.
        iterations: timed runs (at least), per variant and batch size, spread over the rounds.
        min_seconds: keep timing (whole rounds) until each variant has run this long as well.
        rounds: the variants are timed in turn, ``rounds`` times over (A B C A B C ...), so that
            a machine that slows down or speeds up affects them all alike; each variant's spread
            across rounds is reported.
        max_accuracy_drop: top-1 points a recommended variant may lose against eager.
        variants: names to bench (manifest artifacts); empty: all.
        models: extra ONNX files to bench on the CPU.
        data: image folder to evaluate on (its classes must be the model's); default: the run's test split.
        eval_images: cap on evaluation images.
    """

    batch_sizes: tuple[int, ...] = (1, 8)
    threads: int | None = None
    auto_threads: bool = False
    warmup: int = 5
    iterations: int = 30
    min_seconds: float = 0.0
    rounds: int = 5
    max_accuracy_drop: float = 1.0
    variants: tuple[str, ...] = ()
    models: tuple[Path, ...] = ()
    data: Path | None = None
    eval_images: int | None = None

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise OptionError(f"batch sizes must be at least 1, got {list(self.batch_sizes)}")
        if self.threads is not None and self.threads < 1:
            raise OptionError(f"threads must be at least 1, got {self.threads}")
        if self.iterations < 1 or self.warmup < 0:
            raise OptionError("iterations must be at least 1 and warm-up 0 or more")
        if self.rounds < 1:
            raise OptionError(f"rounds must be at least 1, got {self.rounds}")
        if self.eval_images is not None and self.eval_images < 1:
            raise OptionError(f"eval images must be at least 1, got {self.eval_images}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["batch_sizes"] = list(self.batch_sizes)
        data["variants"] = list(self.variants)
        data["models"] = [str(m) for m in self.models]
        data["data"] = str(self.data) if self.data else None
        return data


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

    def inputs(self, input_format: str) -> np.ndarray:
        """All evaluation images, prepared once per input format (outside any timed region)."""
        if input_format not in self.cache:
            pixels = [np.asarray(self.pre.resize_crop(img), dtype=np.uint8) for img in self.images]
            self.cache[input_format] = np.stack(pixels if input_format == UINT8_NHWC else [self.pre.normalize(p) for p in pixels])
        return self.cache[input_format]


def machine_fingerprint(threads: int) -> Machine:
    """CPU model and int8 features, cores, memory, OS, library versions, providers, GPU."""

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else None
    found_versions = versions()
    try:
        import tensorrt  # optional heavy dependency (the tensorrt extra): its version, when installed

        found_versions["tensorrt"] = tensorrt.__version__
    except ImportError:
        pass
    gpu = None
    if torch.cuda.is_available():
        gpu = {"name": torch.cuda.get_device_name(0), "cuda": torch.version.cuda, "driver": _nvidia_driver()}
    return Machine(cpu_features(), os.cpu_count(), round(memory, 1) if memory else None, platform.platform(), found_versions,
                   ort.get_available_providers(), threads, False, gpu)


def _nvidia_driver() -> str | None:
    try:
        return Path("/proc/driver/nvidia/version").read_text().split("Kernel Module")[1].split()[0]
    except (OSError, IndexError):
        return None


def _rss_mb() -> float:
    """Resident memory of this process now (Linux), in MiB."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource  # POSIX only: imported where it is used

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss_mb() -> float:
    """The process's peak resident memory so far (it only grows), in MiB."""
    import resource  # POSIX only: imported where it is used

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _gpu_memory_reset():
    """torch.cuda with its peak counter reset, or None without a GPU. It sees the memory torch
    allocates (eager, TensorRT I/O), not ONNX Runtime's own CUDA arena."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda


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
    return found


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
                found.append(_Variant(f"{child.name}/{name}", path, child_entry["kind"], target.runner, target.files(path),
                                      from_manifest=False, verify=check))
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
    built, payload = run.load_checkpoint()
    data = _evaluation_data(run, options, payload["classes"], built.preprocessing)
    threads = options.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    report = BenchReport(now(), str(run), options.to_dict(), machine_fingerprint(threads), int(len(data.labels)), run.checkpoint_sha256(),
                         eval_split=data.split)
    variants = _variants(run, options)
    eager_logits: dict[str, np.ndarray] = {}
    with progress() as bar, contextlib.ExitStack() as open_runners:
        task = bar.add_task("bench", total=len(variants) + len(options.batch_sizes), status="")
        timed: list[_Timed] = []
        for variant in variants:
            bar.update(task, status=f"{variant.name}: accuracy")
            row, runner = _measure(variant, data, options, threads, eager_logits, report, open_runners)
            report.results.append(row)
            if runner is not None:
                timed.append(_Timed(row, runner, data.inputs(runner.input_format)))
            _finish(report, options, out_dir, final=False)
            bar.advance(task)
        for batch in options.batch_sizes:
            bar.update(task, status=f"timing batch {batch} in {options.rounds} rounds")
            _time_in_rounds(timed, batch, options)
            bar.advance(task)
    for row in report.results:
        _speedups(row, report)
    _finish(report, options, out_dir, final=True)
    _record(run, out_dir)
    return report


@dataclass
class _Timed:
    row: BenchRow
    runner: Runner
    inputs: np.ndarray


def _record(run: RunDir, out_dir: Path) -> None:
    """bench.json in the manifest, its parents every model it measured (when written into the run)."""
    if out_dir.resolve() != run.path.resolve():
        return
    manifest = run.manifest()
    parents = ["checkpoint"] + [name for name, entry in manifest.artifacts.items() if entry["kind"] in ("onnx", "openvino", "engine")]
    manifest.record("bench", run.BENCH_JSON, "bench-report", parent=parents)
    manifest.save()


def _measure(variant: _Variant, data: _Data, options: BenchOptions, threads: int, eager: dict, report: BenchReport,
             open_runners: contextlib.ExitStack) -> tuple[BenchRow, Runner | None]:
    """Open the variant, check it and measure its accuracy and memory; the runner stays open (in
    ``open_runners``) for the timing rounds. ``None`` for a variant skipped or failed."""
    row = BenchRow(variant.name, str(variant.path), variant.kind, variant.size_bytes())
    timed = variant.kind != "engine" and options.auto_threads
    row.threads = _choose_threads(variant, data, options, threads) if timed else threads
    rss_before = _rss_mb()
    gpu = _gpu_memory_reset()
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
        logits = _logits(runner, inputs, max(options.batch_sizes))
        row.accuracy = BenchAccuracy.measure(logits, data.labels, eager.get("logits"))
        if variant.name == "eager":
            eager["logits"] = logits
        row.rss_mb = round(_rss_mb(), 1)
        row.rss_increase_mb = round(row.rss_mb - rss_before, 1)
        row.process_peak_rss_mb = round(_peak_rss_mb(), 1)
        if gpu:
            row.gpu_peak_torch_mb = round(gpu.max_memory_allocated() / 2**20, 1)
    except SkipVariant as exc:
        row.status, row.reason, runner = "skipped", str(exc), None
    except Exception as exc:  # one broken variant never stops the rest; its error is reported
        row.status, row.reason, runner = "failed", f"{type(exc).__name__}: {first_line(exc)}", None
    return row, runner


def _time_in_rounds(timed: list[_Timed], batch: int, options: BenchOptions) -> None:
    """Time every open variant at ``batch``, in turn, round after round, on batches cut from the
    inputs in advance (nothing else is timed); a variant that fails while timed is marked failed."""
    per_round = -(-options.iterations // options.rounds)
    pools = {id(t): _batches(t.inputs, batch) for t in timed}
    rounds: dict[int, list[list[float]]] = {id(t): [] for t in timed}
    spent: dict[int, float] = {id(t): 0.0 for t in timed}

    def live() -> list[_Timed]:
        return [t for t in timed if t.row.measured]

    for t in live():
        _guarded(t, lambda t=t: [t.runner.infer(pools[id(t)][i % len(pools[id(t)])]) for i in range(options.warmup)])
    done = 0
    while live() and (done < options.rounds or min(spent[id(t)] for t in live()) < options.min_seconds):
        for t in live():
            if t.row.kind == "torch-checkpoint" and t.row.threads:
                torch.set_num_threads(t.row.threads)  # torch's pool is the process's: each eager row gets its own setting
            times = _guarded(t, lambda t=t: _timed_runs(t.runner, pools[id(t)], per_round, len(rounds[id(t)]) * per_round))
            if times:
                rounds[id(t)].append(times)
                spent[id(t)] += sum(times)
        done += 1
    for t in live():
        t.row.latency[str(batch)] = Latency.from_times(batch, [x for r in rounds[id(t)] for x in r], rounds[id(t)])


def _guarded(t: _Timed, work: Callable[[], Any]) -> Any:
    try:
        return work()
    except Exception as exc:  # a variant that breaks while timed is reported, the others go on
        t.row.status, t.row.reason = "failed", f"{type(exc).__name__}: {first_line(exc)}"
        return None


def _batches(inputs: np.ndarray, batch: int) -> list[np.ndarray]:
    reps = -(-batch // len(inputs))
    pool = np.concatenate([inputs] * reps) if reps > 1 else inputs
    return [np.ascontiguousarray(pool[i : i + batch]) for i in range(0, len(pool) - batch + 1, batch)][:16]


def _timed_runs(runner: Runner, batches: list[np.ndarray], count: int, start: int) -> list[float]:
    times = []
    for i in range(start, start + count):
        chunk = batches[i % len(batches)]
        t0 = time.perf_counter()
        runner.infer(chunk)
        times.append(time.perf_counter() - t0)
    return times


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
                quick = _time(runner, inputs, options.batch_sizes[0], BenchOptions(warmup=2, iterations=10))
            if quick.p50_ms < best_ms:
                best, best_ms = count, quick.p50_ms
        except SkipVariant:
            return cores

    torch.set_num_threads(best)
    return best


def _logits(runner: Runner, inputs: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([runner.infer(inputs[i : i + batch]) for i in range(0, len(inputs), batch)])


def _time(runner: Runner, inputs: np.ndarray, batch: int, options: BenchOptions) -> Latency:
    """Latency of one ``runner`` alone (the thread-count probe); benches time in rounds instead."""
    batches = _batches(inputs, batch)
    for i in range(options.warmup):
        runner.infer(batches[i % len(batches)])
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < options.iterations or time.perf_counter() - started < options.min_seconds:
        times += _timed_runs(runner, batches, 1, len(times))
    return Latency.from_times(batch, times)


def _speedups(row: BenchRow, report: BenchReport) -> None:
    baseline = row if row.variant == "eager" else report.row("eager")
    if not row.measured or baseline is None or not baseline.measured:
        return
    row.speedup_vs_eager = {b: round(baseline.latency[b].mean_ms / t.mean_ms, 3) for b, t in row.latency.items()}


def recommend(report: BenchReport, budget: float) -> Recommendation | None:
    """The fastest measured variant (mean latency at the first batch size) within ``budget`` of eager."""
    first = str(report.batch_sizes[0])
    candidates = [
        r for r in report.results
        if r.measured and r.variant != "eager" and first in r.latency and r.accuracy is not None
        and -(r.accuracy.top1_change_points or 0.0) <= budget
    ]
    if not candidates:
        return None
    best = min(candidates, key=lambda r: r.latency[first].mean_ms)
    return Recommendation(best.variant, int(first), best.latency[first].mean_ms, best.speedup_vs_eager.get(first),
                          best.accuracy.top1_change_points or 0.0, budget, best.accuracy.top1_change_interval,
                          report.eval_images, report.eval_split)


def _finish(report: BenchReport, options: BenchOptions, out_dir: Path, final: bool) -> None:
    report.complete = final
    report.recommendation = recommend(report, options.max_accuracy_drop)
    write_json(out_dir / RunDir.BENCH_JSON, report.to_dict())
    if final:
        text = bench_markdown(report)
        write_bytes(out_dir / RunDir.BENCH_MD, lambda f: f.write(text.encode("utf-8")))
        plot_bench(report, out_dir / RunDir.BENCH_PNG)
