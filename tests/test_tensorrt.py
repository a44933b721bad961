"""The TensorRT engine builder and engine check, with TensorRT's Python API faked at its boundary
(builder, network, parser, config, profile) and torch's CUDA queries faked: our logic (strongly
typed network, optimisation profile, workspace, timing cache, build record, mismatch refusal)
runs on any CPU. The real build is in test_optimize.py, marked gpu."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from edgetransfer.backends import tensorrt as trt_runtime
from edgetransfer.errors import EdgeTransferError, EngineMismatchError, MissingDependencyError
from edgetransfer.export import export_onnx
from edgetransfer.optimize import Precision, QuantOptions, Target, TensorRTOptions, build_variants
from edgetransfer.optimize import tensorrt as trt_build
from edgetransfer.rundir import Manifest
from edgetransfer.runtime.metadata import FLOAT_NCHW, UINT8_NHWC, ModelInfo
from edgetransfer.runtime.preprocessing import Preprocessing

from conftest import copy_run


class FakeTensorRT(types.ModuleType):
    """What TensorRT 11 exposes that our code touches, recording every call."""

    def __init__(
        self, version: str = "11.0.0", strongly_typed: bool = True, parse_errors: tuple[str, ...] = (), engine: bytes | None = b"ENGINE"
    ) -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.calls: list[tuple] = []
        self.parsed: bytes | None = None
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level):
                fake.calls.append(("logger", level))

        class Flags:
            pass

        if strongly_typed:
            Flags.STRONGLY_TYPED = 3

        class MemoryPoolType:
            WORKSPACE = "workspace"

        class IProgressMonitor:
            def __init__(self):
                pass

        class Tensor:
            name = "input"

        class Network:
            def get_input(self, index):
                return Tensor()

        class Parser:
            num_errors = len(parse_errors)

            def __init__(self, network, logger):
                pass

            def parse(self, data):
                fake.calls.append(("parse", len(data)))
                fake.parsed = bytes(data)  # the ONNX model TensorRT was given
                return not parse_errors

            def get_error(self, index):
                return parse_errors[index]

        class Profile:
            def set_shape(self, name, low, opt, high):
                fake.calls.append(("profile", name, low, opt, high))

        class Cache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return b"CACHE:" + self.data

        class Config:
            progress_monitor = None

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("workspace", pool, size))

            def add_optimization_profile(self, profile):
                fake.calls.append(("add_profile",))

            def create_timing_cache(self, data):
                fake.calls.append(("timing_cache_in", bytes(data)))
                return Cache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache

            def get_timing_cache(self):
                return self.cache

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls.append(("network_flags", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build", config.progress_monitor is not None))
                return engine

        self.Logger, self.NetworkDefinitionCreationFlag, self.MemoryPoolType = Logger, Flags, MemoryPoolType
        self.IProgressMonitor, self.OnnxParser, self.Builder = IProgressMonitor, Parser, Builder

    def called(self, name: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == name]


GPU = {"name": "NVIDIA H200", "capability": (9, 0), "cuda": "13.0"}


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch reports one CUDA GPU (an H200 with CUDA 13.0)."""
    pretend_gpu(monkeypatch)


def pretend_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: GPU["name"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: GPU["capability"])
    monkeypatch.setattr(torch.version, "cuda", GPU["cuda"])


def install(monkeypatch, fake: FakeTensorRT) -> FakeTensorRT:
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake


def info(input_format: str = FLOAT_NCHW) -> ModelInfo:
    return ModelInfo(("a", "b"), Preprocessing(96, 110), input_format)


def test_engine_build_uses_a_strongly_typed_network_a_profile_and_the_timing_cache(monkeypatch, fake_gpu, tmp_path):
    trt = install(monkeypatch, FakeTensorRT())
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x" * 123)
    (tmp_path / "tensorrt.timing-cache").write_bytes(b"OLD")
    options = TensorRTOptions(min_batch=1, opt_batch=4, max_batch=8, workspace_mib=512)
    record = trt_build.build_engine(model, tmp_path / "m.engine", Precision.FP16, options, info())
    assert trt.called("network_flags") == [("network_flags", 1 << 3)]  # STRONGLY_TYPED: precision from the model
    assert trt.called("parse") == [("parse", 123)]
    assert trt.called("workspace") == [("workspace", "workspace", 512 << 20)]
    assert trt.called("profile") == [("profile", "input", (1, 3, 96, 96), (4, 3, 96, 96), (8, 3, 96, 96))]
    assert trt.called("timing_cache_in") == [("timing_cache_in", b"OLD")]  # the cache beside the engine is reused
    assert trt.called("build") == [("build", True)]  # with a progress monitor: a long build is never silent
    assert (tmp_path / "m.engine").read_bytes() == b"ENGINE"
    assert (tmp_path / "tensorrt.timing-cache").read_bytes() == b"CACHE:OLD"
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved == record
    assert (record["tensorrt"], record["gpu"], record["compute_capability"], record["cuda"]) == ("11.0.0", "NVIDIA H200", "9.0", "13.0")
    assert record["precision"] == "fp16" and record["profile"] == [1, 4, 8] and record["onnx"] == "m.onnx"


def test_fused_uint8_models_get_an_nhwc_profile_and_tensorrt_10_a_plain_network(monkeypatch, fake_gpu, tmp_path):
    trt = install(monkeypatch, FakeTensorRT(version="10.9.0", strongly_typed=False))
    (tmp_path / "m.onnx").write_bytes(b"x")
    trt_build.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", Precision.INT8, TensorRTOptions(), info(UINT8_NHWC))
    assert trt.called("network_flags") == [("network_flags", 0)]
    assert trt.called("profile") == [("profile", "input", (1, 96, 96, 3), (1, 96, 96, 3), (16, 96, 96, 3))]
    assert trt.called("timing_cache_in") == [("timing_cache_in", b"")]  # no cache yet: an empty one


def test_parser_and_builder_failures_are_one_line_and_write_nothing(monkeypatch, fake_gpu, tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"x")
    install(monkeypatch, FakeTensorRT(parse_errors=("node 3: unsupported op Foo", "node 9: bad shape")))
    with pytest.raises(EdgeTransferError, match=r"^TensorRT cannot parse m.onnx: node 3: unsupported op Foo; node 9: bad shape$"):
        trt_build.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", Precision.FP16, TensorRTOptions(), info())
    install(monkeypatch, FakeTensorRT(engine=None))
    with pytest.raises(EdgeTransferError, match=r"TensorRT could not build an engine from m.onnx"):
        trt_build.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", Precision.FP16, TensorRTOptions(), info())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_an_engine_is_refused_on_another_gpu_or_tensorrt(monkeypatch, fake_gpu, tmp_path):
    install(monkeypatch, FakeTensorRT())
    (tmp_path / "m.onnx").write_bytes(b"x")
    engine = tmp_path / "m.engine"
    trt_build.build_engine(tmp_path / "m.onnx", engine, Precision.FP16, TensorRTOptions(), info())
    assert trt_runtime.check_engine(engine)["gpu"] == "NVIDIA H200"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA L4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (8, 9))
    with pytest.raises(EngineMismatchError, match=r"m.engine was built for gpu NVIDIA H200, this machine has NVIDIA L4; rebuild it here"):
        trt_runtime.check_engine(engine)
    install(monkeypatch, FakeTensorRT(version="11.1.0"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: GPU["name"])
    with pytest.raises(EngineMismatchError, match=r"built for tensorrt 11.0.0, this machine has 11.1.0"):
        trt_runtime.check_engine(engine)
    (tmp_path / "m.json").unlink()
    with pytest.raises(EdgeTransferError, match=r"m.engine has no build record \(m.json\); rebuild it"):
        trt_runtime.check_engine(engine)


def test_no_tensorrt_or_no_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match=r"needs TensorRT, which is not installed: pip install 'edgetransfer\[tensorrt\]'"):
        trt_runtime.require()
    install(monkeypatch, FakeTensorRT())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EdgeTransferError, match=r"TensorRT engines are built on the GPU they run on, and torch sees no CUDA GPU here"):
        trt_runtime.environment()


def test_the_tensorrt_target_builds_records_and_benches_through_the_registry(monkeypatch, trained_run, tmp_path_factory):
    run = copy_run(trained_run, tmp_path_factory, "trt")
    export_onnx(run)  # on the CPU, before torch is told there is a GPU
    pretend_gpu(monkeypatch)
    trt = install(monkeypatch, FakeTensorRT())
    (variant,) = build_variants(
        run, [Target.TENSORRT], [Precision.INT8], QuantOptions(calib_size=16, max_accuracy_drop=100), TensorRTOptions(max_batch=4)
    )
    assert variant.path == run / "tensorrt-int8.engine" and variant.path.read_bytes() == b"ENGINE"
    assert [f.name for f in variant.files] == ["tensorrt-int8.engine", "tensorrt-int8.json"]
    assert variant.report.details["scheme"]["symmetric_activations"]  # TensorRT's INT8: symmetric QDQ
    assert variant.report.accuracy.images == 40 and "tensorrt-int8.onnx" in variant.report.evaluated_on
    assert trt.called("profile")[0][2:] == ((1, 3, 64, 64), (1, 3, 64, 64), (4, 3, 64, 64))
    entry = Manifest.load(run).artifacts["tensorrt-int8"]
    assert entry["kind"] == "engine" and entry["settings"]["target"] == "tensorrt" and entry["settings"]["tensorrt"]["max_batch"] == 4
    from edgetransfer.bench import BenchOptions, bench_run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # bench runs here: the engine is skipped, with the reason
    report = bench_run(run, BenchOptions(batch_sizes=(1,), warmup=0, iterations=1, eval_images=4, variants=("tensorrt-int8",)))
    row = report.row("tensorrt-int8")
    assert row.kind == "engine" and row.status == "skipped" and row.reason == "no CUDA GPU"
