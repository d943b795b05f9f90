"""Shell completion: Typer's --install-completion / --show-completion, and the choices of
--scenario, --schedule, --data-kind, --device, --fail-on and --format completed from
torch-free lists (a test holds each to the list the command checks against)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from meaning_transform.cli.common import FORMAT_CHOICES, completes
from meaning_transform.cli.debug_extended import DATA_KIND_CHOICES
from meaning_transform.constants import SCENARIO_NAMES, SCHEDULES


def _complete(*words: str) -> tuple[list[str], str]:
    """What bash completion offers after ``mtx WORDS`` (the last word being typed), and
    whether torch was imported (stderr)."""
    code = (
        "import atexit, sys\n"
        "sys.argv[0] = 'mtx'  # the program name the completion variable is named after\n"
        "atexit.register(lambda: print('torch' in sys.modules, file=sys.stderr))\n"
        "from meaning_transform.cli import main\n"
        "main()\n"
    )
    env = {
        **os.environ,
        "_MTX_COMPLETE": "complete_bash",
        "COMP_WORDS": " ".join(("mtx", *words)),
        "COMP_CWORD": str(len(words)),
    }
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.split(), run.stderr.strip()


def test_the_scenario_names_are_the_scenarios():
    from meaning_transform.scenarios import SCENARIOS

    assert tuple(SCENARIOS) == SCENARIO_NAMES


def test_the_format_choices_are_the_formats():
    from meaning_transform.formats import FORMATS

    assert tuple(FORMAT_CHOICES.split("|")) == tuple(FORMATS)


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (("debug-loss", "--scenario", "fro"), ["frozen-noise", "frozen-no-z"]),
        (("check-grads", "--scenario", "kl-"), ["kl-wrong-sign"]),
        (("anneal-demo", "--schedule", "c"), ["cyclical"]),
        (("anneal-demo", "--schedule", ""), list(SCHEDULES)),
        (("debug-extended", "--data-kind", "o"), ["one_hot"]),
        (("debug-loss", "--format", "s"), ["sarif"]),
        (("check-grads", "--fail-on", "w"), ["warning"]),
        (("debug-loss", "--device", "c"), ["cpu", "cuda"]),
        (("check-",), ["check-grads"]),
    ],
)
def test_bash_completion_offers_the_choices_without_importing_torch(words, expected):
    offered, torch_imported = _complete(*words)
    assert offered == expected
    assert torch_imported == "False"


def test_every_scenario_is_offered():
    offered, _ = _complete("debug-loss", "--scenario", "")
    assert offered == list(SCENARIO_NAMES)


def test_completes_filters_by_prefix():
    complete = completes(DATA_KIND_CHOICES)
    assert complete("") == list(DATA_KIND_CHOICES)
    assert complete("uni") == ["uniform"]
    assert complete("zzz") == []


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_show_completion_prints_a_script_for_the_shell(shell):
    run = subprocess.run(
        [str(Path(sys.executable).parent / "mtx"), "--show-completion", shell],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "_MTX_COMPLETE" in run.stdout or "_mtx" in run.stdout.lower(), run.stdout[:200]
