"""ONNX Runtime sessions as every part of edgetransfer opens them, and batched runs over a
model whose batch may be fixed. numpy and onnxruntime only.

Threads are explicit and idle threads do not spin by default: on small shared machines
spinning threads slow down everything else in the process, torch included.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from .errors import PredictorError, first_line

__all__ = [
    "session_options",
    "open_session",
    "cap_memory",
    "over_memory_cap",
    "write_optimized",
    "fixed_batch",
    "run_batched",
    "onnxruntime_builds",
    "mixed_builds",
]

# distributions that each install the same ``onnxruntime`` module
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml", "onnxruntime-qnn")


def onnxruntime_builds() -> dict[str, str]:
    """The ONNX Runtime distributions installed beside the ``onnxruntime`` module, with their
    versions: read from the ``.dist-info`` folders there, one directory listing (asking
    ``importlib.metadata`` for each name scans every installed package: 30 ms per Predictor)."""
    folder = _onnxruntime_folder()
    if folder is None:
        return {}
    found = {}
    for info in folder.glob("onnxruntime*.dist-info"):
        name, _, version = info.name.removesuffix(".dist-info").partition("-")
        found[name.lower().replace("_", "-")] = version
    return {name: found[name] for name in ORT_DISTRIBUTIONS if name in found}


def _onnxruntime_folder() -> Path | None:
    """The site-packages folder the ``onnxruntime`` module is imported from."""
    spec = find_spec("onnxruntime")
    return Path(spec.origin).parent.parent if spec is not None and spec.origin else None


def mixed_builds() -> str | None:
    """Why this environment's ONNX Runtime cannot be trusted, or ``None``: two builds of it
    installed together overwrite each other's files in one ``onnxruntime`` folder."""
    builds = onnxruntime_builds()
    if len(builds) < 2:
        return None
    listed = ", ".join(f"{name} {v}" for name, v in builds.items())
    keep = "onnxruntime-gpu" if "onnxruntime-gpu" in builds else next(iter(builds))
    return f"{listed} are installed together and overwrite each other's files; keep one: pip uninstall -y {' '.join(builds)} && pip install {keep}"


_MEMORY_CAP: list[int] = []  # this process's cap on ONNX Runtime's CPU memory, in bytes, once one is set
MAX_CAP_MB = 1 << 30
_REQUEST = re.compile(r"Available memory of (\d+) is smaller than requested bytes of (\d+)")


def cap_memory(megabytes: int) -> None:
    """Cap the CPU memory that the ONNX Runtime sessions this process opens from now on hold at
    once (weights and activations together, all sessions together): a shared arena with that
    ``max_mem`` (ONNX Runtime's ``create_and_register_allocator``; sessions opt in with
    ``session.use_env_allocators``). A model that asks for more is refused at that request, before
    the memory is taken. One cap per process; asking for the same one again does nothing.

    Raises:
        PredictorError: not a whole number of megabytes from 1 up, or another cap already set.
    """
    import onnxruntime as ort  # imported when a session is made: a broken install (two builds at once) must not stop the runtime saying so

    if isinstance(megabytes, bool) or not isinstance(megabytes, int) or not 1 <= megabytes <= MAX_CAP_MB:
        raise PredictorError(f"max_memory_mb must be a whole number of megabytes from 1 to {MAX_CAP_MB}, got {megabytes!r}")
    cap = megabytes << 20
    if _MEMORY_CAP:
        if _MEMORY_CAP[0] != cap:
            raise PredictorError(f"ONNX Runtime's memory in this process is already capped at {_MEMORY_CAP[0] >> 20} MB; one cap per process")
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg({"max_mem": cap, "arena_extend_strategy": 1}))
    _MEMORY_CAP.append(cap)


def over_memory_cap(exc: BaseException) -> str | None:
    """What to say when ``exc`` is ONNX Runtime refusing a request over the cap, else ``None``."""
    found = _REQUEST.search(str(exc))
    if found is None or not _MEMORY_CAP:
        return None
    return (
        f"the model asked ONNX Runtime for {int(found[2]) / 2**20:,.0f} MB at once, more than this process's cap of"
        f" {_MEMORY_CAP[0] >> 20:,} MB; a model that needs this much is hostile or too large for this machine (raise the cap only for a model you trust)"
    )


def session_options(threads: int | None = None, spinning: bool = False, optimized: bool = True):
    """``SessionOptions`` with ``threads`` intra-op threads (one inter-op thread when given) and
    spinning on or off; ``optimized=False`` turns ONNX Runtime's graph optimisation off, so that a
    QDQ model runs in its reference semantics (each DequantizeLinear, the float operator, then
    QuantizeLinear) instead of this CPU's integer kernels."""
    import onnxruntime as ort  # imported when a session is made: a broken install (two builds at once) must not stop the runtime saying so

    options = ort.SessionOptions()
    # fatal only: ONNX Runtime's coloured warnings (a model's external-data path, …) and its error
    # lines never reach the terminal; every error comes back as an exception, which is said once
    options.log_severity_level = 4
    if _MEMORY_CAP:
        options.add_session_config_entry("session.use_env_allocators", "1")
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
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
    optimized: bool = True,
):
    """An ``InferenceSession`` for ``model`` (a path or the model's bytes); ``optimized``: see
    :func:`session_options`.

    Raises:
        PredictorError: the file is missing or is not a model ONNX Runtime can load.
    """
    import onnxruntime as ort  # imported when a session is made: a broken install (two builds at once) must not stop the runtime saying so

    source: str | bytes = model if isinstance(model, bytes) else str(model)
    name = "<bytes>" if isinstance(model, bytes) else str(model)
    if not isinstance(model, bytes) and not Path(model).is_file():
        raise PredictorError(f"model not found: {name}")
    try:
        return ort.InferenceSession(source, sess_options=session_options(threads, spinning, optimized), providers=list(providers))
    except Exception as exc:  # InvalidProtobuf, Fail, NoSuchFile, InvalidGraph: all "not a usable model"
        raise PredictorError(f"cannot load model {name}: {over_memory_cap(exc) or first_line(exc)}") from exc


def write_optimized(
    model: str | os.PathLike | bytes, path: str | os.PathLike, *, portable: bool = False, disabled_optimizers: Sequence[str] = ()
) -> None:
    """ONNX Runtime's graph optimisation run offline: the graph a CPU session of ``model`` runs,
    written to ``path``. ``portable``: the extended level only, whose graph runs on any x86 CPU;
    else every optimisation, with this CPU's layouts (a graph to read, not to ship).

    Raises:
        PredictorError: the file is missing or is not a model ONNX Runtime can load.
    """
    import onnxruntime as ort  # imported when a session is made: a broken install (two builds at once) must not stop the runtime saying so

    options = session_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if portable else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(path)
    source: str | bytes = model if isinstance(model, bytes) else str(model)
    try:
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled_optimizers))
    except Exception as exc:  # InvalidProtobuf, Fail, NoSuchFile, InvalidGraph: all "not a usable model"
        raise PredictorError(f"cannot load model {'<bytes>' if isinstance(model, bytes) else model}: {first_line(exc)}") from exc


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
