"""Quantisation-aware fine-tuning: ``edgetransfer finetune --from RUN --qat``.

Post-training INT8 leaves some loss on small, depthwise-heavy models whatever the calibration.
Here a finished run's float weights are fine-tuned for a few epochs with INT8 fake quantisation
in the graph, so that they learn to live with the rounding the target's INT8 kernels apply, and
the result is exported as a QDQ ONNX model that every INT8 target takes as it is.

**Library: NVIDIA ModelOpt** (``modelopt.torch.quantization``). It swaps ``Conv2d`` and
``Linear`` for versions with a weight quantizer (per output channel) and an input quantizer (per
tensor), calibrates their ranges in one pass, trains with the straight-through estimator, and
exports each quantizer as a ``QuantizeLinear``/``DequantizeLinear`` pair. Measured on the demo
model (EfficientNet-Lite0 head, 64 px, test split of 179 images) against NNCF's PyTorch QAT,
which edgetransfer already uses for OpenVINO PTQ:

- the exported model against the fake-quantised PyTorch model it came from, ONNX Runtime with
  graph optimisation off (the QDQ graph's reference semantics): ModelOpt agrees on 98.3% of the
  images (max logit difference 0.86), NNCF on 95.0%;
- ModelOpt's fake quantisation is plain PyTorch (no C++ extension to compile on first use, which
  timed out under load with NNCF), and calibration takes 1.6 s.

**Scheme** (:func:`qat_scheme`): symmetric per-channel int8 weights and per-tensor int8
activations, as TensorRT and ONNX Runtime CUDA take them. For ONNX Runtime and OpenVINO on a CPU
two changes follow from how their kernels run:

- an activation that is never negative (after ReLU or ReLU6) is quantised unsigned (uint8, zero
  point 0). ONNX Runtime then sees that the Clip before the QuantizeLinear changes nothing and
  fuses the convolution into a ``QLinearConv``: 35 of the demo model's 49 convolutions, against 2
  with signed activations;
- on an x86 CPU without VNNI or AMX, weights use 7 bits (-63..63), as ONNX Runtime's
  ``reduce_range`` and NNCF's overflow fix do: u8 x s8 products summed in pairs saturate 16 bits
  otherwise. With 8-bit weights on such a CPU the exported model agreed with PyTorch on 48% of
  the images under ONNX Runtime and 28% under OpenVINO; with 7 bits, 96% and 94% before training.

BatchNorm is folded into the convolutions first (torch's ``fuse_conv_bn_eval``), so that the
weights trained are the weights the integer kernels use.

**The child run** (``RUN/qat-<target>`` by default) is a run directory of its own: the parent's
``config.json`` (same data, same split) with a ``qat`` section, ``model.pt`` (the fake-quantised
model: folded float weights and the quantizers' ranges), ``metrics.json``, ``model.onnx`` (the QDQ
model, checked against PyTorch) and a manifest that names the parent run and its checkpoint's
sha256. The parent's manifest records the child as ``qat-<target>``. ``edgetransfer export CHILD
--target ... --precision int8`` ships the QDQ model as it is (nothing is quantised twice) and
measures it against the parent's float model.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._io import read_json, write_bytes, write_json
from .checkpoint import safe_load
from .config import QAT_TARGETS, QatOptions
from .cpu import CpuFeatures, cpu_features
from .errors import MissingDependencyError, RunError
from .optimize.qdq import complete_placement
from .progress import console
from .rundir import RunDir, now

LAST = RunDir.LAST

__all__ = ["QatOptions", "QatScheme", "QatResult", "qat_scheme", "fold_batchnorm", "quantize", "restore", "run_qat",
           "resume_qat", "parent_onnx", "QAT_TARGETS", "QDQ_FLOOR_FACTOR", "qdq_limit", "verify_qdq", "export_qdq", "logits_of"]

INSTALL = "pip install 'edgetransfer[qat]'"

# How far the exported QDQ model may be from the fake-quantised PyTorch model: this many times
# as far as that model is from itself when only its float arithmetic changes (float64 instead of
# float32), plus 1e-3 of the largest logit. Both compute the same integer grid, but not in the
# same float order, and a rounding tie that falls the other way moves one activation by a whole
# quantisation step, which the following layers carry on; so the two cannot agree to 1e-4 as a
# float export does, and how far they drift depends on the model's margins. Measured: on the
# demo model ONNX Runtime's integer kernels differed by at most 1.19 in the logits where float64
# moved the model by 0.89 (ratio 1.3), and on a 120-image run by 0.45 where float64 moved it by
# 0.45; the top-1 changed for 1-2% and 5-7% of the images, float64 alone 1% and 5-7%. A broken
# export is far outside: 8-bit weights on a CPU without VNNI differed by 9.8 (11x).
QDQ_FLOOR_FACTOR = 3.0
PARITY_IMAGES = 512  # validation images the QDQ export is checked on (all of them, up to this)


@dataclass(frozen=True)
class QatScheme:
    """How weights and activations are quantised for a target on this CPU."""

    weight_levels: int = 127  # largest |int8 weight|: 127 (8 bits) or 63 (7 bits)
    unsigned_activations: bool = False  # uint8 for activations that are never negative
    reasons: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {"weights": f"int8 symmetric per channel, |w| <= {self.weight_levels}",
                "activations": "uint8 where never negative, else int8, symmetric per tensor" if self.unsigned_activations
                else "int8 symmetric per tensor", "reasons": list(self.reasons)}


def qat_scheme(target: str, cpu: CpuFeatures) -> QatScheme:
    """The fake quantisation that matches what ``target``'s INT8 kernels compute on ``cpu``."""
    if target in ("tensorrt", "ort-cuda", "ort-trt"):
        return QatScheme(reasons=("TensorRT and CUDA take symmetric int8 activations and weights",))
    reasons = ["uint8 activations where never negative: the CPU runtimes fuse Conv+Clip into an integer convolution then"]
    if cpu.x86 and not cpu.int8_fast:
        reasons.append(f"7-bit weights: this CPU has no VNNI or AMX ({cpu.summary()}) and u8 x s8 pairs saturate 16 bits")
        return QatScheme(weight_levels=63, unsigned_activations=True, reasons=tuple(reasons))
    return QatScheme(unsigned_activations=True, reasons=tuple(reasons))


@dataclass
class QatResult:
    run_dir: Path
    metrics: dict[str, Any]


def _mtq():
    import warnings

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime": fine on a CPU
    warnings.filterwarnings("ignore", message="Cannot find transformers package")  # ModelOpt's LLM export, imported later

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its LLM export plugins warn that transformers is missing
            import modelopt.torch.quantization as mtq
    except ImportError:
        raise MissingDependencyError(f"QAT needs NVIDIA ModelOpt, which is not installed: {INSTALL}") from None
    return mtq


def fold_batchnorm(module: nn.Module, size: int) -> int:
    """Fold every BatchNorm that reads a convolution's output alone into that convolution
    (torch's ``fuse_conv_bn_eval``), in place; returns how many. timm's BatchNormAct2d leaves its
    activation (and dropout) in its place. The module must be in eval mode."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    produced: dict[int, tuple[nn.Conv2d, torch.Tensor]] = {}
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: produced.__setitem__(id(o), (m, o))) for m in module.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(lambda m, i, o: pairs.append((produced[id(i[0])][0], m)) if id(i[0]) in produced else None)
              for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
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
        setattr(parent, name, nn.Sequential(bn.drop, bn.act) if hasattr(bn, "act") else nn.Identity())
        folded += 1
    return folded


def _config(mtq, outputs: Sequence[str] = ()) -> dict:
    """ModelOpt's configuration: weights per output channel and inputs per tensor of every module it
    quantises, and the output quantizers of the ``outputs`` modules (see :func:`unread_outputs`)."""
    return {"quant_cfg": [{"quantizer_name": "*", "enable": False},
                          {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
                          {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8, "axis": None}},
                          *({"quantizer_name": f"{name}.output_quantizer", "cfg": {"num_bits": 8, "axis": None}} for name in outputs)],
            "algorithm": "max"}


def _quantizers(module: nn.Module, kind: str) -> dict[str, Any]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {name: getattr(m, kind) for name, m in module.named_modules()
            if isinstance(getattr(m, kind, None), TensorQuantizer) and getattr(m, kind).is_enabled}


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
    mtq = _mtq()
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
    read.add(made_by.get(id(result)))  # the logits stay float: nothing in the graph reads them
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
    from modelopt.torch.quantization.nn import TensorQuantizer

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
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
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
    mtq = _mtq()
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
    return {"layers": len(weights), "unsigned_inputs": sorted(unsigned["input"]), "unsigned_outputs": sorted(unsigned["output"]),
            "scheme": scheme.to_dict(), "weight_levels": scheme.weight_levels}


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
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(n, str) for n in pair) for pair in shared):
        raise RunError("the checkpoint's QAT record is unreadable; run the QAT again")
    module = built.module.eval()
    fold_batchnorm(module, built.preprocessing.input_size)
    _inplace_off(module)
    mtq = _mtq()
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


def _inplace_off(module: nn.Module) -> None:
    """In-place activations would change a quantizer's input after it was read."""
    for m in module.modules():
        if hasattr(m, "inplace"):
            m.inplace = False


def parent_onnx(run: RunDir) -> Path | None:
    """For a QAT run, its parent's float ONNX model (checked against the parent's manifest); else ``None``.

    Raises:
        RunError: the parent run is gone, or its model no longer is the one recorded.
    """
    try:
        record = run.read_config().get("qat")
    except RunError:
        return None
    if not isinstance(record, dict):
        return None
    parent = RunDir(record.get("parent", ""))
    if not parent.has_manifest():
        raise RunError(f"{run} is a QAT run of {parent}, which is gone; its float model is the reference INT8 is measured against")
    if parent.checkpoint_sha256() != record.get("parent_checkpoint_sha256"):
        raise RunError(f"{parent}'s checkpoint has changed since {run} was trained from it; run the QAT again")
    from .optimize.context import run_onnx

    return run_onnx(parent)


# ---------------------------------------------------------------------------------------------
# The QAT run


def run_qat(parent_dir: str | Path, options: QatOptions = QatOptions(), out: str | Path | None = None,
            on_epoch: Callable[[int], None] | None = None) -> QatResult:
    """Fine-tune the finished run at ``parent_dir`` with fake quantisation into a child run.

    The child is written as it trains: its ``config.json`` (with the calibrated quantizers'
    record) first, then ``last.pt`` after every epoch, so an interrupted QAT run continues with
    :func:`resume_qat` (``edgetransfer finetune --resume CHILD``) to the same bits.

    Raises:
        RunError: no finished run at ``parent_dir``, a prototype or QAT run as the parent, or an
            existing child directory.
        MissingDependencyError: ModelOpt is not installed.
    """
    parent = RunDir(parent_dir)
    parent.require_complete()
    config = parent.read_config()
    if isinstance(config.get("qat"), dict):
        raise RunError(f"{parent} is already a QAT run; run QAT from its parent, {config['qat'].get('parent')}")
    child = RunDir(out if out is not None else parent / f"qat-{options.target}")
    if child.path.exists():
        raise RunError(f"{child} exists; remove it, or choose another --out (an interrupted one continues with --resume {child})")
    _mtq()
    built, payload = parent.load_checkpoint()
    if payload.get("head") == "prototype":
        raise RunError("QAT trains weights and a prototype run has none to train; run it on a linear-head run (--mode head or full)")
    with child.lock():
        try:
            state = _start(parent, child, config, built, payload, options)
            return _train(state, on_epoch)
        except BaseException:
            if not (child / LAST).is_file():  # nothing to continue from
                shutil.rmtree(child.path, ignore_errors=True)
            raise


def resume_qat(child_dir: str | Path, on_epoch: Callable[[int], None] | None = None) -> QatResult:
    """Continue an interrupted QAT run from its last finished epoch, to the same bits an
    uninterrupted run gives (every epoch draws its own seeds).

    Raises:
        RunError: not a QAT run, already finished, nothing to continue from, or its parent changed.
    """
    child = RunDir(child_dir)
    config = child.read_config()
    record = config.get("qat")
    if not isinstance(record, dict):
        raise RunError(f"{child} is not a QAT run")
    if child.has_manifest() and child.manifest().data.get("status") == "complete":
        raise RunError(f"{child} has finished; nothing to resume")
    if not (child / LAST).is_file():
        raise RunError(f"{child} stopped before its first epoch ended; remove it and run the QAT again")
    parent = RunDir(record["parent"])
    parent.require_complete()
    if parent.checkpoint_sha256() != record["parent_checkpoint_sha256"]:
        raise RunError(f"{parent}'s checkpoint has changed since {child} started from it; remove {child} and run the QAT again")
    last = safe_load(child / LAST)
    if not isinstance(last, dict) or not {"model", "optimizer", "scheduler", "history", "best_model"} <= last.keys():
        raise RunError(f"{child / LAST} is not a QAT resume state; remove {child} and run the QAT again")
    built, payload = parent.load_checkpoint()
    restore(built, {"qat": record})
    module = built.module
    module.load_state_dict(last["model"])
    options = QatOptions(**record["options"])
    config = {k: v for k, v in config.items() if k != "qat"}
    state = _State(parent, child, config, record, built, payload, options,
                   *_optimizer(module, options, len(parent.dataset.train), _batch(config, options)), last["history"],
                   (last["best_epoch"], last["best_val"], last["best_model"]), last["seconds"])
    state.optimizer.load_state_dict(last["optimizer"])
    state.scheduler.load_state_dict(last["scheduler"])
    with child.lock():
        return _train(state, on_epoch)


@dataclass
class _State:
    parent: RunDir
    child: RunDir
    config: dict  # the parent's
    record: dict  # the child's qat record
    built: Any
    payload: dict
    options: QatOptions
    optimizer: Any
    scheduler: Any
    history: list = field(default_factory=list)
    best: tuple | None = None  # (epoch, val top-1, state_dict)
    seconds: float = 0.0  # spent before this process


def _optimizer(module: nn.Module, options: QatOptions, train_images: int, batch: int):
    """AdamW with one epoch of linear warm-up, then cosine decay to zero: without the warm-up the
    first epoch at 3e-5 fell from 88.6% to 75.5% validation top-1 on the demo before recovering."""
    import math
    from types import SimpleNamespace

    from .finetune import _cosine_with_warmup

    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=options.lr, weight_decay=0.0)
    schedule = SimpleNamespace(epochs=options.epochs, warmup_epochs=1.0)
    return optimizer, _cosine_with_warmup(optimizer, schedule, math.ceil(train_images / batch))


def _start(parent: RunDir, child: RunDir, config: dict, built, payload: dict, options: QatOptions) -> _State:
    """Fold, insert and calibrate the quantizers; write the child's config and a manifest that says it is training."""
    from .data import eval_transform
    from .finetune import _seed
    from .optimize.calibration import balanced_sample

    started = time.perf_counter()
    scheme = qat_scheme(options.target, cpu_features())
    pre = built.preprocessing
    module = built.module.eval()
    folded = fold_batchnorm(module, pre.input_size)
    _inplace_off(module)
    _seed(options.seed)
    calib = balanced_sample(parent.dataset.train, options.calib_size, options.seed)
    record = quantize(module, scheme, [x for x, _ in _batches(calib, eval_transform(pre), _batch(config, options))])
    console.print(f"QAT: {record['layers']} layers quantised ({folded} BatchNorm folded), {len(record['unsigned_inputs'])} uint8 inputs;"
                  f" weights |w| <= {scheme.weight_levels}", markup=False)
    record = {**record, "folded_batchnorm": folded, "parent": str(parent.path.resolve()), "parent_checkpoint_sha256": parent.checkpoint_sha256(),
              "options": asdict(options), "library": _library()}
    child.path.mkdir(parents=True)
    write_json(child / RunDir.CONFIG, {**config, "qat": record})
    manifest = child.new_manifest(status="training", parent={"run": record["parent"], "checkpoint_sha256": record["parent_checkpoint_sha256"]})
    manifest.save()
    return _State(parent, child, config, record, built, payload, options,
                  *_optimizer(module, options, len(parent.dataset.train), _batch(config, options)), seconds=time.perf_counter() - started)


def _batch(config: dict, options: QatOptions) -> int:
    return options.batch_size or int(config.get("batch_size", 64))


def _train(state: _State, on_epoch: Callable[[int], None] | None) -> QatResult:
    from .data import Augment, eval_transform, train_transform
    from .finetune import _seed

    started = time.perf_counter()
    options, config, module = state.options, state.config, state.built.module
    pre, dataset, batch = state.built.preprocessing, state.parent.dataset, _batch(state.config, state.options)
    augment = Augment.parse(config.get("augment", Augment.CROP.value))
    for epoch in range(len(state.history), options.epochs + 1):
        epoch_started = time.perf_counter()
        loss = _train_epoch(module, state.optimizer, state.scheduler, dataset.train, train_transform(pre, augment), batch,
                            float(config.get("label_smoothing", 0.1)), _seed(options.seed, 1, epoch)) if epoch else None
        val = _top1(module, dataset.val, eval_transform(pre), batch)
        state.history.append({"epoch": epoch, "train_loss": loss, "val_top1": val, "seconds": round(time.perf_counter() - epoch_started, 2)})
        console.print(f"QAT epoch {epoch}/{options.epochs}: val top-1 {100 * val:.2f}% (quantised)"
                      + (f", train loss {loss:.4f}" if loss is not None else " (calibrated, before training)"), markup=False)
        if state.best is None or val > state.best[1]:
            state.best = (epoch, val, copy.deepcopy(module.state_dict()))
        write_bytes(state.child / LAST, lambda f: torch.save({
            "model": module.state_dict(), "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
            "history": state.history,
            "best_epoch": state.best[0], "best_val": state.best[1], "best_model": state.best[2],
            "seconds": state.seconds + time.perf_counter() - started}, f))
        if on_epoch is not None:
            on_epoch(epoch)
    return _finish(state, state.seconds + time.perf_counter() - started)


def _finish(state: _State, seconds: float) -> QatResult:
    from .checkpoint import save_checkpoint
    from .data import eval_transform
    from .export import export_onnx

    child, parent, options, built = state.child, state.parent, state.options, state.built
    best_epoch, best_val, best_model = state.best
    built.module.load_state_dict(best_model)
    built.module.eval()
    dataset = parent.dataset
    test = _top1(built.module, dataset.test, eval_transform(built.preprocessing), _batch(state.config, options)) if dataset.test else None
    save_checkpoint(child.checkpoint, built, state.payload["classes"],
                    **{k: v for k, v in state.payload.items() if k not in _BUILT_KEYS}, qat=state.record)
    metrics = {"qat": state.record, "history": state.history, "best_epoch": best_epoch, "val_top1": best_val, "test_top1": test,
               "test_images": len(dataset.test), "val_images": len(dataset.val), "float": _parent_metrics(parent),
               "seconds": round(seconds, 1), "folded_batchnorm": state.record["folded_batchnorm"]}
    write_json(child / RunDir.METRICS, metrics)
    manifest = child.manifest()
    manifest.record("checkpoint", RunDir.CHECKPOINT, "torch-checkpoint", parent=None,
                    settings={"arch": built.arch.name, "qat": asdict(options)})
    manifest.record("metrics", RunDir.METRICS, "metrics", parent="checkpoint")
    manifest.data["qat"] = {"val_top1": best_val, "test_top1": test, "best_epoch": best_epoch, "finished": now()}
    manifest.data["status"] = "complete"
    manifest.save()
    export_onnx(child)
    _record_in_parent(parent, child, options, metrics)
    (child / LAST).unlink(missing_ok=True)
    return QatResult(child.path, read_json(child / RunDir.METRICS))


_BUILT_KEYS = ("format", "arch", "weights", "num_classes", "classes", "preprocessing", "state_dict")


def _record_in_parent(parent: RunDir, child: RunDir, options: QatOptions, metrics: dict) -> None:
    """The child in the parent's manifest, as ``qat:<its path>`` (relative when inside the parent):
    one entry per child, so two QAT runs of one parent never replace each other's."""
    with parent.lock():
        manifest = parent.manifest()
        where = str(parent.relative(child.path))
        entry = manifest.record(f"qat:{where}", parent.relative(child.checkpoint), "qat-run", parent="checkpoint",
                                settings={"qat": asdict(options)})  # not a variant: no "target" of its own
        entry["run"] = where
        entry["val_top1"], entry["test_top1"] = metrics["val_top1"], metrics["test_top1"]
        manifest.save()


def _parent_metrics(parent: RunDir) -> dict:
    metrics = read_json(parent / RunDir.METRICS)
    final, test = metrics.get("final", {}), metrics.get("test") or {}
    return {"val_top1": final.get("top1"), "test_top1": test.get("top1") if isinstance(test, dict) else None}


def _library() -> dict:
    from importlib import metadata

    return {"name": "nvidia-modelopt", "version": metadata.version("nvidia-modelopt")}


def _batches(samples, transform, batch: int, shuffle: bool = False, seed: int = 0):
    from torch.utils.data import DataLoader

    from .data import TorchImages

    return DataLoader(TorchImages(samples, transform), batch_size=batch, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed))


def _train_epoch(module: nn.Module, optimizer, scheduler, samples, transform, batch: int, smoothing: float, seed: int) -> float:
    module.train()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=smoothing)
    total, count = 0.0, 0
    for x, y in _batches(samples, transform, batch, shuffle=True, seed=seed):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(module(x), y)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total, count = total + float(loss.detach()) * len(y), count + len(y)
    module.eval()
    return total / max(count, 1)


def _top1(module: nn.Module, samples, transform, batch: int) -> float:
    module.eval()
    right = 0
    with torch.no_grad():
        for x, y in _batches(samples, transform, batch):
            right += int((module(x).argmax(1) == y).sum())
    return right / max(len(samples), 1)


def logits_of(module: nn.Module, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """The fake-quantised module's logits on prepared (normalised NCHW) images."""
    module.eval()
    with torch.no_grad():
        return np.concatenate([module(torch.from_numpy(images[i : i + batch])).numpy() for i in range(0, len(images), batch)])


# ---------------------------------------------------------------------------------------------
# Export: the fake-quantised module as a QDQ ONNX model


def export_qdq(built, path: Path, opset: int, record: dict[str, Any]) -> Any:
    """The fake-quantised module as a QDQ ONNX model (``input`` NCHW float, ``logits``), with the
    placement ONNX Runtime fuses completely (:func:`~edgetransfer.optimize.qdq.complete_placement`).

    torch's TorchScript exporter is used: it writes each ModelOpt quantizer as the
    QuantizeLinear/DequantizeLinear pair ModelOpt defines for it, which the dynamo exporter does
    not know. Opset 13 at least (per-channel QuantizeLinear); 17 at most here (the TorchScript
    exporter's newest).

    Raises:
        ExportError: the exporter fails on the model.
    """
    import warnings

    import onnx

    from .errors import ExportError, first_line
    from .export import INPUT, OUTPUT

    size = built.preprocessing.input_size
    module = built.module.eval()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (torch.zeros(1, 3, size, size),), str(path), dynamo=False, opset_version=min(max(opset, 13), 17),
                              input_names=[INPUT], output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    except Exception as exc:
        raise ExportError(f"cannot export the QAT model of {built.arch.name} to ONNX: {first_line(exc)}") from exc
    model = onnx.load(str(path))
    # every reader of a quantized tensor reads it quantized, biases in int32, one activation type: ONNX Runtime fuses every layer
    complete_placement(model, unsigned_activations=_scheme(record).unsigned_activations)
    return model


def _scheme(record: dict[str, Any]) -> QatScheme:
    """The scheme a QAT record was trained with (its activation types depend on the target alone).

    Raises:
        RunError: the record names no target.
    """
    target = record.get("options", {}).get("target") if isinstance(record.get("options"), dict) else None
    if target not in QAT_TARGETS:
        raise RunError("the checkpoint's QAT record names no target; run the QAT again")
    return qat_scheme(target, cpu_features())


def qdq_limit(module: nn.Module, images: np.ndarray, eager: np.ndarray) -> tuple[float, float]:
    """The largest logit difference an export of ``module`` may show on ``images``, and the floor
    it is made from: how far ``module`` moves when it runs in float64 (see QDQ_FLOOR_FACTOR)."""
    double = copy.deepcopy(module).double().eval()
    with torch.no_grad():
        floor = np.concatenate([double(torch.from_numpy(images[i : i + 64]).double()).float().numpy() for i in range(0, len(images), 64)])
    floor_diff = float(np.abs(floor - eager).max()) if len(images) else 0.0
    return QDQ_FLOOR_FACTOR * floor_diff + 1e-3 * float(np.abs(eager).max(initial=0.0)), floor_diff


def verify_qdq(built, path: Path, images: list) -> Any:
    """ONNX Runtime (CPU, its default graph optimisation: the integer kernels that will run)
    against the fake-quantised PyTorch model on ``images``, within :func:`qdq_limit`.

    Raises:
        ParityError: further apart.
    """
    from .errors import ParityError
    from .results import Parity, compare
    from .runtime.sessions import open_session

    pre = built.preprocessing
    normalized = np.stack([pre.normalize(np.asarray(pre.resize_crop(img), dtype=np.uint8)) for img in images])
    eager = logits_of(built.module, normalized)
    limit, floor = qdq_limit(built.module, normalized, eager)
    session = open_session(path)
    onnx_logits = np.concatenate([session.run(None, {session.get_inputs()[0].name: normalized[i : i + 16]})[0]
                                  for i in range(0, len(normalized), 16)])
    agreement = compare(onnx_logits, eager)
    ok = agreement.max_abs_diff <= limit
    parity = Parity(agreement.images, 16, agreement.max_abs_diff, agreement.top1_agreement, limit, session.get_providers()[0],
                    within_tolerance=ok, floor_max_abs_diff=floor)
    if not ok:
        raise ParityError(
            f"the QDQ model and the fake-quantised PyTorch model differ by up to {agreement.max_abs_diff:.3f} in the logits on"
            f" {agreement.images} images, over the {limit:.3f} allowed ({QDQ_FLOOR_FACTOR:g}x the {floor:.3f} that float64 alone moves"
            f" them; top-1 agreement {100 * agreement.top1_agreement:.1f}%); nothing was written. Report it with the model's architecture")
    return parity
