"""The ``edgetransfer`` commands that run an exported model through the torch-free runtime
(``predict``, ``enrol``, ``serve``); ``edgetransfer.cli`` loads this module, and no torch, when one
of them runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import click

from .clioptions import friendly
from .errors import OptionError
from .progress import out
from .report import predictions_table
from .runtime import Predictor
from .runtime.cli import DEFAULT_TIMEOUT, enrolment_line
from .runtime.enrol import enrol_file
from .runtime.files import read_json
from .runtime.metadata import MANIFEST_FILE
from .runtime.predictor import as_json as answer_json
from .runtime.serve import add_serve_options, config_from_args
from .runtime.serve import serve as serve_config
from .runtime.sessions import MAX_CAP_MB
from .runtime.text import printable

__all__ = ["predict", "enrol", "serve", "served_model", "serve_parser"]

SERVABLE = (".onnx", ".xml")  # what the runtime's Predictor runs: ONNX, OpenVINO IR


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-k", "--top-k", type=int, default=3, show_default=True)
@click.option(
    "--provider", "providers", multiple=True, help="cpu, cuda, tensorrt or a full provider name; repeat for a fallback order. [default: cpu]"
)
@click.option("--allow-fallback", is_flag=True, help="Accept a later provider when the first cannot load.")
@click.option("--device", default="CPU", show_default=True, help="OpenVINO device, for an .xml model (CPU, GPU, AUTO).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--timeout",
    type=click.FloatRange(0, float("inf"), min_open=True, max_open=True),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds one run of the model may take (a model file can hold a graph that never ends).",
)
@click.option(
    "--max-memory-mb",
    type=click.IntRange(1, MAX_CAP_MB),
    default=None,
    help="Cap the memory ONNX Runtime may hold, in MB: a model asking for more is refused before it gets it. [default: no cap]",
)
@friendly
def predict(
    model: Path,
    images: tuple[Path, ...],
    top_k: int,
    providers,
    allow_fallback: bool,
    device: str,
    as_json: bool,
    timeout: float,
    max_memory_mb: int | None,
) -> None:
    """Classify images with an exported model (torch-free runtime).

    \b
    Examples:
      edgetransfer predict runs/demo/model.onnx cat.jpg dog.png
      edgetransfer predict model.onnx photos/*.jpg --top-k 1 --json
      edgetransfer predict model.onnx img.png --provider cuda --provider cpu --allow-fallback
      edgetransfer predict runs/demo/openvino-int8.xml cat.jpg     # OpenVINO IR (edgetransfer[openvino])
    """
    predictor = Predictor(
        model, providers=list(providers) or None, allow_fallback=allow_fallback, device=device, timeout=timeout, max_memory_mb=max_memory_mb
    )
    results = predictor.predict([str(p) for p in images], top_k=top_k)
    if as_json:
        rows = [{"image": str(path), "predictions": answer_json(preds)} for path, preds in zip(images, results, strict=True)]
        tasks = {"tasks": list(predictor.tasks.names)} if predictor.tasks else {}
        click.echo(json.dumps({"provider": predictor.provider, **tasks, "results": rows}, indent=2))
        return

    out.print(predictions_table(images, results, predictor.provider), soft_wrap=True)


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--label", default=None, help="The class to add (or, with --replace, to make anew).")
@click.option("--remove", "remove_label", default=None, metavar="LABEL", help="The class to remove.")
@click.option("--replace", is_flag=True, help="Make an existing class anew from these images.")
@click.option("--task", default=None, metavar="NAME", help="A multi-task model's prototype task to enrol into. [default: its only one]")
@click.option(
    "--output", type=click.Path(path_type=Path), default=None, help="Where to write the enrolled model. [default: MODEL-enrolled.onnx beside it]"
)
@click.option("--in-place", is_flag=True, help="Replace MODEL itself (atomically).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Inference threads.")
@friendly
def enrol(
    model: Path,
    images: tuple[Path, ...],
    label: str | None,
    remove_label: str | None,
    replace: bool,
    output: Path | None,
    in_place: bool,
    threads: int | None,
    task: str | None,
) -> None:
    """Add a class to a prototype model from a few images, or replace or remove one (no training, no torch).

    \b
    Examples:
      edgetransfer finetune --mode prototype --out runs/shop && edgetransfer export runs/shop
      edgetransfer enrol runs/shop/model.onnx --label teapot teapot/*.jpg     # writes model-enrolled.onnx
      edgetransfer enrol runs/shop/model-enrolled.onnx --label teapot new/*.jpg --replace --in-place
      edgetransfer enrol runs/shop/model-enrolled.onnx --remove teapot --in-place
      edgetransfer enrol runs/two/model.onnx --task face --label cat cats/*.jpg   # a multi-task model's prototype task
    """

    if (label is None) == (remove_label is None):
        raise OptionError("give either --label NAME with images, or --remove NAME")
    if remove_label is not None and images:
        raise OptionError("--remove takes no images")
    done, path = enrol_file(
        model,
        label if label is not None else str(remove_label),
        [str(p) for p in images],
        remove=remove_label is not None,
        replace=replace,
        output=output,
        in_place=in_place,
        threads=threads,
        task=task,
    )
    click.echo(enrolment_line(done, path))


class _PassOnCommand(click.Command):
    """A command whose options are the runtime's ``serve`` options, shown in its help."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Options"):
            formatter.write(serve_parser().format_help().split("options:\n", 1)[1])  # argparse's options, without its headings
            formatter.write(f"{'  --help':<24}Show this message and exit.\n")


def serve_parser() -> argparse.ArgumentParser:
    """The command line of ``edgetransfer serve``: the runtime's ``serve`` options, read by argparse."""
    parser = argparse.ArgumentParser(prog="edgetransfer serve", add_help=False, usage="%(prog)s MODEL_OR_RUN [OPTIONS]")
    parser.add_argument("model", metavar="MODEL_OR_RUN", type=Path)
    add_serve_options(parser)
    return parser


@click.command(cls=_PassOnCommand, context_settings={"ignore_unknown_options": True}, options_metavar="")
@click.argument("arguments", metavar="MODEL_OR_RUN [OPTIONS]...", nargs=-1, type=click.UNPROCESSED)
@friendly
def serve(arguments: tuple[str, ...]) -> None:
    """Serve a run's recommended variant (or a model file) over HTTP with adaptive batching (needs edgetransfer[serve]).

    A run directory serves the variant its bench recommended (else its ONNX model). Endpoints:
    POST /v1/classify, GET /v1/model, /livez, /readyz, /metrics. More: docs/serving.md.

    \b
    Examples:
      edgetransfer serve runs/demo
      edgetransfer serve runs/demo/model.onnx --port 8080 --max-batch 16
      edgetransfer serve runs/demo --host 0.0.0.0 --api-key-file key.txt
    """
    args = serve_parser().parse_args(arguments)
    model, variant, note = served_model(args.model)
    if note:
        click.echo(note, err=True)
    args.model, args.variant = model, args.variant or variant
    serve_config(config_from_args(args))


def served_model(target: Path) -> tuple[Path, str, str]:
    """The model file to serve for ``target`` (a model file, or a run directory), its variant's
    name, and a note when a run's recommendation cannot be served and its ONNX model is instead.

    Raises:
        OptionError: ``target`` is neither, or the run has no servable model yet.
    """
    if target.is_file():
        return target, target.stem, ""
    manifest = target / MANIFEST_FILE
    if not manifest.is_file():
        raise OptionError(
            f"{printable(target)} is neither a model file nor a run directory; give a .onnx or .xml file, or a run made by edgetransfer finetune"
        )
    artifacts = _artifacts(manifest)
    recommended = _recommended(target)
    entry = artifacts.get(recommended) if recommended else None
    path = _artifact_path(target, entry)
    if path is not None and path.suffix in SERVABLE and path.is_file():
        return path, str(recommended), ""
    fallback = _artifact_path(target, artifacts.get("onnx"))
    if fallback is None or not fallback.is_file():
        raise OptionError(f"the run {printable(target)} has no exported model yet: run edgetransfer export {printable(target)}")
    if recommended is None:
        return fallback, "onnx", ""
    return fallback, "onnx", f"serving the run's ONNX model: its recommended variant {printable(recommended)} is not a model the runtime serves"


def _artifacts(manifest: Path) -> dict[str, Any]:
    try:
        artifacts = read_json(manifest).get("artifacts")
    except (OSError, ValueError, AttributeError) as exc:
        raise OptionError(f"cannot read {printable(manifest)} ({exc}); run edgetransfer export on the run again") from None
    return artifacts if isinstance(artifacts, dict) else {}


def _recommended(run: Path) -> str | None:
    try:
        recommendation = read_json(run / "bench.json").get("recommendation")
    except (OSError, ValueError, AttributeError):  # no bench yet, or an unreadable one: the ONNX model
        return None
    variant = recommendation.get("variant") if isinstance(recommendation, dict) else None
    return variant if isinstance(variant, str) else None


def _artifact_path(run: Path, entry: Any) -> Path | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        return None
    path = Path(entry["path"])
    return path if path.is_absolute() else run / path
