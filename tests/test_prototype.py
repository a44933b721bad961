"""Prototype heads (``finetune --mode prototype``) and enrolment in the runtime, on real digits."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from PIL import Image

from edgetransfer.checkpoint import load_checkpoint
from edgetransfer.cli import main as cli
from edgetransfer.config import FinetuneConfig
from edgetransfer.data import DataSpec
from edgetransfer.errors import ModelError
from edgetransfer.export import ExportOptions, export_onnx
from edgetransfer.finetune import finetune
from edgetransfer.models import build
from edgetransfer.prototype import PrototypeHead, embed, fit_head, install_prototype_head, l2_normalize
from edgetransfer.runtime import Predictor, PredictorError, wire
from edgetransfer.runtime.cli import main as runtime_main
from edgetransfer.runtime.enrolment import ENROLMENT_KEY, PROTOTYPES

from conftest import copy_run, digits_pixels, write_folder

NEW = 3  # the digit the model is trained without, then enrolled


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A prototype model of digits 0-2 (15 real images each, 48 px), exported to ONNX."""
    root = tmp_path_factory.mktemp("proto")
    folder = write_folder(root / "images", per_class=15, classes=3, size=48)
    config = FinetuneConfig(data=DataSpec(source=str(folder), test_fraction=0.0), mode="prototype", image_size=48)
    result = finetune(config, root / "run")
    export_onnx(result.run_dir)
    return result.run_dir


@pytest.fixture(scope="module")
def new_images(tmp_path_factory) -> list[Path]:
    """Five images of the digit the model has never seen, and five more held out."""
    folder = tmp_path_factory.mktemp("three")
    pixels = [p for label, p in digits_pixels(per_class=10, classes=NEW + 1, size=48) if label == NEW]
    paths = []
    for index, image in enumerate(pixels):
        paths.append(folder / f"three-{index}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def torch_embeddings(run: Path, images: list) -> tuple[torch.Tensor, PrototypeHead, object]:
    """The PyTorch prototype head's embeddings of ``images`` (the exported graph's ``features``)."""
    built, _ = load_checkpoint(run / "model.pt")
    head = built.heads[0]
    captured = []
    hook = head.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    pre = built.preprocessing
    batch = np.stack([pre.normalize(np.asarray(pre.resize_crop(Image.open(p).convert("RGB")), dtype=np.uint8)) for p in images])
    with torch.no_grad():
        logits = built.module(torch.from_numpy(batch))
    hook.remove()
    return head.embed(captured[0]), head, logits


def test_prototypes_are_the_normalised_class_means_of_whitened_embeddings():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=generator) + 3
    y = torch.arange(4).repeat_interleave(10)
    head = fit_head(x, y, 4)
    center = x.mean(0)
    centred = l2_normalize(x - center)
    assert torch.allclose(head.center, center)
    # the whitening is the inverse square root of the shrunk within-class covariance
    means = torch.stack([centred[y == k].mean(0) for k in range(4)])
    residual = (centred - means[y]).double()
    scatter = residual.t() @ residual / len(y)
    sigma = 0.8 * scatter + 0.2 * torch.trace(scatter) / 16 * torch.eye(16, dtype=torch.float64)
    white = head.whitening.double()
    assert torch.allclose(white @ sigma @ white, torch.eye(16, dtype=torch.float64), atol=1e-4)
    embedded = head.embed(x)
    assert torch.allclose(embedded.norm(dim=1), torch.ones(40), atol=1e-5)
    expected = torch.stack([embedded[y == k].mean(0) for k in range(4)])
    assert torch.allclose(head.prototypes, expected / expected.norm(dim=1, keepdim=True), atol=1e-6)
    assert torch.allclose(head(x), head.scale * embedded @ head.prototypes.t(), atol=1e-5)
    # one image per class: no within-class spread, no whitening; SimpleShot's CL2N alone
    one = fit_head(x[::10], y[::10], 4)
    assert not one.whitens and torch.allclose(one.embed(x), embed(x, x[::10].mean(0)), atol=1e-6)


def test_the_fitted_scale_changes_no_prediction():
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(60, 8, generator=generator), torch.arange(3).repeat(20)
    head = fit_head(x, y, 3, x[:30], y[:30])
    assert float(head.scale) != 10.0  # fitted, not the starting value
    assert torch.equal(head(x).argmax(1), (head.embed(x) @ head.prototypes.t()).argmax(1))


def test_a_prototype_run_is_a_run_whose_checkpoint_rebuilds_the_head(run):
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["mode"] == "prototype" and metrics["epochs"] == []
    assert metrics["prototype"]["whitened"] and sum(metrics["prototype"]["shots_per_class"]) == metrics["train_images"]
    assert metrics["final"]["top1"] > 0.6  # 3 digits from ImageNet features, no training
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["artifacts"]["checkpoint"]["settings"]["mode"] == "prototype"
    built, payload = load_checkpoint(run / "model.pt")
    assert payload["head"] == "prototype" and isinstance(built.heads[0], PrototypeHead)


def test_shots_keep_k_training_images_per_class(tmp_path, digit_folder):
    result = finetune(FinetuneConfig(data=DataSpec(source=str(digit_folder)), mode="prototype", shots=2, image_size=32), tmp_path / "run")
    assert result.metrics["prototype"]["shots_per_class"] == [2, 2, 2] and result.metrics["train_images"] == 6
    assert result.metrics["prototype"]["whitened"]  # two images per class: a within-class spread to whiten by
    head = load_checkpoint(result.run_dir / "model.pt")[0].heads[0]
    assert head.prototypes.shape[0] == 3


def test_a_model_whose_classifier_is_not_one_linear_layer_is_refused():
    built = build("squeezenet1_0", 3, weights="none", image_size=64)
    with pytest.raises(ModelError, match="prototype head replaces one Linear classifier"):
        install_prototype_head(built, built.heads[0])


def test_the_export_ends_in_a_float_prototype_gemm_and_outputs_the_embeddings(run):
    model = onnx.load(run / "model.onnx")
    assert [o.name for o in model.graph.output] == ["logits", "features"]
    matrix = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == PROTOTYPES)
    built, _ = load_checkpoint(run / "model.pt")
    assert np.array_equal(matrix, built.heads[0].prototypes.numpy())
    gemm = model.graph.node[-1]
    assert gemm.op_type == "Gemm" and list(gemm.input) == ["features", PROTOTYPES]
    parity = json.loads((run / "manifest.json").read_text())["artifacts"]["onnx"]["parity"]
    assert parity["within_tolerance"] and parity["images"] > 0


def test_an_enrolled_class_is_recognised_and_the_old_ones_are_untouched(run, new_images, tmp_path):
    support, held_out = new_images[:5], new_images[5:]
    predictor = Predictor(run / "model.onnx")
    old_labels = predictor.labels
    done = predictor.enrol("three", [str(p) for p in support])
    assert done.action == "add" and done.classes == 4 and done.images == 5
    out = predictor.save(tmp_path / "enrolled.onnx")
    enrolled = Predictor(out)
    assert enrolled.labels == (*old_labels, "three")
    # its own support images, and most held-out threes, now come out as the new class
    assert [p[0].label for p in enrolled.predict([str(p) for p in support])] == ["three"] * 5
    assert sum(p[0].label == "three" for p in enrolled.predict([str(p) for p in held_out])) >= 4
    # the new prototype is the normalised mean of the PyTorch head's embeddings of the support images
    embedded, head, _ = torch_embeddings(run, support)
    expected = l2_normalize(embedded.mean(0, keepdim=True))[0].numpy()
    matrix = wire.read_initializer(out.read_bytes(), PROTOTYPES)
    assert np.abs(matrix[-1] - expected).max() < 1e-4
    # on the old classes the enrolled model agrees with the PyTorch prototype head, within export parity
    probe = [str(p) for p in held_out]
    _, _, torch_logits = torch_embeddings(run, held_out)
    assert np.abs(enrolled.logits(probe)[:, :3] - torch_logits.numpy()).max() < 1e-3
    # the file is a valid ONNX model whose metadata records what was enrolled, with the images' sha256
    onnx.checker.check_model(onnx.load(out), full_check=True)
    history = json.loads(enrolled.session.props[ENROLMENT_KEY])
    assert history[-1]["label"] == "three" and [i["sha256"] for i in history[-1]["images"]] == [sha(p) for p in support]


def test_replace_and_remove(run, new_images, tmp_path):
    predictor = Predictor(run / "model.onnx")
    predictor.enrol("three", [str(new_images[0])])
    one_shot = wire.read_initializer(predictor.model_bytes(), PROTOTYPES)[-1].copy()
    done = predictor.enrol("three", [str(p) for p in new_images[:5]], replace=True)
    assert done.action == "replace" and done.classes == 4
    assert not np.allclose(wire.read_initializer(predictor.model_bytes(), PROTOTYPES)[-1], one_shot)
    first = predictor.labels[0]
    before = wire.read_initializer(predictor.model_bytes(), PROTOTYPES)
    done = predictor.remove(first)
    assert done.classes == 3 and first not in predictor.labels
    assert np.array_equal(wire.read_initializer(predictor.model_bytes(), PROTOTYPES), before[1:])
    actions = [r["action"] for r in json.loads(wire.metadata(predictor.model_bytes())[ENROLMENT_KEY])]
    assert actions == ["add", "replace", "remove"]


def test_enrolment_refusals_leave_every_file_as_it_was(run, new_images, tmp_path, tmp_path_factory, trained_run, monkeypatch):
    import shutil

    folder = tmp_path / "deploy"
    folder.mkdir()
    model = folder / "model.onnx"
    shutil.copyfile(run / "model.onnx", model)
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    thin = folder / "thin.png"
    Image.new("L", (1, 100_000)).save(thin)
    before = {p.name: sha(p) for p in folder.iterdir()}
    existing = Predictor(model).labels[0]
    runner = CliRunner()
    attempts = {
        "exists already": ["--label", existing, str(new_images[0])],
        "at least one image": ["--label", "three"],
        "cannot read image": ["--label", "three", str(broken)],
        "times longer than it is wide": ["--label", "three", str(thin)],
        "image not found": ["--label", "three", str(folder / "missing.png")],
        "printable": ["--label", "th\x1b[2Jree", str(new_images[0])],
        "no class 'nine' to remove": ["--remove", "nine", "--in-place"],
        "folder .* does not exist": ["--label", "three", str(new_images[0]), "--output", str(folder / "no" / "m.onnx")],
    }
    for expected, args in attempts.items():
        result = runner.invoke(cli, ["enrol", str(model), *args])
        assert result.exit_code == 1 and result.output.startswith("Error: "), (expected, result.output)
        assert len(result.output.strip().splitlines()) == 1 and re.search(expected, result.output), (expected, result.output)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == folder else real_access(path, mode))
    result = runner.invoke(cli, ["enrol", str(model), "--label", "three", str(new_images[0])])
    assert result.exit_code == 1 and "permission denied" in result.output
    monkeypatch.undo()
    assert {p.name: sha(p) for p in folder.iterdir()} == before  # nothing written, nothing changed
    # a model without a prototype head names the models that can enrol
    plain = export_onnx(copy_run(trained_run, tmp_path_factory, "plain"), ExportOptions(verify=False)).path
    result = runner.invoke(cli, ["enrol", str(plain), "--label", "three", str(new_images[0])])
    assert result.exit_code == 1 and "finetune --mode prototype" in result.output


def test_a_model_recorded_in_its_run_is_enrolled_into_a_copy(run, new_images, tmp_path):
    runner = CliRunner()
    recorded = sha(run / "model.onnx")
    result = runner.invoke(cli, ["enrol", str(run / "model.onnx"), "--label", "three", str(new_images[0]), "--in-place"])
    assert result.exit_code == 1 and "--output" in result.output
    output = tmp_path / "with-three.onnx"
    result = runner.invoke(cli, ["enrol", str(run / "model.onnx"), "--label", "three", *map(str, new_images[:5]), "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert "added three from 5 image(s)" in result.output and sha(run / "model.onnx") == recorded
    # the runtime's own command, label after the images or before them, in place on the copy
    code = runtime_main(["enrol", str(output), "--remove", "three", "--in-place"])
    assert code == 0 and Predictor(output).labels == Predictor(run / "model.onnx").labels
    code = runtime_main(["enrol", str(output), "--label", "three", *map(str, new_images[:3]), "--in-place"])
    assert code == 0 and Predictor(output).labels[-1] == "three"


def test_enrolment_into_an_int8_model_uses_its_features_and_keeps_the_prototypes_in_float(run, new_images, tmp_path):
    from edgetransfer.optimize import Precision, QuantOptions, Target, build_variants

    variant = build_variants(run, [Target.ORT_CPU], [Precision.INT8], QuantOptions(max_accuracy_drop=100.0))[0]
    model = onnx.load(variant.path)
    head = [n for n in model.graph.node if n.name.startswith("edgetransfer.prototype/")]
    produced = {out: n for n in model.graph.node for out in n.output}
    assert head and all(
        produced.get(i) is None or produced[i].op_type != "DequantizeLinear"
        for n in head
        for i in n.input
        if i != "pooled" and not i.startswith("edgetransfer.prototype.")
    )
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)  # the backbone is quantised
    predictor = Predictor(variant.path)
    features = predictor.features([str(p) for p in new_images[:5]])
    predictor.enrol("three", [str(p) for p in new_images[:5]])
    mean = features.mean(0)
    assert np.abs(wire.read_initializer(predictor.model_bytes(), PROTOTYPES)[-1] - mean / np.linalg.norm(mean)).max() < 1e-5
    assert [p[0].label for p in predictor.predict([str(p) for p in new_images[:5]])] == ["three"] * 5


def test_the_optimised_and_fp16_variants_keep_a_float_head_that_enrols(run, new_images):
    from edgetransfer.optimize import Precision, Target, build_variants

    for variant in build_variants(run, [Target.ORT_CPU], [Precision.FP32, Precision.FP16]):
        predictor = Predictor(variant.path)
        assert wire.read_initializer(predictor.model_bytes(), PROTOTYPES).dtype == np.float32, variant.name
        done = predictor.enrol("three", [str(p) for p in new_images[:5]])
        assert done.recognised == 5 and predictor.labels[-1] == "three", variant.name


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=400))
def test_the_wire_reader_refuses_any_bytes_in_one_error(data):
    """Random bytes hold no prototype matrix: the reader finds none, or refuses the bytes with one
    line of PredictorError; never another exception, never a matrix made of garbage."""
    try:
        props = wire.metadata(data)
    except PredictorError as exc:
        assert "\n" not in str(exc)
    else:
        assert all(isinstance(key, str) and isinstance(value, str) for key, value in props.items())
    try:
        found = wire.read_initializer(data, PROTOTYPES)
    except PredictorError as exc:
        assert "\n" not in str(exc)
    else:
        assert found is None


def test_a_truncated_model_is_refused_in_one_line(run, tmp_path):
    data = (run / "model.onnx").read_bytes()
    with pytest.raises(PredictorError):
        wire.replace_initializer(data[: len(data) // 2], PROTOTYPES, np.zeros((2, 2), np.float32))


def test_an_openvino_ir_of_a_prototype_model_predicts_like_its_onnx_and_refuses_enrolment(run, new_images):
    from edgetransfer.optimize import Precision, Target, build_variants

    variant = build_variants(run, [Target.OPENVINO], [Precision.FP32])[0]
    images = [str(p) for p in new_images]
    ir, onnx_model = Predictor(variant.path), Predictor(run / "model.onnx")
    assert np.abs(ir.logits(images) - onnx_model.logits(images)).max() < 1e-3
    with pytest.raises(PredictorError, match="OpenVINO IR cannot enrol"):
        ir.enrol("three", images[:2])
