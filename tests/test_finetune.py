from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from edgetransfer._io import sha256_file
from edgetransfer.checkpoint import load_checkpoint
from edgetransfer.data import DataSpec, eval_transform, load_dataset, load_image
from edgetransfer.errors import EdgeTransferError, RunError
from edgetransfer.finetune import FinetuneConfig, finetune
from edgetransfer.rundir import Manifest
from edgetransfer.models import build, trunk_blocks

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


def test_interrupted_head_run_resumes_to_the_same_result(head_run, tmp_path):
    run_dir = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        finetune(HEAD, run_dir, on_epoch=interrupt_after(7))
    assert (run_dir / "last.pt").is_file() and (run_dir / "model.pt").is_file()
    assert not (run_dir / "metrics.json").exists()
    assert Manifest.load(run_dir).data["status"] == "training"
    resumed = finetune(FinetuneConfig(), run_dir, resume=True)  # the run's own config is used
    assert strip_times(resumed.metrics["epochs"]) == strip_times(head_run.metrics["epochs"])


@pytest.mark.slow
def test_full_mode_trains_the_backbone_and_resumes_exactly(tmp_path):
    config = FinetuneConfig(
        data=DataSpec(limit_per_class=6), mode="full", epochs=3, probe_epochs=10, image_size=32, batch_size=16
    )
    straight = finetune(config, tmp_path / "straight")
    with pytest.raises(Interrupt):
        finetune(config, tmp_path / "cut", on_epoch=interrupt_after(2))
    resumed = finetune(config, tmp_path / "cut", resume=True)
    assert strip_times(resumed.metrics["epochs"]) == strip_times(straight.metrics["epochs"])
    assert straight.metrics["probe"]["epochs"] == 10 and resumed.metrics["probe"]["val_top1"] == straight.metrics["probe"]["val_top1"]

    pretrained = build("timm:efficientnet_lite0", 10).module.state_dict()
    trained = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)["state_dict"]
    assert not torch.equal(trained["conv_stem.weight"], pretrained["conv_stem.weight"])
    assert not torch.equal(trained["bn1.weight"], pretrained["bn1.weight"])  # BatchNorm's affine part trains
    assert torch.equal(trained["bn1.running_mean"], pretrained["bn1.running_mean"])  # its statistics stay


@pytest.mark.slow
def test_unfreezing_the_last_block_leaves_the_rest_and_its_batchnorm_alone(tmp_path):
    config = FinetuneConfig(
        data=DataSpec(limit_per_class=6), unfreeze_blocks=1, epochs=1, probe_epochs=0, image_size=32, batch_size=16
    )
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
    with pytest.raises(RunError, match=r"nothing to resume in"):
        finetune(HEAD, tmp_path / "empty", resume=True)
    with pytest.raises(RunError, match=r"already complete"):
        finetune(HEAD, head_run.run_dir, resume=True)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"batch_size": 0}, "batch size must be at least 1"),
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
