"""The train-mode / eval-mode probe: what differs, by how much, and why."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from meaning_transform.diagnostics.probe import mode_probe, why_modes_differ
from meaning_transform.diagnostics.tensor_stats import TensorStats, tensor_stats


class _VAE(nn.Module):
    """Encoder with optional batch norm / dropout; z = mu + sigma * eps in train mode."""

    def __init__(self, batch_norm: bool, dropout: bool, noise: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(4, 6)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(6))
        if dropout:
            layers.append(nn.Dropout(0.5))
        self.encoder = nn.Sequential(*layers)
        self.mu, self.log_var = nn.Linear(6, 2), nn.Linear(6, 2)
        self.decoder = nn.Linear(2, 4)
        self.noise = noise
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.encoder(x)  # (B, H)
        mu, log_var = self.mu(h), self.log_var(h)  # (B, Z)
        z = mu
        if self.training and self.noise:
            z = mu + (0.5 * log_var).exp() * torch.randn(mu.shape, generator=self.gen)
        return {"reconstruction": self.decoder(z), "mu": mu, "log_var": log_var, "z": z}


def _loss(out: dict[str, Tensor], x: Tensor) -> dict[str, object]:
    recon = ((out["reconstruction"] - x) ** 2).sum(1).mean()
    kl = (0.5 * (out["log_var"].exp() + out["mu"] ** 2 - 1 - out["log_var"])).sum(1).mean()
    return {"loss": recon + kl, "terms": {"reconstruction": recon, "kl": kl, "kl/part": kl}}


@pytest.fixture
def x() -> Tensor:
    return torch.randn(16, 4, generator=torch.Generator().manual_seed(1))


def _probe(x: Tensor, **kw: bool):
    torch.manual_seed(0)
    return mode_probe(_VAE(**kw), _loss, x)


def test_batch_norm_and_noise_make_the_modes_differ(x):
    probe = _probe(x, batch_norm=True, dropout=False)
    assert probe.n_samples == 16 and probe.differ
    assert "z = mu" in probe.why and "batch norm" in probe.why and "dropout" not in probe.why
    assert set(probe.max_abs_difference) == {"reconstruction", "mu", "log_var", "z"}
    assert probe.max_abs_difference["mu"] > 0  # batch norm changes mu itself
    assert probe.eval.tensors["z"] == probe.eval.tensors["mu"]
    # The loss's own term names, sub-terms left out, then the total.
    assert list(probe.train.loss) == ["reconstruction", "kl", "total"]
    for name, diff in probe.loss_difference.items():
        assert diff == pytest.approx(probe.train.loss[name] - probe.eval.loss[name])


def test_noise_only_leaves_mu_unchanged(x):
    probe = _probe(x, batch_norm=False, dropout=False)
    assert probe.max_abs_difference["mu"] == 0.0 and probe.max_abs_difference["z"] > 0
    assert "z = mu" in probe.why and "batch norm" not in probe.why


def test_dropout_is_named(x):
    assert "dropout zeroes random units" in _probe(x, batch_norm=False, dropout=True).why


def test_nothing_stochastic_means_the_modes_agree(x):
    probe = _probe(x, batch_norm=False, dropout=False, noise=False)
    assert not probe.differ
    assert set(probe.max_abs_difference.values()) == {0.0}
    assert probe.why.startswith("This model has no noise, batch norm or dropout")


def test_why_names_each_cause_in_train_and_eval_halves():
    model = nn.Sequential(nn.BatchNorm1d(2), nn.Dropout())
    why = why_modes_differ(model, samples_noise=True)
    train, eval_ = why.split(";")
    assert "fresh noise" in train and "batch's own statistics" in train and "zeroes" in train
    assert "z = mu" in eval_ and "running statistics" in eval_ and "dropout is off" in eval_


def test_tensor_stats_are_population_statistics_in_order():
    stats = tensor_stats({"b": torch.tensor([1.0, 3.0]), "a": torch.tensor([[2.0]])})
    assert list(stats) == ["b", "a"]
    assert stats["b"] == TensorStats(mean=2.0, std=1.0, min=1.0, max=3.0)
    assert stats["a"].std == 0.0
