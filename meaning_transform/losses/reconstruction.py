"""Reconstruction loss: how far the decoder's output is from its input, per sample.

The per-sample loss sums over the D features; the batch is then reduced by a
per-sample ``"mean"`` or a ``"sum"`` (the original system summed, which made the
loss - and the meaning of every weight next to it - grow with the batch size).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from meaning_transform.losses.checks import (
    COMPONENT_FLOOR,
    CheckLog,
    LossInputError,
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

LossType = Literal["mse", "bce"]
LOSS_TYPES: tuple[LossType, ...] = ("mse", "bce")

# BCE takes log(p) and log(1 - p); the reconstruction is clamped to [eps, 1 - eps]
# so neither is -inf. 1e-6 is representable on both sides in float32 and float16.
BCE_EPS = 1e-6


def _check_loss_type(loss_type: str) -> LossType:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    return loss_type


def reconstruction_per_element(
    x_reconstructed: torch.Tensor, x_original: torch.Tensor, loss_type: LossType = "mse"
) -> torch.Tensor:
    """Elementwise reconstruction error, no reduction and no checks.

    Args:
        x_reconstructed: decoder output.
        x_original: the input it should reproduce.
        loss_type: ``"mse"`` squared error, or ``"bce"`` binary cross-entropy. For
            ``"bce"`` the reconstruction is clamped to ``[BCE_EPS, 1 - BCE_EPS]``
            (its gradient is zero outside that range) and ``x_original`` must lie in
            ``[0, 1]``, else :class:`LossInputError`.

    Shape:
        - x_reconstructed: (B, D)
        - x_original: (B, D)
        - output: (B, D)

    Example:
        >>> x = torch.rand(4, 10)
        >>> reconstruction_per_element(x + 0.1, x).shape
        torch.Size([4, 10])
    """
    _check_loss_type(loss_type)
    if loss_type == "mse":
        return (x_reconstructed - x_original) ** 2  # (B, D)
    if bool(((x_original < 0) | (x_original > 1)).any()):
        raise LossInputError(
            "loss_type='bce' expects x_original in [0, 1], got values in "
            f"[{float(x_original.min())}, {float(x_original.max())}]"
        )
    p = x_reconstructed.clamp(BCE_EPS, 1.0 - BCE_EPS)  # (B, D)
    return -(x_original * torch.log(p) + (1.0 - x_original) * torch.log1p(-p))  # (B, D)


def reconstruction_per_sample(
    x_reconstructed: torch.Tensor, x_original: torch.Tensor, loss_type: LossType = "mse"
) -> torch.Tensor:
    """Per-sample reconstruction loss: the elementwise error summed over features.

    Args:
        x_reconstructed: decoder output.
        x_original: the input it should reproduce.
        loss_type: ``"mse"`` or ``"bce"`` (see :func:`reconstruction_per_element`).

    Shape:
        - x_reconstructed: (B, D)
        - x_original: (B, D)
        - output: (B,)

    Example:
        >>> x = torch.zeros(3, 2)
        >>> reconstruction_per_sample(x + 1.0, x)
        tensor([2., 2., 2.])
    """
    return reconstruction_per_element(x_reconstructed, x_original, loss_type).sum(dim=1)  # (B,)


def reconstruction_per_feature(
    x_reconstructed: torch.Tensor, x_original: torch.Tensor, loss_type: LossType = "mse"
) -> torch.Tensor:
    """Per-feature reconstruction error: the elementwise error averaged over the batch.

    Summing the result gives the per-sample-mean reconstruction loss, so it says
    which features the loss is made of.

    Args:
        x_reconstructed: decoder output.
        x_original: the input it should reproduce.
        loss_type: ``"mse"`` or ``"bce"`` (see :func:`reconstruction_per_element`).

    Shape:
        - x_reconstructed: (B, D)
        - x_original: (B, D)
        - output: (D,)

    Example:
        >>> x = torch.zeros(4, 3)
        >>> reconstruction_per_feature(x + torch.tensor([0.0, 1.0, 2.0]), x)
        tensor([0., 1., 4.])
    """
    check_same_shape("x_reconstructed", x_reconstructed, "x_original", x_original)
    check_2d("x_original", x_original)
    return reconstruction_per_element(x_reconstructed, x_original, loss_type).mean(dim=0)  # (D,)


class ReconstructionLoss(nn.Module):
    """Reconstruction loss between a decoder output and its input.

    Per sample the elementwise error is summed over the D features; the batch is
    then reduced. Inputs are checked for shape and NaN/Inf (reported as
    ``x_reconstructed`` / ``x_original``), the result for NaN/Inf, and the result
    is floored at ``COMPONENT_FLOOR`` (1e-8) under the name ``"reconstruction"``;
    every engagement of the floor is counted in :attr:`log`.

    Args:
        loss_type: ``"mse"`` (squared error) or ``"bce"`` (binary cross-entropy;
            inputs must lie in [0, 1]; the reconstruction is clamped to
            ``[1e-6, 1 - 1e-6]`` before the log, so it has no gradient outside).
        reduction: ``"mean"`` over samples of the per-sample loss, or ``"sum"``
            over the batch.
        on_non_finite: ``"raise"`` a :class:`NonFiniteLossError`, or ``"record"``
            the event in :attr:`log` and carry on.
        log: a :class:`CheckLog` to write into (shared by :class:`CombinedLoss`);
            a new one when None.

    Shape:
        - x_reconstructed: (B, D)
        - x_original: (B, D)
        - output: scalar, for both reductions.

    Example:
        >>> loss_fn = ReconstructionLoss(reduction="mean")
        >>> x = torch.rand(8, 10)
        >>> loss = loss_fn(x + 0.1, x)
        >>> round(float(loss), 4)
        0.1
    """

    def __init__(
        self,
        loss_type: LossType = "mse",
        reduction: Reduction = "mean",
        on_non_finite: OnNonFinite = "raise",
        log: CheckLog | None = None,
    ) -> None:
        super().__init__()
        self.loss_type = _check_loss_type(loss_type)
        self.reduction = check_reduction(reduction)
        self.on_non_finite = check_on_non_finite(on_non_finite)
        self.log = log if log is not None else CheckLog()

    def forward(
        self,
        x_reconstructed: torch.Tensor,
        x_original: torch.Tensor,
        *,
        check_inputs: bool = True,
    ) -> torch.Tensor:
        """Reduced, floored reconstruction loss.

        ``check_inputs=False`` skips the input checks, for a caller (such as
        :class:`CombinedLoss`) that has already checked them under its own names.
        """
        if check_inputs:
            check_same_shape("x_reconstructed", x_reconstructed, "x_original", x_original)
            check_2d("x_original", x_original)
            check_finite("x_reconstructed", x_reconstructed, self.on_non_finite, self.log)
            check_finite("x_original", x_original, self.on_non_finite, self.log)
        per_sample = reconstruction_per_sample(x_reconstructed, x_original, self.loss_type)
        loss = reduce_per_sample(per_sample, self.reduction)
        check_finite("reconstruction_loss", loss, self.on_non_finite, self.log)
        return apply_floor(loss, COMPONENT_FLOOR, "reconstruction", self.log)
