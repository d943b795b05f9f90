"""The Python API: attach the Doctor to your own loop and get the same findings."""

from __future__ import annotations

import torch
from torch import nn

from meaning_transform.data import synthetic_agent_states
from meaning_transform.diagnostics.attribution import AttributionSummary
from meaning_transform.diagnostics.doctor import Doctor
from meaning_transform.diagnostics.schedule import ATTRIBUTION_SCHEDULE
from meaning_transform.losses import CombinedLoss


class MyVAE(nn.Module):
    """A user's own VAE, not MeaningVAE. ``frozen`` reproduces the original noise bug."""

    def __init__(self, frozen: bool = False) -> None:
        super().__init__()
        self.frozen = frozen
        self.enc = nn.Sequential(nn.Linear(10, 32), nn.ReLU())
        self.mu = nn.Linear(32, 3)
        self.log_var = nn.Linear(32, 3)
        self.dec = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Linear(32, 10), nn.Sigmoid())
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, x):
        h = self.enc(x)
        mu, log_var = self.mu(h), self.log_var(h)
        if self.frozen:
            self.gen.manual_seed(0)
        eps = torch.randn(mu.shape, generator=self.gen)
        z = mu + torch.exp(0.5 * log_var) * eps
        return {"reconstruction": self.dec(z), "mu": mu, "log_var": log_var, "z": z}


def _train(model, loss_fn, steps=12):
    torch.manual_seed(0)
    x = synthetic_agent_states(128, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with Doctor(model, where="mine") as doctor:
        for _ in range(steps):
            out = model(x)
            result = loss_fn(out, x)
            doctor.step(out, result, x)
            opt.zero_grad()
            result["loss"].backward()
            opt.step()
        assert doctor.hooks.active
    assert not doctor.hooks.active  # hooks removed on exit
    return doctor, x


def test_healthy_user_loop_has_no_warnings():
    doctor, x = _train(MyVAE(), CombinedLoss(kl_loss_weight=0.1))
    findings = doctor.findings(data=x)
    assert [f.code for f in findings if f.severity != "info"] == []
    assert len(doctor.hooks.history) == 12  # one gradient snapshot per backward
    summary = doctor.summary()
    assert isinstance(summary, AttributionSummary)
    assert summary.steps_attributed == ATTRIBUTION_SCHEDULE.count(12) == 2  # steps 0, 4
    assert {"reconstruction", "kl", "semantic"} <= set(summary.norm)


def test_summary_is_none_before_any_attribution():
    with Doctor(MyVAE()) as doctor:
        assert doctor.summary() is None


def test_user_loop_finds_frozen_noise_and_hard_semantics():
    doctor, x = _train(MyVAE(frozen=True), CombinedLoss(semantic_mode="hard"))
    codes = {f.code for f in doctor.findings(data=x)}
    assert {"frozen-noise", "no-grad-path"} <= codes
    where = {f.where for f in doctor.findings(data=x) if f.code == "no-grad-path"}
    assert {"mine:semantic/is_alive", "mine:semantic/role"} <= where


def test_hooks_stop_recording_after_exit():
    doctor, x = _train(MyVAE(), CombinedLoss())
    model = doctor.model
    before = len(doctor.hooks.history)
    CombinedLoss()(model(x), x)["loss"].backward()
    assert len(doctor.hooks.history) == before


def test_attribution_matches_direct_autograd():
    model = MyVAE()
    x = synthetic_agent_states(64, seed=2)
    loss_fn = CombinedLoss(kl_loss_weight=0.3, semantic_loss_weight=0.5)
    doctor = Doctor(model, semantic_features=False)
    out = model(x)
    result = loss_fn(out, x)
    doctor.step(out, result, x)
    att = doctor.attributions[-1]
    params = [p for p in model.parameters() if p.requires_grad]
    for name in ("reconstruction", "kl", "semantic"):
        grads = torch.autograd.grad(
            result["terms"][name], params, retain_graph=True, allow_unused=True
        )
        flat = torch.cat([g.flatten() for g in grads if g is not None])
        assert abs(att.norm[name] - float(flat.norm())) <= 1e-5 * float(flat.norm())
    doctor.close()
