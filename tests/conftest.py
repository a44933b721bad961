"""Shared fixtures: real (small) image folders made from scikit-learn's digits."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgetransfer.progress import set_quiet

# One torch thread per pytest worker when the workers fill the cores, so that the workers together
# never ask for more threads than there are cores. Alone, two threads.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(1 if _WORKERS >= (os.cpu_count() or 1) else 2)
set_quiet(True)


def digits_pixels(per_class: int, classes: int = 3, size: int = 24) -> list[tuple[int, np.ndarray]]:
    """Real handwritten digits (scikit-learn), upscaled to ``size`` px greyscale uint8."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = []
    for label in range(classes):
        images = digits.images[digits.target == label][:per_class]
        for image in images:
            pixels = (image * 255 / 16).round().astype(np.uint8)
            out.append((label, np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR))))
    return out


def write_folder(root: Path, per_class: int, classes: int = 3, size: int = 24) -> Path:
    """An image folder with one subfolder per digit class, PNG files."""
    for index, (label, pixels) in enumerate(digits_pixels(per_class, classes, size)):
        folder = root / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{index:04d}.png")
    return root


def depthwise_cnn(path: Path, size: int = 24) -> Path:
    """A small MobileNet-like CNN in ONNX, input ``input`` of ``size`` px (batch free): stem,
    depthwise 3x3 (nine weights per channel, where nearest rounding hurts most), pointwise, head."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU6(),
        torch.nn.Conv2d(16, 16, 3, padding=1, groups=16),
        torch.nn.ReLU6(),
        torch.nn.Conv2d(16, 24, 1),
        torch.nn.ReLU6(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(24, 10),
    ).eval()
    torch.onnx.export(net, (torch.randn(1, 3, size, size),), str(path), input_names=["input"], dynamic_axes={"input": {0: "batch"}}, dynamo=False)
    return path


@pytest.fixture
def digit_folder(tmp_path: Path) -> Path:
    """3 classes x 12 real digit images."""
    return write_folder(tmp_path / "images", per_class=12)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One real fine-tuned run for the whole test session: EfficientNet-Lite0 (embedded ImageNet
    weights) with a new head on 200 real digits at 64 px (120 train, 40 val, 40 test), 15 cached
    epochs (about 2 s). Never modified: tests that add artifacts take a copy (:func:`copy_run`)."""
    from edgetransfer.data import DataSpec
    from edgetransfer.finetune import FinetuneConfig, finetune

    config = FinetuneConfig(data=DataSpec(limit_per_class=20, test_fraction=0.2), epochs=15)
    return finetune(config, tmp_path_factory.mktemp("trained") / "run").run_dir


def copy_run(trained: Path, tmp_path_factory, name: str) -> Path:
    """A private copy of the shared run, for a test module to add its own artifacts to."""
    import shutil

    target = tmp_path_factory.mktemp(name) / "run"
    shutil.copytree(trained, target)
    return target
