from __future__ import annotations

import itertools

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from meaning_transform.losses import (
    LOG_VAR_MAX,
    LOG_VAR_MIN,
    CheckLog,
    KLDivergenceLoss,
    NonFiniteLossError,
    ShapeMismatchError,
    kl_per_dim,
    kl_per_sample,
    kl_terms,
)


def _reference(mu: torch.Tensor, log_var: torch.Tensor, reduction: str) -> torch.Tensor:
    std = torch.exp(0.5 * log_var)
    per_sample = kl_divergence(Normal(mu, std), Normal(torch.zeros_like(mu), 1.0)).sum(dim=1)
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_torch_distributions_in_float64(reduction: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    mu = (torch.rand(32, 6, generator=g, dtype=torch.float64) - 0.5) * 10
    log_var = LOG_VAR_MIN + (LOG_VAR_MAX - LOG_VAR_MIN) * torch.rand(
        32, 6, generator=g, dtype=torch.float64
    )
    got = KLDivergenceLoss(reduction=reduction)(mu, log_var)
    want = _reference(mu, log_var, reduction)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)


def test_matches_torch_distributions_near_the_prior() -> None:
    # Small KL: where exp(lv) - 1 - lv cancels; expm1 keeps it accurate.
    g = torch.Generator().manual_seed(3)
    mu = 1e-3 * torch.randn(16, 4, generator=g, dtype=torch.float64)
    log_var = 1e-3 * torch.randn(16, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        kl_per_sample(mu, log_var),
        kl_divergence(Normal(mu, torch.exp(0.5 * log_var)), Normal(0.0, 1.0)).sum(dim=1),
        rtol=1e-6,
        atol=0.0,
    )


GRID = [-1e4, -100.0, 0.0, 100.0, 1e4]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_finite_value_and_grads_on_extreme_grid_float32(reduction: str) -> None:
    pairs = list(itertools.product(GRID, GRID))
    mu = torch.tensor([[m, m] for m, _ in pairs], dtype=torch.float32, requires_grad=True)
    log_var = torch.tensor([[v, v] for _, v in pairs], dtype=torch.float32, requires_grad=True)
    loss = KLDivergenceLoss(reduction=reduction)(mu, log_var)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(mu.grad).all()
    assert torch.isfinite(log_var.grad).all()


@pytest.mark.parametrize("m, v", list(itertools.product(GRID, GRID)))
def test_finite_per_element_on_grid(m: float, v: float) -> None:
    mu = torch.full((1, 3), m, requires_grad=True)
    log_var = torch.full((1, 3), v, requires_grad=True)
    loss = KLDivergenceLoss()(mu, log_var)
    loss.backward()
    assert torch.isfinite(loss) and loss >= 0
    assert torch.isfinite(mu.grad).all() and torch.isfinite(log_var.grad).all()


def test_finite_for_random_extreme_inputs_float32() -> None:
    g = torch.Generator().manual_seed(0)
    mu = ((torch.rand(512, 16, generator=g) - 0.5) * 2e4).requires_grad_()
    log_var = ((torch.rand(512, 16, generator=g) - 0.5) * 2e4).requires_grad_()
    loss = KLDivergenceLoss(reduction="sum")(mu, log_var)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(mu.grad).all() and torch.isfinite(log_var.grad).all()


def test_log_var_is_clamped_outside_the_range() -> None:
    mu = torch.zeros(1, 1)
    inside = kl_per_sample(mu, torch.full((1, 1), LOG_VAR_MAX))
    outside = kl_per_sample(mu, torch.full((1, 1), 1e4))
    assert torch.equal(inside, outside)
    log_var = torch.full((1, 1), -1e4, requires_grad=True)
    kl_per_sample(mu, log_var).sum().backward()
    assert log_var.grad.item() == 0.0  # clamp gradient: zero, finite


def test_kl_per_dim_sums_to_mean_per_sample_kl() -> None:
    g = torch.Generator().manual_seed(1)
    mu, log_var = torch.randn(20, 5, generator=g), torch.randn(20, 5, generator=g)
    per_dim = kl_per_dim(mu, log_var)
    assert per_dim.shape == (5,)
    torch.testing.assert_close(per_dim.sum(), kl_per_sample(mu, log_var).mean())
    torch.testing.assert_close(per_dim.sum(), KLDivergenceLoss(reduction="mean")(mu, log_var))


def test_kl_per_dim_flags_the_collapsed_unit() -> None:
    mu = torch.zeros(8, 3)
    mu[:, 1] = 2.0
    per_dim = kl_per_dim(mu, torch.zeros(8, 3))
    assert per_dim.tolist() == [0.0, 2.0, 0.0]


def test_kl_terms_reassemble_the_kl() -> None:
    g = torch.Generator().manual_seed(2)
    mu, log_var = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    terms = kl_terms(mu, log_var)
    assert set(terms) == {"one", "log_var", "neg_mu_sq", "neg_exp_log_var"}
    assert all(t.shape == (6, 4) for t in terms.values())
    rebuilt = -0.5 * sum(terms.values()).sum(dim=1)
    torch.testing.assert_close(rebuilt, kl_per_sample(mu, log_var))
    torch.testing.assert_close(terms["neg_mu_sq"], -(mu**2))


def test_sum_is_batch_size_times_mean() -> None:
    g = torch.Generator().manual_seed(4)
    mu, log_var = torch.randn(12, 3, generator=g), torch.randn(12, 3, generator=g)
    total = KLDivergenceLoss(reduction="sum")(mu, log_var)
    mean = KLDivergenceLoss(reduction="mean")(mu, log_var)
    torch.testing.assert_close(total, 12 * mean)


@pytest.mark.parametrize("name", ["mu", "log_var"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_named(name: str, bad: float) -> None:
    tensors = {"mu": torch.zeros(4, 2), "log_var": torch.zeros(4, 2)}
    tensors[name][2, 1] = bad
    with pytest.raises(NonFiniteLossError, match=rf"non-finite values in {name}:.*\[2, 1\]"):
        KLDivergenceLoss()(tensors["mu"], tensors["log_var"])


def test_record_mode_records_instead_of_raising() -> None:
    log = CheckLog()
    mu = torch.zeros(4, 2)
    mu[0, 0] = float("nan")
    KLDivergenceLoss(on_non_finite="record", log=log)(mu, torch.zeros(4, 2))
    assert [e.tensor for e in log.non_finite][0] == "mu"
    assert log.non_finite[0].nan_count == 1


def test_floor_engages_at_the_prior_and_is_counted() -> None:
    loss_fn = KLDivergenceLoss()
    value = loss_fn(torch.zeros(4, 2), torch.zeros(4, 2))
    assert value.item() == pytest.approx(1e-8)
    assert loss_fn.log.floor_engagements == {"kl": 1}


def test_shape_mismatch() -> None:
    with pytest.raises(ShapeMismatchError, match=r"got \(4, 2\) and \(4, 3\)"):
        KLDivergenceLoss()(torch.zeros(4, 2), torch.zeros(4, 3))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="reduction"):
        KLDivergenceLoss(reduction="batchmean")
    with pytest.raises(ValueError, match="on_non_finite"):
        KLDivergenceLoss(on_non_finite="ignore")
