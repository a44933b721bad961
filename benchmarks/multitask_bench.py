"""One two-task model against the two single-task models it replaces.

Trains, with the same settings (head mode on the frozen backbone, the same seed, epochs and image
size), the two-task demo (``--tasks demo``: digit and face) and one single-task model per task
(``--data digits``, ``--data faces``); exports all three to ONNX and measures, in one process:

* **accuracy**: each task's test images (no stage chose on them) through the two-task model and
  through that task's own model (ONNX Runtime, FP32), with the paired 95% interval of the change;
* **latency at batch 1**: in one ``edgetransfer bench`` run of the two-task run, its ONNX model,
  one single-task model (``--model``) and the two single-task models run in turn (``--replaces``:
  what a device without multi-task heads does), timed in interleaved rounds on the same images,
  with the same ONNX Runtime threads;
* **INT8**: the two-task model's ONNX Runtime INT8 variant under the default guard (whose worst
  task decides), and each task's test top-1 change against the float two-task model.

Writes ``benchmarks/results/multitask.{md,json,png}``. Run:
``python benchmarks/multitask_bench.py`` (about 10 minutes on 2 cores at 224 px).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from edgetransfer.bench import BenchOptions, bench_run
from edgetransfer.config import FinetuneConfig
from edgetransfer.data import DEMO, FACES, DataSpec
from edgetransfer.errors import EdgeTransferError
from edgetransfer.export import export_onnx
from edgetransfer.finetune import finetune
from edgetransfer.metrics import wilson_interval
from edgetransfer.optimize import Precision, QuantOptions, Target, build_variants
from edgetransfer.progress import set_quiet
from edgetransfer.results import paired_interval
from edgetransfer.rundir import RunDir
from edgetransfer.runtime import Predictor
from edgetransfer.tasks import tasks_option

sys.path.insert(0, str(Path(__file__).parent))
from fingerprint import fingerprint, save_results  # noqa: E402

GOALS = {"accuracy_points": 1.0, "two_task_vs_one": 1.1, "in_turn_vs_one": 1.9}
SINGLE = {"digit": DEMO, "face": FACES}


def train(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    """The two-task run and one run per task, with the same settings; each exported to ONNX."""
    settings = {"epochs": args.epochs, "image_size": args.image_size, "seed": args.seed}
    split = DataSpec(test_fraction=args.test_fraction)
    runs = {"two-task": work / "two-task", **{task: work / task for task in SINGLE}}
    seconds = {}
    for name, run in runs.items():
        started = time.perf_counter()
        if name == "two-task":
            config = FinetuneConfig(tasks=tasks_option("demo", split), **settings)
        else:
            config = FinetuneConfig(data=replace(split, source=SINGLE[name]), **settings)
        finetune(config, run)
        export_onnx(run)
        seconds[name] = round(time.perf_counter() - started, 1)
        print(f"{name}: trained and exported in {seconds[name]} s", file=sys.stderr)
    return runs


def test_images(run: Path):
    """A single-task run's test images (their pixels) and labels: the same images, split the same
    way, as the two-task run's test images of that task."""
    dataset = RunDir(run).dataset
    return [np.asarray(s.source) for s in dataset.test], np.array([s.label for s in dataset.test])


def accuracy(runs: dict[str, Path], models: dict[str, Predictor]) -> dict[str, dict]:
    """Each task's test top-1 in the two-task model and in its own model, paired."""
    rows = {}
    for task in SINGLE:
        images, labels = test_images(runs[task])
        multi = np.array([answer[task][0].index for answer in models["two-task"].predict(images, top_k=1)])
        single = np.array([answer[0].index for answer in models[task].predict(images, top_k=1)])
        right_multi, right_single = multi == labels, single == labels
        rows[task] = {
            "images": len(labels),
            "single_top1": float(right_single.mean()),
            "two_task_top1": float(right_multi.mean()),
            "single_interval": wilson_interval(int(right_single.sum()), len(labels)),
            "two_task_interval": wilson_interval(int(right_multi.sum()), len(labels)),
            **paired_change(right_single, right_multi),
        }
    return rows


def paired_change(before: np.ndarray, after: np.ndarray) -> dict:
    """The top-1 change from ``before`` to ``after`` (right or wrong per image, same images), in
    points, with its paired 95% interval and the images lost and gained."""
    lost, gained = int((before & ~after).sum()), int((after & ~before).sum())
    return {
        "change_points": round(100 * (gained - lost) / len(before), 3),
        "change_interval": paired_interval(lost, gained, len(before)),
        "lost": lost,
        "gained": gained,
    }


def latency(runs: dict[str, Path], args: argparse.Namespace) -> dict:
    """Batch 1 in one ``edgetransfer bench`` run of the two-task run: its ONNX model, one
    single-task model (``--model``), and the single-task models run in turn (``--replaces``),
    timed in interleaved rounds on the same test images with the same threads."""
    options = BenchOptions(
        batch_sizes=(1,),
        threads=args.threads,
        rounds=args.rounds,
        iterations=args.iterations,
        variants=("onnx",),
        models=(runs["digit"] / "model.onnx",),
        replaces=(runs["digit"], runs["face"]),
    )
    report = bench_run(runs["two-task"], options, out_dir=runs["two-task"] / "bench")
    rows = {row.variant: row for row in report.results}
    cases = {"two-task": rows["onnx"], "digit": rows["model.onnx"], "digit then face": rows["in turn: digit + face"], "eager two-task": rows["eager"]}
    failed = [f"{row.variant}: {row.reason}" for row in cases.values() if not row.measured]
    if failed:
        raise SystemExit(f"bench could not measure {'; '.join(failed)}")
    times = {case: next(iter(row.latency.values())) for case, row in cases.items()}
    one = times["digit"].mean_ms
    return {
        "mean_ms": {case: round(t.mean_ms, 3) for case, t in times.items()},
        "spread": {case: round(t.spread or 0.0, 3) for case, t in times.items()},
        "two_task_vs_one": round(times["two-task"].mean_ms / one, 3),
        "in_turn_vs_one": round(times["digit then face"].mean_ms / one, 3),
        "rounds": args.rounds,
        "iterations": times["digit"].iterations,
        "per_task_top1": {case: row.accuracy.per_task if row.accuracy else None for case, row in cases.items()},
        "eval_images": report.eval_images,
    }


def int8(runs: dict[str, Path], threads: int) -> dict:
    """The two-task model's ONNX Runtime INT8 variant under the default guard, and each task's
    test top-1 change against the float two-task model."""
    run = runs["two-task"]
    started = time.perf_counter()
    try:
        variant = build_variants(run, [Target.ORT_CPU], [Precision.INT8], QuantOptions())[0]
    except EdgeTransferError as exc:
        return {"refused": str(exc), "seconds": round(time.perf_counter() - started, 1)}
    seconds = round(time.perf_counter() - started, 1)
    guard = variant.report.details.get("guard", {})
    float_model, quantised = Predictor(run / "model.onnx", threads=threads), Predictor(variant.path, threads=threads)
    tasks = {}
    for task in SINGLE:
        images, labels = test_images(runs[task])
        before = np.array([a[task][0].index for a in float_model.predict(images, top_k=1)]) == labels
        after = np.array([a[task][0].index for a in quantised.predict(images, top_k=1)]) == labels
        tasks[task] = {"images": len(labels), "float_top1": float(before.mean()), "int8_top1": float(after.mean()), **paired_change(before, after)}
    return {
        "variant": variant.name,
        "seconds": seconds,
        "guard": {k: guard.get(k) for k in ("method", "criterion", "disagreement_points", "budget_points")},
        "kept_in_float": len(variant.report.kept_in_float or []),
        "int8_macs_percent": round(100 * variant.report.coverage.share, 1) if variant.report.coverage else None,
        "tasks": tasks,
        "digit_alone": int8_alone(runs["digit"]),
    }


def int8_alone(run: Path) -> dict:
    """The same INT8 build of the single-task digit run, beside it: how much of what the guard
    keeps in float the digit task needs on its own."""
    started = time.perf_counter()
    try:
        variant = build_variants(run, [Target.ORT_CPU], [Precision.INT8], QuantOptions())[0]
    except EdgeTransferError as exc:
        return {"refused": str(exc), "seconds": round(time.perf_counter() - started, 1)}
    accuracy = variant.report.accuracy
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "kept_in_float": len(variant.report.kept_in_float or []),
        "int8_macs_percent": round(100 * variant.report.coverage.share, 1) if variant.report.coverage else None,
        "disagreement_points": variant.report.details.get("guard", {}).get("disagreement_points"),
        "change_points": accuracy.top1_change_points if accuracy else None,
        "change_interval": accuracy.change_interval if accuracy else None,
    }


def markdown(report: dict) -> str:
    machine, args = report["machine"], report["settings"]
    cpu = machine["cpu"]
    lat, acc, quant = report["latency"], report["accuracy"], report["int8"]
    lines = [
        "# Multi-task heads: one two-task model against the two single-task models it replaces",
        "",
        f"timm:efficientnet_lite0 (embedded weights), head mode, {args['image_size']} px, {args['epochs']} epochs, seed {args['seed']},"
        f" each task split 0.2 validation / {args['test_fraction']} test; the same settings for all three runs."
        f" Tasks: digit (scikit-learn's digits, 10 classes) and face (scikit-image's lfw_subset, face or not).",
        "",
        f"Machine: {cpu['model']} ({', '.join(cpu['flags'])}; cpuinfo: {', '.join(cpu['cpuinfo_flags'])}), {machine['cores']} cores;"
        f" ONNX Runtime FP32 (CPU) with {args['threads']} threads, spinning off. Produced by `python benchmarks/multitask_bench.py`.",
        "",
        "## Accuracy: each task's test images (no stage chose on them)",
        "",
        "| task | test images | own model top-1 (95%) | two-task model top-1 (95%) | change, points | paired 95% interval | within 1.0 point? |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, row in acc.items():
        low, high = row["change_interval"]
        if low >= -GOALS["accuracy_points"]:
            verdict = "yes"
        elif row["change_points"] >= -GOALS["accuracy_points"]:
            verdict = f"yes as measured ({row['lost']} lost, {row['gained']} gained); {row['images']} images cannot narrow the interval to 1 point"
        else:
            verdict = "NO"
        lines.append(
            f"| {task} | {row['images']} | {100 * row['single_top1']:.2f}% ({row['single_interval'][0]:.1f}–{row['single_interval'][1]:.1f})"
            f" | {100 * row['two_task_top1']:.2f}% ({row['two_task_interval'][0]:.1f}–{row['two_task_interval'][1]:.1f})"
            f" | {row['change_points']:+.2f} | {low:+.2f} to {high:+.2f} | {verdict} |"
        )
    mean = lat["mean_ms"]
    lines += [
        "",
        f"## Latency at batch 1 (one `edgetransfer bench` run: {lat['rounds']} interleaved rounds, {lat['iterations']} calls each; mean)",
        "",
        "| model(s) | ms | ± rounds | vs one single-task model | goal |",
        "|---|---|---|---|---|",
        f"| digit (one single-task model, ONNX Runtime) | {mean['digit']:.2f} | ±{50 * lat['spread']['digit']:.0f}% | 1.00× | |",
        f"| two-task model (ONNX Runtime) | {mean['two-task']:.2f} | ±{50 * lat['spread']['two-task']:.0f}% | {lat['two_task_vs_one']:.2f}× |"
        f" ≤ {GOALS['two_task_vs_one']}× ({'yes' if lat['two_task_vs_one'] <= GOALS['two_task_vs_one'] else 'NO'}) |",
        f"| digit then face, in turn (ONNX Runtime) | {mean['digit then face']:.2f} | ±{50 * lat['spread']['digit then face']:.0f}% | {lat['in_turn_vs_one']:.2f}× |"
        f" ≥ {GOALS['in_turn_vs_one']}× ({'yes' if lat['in_turn_vs_one'] >= GOALS['in_turn_vs_one'] else 'NO'}) |",
        f"| two-task model, eager PyTorch | {mean['eager two-task']:.2f} | ±{50 * lat['spread']['eager two-task']:.0f}% | {mean['eager two-task'] / mean['digit']:.2f}× | |",
        "",
        "## INT8 (ONNX Runtime, default guard: 1.0 point, the worst task decides)",
        "",
    ]
    if "refused" in quant:
        lines.append(f"refused after {quant['seconds']} s: {quant['refused']}")
    else:
        guard = quant["guard"]
        lines += [
            f"{quant['variant']}: built in {quant['seconds']} s; guard: {guard['method']}, {quant['kept_in_float']} layer(s) in float,"
            f" worst task's disagreement with float {guard['disagreement_points']} points on the selection images (budget {guard['budget_points']}).",
            "",
            "| task | test images | float top-1 | INT8 top-1 | change, points | paired 95% interval |",
            "|---|---|---|---|---|---|",
        ]
        for task, row in quant["tasks"].items():
            low, high = row["change_interval"]
            lines.append(
                f"| {task} | {row['images']} | {100 * row['float_top1']:.2f}% | {100 * row['int8_top1']:.2f}% | {row['change_points']:+.2f} | {low:+.2f} to {high:+.2f} |"
            )
        alone = quant.get("digit_alone") or {}
        lines += ["", f"Integer coverage of the two-task INT8 model: {quant.get('int8_macs_percent')}% of its multiply-accumulates run in int8."]
        if "refused" in alone:
            lines.append(f"The single-task digit run's INT8 build with the same options was refused: {alone['refused']}")
        elif alone:
            low, high = alone["change_interval"] or (float("nan"), float("nan"))
            lines.append(
                f"The single-task digit run's INT8 build with the same options, for comparison: {alone['kept_in_float']} layer(s) in float,"
                f" {alone['int8_macs_percent']}% of MACs in int8, disagreement {alone['disagreement_points']} points on its selection images,"
                f" test top-1 change {alone['change_points']:+.2f} ({low:+.2f} to {high:+.2f}); built in {alone['seconds']} s."
            )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    mean = report["latency"]["mean_ms"]
    fig = Figure(figsize=(11, 4))
    bars, acc_ax = fig.subplots(1, 2)
    names = ["digit", "two-task", "digit then face"]
    bars.bar(names, [mean[n] for n in names], color=["#8aa", "#2a7", "#c66"])
    bars.set(title="batch-1 latency (ms)", ylabel="ms")
    tasks = list(report["accuracy"])
    for offset, (key, label) in enumerate((("single_top1", "own model"), ("two_task_top1", "two-task model"))):
        acc_ax.bar([i + 0.4 * offset for i in range(len(tasks))], [100 * report["accuracy"][t][key] for t in tasks], 0.4, label=label)
    acc_ax.set_xticks([i + 0.2 for i in range(len(tasks))], tasks)
    acc_ax.set(title="test top-1 (%)", ylim=(50, 100.5))
    acc_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.3, help="each task's test share (more test images, narrower intervals)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--no-int8", action="store_true", help="skip the INT8 build")
    parser.add_argument("--out", default="multitask", help="results stem under benchmarks/results/")
    args = parser.parse_args()
    set_quiet(True)
    with tempfile.TemporaryDirectory(prefix="multitask-") as folder:
        runs = train(Path(folder), args)
        models = {name: Predictor(run / "model.onnx", threads=args.threads, batch_size=64) for name, run in runs.items()}
        report = {
            "settings": vars(args),
            "machine": fingerprint(args.threads),
            "accuracy": accuracy(runs, models),
            "latency": latency(runs, args),
            "int8": {"refused": "skipped (--no-int8)", "seconds": 0} if args.no_int8 else int8(runs, args.threads),
        }
    save_results(args.out, report, markdown(report))
    plot(report, Path(__file__).parent / "results" / f"{args.out}.png")


if __name__ == "__main__":
    main()
