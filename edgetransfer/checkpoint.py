"""The fine-tuned model on disk: weights plus everything needed to rebuild and feed it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ._io import write_bytes
from .errors import EdgeTransferError, RunError, first_line
from .models import BuiltModel, build
from .preprocessing import Preprocessing

__all__ = ["save_checkpoint", "load_checkpoint", "safe_load", "FORMAT"]

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
    cpu._metadata = getattr(state, "_metadata", None)
    return cpu


def safe_load(path: str | Path, error: type[EdgeTransferError] = RunError) -> Any:
    """``torch.load`` that never runs code: tensors, numbers, strings and containers only.

    Every file edgetransfer reads goes through here. A pickle that asks for anything else (a
    planted ``__reduce__`` included) is refused without being run, and the message does not
    repeat torch's advice to turn the weights-only check off.

    Raises:
        error: the file is missing, truncated or corrupt, or holds more than tensors and plain values.
    """
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise error(f"file not found: {path}") from exc
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc):  # torch names the global it refused; anything else is not a torch file
            raise error(f"cannot read {path}: it is not a file torch saved ({first_line(exc)})") from exc
        raise error(f"{path} holds Python objects besides tensors and plain values; edgetransfer loads neither"
                    " those nor files that need them. Use a file of tensors (a state_dict), or rebuild it") from exc
    except Exception as exc:  # zip and storage errors of a truncated or corrupt file
        raise error(f"cannot read {path}: {first_line(exc)}") from exc


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
        raise RunError(
            f"{path}: {len(payload['classes'])} class names for a {payload['num_classes']}-class classifier"
        )
    pre = Preprocessing.from_dict(payload["preprocessing"])
    built = build(payload["arch"], payload["num_classes"], weights="none", image_size=pre.input_size)
    built.preprocessing = pre
    built.weights = payload["weights"]
    if payload.get("head") == "prototype":
        from .prototype import PrototypeHead, install_prototype_head

        width = payload["state_dict"].get(_prototype_key(built), torch.zeros(0, 0)).shape[-1]
        install_prototype_head(built, PrototypeHead.empty(width, payload["num_classes"]))
    if "qat" in payload:  # fake-quantised: BatchNorm folded and quantizers in place before the state fits
        from .qat import restore

        restore(built, payload)
    try:
        built.module.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise RunError(f"{path} does not fit {payload['arch']}: {str(exc).splitlines()[0]}") from exc
    built.module.eval()
    return built, payload


def _prototype_key(built: BuiltModel) -> str:
    """The state_dict key of the prototype matrix: where the model's classifier sits, plus ``.prototypes``."""
    head = built.heads[0]
    name = next(name for name, module in built.module.named_modules() if module is head)
    return f"{name}.prototypes"
