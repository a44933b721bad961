"""Domain adaptation during training (``--adapt``; the methods themselves: :mod:`edgetransfer.adapt`):
the unlabelled target images, the labelled ones measured on, and DANN's domain classifier."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
from rich.markup import escape
from torch import nn

from ..adapt import DomainClassifier, adabn, batchnorm_layers, reversal_weight, target_eval_images, target_images
from ..config import AdaptMethod, FinetuneConfig
from ..data import Dataset, eval_transform, train_transform
from ..errors import ModelError
from ..models import BuiltModel
from ..progress import console
from ..runtime.text import printable
from .loops import cpu_layout, image_loader

__all__ = ["Adaptation"]


class Adaptation:
    """The unlabelled target images, the labelled ones measured on, and (dann) the domain
    classifier, which exists only during training."""

    def __init__(self, config: FinetuneConfig, built: BuiltModel, dataset: Dataset, device) -> None:
        self.config, self.built, self.device = config, built, device
        self.method = config.adapt_method
        if self.method is AdaptMethod.ADABN and not batchnorm_layers(built.module):
            raise ModelError(f"adabn recomputes BatchNorm statistics and {config.arch} has none; use --adapt-method dann")
        self.discriminator = None
        if self.method is AdaptMethod.DANN:
            head = built.heads[0]
            if not isinstance(head, nn.Linear):
                raise ModelError(
                    f"dann reads the features {config.arch}'s classifier takes, and its classifier is a"
                    f" {type(head).__name__}, not a Linear layer; use --adapt-method adabn"
                )
            self.discriminator = DomainClassifier(head.in_features).to(device)
        assert config.adapt is not None, "Adaptation needs a target folder (--adapt)"
        workers = max(1, config.workers or 0)
        self.target = target_images(config.adapt, config.data, workers)
        if self.target.labelled_folders:
            console.print(
                escape(
                    f"note: the target folder has {self.target.labelled_folders} subfolder(s); their names are"
                    " not read, every image counts as unlabelled"
                ),
                markup=False,
            )
        if self.target.skipped:
            console.print(
                "[yellow]warning:[/]",
                escape(printable(f"skipped {len(self.target.skipped)} unreadable target image(s); first: {self.target.skipped[0][1]}")),
            )
        self.eval = target_eval_images(config.adapt_eval, config.data, dataset.classes, workers) if config.adapt_eval else []
        self.eval_labels = torch.tensor([s.label for s in self.eval])
        self.transform = train_transform(built.preprocessing, config.augment)
        self.generator = torch.Generator()
        self._batches: Iterator | None = None
        self.domain_loss, self.domain_right, self.domain_seen = 0.0, 0, 0

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.discriminator.parameters()), "lr": lr, "name": "domain"}] if self.discriminator else []

    def start_epoch(self, seed: int) -> None:
        self.generator.manual_seed(seed)
        self._batches = None
        self.domain_loss, self.domain_right, self.domain_seen = 0.0, 0, 0
        if self.discriminator is not None:
            self.discriminator.train()

    def _target_batch(self) -> torch.Tensor:
        """The next batch of target images; their order is drawn from the epoch's generator and
        starts again when they run out (the source images set an epoch's length)."""
        while True:
            if self._batches is None:
                self._batches = iter(image_loader(self.target.samples, self.transform, self.config, True, self.generator))
            try:
                return next(self._batches)[0].to(self.device, non_blocking=True)
            except StopIteration:
                self._batches = None

    def forward(self, model: nn.Module, x: torch.Tensor, progress: float) -> tuple[torch.Tensor, torch.Tensor]:
        """DANN's step: source and target images in one batch; the logits of the source images and
        the domain classifier's loss on the features of both, read through gradient reversal."""
        target = self._target_batch()
        captured: list[torch.Tensor] = []
        hook = self.built.heads[0].register_forward_pre_hook(lambda m, args: captured.append(args[0]))
        try:
            logits = model(cpu_layout(torch.cat([x, target])))
        finally:
            hook.remove()
        assert self.discriminator is not None, "DANN's step needs its domain classifier"
        domain = self.discriminator(captured[-1].flatten(1).float(), reversal_weight(progress))
        truth = torch.cat([torch.zeros(len(x)), torch.ones(len(target))]).to(domain.device)
        loss = nn.functional.binary_cross_entropy_with_logits(domain, truth)
        self.domain_loss += float(loss.detach()) * len(truth)
        self.domain_right += int(((domain > 0).float() == truth).sum())
        self.domain_seen += len(truth)
        return logits[: len(x)], loss

    def epoch_record(self) -> dict[str, float]:
        if not self.domain_seen:
            return {}
        return {"domain_loss": self.domain_loss / self.domain_seen, "domain_top1": self.domain_right / self.domain_seen}

    def adapt_batchnorm(self) -> tuple[int, float]:
        """AdaBN on the model: one pass over the target images; returns the layers and seconds."""
        started = time.perf_counter()
        loader = image_loader(self.target.samples, eval_transform(self.built.preprocessing), self.config, False)
        layers = adabn(self.built.module, (x.to(self.device) for x, _ in loader), self.config.arch)
        return layers, time.perf_counter() - started

    def state(self) -> dict[str, Any] | None:
        return self.discriminator.state_dict() if self.discriminator is not None else None

    def restore(self, state: dict[str, Any] | None) -> None:
        if self.discriminator is not None and state is not None:
            self.discriminator.load_state_dict(state)
