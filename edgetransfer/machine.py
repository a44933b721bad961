"""What a measurement ran on: the machine's fingerprint (CPU and its int8 features, cores,
memory, libraries, providers, GPU) and this process's memory."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import onnxruntime as ort
import torch

from .benchreport import Machine
from .cpu import cpu_features
from .rundir import versions

__all__ = ["machine_fingerprint", "rss_mb", "peak_rss_mb", "gpu_memory_reset"]


def machine_fingerprint(threads: int) -> Machine:
    """CPU model and int8 features, cores, memory, OS, library versions, providers, GPU."""

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else None
    found_versions = versions()
    try:
        import tensorrt  # optional heavy dependency (the tensorrt extra): its version, when installed

        found_versions["tensorrt"] = tensorrt.__version__
    except ImportError:
        pass
    gpu = None
    if torch.cuda.is_available():
        gpu = {"name": torch.cuda.get_device_name(0), "cuda": torch.version.cuda, "driver": nvidia_driver()}
    return Machine(
        cpu_features(),
        os.cpu_count(),
        round(memory, 1) if memory else None,
        platform.platform(),
        found_versions,
        ort.get_available_providers(),
        threads,
        False,
        gpu,
    )


def nvidia_driver() -> str | None:
    try:
        return Path("/proc/driver/nvidia/version").read_text().split("Kernel Module")[1].split()[0]
    except (OSError, IndexError):
        return None


def rss_mb() -> float:
    """Resident memory of this process now (Linux), in MiB."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource  # POSIX only: imported where it is used

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (it only grows), in MiB."""
    import resource  # POSIX only: imported where it is used

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_memory_reset():
    """torch.cuda with its peak counter reset, or None without a GPU. It sees the memory torch
    allocates (eager, TensorRT I/O), not ONNX Runtime's own CUDA arena."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda
