"""Closed sets of names (modes, targets, precisions, …) shared by the CLI, the API and JSON."""

from __future__ import annotations

import enum
import re

from .errors import unknown_name

__all__ = ["Choice", "Target", "Precision", "Mode", "FeatureEngine", "AdaptMethod", "OptimizerName"]


class Choice(str, enum.Enum):
    """A string enum whose :meth:`parse` answers an unknown name with close matches."""

    @classmethod
    def kind(cls) -> str:
        """What the names are of, for messages: ``CalibMethod`` -> ``"calib method"``."""
        return re.sub(r"(?<!^)(?=[A-Z])", " ", cls.__name__).lower()

    @classmethod
    def parse(cls, name):
        """The member named ``name`` (or ``name`` itself when it is one).

        Raises:
            UnknownNameError: with close matches and the valid names.
        """
        if isinstance(name, cls):
            return name
        try:
            return cls(name)
        except ValueError:
            raise unknown_name(cls.kind(), str(name), [m.value for m in cls]) from None


class Target(Choice):
    """Where a variant runs."""

    ORT_CPU = "ort-cpu"
    ORT_CUDA = "ort-cuda"
    ORT_TRT = "ort-trt"
    TENSORRT = "tensorrt"
    OPENVINO = "openvino"

    @property
    def on_gpu(self) -> bool:
        """An NVIDIA GPU's target: symmetric int8 activations and 8-bit weights, no uint8."""
        return self in (Target.ORT_CUDA, Target.ORT_TRT, Target.TENSORRT)


class Precision(Choice):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"


class Mode(Choice):
    HEAD = "head"  # frozen feature extractor (optionally its last K blocks unfrozen), new classifier
    FULL = "full"  # everything trains; the backbone at lr * backbone_lr_scale
    PROTOTYPE = "prototype"  # frozen feature extractor, class means as a cosine classifier: no training


class FeatureEngine(Choice):
    """What computes head mode's frozen features (see :mod:`edgetransfer.train.features`)."""

    AUTO = "auto"  # ONNX Runtime on a CPU when the pass is long enough to pay for an export, else PyTorch
    ONNXRUNTIME = "onnxruntime"  # ONNX Runtime whenever it exports and matches PyTorch
    TORCH = "torch"  # eager PyTorch (channels-last on a CPU)


class AdaptMethod(Choice):
    """Unsupervised domain adaptation (see :mod:`edgetransfer.adapt`)."""

    DANN = "dann"  # domain-adversarial training (Ganin et al. 2016): the backbone trains
    ADABN = "adabn"  # BatchNorm statistics recomputed on the target images (Li et al. 2016)

    @classmethod
    def kind(cls) -> str:
        return "adaptation method"


class OptimizerName(Choice):
    @classmethod
    def kind(cls) -> str:
        return "optimizer"

    ADAMW = "adamw"
    SGD = "sgd"
