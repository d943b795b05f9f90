"""VAE-specific checks: the KL term against the analytic KL, the beta schedule, and when
the KL collapsed. Plain data (no torch); the Doctor records :class:`VaeEvidence`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from meaning_transform.diagnostics.findings import Finding

if TYPE_CHECKING:
    from meaning_transform.diagnostics.rules import RunEvidence

VAE_RULES: list[Callable[[RunEvidence], list[Finding]]] = []
