"""The ``edgetransfer`` commands that run an exported model through the torch-free runtime
(``predict``, ``enrol``); ``edgetransfer.cli`` loads this module, and no torch, when one of them runs."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .clioptions import friendly
from .errors import OptionError
from .progress import out
from .report import predictions_table
from .runtime import Predictor
from .runtime.cli import DEFAULT_TIMEOUT, enrolment_line
from .runtime.enrol import enrol_file
from .runtime.sessions import MAX_CAP_MB

__all__ = ["predict", "enrol"]


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
        rows = [
            {"image": str(path), "predictions": [{"label": p.label, "index": p.index, "probability": p.probability} for p in preds]}
            for path, preds in zip(images, results, strict=True)
        ]
        click.echo(json.dumps({"provider": predictor.provider, "results": rows}, indent=2))
        return

    out.print(predictions_table(images, results, predictor.provider), soft_wrap=True)


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--label", default=None, help="The class to add (or, with --replace, to make anew).")
@click.option("--remove", "remove_label", default=None, metavar="LABEL", help="The class to remove.")
@click.option("--replace", is_flag=True, help="Make an existing class anew from these images.")
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
) -> None:
    """Add a class to a prototype model from a few images, or replace or remove one (no training, no torch).

    \b
    Examples:
      edgetransfer finetune --mode prototype --out runs/shop && edgetransfer export runs/shop
      edgetransfer enrol runs/shop/model.onnx --label teapot teapot/*.jpg     # writes model-enrolled.onnx
      edgetransfer enrol runs/shop/model-enrolled.onnx --label teapot new/*.jpg --replace --in-place
      edgetransfer enrol runs/shop/model-enrolled.onnx --remove teapot --in-place
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
    )
    click.echo(enrolment_line(done, path))
