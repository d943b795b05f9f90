"""Rules: evidence from a run -> findings with a code, severity, numbers and a remedy.

Each rule is a small function taking :class:`RunEvidence` and returning a list of
findings; a rule whose evidence was not measured returns nothing. The codes are
stable and listed in the README.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meaning_transform.diagnostics.findings import Finding, sort_findings

Rule = Callable[["RunEvidence"], list[Finding]]


@dataclass(frozen=True)
class RunEvidence:
    """What one training run left behind, as plain data. Empty/``None`` = not measured.

    Every field but ``where`` is optional: a rule whose evidence is missing is silent.
    """

    where: str  # which run ("Default", "agent_states", ...)
    records: tuple[Any, ...] = ()  # training.EpochRecord per epoch
    reduction: dict[str, str] = field(default_factory=dict)  # term -> "mean" | "sum"
    batch_size: int = 0
    snapshots: tuple[Any, ...] = ()  # gradients.GradientSnapshot per monitored step
    attributions: tuple[Any, ...] = ()  # attribution.Attribution per attributed step
    term_values: tuple[dict[str, float], ...] = ()  # unweighted term values, same steps
    latent: Any = None  # latent.LatentHealth at the end of training
    dead_units: dict[str, float] | None = None  # ReLU module -> fraction never active
    noise_changed: bool | None = None  # did two train-mode passes draw different z?
    input_non_finite: int | None = None  # NaN/Inf count in the training data


RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def evaluate(evidence: RunEvidence, rules: list[Rule] | None = None) -> list[Finding]:
    """All findings of all rules, worst first."""
    found: list[Finding] = []
    for r in RULES if rules is None else rules:
        found.extend(r(evidence))
    return sort_findings(found)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


@rule
def nonfinite_loss(ev: RunEvidence) -> list[Finding]:
    bad = [r for r in ev.records if r.skipped_steps or not math.isfinite(r.total)]
    if not bad:
        return []
    first = bad[0]
    terms = sorted(
        name for r in bad for name, v in r.raw.items() if not math.isfinite(v)
    )
    detail = first.non_finite[0] if first.non_finite else "the total loss is not finite"
    return [
        Finding(
            code="nonfinite-loss",
            severity="error",
            title="Loss or gradient is NaN/Inf",
            message=(
                f"{sum(r.skipped_steps for r in bad)} step(s) skipped from epoch {first.epoch}; "
                f"{detail}" + (f"; terms: {', '.join(sorted(set(terms)))}" if terms else "")
            ),
            remedy=(
                "Check the input data for NaN/Inf and normalise it; lower the learning rate; "
                "clip gradients (e.g. max norm 1.0); keep log_var bounded in the encoder."
            ),
            evidence={
                "first_epoch": first.epoch,
                "skipped_steps": sum(r.skipped_steps for r in bad),
            },
            where=ev.where,
        )
    ]


@rule
def zero_loss(ev: RunEvidence) -> list[Finding]:
    """A component at the 1e-8 floor (or at zero) while its weight is on."""
    found: list[Finding] = []
    for name in ("reconstruction", "kl", "semantic"):
        hits = [
            r
            for r in ev.records
            if r.weights.get(name, 0.0) > 0
            and (r.floors_engaged.get(name, 0) or 0 <= r.raw.get(name, 1.0) <= 1e-8)
        ]
        if not hits:
            continue
        found.append(
            Finding(
                code="zero-loss",
                severity="warning",
                title=f"{name} loss is zero-valued (floor engaged)",
                message=(
                    f"{name} was at or below 1e-8 in {len(hits)} of {len(ev.records)} epochs "
                    f"(first epoch {hits[0].epoch}, value {_fmt(hits[0].raw[name])}); "
                    "a floored term contributes no gradient"
                ),
                remedy=(
                    "Check that the term is computed from the model output and not a detached "
                    "copy; check initialisation (Xavier/Kaiming) and input normalisation; "
                    "a KL at zero is posterior collapse: anneal beta from a small value."
                ),
                evidence={
                    "epochs": len(hits),
                    "first_epoch": hits[0].epoch,
                    "value": hits[0].raw[name],
                },
                where=f"{ev.where}:{name}",
            )
        )
    return found
