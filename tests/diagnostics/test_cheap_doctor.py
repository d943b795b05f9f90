"""The Doctor's cheap defaults: K - 1 attribution passes, the schedule, per-step norms.

The derived attribution is held to one ``torch.autograd.grad`` per term on the same graph,
on our TinyVAE with a third term and on pytorch/examples' VAE and loss (tests/public_vaes.py,
copied as written there).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from _diagnostics_helpers import TinyVAE, loss_terms
from torch import Tensor, nn
from torch.nn import functional as F

from meaning_transform.diagnostics.attribution import (
    begin_attribution,
    complete_attribution,
    term_attribution,
)
from meaning_transform.diagnostics.doctor import Doctor
from meaning_transform.diagnostics.noise import NoiseRecorder
from meaning_transform.diagnostics.schedule import ATTRIBUTION_SCHEDULE, EVERY_STEP, Schedule

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from public_vaes import PyTorchExamplesVAE  # noqa: E402

WEIGHTS = {"recon": 1.0, "kl": 0.5, "l1": 0.25}


def three_terms(out: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
    return {**loss_terms(out, x), "l1": (out["reconstruction"] - x).abs().sum(1).mean()}


def reference(terms: dict[str, Tensor], params: list[Tensor]) -> dict[str, list[Tensor]]:
    """One torch.autograd.grad per term (zeros where a term does not reach)."""
    out = {}
    for name, t in terms.items():
        grads = torch.autograd.grad(t, params, retain_graph=True, allow_unused=True)
        out[name] = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return out


def flat(grads: list[Tensor]) -> Tensor:
    return torch.cat([g.reshape(-1) for g in grads]).double()


def assert_matches(att, ref: dict[str, list[Tensor]], rel: float = 1e-5) -> None:  # type: ignore[no-untyped-def]
    for a in ref:
        norm = float(flat(ref[a]).norm())
        assert att.norm[a] == pytest.approx(norm, rel=rel, abs=1e-9)
        for b in ref:
            na, nb = flat(ref[a]), flat(ref[b])
            denom = float(na.norm() * nb.norm())
            cos = float(na @ nb) / denom if denom > 0 else 0.0
            assert att.cosine[a][b] == pytest.approx(
                cos if a != b else (1.0 if denom else 0.0), abs=1e-5
            )


@pytest.mark.parametrize("derive", ["recon", "l1"])
def test_derived_attribution_equals_one_autograd_grad_per_term(derive: str) -> None:
    torch.manual_seed(0)
    model, x = TinyVAE(), torch.randn(32, 6)
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    terms = three_terms(out, x)
    ref = reference(terms, params)
    pending = begin_attribution(terms, WEIGHTS, model, derive=derive)
    sum(WEIGHTS[n] * t for n, t in terms.items()).backward()
    att, residual = complete_attribution(pending, [p.grad for p in params])
    assert att.derived == derive and math.isnan(residual)
    assert_matches(att, ref)
    explicit = term_attribution(three_terms(model(x), x), WEIGHTS, model)
    assert explicit.derived is None


def test_derived_attribution_on_pytorch_examples_vae() -> None:
    torch.manual_seed(1)
    model, x = PyTorchExamplesVAE(), torch.rand(16, 64)
    params = list(model.parameters())
    recon, mu, logvar = model(x)
    terms = {
        "BCE": F.binary_cross_entropy(recon, x.view(-1, 64), reduction="sum"),
        "KLD": -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()),
    }
    ref = reference(terms, params)
    pending = begin_attribution(terms, {"BCE": 1.0, "KLD": 1.0}, model, derive="BCE")
    (terms["BCE"] + terms["KLD"]).backward()
    att, _ = complete_attribution(pending, [p.grad for p in params])
    assert_matches(att, ref)


def test_accumulated_grad_is_subtracted_before_deriving() -> None:
    torch.manual_seed(2)
    model, x = TinyVAE(), torch.randn(32, 6)
    params = [p for p in model.parameters() if p.requires_grad]
    three_terms(model(x), x)["recon"].backward()  # a micro-batch already in .grad
    terms = three_terms(model(x), x)
    ref = reference(terms, params)
    pending = begin_attribution(terms, WEIGHTS, model, derive="recon")
    sum(WEIGHTS[n] * t for n, t in terms.items()).backward()
    att, _ = complete_attribution(pending, [p.grad for p in params])
    assert_matches(att, ref)


def test_the_kl_pass_runs_only_through_the_encoder() -> None:
    """A term's own pass never enters the part of the network it does not reach."""
    torch.manual_seed(3)
    model, x = TinyVAE(), torch.randn(32, 6)
    calls: list[str] = []
    for name, p in model.named_parameters():
        p.register_hook(lambda g, name=name: calls.append(name))
    terms = loss_terms(model(x), x)
    pending = begin_attribution(terms, {"recon": 1.0, "kl": 1.0}, model, derive="recon")
    assert calls and all(not name.startswith("decoder") for name in calls)
    assert any(name.startswith("encoder") for name in calls)
    kl_row = pending.per_term[pending.connected.index(1)]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    reached = {n for n, g in zip(names, kl_row, strict=True) if g is not None}
    assert reached and not any(n.startswith("decoder") for n in reached)


def test_a_derived_term_with_no_gradient_reads_exactly_zero() -> None:
    torch.manual_seed(4)
    model, x = TinyVAE(), torch.randn(32, 6)
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    terms = {**three_terms(out, x), "flat": out["reconstruction"].sum() * 0.0}
    weights = {**WEIGHTS, "flat": 1.0}
    pending = begin_attribution(terms, weights, model, derive="flat")
    sum(weights[n] * t for n, t in terms.items()).backward()
    att, _ = complete_attribution(pending, [p.grad for p in params])
    assert att.norm["flat"] == 0.0 and "flat" in att.zero_gradient


def doctor_loop(
    steps: int,
    scale: float = 1.0,
    backward: bool = True,
    zero: str = "before",
    **kwargs: object,
):  # type: ignore[no-untyped-def]
    """A user's loop; per step the reference per-term gradients of the same graph."""
    torch.manual_seed(5)
    model, x = TinyVAE(), torch.randn(32, 6)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-2)
    refs = []
    with Doctor(model, **kwargs) as doctor:  # type: ignore[arg-type]
        for _ in range(steps):
            if zero == "before":
                optimizer.zero_grad(set_to_none=True)
            out = model(x)
            terms = three_terms(out, x)
            total = sum(WEIGHTS[n] * t for n, t in terms.items())
            refs.append(reference(terms, params))
            doctor.step(out, {"loss": total, **terms}, x, weights=WEIGHTS)
            if zero == "after-step":  # pytorch/examples-style order: zero_grad after forward
                optimizer.zero_grad(set_to_none=True)
            if backward:
                (scale * total).backward()
                optimizer.step()
    return doctor, refs


def test_the_doctor_derives_one_term_after_checking_the_identity() -> None:
    doctor, refs = doctor_loop(10, attribute_every=1)
    derived = [a.derived for a in doctor.attributions]
    # the first attribution checks the total's gradient against every term's own; the
    # 9th checks again (every 8th); the largest term that reaches everything is derived
    assert derived[0] is None and derived[8] is None
    assert set(derived[1:8]) == {"recon"} and derived[9] == "recon"
    for att, ref in zip(doctor.attributions, refs, strict=True):
        assert_matches(att, ref)


@pytest.mark.parametrize("zero", ["after-step", "never"])
def test_derivation_reads_the_backward_s_own_gradient(zero: str) -> None:
    """.grad zeroed between Doctor.step and backward, or never zeroed (accumulating):
    the derived term still equals its own autograd.grad."""
    doctor, refs = doctor_loop(10, zero=zero, attribute_every=1)
    assert [a.derived for a in doctor.attributions].count("recon") == 8
    for att, ref in zip(doctor.attributions, refs, strict=True):
        assert_matches(att, ref)


def test_a_scaled_backward_is_never_derived_from() -> None:
    """Gradient accumulation's loss / n (or AMP's scale) breaks the identity: every term
    keeps its own pass, and the attribution is still right."""
    doctor, refs = doctor_loop(5, scale=0.5, attribute_every=1)
    assert [a.derived for a in doctor.attributions] == [None] * 5
    assert "residual" in doctor.derive_problem
    for att, ref in zip(doctor.attributions, refs, strict=True):
        assert_matches(att, ref)


def test_without_a_backward_nothing_is_derived_and_nothing_is_lost() -> None:
    doctor, refs = doctor_loop(3, backward=False, attribute_every=1)
    doctor.findings()
    assert len(doctor.attributions) == 3
    assert [a.derived for a in doctor.attributions] == [None] * 3
    assert "no backward" in doctor.derive_problem


def test_default_schedule_steps() -> None:
    schedule = Schedule()
    assert [s for s in range(300) if schedule(s)] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert schedule.count(200) == 9 and schedule(512) and schedule(768) and not schedule(700)
    assert all(EVERY_STEP(s) for s in range(50))
    with pytest.raises(ValueError, match="dense and every"):
        Schedule(every=-1)
    with pytest.raises(ValueError, match="base"):
        Schedule(base=1)


def test_attribution_schedule_is_sparser_and_reaches_late_steps() -> None:
    steps = [s for s in range(20000) if ATTRIBUTION_SCHEDULE(s)]
    assert steps == [0, 4, 16, 64, 256, 1024, 4096, 8192, 12288, 16384]
    assert ATTRIBUTION_SCHEDULE.count(200) == 4
    assert [s for s in range(100) if Schedule(dense=0, every=0, base=3)(s)] == [3, 9, 27, 81]
    assert not any(Schedule(dense=0, every=0, base=0)(s) for s in range(100))


def test_off_schedule_steps_record_norms_and_the_attribution_follows_the_schedule() -> None:
    doctor, _ = doctor_loop(6)  # defaults: attribution on steps 0 and 4
    snaps = doctor.hooks.history
    assert [s.detail for s in snaps] == ["full", "full", "full", "norm", "full", "norm"]
    off = snaps[3]
    assert off.total_norm > 0 and all(p.zero_fraction is None for p in off.params if p.has_grad)
    assert all(p.abs_mean is not None for p in snaps[4].params if p.has_grad)
    assert [a.step for a in doctor.attributions] == [0, 4]


def test_a_nan_gradient_off_the_schedule_is_still_named() -> None:
    torch.manual_seed(6)
    model, x = TinyVAE(), torch.randn(32, 6)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    with Doctor(model) as doctor:
        for step in range(7):
            optimizer.zero_grad(set_to_none=True)
            out = model(x)
            terms = loss_terms(out, x)
            if step == 5:  # not on the schedule; sqrt'(0) = inf, NaN only in backward
                mu = out["mu"]
                terms["root"] = torch.sqrt((mu - mu.detach()).abs()).sum()
            total = sum(terms.values())
            doctor.step(out, {"loss": total, "terms": terms}, x)
            total.backward()
            if step < 5:
                optimizer.step()
    assert not doctor.schedule(5)
    assert doctor.hooks.history[5].detail == "norm"
    codes = {f.code: f for f in doctor.findings()}
    assert "nonfinite-grad" in codes
    origin = doctor.evidence().nan_origin
    assert origin is not None and origin.kind == "backward" and origin.step == 5
    assert origin.where.startswith("mu.")


def test_batched_noise_measurement_equals_step_by_step() -> None:
    torch.manual_seed(7)
    batched, stepwise = NoiseRecorder(), NoiseRecorder()
    for step in range(21):
        mu, lv = torch.randn(16, 3), torch.randn(16, 3) * 0.5
        eps = torch.randn(16, 3) if step != 7 else torch.zeros(16, 3)
        z = mu + torch.exp(0.5 * lv) * eps
        batched.record(mu, lv, z)
        stepwise.record(mu, lv, z)
        stepwise.flush()
    a, b = batched.scale(), stepwise.scale()
    assert a is not None and b is not None
    assert a.samples == b.samples and a.steps == b.steps == 20 and a.dropped == b.dropped
    # float32 sums over 16 or 768 entries: the same to float32 rounding
    assert a.mean == pytest.approx(b.mean, abs=1e-6) and a.std == pytest.approx(b.std, rel=1e-5)
    assert a.exponent == pytest.approx(b.exponent, rel=1e-5)
    assert batched.repeats() == stepwise.repeats()


class _Frozen(nn.Module):
    """Draws the same noise every step (the original bug), returns z."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = TinyVAE(batch_norm=False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.inner(x)


def test_frozen_noise_is_still_found_with_the_default_schedule() -> None:
    torch.manual_seed(8)
    model, x = _Frozen(), torch.randn(32, 6)  # TinyVAE's eps is a fixed buffer
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    with Doctor(model) as doctor:
        for _ in range(20):
            optimizer.zero_grad(set_to_none=True)
            out = model(x)
            terms = loss_terms(out, x)
            total = sum(terms.values())
            doctor.step(out, {"loss": total, "terms": terms}, x)
            total.backward()
            optimizer.step()
    assert "frozen-noise" in {f.code for f in doctor.findings()}


def test_scheduled_attributions_are_weighted_by_the_steps_they_stand_for() -> None:
    """Attributions at steps 0, 1, 2, 4, ..., 128 of a 200-step run whose KL gradient is
    ~0 for the first 30 steps (a fresh encoder: mu ~ 0, log_var ~ 0): the plain mean over
    the attributions is mostly those first steps (recon 'dominates' 150x), the run's mean
    is not (60x, under grad-dominance's 100x). Weighted by span, no finding; the same
    attributions without step indices (one per step) fire."""
    from dataclasses import replace

    from test_threshold_edges import attribution

    from meaning_transform.diagnostics.rules import RunEvidence, grad_conflict, grad_dominance

    steps = [0, 1, 2, 4, 8, 16, 32, 64, 128]
    atts = [
        replace(attribution({"recon": 50.0, "kl": 1e-3 if s < 30 else 1.0}), step=s) for s in steps
    ]
    losses = tuple([1.0] * 200)
    weighted = RunEvidence(where="run", attributions=tuple(atts), step_losses=losses)
    assert grad_dominance(weighted) == []
    plain = RunEvidence(
        where="run", attributions=tuple(replace(a, step=None) for a in atts), step_losses=losses
    )
    assert [f.code for f in grad_dominance(plain)] == ["grad-dominance"]
    # the same weighting for conflict: cos < 0 only on the early steps
    early = [
        replace(a, cosine={"recon": {"recon": 1.0, "kl": -0.9}, "kl": {"recon": -0.9, "kl": 1.0}})
        for a in atts[:6]
    ]
    mixed = RunEvidence(where="run", attributions=tuple(early + atts[6:]), step_losses=losses)
    assert grad_conflict(mixed) == []
    unweighted = RunEvidence(
        where="run", attributions=tuple(replace(a, step=None) for a in early + atts[6:])
    )
    assert [f.code for f in grad_conflict(unweighted)] == ["grad-conflict"]
