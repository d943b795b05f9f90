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
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

from torch import nn

from meaning_transform.diagnostics.gradients import (
    GradientMonitor,
    GradientSnapshot,
    ParamGradStats,
)
from meaning_transform.scenarios import Scenario
from meaning_transform.studies.setup import (
    Dataset,
    ModelFactory,
    build_loss,
    default_model,
    diagnose_training,
    scenario_train_config,
)
from meaning_transform.training import StepContext, TrainConfig

# Flag thresholds (per parameter, last monitored step).
TINY_ABS_MEAN = 1e-7  # mean |g| below this: vanished (DeepDiagnosis' threshold)
# ||dw|| / ||w|| above this in one step is large; ~1e-3 is Karpathy's healthy rule of thumb.
# Only judged for weight matrices (2+ dims): vectors such as BatchNorm biases start at or
# near zero, so their relative update is huge early on without anything being wrong.
LARGE_UPDATE = 1e-1

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _StepRecorder:
    """Step callback: snapshot the gradients, then clip them, then measure the update.

    ``train()`` calls ``after_backward`` before ``optimizer.step()`` and ``after_step``
    after it, for every step. A step whose loss was not finite had no backward pass
    (``train()`` skips it): it gets a row but no snapshot.
    """

    def __init__(self, model: nn.Module, clip: float | None) -> None:
        self.monitor = GradientMonitor(model, track_updates=True)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.clip = clip
        self.rows: list[dict[str, Any]] = []  # per step: epoch, step, loss, loop's norm
        self.snapshot_index: list[int | None] = []  # per step: index into monitor.history

    def after_backward(self, ctx: StepContext) -> None:
        loss = float(ctx.loss["loss"].detach())  # train() skips backward when not finite
        index = None
        if math.isfinite(loss):
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
    dataset: Dataset,
    train_config: TrainConfig,
    recon: float = 1.0,
    kl: float = 0.1,
    semantic: float = 0.5,
    reduction: str = "mean",
    model_factory: ModelFactory | None = None,
    on_epoch: Callable[[], None] | None = None,
    scenario: Scenario | None = None,
) -> dict[str, Any]:
    """Train one fresh model, monitoring every step's gradients; return the JSON-ready result.

    ``train_config.clip_grad_norm`` (if set) is applied after each snapshot, so every
    reported norm is the norm before clipping (see the module docstring).
    """
    train_config = scenario_train_config(train_config, scenario)
    model = (
        model_factory(dataset.n_features, train_config.seed)
        if model_factory is not None
        else default_model(dataset.n_features, train_config.seed, dataset.tensor, scenario)
    )
    loss_fn = build_loss(recon, kl, semantic, dataset, reduction, scenario)
    clip = train_config.clip_grad_norm
    recorder = _StepRecorder(model, clip)
    diagnosed = diagnose_training(
        dataset.kind,
        model,
        loss_fn,
        dataset.tensor,
        replace(train_config, clip_grad_norm=None),  # clipped by the recorder instead
        callbacks=(recorder,),
        on_epoch=(lambda _r: on_epoch()) if on_epoch else None,
    )
    result = diagnosed.result
    history = recorder.monitor.history
    steps = [
        _step_row(row, history[i] if i is not None else None, clip)
        for row, i in zip(recorder.rows, recorder.snapshot_index, strict=True)
    ]
    never = _never_received(history)
    last = history[-1] if history else None
    cancelled = biases_before_batchnorm(model)
    findings = diagnosed.findings
    last_row = next((s for s in reversed(steps) if s["total_norm"] is not None), None)
    return {
        "command": "check-grads",
        "data": dataset.describe(),
        "batch_size": result.batch_size,
        "reduction": reduction,
        "weights": {
            "reconstruction": float(loss_fn.recon_loss_weight),
            "kl": float(loss_fn.kl_loss_weight),
            "semantic": float(loss_fn.semantic_loss_weight),
        },
        "semantic_applicable": dataset.agent_layout,
        "clip": clip,
        "thresholds": {"tiny_abs_mean": TINY_ABS_MEAN, "large_update": LARGE_UPDATE},
        "steps": steps,
        "last_step": last.step if last is not None else None,
        "parameters": [
            {**_stats_dict(s), "flags": param_flags(s, never, s.name in cancelled)}
            for s in (last.params if last is not None else ())
        ],
        "total_norm": last.total_norm if last is not None else None,
        "clip_grad_norm": last_row["clip_grad_norm"] if last_row is not None else None,
        "first_last_ratio": last.first_last_ratio if last is not None else None,
        "first_layer": last.first_layer if last is not None else None,
        "last_layer": last.last_layer if last is not None else None,
        "never_received": list(never),
        "scenario": scenario.name if scenario is not None else "healthy",
        "attribution": diagnosed.attribution,
        "latent": diagnosed.latent,
        "findings": [f.as_dict() for f in findings],
    }


def param_flags(
    stats: ParamGradStats, never_received: tuple[str, ...], bn_absorbed: bool
) -> list[str]:
    """What looks wrong with one parameter at the last monitored step.

    - ``no-grad``: requires grad but received none in any monitored step (not in the graph).
    - ``missing``: no gradient at the last step, though it had one earlier.
    - ``non-finite``: NaN/Inf entries in the gradient.
    - ``all-zero``: every gradient entry is exactly 0.
    - ``tiny``: mean |g| below :data:`TINY_ABS_MEAN` (and not all zero).
    - ``bn-absorbed``: a Linear bias directly followed by BatchNorm. The normalisation
      subtracts the batch mean, so this bias's gradient is zero up to rounding by
      construction; a note (the bias is redundant), in place of ``tiny``/``all-zero``.
    - ``frozen``: it had a gradient but the step did not change it (update ratio 0).
    - ``large-update``: a weight matrix moved by more than :data:`LARGE_UPDATE` of its norm.

    An update ratio of ``None`` (weight norm 0 before the step, e.g. a zero-initialised
    bias on the first step) is not judged.
    """
    if stats.name in never_received:
        return ["no-grad"]
    if not stats.has_grad:
        return ["missing"]
    flags: list[str] = []
    if stats.non_finite:
        flags.append("non-finite")
    if bn_absorbed:
        flags.append("bn-absorbed")
    elif stats.zero_fraction == 1.0:
        flags.append("all-zero")
    elif stats.abs_mean is not None and stats.abs_mean < TINY_ABS_MEAN:
        flags.append("tiny")
    if stats.update_ratio is not None:
        if stats.update_ratio == 0.0:
            flags.append("frozen")
        elif len(stats.shape) >= 2 and stats.update_ratio > LARGE_UPDATE:
            flags.append("large-update")
    return flags


def biases_before_batchnorm(model: nn.Module) -> set[str]:
    """Names of Linear biases whose output goes straight into a BatchNorm (in a Sequential)."""
    names = {id(p): name for name, p in model.named_parameters()}
    found: set[str] = set()
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.children())
        for a, b in zip(children, children[1:]):
            if isinstance(a, nn.Linear) and a.bias is not None and isinstance(b, _BATCH_NORMS):
                if id(a.bias) in names:
                    found.add(names[id(a.bias)])
    return found


def _never_received(history: list[GradientSnapshot]) -> tuple[str, ...]:
    """Parameters missing from every snapshot, in registration order."""
    if not history:
        return ()
    seen = {s.name for snap in history for s in snap.params if s.has_grad}
    return tuple(s.name for s in history[0].params if s.name not in seen)


def _step_row(
    row: dict[str, Any], snap: GradientSnapshot | None, clip: float | None
) -> dict[str, Any]:
    if snap is None:  # loss not finite: train() made no backward pass and no update
        return {
            **row,
            "total_norm": None,
            "clipped": False,
            "first_last_ratio": None,
            "missing": [],
            "non_finite": 0,
        }
    return {
        **row,
        "total_norm": snap.total_norm,
        "clipped": clip is not None and snap.total_norm > clip,
        "first_last_ratio": snap.first_last_ratio,
        "missing": list(snap.missing),
        "non_finite": sum(s.non_finite or 0 for s in snap.params),
    }


def _stats_dict(stats: ParamGradStats) -> dict[str, Any]:
    d = asdict(stats)
    d["shape"] = list(stats.shape)
    return d
