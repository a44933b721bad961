"""Domain adaptation on the built-in shift: digits -> digits-M, the default model (EfficientNet-Lite0, 64 px).

    python benchmarks/adapt_bench.py                      # every row, 3 seeds: about 45 minutes a seed on 2 cores
    python benchmarks/adapt_bench.py --seeds 0 --rows source-full,dann

Every row is an ``edgetransfer finetune`` run through the library, with its resolved defaults:
* source only: trained on labelled digits, head mode and full mode;
* each adaptation method: labelled digits plus the digits-M training images without labels
  (``--adapt digits-m``), in the mode it runs in by default (dann: full; adabn: head) and adabn
  also after full fine-tuning;
* train on target: trained on labelled digits-M (the upper bound), head and full.
Target top-1 is measured on the digits-M test split (179 images, read by no stage of any run);
source val top-1 is the run's own validation figure on digits (the split the checkpoint is chosen
on). The same seed makes the same split and the same initial head in every row. The gap
recovered is ``(adapted - source only) / (train on target - source only)`` in the same mode;
its mean over seeds is given with the spread. Wall time is the whole run, in this process.
Writes benchmarks/results/adapt.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fingerprint import fingerprint, save_results

THREADS = 2
BUSY = 0.9  # a run that got less than this share of THREADS cores shared the machine (alone: 0.96): its wall time is not reported
ROWS = {  # name: (label, mode, training data, adapt method, epochs: None for the default)
    "source-head": ("source only (head)", "head", "digits", None, None),
    "source-full": ("source only (full)", "full", "digits", None, None),
    "source-full-20": ("source only (full, 20 epochs)", "full", "digits", None, 20),
    "adabn-head": ("adabn (head)", "head", "digits", "adabn", None),
    "adabn-full": ("adabn (full)", "full", "digits", "adabn", None),
    "dann-10": ("dann (full, 10 epochs)", "full", "digits", "dann", 10),
    "dann": ("dann (full), the default", "full", "digits", "dann", None),
    "target-head": ("train on target (head)", "head", "digits-m", None, None),
    "target-full": ("train on target (full)", "full", "digits-m", None, None),
    "target-full-20": ("train on target (full, 20 epochs)", "full", "digits-m", None, 20),
}
ANCHOR = {"source only": 52.25, "dann": 76.66, "train on target": 95.96}  # MNIST -> MNIST-M, Ganin et al. 2016, table 2


def target_test_top1(run_dir: Path, seed: int) -> tuple[float, int]:
    """The run's checkpoint on the digits-M test split of the run's seed (the split changes with
    the seed), through edgetransfer's own preprocessing."""
    from edgetransfer.checkpoint import load_checkpoint
    from edgetransfer.data import DEMO_M, DataSpec, TorchImages, eval_transform, load_dataset

    loaded, _ = load_checkpoint(run_dir / "model.pt")
    test = load_dataset(DataSpec(DEMO_M, seed=seed)).test
    loader = torch.utils.data.DataLoader(TorchImages(test, eval_transform(loaded.preprocessing)), batch_size=128)
    right = 0
    loaded.module.eval()
    with torch.no_grad():
        for x, y in loader:
            right += int((loaded.module(x).argmax(1) == y).sum())
    return right / len(test), len(test)


def run_row(name: str, seed: int, root: Path) -> dict:
    from edgetransfer.config import FinetuneConfig
    from edgetransfer.data import DataSpec
    from edgetransfer.finetune import finetune

    label, mode, data, method, epochs = ROWS[name]
    adapt = {"adapt": "digits-m", "adapt_method": method} if method else {}
    config = FinetuneConfig(data=DataSpec(data, seed=seed), mode=mode, seed=seed, epochs=epochs, **adapt)
    started, cpu_before = time.perf_counter(), cpu_seconds()
    result = finetune(config, root / f"{name}-{seed}")
    seconds = time.perf_counter() - started
    share = (cpu_seconds() - cpu_before) / (seconds * THREADS)  # the demo data is in memory: no loader processes
    top1, images = target_test_top1(result.run_dir, seed)
    adapt_metrics = result.metrics.get("adapt") or {}
    if adapt_metrics.get("target_top1") is not None:  # the run's own report must agree with this measurement
        assert abs(adapt_metrics["target_top1"] - top1) < 1e-9, (adapt_metrics["target_top1"], top1)
    return {
        "row": name,
        "label": label,
        "seed": seed,
        "mode": mode,
        "method": method,
        "target_top1": top1,
        "target_images": images,
        "source_val_top1": result.metrics["final"]["top1"] if data == "digits" else None,
        "seconds": seconds,
        "epochs": len(result.metrics["epochs"]),
        "cpu_share": round(share, 3),
        "contended": share < BUSY,
    }


def alone(row: dict) -> bool:
    """Whether the row's wall time counts: it was timed and had the machine to itself."""
    return row.get("seconds") is not None and not row.get("contended")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}%"
    return f"{100 * statistics.mean(values):.2f}% ± {100 * statistics.stdev(values):.2f}"


def gap(rows: list[dict], name: str, source: str, target: str) -> list[float]:
    by = {(r["row"], r["seed"]): r for r in rows}
    out = []
    for seed in sorted({r["seed"] for r in rows}):
        if all((n, seed) in by for n in (name, source, target)):
            s, t, a = (by[(n, seed)]["target_top1"] for n in (source, target, name))
            out.append((a - s) / (t - s))
    return out


def ratio(values: list[float]) -> str:
    if not values:
        return ""
    shown = f"{100 * statistics.mean(values):.0f}%"
    return shown + (f" ± {100 * statistics.stdev(values):.0f} ({len(values)} seeds)" if len(values) > 1 else " (1 seed)")


def markdown(report: dict) -> str:
    rows = report["rows"]
    fp = report["machine"]
    lines = [
        "# Domain adaptation: digits -> digits-M (EfficientNet-Lite0, 64 px)",
        "",
        f"Machine: {fp['cpu']['model']}, {fp['cores']} cores, flags {', '.join(fp['cpu']['flags'])}; torch with"
        f" {fp['torch_threads']} threads (wall times only from runs that had the machine to themselves: at least {BUSY:.0%} of {THREADS} cores' time). Seeds {', '.join(map(str, report['seeds']))} (split, head and training change"
        " together). Produced by `python benchmarks/adapt_bench.py`.",
        "",
        f"Target top-1 on the digits-M test split ({rows[0]['target_images']} images no run reads); mean ± standard deviation"
        " over seeds. Source val top-1 is on the digits validation split the checkpoint is chosen on.",
        "",
    ]
    fair_shown = any(r["row"] == "source-full-20" for r in rows)
    lines += [
        "| run | epochs | target top-1 | source val top-1 | gap recovered |"
        + (" gap recovered against 20-epoch baselines |" if fair_shown else "")
        + " wall time |",
        "|---|---|---|---|---|" + ("---|" if fair_shown else "") + "---|",
    ]
    for name, (label, mode, _, method, _) in ROWS.items():
        mine = [r for r in rows if r["row"] == name]
        if not mine:
            continue
        source_val = [r["source_val_top1"] for r in mine if r["source_val_top1"] is not None]
        recovered = gap(rows, name, f"source-{mode}", f"target-{mode}") if method else []
        fair = gap(rows, name, "source-full-20", "target-full-20") if name == "dann" else []
        timed = [r["seconds"] for r in mine if alone(r)]
        time_s = f"{statistics.mean(timed):.0f} s" if timed else "see below"
        time_s += f" ({len(timed)} of {len(mine)} seeds)" if timed and len(timed) < len(mine) else ""
        lines.append(
            f"| {label} | {mine[0]['epochs']} | {spread([r['target_top1'] for r in mine])} | {spread(source_val) if source_val else '-'} |"
            f" {ratio(recovered)} |" + (f" {ratio(fair)} |" if fair_shown else "") + f" {time_s} |"
        )
    lines += [
        "",
        "Anchor, MNIST -> MNIST-M (Ganin et al. 2016, JMLR, table 2; a small CNN trained from scratch):"
        f" source only {ANCHOR['source only']}%, DANN {ANCHOR['dann']}%, train on target {ANCHOR['train on target']}%,"
        f" {100 * (ANCHOR['dann'] - ANCHOR['source only']) / (ANCHOR['train on target'] - ANCHOR['source only']):.0f}% of the gap.",
        "",
    ]
    costs = []
    for name in ("dann", "adabn-head", "adabn-full"):
        base = f"source-{ROWS[name][1]}"
        if name == "dann" and fair_shown:
            base = "source-full-20"  # the same number of epochs
        pairs = [
            (r["seconds"], b["seconds"])
            for r in rows
            if r["row"] == name and alone(r)
            for b in rows
            if b["row"] == base and b["seed"] == r["seed"] and alone(b)
        ]
        if pairs:
            costs.append(
                f"{ROWS[name][0]}: {statistics.mean(a for a, _ in pairs):.0f} s against {statistics.mean(b for _, b in pairs):.0f} s"
                f" for {ROWS[base][0]}, without --adapt ({statistics.mean(a / b for a, b in pairs):.2f}×, {len(pairs)} seed(s))"
            )
    if costs:
        lines += ["Cost of `--adapt` on this machine (whole run, same seed): " + "; ".join(costs) + ".", ""]
    for r in rows:
        if not alone(r):
            shown = f" (its epochs alone: {min(r['epoch_seconds']):.1f} to {max(r['epoch_seconds']):.1f} s)" if r.get("epoch_seconds") else ""
            lines += [f"{r['label']}, seed {r['seed']}: no wall time, another job shared the two cores during the run{shown}.", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ROWS if any(r["row"] == n for r in report["rows"])]
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, name in enumerate(names):
        values = [100 * r["target_top1"] for r in report["rows"] if r["row"] == name]
        ax.bar(i, statistics.mean(values), color="tab:orange" if ROWS[name][3] else "tab:grey", alpha=0.8)
        ax.plot([i] * len(values), values, "k.", markersize=8)
    ax.set_xticks(range(len(names)), [ROWS[n][0].replace(", the default", "\n(default)").replace(" (", "\n(") for n in names], fontsize=7)
    ax.set(ylabel="digits-M test top-1 (%)", title="digits -> digits-M, EfficientNet-Lite0 64 px (dots: seeds)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--out", default=None, help="write here instead of benchmarks/results (a quick look)")
    parser.add_argument("--fresh", action="store_true", help="forget the rows measured before (results/adapt-rows.jsonl)")
    parser.add_argument("--report-only", action="store_true", help="no runs: write the report from the rows measured before")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [] if args.report_only else args.rows.split(",")
    log = Path(args.out).with_suffix(".jsonl") if args.out else Path(__file__).parent / "results" / "adapt-rows.jsonl"
    if args.fresh:
        log.unlink(missing_ok=True)
    # Each run is minutes: every row is kept as it is measured, and a later call adds seeds or rows
    # (a row measured again replaces the old one).
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    for r in rows:  # the threshold may have changed since the row was measured
        if r.get("cpu_share") is not None:
            r["contended"] = r["cpu_share"] < BUSY
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for name in names:
                row = run_row(name, seed, Path(tmp))
                rows = [r for r in rows if (r["row"], r["seed"]) != (name, seed)] + [row]
                log.write_text("".join(json.dumps(r) + "\n" for r in rows))
                source_val = row["source_val_top1"]
                shown = "-" if source_val is None else f"{100 * source_val:.2f}%"
                print(f"seed {seed} {name}: target {100 * row['target_top1']:.2f}%  source val {shown}  {row['seconds']:.0f} s", flush=True)
    report = {"machine": fingerprint(THREADS), "seeds": sorted({r["seed"] for r in rows}), "rows": rows, "anchor": ANCHOR}
    text = markdown(report)
    if args.out:
        Path(args.out).write_text(text)
        print(text)
        return
    save_results("adapt", report, text)
    plot(report, Path(__file__).parent / "results" / "adapt.png")


if __name__ == "__main__":
    main()
