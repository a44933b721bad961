"""Several tasks on one backbone: each task a name and its labelled images, split on its own.

A task's images come from an image folder (class subfolders, or ``train/``+``val/`` [+``test/``]),
an embedded data set (``digits``, ``faces``), or one column of a CSV file that labels a folder of
images for several tasks (an empty cell: the image is not labelled for that task). ``demo`` is
two embedded data sets, no download: scikit-learn's digits ("which digit") and scikit-image's
``lfw_subset`` ("face or not"), each image shown to the task it is labelled for.

Each task keeps its own seeded, stratified validation and test split (folders and embedded data
sets are different images per task). The tasks of one CSV file label the same images, so there
each image goes to the same split in every task: no task's test image trains the backbone
through another task.
"""

from __future__ import annotations

import csv
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .data import DEMO, FACES, Dataset, DataSpec, Sample, check_images, load_dataset
from .errors import DataError, OptionError
from .runtime.text import printable

__all__ = [
    "TaskSpec",
    "TASKS_DEMO",
    "MAX_TASKS",
    "HEADS",
    "parse_task",
    "tasks_option",
    "load_tasks",
    "check_task_name",
    "side_by_side",
    "with_weights",
    "with_heads",
]

TASKS_DEMO = "demo"
MAX_TASKS = 16
NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")  # a task's name is an ONNX output's name and a CSV column
IMAGE_COLUMN = "image"
MAX_CSV_ROWS = 10**7
MAX_WEIGHT = 1000.0
LINEAR, PROTOTYPE = "linear", "prototype"
HEADS = (LINEAR, PROTOTYPE)  # a task's head: a trained Linear layer, or class means of frozen features


@dataclass(frozen=True)
class TaskSpec:
    """One task: its name, where its images come from and how they are split.

    Attributes:
        name: lower-case letters, digits and ``_``, starting with a letter (an output's name).
        data: the task's images and split (``data.source``: a folder, an embedded data set, or a CSV file).
        column: the CSV column that labels the task (``None`` unless ``data.source`` is a CSV file).
        weight: the weight of the task's loss in full mode (the losses are summed); head mode needs none.
        head: ``linear`` (trained) or ``prototype`` (class means of the frozen features, no
            training; classes can be enrolled into the task where the model is deployed).
    """

    name: str
    data: DataSpec = field(default_factory=DataSpec)
    column: str | None = None
    weight: float = 1.0
    head: str = LINEAR

    def __post_init__(self) -> None:
        check_task_name(self.name)
        if not (isinstance(self.weight, (int, float)) and 0 < self.weight <= MAX_WEIGHT):
            raise OptionError(f"task {self.name}'s loss weight must be in (0, {MAX_WEIGHT}], got {printable(repr(self.weight))[:40]}")
        if self.head not in HEADS:
            raise OptionError(f"task {self.name}'s head must be one of {', '.join(HEADS)}, got {printable(repr(self.head))[:40]}")

    @property
    def prototype(self) -> bool:
        return self.head == PROTOTYPE

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "data": self.data.to_dict(), "column": self.column, "weight": self.weight, "head": self.head}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TaskSpec":
        weight, head = float(data.get("weight", 1.0)), str(data.get("head", LINEAR))
        return cls(str(data["name"]), DataSpec.from_dict(data["data"]), data.get("column"), weight, head)


def check_task_name(name: str) -> str:
    """Raises OptionError unless ``name`` can name a task (and so an output of the model)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        shown = printable(repr(name))[:60]
        raise OptionError(f"task name {shown} must be lower-case letters, digits and _, starting with a letter (at most 32)")
    return name


def parse_task(text: str, base: DataSpec | None = None) -> TaskSpec:
    """``NAME=FOLDER`` (or ``NAME=digits``, ``NAME=faces``) as a task split like ``base``.

    Raises:
        OptionError: no ``=``, or a name that cannot name a task.
    """
    name, sep, source = text.partition("=")
    if not sep or not source:
        raise OptionError(f"--task takes NAME=FOLDER (a folder of class subfolders), got {printable(text)[:80]!r}")
    return TaskSpec(check_task_name(name.strip()), replace(base or DataSpec(), source=source))


def with_weights(tasks: tuple[TaskSpec, ...], weights: tuple[str, ...]) -> tuple[TaskSpec, ...]:
    """``--task-weight NAME=W`` applied to the tasks.

    Raises:
        OptionError: not NAME=NUMBER, or a name that is not a task.
    """
    given = _per_task("--task-weight", "NAME=NUMBER", weights, tasks, float)
    return tuple(replace(task, weight=given.get(task.name, task.weight)) for task in tasks)


def with_heads(tasks: tuple[TaskSpec, ...], heads: tuple[str, ...]) -> tuple[TaskSpec, ...]:
    """``--task-head NAME=linear|prototype`` applied to the tasks.

    Raises:
        OptionError: not NAME=HEAD with a known head, or a name that is not a task.
    """

    def head(value: str) -> str:
        if value.strip() not in HEADS:
            raise ValueError(value)
        return value.strip()

    given = _per_task("--task-head", f"NAME={'|'.join(HEADS)}", heads, tasks, head)
    return tuple(replace(task, head=given.get(task.name, task.head)) for task in tasks)


def _per_task(option: str, form: str, texts: tuple[str, ...], tasks: tuple[TaskSpec, ...], convert) -> dict[str, Any]:
    """``option``'s ``NAME=VALUE`` texts as {task name: converted value}.

    Raises:
        OptionError: a text not of ``form`` (``convert`` raised ValueError), or a name that is not a task.
    """
    given: dict[str, Any] = {}
    for text in texts:
        name, sep, value = text.partition("=")
        try:
            given[name.strip()] = convert(value)
        except ValueError:
            sep = ""
        if not sep:
            raise OptionError(f"{option} takes {form}, got {printable(text)[:80]!r}")
    unknown = sorted(set(given) - {t.name for t in tasks})
    if unknown:
        raise OptionError(f"{option} names {printable(', '.join(unknown))[:80]}, which is not a task; the tasks: {', '.join(t.name for t in tasks)}")
    return given


def tasks_option(value: str, base: DataSpec | None = None) -> tuple[TaskSpec, ...]:
    """``--tasks``: ``demo`` or a CSV file (``image`` column, then one column per task).

    Raises:
        OptionError: neither ``demo`` nor a readable CSV file with task columns.
    """
    base = base or DataSpec()
    if value == TASKS_DEMO:
        return (TaskSpec("digit", replace(base, source=DEMO)), TaskSpec("face", replace(base, source=FACES)))
    path = Path(value).expanduser()
    if not path.is_file():
        raise OptionError(f"--tasks takes 'demo' or a CSV file of labels; {printable(value)[:120]} is not a file")
    header = _header(path)
    if IMAGE_COLUMN not in header or len(header) < 2:
        raise OptionError(f"{path} needs an '{IMAGE_COLUMN}' column (paths relative to the file) and one column per task; it has {header[:8]}")
    columns = [c for c in header if c != IMAGE_COLUMN]
    return tuple(TaskSpec(check_task_name(c), replace(base, source=str(path)), column=c) for c in columns)


def _header(path: Path) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8") as file:
            return [c.strip() for c in next(csv.reader(file), [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise OptionError(f"cannot read {path} as a CSV file: {exc}") from exc


def load_tasks(tasks: tuple[TaskSpec, ...], workers: int = 4) -> dict[str, Dataset]:
    """Each task's images, checked and split.

    Raises:
        DataError: as :func:`~edgetransfer.data.load_dataset`, naming the task; or two tasks of one name.
    """
    if len({t.name for t in tasks}) != len(tasks):
        raise DataError(f"two tasks share a name: {[t.name for t in tasks]}; give each task its own")
    loaded = {}
    for task in tasks:
        try:
            loaded[task.name] = _csv_task(task, workers) if task.column else load_dataset(task.data, workers)
        except DataError as exc:
            raise DataError(f"task {task.name}: {exc}") from exc
    return loaded


def _csv_task(task: TaskSpec, workers: int) -> Dataset:
    """The images that ``task.column`` labels, split by image (:func:`_by_image`)."""
    path = Path(task.data.source)
    rows = _rows(path)
    labelled = [((row.get(IMAGE_COLUMN) or "").strip(), (row.get(task.column or "") or "").strip()) for row in rows]
    labelled = [(image, label) for image, label in labelled if image and label]
    classes = sorted({label for _, label in labelled})
    if len(classes) < 2:
        raise DataError(f"column {task.column!r} of {path} labels {len(classes)} class(es); a task needs at least two")
    index = {name: i for i, name in enumerate(classes)}
    root = path.parent.resolve()
    samples = []
    for image, label in labelled:
        file = (root / image).resolve()
        if not file.is_relative_to(root):
            raise DataError(f"{path}: image {printable(image)[:80]!r} lies outside the CSV file's folder; give paths inside it")
        samples.append(Sample(str(file), index[label], image))
    good, skipped = check_images(samples, task.data.strict, workers)
    dataset = _by_image(task.data, classes, good)
    dataset.skipped = skipped
    return dataset


def _by_image(spec: DataSpec, classes: list[str], samples: list[Sample]) -> Dataset:
    """One CSV file labels the same images for several tasks, so each image goes to the same
    split in every task: its split is drawn from the seed and its name alone. Otherwise one
    task's test image could be another's training image, and a backbone trained in full mode
    would have seen it. Each task still needs training images of every class and some
    validation images.

    Raises:
        DataError: a class with no training image, or a task with no validation image.
    """
    parts: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    for sample in samples:
        draw = random.Random(f"{spec.seed}:{sample.name}").random()
        parts["test" if draw < spec.test_fraction else "val" if draw < spec.test_fraction + spec.val_fraction else "train"].append(sample)
    counts = {label: sum(s.label == label for s in parts["train"]) for label in range(len(classes))}
    if not parts["val"] or not all(counts.values()):
        empty = [classes[label] for label, count in counts.items() if not count]
        what = f"no training image of {', '.join(empty)}" if empty else "no validation image"
        raise DataError(f"split by image, the task has {what}; label more images, or change --val-fraction/--test-fraction or --seed")
    return Dataset(classes, parts["train"], parts["val"], "csv (split by image)", test=parts["test"])


def _rows(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as file:
            rows: list[dict[str, str]] = []
            reader = csv.DictReader(file)
            reader.fieldnames = [c.strip() for c in reader.fieldnames or []]
            for row in reader:
                rows.append(row)
                if len(rows) > MAX_CSV_ROWS:
                    raise DataError(f"{path} has more than {MAX_CSV_ROWS} rows")
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path} as a CSV file: {exc}") from exc


def side_by_side(datasets: dict[str, Dataset]) -> Dataset:
    """Every task's images as one data set whose classes are every ``task:class`` (the order of a
    multi-task model's side-by-side logits): an image's label says its task and its class, so
    every later stage (parity, calibration, the guard, accuracy) sees each task's images."""
    classes: list[str] = []
    splits: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    skipped = []
    for name, dataset in datasets.items():
        offset = len(classes)
        classes += [f"{name}:{label}" for label in dataset.classes]
        for split_name, samples in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test)):
            splits[split_name] += [replace(s, label=s.label + offset, name=f"{name}/{s.name}") for s in samples]
        skipped += dataset.skipped
    return Dataset(classes, splits["train"], splits["val"], "tasks", skipped, splits["test"])
