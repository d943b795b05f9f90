"""The original write-up's usage snippets, run against meaning_transform.losses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meaning_transform.losses import CombinedLoss, beta_annealing  # the write-up's import


class TinyVAE(nn.Module):
    """Just enough of a VAE to produce the model_output dict the losses expect."""

    def __init__(self, input_dim: int = 10, latent_dim: int = 4) -> None:
        super().__init__()
        self.encoder = nn.Linear(input_dim, 2 * latent_dim)
        self.decoder = nn.Linear(latent_dim, input_dim)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mu, log_var = self.encoder(x).chunk(2, dim=1)  # (B, Z) each
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)  # (B, Z)
        return {"reconstruction": self.decoder(z), "mu": mu, "log_var": log_var, "z": z}


def _setup(make_agent):
    torch.manual_seed(0)
    x, _ = make_agent(n=32)
    model = TinyVAE()
    return x, model, torch.optim.SGD(model.parameters(), lr=0.01)


def test_basic_usage_snippet_runs_and_trains(make_agent) -> None:
    x, model, optimizer = _setup(make_agent)
    epochs = 5
    betas, losses = [], []
    start = [p.detach().clone() for p in model.parameters()]
    for epoch in range(epochs):
        beta = beta_annealing(
            epoch=epoch,
            max_epochs=epochs,
            min_beta=0.0001,
            max_beta=1.0,
            schedule_type="sigmoid",
        )
        loss_fn = CombinedLoss(
            recon_loss_weight=1.0,
            kl_loss_weight=beta,
            semantic_loss_weight=0.5,
        )
        result = loss_fn(model(x), x)
        optimizer.zero_grad()
        result["loss"].backward()
        optimizer.step()
        betas.append(beta)
        losses.append(result["loss"].item())
    assert betas[0] == 0.0001 and betas[-1] == 1.0
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(start, model.parameters(), strict=True))


def test_modify_existing_experiment_snippet(make_agent) -> None:
    x, model, optimizer = _setup(make_agent)

    class Experiment:
        def __init__(self) -> None:
            self.loss_fn = CombinedLoss()
            self.seen_weights: list[float] = []

        def train(self, epochs: int = 50, batch_size: int = 64) -> None:
            for epoch in range(epochs):
                beta = beta_annealing(epoch, epochs, min_beta=0.0001, max_beta=1.0)
                self.loss_fn.kl_loss_weight = beta
                result = self.loss_fn(model(x[:batch_size]), x[:batch_size])
                optimizer.zero_grad()
                result["loss"].backward()
                optimizer.step()
                self.seen_weights.append(result["weights"]["kl"])

    experiment = Experiment()
    experiment.train(epochs=4, batch_size=16)
    want = [0.0001, 0.0001 + 0.9999 / 3, 0.0001 + 2 * 0.9999 / 3, 1.0]
    assert experiment.seen_weights == pytest.approx(want, rel=1e-12)
    assert experiment.seen_weights[0] == 0.0001 and experiment.seen_weights[-1] == 1.0
