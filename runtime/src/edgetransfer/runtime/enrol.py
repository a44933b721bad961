"""Enrolment into a model file: ``edgetransfer-runtime enrol`` (and ``edgetransfer enrol``) through
:class:`~edgetransfer.runtime.Predictor`, written atomically to a checked output path."""

from __future__ import annotations

import os
import time
from dataclasses import replace as replace_field
from pathlib import Path
from typing import Any

from .enrolment import Enrolment
from .errors import PredictorError
from .metadata import verify_recorded
from .predictor import Predictor

__all__ = ["enrol_file", "writable_output"]


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
    task: str | None = None,
) -> tuple[Enrolment, Path]:
    """Enrol ``label`` from ``images`` into the model file (or ``remove`` it), into ``task`` for a
    multi-task model (default: its one prototype task), and write the result atomically to
    :func:`writable_output`'s path. On any error no file is written or changed.

    Returns:
        What was done, and the file written.
    """
    model = Path(model)
    target = writable_output(model, Path(output) if output is not None else None, in_place)
    predictor = Predictor(model, threads=threads)
    done = predictor.remove(label, task=task) if remove else predictor.enrol(label, list(images or []), replace=replace, task=task)
    started = time.perf_counter()
    predictor.save(target)
    return replace_field(done, seconds=done.seconds + time.perf_counter() - started), target


def writable_output(model: Path, output: Path | None, in_place: bool) -> Path:
    """Where an enrolment of ``model`` goes: ``output``, the model itself with ``in_place``, or
    ``<stem>-enrolled<suffix>`` beside it; checked before any work, so that a refusal costs nothing.

    Raises:
        PredictorError: both ``output`` and ``in_place``; the default copy exists already; the
            model is recorded in a run's manifest (in place would break its sha256); the folder
            or file is not writable.
    """
    if output is not None and in_place:
        raise PredictorError("give either an output path or in_place, not both")
    if in_place:
        if verify_recorded(model) is not None:
            raise PredictorError(
                f"{model} is recorded in its run's manifest, and changing it in place would break the"
                " sha256 recorded there; write a copy (--output PATH) instead"
            )
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
    if target.exists() and not target.is_symlink() and not target.is_file():
        raise PredictorError(f"{target} exists and is not a regular file (a device, a pipe or a folder); choose another --output")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise PredictorError(f"cannot write {target}: permission denied; choose another --output")
    return target
