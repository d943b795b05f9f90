"""Rules: evidence from a run -> findings with a code, severity, numbers and a remedy.

Each rule is a small function taking :class:`RunEvidence` and returning a list of
findings; a rule whose evidence was not measured returns nothing. The codes are
stable and listed in the README.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from meaning_transform.diagnostics.causes import mark_consequences
from meaning_transform.diagnostics.findings import (
    Finding,
    NotChecked,
    Severity,
    Verdict,
)
from meaning_transform.diagnostics.thresholds import (
    COLLAPSE_KL_TOTAL,
    COLLAPSE_MIN_STEPS,
    COLLAPSE_REBOUND,
    COLLAPSE_RECON_GAIN,
    COLLAPSE_TREND_STEPS,
    CONFLICT_INFO,
    CONFLICT_SHARE,
    CONFLICT_WARNING,
    DEAD_RELU,
    DOMINANCE,
    EXPLODING_BASELINE_STEPS,
    EXPLODING_GROWTH,
    EXPLODING_RATIO,
    LOSS_SCALE_STEPS,
    NO_GRAD_MIN_SHARE,
    NO_GRAD_RELATIVE,
    NOISE_EXPONENT_MAX_SE,
    NOISE_EXPONENT_TOLERANCE,
    NOISE_FRESH_SHARE,
    NOISE_MEAN_MAX,
    NOISE_MIN_SAMPLES,
    NOISE_STD_HIGH,
    NOISE_STD_LOW,
    OSC_RISE,
    OSC_RISE_SHARE,
    OSC_SPIKE,
    OSC_SPIKE_WINDOW,
    OSCILLATION_MIN_EPOCHS,
    PLATEAU_IMPROVEMENT,
    PLATEAU_MIN_EPOCHS,
    PLATEAU_MIN_STEPS,
    SCALE_IMBALANCE,
    TERMS_MISMATCH,
    VANISHING_ABS_MEAN,
    VANISHING_FIRST,
    VANISHING_RATIO,
    ZERO_VALUE,
)

if TYPE_CHECKING:  # plain data; importing the module would import torch
    from meaning_transform.diagnostics.noise import NoiseRepeats, NoiseScale

Rule = Callable[["RunEvidence"], list[Finding]]
NoiseVerdict = Literal["frozen", "repeating", "fresh"]


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
    noise_repeats: NoiseRepeats | None = None  # pairs of noise draws, how many the same
    noise_scale: NoiseScale | None = None  # recovered eps pooled over train-mode steps
    input_non_finite: int | None = None  # NaN/Inf count in the training data
    # |total - sum(w * term)| / |total| per step, for a loss that gave both (else empty)
    unexplained: tuple[float, ...] = ()
    terms_detached: bool = False  # the loss's named terms were all detached copies
    step_losses: tuple[float, ...] = ()  # the total loss of every step (NaN kept)
    step_batch_sizes: tuple[int, ...] = ()  # the batch size of every step (0: unknown)
    vae: Any = None  # vae_checks.VaeEvidence: KL audit, beta plan and KL trace per step
    nan_origin: Any = None  # nan_guard.NanOrigin: where the first NaN/Inf appeared


RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def evaluate(evidence: RunEvidence, rules: list[Rule] | None = None) -> list[Finding]:
    """All findings of all rules, worst first."""
    found: list[Finding] = []
    for r in RULES if rules is None else rules:
        found.extend(r(evidence))
    return mark_consequences(found)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _origin(ev: RunEvidence, kinds: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """The NaN guard's origin as a message suffix and evidence, when of one of ``kinds``."""
    o = ev.nan_origin
    if o is None or o.kind not in kinds:
        return "", {}
    evidence: dict[str, Any] = {"origin": o.kind, "origin_where": o.where, "origin_step": o.step}
    if o.kind == "forward":
        evidence["first_module"] = o.where
        evidence.update({k: v for k, v in o.details.items() if k != "module"})
    elif o.kind == "backward":
        evidence["first_parameter"] = o.where
    return f"; {o.describe()}", evidence


@rule
def nonfinite_loss(ev: RunEvidence) -> list[Finding]:
    bad = [r for r in ev.records if r.skipped_steps or not math.isfinite(r.total)]
    if not bad:
        return []
    first = bad[0]
    terms = sorted(name for r in bad for name, v in r.raw.items() if not math.isfinite(v))
    detail = first.non_finite[0] if first.non_finite else "the total loss is not finite"
    where, origin = _origin(ev, ("data", "forward", "loss-term", "backward"))
    return [
        Finding(
            code="nonfinite-loss",
            severity="error",
            title="Loss or gradient is NaN/Inf",
            message=(
                f"{sum(r.skipped_steps for r in bad)} step(s) skipped from epoch {first.epoch}; "
                f"{detail}" + (f"; terms: {', '.join(sorted(set(terms)))}" if terms else "") + where
            ),
            remedy=(
                "Check the input data for NaN/Inf and normalise it; lower the learning rate; "
                "clip gradients (e.g. max norm 1.0); keep log_var bounded in the encoder."
            ),
            evidence={
                "first_epoch": first.epoch,
                "skipped_steps": sum(r.skipped_steps for r in bad),
                # the first optimizer step (0-based) whose loss was NaN/Inf, when known
                "first_step": next(
                    (i for i, v in enumerate(ev.step_losses) if not math.isfinite(v)), None
                ),
                **origin,
            },
            where=ev.where,
        )
    ]


@rule
def zero_loss(ev: RunEvidence) -> list[Finding]:
    """A component at the 1e-8 floor (or at zero) while its weight is on."""
    found: list[Finding] = []
    names = dict.fromkeys(n for r in ev.records for n in r.raw if n != "compression")
    for name in names:
        hits = [
            r
            for r in ev.records
            if r.weights.get(name, 0.0) > 0
            and (r.floors_engaged.get(name, 0) or 0 <= r.raw.get(name, 1.0) <= ZERO_VALUE)
        ]
        if not hits:
            continue
        found.append(
            Finding(
                code="zero-loss",
                severity="warning",
                title=f"{name} loss is zero-valued (floor engaged)",
                message=(
                    f"{name} was at or below {ZERO_VALUE:g} in {len(hits)} of "
                    f"{len(ev.records)} epochs "
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


def _steps_with(ev: RunEvidence, pred: Callable[[Any], bool]) -> list[Any]:
    return [s for s in ev.snapshots if pred(s)]


@rule
def nonfinite_grad(ev: RunEvidence) -> list[Finding]:
    bad = _steps_with(ev, lambda s: any((p.non_finite or 0) > 0 for p in s.params))
    if not bad:
        return []
    params = sorted({p.name for s in bad for p in s.params if (p.non_finite or 0) > 0})
    where, origin = _origin(ev, ("data", "forward", "loss-term", "backward"))
    return [
        Finding(
            code="nonfinite-grad",
            severity="error",
            title="Gradient holds NaN/Inf",
            message=(
                f"{len(bad)} of {len(ev.snapshots)} steps had non-finite gradients, in "
                f"{', '.join(params[:4])}" + (" ..." if len(params) > 4 else "") + where
            ),
            remedy=(
                "Look for sqrt/log/division at zero in custom loss terms (a finite loss can "
                "still have an infinite derivative); clip gradients; lower the learning rate."
            ),
            evidence={
                "steps": len(bad),
                "parameters": len(params),
                "first_step": bad[0].step,  # the first backward (0-based) with NaN/Inf
                **origin,
            },
            where=ev.where,
        )
    ]


@rule
def nonfinite_input(ev: RunEvidence) -> list[Finding]:
    if not ev.input_non_finite:
        return []
    where, origin = _origin(ev, ("data",))
    return [
        Finding(
            code="nonfinite-input",
            severity="error",
            title="Training data holds NaN/Inf",
            message=f"{ev.input_non_finite} non-finite values entered the model" + where,
            remedy="Clean or impute the data and normalise it to a reasonable range.",
            evidence={"values": ev.input_non_finite, **origin},
            where=ev.where,
        )
    ]


def _is_kl(name: str) -> bool:
    """mtx's ``kl`` or a user's term whose name says KL (``KLD``, ``kl_loss``)."""
    return "kl" in name.lower()


def _kl_series(records: tuple[Any, ...]) -> list[float]:
    """The KL term per epoch: mtx's ``kl``, or the user's term whose name says KL
    (``KLD``, ``kl_loss``, ...); empty when the loss names none."""
    names = [n for n in (records[0].raw if records else {}) if _is_kl(n)]
    name = "kl" if "kl" in names else (names[0] if len(names) == 1 else None)
    if name is None:
        return []
    series = [r.raw.get(name, math.nan) for r in records]
    finite = [v for v in series if math.isfinite(v)]
    if finite and max(finite) < 0:  # reported as -KL (AntixK's 'KLD'): a KL is >= 0
        series = [-v for v in series]
    return series


def _kl_trend(ev: RunEvidence) -> tuple[float, float, float] | None:
    """KL at the start, at its lowest and at the end of training: the loss's KL term per
    epoch, else (a loss that names no KL term) the analytic KL of mu and log_var the VAE
    checks traced, as medians of windows of COLLAPSE_TREND_STEPS recorded steps. None
    when neither was measured."""
    kl = [v for v in _kl_series(ev.records) if math.isfinite(v)]
    if kl:
        return kl[0], min(kl), kl[-1]
    trace = [s.analytic_kl for s in getattr(ev.vae, "steps", ())]
    trace = [v for v in trace if math.isfinite(v)]
    if len(trace) < 2:
        return None
    n = min(COLLAPSE_TREND_STEPS, len(trace) // 2)
    windows = [statistics.median(trace[i : i + n]) for i in range(0, len(trace) - n + 1, n)]
    last = statistics.median(trace[-n:])
    return windows[0], min([*windows, last]), last


def _latent_information(lat: Any) -> str:
    """What the latent carries, in words: KL per sample, active units, reconstruction."""
    text = (
        f"KL {_fmt(lat.kl_total)} nats ({_fmt(lat.kl_total / math.log(2))} bits) per sample, "
        f"{lat.active_units}/{lat.latent_dim} units active"
    )
    gain = getattr(lat, "recon_gain", None)
    if gain is not None:
        text += f", the reconstruction explains {gain:.0%} of the variance the data mean leaves"
    return text


def collapse_verdict(ev: RunEvidence) -> Verdict:
    """Whether the posterior-collapse rule judges this run collapsed, and if not, why.

    Collapse is judged by how much information the latent carries: the batch-mean KL
    bounds I(x; z), and under COLLAPSE_KL_TOTAL nats z cannot tell which half of the data
    an input came from 3 times in 4; with no active unit the encoder's mean ignores x.
    The reconstruction against predicting the data mean is the supporting evidence: a
    decoder given a z that says nothing about x can do no better than the mean, so a gain
    above COLLAPSE_RECON_GAIN contradicts a tiny KL while units are active, and collapse is
    not called; with no active unit it means the decoder sees x another way (a decoder
    too strong, e.g. a skip path from x) and z is unused: collapse.
    At initialisation the encoder means barely vary (no unit is "active" yet), so the
    rule waits for COLLAPSE_MIN_STEPS steps and asks that KL has not risen since the
    first epoch: collapse is where training went, not where it started. A latent table
    shows this verdict, so the table and the findings never disagree.
    """
    code = "posterior-collapse"
    lat = ev.latent
    if lat is None:
        return Verdict(code, "not-judged", "latent health was not measured (no finite data)")
    if lat.non_finite:
        return Verdict(code, "not-judged", f"mu/log_var hold {lat.non_finite} NaN/Inf values")
    info = _latent_information(lat)
    low_kl = lat.kl_total < COLLAPSE_KL_TOTAL
    if not low_kl and lat.active_units > 0:
        return Verdict(code, "ok", info)
    steps = sum(r.steps for r in ev.records)
    if steps < COLLAPSE_MIN_STEPS:
        return Verdict(
            code,
            "not-judged",
            f"judged after {COLLAPSE_MIN_STEPS} optimizer steps, this run made {steps}: "
            "a freshly initialised encoder has no active units yet",
        )
    trend = _kl_trend(ev)
    if trend is not None and trend[2] > trend[0]:
        return Verdict(
            code,
            "not-judged",
            f"KL rose during training ({_fmt(trend[0])} -> {_fmt(trend[2])}): the latents "
            "are still waking up, not collapsing",
        )
    if trend is not None and trend[2] > trend[1] * (1 + COLLAPSE_REBOUND):
        # the usual early dip: KL first falls as the encoder meets the prior, then rises
        # as the decoder starts to use z; a collapsing KL keeps falling
        return Verdict(
            code,
            "not-judged",
            f"KL fell to {_fmt(trend[1])} and is rising again ({_fmt(trend[2])} at the end): "
            "the latents are waking up after the early dip, not collapsing",
        )
    gain = getattr(lat, "recon_gain", None)
    if gain is not None and gain > COLLAPSE_RECON_GAIN and lat.active_units > 0:
        return Verdict(
            code,
            "not-judged",
            f"{info}: a z that says next to nothing about x cannot beat the data mean, so "
            "the numbers disagree: the decoder sees x another way, or the KL term does "
            "not bound what z carries (see kl-formula)",
        )
    if gain is not None and gain > COLLAPSE_RECON_GAIN:
        why = (
            "no unit's mean varies with x, yet the reconstruction is good: the decoder "
            "reconstructs without z (it sees x another way) and z is unused"
        )
    elif low_kl:
        why = (
            f"under {COLLAPSE_KL_TOTAL:.3g} nats z cannot tell which half of the data an "
            "input came from 3 times in 4"
        )
    else:
        why = "no unit's mean varies with x"
    return Verdict(code, "finding", f"{info}: {why}")


@rule
def posterior_collapse(ev: RunEvidence) -> list[Finding]:
    """The latent carries (almost) no information after real training, with KL not
    growing (see collapse_verdict)."""
    verdict = collapse_verdict(ev)
    if verdict.status != "finding":
        return []
    lat = ev.latent
    return [
        Finding(
            code="posterior-collapse",
            severity="warning",
            title="Posterior collapse: the latent carries no information",
            message=(
                f"{verdict.reason} (collapse: KL < {COLLAPSE_KL_TOTAL:.3g} nats or no unit "
                f"with Var of mu > {lat.active_threshold})"
            ),
            remedy=(
                "Anneal beta from ~0 (mtx anneal-demo --schedule cyclical), lower the KL "
                "weight, or use free bits (Kingma et al. 2016); a decoder that ignores z "
                "may be too strong."
            ),
            evidence={
                "active_units": lat.active_units,
                "latent_dim": lat.latent_dim,
                "kl_total": lat.kl_total,
                "recon_gain": getattr(lat, "recon_gain", None),
            },
            where=ev.where,
        )
    ]


def noise_verdict(repeats: NoiseRepeats | None) -> NoiseVerdict | None:
    """Over all comparable pairs: frozen only if every pair drew the same noise, fresh when
    most differ (so one odd pair, e.g. a short last batch, cannot flip it), else repeating.
    None when no pair was comparable."""
    if repeats is None or repeats.pairs == 0:
        return None
    if repeats.repeated == repeats.pairs:
        return "frozen"
    if repeats.pairs - repeats.repeated > NOISE_FRESH_SHARE * repeats.pairs:
        return "fresh"
    return "repeating"


@rule
def frozen_noise(ev: RunEvidence) -> list[Finding]:
    r = ev.noise_repeats
    verdict = noise_verdict(r)
    if r is None or verdict not in ("frozen", "repeating"):
        return []
    frozen = verdict == "frozen"
    if r.probed == r.pairs:
        seen = (
            f"two training-mode passes of the same batch gave the same reconstruction in "
            f"{r.repeated} of {r.pairs} probes"
        )
        meaning = "the model draws no fresh noise (it is frozen, or the model does not sample)"
    else:
        seen = f"eps was the same in {r.repeated} of {r.pairs} comparable pairs of steps"
        if r.probed:
            seen += f" ({r.probed} of them two passes of one batch)"
        meaning = "z is a fixed function of x" if frozen else "fresh noise never repeats"
    return [
        Finding(
            code="frozen-noise",
            severity="error" if frozen else "warning",
            title=f"Reparameterisation noise {'never changes' if frozen else 'repeats'}",
            message=f"{seen}: {meaning}",
            remedy=(
                "Do not reseed the RNG inside forward(); draw eps from a generator owned by "
                "the model (seeded once) so it is fresh each step and still reproducible."
            ),
            evidence={"pairs": r.pairs, "repeated": r.repeated, "probed": r.probed},
            where=ev.where,
        )
    ]


def _noise_scale_unjudged(ev: RunEvidence) -> str | None:
    """Why the noise scale cannot be judged in this run at all (None: it can)."""
    s = ev.noise_scale
    if s is None:
        return (
            "needs z, mu and log_var (of one shape) from the model in train mode: "
            "eps = (z - mu) / sigma is recovered from them"
        )
    if noise_verdict(ev.noise_repeats) in ("frozen", "repeating"):
        return "the noise repeats (see frozen-noise): its entries are not a sample"
    if s.samples < NOISE_MIN_SAMPLES:
        return f"needs {NOISE_MIN_SAMPLES} finite noise entries, this run gave {s.samples}"
    return None


def _exponent_measured(s: NoiseScale) -> bool:
    return math.isfinite(s.exponent) and s.exponent_se <= NOISE_EXPONENT_MAX_SE


@rule
def noise_scale(ev: RunEvidence) -> list[Finding]:
    """eps = (z - mu) / exp(0.5 * log_var) is not standard normal, or grows with sigma."""
    s = ev.noise_scale
    if s is None or _noise_scale_unjudged(ev) is not None:
        return []
    seen: list[str] = []
    if _exponent_measured(s) and abs(s.exponent - 0.5) > NOISE_EXPONENT_TOLERANCE:
        if s.exponent > 0.5:
            cause = "exp(log_var) (the variance) is used as sigma"
        else:
            cause = "sigma is left out of z"
        seen.append(
            f"z - mu grows like exp(({s.exponent:.2f} +/- {s.exponent_se:.2f}) * log_var), "
            f"not exp(0.5 * log_var): {cause}"
        )
    if not NOISE_STD_LOW <= s.std <= NOISE_STD_HIGH:
        seen.append(f"eps has std {_fmt(s.std)} (expected 1): the noise is scaled")
    if abs(s.mean) > NOISE_MEAN_MAX:
        seen.append(f"eps has mean {_fmt(s.mean)} (expected 0): the noise is not centred")
    if not seen:
        return []
    return [
        Finding(
            code="noise-scale",
            severity="error",
            title="Reparameterisation noise is not N(0, sigma^2)",
            message=(
                f"eps = (z - mu) / exp(0.5 * log_var) over {s.samples} entries of {s.steps} "
                f"steps: " + "; ".join(seen)
            ),
            remedy=(
                "Sample z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu): log_var is "
                "the log of the variance, so sigma = exp(0.5 * log_var); do not scale or "
                "shift eps (the KL term assumes exactly this sigma)."
            ),
            evidence={
                "samples": s.samples,
                "mean": s.mean,
                "std": s.std,
                "exponent": s.exponent,
                "exponent_se": s.exponent_se,
                "log_var_std": s.log_var_std,
            },
            where=ev.where,
        )
    ]


def _total_magnitude(att: Any, values: dict[str, float]) -> float:
    """sum |weight x term| over the terms the total is made of, at one attributed step
    (all terms when the attribution names none): the loss's scale at that step."""
    names = att.total_of or tuple(values)
    return sum(abs(att.weights.get(n, 1.0) * values.get(n, 0.0)) for n in names)


@rule
def no_grad_path(ev: RunEvidence) -> list[Finding]:
    """A term with a real value whose gradient is (near) zero at every attributed step:
    the gradient norm relative to the term's value, judged where the term is worth more
    than NO_GRAD_MIN_SHARE of the total at that step (both ratios: scale-free)."""
    found: list[Finding] = []
    if not ev.attributions:
        return found
    for name in ev.attributions[-1].terms:
        ratios = []
        for att, values in zip(ev.attributions, ev.term_values, strict=False):
            value = abs(values.get(name, 0.0))
            # only a term with something to learn: a saturated, near-zero term (e.g. a
            # BCE at its 1e-6 clamp) has no gradient because it is already right
            if value > NO_GRAD_MIN_SHARE * _total_magnitude(att, values):
                ratios.append(att.norm.get(name, 0.0) / value)
        if ratios and max(ratios) <= NO_GRAD_RELATIVE:
            value = ev.term_values[-1].get(name, math.nan)
            found.append(
                Finding(
                    code="no-grad-path",
                    severity="error",
                    title=f"{name} has a value but no gradient",
                    message=(
                        f"{name} = {_fmt(value)} contributes to the loss but its gradient "
                        f"norm is {_fmt(ev.attributions[-1].norm.get(name, 0.0))}, at most "
                        f"{NO_GRAD_RELATIVE:g} x its value at all {len(ratios)} attributed "
                        f"steps where it was over {NO_GRAD_MIN_SHARE:g} of the total: "
                        "it cannot be reduced by training"
                    ),
                    remedy=(
                        "Replace hard thresholds, argmax, round or .detach() in this term "
                        "with a differentiable form (sigmoid-smoothed thresholds, "
                        "cross-entropy over the class slots)."
                    ),
                    evidence={"value": value, "grad_norm": ev.attributions[-1].norm.get(name)},
                    where=f"{ev.where}:{name}",
                )
            )
    return found


def _main_terms(att: Any) -> list[str]:
    return [n for n in att.total_of if att.weights.get(n, 0.0) != 0.0]


def _spans(ev: RunEvidence) -> list[float]:
    """How many steps each attributed step stands for: up to the next one (the last: to
    the end of the run). The Doctor attributes on a schedule dense at the start (steps
    0, 1, 2, 4, 8, ...), so a plain mean over attributions would be a mean over the first
    steps (a KL weight still warming up); weighted by span it is the run's mean. Every
    step attributed (or every k-th): all spans equal, the plain mean. Without step
    indices (hand-built evidence): 1 each."""
    steps = [a.step for a in ev.attributions]
    if not steps or any(s is None for s in steps):
        return [1.0] * len(steps)
    known = [int(s) for s in steps if s is not None]  # all of them, for the type checker
    end = max(len(ev.step_losses), known[-1] + 1)
    return [float(max(b - a, 1)) for a, b in zip(known, [*known[1:], end], strict=True)]


def _weighted_mean(values: list[float], spans: list[float]) -> float:
    return sum(v * w for v, w in zip(values, spans, strict=True)) / sum(spans)


@rule
def grad_dominance(ev: RunEvidence) -> list[Finding]:
    if not ev.attributions:
        return []
    last = ev.attributions[-1]
    names = [n for n in _main_terms(last) if last.norm.get(n, 0.0) > 0.0]
    if len(names) < 2:
        return []
    spans = _spans(ev)
    mean = {
        n: _weighted_mean([a.weighted_norm.get(n, 0.0) for a in ev.attributions], spans)
        for n in names
    }
    top = max(names, key=lambda n: mean[n])
    low = min(names, key=lambda n: mean[n])
    ratio = mean[top] / mean[low] if mean[low] > 0 else math.inf
    if ratio <= DOMINANCE:
        return []
    return [
        Finding(
            code="grad-dominance",
            severity="warning",
            title=f"{top} dominates the gradient",
            message=(
                f"{top}'s weighted gradient norm is {_fmt(ratio)}x {low}'s "
                f"({_fmt(mean[top])} vs {_fmt(mean[low])}): {low} barely trains"
            ),
            remedy=(
                f"Rebalance the weights (scale {low}'s weight up or {top}'s down by ~"
                f"{_fmt(math.sqrt(ratio))}x), or normalise each term per sample."
            ),
            evidence={"ratio": ratio, "dominant": top, "weak": low},
            where=ev.where,
        )
    ]


@rule
def grad_conflict(ev: RunEvidence) -> list[Finding]:
    if not ev.attributions:
        return []
    found = []
    names = _main_terms(ev.attributions[-1])
    spans = _spans(ev)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            cos = [att.cosine.get(a, {}).get(b, 0.0) for att in ev.attributions]
            share = _weighted_mean([float(c < 0) for c in cos], spans)
            mean_cos = _weighted_mean(cos, spans)
            if share < CONFLICT_SHARE or mean_cos >= CONFLICT_INFO:
                continue
            severity: Severity = "warning" if mean_cos < CONFLICT_WARNING else "info"
            if _is_kl(a) or _is_kl(b):
                # the KL term pulls the posterior to the prior, against the data terms, by
                # design (more so in a β-VAE): noted, never a warning on its own
                severity = "info"
            found.append(
                Finding(
                    code="grad-conflict",
                    severity=severity,
                    title=f"{a} and {b} pull against each other",
                    message=(
                        f"cos(g_{a}, g_{b}) < 0 in {share:.0%} of attributed steps "
                        f"(mean {mean_cos:.2f}); mild conflict between the KL term and the "
                        "data terms is normal, a strongly negative cosine is not"
                    ),
                    remedy=(
                        "If one term should win, re-weight; if both matter, project out the "
                        "conflict (PCGrad) or anneal the weaker term in."
                    ),
                    evidence={"mean_cosine": mean_cos, "share": share},
                    where=f"{ev.where}:{a}|{b}",
                )
            )
    return found


def _loss_scale(ev: RunEvidence) -> float | None:
    """The loss scale the last gradients answer to: the median |total loss| over the last
    LOSS_SCALE_STEPS finite steps of the last step's batch size (so a summed loss's short
    last batch is set against its own kind), else over the last epoch totals. None when
    no finite, non-zero loss was recorded. A summed loss (x batch) scales it as it scales
    the gradients."""
    losses = ev.step_losses
    if losses:
        sizes = _batch_sizes(ev)
        recent = [abs(v) for v, b in zip(losses, sizes) if b == sizes[-1] and math.isfinite(v)]
    else:
        recent = [abs(r.total) for r in ev.records if math.isfinite(r.total)]
    recent = recent[-LOSS_SCALE_STEPS:]
    scale = statistics.median(recent) if recent else 0.0
    return scale if scale > 0 else None


def loss_scale(ev: RunEvidence) -> float | None:
    """The run's loss scale as the rules read it (see :func:`_loss_scale`)."""
    return _loss_scale(ev)


def _batch_sizes(ev: RunEvidence) -> tuple[int, ...]:
    """The batch size of every step loss (0, all alike, when not recorded)."""
    if len(ev.step_batch_sizes) == len(ev.step_losses):
        return ev.step_batch_sizes
    return (0,) * len(ev.step_losses)


@rule
def vanishing_grad(ev: RunEvidence) -> list[Finding]:
    """Gradients tiny next to the loss they come from (DeepDiagnosis's mean |g| and
    AUTOTRAINER's first layer, both divided by the loss scale), or a first layer that
    gets 1000x less gradient than the last (AUTOTRAINER)."""
    # the latest snapshot with mean |g| (the Doctor measures it on its schedule's steps)
    last = next((s for s in reversed(ev.snapshots) if s.detail == "full"), None)
    if last is None:
        return []
    grads = [p for p in last.params if p.has_grad and p.abs_mean is not None]
    numel = sum(p.numel for p in grads)
    if not grads or numel == 0:
        return []
    abs_mean = sum((p.abs_mean or 0.0) * p.numel for p in grads) / numel
    first = last.param(last.first_layer) if last.first_layer else None
    first_norm = first.norm if first is not None and first.norm is not None else math.nan
    ratio = last.first_last_ratio
    scale = _loss_scale(ev)
    per = scale if scale is not None else 1.0
    rel_mean, rel_first = abs_mean / per, first_norm / per
    by_ratio = ratio is not None and ratio < VANISHING_RATIO and rel_first < VANISHING_FIRST
    if not (rel_mean < VANISHING_ABS_MEAN or by_ratio):
        return []
    against = (
        f"the loss scale {_fmt(per)} (median |loss| of the last steps)"
        if scale is not None
        else "1 (no finite loss was recorded to compare with)"
    )
    return [
        Finding(
            code="vanishing-grad",
            severity="warning",
            title="Gradients vanish",
            message=(
                f"mean |g| {_fmt(abs_mean)} is {_fmt(rel_mean)} of {against} (vanishing "
                f"below {VANISHING_ABS_MEAN:g}); first/last layer norm ratio "
                f"{_fmt(ratio) if ratio is not None else 'n/a'} (limit {VANISHING_RATIO:g}) "
                f"with a first-layer norm of {_fmt(first_norm)}, {_fmt(rel_first)} of the "
                f"loss scale (limit {VANISHING_FIRST:g})"
            ),
            remedy=(
                "Use Kaiming/Xavier initialisation, ReLU-family activations, batch norm or "
                "residual paths; check inputs are normalised; raise the learning rate only "
                "after the architecture is fixed."
            ),
            evidence={
                "abs_mean": abs_mean,
                "loss_scale": scale,
                "relative_abs_mean": rel_mean,
                "first_last_ratio": ratio,
                "first_norm": first_norm,
            },
            where=ev.where,
        )
    ]


def _norm_growth(snapshots: tuple[Any, ...]) -> tuple[float, float] | None:
    """(largest finite total norm, median of the first EXPLODING_BASELINE_STEPS finite
    ones): how far the run's gradient grew from where it started. None with fewer than
    two finite norms or a zero baseline."""
    norms = [s.total_norm for s in snapshots if math.isfinite(s.total_norm)]
    if len(norms) < 2:
        return None
    baseline = statistics.median(norms[:EXPLODING_BASELINE_STEPS])
    return (max(norms), baseline) if baseline > 0 else None


@rule
def exploding_grad(ev: RunEvidence) -> list[Finding]:
    """A first layer with 70x the last one's gradient (AUTOTRAINER), or a total norm that
    grew EXPLODING_GROWTH-fold from the run's first steps (scale-free, unlike a norm limit:
    a summed loss's gradient grows with the batch)."""
    if not ev.snapshots:
        return []
    ratios = [s.first_last_ratio for s in ev.snapshots if s.first_last_ratio is not None]
    max_ratio = max(ratios, default=0.0)
    growth = _norm_growth(ev.snapshots)
    peak, baseline = growth if growth is not None else (math.nan, math.nan)
    grew = peak / baseline if growth is not None else math.nan
    if max_ratio <= EXPLODING_RATIO and not grew > EXPLODING_GROWTH:
        return []
    grown = (
        f"the largest total norm {_fmt(peak)} is {_fmt(grew)}x the median "
        f"{_fmt(baseline)} of the first {EXPLODING_BASELINE_STEPS} steps "
        f"(limit {EXPLODING_GROWTH:g}x)"
        if growth is not None
        else "the total norm's growth was not measured (fewer than 2 finite norms)"
    )
    return [
        Finding(
            code="exploding-grad",
            severity="warning",
            title="Gradients explode",
            message=(
                f"max first/last layer norm ratio {_fmt(max_ratio)} "
                f"(limit {EXPLODING_RATIO:g}); {grown}"
            ),
            remedy=(
                "Clip gradients (max norm ~1), lower the learning rate, check initialisation "
                "scale (Xavier/Kaiming) and add normalisation layers."
            ),
            evidence={
                "max_ratio": max_ratio,
                "max_total_norm": peak if growth is not None else None,
                "baseline_norm": baseline if growth is not None else None,
                "growth": grew if growth is not None else None,
            },
            where=ev.where,
        )
    ]


@rule
def dying_relu(ev: RunEvidence) -> list[Finding]:
    if not ev.dead_units:
        return []
    dead = {k: v for k, v in ev.dead_units.items() if v >= DEAD_RELU}
    if not dead:
        return []
    worst = max(dead, key=lambda k: dead[k])
    return [
        Finding(
            code="dying-relu",
            severity="warning",
            title="ReLU units have died",
            message=(
                f"{len(dead)} ReLU layer(s) with >= {DEAD_RELU:.0%} units never active; "
                f"worst {worst}: {dead[worst]:.0%}"
            ),
            remedy=(
                "Lower the learning rate, use Kaiming initialisation with small positive "
                "biases, LeakyReLU/ELU, or batch norm before the activation."
            ),
            evidence={"layers": len(dead), "worst_fraction": dead[worst]},
            where=f"{ev.where}:{worst}",
        )
    ]


@rule
def unused_params(ev: RunEvidence) -> list[Finding]:
    if not ev.snapshots:
        return []
    never = set(ev.snapshots[0].missing)
    for s in ev.snapshots[1:]:
        never &= set(s.missing)
    if not never:
        return []
    names = sorted(never)
    return [
        Finding(
            code="unused-params",
            severity="warning",
            title="Parameters never receive a gradient",
            message=(
                f"{len(names)} parameter(s) require grad but got none in "
                f"{len(ev.snapshots)} steps: {', '.join(names[:4])}"
                + (" ..." if len(names) > 4 else "")
            ),
            remedy=(
                "Remove the unused module, or check the forward pass actually uses it "
                "(a branch never taken, an output never fed to the loss)."
            ),
            evidence={"parameters": len(names)},
            where=ev.where,
        )
    ]


def _beta_changes(ev: RunEvidence) -> bool:
    """The KL weight changed during the run: the total's trend reflects the schedule."""
    from meaning_transform.diagnostics.vae_checks import beta_varies

    return beta_varies(ev.vae)


@rule
def loss_plateau(ev: RunEvidence) -> list[Finding]:
    """The total fell by less than PLATEAU_IMPROVEMENT of |first epoch's| (relative, so
    any reduction and sign of the loss read the same)."""
    if _beta_changes(ev):
        return []
    totals = [r.total for r in ev.records]
    if len(totals) < PLATEAU_MIN_EPOCHS or not all(math.isfinite(t) for t in totals):
        return []
    if sum(r.steps for r in ev.records) < PLATEAU_MIN_STEPS:
        return []
    first, last = totals[0], totals[-1]
    if first - last > PLATEAU_IMPROVEMENT * abs(first):
        return []
    return [
        Finding(
            code="loss-plateau",
            severity="warning",
            title="Loss is not decreasing",
            message=(
                f"total went from {_fmt(first)} to {_fmt(last)} over {len(totals)} epochs "
                f"(needs a {PLATEAU_IMPROVEMENT:.0%} drop)"
            ),
            remedy=(
                "Raise a too-small learning rate, check that the loss terms have gradients "
                "(see no-grad-path), and that the optimizer holds the model's parameters."
            ),
            evidence={"first": first, "last": last, "epochs": len(totals)},
            where=ev.where,
        )
    ]


def _step_spikes(ev: RunEvidence) -> list[tuple[int, float, float, int, int]]:
    """Every step whose loss is more than OSC_SPIKE x the median of the OSC_SPIKE_WINDOW
    finite step losses before it of the same batch size (a short last batch of a summed
    loss is only set against short batches): (step, loss, that median, batch size, how
    many steps the median is over). NaN/Inf steps are the nonfinite rules' business."""
    before: dict[int, list[float]] = {}
    spikes = []
    for step, (loss, size) in enumerate(zip(ev.step_losses, _batch_sizes(ev))):
        if not math.isfinite(loss):
            continue
        seen = before.setdefault(size, [])
        if seen:
            window = seen[-OSC_SPIKE_WINDOW:]
            median = statistics.median(window)
            if median > 0 and loss > OSC_SPIKE * median:
                spikes.append((step, loss, median, size, len(window)))
        seen.append(loss)
    return spikes


def _epoch_rises(ev: RunEvidence) -> list[float] | None:
    """Relative rises of the epoch total above OSC_RISE; None when the epochs cannot be
    judged (fewer than OSCILLATION_MIN_EPOCHS, or a NaN/Inf total)."""
    totals = [r.total for r in ev.records]
    if len(totals) < OSCILLATION_MIN_EPOCHS or not all(math.isfinite(t) for t in totals):
        return None
    moves = [(b - a) / abs(a) for a, b in zip(totals, totals[1:]) if a != 0]
    return [m for m in moves if m > OSC_RISE]


@rule
def loss_oscillation(ev: RunEvidence) -> list[Finding]:
    """One step's loss jumps more than OSC_SPIKE-fold over the steps before it (a step too
    large for the loss surface; a short run may show one such spike before the loss
    settles), or the epoch total jumps back up (by > 5%) again and again instead of
    settling, or jumps OSC_SPIKE-fold in one epoch. Without step losses, the epochs only."""
    if _beta_changes(ev):
        return []
    spikes = _step_spikes(ev)
    rises = _epoch_rises(ev)
    moves = len(ev.records) - 1
    by_epochs = rises is not None and (
        len(rises) >= max(2, OSC_RISE_SHARE * moves) or any(r + 1 > OSC_SPIKE for r in rises)
    )
    if not spikes and not by_epochs:
        return []
    seen = []
    if spikes:
        step, loss, median, size, window = max(spikes, key=lambda s: s[1] / s[2])
        batch = f" of batch size {size}" if size else ""
        seen.append(
            f"step {step}'s loss {_fmt(loss)} is {_fmt(loss / median)}x the median "
            f"{_fmt(median)} of the {window} step(s) before it{batch} (a spike: above "
            f"{OSC_SPIKE:g}x; {len(spikes)} such step(s))"
        )
    if rises is not None and (by_epochs or rises):
        seen.append(
            f"the epoch total rose by more than {OSC_RISE:.0%} in {len(rises)} of {moves} "
            f"epoch-to-epoch moves" + (f" (largest rise {max(rises):.0%})" if rises else "")
        )
    return [
        Finding(
            code="loss-oscillation",
            severity="warning",
            title="Loss oscillates",
            message="; ".join(seen),
            remedy="Lower the learning rate, increase the batch size, or clip gradients.",
            evidence={
                "spikes": len(spikes),
                "max_spike": max((s[1] / s[2] for s in spikes), default=None),
                "rises": len(rises) if rises is not None else None,
                "moves": moves,
                "max_rise": max(rises, default=None) if rises is not None else None,
            },
            where=ev.where,
        )
    ]


@rule
def scale_imbalance(ev: RunEvidence) -> list[Finding]:
    if not ev.records:
        return []
    last = ev.records[-1]
    active = {
        n: abs(last.weighted[n])
        for n in last.raw
        # a zero-valued term is the zero-loss rule's business, not an imbalance
        if n != "compression"
        and last.weights.get(n, 0.0) > 0
        and math.isfinite(last.raw[n])
        and last.raw[n] > ZERO_VALUE
    }
    if len(active) < 2:
        return []
    top = max(active, key=lambda n: active[n])
    low = min(active, key=lambda n: active[n])
    ratio = active[top] / active[low]
    if ratio <= SCALE_IMBALANCE:
        return []
    return [
        Finding(
            code="scale-imbalance",
            severity="warning",
            title=f"{top} outweighs {low} by {_fmt(ratio)}x",
            message=(
                f"weighted {top} {_fmt(active[top])} vs weighted {low} {_fmt(active[low])}: "
                f"{low} is noise in the total"
            ),
            remedy=(
                "Rebalance the weights, and use the same reduction (per-sample mean) for "
                "every term so the weights mean what they say."
            ),
            evidence={"ratio": ratio, "largest": top, "smallest": low},
            where=ev.where,
        )
    ]


@rule
def terms_mismatch(ev: RunEvidence) -> list[Finding]:
    """The loss's named terms, weighted, do not add up to the total it returned."""
    finite = sorted(u for u in ev.unexplained if math.isfinite(u))
    if not finite:
        return []
    median = finite[len(finite) // 2]
    if median <= TERMS_MISMATCH:
        return []
    weights = ev.records[-1].weights if ev.records else {}
    shown = ", ".join(f"{n}={w:g}" for n, w in weights.items()) or "none"
    return [
        Finding(
            code="terms-mismatch",
            severity="info",
            title="The named terms do not add up to the total",
            message=(
                f"with weights {shown}, the terms miss {median:.1%} of the total (median "
                f"over {len(finite)} steps): the total holds a weight, a sign or a term the "
                "named terms do not show, so per-term numbers are weighed wrong"
            ),
            remedy=(
                "Give the weights the total uses (mtx --loss-weight NAME=W, or "
                "Doctor.step(weights=...)), or return every term the total is made of."
            ),
            evidence={"median_unexplained": median, "steps": len(finite)},
            where=ev.where,
        )
    ]


@rule
def batch_dependent_weights(ev: RunEvidence) -> list[Finding]:
    if not ev.records:
        return []
    weights = ev.records[-1].weights
    # only terms whose reduction is known: a term that is always 0 reads as neither
    used = {
        n: r for n, r in ev.reduction.items() if weights.get(n, 0.0) > 0 and r in ("sum", "mean")
    }
    if len(set(used.values())) < 2:
        return []
    summed = sorted(n for n, r in used.items() if r == "sum")
    meaned = sorted(n for n, r in used.items() if r == "mean")
    return [
        Finding(
            code="batch-dependent-weights",
            severity="warning",
            title="Loss weights depend on the batch size",
            message=(
                f"{', '.join(summed)} summed over the batch but {', '.join(meaned)} averaged: "
                f"at batch {ev.batch_size} the summed terms count {ev.batch_size}x more than "
                "their weights say"
            ),
            remedy="Use one reduction for every term (reduction='mean', per sample).",
            evidence={"batch_size": ev.batch_size, "summed": len(summed)},
            where=ev.where,
        )
    ]


# ---- checks that could not run (so a missing finding is never silent) ----


# The rules that read the loss's named terms: a loss returning one scalar has none.
PER_TERM_CODES: tuple[str, ...] = (
    "zero-loss",
    "no-grad-path",
    "grad-dominance",
    "grad-conflict",
    "scale-imbalance",
    "batch-dependent-weights",
)


def not_checked(ev: RunEvidence) -> list[NotChecked]:
    """The rules whose evidence this run could not give, each with the reason."""
    out: list[NotChecked] = []
    collapse = collapse_verdict(ev)
    if collapse.status == "not-judged":
        out.append(NotChecked(collapse.code, collapse.reason))
    if noise_verdict(ev.noise_repeats) is None:
        out.append(
            NotChecked(
                "frozen-noise",
                "needs z, mu and log_var from the model in train mode on two steps of equal "
                "batch size, or a finite reconstruction to compare over two passes of one batch",
            )
        )
    unjudged = _noise_scale_unjudged(ev)
    scale = ev.noise_scale
    if unjudged is not None:
        out.append(NotChecked("noise-scale", unjudged))
    elif scale is not None and not _exponent_measured(scale) and not noise_scale(ev):
        out.append(
            NotChecked(
                "noise-scale",
                f"eps looked standard normal (mean {_fmt(scale.mean)}, std {_fmt(scale.std)}) "
                f"but log_var varied too little (std {_fmt(scale.log_var_std)}) to tell "
                "sigma = exp(log_var) from exp(0.5 * log_var)",
            )
        )
    named = [n for n in (ev.records[-1].raw if ev.records else {}) if n != "compression"]
    if len(named) >= 2 and not ev.reduction:
        out.append(
            NotChecked(
                "batch-dependent-weights",
                "the terms' reductions (sum over the batch or mean) are unknown: pass "
                "reduction= to Doctor.step (the CLI measures them)",
            )
        )
    if ev.records and not any(r.raw for r in ev.records):
        reason = (
            "the loss returns one scalar: return a dict of its named terms, e.g. "
            "{'loss': total, 'recon': recon, 'kl': kl}, for the per-term checks"
        )
        out.extend(NotChecked(code, reason) for code in PER_TERM_CODES)
    elif not ev.attributions and ev.terms_detached:
        reason = (
            "the loss's named terms are detached copies (.detach()): return them undetached "
            "for per-term gradients"
        )
        out.extend(
            NotChecked(code, reason) for code in ("no-grad-path", "grad-dominance", "grad-conflict")
        )
    elif not ev.attributions:
        reason = "no step was attributed (per-term gradients need finite terms with a graph)"
        out.extend(
            NotChecked(code, reason) for code in ("no-grad-path", "grad-dominance", "grad-conflict")
        )
    if not ev.snapshots:
        reason = "no gradient was recorded (no step made a backward pass)"
        out.extend(
            NotChecked(code, reason)
            for code in ("nonfinite-grad", "vanishing-grad", "exploding-grad", "unused-params")
        )
    if ev.dead_units is None:
        out.append(
            NotChecked("dying-relu", "no nn.ReLU module to watch, or no finite data to run it on")
        )
    epochs = len(ev.records)
    steps = sum(r.steps for r in ev.records)
    if epochs >= PLATEAU_MIN_EPOCHS and steps < PLATEAU_MIN_STEPS:
        out.append(
            NotChecked(
                "loss-plateau",
                f"needs {PLATEAU_MIN_STEPS} optimizer steps, this run made {steps}",
            )
        )
    if epochs < PLATEAU_MIN_EPOCHS:
        out.append(
            NotChecked("loss-plateau", f"needs {PLATEAU_MIN_EPOCHS} epochs, this run had {epochs}")
        )
    if epochs < OSCILLATION_MIN_EPOCHS and len(ev.step_losses) < 2:
        out.append(
            NotChecked(
                "loss-oscillation", f"needs {OSCILLATION_MIN_EPOCHS} epochs, this run had {epochs}"
            )
        )
    if _beta_changes(ev):  # the trend rules are set aside, for this reason alone
        from meaning_transform.diagnostics.vae_checks import TOTAL_TREND_CODES, WHILE_BETA_CHANGES

        out = [c for c in out if c.code not in TOTAL_TREND_CODES]
        out.extend(NotChecked(code, WHILE_BETA_CHANGES) for code in TOTAL_TREND_CODES)
    return out


# The VAE-specific checks (KL formula audit, beta schedule, collapse onset) live in their
# own module; registered here so evaluate() runs them with the rest.
from meaning_transform.diagnostics.vae_checks import VAE_RULES  # noqa: E402

RULES.extend(VAE_RULES)
