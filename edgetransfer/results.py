"""What the stages report, as typed records: parity of an export, a variant's build, a step of the
accuracy guard, integer coverage (bench's records are in :mod:`edgetransfer.benchreport`). Each
one writes (and reads back) the JSON that lands in ``manifest.json``; nothing else reads those
files by key.

Also the one comparator every stage uses: a candidate's outputs against a reference's on the same
images (top-1 against labels where there are labels, top-1 agreement, largest logit difference).
numpy only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from .metrics import topk_accuracy

__all__ = [
    "Comparison",
    "compare",
    "paired_interval",
    "Parity",
    "GuardStep",
    "FloatLayer",
    "IntegerCoverage",
    "VariantReport",
    "known_fields",
    "without_none",
]


def known_fields(cls, data: dict[str, Any]) -> dict[str, Any]:
    """The items of ``data`` that are fields of ``cls`` (a newer writer may add fields)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def without_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


@dataclass(frozen=True)
class Comparison:
    """A candidate model's outputs against a reference's, on the same images.

    Attributes:
        images: how many images both ran on.
        max_abs_diff: the largest absolute logit difference.
        top1_agreement: the share of images whose top-1 class is the same in both.
        top1: the candidate's top-1 against the labels (``None`` without labels).
        reference_top1: the reference's top-1 on the same images (``None`` without labels).
        lost: images the reference gets right and the candidate wrong (``None`` without labels).
        gained: images the candidate gets right and the reference wrong (``None`` without labels).
        split: which images these were (``"test"``, ``"validation"``, …), where the caller knows.
    """

    images: int
    max_abs_diff: float
    top1_agreement: float
    top1: float | None = None
    reference_top1: float | None = None
    lost: int | None = None
    gained: int | None = None
    split: str | None = None

    @property
    def top1_change_points(self) -> float | None:
        """The candidate's top-1 minus the reference's, in points (negative: it lost accuracy)."""
        if self.top1 is None or self.reference_top1 is None:
            return None
        return round(100 * (self.top1 - self.reference_top1), 4)

    @property
    def change_interval(self) -> tuple[float, float] | None:
        """95% interval of the top-1 change in points: both models ran on the same images, so it
        is the paired difference of proportions, from the images where they differ (``lost``,
        ``gained``), with Agresti and Min's (2005) half-image added to each cell so that few
        images give an honest width instead of zero."""
        if self.lost is None or self.gained is None or not self.images:
            return None
        return paired_interval(self.lost, self.gained, self.images)

    def with_split(self, split: str) -> Comparison:
        return replace(self, split=split)


def paired_interval(lost: int, gained: int, images: int, z: float = 1.96) -> tuple[float, float]:
    """The ``z`` interval, in points, of (gained - lost) / images for two models on the same
    images (Agresti and Min 2005: add 0.5 to each cell of the paired 2x2 table)."""
    n = images + 2.0
    b, c = lost + 0.5, gained + 0.5
    change = (c - b) / n
    half = z * np.sqrt(max((b + c) - (c - b) ** 2 / n, 0.0)) / n
    return round(float(100 * (change - half)), 3), round(float(100 * (change + half)), 3)


def compare(candidate: np.ndarray, reference: np.ndarray, labels: np.ndarray | None = None) -> Comparison:
    """Compare ``candidate`` logits with ``reference`` logits row by row (and both with ``labels``).

    Raises:
        ValueError: the two do not have the same shape (a bug in the caller, not user input).
    """
    if candidate.shape != reference.shape:
        raise ValueError(f"cannot compare logits of shape {candidate.shape} with {reference.shape}")
    result = Comparison(
        images=int(len(candidate)),
        max_abs_diff=float(np.abs(candidate - reference).max()) if len(candidate) else 0.0,
        top1_agreement=float((candidate.argmax(1) == reference.argmax(1)).mean()) if len(candidate) else float("nan"),
    )
    if labels is None:
        return result
    right, reference_right = candidate.argmax(1) == labels, reference.argmax(1) == labels
    return replace(
        result,
        top1=topk_accuracy(candidate, labels, 1),
        reference_top1=topk_accuracy(reference, labels, 1),
        lost=int((reference_right & ~right).sum()),
        gained=int((right & ~reference_right).sum()),
    )


@dataclass(frozen=True)
class Parity:
    """How closely an exported model matched PyTorch after export."""

    images: int
    batch_size: int
    max_abs_diff: float
    top1_agreement: float
    atol: float
    provider: str
    rtol: float = 0.0
    max_rel_diff: float = 0.0
    within_tolerance: bool = True
    floor_max_abs_diff: float | None = None  # a QDQ export: how far float64 moves the fake-quantised model (atol is made from it)
    outputs: dict[str, float] | None = None  # a multi-task model: each output's largest difference (top1_agreement: the worst task's)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Parity:
        return cls(**known_fields(cls, data))


@dataclass(frozen=True)
class GuardStep:
    """One model the INT8 accuracy guard measured: the layers it had in float and how far it was
    from the float model on the guard's selection images (no labels are used).

    Attributes:
        kept_in_float: the layers in float.
        drop_points: top-1 disagreement with the float model, in points of the images measured
            (an upper bound on the top-1 it can lose there).
        logit_mse: mean squared logit difference from the float model.
        images: how many selection images it was measured on.
    """

    kept_in_float: tuple[str, ...]
    drop_points: float
    logit_mse: float
    images: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return without_none(
            {
                "kept_in_float": list(self.kept_in_float),
                "drop_points": round(self.drop_points, 3),
                "logit_mse": round(self.logit_mse, 6),
                "images": self.images,
            }
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GuardStep:
        return cls(tuple(data["kept_in_float"]), data["drop_points"], data["logit_mse"], data.get("images"))


@dataclass(frozen=True)
class FloatLayer:
    """A convolution or matrix product that ONNX Runtime runs in float in a quantised model."""

    name: str  # as in ONNX Runtime's optimised graph (the exported node's name where it kept it)
    op: str  # Conv, FusedConv, Gemm, MatMul, ...
    macs: int  # multiply-accumulates at batch 1


@dataclass(frozen=True)
class IntegerCoverage:
    """How much of a model's arithmetic ONNX Runtime really runs in integer kernels
    (:func:`~edgetransfer.optimize.coverage.integer_coverage`).

    Attributes:
        macs: multiply-accumulates of every Conv, Gemm and MatMul at batch 1.
        integer_macs: those run by integer kernels (QLinearConv, QGemm, QLinearMatMul, ...).
        integer_nodes: how many integer kernels the optimised graph has.
        float_layers: the convolutions and matrix products left in float.
        quantize_nodes: QuantizeLinear nodes left in the optimised graph (the input's is one).
        dequantize_nodes: DequantizeLinear nodes left (each one is a tensor going back to float).
        graph: which graph this was read from.
    """

    macs: int
    integer_macs: int
    integer_nodes: int
    float_layers: tuple[FloatLayer, ...]
    quantize_nodes: int
    dequantize_nodes: int
    graph: str = ""

    @property
    def share(self) -> float:
        """The share of the MACs run in integer kernels, 0 to 1."""
        return self.integer_macs / self.macs if self.macs else 0.0

    def summary(self) -> str:
        """One line: ``"99.2% of 384.0 M MACs in int8; float: node_Conv_764 (Conv, 10.8 M); 3 Q, 2 DQ left"``."""
        floats = ", ".join(f"{f.name} ({f.op}, {f.macs / 1e6:.1f} M)" for f in self.float_layers[:3])
        more = f" and {len(self.float_layers) - 3} more" if len(self.float_layers) > 3 else ""
        return (
            f"{100 * self.share:.1f}% of {self.macs / 1e6:.1f} M MACs in int8"
            + (f"; float: {floats}{more}" if floats else "")
            + f"; {self.quantize_nodes} Q, {self.dequantize_nodes} DQ left"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "macs": self.macs,
            "integer_macs": self.integer_macs,
            "integer_share": round(self.share, 6),
            "integer_nodes": self.integer_nodes,
            "float_layers": [asdict(f) for f in self.float_layers],
            "quantize_nodes": self.quantize_nodes,
            "dequantize_nodes": self.dequantize_nodes,
            "graph": self.graph,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IntegerCoverage:
        return cls(
            data["macs"],
            data["integer_macs"],
            data["integer_nodes"],
            tuple(FloatLayer(**f) for f in data["float_layers"]),
            data["quantize_nodes"],
            data["dequantize_nodes"],
            data.get("graph", ""),
        )


@dataclass
class VariantReport:
    """What building one variant made of it.

    Attributes:
        accuracy: the variant against the float ONNX model on the run's held-out images (the test
            split, which no stage chose on; validation for runs without one), with their count.
        evaluated_on: the runtime the accuracy was measured on.
        kept_in_float: layers (INT8) or operator types (FP16) left in float.
        guard_steps: every step the INT8 accuracy guard took.
        warnings: what the user was warned about while building it.
        seconds: how long the build took.
        coverage: for an ONNX Runtime INT8 variant, how much of it runs in integer kernels.
        details: the target's own record for the manifest (quantisation scheme, calibration set,
            NNCF settings, TensorRT build record); written as is, read by no other stage.
    """

    accuracy: Comparison | None = None
    evaluated_on: str = ""
    kept_in_float: list[str] = field(default_factory=list)
    guard_steps: list[GuardStep] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    coverage: IntegerCoverage | None = None

    @property
    def drop_points(self) -> float | None:
        change = self.accuracy.top1_change_points if self.accuracy else None
        return None if change is None else -change

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = dict(self.details)
        if self.accuracy is not None:
            a = self.accuracy
            interval = a.change_interval
            data.update(
                eval_split=a.split,
                eval_images=a.images,
                float_top1=a.reference_top1,
                top1=a.top1,
                top1_drop_points=self.drop_points,
                top1_drop_interval=None if interval is None else [-interval[1], -interval[0]],
                images_lost=a.lost,
                images_gained=a.gained,
                top1_agreement=a.top1_agreement,
                max_abs_diff=a.max_abs_diff,
            )
        data.update(
            evaluated_on=self.evaluated_on,
            kept_in_float=list(self.kept_in_float),
            guard_steps=[s.to_dict() for s in self.guard_steps],
            warnings=list(self.warnings),
            seconds=self.seconds,
        )
        if self.coverage is not None:
            data["integer_coverage"] = self.coverage.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantReport:
        typed = {
            "val_images",
            "eval_images",
            "eval_split",
            "float_top1",
            "top1",
            "top1_drop_points",
            "top1_drop_interval",
            "images_lost",
            "images_gained",
            "top1_agreement",
            "max_abs_diff",
            "evaluated_on",
            "kept_in_float",
            "guard_steps",
            "warnings",
            "seconds",
            "integer_coverage",
        }
        accuracy = None
        if "top1_agreement" in data:
            images = int(data.get("eval_images", data.get("val_images", 0)))  # val_images: manifests before the test split
            accuracy = Comparison(
                images,
                data["max_abs_diff"],
                data["top1_agreement"],
                data.get("top1"),
                data.get("float_top1"),
                data.get("images_lost"),
                data.get("images_gained"),
                data.get("eval_split", "validation"),
            )
        return cls(
            accuracy,
            data.get("evaluated_on", ""),
            list(data.get("kept_in_float", [])),
            [GuardStep.from_dict(s) for s in data.get("guard_steps", [])],
            list(data.get("warnings", [])),
            data.get("seconds", 0.0),
            {k: v for k, v in data.items() if k not in typed},
            IntegerCoverage.from_dict(data["integer_coverage"]) if isinstance(data.get("integer_coverage"), dict) else None,
        )
