"""export --target triton: a Triton model repository whose config.pbtxt is Triton's own ModelConfig,
read from the model it serves, checked by parsing it back, and refused when it no longer matches."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as pb

from edgetransfer.cli import main
from edgetransfer.config import Precision
from edgetransfer.errors import OptionError
from edgetransfer.export import export_onnx
from edgetransfer.optimize import QuantOptions
from edgetransfer.rundir import RunDir
from edgetransfer.runtime import Predictor
from edgetransfer.runtime.files import sha256_file
from edgetransfer.runtime.preprocessing import Preprocessing, load_rgb
from edgetransfer.triton import TritonError, TritonOptions, check_repository, model_config, signature, write_repository

from conftest import copy_run


@pytest.fixture(scope="module")
def run(trained_run, tmp_path_factory) -> Path:
    copied = copy_run(trained_run, tmp_path_factory, "triton")
    export_onnx(copied)
    return copied


@pytest.fixture(scope="module")
def fp32(run) -> Path:
    [folder] = write_repository(run, [Precision.FP32], TritonOptions(threads=2, max_batch_size=12))
    return folder


def parsed(folder: Path):
    return text_format.Parse((folder / "config.pbtxt").read_text(), pb.ModelConfig())


def test_the_config_is_read_from_the_model_it_serves(run, fp32):
    config = parsed(fp32)
    classes = RunDir(run).manifest().data["finetune"]["classes"]
    assert fp32 == run / "triton" / f"{run.name}-fp32" and config.name == fp32.name
    assert (config.backend, config.max_batch_size, config.default_model_filename) == ("onnxruntime", 12, "model.onnx")
    assert [(i.name, pb.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == [("input", "TYPE_FP32", [3, 64, 64])]
    assert [(o.name, list(o.dims), o.label_filename) for o in config.output] == [("logits", [len(classes)], "labels.txt")]
    assert [(g.count, pb.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [(1, "KIND_CPU")]
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4, 8, 12]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert config.parameters["intra_op_thread_count"].string_value == "2"
    assert (fp32 / "labels.txt").read_text().splitlines() == classes
    assert sha256_file(fp32 / "1/model.onnx") == sha256_file(run / "model.onnx")  # the verified export, as it is
    entry = RunDir(run).manifest().artifacts[f"triton:{fp32.name}"]
    assert (entry["kind"], entry["parent"], entry["settings"]["model_sha256"]) == ("triton-config", "onnx", sha256_file(run / "model.onnx"))
    assert "target" not in entry["settings"]  # not a runnable variant: bench leaves it alone


def test_a_client_preprocessing_as_the_repository_says_gets_the_predictors_answer(run, fp32, digit_folder):
    """What a Triton client sends: the runtime's preprocessing from preprocessing.json; the model
    Triton runs is the file in 1/ (run here with ONNX Runtime, as Triton's backend would)."""
    images = sorted(digit_folder.rglob("*.png"))[::5]  # every class
    pre = Preprocessing.from_dict(json.loads((fp32 / "preprocessing.json").read_text()))
    batch = np.stack([pre(load_rgb(path)) for path in images])
    logits = ort.InferenceSession(str(fp32 / "1/model.onnx"), providers=["CPUExecutionProvider"]).run(["logits"], {"input": batch})[0]
    labels = (fp32 / "labels.txt").read_text().splitlines()
    expected = [p[0].label for p in Predictor(run / "model.onnx").predict([str(p) for p in images], top_k=1)]
    assert len(set(expected)) > 1 and [labels[i] for i in logits.argmax(1)] == expected


@pytest.mark.parametrize(
    "plant, message",
    [
        (lambda f: _edit(f / "config.pbtxt", "dims: 64", "dims: 224", count=1), r"declares inputs .*but the model has"),
        (lambda f: _edit(f / "config.pbtxt", 'name: "logits"', 'name: "output"'), r"declares outputs"),
        (lambda f: _edit(f / "config.pbtxt", "TYPE_FP32", "TYPE_UINT8", count=1), r"declares inputs"),
        (lambda f: _edit(f / "config.pbtxt", "max_batch_size: 12", "max_batch_size: 0"), r"max batch 0"),
        (lambda f: _edit(f / "config.pbtxt", "max_batch_size", "max_batch"), r"is not a Triton model configuration"),
        (lambda f: (f / "labels.txt").write_text("\n".join(reversed((f / "labels.txt").read_text().splitlines()))), r"labels in order"),
        (lambda f: (f / "preprocessing.json").unlink(), r"missing or unreadable"),
        (lambda f: (f / "1/model.onnx").write_bytes(b"not a model"), r"not an ONNX model"),
    ],
)
def test_a_repository_that_no_longer_matches_its_model_is_refused(fp32, tmp_path, plant, message):
    planted = tmp_path / fp32.name
    shutil.copytree(fp32, planted)
    check_repository(planted)  # as written, it passes
    plant(planted)
    with pytest.raises(TritonError, match=message):
        check_repository(planted)


def _edit(path: Path, old: str, new: str, count: int = -1) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, count))


def test_int8_serves_the_guarded_variant_and_a_second_write_replaces_the_first(run):
    quant = QuantOptions(max_accuracy_drop=100, calib_size=32, rounding="nearest")
    [folder] = write_repository(run, [Precision.INT8], TritonOptions(name="digits", accelerator="openvino"), quant)
    assert folder.name == "digits" and sha256_file(folder / "1/model.onnx") == sha256_file(run / "ort-cpu-int8.onnx")
    accelerators = parsed(folder).optimization.execution_accelerators
    assert [a.name for a in accelerators.cpu_execution_accelerator] == ["openvino"]
    [again] = write_repository(run, [Precision.INT8], TritonOptions(name="digits", max_batch_size=4), quant)
    assert again == folder and parsed(folder).max_batch_size == 4 and not parsed(folder).HasField("optimization")
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]  # nothing staged is left


def test_a_gpu_repository_asks_for_tensorrt_in_the_models_precision(run):
    model = onnx.load(str(run / "model.onnx"), load_external_data=False)
    config = model_config("m", model, Precision.FP16, TritonOptions(gpu=True, accelerator="tensorrt", instances=2))
    parsed_back = text_format.Parse(text_format.MessageToString(config), pb.ModelConfig())
    [trt] = parsed_back.optimization.execution_accelerators.gpu_execution_accelerator
    assert (trt.name, dict(trt.parameters)) == ("tensorrt", {"precision_mode": "FP16"})
    assert [(g.count, pb.ModelInstanceGroup.Kind.Name(g.kind)) for g in parsed_back.instance_group] == [(2, "KIND_GPU")]


def _graph(batch, elem=TensorProto.FLOAT) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", elem, [batch, 3])
    y = helper.make_tensor_value_info("y", elem, [batch, 3])
    return helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))


def test_models_triton_cannot_batch_or_type_are_refused_in_one_line():
    assert signature(_graph("n")) == ([("x", "TYPE_FP32", [3])], [("y", "TYPE_FP32", [3])])
    with pytest.raises(TritonError, match=r"^x has no dynamic batch axis \(was the model exported with --static-batch\?\)"):
        signature(_graph(1))
    with pytest.raises(TritonError, match=r"^x is of ONNX type STRING"):
        signature(_graph("n", TensorProto.STRING))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--triton-gpu"], "the --triton-\\* options go with --target triton"),
        (["--target", "triton", "--precision", "bf16"], "has no bf16 model on a CPU"),
        (["--target", "triton", "--precision", "fp16"], "or fp16 with --triton-gpu"),
        (["--target", "triton", "--triton-accelerator", "tensorrt"], "is not a CPU accelerator"),
        (["--target", "triton", "--triton-name", "a/b"], "--triton-name a/b must be letters"),
        (["--target", "triton", "--triton-max-batch", "0"], "must be between 1 and"),
    ],
)
def test_triton_options_out_of_place_are_one_line(run, args, message):
    before = sorted(p.name for p in run.rglob("*"))
    result = CliRunner().invoke(main, ["export", str(run), *args])
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert re.search(message, result.output)
    assert sorted(p.name for p in run.rglob("*")) == before


def test_a_folder_a_killed_write_left_is_swept_by_the_next_stage(run):
    stale = run / "triton" / ".digits.abc123.tmp" / "digits" / "1"
    stale.mkdir(parents=True)
    with RunDir(run).lock():
        pass
    assert not stale.parents[1].exists()


def test_a_triton_folder_that_is_a_link_is_refused_and_its_target_untouched(run, tmp_path):
    copied = tmp_path / "run"
    shutil.copytree(run, copied, ignore=shutil.ignore_patterns("triton"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (copied / "triton").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OptionError, match=r"triton is a link or a file"):
        write_repository(copied, [Precision.FP32])
    assert list(elsewhere.iterdir()) == []


def test_the_fused_preprocess_export_serves_uint8_crops_with_the_same_answers(run, digit_folder):
    [folder] = write_repository(run, [Precision.FP32], TritonOptions(name="crops", uint8=True))
    config = parsed(folder)
    assert [(i.name, pb.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == [("input", "TYPE_UINT8", [64, 64, 3])]
    assert RunDir(run).manifest().artifacts["triton:crops"]["parent"] == "onnx-uint8"
    images = sorted(digit_folder.rglob("*.png"))[::5]
    pre = Preprocessing.from_dict(json.loads((folder / "preprocessing.json").read_text()))
    crops = np.stack([np.asarray(pre.resize_crop(load_rgb(path)), dtype=np.uint8) for path in images])  # no scaling: the graph does it
    logits = ort.InferenceSession(str(folder / "1/model.onnx"), providers=["CPUExecutionProvider"]).run(["logits"], {"input": crops})[0]
    labels = (folder / "labels.txt").read_text().splitlines()
    expected = [p[0].label for p in Predictor(run / "model.onnx").predict([str(p) for p in images], top_k=1)]
    assert [labels[i] for i in logits.argmax(1)] == expected
    with pytest.raises(OptionError, match="--triton-uint8 serves the fused-preprocess export"):
        write_repository(run, [Precision.INT8], TritonOptions(uint8=True))
