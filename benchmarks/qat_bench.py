"""Post-training INT8 against quantisation-aware fine-tuning, on the same test images.

    python benchmarks/qat_bench.py                       # demo size (64 px): Lite0 and resnet18, ~15 min on 2 cores
    python benchmarks/qat_bench.py --case lite0-224      # the default model at its own size, ~30 min
    python benchmarks/qat_bench.py --work runs/qat       # keep (and reuse) the fine-tuned runs

For each case a float run is fine-tuned (or reused), exported, and then made INT8 two ways:

* PTQ: ``export --target ort-cpu|openvino --precision int8`` under the default guard (1.0 point,
  at most 32 layers in float). A refused build is a row with the guard's reason.
* QAT: ``finetune --from RUN --qat`` (default epochs and learning rate), then the same export
  of the child run, which ships the QDQ model as it is (no layer in float). Its build is
  measured without a budget, so that a QAT model over the budget still shows its numbers; the
  ``guard`` column says whether the default budget would have let it through.

Every top-1 is on the run's test split (no stage chose on it), against the float ONNX model on
the same images, with the paired 95% interval. Writes benchmarks/results/qat.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from edgetransfer.config import Mode, QatOptions
from edgetransfer.errors import EdgeTransferError
from edgetransfer.export import export_onnx
from edgetransfer.finetune import FinetuneConfig, finetune
from edgetransfer.optimize import Precision, QuantOptions, Target, build_variants
from edgetransfer.progress import set_quiet
from edgetransfer.qat import run_qat

from fingerprint import fingerprint, save_results

CASES = {
    "lite0-64": ("EfficientNet-Lite0, head, 64 px (the demo)", FinetuneConfig()),
    "resnet18-64": ("resnet18 from scratch, full, 64 px", FinetuneConfig(arch="resnet18", weights="none", mode=Mode.FULL, epochs=15)),
    "lite0-224": ("EfficientNet-Lite0, head, 224 px", FinetuneConfig(image_size=224)),
}
TARGETS = (Target.ORT_CPU, Target.OPENVINO)
BUDGET = QuantOptions().max_accuracy_drop


def prepare(work: Path, key: str) -> Path:
    run_dir = work / key
    if not (run_dir / "manifest.json").is_file() or json.loads((run_dir / "manifest.json").read_text()).get("status") != "complete":
        shutil.rmtree(run_dir, ignore_errors=True)
        finetune(CASES[key][1], run_dir)
    export_onnx(run_dir)
    return run_dir


def variant_row(run_dir: Path, target: Target, quant: QuantOptions) -> dict:
    started = time.perf_counter()
    try:
        (variant,) = build_variants(run_dir, [target], [Precision.INT8], quant)
    except EdgeTransferError as exc:
        return {"refused": str(exc).split(";")[0], "seconds": round(time.perf_counter() - started, 1)}
    accuracy, guard = variant.report.accuracy, variant.report.details.get("guard", {})
    return {
        "top1": accuracy.top1,
        "float_top1": accuracy.reference_top1,
        "change_points": accuracy.top1_change_points,
        "interval": accuracy.change_interval,
        "images": accuracy.images,
        "agreement": accuracy.top1_agreement,
        "float_layers": len(variant.report.kept_in_float),
        "seconds": round(time.perf_counter() - started, 1),
        "guard_s": guard.get("seconds"),
        "labelled_drop_points": guard.get("labelled_drop_points"),
        "disagreement_points": guard.get("disagreement_points"),
    }


def case(work: Path, key: str, qat: QatOptions) -> dict:
    run_dir = prepare(work, key)
    row: dict = {"case": key, "model": CASES[key][0], "ptq": {}, "qat": {}}
    for target in TARGETS:
        row["ptq"][target.value] = variant_row(run_dir, target, QuantOptions())
    child = run_dir / f"qat-{qat.target}"
    shutil.rmtree(child, ignore_errors=True)
    result = run_qat(run_dir, qat)
    row["qat_run"] = {
        "seconds": result.metrics["seconds"],
        "epochs": qat.epochs,
        "lr": qat.lr,
        "best_epoch": result.metrics["best_epoch"],
        "val_history": [h["val_top1"] for h in result.metrics["history"]],
        "float": result.metrics["float"],
        "parity": json.loads((child / "manifest.json").read_text())["artifacts"]["onnx"]["parity"],
    }
    for target in TARGETS:
        row["qat"][target.value] = variant_row(child, target, QuantOptions(max_accuracy_drop=100.0))
    return row


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def _cell(entry: dict) -> list[str]:
    if "refused" in entry:
        return ["refused", "–", "–", "–", f"{entry['seconds']:.0f} s: {entry['refused'].replace('|', '/')}"]
    low, high = entry["interval"]
    return [
        _pct(entry["top1"]),
        f"{entry['change_points']:+.2f} ({low:+.2f} to {high:+.2f})",
        f"{100 * entry['agreement']:.1f}%",
        str(entry["float_layers"]),
        f"{entry['seconds']:.0f} s",
    ]


def markdown(rows: list[dict], machine: dict, qat: QatOptions) -> str:
    lines = [
        "# PTQ against QAT, INT8 on the same test images",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch threads {machine['torch_threads']}.",
        f"QAT: `finetune --from RUN --qat`, {qat.epochs} epochs at lr {qat.lr:g} (the defaults), target {qat.target}"
        " (its scheme: see edgetransfer/qat_scheme.py). PTQ: the default guard, "
        f"{BUDGET} point on the validation images, at most 32 layers in float.",
        "Top-1 and its change against the float ONNX model are on the test split (no stage chose on it), with the"
        " paired 95% interval; agreement is with the float model's top-1. QAT's time is its whole run (calibration,"
        " epochs, export, parity check); PTQ's is the INT8 build with its guard.",
        "",
        "| model | float test top-1 | INT8 | method | test top-1 | change, points (95%) | agree | layers in float | time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        float_top1 = next((e.get("float_top1") for e in [*row["ptq"].values(), *row["qat"].values()] if "float_top1" in e), None)
        images = next((e.get("images") for e in [*row["ptq"].values(), *row["qat"].values()] if "images" in e), "?")
        for method in ("ptq", "qat"):
            for target, entry in row[method].items():
                cells = _cell(entry)
                if method == "qat" and "refused" not in entry:
                    cells[-1] = f"{row['qat_run']['seconds']:.0f} s QAT + {entry['seconds']:.0f} s export"
                lines.append(f"| {row['model']} | {_pct(float_top1)} of {images} | {target} | {method.upper()} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "QAT runs: validation top-1 of the quantised model per epoch (epoch 0: calibrated, before training); the"
        " best is kept. Parity: the QDQ export against the fake-quantised PyTorch model on the validation images.",
        "",
    ]
    for row in rows:
        run = row["qat_run"]
        history = ", ".join(f"{100 * v:.2f}" for v in run["val_history"])
        parity = run["parity"]
        lines.append(
            f"- {row['model']}: float val {_pct(run['float']['val_top1'])}; QAT val per epoch [{history}], best epoch"
            f" {run['best_epoch']}; parity max logit difference {parity['max_abs_diff']:.3f} (allowed {parity['atol']:.3f},"
            f" float64 floor {parity['floor_max_abs_diff']:.3f}), top-1 agreement {100 * parity['top1_agreement']:.1f}% of"
            f" {parity['images']}."
        )
        for target, entry in row["qat"].items():
            if "labelled_drop_points" in entry and entry["labelled_drop_points"] is not None:
                verdict = "passes" if entry["labelled_drop_points"] <= BUDGET else "would be refused by"
                lines.append(
                    f"  - {target}: {-entry['labelled_drop_points']:+.2f} top-1 points against float on the validation images:"
                    f" {verdict} the default {BUDGET}-point guard."
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", choices=list(CASES), help="cases to run (repeatable) [default: lite0-64, resnet18-64]")
    parser.add_argument("--work", type=Path, default=None, help="where the runs go (kept); default: a temporary folder")
    parser.add_argument("--epochs", type=int, default=QatOptions().epochs)
    parser.add_argument("--lr", type=float, default=QatOptions().lr)
    parser.add_argument("--stem", default="qat", help="results file name")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite results/<stem>.md from its .json")
    args = parser.parse_args()
    if args.markdown_only:
        saved = json.loads((Path(__file__).parent / "results" / f"{args.stem}.json").read_text())
        save_results(args.stem, saved, markdown(saved["rows"], saved["machine"], QatOptions(**saved["qat"])))
        return
    set_quiet(True)
    import torch

    qat = QatOptions(epochs=args.epochs, lr=args.lr)
    keys = args.case or ["lite0-64", "resnet18-64"]
    with tempfile.TemporaryDirectory(prefix="edgetransfer-qat-") as scratch:
        work = args.work or Path(scratch)
        rows = []
        machine = fingerprint(torch.get_num_threads())
        for key in keys:  # results are saved after every case: a long run shows what it has
            print(f"case {key}", flush=True)
            rows.append(case(work, key, qat))
            save_results(args.stem, {"machine": machine, "qat": qat.__dict__, "rows": rows}, markdown(rows, machine, qat))


if __name__ == "__main__":
    main()
