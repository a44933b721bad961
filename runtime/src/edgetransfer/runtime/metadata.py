"""What an exported model says about itself: ONNX ``metadata_props`` written by export and
read by the runtime. numpy-free and torch-free."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError, PredictorError, UnknownNameError
from .files import sha256_file
from .preprocessing import Preprocessing
from .tasks import Tasks

__all__ = ["ModelInfo", "InputFormat", "FLOAT_NCHW", "UINT8_NHWC", "MANIFEST_FILE", "PREPROCESSING_KEYS", "verify_recorded", "model_info"]

MANIFEST_FILE = "manifest.json"  # beside a model in a run directory: what was recorded about it
# the metadata keys that describe labels and preprocessing (ModelInfo.to_props); the others are provenance
PREPROCESSING_KEYS = frozenset(
    {"labels", "tasks", "input_format", "input_size", "resize_size", "crop_pct", "interpolation", "mean", "std", "channel_order", "layout"}
)

FLOAT_NCHW = "float32-nchw-normalized"  # the app resizes, crops, scales and normalises
UINT8_NHWC = "uint8-nhwc"  # preprocessing fused into the graph: the app only resizes and crops
InputFormat = str


@dataclass(frozen=True)
class ModelInfo:
    """Labels, preprocessing and provenance of an exported classifier."""

    labels: tuple[str, ...]
    preprocessing: Preprocessing
    input_format: InputFormat = FLOAT_NCHW
    arch: str = "unknown"
    checkpoint_sha256: str = ""
    edgetransfer_version: str = ""
    tasks: Tasks | None = None  # a multi-task model's tasks (``labels`` then lists every task:label)

    def to_props(self) -> dict[str, str]:
        """String key/value pairs for ONNX ``metadata_props``."""
        pre = self.preprocessing
        return {
            **({"tasks": self.tasks.to_json()} if self.tasks else {}),
            "edgetransfer.version": self.edgetransfer_version,
            "labels": json.dumps(list(self.labels)),
            "input_format": self.input_format,
            "input_size": str(pre.input_size),
            "resize_size": str(pre.resize_size),
            "crop_pct": f"{pre.crop_pct:.6f}",
            "interpolation": pre.interpolation.value,
            "mean": json.dumps(list(pre.mean)),
            "std": json.dumps(list(pre.std)),
            "channel_order": pre.channel_order,
            "layout": "NHWC" if self.input_format == UINT8_NHWC else pre.layout,
            "arch": self.arch,
            "checkpoint_sha256": self.checkpoint_sha256,
        }

    @classmethod
    def from_props(cls, props: dict[str, str]) -> "ModelInfo":
        """Parse and check ``metadata_props``: a model file can come from anywhere.

        Raises:
            PredictorError: the model carries no edgetransfer metadata, or a field is malformed
                (named in the message).
        """
        if "labels" not in props or "input_size" not in props:
            raise PredictorError("the model has no edgetransfer metadata (labels, input_size)")
        try:
            pre = Preprocessing.from_dict(
                {
                    "input_size": _integer(props, "input_size"),
                    "resize_size": _integer(props, "resize_size"),
                    "interpolation": props.get("interpolation", "bilinear"),
                    "mean": _numbers(props, "mean"),
                    "std": _numbers(props, "std"),
                    "channel_order": props.get("channel_order", "RGB"),
                    "layout": "NCHW",
                }
            )
        except (DataError, UnknownNameError) as exc:
            raise PredictorError(f"invalid edgetransfer metadata in the model: {exc}") from exc
        input_format = props.get("input_format", FLOAT_NCHW)
        if input_format not in (FLOAT_NCHW, UINT8_NHWC):
            raise PredictorError(f"invalid edgetransfer metadata in the model: input_format {input_format!r} is not {FLOAT_NCHW!r} or {UINT8_NHWC!r}")
        labels = _labels(props)
        return cls(
            labels=labels,
            tasks=Tasks.from_json(props["tasks"], labels) if "tasks" in props else None,
            preprocessing=pre,
            input_format=input_format,
            arch=props.get("arch", "unknown"),
            checkpoint_sha256=props.get("checkpoint_sha256", ""),
            edgetransfer_version=props.get("edgetransfer.version", ""),
        )

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {**self.to_props(), "labels": list(self.labels)}
        if self.tasks:
            described["tasks"] = {name: list(labels) for name, labels in zip(self.tasks.names, self.tasks.labels, strict=True)}
        return described


def _field(props: dict[str, str], name: str):
    try:
        return json.loads(props[name])
    except KeyError as exc:
        raise PredictorError(f"invalid edgetransfer metadata in the model: {name} is missing") from exc
    except ValueError as exc:
        raise PredictorError(f"invalid edgetransfer metadata in the model: {name} is not JSON ({exc})") from exc


def _integer(props: dict[str, str], name: str) -> int:
    value = _field(props, name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise PredictorError(f"invalid edgetransfer metadata in the model: {name} must be a whole number, got {value!r}")
    return value


def _numbers(props: dict[str, str], name: str) -> list[float]:
    value = _field(props, name)
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise PredictorError(f"invalid edgetransfer metadata in the model: {name} must be a list of numbers, got {value!r}"[:300])
    return [float(v) for v in value]


def _labels(props: dict[str, str]) -> tuple[str, ...]:
    value = _field(props, "labels")
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise PredictorError(f"invalid edgetransfer metadata in the model: labels must be a non-empty list of strings, got {value!r}"[:300])
    return tuple(value)


def verify_recorded(model: Path) -> str | None:
    """A model inside a run directory must still be the file its manifest recorded.

    Returns:
        The manifest that records the model (and so was checked), or ``None`` for a model with
        no manifest beside it, or one its manifest does not list.

    Raises:
        PredictorError: the manifest beside the model is unreadable, or records another sha256.
    """
    manifest = model.parent / MANIFEST_FILE
    if not manifest.is_file() or not model.is_file():
        return None  # a model copied on its own: nothing recorded to check against
    try:
        artifacts = json.loads(manifest.read_text(encoding="utf-8")).get("artifacts", {})
    except (ValueError, UnicodeDecodeError, AttributeError) as exc:
        raise PredictorError(f"{manifest} beside the model is not a valid manifest: {exc}") from exc
    for entry in artifacts.values() if isinstance(artifacts, dict) else []:
        if isinstance(entry, dict) and (model.parent / str(entry.get("path", ""))).resolve() == model.resolve():
            if sha256_file(model) != entry.get("sha256"):
                raise PredictorError(
                    f"{model} has changed since it was recorded in {manifest.name} (its sha256 differs);"
                    " export it again, or copy the model and its manifest again"
                )
            return str(manifest)
    return None


def model_info(session, preprocessing: Preprocessing | None, labels: Sequence[str] | None) -> ModelInfo:
    """What ``session``'s model is: its metadata, checked against its graph, or (for a model
    without edgetransfer metadata) the ``preprocessing`` and ``labels`` given.

    Raises:
        PredictorError: metadata that does not fit the graph, or none and no preprocessing given.
    """
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
            info = ModelInfo(info.labels, preprocessing, info.input_format, info.arch, info.checkpoint_sha256, tasks=info.tasks)
        return info
    if preprocessing is None:
        raise PredictorError(
            "the model has no edgetransfer metadata; pass preprocessing=Preprocessing(input_size=…, resize_size=…, mean=…, std=…) and labels=[…]"
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
        raise PredictorError(
            f"the model's metadata says input_size {size} ({'NHWC' if fused else 'NCHW'}), but its graph"
            f" takes {shape}; its metadata belongs to another export: export again"
        )
