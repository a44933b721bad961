"""Which INT8 number format ONNX Runtime should use on an x86 CPU without VNNI, measured on the
default model at its own size: every layer quantised, nearest rounding, no guard.

    python benchmarks/int8_scheme_bench.py --work runs/guard   # reuses int8_guard_bench's run; ~6 min

On AVX2, ONNX Runtime multiplies uint8 activations by int8 weights with VPMADDUBSW, which adds
pairs of products in 16 bits: with 8-bit activations and 8-bit weights the sum can pass 32767 and
saturates. The ways around it, each measured here:

- 7-bit weights, 8-bit activations (ONNX Runtime's `reduce_range`; what edgetransfer ships);
- 8-bit weights, 7-bit activations (the activations' range halved, as PyTorch's fbgemm observers
  do; ReLU6/Clip kept in the graph, since ONNX Runtime otherwise drops them against the range);
- 8-bit weights, 8-bit activations: as this CPU runs it (saturating), and computed in float from
  the same QDQ model (graph optimisation off, so nothing is fused into integer kernels: what a
  CPU with VNNI would give);
- uint8 weights (ONNX Runtime's U8U8 kernels, which widen to 16 bits first and do not saturate).

For each: the share of the guard's selection images whose top-1 changes, the logit MSE against
float, the top-1 change on the test images with its 95% interval, and batch-1 latency against
ONNX Runtime FP32 in interleaved rounds in this process (2 threads). Writes
benchmarks/results/int8_scheme.{md,json}.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from edgetransfer.optimize import ort as ortq
from edgetransfer.optimize.context import QuantOptions, TensorRTOptions, open_context
from edgetransfer.optimize.guard import distance
from edgetransfer.progress import set_quiet
from edgetransfer.results import paired_interval
from edgetransfer.rundir import RunDir
from edgetransfer.runtime.sessions import open_session

from fingerprint import fingerprint, save_results
from int8_guard_bench import command_line, float_run, prepare

THREADS, ROUNDS, PER_ROUND = 2, 7, 20


def halve_activation_levels(cache: Path, dst: Path) -> Path:
    """The same calibration ranges, twice as wide upwards: uint8 activations then use 0..127."""
    from onnxruntime.quantization.calibrate import TensorData, load_tensors_data, save_tensors_data

    data = load_tensors_data(cache)
    for name, tensor in list(data.data.items()):
        shape = np.shape(tensor.lowest)
        low, high = min(float(np.ravel(tensor.lowest)[0]), 0.0), max(float(np.ravel(tensor.highest)[0]), 0.0)
        data.data[name] = TensorData(lowest=np.full(shape, low, np.float32), highest=np.full(shape, 2 * high - low, np.float32))
    save_tensors_data(data, dst)
    return dst


def quantize(prepared: Path, dst: Path, cache: Path, weight: str, reduce_range: bool, keep_activations: bool) -> Path:
    """edgetransfer's own QDQ quantisation with these types. ``keep_activations``: the same
    settings plus ONNX Runtime's option that keeps Relu/Clip in the graph, which ranges wider than
    the clip need (edgetransfer's quantisation does not pass it)."""
    scheme = ortq.QuantScheme("uint8", weight=weight, reduce_range=reduce_range)
    if not keep_activations:
        ortq.quantize_qdq(prepared, dst, cache, ortq.CalibMethod.MINMAX, scheme, [])
        return dst
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(
        str(prepared),
        str(dst),
        None,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QUInt8 if weight == "uint8" else QuantType.QInt8,
        calibration_cache_path=str(cache),
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True, "QDQKeepRemovableActivations": True},
    )
    model = onnx.load(str(dst))
    if ortq.float_outputs(model):
        onnx.save_model(model, str(dst))
    return dst


def logits(model: Path, images: np.ndarray, fused: bool) -> np.ndarray:
    if fused:
        return ortq.run_logits(model, images, threads=THREADS)
    session = open_session(model, threads=THREADS, optimized=False)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i : i + 32]})[0] for i in range(0, len(images), 32)])


def latencies(models: dict[str, Path], image: np.ndarray) -> dict[str, list[float]]:
    """Median batch-1 milliseconds of each model in each of ROUNDS interleaved rounds."""
    sessions = {key: open_session(path, threads=THREADS) for key, path in models.items()}
    feeds = {key: {s.get_inputs()[0].name: image} for key, s in sessions.items()}
    for key, session in sessions.items():
        for _ in range(5):
            session.run(None, feeds[key])
    rounds: dict[str, list[float]] = {key: [] for key in models}
    for _ in range(ROUNDS):
        for key, session in sessions.items():
            times = []
            for _ in range(PER_ROUND):
                started = time.perf_counter()
                session.run(None, feeds[key])
                times.append(time.perf_counter() - started)
            rounds[key].append(1000 * float(np.median(times)))
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="keep the fine-tuned run here (and reuse it)")
    parser.add_argument("--arch", default="timm:efficientnet_lite0")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--mode", default=None)
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args()
    set_quiet(True)
    work = args.work or Path(tempfile.mkdtemp(prefix="edgetransfer-scheme-"))
    run_dir = prepare(work, args)
    context = open_context(RunDir(run_dir), QuantOptions(), TensorRTOptions())
    selection = context.selection()
    tmp = Path(tempfile.mkdtemp(prefix="edgetransfer-scheme-"))
    prepared = tmp / "prepared.onnx"
    ortq.preprocess_for_quantization(context.base, prepared)
    samples, _ = context.calibration_samples()
    cache = ortq.calibrate(prepared, context.stream(samples, 8), ortq.CalibMethod.MINMAX, False, tmp / "ranges.json")
    wide = halve_activation_levels(cache, tmp / "ranges-7bit.json")
    ortq.optimize_graph(context.base, tmp / "fp32.onnx")

    schemes = [  # key, label, weight type, reduce_range, cache, keep Relu/Clip, run fused
        ("w7a8", "int8 weights, 7 bits (reduce_range); uint8 activations: shipped", "int8", True, cache, False, True),
        ("w8a7", "int8 weights, 8 bits; uint8 activations, 7 bits", "int8", False, wide, True, True),
        ("w8a8", "int8 weights, 8 bits; uint8 activations: as this CPU runs it", "int8", False, cache, False, True),
        ("w8a8-float", "the same model computed in float (no saturation: a VNNI CPU's result)", "int8", False, cache, False, False),
        ("u8u8", "uint8 weights, 8 bits (U8U8 kernels); uint8 activations", "uint8", False, cache, False, True),
    ]
    rows, models = [], {"fp32": tmp / "fp32.onnx"}
    for key, label, weight, reduce_range, ranges, keep, fused in schemes:
        model = tmp / f"{key.split('-')[0]}.onnx"
        if not model.is_file():
            quantize(prepared, model, ranges, weight, reduce_range, keep)
        changed, mse = distance(logits(model, selection.images, fused), selection.float_logits)
        test = context.compare(logits(model, context.held_out, fused))
        low, high = paired_interval(test.lost, test.gained, test.images)
        rows.append(
            {
                "key": key,
                "scheme": label,
                "selection_changed_pct": round(changed, 2),
                "logit_mse": round(mse, 3),
                "test_images": test.images,
                "test_change_points": round(100 * (test.top1 - test.reference_top1), 2),
                "test_interval": [round(low, 2), round(high, 2)],
                "lost": test.lost,
                "gained": test.gained,
            }
        )
        if fused:
            models[key] = model
        print(rows[-1], flush=True)
    timed = latencies(models, selection.images[:1])
    fp32 = float(np.median(timed["fp32"]))
    for row in rows:
        if row["key"] in timed:
            ms = float(np.median(timed[row["key"]]))
            row.update(ms=round(ms, 2), spread_ms=[round(min(timed[row["key"]]), 2), round(max(timed[row["key"]]), 2)], vs_fp32=round(fp32 / ms, 2))

    run = float_run(run_dir)
    lines = [
        f"# ONNX Runtime INT8 number formats on a CPU without VNNI: {args.arch} at 224 px",
        "",
        f"The float model: {run['val_top1']:.2f}% top-1 on {run['val_images']} validation images, {run['test_top1']:.2f}% on "
        f"{run['test_images']} test images. Command: `{' '.join(['python benchmarks/int8_scheme_bench.py', command_line()]).strip()}`.",
        "",
        f"Every layer quantised, nearest rounding, {len(samples)} calibration images. Top-1 changed: share of the "
        f"{len(selection.images)} {selection.source} the guard selects on. Test: {rows[0]['test_images']} images no stage chose on. "
        f"Batch 1, {THREADS} threads, median of {ROUNDS} interleaved rounds; ONNX Runtime FP32 {fp32:.2f} ms.",
        "",
        "| scheme | top-1 changed | logit MSE | test top-1 change (95% interval) | ms, batch 1 | vs FP32 |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        speed = f"{row['ms']:.2f} ({row['spread_ms'][0]:.2f}-{row['spread_ms'][1]:.2f})" if "ms" in row else "—"
        ratio = f"{row['vs_fp32']:.2f}×" if "vs_fp32" in row else "—"
        lines.append(
            f"| {row['scheme']} | {row['selection_changed_pct']:.2f}% | {row['logit_mse']:.3f} | "
            f"{row['test_change_points']:+.2f} ({row['test_interval'][0]:+.2f} to {row['test_interval'][1]:+.2f}) | {speed} | {ratio} |"
        )
    machine = fingerprint(THREADS)
    lines += ["", f"CPU: {machine['cpu']['model']}, flags {', '.join(machine['cpu']['flags'])}; {machine['cores']} cores.", ""]
    save_results(
        "int8_scheme", {"machine": machine, "run": run, "fp32_ms": round(fp32, 2), "rows": rows, "command": command_line()}, "\n".join(lines)
    )


if __name__ == "__main__":
    main()
