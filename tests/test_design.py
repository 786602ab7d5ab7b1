"""docs/DESIGN.md is the map of record: it names every module under mpitrain/, every benchmark and example."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules() -> list[str]:
    found = []
    for folder, _, files in os.walk(os.path.join(ROOT, "mpitrain")):
        for name in files:
            if name.endswith(".py"):
                found.append(os.path.relpath(os.path.join(folder, name), os.path.join(ROOT, "mpitrain")))
    return sorted(found)


def test_the_map_names_every_module() -> None:
    with open(os.path.join(ROOT, "docs", "DESIGN.md")) as f:
        text = f.read()
    tree = text.split("```", 2)[1]  # the layout block
    entries, folder = set(), ""
    for line in tree.splitlines():
        match = re.match(r"^( *)(\S+)", line)
        if not match:
            continue
        depth, name = len(match.group(1)) // 2, match.group(2)
        if name.endswith("/"):
            folder = name if depth == 1 else folder
            continue
        if depth == 1:
            folder = ""
        entries.add(os.path.join(folder, name) if depth == 2 else name)
    missing = [m for m in _modules() if m not in entries]
    assert not missing, f"docs/DESIGN.md does not name {missing}"


def test_the_map_names_every_benchmark_and_example() -> None:
    with open(os.path.join(ROOT, "docs", "DESIGN.md")) as f:
        tree = f.read().split("```", 2)[1]
    entries, folder = set(), ""
    for line in tree.splitlines():
        if re.match(r"^\S+/$", line.split(" ", 1)[0]) and not line.startswith(" "):
            folder = line.split()[0]
        elif match := re.match(r"^  (\S+)", line):
            entries.add(folder + match.group(1))
    files = [
        f"{folder}/{name}"
        for folder in ("benchmarks", "examples")
        for name in sorted(os.listdir(os.path.join(ROOT, folder)))
        if name.endswith((".py", ".sh"))
    ]
    missing = [f for f in files if f not in entries]
    assert files and not missing, f"docs/DESIGN.md does not name {missing}"


def test_the_readme_links_the_map_instead_of_repeating_the_layout() -> None:
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert "docs/DESIGN.md" in readme
    assert "## Layout" not in readme


def test_the_readme_cli_reference_is_generated_from_the_parsers() -> None:
    from mpitrain import cli_reference

    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert cli_reference.updated(readme) == readme, "stale: run python -m mpitrain.cli_reference"
    assert "### `train`" in readme and "--timeline-steps A:B" in readme
