"""Atomic file writes and hashing: a half-written artifact must never look finished."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from .errors import OptionError

__all__ = ["atomic_path", "write_bytes", "write_json", "read_json", "sha256_file"]


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` atomically.

    On any exception (an interrupt included) the temporary file is removed and ``target`` is
    left as it was.

    Raises:
        OptionError: ``target`` exists and is not a regular file (a device, a pipe, a folder):
            the rename would replace it.
    """
    target = Path(target)
    if target.exists() and not target.is_symlink() and not stat.S_ISREG(target.lstat().st_mode):
        raise OptionError(f"{target} exists and is not a regular file (a device, a pipe or a folder); choose another path")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get normal permissions
    try:
        yield tmp_path
        _fsync(tmp_path)
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_bytes(target: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Atomically write ``target`` by calling ``write(binary_file)``."""
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as handle:
            write(handle)
    return Path(target)


def write_json(target: str | os.PathLike, data: Any) -> Path:
    """Atomically write ``data`` as indented JSON."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    return write_bytes(target, lambda f: f.write(text.encode("utf-8")))


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
