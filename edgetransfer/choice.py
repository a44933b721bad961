"""Closed sets of names (modes, targets, precisions, …) shared by the CLI, the API and JSON."""

from __future__ import annotations

import enum
import re

from .errors import unknown_name

__all__ = ["Choice"]


class Choice(str, enum.Enum):
    """A string enum whose :meth:`parse` answers an unknown name with close matches."""

    @classmethod
    def kind(cls) -> str:
        """What the names are of, for messages: ``CalibMethod`` -> ``"calib method"``."""
        return re.sub(r"(?<!^)(?=[A-Z])", " ", cls.__name__).lower()

    @classmethod
    def parse(cls, name):
        """The member named ``name`` (or ``name`` itself when it is one).

        Raises:
            UnknownNameError: with close matches and the valid names.
        """
        if isinstance(name, cls):
            return name
        try:
            return cls(name)
        except ValueError:
            raise unknown_name(cls.kind(), str(name), [m.value for m in cls]) from None
