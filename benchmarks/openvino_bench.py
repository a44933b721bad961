"""ONNX Runtime and OpenVINO side by side: `edgetransfer bench` on resnet18 and EfficientNet-Lite0 at 224 px.

    python benchmarks/openvino_bench.py                    # about 2 hours on a 2-core AVX2 CPU
    python benchmarks/openvino_bench.py --work runs/ovb    # keep the fine-tuned runs (and reuse them)

On a 2-core AVX2-only EPYC, fine-tuning resnet18 at 224 px takes most of an hour and the INT8
guards on EfficientNet-Lite0 about 45 minutes; with the runs kept, a rerun takes about an hour.

Both models are fine-tuned on the digits at 224x224: resnet18 from scratch (full fine-tune, no
pretrained resnet18 weights exist offline) and the EfficientNet-Lite0 head on its embedded
ImageNet weights. Each gets ort-cpu fp32/int8 and openvino fp32/bf16/int8 variants, every INT8
under the default 1-point accuracy guard, and `edgetransfer bench` measures them all against
eager PyTorch in one process, at batch 1 and 8, with the same 2 threads. The recommendation
(the fastest variant within 1.0 top-1 point of eager) is checked against the speed-ups asked for:
at least 8x eager for resnet18 and 6x for EfficientNet-Lite0, at batch 1. Those figures were set
on a Xeon with AVX-512 VNNI and AMX; on a CPU without int8 dot-product instructions (VNNI, AMX)
the results say so next to the check, since INT8 cannot gain as much there.
Writes benchmarks/results/openvino.{md,json} and bench-openvino-<model>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from edgetransfer.bench import BenchOptions, bench_run
from edgetransfer.cpu import cpu_features
from edgetransfer.errors import EdgeTransferError
from edgetransfer.export import export_onnx
from edgetransfer.finetune import FinetuneConfig, Mode, finetune
from edgetransfer.optimize import Precision, Target, build_variants
from edgetransfer.progress import set_quiet
from edgetransfer.report import recommendation_line
from edgetransfer.runtime.openvino_ir import bf16_problem

from fingerprint import fingerprint, save_results

RESULTS = Path(__file__).parent / "results"
CASES = {
    "resnet18": (FinetuneConfig(arch="resnet18", weights="none", mode=Mode.FULL, epochs=8, image_size=224), 8.0),
    "efficientnet_lite0": (FinetuneConfig(image_size=224), 6.0),
}


def prepare(work: Path, name: str, config: FinetuneConfig) -> tuple[Path, dict]:
    """Fine-tune (or reuse) the run, export it and build every CPU variant; INT8 failures are recorded."""
    run_dir = work / name
    if not (run_dir / "metrics.json").is_file():
        shutil.rmtree(run_dir, ignore_errors=True)
        finetune(config, run_dir)
    export_onnx(run_dir)
    built: dict[str, dict] = {}
    openvino = [Precision.FP32, Precision.INT8] + ([Precision.BF16] if bf16_problem() is None else [])
    for target, precisions in ((Target.ORT_CPU, [Precision.FP32, Precision.INT8]), (Target.OPENVINO, openvino)):
        for precision in precisions:
            key = f"{target.value}-{precision.value}"
            try:
                (variant,) = build_variants(run_dir, [target], [precision])
                built[key] = {
                    "seconds": variant.report.seconds,
                    "top1_drop_points": variant.report.drop_points,
                    "kept_in_float": variant.report.kept_in_float,
                }
            except EdgeTransferError as exc:
                built[key] = {"failed": str(exc)}
    return run_dir, built


def summary(machine: dict) -> str:
    v = machine["versions"]
    return (
        f"{machine['cpu']['model']}, {machine['cores']} cores; flags {', '.join(machine['cpu']['flags'])};"
        f" OpenVINO reports {', '.join(machine['openvino_capabilities'])}; torch {v.get('torch')},"
        f" onnxruntime {v.get('onnxruntime-gpu') or v.get('onnxruntime')}, openvino {v.get('openvino')}, nncf {v.get('nncf')};"
        f" {machine['torch_threads']} threads for torch, ONNX Runtime (spinning off) and OpenVINO (latency hint, 1 stream)"
    )


def markdown(rows: list[dict], machine: dict) -> str:
    lines = [
        "# ONNX Runtime and OpenVINO against eager PyTorch (CPU, 224x224)",
        "",
        f"Machine: {summary(machine)}. Produced by `python benchmarks/openvino_bench.py`;"
        " each model's full table (batch 1 and 8, percentiles, memory) is in bench-openvino-<model>.md.",
        "",
        "| model | eager top-1 | recommended | its latency (batch 1) | speed-up vs eager | top-1 change | asked for | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if not machine["int8_fast"]:
        lines[4:4] = [
            "This CPU has no VNNI or AMX: the speed-ups asked for were set on one that has, so INT8"
            " cannot gain as much here and a 'NO' below measures the CPU as much as the toolkit.",
            "",
        ]
    for row in rows:
        rec = row["recommendation"] or {}
        lines.append(
            f"| {row['model']} | {100 * row['eager_top1']:.2f}% | {rec.get('variant', 'none')} | {rec.get('mean_ms', float('nan')):.2f} ms"
            f" | {rec.get('speedup_vs_eager') or 0:.2f}× | {rec.get('top1_change_points', float('nan')):+.2f} pt"
            f" | ≥ {row['required_speedup']:.0f}× | {'yes' if row['met'] else 'NO'} |"
        )
    lines += ["", "## Every variant at batch 1 (mean ms, speed-up, top-1 change against eager)", ""]
    lines += ["| model | variant | mean ms | vs eager | Δ top-1 | layers kept out of INT8 | build s |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        for result in row["results"]:
            built = row["built"].get(result["variant"], {})
            if result["status"] != "measured":
                lines.append(f"| {row['model']} | {result['variant']} | {result['status']}: {result.get('reason', '')} | | | | |")
                continue
            latency = result["latency"]["1"]
            lines.append(
                f"| {row['model']} | {result['variant']} ({result['provider']}) | {latency['mean_ms']:.2f} | {result['speedup_vs_eager']['1']:.2f}×"
                f" | {result['accuracy'].get('top1_change_points', 0.0):+.2f} | {len(built.get('kept_in_float', [])) if built else '—'}"
                f" | {built.get('seconds', '—')} |"
            )
        for key, built in row["built"].items():
            if "failed" in built:
                lines.append(f"| {row['model']} | {key} | not built: {built['failed']} | | | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="Keep the runs here (and reuse finished ones).")
    args = parser.parse_args()
    set_quiet(True)
    RESULTS.mkdir(exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for name, (config, required) in CASES.items():
            run_dir, built = prepare(work, name, config)
            options = BenchOptions(threads=args.threads, batch_sizes=(1, 8), iterations=100, warmup=10, min_seconds=2.0)
            report = bench_run(run_dir, options)
            for suffix in ("md", "json", "png"):
                shutil.copyfile(run_dir / f"bench.{suffix}", RESULTS / f"bench-openvino-{name}.{suffix}")
            saved = report.to_dict()
            recommendation = saved["recommendation"]
            met = bool(recommendation and (recommendation["speedup_vs_eager"] or 0) >= required)
            rows.append(
                {
                    "model": name,
                    "eager_top1": report.row("eager").accuracy.top1,
                    "required_speedup": required,
                    "met": met,
                    "recommendation": recommendation,
                    "built": built,
                    "results": saved["results"],
                }
            )
            print(name, recommendation_line(report), "| asked for", f"{required}x:", "met" if met else "NOT MET")
    import openvino

    machine = {
        **fingerprint(args.threads),
        "int8_fast": cpu_features().int8_fast,
        "openvino_capabilities": openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"),
    }
    save_results("openvino", {"machine": machine, "rows": rows}, markdown(rows, machine))


if __name__ == "__main__":
    main()
