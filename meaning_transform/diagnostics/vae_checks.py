"""VAE-specific checks: the KL term against the analytic KL, the β schedule, and when
the KL collapsed. Plain data (no torch); the Doctor records :class:`VaeEvidence`.

Per recorded step the Doctor keeps the analytic KL of that step's ``mu`` and ``log_var``
(``0.5 * sum_z (mu^2 + exp(log_var) - 1 - log_var)``, mean over the batch: nats per
sample, whatever the loss does), the loss's KL term as it returned it, the weight it
was given, and the β the user declared for that step. Three rules read them:

* ``kl-formula``: the term over the analytic KL is 1 (per-sample mean), B (summed over
  the batch) or 1/Z (mean over every element) for a correct KL; a negative ratio under a
  positive weight rewards KL; a ratio of 2 is a missing 0.5.
* ``beta-schedule``: the weight applied to the KL term does not follow the declared
  schedule, or never gets near the declared maximum.
* ``collapse-onset``: the KL rose, then fell to a tenth of its peak and stayed there;
  the finding names the step and what β was doing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import median
from typing import TYPE_CHECKING

from meaning_transform.diagnostics.findings import Finding, NotChecked, Severity
from meaning_transform.diagnostics.thresholds import TERMS_MISMATCH

if TYPE_CHECKING:
    from meaning_transform.diagnostics.rules import RunEvidence

# ---- thresholds (ours: no literature value; each says why) ----
# An analytic KL below this (nats per sample) is a posterior at the prior: the ratio
# term / KL is then 0/0 in rounding and the 1e-8 floor of mtx's own KL term.
KL_AUDIT_MIN_NATS = 1e-3
KL_AUDIT_MIN_STEPS = 3  # steps with a measurable ratio before the formula is judged
# A correct KL matches its convention exactly (ratio 1 to rounding); 15% leaves room for
# a clamp of log_var that differs from mtx's [-30, 20] and for a free-bits floor that
# engages on a few dimensions, while a missing 0.5 (x2) or a weight of 0.5 is far out.
KL_MATCH = 0.15
KL_HALF = 0.03  # ratio / (2 x convention) within 3% of 1: a missing 0.5
# A Monte Carlo KL (log q(z) - log p(z)) is unbiased but noisy: a convention within this
# many standard errors of the pooled ratio fits, and a ratio known to worse than
# KL_NOISY (relative, 3 s.e.) is not judged at all.
KL_NOISE_Z = 3.0
KL_NOISY = 0.5
# The applied KL weight follows the schedule when the median |applied - declared| over
# the steps is within 10% of the schedule's peak (a per-epoch schedule declared per step
# differs by at most one epoch's increment, ~1/epochs of the peak).
BETA_FOLLOW = 0.10
BETA_REACHED = 0.05  # the applied weight must come within 5% of the declared maximum
COLLAPSE_ONSET_MIN_STEPS = 20  # recorded steps before a rise and a fall can be told apart
COLLAPSE_ONSET_WINDOW = 11  # centred running median over this many recorded steps
COLLAPSE_ONSET_DROP = 0.10  # the smoothed KL fell to at most this share of its peak ...
# ... to below one bit per sample, after a peak of at least one bit: the latent had
# learned something and lost it (a healthy β-VAE's KL drifts 30-50% below its early
# peak and settles at several nats)
COLLAPSE_ONSET_FLOOR = math.log(2.0)
BETA_CONSTANT = 0.01  # β varying by less than 1% of its largest value is "constant"


@dataclass(frozen=True)
class VaeStep:
    """One recorded training step (plain host floats; NaN = not measured)."""

    step: int  # the Doctor's step index, from 0
    analytic_kl: float  # mean over the batch of sum_z KL(q(z_j|x) || N(0, 1)), nats
    kl_term: float  # the loss's KL term as it returned it (NaN: it has none)
    batch_size: int  # B
    latent_dim: int  # Z (entries of mu per sample)
    weight: float  # the weight applied to the KL term (measured from the total, or given)
    declared_beta: float  # the declared schedule's β at this step (NaN: none declared)
    given_weight: float = math.nan  # the weight the loss reported or step() was given


@dataclass(frozen=True)
class VaeEvidence:
    """The VAE-specific evidence of a run. ``steps`` is thinned to a bounded number of
    evenly spaced steps (every ``stride``-th) and always ends with the run's last step."""

    steps: tuple[VaeStep, ...] = ()
    steps_seen: int = 0  # training steps with mu and log_var
    stride: int = 1
    kl_term: str = ""  # the term audited ("" = none found)
    kl_term_problem: str = ""  # why no KL term was read ("" when one was)
    weight_source: str = ""  # "total" (measured), "weights" (as given) or "" (unknown)
    schedule_declared: bool = False
    beta_max: float | None = None


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _finite(*xs: float) -> bool:
    return all(math.isfinite(x) for x in xs)


# --------------------------------------------------------------------------- kl-formula

# (name, scale of the analytic per-sample-mean KL that the convention's term equals)
_CONVENTIONS: tuple[tuple[str, Callable[[VaeStep], float]], ...] = (
    ("per-sample mean", lambda s: 1.0),
    ("sum over the batch", lambda s: float(s.batch_size)),
    ("mean over every element", lambda s: 1.0 / max(s.latent_dim, 1)),
)


@dataclass(frozen=True)
class KlFit:
    """The pooled ratio of the KL term to one convention's analytic KL."""

    convention: str
    ratio: float  # sum(term) / sum(scale * analytic): 1 when the term is this convention
    se: float  # its standard error (delta method over the steps)


@dataclass(frozen=True)
class KlAudit:
    """What the KL-term audit found: ``verdict`` is ``ok``, ``wrong-sign``,
    ``missing-half``, ``mismatch`` or ``noisy`` (too noisy to judge)."""

    verdict: str
    fit: KlFit  # the convention the verdict is about (the nearest one)
    weight: float  # median weight given to the term over the audited steps
    steps: int  # steps audited


def _fit(points: Sequence[VaeStep], convention: str, scale: Callable[[VaeStep], float]) -> KlFit:
    """Ratio of sums (not the median of per-step ratios): a Monte Carlo estimate's noise
    averages out over the steps instead of being picked from."""
    a = [scale(s) * s.analytic_kl for s in points]
    t = [s.kl_term for s in points]
    ratio = sum(t) / sum(a)
    resid = sum((ti - ratio * ai) ** 2 for ti, ai in zip(t, a, strict=True))
    n = len(points)
    se = math.sqrt(resid * n / max(n - 1, 1)) / sum(a)
    return KlFit(convention, ratio, se)


def kl_audit(vae: VaeEvidence | None) -> KlAudit | None:
    """The KL term against the analytic KL (None: nothing to audit, see vae_not_checked)."""
    if vae is None or not vae.kl_term:
        return None
    points = [
        s
        for s in vae.steps
        if _finite(s.kl_term, s.analytic_kl)
        and s.analytic_kl > KL_AUDIT_MIN_NATS
        and s.batch_size > 0
    ]
    if len(points) < KL_AUDIT_MIN_STEPS:
        return None
    fits = [_fit(points, name, scale) for name, scale in _CONVENTIONS]
    weights = [s.weight for s in points if _finite(s.weight) and s.weight != 0.0]
    weight = median(weights) if weights else math.nan
    nearest = min(fits, key=lambda f: abs(math.log(abs(f.ratio))) if f.ratio else math.inf)
    verdict = "ok"
    sure = abs(nearest.ratio) > KL_NOISE_Z * nearest.se
    if weights and weight * nearest.ratio < 0 and sure:
        verdict = "wrong-sign"
    elif any(abs(abs(f.ratio) - 1) <= max(KL_MATCH, KL_NOISE_Z * f.se) for f in fits):
        verdict = "ok"
    elif half := [f for f in fits if abs(abs(f.ratio) / 2 - 1) <= KL_HALF]:
        nearest, verdict = half[0], "missing-half"
    elif KL_NOISE_Z * nearest.se > KL_NOISY * abs(nearest.ratio):
        verdict = "noisy"
    else:
        verdict = "mismatch"
    return KlAudit(verdict, nearest, weight, len(points))


def kl_formula(ev: RunEvidence) -> list[Finding]:
    """The loss's KL term is not the analytic KL of its mu and log_var in any reduction."""
    audit = kl_audit(ev.vae)
    if audit is None or audit.verdict in ("ok", "noisy"):
        return []
    vae: VaeEvidence = ev.vae
    fit = audit.fit
    severity: Severity
    seen = (
        f"{vae.kl_term} is {_fmt(fit.ratio)}x the analytic KL of mu and log_var "
        f"({fit.convention}) over {audit.steps} steps"
    )
    if audit.verdict == "wrong-sign":
        title = "The KL term has the wrong sign: the loss rewards KL"
        message = (
            f"{seen}, and its weight is {_fmt(audit.weight)}: weight x term is "
            "-KL, so training pushes the posterior away from the prior"
        )
        remedy = (
            "KL = 0.5 * sum(mu^2 + exp(log_var) - 1 - log_var) is >= 0 and is added to the "
            "loss with a positive weight; -0.5 * sum(1 + log_var - mu^2 - exp(log_var)) is "
            "the same quantity. Check the sign of the term and of its weight."
        )
        severity = "error"
    elif audit.verdict == "missing-half":
        title = "The KL term is twice the analytic KL: a missing 0.5"
        message = f"{seen}: the 0.5 in front of the sum is missing"
        remedy = (
            "Write KL = 0.5 * sum(mu^2 + exp(log_var) - 1 - log_var) (or "
            "-0.5 * sum(1 + log_var - mu^2 - exp(log_var))); as written the KL weighs "
            "double, which is a different β from the one you set."
        )
        severity = "warning"
    else:
        title = f"The KL term does not match the analytic KL (x{_fmt(fit.ratio)})"
        message = (
            f"{seen}: not 1 (per-sample mean), B (summed over the batch) or 1/Z (mean "
            "over every element): a wrong formula, or a weight inside the term"
        )
        remedy = (
            "Compare the term with 0.5 * sum(mu^2 + exp(log_var) - 1 - log_var) per sample; "
            "if a weight (β) is multiplied in, return the unweighted term and pass the "
            "weight (Doctor.step(weights=...), mtx --loss-weight NAME=W)."
        )
        severity = "warning"
    return [
        Finding(
            code="kl-formula",
            severity=severity,
            title=title,
            message=message,
            remedy=remedy,
            evidence={
                "ratio": fit.ratio,
                "ratio_se": fit.se,
                "convention": fit.convention,
                "weight": audit.weight,
                "steps": audit.steps,
            },
            where=f"{ev.where}:{vae.kl_term}",
        )
    ]


# --------------------------------------------------------------------------- beta-schedule


def _applied(vae: VaeEvidence) -> list[VaeStep]:
    return [s for s in vae.steps if math.isfinite(s.weight)]


def beta_schedule(ev: RunEvidence) -> list[Finding]:
    """The KL weight applied does not follow the declared schedule or never reaches its
    declared maximum. The weight's magnitude is compared: a term reported as -KL with a
    negative weight (AntixK's ``KLD``) is weighed by |w|."""
    vae: VaeEvidence | None = ev.vae
    if vae is None or not (vae.schedule_declared or vae.beta_max is not None):
        return []
    applied = _applied(vae)
    seen: list[str] = []
    evidence: dict[str, float | int | str | None] = {"steps": len(vae.steps)}
    declared = [s for s in applied if math.isfinite(s.declared_beta)]
    if vae.schedule_declared and declared:
        peak = max(abs(s.declared_beta) for s in declared) or max(abs(s.weight) for s in declared)
        gaps = [abs(abs(s.weight) - abs(s.declared_beta)) / peak if peak else 0.0 for s in declared]
        gap = median(gaps)
        evidence["median_gap"] = gap
        if gap > BETA_FOLLOW:
            first, last = declared[0], declared[-1]
            seen.append(
                f"the KL weight applied does not follow the declared schedule (median "
                f"difference {gap:.0%} of its peak {_fmt(peak)}): declared "
                f"{_fmt(first.declared_beta)}->{_fmt(last.declared_beta)}, applied "
                f"{_describe(declared, first.step, last.step)}"
            )
    if vae.beta_max is not None and vae.beta_max > 0:
        values = [abs(s.weight) for s in applied] or [
            abs(s.declared_beta) for s in vae.steps if math.isfinite(s.declared_beta)
        ]
        if values:
            reached = max(values)
            evidence["reached"] = reached
            evidence["beta_max"] = vae.beta_max
            if reached < (1 - BETA_REACHED) * vae.beta_max:
                what = "the applied" if applied else "the declared"
                seen.append(
                    f"β reached {_fmt(reached)} of its maximum {_fmt(vae.beta_max)} "
                    f"({what} weight, by the last step {vae.steps[-1].step}): the warm-up "
                    "is longer than the training"
                )
    if not seen:
        return []
    unexplained = sorted(u for u in ev.unexplained if math.isfinite(u))
    if vae.weight_source == "total" and unexplained and median(unexplained) > TERMS_MISMATCH:
        seen.append(
            "the weight is measured as (total - the other terms) / KL term, and the total "
            "is not what the weights given make of the terms (see terms-mismatch): a term "
            "the total holds but does not name counts here as KL weight"
        )
    return [
        Finding(
            code="beta-schedule",
            severity="warning",
            title="The β schedule was not applied as declared",
            message="; ".join(seen),
            remedy=(
                "Set the weight the loss actually reads (e.g. loss_fn.kl_loss_weight = beta, "
                "or the keyword it takes) every step or epoch; make the warm-up end well "
                "before training does (or train longer)."
            ),
            evidence=evidence,
            where=f"{ev.where}:{vae.kl_term}" if vae.kl_term else ev.where,
        )
    ]


def beta_varies(vae: VaeEvidence | None) -> bool:
    """Whether the KL weight the loss reported (or was given) changed during the run:
    then the total is a different objective from step to step."""
    steps = vae.steps if vae else ()
    given = [abs(s.given_weight) for s in steps if math.isfinite(s.given_weight)]
    if not given:  # no weight given: the weight measured from the total and its terms
        given = [abs(s.weight) for s in steps if math.isfinite(s.weight)]
    return bool(given) and max(given) - min(given) > BETA_CONSTANT * max(given)


# The rules on the trend of the total set aside while the KL weight changes.
TOTAL_TREND_CODES: tuple[str, ...] = ("loss-oscillation", "loss-plateau")
WHILE_BETA_CHANGES = "the total is a different objective each epoch while β changes"


def _describe(steps: Sequence[VaeStep], start: int, end: int) -> str:
    """What β did from step ``start`` to ``end``: constant at b, rising a->b, ..."""
    window = [abs(s.weight) for s in steps if start <= s.step <= end and math.isfinite(s.weight)]
    if not window:
        return "not measured (the loss names no KL term)"
    lo, hi = min(window), max(window)
    if hi - lo <= BETA_CONSTANT * hi:
        return f"constant at {_fmt(hi)}"
    a, b = window[0], window[-1]
    if b > a:
        return f"rising {_fmt(a)}->{_fmt(b)}"
    if b < a:
        return f"falling {_fmt(a)}->{_fmt(b)}"
    return f"varying {_fmt(lo)}-{_fmt(hi)}"


# --------------------------------------------------------------------------- collapse-onset


def _running_median(xs: Sequence[float], window: int) -> list[float]:
    half = window // 2
    return [median(xs[max(0, i - half) : i + half + 1]) for i in range(len(xs))]


@dataclass(frozen=True)
class CollapseOnset:
    step: int  # the first step from which the smoothed KL stayed below the threshold
    peak_step: int
    peak: float  # nats per sample, smoothed
    final: float  # nats per sample, smoothed, at the last step
    beta: str  # what β did from the peak to the onset


def collapse_onset_of(vae: VaeEvidence | None) -> CollapseOnset | None:
    """Where the KL fell for good, if it did (see the module docstring)."""
    if vae is None:
        return None
    points = [s for s in vae.steps if math.isfinite(s.analytic_kl)]
    if len(points) < COLLAPSE_ONSET_MIN_STEPS:
        return None
    smooth = _running_median([s.analytic_kl for s in points], COLLAPSE_ONSET_WINDOW)
    p = max(range(len(smooth)), key=lambda i: smooth[i])
    peak, final = smooth[p], smooth[-1]
    limit = COLLAPSE_ONSET_DROP * peak
    if peak < COLLAPSE_ONSET_FLOOR or final >= COLLAPSE_ONSET_FLOOR or final > limit:
        return None
    onset = len(smooth) - 1
    while onset - 1 > p and smooth[onset - 1] <= limit:
        onset -= 1
    first, fell = points[p], points[onset]
    beta = _describe(points, first.step, fell.step)
    return CollapseOnset(fell.step, first.step, peak, final, beta)


def collapse_onset(ev: RunEvidence) -> list[Finding]:
    """The KL peaked, then fell to a tenth of its peak (under one bit) and stayed there."""
    onset = collapse_onset_of(ev.vae)
    if onset is None:
        return []
    return [
        Finding(
            code="collapse-onset",
            severity="warning",
            title=f"The KL collapsed at step {onset.step}",
            message=(
                f"the KL (analytic, per sample, running median) peaked at {_fmt(onset.peak)} "
                f"nats at step {onset.peak_step}, fell below {COLLAPSE_ONSET_DROP:.0%} of it "
                f"at step {onset.step} and stayed there (last {_fmt(onset.final)} nats); "
                f"β {onset.beta} when KL fell at step {onset.step}"
            ),
            remedy=(
                "Stop β rising at the value it had before the fall, or raise it more slowly "
                "(a longer warm-up, or cyclical annealing, Fu et al. 2019); free bits "
                "(Kingma et al. 2016) keep a minimum KL per dimension."
            ),
            evidence={
                "step": onset.step,
                "peak_step": onset.peak_step,
                "peak": onset.peak,
                "final": onset.final,
                "beta": onset.beta,
            },
            where=ev.where,
        )
    ]


VAE_RULES: list[Callable[[RunEvidence], list[Finding]]] = [
    kl_formula,
    beta_schedule,
    collapse_onset,
]


# --------------------------------------------------------------------------- not checked


def vae_not_checked(ev: RunEvidence) -> list[NotChecked]:
    """The VAE checks this run could not make, each with its reason (none when the
    evidence did not come from a Doctor)."""
    vae: VaeEvidence | None = ev.vae
    if vae is None:
        return []
    out: list[NotChecked] = []
    if not vae.steps:
        why = "needs mu and log_var (of one shape) from the model in train mode"
        return [NotChecked(code, why) for code in ("kl-formula", "collapse-onset")] + (
            [NotChecked("beta-schedule", why)] if vae.schedule_declared else []
        )
    audit = kl_audit(vae)
    if not vae.kl_term:
        out.append(NotChecked("kl-formula", vae.kl_term_problem))
    elif audit is None:
        out.append(
            NotChecked(
                "kl-formula",
                f"needs {KL_AUDIT_MIN_STEPS} steps with an analytic KL above "
                f"{KL_AUDIT_MIN_NATS:g} nats (below it term / KL is rounding)",
            )
        )
    elif audit.verdict == "noisy":
        out.append(
            NotChecked(
                "kl-formula",
                f"{vae.kl_term} / analytic KL = {_fmt(audit.fit.ratio)} +/- "
                f"{_fmt(audit.fit.se)}: too noisy to compare (a Monte Carlo estimate?)",
            )
        )
    if vae.schedule_declared and not _applied(vae) and not beta_schedule(ev):
        out.append(
            NotChecked(
                "beta-schedule",
                "a β schedule was declared but the weight applied to the KL term could not "
                f"be measured: {vae.kl_term_problem or 'no step gave it'}",
            )
        )
    n = sum(math.isfinite(s.analytic_kl) for s in vae.steps)
    if n < COLLAPSE_ONSET_MIN_STEPS:
        out.append(
            NotChecked(
                "collapse-onset",
                f"needs {COLLAPSE_ONSET_MIN_STEPS} training steps with finite mu and "
                f"log_var, this run gave {n}",
            )
        )
    return out
