"""What an epoch iterates over: cached features of the frozen backbone (head mode), or images
through the network (full mode, or head mode with unfrozen blocks); and the device, autocast and
data loaders every loop uses."""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ..config import FinetuneConfig, Mode
from ..cpu import CpuFeatures, cpu_features
from ..data import Dataset, TorchImages, eval_transform, train_transform
from ..distributed import SINGLE, Context
from ..errors import EdgeTransferError, ModelError, RunError, unknown_name
from ..models import BuiltModel, trunk_blocks
from ..progress import console, progress
from ..rundir import RunDir
from ..runtime.files import write_bytes
from ..safeload import safe_load
from .features import FrozenPass

__all__ = [
    "device_for",
    "precision_for",
    "autocast_for",
    "cpu_layout",
    "depthwise_fp32",
    "default_form",
    "image_loader",
    "make_loop",
    "CachedHeadLoop",
    "ImageLoop",
]

FEATURES = RunDir.FEATURES


def device_for(name: str, dist: Context = SINGLE) -> torch.device:
    if name == "auto" or (dist.active and name == "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank) if dist.active else torch.device("cuda")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EdgeTransferError(f"device {name!r} asked for, but torch sees no CUDA GPU; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise unknown_name("device", name, ["auto", "cpu", "cuda", "cuda:0"]) from None


@functools.cache
def _this_cpu() -> CpuFeatures:
    return cpu_features()


def precision_for(device: torch.device, enabled: bool, cpu: CpuFeatures | None = None) -> str:
    """What training computes in: ``fp16`` autocast on CUDA, ``bf16`` autocast on a CPU with native
    bf16 arithmetic (elsewhere bf16 is emulated and slower than FP32), else ``fp32``. ``enabled`` is
    the run's ``amp`` (``--no-amp``: always ``fp32``). Evaluation on a CPU is FP32 regardless."""
    if not enabled:
        return "fp32"
    if device.type == "cuda":
        return "fp16"
    if device.type == "cpu" and (cpu or _this_cpu()).bf16:
        return "bf16"
    return "fp32"


_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast_for(device: torch.device, enabled: bool):
    dtype = _AUTOCAST.get(precision_for(device, enabled))
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def cpu_layout(x: torch.Tensor) -> torch.Tensor:
    """A CPU batch of images in channels-last (PyTorch's faster CPU layout for convolutions, by far
    for depthwise ones); anything else as it is."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" and x.dim() == 4 else x


def _depthwise(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.groups > 1 and layer.groups == layer.in_channels


class _Fp32Forward:
    """A layer's own forward with autocast off and its input in FP32."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return type(self.layer).forward(self.layer, x.float())


def depthwise_fp32(module: nn.Module) -> int:
    """Make ``module``'s depthwise convolutions compute in FP32 under bf16 autocast (the others stay
    in bf16): PyTorch's CPU backward of a bf16 depthwise convolution is slower than its FP32 one
    (on a 2-core Zen 4, a Lite0 step at 224 px ran 22.7 images/s all in bf16, 32.2 with these in
    FP32, 29.1 in FP32 throughout). Returns how many; :func:`default_form` undoes it."""
    layers = [layer for layer in module.modules() if _depthwise(layer)]
    for layer in layers:
        layer.forward = _Fp32Forward(layer)  # an instance attribute: nn.Module.__call__ runs it
    return len(layers)


def default_form(module: nn.Module) -> None:
    """``module`` as it was built: the default memory layout, every layer's own forward (what is
    saved and exported)."""
    module.to(memory_format=torch.contiguous_format)
    for layer in module.modules():
        if isinstance(layer.__dict__.get("forward"), _Fp32Forward):
            del layer.__dict__["forward"]


def image_loader(samples, transform, config: FinetuneConfig, shuffle: bool, generator: torch.Generator | None = None):
    """A DataLoader that draws only from ``generator`` (a fixed one when none is given), never from
    torch's global generator. A shuffling loader's workers start afresh each epoch, so that they
    are seeded from the epoch's generator and not from the epochs before."""
    return DataLoader(
        TorchImages(samples, transform),
        batch_size=config.batch_size,
        shuffle=shuffle,
        num_workers=config.workers or 0,
        generator=generator if generator is not None else torch.Generator().manual_seed(0),
        persistent_workers=(config.workers or 0) > 0 and not shuffle,
        pin_memory=torch.cuda.is_available(),
    )


def make_loop(config, built, dataset, device, run_dir, dist: Context = SINGLE):
    if config.caches_features:
        return CachedHeadLoop(config, built, dataset, device, run_dir, dist)
    return ImageLoop(config, built, dataset, device, dist)


class CachedHeadLoop:
    """Head mode: the frozen backbone runs once per image; epochs train the head on features."""

    def __init__(self, config, built: BuiltModel, dataset: Dataset, device, run_dir: Path, dist: Context = SINGLE, cache: Path | None = None) -> None:
        self.config, self.built, self.device, self.dist = config, built, device, dist
        self.cache = cache or run_dir / FEATURES  # one file per task in a multi-task run
        for param in built.module.parameters():
            param.requires_grad_(False)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.frozen = FrozenPass(built, device, config.feature_engine, check_logits=self._check_head)
        self.train_pass_s = 0.0  # one backbone pass over the training images (0 when cached)
        self.features_by = "torch"  # the engine that computed the cached features
        self.layout = "NCHW"  # what the epochs train on: features, whatever layout the backbone ran in
        started = time.perf_counter()
        self.train_x, self.train_y, self.val_x, self.val_y, widths = self._features(dataset)
        self.features_s = time.perf_counter() - started
        self.head = built.head(widths)
        for param in self.head.parameters():
            param.requires_grad_(True)
        self._other: tuple[list, torch.Tensor] | None = None

    def _features(self, dataset: Dataset):
        path = self.cache
        key = {"train": [s.name for s in dataset.train], "val": [s.name for s in dataset.val], "engine": self.config.feature_engine.value}
        if path.is_file():
            try:
                cached = safe_load(path)
            except RunError as exc:  # a cache is only a cache: a corrupt one is computed again
                console.print("[yellow]warning:[/]", escape(f"{exc}; computing the features again"))
                cached = {}
            if isinstance(cached, dict) and cached.get("key") == key:
                widths = cached.get("widths", [cached["train_x"].shape[1]])
                self.features_by = str(cached.get("computed_by", "torch"))
                return cached["train_x"], cached["train_y"], cached["val_x"], cached["val_y"], widths
        transform = eval_transform(self.built.preprocessing)
        started = time.perf_counter()
        train_x, train_y, widths = self._extract(dataset.train, transform, "features (train)")
        self.train_pass_s = time.perf_counter() - started
        val_x, val_y, _ = self._extract(dataset.val, transform, "features (val)")
        self.features_by = self.frozen.engine or "torch"
        payload = {
            "key": key,
            "computed_by": self.frozen.engine,
            "train_x": train_x,
            "train_y": train_y,
            "val_x": val_x,
            "val_y": val_y,
            "widths": widths,
        }
        if self.dist.main:
            write_bytes(path, lambda f: torch.save(payload, f))
        return train_x, train_y, val_x, val_y, widths

    def _extract(self, samples, transform, label: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """What the heads read for ``samples`` (side by side, for several heads), the labels and
        each head's width; under torchrun each rank computes its share and all gather."""
        total, samples = len(samples), self.dist.shard(samples)
        self.built.module.eval()
        with progress() as bar:
            task = bar.add_task(label, total=len(samples), status="")
            batches = image_loader(samples, transform, self.config, shuffle=False)
            features, labels = self.frozen.run(batches, total, lambda n: bar.advance(task, n))
            bar.update(task, status=self.frozen.engine or "")
        return self.dist.unshard(features, total), self.dist.unshard(labels, total), self.frozen.widths

    def _check_head(self, features: torch.Tensor, logits: torch.Tensor) -> None:
        """Refuse a model whose logits are not what its heads make of their cached inputs (a
        model that changes the logits after its classifier): training on cached features would
        train something else than the model that is exported."""
        head = self.built.head(self.frozen.widths)
        with torch.no_grad():
            remade = head.to(self.device)(features.to(self.device)).float().cpu()
        tolerance = (2e-2 if self.config.amp and self.device.type == "cuda" else 1e-3) * max(1.0, float(logits.abs().max()))
        if remade.shape != logits.shape or not torch.allclose(remade, logits, rtol=0, atol=tolerance):
            raise ModelError(
                f"{self.config.arch}'s logits are not its classifier's output on cached features, so head mode cannot"
                " train it on them; use --unfreeze-blocks 1 or --mode full"
            )

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_y) / self.config.batch_size)

    def logits_of(self, samples) -> torch.Tensor:
        """The head's logits for other images (the labelled target images); their frozen features
        are computed once."""
        if self._other is None or self._other[0] is not samples:
            features, _, _ = self._extract(samples, eval_transform(self.built.preprocessing), "features (target eval)")
            self._other = (samples, features)
        return self._head_logits(self._other[1])

    def frozen_record(self) -> dict[str, Any]:
        """How the cached features were computed (read from the cache when they came from it)."""
        return {**self.frozen.record(), "engine": self.features_by, "train_pass_s": self.train_pass_s}

    def test_logits(self, samples) -> torch.Tensor:
        """The model's logits for the test images: the frozen pass's features through the head."""
        features, _, _ = self._extract(samples, eval_transform(self.built.preprocessing), "test")
        return self._head_logits(features)

    def backbone_changed(self, dataset: Dataset) -> None:
        """The backbone's BatchNorm statistics were adapted: validation features are computed again."""
        self.frozen.forget()
        self.val_x, self.val_y, _ = self._extract(dataset.val, eval_transform(self.built.preprocessing), "features (val, adapted)")
        self._other = None

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.head.parameters()), "lr": lr, "name": "head"}]

    def train_batches(self):
        self.head.train()
        order = torch.randperm(len(self.train_y), generator=self.generator)
        for start in range(0, len(order), self.config.batch_size):
            index = order[start : start + self.config.batch_size]
            yield self.train_x[index].to(self.device), self.train_y[index].to(self.device), self.head

    def val_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._head_logits(self.val_x), self.val_y

    def _head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The head's logits for cached features, in eval mode, 1,024 rows at a time."""
        self.head.eval()
        with torch.no_grad():
            return torch.cat([self.head(x.to(self.device)).float().cpu() for x in features.split(1024)])


class ImageLoop:
    """Full mode, or head mode with unfrozen blocks: images go through the network every epoch."""

    def __init__(self, config, built: BuiltModel, dataset: Dataset, device, dist: Context = SINGLE) -> None:
        self.config, self.built, self.device, self.dist = config, built, device, dist
        self.features_s = 0.0
        self.epoch = 0
        self.generator = torch.Generator().manual_seed(config.seed)
        transform = train_transform(built.preprocessing, config.augment)
        if dist.active:
            images = TorchImages(dataset.train, transform)
            self.sampler: DistributedSampler | None = DistributedSampler(images, dist.world, dist.rank, shuffle=True, seed=config.seed)
            self.train: DataLoader = DataLoader(
                images,
                batch_size=config.batch_size,
                sampler=self.sampler,
                num_workers=config.workers or 0,
                generator=self.generator,
                pin_memory=torch.cuda.is_available(),
            )
        else:
            self.train = image_loader(dataset.train, transform, config, True, self.generator)
        self.val_total = len(dataset.val)
        self.val = image_loader(dist.shard(dataset.val), eval_transform(built.preprocessing), config, False)
        self.trainable = self._select_trainable()
        self.layout = "channels-last" if device.type == "cpu" else "NCHW"
        self.depthwise_fp32 = False
        # Measured in FP32 on a CPU, as the exported model computes: bf16 autocast moved the demo's
        # validation top-1 of the same weights by 1.4 points (5 of 359 images). Autocast on CUDA.
        self.evaluate_amp = config.amp and device.type != "cpu"
        if device.type == "cpu":  # before DDP wraps it; Trainer.finish puts the default form back
            built.module.to(memory_format=torch.channels_last)
            self.depthwise_fp32 = precision_for(device, config.amp) == "bf16" and depthwise_fp32(built.module) > 0
        self.model = built.module
        if dist.active:  # gradients averaged over ranks; parameters start from rank 0's
            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(built.module, device_ids=ids)

    def _select_trainable(self) -> list[nn.Module]:
        """Modules that train (and so run BatchNorm in train mode); all others stay frozen."""
        module, heads = self.built.module, self.built.heads
        if self.config.mode is Mode.FULL:
            for param in module.parameters():
                param.requires_grad_(True)
            return [module]
        blocks = trunk_blocks(self.built)
        unfrozen = blocks[-self.config.unfreeze_blocks :] if self.config.unfreeze_blocks else []
        for param in module.parameters():
            param.requires_grad_(False)
        for part in [*unfrozen, *heads]:
            for param in part.parameters():
                param.requires_grad_(True)
        return [*unfrozen, *heads]

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        head = [p for layer in self.built.heads for p in layer.parameters()]
        head_ids = {id(p) for p in head}
        backbone = [p for p in self.built.module.parameters() if p.requires_grad and id(p) not in head_ids]
        groups = [{"params": head, "lr": lr, "name": "head"}]
        if backbone:
            groups.append({"params": backbone, "lr": lr * self.config.backbone_lr_scale, "name": "backbone"})
        return groups

    def train_batches(self):
        self.built.module.eval()
        for part in self.trainable:
            part.train()
        if not self.config.train_bn_stats:
            # Batch statistics of a small, shifted dataset wreck pretrained features; BatchNorm
            # keeps its running statistics and only its affine parameters train.
            for layer in self.built.module.modules():
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    layer.eval()
        if self.dist.active:
            self.sampler.set_epoch(self.epoch)
        for x, y in self.train:
            yield cpu_layout(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True), self.model

    def logits_of(self, samples) -> torch.Tensor:
        """The model's logits for other images (the labelled target images)."""
        self.built.module.eval()
        with torch.no_grad():
            return torch.cat(
                [
                    self.built.module(cpu_layout(x.to(self.device))).float().cpu()
                    for x, _ in image_loader(samples, eval_transform(self.built.preprocessing), self.config, False)
                ]
            )

    def frozen_record(self) -> None:
        return None  # no frozen pass: images go through the network

    def test_logits(self, samples) -> torch.Tensor:
        """The model's logits for the test images (every rank computes them all)."""
        self.built.module.eval()
        with torch.no_grad():
            logits = []
            for x, _ in image_loader(samples, eval_transform(self.built.preprocessing), self.config, False):
                with autocast_for(self.device, self.evaluate_amp):
                    logits.append(self.built.module(cpu_layout(x.to(self.device))).float().cpu())
        return torch.cat(logits)

    def backbone_changed(self, dataset: Dataset) -> None:
        pass  # images go through the network for every measurement

    def val_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.built.module.eval()
        logits, labels = [], []
        with torch.no_grad():
            for x, y in self.val:
                with autocast_for(self.device, self.evaluate_amp):
                    logits.append(self.built.module(cpu_layout(x.to(self.device))).float().cpu())
                labels.append(y)
        return self.dist.unshard(torch.cat(logits), self.val_total), self.dist.unshard(torch.cat(labels), self.val_total)
