"""Head mode's frozen pass: ONNX Runtime gives PyTorch's features on real images, a backbone that
will not export (or whose engine disagrees) falls back with its note, the engine is part of the
feature cache's key, and the thread that prepares the next batch neither hides errors nor leaks."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from edgetransfer.config import FeatureEngine, FinetuneConfig
from edgetransfer.data import DataSpec, eval_transform, load_dataset
from edgetransfer.errors import UnknownNameError
from edgetransfer.models import build
from edgetransfer.safeload import safe_load
from edgetransfer.train.features import SAMPLE, TOLERANCE, WORTH_PIXELS, FrozenPass, channels_last, prefetch, silent_stdout
from edgetransfer.train.loops import CachedHeadLoop, image_loader
from edgetransfer.weights import DEFAULT_ARCH, default_weights

from conftest import digits_pixels

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lite0():
    """The default backbone with its shipped ImageNet weights, 3 classes, 64 px."""
    return build(DEFAULT_ARCH, 3, default_weights(DEFAULT_ARCH), 64)


@pytest.fixture(scope="module")
def digit_batches(lite0):
    """30 real digits through the model's own eval transform, in batches of 12."""
    transform = eval_transform(lite0.preprocessing)
    from PIL import Image

    pixels = digits_pixels(per_class=10, size=24)
    x = torch.stack([transform(Image.fromarray(p).convert("RGB")) for _, p in pixels])
    y = torch.tensor([label for label, _ in pixels])
    return [(x[i : i + 12], y[i : i + 12]) for i in range(0, len(y), 12)]


def run(frozen: FrozenPass, batches) -> torch.Tensor:
    features, labels = frozen.run(batches, sum(len(y) for _, y in batches), lambda n: None)
    assert torch.equal(labels, torch.cat([y for _, y in batches]))
    return features


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def test_onnxruntime_features_equal_pytorchs_on_real_images(lite0, digit_batches):
    reference = run(FrozenPass(lite0, CPU, FeatureEngine.TORCH), digit_batches)
    frozen = FrozenPass(lite0, CPU, FeatureEngine.ONNXRUNTIME)
    features = run(frozen, digit_batches)
    assert frozen.engine == "onnxruntime" and frozen.note is None
    assert features.shape == (30, lite0.heads[0].in_features)
    assert relative_difference(features, reference) <= TOLERANCE  # every image, not only the checked sample
    assert 0 <= frozen.max_difference <= TOLERANCE
    assert float(features.std(0).mean()) > 0.01  # real, distinct features, not a constant
    again = run(frozen, digit_batches)  # a later pass (validation) reuses the checked engine
    assert torch.allclose(again, features, atol=1e-5)
    assert all(p.is_contiguous() for p in lite0.module.parameters())  # the model is left as it was


def test_auto_keeps_a_small_pass_in_pytorch_without_a_note(lite0, digit_batches):
    frozen = FrozenPass(lite0, CPU, FeatureEngine.AUTO)
    assert 30 * 64 * 64 < WORTH_PIXELS
    run(frozen, digit_batches)
    assert frozen.engine == "torch" and frozen.note is None


class Bessel(nn.Module):
    """A backbone with an operator the ONNX exporter has no conversion for."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.special.bessel_j0(self.conv(x)).mean((2, 3))
        return self.head(pooled)


def test_a_backbone_that_will_not_export_falls_back_with_a_one_line_note(capfd):
    torch.manual_seed(0)
    model = Bessel().eval()
    built = SimpleNamespace(module=model, heads=(model.head,))
    batches = [(torch.randn(5, 3, 16, 16), torch.arange(5))]
    frozen = FrozenPass(built, CPU, FeatureEngine.ONNXRUNTIME)  # type: ignore[arg-type]
    features = run(frozen, batches)
    assert frozen.engine == "torch"
    assert frozen.note is not None and "did not export" in frozen.note and "bessel_j0" in frozen.note
    with torch.no_grad():
        expected = torch.special.bessel_j0(model.conv(batches[0][0])).mean((2, 3))
    assert torch.allclose(features, expected, atol=1e-6)
    out, err = capfd.readouterr()
    assert "graph" not in out and "Torch IR" not in out + err  # the exporter's C++ dump stays off the terminal


def test_an_engine_that_disagrees_with_pytorch_is_not_used(lite0, digit_batches, monkeypatch):
    original = FrozenPass._engine
    monkeypatch.setattr(FrozenPass, "_engine", lambda self, x: original(self, x) * 1.01)
    frozen = FrozenPass(lite0, CPU, FeatureEngine.ONNXRUNTIME)
    features = run(frozen, digit_batches)
    assert frozen.engine == "torch" and "differ from PyTorch's" in (frozen.note or "")
    assert frozen.max_difference is not None and frozen.max_difference > TOLERANCE
    reference = run(FrozenPass(lite0, CPU, FeatureEngine.TORCH), digit_batches)
    assert relative_difference(features, reference) <= 1e-5


def test_the_first_batch_checks_the_models_logits_on_a_sample(lite0, digit_batches):
    seen = []
    frozen = FrozenPass(lite0, CPU, FeatureEngine.TORCH, check_logits=lambda f, logits: seen.append((f.shape, logits.shape)))
    run(frozen, digit_batches)
    assert seen == [((SAMPLE, lite0.heads[0].in_features), (SAMPLE, 3))]


def test_the_feature_cache_is_keyed_by_engine(tmp_path: Path, lite0):
    spec = DataSpec(limit_per_class=3, val_fraction=0.34, test_fraction=0.0)
    dataset = load_dataset(spec)
    model = build(DEFAULT_ARCH, len(dataset.classes), default_weights(DEFAULT_ARCH), 32)

    def loop(engine: str) -> CachedHeadLoop:
        config = FinetuneConfig(data=spec, image_size=32, feature_engine=engine).resolved()
        return CachedHeadLoop(config, model, dataset, CPU, tmp_path)

    def cached() -> dict:
        return safe_load(tmp_path / "cache" / "features.pt")

    first = loop("torch")
    assert first.frozen_record()["engine"] == "torch" and cached()["computed_by"] == "torch"
    second = loop("onnxruntime")  # another engine asked: computed again, not read as the other's
    assert second.train_pass_s > 0 and cached()["computed_by"] == "onnxruntime"
    assert relative_difference(second.train_x, first.train_x) <= TOLERANCE
    third = loop("onnxruntime")  # the same engine: read from the cache, which says who made it
    assert third.train_pass_s == 0 and third.frozen_record()["engine"] == "onnxruntime"
    assert torch.equal(third.train_x, second.train_x)


def test_an_unknown_engine_is_refused_with_the_known_ones():
    with pytest.raises(UnknownNameError, match="onnxruntime"):
        FinetuneConfig(feature_engine="tensorrt")


def test_prefetch_raises_the_producers_error_and_stops_its_thread_when_left():
    def broken():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(prefetch(broken()))
    produced = []

    def endless():
        n = 0
        while True:
            produced.append(n)
            yield n
            n += 1

    for item in prefetch(endless(), depth=2):
        if item == 3:
            break
    assert not [t for t in threading.enumerate() if t.name == "edgetransfer-prefetch"]
    assert len(produced) <= 4 + 2 + 1  # at most depth ahead (and one in hand) of what was taken


def test_channels_last_is_undone_on_exit(lite0):
    convs = [m.weight for m in lite0.module.modules() if isinstance(m, nn.Conv2d)]
    with channels_last(lite0.module):
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert all(w.is_contiguous() for w in convs)


def test_silent_stdout_silences_file_descriptor_one_only_inside(capfd):
    import os

    with silent_stdout():
        os.write(1, b"hidden\n")
    os.write(1, b"shown\n")
    assert capfd.readouterr().out == "shown\n"


def test_image_loader_batches_feed_the_pass(lite0):
    """The loader the run uses, end to end: real decoded images of the demo through the pass."""
    dataset = load_dataset(DataSpec(limit_per_class=2, test_fraction=0.0))
    config = FinetuneConfig(image_size=64, batch_size=8).resolved()
    loader = image_loader(dataset.train, eval_transform(lite0.preprocessing), config, shuffle=False)
    frozen = FrozenPass(lite0, CPU, FeatureEngine.ONNXRUNTIME)
    features, labels = frozen.run(loader, len(dataset.train), lambda n: None)
    assert len(features) == len(labels) == len(dataset.train) and frozen.engine == "onnxruntime"
