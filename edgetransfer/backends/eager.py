from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_checkpoint
from .base import Runner

__all__ = ["EagerRunner"]


class EagerRunner(Runner):
    """The fine-tuned PyTorch model itself: the baseline every variant is compared with."""

    def __init__(self, checkpoint: Path, device: str = "cpu") -> None:
        super().__init__(checkpoint)
        self.checkpoint, self.device = checkpoint, device
        self.provider = f"torch-{device}"

    def activate(self) -> None:
        self.torch = torch
        built, _ = load_checkpoint(self.checkpoint)
        self.model = built.module.to(self.device).eval()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            out = self.model(torch.from_numpy(batch).to(self.device))
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            return out.float().cpu().numpy()

    def deactivate(self) -> None:
        self.model = None  # type: ignore[assignment]  # released: the runner is closed
