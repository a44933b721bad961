"""The Predictor: an exported model that classifies images, with the preprocessing it was
trained with, on the provider asked for; and the enrolment of prototype models' classes."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from . import wire
from .enrolment import Enrolment, PrototypeHead, check_label, enrolled_model, image_record, now, prototype_head, prototype_of
from .errors import PredictorError
from .files import write_bytes
from .metadata import UINT8_NHWC, ModelInfo, model_info, verify_recorded
from .openvino_ir import OpenVinoSession
from .preprocessing import ImageInput, Preprocessing, is_single, to_image
from .providers import OrtSession, check_providers, openvino_session, probe_provider, provider_name
from .sessions import cap_memory, run_batched
from .tasks import Tasks

__all__ = ["Predictor", "Prediction", "PredictorError", "ImageInput", "probe_provider", "softmax", "prepare", "crop", "ranked", "answers", "as_json"]


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    probability: float


class Predictor:
    """Classify images with an exported model, applying the preprocessing it was trained with.

    Thread-safe: many threads may call :meth:`predict` on one Predictor.

    Args:
        model: path to an ``.onnx`` file or its bytes, or to an OpenVINO IR ``.xml`` (with its
            ``.bin`` beside it), which runs on OpenVINO instead of ONNX Runtime.
        providers: ONNX Runtime providers in order of preference (``"cuda"``, ``"cpu"`` or full
            names); default CPU. Not for an OpenVINO IR (see ``device``).
        allow_fallback: accept a session that did not get the first provider asked for (it
            runs on the next one that loaded) instead of raising. :attr:`provider` says which.
        preprocessing: for a model without edgetransfer metadata (or to override it).
        labels: class names for a model without edgetransfer metadata.
        threads: ONNX Runtime intra-op threads (default: ONNX Runtime's choice), and the threads
            that decode and resize the images of one call (default: one per core).
        spinning: let idle ONNX Runtime threads spin; off by default, since spinning threads
            slow everything else down on small shared machines.
        timeout: seconds one ``session.run`` may take before it is stopped and refused (ONNX
            models; a model file can hold a graph that never ends). Default: no limit.
        max_memory_mb: cap the CPU memory ONNX Runtime holds in this process (every session
            opened from now on, together; weights included), so that a model file cannot make it
            take more: a request over the cap is refused before it is allocated. One cap per
            process (:func:`~edgetransfer.runtime.sessions.cap_memory`). Default: no cap.
        batch_size: how many images one ``session.run`` gets at most.
        device: OpenVINO device for an IR (``"CPU"``, ``"GPU"``, ``"AUTO"``).
        fast_jpeg: decode JPEG files at a reduced scale (libjpeg's DCT scaling) while their
            shorter side stays at least twice the model's resize size. A 1920x1080 photo for a
            224 px model decodes and resizes about 2.3x faster, and its pixels differ from the
            exact path by at most 2 levels of 255; off by default, so that predictions repeat
            the training-time transform exactly.

    Raises:
        PredictorError: unreadable model, missing metadata, or a provider that is not there.
    """

    def __init__(
        self,
        model: str | os.PathLike | bytes,
        providers: Sequence[str] | None = None,
        *,
        allow_fallback: bool = False,
        preprocessing: Preprocessing | None = None,
        labels: Sequence[str] | None = None,
        threads: int | None = None,
        spinning: bool = False,
        timeout: float | None = None,
        max_memory_mb: int | None = None,
        batch_size: int = 32,
        device: str = "CPU",
        fast_jpeg: bool = False,
    ) -> None:
        if batch_size < 1:
            raise PredictorError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.fast_jpeg = fast_jpeg
        self._decoders = threads or os.cpu_count() or 1  # threads that decode and resize a batch's images
        self.verified_by = None if isinstance(model, bytes) else verify_recorded(Path(model))
        self._model = model
        if timeout is not None and not timeout > 0:
            raise PredictorError(f"timeout must be a positive number of seconds, got {timeout}")
        openvino_ir = not isinstance(model, bytes) and Path(model).suffix.lower() == ".xml"
        if max_memory_mb is not None:
            if openvino_ir:
                raise PredictorError("max_memory_mb caps ONNX Runtime's memory; an OpenVINO IR runs on OpenVINO, which it does not cap")
            cap_memory(max_memory_mb)
        self._session_settings = ([provider_name(p) for p in (providers or ["cpu"])], threads, spinning, timeout)
        self._overrides = (preprocessing, labels)
        if openvino_ir and not isinstance(model, bytes):
            self._session = openvino_session(Path(model), providers, device, threads)
            self.fallback = None
        else:
            self._session = OrtSession(model, *self._session_settings)
            self.fallback = check_providers(self._session.wanted, self._session.providers, allow_fallback)
        self.providers = self._session.providers
        self.info = model_info(self._session, preprocessing, labels)
        self._fixed_batch = self._session.fixed_batch

    @property
    def provider(self) -> str:
        """The execution provider the session really runs on (``OpenVINO:CPU`` for an IR)."""
        return self.providers[0]

    @property
    def labels(self) -> tuple[str, ...]:
        """Every class, in the order of the logits (a multi-task model's as ``task:label``)."""
        return self.info.labels

    @property
    def tasks(self) -> Tasks | None:
        """A multi-task model's tasks (names and labels, in the order of the logits); else ``None``."""
        return self.info.tasks

    @property
    def session(self) -> OrtSession | OpenVinoSession:
        """The session this Predictor runs: ``run(batch)`` gives the logits of preprocessed input;
        ``providers``, ``props`` (the model's metadata) and ``signature`` describe it."""
        return self._session

    def predict(self, images: ImageInput | Sequence[ImageInput], top_k: int = 5):
        """Top-k labels with probabilities.

        Args:
            images: one image, or a list of them: file paths, encoded bytes, Pillow images, or
                HxWx3 uint8 RGB arrays (HxW greyscale and HxWx4 RGBA are accepted too).
            top_k: how many classes per image (capped at the number of classes).

        Returns:
            For one image a list of :class:`Prediction`, best first; for a list, one such list
            per image. For a multi-task model (:attr:`tasks`), each image's answer is a mapping
            of task name to such a list (``top_k`` per task).

        Raises:
            PredictorError: an unreadable image or an array of the wrong shape or dtype.
        """
        single = is_single(images)
        batch = [cast(ImageInput, images)] if single else list(cast(Sequence[ImageInput], images))
        logits = self.logits(batch)
        tasks = self.info.tasks
        if tasks is None:
            results = ranked(softmax(logits), self.info.labels, top_k)
            return results[0] if single else results
        per_task = {
            name: ranked(softmax(part), labels, top_k) for (name, part), labels in zip(tasks.split(logits).items(), tasks.labels, strict=True)
        }
        answers = [{name: per_task[name][row] for name in tasks.names} for row in range(len(batch))]
        return answers[0] if single else answers

    def logits(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Raw model outputs, one row per image."""
        if len(images) == 0:
            return np.zeros((0, len(self.info.labels)), dtype=np.float32)
        return self.run_prepared(self._feed(images))

    def run_prepared(self, pixels: np.ndarray) -> np.ndarray:
        """The logits of rows that :func:`prepare` made (stacked), one row per image.

        Raises:
            PredictorError: rows of the wrong shape or type for the model, or outputs that are
                not finite or do not fit the labels.
        """
        logits = run_batched(self._session.run, pixels, self.batch_size, self._fixed_batch)
        if not np.isfinite(logits).all():
            raise PredictorError("the model's outputs are not all finite numbers (NaN or infinity): the model file is broken; export it again")
        if logits.ndim != 2 or logits.shape[1] != len(self.info.labels):
            raise PredictorError(
                f"the model outputs {logits.shape[1:]} scores per image for {len(self.info.labels)} labels;"
                " its metadata belongs to another model: export again"
            )
        return logits

    def run_crops(self, crops: np.ndarray) -> np.ndarray:
        """The logits of stacked :func:`crop` results (uint8 NHWC), normalised here as
        :func:`prepare` would have: the same rows, so the same answers as :meth:`predict`.

        Raises:
            PredictorError: crops of the wrong shape or type, or outputs as in :meth:`run_prepared`.
        """
        size = self.info.preprocessing.input_size
        if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (size, size, 3):
            raise PredictorError(f"crops must be uint8 of shape (N, {size}, {size}, 3), got {crops.dtype} {crops.shape}")
        if self.info.input_format == UINT8_NHWC:
            return self.run_prepared(crops)
        return self.run_prepared(np.stack([self.info.preprocessing.normalize(c) for c in crops]))

    def _feed(self, images: Sequence[ImageInput]) -> np.ndarray:
        if len(images) == 1 or self._decoders == 1:
            return np.stack([self._prepare(image) for image in images])

        with ThreadPoolExecutor(max_workers=min(self._decoders, len(images))) as pool:
            return np.stack(list(pool.map(self._prepare, images)))

    # -- prototype models: enrolment -------------------------------------------------------

    def features(self, images: Sequence[ImageInput], *, task: str | None = None) -> np.ndarray:
        """A prototype head's normalised features (its ``features`` output; ``features_TASK`` for
        a multi-task model's prototype task), one row per image.

        Raises:
            PredictorError: the model (or ``task``) has no prototype head (see :meth:`enrol`).
        """
        head = self._prototype_head(task)
        if len(images) == 0:
            raise PredictorError("no images given: enrol a class from at least one image of it")
        return run_batched(lambda chunk: self._session.run_output(head.features, chunk), self._feed(images), self.batch_size, self._fixed_batch)

    def enrol(self, label: str, images: ImageInput | Sequence[ImageInput], *, replace: bool = False, task: str | None = None) -> Enrolment:
        """Add class ``label`` (or, with ``replace``, make it anew) from a few of its images.

        The class's prototype is the normalised mean of the images' features, computed with this
        model (an INT8 model's own features for an INT8 model); the prototype matrix stays float.
        For a multi-task model the class goes into ``task`` (default: its one prototype task), and
        no other task changes. This Predictor then runs the new model; :meth:`save` writes it.
        Nothing changes on error. Unlike :meth:`predict`, not to be called while other threads
        predict with this Predictor.

        Raises:
            PredictorError: a model or task without a prototype head, a label that exists
                (without ``replace``) or cannot be stored, no images, or an image that cannot be used.
        """
        started = time.perf_counter()
        label = check_label(label)
        data, head = self.model_bytes(), self._prototype_head(task)
        matrix, labels = self._prototypes(data, head), list(head.labels)
        if label in labels and not replace:
            raise PredictorError(f"class {label!r} exists already; pass replace=True (--replace) to make it anew from these images")
        batch = [cast(ImageInput, images)] if is_single(images) else list(cast(Sequence[ImageInput], images))
        features = self.features(batch, task=task)
        row = prototype_of(features)
        if label in labels:
            matrix = matrix.copy()
            matrix[labels.index(label)] = row
        else:
            matrix, labels = np.vstack([matrix, row[None]]), [*labels, label]
        recognised = int((np.argmax(features @ matrix.T, axis=1) == labels.index(label)).sum())  # the Gemm's argmax
        action = "replace" if label in head.labels else "add"
        record = {"action": action, "label": label, **head.named, "time": now(), "images": [image_record(im, i) for i, im in enumerate(batch)]}
        self._reload(enrolled_model(data, head.initializer, matrix, head.metadata(labels), record))
        return Enrolment(action, label, len(batch), len(labels), time.perf_counter() - started, recognised, head.task)

    def remove(self, label: str, *, task: str | None = None) -> Enrolment:
        """Remove class ``label`` (of ``task``, for a multi-task model); this Predictor then runs
        the new model (:meth:`save` writes it).

        Raises:
            PredictorError: a model or task without a prototype head, an unknown label, or the last two classes.
        """
        started = time.perf_counter()
        data, head = self.model_bytes(), self._prototype_head(task)
        matrix, labels = self._prototypes(data, head), list(head.labels)
        if label not in labels:
            raise PredictorError(f"there is no class {label!r} to remove; the classes: {', '.join(labels)}"[:400])
        if len(labels) <= 2:
            raise PredictorError(f"cannot remove {label!r}: a classifier needs at least 2 classes; enrol another class first")
        keep = [i for i, name in enumerate(labels) if name != label]
        record = {"action": "remove", "label": label, **head.named, "time": now(), "images": []}
        self._reload(enrolled_model(data, head.initializer, matrix[keep], head.metadata([labels[i] for i in keep]), record))
        return Enrolment("remove", label, 0, len(keep), time.perf_counter() - started, 0, head.task)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model this Predictor runs (after :meth:`enrol`, the enrolled one) atomically."""
        data = self.model_bytes()
        try:
            return write_bytes(path, lambda f: f.write(data))
        except OSError as exc:
            raise PredictorError(f"cannot write {path}: {exc.strerror or exc}; choose another path") from exc

    def model_bytes(self) -> bytes:
        """The serialised ONNX model this Predictor runs."""
        if isinstance(self._model, bytes):
            return self._model
        if Path(self._model).suffix.lower() == ".xml":
            raise PredictorError("an OpenVINO IR cannot enrol classes: enrol into the ONNX model, then convert it again")
        try:
            return Path(self._model).read_bytes()
        except OSError as exc:
            raise PredictorError(f"cannot read {self._model}: {exc.strerror or exc}") from exc

    def _prototype_head(self, task: str | None) -> PrototypeHead:
        """The prototype head to enrol into (see :func:`~.enrolment.prototype_head`).

        Raises:
            PredictorError: an OpenVINO IR, or as :func:`~.enrolment.prototype_head`.
        """
        if not isinstance(self._session, OrtSession):
            raise PredictorError("an OpenVINO IR cannot enrol classes: enrol into the ONNX model, then convert it again")
        return prototype_head(self.info.labels, self.info.tasks, list(self._session.output_names), task)

    def _prototypes(self, model: bytes, head: PrototypeHead) -> np.ndarray:
        """``head``'s prototype matrix (one row per label) in ``model`` (this Predictor's), checked against the graph.

        Raises:
            PredictorError: a matrix that does not fit the head's labels and features.
        """
        matrix = wire.read_initializer(model, head.initializer)
        width = self._session.output_widths.get(head.features)
        if matrix is None or matrix.ndim != 2 or matrix.shape[0] != len(head.labels) or (width and matrix.shape[1] != width):
            shape = None if matrix is None else matrix.shape
            raise PredictorError(
                f"the model's prototype matrix {shape} does not fit its {len(head.labels)} labels and {width}-wide features; export it again"
            )
        return matrix

    def _reload(self, model: bytes) -> None:
        session = OrtSession(model, *self._session_settings)
        info = model_info(session, *self._overrides)
        self._model, self._session, self.info, self.verified_by = model, session, info, None

    def _prepare(self, image: ImageInput) -> np.ndarray:
        return prepare(image, self.info, self.fast_jpeg)


def prepare(image: ImageInput, info: ModelInfo, fast_jpeg: bool = False) -> np.ndarray:
    """One image as a row of the model's input, the way :meth:`Predictor.predict` makes it:
    decoded, resized, cropped and, for a float model, normalised (a uint8 NHWC crop for a model
    with its preprocessing fused in).

    Raises:
        ImageError: an image that cannot be read, or that is too large or too thin.
    """
    pixels = crop(image, info, fast_jpeg)
    return pixels if info.input_format == UINT8_NHWC else info.preprocessing.normalize(pixels)


def crop(image: ImageInput, info: ModelInfo, fast_jpeg: bool = False) -> np.ndarray:
    """One image decoded, resized and cropped to the model's size: uint8 HWC RGB, a quarter of
    the bytes of the float row :func:`prepare` makes from it (what a server sends between its
    processes; :meth:`Predictor.run_crops` finishes the row).

    Raises:
        ImageError: an image that cannot be read, or that is too large or too thin.
    """
    pre = info.preprocessing
    return np.asarray(pre.resize_crop(to_image(image, 2 * pre.resize_size if fast_jpeg else None)), dtype=np.uint8)


def answers(logits: np.ndarray, info: ModelInfo, k: int) -> list:
    """Each row's top-``k``: a list of :class:`Prediction` (best first), or for a multi-task
    model a mapping of task name to such a list (each task's softmax over its own classes)."""
    tasks = info.tasks
    if tasks is None:
        return ranked(softmax(logits), info.labels, k)
    per_task = {name: ranked(softmax(part), labels, k) for (name, part), labels in zip(tasks.split(logits).items(), tasks.labels, strict=True)}
    return [{name: per_task[name][row] for name in tasks.names} for row in range(len(logits))]


def as_json(found: list[Prediction] | dict[str, list[Prediction]]) -> list | dict:
    """One image's answer as JSON: a list of {label, index, probability}, nested by task for a multi-task model."""
    if isinstance(found, dict):
        return {task: as_json(ranked_) for task, ranked_ in found.items()}
    return [{"label": p.label, "index": p.index, "probability": p.probability} for p in found]


def ranked(probabilities: np.ndarray, labels: Sequence[str], k: int) -> list[list[Prediction]]:
    """The ``k`` most probable classes of each row (ties in index order), best first; ``k`` is
    capped at the number of classes and is at least 1."""
    k = max(1, min(k, probabilities.shape[1]))
    results = []
    for row in probabilities:
        order = np.argsort(-row, kind="stable")[:k]
        results.append([Prediction(labels[i], int(i), float(row[i])) for i in order])
    return results


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities from logits, row by row, computed in float64 and returned as float32."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted.astype(np.float64))
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
