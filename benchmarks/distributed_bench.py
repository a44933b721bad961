"""The same fine-tuning job in 1 and in 2 processes (torchrun, gloo) on this machine.

    python benchmarks/distributed_bench.py      # about 3 minutes on a 2-core CPU

Full fine-tuning of the demo (EfficientNet-Lite0, digits, 64 px, 3 epochs after the probe), end
to end as a user launches it. torchrun gives each worker one thread (OMP_NUM_THREADS=1), so the
single process is run both with 2 threads (the machine) and with 1 (a like-for-like worker).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fingerprint import fingerprint, save_results

JOB = ["finetune", "-q", "--mode", "full", "--epochs", "3"]


def timed(command: list[str], out: Path, env_threads: str | None = None) -> dict:
    import os

    env = dict(os.environ)
    if env_threads:
        env["OMP_NUM_THREADS"] = env_threads
    started = time.perf_counter()
    subprocess.run([*command, "--out", str(out)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "wall_s": round(time.perf_counter() - started, 1),
        "val_top1": metrics["final"]["top1"],
        "epochs_s": round(metrics["timing"]["epochs_s"], 1),
        "processes": metrics["timing"]["processes"],
        "threads_per_process": metrics["timing"]["torch_threads"],
    }


def main() -> None:
    single = [sys.executable, "-m", "edgetransfer", *JOB]
    double = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "edgetransfer", *JOB]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report = {
            "machine": fingerprint(2),
            "job": "edgetransfer " + " ".join(JOB),
            "one_process_2_threads": timed(single, work / "one"),
            "one_process_1_thread": timed(single, work / "one-1", env_threads="1"),
            "two_processes": timed(double, work / "two"),
        }
    rows = [(k, v) for k, v in report.items() if isinstance(v, dict) and "wall_s" in v]
    lines = [
        "# 1 and 2 processes, same job",
        "",
        f"`{report['job']}` on {report['machine']['cpu']['model']},"
        f" {report['machine']['cores']} cores. Produced by `python benchmarks/distributed_bench.py`.",
        "",
        "| launch | processes × threads | wall (s) | epochs (s) | val top-1 |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {r['processes']} × {r['threads_per_process']} | {r['wall_s']} | {r['epochs_s']} | {100 * r['val_top1']:.2f}% |"
        for name, r in rows
    ]
    save_results("distributed", report, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
