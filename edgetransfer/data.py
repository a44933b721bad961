"""Image data: folders (``train/``+``val/`` [+``test/``] or one folder split by seeded fractions)
and the embedded demo (scikit-learn's handwritten digits), checked up front and served to torch.

Three splits: training images fit the model; validation images choose its checkpoint (and
every export check runs on them); test images are chosen on by nothing, so the accuracy a
variant, the INT8 guard or bench reports comes from them.
"""

from __future__ import annotations

import os
import random
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data
import torchvision.transforms as T
from PIL import Image
from rich.markup import escape
from skimage.data import lfw_subset
from sklearn.datasets import load_digits, load_sample_images

from .choice import Choice
from .errors import DataError
from .progress import console, progress
from .runtime.preprocessing import Preprocessing, check_shape, load_rgb, to_rgb
from .runtime.text import printable

__all__ = [
    "DEMO",
    "DEMO_M",
    "FACES",
    "EMBEDDED",
    "DataSpec",
    "Sample",
    "Dataset",
    "Augment",
    "load_dataset",
    "load_image",
    "eval_transform",
    "train_transform",
    "TorchImages",
]

DEMO = "digits"
DEMO_M = "digits-m"  # the same digits blended with photo patches, made like MNIST-M: a shifted domain
FACES = "faces"  # scikit-image's lfw_subset: 100 faces and 100 other patches (the two-task demo's second task)
EMBEDDED = frozenset({DEMO, DEMO_M, FACES})  # data sets built in memory, no folder
DIGITS_M_SIZE = 32
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif", ".jp2"})


@dataclass(frozen=True)
class DataSpec:
    """Where images come from and how they are split; recorded so later stages see the same split.

    Attributes:
        source: ``"digits"`` for the embedded demo, ``"digits-m"`` for the same digits on photo
            patches (a shifted domain), or an image folder.
        val_fraction: validation share per class when the folder has no ``train/``+``val/``.
        test_fraction: test share per class, held out from everything (same layouts); a
            ``train/``+``val/`` folder takes its test images from a ``test/`` beside them.
        seed: seeds the split and the per-class subset.
        limit_per_class: keep at most this many images per class (before splitting).
        strict: fail on unreadable images instead of skipping them.
    """

    source: str = DEMO
    val_fraction: float = 0.2
    test_fraction: float = 0.1
    seed: int = 0
    limit_per_class: int | None = None
    strict: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if not 0.0 <= self.test_fraction < 1.0 or self.val_fraction + self.test_fraction >= 1.0:
            raise DataError(
                f"test_fraction must be at least 0 and leave training images beside val_fraction {self.val_fraction}, got {self.test_fraction}"
            )
        if self.limit_per_class is not None and self.limit_per_class < 2:
            raise DataError(f"limit_per_class must be at least 2, got {self.limit_per_class}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DataSpec":
        """The spec a run recorded; runs from before the test split had none and keep none."""
        return cls(**{"test_fraction": 0.0, **data})


@dataclass(frozen=True)
class Sample:
    """One image: a file path, or pixels held in memory (the demo), and its class index."""

    source: str | np.ndarray = field(compare=False)
    label: int
    name: str


@dataclass
class Dataset:
    """The classes and the three splits (``test`` may be empty), plus what was skipped and why."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    layout: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "classes": self.classes,
            "layout": self.layout,
            "train_images": len(self.train),
            "val_images": len(self.val),
            "test_images": len(self.test),
            "skipped_images": len(self.skipped),
        }


def load_image(sample: Sample) -> Image.Image:
    """The sample's pixels as an RGB Pillow image.

    Raises:
        DataError: the file is unreadable.
    """
    if isinstance(sample.source, np.ndarray):
        return to_rgb(Image.fromarray(sample.source))
    return load_rgb(sample.source)


def load_dataset(spec: DataSpec, workers: int = 4) -> Dataset:
    """Read, check and split the data ``spec`` names.

    Every image is decoded once here, so a corrupt file is found before training starts: it
    is skipped and counted (or, with ``spec.strict``, an error).

    Raises:
        DataError: missing or empty path, class folders without images, fewer than two
            classes, validation classes unknown to training, or (strict) a corrupt image.
    """
    if spec.source == DEMO:
        return _split(spec, *_digits(), layout="demo")
    if spec.source == DEMO_M:
        return _split(spec, *_digits_m(), layout="demo")
    if spec.source == FACES:
        return _split(spec, *_faces(), layout="demo")
    root = Path(spec.source).expanduser()
    if not root.exists():
        raise DataError(f"data path not found: {root} (give an image folder, or omit --data for the demo)")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {root} (give a folder with one subfolder per class)")
    if (root / "train").is_dir() and (root / "val").is_dir():
        return _train_val(spec, root, workers)
    classes, samples = _scan(root)
    samples, skipped = _check(samples, spec.strict, workers)
    dataset = _split(spec, classes, samples, layout="split")
    dataset.skipped = skipped
    return dataset


def _digits() -> tuple[list[str], list[Sample]]:
    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    samples = [Sample(img, int(y), f"digits/{i:04d}") for i, (img, y) in enumerate(zip(pixels, digits.target, strict=True))]
    return [str(c) for c in digits.target_names], samples


def _faces() -> tuple[list[str], list[Sample]]:
    """scikit-image's ``lfw_subset``, shipped inside its wheel: 100 greyscale 25x25 face crops of
    Labeled Faces in the Wild, then 100 patches of the same photos that are not faces."""
    pixels = (lfw_subset() * 255.0).round().astype(np.uint8)
    half = len(pixels) // 2
    return ["face", "not-face"], [Sample(img, int(i >= half), f"faces/{i:03d}") for i, img in enumerate(pixels)]


def _digits_m(seed: int = 0) -> tuple[list[str], list[Sample]]:
    """The demo digits made like MNIST-M (Ganin et al. 2016, JMLR): each digit, upscaled to
    32 px, blended with a random 32 px patch of one of scikit-learn's two sample photos by the
    absolute difference ``|patch - digit|`` per channel. Deterministic from ``seed`` (fixed, so
    that "digits-m" is one data set whatever the split's seed); the same labels, names and
    split as the digits."""
    classes, digits = _digits()
    photos = [np.asarray(photo, dtype=np.int16) for photo in load_sample_images().images]
    rng = np.random.default_rng(seed)
    samples = []
    for sample in digits:
        digit = np.asarray(
            Image.fromarray(np.asarray(sample.source)).resize((DIGITS_M_SIZE, DIGITS_M_SIZE), Image.Resampling.BILINEAR), dtype=np.int16
        )
        photo = photos[int(rng.integers(len(photos)))]
        top, left = (int(rng.integers(photo.shape[i] - DIGITS_M_SIZE)) for i in (0, 1))
        patch = photo[top : top + DIGITS_M_SIZE, left : left + DIGITS_M_SIZE]
        blended = np.abs(patch - digit[:, :, None]).astype(np.uint8)
        samples.append(Sample(blended, sample.label, sample.name.replace("digits/", "digits-m/")))
    return classes, samples


def _scan(root: Path, classes: list[str] | None = None) -> tuple[list[str], list[Sample]]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = [p.name for p in folders]
    if classes is None:
        classes = found
        if len(classes) < 2:
            raise DataError(f"{root} has {len(classes)} class folder(s); put each class's images in its own subfolder (at least two classes)")
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DataError(f"{root} has classes that training does not: {', '.join(extra)}")
    samples = []
    for folder in folders:
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith("."))
        if not images:
            raise DataError(f"class folder {folder} has no images; add some or remove the folder")
        label = classes.index(folder.name)
        samples += [Sample(str(p), label, str(p.relative_to(root))) for p in images]
    return classes, samples


def _check(samples: list[Sample], strict: bool, workers: int) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Decode every image once; keep the good ones, report the bad ones."""

    def reason(sample: Sample) -> str | None:
        try:
            check_shape(load_image(sample).size, sample.name)  # the transforms would resize it
            return None
        except DataError as exc:
            return str(exc)

    good: list = []
    bad: list = []
    with progress() as bar, ThreadPoolExecutor(max(1, workers)) as pool:
        task = bar.add_task("checking images", total=len(samples), status="")
        for sample, problem in zip(samples, pool.map(reason, samples), strict=True):
            bar.advance(task)
            (bad if problem else good).append((sample, problem))
    if bad and strict:
        raise DataError(f"{len(bad)} unreadable image(s), first: {bad[0][1]} (drop --strict to skip them)")
    if bad:
        console.print("[yellow]warning:[/]", escape(printable(f"skipped {len(bad)} unreadable image(s); first: {bad[0][1]}")))
    return [s for s, _ in good], [(s.name, p) for s, p in bad]


def _limit(samples: list[Sample], limit: int | None, rng: random.Random) -> dict[int, list[Sample]]:
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_class[sample.label].append(sample)
    for label, items in by_class.items():
        rng.shuffle(items)
        if limit is not None:
            by_class[label] = items[:limit]
    return by_class


def _split(spec: DataSpec, classes: list[str], samples: list[Sample], layout: str) -> Dataset:
    """Seeded, stratified split: each class gives ``val_fraction`` of its images (at least one) to
    validation and ``test_fraction`` to test (at least one when the class has three or more)."""
    rng = random.Random(spec.seed)
    train, val, test = [], [], []
    for label, items in sorted(_limit(samples, spec.limit_per_class, rng).items()):
        if len(items) < 2:
            raise DataError(f"class {classes[label]!r} has {len(items)} readable image(s); a split needs at least 2")
        n_val = min(len(items) - 1, max(1, round(spec.val_fraction * len(items))))
        n_test = min(len(items) - 1 - n_val, max(1, round(spec.test_fraction * len(items)))) if spec.test_fraction else 0
        val += items[:n_val]
        test += items[n_val : n_val + n_test]
        train += items[n_val + n_test :]
    _need_two_classes(classes, train)
    return Dataset(classes, train, val, layout, test=test)


def _train_val(spec: DataSpec, root: Path, workers: int) -> Dataset:
    classes, train = _scan(root / "train")
    _, val = _scan(root / "val", classes)
    train, skipped = _check(train, spec.strict, workers)
    val, skipped_val = _check(val, spec.strict, workers)
    rng = random.Random(spec.seed)
    train = [s for items in _limit(train, spec.limit_per_class, rng).values() for s in items]
    val = [s for items in _limit(val, spec.limit_per_class, rng).values() for s in items]
    _need_two_classes(classes, train)
    if not val:
        raise DataError(f"{root / 'val'} has no readable images")
    test: list[Sample] = []
    if (root / "test").is_dir() and spec.test_fraction:
        _, test = _scan(root / "test", classes)
        test, skipped_test = _check(test, spec.strict, workers)
        skipped_val += skipped_test
    return Dataset(classes, train, val, "train/val" + ("/test" if test else ""), skipped + skipped_val, test)


check_images = _check  # decode every image once: (good samples, [(name, why)] of the bad)
scan_classes = _scan  # class subfolders of a folder: (classes, samples)


def _need_two_classes(classes: list[str], train: list[Sample]) -> None:
    counts = Counter(s.label for s in train)
    empty = [classes[i] for i in range(len(classes)) if counts[i] == 0]
    if empty:
        raise DataError(f"no readable training images for class(es) {', '.join(empty)}")


# ---------------------------------------------------------------------------------------------
# torch side: transforms and a Dataset


class Augment(Choice):
    """Train-time augmentation (only used when the backbone sees the images every epoch)."""

    NONE = "none"
    CROP = "crop"  # random resized crop, scale 0.5-1: safe for digits, text, anything oriented
    CROP_FLIP = "crop-flip"  # plus horizontal flips: natural photos

    @classmethod
    def kind(cls) -> str:
        return "augmentation"


def eval_transform(pre: Preprocessing):
    """torchvision transform equal to ``pre``: resize, centre crop, scale, normalise."""
    return T.Compose(
        [
            T.Resize(pre.resize_size, interpolation=T.InterpolationMode(pre.interpolation.value)),
            T.CenterCrop(pre.input_size),
            T.ToTensor(),
            T.Normalize(pre.mean, pre.std),
        ]
    )


def train_transform(pre: Preprocessing, augment: Augment):
    """Train-time transform; ``Augment.NONE`` is the eval transform."""
    if augment is Augment.NONE:
        return eval_transform(pre)
    steps = [T.RandomResizedCrop(pre.input_size, scale=(0.5, 1.0), interpolation=T.InterpolationMode(pre.interpolation.value))]
    if augment is Augment.CROP_FLIP:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, T.ToTensor(), T.Normalize(pre.mean, pre.std)])


class TorchImages(torch.utils.data.Dataset):
    """A map-style torch dataset over samples (an ``__getitem__``/``__len__`` pair)."""

    def __init__(self, samples: list[Sample], transform) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        return self.transform(load_image(sample)), sample.label


def default_workers(spec: DataSpec) -> int:
    """Loader worker processes: none for in-memory demo data, else up to 4 leaving one core free."""
    if spec.source in EMBEDDED:
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))
