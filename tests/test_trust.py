"""What a hostile or careless user, or a model file from anywhere, can hand edgetransfer: planted
pickles, changed artifacts, broken metadata, markup in names, extreme images, half-made runs.
Each gets a one-line error (or the documented behaviour), and nothing that should not change does."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edgetransfer.bench import BenchOptions, bench_run
from edgetransfer.checkpoint import load_checkpoint, save_checkpoint
from edgetransfer.cli import main
from edgetransfer.config import ExportOptions, FinetuneConfig
from edgetransfer.data import DataSpec
from edgetransfer.errors import DataError, ImageError, ParityError, PredictorError, RunError, UnknownNameError
from edgetransfer.export import export_onnx
from edgetransfer.finetune import finetune
from edgetransfer.optimize import Precision, Target, build_variants
from edgetransfer.rundir import RunDir
from edgetransfer.runtime import Predictor
from edgetransfer.runtime.files import sha256_file
from edgetransfer.runtime.preprocessing import Preprocessing

from conftest import copy_run


class Planted:
    """A pickle that runs code when loaded: it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(trained_run, tmp_path_factory) -> Path:
    """A finished run with its ONNX model exported."""
    run = copy_run(trained_run, tmp_path_factory, "trust")
    export_onnx(run)
    return run


def changed(run: Path, tmp_path: Path, name: str) -> Path:
    """A copy of ``run`` with 4 bytes of ``name`` changed (same size)."""
    import shutil

    copy = tmp_path / "changed"
    shutil.copytree(run, copy)
    data = bytearray((copy / name).read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
    (copy / name).write_bytes(bytes(data))
    return copy


# --- planted pickles --------------------------------------------------------------------------


def test_a_planted_pickle_in_the_resume_state_never_runs(trained_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_bytes((trained_run / "config.json").read_bytes())
    RunDir(run).new_manifest(status="training").save()
    marker = tmp_path / "ran"
    torch.save({"numpy_rng": Planted(marker)}, run / "last.pt")
    with pytest.raises(RunError) as caught:
        finetune(FinetuneConfig(), run, resume=True)
    message = str(caught.value)
    assert not marker.exists()
    assert message.startswith("cannot resume from last.pt: ") and "holds Python objects besides tensors" in message
    assert "weights_only" not in message and "\n" not in message


def test_a_planted_pickle_as_checkpoint_or_weights_never_runs(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"format": Planted(marker)}, tmp_path / "model.pt")
    with pytest.raises(RunError, match=r"holds Python objects besides tensors and plain values"):
        load_checkpoint(tmp_path / "model.pt")
    from edgetransfer.errors import WeightsError
    from edgetransfer.models import build

    with pytest.raises(WeightsError, match=r"holds Python objects besides tensors") as caught:
        build("resnet18", 3, weights=str(tmp_path / "model.pt"))
    assert not marker.exists() and "weights_only=False" not in str(caught.value)


def test_a_file_that_is_not_torchs_is_one_error_and_no_warning(tmp_path):
    from edgetransfer.safeload import safe_load

    garbage = tmp_path / "features.pt"
    garbage.write_bytes(b"\x80garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "Detected pickle protocol" warning would fail here
        with pytest.raises(RunError, match=r"^cannot read .*features.pt: "):
            safe_load(garbage)


def test_the_resume_state_holds_only_tensors_and_plain_values(trained_run, tmp_path):
    run = tmp_path / "cut"

    def stop(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(FinetuneConfig(data=DataSpec(limit_per_class=10), epochs=4), run, on_epoch=stop)
    state = torch.load(run / "last.pt", weights_only=True)  # no allow-listed globals needed
    assert len(state["history"]) == 2 and all(isinstance(v, torch.Tensor) for v in state["model"].values())
    # every stage reseeds its generators from the run's seed, so no generator state is kept
    assert not {key for key in state if "rng" in key}


# --- recorded hashes --------------------------------------------------------------------------


def test_a_changed_checkpoint_is_refused_by_export_and_bench(run, tmp_path):
    copy = changed(run, tmp_path, "model.pt")
    before = checksums(copy)
    with pytest.raises(RunError, match=r"model.pt has changed since it was recorded in manifest.json .*; restore it, or fine-tune again"):
        export_onnx(copy)
    with pytest.raises(RunError, match=r"model.pt has changed since it was recorded"):
        bench_run(copy, BenchOptions(batch_sizes=(1,), iterations=1, warmup=0, eval_images=4))
    assert checksums(copy) == before


def test_a_changed_onnx_model_is_refused_by_optimise_bench_and_predict(run, tmp_path):
    copy = changed(run, tmp_path, "model.onnx")
    before = checksums(copy)
    with pytest.raises(RunError, match=r"model.onnx has changed since it was recorded .*; export it again with: edgetransfer export"):
        build_variants(copy, [Target.ORT_CPU], [Precision.FP32])
    report = bench_run(copy, BenchOptions(batch_sizes=(1,), iterations=1, warmup=0, eval_images=4), out_dir=tmp_path)
    row = report.row("onnx")
    assert row.status == "failed" and "model.onnx has changed since it was recorded" in row.reason
    assert report.row("eager").status == "measured"
    with pytest.raises(PredictorError, match=r"model.onnx has changed since it was recorded in manifest.json"):
        Predictor(copy / "model.onnx")
    Predictor(run / "model.onnx")  # the unchanged one loads
    assert checksums(copy) == before


def test_export_refuses_a_run_that_is_still_training_or_has_a_broken_manifest(run, tmp_path):
    import shutil

    copy = tmp_path / "partial"
    shutil.copytree(run, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "status": "training"}))
    before = checksums(copy)
    with pytest.raises(RunError, match=r"is still training or was interrupted .*finish it with: edgetransfer finetune --resume"):
        export_onnx(copy)
    (copy / "manifest.json").write_text(json.dumps(manifest)[:200])  # truncated
    for args in (["info", str(copy)], ["export", str(copy)], ["bench", str(copy)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert "manifest.json is not valid JSON (truncated or edited?)" in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert {k: v for k, v in checksums(copy).items() if k != "manifest.json"} == {k: v for k, v in before.items() if k != "manifest.json"}


# --- metadata is input ------------------------------------------------------------------------


def with_props(run: Path, tmp_path: Path, **props: str) -> Path:
    model = onnx.load(run / "model.onnx")
    current = {p.key: p.value for p in model.metadata_props}
    onnx.helper.set_model_props(model, {**current, **props})
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(
    "props, message",
    [
        ({"mean": "[0.5, 0.5]"}, r"mean needs 3 finite numbers"),
        ({"std": "[0, 1, 1]"}, r"std must be positive"),
        ({"std": "[1, 1e-40, 1]"}, r"map pixels in \[0, 1\] to values up to 5.02e\+39; a model's inputs must stay within ±10000"),
        ({"mean": "[1e38, 0, 0]"}, r"map pixels in \[0, 1\] to values up to 1.99e\+38"),
        ({"std": '["a", 1, 1]'}, r"std must be a list of numbers"),
        ({"input_size": "60000", "resize_size": "60000"}, r"input_size <= 4096"),
        ({"input_size": '"64"'}, r"input_size must be a whole number"),
        ({"labels": '"0123456789"'}, r"labels must be a non-empty list of strings"),
        ({"labels": "[1, 2]"}, r"labels must be a non-empty list of strings"),
        ({"labels": "not json"}, r"labels is not JSON"),
        ({"interpolation": "sinc"}, r"unknown interpolation 'sinc'"),
        ({"input_format": "uint8-nhwc"}, r"metadata says input_format 'uint8-nhwc' but its graph takes float input"),
        ({"input_format": "rgb565"}, r"input_format 'rgb565' is not"),
        ({"input_size": "32", "resize_size": "36"}, r"metadata says input_size 32 \(NCHW\), but its graph takes \[None, 3, 64, 64\]"),
    ],
)
def test_broken_metadata_is_refused_naming_the_field(run, tmp_path, props, message):
    path = with_props(run, tmp_path, **props)
    with pytest.raises(PredictorError, match=message) as caught:
        Predictor(path)
    assert "\n" not in str(caught.value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.sampled_from(["labels", "mean", "std", "input_size", "resize_size", "interpolation", "input_format"]),
    value=st.one_of(
        st.text(max_size=40),
        st.integers().map(str),
        st.lists(st.floats(allow_nan=True), max_size=5).map(json.dumps),
        st.lists(st.text(max_size=5), max_size=4).map(json.dumps),
    ),
)
def test_fuzzed_metadata_loads_or_is_refused_with_a_predictor_error(run, tmp_path_factory, key, value):
    path = with_props(run, tmp_path_factory.mktemp("fuzz"), **{key: value})
    try:
        predictor = Predictor(path)
    except PredictorError as exc:
        assert "\n" not in str(exc)
        return
    (best,) = predictor.predict(np.zeros((20, 20, 3), np.uint8), top_k=1)
    assert best.label == predictor.labels[best.index] and 0.0 <= best.probability <= 1.0  # a class of the model, a probability


# --- images -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, message",
    [
        ((1, 100_000), r"more than 64 times longer than it is wide"),
        ((1_000_000, 1), r"more than 64 times longer than it is wide"),
        ((9000, 9000), r"more than the 64 million edgetransfer decodes"),
    ],
)
def test_extreme_images_get_one_line_before_any_large_allocation(run, tmp_path, size, message):
    path = tmp_path / "extreme.png"
    Image.new("L", size).save(path, optimize=True)
    assert path.stat().st_size < 1_000_000
    predictor = Predictor(run / "model.onnx")
    with pytest.raises(ImageError, match=message):
        predictor.predict(path)
    with pytest.raises(ImageError, match=r"has none to classify"):
        Preprocessing(32, 36).resize_crop(Image.new("RGB", (0, 0)))


def test_an_icon_wrapping_a_huge_png_is_refused_before_it_is_decoded(run, tmp_path):
    """An ICO's directory says 256x256 whatever it wraps; Pillow would decode the embedded PNG whole."""
    png = io.BytesIO()
    Image.new("L", (9000, 8000)).save(png, format="PNG", optimize=True)
    body = png.getvalue()
    header = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(body), 22)
    path = tmp_path / "huge.ico"
    path.write_bytes(header + body)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow warning reaches the user either
        with pytest.raises(ImageError, match=r"is 9000x8000 pixels, more than the 64 million edgetransfer decodes"):
            Predictor(run / "model.onnx").predict(path)


def test_image_size_has_an_upper_bound():
    from edgetransfer.errors import OptionError

    with pytest.raises(OptionError, match=r"image size must be between 16 and 4096, got 100000"):
        FinetuneConfig(image_size=100_000)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=2000),
        st.binary(max_size=300).map(lambda body: b"\x89PNG\r\n\x1a\n" + body),
        st.binary(max_size=300).map(lambda body: b"\xff\xd8\xff\xe0" + body),
        st.tuples(st.integers(0, 3), st.integers(0, 3000), st.integers(0, 5)).map(
            lambda s: np.zeros((s[1] % 97, s[1], s[2]) if s[0] else (s[1] % 5, s[2]), dtype=np.uint8)
        ),
        st.sampled_from([None, 3, 1.5, "", object(), np.zeros((4, 4, 3), np.float32), np.zeros((2, 2, 2, 3), np.uint8)]),
    )
)
def test_fuzzed_images_give_predictions_or_a_predictor_error(run, image):
    predictor = _shared_predictor(run)
    try:
        result = predictor.predict(image, top_k=2)
    except PredictorError as exc:
        assert "\n" not in str(exc)
        return
    assert len(result) >= 1


_PREDICTORS: dict[Path, Predictor] = {}


def _shared_predictor(run: Path) -> Predictor:
    if run not in _PREDICTORS:
        _PREDICTORS[run] = Predictor(run / "model.onnx")
    return _PREDICTORS[run]


# --- what the terminal shows ------------------------------------------------------------------


def test_paths_and_labels_are_printed_as_they_are_never_as_markup(run, tmp_path):
    image = Image.new("RGB", (40, 40), (200, 30, 30))
    names = ["x[/bold]y.png", "[red]red.png"]  # the first is a file in a folder named "x["
    (tmp_path / "x[").mkdir()
    for name in names:
        image.save(tmp_path / name)
    model = with_props(run, tmp_path, labels=json.dumps([f"[bold]{d}[/bold]" for d in range(10)]))
    result = CliRunner().invoke(main, ["predict", str(model), *(str(tmp_path / n) for n in names), "-k", "1"])
    assert result.exit_code == 0, result.output
    for name in names:
        assert name in result.stdout
    assert "[bold]" in result.stdout and "[/bold]" in result.stdout


# --- nothing half-made ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, error",
    [
        (FinetuneConfig(data=DataSpec(source="/no/such/folder")), DataError),
        (FinetuneConfig(arch="resnet19", data=DataSpec(limit_per_class=4)), UnknownNameError),
    ],
)
def test_a_run_that_cannot_start_leaves_no_run_directory(tmp_path, config, error):
    out = tmp_path / "run"
    with pytest.raises(error):
        finetune(config, out)
    assert not out.exists()
    out.mkdir()  # an empty folder given as --out stays, empty
    with pytest.raises(error):
        finetune(config, out)
    assert out.is_dir() and not any(out.iterdir())


def test_out_naming_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(main, ["finetune", "--out", str(tmp_path / "file")])
    assert result.exit_code == 1 and result.output.strip() == f"Error: {tmp_path / 'file'} is a file, not a folder; pick another --out"


# --- parity with a relative tolerance ---------------------------------------------------------


def test_large_logits_pass_parity_with_a_relative_tolerance(trained_run, tmp_path):
    built, payload = load_checkpoint(trained_run / "model.pt")
    with torch.no_grad():
        built.module.get_classifier().bias.add_(1e6)  # every logit near 1e6, where float32's steps are 1/16
    run = tmp_path / "large"
    save_checkpoint(run / "model.pt", built, payload["classes"])
    (run / "config.json").write_bytes((trained_run / "config.json").read_bytes())
    result = export_onnx(run, ExportOptions(verify_images=8))
    assert result.parity.max_abs_diff > 1e-3 and result.parity.max_rel_diff < 1e-4 and result.parity.within_tolerance
    from edgetransfer.data import load_image
    from edgetransfer.export import verify_onnx

    images = [load_image(s) for s in RunDir(trained_run).validation(8)]
    with pytest.raises(ParityError, match=r"relative; atol 0.001, rtol 0,"):  # the same model, absolute tolerance only
        verify_onnx(built, result.path, ExportOptions(rtol=0.0), images)


def test_elongated_training_images_are_skipped_and_counted(tmp_path):
    from edgetransfer.data import load_dataset

    from conftest import write_folder

    root = write_folder(tmp_path / "images", per_class=6)
    Image.new("L", (1, 5000)).save(root / "digit_0" / "thin.png")
    dataset = load_dataset(DataSpec(str(root)))
    assert [(Path(name).name, "64 times longer" in reason) for name, reason in dataset.skipped] == [("thin.png", True)]
    assert len(dataset.train) + len(dataset.val) + len(dataset.test) == 18


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak from Linux's /proc")
@pytest.mark.parametrize("size", [(7900, 7900), (1, 100_000)])
def test_predict_on_an_image_file_under_1_mb_stays_under_1_gb(run, tmp_path, size):
    """In a fresh process: the largest image accepted (63 MP, a few hundred KB as PNG) and a thin one."""
    import subprocess
    import sys
    import textwrap

    path = tmp_path / "big.png"
    Image.new("L", size).save(path, optimize=True)
    assert path.stat().st_size < 1_000_000
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent (pytest, with torch) across exec
    script = textwrap.dedent(f"""
        import re
        from edgetransfer.errors import PredictorError
        from edgetransfer.runtime import Predictor
        predictor = Predictor({str(run / "model.onnx")!r})
        try:
            predictor.predict({str(path)!r})
        except PredictorError as exc:
            print("refused:", exc)
        status = open("/proc/self/status").read()
        print("peak_mb", int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) / 1024)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    peak = float(done.stdout.split("peak_mb")[-1])
    assert 50 < peak < 1024, done.stdout


def hungry_model(path: Path) -> Path:
    """A servable classifier (image in, 3 logits out) whose graph asks for 3 GB at once
    (ConstantOfShape of 750 million floats) before it answers."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["big"], value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("ReduceSum", ["big"], ["total"], keepdims=1),
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Add", ["flat", "total"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "hungry",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(np.array([750_000_000], dtype=np.int64), "shape")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak from Linux's /proc")
def test_a_memory_cap_refuses_a_model_asking_for_more_before_it_gets_it(run, tmp_path):
    """In a fresh process (the cap is the process's): a model asking ONNX Runtime for 3 GB under a
    256 MB cap is refused in one line with no more than that taken; a real model runs under it;
    a second, different cap is refused."""
    import subprocess
    import sys
    import textwrap

    hungry = hungry_model(tmp_path / "hungry.onnx")
    script = textwrap.dedent(f"""
        import re
        import numpy as np
        from edgetransfer.runtime import Predictor, PredictorError
        from edgetransfer.runtime.preprocessing import Preprocessing
        image = np.zeros((16, 16, 3), np.uint8)
        model = Predictor({str(hungry)!r}, preprocessing=Preprocessing(16, 16), labels=["a", "b", "c"], max_memory_mb=256)
        try:
            model.predict(image)
        except PredictorError as exc:
            print("refused:", exc)
        print("real:", Predictor({str(run / "model.onnx")!r}, max_memory_mb=256).predict(image, top_k=1)[0].label)
        try:
            Predictor({str(run / "model.onnx")!r}, max_memory_mb=512)
        except PredictorError as exc:
            print("second:", exc)
        status = open("/proc/self/status").read()
        print("peak_mb", int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) / 1024)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]  # nothing of ONNX Runtime's own on the terminal
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert re.fullmatch(r"the model asked ONNX Runtime for 2,861 MB at once, more than this process's cap of 256 MB; .*", lines["refused:"])
    assert lines["real:"] in Predictor(run / "model.onnx").labels  # a real model runs under the same cap
    assert lines["second:"] == "ONNX Runtime's memory in this process is already capped at 256 MB; one cap per process"
    assert float(lines["peak_mb"]) < 1024  # the 3 GB were never taken


# --- one writer at a time ---------------------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_first_and_stale_temporaries_go(run, tmp_path):
    import subprocess
    import sys
    import textwrap

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import time
        from edgetransfer.rundir import RunDir
        with RunDir({str(run)!r}).lock():
            print("held", flush=True)
            time.sleep(120)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        stale = run / ".model.onnx.k2j4h1.tmp"  # what an export killed mid-write leaves
        stale.write_bytes(b"half")
        before = checksums(run)
        busy = rf"{run} is being written by another edgetransfer process \(pid {holder.pid}\); wait for it to finish"
        with pytest.raises(RunError, match=busy):
            export_onnx(run)
        with pytest.raises(RunError, match=busy):
            bench_run(run, BenchOptions(batch_sizes=(1,), iterations=1, warmup=0, eval_images=4))
        result = CliRunner().invoke(main, ["export", str(run), "--target", "ort-cpu"])
        last = result.output.strip().splitlines()[-1]
        assert result.exit_code == 1 and last.startswith(f"Error: {run} is being written") and f"pid {holder.pid}" in last
        assert checksums(run) == before
    finally:
        holder.kill()
        holder.wait()
    with RunDir(run).lock():  # released when its holder died, however it died
        assert not stale.exists()  # nobody else can be writing it now: removed


@pytest.mark.parametrize("arch", ["timm:levit_128s", "timm:deit_tiny_distilled_patch16_224"])
def test_a_distilled_model_trains_both_heads_and_its_logits_are_their_mean(arch, tmp_path):
    """LeViT's two heads read the same features, DeiT's two different tokens: in head mode both
    are trained on cached features, and the model that is saved scores what training measured."""
    from edgetransfer.data import eval_transform, load_dataset, load_image
    from edgetransfer.models import build

    config = FinetuneConfig(arch=arch, weights="none", data=DataSpec(limit_per_class=4), epochs=8, image_size=224)
    result = finetune(config, tmp_path / "run")
    torch.manual_seed(config.seed)  # what the run started from: its seed, then the build
    start = build(arch, 10, weights="none").module.state_dict()
    built, _ = load_checkpoint(result.run_dir / "model.pt")
    trained = built.module.state_dict()
    head_keys = {k for k in trained if k.startswith(("head.", "head_dist."))}
    assert {k.split(".")[0] for k in head_keys} == {"head", "head_dist"}
    assert all(torch.equal(trained[k], start[k]) for k in trained if k not in head_keys)  # the backbone is frozen
    for name in ("head", "head_dist"):
        weight = next(k for k in head_keys if k.startswith(name + ".") and k.endswith("weight") and trained[k].shape[0] == 10)
        assert not torch.equal(trained[weight], start[weight]), weight

    val = load_dataset(config.data).val
    x = torch.stack([eval_transform(built.preprocessing)(load_image(s)) for s in val])
    with torch.no_grad():
        top1 = (built.module(x).argmax(1).numpy() == np.array([s.label for s in val])).mean()
    assert top1 == pytest.approx(result.metrics["final"]["top1"])


def test_a_model_whose_logits_are_not_its_classifiers_is_refused_in_head_mode(monkeypatch, tmp_path):
    from torch import nn

    from edgetransfer.errors import ModelError
    from edgetransfer.models import BuiltModel

    class Doubled(nn.Module):  # stands for a model that changes the logits after its classifier
        def __init__(self, head):
            super().__init__()
            self.inner = head

        def forward(self, x):
            return 2 * self.inner(x)

    original = BuiltModel.head
    monkeypatch.setattr(BuiltModel, "head", lambda self, widths=None: Doubled(original(self, widths)))
    data = DataSpec(limit_per_class=3)
    with pytest.raises(
        ModelError,
        match=r"^timm:efficientnet_lite0's logits are not its classifier's output on cached features, "
        r"so head mode cannot train it on them; use --unfreeze-blocks 1 or --mode full$",
    ):
        finetune(FinetuneConfig(data=data, image_size=32), tmp_path / "head")
    assert not (tmp_path / "head").exists()
    # end to end, only the linear probe (trained on cached features) is given up
    full = finetune(FinetuneConfig(data=data, mode="full", epochs=1, image_size=32), tmp_path / "full")
    assert full.metrics["probe"] is None and len(full.metrics["epochs"]) == 1


def test_a_model_that_cannot_run_at_the_size_asked_is_one_line(tmp_path):
    from edgetransfer.errors import ModelError

    with pytest.raises(ModelError, match=r"^timm:levit_128s cannot run at 64 px \(.*\); try --image-size 224$"):
        finetune(FinetuneConfig(arch="timm:levit_128s", weights="none", data=DataSpec(limit_per_class=3)), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_resume_recomputes_a_corrupt_feature_cache_and_refuses_an_unknown_setting(tmp_path):
    config = FinetuneConfig(data=DataSpec(limit_per_class=10), epochs=3)
    straight = finetune(config, tmp_path / "straight")

    def stop(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    for name in ("cache", "config"):
        with pytest.raises(KeyboardInterrupt):
            finetune(config, tmp_path / name, on_epoch=stop)
    (tmp_path / "cache" / "cache" / "features.pt").write_bytes(b"\x80garbage")
    resumed = finetune(FinetuneConfig(), tmp_path / "cache", resume=True)
    assert [r["val_top1"] for r in resumed.metrics["epochs"]] == [r["val_top1"] for r in straight.metrics["epochs"]]
    saved = json.loads((tmp_path / "config" / "config.json").read_text())
    (tmp_path / "config" / "config.json").write_text(json.dumps({**saved, "bogus": 1}))
    with pytest.raises(RunError, match=r"config.json holds settings this version cannot use .*bogus.*; start a new run"):
        finetune(FinetuneConfig(), tmp_path / "config", resume=True)
