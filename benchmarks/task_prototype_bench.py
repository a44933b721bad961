"""A prototype head as one task of a multi-task model, and enrolment into that task alone.

Trains, with the same settings (head mode, the same seed, epochs and image size): the two-task
demo with a prototype face task (``--tasks demo --task-head face=prototype``), the same demo with
two Linear heads, and the single-task prototype model of faces (``--data faces --mode
prototype``); exports them to ONNX and measures, in one process:

* **accuracy** on each task's test images (no stage chose on them), paired: the face task against
  the single-task prototype model, the digit task against the all-Linear two-task model;
* **enrolment** of a new class into the face task (``Predictor.enrol``, no torch) from a few
  images: how often held-out images of the class get it, how many face test answers change, and
  whether the digit task's logits change at all (they must not: bit for bit);
* **latency at batch 1**: one ``edgetransfer bench`` run of the prototype-task run against the
  all-Linear two-task model (``--model``), in interleaved rounds;
* **INT8**: the prototype-task model's ONNX Runtime INT8 variant under the default guard, each
  task's change against float, and enrolment into the INT8 model.

Writes ``benchmarks/results/task-prototype.{md,json}``. Run:
``python benchmarks/task_prototype_bench.py`` (about 12 minutes on 2 cores at 224 px).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgetransfer.bench import BenchOptions, bench_run
from edgetransfer.config import FinetuneConfig
from edgetransfer.data import DEMO, FACES, DataSpec, load_dataset, load_image
from edgetransfer.errors import EdgeTransferError
from edgetransfer.export import export_onnx
from edgetransfer.finetune import finetune
from edgetransfer.metrics import wilson_interval
from edgetransfer.optimize import Precision, QuantOptions, Target, build_variants
from edgetransfer.progress import set_quiet
from edgetransfer.runtime import Predictor
from edgetransfer.runtime.predictor import prepare
from edgetransfer.runtime.sessions import open_session
from edgetransfer.tasks import tasks_option, with_heads

sys.path.insert(0, str(Path(__file__).parent))
from multitask_bench import paired_change  # noqa: E402

from fingerprint import fingerprint, save_results  # noqa: E402

NEW_CLASS = "digit"  # enrolled into the face task: handwritten digits are neither faces nor lfw's non-faces


def train(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    """The three runs, with the same settings, each exported to ONNX."""
    settings = {"epochs": args.epochs, "image_size": args.image_size, "seed": args.seed}
    split = DataSpec(test_fraction=args.test_fraction, seed=args.seed)
    configs = {
        "prototype-task": FinetuneConfig(tasks=with_heads(tasks_option("demo", split), ("face=prototype",)), **settings),
        "linear-task": FinetuneConfig(tasks=tasks_option("demo", split), **settings),
        "face-prototype": FinetuneConfig(data=replace(split, source=FACES), mode="prototype", **settings),
    }
    runs = {}
    for name, config in configs.items():
        started = time.perf_counter()
        runs[name] = work / name
        finetune(config, runs[name])
        export_onnx(runs[name])
        print(f"{name}: trained and exported in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return runs


def split_images(source: str, args: argparse.Namespace, part: str) -> tuple[list, np.ndarray]:
    """A task's images of one split, as a run with these settings splits them."""
    dataset = load_dataset(DataSpec(source=source, test_fraction=args.test_fraction, seed=args.seed))
    samples = getattr(dataset, part)
    return [load_image(s) for s in samples], np.array([s.label for s in samples])


def top1(predictor: Predictor, images: list, task: str | None) -> np.ndarray:
    answers = predictor.predict(images, top_k=1)
    return np.array([(a[task] if task else a)[0].index for a in answers])


def accuracy(runs: dict[str, Path], tests: dict, threads: int) -> dict:
    models = {name: Predictor(run / "model.onnx", threads=threads, batch_size=64) for name, run in runs.items()}
    rows = {}
    for task, other, other_task in (("face", "face-prototype", None), ("digit", "linear-task", "digit")):
        images, labels = tests[task]
        mine = top1(models["prototype-task"], images, task) == labels
        theirs = top1(models[other], images, other_task) == labels
        rows[task] = {
            "against": other,
            "images": len(labels),
            "theirs_top1": float(theirs.mean()),
            "mine_top1": float(mine.mean()),
            "mine_interval": wilson_interval(int(mine.sum()), len(labels)),
            **paired_change(theirs, mine),
        }
    return rows


def logits(model: bytes, images: list, info, output: str) -> np.ndarray:
    session = open_session(model)
    feed = np.stack([prepare(image, info) for image in images])
    return np.concatenate([session.run([output], {"input": feed[i : i + 64]})[0] for i in range(0, len(feed), 64)])


def enrolment(model: Path, tests: dict, args: argparse.Namespace) -> dict:
    """Enrol ``NEW_CLASS`` into the face task from ``args.shots`` training digits; measure on the
    test digits (never enrolled from) and the face test images."""
    predictor = Predictor(model, threads=args.threads, batch_size=64)
    digits, _ = tests["digit"]
    faces, face_labels = tests["face"]
    shots, _ = split_images(DEMO, args, "train")
    before_faces = top1(predictor, faces, "face")
    before_digit = logits(predictor.model_bytes(), digits, predictor.info, "logits_digit")
    done = predictor.enrol(NEW_CLASS, shots[: args.shots])
    after_digit = logits(predictor.model_bytes(), digits, predictor.info, "logits_digit")
    new = len(predictor.tasks.labels[1]) - 1
    digits_as_new = int((top1(predictor, digits, "face") == new).sum())
    after_faces = top1(predictor, faces, "face")
    return {
        "shots": args.shots,
        "seconds": round(done.seconds, 3),
        "recognised_of_shots": done.recognised,
        "test_digits": len(digits),
        "test_digits_as_new_class": digits_as_new,
        "test_digits_interval": wilson_interval(digits_as_new, len(digits)),
        "face_test_images": len(face_labels),
        "face_answers_changed": int((before_faces != after_faces).sum()),
        "face_top1_before": float((before_faces == face_labels).mean()),
        "face_top1_after": float((after_faces == face_labels).mean()),
        "digit_logits_max_abs_change": float(np.abs(after_digit - before_digit).max()),
    }


def latency(runs: dict[str, Path], args: argparse.Namespace) -> dict:
    options = BenchOptions(
        batch_sizes=(1,),
        threads=args.threads,
        rounds=args.rounds,
        iterations=args.iterations,
        variants=("onnx",),
        models=(runs["linear-task"] / "model.onnx",),
    )
    report = bench_run(runs["prototype-task"], options, out_dir=runs["prototype-task"] / "bench")
    rows = {row.variant: row for row in report.results}
    mine, theirs = next(iter(rows["onnx"].latency.values())), next(iter(rows["model.onnx"].latency.values()))
    return {
        "prototype_task_ms": round(mine.mean_ms, 3),
        "linear_task_ms": round(theirs.mean_ms, 3),
        "spread": {"prototype-task": round(mine.spread or 0.0, 3), "linear-task": round(theirs.spread or 0.0, 3)},
        "ratio": round(mine.mean_ms / theirs.mean_ms, 3),
        "rounds": args.rounds,
        "iterations": mine.iterations,
    }


def int8(run: Path, tests: dict, args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    try:
        variant = build_variants(run, [Target.ORT_CPU], [Precision.INT8], QuantOptions())[0]
    except EdgeTransferError as exc:
        return {"refused": str(exc), "seconds": round(time.perf_counter() - started, 1)}
    seconds = round(time.perf_counter() - started, 1)
    float_model, quantised = Predictor(run / "model.onnx", threads=args.threads), Predictor(variant.path, threads=args.threads)
    tasks = {}
    for task in ("digit", "face"):
        images, labels = tests[task]
        before, after = top1(float_model, images, task) == labels, top1(quantised, images, task) == labels
        tasks[task] = {"images": len(labels), "float_top1": float(before.mean()), "int8_top1": float(after.mean()), **paired_change(before, after)}
    guard = variant.report.details.get("guard", {})
    return {
        "seconds": seconds,
        "guard": {k: guard.get(k) for k in ("method", "criterion", "disagreement_points", "budget_points")},
        "kept_in_float": len(variant.report.kept_in_float or []),
        "int8_macs_percent": round(100 * variant.report.coverage.share, 1) if variant.report.coverage else None,
        "tasks": tasks,
        "enrolment": enrolment(variant.path, tests, args),
    }


def markdown(report: dict) -> str:
    machine, args = report["machine"], report["settings"]
    cpu, acc, enrol, lat, quant = machine["cpu"], report["accuracy"], report["enrolment"], report["latency"], report["int8"]
    lines = [
        "# A prototype task in a multi-task model, and enrolment into that task alone",
        "",
        f"timm:efficientnet_lite0 (embedded weights), head mode, {args['image_size']} px, {args['epochs']} epochs, seed {args['seed']},"
        f" each task split 0.2 validation / {args['test_fraction']} test, the same settings for every run. Tasks: digit (a Linear head,"
        " trained) and face (a prototype head: class means of the frozen features, whitened; no training).",
        "",
        f"Machine: {cpu['model']} ({', '.join(cpu['flags'])}; cpuinfo: {', '.join(cpu['cpuinfo_flags'])}), {machine['cores']} cores;"
        f" ONNX Runtime (CPU), {args['threads']} threads. Produced by `python benchmarks/task_prototype_bench.py`.",
        "",
        "## Accuracy: each task's test images, paired",
        "",
        "| task | against | test images | its top-1 | this model's top-1 (95%) | change, points | paired 95% interval |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, row in acc.items():
        low, high = row["change_interval"]
        lines.append(
            f"| {task} | {row['against']} | {row['images']} | {100 * row['theirs_top1']:.2f}% | {100 * row['mine_top1']:.2f}%"
            f" ({row['mine_interval'][0]:.1f}–{row['mine_interval'][1]:.1f}) | {row['change_points']:+.2f} | {low:+.2f} to {high:+.2f} |"
        )
    lines += ["", f"## Enrolment: class `{NEW_CLASS}` into the face task from {enrol['shots']} images (no torch)", ""]
    lines += _enrolment_rows(enrol, "FP32")
    lines += [
        "",
        f"## Latency at batch 1 (one `edgetransfer bench` run: {lat['rounds']} interleaved rounds, {lat['iterations']} calls each)",
        "",
        f"The prototype-task model {lat['prototype_task_ms']:.2f} ms (±{50 * lat['spread']['prototype-task']:.0f}%), the all-Linear two-task model"
        f" {lat['linear_task_ms']:.2f} ms (±{50 * lat['spread']['linear-task']:.0f}%): {lat['ratio']:.2f}×.",
        "",
        "## INT8 (ONNX Runtime, default guard: 1.0 point, the worst task decides)",
        "",
    ]
    if "refused" in quant:
        lines.append(f"refused after {quant['seconds']} s: {quant['refused']}")
        return "\n".join(lines) + "\n"
    guard = quant["guard"]
    lines += [
        f"Built in {quant['seconds']} s; guard: {guard['method']}, {quant['kept_in_float']} layer(s) in float (the prototype head stays float"
        f" by design and is not counted), worst task's disagreement {guard['disagreement_points']} points (budget {guard['budget_points']});"
        f" {quant['int8_macs_percent']}% of the multiply-accumulates in int8.",
        "",
        "| task | test images | float top-1 | INT8 top-1 | change, points | paired 95% interval |",
        "|---|---|---|---|---|---|",
    ]
    for task, row in quant["tasks"].items():
        low, high = row["change_interval"]
        lines.append(
            f"| {task} | {row['images']} | {100 * row['float_top1']:.2f}% | {100 * row['int8_top1']:.2f}% | {row['change_points']:+.2f} | {low:+.2f} to {high:+.2f} |"
        )
    lines += ["", "Enrolment into the INT8 model, the same way:", ""] + _enrolment_rows(quant["enrolment"], "INT8")
    return "\n".join(lines) + "\n"


def _enrolment_rows(enrol: dict, model: str) -> list[str]:
    low, high = enrol["test_digits_interval"]
    return [
        "| measure | value |",
        "|---|---|",
        f"| {model} model: time to enrol (features, prototype, rewritten model in memory) | {enrol['seconds']:.3f} s |",
        f"| test digits (never enrolled from) answered `{NEW_CLASS}` by the face task | {enrol['test_digits_as_new_class']} of {enrol['test_digits']}"
        f" ({100 * enrol['test_digits_as_new_class'] / enrol['test_digits']:.1f}%, 95% {low:.1f}–{high:.1f}) |",
        f"| face test answers changed by the new class | {enrol['face_answers_changed']} of {enrol['face_test_images']}"
        f" (top-1 {100 * enrol['face_top1_before']:.2f}% → {100 * enrol['face_top1_after']:.2f}%) |",
        f"| digit task: largest change of any logit on the test digits | {enrol['digit_logits_max_abs_change']:g} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--shots", type=int, default=5, help="images the new class is enrolled from")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--no-int8", action="store_true", help="skip the INT8 build")
    parser.add_argument("--out", default="task-prototype", help="results stem under benchmarks/results/")
    args = parser.parse_args()
    set_quiet(True)
    with tempfile.TemporaryDirectory(prefix="task-prototype-") as folder:
        runs = train(Path(folder), args)
        tests = {"digit": split_images(DEMO, args, "test"), "face": split_images(FACES, args, "test")}
        report = {
            "settings": vars(args),
            "machine": fingerprint(args.threads),
            "accuracy": accuracy(runs, tests, args.threads),
            "enrolment": enrolment(runs["prototype-task"] / "model.onnx", tests, args),
            "latency": latency(runs, args),
            "int8": {"refused": "skipped (--no-int8)", "seconds": 0} if args.no_int8 else int8(runs["prototype-task"], tests, args),
        }
    save_results(args.out, report, markdown(report))


if __name__ == "__main__":
    main()
