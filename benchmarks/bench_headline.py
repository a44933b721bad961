"""The headline table: `edgetransfer bench` on the demo run and on resnet18 trained on digits.

    python benchmarks/bench_headline.py        # about 10 minutes on a 2-core CPU

Each model is fine-tuned, exported, and given ort-cpu FP32 and INT8 variants (GPU variants too
where a GPU works), then benched at batch 1 and 8 with 2 threads. The bench.md of each run is
copied to benchmarks/results/bench-<name>.md with its bench.json.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from edgetransfer.bench import BenchOptions, bench_run
from edgetransfer.export import export_onnx
from edgetransfer.finetune import FinetuneConfig, Mode, finetune
from edgetransfer.optimize import Precision, Target, build_variants
from edgetransfer.progress import set_quiet
from edgetransfer.report import recommendation_line
from edgetransfer.runtime import probe_provider

RESULTS = Path(__file__).parent / "results"
CASES = {
    "demo": FinetuneConfig(),
    "resnet18": FinetuneConfig(arch="resnet18", weights="none", mode=Mode.FULL, epochs=15),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_quiet(True)
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in CASES.items():
            run_dir = finetune(config, Path(tmp) / name).run_dir
            export_onnx(run_dir)
            build_variants(run_dir, [Target.ORT_CPU], [Precision.FP32, Precision.INT8])
            if probe_provider("cuda") is None:
                build_variants(run_dir, [Target.ORT_CUDA], [Precision.FP32, Precision.FP16])
            report = bench_run(run_dir, BenchOptions(threads=args.threads, batch_sizes=(1, 8), iterations=100, warmup=10))
            for suffix in ("md", "json", "png"):
                shutil.copyfile(run_dir / f"bench.{suffix}", RESULTS / f"bench-{name}.{suffix}")
            print(name, recommendation_line(report))


if __name__ == "__main__":
    main()
