"""Build each command's report in-process, as the CLI would, with small settings."""

from __future__ import annotations

from dataclasses import replace

from meaning_transform.scenarios import SCENARIOS
from meaning_transform.studies.anneal import run_anneal
from meaning_transform.studies.check_grads import run_check_grads
from meaning_transform.studies.debug_extended import extended_datasets, run_debug_extended
from meaning_transform.studies.debug_loss import PRESETS, run_debug_loss
from meaning_transform.studies.pipeline import Pipeline
from meaning_transform.studies.report import (
    AnnealConfig,
    CheckGradsConfig,
    DebugExtendedConfig,
    DebugLossConfig,
    Report,
)
from meaning_transform.studies.setup import get_data
from meaning_transform.training import BetaSchedule, TrainConfig


def pipeline(scenario: str = "healthy", epochs: int = 10, seed: int = 0) -> Pipeline:
    fault = None if scenario == "healthy" else SCENARIOS[scenario]
    return Pipeline(
        dataset=get_data(None, seed=seed, scenario=fault),
        train_config=TrainConfig(epochs=epochs, batch_size=128, seed=seed, device="cpu"),
        scenario=fault,
    )


def debug_loss(scenario: str = "healthy", epochs: int = 10, presets: int = 1) -> Report:
    options = DebugLossConfig(epochs=epochs, scenario=scenario, device="cpu")
    return run_debug_loss(pipeline(scenario, epochs), PRESETS[:presets], options)


def anneal(scenario: str = "healthy", epochs: int = 16, schedule: str = "sigmoid") -> Report:
    options = AnnealConfig(epochs=epochs, scenario=scenario, schedule=schedule, device="cpu")
    return run_anneal(pipeline(scenario, epochs), BetaSchedule(schedule), options)


def check_grads(scenario: str = "healthy", epochs: int = 3) -> Report:
    options = CheckGradsConfig(epochs=epochs, scenario=scenario, device="cpu")
    return run_check_grads(pipeline(scenario, epochs), options)


def debug_extended(
    scenario: str = "healthy", epochs: int = 5, kind: str = "agent_states"
) -> Report:
    options = DebugExtendedConfig(epochs=epochs, scenario=scenario, data_kind=kind, device="cpu")
    base = pipeline(scenario, epochs)
    datasets = extended_datasets(kind, None, seed=0, scenario=base.scenario)
    return run_debug_extended(lambda d: replace(base, dataset=d), datasets, options)


BUILDERS = {
    "debug-loss": debug_loss,
    "anneal-demo": anneal,
    "check-grads": check_grads,
    "debug-extended": debug_extended,
}
