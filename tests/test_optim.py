"""meaning_transform.optim.Adam: torch.optim.Adam's numbers without torch._dynamo."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from meaning_transform.model import MeaningVAE
from meaning_transform.optim import Adam


def _train_both(make_model, steps: int, **kwargs: float) -> tuple[nn.Module, nn.Module]:
    """The same model trained with torch.optim.Adam and with ours, on the same batches."""
    ours, theirs = make_model(), make_model()
    theirs.load_state_dict(ours.state_dict())
    opt_ours = Adam(ours.parameters(), **kwargs)
    opt_theirs = torch.optim.Adam(theirs.parameters(), **kwargs)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.rand(32, 10, generator=gen)
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss = ((out["reconstruction"] - x) ** 2).mean() + out["mu"].pow(2).mean()
            loss.backward()
            opt.step()
    return ours, theirs


def _vae() -> nn.Module:
    return MeaningVAE(input_dim=10, latent_dim=4, hidden_dims=(16, 8), seed=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"lr": 3e-3, "weight_decay": 1e-2},
        {"lr": 1e-2, "betas": (0.5, 0.9), "eps": 1e-6},
    ],
)
def test_weights_are_bit_identical_to_torch_adam(kwargs):
    ours, theirs = _train_both(_vae, steps=25, **kwargs)
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_parameter_without_gradient_is_left_alone_as_torch_does():
    def make() -> nn.Module:
        model = _vae()
        model.unused = nn.Parameter(torch.ones(3))  # never reached by the loss
        return model

    ours, theirs = _train_both(make, steps=5, weight_decay=0.1)
    assert torch.equal(ours.unused, torch.ones(3))
    assert torch.equal(ours.unused, theirs.unused)


def test_frozen_parameters_do_not_move():
    model = _vae()
    target = next(model.parameters())
    target.requires_grad_(False)
    before = target.detach().clone()
    opt = Adam(model.parameters(), lr=0.1)
    x = torch.rand(8, 10)
    out = model(x)
    ((out["reconstruction"] - x) ** 2).mean().backward()
    opt.step()
    assert target.grad is None
    assert torch.equal(target, before)


def test_zero_grad_sets_to_none_or_zeros():
    p = nn.Parameter(torch.ones(3))
    opt = Adam([p])
    (p * 2).sum().backward()
    opt.zero_grad(set_to_none=False)
    assert p.grad is not None and torch.equal(p.grad, torch.zeros(3))
    opt.zero_grad()
    assert p.grad is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "learning rate"),
        ({"eps": -1e-8}, "epsilon"),
        ({"betas": (1.0, 0.999)}, "beta parameter at index 0"),
        ({"betas": (0.9, -0.1)}, "beta parameter at index 1"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_invalid_hyperparameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Adam([nn.Parameter(torch.ones(2))], **kwargs)


def test_empty_duplicate_sparse_and_complex_parameters_are_refused():
    p = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="empty"):
        Adam([])
    with pytest.raises(ValueError, match="more than once"):
        Adam([p, p])
    with pytest.raises(TypeError, match="complex"):
        Adam([nn.Parameter(torch.ones(2, dtype=torch.complex64))])
    emb = nn.Embedding(4, 2, sparse=True)
    opt = Adam(emb.parameters())
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_training_loop_does_not_import_torch_dynamo():
    """The reason Adam exists: torch.optim's first optimizer imports torch._dynamo (~1 s)."""
    code = (
        "import sys\n"
        "from meaning_transform.data import synthetic_agent_states\n"
        "from meaning_transform.losses import CombinedLoss\n"
        "from meaning_transform.model import MeaningVAE\n"
        "from meaning_transform.training import TrainConfig, train\n"
        "x = synthetic_agent_states(32, seed=0)\n"
        "model = MeaningVAE(input_dim=10, latent_dim=4, seed=0)\n"
        "train(model, CombinedLoss(), x, TrainConfig(epochs=2, batch_size=16))\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"
