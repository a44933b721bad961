"""Reading torch files without running code: the one way edgetransfer opens a ``.pt``/``.pth`` file."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import EdgeTransferError, RunError, first_line

__all__ = ["safe_load"]


def safe_load(path: str | Path, error: type[EdgeTransferError] = RunError) -> Any:
    """``torch.load`` that never runs code: tensors, numbers, strings and containers only.

    Every file edgetransfer reads goes through here. A pickle that asks for anything else (a
    planted ``__reduce__`` included) is refused without being run, and the message does not
    repeat torch's advice to turn the weights-only check off.

    Raises:
        error: the file is missing, truncated or corrupt, or holds more than tensors and plain values.
    """
    try:
        with warnings.catch_warnings():
            # a file that is not torch's warns of its "pickle protocol" before it fails: the error says it once
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise error(f"file not found: {path}") from exc
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc):  # torch names the global it refused; anything else is not a torch file
            raise error(f"cannot read {path}: it is not a file torch saved ({first_line(exc)})") from exc
        raise error(
            f"{path} holds Python objects besides tensors and plain values; edgetransfer loads neither"
            " those nor files that need them. Use a file of tensors (a state_dict), or rebuild it"
        ) from exc
    except Exception as exc:  # zip and storage errors of a truncated or corrupt file
        raise error(f"cannot read {path}: {first_line(exc)}") from exc
