from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgetransfer.checkpoint import load_checkpoint, save_checkpoint
from edgetransfer.data import DataSpec, load_image
from edgetransfer.errors import ExportError, ParityError, RunError
from edgetransfer.export import ExportOptions, export_onnx, write_onnx
from edgetransfer.models import BuiltModel, build
from edgetransfer.results import Parity
from edgetransfer.rundir import Manifest, RunDir
from edgetransfer.runtime.files import sha256_file, write_json
from edgetransfer.runtime.metadata import ModelInfo

from conftest import copy_run
from test_models import FAMILY_MEMBERS


@pytest.fixture(scope="module")
def run_dir(trained_run, tmp_path_factory):
    """A real fine-tuned run: EfficientNet-Lite0 head on 200 digits."""
    return copy_run(trained_run, tmp_path_factory, "export")


@pytest.fixture(scope="module")
def exported(run_dir):
    return export_onnx(run_dir)


def test_export_writes_a_checked_model_with_stable_names_and_dynamic_batch(exported):
    model = onnx.load(exported.path)
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 64, 64]
    assert {o.domain: o.version for o in model.opset_import}[""] == 18


def test_parity_on_real_validation_images_is_recorded(run_dir, exported):
    parity = exported.parity
    assert parity.images == 40 and parity.batch_size == 16  # every one of the 40 val images, the last batch partial
    # the recorded difference is the one PyTorch and ONNX Runtime really show on those images
    built, _ = load_checkpoint(run_dir / "model.pt")
    images = [load_image(s) for s in RunDir(run_dir).validation(64)]
    x = np.stack([built.preprocessing(img) for img in images])
    with torch.no_grad():
        eager = built.module(torch.from_numpy(x)).numpy()
    onnx_logits = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert parity.max_abs_diff == pytest.approx(np.abs(onnx_logits - eager).max(), rel=0.05, abs=1e-6)
    assert parity.top1_agreement == (onnx_logits.argmax(1) == eager.argmax(1)).mean()
    entry = Manifest.load(run_dir).artifacts["onnx"]
    assert entry["parent"] == "checkpoint" and entry["sha256"] == sha256_file(exported.path)
    assert Parity.from_dict(entry["parity"]) == parity and entry["settings"]["opset"] == 18


def test_metadata_carries_labels_and_preprocessing(run_dir, exported):
    props = {p.key: p.value for p in onnx.load(exported.path).metadata_props}
    built, payload = load_checkpoint(run_dir / "model.pt")
    info = ModelInfo.from_props(props)
    assert list(info.labels) == payload["classes"]
    assert info.preprocessing == built.preprocessing
    assert props["arch"] == "timm:efficientnet_lite0" and props["layout"] == "NCHW" and props["channel_order"] == "RGB"
    assert props["checkpoint_sha256"] == sha256_file(run_dir / "model.pt")
    assert props["interpolation"] == "bicubic" and json.loads(props["mean"]) == pytest.approx([127 / 255] * 3)


def test_batch_sizes_give_the_same_logits(exported):
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((5, 3, 64, 64)).astype(np.float32)
    together = session.run(None, {"input": x})[0]
    alone = np.concatenate([session.run(None, {"input": x[i : i + 1]})[0] for i in range(5)])
    np.testing.assert_allclose(together, alone, atol=1e-4)


def test_static_batch_and_fused_preprocessing(run_dir):
    result = export_onnx(run_dir, ExportOptions(static_batch=4, fuse_preprocess=True, verify_images=10, output=run_dir / "b4.onnx"))
    model = onnx.load(result.path)
    tensor = model.graph.input[0].type.tensor_type
    assert tensor.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in tensor.shape.dim] == [4, 64, 64, 3]
    # 10 images in batches of 4: the last batch is padded, and all 10 are compared
    assert result.parity.images == 10 and result.parity.batch_size == 4
    assert Manifest.load(run_dir).artifacts["onnx-uint8"]["path"] == "b4.onnx"


def test_disagreement_beyond_tolerance_fails_and_writes_nothing(run_dir):
    target = run_dir / "strict.onnx"
    with pytest.raises(ParityError, match=r"differ by up to .* relative; atol 1e-12, rtol 0,.*nothing was written"):
        export_onnx(run_dir, ExportOptions(atol=1e-12, rtol=0.0, output=target))
    assert not target.exists() and not list(run_dir.glob(".strict.onnx*"))


def test_missing_run_checkpoint_and_unwritable_output(tmp_path, run_dir):
    with pytest.raises(RunError, match=r"no run at .*run edgetransfer finetune first"):
        export_onnx(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match=r"no fine-tuned run at .*empty \(no model.pt\)"):
        export_onnx(tmp_path / "empty")
    with pytest.raises(ExportError, match=r"cannot write .*folder .* does not exist"):
        export_onnx(run_dir, ExportOptions(output=tmp_path / "no" / "such" / "m.onnx"))


def test_checkpoint_whose_classifier_does_not_match_its_classes(tmp_path):
    built = build("resnet18", 3, weights="none")
    save_checkpoint(tmp_path / "model.pt", built, ["a", "b"])
    with pytest.raises(RunError, match=r"2 class names for a 3-class classifier"):
        export_onnx(tmp_path, ExportOptions(verify=False))


def test_an_operator_onnx_cannot_express_is_named(tmp_path):
    class Eig(nn.Module):
        def forward(self, x):
            return torch.linalg.eigvals(x[:, 0, :4, :4]).real

    built = build("resnet18", 4, weights="none", image_size=32)
    odd = BuiltModel(Eig(), built.arch, "none", 4, built.preprocessing)
    info = ModelInfo(("a", "b", "c", "d"), built.preprocessing)
    with pytest.raises(ExportError, match=r"unsupported operator aten.linalg_eig"):
        write_onnx(odd, ExportOptions(), info, tmp_path / "odd.onnx")


def _fake_run(root: Path, name: str, size: int) -> Path:
    """A run directory holding an untrained checkpoint of ``name`` and 3 demo classes."""
    torch.manual_seed(0)
    built = build(name, 3, weights="none", image_size=size)
    run = root / name.replace(":", "_")
    save_checkpoint(run / "model.pt", built, ["0", "1", "2"])
    write_json(run / "config.json", {"data": DataSpec(limit_per_class=4).to_dict()})
    return run


# The deepest members are exported at a shallower depth: the same blocks (every kind the family
# has, shifted windows and distillation token included), fewer of each. The exporter's time grows
# with the number of nodes, not the kind: maxvit_t took 170 s, one block per stage of it 33 s.
SHALLOW_TORCHVISION = {
    "maxvit_t": (
        "maxvit",
        "_maxvit",
        dict(
            stem_channels=64, block_channels=[64, 128, 256, 512], block_layers=[1, 1, 1, 1], head_dim=32, stochastic_depth_prob=0.2, partition_size=7
        ),
    ),
    "swin_t": (
        "swin_transformer",
        "_swin_transformer",
        dict(patch_size=[4, 4], embed_dim=96, depths=[2, 1, 1, 1], num_heads=[3, 6, 12, 24], window_size=[7, 7], stochastic_depth_prob=0.2),
    ),
    "vit_b_32": ("vision_transformer", "_vision_transformer", dict(patch_size=32, num_layers=2, num_heads=12, hidden_dim=768, mlp_dim=3072)),
    "densenet121": ("densenet", "_densenet", dict(growth_rate=32, block_config=(2, 2, 2, 2), num_init_features=64)),
}
SHALLOW_TIMM = {"timm:deit_tiny_distilled_patch16_224": dict(depth=2), "timm:levit_128s": dict(depth=(1, 1, 1))}


def _build_shallow(monkeypatch) -> None:
    import functools
    import importlib

    import timm
    import torchvision.models._api as tv_api

    for name, (module, maker, config) in SHALLOW_TORCHVISION.items():
        original = tv_api.BUILTIN_MODELS[name]
        make = getattr(importlib.import_module(f"torchvision.models.{module}"), maker)

        @functools.wraps(original)  # keeps the weights annotation torchvision reads the weights enum from
        def builder(*, weights=None, progress=True, _make=make, _config=config, **kwargs):
            return _make(weights=weights, progress=progress, **_config, **kwargs)

        monkeypatch.setitem(tv_api.BUILTIN_MODELS, name, builder)
    create = timm.create_model
    depths = {name.split(":", 1)[1]: config for name, config in SHALLOW_TIMM.items()}
    monkeypatch.setattr(timm, "create_model", lambda name, *args, **kwargs: create(name, *args, **{**depths.get(name, {}), **kwargs}))


@pytest.fixture
def shallow(monkeypatch):
    """Build the families above at their shallow depth for the length of a test."""
    _build_shallow(monkeypatch)


def test_shallow_members_leave_out_depth_and_nothing_else(monkeypatch):
    """Each shallow build has every kind of module its full-depth member has, and fewer modules."""

    def kinds(name):
        module = build(name, 3, weights="none").module
        return {type(m).__name__ for m in module.modules()}, sum(1 for _ in module.modules())

    full = {name: kinds(name) for name in [*SHALLOW_TORCHVISION, *SHALLOW_TIMM]}
    _build_shallow(monkeypatch)
    for name, (full_kinds, full_count) in full.items():
        shallow_kinds, count = kinds(name)
        assert shallow_kinds == full_kinds and count < full_count, name
    swin = build("swin_t", 3, weights="none").module
    assert [block.attn.shift_size for block in swin.features[1]] == [[0, 0], [3, 3]]  # a shifted-window block is there


@pytest.mark.parametrize("name", sorted(FAMILY_MEMBERS))
def test_every_family_exports_with_parity(tmp_path, name, shallow):
    run = _fake_run(tmp_path, name, FAMILY_MEMBERS[name])
    result = export_onnx(run, ExportOptions(verify_images=8))
    assert result.parity.images == len(RunDir(run).validation(8)) == 8, result.parity  # every image asked for, compared
    assert onnx.load(result.path).graph.output[0].type.tensor_type.shape.dim[1].dim_value == 3
