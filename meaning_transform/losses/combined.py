"""The VAE training objective: weighted reconstruction + KL + semantic (+ compression).

:class:`CombinedLoss` returns one dict per call holding the differentiable total,
each term detached for display, each term undetached and unweighted for per-term
gradient attribution, the weights and reductions in use, and which floors engaged
and which non-finite values were seen in this call.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from meaning_transform.data import N_FEATURES, SEMANTIC_FEATURES
from meaning_transform.losses.checks import (
    COMPONENT_FLOOR,
    TOTAL_FLOOR,
    CheckLog,
    OnNonFinite,
    Reduction,
    ShapeMismatchError,
    apply_floor,
    check_2d,
    check_finite,
    check_on_non_finite,
    check_reduction,
    check_same_shape,
)
from meaning_transform.losses.kl import KLDivergenceLoss
from meaning_transform.losses.reconstruction import LossType, ReconstructionLoss
from meaning_transform.losses.semantic import (
    FeatureSelection,
    Mode,
    SemanticLoss,
    SimilarityType,
    breakdown_floats,
)

# Names under which floors are counted, in the order the terms are computed.
FLOOR_NAMES: tuple[str, ...] = ("reconstruction", "kl", "semantic", "total")


class CombinedLoss(nn.Module):
    """``w_r * recon + w_kl * kl + w_s * semantic + compression``, with its parts.

    The weights are plain float attributes, so a training loop may anneal them:
    ``loss_fn.kl_loss_weight = beta``. Reconstruction and KL are reduced by
    ``reduction``; the semantic term by ``semantic_reduction`` (same as
    ``reduction`` when None). The original system used ``reduction="sum",
    semantic_reduction="mean"``, so its weights meant different things at
    different batch sizes; pass those to reproduce it.

    Inputs are checked for shape and NaN/Inf (reported as ``reconstruction``,
    ``x_original``, ``mu``, ``log_var``, ``compression_loss``). Each component is
    floored at 1e-8 and the total at 1e-6; every engagement is counted in
    :attr:`log` (cumulative, shared with the sub-losses) and listed in the
    call's ``floors_engaged``. With ``semantic_loss_weight == 0`` the semantic
    term is not computed (its value is 0 and it has no terms), which is how to use
    this loss on data that is not in the 10-feature agent-state layout.

    Args:
        recon_loss_weight: weight w_r of the reconstruction term.
        kl_loss_weight: weight w_kl (beta) of the KL term.
        semantic_loss_weight: weight w_s of the semantic term.
        recon_loss_type: ``"mse"`` or ``"bce"`` (see :class:`ReconstructionLoss`).
        semantic_feature_extractors: the semantic features: a list of built-in names
            (e.g. ``["position", "health"]``) or a mapping name -> callable for custom
            ones (``feature_extractors`` of :class:`SemanticLoss`).
        semantic_similarity_type: ``"cosine"``, ``"mse"`` or ``"l1"``.
        reduction: ``"mean"`` (per-sample mean) or ``"sum"`` for recon and KL.
        semantic_reduction: reduction of the semantic term; None = ``reduction``.
        semantic_mode: ``"soft"`` (differentiable) or ``"hard"`` (the original fault).
        on_non_finite: ``"raise"`` a :class:`NonFiniteLossError`, or ``"record"``
            the event (listed in the call's ``non_finite``) and carry on.

    Shape:
        - model_output["reconstruction"]: (B, D); D = 10 unless the semantic
          weight is 0 or custom extractors are given
        - model_output["mu"], model_output["log_var"]: (B, Z)
        - model_output["compression_loss"] (optional): scalar
        - x_original: (B, D)
        - output: dict with

          - ``"loss"``: differentiable scalar total
          - ``"reconstruction_loss"``, ``"kl_loss"``, ``"semantic_loss"``,
            ``"compression_loss"``: detached, unweighted 0-dim tensors
          - ``"semantic_breakdown"``: dict feature -> float (unweighted)
          - ``"terms"``: dict name -> undetached, unweighted scalar for
            ``"reconstruction"``, ``"kl"``, ``"semantic"``, each
            ``"semantic/<feature>"`` and ``"compression"`` when given
          - ``"weights"``: dict ``"reconstruction"``/``"kl"``/``"semantic"`` -> float
          - ``"reduction"``: dict term -> ``"mean"`` or ``"sum"``
          - ``"floors_engaged"``: component names whose floor engaged in this call
          - ``"non_finite"``: :class:`NonFiniteEvent` list seen in this call

    Example:
        >>> loss_fn = CombinedLoss(recon_loss_weight=1.0, kl_loss_weight=0.1)
        >>> x = torch.rand(8, 10)
        >>> out = {"reconstruction": x + 0.1, "mu": torch.zeros(8, 4),
        ...        "log_var": torch.zeros(8, 4)}
        >>> result = loss_fn(out, x)
        >>> result["floors_engaged"]
        ['kl']
        >>> loss_fn.kl_loss_weight = 0.5  # e.g. beta from beta_annealing
    """

    def __init__(
        self,
        recon_loss_weight: float = 1.0,
        kl_loss_weight: float = 0.1,
        semantic_loss_weight: float = 0.5,
        recon_loss_type: LossType = "mse",
        semantic_feature_extractors: FeatureSelection | None = None,
        semantic_similarity_type: SimilarityType = "cosine",
        reduction: Reduction = "mean",
        semantic_reduction: Reduction | None = None,
        semantic_mode: Mode = "soft",
        on_non_finite: OnNonFinite = "raise",
    ) -> None:
        super().__init__()
        self.recon_loss_weight = float(recon_loss_weight)
        self.kl_loss_weight = float(kl_loss_weight)
        self.semantic_loss_weight = float(semantic_loss_weight)
        self.on_non_finite = check_on_non_finite(on_non_finite)
        check_reduction(reduction)
        if semantic_reduction is None:
            semantic_reduction = reduction
        check_reduction(semantic_reduction)
        # One log for the whole objective: sub-losses write their floors into it.
        self.log = CheckLog()
        self.recon_loss = ReconstructionLoss(recon_loss_type, reduction, on_non_finite, self.log)
        self.kl_loss = KLDivergenceLoss(reduction, on_non_finite, self.log)
        self.semantic_loss = SemanticLoss(
            feature_extractors=semantic_feature_extractors,
            similarity_type=semantic_similarity_type,
            reduction=semantic_reduction,
            mode=semantic_mode,
            on_non_finite=on_non_finite,
            log=self.log,
        )

    @property
    def reduction(self) -> str:
        """Reduction of the reconstruction and KL terms."""
        return self.recon_loss.reduction

    @property
    def semantic_reduction(self) -> str:
        """Reduction of the semantic term."""
        return self.semantic_loss.reduction

    def forward(self, model_output: Mapping[str, Any], x_original: torch.Tensor) -> dict[str, Any]:
        """Compute the total and its parts for one batch (see the class docstring)."""
        n_events = len(self.log.non_finite)
        floors_before = dict(self.log.floor_engagements)
        x_rec = model_output["reconstruction"]
        mu, log_var = model_output["mu"], model_output["log_var"]
        compression = self._compression(model_output.get("compression_loss"), x_original)
        self._check_inputs(x_rec, mu, log_var, x_original)

        recon = self.recon_loss(x_rec, x_original, check_inputs=False)
        kl = self.kl_loss(mu, log_var, check_inputs=False)
        terms: dict[str, torch.Tensor] = {"reconstruction": recon, "kl": kl}
        result: dict[str, Any] = {}
        if self.semantic_loss_weight != 0:
            self._check_semantic_applicable(x_original)
            per_feature = self.semantic_loss.per_feature(x_rec, x_original, check_inputs=False)
            semantic, extras = self._semantic_term(per_feature)
            terms["semantic"] = semantic
            terms.update({f"semantic/{name}": v for name, v in per_feature.items()})
            breakdown = breakdown_floats(per_feature)
        else:
            semantic, extras, breakdown = x_original.new_zeros(()), self._skipped_extras(), {}
        if compression is not None:
            terms["compression"] = compression

        total = (
            self.recon_loss_weight * recon
            + self.kl_loss_weight * kl
            + self.semantic_loss_weight * semantic
            + (compression if compression is not None else 0.0)
        )
        check_finite("loss", total, self.on_non_finite, self.log)
        total = apply_floor(total, TOTAL_FLOOR, "total", self.log)

        result.update(
            loss=total,
            reconstruction_loss=recon.detach(),
            kl_loss=kl.detach(),
            semantic_loss=semantic.detach(),
            compression_loss=(
                compression.detach() if compression is not None else x_original.new_zeros(())
            ),
            semantic_breakdown=breakdown,
            terms=terms,
            weights={
                "reconstruction": float(self.recon_loss_weight),
                "kl": float(self.kl_loss_weight),
                "semantic": float(self.semantic_loss_weight),
            },
            reduction={
                "reconstruction": self.reduction,
                "kl": self.reduction,
                "semantic": self.semantic_reduction,
            },
            floors_engaged=self._floors_engaged_since(floors_before),
            non_finite=list(self.log.non_finite[n_events:]),
        )
        result.update(extras)
        return result

    # --- steps a subclass may replace ----------------------------------------

    def _semantic_term(
        self, per_feature: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Reduced per-feature losses -> (floored semantic scalar, extra result keys)."""
        return self.semantic_loss.combine(per_feature), {}

    def _skipped_extras(self) -> dict[str, Any]:
        """Extra result keys when the semantic term is skipped (weight 0)."""
        return {}

    # --- checks ---------------------------------------------------------------

    def _check_inputs(
        self,
        x_rec: torch.Tensor,
        mu: torch.Tensor,
        log_var: torch.Tensor,
        x_original: torch.Tensor,
    ) -> None:
        check_same_shape("reconstruction", x_rec, "x_original", x_original)
        check_2d("x_original", x_original)
        check_same_shape("mu", mu, "log_var", log_var)
        check_2d("mu", mu)
        if mu.shape[0] != x_original.shape[0]:
            raise ShapeMismatchError(
                f"expected mu and x_original to have the same batch size, "
                f"got {tuple(mu.shape)} and {tuple(x_original.shape)}"
            )
        for name, tensor in (
            ("reconstruction", x_rec),
            ("x_original", x_original),
            ("mu", mu),
            ("log_var", log_var),
        ):
            check_finite(name, tensor, self.on_non_finite, self.log)

    def _check_semantic_applicable(self, x_original: torch.Tensor) -> None:
        if self.semantic_loss.feature_extractors or self.semantic_loss.uses_builtin(
            x_original.shape[1]
        ):
            return
        raise ShapeMismatchError(
            f"the semantic loss needs the {N_FEATURES}-feature agent-state layout "
            f"(B, {N_FEATURES}), got {tuple(x_original.shape)}; pass semantic_loss_weight=0 "
            "for non-agent data (or semantic_feature_extractors)"
        )

    def _compression(self, value: Any, like: torch.Tensor) -> torch.Tensor | None:
        if value is None:
            return None
        tensor = torch.as_tensor(value, dtype=like.dtype, device=like.device)
        if tensor.numel() != 1:
            raise ShapeMismatchError(
                f"expected compression_loss to be a scalar, got shape {tuple(tensor.shape)}"
            )
        tensor = tensor.reshape(())
        check_finite("compression_loss", tensor, self.on_non_finite, self.log)
        return tensor

    def _floors_engaged_since(self, before: Mapping[str, int]) -> list[str]:
        counts = self.log.floor_engagements
        engaged = [n for n in counts if counts[n] > before.get(n, 0)]
        order = {name: i for i, name in enumerate(FLOOR_NAMES)}
        return sorted(engaged, key=lambda n: order.get(n, len(order)))


# Canonical feature importance from the original system (sums to 0.96; normalised on use).
CANONICAL_FEATURE_WEIGHTS: dict[str, float] = {
    "position": 0.554,
    "health": 0.150,
    "energy": 0.101,
    "is_alive": 0.050,
    "has_target": 0.035,
    "threatened": 0.020,
    "role": 0.050,
}
PROGRESSIVE_TOP_K = 3  # features weighted at epoch 0 of the progressive schedule
STABILITY_RATIO = 10.0  # a feature loss above this multiple of the median is damped


def normalise_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Scale non-negative weights to sum to 1.

    Args:
        weights: feature name -> weight >= 0, not all zero.

    Shape:
        - output: dict with the same keys, values summing to 1.

    Example:
        >>> normalise_weights({"a": 1.0, "b": 3.0})
        {'a': 0.25, 'b': 0.75}
    """
    for name, w in weights.items():
        if not (w >= 0 and w != float("inf")):
            raise ValueError(f"feature_weights[{name!r}] must be a finite number >= 0, got {w!r}")
    total = sum(weights.values())
    if not total > 0:
        raise ValueError(f"feature_weights must not all be zero, got {dict(weights)!r}")
    return {name: float(w) / total for name, w in weights.items()}


class FeatureWeightedLoss(CombinedLoss):
    """:class:`CombinedLoss` whose semantic term weights each feature.

    semantic = n * sum_f w_f * L_f, where L_f is feature f's reduced loss, the
    weights w_f sum to 1 over the n features computed, and the factor n keeps the
    scale of the unweighted sum (uniform weights give exactly
    :class:`CombinedLoss`'s semantic term). The result also holds
    ``"feature_contributions"`` (feature -> n * w_f * L_f, float; they sum to the
    unfloored semantic loss) and ``"feature_weights"`` (feature -> w_f in use).
    Both are empty when the semantic weight is 0 (the term is not computed).

    Args:
        feature_weights: feature name -> weight >= 0, normalised to sum 1. A
            computed feature missing from the dict gets weight 0; an unknown name
            raises ValueError. None: the canonical importance weights (position
            .554, health .150, energy .101, is_alive .050, has_target .035,
            threatened .020, role .050), which requires custom extractors to add
            no new feature names.
        progressive: when True the weights follow :meth:`set_epoch`: at epoch 0
            only the 3 most important features (position, health, energy with the
            canonical weights), renormalised; interpolated linearly to the full
            weights at the last epoch. Before the first ``set_epoch`` call the
            epoch-0 weights apply.
        stability_adjustment: when True, a feature whose loss (this batch,
            detached) is above 10x the median feature loss has its weight
            multiplied by 10 * median / loss - its contribution is capped at what
            it would be at 10x the median, continuous at the threshold - and the
            weights are renormalised. No adjustment when the median is 0.
        other args: as for :class:`CombinedLoss`.

    Shape:
        as for :class:`CombinedLoss`.

    Example:
        >>> loss_fn = FeatureWeightedLoss(progressive=True)
        >>> loss_fn.set_epoch(0, 10)
        >>> sorted(w for w in loss_fn.scheduled_weights().values() if w > 0)[-1] > 0.6
        True
    """

    def __init__(
        self,
        recon_loss_weight: float = 1.0,
        kl_loss_weight: float = 0.1,
        semantic_loss_weight: float = 0.5,
        recon_loss_type: LossType = "mse",
        semantic_feature_extractors: FeatureSelection | None = None,
        semantic_similarity_type: SimilarityType = "cosine",
        reduction: Reduction = "mean",
        semantic_reduction: Reduction | None = None,
        semantic_mode: Mode = "soft",
        on_non_finite: OnNonFinite = "raise",
        feature_weights: Mapping[str, float] | None = None,
        progressive: bool = False,
        stability_adjustment: bool = False,
    ) -> None:
        super().__init__(
            recon_loss_weight=recon_loss_weight,
            kl_loss_weight=kl_loss_weight,
            semantic_loss_weight=semantic_loss_weight,
            recon_loss_type=recon_loss_type,
            semantic_feature_extractors=semantic_feature_extractors,
            semantic_similarity_type=semantic_similarity_type,
            reduction=reduction,
            semantic_reduction=semantic_reduction,
            semantic_mode=semantic_mode,
            on_non_finite=on_non_finite,
        )
        custom = set(self.semantic_loss.feature_extractors)  # a list of names adds none
        if feature_weights is None:
            new_names = sorted(custom - set(SEMANTIC_FEATURES))
            if new_names:
                raise ValueError(
                    f"feature_weights must be given when semantic_feature_extractors add "
                    f"features {new_names}; the canonical weights cover only {SEMANTIC_FEATURES}"
                )
            feature_weights = CANONICAL_FEATURE_WEIGHTS
        unknown = sorted(set(feature_weights) - set(SEMANTIC_FEATURES) - custom)
        if unknown:
            raise ValueError(
                f"feature_weights has unknown features {unknown}; "
                f"known: {sorted(set(SEMANTIC_FEATURES) | custom)}"
            )
        self.base_feature_weights = normalise_weights(feature_weights)
        self.progressive = bool(progressive)
        self.stability_adjustment = bool(stability_adjustment)
        self.progress = 0.0  # fraction of training done, set by set_epoch

    def set_epoch(self, epoch: int, max_epochs: int) -> None:
        """Move the progressive schedule to ``epoch`` of ``max_epochs`` (0-based).

        Progress is epoch / (max_epochs - 1), capped at 1; with one epoch it is 1.
        Call it once per epoch, like ``beta_annealing``; it has no effect unless
        ``progressive=True``.

        Args:
            epoch: 0-based epoch, >= 0.
            max_epochs: number of epochs, >= 1.

        Example:
            >>> loss_fn = FeatureWeightedLoss(progressive=True)
            >>> loss_fn.set_epoch(9, 10)
            >>> loss_fn.scheduled_weights() == loss_fn.base_feature_weights
            True
        """
        if max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {max_epochs!r}")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch!r}")
        self.progress = 1.0 if max_epochs == 1 else min(1.0, epoch / (max_epochs - 1))

    def scheduled_weights(self) -> dict[str, float]:
        """Feature weights after the progressive schedule (before stability adjustment).

        Shape:
            - output: dict feature name -> weight, summing to 1

        Example:
            >>> w = FeatureWeightedLoss(progressive=True).scheduled_weights()  # epoch 0
            >>> sorted(n for n, v in w.items() if v > 0)
            ['energy', 'health', 'position']
        """
        base = self.base_feature_weights
        if not self.progressive:
            return dict(base)
        top = sorted(base, key=lambda n: base[n], reverse=True)[:PROGRESSIVE_TOP_K]
        start = normalise_weights({n: (base[n] if n in top else 0.0) for n in base})
        t = self.progress
        return {n: (1.0 - t) * start[n] + t * base[n] for n in base}

    def _semantic_term(
        self, per_feature: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        names = list(per_feature)
        scheduled = self.scheduled_weights()
        weights = normalise_weights({n: scheduled.get(n, 0.0) for n in names})
        losses = torch.stack([per_feature[n] for n in names])  # (F,) one per feature
        if self.stability_adjustment:
            values = dict(zip(names, losses.detach().tolist(), strict=True))
            weights = self._stabilised(weights, values)
        w = torch.tensor([weights[n] for n in names], dtype=losses.dtype, device=losses.device)
        weighted = len(names) * w * losses  # (F,)
        semantic = weighted.sum()
        check_finite("semantic_loss", semantic, self.on_non_finite, self.log)
        semantic = apply_floor(semantic, COMPONENT_FLOOR, "semantic", self.log)
        contributions = dict(zip(names, weighted.detach().tolist(), strict=True))
        return semantic, {"feature_contributions": contributions, "feature_weights": weights}

    def _skipped_extras(self) -> dict[str, Any]:
        return {"feature_contributions": {}, "feature_weights": {}}

    @staticmethod
    def _stabilised(weights: dict[str, float], losses: dict[str, float]) -> dict[str, float]:
        median = statistics.median(losses.values())
        if not median > 0:
            return weights
        limit = STABILITY_RATIO * median
        damped = {
            n: w * (limit / losses[n] if losses[n] > limit else 1.0) for n, w in weights.items()
        }
        return normalise_weights(damped)
