"""The real entry point: usage errors are one line and exit 2; help needs no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = ("debug-loss", "debug-extended", "anneal-demo", "check-grads")


def _mtx(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meaning_transform", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (("debug-loss", "--epochs", "abc"), "--epochs"),
        (("debug-loss", "--bogus"), "--bogus"),
        (("nosuch",), "nosuch"),
        (("anneal-demo", "--schedule", "wobbly"), "--schedule"),
    ],
)
def test_usage_errors_are_one_line_exit_2(args, word):
    proc = _mtx(*args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and word in lines[0] and "Traceback" not in proc.stderr


def test_help_and_version():
    assert _mtx("--version").stdout.startswith("mtx ")
    proc = _mtx("--help")
    assert proc.returncode == 0
    for command in COMMANDS:
        assert command in proc.stdout
    assert _mtx().returncode == 0  # bare mtx shows the help


def test_json_run_through_the_entry_point_is_pure_json():
    import json

    proc = _mtx("debug-loss", "--epochs", "1", "--kl-weight", "0.1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["exit_code"] == 0


HELP_IMPORTS = """
import io, sys, contextlib
sys.argv = ["mtx", *sys.argv[1:]]
from meaning_transform.cli import main
try:
    with contextlib.redirect_stdout(io.StringIO()):
        main()
except SystemExit:
    pass
print(sorted(m for m in ("torch", "matplotlib", "rich.console", "pydantic") if m in sys.modules))
"""


@pytest.mark.parametrize("args", [("--help",), *((command, "--help") for command in COMMANDS)])
def test_help_imports_neither_torch_nor_matplotlib_nor_rich_nor_pydantic(args):
    """Help is answered from Typer alone: the Rich consoles are built on first use, and
    the root's unset flags are False, which Typer passes on without pydantic."""
    proc = subprocess.run(
        [sys.executable, "-c", HELP_IMPORTS, *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_a_bad_input_error_still_reaches_stderr_through_the_lazy_console(tmp_path):
    proc = _mtx("debug-loss", "--data", str(tmp_path / "missing.npy"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"error: data file not found: {tmp_path / 'missing.npy'}"
