from __future__ import annotations

import numpy as np
import pytest

from meaning_transform.losses import SCHEDULES, beta_annealing, beta_schedule

MONOTONE = ("linear", "sigmoid", "exponential")


def frange_cycle_linear(n_iter, start=0.0, stop=1.0, n_cycle=4, ratio=0.5):
    """Fu et al. (NAACL 2019) reference implementation, copied verbatim in substance."""
    L = np.ones(n_iter) * stop
    period = n_iter / n_cycle
    step = (stop - start) / (period * ratio)
    for c in range(n_cycle):
        v, i = start, 0
        while v <= stop and (int(i + c * period) < n_iter):
            L[int(i + c * period)] = v
            v += step
            i += 1
    return L


# max_epochs a multiple of cycles: the cases where the schedule is defined to match.
@pytest.mark.parametrize(
    "n, m, r", [(16, 4, 0.5), (20, 4, 0.5), (30, 3, 0.6), (12, 3, 1.0), (40, 4, 0.3), (100, 4, 0.5)]
)
@pytest.mark.parametrize("start, stop", [(0.0, 1.0), (0.1, 0.7)])
def test_cyclical_matches_frange_cycle_linear(n, m, r, start, stop) -> None:
    ours = beta_schedule(n, start, stop, "cyclical", cycles=m, ratio=r)
    np.testing.assert_allclose(ours, frange_cycle_linear(n, start, stop, m, r), rtol=0, atol=1e-12)


def test_cyclical_documented_example() -> None:
    assert beta_schedule(16, schedule_type="cyclical") == [0.0, 0.5, 1.0, 1.0] * 4


@pytest.mark.parametrize("schedule_type", MONOTONE)
@pytest.mark.parametrize("n", [2, 3, 10, 101])
@pytest.mark.parametrize("lo, hi", [(0.0, 1.0), (0.0001, 1.0), (0.2, 0.3), (0.0, 0.0)])
def test_monotone_schedules_hit_both_ends_exactly(schedule_type, n, lo, hi) -> None:
    betas = beta_schedule(n, lo, hi, schedule_type)
    assert betas[0] == lo
    assert betas[-1] == hi
    assert all(a <= b for a, b in zip(betas, betas[1:], strict=False))
    assert all(lo <= b <= hi for b in betas)
    assert beta_annealing(n + 5, n, lo, hi, schedule_type) == hi  # past the end: stays


@pytest.mark.parametrize("schedule_type", MONOTONE)
def test_single_epoch_trains_at_max_beta(schedule_type) -> None:
    assert beta_annealing(0, 1, 0.1, 0.9, schedule_type) == 0.9


def test_linear_values() -> None:
    assert beta_schedule(5) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_sigmoid_is_symmetric_about_the_middle() -> None:
    betas = beta_schedule(11, schedule_type="sigmoid")
    assert betas[5] == pytest.approx(0.5)
    assert betas[2] == pytest.approx(1.0 - betas[8])
    assert betas[1] < 0.1  # slow start: that is the point of the sigmoid


def test_exponential_is_geometric_between_positive_ends() -> None:
    betas = np.array(beta_schedule(6, 0.001, 1.0, "exponential"))
    np.testing.assert_allclose(betas[1:] / betas[:-1], 10**0.6, rtol=1e-9)


def test_exponential_from_zero_uses_the_offset_after_epoch_zero() -> None:
    betas = beta_schedule(5, 0.0, 2.0, "exponential")
    assert betas[0] == 0.0 and betas[-1] == 2.0
    assert betas[1] == pytest.approx(2.0 * 1e-4 * (1e4) ** 0.25)


def test_schedules_listed() -> None:
    assert set(SCHEDULES) == {"linear", "sigmoid", "cyclical", "exponential"}
    for s in SCHEDULES:
        assert len(beta_schedule(7, schedule_type=s)) == 7


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"schedule_type": "cosine"}, "schedule_type"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"epoch": -1}, "epoch"),
        ({"min_beta": 0.5, "max_beta": 0.1}, "min_beta"),
        ({"min_beta": -0.1}, "min_beta"),
        ({"max_beta": -1.0, "min_beta": -2.0}, "beta"),
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"cycles": 0}, "cycles"),
        ({"steepness": 0.0}, "steepness"),
        ({"max_beta": float("inf")}, "max_beta"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name) -> None:
    args = {"epoch": 0, "max_epochs": 10, **kwargs}
    with pytest.raises(ValueError, match=name):
        beta_annealing(**args)


@pytest.mark.parametrize("n, m, r", [(10, 4, 0.5), (7, 2, 0.5), (25, 3, 0.8)])
def test_cyclical_follows_the_formula_when_epochs_are_not_a_multiple(n, m, r) -> None:
    # frange_cycle_linear's int() indexing differs here; the DESIGN formula is the contract.
    period = n / m
    want = [min(1.0, (e % period) / (period * r)) for e in range(n)]
    np.testing.assert_allclose(beta_schedule(n, schedule_type="cyclical", cycles=m, ratio=r), want)
    assert beta_schedule(10, schedule_type="cyclical")[3] == pytest.approx(0.4)  # i = 0.5
