from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgetransfer.cli import main
from edgetransfer.data import DataSpec, Sample, load_dataset
from edgetransfer.errors import DataError, EdgeTransferError, QuantizationError, RunError, UnknownNameError
from edgetransfer.export import export_onnx
from edgetransfer.optimize import CalibMethod, CpuFeatures, Precision, QuantOptions, Target, build_variants, cpu_features, ort_target
from edgetransfer.optimize import ort as ortq
from edgetransfer.optimize.calibration import BatchStream, balanced_sample, folder_samples
from edgetransfer.optimize.guard import RANKING_IMAGES, Selection, hold_budget, rank_layers
from edgetransfer.results import VariantReport, compare, paired_interval
from edgetransfer.rundir import Manifest, RunDir
from edgetransfer.runtime import Predictor, probe_provider

from conftest import copy_run, depthwise_cnn, write_folder

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
    assert artifacts["ort-cpu-fp16"]["parent"] == "onnx" and artifacts["ort-cpu-fp16"]["report"]["eval_images"] == 40
    assert artifacts["ort-cpu-fp16"]["report"]["eval_split"] == "test"
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
    assert report.accuracy.top1_agreement >= 0.7  # unguarded INT8 of a small 64 px model: a real model, not noise
    guard = report.details["guard"]  # chose on training images, without labels; reported on the test split
    held_out = {s.name for s in RunDir(run_dir).held_out()[0]}
    assert report.accuracy.split == "test" and report.accuracy.images == len(held_out) == 40
    assert guard["selection"]["labels_used"] is False and guard["selection"]["images"] == 40  # every validation image
    assert set(guard["selection"]["names"]).isdisjoint(held_out) and guard["method"] == "none needed"
    assert guard["selection"]["source"] == "validation images"
    predictor = Predictor(variant.path)  # metadata travels into the INT8 model too
    assert len(predictor.labels) == 10 and len(predictor.predict(np.zeros((8, 8, 3), np.uint8))) == 5


class _FlippingSubject:
    """A quantiser whose layers each change the top-1 of a fixed number of images while quantised."""

    name, fallback = "INT8", "fp32"

    def __init__(self, flips: dict[str, int], float_logits: np.ndarray) -> None:
        self.flips, self.float_logits, self.calls = flips, float_logits, []

    def layers(self) -> list[str]:
        return list(self.flips)

    def logits(self, kept, images):
        self.calls.append((tuple(kept), len(images)))
        changed = sum(n for name, n in self.flips.items() if name not in kept)
        out = self.float_logits[: len(images)].copy()
        out[:changed] = np.roll(out[:changed], 1, axis=1)  # distinct values: every rolled row changes class
        return out


def _selection(images: int = 200) -> Selection:
    logits = np.random.default_rng(0).normal(size=(images, 10)).astype(np.float32)
    return Selection(np.zeros((images, 1), np.float32), logits, [f"train/{i}" for i in range(images)], "training images")


def test_guard_ranks_layers_and_bisects_to_the_fewest_that_hold_the_budget():
    selection = _selection()
    subject = _FlippingSubject({"stem": 20, "block1": 1, "block3": 12, "head": 0, "block7": 4}, selection.float_logits)
    held = hold_budget(subject, selection, budget=3.0, max_float=4, report=lambda _: None)
    assert held.kept == ["stem", "block3"] and held.final[0] == pytest.approx(2.5)  # 5 of 200 images still change
    assert [name for name, _ in held.ranking] == ["stem", "block3", "block7", "block1", "head"]
    ranking_calls = [c for c in subject.calls if c[1] == RANKING_IMAGES]
    assert len(ranking_calls) == 5 and all(len(kept) == 4 for kept, _ in ranking_calls)  # each layer the only one quantised
    measured = [len(s.kept_in_float) for s in held.steps]
    assert measured == [0, 4, 2, 1] and all(s.images == 200 for s in held.steps)  # bisection: 3 measurements, not 1 per layer
    assert held.steps[0].drop_points == pytest.approx(18.5)
    record = held.record(selection, 3.0, 4)
    assert record["method"] == "ranked bisection" and record["selection"]["labels_used"] is False
    assert record["selection"]["images"] == 200 and record["selection"]["names"][0] == "train/0"


def test_guard_refuses_when_even_max_float_layers_miss_the_budget():
    selection = _selection()
    subject = _FlippingSubject({"stem": 20, "block3": 12, "block7": 4}, selection.float_logits)
    with pytest.raises(QuantizationError, match=r"changes the top-1 of 8\.00% .* with 1 layer\(s\) kept in float .* nothing was written"):
        hold_budget(subject, selection, budget=3.0, max_float=1, report=lambda _: None)
    subject.calls.clear()
    with pytest.raises(QuantizationError, match=r"0 layer\(s\) kept in float"):
        hold_budget(subject, selection, budget=3.0, max_float=0, report=lambda _: None)
    assert subject.calls == [((), 200)]  # no layer may be kept, so none is ranked
    subject.calls.clear()
    held = hold_budget(subject, selection, budget=20.0, max_float=0, report=lambda _: None)
    assert held.kept == [] and subject.calls == [((), 200)]  # within budget: one measurement


def _fragile_model(path: Path) -> str:
    """A small CNN whose second conv writes one channel 1000x larger than the others, undone by
    the third conv's weights: the same function in float, but a per-tensor activation scale that
    leaves the other channels a few levels. Returns the third conv's weight name."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    ).eval()
    with torch.no_grad():
        net[2].weight[0] *= 1000
        net[2].bias[0] *= 1000
        net[4].weight[:, 0] /= 1000
    torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(path), input_names=["input"], dynamic_axes={"input": {0: "batch"}}, dynamo=False)
    return "4.weight"


def test_ranking_puts_the_layer_behind_an_outlier_channel_first(tmp_path):
    model = tmp_path / "fragile.onnx"
    fragile_weight = _fragile_model(model)
    prepared, quantized = tmp_path / "prepared.onnx", tmp_path / "int8.onnx"
    ortq.preprocess_for_quantization(model, prepared)
    images = np.random.default_rng(1).normal(size=(64, 3, 16, 16)).astype(np.float32)

    class Reader:
        def __init__(self):
            self.batches = iter([{"input": images[i : i + 16]} for i in range(0, 64, 16)])

        def get_next(self):
            return next(self.batches, None)

    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    calibrator = create_calibrator(str(prepared), None, augmented_model_path=str(tmp_path / "aug.onnx"))
    calibrator.collect_data(Reader())
    cache = save_tensors_data(calibrator.compute_data(), tmp_path / "ranges.json") or tmp_path / "ranges.json"
    ortq.quantize_qdq(prepared, quantized, cache, CalibMethod.MINMAX, ortq.QuantScheme("uint8"), [])
    subject = ort_target.OrtQuantized(prepared, quantized)
    float_logits = ortq.run_logits(prepared, images)
    ranking = rank_layers(subject, subject.layers(), images, float_logits)
    graph = onnx.load(str(prepared)).graph
    fragile = next(n.name for n in graph.node if n.op_type == "Conv" and fragile_weight in n.input[1])
    assert ranking[0][0] == fragile and ranking[0][1] > 10 * ranking[1][1]
    # the logits leave the last layer in float (no quantise-dequantise on the model's output), so
    # every layer back in float is the float model again
    quantized_model = onnx.load(str(quantized))
    output = next(n for n in quantized_model.graph.node if quantized_model.graph.output[0].name in n.output)
    assert output.op_type == "Gemm"
    candidate = subject.candidate(subject.layers())
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in candidate.graph.node)
    np.testing.assert_allclose(ortq.run_logits(candidate.SerializeToString(), images), float_logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(QuantizationError, match="no node named 'conv99'"):
        subject.candidate(["conv99"])


def test_paired_interval_is_honest_about_few_images():
    low, high = paired_interval(lost=5, gained=0, images=359)
    assert low < -1.39 < high < 0  # 5 images lost of 359: a real loss, between about 0.3 and 2.5 points
    assert paired_interval(5, 0, 3590)[1] - paired_interval(5, 0, 3590)[0] < high - low  # more images, narrower
    zero = paired_interval(0, 0, 40)
    assert zero[0] < 0 < zero[1]  # no image differs, yet 40 images cannot prove "no change"
    even = paired_interval(9, 9, 179)
    assert even[0] == pytest.approx(-even[1]) and even[1] > 2.5  # 18 images differ both ways: +-3 points of noise
    result = compare(np.eye(4)[[0, 1, 2, 2]], np.eye(4)[[0, 1, 2, 3]], np.array([0, 1, 2, 3]))
    assert (result.lost, result.gained, result.top1_change_points) == (1, 0, -25.0)


def test_calibration_methods_give_different_scales(run_dir, tmp_path):
    """Real digits, prepared as the run's model takes them, through a small CNN (ONNX Runtime's
    entropy search costs over a second per tensor: two minutes on EfficientNet-Lite0)."""
    from edgetransfer.runtime.metadata import ModelInfo

    info = ModelInfo.from_props({p.key: p.value for p in onnx.load(run_dir / "model.onnx").metadata_props})
    prepared = tmp_path / "prepared.onnx"
    ortq.preprocess_for_quantization(depthwise_cnn(tmp_path / "cnn.onnx", info.preprocessing.input_size), prepared)
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
    assert set(minmax) == set(entropy) == set(percentile) and len(minmax) >= 5
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
    from edgetransfer.runtime.preprocessing import Preprocessing

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
    result = CliRunner().invoke(
        main, ["export", str(run_dir), "--target", "ort-cpu", "--precision", "int8", "--calib-size", "16", "--max-accuracy-drop", "100"]
    )
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
    from edgetransfer.backends.tensorrt import check_engine
    from edgetransfer.errors import EngineMismatchError

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
    held_out = {Path(s.name).name for s in dataset.val + dataset.test}
    assert not held_out & {Path(s.name).stem for s in samples}  # never validation or test images
    expected = {Path(s.name).name for s in balanced_sample(dataset.train, 200)}
    assert {Path(s.name).stem for s in samples} == expected


@pytest.mark.parametrize(
    "vnni, target, reference",
    [
        (False, Target.TENSORRT, True),  # 8-bit weights saturate on AVX2: measured as the GPU computes
        (False, Target.ORT_CUDA, True),
        (False, Target.ORT_CPU, False),  # this CPU's own kernels, on its 7-bit scheme
        (True, Target.TENSORRT, False),  # exact here: the real kernels
    ],
)
def test_a_gpu_int8_model_is_measured_as_the_gpu_computes_where_this_cpu_saturates(monkeypatch, vnni, target, reference):
    monkeypatch.setattr(ort_target, "cpu_features", lambda: CpuFeatures("an x86 CPU", "x86_64", avx2=True, avx512=vnni, vnni=vnni))
    assert ort_target.gpu_reference(target, Precision.INT8) is reference
    assert ort_target.gpu_reference(target, Precision.FP16) is False
