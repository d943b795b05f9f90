"""Diagnostics compute layer: gradient statistics, per-term attribution, latent health.

Plain data out (frozen dataclasses of host floats); nothing here renders or plots.
Every function reduces on the device and copies to the host once per call. Names are
imported lazily, so ``diagnostics.findings`` and ``diagnostics.thresholds`` can be
read without importing torch.
"""

from meaning_transform._lazy import lazy_exports

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
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
