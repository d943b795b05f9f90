"""Semantic loss: do the reconstruction and the input *mean* the same agent state?

Works on the 10-feature agent-state layout of :mod:`meaning_transform.data` and
compares seven derived features (``SEMANTIC_FEATURES``): position, health,
has_target, energy, is_alive, role, threatened.

The original system derived is_alive and threatened with hard thresholds and role
with an argmax, so those features had no gradient path while dominating the loss
value. Here the default ``mode="soft"`` makes every feature differentiable
w.r.t. the reconstruction; ``mode="hard"`` is kept only to reproduce that fault.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from meaning_transform.data import (
    ALIVE_THRESHOLD,
    ENERGY,
    HAS_TARGET,
    HEALTH,
    N_FEATURES,
    POSITION,
    ROLE,
    SEMANTIC_FEATURES,
    THREAT_HEALTH,
)
from meaning_transform.losses.checks import (
    COMPONENT_FLOOR,
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
    reduce_per_sample,
)

SimilarityType = Literal["cosine", "mse", "l1"]
Mode = Literal["soft", "hard"]
SIMILARITY_TYPES: tuple[str, ...] = ("cosine", "mse", "l1")
MODES: tuple[str, ...] = ("soft", "hard")
FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]
# What ``feature_extractors=`` accepts: built-in feature names to keep (the original API,
# e.g. ["position", "health"]) or custom extractors by name.
FeatureSelection = Sequence[str] | Mapping[str, FeatureExtractor]

# Probabilities entering a BCE are clamped to [PROB_EPS, 1 - PROB_EPS]: the
# per-sample BCE is then at most -log(1e-6) ~ 13.8 and never inf.
PROB_EPS = 1e-6
COSINE_EPS = 1e-8
ROLE_TEMPERATURE = 0.1  # role slots / T are the logits: a one-hot row is then a near-certain class


def _bce(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) probabilities vs (B,) 0/1 targets -> (B,) binary cross-entropy."""
    p = p.clamp(PROB_EPS, 1.0 - PROB_EPS)
    return -(target * torch.log(p) + (1.0 - target) * torch.log1p(-p))


def _continuous(rec: torch.Tensor, orig: torch.Tensor, similarity_type: str) -> torch.Tensor:
    """(B, k) reconstructed vs original feature -> (B,) per-sample dissimilarity."""
    diff = rec - orig  # (B, k)
    if similarity_type == "l1":
        return diff.abs().sum(dim=1)
    squared = (diff**2).sum(dim=1)  # (B,)
    if similarity_type == "mse" or rec.shape[1] == 1:
        # The cosine of two scalars is only the product of their signs: useless for
        # health/energy in [0, 1], so "cosine" falls back to squared error there.
        return squared
    # Cosine alone ignores magnitude ((0.1, 0.1) and (0.9, 0.9) would match), so
    # the squared error is added to pin the length down too.
    cos = F.cosine_similarity(rec, orig, dim=1, eps=COSINE_EPS)  # (B,)
    return (1.0 - cos) + squared


def _target_indicators(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Hard 0/1 indicators of the original state. x: (B, 10) -> dict of (B,)."""
    health = x[:, HEALTH]  # (B,)
    has_target = x[:, HAS_TARGET] > 0.5  # (B,) bool
    return {
        "is_alive": (health > ALIVE_THRESHOLD).to(x.dtype),
        "threatened": (has_target & (health < THREAT_HEALTH)).to(x.dtype),
    }


def _split_features(
    features: FeatureSelection | None,
) -> tuple[tuple[str, ...], dict[str, FeatureExtractor]]:
    """``feature_extractors=`` as (built-in names in use, custom extractors by name)."""
    if features is None:
        return SEMANTIC_FEATURES, {}
    if isinstance(features, Mapping):
        for name, extract in features.items():
            if not callable(extract):
                raise TypeError(
                    f"feature extractor {name!r} must be a callable f(x) -> (B, k), "
                    f"got {type(extract).__name__}"
                )
        return SEMANTIC_FEATURES, dict(features)
    if isinstance(features, str):  # a str is a Sequence[str] of letters
        raise TypeError(f"feature_extractors must be a list of feature names, got {features!r}")
    names = list(features)
    unknown = [n for n in names if n not in SEMANTIC_FEATURES]
    if unknown:
        raise ValueError(
            f"unknown semantic feature(s) {unknown}; known: {list(SEMANTIC_FEATURES)} "
            "(pass a mapping name -> callable for custom features)"
        )
    if not names:
        raise ValueError(f"feature_extractors names no feature; known: {list(SEMANTIC_FEATURES)}")
    return tuple(n for n in SEMANTIC_FEATURES if n in names), {}


class SemanticLoss(nn.Module):
    """Per-feature semantic loss on the agent-state layout, summed over features.

    Features and how each is compared (per sample, then reduced over the batch):

    - ``position`` (x, y), ``health``, ``energy``: by ``similarity_type``.
      ``"mse"``: squared error summed over the feature's dims. ``"l1"``: absolute
      error. ``"cosine"``: for position ``1 - cos(rec_xy, orig_xy)`` *plus* the
      squared error (cosine alone ignores magnitude); for the scalar features
      squared error (the cosine of a scalar is only its sign).
    - ``has_target``: squared error.
    - ``is_alive`` (health > 0.1), ``threatened`` (has_target and health < 0.3):
      in ``"soft"`` mode the reconstruction's probability
      ``sigmoid((health - 0.1) / T)`` resp.
      ``clamp(has_target, 0, 1) * sigmoid((0.3 - health) / T)`` is compared to
      the original's hard indicator by BCE, probabilities clamped to
      [1e-6, 1 - 1e-6]. A sample whose health is on the wrong side of the
      threshold by more than ~14 T (0.28 at T = 0.02) scores the capped BCE
      (~13.8) with no gradient through this term; its ``health`` term still
      pulls it back.
    - ``role``: in ``"soft"`` mode cross-entropy of the reconstruction's five role
      slots, divided by ``ROLE_TEMPERATURE`` (0.1) and read as logits, against the
      original's argmax role. The temperature makes a one-hot reconstruction
      (margin 1 → logit margin 10) score log(1 + 4e^-10) ~ 2e-4 instead of the
      0.91 that raw logits would give, so a perfect role is near zero.

    ``mode="hard"`` reproduces the original fault: is_alive and threatened from
    hard thresholds of the reconstruction, role from argmax equality. Those three
    features then have no gradient path at all (their tensors do not require
    grad) while still contributing to the loss value. Use it only to show that
    fault; train with ``"soft"``.

    The result is floored at 1e-8 under the name ``"semantic"``; engagements are
    counted in :attr:`log`.

    Args:
        feature_extractors: which features to compare. None: every built-in
            feature, and D must be 10. A list of built-in names (the original API,
            e.g. ``["position", "health"]``): only those, still in
            ``SEMANTIC_FEATURES`` order, and D must be 10; an unknown name raises
            ValueError. A mapping name -> callable ``f(x) -> (B, k)`` (or ``(B,)``):
            custom features, each compared by squared error between
            ``f(x_reconstructed)`` and ``f(x_original)``; a name equal to a
            built-in feature replaces it, other names are added, the built-ins
            are used whenever the input has the 10-feature layout, and any other
            D is allowed (then only the custom features apply).
        similarity_type: ``"cosine"``, ``"mse"`` or ``"l1"`` (see above).
        reduction: ``"mean"`` over samples or ``"sum"`` over the batch.
        mode: ``"soft"`` (differentiable, default) or ``"hard"`` (the original fault).
        temperature: T of the soft thresholds, in health units; smaller is closer
            to the hard threshold and has a narrower gradient band.
        on_non_finite: ``"raise"`` or ``"record"`` (see :mod:`.checks`).
        log: a :class:`CheckLog` to write into; a new one when None.

    Shape:
        - x_reconstructed: (B, 10), or (B, D) with custom extractors
        - x_original: same as x_reconstructed
        - output: scalar, for both reductions; :meth:`per_feature` gives one
          scalar per feature.

    Example:
        >>> loss_fn = SemanticLoss()
        >>> x = torch.rand(8, 10)
        >>> loss = loss_fn(x + 0.01 * torch.randn(8, 10), x)
        >>> sorted(loss_fn.detailed_breakdown(x, x)) == sorted(SEMANTIC_FEATURES)
        True
        >>> list(SemanticLoss(["health", "position"]).detailed_breakdown(x, x))
        ['position', 'health']
    """

    def __init__(
        self,
        feature_extractors: FeatureSelection | None = None,
        similarity_type: SimilarityType = "cosine",
        reduction: Reduction = "mean",
        mode: Mode = "soft",
        temperature: float = 0.02,
        on_non_finite: OnNonFinite = "raise",
        log: CheckLog | None = None,
    ) -> None:
        super().__init__()
        if similarity_type not in SIMILARITY_TYPES:
            raise ValueError(
                f"similarity_type must be one of {SIMILARITY_TYPES}, got {similarity_type!r}"
            )
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        builtins, custom = _split_features(feature_extractors)
        self.builtin_features: tuple[str, ...] = builtins  # the built-ins in use
        self.feature_extractors: dict[str, FeatureExtractor] = custom
        self.similarity_type = similarity_type
        self.reduction = check_reduction(reduction)
        self.mode = mode
        self.temperature = float(temperature)
        self.on_non_finite = check_on_non_finite(on_non_finite)
        self.log = log if log is not None else CheckLog()

    # --- per-sample features -------------------------------------------------

    def uses_builtin(self, n_features: int) -> bool:
        """Whether the built-in agent-state features apply to D = ``n_features``."""
        return n_features == N_FEATURES

    def per_sample_features(
        self, x_reconstructed: torch.Tensor, x_original: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Unreduced per-feature losses, in reporting order.

        Shape:
            - x_reconstructed, x_original: (B, 10), or (B, D) with custom extractors
            - output: dict name -> (B,)
        """
        n_features = x_original.shape[1]
        if not self.feature_extractors and not self.uses_builtin(n_features):
            raise ShapeMismatchError(
                f"SemanticLoss expects the {N_FEATURES}-feature agent-state layout "
                f"(B, {N_FEATURES}), got {tuple(x_original.shape)}; pass feature_extractors "
                "for other data"
            )
        out: dict[str, torch.Tensor] = {}
        if self.uses_builtin(n_features):
            builtin = self._builtin_features(x_reconstructed, x_original)
            for name in self.builtin_features:
                if name not in self.feature_extractors:
                    out[name] = builtin[name]
        for name, extract in self.feature_extractors.items():
            out[name] = self._custom_feature(name, extract, x_reconstructed, x_original)
        # Keep built-in reporting order; a custom name overriding a built-in takes its slot.
        order = [n for n in SEMANTIC_FEATURES if n in out]
        order += [n for n in out if n not in SEMANTIC_FEATURES]
        return {name: out[name] for name in order}

    def _builtin_features(self, rec: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        sim = self.similarity_type
        targets = _target_indicators(x)
        feats = {
            "position": _continuous(rec[:, POSITION], x[:, POSITION], sim),  # (B,)
            "health": _continuous(rec[:, HEALTH : HEALTH + 1], x[:, HEALTH : HEALTH + 1], sim),
            "has_target": (rec[:, HAS_TARGET] - x[:, HAS_TARGET]) ** 2,
            "energy": _continuous(rec[:, ENERGY : ENERGY + 1], x[:, ENERGY : ENERGY + 1], sim),
        }
        role_target = x[:, ROLE].argmax(dim=1)  # (B,)
        health = rec[:, HEALTH]  # (B,)
        if self.mode == "soft":
            t = self.temperature
            alive_p = torch.sigmoid((health - ALIVE_THRESHOLD) / t)  # (B,)
            threat_p = rec[:, HAS_TARGET].clamp(0.0, 1.0) * torch.sigmoid(
                (THREAT_HEALTH - health) / t
            )  # (B,)
            feats["is_alive"] = _bce(alive_p, targets["is_alive"])
            role_logits = rec[:, ROLE] / ROLE_TEMPERATURE  # (B, 5)
            feats["role"] = F.cross_entropy(role_logits, role_target, reduction="none")
            feats["threatened"] = _bce(threat_p, targets["threatened"])
        else:
            # The original fault: comparisons and argmax have no gradient path.
            rec_ind = _target_indicators(rec)
            feats["is_alive"] = (rec_ind["is_alive"] - targets["is_alive"]) ** 2
            feats["role"] = (rec[:, ROLE].argmax(dim=1) != role_target).to(rec.dtype)
            feats["threatened"] = (rec_ind["threatened"] - targets["threatened"]) ** 2
        return feats

    def _custom_feature(
        self,
        name: str,
        extract: FeatureExtractor,
        rec: torch.Tensor,
        x: torch.Tensor,
    ) -> torch.Tensor:
        f_rec, f_x = extract(rec), extract(x)
        batch = x.shape[0]
        for f in (f_rec, f_x):
            if f.dim() not in (1, 2) or f.shape[0] != batch:
                raise ShapeMismatchError(
                    f"feature extractor {name!r} must return (B,) or (B, k) with B={batch}, "
                    f"got {tuple(f.shape)}"
                )
        f_rec, f_x = f_rec.reshape(batch, -1), f_x.reshape(batch, -1)  # (B, k)
        check_same_shape(f"{name}(x_reconstructed)", f_rec, f"{name}(x_original)", f_x)
        return ((f_rec - f_x) ** 2).sum(dim=1)  # (B,)

    # --- reduced results -----------------------------------------------------

    def check_inputs(self, x_reconstructed: torch.Tensor, x_original: torch.Tensor) -> None:
        """Shape and NaN/Inf checks, reported as ``x_reconstructed`` / ``x_original``."""
        check_same_shape("x_reconstructed", x_reconstructed, "x_original", x_original)
        check_2d("x_original", x_original)
        check_finite("x_reconstructed", x_reconstructed, self.on_non_finite, self.log)
        check_finite("x_original", x_original, self.on_non_finite, self.log)

    def per_feature(
        self,
        x_reconstructed: torch.Tensor,
        x_original: torch.Tensor,
        *,
        check_inputs: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Each feature's loss reduced over the batch, still attached to the graph.

        Their sum is the (unfloored) semantic loss, so gradients can be attributed
        feature by feature. A non-finite feature is reported as ``semantic/<name>``.

        Args:
            x_reconstructed: decoder output.
            x_original: the agent states it should reproduce.
            check_inputs: False skips the input checks (the caller made them).

        Shape:
            - x_reconstructed, x_original: (B, 10), or (B, D) with custom extractors
            - output: dict name -> scalar

        Example:
            >>> x = torch.rand(4, 10)
            >>> terms = SemanticLoss().per_feature(x.requires_grad_(), x.detach())
            >>> terms["role"].requires_grad
            True
        """
        if check_inputs:
            self.check_inputs(x_reconstructed, x_original)
        per_sample = self.per_sample_features(x_reconstructed, x_original)
        total = torch.stack(list(per_sample.values())).sum(dim=0)  # (B,)
        if not bool(torch.isfinite(total.detach()).all()):  # one sync; name culprits only then
            for name, value in per_sample.items():
                check_finite(f"semantic/{name}", value, self.on_non_finite, self.log)
        return {name: reduce_per_sample(v, self.reduction) for name, v in per_sample.items()}

    def combine(self, per_feature: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Sum reduced per-feature losses into the checked, floored semantic loss."""
        loss = torch.stack(list(per_feature.values())).sum()
        check_finite("semantic_loss", loss, self.on_non_finite, self.log)
        return apply_floor(loss, COMPONENT_FLOOR, "semantic", self.log)

    def forward(
        self,
        x_reconstructed: torch.Tensor,
        x_original: torch.Tensor,
        *,
        check_inputs: bool = True,
    ) -> torch.Tensor:
        """Reduced, floored semantic loss. ``check_inputs=False`` skips the input checks."""
        per_feature = self.per_feature(x_reconstructed, x_original, check_inputs=check_inputs)
        return self.combine(per_feature)

    def detailed_breakdown(
        self, x_reconstructed: torch.Tensor, x_original: torch.Tensor
    ) -> dict[str, float]:
        """Each feature's reduced loss as a detached float (one device sync in all).

        Args:
            x_reconstructed: decoder output.
            x_original: the agent states it should reproduce.

        Shape:
            - x_reconstructed, x_original: (B, 10), or (B, D) with custom extractors
            - output: dict feature name -> float, in ``SEMANTIC_FEATURES`` order

        Example:
            >>> x = torch.rand(4, 10)
            >>> SemanticLoss().detailed_breakdown(x, x)["health"]
            0.0
        """
        with torch.no_grad():
            per_feature = self.per_feature(x_reconstructed, x_original)
        return breakdown_floats(per_feature)


def breakdown_floats(per_feature: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """dict of scalar tensors -> dict of floats, moved to the host in one transfer.

    Args:
        per_feature: name -> scalar tensor (e.g. from :meth:`SemanticLoss.per_feature`).

    Shape:
        - output: dict name -> float

    Example:
        >>> breakdown_floats({"a": torch.tensor(0.5)})
        {'a': 0.5}
    """
    if not per_feature:
        return {}
    values = torch.stack([v.detach() for v in per_feature.values()]).tolist()
    return dict(zip(per_feature.keys(), values, strict=True))
