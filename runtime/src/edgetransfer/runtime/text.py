"""Text from files, models and users, made safe to print: a class folder's name, a label or a
path can carry terminal escapes (set the window title, clear the screen, recolour what follows)
or newlines that forge output lines. Every line edgetransfer prints from such text goes through
:func:`printable`."""

from __future__ import annotations

__all__ = ["printable"]


def printable(text: object) -> str:
    """``text`` with control characters (terminal escapes, newlines) shown as escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))
