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


# ---- the JSON section is the report dataclasses, field for field ----

_PART = re.compile(r"^- `(\w+)`(?: \(([^)]*)\))?: (.*)$")


def _json_section() -> str:
    return README.split("### JSON output")[1].split("\n## ")[0]


def _documented_parts() -> dict[str, tuple[str, list[str]]]:
    """Part name -> (what it extends, its keys in order), from the "- `Part`: …" lines."""
    parts = {}
    for line in _json_section().splitlines():
        m = _PART.match(line)
        if m is None:
            continue
        note = m.group(2) or ""
        base = re.match(r"`(\w+)` \+", note)
        # keys: backticked names at the top level of the list (parenthesised notes dropped)
        keys_text = re.sub(r"\([^)]*\)", "", m.group(3))
        keys = re.findall(r"`(\w+)`", keys_text)
        parts[m.group(1)] = (base.group(1) if base else "", keys)
    return parts


def _report_parts() -> dict[str, type]:
    """Every dataclass reachable from the four reports (and the configs)."""
    import dataclasses
    import typing

    import meaning_transform.studies.report as report
    from meaning_transform.diagnostics import (
        attribution,
        findings,
        gradient_summary,
        kl_terms,
        latent,
        parameters,
        probe,
        tensor_stats,
    )

    namespace: dict[str, object] = {}
    for module in (
        report,
        attribution,
        findings,
        gradient_summary,
        kl_terms,
        latent,
        parameters,
        probe,
        tensor_stats,
    ):
        namespace.update(vars(module))
    found: dict[str, type] = {}

    def walk(t: object) -> None:
        for arg in typing.get_args(t):
            walk(arg)
        if isinstance(t, type) and dataclasses.is_dataclass(t) and t.__name__ not in found:
            found[t.__name__] = t
            for hint in typing.get_type_hints(t, globalns=namespace).values():
                walk(hint)

    for cls in (
        report.DebugLossReport,
        report.AnnealReport,
        report.CheckGradsReport,
        report.DistributedCheckGradsReport,  # check-grads --nproc N
        report.DebugExtendedReport,
        report.DebugLossConfig,
        report.AnnealConfig,
        report.CheckGradsConfig,
        report.DistributedCheckGradsConfig,
        report.DebugExtendedConfig,
    ):
        walk(cls)
    return found


def test_readme_header_table_is_the_report_base_fields():
    import dataclasses

    from meaning_transform.studies.report import Report

    table = _json_section().split("then the command's own keys")[0]
    keys = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    assert keys == [f.name for f in dataclasses.fields(Report)]


def test_readme_json_parts_match_the_dataclasses():
    import dataclasses

    from meaning_transform.studies.report import Report

    documented = _documented_parts()
    actual = _report_parts()
    assert set(documented) == set(actual) - {"Report"}, (
        sorted(set(actual) - set(documented)),
        sorted(set(documented) - set(actual)),
    )
    for name, (base, keys) in documented.items():
        fields = [f.name for f in dataclasses.fields(actual[name])]
        skip = set()
        if issubclass(actual[name], Report):
            skip = {f.name for f in dataclasses.fields(Report)}
        if base:
            skip = {f.name for f in dataclasses.fields(actual[base])}
        assert keys == [f for f in fields if f not in skip], name


def test_layout_map_names_every_module_once():
    section = README.split("## How the code is laid out")[1].split("\n## ")[0]
    listed = re.findall(r"^\| `([\w/.]+)` \|", section, flags=re.M)
    assert len(listed) == len(set(listed))
    package = ROOT / "meaning_transform"
    modules = {
        str(p.relative_to(package))
        for p in package.rglob("*.py")
        if p.name not in ("__main__.py", "_lazy.py", "_modes.py")
        and not (p.name == "__init__.py" and p.parent != package / "cli")
        and p.parent.name != "losses"
    } | {"losses/"}
    assert modules == set(listed), (sorted(modules - set(listed)), sorted(set(listed) - modules))


def test_the_github_actions_workflow_parses_and_runs_real_formats():
    """The README's workflow is valid YAML, and every mtx call in it uses a --format and a
    --fail-on value that exist."""
    import pytest

    from meaning_transform.diagnostics.findings import FAIL_ON
    from meaning_transform.formats import FORMATS

    yaml = pytest.importorskip("yaml")
    block = re.search(r"```yaml\n(name: mtx\n.*?)```", README, re.S)
    assert block, "the README has no GitHub Actions workflow"
    workflow = yaml.safe_load(block.group(1))
    steps = workflow["jobs"]["vae-doctor"]["steps"]
    runs = [s["run"] for s in steps if "run" in s and s["run"].startswith("mtx ")]
    assert len(runs) == 3
    assert {re.search(r"--format (\S+)", r).group(1) for r in runs} <= set(FORMATS)
    assert {re.search(r"--fail-on (\S+)", r).group(1) for r in runs} <= set(FAIL_ON)
    assert any("upload-sarif" in s.get("uses", "") for s in steps)
