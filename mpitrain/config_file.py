"""``--config run.toml``: a TOML table of train options, read as the command-line flags it stands for.

The file's keys are the flags' names (``epochs``, ``batch-size`` or
``batch_size``, a strategy's own ``micro-batches``); its values are what the
flags take (lists for comma-separated values, true / false for switches).
Flags given on the command line come after the file's and so override them.
"""

from __future__ import annotations

import argparse
import difflib
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SKIP = ("config", "help")


def config_arguments(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """The command-line tokens that the TOML file ``path`` stands for, for ``parser``'s options.

    Raises:
        FileNotFoundError: no such file. ValueError: not TOML, an unknown key
        (naming the nearest valid one), a switch given something other than
        true or false, or a nested table.
    """
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--config {path}: not valid TOML: {exc}") from None
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in SKIP}
    tokens: list[str] = []
    for key, value in table.items():
        dest = key.replace("-", "_")
        action = actions.get(dest)
        if action is None:
            near = difflib.get_close_matches(dest, list(actions), n=1)
            hint = f"; the nearest option is {near[0].replace('_', '-')!r}" if near else ""
            raise ValueError(f"--config {path}: unknown option {key!r}{hint}")
        flag = max(action.option_strings, key=len)
        if isinstance(value, dict):
            raise ValueError(f"--config {path}: {key} is a table; options are plain keys")
        if action.nargs == 0:  # a switch: --nesterov, --no-progress
            if not isinstance(value, bool):
                raise ValueError(f"--config {path}: {key} takes true or false, got {value!r}")
            if value != action.default:
                tokens.append(flag)
            continue
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        tokens += [flag, text]
    return tokens
