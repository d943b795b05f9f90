"""Findings: what a rule concluded, with evidence and a remedy.

Plain data only (no torch). The CLI renders findings as a table or JSON and turns
the worst severity into an exit code through ``--fail-on``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

Severity = Literal["error", "warning", "info"]
SEVERITIES: tuple[str, ...] = ("error", "warning", "info")  # worst first
FAIL_ON: tuple[str, ...] = ("never", "error", "warning")


@dataclass(frozen=True)
class Finding:
    code: str  # stable, e.g. "posterior-collapse"; documented in the README
    severity: Severity
    title: str  # one line: what is wrong
    message: str  # what was seen, with numbers
    remedy: str  # what to do, in plain words
    where: str = ""  # the run, and the term or parameter it is about ("Default:kl")
    evidence: Mapping[str, float | int | str | None] = field(default_factory=dict)
    runs: tuple[str, ...] = ()  # the runs (configurations, data kinds) it was found in
    # the code of the finding this one follows from ("" = a cause in its own right); see
    # diagnostics/causes.py: a consequence is reported at info, after its cause
    consequence_of: str = ""

    def __post_init__(self) -> None:  # a finding, like the report holding it, is read-only
        object.__setattr__(self, "evidence", MappingProxyType(dict(self.evidence)))

    def as_dict(self) -> dict[str, object]:
        return {
            "code": self.code,
            "severity": self.severity,
            "title": self.title,
            "message": self.message,
            "remedy": self.remedy,
            "where": self.where,
            "evidence": dict(self.evidence),
            "runs": list(self.runs),
            "consequence_of": self.consequence_of,
        }


@dataclass(frozen=True)
class NotChecked:
    """A check that could not run, and why (so a missing finding is never silent)."""

    code: str
    reason: str
    runs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Verdict:
    """What a rule made of a measurement a table shows, so table and findings agree.

    ``status``: ``finding`` (the rule fired; the finding with ``code`` is in the
    findings), ``ok`` (checked, nothing wrong) or ``not-judged`` (``reason`` says why).
    """

    code: str
    status: Literal["finding", "ok", "not-judged"]
    reason: str


def _rank(f: Finding) -> tuple[int, str, str]:
    return (SEVERITIES.index(f.severity), f.code, f.where)


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    """Worst first, then by code and place, so output order is stable."""
    return sorted(findings, key=_rank)


def _subject(where: str, run: str) -> str:
    """``where`` without its run prefix: "Default:semantic/role" -> "semantic/role"."""
    if where == run:
        return ""
    prefix = f"{run}:"
    return where[len(prefix) :] if where.startswith(prefix) else where


def merge_findings(per_run: Sequence[tuple[str, Sequence[Finding]]]) -> tuple[Finding, ...]:
    """One finding per (code, subject) across the runs of one command, worst first.

    A finding seen in several runs (configurations, data kinds) becomes one row whose
    ``runs`` names them all and whose ``where`` reads "Default, Balanced: kl"; its
    message, evidence and severity are those of the worst (then first) run.
    """
    groups: dict[tuple[str, str], list[tuple[str, Finding]]] = {}
    for run, findings in per_run:
        for f in findings:
            groups.setdefault((f.code, _subject(f.where, run)), []).append((run, f))
    merged: list[Finding] = []
    for (_, subject), seen in groups.items():
        runs = tuple(dict.fromkeys(run for run, _ in seen))
        worst = min((f for _, f in seen), key=lambda f: SEVERITIES.index(f.severity))
        where = ", ".join(runs) + (f": {subject}" if subject else "")
        merged.append(replace(worst, where=where, runs=runs))
    return tuple(sort_findings(merged))


def merge_not_checked(
    per_run: Sequence[tuple[str, Sequence[NotChecked]]],
) -> tuple[NotChecked, ...]:
    """One entry per (code, reason) across runs, naming the runs; sorted by code."""
    groups: dict[tuple[str, str], list[str]] = {}
    for run, items in per_run:
        for item in items:
            groups.setdefault((item.code, item.reason), []).append(run)
    return tuple(
        NotChecked(code, reason, tuple(dict.fromkeys(runs)))
        for (code, reason), runs in sorted(groups.items())
    )


def exit_code_for(severities: Iterable[str], fail_on: str) -> int:
    """0 when no severity is at or above ``fail_on``; 1 otherwise. ``never`` gives 0."""
    if fail_on not in FAIL_ON:
        raise ValueError(f"fail_on must be one of {', '.join(FAIL_ON)}, got {fail_on!r}")
    if fail_on == "never":
        return 0
    limit = SEVERITIES.index(fail_on)
    return int(any(SEVERITIES.index(s) <= limit for s in severities))
