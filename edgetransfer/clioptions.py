"""Click options made from the fields of the library's option dataclasses, so that a default,
a type and a list of choices are written once (in the dataclass) and the CLI cannot drift.

    @field_option(FinetuneConfig, "batch_size", "--batch-size", help="Images per step.")

makes ``--batch-size`` an ``int`` option whose default is ``FinetuneConfig.batch_size`` and whose
value arrives in the command as ``batch_size``; an enum field becomes a ``click.Choice`` of its
values; ``bool`` fields become flags (or ``--x/--no-x`` pairs).
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import functools
import types
import typing
from pathlib import Path
from typing import Any

import click

from .errors import EdgeTransferError, first_line
from .runtime.text import printable

__all__ = ["field_option", "field_default", "from_options", "friendly"]


def field_default(cls: type, name: str) -> Any:
    """The default of dataclass field ``name`` (its factory's value for a factory), enum members as their value."""
    field = _field(cls, name)
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        raise TypeError(f"{cls.__name__}.{name} has no default")
    return value.value if isinstance(value, enum.Enum) else value


def field_option(cls: type, name: str, *flags: str, help: str, **overrides: Any):  # noqa: A002 - click's own name
    """A ``click.option`` for field ``name`` of dataclass ``cls`` (see the module docstring).

    Args:
        cls: the options dataclass.
        name: the field; it is also the name the value arrives under.
        flags: the option's flags, e.g. ``"--batch-size"`` or ``"--amp/--no-amp"``.
        help: the help text; fields whose default depends on others say it here.
        overrides: any other ``click.option`` argument, which wins over the derived ones.
    """
    kind, optional = _unwrap(typing.get_type_hints(cls)[name])
    default = field_default(cls, name)
    settings: dict[str, Any] = {"default": default, "help": help, "show_default": default is not None and default is not False}
    if kind is bool:
        settings["is_flag"] = True
        settings["show_default"] = "/" in flags[0]
    elif isinstance(kind, type) and issubclass(kind, enum.Enum):
        settings["type"] = click.Choice([member.value for member in kind])
    elif kind is Path:
        settings["type"] = click.Path(path_type=Path)
    elif kind in (int, float, str):
        settings["type"] = kind
    settings.update(overrides)
    return click.option(*flags, name, **settings)


def from_options(cls: type, options: dict[str, Any], **values: Any):
    """An instance of dataclass ``cls`` from the command's options that are its fields (and ``values``)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in options.items() if k in names}, **values)


def _field(cls: type, name: str) -> dataclasses.Field:
    found = {f.name: f for f in dataclasses.fields(cls)}
    if name not in found:
        raise TypeError(f"{cls.__name__} has no field {name!r}")
    return found[name]


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """``int | None`` -> ``(int, True)``; ``int`` -> ``(int, False)``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return annotation, False


def friendly(command):
    """Library errors become one clean line, library bugs one line that says so, Ctrl-C a hint."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except EdgeTransferError as exc:
            if _debug():
                raise
            raise click.ClickException(printable(str(exc))) from exc  # names from files and models may carry terminal escapes
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, KeyboardInterrupt):
            raise
        except OSError as exc:
            if _debug():
                raise
            if exc.errno not in USER_OS_ERRORS:
                raise click.ClickException(_internal(exc)) from exc
            where = f" at {printable(exc.filename)}" if exc.filename else ""
            raise click.ClickException(f"{exc.strerror}{where}: {USER_OS_ERRORS[exc.errno]}; nothing was left half-written") from exc
        except Exception as exc:
            if _debug():
                raise
            raise click.ClickException(_internal(exc)) from exc

    return wrapper


# what the machine, not edgetransfer, refused: the user's to fix, said in one line
USER_OS_ERRORS = {
    errno.ENOSPC: "free some space (or write elsewhere) and run again",
    errno.EDQUOT: "free some of your quota (or write elsewhere) and run again",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.EACCES: "permission denied; write elsewhere or fix the permissions",
    errno.EPERM: "not permitted; write elsewhere or fix the permissions",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "the path is a folder; name a file",
    errno.ENAMETOOLONG: "the name is too long for the file system; choose a shorter path",
}


def _internal(exc: BaseException) -> str:
    return (
        f"internal error ({type(exc).__name__}: {printable(first_line(exc, 200))}). This is a bug in edgetransfer, not in"
        " your input: run again with --debug (or EDGETRANSFER_DEBUG=1) and report the traceback"
    )


def _debug() -> bool:
    """``--debug`` (or ``EDGETRANSFER_DEBUG=1``) given to the ``edgetransfer`` group."""
    context = click.get_current_context(silent=True)
    return bool(context is not None and context.find_root().params.get("debug"))
