"""The OpenVINO target: IR conversion, f32/bf16/NNCF INT8 under the guard, bench and runtime backends."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install 'edgetransfer[openvino]'")
pytest.importorskip("nncf", reason="NNCF is not installed: pip install 'edgetransfer[openvino]'")

import openvino as ov  # noqa: E402

from edgetransfer.bench import BenchOptions, bench_run  # noqa: E402
from edgetransfer.cli import main  # noqa: E402
from edgetransfer.data import DataSpec, load_dataset, load_image  # noqa: E402
from edgetransfer.errors import (  # noqa: E402
    EdgeTransferError,  # noqa: E402
    ExportError,
    QuantizationError,
)
from edgetransfer.export import export_onnx  # noqa: E402
from edgetransfer.optimize import Precision, QuantOptions, Target, build_variants, cpu_features  # noqa: E402
from edgetransfer.optimize import openvino as ovq  # noqa: E402
from edgetransfer.rundir import RunDir  # noqa: E402
from edgetransfer.runtime import Predictor, PredictorError  # noqa: E402
from edgetransfer.runtime.files import read_json, sha256_file  # noqa: E402
from edgetransfer.runtime.openvino_ir import bf16_problem, read_ir, save_ir  # noqa: E402

from conftest import copy_run  # noqa: E402

HAS_BF16 = bf16_problem() is None


@pytest.fixture(scope="module")
def run_dir(trained_run, tmp_path_factory):
    """EfficientNet-Lite0 head on 200 digits (64 px) with its OpenVINO f32 IR and an INT8 IR
    built with no accuracy budget (the guard has its own test)."""
    run = copy_run(trained_run, tmp_path_factory, "ov")
    export_onnx(run)
    build_variants(run, [Target.OPENVINO], [Precision.FP32, Precision.INT8], QuantOptions(calib_size=32, max_accuracy_drop=100))
    return run


@pytest.fixture(scope="module")
def val_images():
    dataset = load_dataset(DataSpec(limit_per_class=20))
    return [load_image(s) for s in dataset.val]


def test_fp32_ir_matches_onnx_and_carries_the_run_metadata(run_dir):
    entry = read_json(run_dir / "manifest.json")["artifacts"]["openvino-fp32"]
    assert entry["kind"] == "openvino" and entry["parent"] == "onnx" and entry["path"] == "openvino-fp32.xml"
    assert entry["weights"]["sha256"] == sha256_file(run_dir / "openvino-fp32.bin")
    report = entry["report"]
    assert report["max_abs_diff"] < 1e-3 and report["top1_agreement"] == 1.0
    assert report["inference_precision"] == "f32" and report["evaluated_on"] == "OpenVINO CPU (f32)"
    _, props = read_ir(run_dir / "openvino-fp32.xml")
    assert props["checkpoint_sha256"] == sha256_file(run_dir / "model.pt")
    assert props["source_onnx_sha256"] == sha256_file(run_dir / "model.onnx")
    assert props["inference_precision"] == "f32" and props["labels"].startswith('["0", "1"')


def test_int8_ir_is_nncf_quantised_with_int8_weights(run_dir):
    entry = read_json(run_dir / "manifest.json")["artifacts"]["openvino-int8"]
    report = entry["report"]
    assert report["mode"] == "static (NNCF)" and report["calibration"]["images"] == 32
    assert entry["settings"]["quantization"]["calib_size"] == 32
    assert report["top1_agreement"] >= 0.8
    model, _ = read_ir(run_dir / "openvino-int8.xml")
    kinds = [op.get_type_name() for op in model.get_ordered_ops()]
    int8_weights = [op for op in model.get_ordered_ops() if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8]
    assert kinds.count("FakeQuantize") > 40 and len(int8_weights) > 40
    fp32_bytes = (run_dir / "openvino-fp32.bin").stat().st_size
    assert (run_dir / "openvino-int8.bin").stat().st_size < fp32_bytes / 3


def test_overflow_fix_follows_the_cpu_and_keeps_weights_in_seven_bits(run_dir, val_images):
    avx2 = cpu_features("model name : EPYC\nflags : fpu sse avx2\n")
    vnni = cpu_features("model name : Xeon\nflags : fpu avx2 avx512f avx512_vnni\n")
    if avx2.x86:
        assert ovq.overflow_fix(avx2) == "enable" and ovq.overflow_fix(vnni) == "first_layer_only"
    used = read_json(run_dir / "manifest.json")["artifacts"]["openvino-int8"]["report"]["nncf"]["overflow_fix"]
    assert used == ovq.overflow_fix(cpu_features())
    model = ovq.convert(run_dir / "model.onnx")
    predictor = Predictor(run_dir / "model.onnx")
    calibration = [np.stack([predictor._prepare(img) for img in val_images[:8]])]
    other = "first_layer_only" if used == "enable" else "enable"
    weights = {
        used: _seven_bit_weights(read_ir(run_dir / "openvino-int8.xml")[0]),
        other: _seven_bit_weights(ovq.quantize(model, calibration, overflow=other)),
    }
    fits, total = weights["enable"]
    assert fits == total > 30  # every layer: u8 x s8 pairs cannot saturate 16-bit sums
    assert weights["first_layer_only"] == (1, total)


def _seven_bit_weights(model) -> tuple[int, int]:
    """How many Convolution/MatMul weight tensors (not depthwise: no pairs to add) fit in 7 bits, of how many."""
    fits = [
        int(np.abs(op.get_data().astype(np.int32)).max()) <= 64
        for op in model.get_ordered_ops()
        if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8 and _feeds(op) in ("Convolution", "MatMul")
    ]
    return sum(fits), len(fits)


def _feeds(op) -> str:
    """The type of the layer a weight constant ends up in (past Convert/Subtract/Multiply)."""
    while op.get_type_name() not in ("Convolution", "GroupConvolution", "MatMul", "Result"):
        op = next(iter(op.output(0).get_target_inputs())).get_node()
    return op.get_type_name()


def test_keep_in_float_undoes_quantisation_exactly(run_dir, val_images):
    model = ovq.convert(run_dir / "model.onnx")
    predictor = Predictor(run_dir / "model.onnx")
    batch = np.stack([predictor._prepare(img) for img in val_images[:16]])
    calibration = [batch[:8], batch[8:]]
    quantized = ovq.quantize(model, calibration, compress_weights=False)
    names = ovq.quantized_ops(quantized)
    assert names[0].endswith("/WithoutBiases") and len(names) > 50
    float_logits = ovq.logits(model, batch)
    assert np.abs(ovq.logits(quantized, batch) - float_logits).max() > 1e-2
    everything = ovq.keep_in_float(quantized, model, names)
    assert np.abs(ovq.logits(everything, batch) - float_logits).max() < 1e-4  # biases restored too
    one = ovq.keep_in_float(quantized, model, names[:1])
    assert len(ovq.quantized_ops(one)) == len(names) - 1
    with pytest.raises(EdgeTransferError, match=r"no operation named 'conv99' in the quantised model"):
        ovq.keep_in_float(quantized, model, ["conv99"])


def test_int8_guard_keeps_layers_in_float_until_the_budget_holds(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    # budget 0: only a model that changes no selection image's top-1 passes; every layer in float is the float model
    (variant,) = build_variants(run, [Target.OPENVINO], [Precision.INT8], QuantOptions(calib_size=32, max_accuracy_drop=0.0, max_float_layers=1000))
    report = variant.report
    assert report.guard_steps[0].drop_points > 0.0  # unguarded INT8 changed the top-1 of some selection images
    shipped = [s for s in report.guard_steps if list(s.kept_in_float) == report.kept_in_float]
    assert report.kept_in_float and shipped and shipped[0].drop_points == 0.0
    guard = report.details["guard"]
    assert guard["method"] == "ranked bisection" and guard["seconds"] > 0 and len(guard["ranking"]) > 40
    assert len(report.guard_steps) < 10  # bisection, not one measurement per layer
    held_out = {s.name for s in RunDir(run).held_out()[0]}
    assert set(guard["selection"]["names"]).isdisjoint(held_out) and report.accuracy.split == "test"
    assert report.accuracy.images == len(held_out) == 40
    model, _ = read_ir(variant.path)
    float_ops = set(report.kept_in_float)
    quantized = set(ovq.quantized_ops(model))
    assert quantized and float_ops.isdisjoint(quantized) and len(quantized) + len(float_ops) == len(guard["ranking"])
    with pytest.raises(QuantizationError, match=r"OpenVINO INT8 changes the top-1 of .* even with 0 layer\(s\) kept in float .* nothing was written"):
        build_variants(run, [Target.OPENVINO], [Precision.INT8], QuantOptions(calib_size=32, max_accuracy_drop=0.0, max_float_layers=0))
    assert sha256_file(run / "openvino-int8.xml") == sha256_file(variant.path)


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no native bf16 (AMX or AVX-512 BF16)")
def test_bf16_is_the_f32_ir_run_in_bf16(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (variant,) = build_variants(run, [Target.OPENVINO], [Precision.BF16])
    assert variant.report.details["inference_precision"] == "bf16" and variant.report.accuracy.top1_agreement >= 0.9
    assert 1e-4 < variant.report.accuracy.max_abs_diff < 1.0  # really bf16: not bit-equal to float, but close
    assert (run / "openvino-bf16.bin").stat().st_size == (run / "openvino-fp32.bin").stat().st_size


def test_bf16_is_refused_on_a_cpu_without_it(run_dir, monkeypatch):
    class NoBf16Core:
        def get_property(self, device, name):
            return ["FP32", "INT8", "BIN"]

    message = bf16_problem(NoBf16Core())
    assert message == "this CPU has no native bf16 (it needs AMX or AVX-512 BF16; OpenVINO reports FP32, INT8, BIN); use --precision fp32 or int8"
    import edgetransfer.runtime.openvino_ir as runtime_ov

    monkeypatch.setattr(runtime_ov, "bf16_problem", lambda core=None: message)
    before = sorted(p.name for p in run_dir.iterdir())
    result = CliRunner().invoke(main, ["export", str(run_dir), "--target", "openvino", "--precision", "bf16"])
    assert result.exit_code == 1 and f"Error: cannot build openvino-bf16: {message}" in result.output
    assert sorted(p.name for p in run_dir.iterdir()) == before


@pytest.mark.parametrize(
    "target, precision, message",
    [
        ("openvino", "fp16", r"target openvino has no fp16 variant \(it has fp32, bf16, int8\); OpenVINO's CPU plugin computes bf16, not fp16"),
        ("ort-cpu", "bf16", r"target ort-cpu has no bf16 variant \(it has fp32, fp16, int8\); bf16 is built for --target openvino"),
    ],
)
def test_precisions_a_target_does_not_have_are_refused_up_front(run_dir, target, precision, message):
    result = CliRunner().invoke(main, ["export", str(run_dir), "--target", target, "--precision", precision])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    import re

    assert re.search(message, result.output)


def test_a_model_openvino_cannot_convert_gets_its_reason_on_one_line(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    graph = helper.make_graph([helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)])
    onnx.save(model, tmp_path / "odd.onnx")
    with pytest.raises(ExportError) as caught:
        ovq.convert(tmp_path / "odd.onnx")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("OpenVINO cannot convert odd.onnx: ")
    assert "No conversion rule found for operations: com.example.Frobnicate" in message


def test_missing_openvino_names_the_extra(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed
    with pytest.raises(EdgeTransferError, match=r"^OpenVINO is not installed: pip install 'edgetransfer\[openvino\]'$"):
        build_variants(run_dir, [Target.OPENVINO], [Precision.FP32])
    monkeypatch.setitem(sys.modules, "nncf", None)
    monkeypatch.delitem(sys.modules, "openvino")
    with pytest.raises(EdgeTransferError, match=r"INT8 for OpenVINO needs NNCF, which is not installed: pip install 'edgetransfer\[openvino\]'"):
        build_variants(run_dir, [Target.OPENVINO], [Precision.INT8])


def test_bench_lists_openvino_beside_onnx_runtime(run_dir, tmp_path):
    report = bench_run(run_dir, BenchOptions(batch_sizes=(1,), warmup=1, iterations=3, threads=1), tmp_path)
    rows = {r.variant: r for r in report.results}
    assert list(rows) == ["eager", "onnx", "openvino-fp32", "openvino-int8"]
    fp32 = rows["openvino-fp32"]
    assert fp32.status == "measured" and fp32.provider == "OpenVINO CPU (f32)" and fp32.kind == "openvino"
    pinning = str(ov.Core().get_property("CPU", "ENABLE_CPU_PINNING"))  # left at the plugin's default, and recorded
    assert fp32.backend_settings == {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": "1",
        "INFERENCE_NUM_THREADS": "1",
        "INFERENCE_PRECISION_HINT": "f32",
        "ENABLE_CPU_PINNING": pinning,
    }
    assert fp32.accuracy.top1_agreement == 1.0 and fp32.accuracy.max_abs_logit_diff < 1e-3
    assert fp32.size_bytes == sum((run_dir / f"openvino-fp32.{s}").stat().st_size for s in ("xml", "bin"))
    assert rows["onnx"].backend_settings["intra_op_num_threads"] == "1"
    assert "OpenVINO CPU" in (tmp_path / "bench.md").read_text()


def test_bench_refuses_an_ir_from_another_checkpoint(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    model, props = read_ir(run / "openvino-fp32.xml")
    save_ir(model, run / "openvino-fp32.xml", {**props, "checkpoint_sha256": "0" * 64})
    manifest = RunDir(run).manifest()  # recorded as built (from another checkpoint), so its hash matches
    entry = manifest.artifacts["openvino-fp32"]
    manifest.record("openvino-fp32", entry["path"], "openvino", parent="onnx", settings=entry["settings"])["weights"] = entry["weights"]
    manifest.save()
    report = bench_run(run, BenchOptions(batch_sizes=(1,), warmup=0, iterations=1, variants=("openvino-fp32",)), tmp_path)
    row = report.results[1]
    assert row.status == "failed"
    assert "openvino-fp32.xml was built from another checkpoint than this run's model.pt; rebuild it" in row.reason


def test_predictor_runs_an_ir_like_the_onnx_model(run_dir, val_images):
    onnx_predictor = Predictor(run_dir / "model.onnx")
    ir_predictor = Predictor(run_dir / "openvino-fp32.xml", threads=1)
    assert ir_predictor.provider == "OpenVINO:CPU" and ir_predictor.labels == onnx_predictor.labels
    np.testing.assert_allclose(ir_predictor.logits(val_images), onnx_predictor.logits(val_images), atol=1e-3)
    serial = [ir_predictor.predict(img, top_k=2) for img in val_images[:16]]
    with ThreadPoolExecutor(6) as pool:  # one infer request per thread
        assert list(pool.map(lambda img: ir_predictor.predict(img, top_k=2), val_images[:16])) == serial
    int8 = Predictor(run_dir / "openvino-int8.xml")
    agree = (int8.logits(val_images).argmax(1) == onnx_predictor.logits(val_images).argmax(1)).mean()
    assert agree >= 0.8


def test_predictor_refuses_broken_irs(run_dir, tmp_path):
    for suffix in ("xml", "bin"):
        shutil.copyfile(run_dir / f"openvino-fp32.{suffix}", tmp_path / f"model.{suffix}")
    with pytest.raises(PredictorError, match=r"model.xml is an OpenVINO model: it runs on OpenVINO devices, not ONNX Runtime providers"):
        Predictor(tmp_path / "model.xml", providers=["cuda"])
    with pytest.raises(PredictorError, match=r"OpenVINO device NPU7 is not here \(available: CPU"):
        Predictor(tmp_path / "model.xml", device="NPU7")
    weights = bytearray((tmp_path / "model.bin").read_bytes())
    weights[len(weights) // 2] ^= 0xFF  # same size, one weight changed: OpenVINO alone would run it
    for other in (bytes(weights), (run_dir / "openvino-int8.bin").read_bytes()):
        (tmp_path / "model.bin").write_bytes(other)
        with pytest.raises(PredictorError, match=r"model.bin does not belong to model.xml .* copy the .xml and .bin of one export together"):
            Predictor(tmp_path / "model.xml")
    (tmp_path / "model.bin").unlink()
    with pytest.raises(PredictorError, match=r"the weights of .*model.xml are missing: model.bin must sit beside it"):
        Predictor(tmp_path / "model.xml")


def test_the_openvino_runtime_never_imports_torch(run_dir):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None
        from edgetransfer.runtime import Predictor
        import numpy as np
        predictor = Predictor({str(run_dir / "openvino-int8.xml")!r})
        assert len(predictor.predict(np.zeros((20, 30, 3), np.uint8), top_k=2)) == 2
        assert not any(name == "torch" or name.startswith("torch.") for name, m in sys.modules.items() if m is not None)
        print("ok", predictor.provider)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok OpenVINO:CPU"


def test_predict_command_takes_an_ir(run_dir, val_images, tmp_path):
    val_images[0].save(tmp_path / "digit.png")
    result = CliRunner().invoke(main, ["predict", str(run_dir / "openvino-fp32.xml"), str(tmp_path / "digit.png"), "--json"])
    assert result.exit_code == 0, result.output
    import json

    payload = json.loads(result.output)
    expected = Predictor(run_dir / "model.onnx").predict(val_images[0], top_k=3)
    assert payload["provider"] == "OpenVINO:CPU"
    assert [p["label"] for p in payload["results"][0]["predictions"]] == [p.label for p in expected]
