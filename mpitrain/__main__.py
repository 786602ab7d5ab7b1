"""``python -m mpitrain``: see ``mpitrain.cli``."""

from mpitrain.cli import console_main

console_main()
