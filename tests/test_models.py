from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch import nn

from edgetransfer import models, weights
from edgetransfer.errors import ModelError, UnknownNameError, WeightsError
from edgetransfer.models import CLASSIFIER_RULES, DEFAULT_ARCH, build, list_architectures, trunk_blocks


@contextmanager
def parameters_on_meta():
    """Parameters move to the meta device as they are registered: even regnet_y_128gf builds
    in about a second without memory, while the builders' own tensor arithmetic stays real."""
    register = nn.Module.register_parameter

    def to_meta(self, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def test_every_torchvision_builder_gets_a_classifier_of_the_right_size():
    names = list_architectures()
    assert len(names) >= 80 and "resnet18" in names and "squeezenet1_1" in names
    for name in names:
        with parameters_on_meta():
            built = build(name, 7, weights="none")
        assert built.arch.family in CLASSIFIER_RULES, name
        (layer,) = built.heads
        out = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        assert out == 7, name
        # nothing 1000-wide is left on the path to the logits
        assert all(getattr(m, "out_features", 7) != 1000 for m in built.module.modules()), name


# one small member of each family, run for real on CPU
FAMILY_MEMBERS = {
    "resnet18": 64,
    "regnet_x_400mf": 64,
    "shufflenet_v2_x0_5": 64,
    "googlenet": 64,
    "inception_v3": 96,
    "mobilenet_v2": 64,
    "mobilenet_v3_small": 64,
    "efficientnet_b0": 64,
    "mnasnet0_5": 64,
    "alexnet": 64,
    "vgg11": 32,
    "convnext_tiny": 64,
    "maxvit_t": 224,
    "densenet121": 64,
    "squeezenet1_1": 64,
    "vit_b_32": 224,
    "swin_t": 64,
    "timm:efficientnet_lite0": 64,
    "timm:resnet10t": 64,
    # distilled: two heads whose mean is the logits; DeiT's read two tokens, LeViT's the same features
    "timm:deit_tiny_distilled_patch16_224": 224,
    "timm:levit_128s": 224,
}


def test_family_members_cover_every_family():
    families = {models.architecture(n).family for n in FAMILY_MEMBERS}
    assert set(CLASSIFIER_RULES) <= families


@pytest.mark.parametrize("name", sorted(FAMILY_MEMBERS))
def test_head_on_captured_features_reproduces_the_full_forward(name):
    torch.manual_seed(0)
    built = build(name, 5, weights="none")
    size = FAMILY_MEMBERS[name]
    x = torch.randn(2, 3, size, size)
    captured = [[] for _ in built.heads]
    hooks = [h.register_forward_pre_hook(lambda m, args, into=into: into.append(args[0])) for h, into in zip(built.heads, captured, strict=True)]
    with torch.no_grad():
        logits = built.module(x)
        for hook in hooks:
            hook.remove()
        from_head = built.head([c[0].shape[1] for c in captured])(torch.cat([c[0] for c in captured], dim=1))
    assert logits.shape == (2, 5)
    assert len(built.heads) == (2 if "distilled" in name or "levit" in name else 1)
    torch.testing.assert_close(from_head, logits, rtol=1e-5, atol=1e-5)


def test_embedded_default_weights_are_real_imagenet_weights():
    from PIL import Image
    from skimage import data

    from edgetransfer.data import eval_transform

    built = build(DEFAULT_ARCH, None)  # keep the 1000-class ImageNet classifier
    assert built.weights == "embedded" and built.num_classes == 1000
    transform = eval_transform(built.preprocessing)
    batch = torch.stack([transform(Image.fromarray(data.chelsea())), transform(Image.fromarray(data.coffee()))])
    with torch.no_grad():
        top = built.module(batch).softmax(1).argmax(1).tolist()
    assert 281 <= top[0] <= 285, f"chelsea should be a cat (281-285), got class {top[0]}"
    assert top[1] == 967, f"coffee should be espresso (967), got class {top[1]}"


def test_embedded_key_mapping_covers_every_parameter():
    import timm

    state = weights.EMBEDDED[DEFAULT_ARCH].load_state_dict()
    assert set(state) == set(timm.create_model("efficientnet_lite0").state_dict())


def test_torchvision_weights_come_from_the_torch_home_cache(tmp_path, monkeypatch):
    import torchvision.models as tvm

    torch.manual_seed(1)
    reference = tvm.resnet18().state_dict()
    url = tvm.ResNet18_Weights.IMAGENET1K_V1.url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference, cache / url.rsplit("/", 1)[-1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    built = build("resnet18", 4, weights="IMAGENET1K_V1")
    torch.testing.assert_close(built.module.conv1.weight, reference["conv1.weight"])
    assert built.module.fc.out_features == 4
    assert built.preprocessing.input_size == 224 and built.preprocessing.resize_size == 256


def test_missing_torchvision_weights_offline_say_where_to_put_them(tmp_path, monkeypatch):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match=r"cannot get DEFAULT weights for resnet18 .*torch hub cache"):
        build("resnet18", 3)  # resnet18's default weights are torchvision's DEFAULT


def test_local_weights_file_loads_and_a_foreign_one_is_refused(tmp_path):
    torch.manual_seed(2)
    source = build("resnet18", None, weights="none").module
    good = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, good)
    built = build("resnet18", 3, weights=str(good))
    torch.testing.assert_close(built.module.layer4[1].conv2.weight, source.layer4[1].conv2.weight)

    foreign = tmp_path / "mobilenet.pth"
    torch.save(build("mobilenet_v3_small", None, weights="none").module.state_dict(), foreign)
    with pytest.raises(WeightsError, match=r"do not fit resnet18"):
        build("resnet18", 3, weights=str(foreign))
    with pytest.raises(WeightsError, match=r"weights file not found"):
        build("resnet18", 3, weights=str(tmp_path / "nope.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"cannot read .*garbage.pth: it is not a file torch saved"):
        build("resnet18", 3, weights=str(garbage))


def test_unknown_names_get_close_matches():
    with pytest.raises(UnknownNameError, match=r"unknown architecture 'resnet19'.*Did you mean 'resnet18'"):
        build("resnet19", 3)
    with pytest.raises(UnknownNameError, match=r"Did you mean 'timm:efficientnet_lite0'"):
        build("timm:efficientnet_lit0", 3)
    with pytest.raises(UnknownNameError, match=r"weights for resnet18 'IMAGENET_V1'.*IMAGENET1K_V1"):
        build("resnet18", 3, weights="IMAGENET_V1")
    with pytest.raises(WeightsError, match=r"no embedded weights for resnet18"):
        build("resnet18", 3, weights="embedded")
    with pytest.raises(ModelError, match=r"at least 2 classes"):
        build("resnet18", 1, weights="none")


def test_registry_refuses_duplicates():
    existing = models.architecture("resnet18")
    with pytest.raises(ModelError, match="already registered"):
        models.register_architecture(existing)


def test_trunk_blocks_are_in_forward_order_and_skip_the_classifier():
    built = build("resnet18", 3, weights="none")
    blocks = trunk_blocks(built)
    assert blocks[-1] is built.module.layer4[1]
    assert blocks[-2] is built.module.layer4[0]
    assert all(block is not built.heads[0] for block in blocks)
    lite = build(DEFAULT_ARCH, 3, weights="none")
    lite_blocks = trunk_blocks(lite)
    assert isinstance(lite_blocks[-1], nn.ModuleList) and lite_blocks[-1][0] is lite.module.conv_head


def test_image_size_keeps_the_crop_fraction():
    built = build(DEFAULT_ARCH, 3, image_size=64)
    assert built.preprocessing.input_size == 64
    assert built.preprocessing.resize_size == 73  # 64 / 0.875
    assert built.preprocessing.interpolation.value == "bicubic"
