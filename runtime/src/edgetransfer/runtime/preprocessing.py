"""How images become model inputs: one record that travels with every artifact.

This module imports only numpy and Pillow, so the deployed runtime can share it.
"""

from __future__ import annotations

import enum
import io
import math
import os
import struct
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, BinaryIO, Union, cast

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DataError, ImageError, unknown_name

__all__ = [
    "Interpolation",
    "Preprocessing",
    "ImageInput",
    "to_rgb",
    "load_rgb",
    "to_image",
    "is_single",
    "check_shape",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

# what the Predictor accepts as one image: a path, encoded bytes, a Pillow image, or an HxWx3 uint8 array
ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_INPUT_SIZE = 4096  # a model input side; larger ones are mistakes that exhaust memory
MAX_ASPECT_RATIO = 64  # resizing the short side of a thinner image would make an enormous one
MAX_PIXELS = 64 * 10**6  # decoded RGB at most 256 MB (Pillow keeps 4 bytes a pixel), whatever the file's size
# |(pixel - mean) / std| for pixels in [0, 1]: ImageNet's is under 3, inputs in 0..255 (std 1/255)
# reach 255; a std of 1e-40 or a mean of 1e38 would feed a network inf or overflow it into NaN
MAX_NORMALIZED = 10_000.0


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
        if not 1 <= self.input_size <= MAX_INPUT_SIZE or not self.input_size <= self.resize_size <= 2 * MAX_INPUT_SIZE:
            raise DataError(
                f"preprocessing needs 1 <= input_size <= resize_size, input_size <= {MAX_INPUT_SIZE} and resize_size <="
                f" {2 * MAX_INPUT_SIZE}; got input_size={self.input_size}, resize_size={self.resize_size}"
            )
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3 or not all(math.isfinite(v) for v in values):
                raise DataError(f"preprocessing {name} needs 3 finite numbers (one per RGB channel), got {list(values)}")
        if min(self.std) <= 0:
            raise DataError(f"preprocessing std must be positive in every channel, got {list(self.std)}")
        reach = max(abs(v - m) / s for m, s in zip(self.mean, self.std, strict=True) for v in (0.0, 1.0))
        if not reach <= MAX_NORMALIZED:
            raise DataError(
                f"preprocessing mean {list(self.mean)} and std {list(self.std)} map pixels in [0, 1] to values up to"
                f" {reach:.3g}; a model's inputs must stay within ±{MAX_NORMALIZED:g} (is std too small, or mean not in"
                " the [0, 1] pixel scale?)"
            )
        if self.channel_order != "RGB" or self.layout != "NCHW":
            raise DataError(f"preprocessing supports RGB channels in NCHW layout, got {self.channel_order} {self.layout}")

    @property
    def crop_pct(self) -> float:
        return self.input_size / self.resize_size

    def at_size(self, input_size: int) -> "Preprocessing":
        """The same transform for another input size, keeping the crop fraction."""
        resize = max(input_size, int(round(input_size / self.crop_pct)))
        return replace(self, input_size=input_size, resize_size=resize)

    def resize_crop(self, image: Image.Image) -> Image.Image:
        """Resize the shorter side and centre-crop, exactly as torchvision's Resize+CenterCrop."""
        check_shape(image.size)
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
            mean=cast("tuple[float, float, float]", tuple(float(v) for v in data.get("mean", IMAGENET_MEAN))),  # checked below
            std=cast("tuple[float, float, float]", tuple(float(v) for v in data.get("std", IMAGENET_STD))),
            channel_order=data.get("channel_order", "RGB"),
            layout=data.get("layout", "NCHW"),
        )


def to_rgb(image: Image.Image, owned: bool = False) -> Image.Image:
    """Any Pillow image as 8-bit RGB: EXIF rotation applied, 16/32-bit scaled, alpha dropped.

    Args:
        owned: the caller made ``image`` and will not use it again: rotate it in place
            instead of copying it (a large image's memory counts twice otherwise).
    """
    if owned:
        ImageOps.exif_transpose(image, in_place=True)
    else:
        image = ImageOps.exif_transpose(image)
    if image.mode in _HIGH_DEPTH:
        image = _to_8bit(image, owned)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


_HIGH_DEPTH = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
BAND_ROWS = 256  # rows of a 16/32-bit image scaled at a time


def _to_8bit(image: Image.Image, owned: bool) -> Image.Image:
    """A 16- or 32-bit single-channel image scaled to 8 bits (16-bit by 65535, a float image in
    [0, 1] by 1, anything else by its largest value or 255), a band of rows at a time: as one
    array, a 64-megapixel float TIFF needed 1 GB of float copies on top of its own 256 MB.

    Raises:
        ImageError: a float image with NaN or infinite pixels.
    """
    width, height = image.size
    boxes = [(0, top, width, min(top + BAND_ROWS, height)) for top in range(0, height, BAND_ROWS)]
    top = 65535.0
    if not image.mode.startswith("I;16"):
        peak = -math.inf
        for box in boxes:
            band = np.asarray(image.crop(box), dtype=np.float32)
            if image.mode == "F" and not np.isfinite(band).all():
                raise ImageError("the image has pixels that are not numbers (NaN or infinity); save it with finite values")
            peak = max(peak, float(band.max()))
        top = 1.0 if image.mode == "F" and peak <= 1.0 else max(peak, 255.0)
    scaled = np.empty((height, width), dtype=np.uint8)
    for box in boxes:
        band = np.array(image.crop(box), dtype=np.float32)  # a copy: scaled in place
        band /= top
        band *= 255.0
        band += 0.5
        scaled[box[1] : box[3]] = np.clip(band, 0, 255, out=band)
    if owned:
        image.close()  # its pixels are freed before the RGB copy is made
    return Image.fromarray(scaled)


def check_shape(size: tuple[int, int], name: str = "the image") -> None:
    """Refuse an image whose shorter side, resized to a model's size, would make an enormous one.

    Raises:
        ImageError: no pixels, or more than ``MAX_ASPECT_RATIO`` times longer than wide.
    """
    width, height = size
    short, long = min(width, height), max(width, height)
    if short == 0:
        raise ImageError(f"{name} is {width}x{height} pixels: it has none to classify")
    if long > MAX_ASPECT_RATIO * short:
        raise ImageError(
            f"{name} is {width}x{height} pixels, more than {MAX_ASPECT_RATIO} times longer than it is wide; crop it to the part to classify first"
        )


_ICON = (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00")  # ICO and CUR
_PNG = b"\x89PNG\r\n\x1a\n"


def _icon_size(handle: BinaryIO) -> tuple[int, int] | None:
    """The largest image an ICO or CUR file embeds, from the embedded headers (``None`` for any
    other file). Pillow decodes an icon's largest image whole as it opens the file, and the icon's
    own directory says at most 256x256 whatever the embedded PNG or BMP holds."""
    head = handle.read(6)
    if head[:4] not in _ICON:
        return None
    count = min(struct.unpack("<H", head[4:6])[0], 256)
    entries = [handle.read(16) for _ in range(count)]
    largest = (0, 0)
    for entry in entries:
        if len(entry) < 16:
            break
        handle.seek(struct.unpack("<I", entry[12:16])[0])
        data = handle.read(24)
        if data[:8] == _PNG and len(data) == 24:
            size = struct.unpack(">II", data[16:24])
        elif len(data) >= 12:
            width, height = struct.unpack("<ii", data[4:12])  # a DIB: its height counts the mask too
            size = (abs(width), abs(height) // 2)
        else:
            continue
        largest = max(largest, size, key=lambda s: s[0] * s[1])
    return largest


def load_rgb(source: str | os.PathLike | bytes, draft_side: int | None = None) -> Image.Image:
    """Open and fully decode an image file (or encoded bytes) as RGB.

    Args:
        draft_side: for a JPEG, let libjpeg decode at 1/2, 1/4 or 1/8 scale (Pillow's ``draft``)
            as long as the shorter side stays at least this long. Much faster for camera-sized
            photos; the pixels then differ slightly from a full decode followed by a resize.

    Raises:
        DataError: the file is missing, not an image, truncated or otherwise unreadable.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        with io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as handle:
            return _decode(handle, name, draft_side)
    except FileNotFoundError:
        raise ImageError(f"image not found: {name}") from None
    except UnidentifiedImageError as exc:  # Pillow's message names its file object, not the file
        raise ImageError(f"cannot read image {name}: it is empty or not in an image format Pillow reads") from exc
    except (OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"cannot read image {name}: {reason}") from exc


def _decode(handle: BinaryIO, name: str, draft_side: int | None) -> Image.Image:
    icon = _icon_size(handle)
    handle.seek(0)
    if icon is not None:  # an icon's largest image is decoded as the icon is opened: refused before
        _check_pixels(*icon, name)
    with Image.open(handle) as image, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Image was not the expected size")  # an icon's, its size checked above
        width, height = image.size  # from the header: refuse before decoding
        _check_pixels(width, height, name)
        if draft_side and image.format == "JPEG" and min(width, height) > 2 * draft_side:
            scale = draft_side / min(width, height)  # draft keeps at least the size asked for
            image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        image.load()
        return to_rgb(image, owned=True)


def _check_pixels(width: int, height: int, name: str) -> None:
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"image {name} is {width}x{height} pixels, more than the {MAX_PIXELS // 10**6} million edgetransfer decodes; scale it down first"
        )


def is_single(images: Any) -> bool:
    """A list, tuple or 4-D array holds many images; anything else is one (or a mistake that
    :func:`to_image` reports)."""
    if isinstance(images, np.ndarray):
        return images.ndim != 4
    return not isinstance(images, (list, tuple))


def to_image(image: ImageInput, draft_side: int | None = None) -> Image.Image:
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
