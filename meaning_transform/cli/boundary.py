"""The CLI's error boundary: bad input ends in one line on stderr and exit code 2.

Library code raises specific exceptions (:class:`UsageProblem`, ``DataError``,
``DeviceError``, ``ModelSpecError``); :func:`user_errors_exit` around a command's
work turns exactly those into ``error: <one line>`` and ``typer.Exit(2)``. Anything
else is a bug and keeps its traceback.

While the command runs, the boundary also holds back library warnings (shown
after a normal run, dropped when the run ends in an error, so stderr is then the
one error line) and, with ``--json``, sends whatever user code prints to stdout
to stderr instead, so stdout stays pure JSON.

Nothing here imports torch or Rich at module level.
"""

from __future__ import annotations

import os
import sys
import unicodedata
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from typing import NoReturn, TextIO

import typer

USAGE_EXIT = 2
_LINE_BREAKS = {"\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"}


class UsageProblem(ValueError):
    """An option value or a path the user gave cannot be used."""


def one_line(text: str) -> str:
    """``text`` as one printable line: line breaks become spaces, other control
    characters (a terminal escape in a file name, say) become ``\\xNN`` escapes."""
    chars = []
    for ch in text:
        if ch in _LINE_BREAKS or ch == "\t":
            chars.append(" ")
        elif unicodedata.category(ch) == "Cc":
            chars.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            chars.append(ch)
    return "".join(chars).strip()


def fail(message: str) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr and exit with code 2."""
    print_error(message)
    raise typer.Exit(USAGE_EXIT)


def print_error(message: str) -> None:
    """``error: <message>`` on stderr, one line, the message as plain text: ``[bold]``
    or ``[/]`` in a path is shown, not read as Rich markup."""
    from rich.text import Text

    from meaning_transform.cli.console import console

    line = Text.assemble(("error:", "bold red"), " ", one_line(message))
    console(stderr=True).print(line, soft_wrap=True, emoji=False, highlight=False)


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input, not a bug. Imported lazily (torch)."""
    from meaning_transform.adapters import (
        InputShapeError,
        LossBindingError,
        LossResultError,
        OutputRolesError,
    )
    from meaning_transform.data import DataError
    from meaning_transform.training import DeviceError
    from meaning_transform.user_model import ModelSpecError

    return (
        UsageProblem,
        DataError,
        DeviceError,
        ModelSpecError,
        OutputRolesError,
        InputShapeError,
        LossBindingError,
        LossResultError,
    )


def user_message(error: BaseException) -> str | None:
    """The line to print when ``error`` is bad input, else None (a bug: re-raise)."""
    if isinstance(error, UsageProblem):  # checked first: needs no torch import
        return str(error)
    if isinstance(error, Exception) and isinstance(error, user_error_types()):
        return str(error)
    return None


@contextmanager
def user_errors_exit(*, json: bool = False) -> Iterator[None]:
    """Around a command's work: bad input becomes one red line on stderr and exit 2.

    Warnings raised inside are held back: replayed on stderr when the block ends
    normally, with a ``typer.Exit`` other than 2, or with a bug; dropped when it ends
    in bad input, so stderr then holds the error line alone. With ``json=True``,
    stdout is redirected to stderr inside the block (see :func:`stdout_to_stderr`).
    """
    held: list[warnings.WarningMessage] = []
    message: str | None = None
    try:
        with warnings.catch_warnings(record=True) as held, stdout_to_stderr(json):
            yield
    except typer.Exit as e:
        if e.exit_code != USAGE_EXIT:  # 2: fail() was called inside, the line is out
            _replay(held)
        raise
    except BaseException as e:
        message = user_message(e)
        if message is None:
            _replay(held)
            raise
    else:
        _replay(held)
    if message is not None:
        fail(message)


def _replay(held: list[warnings.WarningMessage]) -> None:
    for w in held:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


def _fd_of(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    # AttributeError: sys.stdout/stderr may be replaced by an object without fileno();
    # io.UnsupportedOperation is an OSError
    except (AttributeError, OSError, ValueError):
        return None


# The redirects in force, innermost last: (the stdout replaced, a dup of fd 1 or None).
_redirects: list[tuple[TextIO, int | None]] = []


@contextmanager
def stdout_to_stderr(enabled: bool = True) -> Iterator[None]:
    """Send everything written to stdout inside the block to stderr.

    ``sys.stdout`` is redirected; when it is the process's file descriptor 1, fd 1
    is pointed at stderr too, so C extensions and child processes cannot write to
    stdout either. Used with ``--json`` so that a ``print`` in the user's model
    cannot break the JSON document; print that document after the block, or inside
    it under :func:`real_stdout`.
    """
    if not enabled:
        yield
        return
    original = sys.stdout
    out_fd, err_fd = _fd_of(original), _fd_of(sys.stderr)
    saved: int | None = None
    original.flush()
    if out_fd == 1 and err_fd is not None and err_fd != 1:
        saved = os.dup(1)
        os.dup2(err_fd, 1)
    _redirects.append((original, saved))
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        _redirects.pop()
        if saved is not None:
            _flush_c_stdio()
            os.dup2(saved, 1)
            os.close(saved)


@contextmanager
def real_stdout() -> Iterator[None]:
    """Inside :func:`stdout_to_stderr`, write to the real stdout again; else a no-op."""
    if not _redirects:
        yield
        return
    original, saved = _redirects[-1]
    sys.stdout.flush()
    if saved is not None:
        _flush_c_stdio()
        os.dup2(saved, 1)
    try:
        with redirect_stdout(original):
            yield
    finally:
        original.flush()
        err_fd = _fd_of(sys.stderr)
        if saved is not None and err_fd is not None:
            os.dup2(err_fd, 1)


def _flush_c_stdio() -> None:
    """Flush C's stdio buffers (a C extension's ``printf``) while fd 1 is still stderr."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no libc to load (Windows): nothing to do
        pass
