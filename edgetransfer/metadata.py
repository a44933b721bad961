"""What an exported model says about itself: ONNX ``metadata_props`` written by export and
read by the runtime. numpy-free and torch-free."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import PredictorError
from .preprocessing import Preprocessing

__all__ = ["ModelInfo", "InputFormat", "FLOAT_NCHW", "UINT8_NHWC"]

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

    def to_props(self) -> dict[str, str]:
        """String key/value pairs for ONNX ``metadata_props``."""
        pre = self.preprocessing
        return {
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
        """Parse ``metadata_props``.

        Raises:
            PredictorError: the model carries no edgetransfer metadata, or it is malformed.
        """
        if "labels" not in props or "input_size" not in props:
            raise PredictorError("the model has no edgetransfer metadata (labels, input_size)")
        try:
            pre = Preprocessing.from_dict(
                {
                    "input_size": props["input_size"],
                    "resize_size": props["resize_size"],
                    "interpolation": props.get("interpolation", "bilinear"),
                    "mean": json.loads(props["mean"]),
                    "std": json.loads(props["std"]),
                    "channel_order": props.get("channel_order", "RGB"),
                    "layout": "NCHW",
                }
            )
            labels = tuple(str(v) for v in json.loads(props["labels"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise PredictorError(f"malformed edgetransfer metadata in the model: {exc}") from exc
        return cls(
            labels=labels,
            preprocessing=pre,
            input_format=props.get("input_format", FLOAT_NCHW),
            arch=props.get("arch", "unknown"),
            checkpoint_sha256=props.get("checkpoint_sha256", ""),
            edgetransfer_version=props.get("edgetransfer.version", ""),
        )

    def describe(self) -> dict[str, Any]:
        return {**self.to_props(), "labels": list(self.labels)}
