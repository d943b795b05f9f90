"""Diagnostics compute layer: gradient statistics, per-term attribution, latent health.

Plain data out (frozen dataclasses of host floats); nothing here renders or plots.
Every function reduces on the device and copies to the host once per call. Names are
imported lazily, so ``diagnostics.findings`` and ``diagnostics.thresholds`` can be
read without importing torch.
"""

from typing import TYPE_CHECKING

from meaning_transform._lazy import lazy_exports

if TYPE_CHECKING:  # the names as the type checker sees them
    from meaning_transform.diagnostics.attribution import (
        Attribution,
        AttributionSummary,
        term_attribution,
    )
    from meaning_transform.diagnostics.gradients import (
        GradientHooks,
        GradientMonitor,
        GradientSnapshot,
        ParamGradStats,
        dead_units,
        gradient_snapshot,
        update_ratios,
    )
    from meaning_transform.diagnostics.latent import (
        LatentHealth,
        encode_means,
        latent_health,
    )


_EXPORTS = {
    "Attribution": "attribution",
    "AttributionSummary": "attribution",
    "term_attribution": "attribution",
    "GradientHooks": "gradients",
    "GradientMonitor": "gradients",
    "GradientSnapshot": "gradients",
    "ParamGradStats": "gradients",
    "dead_units": "gradients",
    "gradient_snapshot": "gradients",
    "update_ratios": "gradients",
    "LatentHealth": "latent",
    "encode_means": "latent",
    "latent_health": "latent",
}
__all__ = [
    "Attribution",
    "AttributionSummary",
    "GradientHooks",
    "GradientMonitor",
    "GradientSnapshot",
    "LatentHealth",
    "ParamGradStats",
    "dead_units",
    "encode_means",
    "gradient_snapshot",
    "latent_health",
    "term_attribution",
    "update_ratios",
]
__getattr__ = lazy_exports(__name__, _EXPORTS)
