"""Machine fingerprint recorded beside every benchmark result."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from edgetransfer.manifest import versions


def cpu() -> dict:
    info = {"model": platform.processor() or "unknown", "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            info["model"] = value.strip()
        if key.strip() == "flags":
            flags = set(value.split())
            info["flags"] = sorted(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8") if f in flags)
            break
    return info


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
