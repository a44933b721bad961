"""Calibration data for static INT8: a bounded, class-balanced sample streamed in batches."""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..data import IMAGE_EXTENSIONS, Sample, load_image
from ..errors import DataError
from ..runtime.metadata import UINT8_NHWC
from ..runtime.preprocessing import Preprocessing

__all__ = ["balanced_sample", "folder_samples", "BatchStream", "describe_samples"]


def balanced_sample(samples: list[Sample], size: int, seed: int = 0) -> list[Sample]:
    """Up to ``size`` samples, taken round-robin over the classes in a seeded order."""
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_class[sample.label].append(sample)
    rng = random.Random(seed)
    for items in by_class.values():
        rng.shuffle(items)
    chosen: list[Sample] = []
    queues = [iter(by_class[label]) for label in sorted(by_class)]
    while len(chosen) < size and queues:
        for queue in list(queues):
            item = next(queue, None)
            if item is None:
                queues.remove(queue)
            elif len(chosen) < size:
                chosen.append(item)
    return chosen


def folder_samples(root: Path) -> list[Sample]:
    """Every image below ``root`` (class subfolders optional: labels are not needed).

    Raises:
        DataError: the folder is missing or holds no image files.
    """
    if not root.is_dir():
        raise DataError(f"calibration folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"calibration folder {root} has no images (.png, .jpg, …)")
    return [Sample(str(p), 0, str(p.relative_to(root))) for p in files]


def describe_samples(samples: list[Sample]) -> list[dict[str, str]]:
    """Name and sha256 of every calibration image, for the manifest."""
    described = []
    for sample in samples:
        if isinstance(sample.source, np.ndarray):
            digest = hashlib.sha256(np.ascontiguousarray(sample.source).tobytes()).hexdigest()
        else:
            digest = hashlib.sha256(Path(sample.source).read_bytes()).hexdigest()
        described.append({"name": sample.name, "sha256": digest})
    return described


class BatchStream:
    """ONNX Runtime's calibration protocol (``get_next() -> dict | None``), loading images only
    when their batch is asked for, so memory stays bounded whatever the sample size.

    Unreadable images are skipped; :attr:`used` counts the ones that went in.
    """

    def __init__(self, samples: list[Sample], pre: Preprocessing, input_name: str, input_format: str, batch_size: int) -> None:
        self.samples, self.pre, self.input_name = samples, pre, input_name
        self.fused = input_format == UINT8_NHWC
        self.batch_size = batch_size
        self.used = 0
        self._batches: Iterator[dict[str, Any]] = self._iterate()

    def _array(self, sample: Sample) -> np.ndarray | None:
        try:
            image = load_image(sample)
        except DataError:
            return None
        pixels = np.asarray(self.pre.resize_crop(image), dtype=np.uint8)
        return pixels if self.fused else self.pre.normalize(pixels)

    def _iterate(self) -> Iterator[dict[str, Any]]:
        batch: list[np.ndarray] = []
        for sample in self.samples:
            array = self._array(sample)
            if array is None:
                continue
            batch.append(array)
            if len(batch) == self.batch_size:
                self.used += len(batch)
                yield {self.input_name: np.stack(batch)}
                batch = []
        if batch:
            self.used += len(batch)
            yield {self.input_name: np.stack(batch)}

    def get_next(self) -> dict[str, Any] | None:
        return next(self._batches, None)

    def chunks(self, batches: int) -> Iterator["_Chunk"]:
        """Readers of at most ``batches`` batches each: calibrators hold one chunk at a time."""
        while True:
            chunk = _Chunk(self, batches)
            if not chunk.prime():
                return
            yield chunk


class _Chunk:
    def __init__(self, stream: BatchStream, limit: int) -> None:
        self.stream, self.left = stream, limit
        self._first: dict[str, Any] | None = None

    def prime(self) -> bool:
        self._first = self.stream.get_next()
        return self._first is not None

    def get_next(self) -> dict[str, Any] | None:
        if self._first is not None:
            first, self._first = self._first, None
            self.left -= 1
            return first
        if self.left <= 0:
            return None
        self.left -= 1
        return self.stream.get_next()
