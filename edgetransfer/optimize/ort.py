"""ONNX Runtime variants: offline graph optimisation, FP16 conversion, static INT8 (QDQ)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._enums import Choice
from ..errors import EdgeTransferError
from .calibration import BatchStream
from .cpu import CpuFeatures

__all__ = [
    "CalibMethod",
    "QuantScheme",
    "quant_scheme",
    "optimize_graph",
    "to_fp16",
    "preprocess_for_quantization",
    "calibrate",
    "quantize_qdq",
    "quantize_dynamic",
    "run_logits",
    "copy_metadata",
]

# Ops kept in float32 in FP16 models: they overflow (65504) or lose too much in half precision.
FP16_KEEP_FLOAT = ["Exp", "Pow", "Softmax", "LayerNormalization", "ReduceSum", "ReduceSumSquare", "ReduceL2", "Sqrt"]
CHUNK_BATCHES = 8  # calibrators hold this many batches of activations at a time


class CalibMethod(Choice):
    """How activation ranges are chosen from the calibration data."""

    MINMAX = "minmax"  # the observed range
    ENTROPY = "entropy"  # KL-divergence optimal clipping on a 2048-bin histogram
    PERCENTILE = "percentile"  # clip at the 99.999th percentile of |x|

    @classmethod
    def kind(cls) -> str:
        return "calibration method"

    def ort(self):
        from onnxruntime.quantization import CalibrationMethod

        return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile}[self.value]


@dataclass(frozen=True)
class QuantScheme:
    """Types and options of a static INT8 model, chosen for where it will run."""

    activation: str  # "uint8" or "int8"
    weight: str = "int8"
    per_channel: bool = True
    symmetric_activations: bool = False
    reduce_range: bool = False
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {**self.__dict__, "warnings": list(self.warnings)}


def quant_scheme(target: str, cpu: CpuFeatures) -> QuantScheme:
    """Pick INT8 settings from the target and this CPU's features."""
    if target in ("tensorrt", "ort-trt", "ort-cuda"):
        # TensorRT (and CUDA) want symmetric int8 activations and weights.
        return QuantScheme(activation="int8", symmetric_activations=True)
    if cpu.x86:
        if cpu.int8_fast:
            # VNNI/AMX: u8 activations x s8 weights is the fast path; s8 activations were no faster than FP32.
            return QuantScheme(activation="uint8")
        return QuantScheme(
            activation="uint8",
            reduce_range=True,  # u8s8 without VNNI can saturate 16-bit accumulators
            warnings=(f"this CPU has no VNNI or AMX ({cpu.summary()}); INT8 is unlikely to be faster than FP32 here",),
        )
    warnings = () if cpu.arm_dotprod else (f"no int8 dot-product instructions found on {cpu.summary()}; INT8 may not be faster",)
    return QuantScheme(activation="int8", warnings=warnings)


def copy_metadata(src, dst: Path) -> None:
    """Carry ``metadata_props`` from ``src`` (a path or ModelProto) over to the model at ``dst``."""
    import onnx

    source = src if isinstance(src, onnx.ModelProto) else onnx.load(str(src), load_external_data=False)
    target = onnx.load(str(dst))
    onnx.helper.set_model_props(target, {p.key: p.value for p in source.metadata_props})
    onnx.save_model(target, str(dst))


def optimize_graph(src: Path, dst: Path) -> None:
    """ONNX Runtime's offline graph optimisation (extended level: portable across x86 CPUs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    copy_metadata(src, dst)


def to_fp16(src: Path, dst: Path) -> None:
    """Float16 weights and compute; float32 inputs and outputs; overflow-prone ops kept in float."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=DEFAULT_OP_BLOCK_LIST + FP16_KEEP_FLOAT)
    onnx.save_model(half, str(dst))


def preprocess_for_quantization(src: Path, dst: Path) -> None:
    """ONNX Runtime's quantisation pre-processing: shape inference and fusions (Conv+BN…)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)


def calibrate(model: Path, stream: BatchStream, method: CalibMethod, symmetric: bool, cache: Path) -> Path:
    """Collect activation ranges chunk by chunk and save them as ONNX Runtime's calibration cache.

    Raises:
        EdgeTransferError: no readable calibration image.
    """
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    options: dict = {"symmetric": symmetric}
    if method is not CalibMethod.MINMAX:
        # With quantize_static's defaults the histogram has as many bins as the quantised range
        # and entropy gives minmax's scales; a finer histogram makes both methods real.
        options.update(num_bins=2048, num_quantized_bins=128, percentile=99.999)
    with tempfile.TemporaryDirectory(prefix="edgetransfer-calib-") as tmp:
        calibrator = create_calibrator(
            model, None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=method.ort(), providers=["CPUExecutionProvider"], extra_options=options,
        )
        for chunk in stream.chunks(CHUNK_BATCHES):
            calibrator.collect_data(chunk)
        if stream.used == 0:
            raise EdgeTransferError("no calibration image could be read; check --calib")
        ranges = calibrator.compute_data()
        del calibrator
    save_tensors_data(ranges, cache)
    return cache


def quantize_qdq(model: Path, dst: Path, cache: Path, method: CalibMethod, scheme: QuantScheme, exclude: list[str]) -> None:
    """Static QDQ quantisation with ranges from ``cache``; ``exclude`` nodes stay in float."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    quantize_static(
        model, dst, None,
        quant_format=QuantFormat.QDQ,
        per_channel=scheme.per_channel,
        reduce_range=scheme.reduce_range,
        activation_type=types[scheme.activation],
        weight_type=types[scheme.weight],
        nodes_to_exclude=list(exclude),
        calibrate_method=method.ort(),
        calibration_cache_path=cache,
        extra_options={"ActivationSymmetric": scheme.symmetric_activations, "WeightSymmetric": True},
    )


def quantize_dynamic(model: Path, dst: Path) -> None:
    """Dynamic (weights-only) quantisation: only when asked; usually slower for CNNs."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    ort_quantize_dynamic(model, dst, weight_type=QuantType.QInt8)


def run_logits(model: Path, arrays: np.ndarray, batch: int = 64, threads: int | None = None) -> np.ndarray:
    """Logits of an ONNX model on CPU for prepared inputs, in batches."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    fixed = session.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) else batch
    outputs = []
    for start in range(0, len(arrays), step):
        chunk = arrays[start : start + step]
        count = len(chunk)
        if isinstance(fixed, int) and count < fixed:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - count, axis=0)])
        outputs.append(session.run(None, {name: chunk})[0][:count])
    return np.concatenate(outputs)
