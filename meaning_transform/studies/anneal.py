"""The study behind ``mtx anneal-demo``: train once with a β (KL-weight) schedule.

The training loop sets ``loss_fn.kl_loss_weight`` to the schedule's β at the start
of every epoch, so each epoch's record carries the β actually in force; the
report lists it next to the loss components it weighted.
"""

from __future__ import annotations

from dataclasses import replace

from meaning_transform.diagnostics.findings import NotChecked
from meaning_transform.diagnostics.vae_checks import TOTAL_TREND_CODES, WHILE_BETA_CHANGES
from meaning_transform.scenarios import Scenario
from meaning_transform.studies.pipeline import (
    Pipeline,
    epoch_row,
    steps_per_epoch,
    weights_of,
)
from meaning_transform.studies.report import AnnealConfig, AnnealReport, ScheduleInfo, frozen
from meaning_transform.training import BetaSchedule

RECON_WEIGHT = 1.0
SEMANTIC_WEIGHT = 0.5  # the original's; switched off by build_loss on non-agent data
__all__ = ["TOTAL_TREND_CODES", "WHILE_BETA_CHANGES", "run_anneal"]  # the trend rules set aside


def run_anneal(pipeline: Pipeline, schedule: BetaSchedule, options: AnnealConfig) -> AnnealReport:
    """Train one model with ``schedule`` driving the KL weight; return the report.

    The training epochs are the schedule's ``max_epochs``. While β changes, the rules
    on the trend of the total (``TOTAL_TREND_CODES``) are not applied and are listed
    as not checked. A scenario's KL weight is replaced by the schedule's β. The schedule
    is declared to the Doctor (β per step, and its maximum), so a loss that ignores the
    weight it is given (a user's ``--beta-kwarg`` it never reads) is ``beta-schedule``.
    """
    config = replace(pipeline.config, schedule=schedule)
    # The starting KL weight is overwritten by the schedule before the first step.
    model = pipeline.model()
    loss_fn = pipeline.loss(
        RECON_WEIGHT, schedule.beta(0, config.epochs), SEMANTIC_WEIGHT, model=model
    )
    betas = {schedule.beta(e, config.epochs) for e in range(config.epochs)}
    skipped = TOTAL_TREND_CODES if len(betas) > 1 else ()
    data = pipeline.dataset.tensor
    n = int(data.shape[0])
    per_epoch = steps_per_epoch(n, n if config.batch_size is None else min(config.batch_size, n))

    def beta_at(step: int) -> float:  # the loop sets β at the start of each epoch
        return schedule.beta(min(step // per_epoch, config.epochs - 1), config.epochs)

    run = pipeline.diagnose(
        schedule.schedule_type,
        model,
        loss_fn,
        config=config,
        not_applicable=skipped,
        because=WHILE_BETA_CHANGES,
        unless_found=_replaced_by_schedule(pipeline.scenario),
        beta_schedule=beta_at,
        beta_max=schedule.max_beta,
    )
    weights = weights_of(loss_fn)
    return AnnealReport(
        **pipeline.header(
            "anneal-demo", options, [run], semantic_applicable=pipeline.dataset.agent_layout
        ),
        schedule=ScheduleInfo(
            schedule.schedule_type,
            schedule.min_beta,
            schedule.max_beta,
            schedule.cycles,
            schedule.ratio,
        ),
        weights=frozen({k: w for k, w in weights.items() if k != "kl"}),  # KL is β
        reductions=frozen(run.result.reduction),
        epochs=tuple(epoch_row(r) for r in run.result.records),
        beta_curve=tuple(r.beta for r in run.result.records),
        diagnosis=run.diagnosis,
    )


def _replaced_by_schedule(scenario: Scenario | None) -> tuple[NotChecked, ...]:
    """A scenario that injects its fault through the KL weight has no fault here."""
    if scenario is None or not ("kl_loss_weight" in scenario.loss_kwargs or scenario.beta_fault):
        return ()
    reason = (
        f"scenario {scenario.name} injects its fault through the KL weight, which the "
        "β schedule replaces every epoch"
    )
    return tuple(NotChecked(code, reason) for code in scenario.findings)
