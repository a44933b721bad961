"""AdaRound (AMD Quark) on ONNX Runtime's INT8 model: it re-rounds weights by at most one step
inside ONNX Runtime's range, changes nothing else, brings a real model closer to float than
nearest rounding, and runs inside the guard when nearest rounding misses the budget, before any
layer goes back to float."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgetransfer.errors import MissingDependencyError
from edgetransfer.optimize import Precision, QuantOptions, Target, build_variants, rounding
from edgetransfer.optimize import ort as ortq
from edgetransfer.optimize.guard import Selection, hold_budget
from edgetransfer.optimize.ort import CalibMethod
from edgetransfer.optimize.rounding import Rounding, adaround
from edgetransfer.rundir import RunDir

from conftest import copy_run, depthwise_cnn, digits_pixels

needs_quark = pytest.mark.skipif(not rounding.available(), reason="AdaRound needs AMD Quark (pip install 'edgetransfer[quark]')")


def _digits(count: int, size: int = 24) -> np.ndarray:
    """Real digits, grey as RGB, normalised: the small CNN's calibration images."""
    pixels = np.stack([p for _, p in digits_pixels(count // 10, classes=10, size=size)]).astype(np.float32) / 255.0
    return np.repeat((pixels[:, None] - 0.5) / 0.25, 3, axis=1)


def _quantize(tmp_path: Path, calibration: np.ndarray) -> tuple[Path, Path]:
    model, prepared, quantized = tmp_path / "net.onnx", tmp_path / "prepared.onnx", tmp_path / "int8.onnx"
    depthwise_cnn(model)
    ortq.preprocess_for_quantization(model, prepared)
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    calibrator = create_calibrator(str(prepared), None, augmented_model_path=str(tmp_path / "aug.onnx"))

    class Reader:
        def __init__(self):
            self.batches = iter([{"input": calibration[i : i + 16]} for i in range(0, len(calibration), 16)])

        def get_next(self):
            return next(self.batches, None)

    calibrator.collect_data(Reader())
    cache = tmp_path / "ranges.json"
    save_tensors_data(calibrator.compute_data(), cache)
    # 7-bit weights, as on x86 without VNNI: the coarsest grid the tool ships
    ortq.quantize_qdq(prepared, quantized, cache, CalibMethod.MINMAX, ortq.QuantScheme("uint8", reduce_range=True), [])
    return prepared, quantized


def _int8_weights(model) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8}


@needs_quark
def test_adaround_moves_weights_one_step_at_most_and_changes_nothing_else(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / ".")
    calibration = _digits(60)
    prepared, quantized = _quantize(tmp_path, calibration)
    qdq, float_model = onnx.load(str(quantized)), onnx.load(str(prepared))
    batches = [{"input": calibration[i : i + 15]} for i in range(0, 60, 15)]
    result = adaround(float_model, qdq, batches, iterations=100, limits=(-64, 64))
    numpy_draw = np.random.get_state()[1].copy()
    again = adaround(float_model, qdq, batches, iterations=100, limits=(-64, 64))
    assert _int8_weights(again.model).keys() == _int8_weights(result.model).keys()
    assert all(np.array_equal(_int8_weights(again.model)[k], w) for k, w in _int8_weights(result.model).items())  # seeded: repeatable
    assert np.array_equal(np.random.get_state()[1], numpy_draw)  # and the caller's generator is given back untouched

    before, after = _int8_weights(qdq), _int8_weights(result.model)
    layers = [n for n in qdq.graph.node if n.op_type in ("Conv", "Gemm")]
    assert before.keys() == after.keys() and result.layers == len(layers) == 4 and result.images == 60
    moved = sum(int(np.count_nonzero(after[k] != before[k])) for k in before)
    weights = sum(w.size for name, w in before.items() if not name.endswith("_zero_point"))  # not the weights' zero points
    assert moved == result.moved > 0 and result.weights == weights
    for name in before:
        step = np.abs(after[name].astype(int) - before[name].astype(int))
        assert step.max() <= 1 and after[name].min() >= -64 and after[name].max() <= 64
    # nothing but the int8 weights changed: same graph, same scales and zero points
    assert [(n.op_type, list(n.input)) for n in result.model.graph.node] == [(n.op_type, list(n.input)) for n in qdq.graph.node]
    others = lambda m: {i.name: numpy_helper.to_array(i).tobytes() for i in m.graph.initializer if i.data_type != onnx.TensorProto.INT8}  # noqa: E731
    assert others(result.model) == others(qdq)
    assert all(np.array_equal(_int8_weights(onnx.load(str(quantized)))[k], _int8_weights(qdq)[k]) for k in before)
    assert result.record()["weights_moved"] == moved and result.record()["layers"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aug.onnx", "int8.onnx", "net.onnx", "prepared.onnx", "ranges.json"]  # nothing of Quark's


class _RecoveringSubject:
    """A quantiser whose layers each flip a fixed number of images, and whose recovery divides
    every layer's flips by ``gain``."""

    name, fallback = "INT8", "fp32"

    def __init__(self, flips: dict[str, int], float_logits: np.ndarray, gain: int) -> None:
        self.flips, self.float_logits, self.gain, self.calls = dict(flips), float_logits, gain, []

    def layers(self):
        self.calls.append(("layers",))
        return list(self.flips)

    def logits(self, kept, images):
        self.calls.append(("measure", tuple(kept), len(images)))
        changed = sum(n for name, n in self.flips.items() if name not in kept)
        out = self.float_logits[: len(images)].copy()
        out[:changed] = np.roll(out[:changed], 1, axis=1)
        return out

    def recover(self):
        self.calls.append(("recover",))
        self.flips = {name: n // self.gain for name, n in self.flips.items()}
        return {"method": "division", "gain": self.gain}


def _selection(images: int = 200) -> Selection:
    logits = np.random.default_rng(0).normal(size=(images, 10)).astype(np.float32)
    return Selection(np.zeros((images, 1), np.float32), logits, [f"val/{i}" for i in range(images)], "validation images")


def test_guard_recovers_the_whole_model_before_ranking_or_keeping_any_layer_in_float():
    selection = _selection()
    # 36 images flip (18%); recovery halves each layer: 10 + 6 + 2 = 18 flip (9%), then float layers hold 3%
    subject = _RecoveringSubject({"stem": 20, "block3": 12, "block7": 4}, selection.float_logits, gain=2)
    held = hold_budget(subject, selection, budget=3.0, max_float=3, report=lambda _: None, recover=subject.recover)
    assert subject.calls[:3] == [("measure", (), 200), ("recover",), ("measure", (), 200)]  # no ranking before recovery
    assert held.kept == ["stem", "block3"] and held.final[0] == pytest.approx(1.0)
    assert held.ranking[0][0] == "stem" and held.recovery == {"method": "division", "gain": 2}
    record = held.record(selection, 3.0, 3)
    assert record["recovery"]["gain"] == 2 and record["method"] == "ranked bisection"
    assert [s.drop_points for s in held.steps][:2] == [18.0, 9.0]

    # recovery alone holds the budget: nothing is ranked, nothing goes back to float
    enough = _RecoveringSubject({"stem": 6, "block3": 4}, selection.float_logits, gain=4)
    held = hold_budget(enough, selection, budget=3.0, max_float=3, report=lambda _: None, recover=enough.recover)
    assert held.kept == [] and held.final[0] == pytest.approx(1.0) and held.ranking == []
    assert ("layers",) not in enough.calls and held.record(selection, 3.0, 3)["method"] == "learned rounding"


@pytest.fixture(scope="module")
def run_dir(trained_run, tmp_path_factory):
    return copy_run(trained_run, tmp_path_factory, "rounding")


@needs_quark
def test_adaround_brings_a_real_model_closer_to_float_on_images_it_never_saw(run_dir, tmp_path):
    """EfficientNet-Lite0 fine-tuned on real digits: AdaRound on every layer, optimised on 32
    training images, measured on the run's test images.

    The weights are 7-bit (``reduce_range``) whatever this CPU is: the test is about the rounding,
    and 7-bit u8 x s8 products are computed exactly by ONNX Runtime on AVX2 and VNNI CPUs alike,
    so the figure is the same on every x86 machine."""
    from edgetransfer.optimize.context import TensorRTOptions, open_context

    context = open_context(RunDir(run_dir), QuantOptions(calib_size=40), TensorRTOptions())
    scheme = ortq.QuantScheme(activation="uint8", reduce_range=True)
    prepared, quantized = tmp_path / "prepared.onnx", tmp_path / "int8.onnx"
    ortq.preprocess_for_quantization(context.base, prepared)
    samples, _ = context.calibration_samples()
    cache = ortq.calibrate(prepared, context.stream(samples, 8), CalibMethod.MINMAX, False, tmp_path / "ranges.json")
    ortq.quantize_qdq(prepared, quantized, cache, CalibMethod.MINMAX, scheme, [])
    batches = list(iter(context.stream(samples[:32], 8).get_next, None))
    result = adaround(onnx.load(str(prepared)), onnx.load(str(quantized)), batches, iterations=100, limits=(-64, 64))
    error = lambda model: float(np.mean((ortq.run_logits(model, context.held_out) - context.float_logits) ** 2))  # noqa: E731
    nearest, learned = error(quantized), error(result.model.SerializeToString())
    assert context.split == "test" and result.layers == 50 and result.moved > 0
    assert learned < 0.5 * nearest, (learned, nearest)  # 0.11x on a Zen 5 EPYC (AIMET's on 3 layers: 0.55x)


@needs_quark
def test_int8_build_rounds_when_nearest_misses_the_budget_and_ships_what_it_measured(run_dir):
    plain = build_variants(run_dir, [Target.ORT_CPU], [Precision.INT8], QuantOptions(calib_size=40, max_accuracy_drop=100))[0]
    assert plain.report.details["rounding"] == {"method": "nearest", "asked": "auto"}  # within budget: nothing to recover
    unguarded = plain.report.guard_steps[0].drop_points
    plain_weights = _int8_weights(onnx.load(plain.path))  # the next build writes the same file
    assert unguarded > 0  # a real model whose INT8 changes some selection images: the guard has work

    options = QuantOptions(calib_size=40, max_accuracy_drop=0.0, max_float_layers=60, adaround_iterations=30, adaround_images=16)
    (variant,) = build_variants(run_dir, [Target.ORT_CPU], [Precision.INT8], options)
    report = RunDir(run_dir).manifest().artifacts["ort-cpu-int8"]["report"]
    recovery = report["guard"]["recovery"]
    assert recovery["method"].startswith("AdaRound") and recovery["iterations"] == 30 and recovery["images"] == 16
    assert recovery["layers"] == 50 and recovery["weights_moved"] > 0 and report["rounding"] == recovery
    steps = variant.report.guard_steps
    assert steps[0].drop_points == unguarded and steps[1].kept_in_float == () and steps[1].logit_mse < steps[0].logit_mse
    # the shipped weights are the re-rounded ones, one step from nearest at most (those kept in float read float weights)
    shipped = _int8_weights(onnx.load(variant.path))
    changed = [name for name, w in shipped.items() if not np.array_equal(w, plain_weights[name])]
    assert changed and all(np.abs(shipped[n].astype(int) - plain_weights[n].astype(int)).max() <= 1 for n in changed)


def test_rounding_without_quark_says_what_to_install_or_rounds_to_nearest(run_dir, monkeypatch):
    monkeypatch.setattr(rounding, "available", lambda: False)
    with pytest.raises(MissingDependencyError, match=r"pip install 'edgetransfer\[quark\]'"):
        build_variants(run_dir, [Target.ORT_CPU], [Precision.INT8], QuantOptions(calib_size=40, rounding=Rounding.ADAROUND))
    (variant,) = build_variants(run_dir, [Target.ORT_CPU], [Precision.INT8], QuantOptions(calib_size=40, max_accuracy_drop=100))
    assert variant.report.details["rounding"]["method"] == "nearest"
    assert any("learned rounding (AdaRound) needs AMD Quark" in w for w in variant.report.warnings)
