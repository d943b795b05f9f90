"""The KL term by term: the four terms add up to the loss library's KL."""

from __future__ import annotations

import pytest
import torch

from meaning_transform.constants import KL_TERM_NAMES
from meaning_transform.diagnostics.kl_terms import kl_term_stats
from meaning_transform.losses.kl import LOG_VAR_MAX


def test_terms_have_the_expected_values_and_add_up():
    mu = torch.tensor([[1.0, 0.0], [-1.0, 2.0]])  # (N, Z)
    log_var = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    stats = kl_term_stats(mu, log_var)
    assert tuple(stats.terms) == KL_TERM_NAMES
    assert (stats.terms["one"].mean, stats.terms["one"].std) == (1.0, 0.0)
    assert stats.terms["neg_mu_sq"].min == -4.0 and stats.terms["neg_mu_sq"].max == 0.0
    assert stats.terms["neg_exp_log_var"].mean == -1.0
    # KL per sample = 0.5 * sum_z mu^2 here: 0.5 and 2.5, mean 1.5.
    assert stats.kl_per_sample_mean == pytest.approx(1.5)
    assert stats.kl_per_sample_mean_from_terms == pytest.approx(1.5)
    assert stats.abs_difference < 1e-12


def test_the_sum_check_holds_in_float64_for_random_posteriors():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(64, 4, generator=g, dtype=torch.float32)
    log_var = torch.randn(64, 4, generator=g, dtype=torch.float32) * 3
    stats = kl_term_stats(mu, log_var)
    assert stats.abs_difference < 1e-10 * max(1.0, stats.kl_per_sample_mean)
    # Term means are over samples × latents: KL per sample = -0.5 * Z * sum of the means.
    from_means = -0.5 * 4 * sum(t.mean for t in stats.terms.values())
    assert from_means == pytest.approx(stats.kl_per_sample_mean, rel=1e-9)


def test_log_var_is_the_clamped_value_the_loss_uses():
    stats = kl_term_stats(torch.zeros(2, 1), torch.full((2, 1), 100.0))
    assert stats.terms["log_var"].max == LOG_VAR_MAX
    assert stats.abs_difference <= 1e-9 * stats.kl_per_sample_mean
