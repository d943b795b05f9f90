"""The VAE checks: kl-formula, beta-schedule and collapse-onset.

Each rule on hand-built :class:`VaeEvidence` at its threshold edges (milliseconds), then a
few Doctor runs with a tiny model for 10-60 steps that prove the wiring.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor, nn

from meaning_transform.diagnostics.doctor import Doctor, Findings
from meaning_transform.diagnostics.rules import RunEvidence, evaluate
from meaning_transform.diagnostics.vae_checks import (
    BETA_FOLLOW,
    BETA_REACHED,
    COLLAPSE_ONSET_DROP,
    COLLAPSE_ONSET_FLOOR,
    COLLAPSE_ONSET_MIN_STEPS,
    KL_AUDIT_MIN_NATS,
    KL_HALF,
    KL_MATCH,
    VaeEvidence,
    VaeStep,
    beta_schedule,
    collapse_onset,
    kl_audit,
    kl_formula,
    vae_not_checked,
)

NAN = math.nan
B, Z = 32, 4

# ---- hand-built evidence -------------------------------------------------------------------


def vae(
    analytic: Sequence[float],
    term: Callable[[int, float], float] | None = lambda i, a: a,
    weight: Callable[[int], float] = lambda i: 1.0,
    declared: Callable[[int], float] | None = None,
    beta_max: float | None = None,
    batch: int = B,
    kl_term: str = "kl",
) -> VaeEvidence:
    """One VaeStep per analytic KL value; ``term(i, a)`` is the loss's KL term."""
    steps = tuple(
        VaeStep(
            step=i,
            analytic_kl=a,
            kl_term=term(i, a) if term is not None else NAN,
            batch_size=batch,
            latent_dim=Z,
            weight=weight(i),
            declared_beta=declared(i) if declared is not None else NAN,
        )
        for i, a in enumerate(analytic)
    )
    return VaeEvidence(
        steps=steps,
        steps_seen=len(steps),
        kl_term=kl_term if term is not None else "",
        kl_term_problem="" if term is not None else "the loss returns one scalar",
        weight_source="weights",
        schedule_declared=declared is not None,
        beta_max=beta_max,
    )


def run(v: VaeEvidence) -> RunEvidence:
    return RunEvidence(where="run", vae=v)


def skipped(v: VaeEvidence) -> dict[str, str]:
    return {c.code: c.reason for c in vae_not_checked(run(v))}


RISING = [1.0 + 0.1 * i for i in range(20)]  # nats per sample, well above the audit floor

# ---- kl-formula ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scale", "convention"),
    [(1.0, "per-sample mean"), (B, "sum over the batch"), (1 / Z, "mean over every element")],
)
def test_a_correct_kl_in_any_reduction_is_silent(scale, convention):
    v = vae(RISING, term=lambda i, a: scale * a)
    assert kl_formula(run(v)) == []
    audit = kl_audit(v)
    assert audit is not None and audit.verdict == "ok"
    assert "kl-formula" not in skipped(v)


def test_a_kl_with_the_wrong_sign_under_a_positive_weight_is_an_error():
    v = vae(RISING, term=lambda i, a: -a, weight=lambda i: 0.1)
    (f,) = kl_formula(run(v))
    assert f.severity == "error" and f.code == "kl-formula"
    assert "wrong sign" in f.title and "rewards KL" in f.title
    assert f.evidence["ratio"] == pytest.approx(-1.0)
    assert f.where == "run:kl"


def test_antixk_minus_kl_with_a_negative_weight_is_fine():
    """AntixK's loss reports KLD = -KL; the benchmark weighs it by -w: +w * KL."""
    v = vae(RISING, term=lambda i, a: -a, weight=lambda i: -0.005, kl_term="KLD")
    assert kl_formula(run(v)) == []


def test_a_positive_kl_under_a_negative_weight_is_the_wrong_sign_too():
    v = vae(RISING, term=lambda i, a: B * a, weight=lambda i: -1.0)
    (f,) = kl_formula(run(v))
    assert f.severity == "error"


def test_minus_kl_with_weight_zero_rewards_nothing():
    v = vae(RISING, term=lambda i, a: -a, weight=lambda i: 0.0)
    assert kl_formula(run(v)) == []


@pytest.mark.parametrize(("scale", "convention"), [(1.0, "per-sample mean"), (B, "sum over")])
def test_twice_the_kl_is_a_missing_half(scale, convention):
    v = vae(RISING, term=lambda i, a: 2 * scale * a)
    (f,) = kl_formula(run(v))
    assert f.severity == "warning"
    assert "missing 0.5" in f.title
    assert str(f.evidence["convention"]).startswith(convention)


@pytest.mark.parametrize(
    ("ratio", "verdict"),
    [
        (2 * (1 + KL_HALF * 0.9), "missing-half"),
        (2 * (1 - KL_HALF * 0.9), "missing-half"),
        (2 * (1 + KL_HALF * 1.5), "mismatch"),  # near 2 but not 2: some other formula
        (1 + KL_MATCH * 0.95, "ok"),
        (1 - KL_MATCH * 0.95, "ok"),
        (1 + KL_MATCH * 1.1, "mismatch"),
        (1 - KL_MATCH * 1.1, "mismatch"),
    ],
)
def test_kl_formula_threshold_edges(ratio, verdict):
    v = vae(RISING, term=lambda i, a: ratio * a)
    audit = kl_audit(v)
    assert audit is not None and audit.verdict == verdict
    assert bool(kl_formula(run(v))) == (verdict != "ok")


def test_a_weight_inside_the_term_does_not_match():
    v = vae(RISING, term=lambda i, a: 3.0 * a)  # β = 3 multiplied in, weight given as 1
    (f,) = kl_formula(run(v))
    assert f.severity == "warning"
    assert "(x3)" in f.title
    assert f.evidence["convention"] == "per-sample mean"  # the nearest convention
    assert "weight inside the term" in f.message
    assert "pass the" in f.remedy


def test_a_monte_carlo_kl_is_unbiased_and_silent():
    """One-sample log q(z) - log p(z): noisy per step, right on average."""
    rng = random.Random(0)
    v = vae(RISING, term=lambda i, a: a * (1 + rng.gauss(0, 0.3)))
    assert kl_formula(run(v)) == []


def test_a_very_noisy_kl_estimate_is_not_judged_and_says_so():
    rng = random.Random(1)
    v = vae([0.5] * 10, term=lambda i, a: 2.5 * a + rng.gauss(0, 6.0))
    audit = kl_audit(v)
    assert audit is not None and audit.verdict in ("ok", "noisy")
    assert kl_formula(run(v)) == []
    if audit.verdict == "noisy":
        assert "too noisy" in skipped(v)["kl-formula"]


def test_the_audit_waits_for_a_measurable_kl():
    """At the prior (KL ~ 0) term / KL is rounding: those steps are left out."""
    v = vae([KL_AUDIT_MIN_NATS / 2] * 30, term=lambda i, a: -5 * a, weight=lambda i: 1.0)
    assert kl_formula(run(v)) == []
    assert "analytic KL above" in skipped(v)["kl-formula"]


def test_without_a_kl_term_the_audit_says_why():
    v = vae(RISING, term=None)
    assert kl_formula(run(v)) == []
    assert "one scalar" in skipped(v)["kl-formula"]


def test_evidence_not_from_a_doctor_is_silent_and_lists_nothing():
    ev = RunEvidence(where="run")
    assert kl_formula(ev) == beta_schedule(ev) == collapse_onset(ev) == []
    assert vae_not_checked(ev) == []


# ---- beta-schedule -----------------------------------------------------------------------------


def ramp(steps: int, top: float = 1.0) -> Callable[[int], float]:
    return lambda t: top * min(1.0, t / steps)


def test_an_applied_schedule_is_silent():
    v = vae(RISING, weight=ramp(10), declared=ramp(10), beta_max=1.0)
    assert beta_schedule(run(v)) == []


def test_a_constant_weight_under_a_rising_schedule_fires():
    v = vae(RISING, weight=lambda t: 1.0, declared=ramp(20), beta_max=1.0)
    (f,) = beta_schedule(run(v))
    assert f.severity == "warning"
    assert "does not follow the declared schedule" in f.message
    assert "applied constant at 1" in f.message
    assert "β reached" not in f.message  # it did reach its maximum


def test_the_applied_weight_is_compared_by_magnitude():
    """AntixK's KLD = -KL takes weight -M_N: a schedule of M_N is followed."""
    v = vae(RISING, term=lambda i, a: -a, weight=lambda t: -ramp(10)(t), declared=ramp(10))
    assert beta_schedule(run(v)) == []


@pytest.mark.parametrize(
    ("offset", "fires"), [(BETA_FOLLOW * 0.9, False), (BETA_FOLLOW * 1.1, True)]
)
def test_beta_follow_edge(offset, fires):
    v = vae(RISING, weight=lambda t: ramp(10)(t) + offset, declared=ramp(10))
    assert bool(beta_schedule(run(v))) == fires


def test_a_per_epoch_schedule_declared_per_step_is_close_enough():
    """The loop sets β at each epoch's start (10 steps an epoch, 10 epochs)."""
    per_step = ramp(99)
    per_epoch = lambda t: per_step(t // 10 * 10)  # noqa: E731
    v = vae([1.0] * 100, weight=per_epoch, declared=per_step, beta_max=1.0)
    assert beta_schedule(run(v)) == [] or "β reached" in beta_schedule(run(v))[0].message


@pytest.mark.parametrize(("reached", "fires"), [(1 - BETA_REACHED * 0.8, False), (0.9, True)])
def test_beta_max_edge(reached, fires):
    v = vae(RISING, weight=ramp(19, reached), declared=ramp(19, reached), beta_max=1.0)
    found = beta_schedule(run(v))
    assert bool(found) == fires
    if fires:
        assert "β reached 0.9 of its maximum 1" in found[0].message
        assert "warm-up is longer than the training" in found[0].message


def test_a_warm_up_too_long_is_found_from_the_declared_schedule_alone():
    """The loss names no KL term (the weight cannot be measured): the declared values say
    the maximum is never reached."""
    v = vae(RISING, term=None, weight=lambda t: NAN, declared=ramp(1000), beta_max=1.0)
    (f,) = beta_schedule(run(v))
    assert "the declared weight" in f.message
    assert "beta-schedule" not in skipped(v)  # it fired: nothing left unchecked


def test_a_declared_schedule_that_cannot_be_measured_is_not_checked():
    v = vae(RISING, term=None, weight=lambda t: NAN, declared=ramp(10))
    assert beta_schedule(run(v)) == []
    assert "could not be measured" in skipped(v)["beta-schedule"]
    assert "one scalar" in skipped(v)["beta-schedule"]


def test_nothing_declared_is_silent_and_not_listed():
    v = vae(RISING, weight=lambda t: 7.0)
    assert beta_schedule(run(v)) == []
    assert "beta-schedule" not in skipped(v)


# ---- collapse-onset --------------------------------------------------------------------------


def rise_and_fall(
    n: int = 100, peak: float = 5.0, fall_at: int = 60, low: float = 0.05
) -> list[float]:
    """KL rising to ``peak`` by step 20, held, then ``low`` from ``fall_at`` on."""
    return [peak * min(1.0, (i + 1) / 20) if i < fall_at else low for i in range(n)]


def test_a_kl_that_rose_and_collapsed_names_the_step_and_beta():
    v = vae(rise_and_fall(), weight=lambda t: 0.01 * 1.05**t)
    (f,) = collapse_onset(run(v))
    assert f.severity == "warning"
    assert f.evidence["step"] == pytest.approx(60, abs=COLLAPSE_ONSET_MIN_STEPS // 5)
    assert f.evidence["peak"] == pytest.approx(5.0)
    assert "β rising" in f.message
    assert f"step {f.evidence['step']}" in f.title


def test_collapse_under_a_constant_beta_says_so():
    v = vae(rise_and_fall(), weight=lambda t: 50.0)
    (f,) = collapse_onset(run(v))
    assert "β constant at 50" in f.message


def test_collapse_without_a_measured_beta_says_so():
    v = vae(rise_and_fall(), term=None, weight=lambda t: NAN)
    (f,) = collapse_onset(run(v))
    assert "not measured" in f.message


def test_a_healthy_beta_vae_drifting_down_after_an_early_peak_is_silent():
    kl = [6.0 * min(1.0, (i + 1) / 10) * (1 - 0.5 * max(0, i - 10) / 90) for i in range(100)]
    assert kl[-1] == pytest.approx(3.0, rel=0.05)  # 50% below its peak
    assert collapse_onset(run(vae(kl))) == []


@pytest.mark.parametrize(
    ("share", "fires"), [(COLLAPSE_ONSET_DROP * 0.95, True), (COLLAPSE_ONSET_DROP * 1.05, False)]
)
def test_collapse_onset_drop_edge(share, fires):
    v = vae(rise_and_fall(peak=5.0, low=5.0 * share))
    assert bool(collapse_onset(run(v))) == fires


@pytest.mark.parametrize(
    ("low", "fires"), [(COLLAPSE_ONSET_FLOOR * 0.99, True), (COLLAPSE_ONSET_FLOOR * 1.01, False)]
)
def test_collapse_onset_floor_edge(low, fires):
    """Under a tenth of a big peak but still over one bit per sample: not collapsed."""
    v = vae(rise_and_fall(peak=20.0, low=low))
    assert bool(collapse_onset(run(v))) == fires


def test_a_peak_under_one_bit_is_not_an_onset():
    v = vae(rise_and_fall(peak=0.6, low=0.01))
    assert collapse_onset(run(v)) == []


def test_a_dip_that_recovers_is_not_an_onset():
    kl = rise_and_fall(n=100, fall_at=50)
    kl[80:] = [5.0] * 20
    assert collapse_onset(run(vae(kl))) == []


def test_a_short_run_is_not_judged_and_says_so():
    v = vae(rise_and_fall(n=COLLAPSE_ONSET_MIN_STEPS - 1, fall_at=15))
    assert collapse_onset(run(v)) == []
    assert f"needs {COLLAPSE_ONSET_MIN_STEPS}" in skipped(v)["collapse-onset"]


# ---- the Doctor: a tiny VAE with fresh noise, a few steps ------------------------------------


class SmallVAE(nn.Module):
    """forward(x) -> {"reconstruction", "mu", "log_var", "z"} with fresh noise."""

    def __init__(self, d: int = 8, z: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Linear(d, 2 * z)
        self.decoder = nn.Linear(z, d)
        self.eps = torch.zeros(0)  # the latest draw (the Monte Carlo KL reads it)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        mu, log_var = self.encoder(x).chunk(2, dim=1)  # (B, Z) each
        self.eps = torch.randn_like(mu)
        z = mu + torch.exp(0.5 * log_var) * self.eps  # (B, Z)
        return {"reconstruction": self.decoder(z), "mu": mu, "log_var": log_var, "z": z}


def kl_elements(out: dict[str, Tensor]) -> Tensor:
    mu, lv = out["mu"], out["log_var"]
    return 0.5 * (mu**2 + lv.exp() - 1 - lv)  # (B, Z)


KlFormula = Callable[[dict[str, Tensor], "SmallVAE"], Tensor]
FORMULAS: dict[str, KlFormula] = {
    "per-sample mean": lambda out, m: kl_elements(out).sum(1).mean(),
    "batch sum": lambda out, m: kl_elements(out).sum(),
    "mean over elements": lambda out, m: kl_elements(out).mean(),
    "monte carlo": lambda out, m: (
        (
            0.5 * (out["z"] ** 2 - m.eps**2 - out["log_var"])  # log q(z|x) - log p(z)
        )
        .sum(1)
        .mean()
    ),
    "wrong sign": lambda out, m: -kl_elements(out).sum(1).mean(),
    "missing 0.5": lambda out, m: (2 * kl_elements(out)).sum(1).mean(),
}


def train_small(
    kl: KlFormula,
    steps: int = 20,
    beta: Callable[[int], float] = lambda t: 1.0,
    lr: float = 1e-2,
    seed: int = 0,
    **doctor_kwargs: object,
) -> Findings:
    torch.manual_seed(seed)
    model = SmallVAE()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(seed)) * 2
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    with Doctor(model, attribute_every=0, **doctor_kwargs) as doctor:  # type: ignore[arg-type]
        for t in range(steps):
            optimizer.zero_grad()
            out = model(x)
            recon = ((out["reconstruction"] - x) ** 2).sum(1).mean()
            term = kl(out, model)
            loss = recon + beta(t) * term
            doctor.step(out, {"loss": loss, "recon": recon, "kl": term}, x)
            loss.backward()
            optimizer.step()
    return doctor.findings()


def vae_codes(found: Findings) -> set[str]:
    return {f.code for f in found} & {"kl-formula", "beta-schedule", "collapse-onset"}


@pytest.mark.parametrize("formula", ["per-sample mean", "batch sum", "mean over elements"])
def test_doctor_a_correct_kl_is_silent(formula):
    found = train_small(FORMULAS[formula])
    assert "kl-formula" not in {f.code for f in found}
    assert "kl-formula" not in {c.code for c in found.not_checked}  # it was judged


def test_doctor_a_monte_carlo_kl_is_silent():
    found = train_small(FORMULAS["monte carlo"], steps=30)
    assert "kl-formula" not in {f.code for f in found}


def test_doctor_a_kl_with_the_wrong_sign_is_an_error():
    found = train_small(FORMULAS["wrong sign"], beta=lambda t: 0.5)
    (f,) = [f for f in found if f.code == "kl-formula"]
    assert f.severity == "error"
    assert f.evidence["ratio"] == pytest.approx(-1.0, rel=1e-4)
    assert f.evidence["weight"] == pytest.approx(0.5)  # measured from the total


def test_doctor_a_missing_half_is_a_warning():
    found = train_small(FORMULAS["missing 0.5"])
    (f,) = [f for f in found if f.code == "kl-formula"]
    assert "missing 0.5" in f.title
    assert f.evidence["ratio"] == pytest.approx(2.0, rel=1e-4)


def test_doctor_a_declared_schedule_that_is_not_applied_fires():
    found = train_small(
        FORMULAS["per-sample mean"], beta=lambda t: 1.0, beta_schedule=ramp(30), beta_max=1.0
    )
    (f,) = [f for f in found if f.code == "beta-schedule"]
    assert "applied constant at 1" in f.message


def test_doctor_an_applied_schedule_is_silent():
    found = train_small(
        FORMULAS["per-sample mean"], beta=ramp(10), beta_schedule=ramp(10), beta_max=1.0
    )
    assert "beta-schedule" not in vae_codes(found)


def test_doctor_a_warm_up_longer_than_the_training_fires():
    schedule = ramp(200)
    found = train_small(
        FORMULAS["per-sample mean"], beta=schedule, beta_schedule=schedule, beta_max=1.0
    )
    (f,) = [f for f in found if f.code == "beta-schedule"]
    assert "β reached 0.095 of its maximum 1" in f.message
    assert "does not follow" not in f.message


def test_doctor_a_schedule_on_a_scalar_loss_is_not_checked():
    torch.manual_seed(0)
    model = SmallVAE()
    x = torch.randn(16, 8)
    with Doctor(model, attribute_every=0, beta_schedule=ramp(5)) as doctor:
        for _ in range(3):
            out = model(x)
            loss = ((out["reconstruction"] - x) ** 2).sum(1).mean()
            doctor.step(out, loss, x)
            loss.backward()
    reasons = {c.code: c.reason for c in doctor.findings().not_checked}
    assert "could not be measured" in reasons["beta-schedule"]
    assert "one scalar" in reasons["kl-formula"]


def test_doctor_kl_term_names_the_term_to_audit():
    torch.manual_seed(0)
    model = SmallVAE()
    x = torch.randn(16, 8)
    with Doctor(model, attribute_every=0, kl_term="prior") as doctor:
        for _ in range(4):
            out = model(x)
            prior = 2 * kl_elements(out).sum(1).mean()
            doctor.step(
                out, {"recon": ((out["reconstruction"] - x) ** 2).mean(), "prior": prior}, x
            )
    (f,) = [f for f in doctor.findings() if f.code == "kl-formula"]
    assert f.where == "run:prior"


def test_doctor_collapse_onset_under_a_beta_ramp():
    """β held at 0.01 for 20 steps (the KL grows), then x1.3 a step to 100."""
    found = train_small(
        FORMULAS["per-sample mean"],
        steps=60,
        beta=lambda t: min(100.0, 0.01 * 1.3 ** max(0, t - 20)),
        lr=5e-2,
    )
    (f,) = [f for f in found if f.code == "collapse-onset"]
    assert "β rising" in f.message
    step = f.evidence["step"]
    assert isinstance(step, int) and 20 < step < 60


def test_doctor_memory_is_bounded():
    from meaning_transform.diagnostics.doctor import VAE_MAX_STEPS

    torch.manual_seed(0)
    model = SmallVAE()
    with torch.no_grad():
        out = model(torch.randn(4, 8))
    roles = {"mu": out["mu"], "log_var": out["log_var"]}
    kl = float(kl_elements(out).sum(1).mean())
    n = 2 * VAE_MAX_STEPS + 3
    doctor = Doctor(model, attribute_every=0)
    for step in range(n):
        doctor.vae.record(step, roles, {"terms": {}}, math.nan, {"kl": kl})
    ev = doctor.vae.evidence()
    assert len(ev.steps) <= VAE_MAX_STEPS + 1
    assert ev.steps_seen == n
    assert ev.steps[-1].step == n - 1  # the last step is always kept
    assert ev.stride == 4
    gaps = {b.step - a.step for a, b in zip(ev.steps[:-2], ev.steps[1:-1])}
    assert gaps == {ev.stride}  # evenly spaced


def test_rules_run_with_the_rest():
    v = vae(RISING, term=lambda i, a: -a, weight=lambda i: 0.1)
    assert "kl-formula" in {f.code for f in evaluate(run(v))}


# ---- anneal-demo declares its schedule: a user loss that ignores β is found ------------------


def _user_loss(honours: bool) -> Callable[..., dict[str, Tensor]]:
    def loss(recon_x: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, beta: float = 1.0):
        recon = ((recon_x - x) ** 2).sum(1).mean()
        kld = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(1).mean()
        return {"loss": recon + (beta if honours else 1.0) * kld, "recon": recon, "kl": kld}

    return loss


@pytest.mark.parametrize("honours", [True, False], ids=["honours-beta", "ignores-beta"])
def test_anneal_demo_finds_a_user_loss_that_ignores_its_beta_keyword(honours):
    from dataclasses import replace

    from meaning_transform.adapters import LossStep, UserLoss
    from meaning_transform.studies.anneal import run_anneal
    from meaning_transform.studies.report import AnnealConfig
    from meaning_transform.training import BetaSchedule
    from tests.studies.reports import pipeline

    def factory(model: nn.Module) -> nn.Module:
        return LossStep(UserLoss(_user_loss(honours), {"beta": 0.0}), beta_kwarg="beta")

    base = replace(pipeline("healthy", epochs=5), loss_factory=factory)
    report = run_anneal(base, BetaSchedule("linear"), AnnealConfig(epochs=5, device="cpu"))
    found = [f for f in report.findings if f.code == "beta-schedule"]
    if honours:
        assert found == []
    else:
        (f,) = found
        assert f.severity == "warning"
        assert "applied constant at 1" in f.message
