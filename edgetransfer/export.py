"""``edgetransfer export``: the run's checkpoint to ONNX, verified against PyTorch.

The ONNX file carries its labels and preprocessing in ``metadata_props``; after export, ONNX
Runtime (CPU) and eager PyTorch run the same real validation images and must agree within
``atol``. The file appears under its final name only after every check has passed.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from . import __version__
from .config import ExportOptions
from .data import load_image
from .errors import ExportError, ParityError, RunError, first_line
from .models import BuiltModel
from .onnxheads import POOLED, append_prototype_head, append_task_heads
from .progress import console
from .prototype import PrototypeHead
from .qat_export import PARITY_IMAGES, export_qdq, verify_qdq
from .results import Parity, compare
from .rundir import RunDir
from .runtime.files import atomic_path
from .runtime.metadata import FLOAT_NCHW, UINT8_NHWC, ModelInfo
from .runtime.preprocessing import Preprocessing
from .runtime.sessions import fixed_batch, open_session, run_batched
from .runtime.tasks import Tasks
from .taskheads import TaskHeads, tasks_of

__all__ = ["ExportResult", "export_onnx", "write_onnx", "verify_onnx", "needs_export", "run_onnx", "parent_onnx", "INPUT", "OUTPUT"]

INPUT, OUTPUT = "input", "logits"


@dataclass
class ExportResult:
    """Where the model went, how closely it matched PyTorch (``None`` unchecked), what it carries."""

    path: Path
    parity: Parity | None
    info: ModelInfo
    seconds: float


class _Logits(nn.Module):
    """Stable names: the exported graph's input is ``input`` and its output ``logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the ONNX input name
        return self.model(input)


class _TaskOutputs(nn.Module):
    """A multi-task model's outputs: every task's logits side by side, then each task's alone."""

    def __init__(self, model: nn.Module, sizes: list[int]) -> None:
        super().__init__()
        self.model, self.sizes = model, list(sizes)

    def forward(self, input: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: A002
        logits = self.model(input)
        return (logits, *logits.split(self.sizes, dim=1))


class _FusedPreprocess(nn.Module):
    """uint8 NHWC in, logits out: scale, normalise and transpose inside the graph."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, model: nn.Module, pre: Preprocessing) -> None:
        super().__init__()
        self.model = model
        std = torch.tensor(pre.std, dtype=torch.float32)
        self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, 3, 1, 1))
        self.register_buffer("shift", (torch.tensor(pre.mean, dtype=torch.float32) / std).view(1, 3, 1, 1))

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        x = input.permute(0, 3, 1, 2).to(torch.float32)
        return self.model(x * self.scale - self.shift)


def export_onnx(run_dir: str | Path | RunDir, options: ExportOptions = ExportOptions()) -> ExportResult:
    """Export the run's checkpoint to ONNX, check it, verify parity and record it.

    Raises:
        RunError: no run or checkpoint at ``run_dir``, or an inconsistent checkpoint.
        ExportError: an operator ONNX cannot express, an unwritable output path.
        ParityError: ONNX Runtime disagrees with PyTorch beyond ``options.atol`` and ``options.rtol``.
    """
    started = time.perf_counter()
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise RunError(f"no run at {run}; run edgetransfer finetune first")
    output = Path(options.output) if options.output else run / (run.ONNX_UINT8 if options.fuse_preprocess else run.ONNX)
    _check_writable(output)
    with run.lock():
        return _export_run(run, options, output, started)


def _export_run(run: RunDir, options: ExportOptions, output: Path, started: float) -> ExportResult:
    if run.has_manifest():  # a finished run, and the checkpoint it recorded
        run.require_complete()
    run.require_checkpoint()
    if options.verify:
        run.read_config()  # before loading the checkpoint: the parity check needs the run's data
    built, payload = run.load_checkpoint()
    info = ModelInfo(
        labels=tuple(payload["classes"]),
        preprocessing=built.preprocessing,
        input_format=UINT8_NHWC if options.fuse_preprocess else FLOAT_NCHW,
        arch=built.arch.name,
        checkpoint_sha256=run.checkpoint_sha256(),
        edgetransfer_version=__version__,
        tasks=tasks_of(payload),
    )
    quantized = "qat" in payload
    if quantized and info.tasks:
        raise ExportError("a QAT run of a multi-task model is not supported; export the multi-task run itself")
    if quantized and options.fuse_preprocess:
        raise ExportError("a QAT model is exported with float NCHW input only; drop --fuse-preprocess")
    with atomic_path(output) as tmp:
        write_onnx(built, options, info, tmp, payload.get("qat") if quantized else None)
        if options.verify and quantized:
            images = [load_image(s) for s in run.validation(max(options.verify_images, PARITY_IMAGES))]
            parity = verify_qdq(built, tmp, images, payload["qat"])
        else:
            images = [load_image(s) for s in run.validation(options.verify_images)] if options.verify else []
            parity = verify_onnx(built, tmp, options, images, info.tasks) if options.verify else None
    _record(run, output, options, parity)
    return ExportResult(output, parity, info, time.perf_counter() - started)


def run_onnx(run: RunDir) -> Path:
    """The run's exported model (exported first when there is none), checked to come from the
    run's checkpoint.

    Raises:
        RunError: no fine-tuned run, or a ``model.onnx`` exported from another checkpoint.
    """
    if run.has_manifest():
        run.require_complete()
    checkpoint_sha256 = run.checkpoint_sha256()
    if not run.onnx.is_file():
        console.print(f"no {run.ONNX} yet: exporting it first")
        export_onnx(run)
    try:
        props = {p.key: p.value for p in onnx.load(str(run.onnx), load_external_data=False).metadata_props}
    except Exception:  # unreadable: the manifest check below, or the message after it, says so
        props = None
    if props is not None and props.get("checkpoint_sha256") != checkpoint_sha256:
        raise RunError(f"{run.onnx} was not exported from this run's checkpoint; re-export it with: edgetransfer export {run}")
    recorded = run.manifest().artifacts.get("onnx", {}) if run.has_manifest() else {}
    if recorded.get("path") == run.ONNX:
        run.verify("onnx", run.rebuild_hint("onnx"))
    if props is None:
        raise RunError(f"{run.onnx} is not a readable ONNX model; export it again with: edgetransfer export {run}")
    return run.onnx


def parent_onnx(run: RunDir) -> Path | None:
    """For a QAT run, its parent's float ONNX model (checked against the parent's manifest); else ``None``.

    Raises:
        RunError: the parent run is gone, or its model no longer is the one recorded.
    """
    record = run.qat_record()
    if record is None:
        return None
    parent = RunDir(record.get("parent", ""))
    if not parent.has_manifest():
        raise RunError(f"{run} is a QAT run of {parent}, which is gone; its float model is the reference INT8 is measured against")
    if parent.checkpoint_sha256() != record.get("parent_checkpoint_sha256"):
        raise RunError(f"{parent}'s checkpoint has changed since {run} was trained from it; run the QAT again")
    return run_onnx(parent)


def needs_export(run_dir: str | Path | RunDir, building_variants: bool, export_options_given: bool) -> bool:
    """Whether ``edgetransfer export`` exports the checkpoint again: always when it builds no
    variant or was given export options; when it builds variants, only if there is no ONNX
    model yet (a model from another checkpoint is refused by the variant build, not replaced)."""
    return not building_variants or export_options_given or not RunDir(run_dir).onnx.is_file()


def _check_writable(output: Path) -> None:
    parent = output.parent if output.parent != Path("") else Path(".")
    if not parent.is_dir():
        raise ExportError(f"cannot write {output}: folder {parent} does not exist")
    if output.exists() and not output.is_symlink() and not output.is_file():
        raise ExportError(f"{output} exists and is not a regular file (a device, a pipe or a folder); choose another --output")
    if not os.access(parent, os.W_OK) or (output.exists() and not os.access(output, os.W_OK)):
        raise ExportError(f"cannot write {output}: permission denied; choose another --output")


def write_onnx(built: BuiltModel, options: ExportOptions, info: ModelInfo, path: Path, qat: dict | None = None) -> None:
    if qat is not None:
        model = export_qdq(built, path, options.opset, qat, (INPUT, OUTPUT))
        _finish(model, built, info, path)
        return

    appended = _appended_head(built)
    if appended is not None:  # the graph ends in the classifier's input; the heads are appended below
        appended.features_only = True
    try:
        if appended is not None:
            model = _dynamo_export(built, options, [POOLED])
        else:
            model = _dynamo_export(built, options, [OUTPUT, *(info.tasks.outputs if info.tasks else [])], info.tasks)
    finally:
        if appended is not None:
            appended.features_only = False
    if isinstance(appended, PrototypeHead):
        append_prototype_head(model, appended, OUTPUT)
    elif appended is not None and info.tasks is not None:
        append_task_heads(model, appended.heads, info.tasks, OUTPUT)
    _finish(model, built, info, path)


def _appended_head(built: BuiltModel) -> PrototypeHead | TaskHeads | None:
    """The head that export writes in ONNX itself: a prototype head, or the heads of a multi-task
    model with a prototype task (see :mod:`.onnxheads`); ``None`` when the exporter writes it all."""
    for module in built.module.modules():
        if isinstance(module, TaskHeads):
            return module if any(isinstance(head, PrototypeHead) for head in module.heads) else None
        if isinstance(module, PrototypeHead):
            return module
    return None


def _finish(model, built: BuiltModel, info: ModelInfo, path: Path) -> None:
    """Metadata in, checked, saved."""
    onnx.helper.set_model_props(model, info.to_props())
    model.doc_string = f"{built.arch.name} fine-tuned with edgetransfer {__version__}"
    try:
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:
        raise ExportError(f"the exported model of {built.arch.name} fails the ONNX checker: {first_line(exc)}") from exc
    onnx.save_model(model, path)


def _dynamo_export(built: BuiltModel, options: ExportOptions, outputs: list[str], tasks: Tasks | None = None):
    wrapper: nn.Module = _FusedPreprocess(built.module, built.preprocessing) if options.fuse_preprocess else _Logits(built.module)
    if tasks is not None:
        wrapper = _TaskOutputs(wrapper, [len(labels) for labels in tasks.labels])
    wrapper.eval()
    size = built.preprocessing.input_size
    batch = options.static_batch or 2
    if options.fuse_preprocess:
        example = torch.zeros(batch, size, size, 3, dtype=torch.uint8)
    else:
        example = torch.zeros(batch, 3, size, size)
    dynamic = None if options.static_batch else {INPUT: {0: torch.export.Dim("batch", min=1, max=4096)}}
    try:
        with warnings.catch_warnings():
            # a model that caches tensors in attributes while it runs (timm's attention-bias caches):
            # torch warns that they become constants, which is what inference wants; parity checks it
            warnings.filterwarnings("ignore", message="The tensor attributes", category=UserWarning)
            program = torch.onnx.export(
                wrapper,
                (example,),
                dynamo=True,
                input_names=[INPUT],
                output_names=outputs,
                dynamic_shapes=dynamic,
                opset_version=options.opset,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        raise ExportError(f"cannot export {built.arch.name} to ONNX: {_unsupported(exc)}") from exc
    if program is None:  # only with dynamo=False, which is not asked for
        raise ExportError(f"cannot export {built.arch.name} to ONNX: torch.onnx.export returned no program")
    return program.model_proto


def _unsupported(exc: Exception) -> str:
    """Name the operator an export failed on, where the exporter's report does."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    match = re.search(r"op='([\w.]+)'", text) or re.search(r"target=torch\.ops\.([\w.]+)", text)
    if match:
        op = match.group(1).removesuffix(".default")
        return f"unsupported operator {op}: the ONNX exporter has no conversion for it; replace that layer or try another --opset"
    return first_line(Exception(text)) if text.strip() else type(exc).__name__


def verify_onnx(built: BuiltModel, path: Path, options: ExportOptions, images: list, tasks: Tasks | None = None) -> Parity:
    """ONNX Runtime (CPU) against eager PyTorch on the same images, in batches (the last one
    partial, or padded for a static batch), every image counted; every output of a multi-task
    model (the side-by-side logits and each task's) against its part of PyTorch's logits.

    Raises:
        ParityError: some output differs by more than ``atol + rtol * |torch|``.
    """
    pre = built.preprocessing
    pixels = [np.asarray(pre.resize_crop(img), dtype=np.uint8) for img in images]  # resized once
    normalized = np.stack([pre.normalize(p) for p in pixels])
    feed = np.stack(pixels) if options.fuse_preprocess else normalized
    with torch.no_grad():
        logits = built.module(torch.from_numpy(normalized)).numpy()
    session = open_session(path)
    names = [OUTPUT, *(tasks.outputs if tasks else [])]
    eager = [logits, *(logits[:, columns] for columns in tasks.slices)] if tasks else [logits]
    batch = options.static_batch or min(16, len(images))
    side_by_side = run_batched(lambda chunk: np.concatenate(session.run(names, {INPUT: chunk}), axis=1), feed, batch, fixed_batch(session))
    exported = np.split(side_by_side, np.cumsum([part.shape[1] for part in eager])[:-1], axis=1)
    agreement = min(compare(mine, theirs).top1_agreement for mine, theirs in zip(exported[1:] or exported, eager[1:] or eager, strict=True))
    difference, scale = np.abs(side_by_side - np.concatenate(eager, axis=1)), np.abs(np.concatenate(eager, axis=1))
    parity = Parity(
        len(images),
        int(batch),
        float(difference.max()) if difference.size else 0.0,
        agreement,
        options.atol,
        session.get_providers()[0],
        options.rtol,
        float((difference / np.maximum(scale, 1e-30)).max()),
        bool((difference <= options.atol + options.rtol * scale).all()),
        outputs={name: float(np.abs(mine - theirs).max()) for name, mine, theirs in zip(names, exported, eager, strict=True)} if tasks else None,
    )
    if not parity.within_tolerance:
        worst = f" (worst output: {max(parity.outputs, key=parity.outputs.__getitem__)})" if parity.outputs else ""
        raise ParityError(
            f"ONNX Runtime and PyTorch differ by up to {parity.max_abs_diff:.2e} in the logits{worst} ({parity.max_rel_diff:.2e}"
            f" relative; atol {options.atol:g}, rtol {options.rtol:g}, top-1 agreement {100 * parity.top1_agreement:.1f}%);"
            " nothing was written. Raise --atol or --rtol if this is expected, or --no-verify to skip the check"
        )
    return parity


def _record(run: RunDir, output: Path, options: ExportOptions, parity: Parity | None) -> None:
    if not run.has_manifest():
        return
    manifest = run.manifest()
    entry = manifest.record(options.artifact, run.relative(output), "onnx", parent="checkpoint", settings=options.settings())
    entry["parity"] = parity.to_dict() if parity else None
    manifest.save()
