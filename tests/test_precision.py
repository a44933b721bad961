"""What training computes in and its layout: bf16 autocast only on a CPU with native bf16 (read
from the CPU, faked here), fp16 on CUDA, FP32 with --no-amp; channels-last on a CPU, with the
model handed back in its default layout."""

from __future__ import annotations

import torch

from edgetransfer.cpu import CpuFeatures, cpu_features
from edgetransfer.train.loops import autocast_for, cpu_layout, precision_for

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
