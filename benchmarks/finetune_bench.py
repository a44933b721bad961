"""Reproduce the fine-tuning numbers: demo head job, full fine-tune, cost of cached head epochs.

    python benchmarks/finetune_bench.py            # about 5 minutes on a 2-core CPU

Writes benchmarks/results/finetune.json and finetune.md. Thread count is fixed (--threads) and
recorded; timings are wall-clock seconds in this process unless marked end to end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from edgetransfer.data import DataSpec
from edgetransfer.finetune import FinetuneConfig, Mode, finetune
from edgetransfer.progress import set_quiet

from fingerprint import fingerprint, save_results


def cli_default_job(work: Path) -> dict:
    """`edgetransfer finetune` with no arguments, end to end, as a user runs it."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "edgetransfer", "finetune", "-q", "--out", str(work / "cli")], check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    metrics = json.loads((work / "cli" / "metrics.json").read_text())
    return {"command": "edgetransfer finetune", "end_to_end_s": seconds, "val_top1": metrics["final"]["top1"]}


def head_seeds(work: Path, seeds: list[int]) -> list[dict]:
    """The default head job on different seeded splits: how much the split moves top-1."""
    rows = []
    for seed in seeds:
        result = finetune(FinetuneConfig(data=DataSpec(seed=seed), seed=seed), work / f"head-{seed}")
        rows.append({"seed": seed, "val_top1": result.metrics["final"]["top1"], "total_s": result.metrics["timing"]["total_s"]})
    return rows


def head_epoch_cost(work: Path) -> dict:
    """10 cached head epochs against one backbone pass over the training images."""
    metrics = finetune(FinetuneConfig(epochs=10), work / "head-10").metrics
    timing = metrics["timing"]
    return {
        "train_images": metrics["train_images"],
        "backbone_pass_s": timing["train_pass_s"],
        "ten_epochs_s": timing["epochs_s"],
        "ratio": timing["epochs_s"] / timing["train_pass_s"],
    }


def full_job(work: Path) -> dict:
    metrics = finetune(FinetuneConfig(mode=Mode.FULL), work / "full").metrics
    return {
        "command": "edgetransfer finetune --mode full",
        "val_top1": metrics["final"]["top1"],
        "probe_val_top1": metrics["probe"]["val_top1"],
        "best_epoch": metrics["best_epoch"],
        "total_s": metrics["timing"]["total_s"],
        "per_epoch_top1": [round(r["val_top1"], 4) for r in metrics["epochs"]],
    }


def markdown(report: dict) -> str:
    fp, cli, cost, full = report["machine"], report["default_job"], report["head_epoch_cost"], report["full"]
    lines = [
        "# Fine-tuning on the embedded demo (digits, EfficientNet-Lite0, 64 px)",
        "",
        f"Machine: {fp['cpu']['model']}, {fp['cores']} cores, {fp['memory_gib']} GiB; flags {', '.join(fp['cpu']['flags'])};"
        f" torch {fp['versions'].get('torch')} with {fp['torch_threads']} threads. Produced by `python benchmarks/finetune_bench.py`.",
        "",
        "| job | val top-1 | time | target |",
        "|---|---|---|---|",
        f"| `{cli['command']}` (no arguments, end to end incl. start-up) | {100 * cli['val_top1']:.2f}% | {cli['end_to_end_s']:.1f} s | ≥ 94%, ≤ 180 s |",
        f"| `{full['command']}` | {100 * full['val_top1']:.2f}% (probe {100 * full['probe_val_top1']:.2f}%) | {full['total_s']:.1f} s | ≥ 98% |",
        f"| head mode: 10 cached epochs vs one backbone pass over {cost['train_images']} training images | — | {cost['ten_epochs_s']:.2f} s vs {cost['backbone_pass_s']:.2f} s = **{cost['ratio']:.2f}×** | ≤ 1.5× |",
        "",
        "Default head job on other seeded splits (split and seed change together):",
        "",
        "| seed | val top-1 | in-process time |",
        "|---|---|---|",
        *[f"| {r['seed']} | {100 * r['val_top1']:.2f}% | {r['total_s']:.1f} s |" for r in report["head_seeds"]],
        "",
        f"Full fine-tune val top-1 per epoch: {', '.join(f'{100 * v:.1f}' for v in full['per_epoch_top1'])}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_quiet(True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report = {
            "machine": fingerprint(torch.get_num_threads()),
            "default_job": cli_default_job(work),
            "head_epoch_cost": head_epoch_cost(work),
            "head_seeds": head_seeds(work, args.seeds),
            "full": full_job(work),
        }
    save_results("finetune", report, markdown(report))


if __name__ == "__main__":
    main()
