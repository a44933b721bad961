from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgetransfer.cli import main
from edgetransfer.data import DataSpec, Sample, load_dataset
from edgetransfer.errors import DataError, EdgeTransferError, RunError, UnknownNameError
from edgetransfer.export import export_onnx
from edgetransfer.rundir import Manifest
from edgetransfer.optimize import CalibMethod, Precision, QuantOptions, Target, build_variants, cpu_features
from edgetransfer.optimize import ort as ortq
from edgetransfer.optimize.calibration import BatchStream, balanced_sample, folder_samples
from edgetransfer.optimize.guard import guard
from edgetransfer.errors import QuantizationError
from edgetransfer.results import VariantReport
from edgetransfer.runtime import Predictor, probe_provider

from conftest import copy_run, write_folder

VNNI = "model name : Intel Xeon\nflags : fpu sse avx2 avx512f avx512_vnni amx_tile amx_int8\n"
AVX2 = "model name : Old Xeon\nflags : fpu sse avx2\n"


@pytest.fixture(scope="module")
def run_dir(trained_run, tmp_path_factory):
    run = copy_run(trained_run, tmp_path_factory, "opt")
    export_onnx(run)
    return run


def test_cpu_features_choose_the_int8_scheme(monkeypatch):
    fast = cpu_features(VNNI)
    assert fast.vnni and fast.amx and fast.avx512 and fast.model == "Intel Xeon"
    old = cpu_features(AVX2)
    assert old.avx2 and not old.vnni and not old.int8_fast
    if fast.x86:
        scheme = ortq.quant_scheme("ort-cpu", fast)
        assert (scheme.activation, scheme.weight, scheme.per_channel, scheme.reduce_range) == ("uint8", "int8", True, False)
        assert not scheme.warnings
        slow = ortq.quant_scheme("ort-cpu", old)
        assert slow.reduce_range and "unlikely to be faster" in slow.warnings[0]
    trt = ortq.quant_scheme("tensorrt", fast)
    assert trt.activation == "int8" and trt.symmetric_activations


def test_fp32_and_fp16_variants_are_recorded_with_their_accuracy(run_dir):
    fp32, fp16 = build_variants(run_dir, [Target.ORT_CPU], [Precision.FP32, Precision.FP16])
    assert fp32.path.name == "ort-cpu-fp32.onnx" and fp32.report.accuracy.top1_agreement == 1.0
    assert fp32.report.accuracy.max_abs_diff < 1e-4 and fp32.report.accuracy.images == 40
    assert fp16.report.accuracy.top1_agreement >= 0.97 and 1e-4 < fp16.report.accuracy.max_abs_diff < 0.2  # really fp16
    assert fp16.path.stat().st_size < 0.6 * fp32.path.stat().st_size
    assert "FP16 will not be faster on a CPU" in fp16.report.warnings[0]
    artifacts = Manifest.load(run_dir).artifacts
    assert artifacts["ort-cpu-fp16"]["parent"] == "onnx" and artifacts["ort-cpu-fp16"]["report"]["val_images"] == 40
    assert VariantReport.from_dict(artifacts["ort-cpu-fp16"]["report"]) == fp16.report  # the manifest round-trips


def test_int8_variant_is_static_qdq_with_recorded_calibration(run_dir):
    (variant,) = build_variants(run_dir, [Target.ORT_CPU], [Precision.INT8], QuantOptions(calib_size=40, max_accuracy_drop=100))
    model = onnx.load(variant.path)
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    initializers = {i.name: i for i in model.graph.initializer}
    zero_points = [initializers[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.data_type == onnx.TensorProto.UINT8 for z in zero_points)  # u8 activations
    report = variant.report
    assert report.details["mode"] == "static QDQ" and report.kept_in_float == []
    assert report.details["calibration"]["images"] == 40 and len(report.details["calibration"]["files"]) == 40
    assert len({f["sha256"] for f in report.details["calibration"]["files"]}) == 40
    assert report.accuracy.top1_agreement >= 0.8
    predictor = Predictor(variant.path)  # metadata travels into the INT8 model too
    assert len(predictor.labels) == 10 and len(predictor.predict(np.zeros((8, 8, 3), np.uint8))) == 5


def test_guard_keeps_the_most_sensitive_layers_in_float():
    sensitivity = {"stem": 1.5, "block3": 0.9, "block7": 0.3, "head": 0.0, "block1": 0.05}
    calls = []

    def score_with(excluded):
        calls.append(tuple(excluded))
        return 3.0 - sum(sensitivity[name] for name in excluded), 1.0

    kept, drop, steps = guard(score_with, list(sensitivity), budget=1.0, max_float=4)
    assert kept == ["stem", "block3"] and drop == pytest.approx(0.6)
    assert [s.drop_points for s in steps] == pytest.approx([3.0, 1.5, 0.6])
    kept, drop, _ = guard(score_with, list(sensitivity), budget=0.0, max_float=2)
    assert len(kept) == 2 and drop > 0.0  # the caller reports the unmet budget
    calls.clear()
    assert guard(score_with, list(sensitivity), budget=0.0, max_float=0)[:2] == ([], 3.0)
    assert calls == [()]  # no layer may be kept, so none is measured alone


def test_guard_ranks_by_logit_error_when_no_single_layer_moves_top1():
    """INT8 loss spread thin: every layer alone leaves top-1 where it was; the logit error decides."""
    error = {"a": 0.1, "b": 0.5, "c": 0.2, "d": 0.3}

    def score_with(excluded):
        drop = 2.0 if len(excluded) < 3 else 0.5  # top-1 recovers only with three layers in float
        return drop, 1.0 - sum(error[name] for name in excluded)

    kept, drop, steps = guard(score_with, list(error), budget=1.0, max_float=8)
    assert kept == ["b", "d", "c"] and drop == 0.5
    assert [s.logit_mse for s in steps] == pytest.approx([1.0, 0.5, 0.2, 0.0])


def test_guard_measures_the_rest_again_when_a_pass_ends_over_budget():
    """Sensitivities that do not add up: x hurts on top of a alone, but helps once y is kept too."""
    drops = {(): 3.0, ("a",): 2.0, ("x",): 2.5, ("y",): 2.8, ("a", "x"): 2.2, ("a", "y"): 1.8, ("a", "x", "y"): 0.5}
    calls = []

    def score_with(excluded):
        calls.append(tuple(excluded))
        drop = drops[tuple(sorted(excluded))]
        return drop, drop

    kept, drop, steps = guard(score_with, ["a", "x", "y"], budget=1.0, max_float=8)
    assert kept == ["a", "y", "x"] and drop == 0.5  # a single pass in sensitivity order ends at 1.8
    assert [s.drop_points for s in steps] == [3.0, 2.0, 1.8, 0.5]
    drops[("a", "x", "y")] = 1.9  # now nothing helps on top of a and y: the guard stops, over budget
    calls.clear()
    kept, drop, _ = guard(score_with, ["a", "x", "y"], budget=1.0, max_float=8)
    assert kept == ["a", "y"] and drop == 1.8
    assert calls.count(("a", "y", "x")) == 1  # the stalled pass is not repeated


def test_calibration_methods_give_different_scales(run_dir, tmp_path):
    prepared = tmp_path / "prepared.onnx"
    ortq.preprocess_for_quantization(run_dir / "model.onnx", prepared)
    from edgetransfer.metadata import ModelInfo

    info = ModelInfo.from_props({p.key: p.value for p in onnx.load(prepared).metadata_props})
    samples = balanced_sample(load_dataset(DataSpec(limit_per_class=20)).train, 16)
    ranges = {}
    for method in CalibMethod:
        stream = BatchStream(samples, info.preprocessing, "input", info.input_format, 8)
        cache = ortq.calibrate(prepared, stream, method, False, tmp_path / f"{method.value}.json")
        ranges[method] = json.loads(cache.read_text())
    def value(entry):  # the cache stores numbers bare or as {"data": …}
        return float(np.ravel(entry["data"] if isinstance(entry, dict) else entry)[0])

    def spans(method):  # tensor -> highest - lowest of its calibrated range
        return {name: value(t["highest"]) - value(t["lowest"]) for name, t in ranges[method]["data"].items()}

    minmax, entropy, percentile = spans(CalibMethod.MINMAX), spans(CalibMethod.ENTROPY), spans(CalibMethod.PERCENTILE)
    assert set(minmax) == set(entropy) == set(percentile) and len(minmax) > 50
    for clipped in (entropy, percentile):  # both clip outliers: narrower ranges on most tensors
        narrower = sum(clipped[k] < minmax[k] - 1e-6 for k in minmax)
        assert narrower >= len(minmax) // 2
        assert all(clipped[k] <= minmax[k] + 1e-5 for k in minmax)
    assert sum(abs(entropy[k] - percentile[k]) > 1e-6 for k in minmax) >= len(minmax) // 2


def test_calibration_streams_batches_without_loading_everything(monkeypatch):
    samples = balanced_sample(load_dataset(DataSpec(limit_per_class=20)).train, 64)
    loaded = []
    import edgetransfer.optimize.calibration as calibration

    real = calibration.load_image
    monkeypatch.setattr(calibration, "load_image", lambda s: loaded.append(s) or real(s))
    from edgetransfer.preprocessing import Preprocessing

    stream = BatchStream(samples, Preprocessing(32, 36), "input", "float32-nchw-normalized", 8)
    chunks = stream.chunks(2)
    first = next(chunks)
    assert len(loaded) == 8  # one batch read ahead, nothing more
    batches = [first.get_next(), first.get_next(), first.get_next()]
    assert batches[0]["input"].shape == (8, 3, 32, 32) and batches[2] is None
    assert len(loaded) == 16
    drained = [[batch for batch in iter(chunk.get_next, None)] for chunk in chunks]
    assert [len(c) for c in drained] == [2, 2, 2] and stream.used == 64


def test_balanced_sample_takes_every_class_evenly():
    samples = [Sample(f"x{i}", i % 4, f"x{i}") for i in range(400)] + [Sample("odd", 4, "odd")]
    chosen = balanced_sample(samples, 41)
    counts = np.bincount([s.label for s in chosen])
    assert list(counts) == [10, 10, 10, 10, 1]


def test_bad_calibration_data(run_dir, tmp_path):
    before = sorted(p.name for p in run_dir.iterdir())
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "a" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"calibration folder .*empty has no images"):
        build_variants(run_dir, [Target.ORT_CPU], [Precision.INT8], QuantOptions(calib=empty))
    small = write_folder(tmp_path / "small", per_class=1, classes=3)
    with pytest.raises(QuantizationError, match=r"calibration set has 3 image\(s\), fewer than the batch of 8"):
        build_variants(run_dir, [Target.ORT_CPU], [Precision.INT8], QuantOptions(calib=small))
    assert sorted(p.name for p in run_dir.iterdir()) == before  # no artifact and no temporary file left behind


def test_unknown_targets_and_precisions_get_suggestions():
    with pytest.raises(UnknownNameError, match=r"unknown target 'ort-gpu'. Did you mean 'ort-cpu'"):
        Target.parse("ort-gpu")
    with pytest.raises(UnknownNameError, match=r"unknown precision 'int4'. .*Known: bf16, fp16, fp32, int8"):
        Precision.parse("int4")


def test_gpu_targets_are_refused_where_they_cannot_run(run_dir):
    try:
        import tensorrt  # noqa: F401  (only whether it imports)
    except ImportError:
        with pytest.raises(EdgeTransferError, match=r"needs TensorRT, which is not installed: pip install 'edgetransfer\[tensorrt\]'"):
            build_variants(run_dir, [Target.TENSORRT], [Precision.FP16])
    if probe_provider("cuda") is None:
        pytest.skip("CUDA works here")
    with pytest.raises(EdgeTransferError, match=r"target ort-cuda needs ONNX Runtime's CUDAExecutionProvider, but"):
        build_variants(run_dir, [Target.ORT_CUDA], [Precision.FP16])


def test_an_onnx_file_from_another_checkpoint_is_refused(run_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for name in ("model.pt", "config.json", "manifest.json"):
        (other / name).write_bytes((run_dir / name).read_bytes())
    model = onnx.load(run_dir / "model.onnx")
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, "checkpoint_sha256": "0" * 64})
    onnx.save(model, other / "model.onnx")
    with pytest.raises(RunError, match=r"was not exported from this run's checkpoint; re-export it"):
        build_variants(other, [Target.ORT_CPU], [Precision.FP32])


def test_export_command_builds_variants(run_dir):
    result = CliRunner().invoke(main, ["export", str(run_dir), "--target", "ort-cpu", "--precision", "int8",
                                       "--calib-size", "16", "--max-accuracy-drop", "100"])
    assert result.exit_code == 0, result.output
    assert "ort-cpu-int8" in result.output and "CPU:" in result.output
    result = CliRunner().invoke(main, ["export", str(run_dir), "--precision", "int8"])
    assert result.exit_code == 1 and "--precision goes with --target" in result.output


@pytest.mark.gpu
def test_tensorrt_engine_build_and_record(run_dir):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (it needs an NVIDIA GPU)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from edgetransfer.errors import EngineMismatchError
    from edgetransfer.optimize.tensorrt import check_engine

    (variant,) = build_variants(run_dir, [Target.TENSORRT], [Precision.FP16])
    record = check_engine(variant.path)
    assert record["tensorrt"] == trt.__version__ and record["precision"] == "fp16"
    path = variant.path.with_suffix(".json")
    path.write_text(json.dumps({**record, "compute_capability": "1.0"}))
    with pytest.raises(EngineMismatchError, match=r"built for compute_capability 1.0"):
        check_engine(variant.path)


def test_committed_demo_calibration_set_is_balanced_training_data():
    root = Path(__file__).parent.parent / "calibration" / "digits"
    samples = folder_samples(root)
    assert len(samples) == 200
    assert sorted(p.name for p in root.iterdir()) == [str(d) for d in range(10)]
    assert all(len(list((root / str(d)).glob("*.png"))) == 20 for d in range(10))
    dataset = load_dataset(DataSpec())
    val_names = {Path(s.name).name for s in dataset.val}
    assert not val_names & {Path(s.name).stem for s in samples}  # never validation images
    expected = {Path(s.name).name for s in balanced_sample(dataset.train, 200)}
    assert {Path(s.name).stem for s in samples} == expected
