from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from edgetransfer.cli import main


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_default_job_runs_offline_and_reaches_the_floor(tmp_path):
    """`edgetransfer finetune` with no data arguments: embedded weights, embedded digits."""
    out = tmp_path / "demo"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "edgetransfer", "finetune", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final"]["top1"] >= 0.94
    assert metrics["weights"] == "embedded" and metrics["image_size"] == 64
    assert time.perf_counter() - started < 180
    assert "val top-1" in done.stderr and done.stdout.strip() == str(out)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/no/such/folder"], "Error: data path not found: /no/such/folder"),
        (["--arch", "resnet19"], "Error: unknown architecture 'resnet19'. Did you mean 'resnet18'"),
        (["--weights", "/no/such.pth", "--arch", "resnet18"], "Error: weights file not found: /no/such.pth"),
        (["--epochs", "0"], "Error: epochs must be at least 1, got 0"),
        (["--resume", "somewhere", "--epochs", "3"], "Error: --resume continues with the run's own settings; drop --epochs"),
    ],
)
def test_user_mistakes_get_one_line_and_exit_1(tmp_path, args, message):
    code, output = run_cli("finetune", "--out", str(tmp_path / "r"), *args) if "--resume" not in args else run_cli("finetune", *args)
    assert code == 1
    assert message in output
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1


def test_killed_run_resumes_from_the_command_line(tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "edgetransfer", "finetune", "-q", "--out", str(out), "--limit-per-class", "10",
               "--mode", "full", "--image-size", "32", "--epochs", "12", "--probe-epochs", "1", "--batch-size", "16"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "last.pt").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert (out / "last.pt").exists(), "no epoch finished in time"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    code, output = run_cli("finetune", "--resume", str(out), "-q")
    assert code == 0, output
    assert "resuming" in output and "after epoch 0 " not in output
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == list(range(1, 13))
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_info_lists_architectures_and_shows_a_run(tmp_path):
    code, output = run_cli("info")
    assert code == 0 and "timm:efficientnet_lite0" in output and "resnet18" in output
    code, output = run_cli("info", str(tmp_path))
    assert code == 1 and "no run at" in output


def test_every_command_has_an_example_in_its_help():
    for command in ("finetune", "info"):
        code, output = run_cli(command, "--help")
        assert code == 0 and "Examples:" in output and f"edgetransfer {command}" in output
