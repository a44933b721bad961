"""The fine-tuning speed benchmark's generated folder (digits drawn onto photo patches), made at a
small count: real JPEGs of the asked size, one folder per digit, the same bytes for the same seed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from edgetransfer.data import DataSpec, load_dataset

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def bench_module(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the benchmark imports its sibling, fingerprint
    spec = importlib.util.spec_from_file_location("finetune_speed_bench", BENCHMARKS / "finetune_speed_bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_folder_holds_real_jpegs_of_every_digit(tmp_path: Path, monkeypatch):
    bench = bench_module(monkeypatch)
    root = bench.make_photo_digits(tmp_path / "a", 40, size=96, seed=3)
    files = sorted(root.rglob("*.jpg"))
    assert len(files) == 40 and sorted(p.name for p in root.iterdir()) == [str(d) for d in range(10)]
    images = [Image.open(f) for f in files]
    assert all(i.format == "JPEG" and i.size == (96, 96) and i.mode == "RGB" for i in images)
    pixels = np.stack([np.asarray(i, dtype=np.float32) for i in images])
    assert pixels.std(axis=(1, 2, 3)).min() > 10  # photo texture and a digit, not a flat fill
    assert np.abs(pixels[0] - pixels[1]).mean() > 5  # different patches and offsets
    again = bench.make_photo_digits(tmp_path / "b", 40, size=96, seed=3)
    assert all((again / f.relative_to(root)).read_bytes() == f.read_bytes() for f in files)  # seeded: the same folder
    dataset = load_dataset(DataSpec(source=str(root), test_fraction=0.0))
    assert len(dataset.classes) == 10 and len(dataset.train) + len(dataset.val) == 40
