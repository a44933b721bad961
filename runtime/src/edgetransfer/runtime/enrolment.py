"""Enrolment: add, replace or remove a class of a prototype model where it is deployed.

A model exported from ``edgetransfer finetune --mode prototype`` ends in
``logits = Gemm(features, prototypes, alpha=scale, transB=1)``: ``features`` (a second output)
are the backbone's features centred and L2-normalised, and the initializer
``edgetransfer.prototypes`` holds one unit-length row per class. A class's prototype is the
normalised mean of its images' features, so enrolling is one forward pass over a few images and
one row of that matrix: no training, no torch, no ``onnx`` package. The file is rewritten with
only that tensor, the labels and an enrolment record changed (:mod:`._wire`), and a model that
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

from . import _wire
from .errors import PredictorError

__all__ = ["PROTOTYPES", "FEATURES", "ENROLMENT_KEY", "Enrolment", "enrol_file", "prototype_of", "check_label", "enrolled_model",
           "image_record", "writable_output"]

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
    updated = _wire.replace_initializer(model, PROTOTYPES, matrix)
    props = _wire.metadata(updated)
    history = _history(props)
    props["labels"] = json.dumps(labels)
    props[ENROLMENT_KEY] = json.dumps([*history, record])
    return _wire.with_metadata(updated, props)


def _history(props: dict[str, str]) -> list[Any]:
    try:
        history = json.loads(props.get(ENROLMENT_KEY, "[]"))
    except ValueError:
        history = []
    return history if isinstance(history, list) else []


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def enrol_file(
    model: str | os.PathLike,
    label: str,
    images: list[Any] | None = None,
    *,
    remove: bool = False,
    replace: bool = False,
    output: str | os.PathLike | None = None,
    in_place: bool = False,
    threads: int | None = None,
) -> tuple[Enrolment, Path]:
    """Enrol ``label`` from ``images`` into the model file (or ``remove`` it), and write the result
    atomically to :func:`writable_output`'s path. On any error no file is written or changed.

    Returns:
        What was done, and the file written.
    """
    from ._predictor import Predictor

    model = Path(model)
    target = writable_output(model, Path(output) if output is not None else None, in_place)
    predictor = Predictor(model, threads=threads)
    done = predictor.remove(label) if remove else predictor.enrol(label, list(images or []), replace=replace)
    started = time.perf_counter()
    predictor.save(target)
    return Enrolment(done.action, done.label, done.images, done.classes, done.seconds + time.perf_counter() - started,
                     done.recognised), target


def writable_output(model: Path, output: Path | None, in_place: bool) -> Path:
    """Where an enrolment of ``model`` goes: ``output``, the model itself with ``in_place``, or
    ``<stem>-enrolled<suffix>`` beside it; checked before any work, so that a refusal costs nothing.

    Raises:
        PredictorError: both ``output`` and ``in_place``; the default copy exists already; the
            model is recorded in a run's manifest (in place would break its sha256); the folder
            or file is not writable.
    """
    from ._predictor import verify_recorded

    if output is not None and in_place:
        raise PredictorError("give either an output path or in_place, not both")
    if in_place:
        if verify_recorded(model) is not None:
            raise PredictorError(f"{model} is recorded in its run's manifest, and changing it in place would break the"
                                 " sha256 recorded there; write a copy (--output PATH) instead")
        target = model
    elif output is not None:
        target = Path(output)
    else:
        target = model.with_name(f"{model.stem}-enrolled{model.suffix}")
        if target.exists():
            raise PredictorError(f"{target} exists already; enrol into it with --in-place, or choose --output PATH")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise PredictorError(f"cannot write {target}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise PredictorError(f"cannot write {target}: permission denied; choose another --output")
    return target
