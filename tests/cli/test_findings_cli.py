"""Findings in every command: healthy defaults are quiet, scenarios show, --fail-on decides."""

from __future__ import annotations

import pytest

COMMANDS = ("debug-loss", "debug-extended", "anneal-demo", "check-grads")


@pytest.mark.parametrize("command", COMMANDS)
def test_healthy_default_run_has_no_error_or_warning(mtx, command):
    run = mtx(command, "--json")
    assert run.exit_code == 0, run.stderr
    out = run.json
    loud = [(f["code"], f["where"]) for f in out["findings"] if f["severity"] != "info"]
    assert loud == []
    assert out["exit_code"] == 0


@pytest.mark.parametrize("command", COMMANDS)
def test_scenario_finding_appears_and_fails_the_run(mtx, command):
    extra = ("--data-kind", "agent_states") if command == "debug-extended" else ()
    run = mtx(command, "--json", "--epochs", "3", "--scenario", "frozen-noise", *extra)
    assert run.exit_code == 1  # frozen-noise is an error; --fail-on defaults to error
    finding = next(f for f in run.json["findings"] if f["code"] == "frozen-noise")
    assert finding["severity"] == "error" and finding["remedy"]


@pytest.mark.parametrize(
    ("fail_on", "code"), [("never", 0), ("error", 0), ("warning", 1)]
)
def test_fail_on_thresholds_for_a_warning(mtx, fail_on, code):
    run = mtx("debug-loss", "--json", "--kl-weight", "0.1", "--scenario", "legacy-reduction",
              "--epochs", "3", "--fail-on", fail_on)
    severities = {f["code"]: f["severity"] for f in run.json["findings"]}
    assert severities.get("batch-dependent-weights") == "warning"
    assert "error" not in severities.values()
    assert run.exit_code == code
    assert run.json["exit_code"] == code


def test_findings_table_for_people(mtx):
    run = mtx("check-grads", "--epochs", "2", "--scenario", "unused-params")
    assert run.exit_code == 0  # a warning does not fail at the default --fail-on error
    assert "unused-params" in run.stdout
