from __future__ import annotations

import io
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from edgetransfer.data import DataSpec, load_dataset, load_image
from edgetransfer.errors import DataError
from edgetransfer.runtime import preprocessing
from edgetransfer.runtime.errors import ImageError
from edgetransfer.runtime.preprocessing import load_rgb, to_rgb

from conftest import write_folder


def test_folder_is_split_stratified_and_seeded(digit_folder):
    first = load_dataset(DataSpec(str(digit_folder), val_fraction=0.25, seed=3))
    again = load_dataset(DataSpec(str(digit_folder), val_fraction=0.25, seed=3))
    other = load_dataset(DataSpec(str(digit_folder), val_fraction=0.25, seed=4))
    assert first.classes == ["digit_0", "digit_1", "digit_2"]
    assert Counter(s.label for s in first.val) == {0: 3, 1: 3, 2: 3}
    assert Counter(s.label for s in first.test) == {0: 1, 1: 1, 2: 1}  # the default 10% test split, at least one a class
    assert Counter(s.label for s in first.train) == {0: 8, 1: 8, 2: 8}
    assert [s.name for s in first.val] == [s.name for s in again.val]
    assert [s.name for s in first.test] == [s.name for s in again.test]
    assert [s.name for s in first.val] != [s.name for s in other.val]
    names = [{s.name for s in split} for split in (first.train, first.val, first.test)]
    assert not names[0] & names[1] and not names[0] & names[2] and not names[1] & names[2]


def test_test_split_is_held_out_and_old_runs_keep_theirs():
    with_test = load_dataset(DataSpec(test_fraction=0.2))
    without = load_dataset(DataSpec(test_fraction=0.0))
    assert len(with_test.test) == 359 and len(with_test.val) == len(without.val) == 359
    assert [s.name for s in with_test.val] == [s.name for s in without.val]  # adding a test split leaves validation as it was
    assert len(with_test.train) + len(with_test.test) == len(without.train) and not without.test
    assert DataSpec.from_dict({"source": "digits", "val_fraction": 0.2, "seed": 0}).test_fraction == 0.0  # a run from before
    with pytest.raises(DataError, match="test_fraction must be at least 0 and leave training images"):
        DataSpec(val_fraction=0.5, test_fraction=0.5)


def test_train_val_test_layout_uses_the_test_folder(tmp_path):
    for split, count in (("train", 6), ("val", 2), ("test", 3)):
        write_folder(tmp_path / "d" / split, per_class=count)
    dataset = load_dataset(DataSpec(str(tmp_path / "d")))
    assert dataset.layout == "train/val/test" and (len(dataset.train), len(dataset.val), len(dataset.test)) == (18, 6, 9)
    assert not load_dataset(DataSpec(str(tmp_path / "d"), test_fraction=0.0)).test


def test_train_val_layout_is_used_as_given(tmp_path):
    write_folder(tmp_path / "d" / "train", per_class=6)
    write_folder(tmp_path / "d" / "val", per_class=2)
    dataset = load_dataset(DataSpec(str(tmp_path / "d")))
    assert dataset.layout == "train/val"
    assert (len(dataset.train), len(dataset.val)) == (18, 6)


def test_demo_digits_are_served_from_memory():
    dataset = load_dataset(DataSpec())
    assert dataset.classes == [str(d) for d in range(10)]
    assert len(dataset.train) + len(dataset.val) + len(dataset.test) == 1797 and len(dataset.test) == 179
    image = load_image(dataset.train[0])
    assert image.mode == "RGB" and image.size == (8, 8)
    assert np.asarray(image).max() > 128  # strokes are bright on black


def test_digits_m_is_the_demo_split_on_photo_patches_and_deterministic():
    plain, shifted = load_dataset(DataSpec()), load_dataset(DataSpec(source="digits-m"))
    assert shifted.classes == plain.classes
    for split in ("train", "val", "test"):  # the same images, labels and split, on another background
        a, b = getattr(plain, split), getattr(shifted, split)
        assert [s.label for s in a] == [s.label for s in b]
        assert [s.name.split("/")[1] for s in a] == [s.name.split("/")[1] for s in b]
    pixels = np.stack([s.source for s in shifted.train[:200]])
    assert pixels.shape == (200, 32, 32, 3) and pixels.dtype == np.uint8
    assert pixels.std(axis=(1, 2)).mean() > 20 and np.abs(np.diff(pixels.astype(int), axis=3)).mean() > 3  # textured colour
    again = load_dataset(DataSpec(source="digits-m", seed=1))
    by_name = {s.name: s.source for s in again.train + again.val + again.test}
    assert all(np.array_equal(by_name[s.name], s.source) for s in shifted.train[:50])  # one data set whatever the split seed


def test_limit_per_class_takes_a_subset():
    dataset = load_dataset(DataSpec(limit_per_class=10))
    assert len(dataset.train) == 70 and len(dataset.val) == 20 and len(dataset.test) == 10


def test_corrupt_and_truncated_images_are_skipped_and_counted(digit_folder, capsys):
    (digit_folder / "digit_0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    good = (digit_folder / "digit_1" / "0012.png").read_bytes()
    (digit_folder / "digit_1" / "truncated.png").write_bytes(good[: len(good) // 2])
    (digit_folder / "digit_2" / "notes.txt").write_text("not an image, ignored")
    dataset = load_dataset(DataSpec(str(digit_folder)))
    assert len(dataset.train) + len(dataset.val) + len(dataset.test) == 36
    assert sorted(name for name, _ in dataset.skipped) == ["digit_0/broken.png", "digit_1/truncated.png"]
    with pytest.raises(DataError, match=r"2 unreadable image\(s\).*drop --strict"):
        load_dataset(DataSpec(str(digit_folder), strict=True))


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Image.new("L", (4, 4), 200), (200, 200, 200)),
        (lambda: Image.new("RGBA", (4, 4), (10, 20, 30, 0)), (10, 20, 30)),
        (lambda: Image.new("CMYK", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
        (lambda: Image.new("I;16", (4, 4), 65535), (255, 255, 255)),
        (lambda: Image.new("I;16", (4, 4), 32896), (128, 128, 128)),
        (lambda: Image.new("1", (4, 4), 1), (255, 255, 255)),
        (lambda: Image.new("P", (4, 4), 0).convert("P"), (0, 0, 0)),
    ],
)
def test_every_pillow_mode_becomes_8_bit_rgb(make, expected):
    image = to_rgb(make())
    assert image.mode == "RGB"
    assert tuple(np.asarray(image)[0, 0]) == expected


def test_sixteen_bit_png_round_trip(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((5, 5), 4096 * 8, dtype=np.uint16)).save(path)
    assert tuple(np.asarray(load_rgb(path))[0, 0]) == (128, 128, 128)


@pytest.mark.parametrize(
    "pixels, mode, top",
    [
        (np.linspace(0, 1, 700 * 30, dtype=np.float32).reshape(700, 30), "F", 1.0),  # a float image in [0, 1]
        (np.linspace(-5, 900, 700 * 30, dtype=np.float32).reshape(700, 30), "F", 900.0),  # scaled by its largest value
        (np.arange(700 * 30, dtype=np.int32).reshape(700, 30) * 3, "I", 3 * (700 * 30 - 1)),
        (np.arange(700 * 30, dtype=np.int32).reshape(700, 30) % 100, "I", 255.0),  # small values are not stretched
    ],
)
def test_deep_images_are_scaled_band_by_band_as_one_array_would_be(pixels, mode, top, monkeypatch):
    monkeypatch.setattr(preprocessing, "BAND_ROWS", 64)  # 700 rows: eleven bands, the last one short
    expected = np.clip(pixels.astype(np.float32) / np.float32(top) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    image = to_rgb(Image.fromarray(pixels, mode=mode))
    assert image.mode == "RGB" and image.size == (30, 700)
    assert np.array_equal(np.asarray(image)[..., 1], expected)


def test_a_float_image_with_a_nan_in_its_last_band_is_refused(monkeypatch):
    monkeypatch.setattr(preprocessing, "BAND_ROWS", 64)
    pixels = np.zeros((300, 20), dtype=np.float32)
    pixels[-1, -1] = np.nan
    with pytest.raises(ImageError, match="not numbers"):
        to_rgb(Image.fromarray(pixels, mode="F"))


PEAK = """
import re, sys
from edgetransfer.runtime.preprocessing import load_rgb
def kilobytes(field):  # this process's own, unlike ru_maxrss, which keeps the parent's peak across exec
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
before = kilobytes("VmRSS")
image = load_rgb(sys.argv[1])
print((kilobytes("VmHWM") - before) / 1024)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_a_32_megapixel_float_tiff_decodes_in_little_more_than_its_own_size(tmp_path):
    path = tmp_path / "deep.tif"
    Image.fromarray(np.random.default_rng(0).random((4000, 8000), dtype=np.float32), mode="F").save(path)
    own = path.stat().st_size / 2**20  # 122 MB of float pixels; its RGB copy is as large again
    peak = float(subprocess.run([sys.executable, "-c", PEAK, str(path)], capture_output=True, text=True, check=True).stdout)
    # one array of float copies (as before) peaked at 4 times the image's size
    assert peak < 2.5 * own, f"decoding took {peak:.0f} MB over the import for a {own:.0f} MB image"


@pytest.mark.parametrize(
    "build_tree, message",
    [
        (lambda root: None, r"data path not found"),
        (lambda root: root.mkdir(), r"has 0 class folder\(s\)"),
        (lambda root: write_folder(root, per_class=4, classes=1), r"has 1 class folder\(s\).*at least two"),
        (lambda root: (write_folder(root, 4), (root / "empty_class").mkdir()), r"class folder .*empty_class has no images"),
    ],
)
def test_bad_folders_get_one_clear_line(tmp_path, build_tree, message):
    root = tmp_path / "data"
    build_tree(root)
    with pytest.raises(DataError, match=message) as error:
        load_dataset(DataSpec(str(root)))
    assert "\n" not in str(error.value)


def test_validation_class_unknown_to_training_is_refused(tmp_path):
    write_folder(tmp_path / "d" / "train", per_class=4, classes=2)
    write_folder(tmp_path / "d" / "val", per_class=2, classes=3)
    with pytest.raises(DataError, match=r"classes that training does not: digit_2"):
        load_dataset(DataSpec(str(tmp_path / "d")))


def test_a_file_as_data_path_is_refused(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (2, 2)).save(path)
    with pytest.raises(DataError, match="not a folder"):
        load_dataset(DataSpec(str(path)))


def test_bytes_and_bad_bytes():
    buffer = io.BytesIO()
    Image.new("RGB", (3, 3), (1, 2, 3)).save(buffer, format="PNG")
    assert tuple(np.asarray(load_rgb(buffer.getvalue()))[1, 1]) == (1, 2, 3)
    with pytest.raises(DataError, match=r"cannot read image <bytes>"):
        load_rgb(b"definitely not an image")
