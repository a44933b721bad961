"""OpenVINO IR files as edgetransfer writes and reads them: numpy and openvino only, never torch.

An IR is two files, ``NAME.xml`` (the graph) and ``NAME.bin`` (the weights). The xml's
``rt_info`` carries an ``edgetransfer`` section: the same labels, preprocessing and provenance
as an exported ONNX model, the precision the model is meant to run in, and the sha256 of its
``.bin`` so that an xml never runs with weights from another export.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from .errors import MissingDependencyError, OpenVinoError
from .files import sha256_file
from .metadata import PREPROCESSING_KEYS

__all__ = [
    "EXTRA",
    "import_openvino",
    "ir_props",
    "save_ir",
    "read_ir",
    "compile_config",
    "compile_ir",
    "bf16_problem",
    "one_line",
    "OpenVinoSession",
]

EXTRA = "pip install 'edgetransfer[openvino]'"
SECTION = "edgetransfer"
INFERENCE_PRECISION = "inference_precision"  # "f32" or "bf16": what the variant was measured in
WEIGHTS_SHA256 = "weights_sha256"


def import_openvino():
    """The ``openvino`` module, or an error naming the extra to install."""
    try:
        import openvino  # optional heavy dependency (the openvino extra): imported here
    except ImportError:
        raise MissingDependencyError(f"OpenVINO is not installed: {EXTRA}") from None
    return openvino


def ir_props(model) -> dict[str, str]:
    """The ``edgetransfer`` section of an OpenVINO model's ``rt_info`` (empty for other IRs)."""
    if not model.has_rt_info([SECTION]):
        return {}
    return {key: value.astype(str) for key, value in model.get_rt_info()[SECTION].items()}


def save_ir(model, xml: Path, props: dict[str, str]) -> Path:
    """Write ``model`` as ``xml`` + its ``.bin`` with ``props`` in its ``rt_info``.

    Both files are written in a temporary folder beside ``xml`` and moved into place, the
    weights first: an interrupted save leaves the old pair, or a new ``.bin`` that the old xml
    refuses (its recorded sha256 no longer matches), never a silently mixed model.
    """
    ov = import_openvino()
    xml = Path(xml)
    xml.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{xml.stem}.", dir=xml.parent) as tmp:
        staged = Path(tmp) / xml.name
        ov.save_model(model, str(staged), compress_to_fp16=False)
        weights = sha256_file(staged.with_suffix(".bin"))
        for key, value in {**props, WEIGHTS_SHA256: weights}.items():
            model.set_rt_info(str(value), [SECTION, key])
        ov.save_model(model, str(staged), compress_to_fp16=False)  # again, now naming its weights
        if sha256_file(staged.with_suffix(".bin")) != weights:
            raise OpenVinoError(f"OpenVINO wrote different weights for {xml.name} on a second save; nothing was written")
        os.replace(staged.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(staged, xml)
    return xml


def read_ir(xml: str | os.PathLike, core=None):
    """Read an IR and check that its ``.bin`` is the one it was saved with.

    Returns:
        The ``openvino.Model`` and its edgetransfer properties.

    Raises:
        OpenVinoError: OpenVINO missing, the xml or its .bin missing or unreadable, or a .bin
            from another export.
    """
    ov = import_openvino()
    xml = Path(xml)
    weights = xml.with_suffix(".bin")
    if not xml.is_file():
        raise OpenVinoError(f"OpenVINO model not found: {xml}")
    if not weights.is_file():
        raise OpenVinoError(f"the weights of {xml} are missing: {weights.name} must sit beside it; copy both files")
    recorded = _recorded_weights_sha256(xml)
    if recorded and recorded != sha256_file(weights):
        raise OpenVinoError(
            f"{weights} does not belong to {xml.name} (its sha256 is not the one the xml records);"
            " copy the .xml and .bin of one export together, or export again"
        )
    try:
        model = (core or ov.Core()).read_model(str(xml))
    except Exception as exc:  # OpenVINO raises RuntimeError for every kind of unreadable IR
        raise OpenVinoError(f"cannot read OpenVINO model {xml}: {one_line(exc)}") from exc
    return model, ir_props(model)


def _recorded_weights_sha256(xml: Path) -> str | None:
    """The .bin sha256 the xml records, read before OpenVINO touches the weights."""
    try:
        node = ElementTree.parse(xml).getroot().find(f"rt_info/{SECTION}/{WEIGHTS_SHA256}")
    except ElementTree.ParseError:
        return None  # not XML: OpenVINO's reader says why
    return node.get("value") if node is not None else None


def compile_config(threads: int | None = None, precision: str | None = None, hint: str = "LATENCY") -> dict[str, Any]:
    """CPU plugin settings: a performance hint, one stream for latency, explicit threads and
    inference precision (on AMX CPUs OpenVINO runs float models in bf16 unless told f32)."""
    config: dict[str, Any] = {"PERFORMANCE_HINT": hint}
    if hint == "LATENCY":
        config["NUM_STREAMS"] = 1
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    return config


def compile_ir(model, props: dict[str, str], device: str = "CPU", threads: int | None = None, hint: str = "LATENCY", core=None):
    """Compile ``model`` for ``device`` in the precision its properties record.

    Raises:
        OpenVinoError: the device is not there or the model does not compile on it.
    """
    ov = import_openvino()
    core = core or ov.Core()
    if device.split(".")[0] not in ("AUTO", "MULTI", "HETERO") and device.split(".")[0] not in core.available_devices:
        raise OpenVinoError(f"OpenVINO device {device} is not here (available: {', '.join(core.available_devices)})")
    precision = props.get(INFERENCE_PRECISION) if device.startswith("CPU") else None
    try:
        return core.compile_model(model, device, compile_config(threads, precision, hint))
    except Exception as exc:
        raise OpenVinoError(f"OpenVINO cannot compile the model for {device}: {one_line(exc)}") from exc


class OpenVinoSession:
    """A compiled IR behind the surface :class:`~edgetransfer.runtime.Predictor` uses: thread-safe,
    one infer request per calling thread."""

    def __init__(self, xml: Path, device: str = "CPU", threads: int | None = None, hint: str = "LATENCY") -> None:
        ov = import_openvino()
        core = ov.Core()
        model, self.props = read_ir(xml, core)
        outputs = [port.get_names() for port in model.outputs]
        prototype = len(outputs) == 2 and "logits" in outputs[0] and "features" in outputs[1]  # logits, then embeddings
        tasks = "tasks" in self.props and len(outputs) > 2 and "logits" in outputs[0]  # every task's logits, then each task's
        if len(model.inputs) != 1 or (len(outputs) != 1 and not prototype and not tasks):
            raise OpenVinoError(
                f"{xml} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; a classifier has one"
                " of each (a prototype model's second output is its features, a multi-task model's next outputs its tasks')"
            )
        self.compiled = compile_ir(model, self.props, device, threads, hint, core)
        self.providers = [f"OpenVINO:{device}"]
        self.uint8_input = model.input(0).get_element_type() == ov.Type.u8
        self.input_shape = [d.get_length() if d.is_static else None for d in model.input(0).get_partial_shape()]
        batch, classes = model.input(0).get_partial_shape()[0], model.output(0).get_partial_shape()[-1]
        self.fixed_batch = batch.get_length() if batch.is_static else None
        self.classes = classes.get_length() if classes.is_static else None
        self.signature = {
            kind: [
                {"name": ", ".join(sorted(port.get_names())), "type": port.get_element_type().get_type_name(), "shape": str(port.get_partial_shape())}
                for port in ports
            ]
            for kind, ports in (("inputs", model.inputs), ("outputs", model.outputs))
        }
        self.provenance = {"producer": f"OpenVINO IR on {device}", **{k: v for k, v in self.props.items() if k not in PREPROCESSING_KEYS}}
        self._local = threading.local()

    def run(self, chunk):
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request.infer({0: chunk})[0].copy()


def bf16_problem(core=None) -> str | None:
    """Why bf16 cannot run natively on this CPU, or ``None`` when it can (AMX or AVX-512 BF16)."""
    ov = import_openvino()
    capabilities = (core or ov.Core()).get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" in capabilities:
        return None
    return f"this CPU has no native bf16 (it needs AMX or AVX-512 BF16; OpenVINO reports {', '.join(capabilities)}); use --precision fp32 or int8"


def one_line(exc: BaseException) -> str:
    """OpenVINO's message without its source locations, on one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    noise = ("Check '", "Exception from", "[ GENERAL_ERROR ]", "FrontEnd API failed", "WARNING:", "E0000")
    kept = [line for line in lines if not line.startswith(noise)]
    return " ".join(kept or lines or [type(exc).__name__])[:400]
