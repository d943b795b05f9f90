"""Every rule on hand-built evidence just below and just above each of its thresholds, and
the same verdicts when the loss and its gradients are multiplied by the batch size (what a
loss summed over the batch gives) or by 1000. Milliseconds; no training."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import pytest

from meaning_transform.diagnostics import thresholds as t
from meaning_transform.diagnostics.attribution import Attribution
from meaning_transform.diagnostics.gradients import GradientSnapshot, ParamGradStats
from meaning_transform.diagnostics.latent import LatentHealth
from meaning_transform.diagnostics.noise import NoiseRepeats, NoiseScale
from meaning_transform.diagnostics.rules import (
    RULES,
    RunEvidence,
    collapse_verdict,
    not_checked,
)
from meaning_transform.diagnostics.vae_checks import VAE_RULES
from meaning_transform.training import EpochRecord

BATCH = 128
# the rules of rules.py (vae_checks.py's are tested with their module)
CORE = [r for r in RULES if r not in VAE_RULES]
CORE_CODES = {r.__name__.replace("_", "-") for r in CORE}
BELOW, ABOVE = 0.99, 1.01  # just below / just above an edge


def codes(ev: RunEvidence) -> set[str]:
    return {f.code for r in CORE for f in r(ev)}


# ---- hand-built evidence ----


def record(
    epoch: int = 0,
    total: float = 10.0,
    raw: dict[str, float] | None = None,
    weights: dict[str, float] | None = None,
    steps: int = 10,
    skipped: int = 0,
    floors: dict[str, int] | None = None,
) -> EpochRecord:
    raw = dict(raw) if raw is not None else {"recon": 0.9 * total, "kl": 0.1 * total}
    weights = dict(weights) if weights is not None else dict.fromkeys(raw, 1.0)
    return EpochRecord(
        epoch=epoch,
        beta=1.0,
        raw=raw,
        weighted={n: weights.get(n, 0.0) * v for n, v in raw.items()},
        weights=weights,
        total=total,
        grad_norm=1.0,
        grad_norm_max=1.0,
        steps=steps,
        skipped_steps=skipped,
        floors_engaged=floors or {},
        non_finite=(),
    )


def records(totals: list[float], steps: int = 10, kl: list[float] | None = None) -> tuple:
    kls = kl or [0.1 * x for x in totals]
    return tuple(
        record(e, x, raw={"recon": x - k, "kl": k}, steps=steps)
        for e, (x, k) in enumerate(zip(totals, kls, strict=True))
    )


def param(name: str, norm: float, abs_mean: float, numel: int = 100, bad: int = 0):
    return ParamGradStats(
        name=name,
        shape=(numel,),
        numel=numel,
        has_grad=True,
        norm=norm,
        mean=0.0,
        abs_mean=abs_mean,
        std=abs_mean,
        min=-abs_mean,
        max=abs_mean,
        zero_fraction=0.0,
        non_finite=bad,
        weight_norm=1.0,
    )


def snapshot(
    total_norm: float = 1.0,
    first: float = 0.5,
    last: float = 1.0,
    abs_mean: float = 1e-2,
    missing: tuple[str, ...] = (),
    bad: int = 0,
) -> GradientSnapshot:
    return GradientSnapshot(
        params=(param("enc.weight", first, abs_mean, bad=bad), param("dec.weight", last, abs_mean)),
        total_norm=total_norm,
        missing=missing,
        first_last_ratio=first / last if last else None,
        first_layer="enc.weight",
        last_layer="dec.weight",
    )


def attribution(
    norms: dict[str, float],
    weights: dict[str, float] | None = None,
    cos: float = 0.5,
    total_of: tuple[str, ...] | None = None,
) -> Attribution:
    names = tuple(norms)
    weights = weights or dict.fromkeys(names, 1.0)
    weighted = {n: weights[n] * norms[n] for n in names}
    total = sum(weighted.values()) or 1.0
    return Attribution(
        terms=names,
        weights=weights,
        total_of=total_of if total_of is not None else names,
        norm=dict(norms),
        weighted_norm=weighted,
        share={n: weighted[n] / total for n in names},
        cosine={a: {b: 1.0 if a == b else cos for b in names} for a in names},
        total_norm=total,
        method="loop",
        fallback_reason=None,
        zero_gradient=tuple(n for n in names if norms[n] == 0.0),
        detached=(),
        conflicts=(),
    )


def latent(kl_per_dim: tuple[float, ...], active: tuple[bool, ...], gain=None) -> LatentHealth:
    total = sum(kl_per_dim)
    return LatentHealth(
        num_samples=256,
        latent_dim=len(kl_per_dim),
        kl_per_dim=kl_per_dim,
        kl_total=total,
        activity=tuple(0.5 if a else 0.0 for a in active),
        active=active,
        active_units=sum(active),
        active_threshold=0.01,
        free_bits=sum(max(0.1, k) for k in kl_per_dim),
        free_bits_lambda=0.1,
        collapsed_dims=tuple(j for j, k in enumerate(kl_per_dim) if k < 0.01),
        collapse_threshold=0.01,
        collapsed=total < t.COLLAPSE_KL_TOTAL or not any(active),
        non_finite=0,
        recon_gain=gain,
    )


def steps_of(losses: list[float], size: int = BATCH) -> dict[str, Any]:
    return {"step_losses": tuple(losses), "step_batch_sizes": (size,) * len(losses)}


def scaled(ev: RunEvidence, c: float) -> RunEvidence:
    """The same run with its loss and every gradient x c (a summed loss: c = batch size).
    Ratios between layers and terms, cosines, shares and the latent do not change."""

    def rec(r: EpochRecord) -> EpochRecord:
        return dataclasses.replace(
            r,
            total=c * r.total,
            raw={n: c * v for n, v in r.raw.items()},
            weighted={n: c * v for n, v in r.weighted.items()},
            grad_norm=c * r.grad_norm,
            grad_norm_max=c * r.grad_norm_max,
        )

    def par(p: ParamGradStats) -> ParamGradStats:
        fields = ("norm", "mean", "abs_mean", "std", "min", "max")
        return dataclasses.replace(
            p, **{f: None if getattr(p, f) is None else c * getattr(p, f) for f in fields}
        )

    def snap(s: GradientSnapshot) -> GradientSnapshot:
        return dataclasses.replace(
            s, total_norm=c * s.total_norm, params=tuple(par(p) for p in s.params)
        )

    def att(a: Attribution) -> Attribution:
        return dataclasses.replace(
            a,
            norm={n: c * v for n, v in a.norm.items()},
            weighted_norm={n: c * v for n, v in a.weighted_norm.items()},
            total_norm=c * a.total_norm,
        )

    return dataclasses.replace(
        ev,
        records=tuple(rec(r) for r in ev.records),
        snapshots=tuple(snap(s) for s in ev.snapshots),
        attributions=tuple(att(a) for a in ev.attributions),
        term_values=tuple({n: c * v for n, v in tv.items()} for tv in ev.term_values),
        step_losses=tuple(c * v for v in ev.step_losses),
    )


# ---- the cases: (id, evidence, code, fires) ----


def ev(**kwargs: Any) -> RunEvidence:
    return RunEvidence(where="run", **kwargs)


def vanishing(rel_mean: float, ratio: float, rel_first: float, loss: float = 2.0):
    first = rel_first * loss
    snap = snapshot(first=first, last=first / ratio, abs_mean=rel_mean * loss)
    return ev(snapshots=(snap,), **steps_of([loss] * 10))


def exploding(norms: list[float], ratio: float = 0.5, loss: float | None = None):
    snaps = tuple(snapshot(total_norm=n, first=ratio, last=1.0) for n in norms)
    return ev(snapshots=snaps, **(steps_of([loss] * len(norms)) if loss else {}))


def no_grad(value: float, norm: float, total: float = 4.0):
    """A term 'feature' (outside the total) next to two main terms making up ``total``."""
    norms = {"recon": 1.0, "kl": 1.0, "feature": norm}
    att = attribution(norms, total_of=("recon", "kl"))
    values = {"recon": total / 2, "kl": total / 2, "feature": value}
    return ev(attributions=(att,) * 3, term_values=(values,) * 3)


def dominance(ratio: float):
    return ev(attributions=(attribution({"recon": ratio, "extra": 1.0}),) * 4)


def conflict(cos: float, share_negative: float = 1.0, names=("recon", "extra")):
    n = 10
    negative = round(share_negative * n)
    # the negative steps at cos, the rest at +0.0 (so the mean is cos x the share)
    atts = [attribution(dict.fromkeys(names, 1.0), cos=cos) for _ in range(negative)]
    atts += [attribution(dict.fromkeys(names, 1.0), cos=0.0) for _ in range(n - negative)]
    return ev(attributions=tuple(atts))


def collapse(kl_total: float, active: int = 4, gain=None, steps: int = 10, kl=None):
    per = (kl_total / 4,) * 4
    lat = latent(per, tuple(j < active for j in range(4)), gain)
    return ev(records=records([10.0, 9.0, 8.0], steps=steps, kl=kl), latent=lat)


def noise_scale_ev(std: float = 1.0, mean: float = 0.0, k: float = 0.5, samples: int = 0):
    scale = NoiseScale(
        samples=samples or t.NOISE_MIN_SAMPLES,
        steps=5,
        mean=mean,
        std=std,
        log_var_std=1.0,
        exponent=k,
        exponent_se=0.01,
        dropped=0,
    )
    return ev(noise_scale=scale, noise_repeats=NoiseRepeats(10, 0, 0))


def plateau(drop: float, first: float = 10.0, steps: int = 10):
    last = first - drop * abs(first)
    return ev(records=records([first, (first + last) / 2, last], steps=steps))


def oscillation_steps(jump: float, sizes: tuple[int, ...] | None = None):
    losses = [4.0, 4.2, 3.9, 4.1, 4.0, 4.0 * jump, 3.8, 3.7]
    run = ev(records=records([4.0, 3.9]), **steps_of(losses))
    return dataclasses.replace(run, step_batch_sizes=sizes) if sizes else run


def imbalance(ratio: float):
    raw = {"recon": ratio, "kl": 1.0}
    return ev(records=(record(0, ratio + 1.0, raw=raw),))


def mixed_reduction(kl_weight: float = 1.0, reduction: str = "sum"):
    weights = {"recon": 1.0, "kl": kl_weight}
    run = record(0, 10.0, raw={"recon": 9.0, "kl": 1.0}, weights=weights)
    return ev(records=(run,), reduction={"recon": "mean", "kl": reduction}, batch_size=BATCH)


R = t.COLLAPSE_KL_TOTAL
CASES: list[tuple[str, RunEvidence, str, bool]] = [
    ("nonfinite-loss: a skipped step", ev(records=(record(skipped=1),)), "nonfinite-loss", True),
    ("nonfinite-loss: a NaN total", ev(records=(record(total=math.nan),)), "nonfinite-loss", True),
    ("nonfinite-loss: all finite", ev(records=(record(),)), "nonfinite-loss", False),
    (
        "zero-loss: the floor engaged",
        ev(records=(record(raw={"recon": 9.0, "kl": 0.0}, floors={"kl": 3}),)),
        "zero-loss",
        True,
    ),
    (
        "zero-loss: exactly zero",
        ev(records=(record(raw={"recon": 9.0, "kl": 0.0}),)),
        "zero-loss",
        True,
    ),
    (
        "zero-loss: zero but weight off",
        ev(records=(record(raw={"recon": 9.0, "kl": 0.0}, weights={"recon": 1.0, "kl": 0.0}),)),
        "zero-loss",
        False,
    ),
    ("zero-loss: a real value", ev(records=(record(),)), "zero-loss", False),
    ("nonfinite-grad: one NaN entry", ev(snapshots=(snapshot(bad=1),)), "nonfinite-grad", True),
    ("nonfinite-grad: finite", ev(snapshots=(snapshot(),)), "nonfinite-grad", False),
    ("nonfinite-input: one NaN", ev(input_non_finite=1), "nonfinite-input", True),
    ("nonfinite-input: none", ev(input_non_finite=0), "nonfinite-input", False),
    ("collapse: KL just below", collapse(R * BELOW), "posterior-collapse", True),
    ("collapse: KL just above", collapse(R * ABOVE), "posterior-collapse", False),
    ("collapse: no active unit", collapse(5.0, active=0), "posterior-collapse", True),
    (
        "collapse: gain just below",
        collapse(0.01, gain=t.COLLAPSE_RECON_GAIN * BELOW),
        "posterior-collapse",
        True,
    ),
    (
        "collapse: gain just above",
        collapse(0.01, gain=t.COLLAPSE_RECON_GAIN * ABOVE),
        "posterior-collapse",
        False,
    ),
    (
        "collapse: too few steps",
        collapse(0.01, steps=t.COLLAPSE_MIN_STEPS // 3 - 1),
        "posterior-collapse",
        False,
    ),
    (
        "collapse: enough steps",
        collapse(0.01, steps=math.ceil(t.COLLAPSE_MIN_STEPS / 3)),
        "posterior-collapse",
        True,
    ),
    (
        "collapse: KL rising",
        collapse(0.01, kl=[0.1, 0.2, 0.3]),
        "posterior-collapse",
        False,
    ),
    (
        "collapse: KL back above its low by just more than the rebound share",
        collapse(0.01, kl=[0.5, 0.1, 0.1 * (1 + t.COLLAPSE_REBOUND) * ABOVE]),
        "posterior-collapse",
        False,
    ),
    (
        "collapse: KL back above its low by just less than the rebound share",
        collapse(0.01, kl=[0.5, 0.1, 0.1 * (1 + t.COLLAPSE_REBOUND) * BELOW]),
        "posterior-collapse",
        True,
    ),
    (
        "frozen-noise: every pair the same",
        ev(noise_repeats=NoiseRepeats(10, 10, 0)),
        "frozen-noise",
        True,
    ),
    (
        "frozen-noise: half differ (not more than half)",
        ev(noise_repeats=NoiseRepeats(10, 5, 0)),
        "frozen-noise",
        True,
    ),
    (
        "frozen-noise: more than half differ",
        ev(noise_repeats=NoiseRepeats(10, 4, 0)),
        "frozen-noise",
        False,
    ),
    ("noise-scale: standard normal", noise_scale_ev(), "noise-scale", False),
    (
        "noise-scale: std just below low",
        noise_scale_ev(std=t.NOISE_STD_LOW * BELOW),
        "noise-scale",
        True,
    ),
    (
        "noise-scale: std just above low",
        noise_scale_ev(std=t.NOISE_STD_LOW * ABOVE),
        "noise-scale",
        False,
    ),
    (
        "noise-scale: std just above high",
        noise_scale_ev(std=t.NOISE_STD_HIGH * ABOVE),
        "noise-scale",
        True,
    ),
    (
        "noise-scale: std just below high",
        noise_scale_ev(std=t.NOISE_STD_HIGH * BELOW),
        "noise-scale",
        False,
    ),
    (
        "noise-scale: mean just above",
        noise_scale_ev(mean=t.NOISE_MEAN_MAX * ABOVE),
        "noise-scale",
        True,
    ),
    (
        "noise-scale: mean just below",
        noise_scale_ev(mean=t.NOISE_MEAN_MAX * BELOW),
        "noise-scale",
        False,
    ),
    (
        "noise-scale: exponent just outside",
        noise_scale_ev(k=0.5 + t.NOISE_EXPONENT_TOLERANCE * ABOVE),
        "noise-scale",
        True,
    ),
    (
        "noise-scale: exponent just inside",
        noise_scale_ev(k=0.5 + t.NOISE_EXPONENT_TOLERANCE * BELOW),
        "noise-scale",
        False,
    ),
    (
        "noise-scale: too few entries",
        noise_scale_ev(std=0.01, samples=t.NOISE_MIN_SAMPLES - 1),
        "noise-scale",
        False,
    ),
    (
        "no-grad-path: worth just over the share",
        no_grad(value=t.NO_GRAD_MIN_SHARE * 4.0 * ABOVE, norm=0.0),
        "no-grad-path",
        True,
    ),
    (
        "no-grad-path: worth just under the share",
        no_grad(value=t.NO_GRAD_MIN_SHARE * 4.0 * BELOW, norm=0.0),
        "no-grad-path",
        False,
    ),
    (
        "no-grad-path: gradient just under the ratio",
        no_grad(value=1.0, norm=t.NO_GRAD_RELATIVE * BELOW),
        "no-grad-path",
        True,
    ),
    (
        "no-grad-path: gradient just over the ratio",
        no_grad(value=1.0, norm=t.NO_GRAD_RELATIVE * ABOVE),
        "no-grad-path",
        False,
    ),
    ("grad-dominance: just above", dominance(t.DOMINANCE * ABOVE), "grad-dominance", True),
    ("grad-dominance: just below", dominance(t.DOMINANCE * BELOW), "grad-dominance", False),
    ("grad-conflict: cos just below", conflict(t.CONFLICT_INFO * ABOVE), "grad-conflict", True),
    ("grad-conflict: cos just above", conflict(t.CONFLICT_INFO * BELOW), "grad-conflict", False),
    (
        "grad-conflict: negative in just under half the steps",
        conflict(-0.9, share_negative=t.CONFLICT_SHARE - 0.1),
        "grad-conflict",
        False,
    ),
    (
        "grad-conflict: negative in half the steps",
        conflict(-0.9, share_negative=t.CONFLICT_SHARE),
        "grad-conflict",
        True,
    ),
    (
        "vanishing-grad: mean |g| just below",
        vanishing(t.VANISHING_ABS_MEAN * BELOW, ratio=0.5, rel_first=0.1),
        "vanishing-grad",
        True,
    ),
    (
        "vanishing-grad: mean |g| just above",
        vanishing(t.VANISHING_ABS_MEAN * ABOVE, ratio=0.5, rel_first=0.1),
        "vanishing-grad",
        False,
    ),
    (
        "vanishing-grad: ratio and first layer just below",
        vanishing(1e-2, ratio=t.VANISHING_RATIO * BELOW, rel_first=t.VANISHING_FIRST * BELOW),
        "vanishing-grad",
        True,
    ),
    (
        "vanishing-grad: ratio just above",
        vanishing(1e-2, ratio=t.VANISHING_RATIO * ABOVE, rel_first=t.VANISHING_FIRST * BELOW),
        "vanishing-grad",
        False,
    ),
    (
        "vanishing-grad: first layer just above",
        vanishing(1e-2, ratio=t.VANISHING_RATIO * BELOW, rel_first=t.VANISHING_FIRST * ABOVE),
        "vanishing-grad",
        False,
    ),
    (
        "exploding-grad: ratio just above",
        exploding([1.0] * 6, ratio=t.EXPLODING_RATIO * ABOVE),
        "exploding-grad",
        True,
    ),
    (
        "exploding-grad: ratio just below",
        exploding([1.0] * 6, ratio=t.EXPLODING_RATIO * BELOW),
        "exploding-grad",
        False,
    ),
    (
        "exploding-grad: growth just above",
        exploding([2.0, 1.0, 3.0, 2.0, 2.0, 2.0 * t.EXPLODING_GROWTH * ABOVE]),
        "exploding-grad",
        True,
    ),
    (
        "exploding-grad: growth just below",
        exploding([2.0, 1.0, 3.0, 2.0, 2.0, 2.0 * t.EXPLODING_GROWTH * BELOW]),
        "exploding-grad",
        False,
    ),
    (
        "exploding-grad: a large but steady norm (a summed BCE)",
        exploding([1.7e3, 1.76e3, 1.5e3, 1.2e3, 1.1e3, 1.0e3], loss=1.3e4),
        "exploding-grad",
        False,
    ),
    (
        "dying-relu: at the fraction",
        ev(dead_units={"enc.1": t.DEAD_RELU}),
        "dying-relu",
        True,
    ),
    (
        "dying-relu: just below",
        ev(dead_units={"enc.1": t.DEAD_RELU * BELOW}),
        "dying-relu",
        False,
    ),
    (
        "unused-params: missing at every step",
        ev(snapshots=(snapshot(missing=("head.weight",)),) * 3),
        "unused-params",
        True,
    ),
    (
        "unused-params: missing at one step only",
        ev(snapshots=(snapshot(missing=("head.weight",)), snapshot(), snapshot())),
        "unused-params",
        False,
    ),
    ("loss-plateau: drop just below", plateau(t.PLATEAU_IMPROVEMENT * BELOW), "loss-plateau", True),
    (
        "loss-plateau: drop just above",
        plateau(t.PLATEAU_IMPROVEMENT * ABOVE),
        "loss-plateau",
        False,
    ),
    (
        "loss-plateau: a negative loss falling just enough",
        plateau(t.PLATEAU_IMPROVEMENT * ABOVE, first=-10.0),
        "loss-plateau",
        False,
    ),
    (
        "loss-plateau: a negative loss rising",
        plateau(-0.5, first=-10.0),
        "loss-plateau",
        True,
    ),
    (
        "loss-plateau: too few steps",
        plateau(0.0, steps=t.PLATEAU_MIN_STEPS // 3 - 1),
        "loss-plateau",
        False,
    ),
    (
        "loss-oscillation: step spike just above",
        oscillation_steps(t.OSC_SPIKE * ABOVE),
        "loss-oscillation",
        True,
    ),
    (
        "loss-oscillation: step spike just below",
        oscillation_steps(t.OSC_SPIKE * BELOW),
        "loss-oscillation",
        False,
    ),
    (
        "loss-oscillation: epoch rises of 5% twice (just above)",
        ev(
            records=records([10, 10 * (1 + t.OSC_RISE * ABOVE), 9, 9 * (1 + t.OSC_RISE * ABOVE), 8])
        ),
        "loss-oscillation",
        True,
    ),
    (
        "loss-oscillation: epoch rises just below 5%",
        ev(
            records=records([10, 10 * (1 + t.OSC_RISE * BELOW), 9, 9 * (1 + t.OSC_RISE * BELOW), 8])
        ),
        "loss-oscillation",
        False,
    ),
    ("scale-imbalance: just above", imbalance(t.SCALE_IMBALANCE * ABOVE), "scale-imbalance", True),
    (
        "scale-imbalance: just below",
        imbalance(t.SCALE_IMBALANCE * BELOW),
        "scale-imbalance",
        False,
    ),
    (
        "terms-mismatch: just above",
        ev(records=(record(),), unexplained=(t.TERMS_MISMATCH * ABOVE,) * 3),
        "terms-mismatch",
        True,
    ),
    (
        "terms-mismatch: just below",
        ev(records=(record(),), unexplained=(t.TERMS_MISMATCH * BELOW,) * 3),
        "terms-mismatch",
        False,
    ),
    ("batch-dependent-weights: mixed", mixed_reduction(), "batch-dependent-weights", True),
    (
        "batch-dependent-weights: one reduction",
        mixed_reduction(reduction="mean"),
        "batch-dependent-weights",
        False,
    ),
    (
        "batch-dependent-weights: the summed term is off",
        mixed_reduction(kl_weight=0.0),
        "batch-dependent-weights",
        False,
    ),
    (
        # a term that is always 0 has no measurable reduction: "mean" and "unknown" are
        # not a mix (the message used to read "summed over the batch but ... averaged")
        "batch-dependent-weights: one term's reduction unknown",
        mixed_reduction(reduction="unknown"),
        "batch-dependent-weights",
        False,
    ),
]
IDS = [case[0] for case in CASES]


@pytest.mark.parametrize(("name", "evidence", "code", "fires"), CASES, ids=IDS)
def test_rule_at_its_edge(name, evidence, code, fires):
    assert (code in codes(evidence)) is fires, name


@pytest.mark.parametrize("factor", [BATCH, 1000.0])
@pytest.mark.parametrize(("name", "evidence", "code", "fires"), CASES, ids=IDS)
def test_the_same_verdicts_when_loss_and_gradients_scale(name, evidence, code, fires, factor):
    """x batch is what reduction="sum" gives; x 1000 a loss in other units."""
    assert codes(scaled(evidence, factor)) == codes(evidence), name


def test_every_rule_has_a_firing_and_a_silent_edge():
    fired = {code for _, _, code, fires in CASES if fires}
    silent = {code for _, _, code, fires in CASES if not fires}
    assert fired == CORE_CODES
    assert silent == CORE_CODES


# ---- what the issue named ----


def test_a_summed_bce_with_the_batch_in_its_gradient_is_not_exploding():
    """pytorch/examples' VAE: BCE summed over 128 rows, healthy at a total norm ~1.8e3."""
    mean_reduced = exploding([14.0, 13.0, 12.0, 11.0, 10.0, 9.0, 8.0], loss=100.0)
    summed = scaled(mean_reduced, BATCH)
    assert max(s.total_norm for s in summed.snapshots) > 1e3  # the old absolute limit
    assert "exploding-grad" not in codes(summed) | codes(mean_reduced)


def test_exploding_message_says_what_was_compared():
    (finding,) = _rule("exploding_grad")(exploding([1.0, 1.0, 1.0, 1.0, 1.0, 5e3]))
    assert "5e+03x the median 1 of the first 5 steps" in finding.message
    assert finding.evidence["growth"] == pytest.approx(5e3)


def test_vanishing_is_judged_against_the_loss_scale_and_says_so():
    (finding,) = _rule("vanishing_grad")(vanishing(1e-8, ratio=0.5, rel_first=0.1, loss=5.0))
    assert "the loss scale 5" in finding.message
    assert finding.evidence["relative_abs_mean"] == pytest.approx(1e-8)
    # no loss recorded: compared with 1, and the message says so
    run = vanishing(1e-8, ratio=0.5, rel_first=0.1, loss=1.0)
    (bare,) = _rule("vanishing_grad")(dataclasses.replace(run, step_losses=(), step_batch_sizes=()))
    assert "no finite loss" in bare.message


def test_near_total_collapse_with_one_dimension_above_the_old_line_is_found():
    """KL 0.08 nats in all, one dimension just above 0.01, reconstruction = the mean."""
    lat = latent((0.011, 0.03, 0.02, 0.019), (True, False, False, False), gain=0.01)
    run = ev(records=records([10.0, 9.0, 8.0]), latent=lat)
    verdict = collapse_verdict(run)
    assert verdict.status == "finding"
    assert "explains 1% of the variance the data mean leaves" in verdict.reason
    (finding,) = _rule("posterior_collapse")(run)
    assert finding.evidence["recon_gain"] == pytest.approx(0.01)


def test_a_good_reconstruction_with_a_tiny_kl_is_not_called_collapse_and_says_why():
    run = collapse(0.01, gain=0.9)
    verdict = collapse_verdict(run)
    assert verdict.status == "not-judged" and "disagree" in verdict.reason
    assert any(c.code == "posterior-collapse" for c in not_checked(run))


def test_a_good_reconstruction_with_no_active_unit_is_a_decoder_that_ignores_z():
    """The benchmark's over-strong-decoder: recon = decode(z) + skip(x), KL ~0.001."""
    verdict = collapse_verdict(collapse(0.001, active=0, gain=0.96))
    assert verdict.status == "finding" and "sees x another way" in verdict.reason


def test_a_healthy_latent_is_ok_with_its_information_in_the_reason():
    verdict = collapse_verdict(collapse(4.0, gain=0.6))
    assert verdict.status == "ok" and "nats" in verdict.reason and "bits" in verdict.reason


def test_a_short_last_batch_of_a_summed_loss_is_not_a_spike_against_full_ones():
    """Summed losses: full batches of 128 give ~128x the loss of batches of 2."""
    losses = [2.0, 2.1, 1.9, 2.0, 128.0, 2.0, 126.0]
    sizes = (2, 2, 2, 2, 128, 2, 128)
    run = ev(records=records([4.0, 3.9]), step_losses=tuple(losses), step_batch_sizes=sizes)
    assert "loss-oscillation" not in codes(run)
    same = dataclasses.replace(run, step_batch_sizes=(BATCH,) * len(losses))
    assert "loss-oscillation" in codes(same)  # the same numbers, one batch size: a spike


def test_the_lr_one_run_one_huge_step_then_flat_is_oscillation():
    """The loss-oscillation scenario at lr = 1.0: its epoch totals show one huge first
    epoch then flat; its steps show the spike."""
    totals = [14073.0, 17.5, 18.2, 17.5, 17.6, 18.1]
    losses = [4.44, 5.63e4, 19.1, 18.9, 16.5, 22.1] + [18.0] * 18
    run = ev(records=records(totals, steps=4), **steps_of(losses))
    assert _rule("loss_oscillation")(dataclasses.replace(run, step_losses=())) == []
    (finding,) = _rule("loss_oscillation")(run)
    assert "step 1's loss" in finding.message and finding.evidence["spikes"] == 1


def test_oscillation_without_step_losses_falls_back_to_the_epochs():
    run = ev(records=records([10, 11, 9, 10, 8]))
    assert "loss-oscillation" in codes(run)
    assert "loss-oscillation" not in {c.code for c in not_checked(run)}
    short = ev(records=records([10, 11]))
    assert "loss-oscillation" in {c.code for c in not_checked(short)}
    with_steps = dataclasses.replace(short, **steps_of([4.0, 4.1, 41.0]))
    assert "loss-oscillation" in codes(with_steps)


def test_a_nan_step_is_left_to_the_nonfinite_rules():
    losses = [4.0, 4.1, math.nan, 4.0, math.inf, 3.9]
    run = ev(records=records([4.0, 3.9]), **steps_of(losses))
    assert "loss-oscillation" not in codes(run)


# ---- thresholds.py documents every constant ----

THRESHOLDS = Path(t.__file__).read_text().splitlines()
_CONSTANT = re.compile(r"^([A-Z][A-Z0-9_]*) = ")


def test_every_threshold_says_where_it_comes_from():
    """A constant has a comment on its line, or sits under a comment (possibly with other
    bare constants between): a new threshold without its source fails here."""
    undocumented = []
    for i, line in enumerate(THRESHOLDS):
        m = _CONSTANT.match(line)
        if m is None or "#" in line:
            continue
        j = i - 1
        while j >= 0 and _CONSTANT.match(THRESHOLDS[j]) and "#" not in THRESHOLDS[j]:
            j -= 1
        if j < 0 or not THRESHOLDS[j].lstrip().startswith("#"):
            undocumented.append(m.group(1))
    assert undocumented == []


def test_the_collapse_information_floor_is_fanos():
    """ln 2 - h(1/4): below it z cannot tell two halves of the data apart 3 times in 4."""

    def h(p: float) -> float:
        return -p * math.log(p) - (1 - p) * math.log(1 - p)

    assert t.COLLAPSE_KL_TOTAL == pytest.approx(math.log(2) - h(0.25))
    assert t.COLLAPSE_KL_TOTAL == pytest.approx(0.1308, abs=1e-4)


def _rule(name: str):
    return next(r for r in RULES if r.__name__ == name)


def test_a_loss_without_a_kl_term_takes_the_kl_trend_from_the_traced_analytic_kl():
    """A scalar loss names no KL: a fresh encoder's KL, rising, is not collapse."""
    from types import SimpleNamespace

    def traced(kls: list[float]) -> RunEvidence:
        run = collapse(0.05)
        bare = tuple(dataclasses.replace(r, raw={}, weighted={}) for r in run.records)
        steps = tuple(SimpleNamespace(analytic_kl=v) for v in kls)
        return dataclasses.replace(run, records=bare, vae=SimpleNamespace(steps=steps))

    rising = traced([0.04, 0.035, 0.037, 0.03, 0.035, 0.045, 0.05, 0.055, 0.05, 0.06])
    assert collapse_verdict(rising).status == "not-judged"
    falling = traced([0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.08, 0.06, 0.05, 0.05])
    assert collapse_verdict(falling).status == "finding"
    assert collapse_verdict(traced([])).status == "finding"  # no trend known: judged
