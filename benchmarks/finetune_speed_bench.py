"""How fast fine-tuning runs, by part: the frozen pass of head mode against ONNX Runtime, loading
alone, and full and QAT training steps (forward, backward) by memory layout, precision and
allocator, against the step as it ran before, at 224 px.

    python benchmarks/finetune_speed_bench.py                # demo parts and runs, about 5 minutes on 2 cores
    python benchmarks/finetune_speed_bench.py --images 20000 # plus head mode on a generated folder of 20,000 JPEGs

Writes benchmarks/results/finetune-speed.json and .md. Every figure is images per second in this
process (or seconds end to end), with the thread count fixed and the CPU's flags recorded; ratios
are against a baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

from edgetransfer.config import FeatureEngine, FinetuneConfig, QatOptions
from edgetransfer.cpu import cpu_features
from edgetransfer.data import DataSpec, eval_transform, load_dataset, train_transform
from edgetransfer.finetune import finetune
from edgetransfer.models import build
from edgetransfer.progress import set_quiet
from edgetransfer.qat import run_qat
from edgetransfer.qat_fast import fast_quantizers
from edgetransfer.qat_scheme import fold_batchnorm, inplace_off, qat_scheme, quantize
from edgetransfer.runtime.sessions import open_session
from edgetransfer.train.allocator import kept_blocks
from edgetransfer.train.features import FrozenPass, channels_last
from edgetransfer.train.loops import depthwise_fp32, image_loader, precision_for
from edgetransfer.weights import DEFAULT_ARCH, default_weights

from fingerprint import fingerprint, save_results

SIZE = 224
BATCH = 64


def make_photo_digits(root: Path, count: int, size: int = SIZE, seed: int = 0) -> Path:
    """``count`` JPEG images of ``size`` px in ``root/<digit>/``: a real handwritten digit
    (scikit-learn's digits, scaled to a random 40-70% of the image) at a random offset on a random
    patch of a real photograph (scikit-learn's two sample photos), blended as MNIST-M and the
    "digits-m" demo are (``|patch - digit|``). Deterministic from ``seed``."""
    rng = np.random.default_rng(seed)
    digits = load_digits()
    photos = [np.asarray(image, dtype=np.int16) for image in load_sample_images().images]
    for label in range(10):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        label = index % 10
        glyph = (digits.images[rng.choice(np.flatnonzero(digits.target == label))] * (255 / 16)).round().astype(np.uint8)
        photo = photos[int(rng.integers(len(photos)))]
        top, left = int(rng.integers(photo.shape[0] - size)), int(rng.integers(photo.shape[1] - size))
        patch = photo[top : top + size, left : left + size].copy()
        side = int(size * rng.uniform(0.4, 0.7))
        digit = np.asarray(Image.fromarray(glyph).resize((side, side), Image.Resampling.BILINEAR), dtype=np.int16)
        y, x = int(rng.integers(size - side + 1)), int(rng.integers(size - side + 1))
        patch[y : y + side, x : x + side] = np.abs(patch[y : y + side, x : x + side] - digit[:, :, None])
        Image.fromarray(patch.astype(np.uint8)).save(root / str(label) / f"{index:05d}.jpg", quality=90)
    return root


def rate(step, images: int, repeats: int = 3) -> float:
    """Images per second of ``step`` (after one warm-up call), the best of ``repeats``."""
    step()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    return images / best


def forward_table(built, x: torch.Tensor) -> list[dict]:
    """The same forward pass of batch ``x`` by PyTorch (layouts, bf16 where native) and ONNX Runtime."""
    module = built.module.eval()
    rows = []
    with torch.no_grad():
        rows.append({"pass": "PyTorch eager, FP32, NCHW", "images_s": rate(lambda: module(x), len(x))})
        with channels_last(module):
            xc = x.contiguous(memory_format=torch.channels_last)
            rows.append({"pass": "PyTorch eager, FP32, channels-last", "images_s": rate(lambda: module(xc), len(x))})
            if precision_for(torch.device("cpu"), True) == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    rows.append({"pass": "PyTorch eager, channels-last, bf16 autocast", "images_s": rate(lambda: module(xc), len(x))})
            else:
                rows.append({"pass": "PyTorch eager, channels-last, bf16 autocast", "images_s": None, "why": "no native bf16 on this CPU"})
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x[:2],), f"{folder}/m.onnx", dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "b"}})
        session = open_session(f"{folder}/m.onnx", threads=torch.get_num_threads())
        array = x.numpy()
        rows.append({"pass": "ONNX Runtime FP32 (the same model)", "images_s": rate(lambda: session.run(None, {"x": array}), len(x))})
    return rows


def frozen_pass(built, samples, engine: FeatureEngine, workers: int) -> dict:
    """Head mode's whole frozen pass over ``samples`` as finetune runs it: loading, the check, the
    export, every batch."""
    config = FinetuneConfig(image_size=SIZE, batch_size=BATCH, workers=workers).resolved()
    frozen = FrozenPass(built, torch.device("cpu"), engine)
    started = time.perf_counter()
    features, _ = frozen.run(image_loader(samples, eval_transform(built.preprocessing), config, False), len(samples), lambda n: None)
    seconds = time.perf_counter() - started
    return {"engine": frozen.engine, "asked": engine.value, "images": len(features), "seconds": seconds, "images_s": len(features) / seconds}


def loading(built, samples, workers: int, augment: bool = False) -> dict:
    """Decoding and transforming alone (no model): what the loader delivers."""
    config = FinetuneConfig(image_size=SIZE, batch_size=BATCH, workers=workers).resolved()
    transform = train_transform(built.preprocessing, config.augment) if augment else eval_transform(built.preprocessing)
    started = time.perf_counter()
    count = sum(len(y) for _, y in image_loader(samples, transform, config, False))
    seconds = time.perf_counter() - started
    return {"workers": workers, "transform": "train" if augment else "eval", "images_s": count / seconds}


def step_rate(module, x: torch.Tensor, y: torch.Tensor, dtype) -> dict:
    """Images per second of one training step (forward, loss, backward, AdamW) of ``module`` on
    ``x``, with forward and backward + update timed apart."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
    loss_fn = torch.nn.CrossEntropyLoss()
    parts = {"forward": 0.0, "backward": 0.0}

    def step():
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(module(x).float(), y)
        middle = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        parts["forward"] += middle - started
        parts["backward"] += time.perf_counter() - middle

    per_s = rate(step, len(x), repeats=2)
    calls = 3
    return {"images_s": per_s, "forward_ms": 1000 * parts["forward"] / calls, "backward_and_update_ms": 1000 * parts["backward"] / calls}


def training_steps(x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """Full fine-tuning's step by layout, precision and allocator; the first row is the step as
    finetune ran it before (NCHW, FP32, glibc's default allocator), the last what it runs now on
    this CPU. A fresh model for each row, so no row trains on another's updates."""
    bf16 = precision_for(torch.device("cpu"), True) == "bf16"
    variants = [
        ("NCHW, FP32 (before)", False, None, False, False),
        ("channels-last, FP32", True, None, False, False),
        ("channels-last, FP32, freed blocks kept", True, None, False, True),
    ]
    if bf16:
        variants += [
            ("channels-last, bf16 autocast, freed blocks kept", True, torch.bfloat16, False, True),
            ("channels-last, bf16 autocast, depthwise in FP32, freed blocks kept", True, torch.bfloat16, True, True),
        ]
    rows = []
    for name, layout, dtype, depthwise, kept in variants:
        module = build(DEFAULT_ARCH, 10, default_weights(DEFAULT_ARCH), SIZE).module.train()
        data = x.contiguous(memory_format=torch.channels_last) if layout else x
        with channels_last(module, layout), kept_blocks() if kept else contextlib.nullcontext():
            if depthwise:
                depthwise_fp32(module)
            rows.append({"step": name, "finetune_now": False, **step_rate(module, data, y, dtype)})
    rows[-1]["finetune_now"] = True
    return rows


def qat_steps(x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """QAT's step (ModelOpt's fake quantisation, BatchNorm folded, calibrated on these images):
    as before (NCHW, ModelOpt's own forward), then what each change adds; the last is what
    ``finetune --from RUN --qat`` runs now. FP32 throughout: QAT mirrors the INT8 kernels."""
    variants = [
        ("NCHW, ModelOpt's quantizers (before)", False, False, False),
        ("channels-last, ModelOpt's quantizers", True, False, False),
        ("channels-last, quantizers in the tensor's layout", True, True, False),
        ("channels-last, quantizers in the tensor's layout, freed blocks kept", True, True, True),
    ]
    rows = []
    for name, layout, fast, kept in variants:
        module = build(DEFAULT_ARCH, 10, default_weights(DEFAULT_ARCH), SIZE).module.eval()
        fold_batchnorm(module, SIZE)
        inplace_off(module)
        quantize(module, qat_scheme("ort-cpu", cpu_features()), [x[:16]])
        module.train()
        data = x.contiguous(memory_format=torch.channels_last) if layout else x
        with (
            channels_last(module, layout),
            fast_quantizers(module) if fast else contextlib.nullcontext(),
            kept_blocks() if kept else contextlib.nullcontext(),
        ):
            rows.append({"step": name, **step_rate(module, data, y, None)})
    return rows


def end_to_end(work: Path, engine: FeatureEngine) -> dict:
    result = finetune(FinetuneConfig(image_size=SIZE, feature_engine=engine), work / f"demo-{engine.value}")
    metrics = result.metrics
    return {
        "command": f"edgetransfer finetune --image-size {SIZE} --feature-engine {engine.value}",
        "engine": metrics["frozen_pass"]["engine"],
        "total_s": metrics["timing"]["total_s"],
        "features_s": metrics["timing"]["features_s"],
        "train_pass_s": metrics["timing"]["train_pass_s"],
        "val_top1": metrics["final"]["top1"],
        "val_images": metrics["val_images"],
        "test_top1": metrics["test"]["top1"],
        "test_images": metrics["test"]["images"],
    }


def epochs_now(work: Path) -> list[dict]:
    """One epoch of full fine-tuning and one of QAT (on the head run ``end_to_end`` made), end to
    end as finetune runs them now: images per second over the epoch's training images, loading,
    steps and the validation pass included."""
    full = finetune(FinetuneConfig(image_size=SIZE, mode="full", epochs=1, probe_epochs=0), work / "full").metrics
    epoch = full["epochs"][0]
    rows = [
        {
            "command": f"edgetransfer finetune --image-size {SIZE} --mode full --epochs 1 --probe-epochs 0",
            "precision": full["precision"],
            "epoch_s": epoch["seconds"],
            "images_s": full["train_images"] / epoch["seconds"],
            "val_top1": full["final"]["top1"],
            "val_images": full["val_images"],
        }
    ]
    qat = run_qat(work / f"demo-{FeatureEngine.AUTO.value}", QatOptions(epochs=1)).metrics
    epoch = qat["history"][1]
    rows.append(
        {
            "command": "edgetransfer finetune --from RUN --qat --qat-epochs 1",
            "precision": "fp32",
            "epoch_s": epoch["seconds"],
            "images_s": full["train_images"] / epoch["seconds"],
            "val_top1": epoch["val_top1"],
            "val_images": full["val_images"],
        }
    )
    return rows


def tree_memory(process: subprocess.Popen, every: float = 0.3) -> dict:
    """Sample ``process`` and its children (the loader workers) until it ends: the largest sum of
    their proportional set sizes (a page shared by n processes counts 1/n in each, so the sum is
    what the tree takes from the machine), and the main process's largest unique set, over time."""
    main = psutil.Process(process.pid)
    peak_tree, peak_main, timeline, started = 0, 0, [], time.perf_counter()
    while process.poll() is None:
        total = 0
        try:
            for part in [main, *main.children(recursive=True)]:
                info = part.memory_full_info()
                total += info.pss
                if part.pid == main.pid:
                    peak_main = max(peak_main, info.uss)
        except psutil.Error:  # a worker ended between the listing and the reading
            continue
        peak_tree = max(peak_tree, total)
        timeline.append((round(time.perf_counter() - started, 1), total >> 20))
        time.sleep(every)
    return {"peak_tree_pss_mib": peak_tree >> 20, "peak_main_uss_mib": peak_main >> 20, "tree_pss_mib_over_time": timeline[::10]}


def large_folder(work: Path, count: int) -> dict:
    """``edgetransfer finetune`` (head mode, 224 px) on ``count`` generated JPEGs, as a user runs it,
    in its own process: wall time and the peak memory of its process tree."""
    started = time.perf_counter()
    make_photo_digits(work / "photo-digits", count)
    made_s = time.perf_counter() - started
    out = work / "large-run"
    command = [
        sys.executable,
        "-m",
        "edgetransfer",
        "finetune",
        "--data",
        str(work / "photo-digits"),
        "--image-size",
        str(SIZE),
        "--out",
        str(out),
        "-q",
    ]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    memory = tree_memory(process)
    seconds = time.perf_counter() - started
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "images": count,
        "generate_s": made_s,
        "end_to_end_s": seconds,
        "features_s": metrics["timing"]["features_s"],
        "train_pass_s": metrics["timing"]["train_pass_s"],
        "train_images": metrics["train_images"],
        "engine": metrics["frozen_pass"]["engine"],
        "feature_pass_images_s": metrics["train_images"] / metrics["timing"]["train_pass_s"],
        **memory,
        "val_top1": metrics["final"]["top1"],
        "val_images": metrics["val_images"],
        "test_top1": metrics["test"]["top1"],
        "test_images": metrics["test"]["images"],
    }


def markdown(report: dict) -> str:
    fp = report["machine"]
    ort = next(r["images_s"] for r in report["forward"] if r["pass"].startswith("ONNX Runtime"))
    lines = [
        f"# Fine-tuning speed: EfficientNet-Lite0 at {SIZE} px, batch {BATCH}",
        "",
        f"Machine: {fp['cpu']['model']}, {fp['cores']} cores; CPU flags {', '.join(fp['cpu']['cpuinfo_flags']) or 'none of note'};"
        f" torch {fp['versions'].get('torch')} with {fp['torch_threads']} threads. Produced by `python benchmarks/finetune_speed_bench.py`.",
        "",
        "| the same forward pass, batch 64 | images/s | x ONNX Runtime |",
        "|---|---|---|",
    ]
    for row in report["forward"]:
        value = row["images_s"]
        lines.append(f"| {row['pass']} | {value:.1f} | {value / ort:.2f}x |" if value else f"| {row['pass']} | not measured: {row['why']} | |")
    lines += [
        "",
        "| head mode's frozen pass over the demo's training images (loading, check, export included) | images/s | x ONNX Runtime |",
        "|---|---|---|",
    ]
    for row in report["frozen_pass"]:
        lines.append(
            f"| engine asked: {row['asked']} (ran: {row['engine']}), {row['images']} images | {row['images_s']:.1f} | {row['images_s'] / ort:.2f}x |"
        )
    lines += ["", "| loading alone (decode + transform) | images/s |", "|---|---|"]
    for row in report["loading"]:
        lines.append(f"| {row['source']}, {row['transform']} transform, {row['workers']} worker processes | {row['images_s']:.1f} |")
    for key, title in (("training", "full fine-tuning step, batch 32"), ("qat", "QAT step (ModelOpt, INT8 fake quantisation), batch 32")):
        base = report[key][0]["images_s"]
        lines += ["", f"| {title} | images/s | forward ms | backward + update ms | x before |", "|---|---|---|---|---|"]
        for row in report[key]:
            lines.append(
                f"| {row['step']} | {row['images_s']:.1f} | {row['forward_ms']:.0f} | {row['backward_and_update_ms']:.0f} | {row['images_s'] / base:.2f}x |"
            )
    lines += ["", "| end to end, in process | engine | total s | features s | val top-1 | test top-1 |", "|---|---|---|---|---|---|"]
    for row in report["end_to_end"]:
        lines.append(
            f"| `{row['command']}` | {row['engine']} | {row['total_s']:.1f} | {row['features_s']:.1f} |"
            f" {100 * row['val_top1']:.2f}% of {row['val_images']} | {100 * row['test_top1']:.2f}% of {row['test_images']} |"
        )
    lines += [
        "",
        "| one epoch, end to end, in process (loading and validation included) | precision | s | images/s | val top-1 |",
        "|---|---|---|---|---|",
    ]
    for row in report["epochs"]:
        lines.append(
            f"| `{row['command']}` | {row['precision']} | {row['epoch_s']:.1f} | {row['images_s']:.1f} | {100 * row['val_top1']:.2f}% of {row['val_images']} |"
        )
    large = report.get("large")
    if large:
        lines += [
            "",
            f"`edgetransfer finetune --image-size {SIZE}` on {large['images']:,} generated JPEGs (digits on photo patches), in its own process:"
            f" {large['end_to_end_s']:.0f} s end to end, frozen pass {large['feature_pass_images_s']:.1f} images/s ({large['engine']}) over"
            f" {large['train_images']:,} training images; peak memory of the process tree (main and loader workers, proportional set sizes summed, sampled every 0.3 s) {large['peak_tree_pss_mib']:,} MiB; val top-1 {100 * large['val_top1']:.2f}%"
            f" of {large['val_images']:,}, test top-1 {100 * large['test_top1']:.2f}% of {large['test_images']:,}. Generating the folder took {large['generate_s']:.0f} s.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=0, help="also run head mode on a generated folder of this many JPEGs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_quiet(True)
    random.seed(0)
    torch.manual_seed(0)
    built = build(DEFAULT_ARCH, 10, default_weights(DEFAULT_ARCH), SIZE)
    dataset = load_dataset(DataSpec())
    transform = eval_transform(built.preprocessing)
    x, _ = next(iter(image_loader(dataset.train, transform, FinetuneConfig(image_size=SIZE, batch_size=BATCH).resolved(), False)))
    report: dict = {"machine": fingerprint(args.threads), "forward": forward_table(built, x)}
    report["frozen_pass"] = [frozen_pass(built, dataset.train, engine, 0) for engine in (FeatureEngine.AUTO, FeatureEngine.TORCH)]
    report["loading"] = [
        {"source": "demo digits", **loading(built, dataset.train, 0)},
        {"source": "demo digits", **loading(built, dataset.train, 0, augment=True)},
    ]
    y = torch.tensor([s.label for s in dataset.train[:32]])
    report["training"] = training_steps(x[:32].clone(), y)
    report["qat"] = qat_steps(x[:32].clone(), y)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        report["end_to_end"] = [end_to_end(work, FeatureEngine.AUTO), end_to_end(work, FeatureEngine.TORCH)]
        report["epochs"] = epochs_now(work)
        if args.images:
            sample = make_photo_digits(work / "sample", 640, seed=1)
            jpegs = load_dataset(DataSpec(source=str(sample), test_fraction=0.0)).train
            report["loading"] += [{"source": "generated JPEGs", **loading(built, jpegs, w)} for w in (0, 1)]
            report["large"] = large_folder(work, args.images)
    save_results("finetune-speed", report, markdown(report))


if __name__ == "__main__":
    main()
