"""argparse value types shared by the command line and the strategies' option groups."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from mpitrain.timeline import parse_window


def bounded(kind: Callable[[str], Any], low: float, what: str, inclusive: bool = True) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not (value >= low if inclusive else value > low) or value != value:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {what}")
        return value

    return parse


def hidden(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive sizes, e.g. 128,64")
    return sizes


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number in [0, 1)")
    return value


def compression(text: str) -> str:
    if text in ("none", "fp16", "bf16"):
        return text
    ratio = text[5:] if text.startswith("topk:") else ""
    try:
        valid = 0.0 < float(ratio) <= 1.0
    except ValueError:
        valid = False
    if not valid:
        raise argparse.ArgumentTypeError(f"{text!r}: expected none, fp16, bf16 or topk:RATIO with RATIO in (0, 1]")
    return text


positive_int = bounded(int, 1, "an integer >= 1")
nonneg_int = bounded(int, 0, "an integer >= 0")
positive_float = bounded(float, 0.0, "a number > 0", inclusive=False)
nonneg_float = bounded(float, 0.0, "a number >= 0")


def steps_window(text: str) -> str:
    """A ``--timeline-steps`` window, checked (``timeline.parse_window``) and kept as written."""
    try:
        parse_window(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
