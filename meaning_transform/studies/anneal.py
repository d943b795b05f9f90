"""The study behind ``mtx anneal-demo``: train once with a β (KL-weight) schedule.

The training loop sets ``loss_fn.kl_loss_weight`` to the schedule's β at the start
of every epoch, so each epoch's record carries the β actually in force; the
report lists it next to the loss components it weighted.
"""

from __future__ import annotations

from dataclasses import replace

from meaning_transform.diagnostics.findings import NotChecked
from meaning_transform.scenarios import Scenario
from meaning_transform.studies.pipeline import Pipeline, epoch_row, weights_of
from meaning_transform.studies.report import AnnealConfig, AnnealReport, ScheduleInfo, frozen
from meaning_transform.training import BetaSchedule

RECON_WEIGHT = 1.0
SEMANTIC_WEIGHT = 0.5  # the original's; switched off by build_loss on non-agent data
# Rules that judge the trend of the total. While β changes, the total is a different
# objective each epoch (it rises as β rises), so these would raise false alarms.
TOTAL_TREND_CODES: tuple[str, ...] = ("loss-oscillation", "loss-plateau")
WHILE_BETA_CHANGES = "the total is a different objective each epoch while β changes"


def run_anneal(pipeline: Pipeline, schedule: BetaSchedule, options: AnnealConfig) -> AnnealReport:
    """Train one model with ``schedule`` driving the KL weight; return the report.

    The training epochs are the schedule's ``max_epochs``. While β changes, the rules
    on the trend of the total (``TOTAL_TREND_CODES``) are not applied and are listed
    as not checked. A scenario's KL weight is replaced by the schedule's β.
    """
    config = replace(pipeline.config, schedule=schedule)
    # The starting KL weight is overwritten by the schedule before the first step.
    model = pipeline.model()
    loss_fn = pipeline.loss(
        RECON_WEIGHT, schedule.beta(0, config.epochs), SEMANTIC_WEIGHT, model=model
    )
    betas = {schedule.beta(e, config.epochs) for e in range(config.epochs)}
    skipped = TOTAL_TREND_CODES if len(betas) > 1 else ()
    run = pipeline.diagnose(
        schedule.schedule_type,
        model,
        loss_fn,
        config=config,
        not_applicable=skipped,
        because=WHILE_BETA_CHANGES,
        unless_found=_replaced_by_schedule(pipeline.scenario),
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
    if scenario is None or "kl_loss_weight" not in scenario.loss_kwargs:
        return ()
    reason = (
        f"scenario {scenario.name} injects its fault through the KL weight, which the "
        "β schedule replaces every epoch"
    )
    return tuple(NotChecked(code, reason) for code in scenario.findings)
