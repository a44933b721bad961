"""``edgetransfer export``: the run's checkpoint to ONNX, verified against PyTorch.

The ONNX file carries its labels and preprocessing in ``metadata_props``; after export, ONNX
Runtime (CPU) and eager PyTorch run the same real validation images and must agree within
``atol``. The file appears under its final name only after every check has passed.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from ._io import atomic_path, read_json, sha256_file
from .checkpoint import load_checkpoint
from .data import DataSpec, load_dataset, load_image
from .errors import EdgeTransferError, RunError
from .manifest import Manifest
from .metadata import FLOAT_NCHW, UINT8_NHWC, ModelInfo
from .models import BuiltModel
from .preprocessing import Preprocessing

__all__ = ["ExportOptions", "ExportResult", "ExportError", "ParityError", "export_onnx", "DEFAULT_OPSET"]

DEFAULT_OPSET = 18  # the dynamo exporter's native opset; ONNX Runtime >= 1.14 and TensorRT 10 run it
INPUT, OUTPUT = "input", "logits"


class ExportError(EdgeTransferError):
    """The model cannot be expressed in ONNX (the operator is named) or the file cannot be written."""


class ParityError(EdgeTransferError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance."""


@dataclass(frozen=True)
class ExportOptions:
    """How to export.

    Attributes:
        opset: ONNX opset of the default domain.
        static_batch: fix the batch dimension to this size; ``None`` keeps it dynamic.
        fuse_preprocess: take uint8 NHWC images at the input size; scaling and normalisation
            happen inside the graph.
        verify: compare ONNX Runtime with PyTorch on validation images after export.
        atol: largest absolute logit difference accepted.
        verify_images: how many validation images the check uses.
        output: file to write; default ``model.onnx`` (``model-uint8.onnx`` when fused) in the run.
    """

    opset: int = DEFAULT_OPSET
    static_batch: int | None = None
    fuse_preprocess: bool = False
    verify: bool = True
    atol: float = 1e-3
    verify_images: int = 64
    output: Path | None = None

    def __post_init__(self) -> None:
        if self.static_batch is not None and self.static_batch < 1:
            raise EdgeTransferError(f"static batch must be at least 1, got {self.static_batch}")
        if not 7 <= self.opset <= 23:
            raise EdgeTransferError(f"opset must be between 7 and 23, got {self.opset}")
        if self.atol <= 0:
            raise EdgeTransferError(f"atol must be positive, got {self.atol}")

    @property
    def artifact(self) -> str:
        return "onnx-uint8" if self.fuse_preprocess else "onnx"

    def settings(self) -> dict[str, Any]:
        data = asdict(self)
        data["output"] = str(self.output) if self.output else None
        return data


@dataclass
class ExportResult:
    path: Path
    parity: dict[str, Any] | None
    info: ModelInfo
    seconds: float


class _Logits(nn.Module):
    """Stable names: the exported graph's input is ``input`` and its output ``logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the ONNX input name
        return self.model(input)


class _FusedPreprocess(nn.Module):
    """uint8 NHWC in, logits out: scale, normalise and transpose inside the graph."""

    def __init__(self, model: nn.Module, pre: Preprocessing) -> None:
        super().__init__()
        self.model = model
        std = torch.tensor(pre.std, dtype=torch.float32)
        self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, 3, 1, 1))
        self.register_buffer("shift", (torch.tensor(pre.mean, dtype=torch.float32) / std).view(1, 3, 1, 1))

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        x = input.permute(0, 3, 1, 2).to(torch.float32)
        return self.model(x * self.scale - self.shift)


def export_onnx(run_dir: str | Path, options: ExportOptions = ExportOptions()) -> ExportResult:
    """Export the run's checkpoint to ONNX, check it, verify parity and record it.

    Raises:
        RunError: no run or checkpoint at ``run_dir``, or an inconsistent checkpoint.
        ExportError: an operator ONNX cannot express, an unwritable output path.
        ParityError: ONNX Runtime disagrees with PyTorch beyond ``options.atol``.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    checkpoint = run_dir / "model.pt"
    if not run_dir.is_dir():
        raise RunError(f"no run at {run_dir}; run edgetransfer finetune first")
    output = Path(options.output) if options.output else run_dir / f"model{'-uint8' if options.fuse_preprocess else ''}.onnx"
    _check_writable(output)
    built, payload = load_checkpoint(checkpoint)
    info = ModelInfo(
        labels=tuple(payload["classes"]),
        preprocessing=built.preprocessing,
        input_format=UINT8_NHWC if options.fuse_preprocess else FLOAT_NCHW,
        arch=built.arch.name,
        checkpoint_sha256=sha256_file(checkpoint),
        edgetransfer_version=__version__,
    )
    with atomic_path(output) as tmp:
        _export(built, options, info, tmp)
        parity = _verify(built, tmp, options, _validation_images(run_dir, options.verify_images)) if options.verify else None
    _record(run_dir, output, options, parity)
    return ExportResult(output, parity, info, time.perf_counter() - started)


def _check_writable(output: Path) -> None:
    parent = output.parent if output.parent != Path("") else Path(".")
    if not parent.is_dir():
        raise ExportError(f"cannot write {output}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (output.exists() and not os.access(output, os.W_OK)):
        raise ExportError(f"cannot write {output}: permission denied; choose another --output")


def _export(built: BuiltModel, options: ExportOptions, info: ModelInfo, path: Path) -> None:
    import onnx

    wrapper = (_FusedPreprocess(built.module, built.preprocessing) if options.fuse_preprocess else _Logits(built.module)).eval()
    size = built.preprocessing.input_size
    batch = options.static_batch or 2
    if options.fuse_preprocess:
        example = torch.zeros(batch, size, size, 3, dtype=torch.uint8)
    else:
        example = torch.zeros(batch, 3, size, size)
    dynamic = None if options.static_batch else {INPUT: {0: torch.export.Dim("batch", min=1, max=4096)}}
    try:
        program = torch.onnx.export(
            wrapper, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
            dynamic_shapes=dynamic, opset_version=options.opset, optimize=True, verbose=False,
        )
    except Exception as exc:
        raise ExportError(f"cannot export {built.arch.name} to ONNX: {_unsupported(exc)}") from None
    model = program.model_proto
    onnx.helper.set_model_props(model, info.to_props())
    model.doc_string = f"{built.arch.name} fine-tuned with edgetransfer {__version__}"
    try:
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:
        raise ExportError(f"the exported model of {built.arch.name} fails the ONNX checker: {str(exc).splitlines()[0]}") from None
    onnx.save_model(model, path)


def _unsupported(exc: Exception) -> str:
    """Name the operator an export failed on, where the exporter's report does."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    match = re.search(r"op='([\w.]+)'", text) or re.search(r"target=torch\.ops\.([\w.]+)", text)
    if match:
        op = match.group(1).removesuffix(".default")
        return f"unsupported operator {op}: the ONNX exporter has no conversion for it; replace that layer or try another --opset"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return first[:300]


def _validation_images(run_dir: Path, limit: int) -> list:
    """Real validation images of the run, spread over its classes."""
    config = read_json(run_dir / "config.json")
    dataset = load_dataset(DataSpec.from_dict(config["data"]))
    by_class: dict[int, list] = {}
    for sample in dataset.val:
        by_class.setdefault(sample.label, []).append(sample)
    rounds = itertools.zip_longest(*by_class.values())  # round-robin over the classes
    ordered = [s for group in rounds for s in group if s is not None]
    return [load_image(s) for s in ordered[:limit]]


def _verify(built: BuiltModel, path: Path, options: ExportOptions, images: list) -> dict[str, Any]:
    """ONNX Runtime (CPU) against eager PyTorch on the same images, batched and one by one."""
    import onnxruntime as ort

    pre = built.preprocessing
    pixels = [np.asarray(pre.resize_crop(img), dtype=np.uint8) for img in images]  # resized once
    normalized = np.stack([pre.normalize(p) for p in pixels])
    feed = np.stack(pixels) if options.fuse_preprocess else normalized
    with torch.no_grad():
        eager = built.module(torch.from_numpy(normalized)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = options.static_batch or min(16, len(images))
    chunks = [feed[i : i + batch] for i in range(0, len(feed) - len(feed) % batch or len(feed), batch)]
    onnx_logits = np.concatenate([session.run([OUTPUT], {INPUT: c})[0] for c in chunks])
    reference = eager[: len(onnx_logits)]
    report = {
        "images": int(len(onnx_logits)),
        "batch_size": int(batch),
        "max_abs_diff": float(np.abs(onnx_logits - reference).max()),
        "top1_agreement": float((onnx_logits.argmax(1) == reference.argmax(1)).mean()),
        "atol": options.atol,
        "provider": session.get_providers()[0],
    }
    if report["max_abs_diff"] > options.atol:
        raise ParityError(
            f"ONNX Runtime and PyTorch differ by up to {report['max_abs_diff']:.2e} in the logits (atol"
            f" {options.atol:g}, top-1 agreement {100 * report['top1_agreement']:.1f}%); nothing was written."
            " Raise --atol if this is expected, or --no-verify to skip the check"
        )
    return report


def _record(run_dir: Path, output: Path, options: ExportOptions, parity: dict[str, Any] | None) -> None:
    if not Manifest.exists(run_dir):
        return
    manifest = Manifest.load(run_dir)
    try:
        relative = output.resolve().relative_to(run_dir.resolve())
    except ValueError:
        relative = output.resolve()
    entry = manifest.record(options.artifact, relative, "onnx", parent="checkpoint", settings=options.settings())
    entry["parity"] = parity
    manifest.save()
