"""What this CPU can do for INT8 and bf16, read before quantising or training (torch-free)."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuFeatures", "cpu_features"]


@dataclass(frozen=True)
class CpuFeatures:
    """The instruction-set features that decide whether INT8 pays off."""

    model: str
    machine: str
    avx2: bool = False
    avx512: bool = False
    vnni: bool = False  # AVX-512 VNNI or AVX-VNNI: int8 dot products in one instruction
    amx: bool = False  # AMX-INT8 tiles (Sapphire Rapids and later)
    arm_dotprod: bool = False
    bf16: bool = False  # native bfloat16 arithmetic (AVX-512 BF16, AMX-BF16, Arm BF16): where bf16 autocast pays

    @property
    def x86(self) -> bool:
        return self.machine in ("x86_64", "amd64", "i386", "i686")

    @property
    def int8_fast(self) -> bool:
        """INT8 convolutions are expected to beat FP32 here."""
        return self.vnni or self.amx or self.arm_dotprod

    @property
    def int8_saturates(self) -> bool:
        """ONNX Runtime's and OpenVINO's integer kernels here multiply u8 activations by s8 weights
        and add pairs of products in 16 bits (x86 without VNNI or AMX): with 8-bit weights the sums
        saturate, so only 7-bit weights give the exact int8 result."""
        return self.x86 and not self.int8_fast

    def summary(self) -> str:
        flags = [name for name in ("avx2", "avx512", "vnni", "amx", "arm_dotprod", "bf16") if getattr(self, name)]
        return f"{self.model} ({self.machine}; {', '.join(flags) or 'no SIMD int8 features found'})"

    def to_dict(self) -> dict:
        return {**self.__dict__, "int8_fast": self.int8_fast}


def cpu_features(cpuinfo: str | None = None) -> CpuFeatures:
    """Read the CPU's features (from ``/proc/cpuinfo`` on Linux; ``cpuinfo`` for tests)."""
    machine = platform.machine().lower()
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return CpuFeatures(platform.processor() or "unknown", machine)
    model, flags = platform.processor() or "unknown", set[str]()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model in ("unknown", "", platform.processor()):
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return CpuFeatures(
        model=model,
        machine=machine,
        avx2="avx2" in flags,
        avx512="avx512f" in flags,
        vnni="avx512_vnni" in flags or "avx_vnni" in flags,
        amx="amx_int8" in flags,
        arm_dotprod="asimddp" in flags,
        bf16=bool({"avx512_bf16", "amx_bf16", "bf16"} & flags),
    )
