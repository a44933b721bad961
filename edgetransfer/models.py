"""Architectures: build a pretrained CNN and swap its classifier for ``num_classes``.

Names are torchvision builder names (``resnet18``, ``mobilenet_v3_small``, …) or timm names
with a ``timm:`` prefix (``timm:efficientnet_lite0``). Weights are one of

* ``"embedded"``: weights that ship inside an installed package (the offline default);
* a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``, …) or, for timm, ``DEFAULT``
  or a pretrained tag: downloaded, or read from the ``TORCH_HOME``/Hugging Face cache offline;
* a path to a state_dict or an edgetransfer checkpoint, loaded with ``weights_only=True``;
* ``"none"``: random initialisation.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision.models as tvm
from timm.data import resolve_data_config
from torch import nn

from .errors import ModelError, WeightsError, unknown_name
from .runtime.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Interpolation, Preprocessing
from .weights import DEFAULT_ARCH, EMBEDDED, default_weights, fetch, is_path, load_file, load_state

__all__ = [
    "DEFAULT_ARCH",
    "Source",
    "Architecture",
    "BuiltModel",
    "architecture",
    "list_architectures",
    "build",
    "default_weights",
    "trunk_blocks",
]

TIMM_PREFIX = "timm:"


class Source(str, enum.Enum):
    TORCHVISION = "torchvision"
    TIMM = "timm"


@dataclass(frozen=True)
class Architecture:
    """A buildable architecture: its registry name, where it comes from and its family."""

    name: str
    source: Source
    family: str

    @property
    def source_name(self) -> str:
        """The name the source library knows it by."""
        return self.name.removeprefix(TIMM_PREFIX)


@dataclass(frozen=True)
class ClassifierRule:
    """Where a family keeps its final classifier: an attribute path and the layer kind."""

    path: tuple[str | int, ...]
    kind: str = "linear"  # or "conv": squeezenet's 1x1 convolution


# torchvision families are the builders' module names; each needs its own swap rule.
CLASSIFIER_RULES: dict[str, ClassifierRule] = {
    **dict.fromkeys(["resnet", "regnet", "shufflenetv2", "googlenet", "inception"], ClassifierRule(("fc",))),
    **dict.fromkeys(
        ["mobilenetv2", "mobilenetv3", "efficientnet", "mnasnet", "vgg", "alexnet", "convnext", "maxvit"],
        ClassifierRule(("classifier", -1)),
    ),
    "densenet": ClassifierRule(("classifier",)),
    "squeezenet": ClassifierRule(("classifier", 1), kind="conv"),
    "vision_transformer": ClassifierRule(("heads", "head")),
    "swin_transformer": ClassifierRule(("head",)),
}

_ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> Architecture:
    """Add ``arch`` to the registry; a duplicate name is an error."""
    if arch.name in _ARCHITECTURES:
        raise ModelError(f"architecture {arch.name!r} is already registered")
    _ARCHITECTURES[arch.name] = arch
    return arch


def _register_torchvision() -> None:
    if any(a.source is Source.TORCHVISION for a in _ARCHITECTURES.values()):
        return

    for name in tvm.list_models(module=tvm):
        family = tvm.get_model_builder(name).__module__.rsplit(".", 1)[-1]
        register_architecture(Architecture(name, Source.TORCHVISION, family))


def list_architectures(include_timm: bool = False) -> list[str]:
    """Registered names (torchvision builders; with ``include_timm``, every timm model too)."""
    _register_torchvision()
    names = sorted(_ARCHITECTURES)
    if include_timm:
        names += [TIMM_PREFIX + n for n in timm.list_models()]
    return names


def architecture(name: str) -> Architecture:
    """Look up an architecture by name.

    Raises:
        UnknownNameError: with close matches, when neither torchvision nor timm has it.
    """
    _register_torchvision()
    if name in _ARCHITECTURES:
        return _ARCHITECTURES[name]
    if name.startswith(TIMM_PREFIX):
        if timm.is_model(name.removeprefix(TIMM_PREFIX)):
            return Architecture(name, Source.TIMM, "timm")
        raise unknown_name("timm architecture", name, [TIMM_PREFIX + n for n in timm.list_models()])
    raise unknown_name("architecture", name, list(_ARCHITECTURES) + [DEFAULT_ARCH])


@dataclass
class BuiltModel:
    """A model with its swapped classifier and everything later stages need to know about it."""

    module: nn.Module
    arch: Architecture
    weights: str
    num_classes: int
    preprocessing: Preprocessing
    native_size: int | None = None  # the input size the weights were made for

    def check_size(self) -> None:
        """Run one blank image at the preprocessing's size.

        Raises:
            ModelError: the architecture cannot run at that size (LeViT and ViTs are built for one).
        """
        size = self.preprocessing.input_size
        try:
            with torch.no_grad():
                self.module.eval()(torch.zeros(1, 3, size, size, device=next(self.module.parameters()).device))
        except (RuntimeError, ValueError, AssertionError) as exc:
            hint = f"; try --image-size {self.native_size}" if self.native_size and self.native_size != size else ""
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{self.arch.name} cannot run at {size} px ({reason}){hint}") from exc

    @property
    def heads(self) -> tuple[nn.Module, ...]:
        """The new classifier layers: one (a Linear, or squeezenet's 1x1 Conv2d), or two for a
        distilled timm model (DeiT, LeViT, PiT), whose logits are the mean of its heads'."""
        if self.arch.source is Source.TIMM:
            return _timm_heads(self.module)
        parent, key = _locate(self.module, CLASSIFIER_RULES[self.arch.family].path)
        return (parent[key] if isinstance(key, int) else getattr(parent, key),)

    def head(self, widths: list[int] | None = None) -> nn.Module:
        """Maps what the heads read to logits, for training on cached features.

        Args:
            widths: for several heads, the width of each one's input; the cached features are
                their inputs side by side (DeiT's heads read two different tokens).
        """
        if len(self.heads) > 1:
            return MeanOfHeads(self.heads, widths or [])
        layer = self.heads[0]
        if isinstance(layer, nn.Conv2d):  # squeezenet: conv -> relu -> global pool
            return nn.Sequential(layer, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        return layer


class MeanOfHeads(nn.Module):
    """A distilled model's classifier on cached features: each head reads its own slice of the
    input, and the logits are their mean, as timm's distilled models compute them outside
    distillation training."""

    def __init__(self, heads: tuple[nn.Module, ...], widths: list[int]) -> None:
        super().__init__()
        if len(widths) != len(heads):
            raise ModelError(f"{len(heads)} classifier heads need {len(heads)} input widths, got {len(widths)}")
        self.heads = nn.ModuleList(heads)
        self.widths = list(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.split(self.widths, dim=1)
        return torch.stack([head(part) for head, part in zip(self.heads, parts, strict=True)]).mean(0)


def build(
    name: str,
    num_classes: int | None,
    weights: str | None = None,
    image_size: int | None = None,
) -> BuiltModel:
    """Build ``name`` with ``weights`` and a fresh classifier for ``num_classes``.

    Args:
        name: architecture name (see :func:`architecture`).
        num_classes: outputs of the new classifier (at least 2); ``None`` keeps the pretrained
            classifier (e.g. the 1000 ImageNet classes).
        weights: see the module docstring; ``None`` means :func:`default_weights`.
        image_size: input size to train and run at (the crop fraction of the weights is kept).

    Returns:
        The model in eval mode, with the preprocessing its weights expect.

    Raises:
        UnknownNameError: unknown architecture or weights name.
        WeightsError: weights that cannot be found, fetched or loaded.
        ModelError: ``num_classes`` < 2 or a family without a classifier rule.
    """
    if num_classes is not None and num_classes < 2:
        raise ModelError(f"a classifier needs at least 2 classes, got {num_classes}")
    arch = architecture(name)
    weights = default_weights(name) if weights is None else weights
    if arch.source is Source.TIMM:
        module, preprocessing = _build_timm(arch, weights, num_classes)
    else:
        module, preprocessing = _build_torchvision(arch, weights, num_classes)
    native = preprocessing.input_size
    if image_size is not None:
        preprocessing = preprocessing.at_size(image_size)
    if num_classes is None:
        num_classes = _classifier_outputs(module, arch)
    return BuiltModel(module.eval(), arch, weights, num_classes, preprocessing, native)


def _classifier_outputs(module: Any, arch: Architecture) -> int:
    if arch.source is Source.TIMM:
        return int(module.num_classes)
    parent, key = _locate(module, CLASSIFIER_RULES[arch.family].path)
    layer = parent[key] if isinstance(key, int) else getattr(parent, key)
    return int(layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features)


def _build_torchvision(arch: Architecture, weights: str, num_classes: int | None) -> tuple[nn.Module, Preprocessing]:
    if arch.family not in CLASSIFIER_RULES:
        raise ModelError(f"no classifier rule for the torchvision family {arch.family!r} ({arch.name})")
    enum_cls = tvm.get_model_weights(arch.name)
    tv_weights = None
    if weights in EMBEDDED or weights == "embedded":
        raise WeightsError(f"no embedded weights for {arch.name}; embedded weights exist for: {', '.join(EMBEDDED)}")
    if weights.lower() != "none" and not is_path(weights):
        tv_weights = _torchvision_weights(enum_cls, weights, arch.name)
    # Auxiliary classifiers only matter when training from scratch; without pretrained weights
    # the builders would also run a slow custom init that the new weights overwrite anyway.
    aux = arch.family in ("googlenet", "inception")
    kwargs: dict[str, Any] = {"aux_logits": False, "init_weights": False} if aux and tv_weights is None else {}
    if tv_weights is None:
        module = tvm.get_model(arch.name, weights=None, **kwargs)
    else:
        module = fetch(lambda: tvm.get_model(arch.name, weights=tv_weights, **kwargs), arch.name, weights)
    if aux:
        module.aux_logits = False
        for name in ("aux1", "aux2", "AuxLogits"):
            if hasattr(module, name):
                setattr(module, name, None)
    if weights.lower() != "none" and tv_weights is None:
        load_file(module, Path(weights), arch.name)
    if num_classes is not None:
        _swap_torchvision(module, arch, num_classes)
    return module, _torchvision_preprocessing(tv_weights or enum_cls.DEFAULT)


def _torchvision_weights(enum_cls, name: str, arch_name: str):
    if name.upper() == "DEFAULT":
        return enum_cls.DEFAULT
    try:
        return enum_cls[name]
    except KeyError:
        known = ["DEFAULT", "none", *enum_cls.__members__]
        raise unknown_name(f"weights for {arch_name}", name, known) from None


def _torchvision_preprocessing(tv_weights) -> Preprocessing:
    transform = tv_weights.transforms()
    return Preprocessing(
        input_size=int(transform.crop_size[0]),
        resize_size=int(transform.resize_size[0]),
        interpolation=Interpolation.parse(transform.interpolation.value),
        mean=tuple(transform.mean),
        std=tuple(transform.std),
    )


def _locate(module: nn.Module, path: tuple[str | int, ...]) -> tuple[Any, str | int]:
    parent: Any = module
    for step in path[:-1]:
        parent = parent[step] if isinstance(step, int) else getattr(parent, step)
    return parent, path[-1]


def _swap_torchvision(module: nn.Module, arch: Architecture, num_classes: int) -> None:
    rule = CLASSIFIER_RULES[arch.family]
    parent, key = _locate(module, rule.path)
    old = parent[key] if isinstance(key, int) else getattr(parent, key)
    if rule.kind == "conv":
        conv = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
        nn.init.normal_(conv.weight, std=0.01)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
        new: nn.Module = conv
    else:
        new = nn.Linear(old.in_features, num_classes)
    new = new.to(old.weight.device)
    if isinstance(key, int):
        parent[key] = new
    else:
        setattr(parent, key, new)


def _build_timm(arch: Architecture, weights: str, num_classes: int | None) -> tuple[nn.Module, Preprocessing]:
    module: Any  # a timm model: reset_classifier, get_classifier
    name = arch.source_name
    embedded = EMBEDDED.get(arch.name) if weights == "embedded" else None
    if weights == "embedded" and embedded is None:
        raise WeightsError(f"no embedded weights for {arch.name}; embedded weights exist for: {', '.join(EMBEDDED)}")
    pretrained = weights.lower() not in ("none", "embedded") and not is_path(weights)
    full_name = name if weights.upper() == "DEFAULT" or not pretrained else f"{name}.{weights}"
    if pretrained:
        module = fetch(lambda: timm.create_model(full_name, pretrained=True), arch.name, weights)
    else:
        module = timm.create_model(name, pretrained=False)
    if embedded is not None:
        load_state(module, embedded.load_state_dict(), arch.name, "embedded weights")
    elif weights.lower() != "none" and not pretrained:
        load_file(module, Path(weights), arch.name)
    if num_classes is not None:
        module.reset_classifier(num_classes)  # every head, for a distilled model
    _timm_heads(module, arch.name)
    preprocessing = embedded.preprocessing if embedded else _timm_preprocessing(module)
    return module, preprocessing


def _timm_heads(module: Any, name: str = "") -> tuple[nn.Module, ...]:
    """timm's classifier: one module, or a tuple of them for distilled models.

    Raises:
        ModelError: a classifier edgetransfer cannot swap (neither of those).
    """
    found = module.get_classifier()
    heads = tuple(found) if isinstance(found, (tuple, list)) else (found,)
    if not heads or not all(isinstance(h, nn.Module) and any(True for _ in h.parameters()) for h in heads):
        raise ModelError(
            f"{name or type(module).__name__}'s classifier is {type(found).__name__}, not layers edgetransfer can swap and"
            " train; choose another architecture"
        )
    if len(heads) > 1 and getattr(module, "distilled_training", False):
        module.distilled_training = False  # train and export the heads' mean, as timm runs them
    return heads


def _timm_preprocessing(module: nn.Module) -> Preprocessing:
    config = resolve_data_config({}, model=module)
    size = int(config["input_size"][-1])
    return Preprocessing(
        input_size=size,
        resize_size=int(math.floor(size / config["crop_pct"])),
        interpolation=Interpolation.parse(config["interpolation"]),
        mean=tuple(config.get("mean", IMAGENET_MEAN)),
        std=tuple(config.get("std", IMAGENET_STD)),
    )


def trunk_blocks(built: BuiltModel) -> list[nn.Module]:
    """The feature extractor's blocks in forward order, for unfreezing the last K.

    Containers (Sequential, ModuleList) are opened; a normalisation layer joins the block
    before it; the classifier is left out.
    """
    heads = built.heads
    units: list[list[nn.Module]] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if any(child is head for head in heads) or not any(True for _ in child.parameters()):
                continue
            if isinstance(child, (nn.Sequential, nn.ModuleList)):
                visit(child)
            elif units and isinstance(child, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
                units[-1].append(child)
            else:
                units.append([child])

    visit(built.module)
    return [nn.ModuleList(unit) if len(unit) > 1 else unit[0] for unit in units]
