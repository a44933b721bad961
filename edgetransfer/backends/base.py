from __future__ import annotations

import time
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

__all__ = ["Runner", "SkipVariant"]


class SkipVariant(Exception):
    """This variant cannot run here (library, provider or GPU missing); the reason is the message."""


class Runner(ABC):
    """Load on ``__enter__`` (timed as the cold start), run ``infer``, release on ``__exit__``."""

    provider = "unknown"
    input_format = "float32-nchw-normalized"

    def __init__(self, source: str | Path = "") -> None:
        self.cold_start_s = 0.0
        self.source = str(source)  # the file it runs
        self.checkpoint_sha256 = ""  # of the checkpoint that file was exported from, where it records one
        self.settings: dict[str, str] = {}  # backend settings worth recording (threads, streams, precision)

    def __enter__(self) -> "Runner":
        started = time.perf_counter()
        self.activate()
        self.cold_start_s = time.perf_counter() - started
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    @abstractmethod
    def activate(self) -> None:
        """Load the model (raise :class:`SkipVariant` when it cannot run here)."""

    @abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a prepared batch, synchronised (GPU work finished) on return."""

    def deactivate(self) -> None:  # noqa: B027 - an optional hook: most runners hold nothing to release
        """Release what :meth:`activate` took."""
