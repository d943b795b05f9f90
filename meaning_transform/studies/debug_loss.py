"""The study behind ``mtx debug-loss``: the original weight study, done right.

Each weight configuration trains a fresh model from the same seed on the same
data, so the configurations are comparable (the original kept training one
model through all four).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meaning_transform.scenarios import Scenario
from meaning_transform.studies.setup import (
    Dataset,
    ModelFactory,
    build_loss,
    default_model,
    diagnose_training,
    epoch_row,
    report_epochs,
    scenario_train_config,
)
from meaning_transform.training import TrainConfig


@dataclass(frozen=True)
class WeightConfig:
    name: str
    recon: float
    kl: float
    semantic: float

    def as_dict(self) -> dict[str, float]:
        return {"reconstruction": self.recon, "kl": self.kl, "semantic": self.semantic}


PRESETS: tuple[WeightConfig, ...] = (
    WeightConfig("Default", 1.0, 0.1, 0.5),
    WeightConfig("Higher KL", 1.0, 1.0, 0.5),
    WeightConfig("No Semantic", 1.0, 0.1, 0.0),
    WeightConfig("Balanced", 1.0, 1.0, 1.0),
)


def run_debug_loss(
    configs: tuple[WeightConfig, ...],
    dataset: Dataset,
    train_config: TrainConfig,
    reduction: str = "mean",
    every: int = 0,
    model_factory: ModelFactory | None = None,
    on_epoch: Callable[[], None] | None = None,
    scenario: Scenario | None = None,
) -> dict[str, Any]:
    """Train one fresh model per configuration; return the JSON-ready result."""
    shown = report_epochs(train_config.epochs, every)
    runs: list[dict[str, Any]] = []
    findings = []
    train_config = scenario_train_config(train_config, scenario)
    for cfg in configs:
        model = (
            model_factory(dataset.n_features, train_config.seed)
            if model_factory is not None
            else default_model(dataset.n_features, train_config.seed, dataset.tensor, scenario)
        )
        loss_fn = build_loss(cfg.recon, cfg.kl, cfg.semantic, dataset, reduction, scenario)
        diagnosed = diagnose_training(
            cfg.name,
            model,
            loss_fn,
            dataset.tensor,
            train_config,
            on_epoch=(lambda _r: on_epoch()) if on_epoch else None,
        )
        result, run_findings = diagnosed.result, diagnosed.findings
        epochs = [epoch_row(r) for r in result.records]
        findings.extend(run_findings)
        last = epochs[-1]
        runs.append(
            {
                "name": cfg.name,
                "weights": {
                    "reconstruction": float(loss_fn.recon_loss_weight),
                    "kl": float(loss_fn.kl_loss_weight),
                    "semantic": float(loss_fn.semantic_loss_weight),
                },
                "requested_weights": cfg.as_dict(),
                "reduction": result.reduction,
                "epochs": [e for e in epochs if e["epoch"] in shown],
                "final": last,
                "first_total": epochs[0]["total"],
                "attribution": diagnosed.attribution,
                "latent": diagnosed.latent,
                "findings": [f.code for f in run_findings],
            }
        )
    return {
        "command": "debug-loss",
        "data": dataset.describe(),
        "batch_size": result.batch_size,
        "reduction": reduction,
        "scenario": scenario.name if scenario is not None else "healthy",
        "semantic_applicable": dataset.agent_layout,
        "reported_epochs": shown,
        "runs": runs,
        "summary": [_summary(run) for run in runs],
        "findings": [f.as_dict() for f in findings],
    }


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    last = run["final"]
    comps = last["components"]
    return {
        "name": run["name"],
        "weights": run["weights"],
        "first_total": run["first_total"],
        "final_total": last["total"],
        "final_raw": {name: row["raw"] for name, row in comps.items()},
        "final_grad_norm": last["grad_norm"],
        "flagged": sorted({f"{n}:{fl}" for n, row in comps.items() for fl in row["flags"]
                           if fl != "off"}),
        "findings": run["findings"],
    }
