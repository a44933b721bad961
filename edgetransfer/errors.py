"""The exceptions edgetransfer raises for problems a user can fix.

Every message says what was wrong and what to do about it, in one line; the CLI prints it
as is and exits non-zero. Anything else escaping the library is a bug.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "EdgeTransferError",
    "DataError",
    "ModelError",
    "WeightsError",
    "RunError",
    "UnknownNameError",
    "unknown_name",
]


class EdgeTransferError(Exception):
    """Base class: a user-facing problem with a one-line, actionable message."""


class DataError(EdgeTransferError):
    """The image data is missing, empty, unreadable or inconsistent."""


class ModelError(EdgeTransferError):
    """An architecture cannot be built or its classifier cannot be swapped."""


class WeightsError(ModelError):
    """Pretrained weights cannot be found, fetched or loaded into the architecture."""


class RunError(EdgeTransferError):
    """A run directory is missing, belongs to another run, or cannot be resumed."""


class UnknownNameError(EdgeTransferError):
    """A name (architecture, weights, option value) is not one we know."""


def unknown_name(kind: str, name: str, known: Iterable[str], *, show: int = 12) -> UnknownNameError:
    """Build the error for an unknown ``name``, with close matches and (part of) the full list.

    Args:
        kind: what the name is of, e.g. ``"architecture"``.
        name: the name the user gave.
        known: every valid name.
        show: how many valid names to list when the list is long.

    Returns:
        An :class:`UnknownNameError` to raise.
    """
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    listed = ", ".join(known[:show]) + (f", … ({len(known)} in all)" if len(known) > show else "")
    return UnknownNameError(f"unknown {kind} {name!r}.{hint} Known: {listed}.")
