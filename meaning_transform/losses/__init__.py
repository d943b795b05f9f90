"""The loss library: reconstruction, KL, semantic and combined VAE losses, beta annealing.

Every loss checks its inputs for shape and NaN/Inf, floors its value, and counts
each floor engagement in a :class:`CheckLog` - a zero-valued loss is never silent.

Example:
    >>> from meaning_transform.losses import CombinedLoss, beta_annealing
    >>> loss_fn = CombinedLoss(recon_loss_weight=1.0, kl_loss_weight=0.1, semantic_loss_weight=0.5)
    >>> loss_fn.kl_loss_weight = beta_annealing(epoch=0, max_epochs=10, schedule_type="sigmoid")
"""

from typing import TYPE_CHECKING

from meaning_transform._lazy import lazy_exports

if TYPE_CHECKING:  # the names as the type checker sees them
    from meaning_transform.losses.annealing import (
        SCHEDULES,
        beta_annealing,
        beta_schedule,
    )
    from meaning_transform.losses.checks import (
        COMPONENT_FLOOR,
        TOTAL_FLOOR,
        CheckLog,
        LossInputError,
        NonFiniteEvent,
        NonFiniteLossError,
        ShapeMismatchError,
    )
    from meaning_transform.losses.combined import (
        CANONICAL_FEATURE_WEIGHTS,
        CombinedLoss,
        FeatureWeightedLoss,
        normalise_weights,
    )
    from meaning_transform.losses.kl import (
        LOG_VAR_MAX,
        LOG_VAR_MIN,
        KLDivergenceLoss,
        clamp_log_var,
        kl_elementwise,
        kl_per_dim,
        kl_per_sample,
        kl_terms,
    )
    from meaning_transform.losses.reconstruction import (
        LOSS_TYPES,
        ReconstructionLoss,
        reconstruction_per_element,
        reconstruction_per_feature,
        reconstruction_per_sample,
    )
    from meaning_transform.losses.semantic import (
        MODES,
        SIMILARITY_TYPES,
        SemanticLoss,
        breakdown_floats,
    )


_EXPORTS = {
    "SCHEDULES": "annealing",
    "beta_annealing": "annealing",
    "beta_schedule": "annealing",
    "COMPONENT_FLOOR": "checks",
    "TOTAL_FLOOR": "checks",
    "CheckLog": "checks",
    "LossInputError": "checks",
    "NonFiniteEvent": "checks",
    "NonFiniteLossError": "checks",
    "ShapeMismatchError": "checks",
    "CANONICAL_FEATURE_WEIGHTS": "combined",
    "CombinedLoss": "combined",
    "FeatureWeightedLoss": "combined",
    "normalise_weights": "combined",
    "LOG_VAR_MAX": "kl",
    "LOG_VAR_MIN": "kl",
    "KLDivergenceLoss": "kl",
    "clamp_log_var": "kl",
    "kl_elementwise": "kl",
    "kl_per_dim": "kl",
    "kl_per_sample": "kl",
    "kl_terms": "kl",
    "LOSS_TYPES": "reconstruction",
    "ReconstructionLoss": "reconstruction",
    "reconstruction_per_element": "reconstruction",
    "reconstruction_per_feature": "reconstruction",
    "reconstruction_per_sample": "reconstruction",
    "MODES": "semantic",
    "SIMILARITY_TYPES": "semantic",
    "SemanticLoss": "semantic",
    "breakdown_floats": "semantic",
}
__all__ = [
    "CANONICAL_FEATURE_WEIGHTS",
    "COMPONENT_FLOOR",
    "CheckLog",
    "CombinedLoss",
    "FeatureWeightedLoss",
    "KLDivergenceLoss",
    "LOG_VAR_MAX",
    "LOG_VAR_MIN",
    "LOSS_TYPES",
    "LossInputError",
    "MODES",
    "NonFiniteEvent",
    "NonFiniteLossError",
    "ReconstructionLoss",
    "SCHEDULES",
    "SIMILARITY_TYPES",
    "SemanticLoss",
    "ShapeMismatchError",
    "TOTAL_FLOOR",
    "beta_annealing",
    "beta_schedule",
    "breakdown_floats",
    "clamp_log_var",
    "kl_elementwise",
    "kl_per_dim",
    "kl_per_sample",
    "kl_terms",
    "normalise_weights",
    "reconstruction_per_element",
    "reconstruction_per_feature",
    "reconstruction_per_sample",
]
__getattr__ = lazy_exports(__name__, _EXPORTS)
