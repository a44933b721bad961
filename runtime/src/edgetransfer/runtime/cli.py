"""``edgetransfer-runtime``: what a deployer runs on the device, with nothing but the runtime installed.

    edgetransfer-runtime predict model.onnx cat.jpg dog.png [--json]
    edgetransfer-runtime info model.onnx
    edgetransfer-runtime check model.onnx [images...]
    edgetransfer-runtime enrol model.onnx --label NAME images... [--replace] [--task NAME] [--in-place | --output PATH]
    edgetransfer-runtime serve model.onnx [--port 3000] [--max-batch 8]   (the serve extra)

argparse only: the runtime installs no CLI framework. Every message that reaches the terminal
passes through :func:`printable`, since labels, paths and metadata come from files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from .enrol import enrol_file
from .errors import EdgeTransferError, PredictorError, first_line
from .predictor import Predictor, as_json
from .serve import add_serve_parser
from .sessions import mixed_builds, onnxruntime_builds
from .text import printable

__all__ = ["main", "printable"]

DEBUG_ENV = "EDGETRANSFER_DEBUG"
DEFAULT_TIMEOUT = 60.0  # seconds a run of the model may take: a model file can hold a graph that never ends


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.run(args)
    except EdgeTransferError as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"Error: {printable(first_line(exc, 500))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a mistake of the user's: one line, the traceback on request
        if os.environ.get(DEBUG_ENV):
            raise
        print(
            f"Error: internal error ({type(exc).__name__}: {printable(first_line(exc, 300))}); run again with {DEBUG_ENV}=1 for the traceback",
            file=sys.stderr,
        )
        return 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line as :func:`main` reads it, without running anything.

    Raises:
        SystemExit: a usage error (argparse has printed it).
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "run", None) is _enrol and not any(e.startswith("-") for e in extra):
        args.images = [*args.images, *map(Path, extra)]  # images after --label NAME (argparse stops at the option)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgetransfer-runtime",
        description="Run, inspect and check an exported edgetransfer model (ONNX, or an OpenVINO IR .xml).",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    predict = commands.add_parser("predict", help="classify images", description="Classify images with an exported model.")
    predict.add_argument("model", type=Path)
    predict.add_argument("images", nargs="+", type=Path)
    predict.add_argument("-k", "--top-k", type=int, default=3, help="classes per image (default 3)")
    predict.add_argument("--json", action="store_true", help="print JSON instead of lines")
    _session_options(predict)
    predict.set_defaults(run=_predict)

    info = commands.add_parser("info", help="labels, preprocessing, provenance and signature of a model")
    info.add_argument("model", type=Path)
    info.add_argument("--json", action="store_true", help="print JSON instead of lines")
    info.set_defaults(run=_info)

    check = commands.add_parser(
        "check",
        help="load, warm up, time and verify a model on this device",
        description="Load the model on the provider asked for (and say which one it got), check it against the sha256"
        " its manifest records when one is beside it, warm up, and time batch-1 predictions.",
    )
    check.add_argument("model", type=Path)
    check.add_argument("images", nargs="*", type=Path, help="images to time on (default: one grey image)")
    check.add_argument("--runs", type=_positive, default=50, help="timed predictions (default 50)")
    check.add_argument("--warmup", type=_positive, default=5, help="untimed predictions first (default 5)")
    check.add_argument("--json", action="store_true", help="print JSON instead of lines")
    _session_options(check)
    check.set_defaults(run=_check)

    _enrol_parser(commands)
    add_serve_parser(commands)
    return parser


def _enrol_parser(commands) -> None:
    enrol = commands.add_parser(
        "enrol",
        help="add, replace or remove a class of a prototype model (no training)",
        description="Add a class to a model made with 'edgetransfer finetune --mode prototype' from a few of its images"
        " (or replace or remove one). Writes MODEL-enrolled.onnx beside the model unless --output or --in-place.",
    )
    enrol.add_argument("model", type=Path)
    enrol.add_argument("images", nargs="*", type=Path, help="images of the class")
    what = enrol.add_mutually_exclusive_group(required=True)
    what.add_argument("--label", help="the class to add (or, with --replace, to make anew)")
    what.add_argument("--remove", metavar="LABEL", help="the class to remove")
    enrol.add_argument("--replace", action="store_true", help="make an existing class anew from these images")
    enrol.add_argument("--task", default=None, help="a multi-task model's prototype task to enrol into (default: its only one)")
    enrol.add_argument("--output", type=Path, default=None, help="where to write the enrolled model")
    enrol.add_argument("--in-place", action="store_true", help="replace MODEL itself (atomically)")
    enrol.add_argument("--threads", type=_positive, default=None, help="inference threads (default: the runtime's choice)")
    enrol.add_argument("--json", action="store_true", help="print JSON instead of a line")
    enrol.set_defaults(run=_enrol)


def _enrol(args: argparse.Namespace) -> int:

    if args.remove is not None and args.images:
        raise PredictorError("--remove takes no images")
    label = args.remove if args.remove is not None else args.label
    done, path = enrol_file(
        args.model,
        label,
        [str(p) for p in args.images],
        remove=args.remove is not None,
        replace=args.replace,
        output=args.output,
        in_place=args.in_place,
        threads=args.threads,
        task=args.task,
    )
    print(enrolment_line(done, path) if not args.json else json.dumps({**done.__dict__, "model": str(path)}, indent=2))
    return 0


def enrolment_line(done, path: Path) -> str:
    """One line that says what an enrolment did, for both CLIs."""
    if done.action == "remove":
        what = f"removed {printable(done.label)!s}"
    else:
        what = (
            f"{'added' if done.action == 'add' else 'replaced'} {printable(done.label)} from {done.images} image(s)"
            f" ({done.recognised} of them now recognised as it)"
        )
    where = f" in task {printable(done.task)}" if done.task else ""
    return f"{what}{where}; {done.classes} classes; wrote {printable(path)} in {done.seconds:.2f} s"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _session_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--provider", dest="providers", action="append", help="cpu, cuda, tensorrt or a full provider name; repeat for a fallback order (default cpu)"
    )
    parser.add_argument("--allow-fallback", action="store_true", help="accept a later provider when the first cannot load")
    parser.add_argument("--device", default="CPU", help="OpenVINO device, for an .xml model (CPU, GPU, AUTO)")
    parser.add_argument("--threads", type=_positive, default=None, help="inference threads (default: the runtime's choice)")
    parser.add_argument(
        "--timeout", type=_seconds, default=DEFAULT_TIMEOUT, help=f"seconds one run of the model may take (default {DEFAULT_TIMEOUT:g})"
    )
    parser.add_argument(
        "--max-memory-mb",
        type=_positive,
        default=None,
        help="cap the memory ONNX Runtime may hold, in MB: a model asking for more is refused before it gets it (default: no cap)",
    )
    parser.add_argument(
        "--fast-jpeg", action="store_true", help="decode large JPEGs at a reduced scale: faster, pixels within 2 levels of the exact path"
    )


def _predictor(args: argparse.Namespace):
    return Predictor(
        args.model,
        providers=args.providers,
        allow_fallback=args.allow_fallback,
        device=args.device,
        threads=args.threads,
        fast_jpeg=args.fast_jpeg,
        timeout=args.timeout,
        max_memory_mb=args.max_memory_mb,
    )


def _predict(args: argparse.Namespace) -> int:
    """One line per image: its top-k (a multi-task model: a header, then one tab-separated
    column per task); ``--json`` nests a multi-task model's predictions by task."""
    predictor = _predictor(args)
    results = predictor.predict([str(p) for p in args.images], top_k=args.top_k)
    tasks = predictor.tasks
    if args.json:
        rows = [{"image": str(path), "predictions": as_json(preds)} for path, preds in zip(args.images, results, strict=True)]
        print(json.dumps({"provider": predictor.provider, **({"tasks": list(tasks.names)} if tasks else {}), "results": rows}, indent=2))
        return 0
    if tasks:
        print("\t".join(["image", *(printable(name) for name in tasks.names)]))
    for path, preds in zip(args.images, results, strict=True):
        columns = [_best(preds[name]) for name in tasks.names] if tasks else [_best(preds)]
        print(f"{printable(path)}{chr(9) if tasks else ': '}" + "\t".join(columns))
    print(f"(on {printable(predictor.provider)})", file=sys.stderr)
    return 0


def _best(preds) -> str:
    return ", ".join(f"{printable(p.label)} {100 * p.probability:.2f}%" for p in preds)


def describe(model: Path) -> dict[str, Any]:
    """What ``info`` shows: labels, preprocessing, provenance and the input/output signature."""
    predictor = Predictor(model)
    info, session = predictor.info, predictor.session
    pre = info.preprocessing
    return {
        "model": str(model),
        "size_bytes": model.stat().st_size if model.is_file() else None,
        "labels": list(info.labels),
        "preprocessing": {
            "input_size": pre.input_size,
            "resize_size": pre.resize_size,
            "interpolation": pre.interpolation.value,
            "mean": list(pre.mean),
            "std": list(pre.std),
            "input_format": info.input_format,
        },
        "provenance": {"arch": info.arch, "checkpoint_sha256": info.checkpoint_sha256, **session.provenance},
        "inputs": session.signature["inputs"],
        "outputs": session.signature["outputs"],
        "recorded": _recorded(predictor.verified_by),
    }


def _recorded(manifest: str | None) -> str:
    if manifest is None:
        return "not checked: no manifest beside the model records it"
    return f"matches the sha256 recorded in {manifest}"


def _info(args: argparse.Namespace) -> int:
    described = describe(args.model)
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    pre = described["preprocessing"]
    labels = described["labels"]
    shown = ", ".join(labels[:20]) + (f", … ({len(labels)} in all)" if len(labels) > 20 else "")
    rows = [
        ("model", f"{described['model']} ({described['size_bytes'] or 0:,} bytes)"),
        ("labels", f"{len(labels)}: {shown}"),
        (
            "preprocessing",
            f"resize {pre['resize_size']} ({pre['interpolation']}), centre crop {pre['input_size']},"
            f" mean {[round(v, 4) for v in pre['mean']]}, std {[round(v, 4) for v in pre['std']]}, input {pre['input_format']}",
        ),
        *[(key, value) for key, value in described["provenance"].items() if value not in (None, "")],
        *[(kind[:-1], f"{item['name']}: {item['type']} {item['shape']}") for kind in ("inputs", "outputs") for item in described[kind]],
        ("sha256", described["recorded"]),
    ]
    width = max(len(key) for key, _ in rows) + 2
    lines = [f"{printable(key):<{width}}{printable(value)}" for key, value in rows]
    print("\n".join(lines))
    return 0


def _check(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    predictor = _predictor(args)
    load_s = time.perf_counter() - started
    if args.images:
        images: list[Any] = [str(p) for p in args.images]
    else:
        side = predictor.info.preprocessing.resize_size
        images = [np.full((side, side, 3), 128, dtype=np.uint8)]
    for index in range(args.warmup):
        predictor.predict(images[index % len(images)], top_k=1)
    times = []
    for index in range(args.runs):
        image = images[index % len(images)]
        tick = time.perf_counter()
        predictor.predict(image, top_k=1)
        times.append(1000 * (time.perf_counter() - tick))
    result = {
        "model": str(args.model),
        "asked": [printable(p) for p in (args.providers or ["cpu"])] if args.model.suffix.lower() != ".xml" else [args.device],
        "provider": predictor.provider,
        "fallback": predictor.fallback,
        "sha256": _recorded(predictor.verified_by),
        "load_s": load_s,
        "runs": args.runs,
        "images": len(args.images) or None,
        "runtime": _openvino_build() if args.model.suffix.lower() == ".xml" else onnxruntime_builds(),
        "mixed_builds": None if args.model.suffix.lower() == ".xml" else mixed_builds(),
        "p50_ms": float(np.percentile(times, 50)),
        "p99_ms": float(np.percentile(times, 99)),
        "peak_rss_mb": peak_rss_mb(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    _print_check(args, predictor, result)
    return 0


def _print_check(args: argparse.Namespace, predictor: Predictor, result: dict) -> None:
    what = f"{len(args.images)} image(s)" if args.images else "a grey image"
    print(f"model      {printable(args.model)}")
    print(f"provider   {printable(predictor.provider)} (asked for {', '.join(result['asked'])})")
    if predictor.fallback:
        print(f"fallback   {printable(predictor.fallback)}")
    builds = ", ".join(f"{name} {version}" for name, version in result["runtime"].items())
    print(f"runtime    {printable(builds or 'no ONNX Runtime distribution found')}")
    if result["mixed_builds"]:
        print(f"warning    {printable(result['mixed_builds'])}")
    print(f"sha256     {printable(result['sha256'])}")
    print(f"load       {result['load_s']:.2f} s")
    print(
        f"latency    p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms"
        f" (batch 1, {args.runs} runs after {args.warmup} warm-up, decode and preprocessing included, {what})"
    )
    print(f"peak RSS   {result['peak_rss_mb']:.0f} MB")


def _openvino_build() -> dict[str, str]:
    try:
        return {"openvino": version("openvino")}
    except PackageNotFoundError:
        return {}


def peak_rss_mb() -> float:
    """This process's peak resident memory: ``VmHWM`` where Linux has it (``ru_maxrss`` carries
    a parent's peak over across exec), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource  # POSIX only: imported where it is used
    except ImportError:  # Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


if __name__ == "__main__":
    sys.exit(main())
