"""The options of fine-tuning and export as frozen dataclasses: shared by the Python API, the
CLI (whose options are made from these fields) and the JSON a run records. torch-free."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .choice import AdaptMethod, FeatureEngine, Mode, OptimizerName, Precision, Target
from .data import DEMO_M, EMBEDDED, Augment, DataSpec, default_workers
from .errors import OptionError
from .runtime.preprocessing import MAX_INPUT_SIZE
from .tasks import MAX_TASKS, TaskSpec
from .weights import DEFAULT_ARCH, default_weights

__all__ = [
    "require_finite",
    "Target",
    "Precision",
    "QatOptions",
    "QAT_TARGETS",
    "GPU_TARGETS",
    "Mode",
    "FeatureEngine",
    "AdaptMethod",
    "OptimizerName",
    "FinetuneConfig",
    "ExportOptions",
    "DEFAULT_OPSET",
    "DEMO_IMAGE_SIZE",
]

DEFAULT_OPSET = 18  # the dynamo exporter's native opset; ONNX Runtime >= 1.14 and TensorRT 10 run it
DEMO_IMAGE_SIZE = 64
DANN_EPOCHS = 20  # the adversarial game is slower than plain fine-tuning: on digits -> digits-M, 10 epochs recovered 50% of the gap, 20 epochs 73%


# Bounds on what a run may ask for: beyond them a value is a typo (an epoch count that never ends,
# a batch no memory holds, a learning rate that only diverges), refused with its range.
MAX_EPOCHS, MAX_BATCH, MAX_LR, MAX_WORKERS = 10_000, 65_536, 10.0, 256
MAX_IMAGES, MAX_THREADS, MAX_SEED = 10**8, 4096, 2**32 - 1


def require_ranges(options: Any, ranges: dict[str, tuple[float, float]]) -> None:
    """Each named setting of ``options`` that is set lies in its ``(low, high)``, both included.

    Raises:
        OptionError: naming the option and its range.
    """
    for name, (low, high) in ranges.items():
        value = getattr(options, name)
        if value is not None and not low <= value <= high:
            raise OptionError(f"--{name.replace('_', '-')} must be between {low:g} and {high:g}, got {value}")


def require_finite(options: Any) -> None:
    """Every float setting of ``options`` (an options dataclass) is a finite number: NaN fails
    every comparison a range check makes, so ``--max-accuracy-drop nan`` would turn the guard off.

    Raises:
        OptionError: naming the option.
    """
    for item in fields(options):
        value = getattr(options, item.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise OptionError(f"--{item.name.replace('_', '-')} must be a finite number, got {value}")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that decides a fine-tuning run; saved as ``config.json`` in the run directory.

    ``None`` fields get defaults that depend on the others (see :meth:`resolved`).
    """

    data: DataSpec = field(default_factory=DataSpec)
    arch: str = DEFAULT_ARCH
    weights: str | None = None
    mode: Mode | None = None
    unfreeze_blocks: int = 0
    image_size: int | None = None
    epochs: int | None = None
    batch_size: int = 64
    lr: float | None = None
    backbone_lr_scale: float | None = None
    optimizer: OptimizerName = OptimizerName.ADAMW
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    augment: Augment = Augment.CROP
    probe_epochs: int | None = None
    train_bn_stats: bool | None = None
    patience: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    feature_engine: FeatureEngine = FeatureEngine.AUTO
    workers: int | None = None
    shots: int | None = None
    adapt: str | None = None
    adapt_method: AdaptMethod | None = None
    adapt_eval: str | None = None
    tasks: tuple[TaskSpec, ...] = ()  # several tasks on one backbone (then ``data`` is unused)

    def __post_init__(self) -> None:
        require_finite(self)
        if self.adapt is not None:  # dann, the default, trains the backbone: full mode unless asked otherwise
            object.__setattr__(self, "adapt_method", AdaptMethod.parse(self.adapt_method or AdaptMethod.DANN))
            if self.adapt_eval is None and self.adapt == DEMO_M:
                object.__setattr__(self, "adapt_eval", DEMO_M)  # the demo measures on digits-M's test split
        object.__setattr__(self, "tasks", tuple(self.tasks))
        trains_blocks = self.adapt_method is AdaptMethod.DANN and not self.unfreeze_blocks
        default_mode = Mode.FULL if trains_blocks else Mode.HEAD
        object.__setattr__(self, "mode", Mode.parse(self.mode or default_mode))
        object.__setattr__(self, "optimizer", OptimizerName.parse(self.optimizer))
        object.__setattr__(self, "augment", Augment.parse(self.augment))
        object.__setattr__(self, "feature_engine", FeatureEngine.parse(self.feature_engine))
        for ok, message in self._checks():
            if not ok:
                raise OptionError(message)

    def _checks(self) -> list[tuple[bool, str]]:
        """(holds, what to say when it does not) for every setting and combination of settings."""
        return [
            (self.epochs is None or 1 <= self.epochs <= MAX_EPOCHS, f"epochs must be between 1 and {MAX_EPOCHS}, got {self.epochs}"),
            (1 <= self.batch_size <= MAX_BATCH, f"batch size must be between 1 and {MAX_BATCH}, got {self.batch_size}"),
            (self.lr is None or 0 < self.lr <= MAX_LR, f"learning rate must be in (0, {MAX_LR}], got {self.lr}"),
            (0 <= self.weight_decay <= 1, f"weight decay must be in [0, 1], got {self.weight_decay}"),
            (0 <= self.warmup_epochs <= MAX_EPOCHS, f"warm-up epochs must be between 0 and {MAX_EPOCHS}, got {self.warmup_epochs}"),
            (0 <= self.seed <= MAX_SEED, f"seed must be between 0 and {MAX_SEED}, got {self.seed}"),
            (self.workers is None or 0 <= self.workers <= MAX_WORKERS, f"workers must be between 0 and {MAX_WORKERS}, got {self.workers}"),
            (self.unfreeze_blocks >= 0, f"unfreeze blocks must be 0 or more, got {self.unfreeze_blocks}"),
            (self.mode is Mode.HEAD or self.unfreeze_blocks == 0, "--unfreeze goes with --mode head (full trains every block)"),
            (0 <= self.label_smoothing < 1, f"label smoothing must be in [0, 1), got {self.label_smoothing}"),
            (
                self.probe_epochs is None or 0 <= self.probe_epochs <= MAX_EPOCHS,
                f"probe epochs must be between 0 and {MAX_EPOCHS}, got {self.probe_epochs}",
            ),
            (self.patience is None or 1 <= self.patience <= MAX_EPOCHS, f"patience must be between 1 and {MAX_EPOCHS}, got {self.patience}"),
            (self.unfreeze_blocks <= MAX_EPOCHS, f"unfreeze blocks must be at most {MAX_EPOCHS}, got {self.unfreeze_blocks}"),
            (self.shots is None or self.shots <= MAX_IMAGES, f"shots must be at most {MAX_IMAGES}, got {self.shots}"),
            (
                self.image_size is None or 16 <= self.image_size <= MAX_INPUT_SIZE,
                f"image size must be between 16 and {MAX_INPUT_SIZE}, got {self.image_size}",
            ),
            (self.shots is None or self.shots >= 1, f"shots must be at least 1, got {self.shots}"),
            (self.mode is not Mode.PROTOTYPE or self.unfreeze_blocks == 0, "--unfreeze trains blocks; a prototype head trains nothing"),
            (self.backbone_lr_scale is None or 0 < self.backbone_lr_scale <= 1, f"backbone lr scale must be in (0, 1], got {self.backbone_lr_scale}"),
            (
                self.adapt is not None or (self.adapt_method is None and self.adapt_eval is None),
                "--adapt-method and --adapt-eval go with --adapt TARGET_DIR (the folder of unlabelled target images)",
            ),
            (
                self.adapt is None or self.mode is not Mode.PROTOTYPE,
                "--adapt goes with --mode head or full; a prototype head trains nothing to adapt",
            ),
            (
                self.adapt_method is not AdaptMethod.DANN or not self.caches_features,
                "dann trains the backbone and head mode trains a frozen one's cached features; use --mode full, --unfreeze K, or --adapt-method adabn",
            ),
            *self._task_checks(),
        ]

    def _task_checks(self) -> list[tuple[bool, str]]:
        if not self.tasks:
            return []
        return [
            (2 <= len(self.tasks) <= MAX_TASKS, f"a multi-task run takes 2 to {MAX_TASKS} tasks, got {len(self.tasks)}; one task is --data"),
            (
                self.mode is not Mode.PROTOTYPE,
                "--mode prototype takes one task (--data); with several tasks give one a prototype head: --task-head NAME=prototype",
            ),
            (self.adapt is None and self.shots is None, "--adapt and --shots take one task (--data), not --tasks"),
            (
                not any(t.prototype for t in self.tasks) or self.caches_features,
                "a prototype task's classes are means of frozen features, so it goes with --mode head and no --unfreeze",
            ),
            (
                not all(t.prototype for t in self.tasks),
                "every task is a prototype task, so nothing would train; keep a Linear head on one task, or make each its own run (--mode prototype)",
            ),
        ]

    @property
    def multitask(self) -> bool:
        return bool(self.tasks)

    @property
    def caches_features(self) -> bool:
        return self.mode is Mode.PROTOTYPE or (self.mode is Mode.HEAD and self.unfreeze_blocks == 0)

    def resolved(self) -> "FinetuneConfig":
        """Fill the defaults that depend on other fields (weights, size, epochs, lr, workers)."""
        weights = self.weights if self.weights is not None else default_weights(self.arch)
        embedded = all(t.data.source in EMBEDDED for t in self.tasks) if self.tasks else self.data.source in EMBEDDED
        data = self.tasks[0].data if self.tasks else self.data
        scratch = weights.lower() == "none"  # nothing pretrained: no probe, one lr, live BatchNorm
        return replace(
            self,
            weights=weights,
            backbone_lr_scale=self.backbone_lr_scale or (1.0 if scratch else 0.1),
            train_bn_stats=self.train_bn_stats if self.train_bn_stats is not None else scratch,
            image_size=self.image_size or (DEMO_IMAGE_SIZE if embedded else None),
            epochs=self.epochs or (30 if self.caches_features else DANN_EPOCHS if self.adapt_method is AdaptMethod.DANN else 10),
            probe_epochs=self.probe_epochs if self.probe_epochs is not None else (0 if self.caches_features or scratch else 10),
            lr=self.lr or (1e-2 if self.caches_features else 1e-3),
            workers=self.workers if self.workers is not None else default_workers(data),
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            mode=self.mode.value if self.mode else None,
            optimizer=self.optimizer.value,
            augment=self.augment.value,
            feature_engine=self.feature_engine.value,
            adapt_method=self.adapt_method.value if self.adapt_method else None,
        )
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FinetuneConfig":
        data = dict(data)
        data["data"] = DataSpec.from_dict(data["data"])
        data["tasks"] = tuple(TaskSpec.from_dict(task) for task in data.get("tasks") or ())
        return cls(**data)


@dataclass(frozen=True)
class ExportOptions:
    """How to export.

    Attributes:
        opset: ONNX opset of the default domain.
        static_batch: fix the batch dimension to this size; ``None`` keeps it dynamic.
        fuse_preprocess: take uint8 NHWC images at the input size; scaling and normalisation
            happen inside the graph.
        verify: compare ONNX Runtime with PyTorch on validation images after export.
        atol: absolute part of the accepted logit difference.
        rtol: relative part: an output passes when ``|onnx - torch| <= atol + rtol * |torch|``,
            as numpy's ``allclose`` and Polygraphy compare (large logits differ more in absolute terms).
        verify_images: how many validation images the check uses.
        output: file to write; default ``model.onnx`` (``model-uint8.onnx`` when fused) in the run.
    """

    opset: int = DEFAULT_OPSET
    static_batch: int | None = None
    fuse_preprocess: bool = False
    verify: bool = True
    atol: float = 1e-3
    rtol: float = 1e-4
    verify_images: int = 64
    output: Path | None = None

    def __post_init__(self) -> None:
        require_finite(self)
        require_ranges(self, {"static_batch": (1, MAX_BATCH), "verify_images": (1, MAX_IMAGES)})
        if not 7 <= self.opset <= 23:
            raise OptionError(f"opset must be between 7 and 23, got {self.opset}")
        if self.atol <= 0 or self.rtol < 0:
            raise OptionError(f"atol must be positive and rtol 0 or more, got atol {self.atol}, rtol {self.rtol}")
        if self.verify_images < 1:
            raise OptionError(f"verify images must be at least 1, got {self.verify_images}")

    @property
    def artifact(self) -> str:
        return "onnx-uint8" if self.fuse_preprocess else "onnx"

    def settings(self) -> dict[str, Any]:
        data = asdict(self)
        data["output"] = str(self.output) if self.output else None
        return data


QAT_TARGETS = tuple(target.value for target in Target)
GPU_TARGETS = tuple(target.value for target in Target if target.on_gpu)  # names, as a QAT record holds them


@dataclass(frozen=True)
class QatOptions:
    """Settings of a QAT run.

    Attributes:
        target: where the INT8 model will run; decides the scheme (:func:`qat_scheme`).
        epochs: epochs of fine-tuning with fake quantisation; the best by the quantised model's
            validation top-1 is kept (epoch 0 is the calibrated model before any training).
        lr: peak AdamW learning rate for every weight (one epoch of warm-up, then cosine decay).
            On the demo (5 epochs), 1e-5 reached 94.71% quantised validation top-1, 3e-5 95.82% and
            1e-4 97.21%, but 1e-4 fell to 85% in its first epoch; 3e-5 is the cautious default.
        calib_size: training images (class-balanced) the quantizers' ranges are calibrated on.
        batch_size: images per step (default: the parent run's).
        seed: seeds the calibration sample, shuffling and augmentation.
    """

    target: str = "ort-cpu"
    epochs: int = 3
    lr: float = 3e-5
    calib_size: int = 256
    batch_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        require_finite(self)
        if self.target not in QAT_TARGETS:
            raise OptionError(f"unknown QAT target {self.target!r}; choose one of {', '.join(QAT_TARGETS)}")
        if not 0 <= self.epochs <= MAX_EPOCHS:
            raise OptionError(f"--qat-epochs must be between 0 and {MAX_EPOCHS}, got {self.epochs}")
        require_ranges(self, {"calib_size": (1, MAX_IMAGES), "batch_size": (1, MAX_BATCH), "seed": (0, MAX_SEED)})
        if not 0 < self.lr < 1:
            raise OptionError(f"--qat-lr must be between 0 and 1, got {self.lr}")
        if self.calib_size < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise OptionError("QAT calibration size and batch size must be at least 1")


@dataclass(frozen=True)
class BenchOptions:
    """How to measure.

    Attributes:
        batch_sizes: batch sizes to time.
        threads: CPU threads for torch and ONNX Runtime (default: the machine's cores).
        auto_threads: try 1..cores per variant and keep the fastest at the first batch size.
        warmup: untimed runs before timing.
        iterations: timed runs (at least), per variant and batch size, spread over the rounds.
        min_seconds: keep timing (whole rounds) until each variant has run this long as well.
        rounds: the variants are timed in turn, ``rounds`` times over (A B C A B C ...), so that
            a machine that slows down or speeds up affects them all alike; each variant's spread
            across rounds is reported.
        max_accuracy_drop: top-1 points a recommended variant may lose against eager.
        variants: names to bench (manifest artifacts); empty: all.
        models: extra ONNX files to bench on the CPU.
        replaces: single-task runs a multi-task run replaces: their ONNX models are benched run in
            turn, as one variant whose outputs are theirs side by side (each task's accuracy is its
            own model's, the latency that of running them all).
        data: image folder to evaluate on (its classes must be the model's); default: the run's test split.
        eval_images: cap on evaluation images.
    """

    batch_sizes: tuple[int, ...] = (1, 8)
    threads: int | None = None
    auto_threads: bool = False
    warmup: int = 5
    iterations: int = 30
    min_seconds: float = 0.0
    rounds: int = 5
    max_accuracy_drop: float = 1.0
    variants: tuple[str, ...] = ()
    models: tuple[Path, ...] = ()
    replaces: tuple[Path, ...] = ()
    data: Path | None = None
    eval_images: int | None = None

    def __post_init__(self) -> None:
        require_finite(self)
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise OptionError(f"batch sizes must be at least 1, got {list(self.batch_sizes)}")
        if self.threads is not None and self.threads < 1:
            raise OptionError(f"threads must be at least 1, got {self.threads}")
        if self.iterations < 1 or self.warmup < 0:
            raise OptionError("iterations must be at least 1 and warm-up 0 or more")
        if self.rounds < 1:
            raise OptionError(f"rounds must be at least 1, got {self.rounds}")
        if self.eval_images is not None and self.eval_images < 1:
            raise OptionError(f"eval images must be at least 1, got {self.eval_images}")
        if max(self.batch_sizes) > MAX_BATCH:
            raise OptionError(f"batch sizes must be at most {MAX_BATCH}, got {list(self.batch_sizes)}")
        require_ranges(
            self,
            {
                "threads": (1, MAX_THREADS),
                "warmup": (0, 10**6),
                "iterations": (1, 10**7),
                "rounds": (1, 10**5),
                "eval_images": (1, MAX_IMAGES),
                "min_seconds": (0, 86_400),
                "max_accuracy_drop": (0, 100),
            },
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["batch_sizes"] = list(self.batch_sizes)
        data["variants"] = list(self.variants)
        data["models"] = [str(m) for m in self.models]
        data["replaces"] = [str(r) for r in self.replaces]
        data["data"] = str(self.data) if self.data else None
        return data
