"""TensorRT engines from the run's ONNX variants (imported only when a TensorRT target is asked for).

Written for TensorRT 11 (strongly typed networks: an engine's precision comes from the ONNX
model, an FP16 model for FP16 and a QDQ model for INT8) and kept working on 10.x by asking for a
strongly typed network there too. Beside each engine, a JSON record of the TensorRT, CUDA and
GPU it was built with; :func:`~edgetransfer.backends.tensorrt.check_engine` refuses an engine built for another setup.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..backends.tensorrt import TensorRTRunner, environment, record_path, require
from ..errors import EdgeTransferError
from ..progress import console
from ..rundir import RunDir
from ..runtime.files import write_bytes, write_json
from ..runtime.metadata import ModelInfo
from .context import BuildContext
from .ort_target import build_onnx
from .targets import Precision, Target, TargetSpec, Variant, register

__all__ = ["build_engine", "build_variant"]


def _network_flags(trt) -> int:
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _progress_monitor(trt):
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Monitor(base):
        """Prints build phases as TensorRT reports them, so a long build is never silent."""

        def __init__(self) -> None:
            base.__init__(self)
            self.started = time.perf_counter()

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                console.print(f"  tensorrt: {phase_name} ({num_steps} steps) at {time.perf_counter() - self.started:.0f} s", markup=False)

        def step_complete(self, phase_name, step):
            return True  # keep building

        def phase_finish(self, phase_name):
            pass

    return Monitor()


def build_engine(onnx_path: Path, engine_path: Path, precision, options, info: ModelInfo) -> dict[str, Any]:
    """Build and serialise an engine for ``onnx_path`` with a dynamic-batch profile.

    Raises:
        EdgeTransferError: TensorRT missing, no GPU, or the parser/builder failing (its errors in one line).
    """
    trt = require()
    env = environment()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgeTransferError(f"TensorRT cannot parse {onnx_path.name}: {errors[:400]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    monitor = _progress_monitor(trt)
    if monitor is not None:
        config.progress_monitor = monitor
    _add_profile(builder, config, network, info, options)
    cache_path = Path(options.timing_cache) if options.timing_cache else engine_path.with_name(RunDir.TIMING_CACHE)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    console.print(f"building TensorRT {precision.value} engine for {env['gpu']} (first builds take minutes)", markup=False)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgeTransferError(f"TensorRT could not build an engine from {onnx_path.name}; see its log above")
    write_bytes(engine_path, lambda f: f.write(bytes(serialized)))
    write_bytes(cache_path, lambda f: f.write(bytes(config.get_timing_cache().serialize())))
    record = {
        **env,
        "precision": precision.value,
        "profile": [options.min_batch, options.opt_batch, options.max_batch],
        "workspace_mib": options.workspace_mib,
        "build_s": round(time.perf_counter() - started, 1),
        "timing_cache": cache_path.name,
        "onnx": onnx_path.name,
    }
    write_json(record_path(engine_path), record)
    return record


def _add_profile(builder, config, network, info: ModelInfo, options) -> None:
    tensor = network.get_input(0)
    size = info.preprocessing.input_size
    item = (size, size, 3) if info.input_format == "uint8-nhwc" else (3, size, size)
    profile = builder.create_optimization_profile()
    profile.set_shape(tensor.name, (options.min_batch, *item), (options.opt_batch, *item), (options.max_batch, *item))
    config.add_optimization_profile(profile)


def build_variant(context: BuildContext, target: Target, precision: Precision) -> Variant:
    """A TensorRT engine built from an ONNX model in ``precision`` (TensorRT 11 is strongly typed:
    an FP16 model for FP16, a symmetric QDQ model for INT8), the ONNX model checked on the CPU first."""
    name = f"{target.value}-{precision.value}"
    source = build_onnx(context, target, precision, context.run / f"{name}.onnx")
    engine = context.run / f"{name}.engine"
    record = build_engine(source.path, engine, precision, context.tensorrt, context.info)
    report = source.report
    report.evaluated_on = f"CPUExecutionProvider ({source.path.name}, the ONNX model the engine was built from)"
    report.details.update(record)
    return Variant(name, target, precision, engine, report)


def _runner(path: Path, threads: int | None):
    return TensorRTRunner(path)


register(
    TargetSpec(
        Target.TENSORRT,
        (Precision.FP32, Precision.FP16, Precision.INT8),
        "engine",
        (".engine", ".json"),
        build_variant,
        _runner,
        lambda precisions: require() and None,
        missing_hints={Precision.BF16: "bf16 is built for --target openvino"},
    )
)
