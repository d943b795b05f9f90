"""Latent-space health: per-dimension KL, active units, free bits and posterior collapse.

Definitions (the references the tests hold us to):

- KL per dimension: KL(N(mu_j, exp(lv_j)) || N(0, 1)) = 0.5 (exp(lv) + mu^2 - 1 - lv),
  averaged over the batch: the loss library's :func:`~meaning_transform.losses.kl.kl_per_dim`,
  so one formula and one clamp (``log_var`` to [LOG_VAR_MIN, LOG_VAR_MAX] = [-30, 20])
  serve the loss and this report. The value equals ``torch.distributions.kl_divergence``
  wherever ``log_var`` is inside the range.
- Active units (Burda et al. 2016): unit j is active if Var_x(E_q[z_j | x]) = Var_x(mu_j)
  > 0.01. We use the unbiased variance (divide by N - 1), as the reference implementation
  of He et al. 2019 ("Lagging inference networks") does; it needs N >= 2 samples.
- Free bits (Kingma et al. 2016): sum_j max(lambda, E_x[KL_j]), the max taken on the
  batch mean. lambda defaults to 0.1 nats per dimension — a small floor that does not
  move a healthy latent; pass the value your training uses.
- Collapsed dimension: mean KL < 0.01 nats (the posterior is the prior, so the dimension
  carries almost no information); shown per dimension, not the collapse test.
- Collapse is judged on the information the whole latent carries: the batch-mean KL is an
  upper bound on I(x; z) (Hoffman & Johnson 2016), so ``kl_total`` < ln 2 nats means z
  carries less than one bit per sample, too little to tell even two inputs apart.
  ``collapsed`` is True then, or when no unit is active (mu does not vary with x).
- Reconstruction gain: 1 - MSE(reconstruction, x) / MSE(mean of x, x), the share of the
  variance around the data mean that the reconstruction explains (1 perfect, 0 no better
  than predicting the mean). A decoder that ignores z can do no better than the mean, so a
  large gain with a tiny KL means the numbers disagree (see ``rules.collapse_verdict``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from meaning_transform.adapters import output_roles
from meaning_transform.diagnostics._modes import evaluating
from meaning_transform.diagnostics.thresholds import COLLAPSE_KL_TOTAL
from meaning_transform.losses.kl import kl_per_dim as kl_per_dimension


@dataclass(frozen=True)
class LatentHealth:
    """Health of the latent space on one set of samples (plain host floats)."""

    num_samples: int
    latent_dim: int
    kl_per_dim: tuple[float, ...]  # (Z,) mean over samples, nats
    kl_total: float  # sum of kl_per_dim
    activity: tuple[float, ...]  # (Z,) Var over samples of mu (unbiased)
    active: tuple[bool, ...]  # (Z,) activity > active_threshold
    active_units: int
    active_threshold: float
    free_bits: float  # sum_j max(free_bits_lambda, kl_per_dim_j)
    free_bits_lambda: float
    collapsed_dims: tuple[int, ...]  # indices with kl_per_dim < collapse_threshold
    collapse_threshold: float
    collapsed: bool  # kl_total < ln 2 nats (under one bit per sample), or no active unit
    non_finite: int  # NaN/Inf entries in mu and log_var (their results are NaN too)
    # 1 - MSE(reconstruction, x) / MSE(mean of x, x) in eval mode; None when not measured
    recon_gain: float | None = None

    def as_dict(self) -> dict[str, object]:
        """Plain, JSON-friendly data (tuples become lists)."""
        return asdict(self)


def latent_health(
    mu: Tensor,
    log_var: Tensor,
    active_threshold: float = 0.01,
    free_bits_lambda: float = 0.1,
    collapse_threshold: float = 0.01,
) -> LatentHealth:
    """Per-dimension KL, active units, free bits and collapse from encoder outputs.

    Args:
        mu: posterior means.
        log_var: posterior log-variances.
        active_threshold: Var_x(mu_j) above which unit j is active (Burda et al.: 0.01).
        free_bits_lambda: the per-dimension floor lambda of free bits, in nats.
        collapse_threshold: mean KL (nats) below which a dimension counts as collapsed.

    Shape:
        - mu, log_var: (N, Z) with N >= 2.

    Reduced on the device, one host copy.
    """
    if mu.dim() != 2 or mu.shape != log_var.shape:
        raise ValueError(
            "expected mu and log_var of the same shape (N, Z), "
            f"got {tuple(mu.shape)} and {tuple(log_var.shape)}"
        )
    n, z = mu.shape
    if n < 2:
        raise ValueError(f"expected at least 2 samples to measure activity, got {n}")
    mu = mu.detach()
    kl_per_dim = kl_per_dimension(mu, log_var.detach().to(mu.dtype))  # (Z,)
    activity = mu.var(dim=0, correction=1)  # (Z,)
    free_bits = kl_per_dim.clamp(min=free_bits_lambda).sum()
    non_finite = (~torch.isfinite(mu)).sum() + (~torch.isfinite(log_var.detach())).sum()
    packed = torch.cat(
        [
            kl_per_dim,
            activity,
            free_bits.reshape(1),
            non_finite.to(mu.dtype).reshape(1),
        ]
    )
    host = packed.cpu().tolist()  # the one host copy
    kl = tuple(host[:z])
    act = tuple(host[z : 2 * z])
    active = tuple(a > active_threshold for a in act)
    collapsed_dims = tuple(j for j, value in enumerate(kl) if value < collapse_threshold)
    return LatentHealth(
        num_samples=n,
        latent_dim=z,
        kl_per_dim=kl,
        kl_total=sum(kl),
        activity=act,
        active=active,
        active_units=sum(active),
        active_threshold=active_threshold,
        free_bits=host[2 * z],
        free_bits_lambda=free_bits_lambda,
        collapsed_dims=collapsed_dims,
        collapse_threshold=collapse_threshold,
        collapsed=sum(kl) < COLLAPSE_KL_TOTAL or not any(active),
        non_finite=int(host[2 * z + 1]),
    )


def reconstruction_gain(reconstruction: Tensor, x: Tensor) -> float | None:
    """1 - MSE(reconstruction, x) / MSE(mean of x, x): how much of the variance around the
    data mean the reconstruction explains (1 perfect, 0 the mean's, below 0 worse).

    None when the reconstruction is not shaped like ``x`` (nor row-flat with as many
    entries per row), when anything is NaN/Inf, or when ``x`` does not vary.

    Shape:
        - reconstruction: (N, D) or x's shape; x: (N, ...) -> a host float
    """
    n = x.shape[0]
    if reconstruction.shape[0] != n or reconstruction.numel() != x.numel() or n < 2:
        return None
    rec = reconstruction.detach().reshape(n, -1).to(torch.float64)  # (N, D)
    data = x.detach().reshape(n, -1).to(device=rec.device, dtype=torch.float64)  # (N, D)
    error = (rec - data).pow(2).sum()
    spread = (data - data.mean(dim=0)).pow(2).sum()  # the data mean's squared error
    error_host, spread_host = torch.stack([error, spread]).cpu().tolist()  # one host copy
    if not (math.isfinite(error_host) and math.isfinite(spread_host)) or spread_host <= 0:
        return None
    return 1.0 - error_host / spread_host


def _eval_roles(model: nn.Module, x: Tensor, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(mu, log_var, reconstruction)`` for every row of ``x`` (eval mode, no grad)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next((p.device for p in model.parameters()), x.device)
    outputs: list[tuple[Tensor, Any]] = []
    with evaluating(model), torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            rows = x[start : start + batch_size].to(device)
            outputs.append((rows, model(rows)))
    return _roles_of(outputs, x)


def _roles_of(outputs: Sequence[tuple[Tensor, Any]], x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(mu, log_var, reconstruction)`` of every batch's output, concatenated."""
    mus, log_vars, recons = [], [], []
    for rows, output in outputs:
        roles = output_roles(output, rows)  # any output form (tuple, object, ...)
        mus.append(roles.mu)
        log_vars.append(roles.log_var)
        recons.append(roles.reconstruction)
    if not mus:
        raise ValueError(f"expected at least one sample, got x of shape {tuple(x.shape)}")
    return torch.cat(mus), torch.cat(log_vars), torch.cat(recons)  # (N, Z), (N, Z), (N, ...)


def encode_means(model: nn.Module, x: Tensor, batch_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Posterior ``(mu, log_var)`` for every row of ``x``, in eval mode under ``no_grad``.

    ``model(batch)`` must return a dict with ``"mu"`` and ``"log_var"`` (the MeaningVAE
    contract). Each module's train/eval mode is restored afterwards. Batches are moved to
    the model's device; the results stay there (detached), ready for
    :func:`latent_health`.

    Shape:
        - x: (N, D) -> mu, log_var: (N, Z)
    """
    mu, log_var, _ = _eval_roles(model, x, batch_size)
    return mu, log_var


def measure_latent(model: nn.Module, x: Tensor, batch_size: int = 1024) -> LatentHealth:
    """Latent health of ``model`` on the rows of ``x`` (eval mode, no grad), with the
    reconstruction's gain over predicting the data mean (:func:`reconstruction_gain`)."""
    return _health(*_eval_roles(model, x, batch_size), x)


def latent_of_outputs(outputs: Sequence[tuple[Tensor, Any]], x: Tensor) -> LatentHealth:
    """:func:`measure_latent` from eval-mode outputs already taken: ``(rows, output)``
    per batch of ``x``, in order (what :func:`~.activations.dead_units` collects)."""
    return _health(*_roles_of(outputs, x), x)


def _health(mu: Tensor, log_var: Tensor, reconstruction: Tensor, x: Tensor) -> LatentHealth:
    health = latent_health(mu, log_var)
    return replace(health, recon_gain=reconstruction_gain(reconstruction, x))
