"""What the stages report, as typed records: parity of an export, a variant's build, a step of the
accuracy guard, a bench row and the machine it ran on. Each one writes (and reads back) the JSON
that lands in ``manifest.json`` and ``bench.json``; nothing else reads those files by key.

Also the one comparator every stage uses: a candidate's outputs against a reference's on the same
images (top-1 against labels where there are labels, top-1 agreement, largest logit difference).
numpy only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from .metrics import topk_accuracy
from .cpu import CpuFeatures

__all__ = [
    "Comparison",
    "compare",
    "Parity",
    "GuardStep",
    "VariantReport",
    "Latency",
    "BenchAccuracy",
    "BenchRow",
    "Machine",
    "Recommendation",
    "BenchReport",
    "BENCH_SCHEMA",
]

BENCH_SCHEMA = "edgetransfer.bench/2"


def _known(cls, data: dict[str, Any]) -> dict[str, Any]:
    """The items of ``data`` that are fields of ``cls`` (a newer writer may add fields)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _without_none(data: dict[str, Any]) -> dict[str, Any]:
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
    """

    images: int
    max_abs_diff: float
    top1_agreement: float
    top1: float | None = None
    reference_top1: float | None = None

    @property
    def top1_change_points(self) -> float | None:
        """The candidate's top-1 minus the reference's, in points (negative: it lost accuracy)."""
        if self.top1 is None or self.reference_top1 is None:
            return None
        return round(100 * (self.top1 - self.reference_top1), 4)


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
    return Comparison(result.images, result.max_abs_diff, result.top1_agreement,
                      topk_accuracy(candidate, labels, 1), topk_accuracy(reference, labels, 1))


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Parity:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class GuardStep:
    """One state of the INT8 accuracy guard: the layers kept in float and how far the model was from float."""

    kept_in_float: tuple[str, ...]
    drop_points: float
    logit_mse: float

    def to_dict(self) -> dict[str, Any]:
        return {"kept_in_float": list(self.kept_in_float), "drop_points": round(self.drop_points, 3),
                "logit_mse": round(self.logit_mse, 6)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GuardStep:
        return cls(tuple(data["kept_in_float"]), data["drop_points"], data["logit_mse"])


@dataclass
class VariantReport:
    """What building one variant made of it.

    Attributes:
        accuracy: the variant against the float ONNX model on the run's validation images.
        evaluated_on: the runtime the accuracy was measured on.
        kept_in_float: layers (INT8) or operator types (FP16) left in float.
        guard_steps: every step the INT8 accuracy guard took.
        warnings: what the user was warned about while building it.
        seconds: how long the build took.
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

    @property
    def drop_points(self) -> float | None:
        change = self.accuracy.top1_change_points if self.accuracy else None
        return None if change is None else -change

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = dict(self.details)
        if self.accuracy is not None:
            a = self.accuracy
            data.update(val_images=a.images, float_top1=a.reference_top1, top1=a.top1, top1_drop_points=self.drop_points,
                        top1_agreement=a.top1_agreement, max_abs_diff=a.max_abs_diff)
        data.update(evaluated_on=self.evaluated_on, kept_in_float=list(self.kept_in_float),
                    guard_steps=[s.to_dict() for s in self.guard_steps], warnings=list(self.warnings), seconds=self.seconds)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantReport:
        typed = {"val_images", "float_top1", "top1", "top1_drop_points", "top1_agreement", "max_abs_diff",
                 "evaluated_on", "kept_in_float", "guard_steps", "warnings", "seconds"}
        accuracy = None
        if "top1_agreement" in data:
            accuracy = Comparison(data["val_images"], data["max_abs_diff"], data["top1_agreement"], data.get("top1"),
                                  data.get("float_top1"))
        return cls(accuracy, data.get("evaluated_on", ""), list(data.get("kept_in_float", [])),
                   [GuardStep.from_dict(s) for s in data.get("guard_steps", [])], list(data.get("warnings", [])),
                   data.get("seconds", 0.0), {k: v for k, v in data.items() if k not in typed})


@dataclass(frozen=True)
class Latency:
    """Timed runs of one variant at one batch size (after warm-up)."""

    batch: int
    iterations: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput_ips: float

    @classmethod
    def from_times(cls, batch: int, seconds: list[float]) -> Latency:
        ms = np.array(seconds) * 1000
        return cls(batch, len(seconds), round(float(ms.mean()), 4), round(float(np.percentile(ms, 50)), 4),
                   round(float(np.percentile(ms, 90)), 4), round(float(np.percentile(ms, 99)), 4),
                   round(float(batch / (ms.mean() / 1000)), 2))


@dataclass(frozen=True)
class BenchAccuracy:
    """A variant's accuracy on the evaluation images, and against eager where eager ran first."""

    top1: float
    top5: float
    top1_change_points: float | None = None
    top1_agreement: float | None = None
    max_abs_logit_diff: float | None = None

    @classmethod
    def measure(cls, logits: np.ndarray, labels: np.ndarray, eager: np.ndarray | None) -> BenchAccuracy:
        top1, top5 = topk_accuracy(logits, labels, 1), topk_accuracy(logits, labels, 5)
        if eager is None:
            return cls(top1, top5)
        against = compare(logits, eager, labels)
        return cls(top1, top5, against.top1_change_points, against.top1_agreement, against.max_abs_diff)


@dataclass
class BenchRow:
    """One variant in a bench run: measured, skipped (cannot run here) or failed (with the reason)."""

    variant: str
    path: str
    kind: str
    size_bytes: int | None = None
    threads: int | None = None
    status: str = "pending"
    reason: str | None = None
    provider: str | None = None
    cold_start_s: float | None = None
    backend_settings: dict[str, str] | None = None
    accuracy: BenchAccuracy | None = None
    latency: dict[str, Latency] = field(default_factory=dict)
    rss_mb: float | None = None
    rss_increase_mb: float | None = None
    process_peak_rss_mb: float | None = None
    gpu_peak_torch_mb: float | None = None
    speedup_vs_eager: dict[str, float] = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        return self.status == "measured"

    def to_dict(self) -> dict[str, Any]:
        data = _without_none(asdict(self))
        if not self.measured:
            for name in ("latency", "speedup_vs_eager"):
                data.pop(name, None)
        if self.accuracy is not None:
            data["accuracy"] = _without_none(asdict(self.accuracy))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchRow:
        data = _known(cls, data)
        if data.get("accuracy") is not None:
            data["accuracy"] = BenchAccuracy(**data["accuracy"])
        data["latency"] = {b: Latency(**t) for b, t in data.get("latency", {}).items()}
        return cls(**data)


@dataclass(frozen=True)
class Machine:
    """Where a bench ran: CPU features, cores, memory, OS, library versions, providers, threads, GPU."""

    cpu: CpuFeatures
    cores: int | None
    memory_gib: float | None
    os: str
    versions: dict[str, str]
    onnxruntime_providers: list[str]
    threads: int
    ort_spinning: bool = False
    gpu: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = _without_none({f.name: getattr(self, f.name) for f in fields(self)})
        data["cpu"] = self.cpu.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Machine:
        data = _known(cls, data)
        data["cpu"] = CpuFeatures(**{k: v for k, v in data["cpu"].items() if k != "int8_fast"})
        return cls(**data)


@dataclass(frozen=True)
class Recommendation:
    """The fastest measured variant within the accuracy budget, at the first batch size."""

    variant: str
    batch_size: int
    mean_ms: float
    speedup_vs_eager: float | None
    top1_change_points: float
    max_accuracy_drop: float


@dataclass
class BenchReport:
    """Everything one ``edgetransfer bench`` measured; ``bench.json`` is its :meth:`to_dict`.

    Attributes:
        options: the :class:`~edgetransfer.bench.BenchOptions` it ran with, as written.
        eval_images: how many images every accuracy figure is on.
        results: one row per variant, eager first.
        complete: ``False`` while variants are still being measured.
    """

    created: str
    run: str
    options: dict[str, Any]
    machine: Machine
    eval_images: int
    checkpoint_sha256: str
    results: list[BenchRow] = field(default_factory=list)
    complete: bool = False
    recommendation: Recommendation | None = None
    schema: str = BENCH_SCHEMA

    @property
    def batch_sizes(self) -> list[int]:
        return [int(b) for b in self.options["batch_sizes"]]

    @property
    def budget(self) -> float:
        return float(self.options["max_accuracy_drop"])

    def row(self, variant: str) -> BenchRow | None:
        return next((r for r in self.results if r.variant == variant), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema, "created": self.created, "run": self.run, "options": self.options,
            "machine": self.machine.to_dict(), "eval_images": self.eval_images, "checkpoint_sha256": self.checkpoint_sha256,
            "results": [r.to_dict() for r in self.results], "complete": self.complete,
            "recommendation": asdict(self.recommendation) if self.recommendation else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchReport:
        recommendation = data.get("recommendation")
        return cls(
            created=data["created"], run=data["run"], options=data["options"], machine=Machine.from_dict(data["machine"]),
            eval_images=data["eval_images"], checkpoint_sha256=data["checkpoint_sha256"],
            results=[BenchRow.from_dict(r) for r in data["results"]], complete=data.get("complete", False),
            recommendation=Recommendation(**recommendation) if recommendation else None, schema=data.get("schema", BENCH_SCHEMA),
        )
