"""Enrolment: add, replace or remove a class of a prototype model where it is deployed.

A model exported from ``edgetransfer finetune --mode prototype`` ends in
``logits = Gemm(features, prototypes, alpha=scale, transB=1)``: ``features`` (a second output)
are the backbone's features centred and L2-normalised, and the initializer
``edgetransfer.prototypes`` holds one unit-length row per class. A class's prototype is the
normalised mean of its images' features, so enrolling is one forward pass over a few images and
one row of that matrix: no training, no torch, no ``onnx`` package. The file is rewritten with
only that tensor, the labels and an enrolment record changed (:mod:`.wire`), and a model that
was quantised keeps its prototype matrix in float.

A multi-task model can have prototype tasks: task ``T``'s features are the output ``features_T``
and its prototypes the initializer ``edgetransfer.prototypes.T``; enrolling into ``T`` changes
that tensor, ``T``'s labels in the ``tasks`` metadata and the flat ``labels``, and no other task.
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
from .tasks import Tasks

__all__ = [
    "PROTOTYPES",
    "FEATURES",
    "ENROLMENT_KEY",
    "Enrolment",
    "PrototypeHead",
    "prototype_head",
    "features_of",
    "prototypes_of",
    "prototype_of",
    "check_label",
    "enrolled_model",
    "image_record",
]

PROTOTYPES = "edgetransfer.prototypes"  # the initializer: one row per class
FEATURES = "features"  # the graph output enrolment reads
ENROLMENT_KEY = "edgetransfer.enrolment"  # metadata: a JSON list of what was enrolled, in order
MAX_LABEL = 200


def features_of(task: str | None) -> str:
    """The output of a prototype head's features: ``features``, or ``features_TASK`` for a task's."""
    return FEATURES if task is None else f"{FEATURES}_{task}"


def prototypes_of(task: str | None) -> str:
    """The initializer of a prototype head's matrix: :data:`PROTOTYPES`, or ``PROTOTYPES.TASK``."""
    return PROTOTYPES if task is None else f"{PROTOTYPES}.{task}"


@dataclass(frozen=True)
class Enrolment:
    """What one enrolment did."""

    action: str  # "add", "replace" or "remove"
    label: str
    images: int
    classes: int  # how many the model has now
    seconds: float
    recognised: int  # of its own images, how many the new model gives the class (0 for a removal)
    task: str | None = None  # the task enrolled into (a multi-task model)


@dataclass(frozen=True)
class PrototypeHead:
    """Where a model's prototype head is: its task (``None`` for a one-task model), its labels,
    and the model's tasks (``None`` for one task)."""

    task: str | None
    labels: tuple[str, ...]
    tasks: Tasks | None = None

    @property
    def features(self) -> str:
        return features_of(self.task)

    @property
    def initializer(self) -> str:
        return prototypes_of(self.task)

    @property
    def named(self) -> dict[str, str]:
        """The task, for an enrolment record (nothing for a one-task model)."""
        return {} if self.task is None else {"task": self.task}

    def metadata(self, labels: list[str]) -> dict[str, str]:
        """The model's label metadata with this head's labels now ``labels``."""
        if self.tasks is None:
            return {"labels": json.dumps(labels)}
        names, all_labels = self.tasks.names, list(self.tasks.labels)
        all_labels[names.index(self.task)] = tuple(labels)
        tasks = Tasks(names, tuple(all_labels))
        return {"labels": json.dumps(list(tasks.flat_labels)), "tasks": tasks.to_json()}


def prototype_head(labels: tuple[str, ...], tasks: Tasks | None, outputs: list[str], task: str | None) -> PrototypeHead:
    """The prototype head to enrol into: the model's (one task), or task ``task``'s (``None``: its
    one prototype task).

    Raises:
        PredictorError: no prototype head; a task named for a one-task model; an unknown task, a
            task with a trained head, or no task named where several have prototype heads.
    """
    none = "this model has no prototype head, so it cannot enrol classes: only models made with 'edgetransfer finetune --mode prototype'"
    if tasks is None:
        if task is not None:
            raise PredictorError(f"this model has one task, so there is no task to choose; drop the task ({task[:40]!r})")
        if FEATURES not in outputs:
            raise PredictorError(none + " (or a task's --task-head NAME=prototype) and exported to ONNX (any precision) can")
        return PrototypeHead(None, labels)
    heads = [name for name in tasks.names if features_of(name) in outputs]
    if task is None and len(heads) != 1:
        raise PredictorError(
            f"this model's tasks ({', '.join(tasks.names)}) have no prototype head; a task made with --task-head NAME=prototype can enrol classes"
            if not heads
            else f"this model has several prototype tasks ({', '.join(heads)}); say which to enrol into (--task NAME)"
        )
    task = heads[0] if task is None else task
    if task not in tasks.names:
        raise PredictorError(f"this model has no task {task[:40]!r}; its tasks: {', '.join(tasks.names)}")
    if task not in heads:
        raise PredictorError(
            f"task {task}'s head was trained (Linear), so it cannot enrol classes; only a prototype task can ({', '.join(heads) or 'none here'})"
        )
    return PrototypeHead(task, tasks.labels[tasks.names.index(task)], tasks)


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


def enrolled_model(model: bytes, initializer: str, matrix: np.ndarray, labels: dict[str, str], record: dict[str, Any]) -> bytes:
    """``model`` with ``matrix`` as its prototype ``initializer``, the metadata in ``labels``
    (``labels``, and ``tasks`` for a multi-task model) replaced and ``record`` appended to its
    enrolment history; every other byte as it was."""
    updated = wire.replace_initializer(model, initializer, matrix)
    props = wire.metadata(updated)
    history = _history(props)
    props.update(labels)
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
