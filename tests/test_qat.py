"""Quantisation-aware fine-tuning: a child run whose QDQ model every INT8 target takes as it is."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgetransfer.checkpoint import load_checkpoint
from edgetransfer.cli import main
from edgetransfer.config import QatOptions
from edgetransfer.cpu import CpuFeatures
from edgetransfer.errors import OptionError, QuantizationError, RunError
from edgetransfer.optimize import Precision, QuantOptions, Target, build_variants
from edgetransfer.optimize.guard import Selection, hold_prequantized
from edgetransfer.qat import resume_qat, run_qat
from edgetransfer.qat_export import logits_of, qdq_limit, verify_qdq
from edgetransfer.qat_scheme import fold_batchnorm, qat_scheme
from edgetransfer.rundir import RunDir

from conftest import copy_run


@pytest.fixture(scope="module")
def parent(trained_run, tmp_path_factory) -> Path:
    return copy_run(trained_run, tmp_path_factory, "qat")


@pytest.fixture(scope="module")
def child(parent) -> Path:
    """Two QAT epochs on the shared run (120 training images at 64 px): a few seconds each."""
    return run_qat(parent, QatOptions(epochs=2)).run_dir


def _images(run: RunDir, split: str) -> tuple[np.ndarray, np.ndarray]:
    from edgetransfer.data import load_image

    built, _ = run.load_checkpoint()
    pre = built.preprocessing
    samples = getattr(run.dataset, split)
    pixels = [pre.normalize(np.asarray(pre.resize_crop(load_image(s)), dtype=np.uint8)) for s in samples]
    return np.stack(pixels), np.array([s.label for s in samples])


def payload_library(child: Path) -> str:
    return json.loads((child / "config.json").read_text())["qat"]["library"]["version"]


def test_a_qat_run_is_a_child_of_its_float_run(parent, child):
    assert child == parent / "qat-ort-cpu"
    manifest = RunDir(child).manifest()
    assert manifest.data["status"] == "complete"
    assert manifest.data["parent"] == {"run": str(parent.resolve()), "checkpoint_sha256": RunDir(parent).checkpoint_sha256()}
    assert manifest.artifacts["checkpoint"]["settings"]["qat"]["target"] == "ort-cpu"
    assert manifest.data["versions"]["nvidia-modelopt"] == payload_library(child)  # the library that trained it
    recorded = RunDir(parent).manifest().artifacts["qat:qat-ort-cpu"]
    assert recorded["path"] == "qat-ort-cpu/model.pt" and recorded["parent"] == "checkpoint"
    assert recorded["sha256"] == RunDir(child).checkpoint_sha256()
    # the same data and split as the parent: the child's held-out images are the parent's
    assert [s.name for s in RunDir(child).dataset.test] == [s.name for s in RunDir(parent).dataset.test]
    metrics = json.loads((child / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [0, 1, 2]
    assert not (child / "last.pt").exists()  # the resume state goes once the run is complete
    assert metrics["val_top1"] == max(h["val_top1"] for h in metrics["history"])  # the best quantised epoch is kept
    assert metrics["history"][metrics["best_epoch"]]["val_top1"] == metrics["val_top1"]


def unfusable(graph) -> list[str]:
    """The compute nodes and Adds of a QDQ graph that ONNX Runtime's QDQ rules cannot fuse into an
    integer kernel: an input that is not dequantised, or an output not read by exactly one
    QuantizeLinear (a Clip or Relu between them allowed). The logits are left float on purpose."""
    dequantized = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    readers = lambda tensor: [n for n in graph.node if tensor in n.input]  # noqa: E731
    outputs = {o.name for o in graph.output}
    found = []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul", "Add"):
            continue
        activations = node.input[:1] if node.op_type in ("Conv", "Gemm", "MatMul") else node.input
        weights = node.input[1:2] if node.op_type != "Add" else []
        if not all(t in dequantized for t in [*activations, *weights]):
            found.append(node.name)
            continue
        after = readers(node.output[0])
        if len(after) == 1 and after[0].op_type in ("Clip", "Relu"):
            after = readers(after[0].output[0])
        if node.output[0] not in outputs and not (len(after) == 1 and after[0].op_type == "QuantizeLinear"):
            found.append(node.name)
    return found


def test_every_conv_and_linear_is_quantised_in_the_exported_model(child):
    """...and placed so that ONNX Runtime fuses each one: the residual Adds read the quantised
    shortcut, every projection's output is quantised once, the classifier's bias is int32."""
    import onnx

    graph = onnx.load(str(RunDir(child).onnx)).graph
    dequantized = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    compute = [node for node in graph.node if node.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(compute) == 50  # EfficientNet-Lite0: 49 convolutions and the classifier
    assert all(node.input[0] in dequantized and node.input[1] in dequantized for node in compute)
    assert all(node.input[2] in dequantized for node in compute)  # int32 biases
    assert sum(node.op_type == "Add" for node in graph.node) == 9 and unfusable(graph) == []
    assert not [node for node in graph.node if node.op_type == "BatchNormalization"]  # folded before training
    record = json.loads((child / "config.json").read_text())["qat"]
    assert len(record["output_quantizers"]) == 9 and all(name.endswith("conv_pwl") for name in record["output_quantizers"])


def test_the_exported_qdq_model_matches_the_fake_quantised_pytorch_model(child):
    """The round trip: the checkpoint rebuilt from disk, against the QDQ model in ONNX Runtime,
    both its reference semantics (no graph optimisation) and the integer kernels that run.
    Tolerance (qdq_limit, QDQ_FLOOR_FACTOR): 3x how far float64 arithmetic alone moves the
    fake-quantised model, since both compute the same integer grid in a different float order."""
    import onnxruntime as ort

    run = RunDir(child)
    built, payload = load_checkpoint(run.checkpoint)
    assert payload["qat"]["weight_levels"] in (63, 127)
    images, _ = _images(run, "val")
    torch_logits = logits_of(built.module, images)
    limit, floor = qdq_limit(built.module, images, torch_logits)
    assert 0 < floor < limit < 0.25 * np.abs(torch_logits).max()
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(str(run.onnx), options, providers=["CPUExecutionProvider"])
        onnx_logits = session.run(None, {"input": images})[0]
        assert np.abs(onnx_logits - torch_logits).max() <= limit, level
        assert np.mean(onnx_logits.argmax(1) == torch_logits.argmax(1)) >= 0.85, level
    parity = run.manifest().artifacts["onnx"]["parity"]
    assert parity["within_tolerance"] and parity["floor_max_abs_diff"] > 0 and parity["atol"] > parity["floor_max_abs_diff"]
    assert parity["images"] == len(run.dataset.val)


def test_a_qdq_model_that_computes_something_else_fails_the_check(child, tmp_path):
    """One weight scale wrong by 30% in the exported model: the check refuses it."""
    import onnx
    from onnx import numpy_helper

    from edgetransfer.data import load_image
    from edgetransfer.errors import ParityError

    run = RunDir(child)
    model = onnx.load(str(run.onnx))
    constants = {node.output[0]: node for node in model.graph.node if node.op_type == "Constant"}
    initializers = {init.name: init for init in model.graph.initializer}
    first_weight_dq = next(
        node
        for node in model.graph.node
        if node.op_type == "DequantizeLinear"
        and (node.input[1] in initializers or node.input[1] in constants)
        and numpy_helper.to_array(initializers[node.input[1]] if node.input[1] in initializers else constants[node.input[1]].attribute[0].t).size > 1
    )
    name = first_weight_dq.input[1]
    if name in initializers:
        scale = numpy_helper.to_array(initializers[name])
        initializers[name].CopyFrom(numpy_helper.from_array((scale * 1.3).astype(scale.dtype), name))
    else:
        attribute = constants[name].attribute[0]
        scale = numpy_helper.to_array(attribute.t)
        attribute.t.CopyFrom(numpy_helper.from_array((scale * 1.3).astype(scale.dtype)))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    built, payload = load_checkpoint(run.checkpoint)
    images = [load_image(s) for s in run.dataset.val]
    record = payload["qat"]
    verify_qdq(built, run.onnx, images, record)  # the real one passes
    with pytest.raises(ParityError, match="differ by up to"):
        verify_qdq(built, tampered, images, record)


def test_a_rebuilt_checkpoint_gives_the_same_logits_as_the_trained_module(child, parent):
    """Restoring (fold, insert quantizers, load ranges) is exact: the saved unsigned flags and
    7-bit ranges come back; a float model loaded in their place would differ."""
    run = RunDir(child)
    first, _ = load_checkpoint(run.checkpoint)
    second, _ = load_checkpoint(run.checkpoint)
    images, _ = _images(run, "test")
    np.testing.assert_array_equal(logits_of(first.module, images), logits_of(second.module, images))
    float_model, _ = RunDir(parent).load_checkpoint()
    assert np.abs(logits_of(float_model.module, images) - logits_of(first.module, images)).max() > 1e-3


class _Killed(BaseException):
    """Nothing catches it: the process dies here."""


@pytest.mark.parametrize("kill_after", [0, 1])
def test_a_qat_run_killed_after_any_epoch_resumes_to_the_same_bits(parent, child, tmp_path, kill_after):
    out = tmp_path / "interrupted"

    def kill(epoch: int) -> None:
        if epoch == kill_after:
            raise _Killed

    with pytest.raises(_Killed):
        run_qat(parent, QatOptions(epochs=2), out, on_epoch=kill)
    assert (out / "last.pt").is_file() and not (out / "model.pt").exists()
    with pytest.raises(RunError, match="still training or was interrupted"):
        build_variants(out, [Target.ORT_CPU], [Precision.INT8])
    torch.manual_seed(1234)  # scramble the global generators: the resumed epochs must not depend on them
    np.random.seed(1234)
    result = resume_qat(out)
    resumed, reference = torch.load(out / "model.pt")["state_dict"], torch.load(child / "model.pt")["state_dict"]
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    reference_metrics = json.loads((child / "metrics.json").read_text())
    assert [h["val_top1"] for h in result.metrics["history"]] == [h["val_top1"] for h in reference_metrics["history"]]
    assert [h["train_loss"] for h in result.metrics["history"]] == [h["train_loss"] for h in reference_metrics["history"]]
    with pytest.raises(RunError, match="has finished"):
        resume_qat(out)
    entries = RunDir(parent).manifest().artifacts  # each child its own entry in the parent's manifest
    assert entries[f"qat:{out.resolve()}"]["run"] == str(out.resolve()) and "qat:qat-ort-cpu" in entries


def test_int8_variants_ship_the_qat_model_as_it_is(child, parent):
    import onnx

    run = RunDir(child)
    (variant,) = build_variants(child, [Target.ORT_CPU], [Precision.INT8], QuantOptions(max_accuracy_drop=100))
    report = variant.report
    assert report.kept_in_float == [] and report.details["mode"].startswith("static QDQ from quantisation-aware training")
    assert "calibration" not in report.details  # not quantised a second time
    guard = report.details["guard"]
    assert guard["criterion"] == "labelled top-1 drop against float" and guard["selection"]["labels_used"]
    assert set(guard["selection"]["names"]).isdisjoint(s.name for s in run.dataset.test)
    assert report.accuracy.split == "test" and report.accuracy.images == len(run.dataset.test)
    # measured against the parent's float model, not against itself
    assert report.accuracy.top1_agreement < 1.0 or report.accuracy.max_abs_diff > 1e-3
    shipped = onnx.load(str(variant.path)).graph
    assert not any(node.op_type == "BatchNormalization" for node in shipped.node)
    assert sum(node.op_type == "QLinearConv" for node in shipped.node) == 49
    coverage = report.coverage  # read from the graph ONNX Runtime runs: every multiply-accumulate in an integer kernel
    assert coverage.share == 1.0 and coverage.float_layers == () and coverage.dequantize_nodes == 0 and coverage.quantize_nodes == 1
    assert variant.path.stat().st_size < 0.4 * run.onnx.stat().st_size  # int8 weights, not float ones behind QuantizeLinear
    entry = run.manifest().artifacts["ort-cpu-int8"]
    assert entry["settings"]["precision"] == "int8"


def test_openvino_runs_the_qat_model_in_int8(child):
    pytest.importorskip("openvino")
    from edgetransfer.runtime.openvino_ir import import_openvino

    (variant,) = build_variants(child, [Target.OPENVINO], [Precision.INT8], QuantOptions(max_accuracy_drop=100))
    assert variant.report.kept_in_float == []
    ov = import_openvino()
    compiled = ov.Core().compile_model(str(variant.path), "CPU")
    kinds = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in ("Convolution", "GroupConvolution"):
            kinds[info["runtimePrecision"].astype(str)] = kinds.get(info["runtimePrecision"].astype(str), 0) + 1
    assert kinds.get("u8", 0) + kinds.get("i8", 0) == sum(kinds.values()) == 49, kinds


def test_float_variants_and_foreign_schemes_of_a_qat_run_are_refused(child):
    with pytest.raises(OptionError, match="INT8 already"):
        build_variants(child, [Target.ORT_CPU], [Precision.FP32])
    with pytest.raises(OptionError, match="--qat-target tensorrt"):  # uint8 activations: TensorRT takes int8 only
        build_variants(child, [Target.TENSORRT], [Precision.INT8])


def test_the_qat_guard_judges_labelled_top1_not_disagreement():
    """A QAT model may disagree with float on unsure images both ways and lose nothing; one that
    loses images is refused, with nothing kept in float."""
    labels = np.arange(10) % 3
    float_logits = np.eye(3)[labels] * 2.0
    float_logits[:2] = np.eye(3)[(labels[:2] + 1) % 3]  # float is wrong on images 0 and 1
    swapped = np.eye(3)[labels].astype(float)
    swapped[2:4] = np.eye(3)[(labels[2:4] + 1) % 3]  # right on 0 and 1, wrong on 2 and 3: the same top-1
    selection = Selection(np.zeros((10, 1)), float_logits, [str(i) for i in range(10)], "validation images", labels)
    held = hold_prequantized("INT8 (QAT)", lambda images: swapped, selection, budget=1.0)
    assert held.final[0] == 40.0 and held.labelled_drop == 0.0 and held.kept == []
    worse = np.eye(3)[(labels + 1) % 3]
    with pytest.raises(QuantizationError, match="loses 80.00 top-1 points"):
        hold_prequantized("INT8 (QAT)", lambda images: worse, selection, budget=1.0)


def test_the_scheme_follows_the_target_and_the_cpu():
    avx2 = CpuFeatures("EPYC", "x86_64", avx2=True)
    vnni = CpuFeatures("Xeon", "x86_64", avx2=True, vnni=True)
    assert qat_scheme("ort-cpu", avx2).weight_levels == 63 and qat_scheme("ort-cpu", vnni).weight_levels == 127
    assert qat_scheme("openvino", avx2).unsigned_activations
    tensorrt = qat_scheme("tensorrt", avx2)
    assert tensorrt.weight_levels == 127 and not tensorrt.unsigned_activations


@pytest.mark.parametrize("arch", ["timm:efficientnet_lite0", "resnet18", "mobilenet_v3_small"])
def test_folding_batchnorm_keeps_the_float_outputs(arch):
    from edgetransfer.models import build

    built = build(arch, 5, weights="none", image_size=32)
    module = built.module.eval()
    with torch.no_grad():  # give BatchNorm statistics that are not the identity
        for layer in module.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.5, 0.5), layer.running_var.uniform_(0.5, 2.0), layer.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = module(x)
    folded = copy.deepcopy(module)
    count = fold_batchnorm(folded, 32)
    with torch.no_grad():
        after = folded(x)
    assert count == sum(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(after, before, atol=1e-4 * before.abs().max().item(), rtol=1e-4)


def test_qat_refuses_what_it_cannot_do(parent, child, tmp_path):
    with pytest.raises(RunError, match="exists"):
        run_qat(parent, QatOptions(epochs=0))
    with pytest.raises(RunError, match="already a QAT run"):
        run_qat(child, QatOptions(epochs=0), tmp_path / "again")
    with pytest.raises(RunError, match="no run|no fine-tuned run|manifest"):
        run_qat(tmp_path / "nothing", QatOptions(epochs=0))
    with pytest.raises(OptionError, match="unknown QAT target"):
        QatOptions(target="npu")
    assert not (tmp_path / "again").exists()


def test_the_cli_needs_from_and_qat_together_and_nothing_else(parent):
    runner = CliRunner()
    result = runner.invoke(main, ["finetune", "--qat"])
    assert result.exit_code == 1 and "--from RUN --qat" in result.output
    result = runner.invoke(main, ["finetune", "--from", str(parent), "--qat", "--epochs", "3"])
    assert result.exit_code == 1 and "drop --epochs" in result.output


def test_bench_measures_the_qat_variants_beside_the_parents(parent, child):
    """PTQ and QAT on the same images in one bench run."""
    from edgetransfer.bench import BenchOptions, bench_run

    build_variants(child, [Target.ORT_CPU], [Precision.INT8], QuantOptions(max_accuracy_drop=100))
    build_variants(parent, [Target.ORT_CPU], [Precision.INT8], QuantOptions(max_accuracy_drop=100, max_float_layers=0))
    report = bench_run(parent, BenchOptions(batch_sizes=(1,), rounds=1, iterations=3, warmup=1))
    rows = {row.variant: row for row in report.results}
    assert {"eager", "ort-cpu-int8", "qat-ort-cpu/ort-cpu-int8"} <= rows.keys()
    qat, ptq = rows["qat-ort-cpu/ort-cpu-int8"], rows["ort-cpu-int8"]
    assert qat.measured and ptq.measured, (qat.reason, ptq.reason)
    assert qat.accuracy.top1_change_interval is not None  # paired with eager on the same images
    shipped = next(v for v in RunDir(child).manifest().artifacts.values() if v["path"] == "ort-cpu-int8.onnx")
    assert abs(qat.accuracy.top1 - shipped["report"]["top1"]) < 1e-9  # the same test images as export measured


def test_tensorrt_receives_the_same_complete_placement_in_int8(parent, tmp_path, monkeypatch):
    """A QAT run for TensorRT (symmetric int8 everywhere, calibrated only): the model the engine is
    built from quantises both inputs of every residual Add, as NVIDIA's explicit-quantisation
    guidance asks, and has no uint8 activation (TensorRT takes int8 only)."""
    import onnx
    from onnx import numpy_helper

    from test_tensorrt import FakeTensorRT, install, pretend_gpu

    child = run_qat(parent, QatOptions(target="tensorrt", epochs=0), tmp_path / "qat-trt").run_dir
    pretend_gpu(monkeypatch)
    trt = install(monkeypatch, FakeTensorRT())
    (variant,) = build_variants(child, [Target.TENSORRT], [Precision.INT8], QuantOptions(max_accuracy_drop=100))
    assert variant.path.read_bytes() == b"ENGINE"
    graph = onnx.load_from_string(trt.parsed).graph
    assert unfusable(graph) == [] and sum(node.op_type == "Add" for node in graph.node) == 9
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    constants.update({i.name: numpy_helper.to_array(i) for i in graph.initializer})
    zero_points = [constants[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
