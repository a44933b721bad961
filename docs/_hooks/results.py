"""mkdocs hook: the results pages are the benchmarks' own output.

Every ``benchmarks/results/*.md`` (written by a script in ``benchmarks/`` from the JSON beside
it) becomes the page ``results/NAME.md`` of the site, and every ``*.png`` beside them an image
there; ``results.md`` lists them. Nothing is copied by hand, so a figure on the site is the
figure the last run of its benchmark wrote.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
MARKER = "<!-- results: generated -->"


def on_files(files: Files, config) -> Files:
    for path in sorted(RESULTS.iterdir()):
        if path.suffix in (".md", ".png"):
            files.append(File.generated(config, f"results/{path.name}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    if page.file.src_uri != "results.md":
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"results.md lost its marker {MARKER}")
    return markdown.replace(MARKER, index())


def index() -> str:
    rows = ["| result | what | machine |", "|---|---|---|"]
    for path in sorted(RESULTS.glob("*.md")):
        lines = path.read_text(encoding="utf-8").splitlines()
        title = next((line.lstrip("# ").strip() for line in lines if line.startswith("# ")), path.stem)
        machine = next((line for line in lines if line.startswith(("Machine:", "CPU:"))), "")
        machine = machine.split(". Produced by")[0].split(":", 1)[-1].strip().replace("|", "/")
        rows.append(f"| [{path.stem}](results/{path.name}) | {title.replace('|', '/')} | {machine[:90]} |")
    return "\n".join(rows)
