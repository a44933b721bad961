"""bf16 training against FP32, same seed, same data: full fine-tuning of EfficientNet-Lite0 at
224 px on the demo, once as finetune runs it on a CPU with native bf16 (bf16 autocast, depthwise
convolutions in FP32) and once with ``--no-amp`` (FP32 throughout).

    python benchmarks/precision_bench.py              # 3 epochs each, about 10 minutes on 2 Zen 4 cores
    python benchmarks/precision_bench.py --epochs 10  # the full-mode default

Each run's own validation and test top-1 (measured as it trained: in bf16 for the bf16 run), then
both checkpoints measured again in FP32 on the validation and test images (what the exported
model computes), with the paired 95% interval of their difference. Epoch time per run. Needs native bf16
(avx512_bf16 or AMX): elsewhere finetune never trains in bf16, and this says so and stops.
Writes benchmarks/results/precision.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgetransfer.checkpoint import load_checkpoint
from edgetransfer.config import FinetuneConfig
from edgetransfer.data import eval_transform, load_dataset
from edgetransfer.finetune import finetune
from edgetransfer.progress import set_quiet
from edgetransfer.results import compare
from edgetransfer.train.loops import image_loader, precision_for

from fingerprint import fingerprint, save_results

SIZE = 224


def fp32_logits(run: Path, config: FinetuneConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The run's chosen checkpoint on its validation and test images in FP32 eager, as exported:
    split -> (logits, labels)."""
    built, _ = load_checkpoint(run / "model.pt")
    module = built.module.eval()
    dataset = load_dataset(config.data)
    found = {}
    for split in ("val", "test"):
        samples = getattr(dataset, split)
        with torch.no_grad():
            logits = [module(x).numpy() for x, _ in image_loader(samples, eval_transform(built.preprocessing), config.resolved(), False)]
        found[split] = (np.concatenate(logits), np.array([s.label for s in samples]))
    return found


def one_run(work: Path, epochs: int, amp: bool) -> tuple[dict, dict]:
    config = FinetuneConfig(image_size=SIZE, mode="full", epochs=epochs, amp=amp)
    result = finetune(config, work / ("bf16" if amp else "fp32"))
    metrics = result.metrics
    epoch_s = [e["seconds"] for e in metrics["epochs"]]
    row = {
        "command": f"edgetransfer finetune --image-size {SIZE} --mode full --epochs {epochs}" + ("" if amp else " --no-amp"),
        "precision": metrics["precision"],
        "depthwise_fp32": metrics["depthwise_fp32"],
        "epoch_s_mean": sum(epoch_s) / len(epoch_s),
        "train_images": metrics["train_images"],
        "val_top1": metrics["final"]["top1"],
        "val_images": metrics["val_images"],
        "test_top1": metrics["test"]["top1"],
        "test_images": metrics["test"]["images"],
        "best_epoch": metrics["best_epoch"],
    }
    return row, fp32_logits(result.run_dir, config)


def markdown(report: dict) -> str:
    fp = report["machine"]
    bf16, fp32 = report["runs"]
    paired = report["in_fp32"]
    lines = [
        f"# bf16 against FP32 training: EfficientNet-Lite0, full fine-tuning at {SIZE} px on the demo, {report['epochs']} epochs, seed 0",
        "",
        f"Machine: {fp['cpu']['model']}, {fp['cores']} cores; CPU flags {', '.join(fp['cpu']['cpuinfo_flags']) or 'none of note'};"
        f" torch {fp['versions'].get('torch')} with {fp['torch_threads']} threads. Produced by `python benchmarks/precision_bench.py`.",
        "",
        "| run | precision | s per epoch | images/s | val top-1 | test top-1 (as trained) | best epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in (bf16, fp32):
        kind = row["precision"] + (" (depthwise in FP32)" if row["depthwise_fp32"] else "")
        lines.append(
            f"| `{row['command']}` | {kind} | {row['epoch_s_mean']:.1f} | {row['train_images'] / row['epoch_s_mean']:.1f} |"
            f" {100 * row['val_top1']:.2f}% of {row['val_images']} | {100 * row['test_top1']:.2f}% of {row['test_images']} | {row['best_epoch']} |"
        )
    lines += [
        "",
        "Both chosen checkpoints measured again in FP32 (what the exported model computes) on the same images:",
        "",
        "| split | images | bf16-trained | FP32-trained | difference, points | paired 95% interval | lost / gained | top-1 agreement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for split, change in paired.items():
        low, high = change["interval"]
        lines.append(
            f"| {split} | {change['images']} | {100 * change['bf16_top1']:.2f}% | {100 * change['fp32_top1']:.2f}% | {change['points']:+.2f} |"
            f" {low:+.2f} to {high:+.2f} | {change['lost']} / {change['gained']} | {100 * change['agreement']:.1f}% |"
        )
    lines += [
        "",
        "The checkpoint was chosen on validation top-1, so only the test row is on images no stage chose on."
        f" Epochs: bf16 {fp32['epoch_s_mean'] / bf16['epoch_s_mean']:.2f}x the speed of FP32.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    if precision_for(torch.device("cpu"), True) != "bf16":
        sys.exit("this CPU has no native bf16 (avx512_bf16 or AMX): finetune trains in FP32 here, so there is nothing to compare")
    torch.set_num_threads(args.threads)
    set_quiet(True)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        bf16, bf16_logits = one_run(work, args.epochs, amp=True)
        fp32, fp32_logits = one_run(work, args.epochs, amp=False)
    report = {"machine": fingerprint(args.threads), "epochs": args.epochs, "runs": [bf16, fp32], "in_fp32": {}}
    for split in ("val", "test"):
        paired = compare(bf16_logits[split][0], fp32_logits[split][0], fp32_logits[split][1])
        report["in_fp32"][split] = {
            "images": paired.images,
            "bf16_top1": paired.top1,
            "fp32_top1": paired.reference_top1,
            "points": paired.top1_change_points,
            "interval": paired.change_interval,
            "lost": paired.lost,
            "gained": paired.gained,
            "agreement": paired.top1_agreement,
        }
    save_results("precision", report, markdown(report))


if __name__ == "__main__":
    main()
