"""What every training loop of edgetransfer shares (fine-tuning, adaptation, QAT): seeding by
stage, and the learning-rate schedule."""

from __future__ import annotations

import math
import random

import numpy as np
import torch

__all__ = ["seed_stage", "cosine_with_warmup"]


def seed_stage(seed: int, *stage: int) -> int:
    """Seed Python's, numpy's and torch's global generators for one stage of the run, and return a
    seed for that stage's shuffling generator.

    With no ``stage`` the run's seed is used as is (the classifier's initial weights). Otherwise the
    seeds come from numpy's ``SeedSequence`` over ``(seed, *stage)``: independent streams per stage,
    and the same ones whatever ran before the stage. The global torch generator is what
    augmentation (in the main process), dropout and stochastic depth draw from; DataLoader workers
    are seeded from the stage's shuffling generator.
    """
    if not stage:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        return seed
    words = np.random.SeedSequence([seed, *stage]).generate_state(4, np.uint64)
    random.seed(int(words[0]))
    np.random.seed(int(words[1]) >> 32)
    torch.manual_seed(int(words[2]) >> 1)
    return int(words[3]) >> 1


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, epochs: float, warmup_epochs: float, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_epochs``, then cosine decay to zero at the end of ``epochs``
    (stepped once per optimiser step)."""
    total = max(1, int(epochs * steps_per_epoch))
    warmup = min(total - 1, int(warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
