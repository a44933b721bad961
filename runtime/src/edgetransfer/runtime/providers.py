"""Which execution provider a model runs on, and the session object the Predictor uses.

ONNX Runtime drops providers it cannot load without a word (CUDA without its libraries); this
module asks for providers by short names, checks what the session really got, probes a provider
on the smallest model, and keeps TensorRT's engine cache beside the model. The session itself is
opened by :func:`edgetransfer.runtime.sessions.open_session`, as everywhere in edgetransfer.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import PredictorError, first_line
from .metadata import PREPROCESSING_KEYS
from .openvino_ir import OpenVinoSession
from .sessions import fixed_batch, mixed_builds, open_session, over_memory_cap
from .text import printable

__all__ = [
    "PROVIDER_ALIASES",
    "PROBE_MODEL",
    "provider_name",
    "OrtSession",
    "check_servable",
    "openvino_session",
    "probe_provider",
    "check_providers",
]

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
}


# y = Identity(x), float[1], opset 13, IR 8: the smallest model a provider can be tried on, as
# serialised bytes so that the runtime needs no onnx package (a test rebuilds it with onnx.helper)
PROBE_MODEL = (
    b'\x08\x08\x12\x00:;\n\x10\n\x01x\x12\x01y"\x08Identity\x12\x05probeZ\x0f\n\x01x\x12\n\n\x08\x08\x01\x12\x04'
    b"\n\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\r"
)


def provider_name(name: str) -> str:
    return PROVIDER_ALIASES.get(name.lower(), name)


class OrtSession:
    """An ONNX Runtime session behind the small surface Predictor uses (shared with OpenVINO's)."""

    def __init__(self, model, wanted: list[str], threads: int | None, spinning: bool, timeout: float | None = None) -> None:
        import onnxruntime as ort  # imported when a session is made: a broken install (two builds at once) must not stop the runtime saying so

        self.timeout = timeout
        self._run_options = ort.RunOptions

        self.wanted = wanted
        self.session = _ort_session(ort, model, wanted, threads, spinning)
        self.providers = list(self.session.get_providers())
        self.props = dict(self.session.get_modelmeta().custom_metadata_map)
        check_servable(self.session)
        first, output = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name, self.output_name = first.name, output.name
        self.uint8_input = "uint8" in first.type
        self.input_shape = [d if isinstance(d, int) else None for d in first.shape]
        self.fixed_batch = fixed_batch(self.session)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_widths = {o.name: o.shape[-1] for o in self.session.get_outputs() if isinstance(o.shape[-1], int)}
        classes = output.shape[-1]
        self.classes = classes if isinstance(classes, int) else None
        meta = self.session.get_modelmeta()
        self.signature = {
            kind: [{"name": a.name, "type": a.type, "shape": list(a.shape)} for a in arguments]
            for kind, arguments in (("inputs", self.session.get_inputs()), ("outputs", self.session.get_outputs()))
        }
        self.provenance = {
            "producer": meta.producer_name,
            **{k: v for k, v in self.props.items() if k not in PREPROCESSING_KEYS},
        }

    def run(self, chunk: np.ndarray) -> np.ndarray:
        return self.run_output(self.output_name, chunk)

    def run_output(self, name: str, chunk: np.ndarray) -> np.ndarray:
        """Output ``name`` for ``chunk``; a run longer than ``timeout`` seconds is stopped (ONNX
        Runtime's ``RunOptions.terminate``, set from a timer thread) and refused.

        Raises:
            PredictorError: the run did not finish within ``timeout``, or asked for more memory
                than the process's cap (:func:`~edgetransfer.runtime.sessions.cap_memory`).
        """
        options = self._run_options()
        timer = None
        if self.timeout is not None:
            timer = threading.Timer(self.timeout, setattr, (options, "terminate", True))
            timer.daemon = True
            timer.start()
        try:
            return self.session.run([name], {self.input_name: chunk}, options)[0]
        except Exception as exc:
            if options.terminate:
                raise PredictorError(
                    f"the model did not finish within {self.timeout:g} s and was stopped; a model that runs this long is broken"
                    " or hostile (give a longer timeout if it is only slow)"
                ) from exc
            refused = over_memory_cap(exc)
            if refused:
                raise PredictorError(refused) from exc
            raise
        finally:
            if timer is not None:
                timer.cancel()


def check_servable(session) -> None:
    """A model the Predictor can serve: one float or uint8 image input (N×3×H×W, or N×H×W×3
    with the preprocessing inside) and a float logits output (N×classes) first, as edgetransfer
    exports them (a prototype model adds its features).

    Raises:
        PredictorError: naming what the model has instead.
    """
    inputs, outputs = session.get_inputs(), session.get_outputs()
    expected = "one float or uint8 image input (N×3×H×W or N×H×W×3) and a float logits output (N×classes)"
    problem = None
    if len(inputs) != 1:
        problem = f"{len(inputs)} inputs"
    elif inputs[0].type not in ("tensor(float)", "tensor(uint8)") or len(inputs[0].shape) != 4:
        problem = f"an input of type {inputs[0].type} and rank {len(inputs[0].shape)}"
    elif not outputs or outputs[0].type != "tensor(float)" or len(outputs[0].shape) != 2:
        problem = "no output" if not outputs else f"a first output of type {outputs[0].type} and rank {len(outputs[0].shape)}"
    if problem:
        raise PredictorError(f"this model cannot be served: it has {printable(problem)}, and edgetransfer runs models with {expected}")


def openvino_session(xml: Path, providers: Sequence[str] | None, device: str, threads: int | None):
    """An OpenVINO IR's session on ``device``; ONNX Runtime providers do not apply to it."""
    wanted = [provider_name(p) for p in providers or []]
    if any(p not in ("OpenVINOExecutionProvider", "CPUExecutionProvider") for p in wanted):
        raise PredictorError(
            f"{xml.name} is an OpenVINO model: it runs on OpenVINO devices, not ONNX Runtime providers"
            f" ({', '.join(wanted)}); pass device='CPU', 'GPU' or 'AUTO' instead"
        )

    return OpenVinoSession(xml, device, threads)


def _ort_session(ort, model, wanted: list[str], threads: int | None, spinning: bool):
    mixed = mixed_builds()
    if mixed:
        warnings.warn(mixed, RuntimeWarning, stacklevel=4)
    available = ort.get_available_providers()
    missing = [p for p in wanted if p not in available]
    if missing:
        raise PredictorError(
            f"provider {missing[0]} is not in this onnxruntime build (available: {', '.join(available)});"
            " install onnxruntime-gpu for CUDA/TensorRT, or ask for 'cpu'"
        )
    if any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in wanted):
        _preload_gpu_libraries(ort)
    session_providers: list = [_with_options(p, model) for p in wanted]
    if "CPUExecutionProvider" not in wanted:
        session_providers.append("CPUExecutionProvider")
    return open_session(model, session_providers, threads, spinning)


def _with_options(provider: str, model) -> str | tuple[str, dict]:
    """TensorRT through ONNX Runtime builds engines on first use: keep them (and the timing
    cache) beside the model so the next start takes seconds, not minutes."""
    if provider != "TensorrtExecutionProvider":
        return provider
    folder = (Path.home() / ".cache" / "edgetransfer") if isinstance(model, bytes) else Path(model).parent
    cache = folder / "ort-trt-cache"
    cache.mkdir(parents=True, exist_ok=True)
    return provider, {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
    }


def _preload_gpu_libraries(ort) -> None:
    """Let onnxruntime-gpu find CUDA and cuDNN installed as nvidia-* wheels (torch's, say)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception:  # nothing to preload: the session reports what it could not load
            pass


def probe_provider(provider: str) -> str | None:
    """Whether a session really gets ``provider`` here: ``None`` if it does, else the reason.

    onnxruntime-gpu lists CUDA and TensorRT on machines without a GPU; only a session built with
    them tells the truth.
    """
    import onnxruntime as ort  # imported when a session is made: a broken install (two builds at once) must not stop the runtime saying so

    name = provider_name(provider)
    if name not in ort.get_available_providers():
        return f"{name} is not in this onnxruntime build"
    if name in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        _preload_gpu_libraries(ort)
    try:
        session = open_session(PROBE_MODEL, [name, "CPUExecutionProvider"], threads=1)
    except Exception as exc:
        return f"{name} failed to start: {first_line(exc, 200)}"
    if session.get_providers()[0] != name:
        return f"{name} is listed but could not load (CUDA, cuDNN or the GPU are missing)"
    return None


def check_providers(wanted: list[str], actual: list[str], allow_fallback: bool) -> str | None:
    """ONNX Runtime silently drops providers it cannot load (CUDA without its libraries);
    only the session's own list tells the truth."""
    if wanted[0] in actual:
        return None
    message = (
        f"asked for {wanted[0]} but the session runs on {actual[0]} (its libraries or device are missing: check CUDA/cuDNN/TensorRT and the GPU)"
    )
    if not allow_fallback:
        raise PredictorError(message + "; pass allow_fallback=True to accept that")
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return message
