"""Same seed, same arguments: byte-identical JSON, also with a user model drawing noise
from the global RNG (``torch.randn_like``), which mtx seeds before every run."""

from __future__ import annotations

import textwrap

MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn

    class VAE(nn.Module):
        def __init__(self, input_dim=10):
            super().__init__()
            self.enc = nn.Linear(input_dim, 8)
            self.mu = nn.Linear(8, 2)
            self.lv = nn.Linear(8, 2)
            self.dec = nn.Linear(2, input_dim)

        def forward(self, x):
            h = torch.relu(self.enc(x))
            mu, lv = self.mu(h), self.lv(h)
            z = mu + torch.exp(0.5 * lv) * torch.randn_like(mu)
            return {"reconstruction": torch.sigmoid(self.dec(z)), "mu": mu, "log_var": lv, "z": z}

    def build(input_dim=10):
        return VAE(input_dim)
    """
)


def test_a_user_model_using_randn_like_gives_byte_identical_json(mtx, tmp_path):
    import torch

    path = tmp_path / "randn_vae.py"
    path.write_text(MODEL)
    args = ("check-grads", "--epochs", "2", "--json", "--model", f"{path}:build")
    torch.manual_seed(123)  # whatever the caller's global RNG state ...
    first = mtx(*args)
    torch.randn(1000)  # ... and however far it has moved
    second = mtx(*args)
    assert first.exit_code == second.exit_code == 0, first.stderr
    assert first.stdout == second.stdout
    other_seed = mtx(*args, "--seed", "1")
    assert other_seed.stdout != first.stdout
