"""INT8 and FP32 ONNX Runtime variants against eager PyTorch: accuracy and speed, in one process.

    python benchmarks/quantize_bench.py        # about 10 minutes on a 2-core CPU

Accuracy: the demo (EfficientNet-Lite0 head on digits, 64 px) and a resnet18 trained from
scratch on digits (64 px, no pretrained resnet18 weights exist offline), INT8 under the default
1-point accuracy guard. Speed: resnet18 and EfficientNet-Lite0 at 224x224, batch 1, eager
PyTorch vs ONNX Runtime FP32 / optimised FP32 / INT8 on CPU, all measured here with the same
thread count, interleaved in rounds. Speed does not depend on the weights, so the 224 px models
are untrained copies of the architectures (their INT8 calibration uses digits upscaled to 224).
Writes benchmarks/results/quantize.json and quantize.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgetransfer.checkpoint import load_checkpoint, save_checkpoint
from edgetransfer.data import DataSpec
from edgetransfer.errors import QuantizationError
from edgetransfer.export import ExportOptions, export_onnx
from edgetransfer.finetune import FinetuneConfig, Mode, finetune
from edgetransfer.models import build
from edgetransfer.optimize import Precision, QuantOptions, Target, build_variants
from edgetransfer.progress import set_quiet
from edgetransfer.rundir import RunDir
from edgetransfer.runtime.files import write_json
from edgetransfer.runtime.sessions import open_session

from fingerprint import fingerprint, save_results


def accuracy_case(work: Path, name: str, config: FinetuneConfig) -> dict:
    """Train, export, and quantise under the default guard; INT8 against eager and ONNX float."""
    run = finetune(config, work / name)
    export_onnx(run.run_dir)
    row = {"model": name, "eager_top1": run.metrics["final"]["top1"], "image_size": run.config.image_size}
    try:
        fp32, int8 = build_variants(run.run_dir, [Target.ORT_CPU], [Precision.FP32, Precision.INT8])
    except QuantizationError as exc:
        return {**row, "int8": f"failed: {exc}"}
    return {
        **row,
        "ort_fp32_top1": fp32.report.accuracy.top1,
        "int8_top1": int8.report.accuracy.top1,
        "int8_drop_vs_eager_points": round(100 * (row["eager_top1"] - int8.report.accuracy.top1), 2),
        "kept_in_float": int8.report.kept_in_float,
        "int8_build_s": int8.report.seconds,
    }


def untrained_run(run_dir: Path, arch: str, weights: str | None) -> Path:
    """A run directory holding an untrained 224 px checkpoint of ``arch`` (10 classes) and its
    ONNX export; its data for calibration and bench is 20 digits a class."""
    torch.manual_seed(0)
    built = build(arch, 10, weights=weights, image_size=224)
    save_checkpoint(run_dir / "model.pt", built, [str(d) for d in range(10)])
    write_json(run_dir / "config.json", {"data": DataSpec(limit_per_class=20).to_dict()})
    manifest = RunDir(run_dir).new_manifest(run=run_dir.name, status="complete")
    manifest.record("checkpoint", RunDir.CHECKPOINT, "torch-checkpoint")
    manifest.save()
    export_onnx(run_dir, ExportOptions(verify_images=8))
    return run_dir


def speed_run(work: Path, arch: str, weights: str) -> Path:
    """A run directory holding an untrained 224 px checkpoint of ``arch`` with its variants."""
    run_dir = untrained_run(work / f"speed-{arch.replace(':', '_')}", arch, weights)
    build_variants(run_dir, [Target.ORT_CPU], [Precision.FP32, Precision.INT8], QuantOptions(calib_size=64, max_accuracy_drop=100.0))
    return run_dir


def latency(run, warmup: int, iterations: int) -> list[float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def speed_case(run_dir: Path, threads: int, rounds: int, iterations: int) -> dict:

    built, _ = load_checkpoint(run_dir / "model.pt")
    x = torch.randn(1, 3, 224, 224)
    runners = {"eager": lambda: built.module(x)}
    for name, file in (("ort-fp32", "model.onnx"), ("ort-fp32-opt", "ort-cpu-fp32.onnx"), ("ort-int8", "ort-cpu-int8.onnx")):
        session = open_session(run_dir / file, threads=threads)
        feed = {"input": x.numpy()}
        runners[name] = lambda s=session, f=feed: s.run(None, f)
    samples: dict[str, list[float]] = {name: [] for name in runners}
    with torch.inference_mode():
        for _ in range(rounds):  # interleaved, so drift on a shared machine hits every variant alike
            for name, run in runners.items():
                samples[name] += latency(run, warmup=3, iterations=iterations)
    p50 = {name: statistics.median(times) * 1000 for name, times in samples.items()}
    return {
        "p50_ms": {k: round(v, 2) for k, v in p50.items()},
        "p90_ms": {k: round(float(np.percentile(v, 90)) * 1000, 2) for k, v in samples.items()},
        "speedup_vs_eager": {k: round(p50["eager"] / v, 2) for k, v in p50.items()},
        "iterations": rounds * iterations,
    }


def markdown(report: dict) -> str:
    fp = report["machine"]
    lines = [
        "# INT8 and FP32 ONNX Runtime variants against eager PyTorch (CPU)",
        "",
        f"Machine: {fp['cpu']['model']}, {fp['cores']} cores; flags {', '.join(fp['cpu']['flags'])}; torch"
        f" {fp['versions'].get('torch')}, onnxruntime {fp['versions'].get('onnxruntime-gpu') or fp['versions'].get('onnxruntime')};"
        f" {fp['torch_threads']} threads for torch and ONNX Runtime (spinning off). Produced by `python benchmarks/quantize_bench.py`.",
        "",
        "## Accuracy on the validation split (INT8 under the default 1.0-point guard)",
        "",
        "| model | eager top-1 | ORT FP32 | ORT INT8 | INT8 vs eager | layers kept in float |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["accuracy"]:
        if isinstance(row.get("int8"), str):
            lines.append(f"| {row['model']} ({row['image_size']} px) | {100 * row['eager_top1']:.2f}% | — | {row['int8']} | — | — |")
            continue
        lines.append(
            f"| {row['model']} ({row['image_size']} px) | {100 * row['eager_top1']:.2f}% | {100 * row['ort_fp32_top1']:.2f}% |"
            f" {100 * row['int8_top1']:.2f}% | {-row['int8_drop_vs_eager_points']:+.2f} pt | {len(row['kept_in_float'])} |"
        )
    lines += [
        "",
        "## Latency at 224x224, batch 1 (p50, ms; speed-up against eager in the same run)",
        "",
        "| model | eager | ORT FP32 | ORT FP32 optimised | ORT INT8 |",
        "|---|---|---|---|---|",
    ]
    for name, row in report["speed"].items():
        p, s = row["p50_ms"], row["speedup_vs_eager"]
        lines.append(
            f"| {name} | {p['eager']:.1f} | {p['ort-fp32']:.1f} ({s['ort-fp32']:.2f}×) | {p['ort-fp32-opt']:.1f}"
            f" ({s['ort-fp32-opt']:.2f}×) | {p['ort-int8']:.1f} ({s['ort-int8']:.2f}×) |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_quiet(True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report = {
            "machine": fingerprint(torch.get_num_threads()),
            "accuracy": [
                accuracy_case(work, "efficientnet_lite0 head (demo)", FinetuneConfig()),
                accuracy_case(work, "resnet18 from scratch", FinetuneConfig(arch="resnet18", weights="none", mode=Mode.FULL, epochs=15)),
            ],
            "speed": {
                "resnet18": speed_case(speed_run(work, "resnet18", "none"), args.threads, args.rounds, args.iterations),
                "efficientnet_lite0": speed_case(speed_run(work, "timm:efficientnet_lite0", "embedded"), args.threads, args.rounds, args.iterations),
            },
        }
    save_results("quantize", report, markdown(report))


if __name__ == "__main__":
    main()
