"""Findings in every command: healthy defaults are quiet, scenarios show, --fail-on decides."""

from __future__ import annotations

from dataclasses import fields

import pytest

from meaning_transform.studies.report import Report, RunConfig

COMMANDS = ("debug-loss", "debug-extended", "anneal-demo", "check-grads")
# Every report starts with the fields of Report, in order (field order is key order),
# then the command's own body; its config with the options every command takes, then
# the command's own.
HEADER = [f.name for f in fields(Report)]
COMMON_CONFIG = [f.name for f in fields(RunConfig)]
HEADER_KEYS = [
    "command",
    "version",
    "config",
    "device",
    "data",
    "batch_size",
    "reduction",
    "scenario",
    "semantic_applicable",
    "findings",
    "not_checked",
    "exit_code",
]
CONFIG_KEYS = ["seed", "device", "epochs", "batch_size", "reduction", "fail_on", "plot"]


def test_header_and_config_fields():
    assert HEADER[:3] == ["command", "version", "config"] and HEADER[-1] == "exit_code"
    assert [k for k in HEADER if k in HEADER_KEYS] == HEADER_KEYS
    assert [k for k in COMMON_CONFIG if k in CONFIG_KEYS] == CONFIG_KEYS


OWN_CONFIG = {
    "debug-loss": ["recon_weight", "kl_weight", "semantic_weight", "every"],
    "debug-extended": ["data_kind", "samples"],
    "anneal-demo": ["schedule", "min_beta", "max_beta", "cycles", "ratio"],
    "check-grads": ["recon_weight", "kl_weight", "semantic_weight", "clip"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_healthy_default_run_has_no_error_or_warning(mtx, command):
    run = mtx(command, "--json")
    assert run.exit_code == 0, run.stderr
    out = run.json
    loud = [(f["code"], f["where"]) for f in out["findings"] if f["severity"] != "info"]
    assert loud == []
    assert out["exit_code"] == 0
    assert list(out)[: len(HEADER)] == HEADER
    assert list(out["config"]) == COMMON_CONFIG + OWN_CONFIG[command]
    assert out["config"]["fail_on"] == "error" and out["config"]["plot"] is None
    assert out["device"] == "cpu"  # the device used; the config keeps the "auto" asked for
    for item in out["not_checked"]:
        assert list(item) == ["code", "reason", "runs"] and item["runs"]


@pytest.mark.parametrize("command", COMMANDS)
def test_scenario_finding_appears_and_fails_the_run(mtx, command):
    extra = ("--data-kind", "agent_states") if command == "debug-extended" else ()
    run = mtx(command, "--json", "--epochs", "3", "--scenario", "frozen-noise", *extra)
    assert run.exit_code == 1  # frozen-noise is an error; --fail-on defaults to error
    rows = [f for f in run.json["findings"] if f["code"] == "frozen-noise"]
    assert len(rows) == 1  # one row however many runs found it
    finding = rows[0]
    assert finding["severity"] == "error" and finding["remedy"]
    assert finding["runs"] and finding["where"] == ", ".join(finding["runs"])
    if command == "debug-loss":  # the noise is frozen in every preset's model
        assert finding["runs"] == [r["name"] for r in run.json["runs"]]


def test_findings_are_merged_across_runs_per_subject(mtx):
    """debug-loss runs four presets: a finding is one row per (code, subject), naming
    the runs it was found in; each run's diagnosis keeps its own codes."""
    out = mtx("debug-loss", "--json", "--epochs", "1", "--scenario", "no-grad-path").json
    found_in = ["Default", "Higher KL", "Balanced"]  # No Semantic has the semantic term off
    rows = [f for f in out["findings"] if f["code"] == "no-grad-path"]
    where = [f["where"] for f in rows]
    assert len(set(where)) == len(where)  # one row per subject
    assert all(w.startswith("Default, Higher KL, Balanced: semantic/") for w in where)
    assert {
        "Default, Higher KL, Balanced: semantic/is_alive",
        "Default, Higher KL, Balanced: semantic/role",
    } <= set(where)
    assert all(f["runs"] == found_in for f in rows)
    for r in out["runs"]:
        assert ("no-grad-path" in r["diagnosis"]["findings"]) == (r["name"] in found_in)
    assert out["exit_code"] == 1


@pytest.mark.parametrize(("fail_on", "code"), [("never", 0), ("error", 0), ("warning", 1)])
def test_fail_on_thresholds_for_a_warning(mtx, fail_on, code):
    run = mtx(
        "debug-loss",
        "--json",
        "--kl-weight",
        "0.1",
        "--scenario",
        "legacy-reduction",
        "--epochs",
        "3",
        "--fail-on",
        fail_on,
    )
    severities = {f["code"]: f["severity"] for f in run.json["findings"]}
    assert severities.get("batch-dependent-weights") == "warning"
    assert "error" not in severities.values()
    assert run.exit_code == code
    assert run.json["exit_code"] == code
    assert run.json["config"]["fail_on"] == fail_on


def test_findings_table_for_people(mtx):
    run = mtx("check-grads", "--epochs", "2", "--scenario", "unused-params")
    assert run.exit_code == 0  # a warning does not fail at the default --fail-on error
    assert "unused-params" in run.stdout
