"""ONNX Runtime sessions as every part of edgetransfer opens them, and batched runs over a
model whose batch may be fixed. numpy and onnxruntime only.

Threads are explicit and idle threads do not spin by default: on small shared machines
spinning threads slow down everything else in the process, torch included.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .errors import PredictorError, first_line

__all__ = ["session_options", "open_session", "fixed_batch", "run_batched", "onnxruntime_builds", "mixed_builds"]

# distributions that each install the same ``onnxruntime`` module
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml", "onnxruntime-qnn")


def onnxruntime_builds() -> dict[str, str]:
    """The ONNX Runtime distributions installed here, with their versions."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ORT_DISTRIBUTIONS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def mixed_builds() -> str | None:
    """Why this environment's ONNX Runtime cannot be trusted, or ``None``: two builds of it
    installed together overwrite each other's files in one ``onnxruntime`` folder."""
    builds = onnxruntime_builds()
    if len(builds) < 2:
        return None
    listed = ", ".join(f"{name} {v}" for name, v in builds.items())
    keep = "onnxruntime-gpu" if "onnxruntime-gpu" in builds else next(iter(builds))
    return (f"{listed} are installed together and overwrite each other's files; keep one: pip uninstall -y"
            f" {' '.join(builds)} && pip install {keep}")


def session_options(threads: int | None = None, spinning: bool = False):
    """``SessionOptions`` with ``threads`` intra-op threads (one inter-op thread when given) and
    spinning on or off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


def open_session(
    model: str | os.PathLike | bytes,
    providers: Sequence[str | tuple[str, dict]] = ("CPUExecutionProvider",),
    threads: int | None = None,
    spinning: bool = False,
):
    """An ``InferenceSession`` for ``model`` (a path or the model's bytes).

    Raises:
        PredictorError: the file is missing or is not a model ONNX Runtime can load.
    """
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    name = "<bytes>" if isinstance(model, bytes) else source
    if not isinstance(model, bytes) and not Path(source).is_file():
        raise PredictorError(f"model not found: {source}")
    try:
        return ort.InferenceSession(source, sess_options=session_options(threads, spinning), providers=list(providers))
    except Exception as exc:  # InvalidProtobuf, Fail, NoSuchFile, InvalidGraph: all "not a usable model"
        raise PredictorError(f"cannot load model {name}: {first_line(exc)}") from exc


def fixed_batch(session) -> int | None:
    """The batch size a session's first input is fixed to, or ``None`` when it is dynamic."""
    dim = session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) and dim > 0 else None


def run_batched(run: Callable[[np.ndarray], np.ndarray], arrays: np.ndarray, batch: int, fixed: int | None = None) -> np.ndarray:
    """``run`` over ``arrays`` in batches of ``batch`` (of ``fixed`` for a static-batch model,
    the last one padded with copies of its last item and the padding dropped from the output)."""
    step = fixed or batch
    outputs = []
    for start in range(0, len(arrays), step):
        chunk = arrays[start : start + step]
        count = len(chunk)
        if fixed and count < fixed:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - count, axis=0)])
        outputs.append(run(chunk)[:count])
    return np.concatenate(outputs)
