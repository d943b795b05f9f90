"""The loss library: reconstruction, KL, semantic and combined VAE losses, beta annealing.

Every loss checks its inputs for shape and NaN/Inf, floors its value, and counts
each floor engagement in a :class:`CheckLog` - a zero-valued loss is never silent.

Example:
    >>> from meaning_transform.losses import CombinedLoss, beta_annealing
    >>> loss_fn = CombinedLoss(recon_loss_weight=1.0, kl_loss_weight=0.1, semantic_loss_weight=0.5)
    >>> loss_fn.kl_loss_weight = beta_annealing(epoch=0, max_epochs=10, schedule_type="sigmoid")
"""

from meaning_transform._lazy import lazy_exports

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
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
