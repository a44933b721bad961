"""Graph edits on QDQ models (onnx only): the placement ONNX Runtime fuses completely, and the
topological sort and pruning that every edit of a quantised graph needs.

ONNX Runtime turns ``DQ -> op -> Q`` into an integer kernel only when the group is complete
(its ``qdq_selectors.cc``): every input of the op is dequantised, and its output is read by
exactly one QuantizeLinear and nothing else (a Relu or Clip that the Q makes redundant may sit
between). A QAT export from PyTorch places a quantizer where a *module* reads its input, so a
tensor that a module and a functional operation both read (the shortcut of a residual Add) is
read in float by the Add; the producer of that tensor then runs in float, and so does the Add.
:func:`complete_placement` gives every float reader of a quantised tensor the dequantised tensor
instead, makes one quantizer of several on the same tensor, and quantises float biases (int32,
at the input scale times the weight scale, as ONNX Runtime's own quantiser writes them).
TensorRT's explicit quantisation reads the same placement (NVIDIA's guidance quantises both
inputs of a residual Add).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import QuantizationError

__all__ = ["Placement", "complete_placement", "sort_nodes", "prune", "constant_value"]

Q, DQ = "QuantizeLinear", "DequantizeLinear"


@dataclass(frozen=True)
class Placement:
    """What :func:`complete_placement` changed."""

    rewired: int  # float readers of a quantised tensor that now read its dequantised value
    merged: int  # quantizers dropped because another one quantised the same tensor
    biases: int  # float biases quantised to int32
    unsigned: int  # int8 activation quantizers written as uint8 (zero point + 128)

    def to_dict(self) -> dict[str, int]:
        return {
            "rewired_readers": self.rewired,
            "merged_quantizers": self.merged,
            "quantized_biases": self.biases,
            "int8_activations_as_uint8": self.unsigned,
        }


def constant_value(graph, name: str) -> np.ndarray | None:
    """The value of ``name`` when it is an initializer or a Constant node's output, else ``None``."""
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attribute in node.attribute:
                if attribute.name == "value":
                    return numpy_helper.to_array(attribute.t)
    return None


def complete_placement(model, unsigned_activations: bool = False) -> Placement:
    """Edit the QDQ ``model`` (a ModelProto) in place so that ONNX Runtime can fuse every quantised
    operation; the values it computes change only where a float reader now reads the quantised
    tensor (one rounding step of that tensor's own quantizer).

    Args:
        unsigned_activations: write every int8 activation quantizer as uint8 with its zero point
            moved by 128 (the same grid, the same values). ONNX Runtime's CPU kernels need one type
            on both sides of an integer convolution or Add, and uint8 activations are their fast
            path; TensorRT wants int8, so leave it off for TensorRT.
    """
    graph = model.graph
    _drop_float_casts(graph)
    rewired = merged = 0
    outputs = {o.name for o in graph.output}
    for tensor in _quantized_tensors(graph):
        readers = [n for n in graph.node if tensor in n.input]
        quantizers = [n for n in readers if n.op_type == Q and n.input[0] == tensor]
        if not quantizers or tensor in outputs:
            continue
        kept = _largest(graph, quantizers)
        dequantized = _dequantizer(graph, kept)
        for other in quantizers:
            if other is kept or _dtype(graph, other) != _dtype(graph, kept):
                continue
            for reader in [n for n in graph.node if n.op_type == DQ and n.input[0] == other.output[0]]:
                _replace_input(graph, reader.output[0], dequantized)
            merged += 1
        for reader in readers:
            if reader.op_type != Q:
                rewired += _redirect(reader, tensor, dequantized)
    prune(graph)
    unsigned = _as_uint8(graph) if unsigned_activations else 0
    biases = _quantize_biases(graph)
    sort_nodes(graph)
    return Placement(rewired, merged, biases, unsigned)


def _as_uint8(graph) -> int:
    """Each activation QuantizeLinear with an int8 zero point, and the DequantizeLinear nodes of
    its output, get a uint8 zero point 128 higher: int8 [-128, 127] becomes uint8 [0, 255] on the
    same scale."""
    activations = set(_quantized_tensors(graph))
    done = 0
    for q in [n for n in graph.node if n.op_type == Q and n.input[0] in activations and len(n.input) > 2]:
        zero = constant_value(graph, q.input[2])
        if zero is None or zero.dtype != np.int8:
            continue
        name = f"{q.name}_zero_point_uint8"
        graph.initializer.append(numpy_helper.from_array((zero.astype(np.int16) + 128).astype(np.uint8), name))
        for node in [q, *(n for n in graph.node if n.op_type == DQ and n.input[0] == q.output[0] and n.input[2] == q.input[2])]:
            node.input[2] = name
        done += 1
    prune(graph)
    return done


def _drop_float_casts(graph) -> None:
    """Remove each Cast to float32 that reads a DequantizeLinear's float32 output: it changes
    nothing, and an Add behind it would not read a dequantised tensor (ModelOpt's quantizer casts its
    output back to its input's type)."""
    producers = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}
    for cast in [n for n in graph.node if n.op_type == "Cast"]:
        to = next((a.i for a in cast.attribute if a.name == "to"), None)
        source = producers.get(cast.input[0])
        if to != onnx.TensorProto.FLOAT or source is None or source.op_type != DQ or cast.output[0] in outputs:
            continue
        scale = constant_value(graph, source.input[1])
        if scale is None or scale.dtype != np.float32:  # a DQ writes its scale's type
            continue
        _replace_input(graph, cast.output[0], cast.input[0])
        graph.node.remove(cast)


def _quantized_tensors(graph) -> list[str]:
    """Activation tensors some QuantizeLinear reads (not initializers: weights have no other readers)."""
    initializers = {init.name for init in graph.initializer}
    constants = {node.output[0] for node in graph.node if node.op_type == "Constant"}
    seen: dict[str, None] = {}
    for node in graph.node:
        if node.op_type == Q and node.input[0] not in initializers and node.input[0] not in constants:
            seen.setdefault(node.input[0])
    return list(seen)


def _scale(graph, node) -> float:
    value = constant_value(graph, node.input[1])
    return float(np.max(value)) if value is not None else 0.0


def _dtype(graph, node) -> str:
    value = constant_value(graph, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return str(value.dtype) if value is not None else "uint8"


def _largest(graph, quantizers: list):
    """Of several quantizers of one tensor, the one with the widest range (it clips the least)."""
    return max(quantizers, key=lambda q: _scale(graph, q))


def _dequantizer(graph, quantizer) -> str:
    """The output of a DequantizeLinear of ``quantizer`` with its own scale and zero point (made if missing)."""
    for node in graph.node:
        if node.op_type == DQ and node.input[0] == quantizer.output[0] and list(node.input[1:]) == list(quantizer.input[1:]):
            return node.output[0]
    name = f"{quantizer.output[0]}_dequantized"
    node = onnx.helper.make_node(DQ, [quantizer.output[0], *quantizer.input[1:]], [name], name=f"{quantizer.name}_dequantize")
    node.attribute.extend(a for a in quantizer.attribute if a.name == "axis")
    graph.node.append(node)
    return name


def _redirect(node, old: str, new: str) -> int:
    changed = 0
    for i, name in enumerate(node.input):
        if name == old:
            node.input[i] = new
            changed = 1
    return changed


def _replace_input(graph, old: str, new: str) -> None:
    for node in graph.node:
        _redirect(node, old, new)


BIAS_LIMIT = 2**30  # largest |int32 bias|: half the range, so that the products still fit beside it


def _quantize_biases(graph) -> int:
    """Each Conv or Gemm whose input and weight are dequantised and whose bias is a float
    initializer gets an int32 bias at scale ``input scale x weight scale`` (zero point 0).

    A channel whose weights are all but zero (BatchNorm folded into a channel it switched off)
    has a weight scale so small that its bias does not fit in int32 at that scale; its weight
    scale is widened until the bias fits (as ONNX Runtime's quantiser does): its weights, which
    round to zero either way, are all that change.
    """

    producers = {out: node for node in graph.node for out in node.output}
    initializers = {init.name: init for init in graph.initializer}
    done = 0
    for node in list(graph.node):
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in initializers:
            continue
        x, w = producers.get(node.input[0]), producers.get(node.input[1])
        if x is None or w is None or x.op_type != DQ or w.op_type != DQ:
            continue
        x_scale, w_scale = constant_value(graph, x.input[1]), constant_value(graph, w.input[1])
        bias = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float64)
        if x_scale is None or w_scale is None or x_scale.size != 1 or w_scale.size not in (1, bias.size):
            continue
        needed = np.abs(bias) / (np.float64(x_scale.reshape(())) * BIAS_LIMIT)
        if np.any(needed > w_scale):
            if w_scale.size == 1 or not _owns(graph, w, w.input[1]):
                raise QuantizationError(
                    f"the bias of {node.name} does not fit in int32 at its input and weight scales; the model cannot be quantised"
                )
            w_scale = np.maximum(w_scale, needed * (1 + 1e-5)).astype(w_scale.dtype)  # stored in float32: a margin
            _set_constant(graph, w.input[1], w_scale)
        scale = (x_scale * w_scale.astype(np.float64)).reshape(-1)
        if np.any(scale <= 0):
            continue
        stem = f"{node.input[2]}_int32"
        graph.initializer.append(numpy_helper.from_array(np.round(bias / scale).astype(np.int32), stem))
        graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32).reshape(w_scale.shape), f"{stem}_scale"))
        dq = onnx.helper.make_node(
            DQ,
            [stem, f"{stem}_scale"],
            [f"{stem}_dequantized"],
            name=f"{node.name}_bias_dequantize",
            **({"axis": 0} if scale.size > 1 else {}),  # type: ignore[arg-type]  # attributes as keywords
        )
        graph.node.append(dq)
        node.input[2] = dq.output[0]
        done += 1
    prune(graph)
    return done


def _owns(graph, dequantize, scale: str) -> bool:
    """Whether only ``dequantize`` and the QuantizeLinear it reads use the tensor ``scale``."""
    quantize = next((n for n in graph.node if dequantize.input[0] in n.output), None)
    users = [n for n in graph.node if scale in n.input]
    return all(n is dequantize or n is quantize for n in users)


def _set_constant(graph, name: str, value: np.ndarray) -> None:
    """Give the initializer or Constant node output ``name`` a new value."""
    for init in graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(value, name))
            return
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attribute in node.attribute:
                if attribute.name == "value":
                    attribute.t.CopyFrom(numpy_helper.from_array(value, name))
                    return
    raise QuantizationError(f"no constant named {name!r} in the quantised model")


def sort_nodes(graph) -> None:
    """Put the graph's nodes back in topological order (edits append nodes at the end).

    Raises:
        QuantizationError: the graph has a cycle or reads a tensor nothing makes.
    """
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        runnable = [n for n in pending if all(t in ready for t in n.input)]
        if not runnable:
            raise QuantizationError("the quantised model's graph has a cycle or a missing input after an edit")
        for node in runnable:
            ordered.append(node)
            ready.update(node.output)
        pending = [n for n in pending if all(n is not r for r in runnable)]
    copies = []
    for node in ordered:  # copied before the repeated field lets go of them
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copies.append(copy)
    del graph.node[:]
    graph.node.extend(copies)


def prune(graph) -> None:
    """Remove Q/DQ and Constant nodes whose outputs nothing reads, then initializers nothing reads."""
    while True:
        read = {tensor for node in graph.node for tensor in node.input} | {out.name for out in graph.output}
        dead = [node for node in graph.node if node.op_type in (Q, DQ, "Constant") and not any(out in read for out in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {tensor for node in graph.node for tensor in node.input}
    for init in [init for init in graph.initializer if init.name not in read]:
        graph.initializer.remove(init)
