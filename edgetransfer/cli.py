"""The ``edgetransfer`` command: a thin layer over the library.

Each command parses its options (made from the library's option dataclasses, so defaults and
choices live in one place), calls one library function and prints the result on stdout;
progress and warnings go to stderr. Library errors (:class:`EdgeTransferError`) become one line
on stderr and exit status 1; anything else is a bug, reported as one line that says so, with the
traceback under ``--debug`` or ``EDGETRANSFER_DEBUG=1``.
"""

from __future__ import annotations

import importlib

import click

from . import __version__

__all__ = ["main", "COMMANDS"]

# Each command, the module that defines it and its one-line help. A command's module is imported
# only when that command runs, so that ``edgetransfer --help`` and the torch-free ``predict`` and
# ``enrol`` start in a fraction of a second instead of importing torch, timm and scikit-learn
# (tests/test_cli.py checks that these lines are each command's own).
COMMANDS = {
    "finetune": ("edgetransfer.commands", "Fine-tune a pretrained CNN on an image folder (or the demo digits) into runs/."),
    "export": ("edgetransfer.deploy_commands", "Export a fine-tuned run to ONNX, check it against PyTorch, and build optimised variants."),
    "bench": ("edgetransfer.deploy_commands", "Benchmark every variant of a run against eager PyTorch, on the same data, in the same run."),
    "info": (
        "edgetransfer.commands",
        "Summarise a run (model, data, accuracy, every artifact and its state), or (without RUN_DIR) list the architectures that can be fine-tuned.",
    ),
    "predict": ("edgetransfer.runtime_commands", "Classify images with an exported model (torch-free runtime)."),
    "enrol": (
        "edgetransfer.runtime_commands",
        "Add a class to a prototype model from a few images, or replace or remove one (no training, no torch).",
    ),
    "serve": (
        "edgetransfer.runtime_commands",
        "Serve a run's recommended variant (or a model file) over HTTP with adaptive batching (needs edgetransfer[serve]).",
    ),
}


class _LazyGroup(click.Group):
    """A group whose commands are imported when they run (click's documented lazy loading); its
    help lists them from ``COMMANDS`` without importing any."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        return getattr(importlib.import_module(COMMANDS[cmd_name][0]), cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][1]) for name in self.list_commands(ctx)])


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgetransfer")
@click.option("--debug", is_flag=True, envvar="EDGETRANSFER_DEBUG", help="Show the full traceback of any error (or set EDGETRANSFER_DEBUG=1).")
def main(debug: bool) -> None:
    """Fine-tune a pretrained CNN, export it, optimise it and benchmark it for the edge."""
