"""Every rule fires on the fault it names and stays quiet on the healthy run."""

from __future__ import annotations

import pytest

from meaning_transform.diagnostics.rules import RULES
from meaning_transform.scenarios import SCENARIOS, get_scenario
from meaning_transform.studies.debug_loss import PRESETS, run_debug_loss
from meaning_transform.studies.setup import get_data
from meaning_transform.training import TrainConfig

CONFIG = TrainConfig(epochs=10, batch_size=128)


def _findings(name: str) -> list[dict]:
    scenario = get_scenario(name)
    data = get_data(None, seed=0, scenario=scenario)
    return run_debug_loss(PRESETS[:1], data, CONFIG, scenario=scenario)["findings"]


def test_healthy_run_has_no_error_or_warning():
    bad = [f for f in _findings("healthy") if f["severity"] in ("error", "warning")]
    assert bad == []


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "healthy"])
def test_scenario_triggers_its_finding(name):
    scenario = SCENARIOS[name]
    found = _findings(name)
    codes = {f["code"] for f in found}
    assert scenario.findings, name
    for code in scenario.findings:
        assert code in codes, (name, code, codes)
        finding = next(f for f in found if f["code"] == code)
        assert finding["severity"] in ("error", "warning")
        assert finding["remedy"] and finding["evidence"]


def test_every_rule_has_a_scenario():
    codes = {code for s in SCENARIOS.values() for code in s.findings}
    for rule in RULES:
        code = rule.__name__.replace("_", "-")
        assert code in codes, f"rule {code} has no scenario that triggers it"


def test_unknown_scenario_is_a_value_error():
    with pytest.raises(ValueError, match="unknown scenario"):
        get_scenario("gremlins")
