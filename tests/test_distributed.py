"""Fine-tuning under torchrun: 2 CPU processes, gloo on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from edgetransfer.data import DataSpec
from edgetransfer.finetune import FinetuneConfig, finetune
from edgetransfer.rundir import Manifest


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "edgetransfer", "finetune", "-q", *args]


def wait_for(path, process, seconds=120) -> None:
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert path.exists(), "no epoch finished in time"


def kill_job(process) -> None:
    """kill -9 the whole job: torchrun starts its workers in sessions of their own."""
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    for pid in workers:
        os.kill(int(pid), signal.SIGKILL)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_two_processes_write_one_run_that_matches_one_process(tmp_path):
    out = tmp_path / "ddp"
    done = subprocess.run(torchrun("--limit-per-class", "20", "--epochs", "5", "--out", str(out)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == str(out) and lines.count(str(out)) == 1  # only rank 0 reports
    assert sum("best epoch" in line for line in lines) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["timing"]["processes"] == 2
    single = finetune(FinetuneConfig(data=DataSpec(limit_per_class=20), epochs=5), tmp_path / "single").metrics
    assert metrics["final"]["top1"] == pytest.approx(single["final"]["top1"], abs=0.026)  # one image in 40
    assert Manifest.load(out).data["status"] == "complete"
    assert not (out / "last.pt").exists() and not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_killed_distributed_run_resumes(tmp_path):
    out = tmp_path / "killed"
    args = [
        "--limit-per-class",
        "10",
        "--mode",
        "full",
        "--image-size",
        "32",
        "--epochs",
        "8",
        "--probe-epochs",
        "1",
        "--batch-size",
        "16",
        "--out",
        str(out),
    ]
    process = subprocess.Popen(torchrun(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(out / "last.pt", process)
    finally:
        kill_job(process)
    assert not (out / "metrics.json").exists()
    done = subprocess.run(torchrun("--resume", str(out)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == list(range(1, 9))


@pytest.mark.slow
def test_a_lost_rank_ends_the_job_instead_of_hanging(tmp_path):
    out = tmp_path / "lost"
    args = [
        "--limit-per-class",
        "10",
        "--mode",
        "full",
        "--image-size",
        "32",
        "--epochs",
        "200",
        "--probe-epochs",
        "1",
        "--batch-size",
        "16",
        "--out",
        str(out),
    ]
    env = {**os.environ, "EDGETRANSFER_DIST_TIMEOUT": "30"}
    process = subprocess.Popen(torchrun(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        wait_for(out / "last.pt", process)
        workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(workers[-1]), signal.SIGKILL)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            kill_job(process)
    assert process.returncode != 0
    assert f"Signal 9 (SIGKILL) received by PID {workers[-1]}" in stderr  # torchrun names the worker that was killed
    assert Manifest.load(out).data["status"] == "training"  # resumable, not marked complete
