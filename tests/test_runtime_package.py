"""The runtime as its own distribution: what it imports, its CLI, and its wheel installed alone
into a fresh virtual environment without torch."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from edgetransfer.export import ExportOptions, export_onnx
from edgetransfer.runtime import Predictor
from edgetransfer.runtime.cli import main as runtime_main

from conftest import copy_run, digits_pixels

REPO = Path(__file__).resolve().parent.parent
RUNTIME_SOURCES = REPO / "runtime" / "src" / "edgetransfer" / "runtime"
ALLOWED = {"numpy", "PIL", "onnxruntime", "openvino"} | set(sys.stdlib_module_names)
# the server (the serve extra) and only it: the launcher (serve.py) and everything else never load them
SERVER = {"serve_http.py": {"starlette", "anyio"}, "server.py": {"bentoml", "uvicorn", "starlette", "anyio", "prometheus_client"}}
FORBIDDEN_IN_VENV = ("torch", "onnx", "click", "rich", "matplotlib", "timm", "sklearn")


@pytest.fixture(scope="module")
def model(trained_run, tmp_path_factory) -> Path:
    run = copy_run(trained_run, tmp_path_factory, "package")
    return export_onnx(run, ExportOptions(verify=False)).path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for index, (label, pixels) in enumerate(digits_pixels(per_class=2, classes=3, size=40)):
        paths.append(folder / f"{index}-{label}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def run_cli(*args: str, capsys) -> tuple[int, str, str]:
    code = runtime_main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_runtime_imports_only_numpy_pillow_onnxruntime_and_the_standard_library():
    found: dict[str, set[str]] = {}
    for path in RUNTIME_SOURCES.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                if name.split(".")[0] not in SERVER.get(path.name, ()):
                    found.setdefault(name.split(".")[0], set()).add(path.name)
    assert {"numpy", "PIL", "onnxruntime"} <= set(found)
    assert set(found) <= ALLOWED, {k: v for k, v in found.items() if k not in ALLOWED}
    assert "edgetransfer" not in found  # relative imports only: the runtime stands alone


def test_the_provider_probe_model_is_the_identity_model_onnx_would_make():
    from onnx import TensorProto, helper

    from edgetransfer.runtime.providers import PROBE_MODEL

    tensor = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "probe", [tensor], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]
    )
    expected = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="")
    expected.ir_version = 8
    probe = onnx.load_from_string(PROBE_MODEL)
    onnx.checker.check_model(probe)
    assert probe.graph == expected.graph and probe.ir_version == 8 and probe.opset_import == expected.opset_import


def test_predict_prints_what_the_predictor_predicts(model, images, capsys):
    code, out, err = run_cli("predict", str(model), *map(str, images), "--json", "-k", "2", capsys=capsys)
    assert code == 0, err
    payload = json.loads(out)
    expected = Predictor(model).predict([str(p) for p in images], top_k=2)
    assert payload["provider"] == "CPUExecutionProvider"
    assert [[(p["label"], p["probability"]) for p in row["predictions"]] for row in payload["results"]] == [
        [(p.label, p.probability) for p in preds] for preds in expected
    ]
    code, out, _ = run_cli("predict", str(model), str(images[0]), capsys=capsys)
    best = expected[0][0]
    assert code == 0 and out.startswith(f"{images[0]}: {best.label} {100 * best.probability:.2f}%, ")


def test_info_shows_labels_preprocessing_provenance_and_signature(model, capsys):
    code, out, err = run_cli("info", str(model), "--json", capsys=capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["labels"] == [str(d) for d in range(10)]
    assert info["preprocessing"]["input_size"] == 64 and info["preprocessing"]["input_format"] == "float32-nchw-normalized"
    assert info["provenance"]["arch"] == "timm:efficientnet_lite0" and len(info["provenance"]["checkpoint_sha256"]) == 64
    assert info["inputs"][0]["shape"][1:] == [3, 64, 64] and info["outputs"][0]["shape"][1:] == [10]
    assert info["recorded"] == f"matches the sha256 recorded in {model.parent / 'manifest.json'}"
    code, text, _ = run_cli("info", str(model), capsys=capsys)
    assert code == 0 and "labels                10: 0, 1, 2" in text and "input                 input: tensor(float)" in text


def _memory_mb(field: str) -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def test_check_reports_the_provider_it_got_the_hash_latency_and_memory(model, images, capsys):
    resident = _memory_mb("VmRSS")
    code, out, err = run_cli("check", str(model), str(images[0]), "--runs", "5", "--warmup", "1", "--json", capsys=capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["provider"] == "CPUExecutionProvider" and result["fallback"] is None
    assert set(result["runtime"]) == {"onnxruntime"} and result["mixed_builds"] is None
    assert result["sha256"].startswith("matches the sha256 recorded in")
    assert 0 < result["p50_ms"] <= result["p99_ms"] and result["runs"] == 5 and result["images"] == 1
    # This process's own high-water mark: at least what it held before the check, at most its peak
    # after (tests run earlier in the same process count, so no fixed ceiling).
    assert max(20.0, 0.9 * resident) < result["peak_rss_mb"] <= _memory_mb("VmHWM") + 1


def test_check_refuses_a_changed_model_and_a_missing_one_in_one_line(model, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(model.parent, copy, ignore=shutil.ignore_patterns("cache", "*.pt"))
    data = bytearray((copy / model.name).read_bytes())
    data[-100] ^= 0xFF
    (copy / model.name).write_bytes(bytes(data))
    code, out, err = run_cli("check", str(copy / model.name), capsys=capsys)
    assert code == 1 and out == ""
    assert err.strip() == (
        f"Error: {copy / model.name} has changed since it was recorded in manifest.json (its sha256"
        " differs); export it again, or copy the model and its manifest again"
    )
    code, _, err = run_cli("info", str(tmp_path / "gone.onnx"), capsys=capsys)
    assert code == 1 and err.startswith("Error: model not found") and len(err.strip().splitlines()) == 1


def test_labels_from_a_model_cannot_drive_the_terminal(model, tmp_path, capsys):
    hostile = onnx.load(str(model))
    props = {p.key: p.value for p in hostile.metadata_props}
    props["labels"] = json.dumps(["\x1b[2J\x1b[31mzero"] + [str(d) for d in range(1, 10)])
    onnx.helper.set_model_props(hostile, props)
    path = tmp_path / "hostile.onnx"
    onnx.save(hostile, str(path))
    code, out, _ = run_cli("info", str(path), capsys=capsys)
    assert code == 0 and "\x1b" not in out and "\\x1b[2J\\x1b[31mzero" in out
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(grey)
    code, out, _ = run_cli("predict", str(path), str(grey), "-k", "10", capsys=capsys)
    assert code == 0 and "\x1b" not in out and "\\x1b[31mzero" in out


# --- the wheel, installed alone ------------------------------------------------------------


def _build(project: Path, out: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out), str(project)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def _metadata(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return archive.read(name).decode().splitlines()


def _dependency_closure(requirements: list[str]) -> dict:
    """The installed distributions ``requirements`` name, and the ones those require, by name."""
    import re
    from importlib.metadata import PackageNotFoundError, distribution

    found, todo = {}, [re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0] for r in requirements]
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in found:
            continue
        try:
            found[name] = distribution(name)
        except PackageNotFoundError:  # required only under a marker this Python does not meet
            continue
        todo += [re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0] for r in found[name].requires or [] if "extra ==" not in r]
    return found


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


@pytest.mark.slow
def test_the_runtime_wheel_installs_alone_without_torch_and_predicts_like_the_toolkit(model, images, tmp_path):
    dist = tmp_path / "dist"
    _build(REPO / "runtime", dist)
    _build(REPO, dist)
    runtime_wheel = next(dist.glob("edgetransfer_runtime-*.whl"))
    toolkit_wheel = next(dist.glob("edgetransfer-*.whl"))
    assert {p.name.split("-")[0] for p in dist.glob("*.tar.gz")} == {"edgetransfer", "edgetransfer_runtime"}

    with zipfile.ZipFile(runtime_wheel) as archive:
        files = [n for n in archive.namelist() if not n.startswith("edgetransfer_runtime-")]
    assert "edgetransfer/runtime/predictor.py" in files and "edgetransfer/runtime/cli.py" in files
    assert all(n.startswith("edgetransfer/runtime/") for n in files), files  # no edgetransfer/__init__.py: a namespace
    with zipfile.ZipFile(toolkit_wheel) as archive:
        assert not [n for n in archive.namelist() if n.startswith("edgetransfer/runtime/")]
    requires = [line.split(": ", 1)[1] for line in _metadata(runtime_wheel) if line.startswith("Requires-Dist: ")]
    names = sorted(re.match(r"[\w.-]+", r).group().lower() for r in requires)
    assert names == ["bentoml", "numpy", "onnxruntime", "openvino", "pillow", "prometheus-client", "python-multipart", "starlette", "uvicorn"]
    assert any(
        r.startswith("edgetransfer-runtime")
        for r in (line.split(": ", 1)[1] for line in _metadata(toolkit_wheel) if line.startswith("Requires-Dist: "))
    )

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, pip = venv / "bin" / "python", venv / "bin" / "pip"
    done = subprocess.run([str(pip), "install", "-q", "--no-index", "--no-deps", str(runtime_wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # Offline, and with the very numpy, Pillow and ONNX Runtime that run here (so that the answers
    # can be compared bit for bit): the distributions the wheel requires, and theirs in turn, read
    # from its metadata, are made visible to the venv through a .pth; nothing else of this environment is.
    deps = _dependency_closure([r for r in requires if "extra ==" not in r])
    assert {"numpy", "pillow", "onnxruntime"} <= set(deps) and not set(deps) & {"torch", "onnx", "click", "rich"}, sorted(deps)
    linked = tmp_path / "dependencies"
    linked.mkdir()
    for dist in deps.values():
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if not (linked / top).exists():
                (linked / top).symlink_to(Path(dist.locate_file(top)))
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "dependencies.pth").write_text(str(linked) + "\n")
    check = subprocess.run([str(pip), "check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr  # every declared requirement is there, with nothing more

    for name in FORBIDDEN_IN_VENV:
        assert subprocess.run([str(python), "-c", f"import {name}"], capture_output=True).returncode != 0, name
    dependencies_mb = sum(_size_mb(path.resolve()) if path.resolve().is_dir() else path.resolve().stat().st_size / 1e6 for path in linked.iterdir())
    print(
        f"\nruntime-only venv: {_size_mb(venv) + dependencies_mb:.0f} MB ({dependencies_mb:.0f} MB of it the dependencies: {', '.join(sorted(deps))})"
    )

    command = venv / "bin" / "edgetransfer-runtime"
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run(
        [str(command), "predict", str(model), *map(str, images), "--json", "-k", "10"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    there = [[(p["label"], p["probability"]) for p in row["predictions"]] for row in json.loads(done.stdout)["results"]]
    here = [[(p.label, p.probability) for p in preds] for preds in Predictor(model).predict([str(p) for p in images], top_k=10)]
    assert there == here  # to the last bit
    results = []
    for args in (["info", str(model), "--json"], ["check", str(model), "--runs", "3", "--json"]):
        done = subprocess.run([str(command), *args], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        results.append(json.loads(done.stdout))
    info, check = results
    assert info["labels"] == list(Predictor(model).labels) and "matches the sha256 recorded" in info["recorded"]
    assert check["provider"] == "CPUExecutionProvider" and check["runs"] == 3 and check["mixed_builds"] is None
    assert "matches the sha256 recorded" in check["sha256"]


def test_two_onnxruntime_builds_in_one_environment_are_named_with_the_fix(monkeypatch, tmp_path):
    from edgetransfer.runtime import sessions

    installed = {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"}
    for info in ("onnxruntime-1.32.0.dist-info", "onnxruntime_gpu-1.31.1.dist-info", "numpy-2.4.6.dist-info"):
        (tmp_path / info).mkdir()
    monkeypatch.setattr(sessions, "_onnxruntime_folder", lambda: tmp_path)
    assert sessions.onnxruntime_builds() == installed
    assert sessions.mixed_builds() == (
        "onnxruntime 1.32.0, onnxruntime-gpu 1.31.1 are installed together and overwrite each"
        " other's files; keep one: pip uninstall -y onnxruntime onnxruntime-gpu &&"
        " pip install onnxruntime-gpu"
    )
    (tmp_path / "onnxruntime_gpu-1.31.1.dist-info").rmdir()
    assert sessions.mixed_builds() is None


def test_fast_jpeg_decodes_large_photos_at_a_reduced_scale_and_changes_pixels_by_at_most_two_levels(model, tmp_path):
    from skimage import data

    from edgetransfer.runtime.preprocessing import load_rgb

    path = tmp_path / "photo.jpg"
    Image.fromarray(data.chelsea()).resize((1920, 1080), Image.Resampling.BICUBIC).save(path, quality=90)
    exact, fast = Predictor(model), Predictor(model, fast_jpeg=True)
    pre = exact.info.preprocessing
    assert load_rgb(path).size == (1920, 1080)
    assert load_rgb(path, 2 * pre.resize_size).size == (480, 270)  # 1/4 scale: 270 >= 2 x 73 px; 1/8 would not be
    small = tmp_path / "small.jpg"
    Image.fromarray(data.chelsea()).resize((400, 280)).save(small)
    assert load_rgb(small, 2 * pre.resize_size).size == (400, 280)  # 1/2 would be 140 < 146: left alone
    changed = np.abs(
        np.asarray(pre.resize_crop(load_rgb(path)), np.int16) - np.asarray(pre.resize_crop(load_rgb(path, 2 * pre.resize_size)), np.int16)
    )
    assert 0 < changed.max() <= 2
    a, b = exact.predict(str(path), top_k=10), fast.predict(str(path), top_k=10)
    assert a[0].label == b[0].label
    assert max(abs(x.probability - dict((y.label, y.probability) for y in b)[x.label]) for x in a) < 0.02
    assert fast.predict(str(small), top_k=10) == exact.predict(str(small), top_k=10)


def test_a_batch_decoded_in_parallel_predicts_what_each_image_does_alone(model, images):
    predictor = Predictor(model, threads=2)
    assert predictor._decoders == 2
    together = predictor.predict([str(p) for p in images], top_k=3)
    assert together == [predictor.predict(str(p), top_k=3) for p in images]
