"""Write the default calibration set for the embedded demo: a class-balanced sample of the
demo's *training* split (never validation images), as PNG files in digits/<class>/.

    python calibration/make_demo_set.py            # 20 images per class -> calibration/digits/

The same sample is what `edgetransfer export RUN --target ort-cpu --precision int8` draws from a
demo run's own data by default; this folder lets you pass it explicitly (--calib) or inspect it.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image

from edgetransfer.data import DataSpec, load_dataset
from edgetransfer.optimize.calibration import balanced_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "digits")
    args = parser.parse_args()
    dataset = load_dataset(DataSpec())
    chosen = balanced_sample(dataset.train, args.per_class * len(dataset.classes))
    if args.out.exists():
        shutil.rmtree(args.out)
    for sample in chosen:
        folder = args.out / dataset.classes[sample.label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample.source).save(folder / (Path(sample.name).name + ".png"))
    print(f"wrote {len(chosen)} images to {args.out}")


if __name__ == "__main__":
    main()
