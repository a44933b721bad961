"""mkdocs hook: ``reference/commands.md`` shows every command's ``--help`` as the terminal does,
made from the commands themselves at build time, so the page cannot drift from the CLI."""

from __future__ import annotations

import click

from edgetransfer.cli import COMMANDS, main
from edgetransfer.runtime.cli import build_parser

MARKER = "<!-- commands: generated -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != "reference/commands.md":
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"reference/commands.md lost its marker {MARKER}")
    return markdown.replace(MARKER, "\n\n".join(sections()))


def sections() -> list[str]:
    out = [block("edgetransfer", main.get_help(click.Context(main, info_name="edgetransfer", terminal_width=100, **main.context_settings)))]
    for name in sorted(COMMANDS):
        command = main.get_command(click.Context(main), name)
        parent = click.Context(main, info_name="edgetransfer", **main.context_settings)
        out.append(block(f"edgetransfer {name}", command.get_help(click.Context(command, info_name=name, parent=parent, terminal_width=100))))
    parser = build_parser()
    out.append(block("edgetransfer-runtime", parser.format_help()))
    for name, sub in parser._subparsers._group_actions[0].choices.items():  # noqa: SLF001 - argparse exposes them no other way
        out.append(block(f"edgetransfer-runtime {name}", sub.format_help()))
    return out


def block(title: str, text: str) -> str:
    return f"## `{title}`\n\n```text\n{text.rstrip()}\n```"
