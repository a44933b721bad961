from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from edgetransfer.checkpoint import load_checkpoint
from edgetransfer.data import DataSpec, eval_transform, load_dataset, load_image
from edgetransfer.errors import EdgeTransferError, RunError
from edgetransfer.finetune import FinetuneConfig, finetune
from edgetransfer.models import build, trunk_blocks
from edgetransfer.rundir import Manifest
from edgetransfer.runtime.files import sha256_file
from edgetransfer.train.loops import CachedHeadLoop, ImageLoop
from edgetransfer.training import seed_stage

SMALL = DataSpec(limit_per_class=40)  # 320 train / 80 val real digits
HEAD = FinetuneConfig(data=SMALL, epochs=20)


class Interrupt(KeyboardInterrupt):
    pass


def interrupt_after(epoch: int):
    def callback(record):
        if record["epoch"] == epoch:
            raise Interrupt()

    return callback


def strip_times(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    return finetune(HEAD, tmp_path_factory.mktemp("runs") / "head")


def test_head_mode_learns_digits_from_frozen_pretrained_features(head_run):
    final = head_run.metrics["final"]
    assert final["top1"] >= 0.85, final["top1"]
    assert final["top5"] >= final["top1"]
    assert head_run.config.weights == "embedded" and head_run.config.image_size == 64
    assert np.array(final["confusion_matrix"]).sum() == head_run.metrics["val_images"] == 80


def test_run_directory_records_every_artifact(head_run):
    run_dir = head_run.run_dir
    manifest = Manifest.load(run_dir)
    assert manifest.data["status"] == "complete"
    for name in ("checkpoint", "metrics", "curves"):
        entry = manifest.data["artifacts"][name]
        assert entry["sha256"] == sha256_file(run_dir / entry["path"])
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (run_dir / "last.pt").exists()
    assert json.loads((run_dir / "config.json").read_text())["lr"] == 1e-2
    assert not list(run_dir.rglob("*.tmp"))


def test_checkpoint_rebuilds_the_model_that_scored_the_metrics(head_run):
    built, payload = load_checkpoint(head_run.run_dir / "model.pt")
    assert payload["classes"] == [str(d) for d in range(10)]
    dataset = load_dataset(SMALL)
    transform = eval_transform(built.preprocessing)
    x = torch.stack([transform(load_image(s)) for s in dataset.val])
    with torch.no_grad():
        predicted = built.module(x).argmax(1).numpy()
    labels = np.array([s.label for s in dataset.val])
    assert (predicted == labels).mean() == pytest.approx(head_run.metrics["final"]["top1"])
    # the test split, held out from every choice, is scored once with the chosen checkpoint
    x = torch.stack([transform(load_image(s)) for s in dataset.test])
    with torch.no_grad():
        predicted = built.module(x).argmax(1).numpy()
    test = head_run.metrics["test"]
    assert test["images"] == head_run.metrics["test_images"] == len(dataset.test) > 0
    assert test["top1"] == pytest.approx((predicted == np.array([s.label for s in dataset.test])).mean())
    assert not {s.name for s in dataset.test} & {s.name for s in dataset.val + dataset.train}


def test_same_seed_same_run(head_run, tmp_path):
    again = finetune(HEAD, tmp_path / "again")
    assert strip_times(again.metrics["epochs"]) == strip_times(head_run.metrics["epochs"])


class Killed(BaseException):
    """Stands in for SIGKILL: nothing in edgetransfer catches it."""


FULL = FinetuneConfig(data=DataSpec(limit_per_class=6), mode="full", epochs=3, probe_epochs=2, image_size=32, batch_size=16)
KILLABLE = {
    "head": FinetuneConfig(data=DataSpec(limit_per_class=10), epochs=6),
    "full": FULL,
    "full, 2 workers": replace(FULL, workers=2),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    runs = {}

    def run(name):
        if name not in runs:
            runs[name] = finetune(KILLABLE[name], tmp_path_factory.mktemp("straight") / "run")
        return runs[name]

    return run


def kill_during(monkeypatch, epoch: int, batch: int) -> None:
    """Kill the run as it reaches ``batch`` of ``epoch``; epoch 0 is the linear probe of a full run."""
    for cls in (CachedHeadLoop, ImageLoop):

        def train_batches(self, original=cls.train_batches):
            for index, item in enumerate(original(self)):
                if getattr(self, "epoch", 0) == epoch and index == batch:
                    raise Killed()
                yield item

        monkeypatch.setattr(cls, "train_batches", train_batches)


def kill_after_features(monkeypatch) -> None:
    original = CachedHeadLoop._features

    def features(self, dataset):
        original(self, dataset)
        raise Killed()

    monkeypatch.setattr(CachedHeadLoop, "_features", features)


@pytest.mark.parametrize(
    "name, point",
    [
        ("head", "features cached"),
        ("head", (1, 1)),
        ("head", (4, 0)),
        ("head", "after epoch 3"),
        ("full", (0, 0)),  # in the probe, features cached
        ("full", (1, 1)),  # no last.pt yet
        ("full", (2, 0)),  # last.pt from epoch 1
        ("full, 2 workers", (2, 1)),
    ],
)
def test_a_run_killed_anywhere_resumes_to_the_same_bits(name, point, uninterrupted, monkeypatch, tmp_path):
    straight, run = uninterrupted(name), tmp_path / "killed"
    callback = None
    if point == "features cached":
        kill_after_features(monkeypatch)
    elif point == "after epoch 3":
        callback = interrupt_after(3)
    else:
        kill_during(monkeypatch, *point)
    with pytest.raises((Killed, Interrupt)):
        finetune(KILLABLE[name], run, on_epoch=callback)
    monkeypatch.undo()
    torch.manual_seed(12345), np.random.seed(12345), random.seed(12345)  # a new process's generators are not the old ones
    resumed = finetune(FinetuneConfig(), run, resume=True)  # the run's own config is used

    assert strip_times(resumed.metrics["epochs"]) == strip_times(straight.metrics["epochs"])
    if straight.metrics["probe"]:
        assert resumed.metrics["probe"]["val_top1"] == straight.metrics["probe"]["val_top1"]
    expected = torch.load(straight.run_dir / "model.pt", weights_only=True)["state_dict"]
    got = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    assert expected.keys() == got.keys()
    changed = [key for key in expected if not torch.equal(expected[key], got[key])]
    assert not changed, f"{len(changed)} tensors differ, first {changed[0]}"


def test_each_epoch_draws_different_batches_and_augmentation(uninterrupted):
    """Reseeding per epoch must not replay epoch 1's randomness in every epoch."""
    losses = [row["train_loss"] for row in uninterrupted("head").metrics["epochs"]]
    assert len(set(losses)) == len(losses)
    order = [torch.randperm(100, generator=torch.Generator().manual_seed(seed_stage(0, epoch, 0))) for epoch in (1, 2)]
    assert not torch.equal(*order)
    assert seed_stage(0, 1, 0) == seed_stage(0, 1, 0) != seed_stage(0, 1, 1)


@pytest.mark.slow
def test_full_mode_trains_the_backbone_but_not_batchnorm_statistics(uninterrupted):
    straight = uninterrupted("full")
    assert straight.metrics["probe"]["epochs"] == 2
    pretrained = build("timm:efficientnet_lite0", 10).module.state_dict()
    trained = torch.load(straight.run_dir / "model.pt", weights_only=True)["state_dict"]
    assert not torch.equal(trained["conv_stem.weight"], pretrained["conv_stem.weight"])
    assert not torch.equal(trained["bn1.weight"], pretrained["bn1.weight"])  # BatchNorm's affine part trains
    assert torch.equal(trained["bn1.running_mean"], pretrained["bn1.running_mean"])  # its statistics stay


@pytest.mark.slow
def test_unfreezing_the_last_block_leaves_the_rest_and_its_batchnorm_alone(tmp_path):
    config = FinetuneConfig(data=DataSpec(limit_per_class=6), unfreeze_blocks=1, epochs=1, probe_epochs=0, image_size=32, batch_size=16)
    finetune(config, tmp_path / "run")
    reference = build("timm:efficientnet_lite0", 10)
    last = trunk_blocks(reference)[-1]
    trainable = {n for n, p in reference.module.named_parameters() if any(p is q for q in last.parameters())}
    trainable |= {n.replace("weight", "running_mean") for n in trainable}
    before = reference.module.state_dict()
    after = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["state_dict"]
    changed = {k for k in before if not k.startswith("classifier") and not torch.equal(before[k], after[k])}
    assert changed and changed <= trainable | {n.replace("running_mean", "running_var") for n in trainable} | {
        n.replace("running_mean", "num_batches_tracked") for n in trainable
    }
    assert torch.equal(before["blocks.6.0.bn1.running_mean"], after["blocks.6.0.bn1.running_mean"])


def test_a_run_directory_holds_one_run(head_run, tmp_path):
    with pytest.raises(RunError, match=r"already holds a run; pick another --out, or --resume"):
        finetune(HEAD, head_run.run_dir)
    with pytest.raises(RunError, match=r"no run directory at .*empty; check the path"):
        finetune(HEAD, tmp_path / "empty", resume=True)
    with pytest.raises(RunError, match=r"already complete"):
        finetune(HEAD, head_run.run_dir, resume=True)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"epochs": 0}, "epochs must be between 1 and 10000, got 0"),
        ({"batch_size": 0}, "batch size must be between 1 and 65536, got 0"),
        ({"mode": "full", "unfreeze_blocks": 2}, "--unfreeze goes with --mode head"),
        ({"label_smoothing": 1.0}, r"label smoothing must be in \[0, 1\)"),
        ({"mode": "partial"}, r"unknown mode 'partial'"),
    ],
)
def test_bad_settings_are_refused_up_front(changes, message):
    with pytest.raises(EdgeTransferError, match=message):
        replace(HEAD, **changes)


def test_training_from_scratch_resolves_its_own_defaults():
    scratch = FinetuneConfig(arch="resnet18", weights="none", mode="full").resolved()
    assert (scratch.probe_epochs, scratch.backbone_lr_scale, scratch.train_bn_stats) == (0, 1.0, True)
    pretrained = FinetuneConfig(mode="full").resolved()
    assert (pretrained.probe_epochs, pretrained.backbone_lr_scale, pretrained.train_bn_stats) == (10, 0.1, False)
