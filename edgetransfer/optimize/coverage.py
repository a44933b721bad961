"""Integer coverage: how much of a model's arithmetic ONNX Runtime's CPU kernels really run in int8.

A QDQ model only says where quantisation *may* happen. ONNX Runtime turns a
``DequantizeLinear -> Conv -> QuantizeLinear`` group into an integer ``QLinearConv`` only when the
group is complete (every input dequantised, the output read by exactly one ``QuantizeLinear``,
see its ``qdq_selectors.cc``); anything else runs in float between a DQ and a Q, which costs
more than plain FP32. So coverage is read from the graph the session runs: ONNX Runtime
optimises the model at its default level (what every edgetransfer session and the runtime use)
and writes the result, and each Conv/Gemm/MatMul of that graph is counted with its
multiply-accumulates at batch 1, from the shapes a run of that graph produces.

One transformer is left out of the graph read here: NCHWc blocking, which only re-lays out
*float* convolutions into padded channel blocks (it would count a 24-channel convolution as 32).
Integer kernels are chosen before it and are the same with or without it.

Coverage is the same on every x86 CPU (the fusions do not depend on VNNI); the speed that
follows from it does.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import PredictorError, QuantizationError, first_line
from ..results import FloatLayer, IntegerCoverage
from ..runtime.sessions import open_session, write_optimized

__all__ = ["INTEGER_OPS", "FLOAT_OPS", "integer_coverage", "is_quantized"]

# ONNX Runtime's kernels that multiply-accumulate in integers (ONNX and com.microsoft domains)
INTEGER_OPS = frozenset(
    {"QLinearConv", "QLinearConvTranspose", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
)
# ... and those that do it in float
FLOAT_OPS = frozenset({"Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"})
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_SKIPPED = ["NchwcTransformer"]


def is_quantized(model) -> bool:
    """Whether an ONNX model (a path or ModelProto) has quantisation in it: Q/DQ pairs or integer kernels."""
    graph = (model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)).graph
    return any(node.op_type in _QDQ or node.op_type in INTEGER_OPS for node in graph.node)


def integer_coverage(model: str | Path | bytes) -> IntegerCoverage:
    """The share of ``model``'s multiply-accumulates that ONNX Runtime's CPU execution provider runs
    in integer kernels, the float Conv/Gemm/MatMul nodes left (named as in the optimised graph,
    with their MACs) and the QuantizeLinear/DequantizeLinear nodes it could not fuse.

    Raises:
        QuantizationError: ONNX Runtime cannot load or run the model.
    """
    optimised = _optimised(model)
    shapes = _shapes(optimised)
    weights = {init.name: tuple(init.dims) for init in optimised.graph.initializer}
    integer = integer_nodes = 0
    floats = []
    for node in optimised.graph.node:
        if node.op_type not in INTEGER_OPS and node.op_type not in FLOAT_OPS:
            continue
        macs = _macs(node, shapes, weights)
        if node.op_type in INTEGER_OPS:
            integer += macs
            integer_nodes += 1
        else:
            floats.append(FloatLayer(node.name, node.op_type, macs))
    ops = [node.op_type for node in optimised.graph.node]
    return IntegerCoverage(
        macs=integer + sum(f.macs for f in floats),
        integer_macs=integer,
        integer_nodes=integer_nodes,
        float_layers=tuple(floats),
        quantize_nodes=ops.count("QuantizeLinear"),
        dequantize_nodes=ops.count("DequantizeLinear"),
        graph=f"onnxruntime {ort.__version__} CPUExecutionProvider, default optimisation level (NCHWc blocking of float convolutions left out)",
    )


def _optimised(model: str | Path | bytes):
    """The graph ONNX Runtime's CPU provider runs for ``model``, as it writes it out."""

    with tempfile.TemporaryDirectory(prefix="edgetransfer-coverage-") as work:
        written = Path(work) / "optimised.onnx"  # this machine's graph: only read here
        try:
            write_optimized(model, written, disabled_optimizers=_SKIPPED)
        except PredictorError as exc:  # InvalidGraph, NotImplemented, Fail: the model is not one this ONNX Runtime runs
            raise QuantizationError(f"ONNX Runtime cannot load the model to measure its integer coverage: {first_line(exc)}") from exc
        return onnx.load(written)


def _shapes(optimised) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of the optimised graph in one run at batch 1 (every other free
    dimension 1), the graph run as written (no further optimisation)."""

    probe = onnx.ModelProto()
    probe.CopyFrom(optimised)
    listed = {out.name for out in probe.graph.output}
    for node in probe.graph.node:
        for out in node.output:
            if out and out not in listed:
                probe.graph.output.append(onnx.ValueInfoProto(name=out))
                listed.add(out)
    session = open_session(probe.SerializeToString(), optimized=False)
    feeds = {}
    for given in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in given.shape]
        feeds[given.name] = np.zeros(shape, dtype=np.uint8 if given.type == "tensor(uint8)" else np.float32)
    return {out.name: value.shape for out, value in zip(session.get_outputs(), session.run(None, feeds), strict=True)}


def _macs(node, shapes: dict, weights: dict) -> int:
    """Multiply-accumulates of one Conv-like or Gemm/MatMul-like node at batch 1."""
    produced = shapes.get(node.output[0])
    if produced is None:
        return 0
    outputs = int(np.prod(produced))
    if "Conv" in node.op_type:
        # the weight: QLinearConv's fourth input, every other convolution's second; OIHW (or IOHW for a transpose)
        weight = node.input[3] if node.op_type.startswith("QLinear") else node.input[1]
        dims = weights.get(weight) or shapes.get(weight)
        if not dims:
            return 0
        per_element = int(np.prod(dims)) // dims[0]  # Conv: per output element; ConvTranspose: per input element
        if "Transpose" in node.op_type:
            inputs = shapes.get(node.input[0])
            return int(np.prod(inputs)) * per_element if inputs else 0
        return outputs * per_element
    first = shapes.get(node.input[0]) or weights.get(node.input[0])
    if not first:
        return 0
    transposed = any(a.name == "transA" and a.i for a in node.attribute)
    return outputs * int(first[-2] if transposed and len(first) >= 2 else first[-1])
