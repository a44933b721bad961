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

**Modules**, one for each layer they serve: :mod:`edgetransfer.qat_scheme` (the scheme, ModelOpt's
fake quantisation, and the rebuilding of a saved QAT model, which loading a checkpoint needs),
:mod:`edgetransfer.qat_export` (the QDQ ONNX model and its check, part of ``edgetransfer export``)
and this one, the QAT run: calibration, training, the child run directory.
"""

from __future__ import annotations

import copy
import functools
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import save_checkpoint
from .config import QatOptions
from .cpu import cpu_features
from .data import Augment, TorchImages, eval_transform, train_transform
from .errors import RunError
from .export import export_onnx
from .optimize.calibration import balanced_sample
from .progress import console
from .qat_fast import fast_quantizers
from .qat_scheme import (
    fold_batchnorm,
    inplace_off,
    load_modelopt,
    qat_scheme,
    quantize,
    restore,
)
from .rundir import RunDir, now
from .runtime.files import read_json, write_bytes, write_json
from .safeload import safe_load
from .train.allocator import kept_blocks
from .train.features import channels_last
from .train.loops import cpu_layout
from .training import cosine_with_warmup, seed_stage

__all__ = ["QatResult", "run_qat", "resume_qat"]

LAST = RunDir.LAST


@dataclass
class QatResult:
    run_dir: Path
    metrics: dict[str, Any]


def run_qat(
    parent_dir: str | Path, options: QatOptions = QatOptions(), out: str | Path | None = None, on_epoch: Callable[[int], None] | None = None
) -> QatResult:
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
    if config.get("tasks"):
        raise RunError(
            f"{parent} is a multi-task run; QAT takes one task (post-training INT8 holds every task to the budget: export --precision int8)"
        )
    if (record := parent.qat_record()) is not None:
        raise RunError(f"{parent} is already a QAT run; run QAT from its parent, {record.get('parent')}")
    child = RunDir(out if out is not None else parent / f"qat-{options.target}")
    if child.path.exists():
        raise RunError(f"{child} exists; remove it, or choose another --out (an interrupted one continues with --resume {child})")
    load_modelopt()
    built, payload = parent.load_checkpoint()
    if payload.get("head") == "prototype":
        raise RunError("QAT trains weights and a prototype run has none to train; run it on a linear-head run (--mode head or full)")
    with child.lock(create=True):
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
    config, record = child.read_config(), child.qat_record()
    if record is None:
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
    best = (last["best_epoch"], last["best_val"], last["best_model"])
    state = _State.begin(parent, child, config, record, built, payload, options, history=last["history"], best=best, seconds=last["seconds"])
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

    @classmethod
    def begin(
        cls, parent: RunDir, child: RunDir, config: dict, record: dict, built: Any, payload: dict, options: QatOptions, **progress: Any
    ) -> _State:
        """A state with a new optimiser and schedule for ``built``'s module; ``progress``: the
        history, best epoch and seconds of a run being resumed."""
        optimizer, scheduler = _optimizer(built.module, options, len(parent.dataset.train), _batch(config, options))
        return cls(parent, child, config, record, built, payload, options, optimizer, scheduler, **progress)


def _optimizer(module: nn.Module, options: QatOptions, train_images: int, batch: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with one epoch of linear warm-up, then cosine decay to zero: without the warm-up the
    first epoch at 3e-5 fell from 88.6% to 75.5% validation top-1 on the demo before recovering."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=options.lr, weight_decay=0.0)
    return optimizer, cosine_with_warmup(optimizer, options.epochs, 1.0, math.ceil(train_images / batch))


def _start(parent: RunDir, child: RunDir, config: dict, built, payload: dict, options: QatOptions) -> _State:
    """Fold, insert and calibrate the quantizers; write the child's config and a manifest that says it is training."""
    started = time.perf_counter()
    scheme = qat_scheme(options.target, cpu_features())
    pre = built.preprocessing
    module = built.module.eval()
    folded = fold_batchnorm(module, pre.input_size)
    inplace_off(module)
    seed_stage(options.seed)
    calib = balanced_sample(parent.dataset.train, options.calib_size, options.seed)
    record = quantize(module, scheme, [x for x, _ in _batches(calib, eval_transform(pre), _batch(config, options))])
    console.print(
        f"QAT: {record['layers']} layers quantised ({folded} BatchNorm folded), {len(record['unsigned_inputs'])} uint8 inputs;"
        f" weights |w| <= {scheme.weight_levels}",
        markup=False,
    )
    record = {
        **record,
        "folded_batchnorm": folded,
        "parent": str(parent.path.resolve()),
        "parent_checkpoint_sha256": parent.checkpoint_sha256(),
        "options": asdict(options),
        "library": _library(),
    }
    child.path.mkdir(parents=True)
    write_json(child / RunDir.CONFIG, {**config, "qat": record})
    manifest = child.new_manifest(status="training", parent={"run": record["parent"], "checkpoint_sha256": record["parent_checkpoint_sha256"]})
    manifest.save()
    return _State.begin(parent, child, config, record, built, payload, options, seconds=time.perf_counter() - started)


def _batch(config: dict, options: QatOptions) -> int:
    return options.batch_size or int(config.get("batch_size", 64))


def _train(state: _State, on_epoch: Callable[[int], None] | None) -> QatResult:
    started = time.perf_counter()
    with kept_blocks():  # freed activations reused, not faulted in again at every step (allocator.py)
        _epochs(state, on_epoch, started)
    return _finish(state, state.seconds + time.perf_counter() - started)


def _epochs(state: _State, on_epoch: Callable[[int], None] | None, started: float) -> None:
    options, config, module = state.options, state.config, state.built.module
    pre, dataset, batch = state.built.preprocessing, state.parent.dataset, _batch(state.config, state.options)
    augment = Augment.parse(config.get("augment", Augment.CROP.value))
    for epoch in range(len(state.history), options.epochs + 1):
        epoch_started = time.perf_counter()
        loss = (
            _train_epoch(
                module,
                state.optimizer,
                state.scheduler,
                dataset.train,
                train_transform(pre, augment),
                batch,
                float(config.get("label_smoothing", 0.1)),
                seed_stage(options.seed, 1, epoch),
            )
            if epoch
            else None
        )
        val = _top1(module, dataset.val, eval_transform(pre), batch)
        state.history.append({"epoch": epoch, "train_loss": loss, "val_top1": val, "seconds": round(time.perf_counter() - epoch_started, 2)})
        console.print(
            f"QAT epoch {epoch}/{options.epochs}: val top-1 {100 * val:.2f}% (quantised)"
            + (f", train loss {loss:.4f}" if loss is not None else " (calibrated, before training)"),
            markup=False,
        )
        if state.best is None or val > state.best[1]:
            state.best = (epoch, val, copy.deepcopy(module.state_dict()))
        resume = {
            "model": module.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "history": state.history,
            "best_epoch": state.best[0],
            "best_val": state.best[1],
            "best_model": state.best[2],
            "seconds": state.seconds + time.perf_counter() - started,
        }
        write_bytes(state.child / LAST, functools.partial(torch.save, resume))
        if on_epoch is not None:
            on_epoch(epoch)


def _finish(state: _State, seconds: float) -> QatResult:
    child, parent, options, built = state.child, state.parent, state.options, state.built
    assert state.best is not None, "QAT measures at least its calibrated epoch"
    best_epoch, best_val, best_model = state.best
    built.module.load_state_dict(best_model)
    built.module.eval()
    dataset = parent.dataset
    test = _top1(built.module, dataset.test, eval_transform(built.preprocessing), _batch(state.config, options)) if dataset.test else None
    save_checkpoint(
        child.checkpoint, built, state.payload["classes"], **{k: v for k, v in state.payload.items() if k not in _BUILT_KEYS}, qat=state.record
    )
    metrics = {
        "qat": state.record,
        "history": state.history,
        "best_epoch": best_epoch,
        "val_top1": best_val,
        "test_top1": test,
        "test_images": len(dataset.test),
        "val_images": len(dataset.val),
        "float": _parent_metrics(parent),
        "seconds": round(seconds, 1),
        "folded_batchnorm": state.record["folded_batchnorm"],
    }
    write_json(child / RunDir.METRICS, metrics)
    manifest = child.manifest()
    manifest.record("checkpoint", RunDir.CHECKPOINT, "torch-checkpoint", parent=None, settings={"arch": built.arch.name, "qat": asdict(options)})
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
        entry = manifest.record(
            f"qat:{where}", parent.relative(child.checkpoint), "qat-run", parent="checkpoint", settings={"qat": asdict(options)}
        )  # not a variant: no "target" of its own
        entry["run"] = where
        entry["val_top1"], entry["test_top1"] = metrics["val_top1"], metrics["test_top1"]
        manifest.save()


def _parent_metrics(parent: RunDir) -> dict:
    metrics = read_json(parent / RunDir.METRICS)
    final, test = metrics.get("final", {}), metrics.get("test") or {}
    return {"val_top1": final.get("top1"), "test_top1": test.get("top1") if isinstance(test, dict) else None}


def _library() -> dict:
    return {"name": "nvidia-modelopt", "version": metadata.version("nvidia-modelopt")}


def _batches(samples, transform, batch: int, shuffle: bool = False, seed: int = 0):
    return DataLoader(TorchImages(samples, transform), batch_size=batch, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


def _train_epoch(module: nn.Module, optimizer, scheduler, samples, transform, batch: int, smoothing: float, seed: int) -> float:
    module.train()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=smoothing)
    total, count = 0.0, 0
    # PyTorch's faster CPU layout, with ModelOpt's quantizers computing in it (qat_fast.py); as before after
    with channels_last(module), fast_quantizers(module):
        for x, y in _batches(samples, transform, batch, shuffle=True, seed=seed):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(module(cpu_layout(x)), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total, count = total + float(loss.detach()) * len(y), count + len(y)
    module.eval()
    return total / max(count, 1)


def _top1(module: nn.Module, samples, transform, batch: int) -> float:
    module.eval()
    right = 0
    with torch.no_grad(), channels_last(module), fast_quantizers(module):
        for x, y in _batches(samples, transform, batch):
            right += int((module(cpu_layout(x)).argmax(1) == y).sum())
    return right / max(len(samples), 1)
