"""The fine-tuned model on disk: weights plus everything needed to rebuild and feed it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import RunError
from .models import BuiltModel, build
from .prototype import PrototypeHead, install_prototype_head
from .qat_scheme import restore
from .runtime.files import write_bytes
from .runtime.preprocessing import Preprocessing
from .safeload import safe_load
from .taskheads import install_task_heads

__all__ = ["save_checkpoint", "load_checkpoint", "FORMAT"]

FORMAT = "edgetransfer.checkpoint/1"


def save_checkpoint(path: str | Path, built: BuiltModel, classes: list[str], **extra: Any) -> Path:
    """Atomically write the model, its architecture, classes and preprocessing to ``path``."""
    payload = {
        "format": FORMAT,
        "arch": built.arch.name,
        "weights": built.weights,
        "num_classes": built.num_classes,
        "classes": list(classes),
        "preprocessing": built.preprocessing.to_dict(),
        "state_dict": _cpu_state(built.module),
        **extra,
    }
    return write_bytes(path, lambda f: torch.save(payload, f))


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict on CPU, keeping its ``_metadata`` (some modules, mnasnet among them,
    read their version from it when loading)."""
    state = module.state_dict()
    cpu = type(state)((k, v.detach().cpu()) for k, v in state.items())
    setattr(cpu, "_metadata", getattr(state, "_metadata", None))  # noqa: B010  (an OrderedDict attribute torch reads)
    return cpu


def load_checkpoint(path: str | Path) -> tuple[BuiltModel, dict[str, Any]]:
    """Rebuild the model saved at ``path`` (CPU, eval mode) and return it with the payload.

    Raises:
        RunError: the file is missing, not an edgetransfer checkpoint, or inconsistent.
    """
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint not found: {path} (run edgetransfer finetune first)")
    payload = safe_load(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise RunError(f"{path} is not an edgetransfer checkpoint (format {FORMAT})")
    if len(payload["classes"]) != payload["num_classes"]:
        raise RunError(f"{path}: {len(payload['classes'])} class names for a {payload['num_classes']}-class classifier")
    pre = Preprocessing.from_dict(payload["preprocessing"])
    built = build(payload["arch"], payload["num_classes"], weights="none", image_size=pre.input_size)
    built.preprocessing = pre
    built.weights = payload["weights"]
    if "tasks" in payload:  # one head per task where the classifier was
        _install_tasks(built, path, payload)
    if payload.get("head") == "prototype":
        width = payload["state_dict"].get(_prototype_key(built), torch.zeros(0, 0)).shape[-1]
        install_prototype_head(built, PrototypeHead.empty(width, payload["num_classes"]))
    if "qat" in payload:  # fake-quantised: BatchNorm folded and quantizers in place before the state fits
        restore(built, payload)
    try:
        built.module.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise RunError(f"{path} does not fit {payload['arch']}: {str(exc).splitlines()[0]}") from exc
    built.module.eval()
    return built, payload


def _install_tasks(built: BuiltModel, path: Path, payload: dict[str, Any]) -> None:
    """A Linear head per task, and an empty prototype head (of the right shapes) for each task
    the checkpoint names in ``task_heads`` as a prototype task."""
    sizes = [len(labels) for labels in _tasks(path, payload)]
    heads = install_task_heads(built, sizes)
    kinds = payload.get("task_heads") or {}
    if not isinstance(kinds, dict) or set(kinds) - set(payload["tasks"]) or not set(kinds.values()) <= {"linear", "prototype"}:
        raise RunError(f"{path}: its task_heads are not a mapping of its tasks to linear or prototype")
    for index, name in enumerate(payload["tasks"]):
        if kinds.get(name) == "prototype":
            heads.heads[index] = PrototypeHead.empty(heads.width, sizes[index])


def _tasks(path: Path, payload: dict[str, Any]) -> list[list[str]]:
    """A multi-task checkpoint's classes per task, checked against its class list.

    Raises:
        RunError: tasks that are not a mapping of names to class lists adding up to its classes.
    """
    tasks = payload["tasks"]
    if not isinstance(tasks, dict) or not all(isinstance(v, list) and len(v) >= 2 for v in tasks.values()):
        raise RunError(f"{path}: its tasks are not a mapping of task names to two or more classes each")
    if sum(len(v) for v in tasks.values()) != payload["num_classes"]:
        raise RunError(f"{path}: its tasks' classes do not add up to its {payload['num_classes']}-class classifier")
    return list(tasks.values())


def _prototype_key(built: BuiltModel) -> str:
    """The state_dict key of the prototype matrix: where the model's classifier sits, plus ``.prototypes``."""
    head = built.heads[0]
    name = next(name for name, module in built.module.named_modules() if module is head)
    return f"{name}.prototypes"
