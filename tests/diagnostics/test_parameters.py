"""Parameter inspection: statistics of the finite entries, flags only for real problems."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from meaning_transform.diagnostics.parameters import (
    ParameterStats,
    inspect_parameters,
    parameter_roles,
)
from meaning_transform.diagnostics.thresholds import HUGE_PARAMETER


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(2, 2)
    )


def _by_name(model: nn.Module) -> dict[str, ParameterStats]:
    return {p.name: p for p in inspect_parameters(model)}


def test_a_fresh_model_has_no_flags_though_biases_and_norms_start_constant():
    model = _model()
    with torch.no_grad():
        model[0].bias.zero_()
    params = _by_name(model)
    assert [p.name for p in inspect_parameters(model)] == [n for n, _ in model.named_parameters()]
    assert {n: p.flags for n, p in params.items() if p.flags} == {}
    assert params["0.bias"].std == 0.0 and params["0.bias"].role == "bias"
    scale, shift = params["1.weight"], params["1.bias"]
    assert scale.role == "norm_weight" and scale.mean == 1.0 and scale.std == 0.0
    assert shift.role == "norm_bias" and shift.min == shift.max == 0.0
    assert params["2.weight"].shape == (4, 4) and params["2.weight"].numel == 16


def test_identical_huge_and_non_finite_are_flagged():
    model = _model()
    with torch.no_grad():
        model[2].weight.fill_(0.5)  # symmetric units: they can never become different
        model[3].weight[0, 1] = math.nan
        model[3].weight[1, 0] = math.inf
        model[4].weight[1, 0] = 5e3
    params = _by_name(model)
    assert {n: p.flags for n, p in params.items() if p.flags} == {
        "2.weight": ("identical",),
        "3.weight": ("non-finite",),
        "4.weight": ("huge",),
    }
    bad = params["3.weight"]
    assert (bad.nan, bad.inf) == (1, 1)
    finite = model[3].weight.detach().flatten()[[0, 2, 3, 5, 6, 7]].double()  # the rest
    assert bad.mean == pytest.approx(float(finite.mean()), rel=1e-6)
    assert bad.std == pytest.approx(float(finite.std(correction=0)), rel=1e-5)
    assert bad.max == pytest.approx(float(finite.max()))


@pytest.mark.parametrize(("value", "flagged"), [(HUGE_PARAMETER, False), (1.01e3, True)])
def test_huge_is_strictly_above_the_threshold(value, flagged):
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = -value
    assert ("huge" in _by_name(model)["weight"].flags) is flagged


def test_a_constant_bias_or_norm_is_never_identical():
    model = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3))
    with torch.no_grad():
        model[0].bias.fill_(0.2)
    assert all(p.flags == () for p in inspect_parameters(model))
    assert parameter_roles(model)["1.weight"] == "norm_weight"


def test_all_non_finite_has_no_statistics():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(math.nan)
    (p,) = inspect_parameters(model)
    assert (p.mean, p.std, p.min, p.max) == (None, None, None, None)
    assert p.flags == ("non-finite",) and p.nan == 2


def test_no_parameters_and_frozen_results():
    assert inspect_parameters(nn.ReLU()) == ()
    (p, _) = inspect_parameters(nn.Linear(2, 2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.flags = ("x",)  # type: ignore[misc]
