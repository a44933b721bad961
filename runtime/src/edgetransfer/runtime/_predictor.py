from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

from . import _wire
from .enrolment import FEATURES, PROTOTYPES, Enrolment, check_label, enrolled_model, image_record, now, prototype_of
from .errors import ImageError, PredictorError, first_line
from .files import write_bytes
from .metadata import FLOAT_NCHW, PREPROCESSING_KEYS, UINT8_NHWC, ModelInfo, verify_recorded
from .openvino_ir import OpenVinoSession
from .preprocessing import Preprocessing, load_rgb, to_rgb
from .sessions import fixed_batch, mixed_builds, open_session, run_batched

__all__ = ["Predictor", "Prediction", "PredictorError", "ImageInput"]

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
}


# y = Identity(x), float[1], opset 13, IR 8: the smallest model a provider can be tried on, as
# serialised bytes so that the runtime needs no onnx package (a test rebuilds it with onnx.helper)
PROBE_MODEL = (
    b"\x08\x08\x12\x00:;\n\x10\n\x01x\x12\x01y\"\x08Identity\x12\x05probeZ\x0f\n\x01x\x12\n\n\x08\x08\x01\x12\x04"
    b"\n\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\r"
)


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
        self._session_settings = ([_provider_name(p) for p in (providers or ["cpu"])], threads, spinning)
        self._overrides = (preprocessing, labels)
        if not isinstance(model, bytes) and Path(model).suffix.lower() == ".xml":
            self._session = _openvino_session(Path(model), providers, device, threads)
            self.fallback = None
        else:
            self._session = _OrtSession(model, *self._session_settings)
            self.fallback = _check_providers(self._session.wanted, self._session.providers, allow_fallback)
        self.providers = self._session.providers
        self.info = _model_info(self._session, preprocessing, labels)
        self._fixed_batch = self._session.fixed_batch

    @property
    def provider(self) -> str:
        """The execution provider the session really runs on (``OpenVINO:CPU`` for an IR)."""
        return self.providers[0]

    @property
    def labels(self) -> tuple[str, ...]:
        return self.info.labels

    def predict(self, images: ImageInput | Sequence[ImageInput], top_k: int = 5):
        """Top-k labels with probabilities.

        Args:
            images: one image, or a list of them: file paths, encoded bytes, Pillow images, or
                HxWx3 uint8 RGB arrays (HxW greyscale and HxWx4 RGBA are accepted too).
            top_k: how many classes per image (capped at the number of classes).

        Returns:
            For one image a list of :class:`Prediction`, best first; for a list, one such list
            per image.

        Raises:
            PredictorError: an unreadable image or an array of the wrong shape or dtype.
        """
        single = _is_single(images)
        batch = [images] if single else list(images)
        probabilities = _softmax(self.logits(batch))
        k = max(1, min(top_k, probabilities.shape[1]))
        results = []
        for row in probabilities:
            order = np.argsort(-row, kind="stable")[:k]
            results.append([Prediction(self.info.labels[i], int(i), float(row[i])) for i in order])
        return results[0] if single else results

    def logits(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Raw model outputs, one row per image."""
        if len(images) == 0:
            return np.zeros((0, len(self.info.labels)), dtype=np.float32)
        logits = run_batched(self._session.run, self._feed(images), self.batch_size, self._fixed_batch)
        if logits.ndim != 2 or logits.shape[1] != len(self.info.labels):
            raise PredictorError(f"the model outputs {logits.shape[1:]} scores per image for {len(self.info.labels)} labels;"
                                 " its metadata belongs to another model: export again")
        return logits

    def _feed(self, images: Sequence[ImageInput]) -> np.ndarray:
        if len(images) == 1 or self._decoders == 1:
            return np.stack([self._prepare(image) for image in images])

        with ThreadPoolExecutor(max_workers=min(self._decoders, len(images))) as pool:
            return np.stack(list(pool.map(self._prepare, images)))

    # -- prototype models: enrolment -------------------------------------------------------

    def features(self, images: Sequence[ImageInput]) -> np.ndarray:
        """A prototype model's normalised features (its ``features`` output), one row per image.

        Raises:
            PredictorError: the model has no prototype head (see :meth:`enrol`).
        """
        self._require_prototype_head()
        if len(images) == 0:
            raise PredictorError("no images given: enrol a class from at least one image of it")
        return run_batched(lambda chunk: self._session.run_output(FEATURES, chunk), self._feed(images),
                           self.batch_size, self._fixed_batch)

    def enrol(self, label: str, images: Sequence[ImageInput], *, replace: bool = False) -> Enrolment:
        """Add class ``label`` (or, with ``replace``, make it anew) from a few of its images.

        The class's prototype is the normalised mean of the images' features, computed with this
        model (an INT8 model's own features for an INT8 model); the prototype matrix stays float.
        This Predictor then runs the new model; :meth:`save` writes it. Nothing changes on error.
        Unlike :meth:`predict`, not to be called while other threads predict with this Predictor.

        Raises:
            PredictorError: a model without a prototype head, a label that exists (without
                ``replace``) or cannot be stored, no images, or an image that cannot be used.
        """
        started = time.perf_counter()
        label = check_label(label)
        data = self.model_bytes()
        matrix = self._prototypes(data)
        labels = list(self.info.labels)
        if label in labels and not replace:
            raise PredictorError(f"class {label!r} exists already; pass replace=True (--replace) to make it anew from these images")
        images = [images] if _is_single(images) else list(images)
        features = self.features(images)
        row = prototype_of(features)
        if label in labels:
            matrix = matrix.copy()
            matrix[labels.index(label)] = row
        else:
            matrix, labels = np.vstack([matrix, row[None]]), [*labels, label]
        recognised = int((np.argmax(features @ matrix.T, axis=1) == labels.index(label)).sum())  # the Gemm's argmax
        action = "replace" if label in self.info.labels else "add"
        record = {"action": action, "label": label, "time": now(), "images": [image_record(im, i) for i, im in enumerate(images)]}
        self._reload(enrolled_model(data, labels, matrix, record))
        return Enrolment(action, label, len(images), len(labels), time.perf_counter() - started, recognised)

    def remove(self, label: str) -> Enrolment:
        """Remove class ``label``; this Predictor then runs the new model (:meth:`save` writes it).

        Raises:
            PredictorError: a model without a prototype head, an unknown label, or the last two classes.
        """
        started = time.perf_counter()
        data = self.model_bytes()
        matrix, labels = self._prototypes(data), list(self.info.labels)
        if label not in labels:
            raise PredictorError(f"there is no class {label!r} to remove; the model's classes: {', '.join(labels)}"[:400])
        if len(labels) <= 2:
            raise PredictorError(f"cannot remove {label!r}: a classifier needs at least 2 classes; enrol another class first")
        keep = [i for i, name in enumerate(labels) if name != label]
        record = {"action": "remove", "label": label, "time": now(), "images": []}
        self._reload(enrolled_model(data, [labels[i] for i in keep], matrix[keep], record))
        return Enrolment("remove", label, 0, len(keep), time.perf_counter() - started, 0)

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

    def _require_prototype_head(self) -> None:
        """Raises PredictorError unless the model is an ONNX model with a ``features`` output."""
        if not isinstance(self._session, _OrtSession):
            raise PredictorError("an OpenVINO IR cannot enrol classes: enrol into the ONNX model, then convert it again")
        if FEATURES not in self._session.output_names:
            raise PredictorError(
                "this model has no prototype head, so it cannot enrol classes: only models made with"
                " 'edgetransfer finetune --mode prototype' and exported to ONNX (any precision) can"
            )

    def _prototypes(self, model: bytes) -> np.ndarray:
        """The prototype matrix (one row per label) of ``model`` (this Predictor's), checked against the graph.

        Raises:
            PredictorError: the model has no prototype head.
        """
        self._require_prototype_head()
        matrix = _wire.read_initializer(model, PROTOTYPES)
        width = self._session.output_widths.get(FEATURES)
        if matrix is None or matrix.ndim != 2 or matrix.shape[0] != len(self.info.labels) or (width and matrix.shape[1] != width):
            shape = None if matrix is None else matrix.shape
            raise PredictorError(f"the model's prototype matrix {shape} does not fit its {len(self.info.labels)} labels"
                                 f" and {width}-wide features; export it again")
        return matrix

    def _reload(self, model: bytes) -> None:
        session = _OrtSession(model, *self._session_settings)
        info = _model_info(session, *self._overrides)
        self._model, self._session, self.info, self.verified_by = model, session, info, None

    def _prepare(self, image: ImageInput) -> np.ndarray:
        pre = self.info.preprocessing
        pixels = np.asarray(pre.resize_crop(_to_image(image, 2 * pre.resize_size if self.fast_jpeg else None)), dtype=np.uint8)
        return pixels if self.info.input_format == UINT8_NHWC else pre.normalize(pixels)


def _provider_name(name: str) -> str:
    return PROVIDER_ALIASES.get(name.lower(), name)


class _OrtSession:
    """An ONNX Runtime session behind the small surface Predictor uses (shared with OpenVINO's)."""

    def __init__(self, model, wanted: list[str], threads: int | None, spinning: bool) -> None:
        import onnxruntime as ort  # imported when a session is made: a broken install (two builds at once) must not stop the runtime saying so

        self.wanted = wanted
        self.session = _session(ort, model, wanted, threads, spinning)
        self.providers = list(self.session.get_providers())
        self.props = dict(self.session.get_modelmeta().custom_metadata_map)
        first, output = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name, self.output_name = first.name, output.name
        self.uint8_input = "uint8" in first.type
        self.input_shape = [d if isinstance(d, int) else None for d in first.shape]
        self.fixed_batch = fixed_batch(self.session)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_widths = {o.name: o.shape[-1] for o in self.session.get_outputs() if isinstance(o.shape[-1], int)}
        classes = output.shape[-1]
        self.classes = classes if isinstance(classes, int) else None
        meta = self.session.get_modelmeta()
        self.signature = {
            kind: [{"name": a.name, "type": a.type, "shape": list(a.shape)} for a in arguments]
            for kind, arguments in (("inputs", self.session.get_inputs()), ("outputs", self.session.get_outputs()))
        }
        self.provenance = {
            "producer": meta.producer_name,
            **{k: v for k, v in self.props.items() if k not in PREPROCESSING_KEYS},
        }

    def run(self, chunk: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: chunk})[0]

    def run_output(self, name: str, chunk: np.ndarray) -> np.ndarray:
        return self.session.run([name], {self.input_name: chunk})[0]


def _openvino_session(xml: Path, providers: Sequence[str] | None, device: str, threads: int | None):
    wanted = [_provider_name(p) for p in providers or []]
    if any(p not in ("OpenVINOExecutionProvider", "CPUExecutionProvider") for p in wanted):
        raise PredictorError(
            f"{xml.name} is an OpenVINO model: it runs on OpenVINO devices, not ONNX Runtime providers"
            f" ({', '.join(wanted)}); pass device='CPU', 'GPU' or 'AUTO' instead"
        )

    return OpenVinoSession(xml, device, threads)


def _session(ort, model, wanted: list[str], threads: int | None, spinning: bool):
    mixed = mixed_builds()
    if mixed:
        warnings.warn(mixed, RuntimeWarning, stacklevel=4)
    available = ort.get_available_providers()
    missing = [p for p in wanted if p not in available]
    if missing:
        raise PredictorError(
            f"provider {missing[0]} is not in this onnxruntime build (available: {', '.join(available)});"
            " install onnxruntime-gpu for CUDA/TensorRT, or ask for 'cpu'"
        )
    if any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in wanted):
        _preload_gpu_libraries(ort)
    source = model if isinstance(model, bytes) else str(model)
    session_providers: list = [_with_options(p, source, model) for p in wanted]
    if "CPUExecutionProvider" not in wanted:
        session_providers.append("CPUExecutionProvider")
    return open_session(model, session_providers, threads, spinning)


def _with_options(provider: str, source: str, model) -> str | tuple[str, dict]:
    """TensorRT through ONNX Runtime builds engines on first use: keep them (and the timing
    cache) beside the model so the next start takes seconds, not minutes."""
    if provider != "TensorrtExecutionProvider":
        return provider
    folder = (Path.home() / ".cache" / "edgetransfer") if isinstance(model, bytes) else Path(source).parent
    cache = folder / "ort-trt-cache"
    cache.mkdir(parents=True, exist_ok=True)
    return provider, {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
    }


def _preload_gpu_libraries(ort) -> None:
    """Let onnxruntime-gpu find CUDA and cuDNN installed as nvidia-* wheels (torch's, say)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception:  # nothing to preload: the session reports what it could not load
            pass


def probe_provider(provider: str) -> str | None:
    """Whether a session really gets ``provider`` here: ``None`` if it does, else the reason.

    onnxruntime-gpu lists CUDA and TensorRT on machines without a GPU; only a session built with
    them tells the truth.
    """
    import onnxruntime as ort  # imported when a session is made: a broken install (two builds at once) must not stop the runtime saying so

    name = _provider_name(provider)
    if name not in ort.get_available_providers():
        return f"{name} is not in this onnxruntime build"
    if name in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        _preload_gpu_libraries(ort)
    try:
        session = ort.InferenceSession(PROBE_MODEL, providers=[name, "CPUExecutionProvider"])
    except Exception as exc:
        return f"{name} failed to start: {first_line(exc, 200)}"
    if session.get_providers()[0] != name:
        return f"{name} is listed but could not load (CUDA, cuDNN or the GPU are missing)"
    return None


def _check_providers(wanted: list[str], actual: list[str], allow_fallback: bool) -> str | None:
    """ONNX Runtime silently drops providers it cannot load (CUDA without its libraries);
    only the session's own list tells the truth."""
    if wanted[0] in actual:
        return None
    message = (
        f"asked for {wanted[0]} but the session runs on {actual[0]} (its libraries or device are missing:"
        " check CUDA/cuDNN/TensorRT and the GPU)"
    )
    if not allow_fallback:
        raise PredictorError(message + "; pass allow_fallback=True to accept that")
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return message


def _model_info(session, preprocessing: Preprocessing | None, labels: Sequence[str] | None) -> ModelInfo:
    props = session.props
    if "labels" in props and "input_size" in props:
        info = ModelInfo.from_props(props)
        _check_input(info, session)
        if session.classes is not None and len(info.labels) != session.classes:
            raise PredictorError(
                f"the model's metadata names {len(info.labels)} labels but it outputs {session.classes} classes;"
                " its metadata belongs to another model: export again"
            )
        if preprocessing is not None:
            info = ModelInfo(info.labels, preprocessing, info.input_format, info.arch, info.checkpoint_sha256)
        return info
    if preprocessing is None:
        raise PredictorError(
            "the model has no edgetransfer metadata; pass preprocessing=Preprocessing(input_size=…,"
            " resize_size=…, mean=…, std=…) and labels=[…]"
        )
    outputs = session.classes
    count = outputs if outputs is not None else len(labels or [])
    names = tuple(labels) if labels is not None else tuple(str(i) for i in range(count))
    if outputs is not None and len(names) != outputs:
        raise PredictorError(f"{len(names)} labels given for a model with {outputs} outputs")
    return ModelInfo(names, preprocessing, UINT8_NHWC if session.uint8_input else FLOAT_NCHW)


def _check_input(info: ModelInfo, session) -> None:
    """The metadata's input format and size must be what the graph takes.

    Raises:
        PredictorError: naming the field that disagrees with the graph.
    """
    fused = info.input_format == UINT8_NHWC
    if fused != session.uint8_input:
        raise PredictorError(
            f"the model's metadata says input_format {info.input_format!r} but its graph takes"
            f" {'uint8' if session.uint8_input else 'float'} input; its metadata belongs to another export: export again"
        )
    size = info.preprocessing.input_size
    expected = [size, size, 3] if fused else [3, size, size]
    shape = session.input_shape
    if len(shape) != 4 or any(d is not None and d != e for d, e in zip(shape[1:], expected, strict=True)):
        raise PredictorError(f"the model's metadata says input_size {size} ({'NHWC' if fused else 'NCHW'}), but its graph"
                             f" takes {shape}; its metadata belongs to another export: export again")


def _is_single(images: Any) -> bool:
    """A list, tuple or 4-D array holds many images; anything else is one (or a mistake that
    :func:`_to_image` reports)."""
    if isinstance(images, np.ndarray):
        return images.ndim != 4
    return not isinstance(images, (list, tuple))


def _to_image(image: ImageInput, draft_side: int | None = None) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_image(image)
    if isinstance(image, (str, os.PathLike, bytes)):
        return load_rgb(image, draft_side)
    raise ImageError(f"cannot use a {type(image).__name__} as an image: pass a path, bytes, a Pillow image or an array")


def _array_image(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageError(f"image arrays must be uint8 (HxWx3 RGB), got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return Image.fromarray(array, mode="L").convert("RGB")
    if array.ndim == 3 and array.shape[2] in (3, 4) and min(array.shape[:2]) > 0:
        return Image.fromarray(np.ascontiguousarray(array[:, :, :3]), mode="RGB")
    raise ImageError(f"image arrays must be HxWx3 RGB (or HxW grey), got shape {array.shape}")


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted.astype(np.float64))
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
