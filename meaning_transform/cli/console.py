"""The Rich consoles the CLI prints to: tables on stdout, errors and progress on stderr.

Rich is imported inside :func:`console`, not here: importing it costs about 25 ms
that ``mtx --help`` does not need. This module imports nothing from the rest of the
CLI, so the renderer and the error boundary can both use it.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, TextIO, cast

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


# Piped output is plain ASCII, one character for one, so that a line's bytes, its
# characters and its width on any terminal agree (box drawing, double bars and Greek
# letters are one column wide but two or three bytes, and East Asian terminals draw
# them two columns wide). Rich lays the tables out with the originals; each becomes one
# ASCII character, so nothing moves. Characters not listed (user text) pass unchanged.
ASCII_FOR: dict[int, str] = str.maketrans(
    {
        **dict.fromkeys("─━═╌┄", "-"),
        **dict.fromkeys("│┃║‖", "|"),
        **dict.fromkeys("┌┐└┘├┤┬┴┼╭╮╰╯┏┓┗┛┣┫┳┻╋╔╗╚╝╠╣╦╩╬", "+"),
        "→": ">",
        "←": "<",
        "↑": "^",
        "↓": "v",
        "·": ".",
        "•": "*",
        "×": "x",
        "−": "-",
        "–": "-",
        "—": "-",
        "≤": "<",
        "≥": ">",
        "≈": "~",
        "…": ".",
        "±": "~",
        "²": "2",
        "½": "h",
        "Δ": "d",
        "μ": "u",
        "λ": "l",
        "β": "b",
        "σ": "s",
        "ε": "e",
        "θ": "t",
        "∇": "g",
        "Σ": "S",
        "⋮": ":",
        "▁": "_",
        "▂": ".",
        "▃": ",",
        "▄": "-",
        "▅": "=",
        "▆": "+",
        "▇": "*",
        "█": "#",
    }
)


class _AsciiStream:
    """A text stream that writes :data:`ASCII_FOR` translations to the one it wraps."""

    encoding = "utf-8"  # Rich lays out with the original characters; write() swaps them

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(text.translate(ASCII_FOR))

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> object:  # fileno, getvalue, ...: the stream's own
        return getattr(self._stream, name)


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
    isatty = getattr(sys.stdout, "isatty", None)
    if isatty is not None and isatty():
        return Console(highlight=False, width=stdout_width())
    ascii_out = cast("TextIO", _AsciiStream(sys.stdout))  # write/flush/isatty, the rest passed on
    return Console(highlight=False, width=stdout_width(), file=ascii_out)
