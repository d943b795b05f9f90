"""The README's promises: its set-up and test commands are CI's, every finding and
scenario is documented."""

from __future__ import annotations

import re
from pathlib import Path

from meaning_transform.diagnostics.rules import RULES
from meaning_transform.scenarios import SCENARIOS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()


def _code_lines(text: str) -> set[str]:
    starts = (".venv", "python3")
    return {line.strip() for line in text.splitlines() if line.strip().startswith(starts)}


def test_ci_runs_the_readme_setup_and_test_commands():
    ci_commands = _code_lines(CI)
    assert ci_commands, "no commands in .ci/run"
    assert ci_commands <= _code_lines(README)
    assert any("pytest" in c for c in ci_commands)
    assert any("pip install" in c for c in ci_commands)


def test_every_finding_code_is_documented_once():
    findings = README.split("## Findings")[1].split("### Fault scenarios")[0]
    for rule in RULES:
        code = rule.__name__.replace("_", "-")
        rows = re.findall(rf"^\| `{re.escape(code)}` \|", findings, flags=re.M)
        assert len(rows) == 1, code


def test_every_scenario_is_documented():
    for name, scenario in SCENARIOS.items():
        row = next(line for line in README.splitlines() if line.startswith(f"| `{name}` |"))
        for code in scenario.findings:
            assert f"`{code}`" in row
