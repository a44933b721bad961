"""What every variant build starts from: the run's verified ONNX model, its metadata, the
held-out images prepared for it and the float model's logits on them, the INT8 guard's
selection images, and the options."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..config import MAX_BATCH, MAX_IMAGES, require_finite, require_ranges
from ..data import Sample
from ..errors import OptionError, QuantizationError
from ..export import parent_onnx, run_onnx
from ..results import Comparison, compare
from ..rundir import RunDir
from ..runtime.metadata import ModelInfo
from .calibration import BatchStream, balanced_sample, folder_samples
from .guard import Selection
from .ort import CalibMethod, run_logits
from .rounding import Rounding

__all__ = ["QuantOptions", "TensorRTOptions", "BuildContext", "open_context"]


@dataclass(frozen=True)
class QuantOptions:
    """INT8 settings.

    Attributes:
        calib: an image folder to calibrate on (classes optional); default: the run's training data.
        calib_size: how many images (class-balanced) to take from the run's training data.
        calib_batch: images per calibration batch.
        method: how activation ranges are chosen (ONNX Runtime; NNCF chooses OpenVINO's itself).
        max_accuracy_drop: the share of the guard's images, in points, whose top-1 class INT8 may change
            against the float model (an upper bound on the top-1 points it may lose there).
        max_float_layers: the most layers the guard may keep in float before giving up.
        dynamic: dynamic (weights-only) quantisation instead of static; slower for CNNs.
        eval_images: cap on held-out images for the accuracy check (all by default).
        guard_images: cap on the validation images the guard chooses on, without labels (they
            are held in memory at the model's input size: 1000 at 224 px are 600 MB).
        rounding: ONNX Runtime INT8's weight rounding: ``auto`` re-rounds every layer with AdaRound
            (AMD Quark) when nearest rounding misses the budget, before any layer goes back to
            float; ``adaround`` always; ``nearest`` never (:mod:`.rounding`).
        adaround_iterations: AdaRound's optimisation steps per layer.
        adaround_images: calibration images AdaRound optimises on (the first of the calibration set).
    """

    calib: Path | None = None
    calib_size: int = 256
    calib_batch: int = 8
    method: CalibMethod = CalibMethod.MINMAX
    max_accuracy_drop: float = 1.0
    max_float_layers: int = 32
    dynamic: bool = False
    eval_images: int | None = None
    guard_images: int | None = 1000
    rounding: Rounding = Rounding.AUTO
    adaround_iterations: int = 200
    adaround_images: int = 64

    def __post_init__(self) -> None:
        require_finite(self)
        object.__setattr__(self, "method", CalibMethod.parse(self.method))
        object.__setattr__(self, "rounding", Rounding.parse(self.rounding))
        if self.calib_size < 1 or self.calib_batch < 1:
            raise OptionError(f"calibration size and batch must be at least 1 (got {self.calib_size}, {self.calib_batch})")
        if self.max_accuracy_drop < 0:
            raise OptionError(f"max accuracy drop must be 0 or more points, got {self.max_accuracy_drop}")
        if self.guard_images is not None and self.guard_images < 1:
            raise OptionError(f"guard images must be at least 1, got {self.guard_images}")
        if self.max_float_layers < 0:
            raise OptionError(f"max float layers must be 0 or more, got {self.max_float_layers}")
        require_ranges(
            self,
            {
                "calib_size": (1, MAX_IMAGES),
                "calib_batch": (1, MAX_BATCH),
                "max_accuracy_drop": (0, 100),
                "max_float_layers": (0, 10**6),
                "eval_images": (1, MAX_IMAGES),
                "guard_images": (1, MAX_IMAGES),
                "adaround_iterations": (1, 10**7),
                "adaround_images": (1, MAX_IMAGES),
            },
        )
        if self.adaround_iterations < 1 or self.adaround_images < 1:
            raise OptionError(f"AdaRound needs at least 1 iteration and 1 image (got {self.adaround_iterations}, {self.adaround_images})")

    def settings(self) -> dict:
        """The options as the manifest records them."""
        return {
            "calib": str(self.calib) if self.calib else None,
            "calib_size": self.calib_size,
            "calib_batch": self.calib_batch,
            "method": self.method.value,
            "max_accuracy_drop": self.max_accuracy_drop,
            "max_float_layers": self.max_float_layers,
            "dynamic": self.dynamic,
            "eval_images": self.eval_images,
            "guard_images": self.guard_images,
            "rounding": self.rounding.value,
            "adaround_iterations": self.adaround_iterations,
            "adaround_images": self.adaround_images,
        }


@dataclass(frozen=True)
class TensorRTOptions:
    """Engine build settings: the optimisation profile of the dynamic batch, workspace, timing cache."""

    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 16
    workspace_mib: int = 2048
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        require_finite(self)
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise OptionError(f"TensorRT batch profile needs 1 <= min <= opt <= max, got {self.min_batch}/{self.opt_batch}/{self.max_batch}")
        if self.workspace_mib < 1:
            raise OptionError(f"TensorRT workspace must be at least 1 MiB, got {self.workspace_mib}")
        require_ranges(self, {"max_batch": (1, MAX_BATCH), "workspace_mib": (1, 2**20)})

    def settings(self) -> dict:
        return {
            "min_batch": self.min_batch,
            "opt_batch": self.opt_batch,
            "max_batch": self.max_batch,
            "workspace_mib": self.workspace_mib,
            "timing_cache": str(self.timing_cache) if self.timing_cache else None,
        }


@dataclass
class BuildContext:
    """The run's float ONNX model and the held-out images every variant is measured on.

    Attributes:
        held_out: the run's test images prepared for the model (validation for a run without a
            test split: :attr:`split` says which), and ``labels`` and ``float_logits`` for them.
    """

    run: RunDir
    base: Path
    info: ModelInfo
    input_name: str
    held_out: np.ndarray
    labels: np.ndarray
    float_logits: np.ndarray
    quant: QuantOptions = field(default_factory=QuantOptions)
    tensorrt: TensorRTOptions = field(default_factory=TensorRTOptions)
    split: str = "validation"
    reference: Path | None = None  # the float model variants are measured against, when not ``base`` (a QAT run's parent's)
    _selection: Selection | None = None

    @property
    def float_model(self) -> Path:
        return self.reference or self.base

    @property
    def prequantized(self) -> bool:
        """``base`` is already INT8 (a QAT run's QDQ model): INT8 ships it as it is."""
        return self.reference is not None

    def compare(self, logits: np.ndarray) -> Comparison:
        """A variant's logits against the float model's, on the held-out images (a multi-task
        model's: each image on its own task's classes, see :meth:`Tasks.masked`)."""
        if self.info.tasks is not None:
            logits = self.info.tasks.masked(logits, self.labels)
        return compare(logits, self.float_logits, self.labels).with_split(self.split)

    def assess(self, report, logits: np.ndarray) -> None:
        """A variant's accuracy against the float model on the held-out images, into its report:
        for a multi-task model also each task's, on its own images, with the paired interval."""
        report.accuracy = self.compare(logits)
        tasks = self.info.tasks
        if tasks is None:
            return
        masked, rows = tasks.masked(logits, self.labels), tasks.task_of(self.labels)
        per_task = {}
        for index, name in enumerate(tasks.names):
            mine = rows == index
            if mine.any():
                found = compare(masked[mine], self.float_logits[mine], self.labels[mine])
                per_task[name] = {
                    "images": found.images,
                    "top1": found.top1,
                    "float_top1": found.reference_top1,
                    "change_interval": found.change_interval,
                }
        report.details["per_task"] = per_task

    def selection(self) -> Selection:
        """The images the INT8 guard chooses on (labels unused): :meth:`RunDir.selection`, never
        a held-out image."""
        if self._selection is None:
            samples = self.run.selection(self.quant.guard_images)
            source = "validation images" if self.run.dataset.test else "every other validation image"
            stream = self.stream(samples, max(1, len(samples)))
            images = _all_images(stream, self.input_name)
            labels = np.array([s.label for s in samples])
            names = [s.name for s in samples]
            self._selection = Selection(images, run_logits(self.float_model, images), names, source, labels, self.info.tasks)
        return self._selection

    def stream(self, samples: list[Sample], batch: int) -> BatchStream:
        """Images prepared for this model's input, streamed in batches."""
        return BatchStream(samples, self.info.preprocessing, self.input_name, self.info.input_format, batch)

    def calibration_samples(self) -> tuple[list[Sample], str]:
        """The calibration images every INT8 target uses, and where they came from.

        Raises:
            QuantizationError: fewer images than one calibration batch.
        """
        quant = self.quant
        if quant.calib is not None:
            samples = folder_samples(Path(quant.calib))
            samples, source = (balanced_sample(samples, quant.calib_size) if len(samples) > quant.calib_size else samples), str(quant.calib)
        else:
            samples, source = balanced_sample(self.run.dataset.train, quant.calib_size), "run training data (class-balanced)"
        if len(samples) < quant.calib_batch:
            raise QuantizationError(
                f"the calibration set has {len(samples)} image(s), fewer than the batch of {quant.calib_batch}; add images or lower --calib-batch"
            )
        return samples, source


def open_context(run: RunDir, quant: QuantOptions, tensorrt: TensorRTOptions) -> BuildContext:
    """Read the run's ONNX model and prepare its held-out images and the float model's logits on them.

    Raises:
        RunError: no fine-tuned run, or its ONNX model is not from its checkpoint.
    """
    base = run_onnx(run)
    reference = parent_onnx(run)
    model = onnx.load(str(base), load_external_data=False)
    info = ModelInfo.from_props({p.key: p.value for p in model.metadata_props})
    input_name = model.graph.input[0].name
    samples, split = run.held_out(quant.eval_images)
    stream = BatchStream(samples, info.preprocessing, input_name, info.input_format, max(1, len(samples)))
    images = _all_images(stream, input_name)
    labels = np.array([s.label for s in samples])
    float_logits = run_logits(reference or base, images)
    if info.tasks is not None:  # each image on its own task's classes
        float_logits = info.tasks.masked(float_logits, labels)
    return BuildContext(run, base, info, input_name, images, labels, float_logits, quant, tensorrt, split, reference)


def _all_images(stream: BatchStream, input_name: str) -> np.ndarray:
    """The one batch ``stream`` holds (every image), as the model's input."""
    batch = stream.get_next()
    if batch is None:
        raise QuantizationError("no images to measure the quantised model on: the run's split is empty; fine-tune on more images")
    return batch[input_name]
