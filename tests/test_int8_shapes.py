"""INT8 on graphs ONNX Runtime's symbolic shape inference has no rule for: the quantiser's
pre-processing runs again with ONNX's own shape inference and says so, and a model that cannot
be prepared either way is one line naming ONNX Runtime's reason."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import timm
import torch

from edgetransfer.errors import QuantizationError
from edgetransfer.optimize import ort as ortq

from conftest import depthwise_cnn


def test_a_failed_symbolic_shape_inference_falls_back_and_says_so(tmp_path, monkeypatch):
    real = ortq.quant_pre_process
    calls = []

    def symbolic_fails(src, dst, skip_symbolic_shape=False, **kwargs):  # ONNX Runtime's step, faked at its boundary
        calls.append(skip_symbolic_shape)
        if not skip_symbolic_shape:
            raise TypeError("object of type 'NoneType' has no len()")
        return real(src, dst, skip_symbolic_shape=True, **kwargs)

    monkeypatch.setattr(ortq, "quant_pre_process", symbolic_fails)
    prepared = tmp_path / "prepared.onnx"
    warning = ortq.preprocess_for_quantization(depthwise_cnn(tmp_path / "cnn.onnx"), prepared)
    assert calls == [False, True] and onnx.load(str(prepared)).graph.node
    assert warning.startswith("ONNX Runtime's symbolic shape inference failed (TypeError: object of type 'NoneType' has no len())")

    def always_fails(src, dst, skip_symbolic_shape=False, **kwargs):
        raise ValueError("Unsupported model IR version: 99\nmore detail")

    monkeypatch.setattr(ortq, "quant_pre_process", always_fails)
    with pytest.raises(QuantizationError, match=r"^ONNX Runtime cannot prepare the model for INT8 \(ValueError: Unsupported model IR version: 99\)$"):
        ortq.preprocess_for_quantization(tmp_path / "cnn.onnx", prepared)


def test_relative_paths_are_prepared_with_symbolic_shape_inference(tmp_path, monkeypatch):
    """The step runs in a scratch working directory: paths relative to the user's own must be
    resolved before it moves there, or the symbolic step never finds the model and falls back."""
    monkeypatch.chdir(tmp_path)
    depthwise_cnn(tmp_path / "cnn.onnx")
    assert ortq.preprocess_for_quantization(Path("cnn.onnx"), Path("prepared.onnx")) is None
    assert onnx.load(str(tmp_path / "prepared.onnx")).graph.node


@pytest.mark.parametrize(
    "name, size, options",
    [
        ("convnextv2_atto", 64, {}),  # ReduceMean's axes come as an input in opset 18: no rule for them
        ("efficientformerv2_s0", 224, {"img_size": 224}),  # "Incomplete symbolic shape inference"
    ],
)
def test_architectures_symbolic_shape_inference_fails_on_are_prepared_for_int8(tmp_path: Path, name, size, options, monkeypatch):
    """timm models (random weights) whose graphs ONNX Runtime's symbolic shape inference cannot
    finish: the fallback prepares a model that still computes the same, and the model ONNX
    Runtime dumps when it gives up does not land in the user's working directory."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    module = timm.create_model(name, pretrained=False, num_classes=3, **options).eval()
    images = torch.randn(2, 3, size, size)
    program = torch.onnx.export(module, (images,), dynamo=True, opset_version=18, dynamic_shapes={"x": {0: torch.export.Dim.AUTO}}, verbose=False)
    program.save(str(tmp_path / "model.onnx"))
    prepared = tmp_path / "prepared.onnx"
    warning = ortq.preprocess_for_quantization(tmp_path / "model.onnx", prepared)
    assert warning is not None and "symbolic shape inference failed" in warning
    assert list((tmp_path / "cwd").iterdir()) == []
    with torch.no_grad():
        expected = module(images).numpy()
    assert abs(ortq.run_logits(prepared, images.numpy()) - expected).max() < 1e-3
