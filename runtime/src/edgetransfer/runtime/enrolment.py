"""Enrolment: add, replace or remove a class of a prototype model where it is deployed.

A model exported from ``edgetransfer finetune --mode prototype`` ends in
``logits = Gemm(features, prototypes, alpha=scale, transB=1)``: ``features`` (a second output)
are the backbone's features centred and L2-normalised, and the initializer
``edgetransfer.prototypes`` holds one unit-length row per class. A class's prototype is the
normalised mean of its images' features, so enrolling is one forward pass over a few images and
one row of that matrix: no training, no torch, no ``onnx`` package. The file is rewritten with
only that tensor, the labels and an enrolment record changed (:mod:`.wire`), and a model that
was quantised keeps its prototype matrix in float.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import wire
from .errors import PredictorError

__all__ = ["PROTOTYPES", "FEATURES", "ENROLMENT_KEY", "Enrolment", "prototype_of", "check_label", "enrolled_model", "image_record"]

PROTOTYPES = "edgetransfer.prototypes"  # the initializer: one row per class
FEATURES = "features"  # the graph output enrolment reads
ENROLMENT_KEY = "edgetransfer.enrolment"  # metadata: a JSON list of what was enrolled, in order
MAX_LABEL = 200


@dataclass(frozen=True)
class Enrolment:
    """What one enrolment did."""

    action: str  # "add", "replace" or "remove"
    label: str
    images: int
    classes: int  # how many the model has now
    seconds: float
    recognised: int  # of its own images, how many the new model gives the class (0 for a removal)


def prototype_of(features: np.ndarray) -> np.ndarray:
    """The unit-length mean of normalised feature rows.

    Raises:
        PredictorError: the features cancel out (a mean of length ~0), so no direction is left.
    """
    mean = np.asarray(features, dtype=np.float64).mean(axis=0)
    norm = float(np.linalg.norm(mean))
    if not np.isfinite(norm) or norm < 1e-6:
        raise PredictorError("these images' features cancel out (their mean has no direction); enrol images of one kind of thing")
    return (mean / norm).astype(np.float32)


def check_label(label: object) -> str:
    """A label that can be stored and printed.

    Raises:
        PredictorError: not a string, empty, too long, or holding control characters.
    """
    if not isinstance(label, str) or not label.strip():
        raise PredictorError(f"a label must be a non-empty string, got {label!r}"[:200])
    if len(label) > MAX_LABEL or not label.isprintable():
        raise PredictorError(f"a label must be at most {MAX_LABEL} printable characters (no newlines or terminal escapes)")
    return label


def image_record(image: Any, index: int) -> dict[str, str]:
    """A name and sha256 for an image given to enrol: a file's bytes, encoded bytes, or pixels."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            return {"name": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        except OSError:
            return {"name": path.name, "sha256": ""}  # the decoder reports the unreadable file
    if isinstance(image, bytes):
        return {"name": f"<bytes {index}>", "sha256": hashlib.sha256(image).hexdigest()}
    pixels = np.asarray(image)
    return {"name": f"<pixels {index}>", "sha256": hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()}


def enrolled_model(model: bytes, labels: list[str], matrix: np.ndarray, record: dict[str, Any]) -> bytes:
    """``model`` with ``matrix`` as its prototypes, ``labels`` as its labels and ``record`` appended
    to its enrolment history; every other byte as it was."""
    updated = wire.replace_initializer(model, PROTOTYPES, matrix)
    props = wire.metadata(updated)
    history = _history(props)
    props["labels"] = json.dumps(labels)
    props[ENROLMENT_KEY] = json.dumps([*history, record])
    return wire.with_metadata(updated, props)


def _history(props: dict[str, str]) -> list[Any]:
    try:
        history = json.loads(props.get(ENROLMENT_KEY, "[]"))
    except ValueError:
        history = []
    return history if isinstance(history, list) else []


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
