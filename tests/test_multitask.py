"""Multi-task heads: one frozen backbone, one head per task, trained, exported, quantised, and
predicted per task in the torch-free runtime."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edgetransfer.bench import BenchOptions, bench_run
from edgetransfer.cli import main
from edgetransfer.config import FinetuneConfig
from edgetransfer.data import DataSpec
from edgetransfer.errors import DataError, OptionError, QuantizationError, TritonError
from edgetransfer.export import export_onnx
from edgetransfer.finetune import finetune
from edgetransfer.models import build
from edgetransfer.optimize import Precision, QuantOptions, Target, build_variants
from edgetransfer.optimize.guard import Selection, distance, hold_budget
from edgetransfer.optimize.rounding import Rounding
from edgetransfer.rundir import RunDir
from edgetransfer.runtime import Predictor
from edgetransfer.runtime.cli import main as runtime_main
from edgetransfer.runtime.tasks import Tasks
from edgetransfer.safeload import safe_load
from edgetransfer.tasks import load_tasks, parse_task, tasks_option
from edgetransfer.triton import check_repository

from conftest import digits_pixels

SMALL = DataSpec(limit_per_class=30)  # 300 digits and 60 faces: seconds, not minutes
EPOCHS = 4


def two_task_config(**changes) -> FinetuneConfig:
    return FinetuneConfig(tasks=tasks_option("demo", SMALL), epochs=EPOCHS, **changes)


@pytest.fixture(scope="module")
def two_task_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("multitask") / "run"
    finetune(two_task_config(), run)
    export_onnx(run)
    return run


def test_a_two_task_run_reports_each_task_and_chooses_its_epoch_on_their_mean(two_task_run):
    metrics = json.loads((two_task_run / "metrics.json").read_text())
    assert list(metrics["tasks"]) == ["digit", "face"]
    digit, face = metrics["tasks"]["digit"], metrics["tasks"]["face"]
    assert digit["classes"] == [str(i) for i in range(10)] and face["classes"] == ["face", "not-face"]
    assert (digit["train_images"], digit["val_images"], digit["test"]["images"]) == (210, 60, 30)
    assert (face["train_images"], face["val_images"], face["test"]["images"]) == (42, 12, 6)
    for task in (digit, face):
        low, high = task["test"]["interval"]
        assert low <= 100 * task["test"]["top1"] <= high and high - low > 5  # few images: a wide interval
    assert digit["val_top1"] > 0.5 and face["val_top1"] > 0.7  # it learned both tasks, not one
    means = [row["val_top1"] for row in metrics["epochs"]]
    assert metrics["best_epoch"] == 1 + int(np.argmax(means))
    assert means[metrics["best_epoch"] - 1] == pytest.approx((digit["val_top1"] + face["val_top1"]) / 2)
    manifest = RunDir(two_task_run).manifest().data["finetune"]
    assert set(manifest["tasks"]) == {"digit", "face"} and manifest["data"]["tasks"][1]["data"]["source"] == "faces"


class Killed(Exception):
    pass


def test_a_killed_two_task_run_resumes_to_the_same_bits(two_task_run, tmp_path):
    run = tmp_path / "killed"

    def kill_after_two(record):
        if record["epoch"] == 2:
            raise Killed()

    with pytest.raises(Killed):
        finetune(two_task_config(), run, on_epoch=kill_after_two)
    assert (run / "last.pt").is_file() and not (run / "metrics.json").exists()
    finetune(two_task_config(), run, resume=True)
    resumed, whole = safe_load(run / "model.pt"), safe_load(two_task_run / "model.pt")
    assert resumed["tasks"] == whole["tasks"] and resumed["epoch"] == whole["epoch"]
    for key, value in whole["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    history = json.loads((run / "metrics.json").read_text())["epochs"]
    assert [r["val_top1"] for r in history] == [r["val_top1"] for r in json.loads((two_task_run / "metrics.json").read_text())["epochs"]]


@pytest.mark.slow
def test_full_mode_trains_the_backbone_on_the_weighted_tasks_and_resumes_to_the_same_bits(tmp_path):
    weighted = tuple(replace(task, weight=w) for task, w in zip(tasks_option("demo", DataSpec(limit_per_class=10)), (1.0, 0.25), strict=True))
    config = FinetuneConfig(tasks=weighted, mode="full", epochs=3, probe_epochs=1, image_size=32)
    whole = finetune(config, tmp_path / "whole")
    assert whole.metrics["weighting"] == {"method": "fixed weights on the sum of the tasks' losses", "weights": {"digit": 1.0, "face": 0.25}}
    assert whole.metrics["probe"]["epochs"] == 1 and whole.metrics["frozen_pass"] is None  # images went through the network
    trained = safe_load(tmp_path / "whole" / "model.pt")
    pretrained = build(config.arch, 12, None, 32).module.state_dict()
    assert not torch.equal(trained["state_dict"]["conv_stem.weight"], pretrained["conv_stem.weight"])  # the backbone trained

    def kill_after_one(record):
        if record["epoch"] == 1:
            raise Killed()

    with pytest.raises(Killed):
        finetune(config, tmp_path / "killed", on_epoch=kill_after_one)
    finetune(config, tmp_path / "killed", resume=True)
    resumed = safe_load(tmp_path / "killed" / "model.pt")
    for key, value in trained["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key


def test_the_export_has_one_output_per_task_with_parity_on_each(two_task_run):
    model = onnx.load(str(two_task_run / "model.onnx"))
    assert [o.name for o in model.graph.output] == ["logits", "logits_digit", "logits_face"]
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["tasks"]) == [{"name": "digit", "labels": [str(i) for i in range(10)]}, {"name": "face", "labels": ["face", "not-face"]}]
    parity = RunDir(two_task_run).manifest().artifacts["onnx"]["parity"]
    assert set(parity["outputs"]) == {"logits", "logits_digit", "logits_face"}
    assert all(diff <= parity["atol"] for diff in parity["outputs"].values()) and parity["top1_agreement"] == 1.0


def test_predictions_per_task_match_pytorch_and_need_no_torch(two_task_run, tmp_path):
    faces = [np.asarray(s.source) for s in RunDir(two_task_run).dataset.val if s.name.startswith("face/")][:3]
    digits = [np.asarray(pixels) for _, pixels in digits_pixels(1, classes=3, size=8)]
    paths = []
    for index, image in enumerate(faces + digits):
        paths.append(tmp_path / f"{index}.png")
        Image.fromarray(image).save(paths[-1])
    predictor = Predictor(two_task_run / "model.onnx")
    answers = predictor.predict([str(p) for p in paths], top_k=2)
    assert predictor.tasks is not None and predictor.tasks.names == ("digit", "face")
    assert all(list(a) == ["digit", "face"] and len(a["digit"]) == 2 and len(a["face"]) == 2 for a in answers)
    built, _ = RunDir(two_task_run).load_checkpoint()
    with torch.no_grad():
        eager = built.module(torch.from_numpy(np.stack([predictor._prepare(str(p)) for p in paths]))).numpy()
    assert [a["digit"][0].index for a in answers] == list(eager[:, :10].argmax(1))
    assert [a["face"][0].index for a in answers] == list(eager[:, 10:].argmax(1))
    assert all(a["face"][0].probability + a["face"][1].probability == pytest.approx(1.0, abs=1e-5) for a in answers)  # a softmax per task
    blocked = "import sys; sys.modules['torch'] = None; "  # any import of torch fails
    code = blocked + (
        "import json; from edgetransfer.runtime import Predictor;"
        f" a = Predictor({str(two_task_run / 'model.onnx')!r}).predict({[str(p) for p in paths]!r}, top_k=1);"
        " print(json.dumps([{t: r[t][0].label for t in r} for r in a]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == [{task: ranked[0].label for task, ranked in a.items()} for a in answers]


def test_the_runtime_cli_prints_a_column_per_task_and_nests_json(two_task_run, tmp_path, capsys):
    image = tmp_path / "digit.png"
    Image.fromarray(np.asarray(digits_pixels(1, classes=1, size=8)[0][1])).save(image)
    assert runtime_main(["predict", str(two_task_run / "model.onnx"), str(image), "-k", "1"]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    assert header.split("\t") == ["image", "digit", "face"] and len(row.split("\t")) == 3
    assert runtime_main(["predict", str(two_task_run / "model.onnx"), str(image), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tasks"] == ["digit", "face"]
    nested = printed["results"][0]["predictions"]
    assert len(nested["digit"]) == 3 and len(nested["face"]) == 2 and {p["label"] for p in nested["face"]} == {"face", "not-face"}


def test_the_toolkit_predict_shows_a_column_per_task(two_task_run, tmp_path):
    image = tmp_path / "digit.png"
    Image.fromarray(np.asarray(digits_pixels(1, classes=1, size=8)[0][1])).save(image)
    result = CliRunner().invoke(main, ["predict", str(two_task_run / "model.onnx"), str(image), "--top-k", "2"])
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "rank" in line)
    assert header.index("digit") < header.index("face")
    result = CliRunner().invoke(main, ["predict", str(two_task_run / "model.onnx"), str(image), "--json"])
    assert set(json.loads(result.output)["results"][0]["predictions"]) == {"digit", "face"}


def test_the_server_answers_per_task_as_predict_does(two_task_run):
    pytest.importorskip("bentoml", reason="the serve extra is not installed")
    from test_serve import app_for, send

    predictor = Predictor(two_task_run / "model.onnx")
    image = np.asarray(digits_pixels(1, classes=1, size=8)[0][1])
    encoded = io.BytesIO()
    Image.fromarray(image).save(encoded, format="PNG")
    app, _ = app_for(predictor)
    answer, info = send(
        app, ("POST", "/classify?top_k=1", {"content": encoded.getvalue(), "headers": {"content-type": "image/png"}}), ("GET", "/model", {})
    )
    assert answer.status_code == 200, answer.text
    served = answer.json()["results"][0]["predictions"]
    expected = predictor.predict(encoded.getvalue(), top_k=1)
    assert {task: [p["label"] for p in ranked] for task, ranked in served.items()} == {
        task: [p.label for p in ranked] for task, ranked in expected.items()
    }
    assert info.json()["tasks"] == {"digit": [str(i) for i in range(10)], "face": ["face", "not-face"]}


@pytest.mark.slow
def test_bench_measures_the_single_task_models_it_replaces_in_turn(two_task_run, tmp_path):
    singles = {}
    for task, source in (("digit", "digits"), ("face", "faces")):
        singles[task] = tmp_path / task
        finetune(FinetuneConfig(data=replace(SMALL, source=source), epochs=EPOCHS), singles[task])
        export_onnx(singles[task])
    run = tmp_path / "two-task"
    shutil.copytree(two_task_run, run)
    options = BenchOptions(
        batch_sizes=(1,), rounds=1, iterations=3, warmup=1, replaces=(singles["face"], singles["digit"]), models=(singles["digit"] / "model.onnx",)
    )
    report = bench_run(run, options)
    rows = {row.variant: row for row in report.results}
    in_turn = rows["in turn: digit + face"]  # in the order of the tasks, whatever order they were given in
    assert in_turn.measured and rows["onnx"].measured, in_turn.reason
    for task in ("digit", "face"):
        own = json.loads((singles[task] / "metrics.json").read_text())["test"]
        measured = in_turn.accuracy.per_task[task]
        assert measured["images"] == own["images"] and abs(measured["top1"] - own["top1"]) <= 1 / own["images"]
    assert set(rows["onnx"].accuracy.per_task) == {"digit", "face"}
    alone = rows["model.onnx"]  # one single-task model beside them: timed in the same rounds, its accuracy not comparable
    assert alone.measured and alone.accuracy is None and "latency only" in alone.reason and alone.latency
    with pytest.raises(OptionError, match="one single-task run per task"):
        bench_run(run, replace(options, replaces=(singles["digit"],)))


def test_a_triton_repository_labels_every_task_output(two_task_run, tmp_path):
    pytest.importorskip("tritonclient", reason="the triton extra is not installed")
    run = tmp_path / "run"
    shutil.copytree(two_task_run, run)
    result = CliRunner().invoke(main, ["export", str(run), "--target", "triton", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    folder = next((run / "triton").iterdir())
    assert (folder / "labels_logits_face.txt").read_text().splitlines() == ["face", "not-face"]
    assert 'label_filename: "labels_logits_digit.txt"' in (folder / "config.pbtxt").read_text()
    (folder / "labels_logits_face.txt").write_text("not-face\nface\n")  # planted: swapped labels
    with pytest.raises(TritonError, match="labels of output logits_face"):
        check_repository(folder)


def test_info_shows_each_tasks_test_top1(two_task_run):
    result = CliRunner().invoke(main, ["info", str(two_task_run)])
    assert result.exit_code == 0, result.output
    face = json.loads((two_task_run / "metrics.json").read_text())["tasks"]["face"]["test"]
    assert "task face" in result.output and f"{100 * face['top1']:.2f}% of {face['images']} images" in result.output
    assert "mean of the tasks" in result.output


def test_qat_of_a_multi_task_run_is_refused_before_any_work(two_task_run, tmp_path):
    result = CliRunner().invoke(main, ["finetune", "--from", str(two_task_run), "--qat", "--out", str(tmp_path / "qat")])
    assert result.exit_code != 0 and "multi-task run; QAT takes one task" in result.output and not (tmp_path / "qat").exists()


def test_metadata_whose_tasks_do_not_fit_the_labels_is_refused():
    labels = ("a:x", "a:y", "b:p", "b:q")
    assert Tasks.from_json('[{"name": "a", "labels": ["x", "y"]}, {"name": "b", "labels": ["p", "q"]}]', labels).slices == [slice(0, 2), slice(2, 4)]
    for text in ('[{"name": "a", "labels": ["x", "y"]}, {"name": "b", "labels": ["q", "p"]}]', '{"a": 1}', "[", '[{"name": "a", "labels": ["x"]}]'):
        with pytest.raises(Exception, match="tasks metadata"):
            Tasks.from_json(text, labels)


# ---------------------------------------------------------------------------------------------
# The INT8 guard: the worst task decides


def _planted(float_logits: np.ndarray, tasks: Tasks, labels: np.ndarray, task: int, rows: int) -> np.ndarray:
    """``float_logits`` with the top-1 of ``rows`` images of task ``task`` (and of nothing else) moved."""
    damaged = float_logits.copy()
    columns = tasks.slices[task]
    mine = np.flatnonzero(tasks.task_of(labels) == task)[:rows]
    block = damaged[np.ix_(mine, range(columns.start, columns.stop))]
    damaged[np.ix_(mine, range(columns.start, columns.stop))] = np.roll(block, 1, axis=1) + 0.0  # another class wins
    return damaged


class _Planted:
    """A quantiser whose model damages one task's answers until ``fixes`` layers are in float."""

    name, fallback = "INT8", "fp32"

    def __init__(self, clean: np.ndarray, damaged: np.ndarray, fixes: int) -> None:
        self.clean, self.damaged, self.fixes = clean, damaged, fixes

    def layers(self):
        return [f"conv{i}" for i in range(8)]

    def logits(self, kept, images):
        return (self.clean if len(kept) >= self.fixes else self.damaged)[: len(images)]


def test_the_guard_refuses_damage_to_one_task_that_the_other_task_would_hide():
    tasks = Tasks(("digit", "face"), (tuple("0123456789"), ("face", "not-face")))
    rng = np.random.default_rng(0)
    labels = np.array([i % 10 for i in range(190)] + [10 + i % 2 for i in range(10)])  # 190 digits, 10 faces
    float_logits = rng.normal(size=(200, 12)).astype(np.float32)
    damaged = _planted(float_logits, tasks, labels, task=1, rows=2)  # 2 of 10 faces change: 20 points on that task
    pooled = Selection(np.zeros((200, 1), np.float32), float_logits, [str(i) for i in range(200)], "validation images", labels)
    per_task = replace(pooled, tasks=tasks)
    assert distance(tasks.masked(damaged, labels), tasks.masked(float_logits, labels))[0] == pytest.approx(1.0)  # 2 of 200 images
    assert per_task.per_task(damaged) == {"digit": 0.0, "face": pytest.approx(20.0)}
    assert per_task.score(damaged)[0] == pytest.approx(20.0)
    with pytest.raises(QuantizationError, match="20.00% of the worst task.s selection images"):
        hold_budget(_Planted(float_logits, damaged, fixes=99), per_task, 1.5, 8, lambda message: None)
    result = hold_budget(_Planted(float_logits, damaged, fixes=3), per_task, 1.5, 8, lambda message: None)
    assert len(result.kept) == 3 and result.final[0] == 0.0
    assert result.record(per_task, 1.5, 8)["criterion"] == "the worst task's top-1 disagreement"


@pytest.mark.slow
def test_int8_of_a_two_task_model_is_built_under_the_worst_task_guard(two_task_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_task_run, run)
    quant = QuantOptions(calib_size=32, rounding=Rounding.NEAREST, max_accuracy_drop=40.0, max_float_layers=0, guard_images=64)
    variant = build_variants(run, [Target.ORT_CPU], [Precision.INT8], quant)[0]
    quantised = onnx.load(str(variant.path))
    assert [o.name for o in quantised.graph.output] == ["logits", "logits_digit", "logits_face"]
    assert json.loads({p.key: p.value for p in quantised.metadata_props}["tasks"])[1]["name"] == "face"
    report = RunDir(run).manifest().artifacts[variant.name]["report"]
    guard = report["guard"]
    assert {name: task["images"] for name, task in report["per_task"].items()} == {"digit": 30, "face": 6}  # each task's test images
    assert guard["criterion"] == "the worst task's top-1 disagreement" and guard["tasks"] == ["digit", "face"]
    answers = Predictor(variant.path).predict(np.zeros((24, 24, 3), np.uint8), top_k=1)
    assert set(answers) == {"digit", "face"}


# ---------------------------------------------------------------------------------------------
# Where tasks come from, and what is refused


def _csv_folder(root: Path) -> Path:
    """Twelve digit images labelled for two tasks (parity for all, size for eight), in a CSV."""
    root.mkdir()
    rows = []
    for index, (label, pixels) in enumerate(digits_pixels(4, classes=3, size=16)):
        Image.fromarray(pixels).save(root / f"{index}.png")
        rows.append(
            {
                "image": f"{index}.png",
                "parity": "even" if label % 2 == 0 else "odd",
                "shape": ("round" if label == 0 else "thin") if index < 8 else "",
            }
        )
    with (root / "labels.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, ["image", "parity", "shape"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "labels.csv"


def test_a_csv_file_labels_images_for_several_tasks_and_an_empty_cell_skips_one(tmp_path):
    labels = _csv_folder(tmp_path / "images")
    tasks = tasks_option(str(labels), DataSpec(test_fraction=0.0, val_fraction=0.25))
    assert [(t.name, t.column) for t in tasks] == [("parity", "parity"), ("shape", "shape")]
    loaded = load_tasks(tasks, workers=1)
    parity, shape = loaded["parity"], loaded["shape"]
    assert parity.classes == ["even", "odd"] and len(parity.train) + len(parity.val) == 12
    assert shape.classes == ["round", "thin"] and len(shape.train) + len(shape.val) == 8
    for split in ("train", "val"):  # an image labelled for both tasks is in the same split in both
        assert {s.name for s in getattr(shape, split)} <= {s.name for s in getattr(parity, split)}
    with labels.open("a") as file:
        file.write("../outside.png,odd,thin\n")
    with pytest.raises(DataError, match="outside the CSV file's folder"):
        load_tasks(tasks, workers=1)


def test_task_names_and_combinations_that_cannot_work_are_refused_in_one_line(tmp_path):
    for text, message in (("Digit=digits", "lower-case"), ("digits", "NAME=FOLDER"), ("a b=digits", "lower-case")):
        with pytest.raises(OptionError, match=message):
            parse_task(text)
    with pytest.raises(OptionError, match="2 to 16 tasks"):
        FinetuneConfig(tasks=(parse_task("digit=digits"),))
    with pytest.raises(OptionError, match="--mode prototype takes one task"):
        two_task_config(mode="prototype")
    with pytest.raises(OptionError, match="'demo' or a CSV file"):
        tasks_option(str(tmp_path / "missing.csv"))
    result = CliRunner().invoke(main, ["finetune", "--tasks", "demo", "--data", "digits", "--out", str(tmp_path / "run")])
    assert result.exit_code != 0 and "--task NAME=FOLDER" in result.output and not (tmp_path / "run").exists()
    result = CliRunner().invoke(main, ["finetune", "--task", "a=digits", "--task", "a=faces", "--out", str(tmp_path / "run2")])
    assert result.exit_code != 0 and "share a name" in result.output and not (tmp_path / "run2").exists()
