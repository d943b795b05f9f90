import pytest
import torch
from torch.distributions import Normal, kl_divergence

from meaning_transform.diagnostics import encode_means, latent_health


def test_active_units_on_constructed_means():
    g = torch.Generator().manual_seed(0)
    n = 200
    mu = torch.stack(
        [
            torch.full((n,), 0.5),  # constant: inactive
            torch.zeros(n),  # constant: inactive
            torch.randn(n, generator=g),  # varies: active
            0.05 * torch.randn(n, generator=g),  # Var ~ 0.0025 < 0.01: inactive
            0.5 * torch.randn(n, generator=g),  # Var ~ 0.25: active
        ],
        dim=1,
    )  # (N, Z)
    health = latent_health(mu, torch.zeros_like(mu))
    assert health.active == (False, False, True, False, True)
    assert health.active_units == 2
    for j in range(5):
        assert health.activity[j] == pytest.approx(mu[:, j].var().item(), rel=1e-5, abs=1e-12)
    assert not health.collapsed


def test_kl_per_dim_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(64, 4, generator=g, dtype=torch.float64)
    log_var = 2 * torch.randn(64, 4, generator=g, dtype=torch.float64)
    health = latent_health(mu, log_var)
    expected = kl_divergence(Normal(mu, (0.5 * log_var).exp()), Normal(0.0, 1.0)).mean(0)
    assert health.kl_per_dim == pytest.approx(expected.tolist(), rel=1e-6)
    assert health.kl_total == pytest.approx(expected.sum().item(), rel=1e-6)


def test_free_bits_on_a_hand_example():
    mu = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    health = latent_health(mu, torch.zeros(2, 3), free_bits_lambda=0.6)
    assert health.kl_per_dim == pytest.approx((0.0, 0.5, 2.0))  # 0.5 * mu^2
    assert health.free_bits == pytest.approx(0.6 + 0.6 + 2.0)  # max(lambda, KL_j) summed
    assert health.kl_total == pytest.approx(2.5)
    assert health.collapsed_dims == (0,)
    assert health.collapsed  # mu is the same for both samples: no active unit


def test_collapsed_when_posterior_is_the_prior():
    g = torch.Generator().manual_seed(2)
    mu = 1e-3 * torch.randn(128, 6, generator=g)
    log_var = 1e-3 * torch.randn(128, 6, generator=g)
    health = latent_health(mu, log_var)
    assert health.collapsed
    assert health.collapsed_dims == tuple(range(6)) and health.active_units == 0


def test_healthy_latent_is_not_collapsed():
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(128, 6, generator=g)
    health = latent_health(mu, torch.full((128, 6), -2.0))
    assert not health.collapsed and health.collapsed_dims == () and health.active_units == 6


def test_log_var_is_clamped_and_non_finite_counted():
    mu = torch.zeros(4, 2)
    log_var = torch.tensor([[500.0, 0.0]] * 4)
    health = latent_health(mu, log_var)
    assert all(torch.isfinite(torch.tensor(health.kl_per_dim)))
    assert health.non_finite == 0
    mu[0, 0] = float("nan")
    assert latent_health(mu, log_var).non_finite == 1


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"\(4, 2\) and \(4, 3\)"):
        latent_health(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="at least 2"):
        latent_health(torch.zeros(1, 2), torch.zeros(1, 2))


def test_encode_means_in_eval_mode_and_restores_mode(model, x):
    model.train()
    mu, log_var = encode_means(model, x, batch_size=5)
    assert model.training and model.encoder[1].training
    assert mu.shape == (32, 3) and not mu.requires_grad
    model.eval()
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(mu, out["mu"])
    torch.testing.assert_close(log_var, out["log_var"])


def test_reconstruction_gain_against_predicting_the_mean():
    from meaning_transform.diagnostics.latent import reconstruction_gain

    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 5, generator=g)
    assert reconstruction_gain(x, x) == pytest.approx(1.0)
    assert reconstruction_gain(x.mean(0).expand_as(x), x) == pytest.approx(0.0, abs=1e-12)
    half = x.mean(0) + 0.5 * (x - x.mean(0))  # leaves a quarter of the variance
    assert reconstruction_gain(half, x) == pytest.approx(0.75)
    assert reconstruction_gain(x.reshape(64, 5, 1), x) == pytest.approx(1.0)  # same entries
    assert reconstruction_gain(x[:, :4], x) is None  # not shaped like x
    assert reconstruction_gain(torch.full_like(x, float("nan")), x) is None
    assert reconstruction_gain(x, torch.ones_like(x)) is None  # x does not vary


def test_measure_latent_adds_the_reconstruction_gain_in_eval_mode(model, x):
    from meaning_transform.diagnostics.latent import measure_latent, reconstruction_gain

    model.train()
    health = measure_latent(model, x)  # one batch: TinyVAE's fixed noise is per row
    assert model.training
    model.eval()
    with torch.no_grad():
        expected = reconstruction_gain(model(x)["reconstruction"], x)
    assert health.recon_gain == pytest.approx(expected)
    assert health.as_dict()["recon_gain"] == health.recon_gain


def test_latent_of_the_dead_units_pass_equals_measure_latent(model, x):
    from meaning_transform.diagnostics.activations import dead_units
    from meaning_transform.diagnostics.latent import latent_of_outputs, measure_latent

    outputs: list = []
    fractions = dead_units(model, x, batch_size=5, outputs=outputs)  # several batches
    assert [rows.shape[0] for rows, _ in outputs] == [len(r) for r in x.split(5)]
    assert fractions == dead_units(model, x, batch_size=5)  # collecting changes nothing
    shared = latent_of_outputs(outputs, x)
    assert shared == measure_latent(model, x, batch_size=5)
    assert shared.recon_gain is not None
