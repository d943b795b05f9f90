"""The study behind ``mtx check-grads``: per-parameter gradient statistics while training.

A :class:`~meaning_transform.diagnostics.gradients.GradientMonitor` rides along the
ordinary training loop and takes one snapshot per optimizer step. The result has a row
per step (total norm next to the value ``clip_grad_norm_`` returned for the same
gradients, first/last-layer ratio, parameters without a gradient) and, for the last
step, every parameter's statistics with flags.

Clipping: ``train()`` clips before any callback sees the gradients, so when a max norm
is given the study trains with ``train()``'s clipping off and clips itself right after
the snapshot, before the optimizer step. The statistics and ``total_norm`` therefore
describe the gradients *before* clipping; the update ratios describe the clipped update.
"""

from __future__ import annotations

import math
from dataclasses import fields, replace
from typing import Any

from torch import nn

from meaning_transform.diagnostics.distributed import RankEvidence
from meaning_transform.diagnostics.gradients import (
    GradientMonitor,
    GradientSnapshot,
    ParamGradStats,
)
from meaning_transform.diagnostics.rules import loss_scale
from meaning_transform.diagnostics.structure import biases_before_batch_norm
from meaning_transform.diagnostics.thresholds import LARGE_UPDATE, VANISHING_ABS_MEAN
from meaning_transform.studies.pipeline import Pipeline, weights_of
from meaning_transform.studies.report import (
    CheckGradsConfig,
    CheckGradsReport,
    ParamRow,
    StepRow,
    frozen,
)
from meaning_transform.training import StepContext


class _StepRecorder:
    """Step callback: snapshot the gradients, then clip them, then measure the update.

    ``train()`` calls ``after_backward`` before ``optimizer.step()`` and ``after_step``
    after it, for every step. A step whose loss was not finite had no backward pass
    (``train()`` skips it): it gets a row but no snapshot.
    """

    def __init__(self, model: nn.Module, clip: float | None) -> None:
        self.monitor = GradientMonitor(model, track_updates=True)
        self.monitor_has_input = False
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.clip = clip
        self.rows: list[dict[str, Any]] = []  # per step: epoch, step, loss, loop's norm
        self.snapshot_index: list[int | None] = []  # per step: index into monitor.history

    def after_backward(self, ctx: StepContext) -> None:
        loss = float(ctx.loss["loss"].detach())  # train() skips backward when not finite
        index = None
        if math.isfinite(loss):
            if not self.monitor_has_input:  # first/last layer in forward order
                self.monitor_has_input = True
                self.monitor.set_example_input(ctx.batch[:8])
            self.monitor.after_backward()
            index = len(self.monitor.history) - 1
            if self.clip is not None:
                nn.utils.clip_grad_norm_(self.params, max_norm=self.clip)
        self.snapshot_index.append(index)
        self.rows.append(
            {"step": ctx.step, "epoch": ctx.epoch, "loss": loss, "clip_grad_norm": ctx.grad_norm}
        )

    def after_step(self, ctx: StepContext) -> None:
        self.monitor.after_step()


def run_check_grads(
    pipeline: Pipeline,
    options: CheckGradsConfig,
    recon: float = 1.0,
    kl: float = 0.1,
    semantic: float = 0.5,
    where: str | None = None,
) -> CheckGradsReport:
    """Train one fresh model, monitoring every step's gradients; return the report.

    ``pipeline.train_config.clip_grad_norm`` (if set) is applied after each snapshot, so
    every reported norm is the norm before clipping (see the module docstring).
    ``where`` names the run in the findings (default: the data kind; one rank of a
    distributed run: "rank 1").
    """
    return check_grads_run(pipeline, options, recon, kl, semantic, where)[0]


def check_grads_run(
    pipeline: Pipeline,
    options: CheckGradsConfig,
    recon: float = 1.0,
    kl: float = 0.1,
    semantic: float = 0.5,
    where: str | None = None,
) -> tuple[CheckGradsReport, RankEvidence | None]:
    """:func:`run_check_grads`, with the rank checks' evidence of a distributed run
    (``pipeline.parallel``; None otherwise)."""
    model = pipeline.model()
    loss_fn = pipeline.loss(recon, kl, semantic, model=model)
    clip = pipeline.config.clip_grad_norm
    recorder = _StepRecorder(model, clip)
    run = pipeline.diagnose(
        where or pipeline.dataset.kind,
        model,
        loss_fn,
        config=replace(pipeline.config, clip_grad_norm=None),  # clipped by the recorder instead
        callbacks=(recorder,),
    )
    history = recorder.monitor.history
    steps = tuple(
        _step_row(row, history[i] if i is not None else None, clip)
        for row, i in zip(recorder.rows, recorder.snapshot_index, strict=True)
    )
    never = _never_received(history)
    last = history[-1] if history else None
    cancelled = set(biases_before_batch_norm(model))
    last_row = next((s for s in reversed(steps) if s.total_norm is not None), None)
    # "tiny" is relative to the loss scale, as vanishing-grad is (a summed loss has
    # gradients x batch): mean |g| below VANISHING_ABS_MEAN x the median |loss| of the
    # last steps (1 when no finite loss was recorded)
    tiny = VANISHING_ABS_MEAN * (loss_scale(run.evidence) or 1.0)
    report = CheckGradsReport(
        **pipeline.header(
            "check-grads", options, [run], semantic_applicable=pipeline.dataset.agent_layout
        ),
        weights=frozen(weights_of(loss_fn)),
        clip=clip,
        thresholds=frozen({"tiny_abs_mean": tiny, "large_update": LARGE_UPDATE}),
        steps=steps,
        last_step=last.step if last is not None else None,
        parameters=tuple(
            ParamRow(**_stats_fields(s), flags=param_flags(s, never, s.name in cancelled, tiny))
            for s in (last.params if last is not None else ())
        ),
        total_norm=last.total_norm if last is not None else None,
        clip_grad_norm=last_row.clip_grad_norm if last_row is not None else None,
        first_last_ratio=last.first_last_ratio if last is not None else None,
        first_layer=last.first_layer if last is not None else None,
        last_layer=last.last_layer if last is not None else None,
        never_received=never,
        diagnosis=run.diagnosis,
    )
    return report, run.ranks


def param_flags(
    stats: ParamGradStats,
    never_received: tuple[str, ...],
    bn_absorbed: bool,
    tiny: float = VANISHING_ABS_MEAN,
) -> tuple[str, ...]:
    """What looks wrong with one parameter at the last monitored step.

    - ``no-grad``: requires grad but received none in any monitored step (not in the graph).
    - ``missing``: no gradient at the last step, though it had one earlier.
    - ``non-finite``: NaN/Inf entries in the gradient.
    - ``all-zero``: every gradient entry is exactly 0.
    - ``tiny``: mean |g| below ``tiny`` (and not all zero): :data:`VANISHING_ABS_MEAN`
      times the run's loss scale in the study, as the vanishing-grad rule reads it.
    - ``bn-absorbed``: a Linear bias directly followed by BatchNorm. The normalisation
      subtracts the batch mean, so this bias's gradient is zero up to rounding by
      construction; a note (the bias is redundant), in place of ``tiny``/``all-zero``.
    - ``frozen``: it had a gradient but the step did not change it (update ratio 0).
    - ``large-update``: a weight matrix moved by more than :data:`LARGE_UPDATE` of its norm.

    An update ratio of ``None`` (weight norm 0 before the step, e.g. a zero-initialised
    bias on the first step) is not judged.
    """
    if stats.name in never_received:
        return ("no-grad",)
    if not stats.has_grad:
        return ("missing",)
    flags: list[str] = []
    if stats.non_finite:
        flags.append("non-finite")
    if bn_absorbed:
        flags.append("bn-absorbed")
    elif stats.zero_fraction == 1.0:
        flags.append("all-zero")
    elif stats.abs_mean is not None and stats.abs_mean < tiny:
        flags.append("tiny")
    if stats.update_ratio is not None:
        if stats.update_ratio == 0.0:
            flags.append("frozen")
        elif len(stats.shape) >= 2 and stats.update_ratio > LARGE_UPDATE:
            flags.append("large-update")
    return tuple(flags)


def _never_received(history: list[GradientSnapshot]) -> tuple[str, ...]:
    """Parameters missing from every snapshot, in registration order."""
    if not history:
        return ()
    seen = {s.name for snap in history for s in snap.params if s.has_grad}
    return tuple(s.name for s in history[0].params if s.name not in seen)


def _step_row(row: dict[str, Any], snap: GradientSnapshot | None, clip: float | None) -> StepRow:
    if snap is None:  # loss not finite: train() made no backward pass and no update
        return StepRow(
            **row, total_norm=None, clipped=False, first_last_ratio=None, missing=(), non_finite=0
        )
    return StepRow(
        **row,
        total_norm=snap.total_norm,
        clipped=clip is not None and snap.total_norm > clip,
        first_last_ratio=snap.first_last_ratio,
        missing=tuple(snap.missing),
        non_finite=sum(s.non_finite or 0 for s in snap.params),
    )


def _stats_fields(stats: ParamGradStats) -> dict[str, Any]:
    return {f.name: getattr(stats, f.name) for f in fields(stats)}
