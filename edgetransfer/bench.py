"""``edgetransfer bench``: every variant of a run against eager PyTorch, same data, same run.

For each variant and batch size: status, provider really used, size, cold start, latency
(mean, p50, p90, p99) and throughput after warm-up, process memory, top-1/top-5 on the
validation data with the change against eager, agreement with eager and the largest logit
difference, and the speed-up against eager measured here with the same threads.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._io import read_json, sha256_file, write_bytes, write_json
from .backends import EagerRunner, OpenVinoRunner, OrtRunner, Runner, SkipVariant, TensorRTRunner
from .data import DataSpec, load_dataset, load_image
from .errors import DataError, EdgeTransferError, RunError, unknown_name
from .manifest import Manifest, now, versions
from .metadata import UINT8_NHWC
from .metrics import topk_accuracy
from .preprocessing import Preprocessing
from .progress import progress

__all__ = ["BenchOptions", "bench_run", "machine_fingerprint", "SCHEMA"]

SCHEMA = "edgetransfer.bench/1"
PROVIDERS = {"ort-cuda": "CUDAExecutionProvider", "ort-trt": "TensorrtExecutionProvider"}


@dataclass(frozen=True)
class BenchOptions:
    """How to measure.

    Attributes:
        batch_sizes: batch sizes to time.
        threads: CPU threads for torch and ONNX Runtime (default: the machine's cores).
        auto_threads: try 1..cores per variant and keep the fastest at the first batch size.
        warmup: untimed runs before timing.
        iterations: timed runs (at least), per variant and batch size.
        min_seconds: keep timing until this much time has passed as well.
        max_accuracy_drop: top-1 points a recommended variant may lose against eager.
        variants: names to bench (manifest artifacts); empty: all.
        models: extra ONNX files to bench on the CPU.
        data: image folder to evaluate on (its classes must be the model's); default: the run's validation split.
        eval_images: cap on evaluation images.
    """

    batch_sizes: tuple[int, ...] = (1, 8)
    threads: int | None = None
    auto_threads: bool = False
    warmup: int = 5
    iterations: int = 30
    min_seconds: float = 0.0
    max_accuracy_drop: float = 1.0
    variants: tuple[str, ...] = ()
    models: tuple[Path, ...] = ()
    data: Path | None = None
    eval_images: int | None = None

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise EdgeTransferError(f"batch sizes must be at least 1, got {list(self.batch_sizes)}")
        if self.threads is not None and self.threads < 1:
            raise EdgeTransferError(f"threads must be at least 1, got {self.threads}")
        if self.iterations < 1 or self.warmup < 0:
            raise EdgeTransferError("iterations must be at least 1 and warm-up 0 or more")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["models"] = [str(m) for m in self.models]
        data["data"] = str(self.data) if self.data else None
        return data


@dataclass
class _Variant:
    name: str
    path: Path
    kind: str  # eager | ort | openvino | tensorrt
    provider: str = "CPUExecutionProvider"
    from_manifest: bool = True  # built from this run's checkpoint (checked), not a --model file

    def runner(self, threads: int | None) -> Runner:
        if self.kind == "eager":
            return EagerRunner(self.path)
        if self.kind == "tensorrt":
            return TensorRTRunner(self.path)
        if self.kind == "openvino":
            return OpenVinoRunner(self.path, threads)
        return OrtRunner(self.path, self.provider, threads)

    def size_bytes(self) -> int | None:
        files = [self.path] + ([self.path.with_suffix(".bin")] if self.kind == "openvino" else [])
        return sum(f.stat().st_size for f in files) if all(f.exists() for f in files) else None


@dataclass
class _Data:
    pre: Preprocessing
    images: list
    labels: np.ndarray
    cache: dict[str, np.ndarray] = field(default_factory=dict)

    def inputs(self, input_format: str) -> np.ndarray:
        """All evaluation images, prepared once per input format (outside any timed region)."""
        if input_format not in self.cache:
            pixels = [np.asarray(self.pre.resize_crop(img), dtype=np.uint8) for img in self.images]
            self.cache[input_format] = np.stack(pixels if input_format == UINT8_NHWC else [self.pre.normalize(p) for p in pixels])
        return self.cache[input_format]


def machine_fingerprint(threads: int) -> dict[str, Any]:
    """CPU model and int8 features, cores, memory, OS, library versions, providers, GPU."""
    import platform

    import onnxruntime as ort

    from .optimize.cpu import cpu_features

    cpu = cpu_features()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else None
    found = {
        "cpu": cpu.to_dict(),
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1) if memory else None,
        "os": platform.platform(),
        "versions": versions(),
        "onnxruntime_providers": ort.get_available_providers(),
        "threads": threads,
        "ort_spinning": False,
    }
    try:
        import tensorrt

        found["versions"]["tensorrt"] = tensorrt.__version__
    except ImportError:
        pass
    import torch

    if torch.cuda.is_available():
        found["gpu"] = {"name": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
                        "driver": _nvidia_driver()}
    return found


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
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss_mb() -> float:
    """The process's peak resident memory so far (it only grows), in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _gpu_memory_reset():
    """torch.cuda with its peak counter reset, or None without a GPU. It sees the memory torch
    allocates (eager, TensorRT I/O), not ONNX Runtime's own CUDA arena."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda


def _variants(run_dir: Path, options: BenchOptions) -> list[_Variant]:
    manifest = Manifest.load(run_dir)
    found = [_Variant("eager", run_dir / "model.pt", "eager", "torch-cpu")]
    for name, entry in manifest.data["artifacts"].items():
        path = run_dir / entry["path"]
        if entry["kind"] == "engine":
            found.append(_Variant(name, path, "tensorrt", "TensorRT"))
        elif entry["kind"] == "openvino":
            found.append(_Variant(name, path, "openvino", "OpenVINO CPU"))
        elif entry["kind"] == "onnx":
            prefix = next((p for p in PROVIDERS if name.startswith(p)), None)
            found.append(_Variant(name, path, "ort", PROVIDERS.get(prefix, "CPUExecutionProvider")))
    if options.variants:
        known = {v.name: v for v in found}
        for name in options.variants:
            if name not in known:
                raise unknown_name("variant", name, list(known))
        found = [found[0]] + [known[n] for n in options.variants if n != "eager"]
    extra = [_Variant(Path(m).name, Path(m), "openvino" if Path(m).suffix == ".xml" else "ort", from_manifest=False) for m in options.models]
    return found + extra


def _evaluation_data(run_dir: Path, options: BenchOptions, classes: list[str], pre: Preprocessing) -> _Data:
    if options.data is not None:
        dataset = load_dataset(DataSpec(str(options.data)))
        samples = dataset.train + dataset.val  # an evaluation folder: every image counts
        if dataset.classes != classes:
            raise DataError(f"the classes of {options.data} ({', '.join(dataset.classes[:5])}…) are not the model's ({', '.join(classes[:5])}…)")
    else:
        samples = load_dataset(DataSpec.from_dict(read_json(run_dir / "config.json")["data"])).val
    if options.eval_images:
        samples = samples[: options.eval_images]
    return _Data(pre, [load_image(s) for s in samples], np.array([s.label for s in samples]))


def bench_run(run_dir: str | Path, options: BenchOptions = BenchOptions(), out_dir: Path | None = None) -> dict[str, Any]:
    """Measure every variant of the run; write bench.json, bench.md and bench.png as it goes.

    Raises:
        RunError: no run at ``run_dir``.
        DataError: evaluation data whose classes do not match the model.
        UnknownNameError: a variant name the run does not have.
    """
    run_dir = Path(run_dir)
    if not Manifest.exists(run_dir) or not (run_dir / "model.pt").is_file():
        raise RunError(f"no fine-tuned run at {run_dir}; run edgetransfer finetune first")
    import torch

    from .checkpoint import load_checkpoint

    out_dir = Path(out_dir or run_dir)
    built, payload = load_checkpoint(run_dir / "model.pt")
    data = _evaluation_data(run_dir, options, payload["classes"], built.preprocessing)
    threads = options.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    report: dict[str, Any] = {
        "schema": SCHEMA, "created": now(), "run": str(run_dir), "options": options.to_dict(),
        "machine": machine_fingerprint(threads), "eval_images": int(len(data.labels)), "results": [],
        "checkpoint_sha256": sha256_file(run_dir / "model.pt"),
    }
    variants = _variants(run_dir, options)
    eager_logits: dict[str, np.ndarray] = {}
    with progress() as bar:
        task = bar.add_task("bench", total=len(variants), status="")
        for variant in variants:
            bar.update(task, status=variant.name)
            report["results"].append(_measure(variant, data, options, threads, eager_logits, report))
            _finish(report, options, out_dir, final=False)
            bar.advance(task)
    return _finish(report, options, out_dir, final=True)


def _measure(variant: _Variant, data: _Data, options: BenchOptions, threads: int, eager: dict, report: dict) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": variant.name, "path": str(variant.path), "kind": variant.kind, "size_bytes": variant.size_bytes()}
    chosen = _choose_threads(variant, data, options, threads) if options.auto_threads and variant.kind != "tensorrt" else threads
    row["threads"] = chosen
    rss_before = _rss_mb()
    gpu = _gpu_memory_reset()
    try:
        with variant.runner(chosen) as runner:
            if variant.from_manifest:
                _check_checkpoint(runner, report)
            row.update(status="measured", provider=runner.provider, cold_start_s=round(runner.cold_start_s, 4))
            if runner.settings:
                row["backend_settings"] = runner.settings
            inputs = data.inputs(runner.input_format)
            logits = _logits(runner, inputs, max(options.batch_sizes))
            row["accuracy"] = _accuracy(logits, data.labels, eager.get("logits"))
            if variant.kind == "eager":
                eager["logits"] = logits
            row["latency"] = {str(b): _time(runner, inputs, b, options) for b in options.batch_sizes}
        row["rss_mb"] = round(_rss_mb(), 1)
        row["rss_increase_mb"] = round(row["rss_mb"] - rss_before, 1)
        row["process_peak_rss_mb"] = round(_peak_rss_mb(), 1)
        if gpu:
            row["gpu_peak_torch_mb"] = round(gpu.max_memory_allocated() / 2**20, 1)
    except SkipVariant as exc:
        row.update(status="skipped", reason=str(exc))
    except Exception as exc:  # one broken variant never stops the rest; its error is reported
        row.update(status="failed", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
    _speedups(row, report)
    return row


def _check_checkpoint(runner: Runner, report: dict[str, Any]) -> None:
    """A variant must come from the checkpoint eager runs (a re-trained run keeps stale files)."""
    recorded = runner.checkpoint_sha256
    if recorded and recorded != report["checkpoint_sha256"]:
        raise RunError(
            f"{Path(runner.source).name} was built from another checkpoint than this run's model.pt;"
            " rebuild it with edgetransfer export RUN_DIR --target … --precision …"
        )


def _choose_threads(variant: _Variant, data: _Data, options: BenchOptions, cores: int) -> int:
    best, best_ms = cores, float("inf")
    for count in range(1, (os.cpu_count() or 1) + 1):
        try:
            import torch

            torch.set_num_threads(count)
            with variant.runner(count) as runner:
                inputs = data.inputs(runner.input_format)
                quick = _time(runner, inputs, options.batch_sizes[0], BenchOptions(warmup=2, iterations=10))
            if quick["p50_ms"] < best_ms:
                best, best_ms = count, quick["p50_ms"]
        except SkipVariant:
            return cores
    import torch

    torch.set_num_threads(best)
    return best


def _logits(runner: Runner, inputs: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([runner.infer(inputs[i : i + batch]) for i in range(0, len(inputs), batch)])


def _accuracy(logits: np.ndarray, labels: np.ndarray, eager: np.ndarray | None) -> dict[str, Any]:
    result = {"top1": topk_accuracy(logits, labels, 1), "top5": topk_accuracy(logits, labels, 5)}
    if eager is not None:
        result["top1_change_points"] = round(100 * (result["top1"] - topk_accuracy(eager, labels, 1)), 4)
        result["top1_agreement"] = float((logits.argmax(1) == eager.argmax(1)).mean())
        result["max_abs_logit_diff"] = float(np.abs(logits - eager).max())
    return result


def _time(runner: Runner, inputs: np.ndarray, batch: int, options: BenchOptions) -> dict[str, float]:
    """Latency of ``runner`` on batches cut from ``inputs`` in advance (nothing else is timed)."""
    reps = -(-batch // len(inputs))
    pool = np.concatenate([inputs] * reps) if reps > 1 else inputs
    batches = [np.ascontiguousarray(pool[i : i + batch]) for i in range(0, len(pool) - batch + 1, batch)][:16]
    for i in range(options.warmup):
        runner.infer(batches[i % len(batches)])
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < options.iterations or time.perf_counter() - started < options.min_seconds:
        chunk = batches[len(times) % len(batches)]
        t0 = time.perf_counter()
        runner.infer(chunk)
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1000
    return {
        "batch": batch, "iterations": len(times),
        "mean_ms": round(float(ms.mean()), 4), "p50_ms": round(float(np.percentile(ms, 50)), 4),
        "p90_ms": round(float(np.percentile(ms, 90)), 4), "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "throughput_ips": round(float(batch / (ms.mean() / 1000)), 2),
    }


def _speedups(row: dict[str, Any], report: dict[str, Any]) -> None:
    eager = next((r for r in report["results"] if r["variant"] == "eager" and r["status"] == "measured"), None)
    if row.get("status") != "measured":
        return
    baseline = row if row["variant"] == "eager" else eager
    if baseline is None:
        return
    row["speedup_vs_eager"] = {b: round(baseline["latency"][b]["mean_ms"] / t["mean_ms"], 3) for b, t in row["latency"].items()}


def recommend(report: dict[str, Any], budget: float) -> dict[str, Any] | None:
    """The fastest measured variant (mean latency at the first batch size) within ``budget`` of eager."""
    first = str(report["options"]["batch_sizes"][0])
    candidates = [
        r for r in report["results"]
        if r["status"] == "measured" and r["variant"] != "eager"
        and -r["accuracy"].get("top1_change_points", 0.0) <= budget
    ]
    if not candidates:
        return None
    best = min(candidates, key=lambda r: r["latency"][first]["mean_ms"])
    return {"variant": best["variant"], "batch_size": int(first), "mean_ms": best["latency"][first]["mean_ms"],
            "speedup_vs_eager": best.get("speedup_vs_eager", {}).get(first), "top1_change_points": best["accuracy"]["top1_change_points"],
            "max_accuracy_drop": budget}


def _finish(report: dict[str, Any], options: BenchOptions, out_dir: Path, final: bool) -> dict[str, Any]:
    from .report import bench_markdown, plot_bench

    report["complete"] = final
    report["recommendation"] = recommend(report, options.max_accuracy_drop)
    write_json(out_dir / "bench.json", report)
    if final:
        text = bench_markdown(report)
        write_bytes(out_dir / "bench.md", lambda f: f.write(text.encode("utf-8")))
        plot_bench(report, out_dir / "bench.png")
    return report
