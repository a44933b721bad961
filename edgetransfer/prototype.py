"""Prototype (nearest class mean) heads: a classifier made from features, with no training.

A prototype head keeps the pretrained backbone and replaces the classifier by a cosine
classifier on class means (Snell et al. 2017, "Prototypical Networks for Few-shot Learning"):

1. a feature is centred on the mean feature of the training images and L2-normalised
   (SimpleShot's CL2N: Wang et al. 2019, "SimpleShot: Revisiting Nearest-Neighbor
   Classification for Few-Shot Learning");
2. then whitened by the training images' within-class covariance, shrunk towards a multiple
   of the identity (regularised discriminant analysis, Friedman 1989; the shared-covariance
   Mahalanobis distance of Bateni et al. 2020, "Improved Few-Shot Visual Classification"), and
   normalised again. With one image per class there is no within-class spread and this step is
   the identity. On the demo it is worth 8 to 13 points at 5 shots and 25 at full data
   (benchmarks/results/fewshot.md);
3. a class's prototype is the mean of its images' embeddings, normalised; the logits are
   ``scale * cos(embedding, prototype)``, the scale fit on validation images (no top-1 changes).

A new class needs only the mean of a few embeddings, so classes can be added where the model is
deployed, without torch (``edgetransfer.runtime.enrolment``): the centre and the whitening stay
those of the training images. The exported graph ends in one ``Gemm`` whose ``B`` is the
prototype matrix, the initializer ``edgetransfer.prototypes``, and carries the embeddings as a
second output, ``features``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from .errors import ModelError
from .models import BuiltModel
from .taskheads import one_linear_classifier, swap_classifier

__all__ = [
    "PrototypeHead",
    "PROTOTYPE",
    "SHRINKAGE",
    "install_prototype_head",
    "fit_head",
    "fit_recorded",
    "embed",
    "prototypes_from",
    "fit_scale",
    "l2_normalize",
]

PROTOTYPE = "prototype"  # the checkpoint's "head" entry for a model whose classifier is a PrototypeHead
SHRINKAGE = 0.2  # weight of the identity in the whitening covariance; 0.05 to 0.5 do alike in few-shot episodes
SCALES = torch.logspace(0, math.log10(200), 48)  # the cosine scales fit_scale chooses from: 1 to 200


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Each row at unit length; written out as export writes it in ONNX (``F.normalize`` exports
    an ``Expand`` that ONNX Runtime's quantisation pre-processing cannot infer shapes through)."""
    return x / torch.sqrt((x * x).sum(dim=1, keepdim=True).clamp_min(1e-24))


def embed(features: torch.Tensor, center: torch.Tensor, whitening: torch.Tensor | None = None) -> torch.Tensor:
    """Centre, normalise, whiten, normalise: what the prototypes are means of."""
    centred = l2_normalize(features.float() - center)
    return centred if whitening is None else l2_normalize(centred @ whitening)


class PrototypeHead(nn.Module):
    """``scale * embed(x) @ prototypes.T``: a cosine classifier on class means.

    With ``features_only`` set (during export) it returns its input unchanged: export appends the
    embedding and the prototype ``Gemm`` to the graph itself, as named nodes that quantisation
    leaves in float.
    """

    center: torch.Tensor  # buffers
    whitening: torch.Tensor
    prototypes: torch.Tensor

    def __init__(self, center: torch.Tensor, whitening: torch.Tensor, prototypes: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.register_buffer("center", center.detach().float().clone())
        self.register_buffer("whitening", whitening.detach().float().clone())
        # parameters, not buffers, so that the model's classifier is found like any other (frozen)
        self.prototypes = nn.Parameter(prototypes.detach().float().clone(), requires_grad=False)
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=False)
        self.features_only = False

    @classmethod
    def empty(cls, width: int, classes: int) -> "PrototypeHead":
        """A head of the right shapes, to load a checkpoint's state into."""
        return cls(torch.zeros(width), torch.eye(width), torch.zeros(classes, width), 1.0)

    @property
    def whitens(self) -> bool:
        return not torch.equal(self.whitening, torch.eye(len(self.whitening), device=self.whitening.device))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return embed(x, self.center, self.whitening)  # an identity whitening changes nothing (export leaves it out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.features_only:
            return x
        return self.scale * self.embed(x) @ self.prototypes.t()


def whitening_from(embedded: torch.Tensor, labels: torch.Tensor, classes: int, shrinkage: float = SHRINKAGE) -> torch.Tensor:
    """The inverse square root of the within-class covariance shrunk towards the identity,
    ``((1 - s) * S_w + s * t * I) ** -1/2`` with ``t = trace(S_w) / d``; the identity when no class
    has two images.

    ``S_w = R.T @ R / n`` for the residuals ``R`` (each embedding minus its class mean) has rank at
    most ``n``, so the root comes from the SVD of ``R`` (``n x d``) rather than of a ``d x d``
    matrix: with right singular vectors ``V`` and ``lambda = sigma^2 / n``,
    ``W = (s t)^-1/2 (I - V diag(1 - sqrt(s t / (s t + (1 - s) lambda))) V.T)``. Milliseconds for a
    few shots, where an eigendecomposition of the 1280 x 1280 matrix takes most of a second.
    """
    data = embedded.double()
    means = torch.zeros(classes, data.shape[1], dtype=torch.float64).index_add_(0, labels, data)
    means /= torch.bincount(labels, minlength=classes).clamp_min(1)[:, None]
    residual = data - means[labels]
    width = data.shape[1]
    target = float((residual * residual).sum()) / len(labels) / width
    if target < 1e-12:
        return torch.eye(width)
    _, singular, vt = torch.linalg.svd(residual, full_matrices=False)
    floor = shrinkage * target
    shrink = 1 - torch.sqrt(floor / (floor + (1 - shrinkage) * singular**2 / len(labels)))
    whitening = (torch.eye(width, dtype=torch.float64) - (vt.t() * shrink) @ vt) / math.sqrt(floor)
    return whitening.float()


def prototypes_from(embedded: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """One unit-length prototype per class: the mean of its images' embeddings, normalised.

    Raises:
        ModelError: a class without any image.
    """
    counts = torch.bincount(labels, minlength=classes)
    if (counts == 0).any():
        missing = int((counts == 0).nonzero()[0])
        raise ModelError(f"class {missing} has no training image, so it has no prototype; give every class at least one image")
    sums = torch.zeros(classes, embedded.shape[1]).index_add_(0, labels, embedded.float())
    return l2_normalize(sums / counts[:, None])


def fit_head(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    classes: int,
    val_x: torch.Tensor | None = None,
    val_y: torch.Tensor | None = None,
    shrinkage: float = SHRINKAGE,
) -> PrototypeHead:
    """A prototype head from the training images' features (the scale fit on the validation ones)."""
    center = train_x.float().mean(0)
    centred = embed(train_x, center)
    whitening = whitening_from(centred, train_y, classes, shrinkage)
    prototypes = prototypes_from(l2_normalize(centred @ whitening), train_y, classes)
    head = PrototypeHead(center, whitening, prototypes, 10.0)
    if val_x is not None and val_y is not None and len(val_y):
        with torch.no_grad():
            head.scale.fill_(fit_scale(head.embed(val_x) @ prototypes.t(), val_y))
    return head


def fit_recorded(
    train_x: torch.Tensor, train_y: torch.Tensor, classes: int, val_x: torch.Tensor, val_y: torch.Tensor
) -> tuple[PrototypeHead, dict[str, Any]]:
    """:func:`fit_head`, and its record for ``metrics.json``: scale, whitening, images per class, seconds."""
    started = time.perf_counter()
    head = fit_head(train_x, train_y, classes, val_x, val_y)
    shots = torch.bincount(train_y, minlength=classes).tolist()
    return head, {"scale": float(head.scale), "whitened": head.whitens, "shots_per_class": shots, "seconds": time.perf_counter() - started}


def fit_scale(cosines: torch.Tensor, labels: torch.Tensor) -> float:
    """The cosine scale (a softmax temperature) with the lowest cross-entropy on ``cosines``.

    The scale never changes which class wins, so choosing it on validation images changes no
    top-1 figure: it only makes the probabilities honest.
    """
    losses = [float(nn.functional.cross_entropy(s * cosines, labels)) for s in SCALES]
    return float(SCALES[min(range(len(losses)), key=losses.__getitem__)])


def install_prototype_head(built: BuiltModel, head: nn.Module) -> None:
    """Put ``head`` where the model's classifier is.

    Raises:
        ModelError: the model has two heads (distilled) or a classifier that is not a Linear
            layer reading a feature vector.
    """
    if not isinstance(built.heads[0], PrototypeHead) or len(built.heads) != 1:
        one_linear_classifier(built, "a prototype head")
    swap_classifier(built, head)
