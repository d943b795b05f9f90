import math

import pytest
import torch
from _diagnostics_helpers import loss_terms

from meaning_transform.diagnostics import GradientHooks, gradient_snapshot


def step(model, x):
    model.zero_grad(set_to_none=True)
    terms = loss_terms(model(x), x)
    (terms["recon"] + terms["kl"]).backward()


def test_hooks_record_each_backward_and_match_snapshot(model, x):
    with GradientHooks(model) as hooks:
        assert hooks.active and len(hooks.handles) == len(list(model.parameters()))
        step(model, x)
        first = gradient_snapshot(model)
        step(model, x[:16])
        second = gradient_snapshot(model)
    history = hooks.history
    assert [h.step for h in history] == [0, 1]
    for recorded, direct in zip(history, (first, second), strict=True):
        assert recorded.total_norm == pytest.approx(direct.total_norm, rel=1e-6)
        assert recorded.missing == direct.missing == ("unused.weight", "unused.bias")
        for a, b in zip(recorded.params, direct.params, strict=True):
            assert a.name == b.name
            if b.has_grad:
                assert a.norm == pytest.approx(b.norm, rel=1e-6)
                assert a.max == b.max and a.min == b.min
    assert history[0].total_norm != history[1].total_norm


def test_hooks_are_removed_on_exit(model, x):
    with GradientHooks(model) as hooks:
        step(model, x)
    assert not hooks.active and hooks.handles == []
    step(model, x)  # after exit: must not be recorded
    step(model, x)
    assert len(hooks.history) == 1
    for p in model.parameters():
        assert not p._post_accumulate_grad_hooks  # torch's own hook dict is empty again


def test_hooks_removed_even_when_the_block_raises(model, x):
    with pytest.raises(RuntimeError, match="boom"), GradientHooks(model) as hooks:
        step(model, x)
        raise RuntimeError("boom")
    assert not hooks.active
    step(model, x)
    assert len(hooks.history) == 1


def test_autograd_grad_is_not_recorded(model, x):
    with GradientHooks(model) as hooks:
        loss = loss_terms(model(x), x)["recon"]
        torch.autograd.grad(loss, list(model.encoder.parameters()))
    assert hooks.history == []


def test_hooks_count_non_finite(model, x):
    with GradientHooks(model) as hooks:
        out = model(x)
        loss = loss_terms(out, x)["recon"] + out["mu"].sum() * float("nan")
        loss.backward()
    snap = hooks.history[0]
    assert snap.param("mu.weight").non_finite == model.mu.weight.numel()
    assert math.isnan(snap.total_norm)


class FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a):
        return a.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward failed")


def test_a_failed_backward_does_not_stall_recording(model, x):
    with GradientHooks(model) as hooks:
        # Created first, so the autograd engine runs its backward last: the other
        # parameters' grads (and hooks) are done by the time it raises.
        failing = FailingBackward.apply(model.unused.weight).sum()
        loss = loss_terms(model(x), x)["recon"] + failing
        with pytest.raises(RuntimeError, match="backward failed"):
            loss.backward()
        assert hooks._current  # hooks fired, but the end-of-backward callback never ran
        step(model, x)
        step(model, x)
    assert len(hooks.history) >= 2
    torch.testing.assert_close(
        torch.tensor(hooks.history[-1].total_norm),
        torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf),
    )
