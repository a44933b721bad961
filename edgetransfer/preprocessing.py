"""How images become model inputs: one record that travels with every artifact.

This module imports only numpy and Pillow, so the deployed runtime can share it.
"""

from __future__ import annotations

import enum
import io
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DataError, ImageError, unknown_name

__all__ = ["Interpolation", "Preprocessing", "to_rgb", "load_rgb", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Interpolation(str, enum.Enum):
    """Resize filter; the values are the names torchvision and timm use."""

    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"

    @property
    def pil(self) -> Image.Resampling:
        return {
            "nearest": Image.Resampling.NEAREST,
            "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC,
        }[self.value]

    @classmethod
    def parse(cls, name: str) -> "Interpolation":
        try:
            return cls(str(name).lower().removeprefix("interpolationmode."))
        except ValueError:
            raise unknown_name("interpolation", name, [m.value for m in cls]) from None


@dataclass(frozen=True)
class Preprocessing:
    """The eval-time transform a model was trained with.

    The shorter side is resized to ``resize_size`` with ``interpolation``, the centre
    ``input_size`` square is cropped, pixels are scaled to [0, 1] and normalised with
    ``mean``/``std`` per RGB channel, and the result is laid out NCHW.
    """

    input_size: int
    resize_size: int
    interpolation: Interpolation = Interpolation.BILINEAR
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channel_order: str = "RGB"
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        if self.input_size < 1 or self.resize_size < self.input_size:
            raise DataError(
                f"preprocessing needs 1 <= input_size <= resize_size, got input_size="
                f"{self.input_size}, resize_size={self.resize_size}"
            )

    @property
    def crop_pct(self) -> float:
        return self.input_size / self.resize_size

    def at_size(self, input_size: int) -> "Preprocessing":
        """The same transform for another input size, keeping the crop fraction."""
        resize = max(input_size, int(round(input_size / self.crop_pct)))
        return replace(self, input_size=input_size, resize_size=resize)

    def resize_crop(self, image: Image.Image) -> Image.Image:
        """Resize the shorter side and centre-crop, exactly as torchvision's Resize+CenterCrop."""
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        if short != self.resize_size:
            new_long = int(self.resize_size * long / short)
            size = (self.resize_size, new_long) if width <= height else (new_long, self.resize_size)
            image = image.resize(size, self.interpolation.pil)
        width, height = image.size
        left = int(round((width - self.input_size) / 2.0))
        top = int(round((height - self.input_size) / 2.0))
        return image.crop((left, top, left + self.input_size, top + self.input_size))

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """HWC uint8 RGB pixels (already resized and cropped) to a CHW float32 model input."""
        scaled = pixels.astype(np.float32) / np.float32(255.0)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return ((scaled - mean) / std).transpose(2, 0, 1)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """An RGB Pillow image to the CHW float32 input the model was trained on."""
        return self.normalize(np.asarray(self.resize_crop(image), dtype=np.uint8))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["interpolation"] = self.interpolation.value
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        return cls(
            input_size=int(data["input_size"]),
            resize_size=int(data["resize_size"]),
            interpolation=Interpolation.parse(data.get("interpolation", "bilinear")),
            mean=tuple(float(v) for v in data.get("mean", IMAGENET_MEAN)),
            std=tuple(float(v) for v in data.get("std", IMAGENET_STD)),
            channel_order=data.get("channel_order", "RGB"),
            layout=data.get("layout", "NCHW"),
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB: EXIF rotation applied, 16/32-bit scaled, alpha dropped."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 255.0)
        if image.mode == "F" and array.max() <= 1.0:
            top = 1.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def load_rgb(source: str | os.PathLike | bytes) -> Image.Image:
    """Open and fully decode an image file (or encoded bytes) as RGB.

    Raises:
        DataError: the file is missing, not an image, truncated or otherwise unreadable.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
        with Image.open(handle) as image:
            image.load()
            return to_rgb(image)
    except FileNotFoundError:
        raise ImageError(f"image not found: {name}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"cannot read image {name}: {reason}") from exc
