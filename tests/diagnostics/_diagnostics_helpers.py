"""A tiny VAE-like model and inline loss terms, so these tests need no other package module."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TinyVAE(nn.Module):
    """forward(x) -> {"reconstruction", "mu", "log_var", "z"}; ``unused`` is never called."""

    def __init__(self, d: int = 6, h: int = 8, z: int = 3, batch_norm: bool = True) -> None:
        super().__init__()
        norm: nn.Module = nn.BatchNorm1d(h) if batch_norm else nn.Identity()
        self.encoder = nn.Sequential(nn.Linear(d, h), norm, nn.ReLU())
        self.mu = nn.Linear(h, z)
        self.log_var = nn.Linear(h, z)
        self.decoder = nn.Sequential(nn.Linear(z, h), nn.ReLU(), nn.Linear(h, d))
        self.unused = nn.Linear(2, 2)
        # Fixed noise so that repeated forwards give the same graph.
        self.register_buffer("eps", torch.randn(64, z, generator=torch.Generator().manual_seed(7)))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.encoder(x)  # (B, H)
        mu, log_var = self.mu(h), self.log_var(h)  # (B, Z)
        z = mu + self.eps[: x.shape[0]] * (0.5 * log_var).exp()  # (B, Z)
        return {"reconstruction": self.decoder(z), "mu": mu, "log_var": log_var, "z": z}


def loss_terms(out: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
    rec, mu, lv = out["reconstruction"], out["mu"], out["log_var"]
    return {
        "recon": ((rec - x) ** 2).sum(1).mean(),
        "kl": (0.5 * (lv.exp() + mu**2 - 1 - lv)).sum(1).mean(),
    }
