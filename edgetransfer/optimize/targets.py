"""The registry of deployment targets: one record per target says which precisions it has, how a
variant is built, which runner benchmarks it, which ONNX Runtime provider it needs and which
files one artifact is made of. Adding a target is one record and one module, which registers
its record when the package imports it (``edgetransfer/optimize/__init__.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backends import Runner
from ..config import Precision, Target
from ..errors import OptionError, unknown_name
from ..results import VariantReport

__all__ = ["Target", "Precision", "Variant", "TargetSpec", "register", "spec", "registered", "spec_for_artifact"]


@dataclass
class Variant:
    """One built variant: its name (``<target>-<precision>``), main file and report."""

    name: str
    target: Target
    precision: Precision
    path: Path
    report: VariantReport = field(default_factory=VariantReport)

    @property
    def files(self) -> list[Path]:
        """Every file of the variant: an OpenVINO IR is its .xml and its .bin."""
        return spec(self.target).files(self.path)

    @property
    def size_bytes(self) -> int | None:
        return sum(f.stat().st_size for f in self.files) if all(f.exists() for f in self.files) else None


@dataclass(frozen=True)
class TargetSpec:
    """Everything edgetransfer knows about one target.

    Attributes:
        target: its name.
        precisions: the precisions it can build.
        kind: the manifest kind of its artifacts (``onnx``, ``openvino``, ``engine``).
        suffixes: the files one artifact is made of, main file first (an IR is ``.xml`` + ``.bin``).
        build: ``build(context, precision, quant, tensorrt) -> Variant``.
        runner: ``runner(path, threads) -> Runner`` for bench.
        check_available: raises when the target cannot be built here (library or provider missing).
        provider: the ONNX Runtime execution provider it runs on, for ONNX Runtime targets.
        missing_hints: per precision it lacks, what to use instead.
    """

    target: Target
    precisions: tuple[Precision, ...]
    kind: str
    suffixes: tuple[str, ...]
    build: Callable[..., Any]
    runner: Callable[[Path, int | None], Runner]
    check_available: Callable[[list[Precision]], None]
    provider: str | None = None
    missing_hints: dict[Precision, str] = field(default_factory=dict)

    def artifact(self, run_dir: Path, precision: Precision) -> Path:
        """The main file of this target's ``precision`` variant in ``run_dir``."""
        return run_dir / f"{self.target.value}-{precision.value}{self.suffixes[0]}"

    def files(self, path: Path) -> list[Path]:
        """Every file of the artifact whose main file is ``path``."""
        return [path] + [path.with_suffix(s) for s in self.suffixes[1:]]

    def check_precision(self, precision: Precision) -> None:
        """Refuse a precision this target does not have, saying what to use instead.

        Raises:
            OptionError: the target has no such variant.
        """
        if precision in self.precisions:
            return
        have = ", ".join(p.value for p in self.precisions)
        hint = self.missing_hints.get(precision, "pick one of those")
        raise OptionError(
            f"target {self.target.value} has no {precision.value} variant (it has {have}); {hint}."
            " Build other combinations with a second edgetransfer export"
        )


_REGISTRY: dict[Target, TargetSpec] = {}


def register(record: TargetSpec) -> TargetSpec:
    """Add a target's record.

    Raises:
        ValueError: the target is registered already (a bug: two modules claim it).
    """
    if record.target in _REGISTRY:
        raise ValueError(f"target {record.target.value} is registered twice")
    _REGISTRY[record.target] = record
    return record


def spec(target: Target | str) -> TargetSpec:
    """The record of ``target``.

    Raises:
        UnknownNameError: no such target, with close matches.
    """
    name = target.value if isinstance(target, Target) else str(target)
    found = next((s for t, s in _REGISTRY.items() if t.value == name), None)
    if found is None:
        raise unknown_name("target", name, [t.value for t in _REGISTRY])
    return found


def registered() -> list[TargetSpec]:
    """Every target's record, in registration order."""
    return list(_REGISTRY.values())


def spec_for_artifact(entry: dict[str, Any]) -> TargetSpec | None:
    """The target a manifest artifact was built for: the one its settings record; the run's
    own ONNX exports (no target recorded) run on ONNX Runtime's CPU provider. ``None`` for
    artifacts that are not models (metrics, plots, reports)."""
    recorded = entry.get("settings", {}).get("target")
    if recorded:
        return spec(recorded)
    return spec(Target.ORT_CPU) if entry.get("kind") == "onnx" else None
