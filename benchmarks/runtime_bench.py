"""The runtime on its own: what installing it costs, how fast it starts, and what the Predictor
adds to a bare ONNX Runtime session.

    python benchmarks/runtime_bench.py                      # about 7 minutes on 2 cores
    python benchmarks/runtime_bench.py --work runs/rtbench  # keep the runs and the venv (and reuse the runs)

1. Builds the runtime wheel and installs it alone into a fresh venv (numpy, Pillow and ONNX
   Runtime pinned to this environment's versions); reports the venv's size and what takes it.
2. In that venv, in fresh processes (median of 7): the import of ``Predictor``, and a cold first
   prediction split into import, session creation and the first ``predict``.
3. Here, 2 ONNX Runtime threads: ``Predictor.predict`` against a bare ``session.run`` on the
   same, already preprocessed input, at batch 1 and 8, split into decode, resize+crop, normalise
   and softmax, on the demo model (64 px) and EfficientNet-Lite0 at 224 px, for a 640x480 and
   a 1920x1080 JPEG, with and without ``fast_jpeg``. Timed in interleaved rounds; medians.
Writes benchmarks/results/runtime.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fingerprint import fingerprint, save_results

REPO = Path(__file__).resolve().parent.parent

GOALS = {"venv_mb": 150, "import_s": 0.3, "first_prediction_s": 1.0}
THREADS = 2


def prepare_models(work: Path) -> dict[str, Path]:
    from edgetransfer.data import DataSpec
    from edgetransfer.export import export_onnx
    from edgetransfer.finetune import FinetuneConfig, finetune

    models = {}
    for name, config in {
        "demo (Lite0, 64 px)": FinetuneConfig(),
        "Lite0, 224 px": FinetuneConfig(image_size=224, data=DataSpec(limit_per_class=20), epochs=5),
    }.items():
        run = work / name.split(" ")[0].lower().replace(",", "")
        if not (run / "metrics.json").is_file():
            finetune(config, run)
        models[name] = export_onnx(run).path
    return models


def runtime_venv(work: Path) -> Path:
    import numpy
    import onnxruntime
    import PIL

    venv = work / "runtime-venv"
    if (venv / "bin" / "edgetransfer-runtime").is_file():
        return venv
    dist = work / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir", str(dist), str(REPO / "runtime")], check=True, capture_output=True
    )
    wheel = max(dist.glob("edgetransfer_runtime-*.whl"), key=lambda p: p.stat().st_mtime)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pins = [f"numpy=={numpy.__version__}", f"pillow=={PIL.__version__}", f"onnxruntime=={onnxruntime.__version__}"]
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel), *pins], check=True)
    return venv


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


def venv_sizes(venv: Path) -> dict:
    site = next((venv / "lib").glob("python*/site-packages"))
    parts: dict[str, float] = {}
    for entry in site.iterdir():
        if entry.name.endswith((".dist-info", ".pth")) or entry.name == "__pycache__":
            owner = "metadata"
        else:
            owner = entry.name.removesuffix(".libs").removesuffix(".py").split("-")[0].lower()
            owner = {"pil": "pillow", "pkg_resources": "setuptools", "_distutils_hack": "setuptools", "google": "protobuf"}.get(owner, owner)
        parts[owner] = parts.get(owner, 0.0) + (size_mb(entry) if entry.is_dir() else entry.stat().st_size / 1e6)
    total = size_mb(venv)
    baseline = parts.get("pip", 0.0) + parts.get("setuptools", 0.0)
    return {"total_mb": total, "without_pip_setuptools_mb": total - baseline, "by_package_mb": dict(sorted(parts.items(), key=lambda kv: -kv[1]))}


def in_venv(venv: Path, code: str, repeats: int = 7) -> list[dict]:
    python = venv / "bin" / "python"
    results = []
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True, cwd=venv)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["process_s"] = time.perf_counter() - started
        results.append(row)
    return results


def median_of(rows: list[dict]) -> dict:
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def startup(venv: Path, models: dict[str, Path], image: Path) -> dict:
    empty = median_of(in_venv(venv, "import json; print(json.dumps({}))".replace("{}", '{"x": 0}')))["process_s"]
    imported = median_of(
        in_venv(
            venv,
            (
                "import time, json; t = time.perf_counter()\n"
                "from edgetransfer.runtime import Predictor\n"
                "print(json.dumps({'import_s': time.perf_counter() - t}))"
            ),
        )
    )
    cold = {}
    for name, model in models.items():
        cold[name] = median_of(
            in_venv(
                venv,
                (
                    "import time, json; t0 = time.perf_counter()\n"
                    "from edgetransfer.runtime import Predictor\n"
                    f"t1 = time.perf_counter(); p = Predictor({str(model)!r}, threads={THREADS})\n"
                    f"t2 = time.perf_counter(); p.predict({str(image)!r})\n"
                    "t3 = time.perf_counter()\n"
                    "print(json.dumps({'import_s': t1 - t0, 'session_s': t2 - t1, 'first_predict_s': t3 - t2, 'first_prediction_s': t3 - t0}))"
                ),
            )
        )
    return {"python_start_s": empty, "import": imported, "cold": cold}


def photos(folder: Path) -> dict[str, Path]:
    from PIL import Image
    from skimage import data

    base = Image.fromarray(data.chelsea())
    out = {}
    for width, height in ((640, 480), (1920, 1080)):
        path = folder / f"chelsea-{width}x{height}.jpg"
        base.resize((width, height), Image.Resampling.BICUBIC).save(path, quality=90)
        out[f"{width}x{height} JPEG"] = path
    return out


def overhead(model: Path, image: Path, batch: int, rounds: int = 7, per_round: int = 20) -> dict:
    """Predictor.predict against session.run on the same input; the Predictor's parts timed alone."""
    from edgetransfer.runtime import Predictor
    from edgetransfer.runtime.predictor import softmax
    from edgetransfer.runtime.preprocessing import load_rgb

    predictor = Predictor(model, threads=THREADS)
    fast = Predictor(model, threads=THREADS, fast_jpeg=True)
    session = predictor.session
    pre = predictor.info.preprocessing
    paths = [str(image)] * batch
    encoded = image.read_bytes()
    decoded = load_rgb(encoded)
    cropped = pre.resize_crop(decoded)
    feed = np.stack([pre(decoded)] * batch)
    logits = session.run(feed)
    parts = {
        "predict_ms": lambda: predictor.predict(paths, top_k=1),
        "predict_fast_jpeg_ms": lambda: fast.predict(paths, top_k=1),
        "session_run_ms": lambda: session.run(feed),
        "decode_ms": lambda: [load_rgb(encoded) for _ in range(batch)],
        "resize_crop_ms": lambda: [pre.resize_crop(decoded) for _ in range(batch)],
        "normalize_ms": lambda: [pre.normalize(np.asarray(cropped, dtype=np.uint8)) for _ in range(batch)],
        "softmax_ms": lambda: softmax(logits),
    }
    for work in parts.values():
        work()
    samples: dict[str, list[float]] = {key: [] for key in parts}
    for _ in range(rounds):
        for key, work in parts.items():
            started = time.perf_counter()
            for _ in range(per_round):
                work()
            samples[key].append(1000 * (time.perf_counter() - started) / per_round)
    row = {key: statistics.median(values) for key, values in samples.items()}
    row["overhead_ms"] = row["predict_ms"] - row["session_run_ms"]
    row["preprocessing_ms"] = row["decode_ms"] + row["resize_crop_ms"] + row["normalize_ms"]
    row["overhead_fast_jpeg_ms"] = row["predict_fast_jpeg_ms"] - row["session_run_ms"]
    exact = np.asarray(pre.resize_crop(decoded), dtype=np.int16)
    drafted = np.asarray(pre.resize_crop(load_rgb(encoded, 2 * pre.resize_size)), dtype=np.int16)
    row["fast_jpeg_max_pixel_diff"] = int(np.abs(exact - drafted).max())
    return row


def markdown(report: dict) -> str:
    machine = report["machine"]
    sizes, start = report["venv"], report["startup"]
    lines = [
        "# edgetransfer-runtime: install size, start-up and the Predictor's overhead",
        "",
        f"CPU: {machine['cpu']['model']} ({', '.join(machine['cpu']['flags']) or 'no AVX2'}), {machine['cores']} cores;"
        f" ONNX Runtime {THREADS} threads, spinning off. numpy {report['pins']['numpy']}, Pillow {report['pins']['pillow']},"
        f" onnxruntime {report['pins']['onnxruntime']}, Python {sys.version.split()[0]}.",
        "",
        "## A fresh venv with only the runtime wheel",
        "",
        f"**{sizes['total_mb']:.0f} MB** in all (goal <= {GOALS['venv_mb']} MB); {sizes['without_pip_setuptools_mb']:.0f} MB without the"
        " pip and setuptools every venv starts with. No torch, onnx, click, rich or matplotlib.",
        "",
        "| package | MB |",
        "|---|---:|",
        *[f"| {name} | {mb:.1f} |" for name, mb in sizes["by_package_mb"].items() if mb >= 0.05],
        "",
        "## Start-up, fresh processes in that venv (median of 7)",
        "",
        f"Python itself starts in {start['python_start_s']:.3f} s.",
        f"`from edgetransfer.runtime import Predictor`: **{start['import']['import_s']:.3f} s** (goal <= {GOALS['import_s']} s);"
        f" the whole process {start['import']['process_s']:.3f} s.",
        "",
        "| model | import s | session s | first predict s | first prediction, in all | process s |",
        "|---|---:|---:|---:|---:|---:|",
        *[
            f"| {name} | {c['import_s']:.3f} | {c['session_s']:.3f} | {c['first_predict_s']:.3f} | **{c['first_prediction_s']:.3f}**"
            f" (goal <= {GOALS['first_prediction_s']}) | {c['process_s']:.3f} |"
            for name, c in start["cold"].items()
        ],
        "",
        "## What the Predictor adds to a bare session (ms per call, median of 7 rounds)",
        "",
        "`predict` = decode + resize/crop + normalise + `session.run` + softmax and top-k; `overhead` = `predict` - `session.run`."
        f" `predict` decodes and resizes a batch's images in parallel ({THREADS} threads); the decode, resize+crop and"
        " normalise columns are those steps timed alone, one image after another.",
        "",
        "| model | image | batch | session.run | predict | overhead | decode | resize+crop | normalise | softmax |"
        " predict, `fast_jpeg` | its overhead | its max pixel change |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {r['model']} | {r['image']} | {r['batch']} | {r['session_run_ms']:.2f} | {r['predict_ms']:.2f} | {r['overhead_ms']:.2f} |"
            f" {r['decode_ms']:.2f} | {r['resize_crop_ms']:.2f} | {r['normalize_ms']:.2f} | {r['softmax_ms']:.3f} |"
            f" {r['predict_fast_jpeg_ms']:.2f} | {r['overhead_fast_jpeg_ms']:.2f} | {r['fast_jpeg_max_pixel_diff']} |"
            for r in report["overhead"]
        ],
        "",
        "`fast_jpeg` (`Predictor(fast_jpeg=True)`, `--fast-jpeg`) lets libjpeg decode at 1/2, 1/4 or 1/8 scale while the"
        " shorter side stays at least twice the resize size; the max pixel change is against the exact path, on the"
        " model's cropped input (levels of 255).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="keep the runs and the venv here (and reuse them)")
    args = parser.parse_args()
    import numpy
    import onnxruntime
    import PIL

    from edgetransfer.progress import set_quiet

    set_quiet(True)
    work = args.work or Path(tempfile.mkdtemp(prefix="edgetransfer-runtime-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    models = prepare_models(work)
    images = photos(work)
    venv = runtime_venv(work)
    report = {
        "machine": fingerprint(torch_threads=THREADS),
        "pins": {"numpy": numpy.__version__, "pillow": PIL.__version__, "onnxruntime": onnxruntime.__version__},
        "goals": GOALS,
        "venv": venv_sizes(venv),
        "startup": startup(venv, models, images["640x480 JPEG"]),
        "overhead": [
            {"model": name, "image": label, "batch": batch, **overhead(model, path, batch)}
            for name, model in models.items()
            for label, path in images.items()
            for batch in (1, 8)
        ],
    }
    save_results("runtime", report, markdown(report))


if __name__ == "__main__":
    main()
