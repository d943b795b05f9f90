"""Fixtures for the diagnostics tests (helpers live in _diagnostics_helpers.py)."""

from __future__ import annotations

import pytest
import torch
from _diagnostics_helpers import TinyVAE
from torch import Tensor


@pytest.fixture
def model() -> TinyVAE:
    torch.manual_seed(0)
    return TinyVAE()


@pytest.fixture
def x() -> Tensor:
    return torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
