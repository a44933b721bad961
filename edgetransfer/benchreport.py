"""What bench reports, as typed records: a row per variant (latency, accuracy, memory), the
machine it ran on, the recommendation, and the report that ``bench.json`` is written from (and
read back into). numpy only."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from .cpu import CpuFeatures
from .metrics import topk_accuracy
from .results import IntegerCoverage, compare, known_fields, without_none
from .runtime.tasks import Tasks

__all__ = ["Latency", "BenchAccuracy", "BenchRow", "Machine", "Recommendation", "BenchReport", "BENCH_SCHEMA"]

BENCH_SCHEMA = "edgetransfer.bench/2"


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
    round_p50_ms: list[float] | None = None  # the median of each round (variants are timed in turn, round after round)

    @property
    def spread(self) -> float | None:
        """How far the round medians lie apart, as a share of their median: (max - min) / median."""
        if not self.round_p50_ms or len(self.round_p50_ms) < 2:
            return None
        middle = float(np.median(self.round_p50_ms))
        return (max(self.round_p50_ms) - min(self.round_p50_ms)) / middle if middle > 0 else None

    @classmethod
    def from_times(cls, batch: int, seconds: list[float], rounds: list[list[float]] | None = None) -> Latency:
        ms = np.array(seconds) * 1000
        medians = [round(float(np.median(r)) * 1000, 4) for r in rounds if r] if rounds else None
        return cls(
            batch,
            len(seconds),
            round(float(ms.mean()), 4),
            round(float(np.percentile(ms, 50)), 4),
            round(float(np.percentile(ms, 90)), 4),
            round(float(np.percentile(ms, 99)), 4),
            round(float(batch / (ms.mean() / 1000)), 2),
            medians,
        )


@dataclass(frozen=True)
class BenchAccuracy:
    """A variant's accuracy on the evaluation images, and against eager where eager ran first."""

    top1: float
    top5: float
    top1_change_points: float | None = None
    top1_agreement: float | None = None
    max_abs_logit_diff: float | None = None
    top1_change_interval: list[float] | None = None  # 95%, paired with eager on the same images
    per_task: dict[str, dict[str, float]] | None = None  # a multi-task model: each task's top-1 and image count

    @classmethod
    def measure(cls, logits: np.ndarray, labels: np.ndarray, eager: np.ndarray | None, tasks: Tasks | None = None) -> BenchAccuracy:
        """``logits`` of a multi-task model come masked to each image's task (:meth:`Tasks.masked`)."""
        top1, top5 = topk_accuracy(logits, labels, 1), topk_accuracy(logits, labels, 5)
        per_task = None
        if tasks is not None:
            rows = tasks.task_of(labels)
            per_task = {
                name: {"top1": topk_accuracy(logits[rows == index], labels[rows == index], 1), "images": int((rows == index).sum())}
                for index, name in enumerate(tasks.names)
            }
        if eager is None:
            return cls(top1, top5, per_task=per_task)
        against = compare(logits, eager, labels)
        interval = against.change_interval
        changes = (against.top1_change_points, against.top1_agreement, against.max_abs_diff, list(interval) if interval else None)
        return cls(top1, top5, *changes, per_task=per_task)


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
    coverage: IntegerCoverage | None = None  # a quantised model run by ONNX Runtime on the CPU

    @property
    def measured(self) -> bool:
        return self.status == "measured"

    def to_dict(self) -> dict[str, Any]:
        data = without_none(asdict(self))
        if not self.measured:
            for name in ("latency", "speedup_vs_eager"):
                data.pop(name, None)
        if self.accuracy is not None:
            data["accuracy"] = without_none(asdict(self.accuracy))
        if self.coverage is not None:
            data["coverage"] = self.coverage.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchRow:
        data = known_fields(cls, data)
        if data.get("accuracy") is not None:
            data["accuracy"] = BenchAccuracy(**data["accuracy"])
        if isinstance(data.get("coverage"), dict):
            data["coverage"] = IntegerCoverage.from_dict(data["coverage"])
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
        data = without_none({f.name: getattr(self, f.name) for f in fields(self)})
        data["cpu"] = self.cpu.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Machine:
        data = known_fields(cls, data)
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
    top1_change_interval: list[float] | None = None
    eval_images: int | None = None
    eval_split: str | None = None


@dataclass
class BenchReport:
    """Everything one ``edgetransfer bench`` measured; ``bench.json`` is its :meth:`to_dict`.

    Attributes:
        options: the :class:`~edgetransfer.config.BenchOptions` it ran with, as written.
        eval_images: how many images every accuracy figure is on.
        eval_split: which images: ``"test"`` (no stage chose on them), ``"validation"`` (a run
            without a test split) or ``"folder"`` (``--data``).
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
    eval_split: str = "validation"

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
            "schema": self.schema,
            "created": self.created,
            "run": self.run,
            "options": self.options,
            "machine": self.machine.to_dict(),
            "eval_images": self.eval_images,
            "eval_split": self.eval_split,
            "checkpoint_sha256": self.checkpoint_sha256,
            "results": [r.to_dict() for r in self.results],
            "complete": self.complete,
            "recommendation": asdict(self.recommendation) if self.recommendation else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchReport:
        recommendation = data.get("recommendation")
        return cls(
            created=data["created"],
            run=data["run"],
            options=data["options"],
            machine=Machine.from_dict(data["machine"]),
            eval_images=data["eval_images"],
            checkpoint_sha256=data["checkpoint_sha256"],
            results=[BenchRow.from_dict(r) for r in data["results"]],
            complete=data.get("complete", False),
            recommendation=Recommendation(**known_fields(Recommendation, recommendation)) if recommendation else None,
            schema=data.get("schema", BENCH_SCHEMA),
            eval_split=data.get("eval_split", "validation"),
        )
