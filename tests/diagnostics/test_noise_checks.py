"""The noise checks: frozen-noise and noise-scale on hand-built evidence at their edges,
the recorder and the two-pass probe on small models, and a few whole runs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from meaning_transform.data import synthetic_agent_states
from meaning_transform.diagnostics.doctor import Doctor
from meaning_transform.diagnostics.noise import (
    NOISE_PROBE,
    NoiseRecorder,
    NoiseRepeats,
    NoiseScale,
    two_passes,
)
from meaning_transform.diagnostics.rules import (
    RunEvidence,
    frozen_noise,
    noise_scale,
    noise_verdict,
    not_checked,
)
from meaning_transform.diagnostics.thresholds import (
    NOISE_EXPONENT_MAX_SE,
    NOISE_EXPONENT_TOLERANCE,
    NOISE_MEAN_MAX,
    NOISE_MIN_SAMPLES,
    NOISE_STD_HIGH,
    NOISE_STD_LOW,
)
from meaning_transform.losses import CombinedLoss
from meaning_transform.model import MeaningVAE
from meaning_transform.training import TrainConfig, train

# ---- frozen-noise on hand-built evidence ----


def repeats_evidence(pairs: int, repeated: int, probed: int = 0) -> RunEvidence:
    return RunEvidence(where="run", noise_repeats=NoiseRepeats(pairs, repeated, probed))


@pytest.mark.parametrize(
    ("pairs", "repeated", "verdict", "severity"),
    [
        (10, 10, "frozen", "error"),  # every pair the same
        (10, 9, "repeating", "warning"),  # one pair differs: not frozen, not fresh either
        (10, 5, "repeating", "warning"),  # half differ: "most" is more than half
        (10, 4, "fresh", None),  # most differ
        (1, 1, "frozen", "error"),  # one comparable pair is enough
        (1, 0, "fresh", None),
    ],
)
def test_frozen_noise_is_decided_over_all_pairs(pairs, repeated, verdict, severity):
    ev = repeats_evidence(pairs, repeated)
    assert noise_verdict(ev.noise_repeats) == verdict
    found = frozen_noise(ev)
    assert [f.severity for f in found] == ([severity] if severity else [])
    if found:
        assert found[0].evidence == {"pairs": pairs, "repeated": repeated, "probed": 0}
        assert f"{repeated} of {pairs}" in found[0].message


def test_frozen_noise_from_two_passes_says_so():
    (found,) = frozen_noise(repeats_evidence(5, 5, probed=5))
    assert "two training-mode passes" in found.message and "5 of 5" in found.message


def test_frozen_noise_not_checked_without_pairs():
    for ev in (RunEvidence(where="run"), repeats_evidence(0, 0)):
        assert frozen_noise(ev) == []
        assert "frozen-noise" in {c.code for c in not_checked(ev)}
    assert "frozen-noise" not in {c.code for c in not_checked(repeats_evidence(3, 0))}


# ---- noise-scale on hand-built evidence ----


def scale(**kw) -> NoiseScale:
    values = {
        "samples": 5000,
        "steps": 10,
        "mean": 0.0,
        "std": 1.0,
        "log_var_std": 0.4,
        "exponent": 0.5,
        "exponent_se": 0.02,
        "dropped": 0,
    }
    return NoiseScale(**{**values, **kw})


def scale_evidence(repeats: NoiseRepeats | None = None, **kw) -> RunEvidence:
    repeats = repeats or NoiseRepeats(9, 0, 0)
    return RunEvidence(where="run", noise_repeats=repeats, noise_scale=scale(**kw))


def _noise_not_checked(ev: RunEvidence) -> str | None:
    return {c.code: c.reason for c in not_checked(ev)}.get("noise-scale")


@pytest.mark.parametrize(
    ("field", "value", "fires"),
    [
        ("std", NOISE_STD_LOW * 0.99, True),
        ("std", NOISE_STD_LOW, False),
        ("std", NOISE_STD_HIGH * 1.01, True),
        ("std", NOISE_STD_HIGH, False),
        ("mean", NOISE_MEAN_MAX * 1.01, True),
        ("mean", -NOISE_MEAN_MAX * 1.01, True),
        ("mean", NOISE_MEAN_MAX * 0.99, False),
        ("exponent", 0.5 + NOISE_EXPONENT_TOLERANCE * 1.01, True),
        ("exponent", 0.5 + NOISE_EXPONENT_TOLERANCE * 0.99, False),
        ("exponent", 0.5 - NOISE_EXPONENT_TOLERANCE * 1.01, True),
        ("exponent", 0.5 - NOISE_EXPONENT_TOLERANCE * 0.99, False),
    ],
)
def test_noise_scale_edges(field, value, fires):
    ev = scale_evidence(**{field: value})
    found = noise_scale(ev)
    assert bool(found) is fires
    if found:
        assert found[0].severity == "error" and found[0].evidence["samples"] == 5000
    assert _noise_not_checked(ev) is None  # judged either way


def test_noise_scale_names_the_cause():
    (variance,) = noise_scale(scale_evidence(exponent=1.0))
    assert "exp(log_var) (the variance) is used as sigma" in variance.message
    (no_sigma,) = noise_scale(scale_evidence(exponent=0.0))
    assert "sigma is left out" in no_sigma.message
    (tiny,) = noise_scale(scale_evidence(std=0.01))
    assert "std 0.01" in tiny.message and "exp(" not in tiny.message.split(":", 1)[1]


def test_exponent_judged_only_when_measured_well_enough():
    at_edge = scale_evidence(exponent=1.0, exponent_se=NOISE_EXPONENT_MAX_SE)
    assert noise_scale(at_edge) and _noise_not_checked(at_edge) is None
    vague = scale_evidence(exponent=1.0, exponent_se=NOISE_EXPONENT_MAX_SE * 1.01)
    assert noise_scale(vague) == []
    reason = _noise_not_checked(vague)
    assert reason is not None and "log_var varied too little" in reason
    # log_var constant: no slope at all; a constant scale is still caught
    flat = scale_evidence(exponent=math.nan, exponent_se=math.inf, std=0.01)
    assert noise_scale(flat) and _noise_not_checked(flat) is None


def test_noise_scale_needs_enough_samples():
    few = scale_evidence(samples=NOISE_MIN_SAMPLES - 1, std=0.01)
    assert noise_scale(few) == []
    assert str(NOISE_MIN_SAMPLES) in (_noise_not_checked(few) or "")
    assert noise_scale(scale_evidence(samples=NOISE_MIN_SAMPLES, std=0.01))


def test_noise_scale_not_judged_on_repeating_noise():
    frozen = scale_evidence(NoiseRepeats(9, 9, 0), std=0.01)
    assert noise_scale(frozen) == []
    assert "repeats" in (_noise_not_checked(frozen) or "")


def test_noise_scale_not_checked_without_z():
    ev = RunEvidence(where="run", noise_repeats=NoiseRepeats(3, 0, 3))
    assert noise_scale(ev) == []
    assert "z" in (_noise_not_checked(ev) or "")


def test_healthy_noise_is_silent_and_checked():
    ev = scale_evidence()
    assert noise_scale(ev) == [] and _noise_not_checked(ev) is None


# ---- the recorder on hand-made tensors ----


def _draw(b: int, z: int, seed: int) -> Tensor:
    return torch.randn(b, z, generator=torch.Generator().manual_seed(seed))


def _step(eps: Tensor, seed: int, power: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """mu, log_var, z with the given eps: sigma = exp(power * log_var)."""
    mu = _draw(*eps.shape, seed=seed + 100)
    log_var = 0.6 * _draw(*eps.shape, seed=seed + 200) - 0.5
    return mu, log_var, mu + torch.exp(power * log_var) * eps


def test_recorder_pools_the_moments_of_every_step():
    rec = NoiseRecorder()
    draws = [_draw(1024, 4, seed) for seed in range(3)]
    for seed, eps in enumerate(draws):
        assert rec.record(*_step(eps, seed))
    s = rec.scale()
    assert s is not None
    every = torch.cat(draws).flatten().double()
    assert s.samples == every.numel() == 12288 and s.steps == 3 and s.dropped == 0
    assert s.mean == pytest.approx(float(every.mean()), abs=1e-5)
    assert s.std == pytest.approx(float(every.std(correction=0)), rel=1e-5)
    assert abs(s.exponent - 0.5) < 3 * s.exponent_se < 0.1


@pytest.mark.parametrize(("power", "exponent"), [(1.0, 1.0), (0.0, 0.0)])
def test_recorder_measures_how_the_noise_grows_with_log_var(power, exponent):
    rec = NoiseRecorder()
    for seed in range(3):
        rec.record(*_step(_draw(1024, 4, seed), seed, power=power))
    s = rec.scale()
    assert s is not None and abs(s.exponent - exponent) < 3 * s.exponent_se < 0.1


def test_recorder_compares_steps_of_equal_batch_size_only():
    rec = NoiseRecorder()
    full, short = _draw(128, 4, 0), _draw(2, 4, 1)
    for seed in range(4):  # frozen eps, new mu and sigma each step; 128, 2, 128, 2
        rec.record(*_step(full, seed))
        rec.record(*_step(short, seed + 10))
    assert rec.repeats() == NoiseRepeats(pairs=6, repeated=6, probed=0)
    fresh = NoiseRecorder()
    for seed in range(4):
        fresh.record(*_step(_draw(128, 4, seed), seed))
    assert fresh.repeats() == NoiseRepeats(pairs=3, repeated=0, probed=0)


def test_recorder_skips_non_finite_noise_and_missing_z():
    rec = NoiseRecorder()
    mu, log_var, z = _step(_draw(16, 4, 0), 0)
    assert not rec.record(mu, log_var, None)
    assert not rec.record(mu, log_var, z[:, :2])  # not mu's shape
    z_nan = z.clone()
    z_nan[0, 0] = math.nan
    assert rec.record(mu, log_var, z_nan)
    assert rec.record(mu, log_var, z)
    # the NaN entry is left out; the other entries of the two steps are compared
    assert rec.repeats() == NoiseRepeats(pairs=1, repeated=1, probed=0)
    s = rec.scale()
    assert s is not None and s.dropped == 1 and s.samples == 2 * 64 - 1
    assert NOISE_PROBE == 32


def test_noise_lost_in_the_rounding_of_mu_is_not_compared_or_pooled():
    """A run with sigma tiny next to |mu| (lr far too high: log_var -> -40, mu ~ 10) has
    z == mu to the last bit, so eps reads 0 on every step: that is not frozen noise."""
    rec = NoiseRecorder()
    for seed in range(4):
        eps = _draw(16, 4, seed)
        mu = torch.full((16, 4), 10.0)
        log_var = torch.full((16, 4), -40.0)  # sigma 2e-9, below 1e-4 * |mu|
        assert rec.record(mu, log_var, mu + torch.exp(0.5 * log_var) * eps)
    assert rec.repeats() is None
    assert rec.scale() is None
    # at sigma = 1e-3 * |mu| the draws are recovered and compared (fresh: no repeat)
    rec = NoiseRecorder()
    for seed in range(4):
        eps = _draw(16, 4, seed)
        mu = torch.full((16, 4), 10.0)
        log_var = torch.full((16, 4), 2 * math.log(1e-2))
        rec.record(mu, log_var, mu + torch.exp(0.5 * log_var) * eps)
    assert rec.repeats() == NoiseRepeats(pairs=3, repeated=0, probed=0)


def test_probes_are_few_and_spread_over_the_run():
    rec = NoiseRecorder()
    due = []
    for step in range(1, 40):
        rec.record(torch.zeros(2, 1), torch.zeros(2, 1), None)
        if rec.probe_due():
            due.append(step)
    assert due == [1, 2, 3, 5, 9, 17, 33]


# ---- the two-pass probe ----


class NoZ(nn.Module):
    """A user's VAE that draws eps from torch's global RNG and returns no z."""

    def __init__(self, frozen: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.frozen = frozen
        # dropout before the noise: its masks come from the RNG state before any reseeding
        self.enc = nn.Sequential(
            nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(dropout)
        )
        self.mu, self.log_var = nn.Linear(16, 3), nn.Linear(16, 3)
        self.dec = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.enc(x)  # (B, H)
        mu, log_var = self.mu(h), self.log_var(h)  # (B, Z)
        if self.frozen:
            torch.manual_seed(0)  # the original bug, on the global RNG
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)  # (B, Z)
        return {"reconstruction": self.dec(z), "mu": mu, "log_var": log_var}


def _recon(model: nn.Module, x: Tensor):
    return lambda: model(x)["reconstruction"]


def test_two_passes_restore_rng_and_batch_norm_and_keep_the_graph():
    torch.manual_seed(1)
    model, x = NoZ().train(), synthetic_agent_states(32, seed=0)
    out = model(x)  # the real step's forward: its graph is built before the passes
    rng = torch.get_rng_state()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    a, b = two_passes(model, _recon(model, x))
    assert not torch.equal(a, b)  # fresh noise
    assert not a.requires_grad
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        if k in stats:
            assert torch.equal(v, stats[k]), k
    out["reconstruction"].sum().backward()  # still differentiable


def test_two_passes_leave_the_models_own_generator_where_it_was():
    model, x = MeaningVAE(seed=0).train(), synthetic_agent_states(16, seed=0)
    twin = MeaningVAE(seed=0).train()
    two_passes(model, _recon(model, x))
    assert torch.equal(model(x)["z"], twin(x)["z"])


def test_two_passes_switch_dropout_off_and_back_on():
    model, x = NoZ(frozen=True, dropout=0.5).train(), synthetic_agent_states(32, seed=0)
    a, b = two_passes(model, _recon(model, x))
    assert torch.equal(a, b)  # the frozen noise shows through the dropout
    assert all(m.training for m in model.modules())


# ---- whole runs ----


class DropZ(nn.Module):
    """MeaningVAE without z in its output."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = dict(self.inner(x))
        out.pop("z")
        return out


def run(model: nn.Module, n: int = 512, epochs: int = 4, doctor: bool = True):
    x = synthetic_agent_states(n, seed=1)
    config = TrainConfig(epochs=epochs, batch_size=128, seed=0)
    d = Doctor(model, where="run", attribute_every=0)
    with d:
        train(model, CombinedLoss(kl_loss_weight=0.1), x, config, callbacks=(d,) if doctor else ())
    evidence = d.evidence()
    codes = {f.code: f for f in d.findings()}
    skipped = {c.code: c.reason for c in not_checked(evidence)}
    return evidence, codes, skipped


def vae(noise: str = "fresh", z: bool = True) -> nn.Module:
    model = MeaningVAE(seed=0, output_activation="sigmoid", noise=noise)
    return model if z else DropZ(model)


@pytest.mark.parametrize("z", [True, False])
def test_healthy_run_is_silent(z):
    evidence, codes, skipped = run(vae(z=z))
    assert "frozen-noise" not in codes and "noise-scale" not in codes
    assert "frozen-noise" not in skipped
    assert ("noise-scale" in skipped) is not z  # needs z
    assert evidence.noise_repeats is not None and evidence.noise_repeats.repeated == 0


@pytest.mark.parametrize("z", [True, False])
@pytest.mark.parametrize("n", [512, 130])  # 130 at batch 128: a short last batch of 2
def test_frozen_noise_fires_with_and_without_z(z, n):
    evidence, codes, _ = run(vae("frozen", z=z), n=n)
    finding = codes["frozen-noise"]
    assert finding.severity == "error"
    r = evidence.noise_repeats
    assert r is not None and r.repeated == r.pairs >= 2 and (r.probed == r.pairs) is not z


def test_short_last_batch_of_fresh_noise_stays_fresh():
    _, codes, skipped = run(vae(), n=130)
    assert "frozen-noise" not in codes and "frozen-noise" not in skipped


@pytest.mark.parametrize("noise", ["exp_logvar", "scaled"])
def test_scale_bugs_fire_noise_scale(noise):
    evidence, codes, _ = run(vae(noise))
    assert "noise-scale" in codes and "frozen-noise" not in codes
    s = evidence.noise_scale
    assert s is not None
    if noise == "scaled":
        assert s.std == pytest.approx(0.01, rel=0.05)
    else:
        assert abs(s.exponent - 1.0) < 0.15


def test_the_probe_does_not_perturb_training():
    def trained(doctor: bool) -> dict[str, Tensor]:
        torch.manual_seed(0)
        model = NoZ()
        run(model, doctor=doctor)
        return model.state_dict()

    with_probe, without = trained(True), trained(False)
    for k, v in without.items():
        assert torch.equal(with_probe[k], v), k
