import math

import pytest
import torch
from _diagnostics_helpers import TinyVAE, loss_terms

from meaning_transform.diagnostics import GradientMonitor, gradient_snapshot, update_ratios


def backward(model, x):
    model.zero_grad(set_to_none=True)
    terms = loss_terms(model(x), x)
    (terms["recon"] + 0.1 * terms["kl"]).backward()


def test_total_norm_equals_clip_grad_norm(model, x):
    backward(model, x)
    snap = gradient_snapshot(model)
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=math.inf)
    assert snap.total_norm == pytest.approx(expected.item(), rel=1e-6)
    assert snap.total_norm > 0


def test_per_param_stats_match_direct_torch(model, x):
    backward(model, x)
    model.decoder[2].bias.grad[0] = 0.0  # at least one exact zero to count
    snap = gradient_snapshot(model)
    for name, p in model.named_parameters():
        s = snap.param(name)
        assert s.shape == tuple(p.shape) and s.numel == p.numel()
        if p.grad is None:
            continue
        g = p.grad
        assert s.has_grad
        assert s.norm == pytest.approx(g.norm().item(), rel=1e-6)
        assert s.mean == pytest.approx(g.mean().item(), rel=1e-5, abs=1e-9)
        assert s.abs_mean == pytest.approx(g.abs().mean().item(), rel=1e-6)
        assert s.std == pytest.approx(g.std(correction=0).item(), rel=1e-5)
        assert s.min == g.min().item() and s.max == g.max().item()
        assert s.zero_fraction == pytest.approx((g == 0).float().mean().item())
        assert s.non_finite == 0
        assert s.weight_norm == pytest.approx(p.detach().norm().item(), rel=1e-6)
        assert s.update_ratio is None
    assert snap.param("decoder.2.bias").zero_fraction >= 1 / model.decoder[2].bias.numel()


def test_unused_parameter_is_missing(model, x):
    backward(model, x)
    snap = gradient_snapshot(model)
    assert snap.missing == ("unused.weight", "unused.bias")
    unused = snap.param("unused.weight")
    assert not unused.has_grad and unused.norm is None and unused.weight_norm > 0


def test_frozen_parameters_are_skipped(model, x):
    model.mu.bias.requires_grad_(False)
    backward(model, x)
    names = {s.name for s in gradient_snapshot(model).params}
    assert "mu.bias" not in names and "mu.weight" in names


def test_non_finite_gradient_is_counted(model, x):
    backward(model, x)
    g = model.mu.weight.grad
    g[0, 0] = float("nan")
    g[1, 1] = float("inf")
    snap = gradient_snapshot(model)
    assert snap.param("mu.weight").non_finite == 2
    assert math.isnan(snap.param("mu.weight").norm)
    assert snap.param("mu.bias").non_finite == 0
    assert math.isnan(snap.total_norm)


def test_single_element_std_is_zero():
    model = torch.nn.Linear(1, 1)
    model(torch.ones(4, 1)).sum().backward()
    assert gradient_snapshot(model).param("bias").std == 0.0


def test_first_last_ratio_uses_first_and_last_linear(model, x):
    backward(model, x)
    snap = gradient_snapshot(model)
    assert snap.first_layer == "encoder.0.weight"
    assert snap.last_layer == "unused.weight"  # registration order, and it has no grad
    assert snap.first_last_ratio is None

    del model.unused
    backward(model, x)
    snap = gradient_snapshot(model)
    assert snap.last_layer == "decoder.2.weight"
    expected = model.encoder[0].weight.grad.norm() / model.decoder[2].weight.grad.norm()
    assert snap.first_last_ratio == pytest.approx(expected.item(), rel=1e-6)


def test_update_ratio_matches_direct_computation(model, x):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradientMonitor(model, track_updates=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    backward(model, x)
    first = monitor.after_backward()
    assert all(s.update_ratio is None for s in first.params)
    optimizer.step()
    done = monitor.after_step()
    assert done is monitor.history[-1] and done.step == 0 and monitor.step == 1
    for name, p in model.named_parameters():
        ratio = done.param(name).update_ratio
        if name.startswith("unused"):
            assert ratio == 0.0  # no grad, SGD leaves it alone
            continue
        if before[name].norm() == 0:  # BatchNorm bias starts at zero: ratio undefined
            assert ratio is None
            continue
        expected = ((p.detach() - before[name]).norm() / before[name].norm()).item()
        assert ratio == pytest.approx(expected, rel=1e-5)
    assert done.param("decoder.2.weight").update_ratio > 0


def test_snapshot_after_step_with_update_before_matches_update_ratios(model, x):
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    backward(model, x)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    snap = gradient_snapshot(model, update_before=before)
    ratios = update_ratios(model, before)
    assert ratios["encoder.1.bias"] is None  # BatchNorm bias starts at exactly zero
    for s in snap.params:
        if ratios[s.name] is None:
            assert s.update_ratio is None
        else:
            assert s.update_ratio == pytest.approx(ratios[s.name], rel=1e-6)


def test_update_ratio_none_for_zero_weights():
    layer = torch.nn.Linear(3, 2)
    torch.nn.init.zeros_(layer.bias)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    with torch.no_grad():
        layer.bias += 1.0
    assert update_ratios(layer, before)["bias"] is None


def test_monitor_without_tracking_records_history(model, x):
    monitor = GradientMonitor(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        backward(model, x)
        monitor.after_backward()
        optimizer.step()
        monitor.after_step()
    assert [s.step for s in monitor.history] == [0, 1, 2]
    assert monitor.history[0].total_norm != monitor.history[2].total_norm
    assert all(s.update_ratio is None for snap in monitor.history for s in snap.params)


def test_no_batch_norm_model_also_works():
    torch.manual_seed(0)
    model = TinyVAE(batch_norm=False)
    x = torch.randn(8, 6)
    backward(model, x)
    snap = gradient_snapshot(model)
    assert "encoder.1.weight" not in {s.name for s in snap.params}
    assert snap.total_norm == pytest.approx(
        torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf).item(), rel=1e-6
    )
