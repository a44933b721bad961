from __future__ import annotations

import io
import json
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from edgetransfer.checkpoint import load_checkpoint
from edgetransfer.data import DataSpec, eval_transform, load_dataset, load_image
from edgetransfer.export import ExportOptions, export_onnx
from edgetransfer.runtime import Prediction, Predictor, PredictorError
from edgetransfer.runtime.preprocessing import Interpolation, Preprocessing

from conftest import copy_run


@pytest.fixture(scope="module")
def run(trained_run, tmp_path_factory):
    """A real run (EfficientNet-Lite0 head on 200 digits), exported dynamic and with a static batch
    of 3 (40 validation images: the last batch is padded)."""
    run_dir = copy_run(trained_run, tmp_path_factory, "rt")
    export_onnx(run_dir, ExportOptions(verify=False))
    export_onnx(run_dir, ExportOptions(verify=False, static_batch=3, output=run_dir / "b3.onnx"))
    export_onnx(run_dir, ExportOptions(verify=False, fuse_preprocess=True))
    return run_dir


@pytest.fixture(scope="module")
def val_images(run):
    dataset = load_dataset(DataSpec(limit_per_class=20))
    return [load_image(s) for s in dataset.val], np.array([s.label for s in dataset.val])


def photos() -> list[Image.Image]:
    from skimage import data

    return [Image.fromarray(data.chelsea()), Image.fromarray(data.coffee()), Image.fromarray(data.astronaut()[:300, :171])]


@pytest.mark.parametrize("interpolation", list(Interpolation))
@pytest.mark.parametrize("sizes", [(64, 73), (224, 256), (96, 96)])
def test_preprocessing_matches_torchvision(interpolation, sizes):
    pre = Preprocessing(*sizes, interpolation=interpolation)
    for image in photos():
        ours = pre(image)
        theirs = eval_transform(pre)(image).numpy()
        assert ours.shape == theirs.shape == (3, sizes[0], sizes[0])
        assert np.abs(ours - theirs).max() <= 1e-6


def test_predictions_agree_with_eager_pytorch(run, val_images):
    images, labels = val_images
    built, _ = load_checkpoint(run / "model.pt")
    transform = eval_transform(built.preprocessing)
    with torch.no_grad():
        eager = built.module(torch.stack([transform(i) for i in images])).softmax(1).numpy()
    assert len(images) % 3 == 1  # the static-batch model needs its last batch padded
    for name in ("model.onnx", "b3.onnx", "model-uint8.onnx"):
        predictor = Predictor(run / name)
        results = predictor.predict(images, top_k=1)
        assert [r[0].index for r in results] == list(eager.argmax(1)), name
        np.testing.assert_allclose([r[0].probability for r in results], eager.max(1), atol=1e-4)
    accuracy = np.mean([r[0].index for r in results] == labels)
    assert accuracy >= 0.7  # a real model, not noise


def test_every_input_kind_gives_the_same_answer(run, tmp_path):
    predictor = Predictor(run / "model.onnx")
    image = photos()[0]
    path = tmp_path / "cat.png"
    image.save(path)
    expected = predictor.predict(image, top_k=3)
    assert isinstance(expected[0], Prediction) and len(expected) == 3
    assert predictor.predict(path, top_k=3) == expected
    assert predictor.predict(str(path), top_k=3) == expected
    assert predictor.predict(path.read_bytes(), top_k=3) == expected
    assert predictor.predict(np.asarray(image), top_k=3) == expected
    assert predictor.predict([path, np.asarray(image)], top_k=3) == [expected, expected]
    grey = np.asarray(image.convert("L"))
    assert predictor.predict(grey, top_k=3) == predictor.predict(image.convert("L"), top_k=3)
    assert predictor.predict([], top_k=3) == []
    assert len(predictor.predict(image, top_k=50)) == 10


def test_concurrent_calls_match_serial_calls(run, val_images):
    predictor = Predictor(run / "model.onnx", threads=1)
    images = val_images[0][:24]
    serial = [predictor.predict(img, top_k=2) for img in images]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            assert list(pool.map(lambda img: predictor.predict(img, top_k=2), images)) == serial


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((8, 8, 3), np.float32), r"must be uint8 \(HxWx3 RGB\), got dtype float32"),
        (np.zeros((8, 8, 5), np.uint8), r"must be HxWx3 RGB \(or HxW grey\), got shape \(8, 8, 5\)"),
        (b"GIF89a but not really", r"cannot read image <bytes>"),
        (b"", r"^cannot read image <bytes>: it is empty or not in an image format Pillow reads$"),
        (b"plain text, no image", r"^cannot read image <bytes>: it is empty or not in an image format Pillow reads$"),
        ("/no/such/image.png", r"image not found: /no/such/image.png"),
        (12345, r"cannot use a int as an image"),
    ],
)
def test_bad_images_raise_the_runtime_error(run, bad, message):
    with pytest.raises(PredictorError, match=message):
        Predictor(run / "model.onnx").predict(bad)


def test_truncated_image_bytes(run):
    buffer = io.BytesIO()
    photos()[0].save(buffer, format="JPEG")
    with pytest.raises(PredictorError, match=r"cannot read image <bytes>"):
        Predictor(run / "model.onnx").predict(buffer.getvalue()[:2000])


def test_corrupt_and_missing_models(tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(PredictorError, match=r"cannot load model .*corrupt.onnx"):
        Predictor(corrupt)
    with pytest.raises(PredictorError, match=r"model not found"):
        Predictor(tmp_path / "missing.onnx")


def test_model_without_metadata_needs_the_preprocessing(run, tmp_path):
    model = onnx.load(run / "model.onnx")
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, bare)
    with pytest.raises(PredictorError, match=r"no edgetransfer metadata; pass preprocessing="):
        Predictor(bare)
    with pytest.raises(PredictorError, match=r"3 labels given for a model with 10 outputs"):
        Predictor(bare, preprocessing=Preprocessing(64, 73), labels=["a", "b", "c"])
    original = Predictor(run / "model.onnx")
    predictor = Predictor(bare, preprocessing=original.info.preprocessing, labels=[f"d{i}" for i in range(10)])
    image = photos()[1]
    assert [p.index for p in predictor.predict(image)] == [p.index for p in original.predict(image)]
    assert predictor.predict(image)[0].label == "d" + original.predict(image)[0].label


def test_missing_provider_is_an_error_unless_fallback_is_allowed(run):
    import onnxruntime as ort

    with pytest.raises(PredictorError, match=r"provider FooExecutionProvider is not in this onnxruntime build"):
        Predictor(run / "model.onnx", providers=["FooExecutionProvider"])
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider to ask for")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = Predictor(run / "model.onnx", providers=["cuda"], allow_fallback=True)
    if probe.provider == "CUDAExecutionProvider":
        pytest.skip("CUDA really works here: nothing falls back")
    assert any("asked for CUDAExecutionProvider" in str(w.message) for w in caught)
    assert probe.provider == "CPUExecutionProvider" and "asked for CUDAExecutionProvider" in probe.fallback
    with pytest.raises(PredictorError, match=r"asked for CUDAExecutionProvider but the session runs on CPUExecutionProvider.*allow_fallback=True"):
        Predictor(run / "model.onnx", providers=["cuda"])


def test_predict_command(run, tmp_path):
    from click.testing import CliRunner

    from edgetransfer.cli import main

    path = tmp_path / "coffee.png"
    photos()[1].save(path)
    result = CliRunner().invoke(main, ["predict", str(run / "model.onnx"), str(path), "--json", "-k", "2"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["provider"] == "CPUExecutionProvider"
    assert len(payload["results"][0]["predictions"]) == 2
    result = CliRunner().invoke(main, ["predict", str(run / "model.onnx"), str(tmp_path / "gone.png")])
    assert result.exit_code == 1 and "Error: image not found" in result.output
