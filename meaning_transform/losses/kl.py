"""KL divergence of the encoder's diagonal Gaussian from the N(0, I) prior.

KL(N(mu, exp(log_var)) || N(0, 1)) = 0.5 * sum_z (exp(log_var) + mu^2 - 1 - log_var)
per sample. ``log_var`` is clamped to ``[LOG_VAR_MIN, LOG_VAR_MAX]`` before the
exponential so that the value and its gradients stay finite for any finite input.
"""

from __future__ import annotations

import torch
from torch import nn

from meaning_transform.losses.checks import (
    COMPONENT_FLOOR,
    CheckLog,
    OnNonFinite,
    Reduction,
    apply_floor,
    check_2d,
    check_finite,
    check_on_non_finite,
    check_reduction,
    check_same_shape,
    reduce_per_sample,
)

# Why [-30, 20]: exp(20) ~ 4.9e8, so even summed over Z latents and a large batch
# the KL stays many orders of magnitude below the float32 maximum (~3.4e38).
# exp(-30) ~ 9e-14 is a standard deviation of ~3e-7: the posterior is already
# degenerate there, and going lower changes the KL only through -log_var.
# Outside the range the clamp's gradient w.r.t. log_var is zero - finite, and a
# sign that the encoder has left any sensible range.
LOG_VAR_MIN = -30.0
LOG_VAR_MAX = 20.0


def clamp_log_var(log_var: torch.Tensor) -> torch.Tensor:
    """Clamp log-variances to ``[LOG_VAR_MIN, LOG_VAR_MAX]`` = [-30, 20].

    Args:
        log_var: encoder log-variances.

    Shape:
        - log_var: any
        - output: same as ``log_var``

    Example:
        >>> clamp_log_var(torch.tensor([-100.0, 0.0, 100.0]))
        tensor([-30.,   0.,  20.])
    """
    return log_var.clamp(LOG_VAR_MIN, LOG_VAR_MAX)


def kl_elementwise(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL per sample and latent dimension, no reduction and no checks.

    Written as ``0.5 * (expm1(lv) - lv + mu^2)``, which is the same quantity as
    ``0.5 * (exp(lv) + mu^2 - 1 - lv)`` but does not lose the small KL of a
    near-prior dimension to cancellation.

    Args:
        mu: posterior means.
        log_var: posterior log-variances (clamped to [-30, 20] here).

    Shape:
        - mu: (B, Z)
        - log_var: (B, Z)
        - output: (B, Z)

    Example:
        >>> kl_elementwise(torch.zeros(2, 3), torch.zeros(2, 3))
        tensor([[0., 0., 0.],
                [0., 0., 0.]])
    """
    lv = clamp_log_var(log_var)  # (B, Z)
    return 0.5 * (torch.expm1(lv) - lv + mu**2)  # (B, Z)


def kl_per_sample(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL of each sample's posterior from the prior, summed over latent dimensions.

    Args:
        mu: posterior means.
        log_var: posterior log-variances (clamped to [-30, 20]).

    Shape:
        - mu: (B, Z)
        - log_var: (B, Z)
        - output: (B,)

    Example:
        >>> kl_per_sample(torch.ones(2, 3), torch.zeros(2, 3))
        tensor([1.5000, 1.5000])
    """
    return kl_elementwise(mu, log_var).sum(dim=1)  # (B,)


def kl_per_dim(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL of each latent dimension, averaged over the batch.

    Its sum is the per-sample-mean KL. A dimension whose value stays near zero
    carries no information about the input (a collapsed unit).

    Args:
        mu: posterior means.
        log_var: posterior log-variances (clamped to [-30, 20]).

    Shape:
        - mu: (B, Z)
        - log_var: (B, Z)
        - output: (Z,)

    Example:
        >>> kl_per_dim(torch.tensor([[0.0, 2.0]]), torch.zeros(1, 2))
        tensor([0., 2.])
    """
    return kl_elementwise(mu, log_var).mean(dim=0)  # (Z,)


def kl_terms(mu: torch.Tensor, log_var: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four elementwise terms of the KL, for a term-by-term report.

    KL = -0.5 * (one + log_var + neg_mu_sq + neg_exp_log_var), summed over Z.
    ``log_var`` here is the clamped value actually used.

    Args:
        mu: posterior means.
        log_var: posterior log-variances (clamped to [-30, 20]).

    Shape:
        - mu: (B, Z)
        - log_var: (B, Z)
        - output: dict of four (B, Z) tensors: ``"one"``, ``"log_var"``,
          ``"neg_mu_sq"`` (-mu^2), ``"neg_exp_log_var"`` (-exp(log_var)).

    Example:
        >>> t = kl_terms(torch.ones(1, 2), torch.zeros(1, 2))
        >>> float(-0.5 * sum(v.sum() for v in t.values()))
        1.0
    """
    lv = clamp_log_var(log_var)  # (B, Z)
    return {
        "one": torch.ones_like(lv),
        "log_var": lv,
        "neg_mu_sq": -(mu**2),
        "neg_exp_log_var": -torch.exp(lv),
    }


class KLDivergenceLoss(nn.Module):
    """KL(N(mu, exp(log_var)) || N(0, I)), summed over latents, reduced over the batch.

    Equals ``torch.distributions.kl_divergence(Normal(mu, std), Normal(0, 1))``
    summed over Z and reduced the same way, wherever ``log_var`` lies in
    [-30, 20]. Outside that range ``log_var`` is clamped (see ``LOG_VAR_MIN`` /
    ``LOG_VAR_MAX``): exp(20) ~ 4.9e8 keeps sums far from float32 overflow even
    for large batches, exp(-30) ~ 9e-14 (a std of ~3e-7) is already degenerate,
    and beyond the clamp its gradient is zero, which is finite. So the value and
    the gradients w.r.t. ``mu`` and ``log_var`` are finite for any finite input.
    The result is floored at 1e-8 under the name ``"kl"``; engagements are
    counted in :attr:`log`.

    Args:
        reduction: ``"mean"`` over samples of the per-sample KL, or ``"sum"``.
        on_non_finite: ``"raise"`` a :class:`NonFiniteLossError` naming ``mu`` or
            ``log_var``, or ``"record"`` it in :attr:`log` and carry on.
        log: a :class:`CheckLog` to write into; a new one when None.

    Shape:
        - mu: (B, Z)
        - log_var: (B, Z)
        - output: scalar, for both reductions.

    Example:
        >>> loss_fn = KLDivergenceLoss(reduction="sum")
        >>> float(loss_fn(torch.ones(4, 2), torch.zeros(4, 2)))
        4.0
    """

    def __init__(
        self,
        reduction: Reduction = "mean",
        on_non_finite: OnNonFinite = "raise",
        log: CheckLog | None = None,
    ) -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)
        self.on_non_finite = check_on_non_finite(on_non_finite)
        self.log = log if log is not None else CheckLog()

    def forward(
        self, mu: torch.Tensor, log_var: torch.Tensor, *, check_inputs: bool = True
    ) -> torch.Tensor:
        """Reduced, floored KL. ``check_inputs=False`` skips the input checks."""
        if check_inputs:
            check_same_shape("mu", mu, "log_var", log_var)
            check_2d("mu", mu)
            check_finite("mu", mu, self.on_non_finite, self.log)
            check_finite("log_var", log_var, self.on_non_finite, self.log)
        loss = reduce_per_sample(kl_per_sample(mu, log_var), self.reduction)
        check_finite("kl_loss", loss, self.on_non_finite, self.log)
        return apply_floor(loss, COMPONENT_FLOOR, "kl", self.log)
