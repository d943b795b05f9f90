"""The per-parameter gradient-norm summary, on hand-built snapshots."""

from __future__ import annotations

import pytest

from meaning_transform.diagnostics.gradient_summary import ParamNormSummary, gradient_summary
from meaning_transform.diagnostics.gradients import GradientSnapshot, ParamGradStats


def _param(name: str, norm: float | None) -> ParamGradStats:
    has = norm is not None
    return ParamGradStats(
        name=name,
        shape=(2,),
        numel=2,
        has_grad=has,
        norm=norm,
        mean=None,
        abs_mean=None,
        std=None,
        min=None,
        max=None,
        zero_fraction=None,
        non_finite=0 if has else None,
        weight_norm=None,
    )


def _snap(w: float, b: float | None, ratio: float | None = None) -> GradientSnapshot:
    params = (_param("fc.weight", w), _param("fc.bias", b), _param("unused.weight", None))
    total = (w**2 + (b or 0.0) ** 2) ** 0.5
    missing = tuple(p.name for p in params if not p.has_grad)
    return GradientSnapshot(params, total, missing, ratio, "fc.weight", "out.weight")


def test_mean_max_and_final_per_parameter_in_snapshot_order():
    history = [_snap(1.0, 1e-9, ratio=2.0), _snap(3.0, None), _snap(2.0, 3e-9, ratio=0.5)]
    summary = gradient_summary(
        history, hooks_registered=3, training_steps=4, batch_norm_centred=["fc.bias"]
    )
    assert (summary.hooks_registered, summary.captured_steps, summary.training_steps) == (3, 3, 4)
    assert summary.final_total_norm == pytest.approx((4.0 + 9e-18) ** 0.5)
    assert summary.final_first_last_ratio == 0.5
    assert summary.parameters == (
        ParamNormSummary("fc.weight", 2.0, 3.0, 2.0, batch_norm_centred=False),
        ParamNormSummary("fc.bias", pytest.approx(2e-9), 3e-9, 3e-9, batch_norm_centred=True),
        ParamNormSummary("unused.weight", None, None, None, batch_norm_centred=False),
    )
    assert summary.never_reached == ("unused.weight",)
    assert summary.batch_norm_centred == ("fc.bias",)


def test_no_captured_step():
    summary = gradient_summary([], hooks_registered=5, training_steps=2)
    assert summary.captured_steps == 0 < summary.training_steps
    assert summary.final_total_norm is None and summary.final_first_last_ratio is None
    assert summary.parameters == () and summary.never_reached == ()
    assert summary.batch_norm_centred == ()
