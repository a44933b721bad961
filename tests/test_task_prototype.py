"""A prototype head as one task of a multi-task model: made from class means with no training,
exported beside the trained heads, quantised with its head kept in float, and enrolled into
where the model is deployed, changing no other task."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from edgetransfer.cli import main
from edgetransfer.config import FinetuneConfig
from edgetransfer.data import DataSpec, load_dataset, load_image
from edgetransfer.errors import OptionError
from edgetransfer.export import export_onnx
from edgetransfer.finetune import finetune
from edgetransfer.optimize import Precision, QuantOptions, Target, build_variants
from edgetransfer.optimize.rounding import Rounding
from edgetransfer.runtime import Predictor, PredictorError
from edgetransfer.runtime.cli import main as runtime_main
from edgetransfer.runtime.enrolment import ENROLMENT_KEY
from edgetransfer.safeload import safe_load
from edgetransfer.tasks import tasks_option, with_heads

SMALL = DataSpec(limit_per_class=30)  # as tests/test_multitask.py: 300 digits and 60 faces


def face_prototype_config(**changes) -> FinetuneConfig:
    return FinetuneConfig(tasks=with_heads(tasks_option("demo", SMALL), ("face=prototype",)), epochs=4, **changes)


@pytest.fixture(scope="module")
def prototype_task_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("prototask") / "run"
    finetune(face_prototype_config(), run)
    export_onnx(run)
    return run


def _digit_images(count: int) -> list:
    return [load_image(sample) for sample in load_dataset(replace(SMALL, source="digits")).test[:count]]


def test_a_prototype_task_is_the_single_task_prototype_model_beside_a_trained_head(prototype_task_run, tmp_path):
    metrics = json.loads((prototype_task_run / "metrics.json").read_text())
    digit, face = metrics["tasks"]["digit"], metrics["tasks"]["face"]
    assert (digit["head"], face["head"]) == ("linear", "prototype") and digit["prototype"] is None
    assert face["prototype"]["shots_per_class"] == [21, 21]
    assert [row["tasks"]["face"]["val_top1"] for row in metrics["epochs"]] == [face["val_top1"]] * 4  # nothing trains it
    alone = finetune(FinetuneConfig(data=replace(SMALL, source="faces"), mode="prototype"), tmp_path / "alone").metrics
    assert alone["prototype"]["scale"] == pytest.approx(face["prototype"]["scale"])
    assert (alone["final"]["top1"], alone["test"]["top1"]) == (face["val_top1"], face["test"]["top1"])  # the same head on the same features
    assert safe_load(prototype_task_run / "model.pt")["task_heads"] == {"digit": "linear", "face": "prototype"}

    model = onnx.load(str(prototype_task_run / "model.onnx"))
    assert [o.name for o in model.graph.output] == ["logits", "logits_digit", "logits_face", "features_face"]
    parity = json.loads((prototype_task_run / "manifest.json").read_text())["artifacts"]["onnx"]["parity"]
    assert set(parity["outputs"]) == {"logits", "logits_digit", "logits_face"} and max(parity["outputs"].values()) < 1e-3


def test_enrolment_goes_into_the_prototype_task_and_changes_no_other(prototype_task_run, tmp_path):
    images = _digit_images(12)
    predictor = Predictor(prototype_task_run / "model.onnx")
    before = predictor.predict(images, top_k=10)
    done = predictor.enrol("scribble", images[:6])
    assert (done.task, done.classes, done.recognised) == ("face", 3, 6)
    after = predictor.predict(images, top_k=10)
    assert [a["digit"] for a in after] == [b["digit"] for b in before]  # the digit task answers exactly as before
    assert predictor.tasks.labels == (tuple(str(i) for i in range(10)), ("face", "not-face", "scribble"))
    assert sum(a["face"][0].label == "scribble" for a in after[6:]) >= 4  # digits it never saw now look like the new class
    saved = Predictor(predictor.save(tmp_path / "enrolled.onnx"))
    assert saved.tasks == predictor.tasks and saved.info.labels[-1] == "face:scribble"
    history = json.loads({p.key: p.value for p in onnx.load(str(tmp_path / "enrolled.onnx")).metadata_props}[ENROLMENT_KEY])
    assert [(r["action"], r["task"]) for r in history] == [("add", "face")]
    removed = saved.remove("scribble", task="face")
    assert removed.classes == 2 and saved.tasks.labels[1] == ("face", "not-face")
    for task, message in (("digit", "was trained"), ("nope", "no task 'nope'")):
        with pytest.raises(PredictorError, match=message):
            saved.enrol("x", images[:2], task=task)
    assert saved.tasks.labels[1] == ("face", "not-face")  # a refusal changed nothing


def test_the_runtime_cli_enrols_into_a_named_task(prototype_task_run, tmp_path, capsys):
    image = tmp_path / "scribble.png"
    _digit_images(1)[0].save(image)
    output = tmp_path / "out.onnx"
    code = runtime_main(
        ["enrol", str(prototype_task_run / "model.onnx"), str(image), "--label", "scribble", "--task", "face", "--output", str(output)]
    )
    out = capsys.readouterr().out
    assert code == 0 and "added scribble from 1 image(s)" in out and "in task face; 3 classes" in out
    assert Predictor(output).tasks.labels[1][-1] == "scribble"


@pytest.mark.slow
def test_int8_keeps_the_prototype_task_in_float_and_can_enrol(prototype_task_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(prototype_task_run, run)
    quant = QuantOptions(calib_size=32, rounding=Rounding.NEAREST, max_accuracy_drop=40.0, max_float_layers=0, guard_images=64)
    variant = build_variants(run, [Target.ORT_CPU], [Precision.INT8], quant)[0]
    graph = onnx.load(str(variant.path)).graph
    produced = {out: node for node in graph.node for out in node.output}
    gemm = next(node for node in graph.node if node.name == "edgetransfer.prototype/face/gemm")
    assert all(produced[name].op_type != "DequantizeLinear" for name in gemm.input if name in produced)  # float in, float prototypes
    digit = next(node for node in graph.node if node.name == "edgetransfer.task/digit/gemm")
    assert produced[digit.input[1]].op_type == "DequantizeLinear"  # the trained head is quantised
    predictor = Predictor(variant.path)
    assert predictor.enrol("scribble", _digit_images(4)).classes == 3


def test_prototype_tasks_that_cannot_work_are_refused_in_one_line(tmp_path):
    with pytest.raises(OptionError, match="goes with --mode head and no --unfreeze"):
        face_prototype_config(mode="full")
    with pytest.raises(OptionError, match="every task is a prototype task"):
        FinetuneConfig(tasks=with_heads(tasks_option("demo"), ("face=prototype", "digit=prototype")))
    with pytest.raises(OptionError, match=r"--task-head takes NAME=linear\|prototype"):
        with_heads(tasks_option("demo"), ("face=means",))
    with pytest.raises(OptionError, match="which is not a task"):
        with_heads(tasks_option("demo"), ("color=prototype",))
    result = CliRunner().invoke(main, ["finetune", "--task-head", "face=prototype", "--out", str(tmp_path / "run")])
    assert result.exit_code != 0 and "go with several tasks" in result.output and not (tmp_path / "run").exists()
