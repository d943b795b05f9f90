"""Doctor.metrics(): a flat dict of finite floats under stable keys, for any logger; and
Doctor.state_dict(): the evidence as plain data that a resumed run loads back."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from public_vaes import VAE
from torch import Tensor

from meaning_transform.diagnostics.doctor import Doctor

B, D, Z = 32, 64, 4  # pytorch/examples' VAE as tests/public_vaes.py has it


def batch(seed: int) -> Tensor:
    return torch.rand(B, D, generator=torch.Generator().manual_seed(seed))


def dict_loss(recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> dict[str, Tensor]:
    bce = F.binary_cross_entropy(recon, x, reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return {"loss": bce + kld, "BCE": bce, "KLD": kld}


def run(doctor: Doctor, model: VAE, steps: int, nan_at: int | None = None) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for i in range(steps):
        x = batch(i)
        optimizer.zero_grad()
        recon, mu, logvar = model(x)
        loss = dict_loss(recon, x, mu, logvar)
        if i == nan_at:
            loss = {**loss, "loss": loss["loss"] * math.nan}
        doctor.step((recon, mu, logvar), loss, x)
        if i != nan_at:
            loss["loss"].backward()
            optimizer.step()


def trained(steps: int = 4, nan_at: int | None = None) -> Doctor:
    torch.manual_seed(0)
    model = VAE()
    with Doctor(model) as doctor:
        run(doctor, model, steps, nan_at)
    return doctor


STEP_KEYS = {
    "mtx/loss",
    "mtx/term/BCE",
    "mtx/term/KLD",
    "mtx/grad_norm/total",
    "mtx/grad_norm/first_last_ratio",
    "mtx/grad_norm/BCE",
    "mtx/grad_norm/KLD",
    "mtx/kl/analytic",
    "mtx/kl/weight",
    "mtx/noise/mean",
    "mtx/noise/std",
    "mtx/noise/repeated",
}


def test_before_any_step_there_are_no_metrics():
    assert Doctor(VAE()).metrics() == {}


def test_keys_are_stable_and_values_are_plain_finite_floats():
    doctor = trained()
    metrics = doctor.metrics()
    assert set(metrics) == STEP_KEYS
    assert all(type(v) is float and math.isfinite(v) for v in metrics.values())
    assert set(trained(steps=6).metrics()) == STEP_KEYS  # the same keys later on


def test_values_are_the_latest_steps():
    doctor = trained()
    metrics = doctor.metrics()
    assert metrics["mtx/loss"] == doctor.evidence().step_losses[-1]
    assert metrics["mtx/loss"] == pytest.approx(metrics["mtx/term/BCE"] + metrics["mtx/term/KLD"])
    assert metrics["mtx/grad_norm/total"] == doctor.hooks.history[-1].total_norm
    assert metrics["mtx/grad_norm/KLD"] == doctor.attributions[-1].norm["KLD"]
    assert metrics["mtx/kl/weight"] == pytest.approx(1.0, rel=1e-3)  # measured from the total
    assert metrics["mtx/noise/repeated"] == 0.0  # pytorch/examples draws fresh noise
    assert 0.8 < metrics["mtx/noise/std"] < 1.2


def test_a_nan_step_puts_no_nan_in_and_leaves_the_key_out():
    doctor = trained(steps=4, nan_at=3)
    metrics = doctor.metrics()
    assert "mtx/loss" not in metrics  # the latest total is NaN: a finding, not a metric
    assert all(math.isfinite(v) for v in metrics.values())
    assert "mtx/term/BCE" in metrics  # the finite terms are still there
    assert "nonfinite-loss" in {f.code for f in doctor.findings()}


def test_latent_health_needs_data_then_stays():
    doctor = trained()
    assert not any(k.startswith("mtx/kl_dim/") for k in doctor.metrics())
    with_data = doctor.metrics(data=batch(99))
    assert {f"mtx/kl_dim/{j}" for j in range(Z)} <= set(with_data)
    assert 0 <= with_data["mtx/active_units"] <= Z
    assert with_data["mtx/kl_total"] == sum(with_data[f"mtx/kl_dim/{j}"] for j in range(Z))
    assert doctor.metrics()["mtx/active_units"] == with_data["mtx/active_units"]  # kept


def test_findings_with_data_measure_the_latent_that_metrics_report():
    doctor = trained()
    doctor.findings(data=batch(99))
    assert doctor.latent is not None
    assert doctor.metrics()["mtx/active_units"] == doctor.latent.active_units


def test_state_dict_loads_with_weights_only_and_keeps_the_evidence():
    doctor = trained()
    buffer = io.BytesIO()
    torch.save(doctor.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # plain data: no pickled classes
    torch.manual_seed(0)
    model = VAE()
    resumed = Doctor(model)
    resumed.load_state_dict(state)
    assert resumed.steps == doctor.steps == 4
    assert repr(resumed.evidence()) == repr(doctor.evidence())  # NaN != NaN: compare text
    assert resumed.metrics() == {k: v for k, v in doctor.metrics().items() if "/term/" not in k}
    # and it goes on recording where it stopped
    with resumed:
        run(resumed, model, 2)
    assert resumed.steps == 6
    assert [s.step for s in resumed.hooks.history] == list(range(6))
    assert len(resumed.evidence().step_losses) == 6
