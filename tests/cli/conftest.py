from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from meaning_transform.cli import app


@dataclass
class Run:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.stdout)


@pytest.fixture
def mtx() -> Callable[..., Run]:
    runner = CliRunner()

    def invoke(*args: str) -> Run:
        result = runner.invoke(app, list(args))
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return Run(result.exit_code, result.stdout, result.stderr)

    return invoke


def assert_bad_input(run: Run, *words: str) -> None:
    """Exit 2, nothing on stdout, one line on stderr naming the problem, no traceback."""
    assert run.exit_code == 2, (run.exit_code, run.stdout, run.stderr)
    assert run.stdout == ""
    lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert "Traceback" not in run.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture(name="assert_bad_input")
def _assert_bad_input() -> Callable[..., None]:
    return assert_bad_input


@pytest.fixture
def agent_file(tmp_path):
    from meaning_transform.data import synthetic_agent_states

    path = tmp_path / "agents.npy"
    np.save(path, synthetic_agent_states(64, seed=3).numpy())
    return path
