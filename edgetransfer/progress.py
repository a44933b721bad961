"""Where output goes: results (tables, recommendations) on stdout through :data:`out`; progress,
warnings and errors on stderr through :data:`console`, as Unix tools do. Progress bars stay out
of the way when output is not a terminal or is silenced."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["console", "out", "progress", "set_quiet"]

# Piped output (logs, CI) gets room for the wide tables instead of rich's 80-column default.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)
out = Console(width=None if sys.stdout.isatty() else 150)
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence progress bars (tests, scripts)."""
    global _quiet
    _quiet = quiet


@contextmanager
def progress() -> Iterator[Progress]:
    """A rich Progress with a bar, counts, elapsed time and ETA."""
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=_quiet,
        transient=False,
    )
    with bar:
        yield bar
