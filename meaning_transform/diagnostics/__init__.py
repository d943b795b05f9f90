"""Diagnostics compute layer: gradient statistics, per-term attribution, latent health.

Plain data out (frozen dataclasses of host floats); nothing here renders or plots.
Every function reduces on the device and copies to the host once per call.
"""

from meaning_transform.diagnostics.attribution import Attribution, term_attribution
from meaning_transform.diagnostics.gradients import (
    GradientHooks,
    GradientMonitor,
    GradientSnapshot,
    ParamGradStats,
    dead_units,
    gradient_snapshot,
    update_ratios,
)
from meaning_transform.diagnostics.latent import LatentHealth, encode_means, latent_health

__all__ = [
    "Attribution",
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
