"""Unsupervised domain adaptation: labelled source images, unlabelled target images.

The user trains on labelled images (``--data``) and gives a folder of unlabelled images from where
the model will run (``--adapt``: frames of the real camera; labels, if the folder has any, are not
read). Training then makes the model's features agree across the two domains. What ships is the
plain classifier: every method here leaves the checkpoint, the export and every variant with the
same graph, shape and speed as an unadapted run.

Methods (``AdaptMethod``):

- ``dann``: domain-adversarial training (Ganin and Lempitsky 2015, "Unsupervised Domain
  Adaptation by Backpropagation", ICML; Ganin et al. 2016, "Domain-Adversarial Training of Neural
  Networks", JMLR 17). A small domain classifier reads the classifier's input features through a
  gradient reversal layer: it learns to tell source from target, the backbone learns to make them
  indistinguishable. The reversal weight follows the paper's ``2 / (1 + exp(-10 p)) - 1`` and the
  learning rate its ``1 / (1 + 10 p) ** 0.75`` over training progress ``p``. Needs a backbone that
  trains. The domain classifier exists only during training.
- ``adabn``: adaptive batch normalisation (Li et al. 2016, "Revisiting Batch Normalization For
  Practical Domain Adaptation", arXiv:1603.04779; Pattern Recognition 2018). After training, every
  BatchNorm layer's running mean and variance are recomputed on the target images (one pass, no
  gradient); nothing else changes.

The built-in demo pair is ``digits`` -> ``digits-m`` (:mod:`edgetransfer.data`): ``--adapt
digits-m`` adapts to the digits-M training images without their labels and measures on the
digits-M test images, which no stage reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import AdaptMethod
from .data import (
    DEMO,
    DEMO_M,
    IMAGE_EXTENSIONS,
    DataSpec,
    Sample,
    check_images,
    load_dataset,
    scan_classes,
)
from .errors import DataError, ModelError

__all__ = [
    "AdaptMethod",
    "GradientReversal",
    "grad_reverse",
    "reversal_weight",
    "dann_lr_factor",
    "DomainClassifier",
    "adabn",
    "batchnorm_layers",
    "target_images",
    "target_eval_images",
]

GAMMA = 10.0  # the reversal weight's schedule (Ganin et al. 2016, section 5.2.2)
LR_ALPHA, LR_BETA = 10.0, 0.75  # the learning rate's annealing, same section
DOMAIN_HIDDEN = 1024  # the domain classifier of the paper's deep (AlexNet) experiments: 1024-1024-1
DOMAIN_DROPOUT = 0.5


class GradientReversal(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by ``-weight`` backward (Ganin and Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.weight * grad, None


def grad_reverse(x: torch.Tensor, weight: float) -> torch.Tensor:
    return GradientReversal.apply(x, weight)


def reversal_weight(progress: float, gamma: float = GAMMA) -> float:
    """The paper's schedule for the reversal weight: 0 at the start (the domain classifier's
    first, noisy gradients do not reach the backbone), close to 1 at the end."""
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


def dann_lr_factor(progress: float) -> float:
    """The paper's learning-rate annealing, ``(1 + 10 p) ** -0.75``, as a factor of the initial rate."""
    return (1.0 + LR_ALPHA * progress) ** -LR_BETA


class DomainClassifier(nn.Module):
    """Source (0) or target (1) from the classifier's input features, through gradient reversal."""

    def __init__(self, width: int, hidden: int = DOMAIN_HIDDEN) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(width, hidden),
            nn.ReLU(),
            nn.Dropout(DOMAIN_DROPOUT),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(DOMAIN_DROPOUT),
            nn.Linear(hidden, 1),
        )

    def forward(self, features: torch.Tensor, weight: float) -> torch.Tensor:
        return self.layers(grad_reverse(features, weight)).squeeze(1)


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def adabn(module: nn.Module, batches, arch: str = "this model") -> int:
    """Recompute every BatchNorm layer's running statistics on ``batches`` (AdaBN, Li et al. 2016).

    The statistics are the exact average over all batches (``momentum=None``), not a moving one.
    Only BatchNorm buffers change; every parameter and every other buffer is left as it was, and
    the module is left in eval mode. Returns how many layers were recomputed.

    Raises:
        ModelError: the module has no BatchNorm layer.
    """
    layers = batchnorm_layers(module)
    if not layers:
        raise ModelError(f"adabn recomputes BatchNorm statistics and {arch} has no BatchNorm layer; use --adapt-method dann")
    momenta = [layer.momentum for layer in layers]
    module.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
        layer.train()
    try:
        with torch.no_grad():
            for x in batches:
                module(x)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
        module.eval()
    return len(layers)


# ---------------------------------------------------------------------------------------------
# Target images


@dataclass(frozen=True)
class TargetImages:
    """Unlabelled images of the target domain and what was noticed reading them."""

    samples: list[Sample]
    skipped: list[tuple[str, str]]
    labelled_folders: int  # class subfolders found (their names are not read)


def target_images(source: str, spec: DataSpec, workers: int = 4) -> TargetImages:
    """The unlabelled target images ``--adapt`` names: a folder (any depth; subfolders' names are
    not read), or ``digits-m``: the digits-M training split (labels dropped), split with the same
    seed as the source data so that the digits-M test split stays unseen.

    Raises:
        DataError: missing, not a folder, no images, or no readable image.
    """
    if source == DEMO_M:
        train = load_dataset(DataSpec(DEMO_M, spec.val_fraction, spec.test_fraction or 0.1, spec.seed)).train
        return TargetImages([Sample(s.source, -1, s.name) for s in train], [], 0)
    if source == DEMO:
        raise DataError("--adapt digits would adapt to the source's own domain; give a folder of target images, or digits-m")
    root = Path(source).expanduser()
    if not root.exists():
        raise DataError(f"target folder not found: {root} (give a folder of unlabelled images from where the model will run)")
    if not root.is_dir():
        raise DataError(f"--adapt takes a folder of images, not a file: {root}")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise DataError(f"target folder {root} has no images ({', '.join(sorted(IMAGE_EXTENSIONS)[:6])}, …); add some")
    folders = {p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1}
    samples, skipped = check_images([Sample(str(p), -1, str(p.relative_to(root))) for p in files], strict=False, workers=workers)
    if not samples:
        raise DataError(f"none of the {len(files)} image(s) in target folder {root} can be read (first: {skipped[0][1]})")
    return TargetImages(samples, skipped, len(folders))


def target_eval_images(source: str, spec: DataSpec, classes: list[str], workers: int = 4) -> list[Sample]:
    """Labelled target images to measure on (``--adapt-eval``): a folder with one subfolder per
    class (names from the training classes), or ``digits-m``: the digits-M test split.

    Raises:
        DataError: missing, empty, or a class training does not know.
    """
    if source == DEMO_M:
        if spec.source not in (DEMO, DEMO_M):
            raise DataError("--adapt-eval digits-m measures the digits demo; give a labelled folder of target images")
        return load_dataset(DataSpec(DEMO_M, spec.val_fraction, spec.test_fraction or 0.1, spec.seed)).test

    root = Path(source).expanduser()
    if not root.is_dir():
        raise DataError(f"--adapt-eval folder not found: {root} (give a folder with one subfolder per class, named as in training)")
    _, samples = scan_classes(root, classes)
    samples, _ = check_images(samples, strict=False, workers=workers)
    if not samples:
        raise DataError(f"--adapt-eval folder {root} has no readable images")
    return samples


def summary(method: AdaptMethod, images: TargetImages, eval_images: int, **extra: Any) -> dict[str, Any]:
    """What ``metrics.json`` records of an adapted run."""
    return {
        "method": method.value,
        "target_images": len(images.samples),
        "target_skipped": len(images.skipped),
        "eval_images": eval_images,
        **extra,
    }
