"""Machine fingerprint recorded beside every benchmark result."""

from __future__ import annotations

import os
from pathlib import Path

from edgetransfer.cpu import cpu_features
from edgetransfer.rundir import versions

# the /proc/cpuinfo flags that decide INT8 and bf16 speed, listed as the kernel names them
CPUINFO_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "asimddp")


def cpu() -> dict:
    """CPU model and its int8-relevant features, read by edgetransfer itself, and the raw flags."""
    features = cpu_features()
    flags = [name for name in ("avx2", "avx512", "vnni", "amx", "arm_dotprod") if getattr(features, name)]
    try:
        listed = next(
            (
                line.split(":", 1)[1].split()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.lower().startswith(("flags", "features"))
            ),
            [],
        )
    except OSError:
        listed = []
    return {"model": features.model, "flags": flags, "cpuinfo_flags": [f for f in CPUINFO_FLAGS if f in listed]}


def fingerprint(torch_threads: int) -> dict:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu(),
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1),
        "torch_threads": torch_threads,
        "versions": versions(),
    }


def save_results(stem: str, report: dict, markdown: str) -> None:
    """Write benchmarks/results/<stem>.json and .md and print the Markdown."""
    import json

    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / f"{stem}.md").write_text(markdown)
    print(markdown)
