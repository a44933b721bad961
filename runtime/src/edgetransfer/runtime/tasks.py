"""The tasks of a multi-task model: several classifiers on one backbone, one pass.

A multi-task model's first output (``logits``) holds every task's logits side by side, task
after task; one more output per task (``logits_<task>``) holds that task's alone. Its metadata
(``tasks``) names the tasks and their labels, in that order; ``labels`` lists every
``task:label``, so that the first output fits the labels as it does for one task.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import PredictorError

__all__ = ["Tasks", "TASK_OUTPUT", "MASKED"]

TASK_OUTPUT = "logits_{task}"
MASKED = np.float32(-1e30)  # a logit no task's class can reach: the columns of another task


@dataclass(frozen=True)
class Tasks:
    """Task names and each task's labels, in the order of the logits."""

    names: tuple[str, ...]
    labels: tuple[tuple[str, ...], ...]

    @property
    def slices(self) -> list[slice]:
        """The columns of each task in the side-by-side logits."""
        starts = np.cumsum([0, *map(len, self.labels)])
        return [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:], strict=True)]

    @property
    def outputs(self) -> list[str]:
        """The names of the graph's per-task outputs, after its first (``logits``)."""
        return [TASK_OUTPUT.format(task=name) for name in self.names]

    @property
    def flat_labels(self) -> tuple[str, ...]:
        return tuple(f"{name}:{label}" for name, labels in zip(self.names, self.labels, strict=True) for label in labels)

    def to_json(self) -> str:
        return json.dumps([{"name": name, "labels": list(labels)} for name, labels in zip(self.names, self.labels, strict=True)])

    @classmethod
    def from_json(cls, text: str, flat_labels: Sequence[str]) -> "Tasks":
        """Parse a model's ``tasks`` metadata; it must list exactly the model's ``labels``.

        Raises:
            PredictorError: not a list of {name, labels} with two or more labels each, or tasks
                that do not add up to the labels.
        """
        problem = "the model's tasks metadata must be a list of {name, labels} with two or more labels each"
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise PredictorError(f"{problem} ({exc})") from exc
        if not isinstance(value, list) or len(value) < 2:
            raise PredictorError(problem)
        names, labels = [], []
        for entry in value:
            ok = isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("labels"), list)
            if not ok or len(entry["labels"]) < 2 or not all(isinstance(label, str) for label in entry["labels"]):
                raise PredictorError(problem)
            names.append(entry["name"])
            labels.append(tuple(entry["labels"]))
        tasks = cls(tuple(names), tuple(labels))
        if len(set(names)) != len(names) or tasks.flat_labels != tuple(flat_labels):
            raise PredictorError("the model's tasks metadata does not match its labels; its metadata belongs to another model: export again")
        return tasks

    def split(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        """Each task's columns of side-by-side logits."""
        return {name: logits[:, columns] for name, columns in zip(self.names, self.slices, strict=True)}

    def task_of(self, labels: np.ndarray) -> np.ndarray:
        """The task (its index) of each row, from its label's position among the flat labels."""
        ends = np.cumsum([len(group) for group in self.labels])
        return np.searchsorted(ends, np.asarray(labels), side="right")

    def masked(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """``logits`` with every column outside each row's own task at :data:`MASKED`: the argmax of
        a row is then its task's top-1, and top-1 against the flat labels is the task's top-1."""
        keep = np.zeros(logits.shape, dtype=bool)
        rows = self.task_of(labels)
        for index, columns in enumerate(self.slices):
            keep[rows == index, columns] = True
        return np.where(keep, logits, MASKED).astype(logits.dtype, copy=False)
