"""The KL divergence term by term, with a check that the terms add up to the loss's KL."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from meaning_transform.constants import KL_TERM_NAMES
from meaning_transform.diagnostics.tensor_stats import TensorStats, tensor_stats
from meaning_transform.losses.kl import kl_per_sample, kl_terms


@dataclass(frozen=True)
class KLTermStats:
    """Statistics of each KL term over samples × latents, and the sum check."""

    terms: Mapping[str, TensorStats]  # one, log_var, neg_mu_sq, neg_exp_log_var
    kl_per_sample_mean_from_terms: float  # mean over samples of -0.5 * sum_z (the terms)
    kl_per_sample_mean: float  # mean over samples of the loss library's kl_per_sample
    abs_difference: float


def kl_term_stats(mu: Tensor, log_var: Tensor) -> KLTermStats:
    """The four KL terms (1, log_var, -mu², -exp(log_var)) with statistics, and a sum check.

    KL per sample = -0.5 * sum_z (one + log_var + neg_mu_sq + neg_exp_log_var), with
    log_var clamped as the loss clamps it. The check compares the mean of that over
    samples with the loss library's ``kl_per_sample`` (the expm1 form). Computed in
    float64 on the CPU, so the check measures the formulas, not float32 cancellation.

    Shape:
        - mu, log_var: (N, Z)
    """
    mu = mu.detach().cpu().to(torch.float64)  # (N, Z)
    log_var = log_var.detach().cpu().to(torch.float64)  # (N, Z)
    terms = kl_terms(mu, log_var)  # four (N, Z)
    ordered = {name: terms[name] for name in KL_TERM_NAMES}
    from_terms = -0.5 * torch.stack(list(ordered.values())).sum(0).sum(1)  # (N,)
    a, b = float(from_terms.mean()), float(kl_per_sample(mu, log_var).mean())
    return KLTermStats(
        terms=tensor_stats(ordered),
        kl_per_sample_mean_from_terms=a,
        kl_per_sample_mean=b,
        abs_difference=abs(a - b),
    )
