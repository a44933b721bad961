"""The package's layers are a checked contract: import-linter holds the toolkit and the runtime to
the layers their pyproject.toml files write down, and fails on a planted upward import or cycle,
naming it. An import inside a function is only for an optional heavy dependency, and says so."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ROOT / "runtime"
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.argv = ['lint-imports', '--no-cache']; lint_imports_command()"
# What a function may import for itself: the optional extras (imported where they are used, so that
# the package works without them) and the POSIX-only standard modules. The runtime imports ONNX
# Runtime when it opens a session, so that a broken install (two builds at once) can still be named.
LAZY = {"openvino", "nncf", "tensorrt", "modelopt", "quark", "aimet_onnx", "tritonclient", "resource", "fcntl"}
RUNTIME_LAZY = LAZY | {"onnxruntime"}


def lint(cwd: Path, path: list[Path] | None = None) -> subprocess.CompletedProcess:
    """``lint-imports`` on the contracts in ``cwd/pyproject.toml``; with ``path``, in a Python that
    sees only those folders and the installed packages (the toolkit's own checkout hidden)."""
    if path is None:
        command = [sys.executable, "-c", LINT]
    else:
        roots = [str(p) for p in path] + [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
        command = [sys.executable, "-I", "-S", "-c", f"import sys; sys.path[:0] = {roots!r}; {LINT}"]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_toolkit_keeps_its_layers_and_has_no_import_cycle():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_the_runtime_keeps_its_layers_and_imports_neither_torch_nor_onnx():
    # only the runtime's sources are importable as edgetransfer.runtime: the toolkit is not there
    result = lint(RUNTIME, [RUNTIME / "src"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


@pytest.fixture
def planted(tmp_path: Path):
    """A copy of the toolkit's sources and contracts, to plant imports in."""
    shutil.copytree(ROOT / "edgetransfer", tmp_path / "edgetransfer", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")

    def plant(module: str, line: str) -> subprocess.CompletedProcess:
        path = tmp_path / "edgetransfer" / module
        path.write_text(path.read_text() + f"\n{line}\n")
        return lint(tmp_path, [tmp_path])

    return plant


def test_an_upward_import_breaks_the_layers_and_is_named(planted):
    result = planted("rundir.py", "from .bench import bench_run  # noqa: E402,F401")
    assert result.returncode == 1
    assert "Layers: the CLI, the stages" in result.stdout and "BROKEN" in result.stdout
    assert "edgetransfer.rundir -> edgetransfer.bench" in result.stdout


def test_a_cycle_inside_one_layer_is_found(planted):
    # guard is below context in the optimize package; the layers contract does not look inside it
    result = planted("optimize/guard.py", "from . import context  # noqa: E402,F401")
    assert result.returncode == 1
    assert "No import cycles among the modules of any package BROKEN" in result.stdout
    assert ".guard -> .context" in result.stdout


def test_an_import_inside_a_function_is_an_optional_dependency_that_says_so():
    found = []
    for root, lazy in ((ROOT / "edgetransfer", LAZY), (RUNTIME / "src" / "edgetransfer" / "runtime", RUNTIME_LAZY)):
        for path in sorted(root.rglob("*.py")):
            lines = path.read_text().splitlines()
            said_until = 0  # the last line of an import that said why (the ones right after it share its comment)
            for node in sorted(_function_imports(ast.parse("\n".join(lines))), key=lambda n: n.lineno):
                module = node.names[0].name if isinstance(node, ast.Import) else ("." * node.level + (node.module or ""))
                said = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].lstrip().startswith("#") or said_until == node.lineno - 1
                if module.split(".")[0] in lazy and said:
                    said_until = node.end_lineno
                else:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module}")
    assert found == []


def _function_imports(tree: ast.AST) -> set[ast.stmt]:
    return {
        node
        for function in ast.walk(tree)
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(function)
        if isinstance(node, (ast.Import, ast.ImportFrom))
    }


# --- rooms a reader can hold in mind ----------------------------------------------------------

SOURCES = (ROOT / "edgetransfer", RUNTIME / "src" / "edgetransfer" / "runtime")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 50  # a function from its def line to its last, docstring included


def _oversized(path: Path) -> list[str]:
    text = path.read_text()
    found = [f"{path.name}: {len(text.splitlines())} lines"] if len(text.splitlines()) > MAX_MODULE_LINES else []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
            found.append(f"{path.name}:{node.lineno} {node.name}(): {node.end_lineno - node.lineno + 1} lines")
    return found


def test_no_module_or_function_outgrows_one_reading(tmp_path):
    assert [line for root in SOURCES for path in sorted(root.rglob("*.py")) for line in _oversized(path)] == []
    planted = tmp_path / "planted.py"
    planted.write_text("def long():\n" + "    x = 1\n" * 50 + "\n" * 350)
    assert _oversized(planted) == ["planted.py: 401 lines", "planted.py:1 long(): 51 lines"]


def _private_imports(source: str, local: set[str]) -> list[str]:
    """``from M import _name`` and imports of a module ``_m`` (dunders aside), where M is this
    package, a relative import, or one of the ``local`` modules (the benchmarks' own)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            ours = node.level > 0 or module.split(".")[0] in {"edgetransfer", *local}
            private = [p for p in module.split(".") if p.startswith("_") and not p.startswith("__")]
            private += [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            if ours and private:
                found.append(f"{node.lineno}: from {'.' * node.level}{module} import {', '.join(private)}")
        elif isinstance(node, ast.Import):
            found += [
                f"{node.lineno}: import {a.name}"
                for a in node.names
                if a.name.split(".")[0] == "edgetransfer" and any(p.startswith("_") and not p.startswith("__") for p in a.name.split("."))
            ]
    return found


def test_no_private_name_is_imported_from_another_module():
    local = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} | {p.stem for p in (ROOT / "tests").glob("*.py")}
    found = [
        f"{path.relative_to(ROOT)}:{line}"
        for root in (*SOURCES, ROOT / "tests", ROOT / "benchmarks")
        for path in sorted(root.rglob("*.py"))
        for line in _private_imports(path.read_text(), local)
    ]
    assert found == []
    planted = "from edgetransfer.bench import _measure\nfrom . import _wire\nimport edgetransfer.runtime._predictor\nfrom fingerprint import _x\n"
    assert _private_imports(planted, {"fingerprint"}) == [
        "1: from edgetransfer.bench import _measure",
        "2: from . import _wire",
        "3: import edgetransfer.runtime._predictor",
        "4: from fingerprint import _x",
    ]


def test_onnx_runtime_sessions_are_opened_in_one_place():
    """``edgetransfer.runtime.sessions`` opens every ONNX Runtime session (threads, spinning,
    optimisation and errors set once); everything else, benchmarks included, goes through it."""
    calls = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for root in (*SOURCES, ROOT / "benchmarks")
        for path in sorted(root.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "InferenceSession"
    ]
    assert calls and all(call.startswith("runtime/src/edgetransfer/runtime/sessions.py:") for call in calls), calls
