"""What training computes in and its layout: bf16 autocast only on a CPU with native bf16 (read
from the CPU, faked here), fp16 on CUDA, FP32 with --no-amp; channels-last on a CPU, depthwise
convolutions in FP32 under bf16, the model handed back as built; the C allocator keeping freed
blocks while training (glibc)."""

from __future__ import annotations

import ctypes
import os
import platform

import pytest
import torch

from edgetransfer.checkpoint import load_checkpoint
from edgetransfer.config import FinetuneConfig
from edgetransfer.cpu import CpuFeatures, cpu_features
from edgetransfer.data import DataSpec, eval_transform, load_dataset
from edgetransfer.finetune import finetune
from edgetransfer.train.allocator import kept_blocks
from edgetransfer.train.loops import autocast_for, cpu_layout, default_form, depthwise_fp32, image_loader, precision_for

AVX2 = CpuFeatures("an AVX2 EPYC", "x86_64", avx2=True)
ZEN4 = CpuFeatures("a Zen 4 EPYC", "x86_64", avx2=True, avx512=True, vnni=True, bf16=True)
CPU = torch.device("cpu")


def test_bf16_only_where_the_cpu_has_it():
    assert precision_for(CPU, True, AVX2) == "fp32"  # emulated bf16 is slower than FP32: not used
    assert precision_for(CPU, True, ZEN4) == "bf16"
    assert precision_for(CPU, False, ZEN4) == "fp32"  # --no-amp
    assert precision_for(torch.device("cuda"), True, AVX2) == "fp16"
    assert precision_for(torch.device("cuda"), False, ZEN4) == "fp32"


def test_the_cpus_bf16_flags_are_read():
    base = "processor : 0\nmodel name : X\nflags : fpu avx2 avx512f {}\n"
    assert cpu_features(base.format("avx512_bf16")).bf16
    assert cpu_features(base.format("amx_bf16 amx_tile")).bf16
    assert not cpu_features(base.format("avx512_vnni")).bf16
    assert "bf16" in cpu_features(base.format("avx512_bf16")).summary()


def test_autocast_follows_the_precision(monkeypatch):
    import edgetransfer.train.loops as loops

    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    monkeypatch.setattr(loops, "_this_cpu", lambda: ZEN4)
    with autocast_for(CPU, True):
        assert layer(x).dtype == torch.bfloat16
    monkeypatch.setattr(loops, "_this_cpu", lambda: AVX2)
    with autocast_for(CPU, True):
        assert layer(x).dtype == torch.float32


def test_cpu_batches_go_channels_last_and_nothing_else_changes():
    images = torch.randn(2, 3, 8, 8)
    moved = cpu_layout(images)
    assert moved.is_contiguous(memory_format=torch.channels_last) and torch.equal(moved, images)
    features = torch.randn(2, 5)
    assert cpu_layout(features) is features


def test_depthwise_convolutions_compute_in_fp32_under_bf16_autocast_and_are_handed_back():
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1), torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.Conv2d(8, 4, 1))
    seen: dict[str, torch.dtype] = {}
    for name, layer in model.named_children():
        layer.register_forward_hook(lambda layer, inputs, out, name=name: seen.__setitem__(name, out.dtype))
    x = torch.randn(2, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(x)
    assert depthwise_fp32(model) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(x)
    assert seen == {"0": torch.bfloat16, "1": torch.float32, "2": torch.bfloat16}
    assert mixed.shape == plain.shape and float((mixed.float() - plain.float()).abs().max().detach()) < 0.1  # bf16 rounding apart
    model.to(memory_format=torch.channels_last)
    default_form(model)
    assert not any("forward" in layer.__dict__ for layer in model.modules())
    assert model[1].weight.is_contiguous()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert seen["1"] == torch.bfloat16


@pytest.mark.parametrize("cpu", [ZEN4, AVX2], ids=["bf16 CPU", "AVX2 CPU"])
def test_full_training_records_its_precision_layout_and_allocator(monkeypatch, tmp_path, cpu):
    import edgetransfer.train.loops as loops

    monkeypatch.setattr(loops, "_this_cpu", lambda: cpu)  # bf16 is emulated where the CPU lacks it: slower, same code
    config = FinetuneConfig(data=DataSpec(limit_per_class=4), mode="full", epochs=1, probe_epochs=0, image_size=32, batch_size=16)
    result = finetune(config, tmp_path / "run")
    metrics = result.metrics
    assert metrics["precision"] == ("bf16" if cpu.bf16 else "fp32") and metrics["layout"] == "channels-last"
    assert metrics["depthwise_fp32"] is cpu.bf16
    glibc = platform.libc_ver()[0] == "glibc" and platform.system() == "Linux"
    assert metrics["allocator"] == {"allocator": "glibc" if glibc else "other", "kept_blocks": glibc}
    assert metrics["evaluated_in"] == "fp32"  # what the exported model computes
    built, _ = load_checkpoint(result.run_dir / "model.pt")
    assert not any("forward" in layer.__dict__ for layer in built.module.modules())
    val = load_dataset(config.data).val
    with torch.no_grad():
        logits = torch.cat([built.module.eval()(x) for x, _ in image_loader(val, eval_transform(built.preprocessing), result.config, False)])
    right = int((logits.argmax(1) == torch.tensor([s.label for s in val])).sum())
    assert metrics["final"]["top1"] == right / len(val)  # the reported top-1 is the FP32 model's


def resident() -> int:
    """This process's resident memory in bytes (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or platform.system() != "Linux", reason="the C allocator's settings are glibc's")
def test_freed_blocks_are_kept_while_training_and_handed_back_after():
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc older than 2.33 has no mallinfo2 to read the heap")

    class Info(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
        ]

    libc.mallinfo2.restype = Info
    block = 64 << 20
    with kept_blocks() as kept:
        assert kept.record["kept_blocks"]
        before = libc.mallinfo2()
        data = torch.empty(block, dtype=torch.uint8)
        data.fill_(1)
        inside = libc.mallinfo2()
        del data
        freed, kept_rss = libc.mallinfo2(), resident()
    after = resident()
    assert inside.hblkhd - before.hblkhd < block  # from the heap, not a fresh mmap
    assert freed.fordblks >= block  # ... and kept there, free for the next step
    assert kept_rss - after > block // 2  # its pages handed back to the system after
