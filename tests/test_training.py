from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from meaning_transform.data import synthetic_agent_states
from meaning_transform.losses import CombinedLoss
from meaning_transform.model import MeaningVAE
from meaning_transform.training import (
    BetaSchedule,
    DeviceError,
    TrainConfig,
    resolve_device,
    train,
)


def _setup(seed: int = 0):
    data = synthetic_agent_states(64, seed=seed)
    model = MeaningVAE(seed=seed, output_activation="sigmoid")
    loss = CombinedLoss(kl_loss_weight=0.1, on_non_finite="record")
    return model, loss, data


def test_records_hold_raw_weighted_and_total():
    model, loss, data = _setup()
    result = train(model, loss, data, TrainConfig(epochs=3, batch_size=16))
    assert len(result.records) == 3
    rec = result.records[-1]
    assert rec.steps == 4
    for name in ("reconstruction", "kl", "semantic"):
        assert rec.weighted[name] == pytest.approx(rec.weights[name] * rec.raw[name])
    assert rec.total == pytest.approx(sum(rec.weighted.values()), rel=1e-5)
    assert rec.grad_norm > 0 and rec.grad_norm_max >= rec.grad_norm
    assert result.reduction["reconstruction"] == "mean"


def test_training_reduces_the_loss():
    model, loss, data = _setup()
    result = train(model, loss, data, TrainConfig(epochs=15, lr=1e-2))
    assert result.records[-1].total < result.records[0].total


def test_grad_norm_is_measured_before_clipping():
    seen = []

    class Spy:
        def after_backward(self, ctx):
            grads = [p.grad for p in ctx.model.parameters() if p.grad is not None]
            seen.append((ctx.grad_norm, grads))

    model, loss, data = _setup()
    train(model, loss, data, TrainConfig(epochs=1, clip_grad_norm=1e-3), callbacks=[Spy()])
    norm, grads = seen[0]
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert norm > 1e-3  # the reported norm is the one before clipping ...
    assert float(clipped) == pytest.approx(1e-3, rel=1e-3)  # ... the grads were clipped


def test_schedule_sets_the_kl_weight_each_epoch():
    model, loss, data = _setup()
    schedule = BetaSchedule("linear", 0.0, 1.0)
    result = train(model, loss, data, TrainConfig(epochs=5, schedule=schedule))
    assert [r.beta for r in result.records] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert loss.kl_loss_weight == 1.0


def test_same_seed_same_records():
    runs = []
    for _ in range(2):
        model, loss, data = _setup()
        runs.append(train(model, loss, data, TrainConfig(epochs=2, batch_size=16, seed=3)))
    assert runs[0].records == runs[1].records


def test_non_finite_step_is_skipped_and_counted():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = MeaningVAE(seed=0)

        def forward(self, x):
            out = self.inner(x)
            return {**out, "log_var": out["log_var"] * math.nan}

    _, loss, data = _setup()
    model = Broken()
    before = [p.detach().clone() for p in model.parameters()]
    result = train(model, loss, data, TrainConfig(epochs=2))
    assert result.records[0].skipped_steps == 1
    assert any("log_var" in e for e in result.records[0].non_finite)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_device_resolution():
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="not available"):
            resolve_device("cuda")


@pytest.mark.parametrize(
    "kwargs", [{"epochs": 0}, {"batch_size": 0}, {"lr": -1.0}, {"clip_grad_norm": 0.0}]
)
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        TrainConfig(**kwargs)


def test_a_last_batch_of_one_joins_the_previous_batch():
    from meaning_transform.training import _batches

    batches = _batches(129, 64, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [64, 65]
    assert sorted(torch.cat(batches).tolist()) == list(range(129))
    model, loss, _ = _setup()
    data = synthetic_agent_states(129, seed=0)
    result = train(model, loss, data, TrainConfig(epochs=1, batch_size=64))
    assert result.records[0].steps == 2
