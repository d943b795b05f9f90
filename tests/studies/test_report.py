"""The reports themselves: read-only, JSON in field order, the exit code from the findings."""

from __future__ import annotations

import dataclasses
import json

import pytest

from meaning_transform.diagnostics.findings import Finding
from meaning_transform.studies.report import json_data, to_json
from tests.studies.reports import BUILDERS


@pytest.fixture(scope="module")
def report():
    return BUILDERS["check-grads"]("no-grad-path", epochs=2)


def test_a_report_cannot_be_edited(report):
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.findings = ()
    with pytest.raises(TypeError):
        report.weights["kl"] = 0.0  # mappings are read-only views
    with pytest.raises(TypeError):
        report.findings[0].evidence["value"] = 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.diagnosis.collapse.status = "ok"


def test_json_keys_follow_the_dataclass_fields(report):
    data = json.loads(to_json(report))
    assert list(data) == [f.name for f in dataclasses.fields(report)]
    step = data["steps"][0]
    assert list(step) == [f.name for f in dataclasses.fields(report.steps[0])]
    assert data["findings"][0]["code"] == report.findings[0].code


def test_non_finite_numbers_are_null():
    finding = Finding("x", "error", "t", "m", "r", "w", {"value": float("nan")})
    assert json_data(finding)["evidence"] == {"value": None}
    assert "NaN" not in json.dumps(json_data([float("inf"), 1.0]), allow_nan=False)


def test_the_report_decides_its_exit_code(report):
    assert report.findings[0].severity == "error"
    assert report.exit_code == 1  # fail_on "error"
    for fail_on, code in (("never", 0), ("warning", 1), ("error", 1)):
        config = dataclasses.replace(report.config, fail_on=fail_on)
        assert dataclasses.replace(report, config=config).exit_code == code
    clean = dataclasses.replace(report, findings=())
    assert clean.exit_code == 0
    with pytest.raises(ValueError):
        dataclasses.replace(report, exit_code=0)  # not settable: it follows the findings


def test_same_seed_same_bytes():
    assert to_json(BUILDERS["check-grads"](epochs=1)) == to_json(BUILDERS["check-grads"](epochs=1))
