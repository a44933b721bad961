"""The run directory: every file a run holds, by name, and its ``manifest.json``.

One run directory carries the whole chain (dataset -> checkpoint -> ONNX -> variants -> bench).
Each stage opens it as a :class:`RunDir`, reads what earlier stages made, adds its artifact and
records it in the manifest (path, sha256, parent, settings, versions). Every file name of a run
is defined here and nowhere else.
"""

from __future__ import annotations

import itertools
import platform
import sys
from datetime import datetime, timezone
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from ._io import read_json, sha256_file, write_json
from .errors import RunError

if TYPE_CHECKING:
    from .data import DataSpec, Dataset, Sample

__all__ = ["RunDir", "Manifest", "versions", "now"]

SCHEMA = 2  # 2: an artifact's parent may be a list (bench.json); variant reports always carry kept_in_float, guard_steps, warnings
_PACKAGES = ("torch", "torchvision", "timm", "numpy", "pillow", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "nncf")


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the installed packages that shape results."""
    found = {"edgetransfer": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


class RunDir:
    """One run directory and the names of everything in it.

    Args:
        path: the folder; nothing is read until a method needs it.
    """

    CONFIG = "config.json"
    CHECKPOINT = "model.pt"
    LAST = "last.pt"
    METRICS = "metrics.json"
    CURVES = "curves.png"
    MANIFEST = "manifest.json"
    FEATURES = "cache/features.pt"
    ONNX = "model.onnx"
    ONNX_UINT8 = "model-uint8.onnx"
    BENCH_JSON = "bench.json"
    BENCH_MD = "bench.md"
    BENCH_PNG = "bench.png"
    TIMING_CACHE = "tensorrt.timing-cache"

    def __init__(self, path: str | Path | RunDir) -> None:
        self.path = path.path if isinstance(path, RunDir) else Path(path)

    def __truediv__(self, name: str | Path) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def checkpoint(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def onnx(self) -> Path:
        return self.path / self.ONNX

    def has_manifest(self) -> bool:
        return (self.path / self.MANIFEST).is_file()

    def require_checkpoint(self) -> Path:
        """The fine-tuned checkpoint's path.

        Raises:
            RunError: there is no fine-tuned run here.
        """
        if not self.checkpoint.is_file():
            raise RunError(f"no fine-tuned run at {self.path} (no {self.CHECKPOINT}); run edgetransfer finetune first")
        return self.checkpoint

    def checkpoint_sha256(self) -> str:
        return sha256_file(self.require_checkpoint())

    def load_checkpoint(self):
        """The fine-tuned model (CPU, eval mode) and its checkpoint payload."""
        from .checkpoint import load_checkpoint

        return load_checkpoint(self.require_checkpoint())

    def read_config(self) -> dict[str, Any]:
        """``config.json`` as written by finetune.

        Raises:
            RunError: the run has no config.
        """
        path = self.path / self.CONFIG
        if not path.is_file():
            raise RunError(f"{self.path} has no {self.CONFIG}; it is not an edgetransfer run (run edgetransfer finetune first)")
        return read_json(path)

    def data_spec(self) -> DataSpec:
        from .data import DataSpec

        return DataSpec.from_dict(self.read_config()["data"])

    @cached_property
    def dataset(self) -> Dataset:
        """The run's data, split exactly as it was for training."""
        from .data import load_dataset

        return load_dataset(self.data_spec())

    def validation(self, limit: int | None = None) -> list[Sample]:
        """The run's validation images, taken round-robin over the classes so that any ``limit``
        keeps them balanced; every stage checks and measures on these."""
        by_class: dict[int, list[Sample]] = {}
        for sample in self.dataset.val:
            by_class.setdefault(sample.label, []).append(sample)
        spread = [s for group in itertools.zip_longest(*by_class.values()) for s in group if s is not None]
        return spread[:limit] if limit else spread

    def relative(self, path: str | Path) -> Path:
        """``path`` relative to the run when it is inside it, else absolute."""
        try:
            return Path(path).resolve().relative_to(self.path.resolve())
        except ValueError:
            return Path(path).resolve()

    def manifest(self) -> Manifest:
        """The run's manifest.

        Raises:
            RunError: there is none.
        """
        if not self.has_manifest():
            raise RunError(f"no run at {self.path} (no {self.MANIFEST}); run edgetransfer finetune first")
        return Manifest(self.path, read_json(self.path / self.MANIFEST))

    def new_manifest(self, **fields: Any) -> Manifest:
        """A fresh manifest (not yet saved) with the run's versions and ``fields``."""
        data = {"schema": SCHEMA, "created": now(), "versions": versions(), **fields, "artifacts": {}}
        return Manifest(self.path, data)


class Manifest:
    """``manifest.json`` of one run directory; every save is atomic. Open it with :meth:`RunDir.manifest`."""

    def __init__(self, run_dir: str | Path, data: dict[str, Any]) -> None:
        self.run_dir = Path(run_dir)
        self.data = data

    @classmethod
    def load(cls, run_dir: str | Path) -> Manifest:
        return RunDir(run_dir).manifest()

    @property
    def artifacts(self) -> dict[str, dict[str, Any]]:
        return self.data["artifacts"]

    def record(
        self,
        name: str,
        path: str | Path,
        kind: str,
        parent: str | list[str] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Add (or replace) artifact ``name`` with its sha256, size, parent(s) and settings."""
        full = self.run_dir / path
        entry = {
            "path": str(Path(path)),
            "kind": kind,
            "sha256": sha256_file(full),
            "bytes": full.stat().st_size,
            "parent": parent,
            "settings": settings or {},
            "versions": versions(),
            "created": now(),
        }
        self.data["artifacts"][name] = entry
        return entry

    def save(self) -> Path:
        return write_json(self.run_dir / RunDir.MANIFEST, self.data)
