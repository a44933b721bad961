"""INT8 under the accuracy guard at the model's own size: its wall time, the layers it keeps in
float, how much of the model ONNX Runtime really runs in integer kernels, the top-1 change on
test images no stage chose on (with its 95% interval), and INT8 against the same runtime's FP32
in one bench run, timed in interleaved rounds.

    python benchmarks/int8_guard_bench.py --qat                 # the default model, and its QAT child
    python benchmarks/int8_guard_bench.py --work runs/guard     # keep the fine-tuned runs (and reuse them)
    python benchmarks/int8_guard_bench.py --arch resnet18 --weights none --mode full --epochs 5 --name int8_guard_resnet18
    python benchmarks/int8_guard_bench.py --arch timm:mobilenetv3_large_100 --weights none --mode full \\
        --epochs 5 --name int8_guard_mobilenetv3                 # a third architecture, trained from scratch

EfficientNet-Lite0 (embedded ImageNet weights, new head; or --arch/--weights/--mode) is fine-tuned
on the digits at 224 px with the default splits (validation 20%, test 10%). ONNX Runtime and
OpenVINO each build FP32 and INT8 under the default guard (1.0 point, at most 32 layers in float,
learned rounding when nearest rounding misses the budget: --rounding); with --qat, the run's QAT
child (``finetune --from RUN --qat``, trained once and reused) ships its INT8 model to both. Then
`edgetransfer bench` times every variant against eager at batch 1 and 8 in 7 rounds. A refused
INT8 build is a row with the guard's reason. The goals are checked in the table. Writes
benchmarks/results/NAME.{md,json}, bench-NAME.{md,json,png} (NAME: --name, int8_guard) and
int8_coverage.md, the coverage of every architecture measured so far (from results/int8_guard*.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from edgetransfer.bench import BenchOptions, bench_run
from edgetransfer.benchreport import BenchReport
from edgetransfer.config import QatOptions
from edgetransfer.errors import EdgeTransferError
from edgetransfer.export import export_onnx
from edgetransfer.finetune import FinetuneConfig, finetune
from edgetransfer.optimize import Precision, QuantOptions, Target, build_variants
from edgetransfer.optimize.rounding import Rounding
from edgetransfer.progress import set_quiet
from edgetransfer.qat import run_qat
from edgetransfer.report import noisy_baseline, recommendation_line

from fingerprint import fingerprint, save_results

RESULTS = Path(__file__).parent / "results"
# the goals: guard and build time, accuracy, layers in float, coverage, INT8 against the same runtime's FP32
GOALS = {"guard_s": 120, "build_s": 300, "drop_points": 1.0, "float_layers": 2, "coverage": 99.0, "int8_vs_fp32": 1.5}
SPEED_GOALS = {"resnet18": 2.5}  # post-training INT8 against FP32, where the goal is not GOALS' (on a CPU with VNNI or AMX)
QAT_SPEED_GOAL = 1.8


def prepare(work: Path, args: argparse.Namespace) -> Path:
    run_dir = work / f"{args.arch.replace(':', '_')}-224"
    if not (run_dir / "metrics.json").is_file():
        shutil.rmtree(run_dir, ignore_errors=True)
        settings = {"arch": args.arch, "weights": args.weights, "mode": args.mode, "epochs": args.epochs}
        finetune(FinetuneConfig(image_size=224, **{k: v for k, v in settings.items() if v is not None}), run_dir)
    export_onnx(run_dir)
    return run_dir


def qat_child(run_dir: Path) -> Path:
    """The run's QAT child for ONNX Runtime's CPU target, trained once (reused when it is there)."""
    child = run_dir / "qat-ort-cpu"
    if not (child / "metrics.json").is_file():
        shutil.rmtree(child, ignore_errors=True)
        run_qat(run_dir, QatOptions())
    return child


def _built(report, seconds: float) -> dict:
    guard = report.details.get("guard", {})
    return {
        "seconds": round(seconds, 1),
        "guard_s": guard.get("seconds"),
        "guard_steps": len(report.guard_steps),
        "kept_in_float": report.kept_in_float,
        "rounding": report.details.get("rounding"),
        "coverage": report.coverage.to_dict() if report.coverage else None,
        "report": report.to_dict(),
    }


def build(run_dir: Path, quant: QuantOptions, prefix: str = "", precisions=(Precision.FP32, Precision.INT8)) -> dict[str, dict]:
    built: dict[str, dict] = {}
    for target in (Target.ORT_CPU, Target.OPENVINO):
        for precision in precisions:
            key = f"{prefix}{target.value}-{precision.value}"
            started = time.perf_counter()
            try:
                (variant,) = build_variants(run_dir, [target], [precision], quant)
            except EdgeTransferError as exc:
                built[key] = {"failed": str(exc), "seconds": round(time.perf_counter() - started, 1)}
                continue
            built[key] = _built(variant.report, time.perf_counter() - started)
            print(f"{key}: {built[key]['seconds']} s, {len(variant.report.kept_in_float)} layer(s) in float", flush=True)
    return built


def _cell(value, goal, smaller=True) -> str:
    if value is None:
        return "—"
    ok = value <= goal if smaller else value >= goal
    return f"{value:.1f} ({'yes' if ok else 'NO'})" if isinstance(value, float) else f"{value} ({'yes' if ok else 'NO'})"


def _ratio(bench: BenchReport, row_name: str, baseline: str, batch: str) -> float | None:
    row, fp32 = bench.row(row_name), bench.row(baseline)
    if not row or not fp32 or not row.measured or not fp32.measured or batch not in row.latency:
        return None
    return fp32.latency[batch].mean_ms / row.latency[batch].mean_ms


def _change(bench: BenchReport, row_name: str, float_row: str) -> str:
    """The top-1 change against the float model of the same runtime, with eager's paired interval."""
    row = bench.row(row_name)
    if not row or not row.measured:
        return "—"
    a = row.accuracy
    interval = f" ({a.top1_change_interval[0]:+.2f} to {a.top1_change_interval[1]:+.2f})" if a.top1_change_interval else ""
    return f"{a.top1_change_points or 0.0:+.2f}{interval}"


def target_rows(built: dict, bench: BenchReport, arch: str) -> list[str]:
    rows = []
    speed_goal = SPEED_GOALS.get(arch, GOALS["int8_vs_fp32"])
    for key, fp32, goal in (
        ("ort-cpu-int8", "ort-cpu-fp32", speed_goal),
        ("openvino-int8", "openvino-fp32", speed_goal),
        ("qat-ort-cpu/ort-cpu-int8", "ort-cpu-fp32", QAT_SPEED_GOAL),
        ("qat-ort-cpu/openvino-int8", "openvino-fp32", QAT_SPEED_GOAL),
    ):
        if key not in built:
            continue
        entry = built[key]
        if "failed" in entry:
            rows.append(f"| {key} | — | {entry['seconds']} | — | — | refused: {entry['failed']} | — | — |")
            continue
        coverage = entry.get("coverage")
        share = round(100 * coverage["integer_share"], 2) if coverage else None
        qdq = f"{coverage['quantize_nodes']} Q, {coverage['dequantize_nodes']} DQ" if coverage else "—"
        ratio1, ratio8 = _ratio(bench, key, fp32, "1"), _ratio(bench, key, fp32, "8")
        speed = f"{ratio1:.2f}× ({'yes' if ratio1 >= goal else 'NO'}; {ratio8:.2f}×)" if ratio1 and ratio8 else "—"
        guard = entry["guard_s"] if entry.get("guard_s") is not None else None
        rows.append(
            f"| {key} | {_cell(guard, GOALS['guard_s'])} | {_cell(entry['seconds'], GOALS['build_s'])}"
            f" | {_cell(len(entry['kept_in_float']), GOALS['float_layers'])} | {_cell(share, GOALS['coverage'], smaller=False)} ({qdq})"
            f" | {_change(bench, key, fp32)} | {speed} | {_rounding(entry)} |"
        )
    return rows


def _rounding(entry: dict) -> str:
    rounding = entry.get("rounding") or {}
    if rounding.get("method", "").startswith("AdaRound"):
        return f"AdaRound, {rounding['layers']} layers, {rounding['seconds']:.0f} s"
    return rounding.get("method", "—") if rounding else "—"


def markdown(built: dict, bench: BenchReport, machine: dict, args: argparse.Namespace, run: dict, command: str) -> str:
    cpu = machine["cpu"]
    arch = args.arch.removeprefix("timm:")
    lines = [
        f"# INT8 under the guard: {args.arch} (weights: {run['weights']}, mode: {run['mode']}), 224 px, digits",
        "",
        f"Float model: {run['val_top1']:.2f}% on {run['val_images']} validation images, {run['test_top1']:.2f}% on {run['test_images']}"
        f" test images. ONNX Runtime INT8 with --rounding {args.rounding}.",
        "",
        f"Machine: {cpu['model']} ({', '.join(cpu['flags'])}; cpuinfo: {', '.join(cpu.get('cpuinfo_flags', []))}), {machine['cores']} cores;"
        f" bench with {bench.machine.threads} threads, batch 1 (batch 8 in brackets), {bench.options['rounds']} interleaved rounds."
        f" Accuracy on {bench.eval_images} {bench.eval_split} images that no stage chose on (change against eager, with the paired"
        " 95% interval); the guard chose on validation images, without labels. int8 MACs: the share of multiply-accumulates"
        " ONNX Runtime's optimised graph (CPU provider) runs in integer kernels, with the Q/DQ nodes it left (ONNX Runtime rows only)."
        f" Produced by `python benchmarks/int8_guard_bench.py {command}`.",
        "",
        "| variant | guard s (≤ 120) | INT8 build s (≤ 300) | layers in float (≤ 2) | int8 MACs % (≥ 99) | top-1 change, 95% interval |"
        " INT8 vs same runtime's FP32, batch 1 (batch 8) | rounding |",
        "|---|---|---|---|---|---|---|---|",
        *target_rows(built, bench, arch),
        "",
        f"Speed goals on a CPU with VNNI or AMX: post-training {SPEED_GOALS.get(arch, GOALS['int8_vs_fp32'])}×, QAT {QAT_SPEED_GOAL}×"
        " (on a CPU without them the ratio is measured and reported, not a goal).",
    ]
    lines += ["", recommendation_line(bench), ""]
    warning = noisy_baseline(bench)
    if warning:
        lines += [f"Note: {warning}.", ""]
    lines += [
        "## Every variant",
        "",
        "| variant | batch 1 ms | ± rounds | batch 8 ms | vs eager (batch 1) | int8 MACs | Δ top-1 (95% interval) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in bench.results:
        if not row.measured:
            lines.append(f"| {row.variant} | {row.status}: {row.reason} | | | | | |")
            continue
        t, a = row.latency["1"], row.accuracy
        t8 = row.latency.get("8")
        interval = f" ({a.top1_change_interval[0]:+.2f} to {a.top1_change_interval[1]:+.2f})" if a.top1_change_interval else ""
        spread = f"±{50 * t.spread:.0f}%" if t.spread is not None else "—"
        share = f"{100 * row.coverage.share:.1f}%" if row.coverage else "—"
        lines.append(
            f"| {row.variant} | {t.mean_ms:.2f} | {spread} | {t8.mean_ms:.2f} | {row.speedup_vs_eager.get('1', float('nan')):.2f}×"
            f" | {share} | {a.top1_change_points or 0.0:+.2f}{interval} |"
            if t8
            else f"| {row.variant} | {t.mean_ms:.2f} | {spread} | — | — | {share} | {a.top1_change_points or 0.0:+.2f}{interval} |"
        )
    return "\n".join(lines) + "\n"


def coverage_markdown() -> str:
    """results/int8_coverage.md: integer coverage of every INT8 variant in results/int8_guard*.json."""
    lines = [
        "# Integer coverage of the shipped INT8 models, every architecture measured",
        "",
        "The share of multiply-accumulates that ONNX Runtime's optimised graph (CPU provider) runs in integer kernels,"
        " the same on every x86 CPU; from `benchmarks/results/int8_guard*.json`, written by `benchmarks/int8_guard_bench.py`.",
        "",
        "| architecture | variant | int8 MACs | MACs at batch 1 | float Conv/Gemm left | Q, DQ left | layers kept in float | CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(RESULTS.glob("int8_guard*.json")):
        data = json.loads(path.read_text())
        arch = data.get("args", {}).get("arch", "?")
        cpu = data.get("machine", {}).get("cpu", {})
        for key, entry in data.get("built", {}).items():
            coverage = entry.get("coverage")
            if not coverage or not key.endswith("int8"):
                continue
            floats = ", ".join(f"{f['name']} ({f['macs'] / 1e6:.1f} M)" for f in coverage["float_layers"][:3]) or "none"
            lines.append(
                f"| {arch} | {key} | {100 * coverage['integer_share']:.2f}% | {coverage['macs'] / 1e6:.1f} M | {floats}"
                f" | {coverage['quantize_nodes']}, {coverage['dequantize_nodes']} | {len(entry['kept_in_float'])}"
                f" | {cpu.get('model', '?')} ({', '.join(cpu.get('flags', []))}) |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="Keep the runs here (and reuse finished ones).")
    parser.add_argument("--arch", default="timm:efficientnet_lite0")
    parser.add_argument("--weights", default=None, help="finetune's --weights [default: embedded for Lite0]")
    parser.add_argument("--mode", default=None, help="finetune's --mode [default: head]")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--rounding", default=Rounding.AUTO.value, choices=[r.value for r in Rounding])
    parser.add_argument("--qat", action="store_true", help="also the run's QAT child (trained once, reused with --work)")
    parser.add_argument("--name", default="int8_guard", help="results/NAME.md")
    parser.add_argument("--report-only", action="store_true", help="rewrite results/NAME.md (and int8_coverage.md) from results/NAME.json")
    args = parser.parse_args()
    if args.report_only:
        saved = json.loads((RESULTS / f"{args.name}.json").read_text())
        recorded = argparse.Namespace(**(saved["args"] | {"report_only": False}))
        (RESULTS / f"{args.name}.md").write_text(
            markdown(saved["built"], BenchReport.from_dict(saved["bench"]), saved["machine"], recorded, saved["run"], saved.get("command", ""))
        )
        (RESULTS / "int8_coverage.md").write_text(coverage_markdown())
        return
    set_quiet(True)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = prepare(args.work or Path(tmp), args)
        started = time.perf_counter()
        built = build(run_dir, QuantOptions(rounding=args.rounding))
        if args.qat:
            built |= build(qat_child(run_dir), QuantOptions(), "qat-ort-cpu/", (Precision.INT8,))
        print(f"built in {time.perf_counter() - started:.0f} s", flush=True)
        bench = bench_run(run_dir, BenchOptions(threads=args.threads, batch_sizes=(1, 8), iterations=140, warmup=10, rounds=7))
        for suffix in ("md", "json", "png"):
            shutil.copyfile(run_dir / f"bench.{suffix}", RESULTS / f"bench-{args.name.replace('_', '-')}.{suffix}")
        run = float_run(run_dir)
    machine = fingerprint(args.threads)
    command = command_line()
    save_results(
        args.name,
        {"machine": machine, "args": vars(args) | {"work": str(args.work)}, "command": command, "run": run, "built": built, "bench": bench.to_dict()},
        markdown(built, bench, machine, args, run, command),
    )
    (RESULTS / "int8_coverage.md").write_text(coverage_markdown())


def command_line() -> str:
    """The options that shaped the result (not --work, a local path)."""
    words, shown = sys.argv[1:], []
    while words:
        word = words.pop(0)
        if word == "--work":
            words = words[1:]
        elif not word.startswith("--work="):
            shown.append(word)
    return " ".join(shown)


def float_run(run_dir: Path) -> dict:
    metrics, config = json.loads((run_dir / "metrics.json").read_text()), json.loads((run_dir / "config.json").read_text())
    return {
        "weights": config["weights"],
        "mode": config["mode"],
        "epochs": config["epochs"],
        "val_top1": 100 * metrics["final"]["top1"],
        "val_images": metrics["val_images"],
        "test_top1": 100 * metrics["test"]["top1"],
        "test_images": metrics["test"]["images"],
        "finetune_s": metrics["timing"]["total_s"],
    }


if __name__ == "__main__":
    main()
