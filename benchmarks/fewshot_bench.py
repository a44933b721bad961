"""Few-shot heads and enrolment: the prototype head against a linear head trained on the same shots.

    python benchmarks/fewshot_bench.py                 # about 6 minutes on 2 cores
    python benchmarks/fewshot_bench.py --episodes 100  # a quick look

1. Features of every demo digit (1797 images) from the embedded EfficientNet-Lite0, once per
   image size (64 px, the demo's, and 224 px, the weights' own), through edgetransfer's own
   preprocessing and the classifier's input, as ``finetune`` caches them.
2. Episodes (``--episodes``, 600 by default) of N-way K-shot: N classes drawn, K support images
   and 15 query images per class, disjoint. On the same support set:
   * prototype head, as ``finetune --mode prototype --shots K`` builds it (centre on the
     support mean, L2-normalise, class means, cosine);
   * linear head, as ``finetune --mode head --shots K`` trains it (its resolved defaults: AdamW,
     lr 1e-2, weight decay 1e-4, label smoothing 0.1, 30 epochs, 1 warm-up epoch, cosine,
     batch 64, on the cached features).
   Mean query top-1 and its 95% interval over episodes, and the paired difference.
3. Full data: the demo's own split (train, then test images no stage chose on), both heads.
4. Enrolment in the runtime at 224 px: a prototype model made without one digit, that digit
   enrolled from 5 of its training images (decode, features, prototype, write; median of 9),
   and the enrolled model on the test images of every digit, the enrolled one included.
Writes benchmarks/results/fewshot.{md,json,png}.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fingerprint import fingerprint, save_results

QUERIES = 15
SETTINGS = [(5, 1), (5, 5), (10, 5)]  # (ways, shots); 10 ways is every demo class
SIZES = [64, 224]
THREADS = 2


def features_of(samples, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the classifier of the embedded Lite0 reads, for every sample (eval transform)."""
    from edgetransfer.data import TorchImages, eval_transform
    from edgetransfer.models import build

    built = build("timm:efficientnet_lite0", 10, "embedded", size)
    captured: list[torch.Tensor] = []
    hook = built.heads[0].register_forward_pre_hook(lambda m, args: captured.append(args[0].float()))
    loader = torch.utils.data.DataLoader(TorchImages(samples, eval_transform(built.preprocessing)), batch_size=64)
    labels = []
    with torch.no_grad():
        for x, y in loader:
            built.module(x)
            labels.append(y)
    hook.remove()
    return torch.cat(captured), torch.cat(labels)


def prototype_predict(support_x, support_y, query_x, ways: int, whiten: bool = True) -> torch.Tensor:
    """``finetune --mode prototype``'s head from the support set; ``whiten=False`` is SimpleShot's CL2N alone."""
    from edgetransfer.prototype import embed, fit_head, prototypes_from

    if whiten:
        head = fit_head(support_x, support_y, ways)
        return (head.embed(query_x) @ head.prototypes.t()).argmax(1)
    center = support_x.mean(0)
    prototypes = prototypes_from(embed(support_x, center), support_y, ways)
    return (embed(query_x, center) @ prototypes.t()).argmax(1)


def linear_predict(support_x, support_y, query_x, ways: int, seed: int) -> tuple[torch.Tensor, float]:
    """``finetune --mode head``'s training on cached features, with its resolved defaults."""
    from edgetransfer.config import FinetuneConfig
    from edgetransfer.train.trainer import make_optimizer
    from edgetransfer.training import cosine_with_warmup

    started = time.perf_counter()
    config = FinetuneConfig(mode="head").resolved()
    torch.manual_seed(seed)
    head = torch.nn.Linear(support_x.shape[1], ways)
    optimizer = make_optimizer(config, [{"params": list(head.parameters()), "lr": config.lr, "name": "head"}])
    steps = math.ceil(len(support_y) / config.batch_size)
    schedule = cosine_with_warmup(optimizer, config.epochs, config.warmup_epochs, steps)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(config.epochs):
        order = torch.randperm(len(support_y), generator=generator)
        for start in range(0, len(order), config.batch_size):
            index = order[start : start + config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            criterion(head(support_x[index]), support_y[index]).backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        return head(query_x).argmax(1), time.perf_counter() - started


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and its 95% interval (normal approximation over episodes), in points."""
    mean = statistics.fmean(values)
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return 100 * mean, 100 * (mean - half), 100 * (mean + half)


def episodes(x: torch.Tensor, y: torch.Tensor, ways: int, shots: int, count: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    by_class = {c: np.flatnonzero(y.numpy() == c) for c in range(int(y.max()) + 1)}
    proto, plain, linear, difference, train_s, proto_s = [], [], [], [], [], []
    for episode in range(count):
        classes = rng.choice(len(by_class), ways, replace=False)
        support, query, support_y, query_y = [], [], [], []
        for new, c in enumerate(classes):
            chosen = rng.choice(by_class[c], shots + QUERIES, replace=False)
            support += list(chosen[:shots])
            query += list(chosen[shots:])
            support_y += [new] * shots
            query_y += [new] * QUERIES
        sx, qx = x[support], x[query]
        sy, qy = torch.tensor(support_y), torch.tensor(query_y)
        tick = time.perf_counter()
        p = float((prototype_predict(sx, sy, qx, ways) == qy).float().mean())
        proto_s.append(time.perf_counter() - tick)
        plain.append(float((prototype_predict(sx, sy, qx, ways, whiten=False) == qy).float().mean()))
        predicted, seconds = linear_predict(sx, sy, qx, ways, seed * 100_000 + episode)
        lin = float((predicted == qy).float().mean())
        proto.append(p)
        linear.append(lin)
        difference.append(p - lin)
        train_s.append(seconds)
    return {
        "ways": ways,
        "shots": shots,
        "queries_per_class": QUERIES,
        "episodes": count,
        "prototype": interval(proto),
        "cl2n": interval(plain),
        "linear": interval(linear),
        "difference": interval(difference),
        "linear_train_ms": 1000 * statistics.median(train_s),
        "prototype_ms": 1000 * statistics.median(proto_s),
    }


def full_data(x: torch.Tensor, y: torch.Tensor, train: int, test: int, size: int) -> dict:
    """Both heads on the demo's own split: the first ``train`` rows in, the last ``test`` rows
    (test images, chosen on by nothing) out."""
    tx, ty, qx, qy = x[:train], y[:train], x[-test:], y[-test:]
    proto = float((prototype_predict(tx, ty, qx, 10) == qy).float().mean())
    plain = float((prototype_predict(tx, ty, qx, 10, whiten=False) == qy).float().mean())
    predicted, seconds = linear_predict(tx, ty, qx, 10, 0)
    return {
        "size": size,
        "train_images": len(ty),
        "test_images": len(qy),
        "prototype": 100 * proto,
        "cl2n": 100 * plain,
        "linear": 100 * float((predicted == qy).float().mean()),
        "linear_train_s": seconds,
    }


def enrolment_by_digit(x: torch.Tensor, y: torch.Tensor, train: int, test: int, shots_list=(1, 5, 20), draws: int = 20) -> dict:
    """Each digit in turn left out of a full-data prototype head, then enrolled from K of its
    training images (``draws`` random choices), with the runtime's arithmetic: the normalised mean
    of the head's embeddings. Top-1 on the test images, of the enrolled digit and of the others."""
    from edgetransfer.prototype import fit_head, l2_normalize

    rng = np.random.default_rng(0)
    tx, ty, qx, qy = x[:train], y[:train], x[-test:], y[-test:]
    rows = []
    for digit in range(10):
        keep = ty != digit
        old = sorted(set(ty[keep].tolist()))
        remap = {c: i for i, c in enumerate(old)}
        head = fit_head(tx[keep], torch.tensor([remap[int(c)] for c in ty[keep]]), len(old))
        candidates = np.flatnonzero((ty == digit).numpy())
        query = head.embed(qx)
        truth = torch.tensor([remap.get(int(c), len(old)) for c in qy])
        for shots in shots_list:
            new_top1, old_top1 = [], []
            for _ in range(draws):
                chosen = rng.choice(candidates, shots, replace=False)
                prototype = l2_normalize(head.embed(tx[chosen]).mean(0, keepdim=True))
                predicted = (query @ torch.cat([head.prototypes, prototype]).t()).argmax(1)
                right = predicted == truth
                new_top1.append(float(right[truth == len(old)].float().mean()))
                old_top1.append(float(right[truth != len(old)].float().mean()))
            rows.append({"digit": digit, "shots": shots, "new": 100 * statistics.fmean(new_top1), "old": 100 * statistics.fmean(old_top1)})
    summary = {}
    for shots in shots_list:
        chosen = [r for r in rows if r["shots"] == shots]
        summary[shots] = {
            "new": statistics.fmean(r["new"] for r in chosen),
            "new_min": min(r["new"] for r in chosen),
            "new_max": max(r["new"] for r in chosen),
            "old": statistics.fmean(r["old"] for r in chosen),
        }
    return {"draws": draws, "rows": rows, "summary": summary}


def enrolment_cost(work: Path, held_out: int = 9, shots: int = 5, repeats: int = 9) -> dict:
    """A 224 px prototype model without one digit; that digit enrolled in the runtime from 5 images."""
    from PIL import Image

    from edgetransfer.config import FinetuneConfig
    from edgetransfer.data import DataSpec, load_dataset
    from edgetransfer.export import export_onnx
    from edgetransfer.finetune import finetune
    from edgetransfer.runtime import Predictor

    dataset = load_dataset(DataSpec())
    folder = work / "digits-without-9"
    for sample in dataset.train + dataset.val:  # the run makes its own split of these; test stays unseen
        if sample.label != held_out:
            (folder / str(sample.label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(sample.source).save(folder / str(sample.label) / f"{sample.name.split('/')[-1]}.png")
    run = work / "proto224"
    if not (run / "model.onnx").is_file():
        finetune(FinetuneConfig(data=DataSpec(source=str(folder), test_fraction=0.0), mode="prototype", image_size=224), run)
        export_onnx(run)
    support = [s for s in dataset.train if s.label == held_out][:shots]
    files = []
    for index, sample in enumerate(support):
        path = work / f"enrol-{index}.png"
        Image.fromarray(sample.source).resize((224, 224), Image.BICUBIC).save(path)
        files.append(path)
    timings = {"enrol": [], "save": []}
    for _ in range(repeats):
        predictor = Predictor(run / "model.onnx", threads=THREADS)
        tick = time.perf_counter()
        done = predictor.enrol(str(held_out), [str(f) for f in files])
        middle = time.perf_counter()
        predictor.save(work / "enrolled.onnx")
        timings["enrol"].append(middle - tick)
        timings["save"].append(time.perf_counter() - middle)
    enrolled = Predictor(work / "enrolled.onnx", threads=THREADS)
    test = dataset.test
    predicted = [int(enrolled.labels[int(np.argmax(row))]) for row in enrolled.logits([s.source for s in test])]
    truth = [s.label for s in test]
    new = [p == t for p, t in zip(predicted, truth, strict=True) if t == held_out]
    old = [p == t for p, t in zip(predicted, truth, strict=True) if t != held_out]
    cli = _cli_seconds(run / "model.onnx", files, work)
    return {
        "image_size": 224,
        "shots": shots,
        "held_out_class": str(held_out),
        "repeats": repeats,
        "enrol_s": statistics.median(timings["enrol"]),
        "save_s": statistics.median(timings["save"]),
        "total_s": statistics.median(a + b for a, b in zip(timings["enrol"], timings["save"], strict=True)),
        "model_mb": (work / "enrolled.onnx").stat().st_size / 1e6,
        "recognised_support": done.recognised,
        "new_class_test_top1": 100 * statistics.fmean(new),
        "new_class_test_images": len(new),
        "old_classes_test_top1": 100 * statistics.fmean(old),
        "old_classes_test_images": len(old),
        "cli_s": cli,
    }


def _cli_seconds(model: Path, files: list[Path], work: Path) -> float:
    """``edgetransfer-runtime enrol`` end to end in a fresh process (Python start, session, write)."""
    import shutil
    import subprocess

    runtime = Path(sys.executable).with_name("edgetransfer-runtime")
    times = []
    for _ in range(3):
        out = work / "cli-enrolled.onnx"
        out.unlink(missing_ok=True)
        tick = time.perf_counter()
        subprocess.run(
            [str(runtime), "enrol", str(model), "--label", "9", *map(str, files), "--output", str(out), "--threads", str(THREADS)],
            check=True,
            capture_output=True,
        )
        times.append(time.perf_counter() - tick)
    shutil.rmtree(work / "ort-trt-cache", ignore_errors=True)
    return statistics.median(times)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Few-shot heads: prototype vs linear on the same shots, and enrolment in the runtime",
        "",
        f"Machine: {m['cpu']['model']}, {m['cores']} cores, flags {', '.join(m['cpu']['flags'])}; torch {THREADS} threads."
        " Produced by `python benchmarks/fewshot_bench.py`.",
        "",
        f"## Episodes ({report['episodes']} per row; {QUERIES} query images per class, disjoint from the support images)",
        "",
        "Embedded EfficientNet-Lite0 on the demo digits. Prototype: `finetune --mode prototype --shots K` (no training)."
        " Linear: `finetune --mode head --shots K` (30 epochs on cached features). Mean query top-1 over episodes"
        " with its 95% interval; the difference is paired (same episodes).",
        "",
        "| size | setting | prototype | (CL2N only, no whitening) | linear head | prototype − linear | linear training per episode |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["episodes_table"]:
        p, lin, d = row["prototype"], row["linear"], row["difference"]
        lines.append(
            f"| {row['size']} px | {row['ways']}-way {row['shots']}-shot | {p[0]:.2f}% ({p[1]:.2f}…{p[2]:.2f}) |"
            f" {row['cl2n'][0]:.2f}% |"
            f" {lin[0]:.2f}% ({lin[1]:.2f}…{lin[2]:.2f}) | {d[0]:+.2f} ({d[1]:+.2f}…{d[2]:+.2f}) |"
            f" {row['linear_train_ms']:.0f} ms (prototype {row['prototype_ms']:.2f} ms) |"
        )
    lines += [
        "",
        "## Full data (the demo's split; test images no stage chose on)",
        "",
        "| size | train images | test images | prototype | (CL2N only) | linear head | prototype − linear |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["full_data"]:
        lines.append(
            f"| {row['size']} px | {row['train_images']} | {row['test_images']} | {row['prototype']:.2f}% | {row['cl2n']:.2f}% |"
            f" {row['linear']:.2f}% | {row['prototype'] - row['linear']:+.2f} |"
        )
    e = report["enrolment"]
    lines += [
        "",
        "## Enrolment in the runtime (224 px, 2 threads)",
        "",
        f"A prototype model trained without digit {e['held_out_class']}; that digit enrolled from {e['shots']} of its"
        f" training images with `Predictor.enrol` and `save` (median of {e['repeats']}).",
        "",
        "| step | seconds |",
        "|---|---|",
        f"| decode, features, prototype, new model in memory (`enrol`) | {e['enrol_s']:.3f} |",
        f"| write the {e['model_mb']:.1f} MB model atomically (`save`) | {e['save_s']:.3f} |",
        f"| **total (goal ≤ 1 s)** | **{e['total_s']:.3f}** |",
        f"| `edgetransfer-runtime enrol` in a fresh process (Python start, session, enrol, write) | {e['cli_s']:.2f} |",
        "",
        f"Of its {e['shots']} support images the new model gives {e['recognised_support']} the new class. On the test"
        f" images: digit {e['held_out_class']} {e['new_class_test_top1']:.2f}% of {e['new_class_test_images']}, the"
        f" other digits {e['old_classes_test_top1']:.2f}% of {e['old_classes_test_images']}.",
        "",
    ]
    d = report["enrolment_by_digit"]
    lines += [
        "## Enrolment, every digit in turn (224 px features, the runtime's arithmetic)",
        "",
        "Each digit left out of a full-data prototype head, then enrolled from K of its training images"
        f" ({d['draws']} random draws per digit); top-1 on the 179 test images.",
        "",
        "| K | enrolled digit: mean over digits (worst…best) | the other nine digits |",
        "|---|---|---|",
    ]
    for shots, row in d["summary"].items():
        lines.append(f"| {shots} | {row['new']:.1f}% ({row['new_min']:.1f}…{row['new_max']:.1f}) | {row['old']:.1f}% |")
    lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["episodes_table"]
    fig, ax = plt.subplots(figsize=(9, 4))
    names = [f"{r['size']} px\n{r['ways']}-way {r['shots']}-shot" for r in rows]
    positions = np.arange(len(rows))
    for offset, key, label in ((-0.2, "prototype", "prototype (no training)"), (0.2, "linear", "linear head (30 epochs)")):
        means = [r[key][0] for r in rows]
        errors = [[r[key][0] - r[key][1] for r in rows], [r[key][2] - r[key][0] for r in rows]]
        ax.bar(positions + offset, means, 0.4, yerr=errors, capsize=3, label=label)
    ax.set_xticks(positions, names)
    ax.set_ylabel(f"query top-1 (%), mean of {report['episodes']} episodes, 95% interval")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right")
    ax.set_title("Few-shot on the demo digits, embedded EfficientNet-Lite0")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--work", type=Path, default=None, help="keep the enrolment run here")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    from edgetransfer.data import DataSpec, load_dataset

    dataset = load_dataset(DataSpec())
    everything = dataset.train + dataset.val + dataset.test
    table, full = [], []
    for size in SIZES:
        started = time.perf_counter()
        x, y = features_of(everything, size)
        print(f"features at {size} px: {len(y)} images in {time.perf_counter() - started:.0f} s", flush=True)
        full.append(full_data(x, y, len(dataset.train), len(dataset.test), size))
        if size == 224:
            by_digit = enrolment_by_digit(x, y, len(dataset.train), len(dataset.test))
        for seed, (ways, shots) in enumerate(SETTINGS):
            row = episodes(x, y, ways, shots, args.episodes, seed + 1)
            table.append({"size": size, **row})
            print(f"{size} px {ways}-way {shots}-shot: prototype {row['prototype'][0]:.2f}%, linear {row['linear'][0]:.2f}%", flush=True)
    report = {"machine": fingerprint(THREADS), "episodes": args.episodes, "episodes_table": table, "full_data": full, "enrolment_by_digit": by_digit}
    with tempfile.TemporaryDirectory(prefix="fewshot-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report["enrolment"] = enrolment_cost(work)
    save_results("fewshot", report, markdown(report))
    plot(report, Path(__file__).parent / "results" / "fewshot.png")


if __name__ == "__main__":
    main()
