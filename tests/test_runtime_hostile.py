"""Model files and images the runtime cannot trust: a graph that never ends is stopped by the
timeout, a model that is not an image classifier is refused when it is opened, and non-finite
pixels or logits are refused instead of printed as ``nan%``."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from edgetransfer.runtime import Predictor, PredictorError
from edgetransfer.runtime.cli import main as runtime_main
from edgetransfer.runtime.errors import ImageError
from edgetransfer.runtime.metadata import FLOAT_NCHW, ModelInfo
from edgetransfer.runtime.preprocessing import Preprocessing

PRE = Preprocessing(input_size=8, resize_size=8)
LABELS = ["a", "b", "c"]
GREY = np.full((8, 8, 3), 128, np.uint8)


def _save(graph, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _image_input() -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])


def never_ending(path: Path) -> Path:
    """logits = mean over the pixels, carried through a Loop whose trip count is int64's largest
    and whose condition never turns false."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["carried"], ["carried_out"])],
        "body",
        [
            helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("carried", TensorProto.FLOAT, None),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("carried_out", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Constant", [], ["trips"], value=helper.make_tensor("trips", TensorProto.INT64, [], [np.iinfo(np.int64).max])),
        helper.make_node("Constant", [], ["true"], value=helper.make_tensor("true", TensorProto.BOOL, [], [True])),
        helper.make_node("ReduceMean", ["input"], ["pooled"], axes=[2, 3], keepdims=0),
        helper.make_node("Loop", ["trips", "true", "pooled"], ["logits"], body=body),
    ]
    graph = helper.make_graph(nodes, "forever", [_image_input()], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])])
    return _save(graph, path)


def test_a_graph_that_never_ends_is_stopped_by_the_timeout(tmp_path):
    path = never_ending(tmp_path / "forever.onnx")
    predictor = Predictor(path, preprocessing=PRE, labels=LABELS, timeout=1.0)
    started = time.perf_counter()
    with pytest.raises(PredictorError, match=r"^the model did not finish within 1 s and was stopped"):
        predictor.predict(GREY)
    assert time.perf_counter() - started < 30
    with pytest.raises(PredictorError, match=r"timeout must be a positive number of seconds, got 0"):
        Predictor(path, preprocessing=PRE, labels=LABELS, timeout=0)


def test_the_runtime_cli_has_a_timeout_by_default(tmp_path, capsys):
    path = never_ending(tmp_path / "forever.onnx")
    image = tmp_path / "grey.png"
    Image.fromarray(GREY).save(image)
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, ModelInfo(tuple(LABELS), PRE, FLOAT_NCHW).to_props())
    onnx.save(model, str(path))
    code = runtime_main(["predict", str(path), str(image), "--timeout", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "did not finish within 1 s" in err[-1] and len(err) == 1


def _graph_with(inputs, outputs, nodes) -> onnx.GraphProto:
    return helper.make_graph(nodes, "odd", inputs, outputs)


UNSERVABLE = {
    "an int64 input": _graph_with(
        [helper.make_tensor_value_info("input", TensorProto.INT64, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [
            helper.make_node("Cast", ["input"], ["x"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["x"], ["logits"], axes=[2, 3], keepdims=0),
        ],
    ),
    "no input": _graph_with(
        [],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])],
        [helper.make_node("Constant", [], ["logits"], value=helper.make_tensor("v", TensorProto.FLOAT, [1, 3], [0.0, 1.0, 2.0]))],
    ),
    "a scalar output": _graph_with(
        [_image_input()],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [])],
        [helper.make_node("ReduceMean", ["input"], ["logits"], keepdims=0)],
    ),
    "string logits": _graph_with(
        [_image_input()],
        [helper.make_tensor_value_info("logits", TensorProto.STRING, ["N", 3])],
        [
            helper.make_node("ReduceMean", ["input"], ["pooled"], axes=[2, 3], keepdims=0),
            helper.make_node("Cast", ["pooled"], ["logits"], to=TensorProto.STRING),
        ],
    ),
}


@pytest.mark.parametrize("kind", sorted(UNSERVABLE))
def test_a_model_that_is_not_an_image_classifier_is_refused_when_opened(kind, tmp_path):
    path = _save(UNSERVABLE[kind], tmp_path / "odd.onnx")
    with pytest.raises(PredictorError, match=r"^this model cannot be served: it has .*, and edgetransfer runs models with one float"):
        Predictor(path, preprocessing=PRE, labels=LABELS)


def test_non_finite_logits_and_pixels_are_refused(tmp_path):
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["pooled"], axes=[2, 3], keepdims=0),
        helper.make_node("Sub", ["pooled", "pooled"], ["zero"]),
        helper.make_node("Div", ["zero", "zero"], ["logits"]),  # 0 / 0
    ]
    graph = helper.make_graph(nodes, "nan", [_image_input()], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])])
    predictor = Predictor(_save(graph, tmp_path / "nan.onnx"), preprocessing=PRE, labels=LABELS)
    with pytest.raises(PredictorError, match=r"outputs are not all finite numbers .* export it again"):
        predictor.predict(GREY)

    pixels = np.full((8, 8), 0.5, np.float32)
    pixels[3, 3] = np.nan
    tiff = tmp_path / "nan.tiff"
    Image.fromarray(pixels, mode="F").save(tiff)
    with _no_warning():
        with pytest.raises(ImageError, match=r"pixels that are not numbers \(NaN or infinity\)"):
            Predictor(never_ending(tmp_path / "any.onnx"), preprocessing=PRE, labels=LABELS, timeout=1.0).predict(str(tiff))


class _no_warning:
    """Nothing is printed beside the one error: no numpy RuntimeWarning on the way."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)
