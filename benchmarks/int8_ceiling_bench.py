"""What INT8 can give on this CPU at best: every layer in INT8 (no guard, nothing kept in float)
against the same runtime's FP32, for ONNX Runtime and OpenVINO, in one bench run.

    python benchmarks/int8_ceiling_bench.py        # about 10 minutes on a 2-core CPU

Accuracy work (a better guard, learned rounding, quantisation-aware training) can at most bring
INT8 to this speed: if the fully quantised model is no faster than FP32 here, the ">= 1.5x FP32"
goal needs a CPU with int8 dot products (VNNI or AMX), whatever the accuracy. Speed does not
depend on the weights, so the models are untrained copies of the architectures at 224 px (the
embedded ImageNet backbone for EfficientNet-Lite0, random for resnet18) with a 10-class head,
calibrated on 64 digits upscaled to 224. `edgetransfer bench` times every variant against eager
in interleaved rounds, at batch 1 and 8. Its accuracy columns mean nothing here (untrained heads)
and are left out. Writes benchmarks/results/int8_ceiling.{md,json}.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from edgetransfer.bench import BenchOptions, bench_run
from edgetransfer.optimize import Precision, QuantOptions, Target, build_variants
from edgetransfer.progress import set_quiet

from fingerprint import fingerprint, save_results
from quantize_bench import untrained_run

ARCHS = {"efficientnet_lite0": ("timm:efficientnet_lite0", None), "resnet18": ("resnet18", "none")}
TARGETS = (Target.ORT_CPU, Target.OPENVINO)
EVERY_LAYER = QuantOptions(calib_size=64, max_accuracy_drop=100.0, max_float_layers=0)  # the guard keeps nothing


def speed_run(work: Path, name: str) -> tuple[Path, dict]:
    run_dir = untrained_run(work / name, *ARCHS[name])
    kept = {}
    for target in TARGETS:
        variants = build_variants(run_dir, [target], [Precision.FP32, Precision.INT8], EVERY_LAYER)
        kept.update({v.name: v.report.kept_in_float for v in variants if v.precision is Precision.INT8})
    return run_dir, kept


def markdown(report: dict) -> str:
    machine = report["machine"]
    cpu = machine["cpu"]
    lines = [
        "# INT8 at best: every layer quantised, against the same runtime's FP32 (224 px)",
        "",
        f"Machine: {cpu['model']} ({', '.join(cpu['flags'])}), {machine['cores']} cores; {report['threads']} threads,"
        f" {report['rounds']} interleaved rounds. Produced by `python benchmarks/int8_ceiling_bench.py`.",
        "",
        "| model | runtime | batch | FP32 ms (± rounds) | INT8 ms (± rounds) | INT8 vs FP32 | layers in float |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['model']} | {row['runtime']} | {row['batch']} | {row['fp32_ms']:.2f} (±{row['fp32_spread']:.0f}%)"
            f" | {row['int8_ms']:.2f} (±{row['int8_spread']:.0f}%) | **{row['ratio']:.2f}×** | {row['kept_in_float']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--models", default=",".join(ARCHS))
    args = parser.parse_args()
    set_quiet(True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            run_dir, kept = speed_run(Path(tmp), name)
            bench = bench_run(
                run_dir, BenchOptions(threads=args.threads, batch_sizes=(1, 8), iterations=140, warmup=10, rounds=args.rounds, eval_images=16)
            )
            for target in TARGETS:
                fp32, int8 = bench.row(f"{target.value}-fp32"), bench.row(f"{target.value}-int8")
                if not (fp32 and int8 and fp32.measured and int8.measured):
                    continue
                for batch in ("1", "8"):
                    a, b = fp32.latency[batch], int8.latency[batch]
                    rows.append(
                        {
                            "model": name,
                            "runtime": target.value,
                            "batch": int(batch),
                            "fp32_ms": a.mean_ms,
                            "fp32_spread": 50 * (a.spread or 0),
                            "int8_ms": b.mean_ms,
                            "int8_spread": 50 * (b.spread or 0),
                            "ratio": a.mean_ms / b.mean_ms,
                            "kept_in_float": len(kept.get(f"{target.value}-int8", [])),
                        }
                    )
    report = {"machine": fingerprint(args.threads), "threads": args.threads, "rounds": args.rounds, "rows": rows}
    save_results("int8_ceiling", report, markdown(report))


if __name__ == "__main__":
    main()
