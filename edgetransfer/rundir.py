"""The run directory: every file a run holds, by name, and its ``manifest.json``.

One run directory carries the whole chain (dataset -> checkpoint -> ONNX -> variants -> bench).
Each stage opens it as a :class:`RunDir`, reads what earlier stages made, adds its artifact and
records it in the manifest (path, sha256, parent, settings, versions). Every file name of a run
is defined here and nowhere else.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import load_checkpoint
from .data import DataSpec, load_dataset
from .errors import RunError
from .manifest import SCHEMA, Manifest, now, versions
from .runtime.files import read_json, sha256_file
from .runtime.metadata import MANIFEST_FILE
from .tasks import TaskSpec, load_tasks, side_by_side

if TYPE_CHECKING:
    from .data import Dataset, DataSpec, Sample

__all__ = ["RunDir", "Manifest", "versions", "now"]


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
    MANIFEST = MANIFEST_FILE
    FEATURES = "cache/features.pt"
    FEATURES_OF = "cache/features-{task}.pt"  # a multi-task run's, one per task
    ONNX = "model.onnx"
    ONNX_UINT8 = "model-uint8.onnx"
    BENCH_JSON = "bench.json"
    BENCH_MD = "bench.md"
    BENCH_PNG = "bench.png"
    TIMING_CACHE = "tensorrt.timing-cache"

    def __init__(self, path: str | Path | RunDir) -> None:
        self.path: Path = path.path if isinstance(path, RunDir) else Path(path)

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

    @contextmanager
    def lock(self, create: bool = False) -> Iterator[None]:
        """Hold the run directory for writing: a second writer (another process) is refused, and
        temporary files a killed writer left behind are removed.

        The lock is a file beside the run directory (``.<name>.lock``), held with ``flock``; it
        is re-entrant within a process and released when the process ends, however it ends.

        Args:
            create: the run directory may not exist yet (a new run); otherwise a missing one is
                refused before anything is written.

        Raises:
            RunError: no run directory (without ``create``), a lock path that is not a regular
                file (a link, a device), or another process holds it (its pid is named).
        """
        key = str(self.path.resolve())
        if key in _HELD:
            yield
            return
        if not self.path.is_dir():
            if not create:
                raise RunError(f"no run directory at {self.path}; check the path, or run edgetransfer finetune first")
            existing = next(p for p in (self.path, *self.path.parents) if p.exists() or p == p.parent)
            if existing.exists() and not existing.is_dir():
                raise RunError(f"{existing} is a file, not a folder; pick another --out")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.parent / f".{self.path.name}.lock"
        made = not lock_path.exists()
        with _open_lock_file(lock_path) as handle:
            _acquire(handle, self.path)
            _HELD.add(key)
            try:
                self._remove_stale_temporaries()
                yield
            finally:
                _HELD.discard(key)
                if made and not self.path.exists():  # a run refused before it was made leaves nothing behind
                    lock_path.unlink(missing_ok=True)

    def _remove_stale_temporaries(self) -> None:
        """Temporary files and folders of an interrupted write (``.NAME.<random>.tmp``): with the lock held no
        writer can still be using them. Only this run's: a run inside it (a QAT child) has a lock
        of its own, and its writer may be busy."""
        if not self.path.is_dir():
            return
        for folder, subfolders, files in os.walk(self.path):
            subfolders[:] = [s for s in subfolders if not (Path(folder, s) / MANIFEST_FILE).is_file()]
            for name in [s for s in subfolders if s.startswith(".") and s.endswith(".tmp")]:  # a folder staged whole
                shutil.rmtree(Path(folder, name), ignore_errors=True)
                subfolders.remove(name)
            for name in files:
                if name.startswith(".") and name.endswith(".tmp"):
                    Path(folder, name).unlink(missing_ok=True)

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
        return load_checkpoint(self.require_checkpoint())

    def read_config(self) -> dict[str, Any]:
        """``config.json`` as written by finetune.

        Raises:
            RunError: the run has no config.
        """
        path = self.path / self.CONFIG
        if not path.is_file():
            raise RunError(f"{self.path} has no {self.CONFIG}; it is not an edgetransfer run (run edgetransfer finetune first)")
        config = self._read(self.CONFIG)
        if not isinstance(config, dict) or not isinstance(config.get("data"), dict):
            raise RunError(f"{path} is not an edgetransfer run config; restore it, or fine-tune again")
        return config

    def qat_record(self) -> dict[str, Any] | None:
        """The ``qat`` section of a QAT run's config (its parent, scheme and options), or ``None``
        for any other run, or for a folder with no readable config."""
        try:
            record = self.read_config().get("qat")
        except RunError:
            return None
        return record if isinstance(record, dict) else None

    def data_spec(self) -> DataSpec:
        """The data the run was trained on, as its config records it.

        Raises:
            RunError: the config's data section is not one this version reads.
        """
        try:
            return DataSpec.from_dict(self.read_config()["data"])
        except TypeError as exc:
            raise RunError(f"{self.path / self.CONFIG} has data settings this version does not know ({exc})") from exc

    @cached_property
    def dataset(self) -> Dataset:
        """The run's data, split exactly as it was for training."""
        tasks = self.read_config().get("tasks")
        if tasks:  # a multi-task run: every task's images, labelled task:class
            return side_by_side(load_tasks(tuple(TaskSpec.from_dict(task) for task in tasks)))
        return load_dataset(self.data_spec())

    def validation(self, limit: int | None = None) -> list[Sample]:
        """The run's validation images, taken round-robin over the classes so that any ``limit``
        keeps them balanced; export checks parity on these."""
        return _round_robin(self.dataset.val, limit)

    def held_out(self, limit: int | None = None) -> tuple[list[Sample], str]:
        """The images accuracy is reported on, and their split's name: the test split, which no
        stage chooses on; for a run without one, every other validation image (the INT8 guard
        chooses on the others: :meth:`selection`)."""
        if self.dataset.test:
            return _round_robin(self.dataset.test, limit), "test"
        unseen = self.validation()[1::2]
        return (unseen[:limit] if limit else unseen), "validation (the half the guard does not see)"

    def selection(self, limit: int | None = None) -> list[Sample]:
        """The images the INT8 accuracy guard chooses on, without their labels: validation images,
        which the weights never trained on (on training images a fitted head's margins are wider,
        and quantisation changes fewer of their top-1 classes: 0.6% there against 6% on test
        images for EfficientNet-Lite0). Never an image :meth:`held_out` returns."""
        images = self.validation() if self.dataset.test else self.validation()[0::2]
        return images[:limit] if limit else images

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
        return Manifest.load(self.path)

    def _read(self, name: str) -> Any:
        try:
            return read_json(self.path / name)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RunError(f"{self.path / name} is not valid JSON (truncated or edited?): {exc}; restore it, or run the run again") from exc

    def require_complete(self) -> Manifest:
        """The manifest of a finished fine-tuning run, its checkpoint checked against its record.

        Raises:
            RunError: no run, a run still training (or interrupted), or a checkpoint changed since.
        """
        manifest = self.manifest()
        if manifest.data.get("status") != "complete":
            raise RunError(
                f"{self.path} is still training or was interrupted (status {manifest.data.get('status')!r});"
                f" finish it with: edgetransfer finetune --resume {self.path}"
            )
        self.verify("checkpoint", "restore it, or fine-tune again")
        return manifest

    def verify(self, name: str, rebuild: str) -> Path:
        """The main file of artifact ``name`` (and an IR's weights), checked against the sha256
        the manifest recorded when it was made.

        Args:
            name: the artifact's name in the manifest.
            rebuild: what the user should do when it no longer matches.

        Raises:
            RunError: the artifact is not recorded, is missing, or has changed.
        """
        entry = self.manifest().artifacts.get(name)
        if entry is None:
            raise RunError(f"{self.path} records no artifact {name!r}; {rebuild}")
        recorded = [(self.path / entry["path"], entry["sha256"])]
        if "weights" in entry:
            recorded.append((self.path / entry["weights"]["path"], entry["weights"]["sha256"]))
        for path, sha256 in recorded:
            if not path.is_file():
                raise RunError(f"{path} is missing; {rebuild}")
            if sha256_file(path) != sha256:
                raise RunError(f"{path} has changed since it was recorded in {self.MANIFEST} (its sha256 differs); {rebuild}")
        return recorded[0][0]

    def rebuild_hint(self, name: str) -> str:
        """How to make artifact ``name`` again, for error messages."""
        entry = self.manifest().artifacts.get(name, {})
        settings = entry.get("settings", {})
        if name == "checkpoint":
            return "restore it, or fine-tune again"
        if "target" in settings and "precision" in settings:
            return f"rebuild it with: edgetransfer export {self.path} --target {settings['target']} --precision {settings['precision']}"
        fused = " --fuse-preprocess" if name == "onnx-uint8" else ""
        return f"export it again with: edgetransfer export {self.path}{fused}"

    def new_manifest(self, **fields: Any) -> Manifest:
        """A fresh manifest (not yet saved) with the run's versions and ``fields``."""
        data = {"schema": SCHEMA, "created": now(), "versions": versions(), **fields, "artifacts": {}}
        return Manifest(self.path, data)


_HELD: set[str] = set()  # run directories this process holds


def _open_lock_file(path: Path):
    """The lock file at ``path``, opened for reading and writing without following a link: a
    link or anything else that is not a regular file is refused, never written through.

    Raises:
        RunError: the path is a link, a directory, a device or a pipe, or cannot be opened.
    """
    hint = "it is not edgetransfer's lock file; remove it and run again"
    if path.is_symlink() or (path.exists() and not stat.S_ISREG(path.lstat().st_mode)):
        raise RunError(f"{path} is {'a symbolic link' if path.is_symlink() else 'not a regular file'}: {hint}")
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        descriptor = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a link planted after the check above
            raise RunError(f"cannot open the lock file {path} ({exc.strerror}): {hint}") from exc
        # a folder that takes no new files (/proc, read-only, no permission, full): the user's to choose another
        raise RunError(
            f"cannot create the lock file {path} ({exc.strerror}): {path.parent} takes no new files; use a folder you can write to"
        ) from exc
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise RunError(f"{path} is not a regular file: {hint}")
    return os.fdopen(descriptor, "r+")


def _acquire(handle, run_dir: Path) -> None:
    try:
        import fcntl  # POSIX only: imported where it is used
    except ImportError:  # no flock here (Windows): one writer at a time is the user's to keep
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        raise RunError(
            f"{run_dir} is being written by another edgetransfer process (pid {holder}); wait for it to finish, or use another run directory"
        ) from exc
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()


def _round_robin(samples: list[Sample], limit: int | None) -> list[Sample]:
    """``samples`` taken round-robin over their classes, so that any ``limit`` keeps them balanced."""
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample.label, []).append(sample)
    spread = [s for group in itertools.zip_longest(*by_class.values()) for s in group if s is not None]
    return spread[:limit] if limit else spread
