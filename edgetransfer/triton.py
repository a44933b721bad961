"""A Triton Inference Server model repository for a run's model, for Triton's ONNX Runtime
backend: ``RUN/triton/NAME/config.pbtxt``, ``NAME/1/model.onnx`` and ``NAME/labels.txt``.

The configuration is built as Triton's own ``ModelConfig`` protobuf (``tritonclient``'s copy of
``model_config.proto``), its inputs and outputs read from the model file (names, element types,
shapes, the dynamic batch axis), so they cannot drift from the model they describe;
:func:`check_repository` parses a written ``config.pbtxt`` back with the same protobuf and
compares it with the model beside it. Users of other tools meet exactly that drift: a
``config.pbtxt`` written by hand, or once, that no longer matches a re-exported model.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from google.protobuf import text_format
from onnx import TensorProto

from .config import MAX_BATCH, ExportOptions, Precision, require_finite, require_ranges
from .errors import MissingDependencyError, OptionError, RunError, TritonError
from .export import export_onnx, run_onnx
from .optimize.context import QuantOptions
from .optimize.targets import Target
from .optimize.variants import build_variants
from .rundir import RunDir
from .runtime.files import read_json, sha256_file, write_json
from .runtime.metadata import ModelInfo
from .runtime.text import printable

__all__ = ["TritonOptions", "TritonError", "write_repository", "check_repository", "model_config"]

TYPES = {
    TensorProto.FLOAT: "TYPE_FP32",
    TensorProto.FLOAT16: "TYPE_FP16",
    TensorProto.BFLOAT16: "TYPE_BF16",
    TensorProto.DOUBLE: "TYPE_FP64",
    TensorProto.UINT8: "TYPE_UINT8",
    TensorProto.INT8: "TYPE_INT8",
    TensorProto.INT32: "TYPE_INT32",
    TensorProto.INT64: "TYPE_INT64",
    TensorProto.BOOL: "TYPE_BOOL",
}
LABELS_FILE = "labels.txt"
PREPROCESSING_FILE = "preprocessing.json"  # what a client does to an image before it sends it (Triton ignores the file)
MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class TritonOptions:
    """How Triton serves the model.

    Attributes:
        name: the model's name in the repository (letters, digits, ``_``, ``-``, ``.``);
            default ``<run>-<precision>``.
        gpu: ``KIND_GPU`` instances (the model then comes from the ``ort-cuda`` variant for fp16
            and int8); ``KIND_CPU`` otherwise.
        instances: model instances Triton runs side by side.
        max_batch_size: the largest batch the dynamic batcher forms (Triton's own name).
        queue_delay_us: how long the dynamic batcher waits for a fuller batch.
        threads: ONNX Runtime's intra-op threads per instance (``None``: the backend's default).
        accelerator: ``openvino`` (CPU) or ``tensorrt`` (GPU): the backend's execution accelerator.
        uint8: serve the fused-preprocess export (``model-uint8.onnx``, exported when missing):
            clients send uint8 NHWC crops and the graph scales and normalises them (fp32 only).
    """

    name: str | None = None
    gpu: bool = False
    instances: int = 1
    max_batch_size: int = 8
    queue_delay_us: int = 500
    threads: int | None = None
    accelerator: str | None = None
    uint8: bool = False

    def __post_init__(self) -> None:
        require_finite(self)
        require_ranges(self, {"instances": (1, 1024), "max_batch_size": (1, MAX_BATCH), "queue_delay_us": (0, 10**8), "threads": (1, 4096)})
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", self.name):
            raise OptionError(
                f"--triton-name {printable(self.name)} must be letters, digits, '_', '-' and '.', at most 128, not starting with '.' or '-'"
            )
        wanted = "tensorrt" if self.gpu else "openvino"
        if self.accelerator not in (None, wanted):
            where = "GPU" if self.gpu else "CPU"
            raise OptionError(
                f"--triton-accelerator {printable(self.accelerator)} is not a {where} accelerator of Triton's ONNX Runtime backend; use {wanted}"
            )

    def preferred_batches(self) -> list[int]:
        """Powers of two up to ``max_batch_size`` and ``max_batch_size`` itself, from 2: batch sizes the
        model runs well at, which the batcher forms when it can."""
        sizes = {self.max_batch_size}
        size = 2
        while size < self.max_batch_size:
            sizes.add(size)
            size *= 2
        return sorted(s for s in sizes if s > 1)


def _model_config_pb2():
    """Triton's ``model_config.proto`` as compiled by ``tritonclient`` (an optional extra)."""
    try:
        from tritonclient.grpc import model_config_pb2  # the optional triton extra: imported when used
    except ImportError as exc:
        raise MissingDependencyError(f"a Triton repository needs tritonclient ({exc}); pip install 'edgetransfer[triton]'") from exc
    return model_config_pb2


def signature(model: onnx.ModelProto) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """The model's inputs and outputs as Triton sees them: name, type and the shape after the batch axis.

    Raises:
        TritonError: a tensor of a type Triton's ONNX Runtime backend has no name for, or a
            batch axis that is fixed. Another free axis (a prototype model's class count) is -1.
    """
    initializers = {i.name for i in model.graph.initializer}

    def tensors(values) -> list[tuple[str, str, list[int]]]:
        found = []
        for value in values:
            if value.name in initializers:
                continue
            kind = value.type.tensor_type.elem_type
            if kind not in TYPES:
                raise TritonError(
                    f"{value.name} is of ONNX type {TensorProto.DataType.Name(kind)}, which Triton's ONNX Runtime backend does not serve"
                )
            dims = list(value.type.tensor_type.shape.dim)
            if not dims or dims[0].HasField("dim_value"):
                raise TritonError(f"{value.name} has no dynamic batch axis (was the model exported with --static-batch?); export it without")
            rest = [d.dim_value if d.HasField("dim_value") else -1 for d in dims[1:]]
            found.append((value.name, TYPES[kind], rest))
        return found

    return tensors(model.graph.input), tensors(model.graph.output)


def model_config(name: str, model: onnx.ModelProto, precision: Precision, options: TritonOptions) -> Any:
    """The ``ModelConfig`` protobuf that serves ``model`` as ``name`` (see :class:`TritonOptions`)."""
    pb = _model_config_pb2()
    inputs, outputs = signature(model)
    config = pb.ModelConfig(name=name, backend="onnxruntime", max_batch_size=options.max_batch_size, default_model_filename=MODEL_FILE)
    for tensor_name, kind, dims in inputs:
        config.input.add(name=tensor_name, data_type=pb.DataType.Value(kind), dims=dims)
    tasks = _task_labels(model)
    for tensor_name, kind, dims in outputs:
        # Triton's classification extension: the labels of the logits, and of each task's logits
        label_file = LABELS_FILE if tensor_name == "logits" else f"labels_{tensor_name}.txt" if tensor_name in tasks else ""
        config.output.add(name=tensor_name, data_type=pb.DataType.Value(kind), dims=dims, label_filename=label_file)
    group = pb.ModelInstanceGroup.Kind.Value("KIND_GPU" if options.gpu else "KIND_CPU")
    config.instance_group.add(count=options.instances, kind=group)
    config.dynamic_batching.preferred_batch_size.extend(options.preferred_batches())
    config.dynamic_batching.max_queue_delay_microseconds = options.queue_delay_us
    if options.threads:
        config.parameters["intra_op_thread_count"].string_value = str(options.threads)
        config.parameters["inter_op_thread_count"].string_value = "1"
    if options.accelerator:
        accelerators = config.optimization.execution_accelerators
        added = (accelerators.gpu_execution_accelerator if options.gpu else accelerators.cpu_execution_accelerator).add(name=options.accelerator)
        if options.accelerator == "tensorrt":  # ONNX Runtime's TensorRT provider builds in the model's own precision
            added.parameters["precision_mode"] = {Precision.FP16: "FP16", Precision.INT8: "INT8"}.get(precision, "FP32")
    return config


def check_repository(model_dir: str | Path) -> Any:
    """Parse ``model_dir/config.pbtxt`` with Triton's ``ModelConfig`` and compare it with the model
    and labels beside it: every input and output by name, type and shape, a dynamic batch axis,
    the name, and one label per class.

    Returns:
        The parsed ``ModelConfig``.

    Raises:
        TritonError: naming the first difference, and how to write the repository again.
    """
    model_dir = Path(model_dir)
    again = "write it again with: edgetransfer export RUN --target triton"
    pb = _model_config_pb2()
    try:
        config = text_format.Parse((model_dir / "config.pbtxt").read_text(encoding="utf-8"), pb.ModelConfig())
    except (OSError, UnicodeDecodeError, text_format.ParseError) as exc:
        raise TritonError(f"{model_dir / 'config.pbtxt'} is not a Triton model configuration ({printable(exc)}); {again}") from exc
    try:
        model = onnx.load(str(model_dir / "1" / MODEL_FILE), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError and others for a file that is not a model
        raise TritonError(f"{model_dir / '1' / MODEL_FILE} is missing or not an ONNX model ({type(exc).__name__}); {again}") from exc
    inputs, outputs = signature(model)
    for what, wanted, written in (("input", inputs, config.input), ("output", outputs, config.output)):
        have = [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in written]
        if have != wanted:
            raise TritonError(f"{model_dir / 'config.pbtxt'} declares {what}s {have}, but the model has {wanted}; {again}")
    if config.name != model_dir.name or config.max_batch_size < 1 or config.backend != "onnxruntime":
        raise TritonError(
            f"{model_dir / 'config.pbtxt'} names model {config.name!r} (backend {config.backend!r}, max batch {config.max_batch_size}) in folder {model_dir.name!r}; {again}"
        )
    info = ModelInfo.from_props({p.key: p.value for p in model.metadata_props})
    try:
        labels = (model_dir / LABELS_FILE).read_text(encoding="utf-8").splitlines()
        preprocessing = read_json(model_dir / PREPROCESSING_FILE)
    except (OSError, ValueError) as exc:
        raise TritonError(f"{model_dir}: {LABELS_FILE} or {PREPROCESSING_FILE} is missing or unreadable ({printable(exc)}); {again}") from exc
    if labels != list(info.labels):
        raise TritonError(f"{model_dir / LABELS_FILE} does not hold the model's labels in order; {again}")
    for output, task_labels in _task_labels(model).items():
        path = model_dir / f"labels_{output}.txt"
        if not path.is_file() or path.read_text(encoding="utf-8").splitlines() != task_labels:
            raise TritonError(f"{path} is missing or does not hold the labels of output {output} in order; {again}")
    if preprocessing != _client_preprocessing(info):
        raise TritonError(f"{model_dir / PREPROCESSING_FILE} is not the model's preprocessing; {again}")
    return config


def _task_labels(model: onnx.ModelProto) -> dict[str, list[str]]:
    """A multi-task model's per-task outputs and each one's labels (none for one task)."""
    props = {p.key: p.value for p in model.metadata_props}
    info = ModelInfo.from_props(props) if "tasks" in props else None
    if info is None or info.tasks is None:
        return {}
    return {output: list(labels) for output, labels in zip(info.tasks.outputs, info.tasks.labels, strict=True)}


def _client_preprocessing(info: ModelInfo) -> dict[str, Any]:
    """The model's preprocessing as ``Preprocessing.from_dict`` reads it, and its input format."""
    return {**info.preprocessing.to_dict(), "input_format": info.input_format}


def write_repository(
    run_dir: str | Path | RunDir,
    precisions: list[Precision],
    options: TritonOptions = TritonOptions(),
    quant: QuantOptions = QuantOptions(),
) -> list[Path]:
    """Write ``RUN/triton/NAME/`` for each precision and record it in the run's manifest.

    fp32 serves the run's verified ``model.onnx``; fp16 (GPU only) and int8 serve the ``ort-cuda``
    (GPU) or ``ort-cpu`` variant of that precision, built here (INT8 under the accuracy guard)
    unless the run has it intact already. Each folder is staged whole, checked with
    :func:`check_repository`, and only then moved into place.

    Raises:
        OptionError: a precision Triton is not given here (bf16; fp16 on a CPU).
        TritonError: a model Triton cannot describe (a fixed batch axis, an unsupported type).
    """
    run = RunDir(run_dir)
    if options.uint8 and precisions != [Precision.FP32]:
        raise OptionError(
            "--triton-uint8 serves the fused-preprocess export, which is FP32: its variants are built from model.onnx; drop --precision"
        )
    for precision in precisions:
        if precision is Precision.BF16 or (precision is Precision.FP16 and not options.gpu):
            raise OptionError(
                f"--target triton has no {precision.value} model on a {'GPU' if options.gpu else 'CPU'}: use fp32 or int8"
                + ("" if options.gpu else ", or fp16 with --triton-gpu")
            )
    written = []
    with run.lock():
        run.require_complete()
        for precision in precisions:
            name = options.name or re.sub(r"[^A-Za-z0-9_.-]", "_", f"{run.name}-{precision.value}").lstrip(".-")
            if options.name and len(precisions) > 1:
                name = f"{options.name}-{precision.value}"
            parent, source = _served_model(run, precision, options, quant)
            written.append(_write(run, name, parent, source, precision, options))
    return written


def _served_model(run: RunDir, precision: Precision, options: TritonOptions, quant: QuantOptions) -> tuple[str, Path]:
    """The manifest name and file of the model a precision serves, built when the run lacks it."""
    if precision is Precision.FP32 and options.uint8:
        if not (run.path / run.ONNX_UINT8).is_file():
            export_onnx(run, ExportOptions(fuse_preprocess=True))
        return "onnx-uint8", run.verify("onnx-uint8", run.rebuild_hint("onnx-uint8"))
    if precision is Precision.FP32:
        return "onnx", run_onnx(run)
    target = Target.ORT_CUDA if options.gpu else Target.ORT_CPU
    name = f"{target.value}-{precision.value}"
    try:
        return name, run.verify(name, "")
    except RunError:  # not built yet, or changed since: build it (the guard holds INT8 to its budget)
        build_variants(run, [target], [precision], quant)
        return name, run.verify(name, run.rebuild_hint(name))


def _write(run: RunDir, name: str, parent: str, source: Path, precision: Precision, options: TritonOptions) -> Path:
    model = onnx.load(str(source), load_external_data=False)
    info = ModelInfo.from_props({p.key: p.value for p in model.metadata_props})
    labels = info.labels
    if any("\n" in label or "\r" in label for label in labels):
        raise TritonError(f"a label of {source.name} holds a line break, which Triton's one-label-per-line {LABELS_FILE} cannot; rename the class")
    config = model_config(name, model, precision, options)
    root = run.path / "triton"
    if root.is_symlink() or (root.exists() and not root.is_dir()):  # a link would write outside the run
        raise OptionError(f"{root} is a link or a file, not the folder this command writes; move it away")
    root.mkdir(exist_ok=True)
    final = root / name
    if final.exists() and (final.is_symlink() or not final.is_dir()):
        raise OptionError(f"{final} exists and is not a folder this command wrote; move it away")
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))  # swept if a kill leaves it
    try:
        staged = work / name  # the folder's own name: the configuration names it
        (staged / "1").mkdir(parents=True)
        shutil.copyfile(source, staged / "1" / MODEL_FILE)
        (staged / LABELS_FILE).write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
        for output, task_labels in _task_labels(model).items():
            (staged / f"labels_{output}.txt").write_text("".join(f"{label}\n" for label in task_labels), encoding="utf-8")
        (staged / "config.pbtxt").write_text(text_format.MessageToString(config), encoding="utf-8")
        write_json(staged / PREPROCESSING_FILE, _client_preprocessing(info))
        check_repository(staged)
        _replace_folder(staged, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _record(run, final, parent, precision, options)
    return final


def _replace_folder(staged: Path, final: Path) -> None:
    """Move ``staged`` to ``final``; an older ``final`` is moved aside first and removed after."""
    old = final.with_name(f".{final.name}.old.tmp")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staged.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _record(run: RunDir, final: Path, parent: str, precision: Precision, options: TritonOptions) -> None:
    manifest = run.manifest()
    settings = {**dataclasses.asdict(options), "precision": precision.value, "model": str(final.relative_to(run.path) / "1" / MODEL_FILE)}
    settings["model_sha256"] = sha256_file(final / "1" / MODEL_FILE)
    manifest.record(f"triton:{final.name}", final.relative_to(run.path) / "config.pbtxt", kind="triton-config", parent=parent, settings=settings)
    manifest.save()
