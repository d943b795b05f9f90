"""The Rich consoles the CLI prints to: tables on stdout, errors and progress on stderr.

Rich is imported inside :func:`console`, not here: importing it costs about 25 ms
that ``mtx --help`` does not need. This module imports nothing from the rest of the
CLI, so the renderer and the error boundary can both use it.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

PIPED_WIDTH = 120  # stdout is not a terminal and COLUMNS is unset: wide enough for CI logs


def stdout_width() -> int | None:
    """The width stdout tables are laid out for; None lets Rich ask the terminal.

    ``COLUMNS`` wins whenever it is set (terminal or pipe), so ``COLUMNS=80 mtx … | less``
    lays out for 80 columns. Otherwise a terminal is asked for its size, and a pipe or
    file gets :data:`PIPED_WIDTH`: Rich would otherwise take the size of whatever
    terminal stdin or stderr is attached to, or 80.
    """
    columns = os.environ.get("COLUMNS", "").strip()
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    isatty = getattr(sys.stdout, "isatty", None)
    if isatty is not None and isatty():
        return None
    return PIPED_WIDTH


def console(stderr: bool = False) -> Console:
    """A Rich console on stdout (or stderr), laid out for the width it prints to now.

    Built on each call, so the width, ``NO_COLOR`` and the stream are those in force
    when the command prints (a test runner swaps ``sys.stdout`` and the environment
    per invocation). ``highlight=False``: numbers are styled by the tables, not by
    Rich's guesses.
    """
    from rich.console import Console

    if stderr:
        return Console(stderr=True, highlight=False)
    return Console(highlight=False, width=stdout_width())
