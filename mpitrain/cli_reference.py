"""The README's command-line reference, generated from the argparse parsers so it cannot drift.

    python -m mpitrain.cli_reference           # rewrite the block in README.md
    python -m mpitrain.cli_reference --check   # exit 1 when README.md is stale (the tests do this)

The block sits between ``START`` and ``END`` markers: each subcommand's
``--help`` at a fixed width of ``WIDTH`` columns, so the text does not
depend on the terminal that generated it.
"""

from __future__ import annotations

import argparse
import os
import sys

START, END = "<!-- cli-reference: start (python -m mpitrain.cli_reference) -->", "<!-- cli-reference: end -->"
WIDTH = 100
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def render() -> str:
    """Every subcommand's help as Markdown: a heading and a text block each."""
    from mpitrain.cli import COMMANDS

    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)  # argparse wraps to the terminal's width, read from COLUMNS
    try:
        parts = []
        for name, (make_parser, _) in COMMANDS.items():
            text = make_parser("python -m mpitrain").format_help().rstrip()
            parts.append(f"### `{name}`\n\n```text\n{text}\n```")
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before
    return "\n\n".join(parts)


def updated(readme: str) -> str:
    """``readme`` with its reference block replaced by ``render()``.

    Raises:
        ValueError: the markers are missing.
    """
    if START not in readme or END not in readme:
        raise ValueError(f"README.md has no {START!r} ... {END!r} block")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n\n{render()}\n\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    """Rewrite README.md's reference (or, with --check, report whether it is current); the exit status."""
    parser = argparse.ArgumentParser(prog="python -m mpitrain.cli_reference", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the README's block is stale")
    parser.add_argument("--readme", default=README, help="the file (default: the checkout's README.md)")
    args = parser.parse_args(argv)
    with open(args.readme) as f:
        readme = f.read()
    fresh = updated(readme)
    if args.check:
        if fresh != readme:
            print(f"{args.readme}: the command-line reference is stale; run python -m mpitrain.cli_reference")
            return 1
        return 0
    with open(args.readme, "w") as f:
        f.write(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
