"""The exceptions the runtime raises for a problem a user can fix, and the helpers that phrase them.

Each message says what was wrong and what to do about it, in one line; a CLI prints it as is and
exits non-zero. The toolkit's own errors (``edgetransfer.errors``) derive from these.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "EdgeTransferError",
    "OptionError",
    "MissingDependencyError",
    "UnknownNameError",
    "DataError",
    "PredictorError",
    "ImageError",
    "OpenVinoError",
    "unknown_name",
    "first_line",
]


class EdgeTransferError(Exception):
    """Base class: a user-facing problem with a one-line, actionable message."""


class OptionError(EdgeTransferError):
    """An option's value is out of range, or two options do not go together."""


class MissingDependencyError(EdgeTransferError):
    """An optional library is not installed; the message names the extra that installs it."""


class UnknownNameError(OptionError):
    """A name (architecture, weights, option value, variant) is not one we know."""


class DataError(EdgeTransferError):
    """The image data is missing, empty, unreadable or inconsistent."""


class PredictorError(EdgeTransferError):
    """A model that cannot be loaded, a provider that is not there, or an input we cannot use."""


class ImageError(DataError, PredictorError):
    """An image cannot be read or used: a data problem to the toolkit, an input problem to the runtime."""


class OpenVinoError(PredictorError):
    """An OpenVINO IR is unreadable, incomplete, not what it claims to be, or does not compile on the device."""


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


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of a library's exception message (its type when it has none)."""
    line = next((part.strip() for part in str(exc).splitlines() if part.strip()), type(exc).__name__)
    return line[:limit]
