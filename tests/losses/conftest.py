"""Shared test data: typical agent states in the 10-feature layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


def make_agent_batch(
    n: int = 64, seed: int = 0, noise: float = 0.05, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, x_reconstructed): typical agent states and a slightly noisy reconstruction.

    Health covers dead (< 0.1), threatened (< 0.3 with a target) and healthy agents, so
    every semantic feature has samples near its threshold.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, 10, dtype=dtype)
    x[:, 0:2] = torch.rand(n, 2, generator=g, dtype=dtype)
    health = torch.rand(n, generator=g, dtype=dtype)
    health[:8] = torch.linspace(0.0, 0.09, 8, dtype=dtype)  # dead
    health[8:16] = torch.linspace(0.11, 0.29, 8, dtype=dtype)  # alive, low health
    x[:, 2] = health
    has_target = (torch.rand(n, generator=g) < 0.5).to(dtype)
    has_target[8:16] = 1.0  # low health with a target: threatened
    x[:, 3] = has_target
    x[:, 4] = torch.rand(n, generator=g, dtype=dtype)
    roles = torch.randint(0, 5, (n,), generator=g)
    x[:, 5:10] = F.one_hot(roles, 5).to(dtype)
    x_rec = x + noise * torch.randn(n, 10, generator=g, dtype=dtype)
    return x, x_rec


@pytest.fixture
def agent_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return make_agent_batch()


@pytest.fixture
def make_agent():
    """The :func:`make_agent_batch` factory, for other sizes, seeds and dtypes."""
    return make_agent_batch
