"""What a hostile or careless setup does to the user's machine, refused: a pickle planted in the
torch hub cache, a lock file that is a link, an output path that is a device or a pipe, a budget
of NaN, terminal escapes in names, a lock that would sweep another run's files, a manifest this
version did not write, and refused commands that would still write."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision.models as tvm
from click.testing import CliRunner

from edgetransfer.cli import main
from edgetransfer.config import BenchOptions, ExportOptions, FinetuneConfig, QatOptions
from edgetransfer.errors import EdgeTransferError, ExportError, OptionError, RunError, WeightsError
from edgetransfer.export import export_onnx
from edgetransfer.finetune import finetune
from edgetransfer.models import build
from edgetransfer.optimize import QuantOptions
from edgetransfer.report import predictions_table
from edgetransfer.rundir import RunDir
from edgetransfer.runtime import Predictor
from edgetransfer.runtime.files import sha256_file, write_bytes

from conftest import copy_run


@pytest.fixture(scope="module")
def run(trained_run, tmp_path_factory) -> Path:
    """A finished run with its ONNX model exported."""
    run = copy_run(trained_run, tmp_path_factory, "trust-files")
    export_onnx(run)
    return run


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


class _Planted:
    """Unpickled, it opens (creates) the marker file: what any code in a pickle could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (io.open, (str(self.marker), "w"))


def test_a_pickle_planted_in_the_torch_hub_cache_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    marker = tmp_path / "marker"
    name = tvm.ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[-1]  # where docs/finetune.md tells offline users to put it
    (cache / name).write_bytes(pickle.dumps(_Planted(marker), protocol=2))
    with pytest.raises(WeightsError, match=r"^the cached DEFAULT weights for resnet18 hold more than tensors .* delete the file"):
        build("resnet18", 3, weights="DEFAULT")
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # set only while the builder ran

    torch.save(tvm.resnet18().state_dict(), cache / name)  # real weights in the same place still load
    assert build("resnet18", 3, weights="DEFAULT").num_classes == 3


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(run, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    lock = run.parent / f".{run.name}.lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to(victim)
    before = checksums(run)
    try:
        with pytest.raises(RunError, match=r"\.lock is a symbolic link: it is not edgetransfer's lock file; remove it"):
            export_onnx(run, ExportOptions(output=tmp_path / "out.onnx"))
        result = CliRunner().invoke(main, ["bench", str(run), "--iterations", "1"])
        assert result.exit_code == 1 and "is a symbolic link" in result.output.splitlines()[-1]
    finally:
        lock.unlink()
    assert victim.read_text() == "keep" and checksums(run) == before


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, a folder that takes no new files")
def test_a_run_folder_where_no_file_can_be_made_is_one_line_naming_it():
    result = CliRunner().invoke(main, ["finetune", "--out", "/proc/edgetransfer-run", "--epochs", "1"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert re.match(
        r"Error: cannot create the lock file /proc/\.edgetransfer-run\.lock \(.+\): /proc takes no new files; use a folder you can write to$",
        result.output.strip(),
    )


def test_an_output_that_is_a_pipe_or_a_folder_is_refused_not_replaced(run, tmp_path):
    pipe = tmp_path / "pipe.onnx"
    os.mkfifo(pipe)
    with pytest.raises(ExportError, match=r"pipe\.onnx exists and is not a regular file .* choose another --output"):
        export_onnx(run, ExportOptions(output=pipe))
    with pytest.raises(OptionError, match=r"not a regular file"):
        write_bytes(pipe, lambda f: f.write(b"x"))  # every atomic write refuses, not only export's
    folder = tmp_path / "folder.onnx"
    folder.mkdir()
    with pytest.raises(OptionError, match=r"not a regular file"):
        write_bytes(folder, lambda f: f.write(b"x"))
    assert pipe.is_fifo() and folder.is_dir() and not list(tmp_path.glob(".*.tmp"))
    result = CliRunner().invoke(main, ["bench", str(run), "--out", str(run / "model.onnx")])
    assert result.exit_code == 1 and "--out" in result.output and "is a file" in result.output


@pytest.mark.parametrize(
    "make",
    [
        lambda v: QuantOptions(max_accuracy_drop=v),
        lambda v: ExportOptions(atol=v),
        lambda v: ExportOptions(rtol=v),
        lambda v: BenchOptions(max_accuracy_drop=v),
        lambda v: BenchOptions(min_seconds=v),
        lambda v: FinetuneConfig(lr=v),
        lambda v: FinetuneConfig(weight_decay=v),
        lambda v: QatOptions(lr=v),
    ],
)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_no_budget_or_tolerance_may_be_nan_or_infinite(make, value):
    with pytest.raises(OptionError, match=r"^--[a-z-]+ must be a finite number, got (nan|inf|-inf)$"):
        make(value)


def test_a_nan_budget_from_the_command_line_is_one_line_and_writes_nothing(run):
    before = checksums(run)
    result = CliRunner().invoke(main, ["export", str(run), "--target", "ort-cpu", "--precision", "int8", "--max-accuracy-drop", "nan"])
    assert result.exit_code == 1 and result.output.strip() == "Error: --max-accuracy-drop must be a finite number, got nan"
    assert checksums(run) == before


def test_terminal_escapes_in_paths_and_labels_are_shown_escaped(run, tmp_path):
    hostile = tmp_path / "\x1b]0;owned\x07.png"
    result = CliRunner().invoke(main, ["predict", str(run / "model.onnx"), str(hostile)])
    assert result.exit_code == 1 and "\x1b" not in result.output and "\x07" not in result.output
    assert "\\x1b]0;owned\\x07.png" in result.output

    model = onnx.load(str(run / "model.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    labels = json.loads(props["labels"])
    props["labels"] = json.dumps(["\x1b[2J\x1b[31mzero", *labels[1:]])
    onnx.helper.set_model_props(model, props)
    path = tmp_path / "hostile.onnx"
    onnx.save(model, str(path))
    from edgetransfer.progress import console

    predictor = Predictor(path)
    grey = np.full((64, 64, 3), 128, np.uint8)
    table = predictions_table([hostile], [predictor.predict(grey, top_k=len(labels))], "CPUExecutionProvider")
    with console.capture() as captured:
        console.print(table)
    text = captured.get()
    assert "\x1b]0" not in text and "\x1b[2J" not in text and "\\x1b[2J\\x1b[31mzero" in text


def test_a_lock_sweeps_only_its_own_runs_temporaries(run):
    child = run / "qat-ort-cpu"
    child.mkdir()
    (child / "manifest.json").write_text("{}")
    busy = child / ".last.pt.k2j4h1.tmp"  # a QAT child's save in progress: its own lock covers it
    busy.write_bytes(b"half")
    stale = run / ".model.onnx.a8c1.tmp"
    stale.write_bytes(b"half")
    try:
        with RunDir(run).lock():
            assert busy.exists() and not stale.exists()
    finally:
        busy.unlink()
        (child / "manifest.json").unlink()
        child.rmdir()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(schema=99), r"has schema 99, which this edgetransfer .* does not know: upgrade edgetransfer"),
        (lambda m: m.update(schema="2"), r"has schema 2, which"),
        (lambda m: m.update(status="paused-by-v9"), r"has status paused-by-v9, not one of training, complete"),
        (lambda m: m["artifacts"].update(onnx="model.onnx"), r"the entry onnx is not an artifact record"),
        (lambda m: m["artifacts"]["onnx"].pop("sha256"), r"the entry onnx is not an artifact record"),
        (lambda m: m["artifacts"]["onnx"].pop("path"), r"the entry onnx is not an artifact record"),
    ],
)
def test_a_manifest_this_version_did_not_write_is_refused_before_anything_is_written(run, tmp_path, change, message):
    path = run / "manifest.json"
    saved = path.read_bytes()
    manifest = json.loads(saved)
    change(manifest)
    path.write_text(json.dumps(manifest))
    try:
        before = checksums(run)
        with pytest.raises(RunError, match=message):
            export_onnx(run, ExportOptions(output=tmp_path / "other.onnx"))
        with pytest.raises(RunError, match=message):
            finetune(FinetuneConfig(), run, resume=True)
        assert checksums(run) == before and not (tmp_path / "other.onnx").exists()
    finally:
        path.write_bytes(saved)


def test_refused_commands_write_nothing(tmp_path):
    missing = tmp_path / "nowhere" / "run"
    with pytest.raises(RunError, match=r"no run directory at .*nowhere/run"):
        finetune(FinetuneConfig(), missing, resume=True)
    with pytest.raises(EdgeTransferError):
        export_onnx(tmp_path / "nothing")
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "nothing")])
    assert result.exit_code == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == []


@pytest.mark.parametrize(
    "option, value",
    [
        ("--epochs", "99999999999999999999"),
        ("--probe-epochs", "99999999999999999999"),
        ("--batch-size", "99999999999999999999"),
        ("--seed", "-1"),
        ("--seed", "99999999999999999999"),
        ("--workers", "-1"),
        ("--weight-decay", "-1"),
        ("--weight-decay", "1e30"),
        ("--lr", "1e30"),
        ("--lr", "inf"),
        ("--warmup-epochs", "nan"),
    ],
)
def test_finetune_options_out_of_range_are_refused_before_a_run_is_made(option, value, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["finetune", "--out", str(out), option, value])
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code in (1, 2) and last.startswith("Error") and "internal error" not in last, result.output
    assert not out.exists()


def test_a_full_disk_is_one_line_leaves_the_run_intact_and_the_retry_works(run, tmp_path, monkeypatch):
    import errno

    import edgetransfer.runtime.files as files

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    output = tmp_path / "copy.onnx"
    before = checksums(run)
    monkeypatch.setattr(files, "_fsync", full)
    result = CliRunner().invoke(main, ["export", str(run), "--output", str(output)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and lines[-1].startswith("Error: No space left on device at ") and "bug" not in lines[-1]
    assert "free some space" in lines[-1] and checksums(run) == before and not list(tmp_path.iterdir())
    monkeypatch.undo()
    result = CliRunner().invoke(main, ["export", str(run), "--output", str(output)])
    assert result.exit_code == 0 and output.is_file()


EDGES = {"INTEGER": ["-1", "0", "99999999999999999999"], "FLOAT": ["-1", "0", "nan", "inf", "-inf", "1e30"]}


def _numeric_options(command: str) -> list[tuple[str, str]]:
    """Every numeric option of ``command`` with the edge values of its type, read from its click
    parameters (an option added later is covered without a change here)."""
    import click

    from edgetransfer.cli import COMMANDS

    module = __import__(COMMANDS[command][0], fromlist=[command])
    found = []
    for param in getattr(module, command).params:
        kind = "FLOAT" if isinstance(param.type, (click.types.FloatParamType, click.FloatRange)) else None
        kind = kind or ("INTEGER" if isinstance(param.type, (click.types.IntParamType, click.IntRange)) else None)
        if kind and isinstance(param, click.Option) and param.nargs == 1:
            found += [(param.opts[0], value) for value in EDGES[kind]]
    return found


@pytest.mark.parametrize("command", ["finetune", "export", "bench"])
def test_every_numeric_option_at_the_edges_is_accepted_or_refused_in_one_line_never_a_bug(command, tmp_path):
    """Each value either passes the option checks (the command then stops at the missing run or
    data, writing nothing) or is refused naming the option; never 'internal error'."""
    cases = _numeric_options(command)
    assert len(cases) >= {"finetune": 40, "export": 30, "bench": 15}[command]  # the options are really found
    for option, value in cases:
        if command == "finetune":
            args = ["finetune", "--data", str(tmp_path / "no-images"), "--out", str(tmp_path / "run"), option, value]
        else:
            args = [command, str(tmp_path / "no-run"), option, value]
        result = CliRunner().invoke(main, args)
        last = result.output.strip().splitlines()[-1] if result.output.strip() else ""
        assert result.exit_code in (1, 2) and last.startswith("Error") and "internal error" not in last, (option, value, result.output)
        assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written: no run, no lock file


def test_an_out_path_through_a_file_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(main, ["finetune", "--out", str(blocker / "sub"), "--epochs", "1"])
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 1 and last == f"Error: {blocker} is a file, not a folder; pick another --out"
    assert blocker.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def _disk_full_after(monkeypatch, writes: int) -> list[str]:
    """Every atomic write after the first ``writes`` fails as a full disk does (ENOSPC at fsync)."""
    import errno

    import edgetransfer.runtime.files as files

    real, done = files._fsync, []

    def fsync(path):
        if len(done) >= writes:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        done.append(str(path))
        real(path)

    monkeypatch.setattr(files, "_fsync", fsync)
    return done


def test_a_full_disk_during_bench_is_one_line_and_the_manifest_is_intact(run, tmp_path, monkeypatch):
    manifest = (run / "manifest.json").read_bytes()
    _disk_full_after(monkeypatch, 0)
    result = CliRunner().invoke(main, ["bench", str(run), "--iterations", "1", "--warmup", "0", "--batch-sizes", "1", "--eval-images", "4"])
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 1 and last.startswith("Error: No space left on device at ") and "bug" not in last
    assert (run / "manifest.json").read_bytes() == manifest and not list(run.glob(".*.tmp"))


def test_a_full_disk_while_training_stops_in_one_line_and_resume_finishes_the_run(digit_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["finetune", "--data", str(digit_folder), "--out", str(out), "--epochs", "3", "--image-size", "32"]
    written = _disk_full_after(monkeypatch, 3)  # config, manifest and the feature cache; the first checkpoint fails
    result = CliRunner().invoke(main, args)
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 1 and last.startswith("Error: No space left on device at ") and "bug" not in last, result.output
    assert len(written) == 3 and json.loads((out / "manifest.json").read_text())["status"] == "training"
    assert not list(out.rglob(".*.tmp"))
    monkeypatch.undo()  # space freed
    result = CliRunner().invoke(main, ["finetune", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete" and (out / "model.pt").is_file()
