"""A run's ``manifest.json``: what each stage made (path, sha256, size, parent, settings, the
versions that made it), and the checks that refuse a manifest this version did not write."""

from __future__ import annotations

import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__
from .errors import RunError
from .runtime.files import read_json, sha256_file, write_json
from .runtime.metadata import MANIFEST_FILE
from .runtime.text import printable

__all__ = ["Manifest", "SCHEMA", "STATUSES", "check_manifest", "now", "versions"]

SCHEMA = 2  # 2: an artifact's parent may be a list (bench.json); variant reports always carry kept_in_float, guard_steps, warnings
_PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "pillow",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "openvino",
    "nncf",
    "nvidia-modelopt",
    "aimet-onnx",
)


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


STATUSES = ("training", "complete")


def check_manifest(path: Path, data: dict[str, Any]) -> None:
    """A manifest this version wrote, or can read: a known schema and status, and artifact entries
    that name a file and its sha256. Anything else is refused before it is read or written into.

    Raises:
        RunError: naming the field or the entry, and what to do.
    """
    schema = data.get("schema", 1)
    if not isinstance(schema, int) or isinstance(schema, bool) or not 1 <= schema <= SCHEMA:
        raise RunError(
            f"{path} has schema {printable(schema)!s}, which this edgetransfer ({__version__}, schema {SCHEMA}) does not"
            " know: upgrade edgetransfer, or use another run directory"
        )
    status = data.get("status", "complete")
    if status not in STATUSES:
        raise RunError(
            f"{path} has status {printable(status)!s}, not one of {', '.join(STATUSES)}: it was not written by"
            " edgetransfer; restore it, or use another run directory"
        )
    for name, entry in data["artifacts"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not isinstance(entry.get("sha256"), str):
            raise RunError(
                f"{path}: the entry {printable(name)} is not an artifact record (a path and a sha256); restore the"
                " manifest, or remove the entry and build that artifact again (edgetransfer export)"
            )


class Manifest:
    """``manifest.json`` of one run directory; every save is atomic. Open it with :meth:`RunDir.manifest`."""

    def __init__(self, run_dir: str | Path, data: dict[str, Any]) -> None:
        self.run_dir = Path(run_dir)
        self.data = data

    @classmethod
    def load(cls, run_dir: str | Path) -> Manifest:
        """The manifest of ``run_dir``, checked (see :func:`check_manifest`).

        Raises:
            RunError: it is missing, is not JSON, or is not a manifest this version can read.
        """
        path = Path(run_dir) / MANIFEST_FILE
        if not path.is_file():
            raise RunError(f"no run at {run_dir} (no {MANIFEST_FILE}); run edgetransfer finetune first")
        try:
            data = read_json(path)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RunError(f"{path} is not valid JSON (truncated or edited?): {exc}; restore it, or run the run again") from exc
        if not isinstance(data, dict) or not isinstance(data.get("artifacts"), dict):
            raise RunError(f"{path} is not an edgetransfer manifest; restore it, or run the run again")
        check_manifest(path, data)
        return cls(run_dir, data)

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
        return write_json(self.run_dir / MANIFEST_FILE, self.data)
