"""Integer coverage read from ONNX Runtime's optimised graph, on a small real CNN quantised by
ONNX Runtime's own quantiser."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgetransfer.optimize import ort as ortq
from edgetransfer.optimize.coverage import integer_coverage, is_quantized
from edgetransfer.results import IntegerCoverage

from conftest import depthwise_cnn, digits_pixels

SIZE = 24
# stem 3x3 (3 -> 16), depthwise 3x3 (16), pointwise 1x1 (16 -> 24) at 24x24, classifier 24 -> 10
MACS = {"stem": SIZE * SIZE * 16 * 27, "depthwise": SIZE * SIZE * 16 * 9, "pointwise": SIZE * SIZE * 24 * 16, "classifier": 24 * 10}


class _Digits:
    """ONNX Runtime's calibration protocol (``get_next``) over 30 real digits, grey as RGB, in one chunk."""

    def __init__(self) -> None:
        pixels = np.stack([p for _, p in digits_pixels(3, classes=10, size=SIZE)]).astype(np.float32) / 255.0
        images = np.repeat((pixels[:, None] - 0.5) / 0.25, 3, axis=1)
        self.batches = iter([{"input": images[i : i + 10]} for i in range(0, len(images), 10)])
        self.used = len(images)

    def chunks(self, size: int):
        yield self

    def get_next(self):
        return next(self.batches, None)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The CNN in float (shape-inferred as the INT8 build does) and fully quantised (QDQ, u8s8)."""
    work = tmp_path_factory.mktemp("coverage")
    prepared = work / "prepared.onnx"
    ortq.preprocess_for_quantization(depthwise_cnn(work / "cnn.onnx", SIZE), prepared)
    cache = ortq.calibrate(prepared, _Digits(), ortq.CalibMethod.MINMAX, False, work / "ranges.json")
    qdq = work / "int8.onnx"
    ortq.quantize_qdq(prepared, qdq, cache, ortq.CalibMethod.MINMAX, ortq.QuantScheme(activation="uint8"), [])
    return prepared, qdq


def test_a_fully_fused_model_runs_every_multiply_accumulate_in_integer_kernels(quantized):
    prepared, qdq = quantized
    coverage = integer_coverage(qdq)
    assert coverage.macs == sum(MACS.values()) and coverage.integer_macs == coverage.macs and coverage.share == 1.0
    assert coverage.float_layers == () and coverage.integer_nodes == 4
    assert coverage.dequantize_nodes <= 1  # at most the pooled features, read by the float pooling
    fp32 = integer_coverage(prepared)
    assert fp32.macs == coverage.macs and fp32.integer_macs == 0 and len(fp32.float_layers) == 4
    assert is_quantized(qdq) and not is_quantized(prepared)


def test_a_convolution_without_its_output_quantisation_is_named_with_its_macs(quantized, tmp_path):
    """ONNX Runtime fuses DQ -> Conv -> Q only: take the Q/DQ pair off the pointwise convolution's
    output and it runs in float, between a DQ and the pooling."""
    _, qdq = quantized
    model = onnx.load(str(qdq))
    graph = model.graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    pointwise = convs[-1]
    producers = {out: n for n in graph.node for out in n.output}
    readers = [n for n in graph.node if pointwise.output[0] in n.input]
    (q,) = readers
    (dq,) = [n for n in graph.node if q.output[0] in n.input]
    for node in graph.node:  # the pointwise output goes straight to what read the dequantised tensor
        for i, name in enumerate(node.input):
            if name == dq.output[0]:
                node.input[i] = pointwise.output[0]
    graph.node.remove(q)
    graph.node.remove(dq)
    assert producers[pointwise.output[0]] is pointwise
    unfused = tmp_path / "unfused.onnx"
    onnx.save_model(model, str(unfused))
    coverage = integer_coverage(unfused)
    assert [(f.name, f.macs) for f in coverage.float_layers] == [(pointwise.name, MACS["pointwise"])]
    assert coverage.integer_macs == coverage.macs - MACS["pointwise"]
    assert coverage.share == pytest.approx(1 - MACS["pointwise"] / sum(MACS.values()))
    assert pointwise.name in coverage.summary() and "in int8" in coverage.summary()


def test_coverage_survives_the_manifest(quantized):
    coverage = integer_coverage(quantized[0])
    assert IntegerCoverage.from_dict(coverage.to_dict()) == coverage
