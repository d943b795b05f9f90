"""The study behind ``mtx anneal-demo``: train once with a β (KL-weight) schedule.

The training loop sets ``loss_fn.kl_loss_weight`` to the schedule's β at the start
of every epoch, so each epoch's record carries the β actually in force; the
result lists it next to the loss components it weighted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from meaning_transform.scenarios import Scenario
from meaning_transform.studies.setup import (
    Dataset,
    ModelFactory,
    build_loss,
    default_model,
    diagnose_training,
    epoch_row,
    scenario_train_config,
)
from meaning_transform.training import BetaSchedule, EpochRecord, TrainConfig

RECON_WEIGHT = 1.0
SEMANTIC_WEIGHT = 0.5  # the original's; switched off by build_loss on non-agent data
# Rules that judge the trend of the total. While β changes, the total is a different
# objective each epoch (it rises as β rises), so these would raise false alarms.
TOTAL_TREND_CODES: tuple[str, ...] = ("loss-oscillation", "loss-plateau")


def run_anneal(
    schedule: BetaSchedule,
    dataset: Dataset,
    train_config: TrainConfig,
    reduction: str = "mean",
    recon_weight: float = RECON_WEIGHT,
    semantic_weight: float = SEMANTIC_WEIGHT,
    model_factory: ModelFactory | None = None,
    on_epoch: Callable[[], None] | None = None,
    scenario: Scenario | None = None,
) -> dict[str, Any]:
    """Train one model with ``schedule`` driving the KL weight; return the JSON-ready result.

    ``train_config.epochs`` is the schedule's ``max_epochs``; a schedule already in
    ``train_config`` is replaced. While β changes, the rules on the trend of the total
    (``TOTAL_TREND_CODES``) are not applied and are listed under ``"not_checked"``.
    """
    config = scenario_train_config(replace(train_config, schedule=schedule), scenario)
    model = (
        model_factory(dataset.n_features, config.seed)
        if model_factory is not None
        else default_model(dataset.n_features, config.seed, dataset.tensor, scenario)
    )
    # The starting KL weight is overwritten by the schedule before the first step.
    loss_fn = build_loss(
        recon_weight, schedule.beta(0, config.epochs), semantic_weight, dataset, reduction,
        scenario,
    )
    diagnosed = diagnose_training(
        schedule.schedule_type,
        model,
        loss_fn,
        dataset.tensor,
        config,
        on_epoch=(lambda _r: on_epoch()) if on_epoch else None,
    )
    result, findings = diagnosed.result, diagnosed.findings
    beta_varies = len({r.beta for r in result.records}) > 1
    not_checked = list(TOTAL_TREND_CODES) if beta_varies else []
    findings = [f for f in findings if f.code not in not_checked]
    return {
        "command": "anneal-demo",
        "data": dataset.describe(),
        "batch_size": result.batch_size,
        "reduction": reduction,
        "reductions": result.reduction,
        "semantic_applicable": dataset.agent_layout,
        "schedule": {
            "type": schedule.schedule_type,
            "min_beta": schedule.min_beta,
            "max_beta": schedule.max_beta,
            "cycles": schedule.cycles,
            "ratio": schedule.ratio,
        },
        "weights": {
            "reconstruction": float(loss_fn.recon_loss_weight),
            "semantic": float(loss_fn.semantic_loss_weight),
        },
        "epochs": [_epoch(r) for r in result.records],
        "beta_curve": [r.beta for r in result.records],
        "not_checked": not_checked,
        "scenario": scenario.name if scenario is not None else "healthy",
        "attribution": diagnosed.attribution,
        "latent": diagnosed.latent,
        "findings": [f.as_dict() for f in findings],
    }


def _epoch(record: EpochRecord) -> dict[str, Any]:
    """The flat numbers the table shows, then the full component rows (with flags)."""
    row = epoch_row(record)
    return {
        "epoch": record.epoch,
        "beta": record.beta,
        "reconstruction": record.raw["reconstruction"],
        "kl": record.raw["kl"],
        "semantic": record.raw["semantic"],
        "weighted_kl": record.weighted["kl"],
        "total": record.total,
        "grad_norm": record.grad_norm,
        "grad_norm_max": record.grad_norm_max,
        "steps": record.steps,
        "skipped_steps": record.skipped_steps,
        "components": row["components"],
        "total_flags": row["total_flags"],
        "non_finite": row["non_finite"],
    }
