"""The QAT scheme and ModelOpt's fake quantisation: what a target's INT8 kernels compute, the
quantizers put where ONNX Runtime fuses every layer, and a saved QAT model rebuilt for loading."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .config import QAT_TARGETS, Target
from .cpu import CpuFeatures, cpu_features
from .errors import MissingDependencyError, RunError

__all__ = [
    "INSTALL",
    "QatScheme",
    "qat_scheme",
    "scheme_of",
    "load_modelopt",
    "fold_batchnorm",
    "unread_outputs",
    "shared_quantizers",
    "quantize",
    "restore",
    "inplace_off",
]

INSTALL = "pip install 'edgetransfer[qat]'"


@dataclass(frozen=True)
class QatScheme:
    """How weights and activations are quantised for a target on this CPU."""

    weight_levels: int = 127  # largest |int8 weight|: 127 (8 bits) or 63 (7 bits)
    unsigned_activations: bool = False  # uint8 for activations that are never negative
    reasons: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {
            "weights": f"int8 symmetric per channel, |w| <= {self.weight_levels}",
            "activations": "uint8 where never negative, else int8, symmetric per tensor"
            if self.unsigned_activations
            else "int8 symmetric per tensor",
            "reasons": list(self.reasons),
        }


def qat_scheme(target: str, cpu: CpuFeatures) -> QatScheme:
    """The fake quantisation that matches what ``target``'s INT8 kernels compute on ``cpu``."""
    if Target(target).on_gpu:
        return QatScheme(reasons=("TensorRT and CUDA take symmetric int8 activations and weights",))
    reasons = ["uint8 activations where never negative: the CPU runtimes fuse Conv+Clip into an integer convolution then"]
    if cpu.x86 and not cpu.int8_fast:
        reasons.append(f"7-bit weights: this CPU has no VNNI or AMX ({cpu.summary()}) and u8 x s8 pairs saturate 16 bits")
        return QatScheme(weight_levels=63, unsigned_activations=True, reasons=tuple(reasons))
    return QatScheme(unsigned_activations=True, reasons=tuple(reasons))


def load_modelopt():
    """ModelOpt's quantization module, imported quietly.

    Raises:
        MissingDependencyError: ModelOpt is not installed.
    """
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime": fine on a CPU
    warnings.filterwarnings("ignore", message="Cannot find transformers package")  # ModelOpt's LLM export, imported later

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its LLM export plugins warn that transformers is missing
            import modelopt.torch.quantization as mtq  # optional heavy dependency (the qat extra): imported here
    except ImportError:
        raise MissingDependencyError(f"QAT needs NVIDIA ModelOpt, which is not installed: {INSTALL}") from None
    return mtq


def _run_once(module: nn.Module, size: int, hooks: list) -> None:
    """One zero image through ``module`` with ``hooks`` in place; they are removed after."""
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()


def fold_batchnorm(module: nn.Module, size: int) -> int:
    """Fold every BatchNorm that reads a convolution's output alone into that convolution
    (torch's ``fuse_conv_bn_eval``), in place; returns how many. timm's BatchNormAct2d leaves its
    activation (and dropout) in its place. The module must be in eval mode."""
    produced: dict[int, tuple[nn.Conv2d, torch.Tensor]] = {}
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: produced.__setitem__(id(o), (m, o))) for m in module.modules() if isinstance(m, nn.Conv2d)]
    hooks += [
        m.register_forward_hook(lambda m, i, o: pairs.append((produced[id(i[0])][0], m)) if id(i[0]) in produced else None)
        for m in module.modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    _run_once(module, size, hooks)
    readers: dict[int, int] = {}
    for conv, _ in pairs:
        readers[id(conv)] = readers.get(id(conv), 0) + 1
    owners = {id(child): (parent, name) for parent in module.modules() for name, child in parent.named_children()}
    folded = 0
    for conv, bn in pairs:
        if readers[id(conv)] != 1 or id(conv) not in owners or id(bn) not in owners:
            continue
        parent, name = owners[id(conv)]
        setattr(parent, name, fuse_conv_bn_eval(conv, bn))
        parent, name = owners[id(bn)]
        setattr(parent, name, nn.Sequential(cast(nn.Module, bn.drop), cast(nn.Module, bn.act)) if hasattr(bn, "act") else nn.Identity())
        folded += 1
    return folded


def _config(mtq, outputs: Sequence[str] = ()) -> dict:
    """ModelOpt's configuration: weights per output channel and inputs per tensor of every module it
    quantises, and the output quantizers of the ``outputs`` modules (see :func:`unread_outputs`)."""
    return {
        "quant_cfg": [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
            {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8, "axis": None}},
            *({"quantizer_name": f"{name}.output_quantizer", "cfg": {"num_bits": 8, "axis": None}} for name in outputs),
        ],
        "algorithm": "max",
    }


def _quantizers(module: nn.Module, kind: str) -> dict[str, Any]:
    from modelopt.torch.quantization.nn import TensorQuantizer  # optional heavy dependency (the qat extra)

    return {
        name: getattr(m, kind)
        for name, m in module.named_modules()
        if isinstance(getattr(m, kind, None), TensorQuantizer) and getattr(m, kind).is_enabled
    }


# Modules that pass a tensor on without a quantizer of their own and whose effect a QuantizeLinear
# after them makes redundant or leaves unchanged: an activation clipped at zero (and six) before an
# unsigned quantizer, the identity, dropout in eval mode, flattening.
_PASSING = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Flatten)
_KEEPING = (nn.Identity, nn.Dropout, nn.Flatten)  # ... and of those, the ones that change no value (in eval mode)


def unread_outputs(module: nn.Module, size: int) -> list[str]:
    """The quantised convolutions and linear layers whose output, followed through the modules that
    only pass it on (:data:`_PASSING`), no quantizer reads: a projection that feeds a residual Add,
    a layer that feeds a functional operation; not the layer that writes the model's output. ONNX Runtime runs a convolution in int8 only when a
    QuantizeLinear reads its output, so these get an output quantizer of their own.

    Found on a quantised copy of ``module`` (BatchNorm folded, eval mode), which one zero image
    runs through; ``module`` is left as it was.
    """
    mtq = load_modelopt()
    probe = copy.deepcopy(module).eval()
    zeros = torch.zeros(1, 3, size, size)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        mtq.quantize(probe, _config(mtq), lambda model: model(zeros))
    modules = dict(probe.named_modules())
    names = {id(m): name for name, m in modules.items()}
    layers = {id(modules[name]) for name in _quantizers(probe, "weight_quantizer")}
    readers = {id(modules[name]) for name in _quantizers(probe, "input_quantizer")}
    made_by: dict[int, int] = {}  # id(tensor) -> id(the quantised layer whose output it is)
    read: set[int] = set()
    alive: list[torch.Tensor] = []  # kept so that no tensor's id is reused during the pass

    def record(m: nn.Module, args: tuple, out: Any) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        alive.extend(t for t in (x, out) if isinstance(t, torch.Tensor))
        if x is not None and id(m) in readers and id(x) in made_by:
            read.add(made_by[id(x)])
        if not isinstance(out, torch.Tensor):
            return
        if id(m) in layers:
            made_by[id(out)] = id(m)
        elif isinstance(m, _PASSING) and x is not None and id(x) in made_by:
            made_by[id(out)] = made_by[id(x)]

    hooks = [m.register_forward_hook(record) for m in probe.modules()]
    try:
        with torch.no_grad():
            result = probe(zeros)
    finally:
        for hook in hooks:
            hook.remove()
    if id(result) in made_by:
        read.add(made_by[id(result)])  # the logits stay float: nothing in the graph reads them
    return sorted(names[layer] for layer in layers - read)


def shared_quantizers(module: nn.Module, size: int) -> list[tuple[str, str]]:
    """(producer, reader) module names: ``reader``'s input quantizer is to be applied where
    ``producer`` writes that input, so that every reader of the tensor, the functional ones
    included (the shortcut of a residual Add), reads the same quantised value, and the model
    trains on what the exported graph computes. Quantising again at the reader then changes
    nothing (fake quantisation is idempotent at one scale), and ONNX Runtime drops the repeated
    pair. The producer is the innermost module that returned the tensor and runs once per
    forward (a module called twice, such as torchvision's shared ReLU, cannot carry the hook),
    moved back past a flatten or identity, so that a pooling before the flatten fuses too.
    ``module`` is quantised (its readers have input quantizers); one zero image runs through it."""
    from modelopt.torch.quantization.nn import TensorQuantizer  # optional heavy dependency (the qat extra)

    modules = dict(module.named_modules())
    names = {id(m): name for name, m in modules.items()}
    readers = {id(modules[name]) for name in _quantizers(module, "input_quantizer")}
    quantizers = {id(m) for m in modules.values() if isinstance(m, TensorQuantizer)}
    calls: dict[int, int] = {}
    took: dict[int, int] = {}  # id(module) -> id(its input), for the modules that keep values as they are
    returned_by: dict[int, list[int]] = {}  # id(tensor) -> ids of the modules that returned it, innermost first
    read: list[tuple[int, int]] = []  # (id(reader), id(its input))
    alive: list[torch.Tensor] = []

    def before(m: nn.Module, args: tuple) -> None:
        if id(m) in readers and args and isinstance(args[0], torch.Tensor):
            read.append((id(m), id(args[0])))
            alive.append(args[0])

    def after(m: nn.Module, args: tuple, out: Any) -> None:
        calls[id(m)] = calls.get(id(m), 0) + 1
        if isinstance(m, _KEEPING) and args and isinstance(args[0], torch.Tensor):
            took[id(m)] = id(args[0])
        if isinstance(out, torch.Tensor):
            alive.append(out)
            returned_by.setdefault(id(out), []).append(id(m))

    hooks = [m.register_forward_pre_hook(before) for m in module.modules()]
    hooks += [m.register_forward_hook(after) for m in module.modules()]
    _run_once(module, size, hooks)

    def producer_of(tensor: int) -> int | None:
        return next((m for m in returned_by.get(tensor, []) if calls.get(m) == 1 and m != id(module) and m not in quantizers), None)

    pairs = []
    for reader, tensor in read:
        producer = producer_of(tensor)
        while producer in took and producer_of(took[producer]) is not None:  # quantise before a flatten: the pooling fuses
            producer = producer_of(took[producer])
        if producer is not None and calls.get(reader) == 1:
            pairs.append((names[producer], names[reader]))
    return pairs


def _share(module: nn.Module, pairs: Sequence[tuple[str, str]]) -> None:
    """Apply each reader's input quantizer at its producer's output (see :func:`shared_quantizers`).

    Raises:
        RunError: a name that is not a module of ``module`` (a record from another model).
    """
    modules = dict(module.named_modules())
    for producer, reader in pairs:
        if producer not in modules or reader not in modules or not hasattr(modules[reader], "input_quantizer"):
            raise RunError(f"the checkpoint's QAT record names a layer {producer!r} or {reader!r} this model does not have; run the QAT again")
        modules[producer].register_forward_hook(lambda m, args, out, quantizer=modules[reader].input_quantizer: quantizer(out))


def quantize(module: nn.Module, scheme: QatScheme, batches: list[torch.Tensor]) -> dict[str, Any]:
    """Insert fake quantisation into ``module`` (BatchNorm already folded) and calibrate its ranges
    on ``batches``; returns what was done, for the checkpoint and the manifest."""
    mtq = load_modelopt()
    outputs = unread_outputs(module, batches[0].shape[-1]) if batches else []
    lows: dict[str, float] = {}

    def low(key: str, tensor: torch.Tensor) -> None:
        lows[key] = min(lows.get(key, 0.0), float(tensor.min()))

    def calibrate(model: nn.Module) -> None:
        hooks = []
        for name, m in model.named_modules():
            if "input_quantizer" in dict(m.named_children()):
                hooks.append(m.register_forward_pre_hook(lambda m, args, name=name: low(f"{name}.input", args[0])))
            if name in outputs:
                hooks.append(m.register_forward_hook(lambda m, args, out, name=name: low(f"{name}.output", out)))
        try:
            for batch in batches:
                model(batch)
        finally:
            for hook in hooks:
                hook.remove()

    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        mtq.quantize(module, _config(mtq, outputs), calibrate)
    nonnegative = [key for key, value in lows.items() if value >= 0]
    record = _apply_scheme(module, scheme, nonnegative)
    shared = shared_quantizers(module, batches[0].shape[-1]) if batches else []
    _share(module, shared)
    return {**record, "output_quantizers": outputs, "shared_quantizers": [list(pair) for pair in shared]}


def _apply_scheme(module: nn.Module, scheme: QatScheme, nonnegative: list[str]) -> dict[str, Any]:
    """The scheme's weight levels and unsigned activations, on a calibrated module. ``nonnegative``:
    ``NAME.input`` or ``NAME.output`` for each quantizer whose calibration values were never negative."""
    weights = _quantizers(module, "weight_quantizer")
    if scheme.weight_levels != 127:
        for quantizer in weights.values():
            quantizer.amax = quantizer.amax * (127.0 / scheme.weight_levels)
    unsigned: dict[str, list[str]] = {"input": [], "output": []}
    if scheme.unsigned_activations:
        for kind in unsigned:
            quantizers = _quantizers(module, f"{kind}_quantizer")
            for key in nonnegative:
                name, _, which = key.rpartition(".")
                if which == kind and name in quantizers:
                    quantizers[name].unsigned = True
                    unsigned[kind].append(name)
    return {
        "layers": len(weights),
        "unsigned_inputs": sorted(unsigned["input"]),
        "unsigned_outputs": sorted(unsigned["output"]),
        "scheme": scheme.to_dict(),
        "weight_levels": scheme.weight_levels,
    }


def restore(built, payload: dict[str, Any]) -> None:
    """Rebuild a QAT checkpoint's module in ``built`` (freshly built, float): fold BatchNorm, insert
    the quantizers and load the saved weights and ranges.

    Raises:
        RunError: the checkpoint's QAT record is not one this version reads.
    """
    record = payload.get("qat")
    if not isinstance(record, dict) or not isinstance(record.get("unsigned_inputs"), list):
        raise RunError("the checkpoint's QAT record is unreadable; run the QAT again")
    # records made before output and shared quantizers have neither: the model is rebuilt as it trained
    outputs, unsigned_outputs = record.get("output_quantizers", []), record.get("unsigned_outputs", [])
    shared = record.get("shared_quantizers", [])
    if not all(isinstance(v, list) for v in (outputs, unsigned_outputs, shared)) or not all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(n, str) for n in pair) for pair in shared
    ):
        raise RunError("the checkpoint's QAT record is unreadable; run the QAT again")
    module = built.module.eval()
    fold_batchnorm(module, built.preprocessing.input_size)
    inplace_off(module)
    mtq = load_modelopt()
    zeros = torch.zeros(1, 3, built.preprocessing.input_size, built.preprocessing.input_size)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        mtq.quantize(module, _config(mtq, outputs), lambda model: model(zeros))  # ranges come from the state below
    for kind, names in (("input", record["unsigned_inputs"]), ("output", unsigned_outputs)):
        quantizers = _quantizers(module, f"{kind}_quantizer")
        for name in names:
            if name not in quantizers:
                raise RunError(f"the checkpoint's QAT record names a layer {name!r} this model does not have; run the QAT again")
            quantizers[name].unsigned = True
    _share(module, [tuple(pair) for pair in shared])


def inplace_off(module: nn.Module) -> None:
    """In-place activations would change a quantizer's input after it was read."""
    for m in module.modules():
        if hasattr(m, "inplace"):
            setattr(m, "inplace", False)  # noqa: B010  (an attribute of some activations only)


def scheme_of(record: dict[str, Any]) -> QatScheme:
    """The scheme a QAT record was trained with (its activation types depend on the target alone).

    Raises:
        RunError: the record names no target.
    """
    target = record.get("options", {}).get("target") if isinstance(record.get("options"), dict) else None
    if target not in QAT_TARGETS:
        raise RunError("the checkpoint's QAT record names no target; run the QAT again")
    return qat_scheme(target, cpu_features())
