"""The study behind ``mtx debug-loss``: the original weight study, done right.

Each weight configuration trains a fresh model from the same seed on the same
data, so the configurations are comparable (the original kept training one
model through all four).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meaning_transform.diagnostics.rules import RunEvidence, evaluate
from meaning_transform.studies.setup import (
    Dataset,
    ModelFactory,
    build_loss,
    default_model,
    epoch_row,
    report_epochs,
)
from meaning_transform.training import TrainConfig, train


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
) -> dict[str, Any]:
    """Train one fresh model per configuration; return the JSON-ready result."""
    shown = report_epochs(train_config.epochs, every)
    runs: list[dict[str, Any]] = []
    findings = []
    for cfg in configs:
        model = (
            model_factory(dataset.n_features, train_config.seed)
            if model_factory is not None
            else default_model(dataset.n_features, train_config.seed, dataset.tensor)
        )
        loss_fn = build_loss(cfg.recon, cfg.kl, cfg.semantic, dataset, reduction)
        result = train(
            model,
            loss_fn,
            dataset.tensor,
            train_config,
            on_epoch=(lambda _r: on_epoch()) if on_epoch else None,
        )
        epochs = [epoch_row(r) for r in result.records]
        run_findings = evaluate(
            RunEvidence(
                where=cfg.name,
                records=result.records,
                reduction=result.reduction,
                batch_size=result.batch_size,
            )
        )
        findings.extend(run_findings)
        last = epochs[-1]
        runs.append(
            {
                "name": cfg.name,
                "weights": {**cfg.as_dict(), "semantic": float(loss_fn.semantic_loss_weight)},
                "requested_weights": cfg.as_dict(),
                "reduction": result.reduction,
                "epochs": [e for e in epochs if e["epoch"] in shown],
                "final": last,
                "first_total": epochs[0]["total"],
                "findings": [f.code for f in run_findings],
            }
        )
    return {
        "command": "debug-loss",
        "data": dataset.describe(),
        "batch_size": result.batch_size,
        "reduction": reduction,
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
