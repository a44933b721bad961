"""The run directory and its ``manifest.json``: what each stage made, from what, with what."""

from __future__ import annotations

import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__
from ._io import read_json, sha256_file, write_json

__all__ = ["Manifest", "versions", "now"]

MANIFEST = "manifest.json"
SCHEMA = 1
_PACKAGES = ("torch", "torchvision", "timm", "numpy", "pillow", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "nncf")


def now() -> str:
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


class Manifest:
    """``manifest.json`` of one run directory; every save is atomic."""

    def __init__(self, run_dir: str | Path, data: dict[str, Any]) -> None:
        self.run_dir = Path(run_dir)
        self.data = data

    @classmethod
    def load(cls, run_dir: str | Path) -> "Manifest":
        return cls(run_dir, read_json(Path(run_dir) / MANIFEST))

    @classmethod
    def create(cls, run_dir: str | Path, **fields: Any) -> "Manifest":
        data = {"schema": SCHEMA, "created": now(), "versions": versions(), **fields, "artifacts": {}}
        return cls(run_dir, data)

    @staticmethod
    def exists(run_dir: str | Path) -> bool:
        return (Path(run_dir) / MANIFEST).is_file()

    def record(
        self,
        name: str,
        path: str | Path,
        kind: str,
        parent: str | None = None,
        settings: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Add (or replace) artifact ``name`` with its sha256, size, parent and settings."""
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
        return write_json(self.run_dir / MANIFEST, self.data)
