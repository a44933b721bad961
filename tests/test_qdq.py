"""The QDQ placement ONNX Runtime fuses completely, on a small residual graph written as a QAT
export writes it: quantizers where modules read their inputs, the shortcut read in float, float
biases, symmetric int8 activations."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgetransfer.errors import QuantizationError
from edgetransfer.optimize.coverage import integer_coverage
from edgetransfer.qdq import complete_placement, constant_value

C, SIZE = 8, 6


def _pair(name: str, tensor: str, scale, zero, axis: int | None = None) -> tuple[list, str]:
    """Q and DQ of ``tensor`` with Constant scale and zero point, as torch's exporter writes them."""
    scale, zero = np.asarray(scale, np.float32), np.asarray(zero, np.int8)
    nodes = [
        helper.make_node("Constant", [], [f"{name}_scale"], value=numpy_helper.from_array(scale)),
        helper.make_node("Constant", [], [f"{name}_zero"], value=numpy_helper.from_array(zero)),
    ]
    extra = {"axis": axis} if axis is not None else {}
    nodes.append(helper.make_node("QuantizeLinear", [tensor, f"{name}_scale", f"{name}_zero"], [f"{name}_q"], name=f"{name}/Q", **extra))
    nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zero"], [f"{name}_dq"], name=f"{name}/DQ", **extra))
    return nodes, f"{name}_dq"


def residual_model(dead_channel: bool = False) -> onnx.ModelProto:
    """x -> conv_a -> a; a -> conv_b -> b; b + a (the shortcut, read in float) -> y."""
    rng = np.random.default_rng(0)
    wa, wb = rng.normal(0, 0.3, (C, 3, 3, 3)).astype(np.float32), rng.normal(0, 0.2, (C, C, 1, 1)).astype(np.float32)
    ba, bb = rng.normal(0, 0.1, C).astype(np.float32), rng.normal(0, 0.1, C).astype(np.float32)
    if dead_channel:  # BatchNorm folded into a channel it switched off: weights ~0, a real bias
        wa[3], ba[3] = 1e-12, 3.0
    inits = [numpy_helper.from_array(v, n) for v, n in ((wa, "wa"), (wb, "wb"), (ba, "ba"), (bb, "bb"))]
    nodes = []
    # 7-bit weights, as the CPU scheme without VNNI has them: ONNX Runtime's integer kernels are then
    # exact on every x86 CPU (with 8 bits, u8 x s8 pair sums saturate 16 bits on AVX2)
    for name, tensor, scale, zero, axis in (
        ("x", "x", 0.03, 0, None),
        ("wa", "wa", np.abs(wa).reshape(C, -1).max(1) / 63, np.zeros(C), 0),
        ("wb", "wb", np.abs(wb).reshape(C, -1).max(1) / 63, np.zeros(C), 0),
    ):
        pair, _ = _pair(name, tensor, scale, zero, axis)
        nodes += pair
    nodes.append(helper.make_node("Conv", ["x_dq", "wa_dq", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]))
    pair, a_dq = _pair("a", "a", 0.05, 0)  # conv_b's input quantizer
    nodes += pair
    nodes.append(helper.make_node("Conv", [a_dq, "wb_dq", "bb"], ["b"], name="conv_b"))
    pair, b_dq = _pair("b", "b", 0.04, 0)  # conv_b's output quantizer
    nodes += pair
    nodes.append(helper.make_node("Add", [b_dq, "a"], ["s"], name="add"))
    pair, s_dq = _pair("s", "s", 0.06, 0)  # the next layer's input quantizer
    nodes += pair
    nodes.append(helper.make_node("Identity", [s_dq], ["y"], name="out"))
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, SIZE, SIZE])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray, reference: bool = False) -> np.ndarray:
    """``model`` on ``x`` in ONNX Runtime: its integer kernels, or the QDQ graph's reference semantics."""
    options = ort.SessionOptions()
    if reference:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def fused_ops(model: onnx.ModelProto, tmp_path) -> list[str]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sorted(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node if n.op_type.startswith("QLinear"))


def test_the_shortcut_reads_its_quantised_tensor_and_everything_fuses(tmp_path):
    x = np.random.default_rng(1).normal(0, 1, (1, 3, SIZE, SIZE)).astype(np.float32)
    before = residual_model()
    assert "QLinearAdd" not in fused_ops(before, tmp_path)  # the Add reads the shortcut in float
    after = residual_model()
    placement = complete_placement(after, unsigned_activations=True)
    assert (placement.rewired, placement.merged, placement.biases, placement.unsigned) == (1, 0, 2, 4)
    add = next(n for n in after.graph.node if n.op_type == "Add")
    producers = {o: n for n in after.graph.node for o in n.output}
    assert [producers[i].op_type for i in add.input] == ["DequantizeLinear", "DequantizeLinear"]
    assert fused_ops(after, tmp_path) == ["QLinearAdd", "QLinearConv", "QLinearConv"]
    coverage = integer_coverage(after.SerializeToString())
    assert coverage.share == 1.0 and coverage.float_layers == ()
    # what changed in the values: the shortcut is rounded to its quantizer's step (0.05), the biases to theirs
    assert np.abs(run(after, x) - run(before, x)).max() <= 0.05 / 2 + 0.06 + 1e-6


def test_uint8_activations_are_the_same_grid_and_int8_ones_stay_for_tensorrt():
    x = np.random.default_rng(2).normal(0, 1, (1, 3, SIZE, SIZE)).astype(np.float32)
    signed, unsigned = residual_model(), residual_model()
    complete_placement(signed, unsigned_activations=False)
    complete_placement(unsigned, unsigned_activations=True)
    # zero point + 128: the same values, in the graph's reference semantics (integer kernels round their own way)
    np.testing.assert_allclose(run(unsigned, x, reference=True), run(signed, x, reference=True), atol=1e-6)

    def activation_zero_points(model):
        return {
            constant_value(model.graph, n.input[2]).dtype.name
            for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in ("wa", "wb")
        }

    assert activation_zero_points(signed) == {"int8"} and activation_zero_points(unsigned) == {"uint8"}


def test_a_switched_off_channel_gets_a_weight_scale_its_bias_fits(tmp_path):
    x = np.random.default_rng(3).normal(0, 1, (1, 3, SIZE, SIZE)).astype(np.float32)
    before, after = residual_model(dead_channel=True), residual_model(dead_channel=True)
    complete_placement(after, unsigned_activations=True)
    bias = next(numpy_helper.to_array(i) for i in after.graph.initializer if i.name == "ba_int32")
    assert np.abs(bias).max() <= 2**30
    a_before = _tensor(before, "a", x)
    a_after = _tensor(after, "a", x)
    np.testing.assert_allclose(a_after[:, 3], 3.0, atol=1e-3)  # the channel is its bias, as in float
    assert np.abs(a_after - a_before).max() < 0.01


def test_a_bias_that_cannot_fit_is_refused():
    model = residual_model(dead_channel=True)
    for node in model.graph.node:  # one weight scale for every channel: widening it would change all of them
        if node.op_type == "Constant" and node.output[0] == "wa_scale":
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(np.asarray(1e-12, np.float32)))
        if node.name in ("wa/Q", "wa/DQ"):
            del node.attribute[:]
    with pytest.raises(QuantizationError, match="bias of conv_a does not fit in int32"):
        complete_placement(model)


def _tensor(model: onnx.ModelProto, name: str, x: np.ndarray) -> np.ndarray:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([name], {"x": x})[0]
