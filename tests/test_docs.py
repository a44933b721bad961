"""The documentation, held to the product: the README's recipe and the docs' runnable examples
run as written in a fresh directory, every command line the docs show parses with the real CLI
(as do the examples in every command's --help), the reference pages name every field the files
hold, and the site builds strictly (warnings and broken links are errors) with no network.

In the docs, a ```bash block runs (after the README's recipe, in the same directory, page by page
in the site's order); a ```sh block needs data, hardware or time the tests do not have, and its
command lines are parsed only.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import click
import onnx
import pytest
import yaml

from edgetransfer.cli import COMMANDS, main
from edgetransfer.runtime.cli import parse_args as runtime_parse_args
from edgetransfer.runtime_commands import serve_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)
STOP = {"|", ">", ">>", "2>", "&&", ";", "||", "&"}


def nav_pages() -> list[Path]:
    """The docs' pages in the site's order."""

    def walk(items) -> list[str]:
        found = []
        for item in items:
            for value in item.values() if isinstance(item, dict) else [item]:
                found.extend(walk(value) if isinstance(value, list) else [value])
        return found

    config = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
    return [ROOT / "docs" / page for page in walk(config["nav"])]


def blocks(path: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text(encoding="utf-8")) if lang == language]


def command_lines(block: str) -> list[list[str]]:
    """Each edgetransfer command of a shell block as its arguments (comments, pipes and
    redirections cut off; a line continued with a backslash joined)."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        cut = next((i for i, word in enumerate(words) if word in STOP), len(words))
        words = words[:cut]
        if words[:1] == ["torchrun"] and "-m" in words:  # torchrun … -m edgetransfer finetune …
            words = words[words.index("-m") + 1 :]
        if words and Path(words[0]).name in ("edgetransfer", "edgetransfer-runtime"):
            commands.append([Path(words[0]).name, *words[1:]])
    return commands


def parse(words: list[str]) -> None:
    """Parse a command line with the real CLI without running it.

    Raises:
        click.UsageError / SystemExit: an option or value the CLI does not take.
    """
    if words[0] == "edgetransfer-runtime":
        runtime_parse_args(words[1:])
        return
    with main.make_context("edgetransfer", words[1:]) as group, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # click 8.2 deprecates protected_args for 9.0, where args holds all
        name, *rest = [*getattr(group, "protected_args", []), *group.args]
        command = main.get_command(group, name)
        assert command is not None, f"no command {name!r}"
        command.make_context(name, list(rest), parent=group)  # click's parser consumes the list it is given
        if name == "serve":  # its options are the runtime's, passed on unparsed: parse them as it will
            serve_parser().parse_args(rest)


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in [README, *nav_pages()]:
        for language in ("sh", "bash"):
            for block in blocks(path, language):
                found += [(f"{path.relative_to(ROOT)}: {shlex.join(words)}", words) for words in command_lines(block)]
    return found


def help_examples() -> list[tuple[str, list[str]]]:
    found = []
    for name in COMMANDS:
        command = main.get_command(click.Context(main), name)
        text = (command.help or "").split("Examples:", 1)
        if len(text) == 2:
            found += [(f"{name} --help: {shlex.join(words)}", words) for words in command_lines(text[1])]
    return found


def test_the_docs_show_command_lines_and_every_command_has_examples():
    assert len(documented_commands()) > 40
    with_examples = {label.split(" --help")[0] for label, _ in help_examples()}
    assert {"finetune", "export", "bench", "predict", "enrol"} <= with_examples


@pytest.mark.parametrize("label, words", documented_commands() + help_examples(), ids=lambda value: value if isinstance(value, str) else "")
def test_every_command_line_the_docs_show_parses(label, words, capsys):
    try:
        parse(words)
    except (click.UsageError, SystemExit) as exc:
        pytest.fail(f"{label}: {getattr(exc, 'message', '') or capsys.readouterr().err.strip()}")


def test_a_command_line_with_an_option_the_cli_does_not_take_is_caught():
    for words in (["edgetransfer", "export", "runs/demo", "--precison", "int8"], ["edgetransfer-runtime", "predict", "m.onnx", "--topk", "3"]):
        with pytest.raises((click.UsageError, SystemExit)):
            parse(words)


def fresh_checkout(tmp_path: Path) -> Path:
    """A directory where the README's lines run as from a checkout: the environment they
    activate (this one) and the checkout's calibration images."""
    os.symlink(sys.prefix, tmp_path / ".venv")
    os.symlink(ROOT / "calibration", tmp_path / "calibration")
    return tmp_path


def run_bash(script: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    # the docs' blocks run in the environment the README's recipe activates
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> tuple[Path, str]:
    """The README's recipe, run once as written: the directory and what it printed."""
    [script] = blocks(README, "bash")
    where = fresh_checkout(tmp_path_factory.mktemp("checkout"))
    done = run_bash(script, where)
    assert done.returncode == 0, f"the README's recipe failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return where, done.stdout


@pytest.mark.slow
def test_the_readme_recipe_runs_as_written_and_says_what_it_should(recipe):
    where, printed = recipe
    manifest = json.loads((where / "runs/demo/manifest.json").read_text())
    assert {"checkpoint", "onnx", "ort-cpu-fp32", "ort-cpu-int8", "bench"} <= set(manifest["artifacts"])
    assert "recommended:" in printed  # bench
    assert re.search(r"ort-cpu-int8 +│ +onnx +│ +ort-cpu-int8\.onnx +│ +[\d.]+ MB +│ +ok", printed)  # info, the state checked
    assert re.search(r"calibration/digits/3/0089\.png +│ +1 +│ +3 ", printed)  # predict: the digit 3 comes first
    assert "matches the sha256 recorded in runs/demo/manifest.json" in printed  # check


@pytest.mark.slow
def test_the_readme_app_and_the_docs_runnable_examples_run(recipe):
    where, _ = recipe
    [app] = blocks(README, "python")
    done = subprocess.run([sys.executable, "-c", app], cwd=where, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "label='3'" in done.stdout.splitlines()[0]
    scripts = [(page, script) for page in nav_pages() for script in blocks(page, "bash")]
    assert scripts, "no page has a runnable example"
    for page, script in scripts:
        done = run_bash(script, where)
        assert done.returncode == 0, f"{page.relative_to(ROOT)}:\n{script}\n{done.stderr[-3000:]}"


def documented(page: str) -> set[str]:
    """Every name a reference page shows in code spans."""
    return set(re.findall(r"`([^`\s]+)`", (ROOT / "docs/reference" / page).read_text(encoding="utf-8")))


@pytest.mark.slow
def test_the_reference_pages_name_every_field_the_recipe_wrote(recipe):
    run = recipe[0] / "runs/demo"
    manifest = json.loads((run / "manifest.json").read_text())
    variant = manifest["artifacts"]["ort-cpu-int8"]
    fields = {*manifest, *manifest["finetune"], *variant, *variant["report"], *manifest["artifacts"]["onnx"]["parity"]}
    assert fields - documented("manifest.md") == set()
    bench = json.loads((run / "bench.json").read_text())
    fields = {*bench, *bench["options"], *bench["machine"], *bench["recommendation"]}
    for row in bench["results"]:
        fields |= {*row, *row.get("accuracy", {}), *next(iter(row.get("latency", {}).values()), {})}
    assert fields - documented("bench-json.md") == set()
    for model in ("model.onnx", "ort-cpu-int8.onnx", "model-uint8.onnx"):
        if (run / model).exists():
            keys = {prop.key for prop in onnx.load(str(run / model), load_external_data=False).metadata_props}
            assert keys - documented("onnx-metadata.md") == set(), model
    files = {path.name for path in run.iterdir() if path.is_file()}
    assert files - documented("run-directory.md") == set()


def build_site(source: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=source, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_site_builds_strictly_with_generated_results_and_commands(tmp_path):
    built = build_site(ROOT, tmp_path / "site")
    assert built.returncode == 0, built.stderr[-3000:]
    site = tmp_path / "site"
    assert {path.parent.name for path in site.glob("results/*/index.html")} >= {path.stem for path in (ROOT / "benchmarks/results").glob("*.md")}
    commands = (site / "reference/commands/index.html").read_text()
    assert "--max-accuracy-drop" in commands and "edgetransfer-runtime check" in commands
    text = re.sub(r"<[^>]+>", "", (site / "getting-started/index.html").read_text())
    assert "edgetransfer finetune --out runs/demo" in text  # the README's recipe, included


def test_a_broken_link_in_the_docs_fails_the_build(tmp_path):
    for name in ("docs", "benchmarks", "calibration"):
        (tmp_path / name).symlink_to(ROOT / name) if name != "docs" else shutil.copytree(ROOT / name, tmp_path / name)
    shutil.copy(ROOT / "mkdocs.yml", tmp_path)
    shutil.copy(README, tmp_path)
    page = tmp_path / "docs/export.md"
    page.write_text(page.read_text() + "\nSee [the variants](variant.md).\n")
    built = build_site(tmp_path, tmp_path / "site")
    assert built.returncode != 0 and "variant.md" in built.stderr
