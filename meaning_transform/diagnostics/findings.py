"""Findings: what a rule concluded, with evidence and a remedy.

Plain data only. The CLI renders findings as a table or JSON and turns the
worst severity into an exit code through ``--fail-on``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

Severity = Literal["error", "warning", "info"]
SEVERITIES: tuple[str, ...] = ("error", "warning", "info")  # worst first
FAIL_ON: tuple[str, ...] = ("never", "error", "warning")


@dataclass(frozen=True)
class Finding:
    code: str  # stable, e.g. "MTX101"; documented in the README
    severity: Severity
    title: str  # one line: what is wrong
    message: str  # what was seen, with numbers
    remedy: str  # what to do, in plain words
    evidence: dict[str, float | int | str | None] = field(default_factory=dict)
    where: str = ""  # the run, term or parameter it is about

    def as_dict(self) -> dict[str, object]:
        return {
            "code": self.code,
            "severity": self.severity,
            "title": self.title,
            "message": self.message,
            "remedy": self.remedy,
            "where": self.where,
            "evidence": dict(self.evidence),
        }


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    """Worst first, then by code and place, so output order is stable."""
    return sorted(findings, key=lambda f: (SEVERITIES.index(f.severity), f.code, f.where))


def exit_code_for(severities: Iterable[str], fail_on: str) -> int:
    """0 when no severity is at or above ``fail_on``; 1 otherwise. ``never`` gives 0."""
    if fail_on not in FAIL_ON:
        raise ValueError(f"fail_on must be one of {', '.join(FAIL_ON)}, got {fail_on!r}")
    if fail_on == "never":
        return 0
    limit = SEVERITIES.index(fail_on)
    return int(any(SEVERITIES.index(s) <= limit for s in severities))
