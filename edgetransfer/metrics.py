"""Classification metrics on numpy arrays (shared by finetune, export checks and bench)."""

from __future__ import annotations

import numpy as np

__all__ = ["topk_accuracy", "confusion_matrix", "per_class_accuracy", "wilson_interval"]


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Share of rows whose label is among the ``k`` highest logits (k is capped at the classes)."""
    if len(labels) == 0:
        return float("nan")
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def confusion_matrix(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``m[true, predicted]`` counts."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def per_class_accuracy(matrix: np.ndarray) -> np.ndarray:
    """Recall per class from a confusion matrix (NaN for a class with no samples)."""
    totals = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(matrix) / np.maximum(totals, 1), np.nan)


def wilson_interval(right: int, images: int, z: float = 1.96) -> tuple[float, float]:
    """The ``z`` (95%) Wilson score interval of a top-1 of ``right`` out of ``images``, in points:
    honest for few images and for top-1 near 0 or 100, where the normal approximation is not."""
    if images <= 0:
        return float("nan"), float("nan")
    p = right / images
    centre = (p + z * z / (2 * images)) / (1 + z * z / images)
    half = z * np.sqrt(p * (1 - p) / images + z * z / (4 * images * images)) / (1 + z * z / images)
    return round(float(100 * (centre - half)), 3), round(float(100 * (centre + half)), 3)
