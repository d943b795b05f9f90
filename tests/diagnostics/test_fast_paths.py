"""The fast paths compute the same numbers as the straightforward ones.

The fast gradient statistics derive mean, std, norm and counts from a few per-parameter
sums (float32 BLAS dots, counts, float64 on the host) and count NaN/Inf only where a
gradient is flagged; the fast attribution takes its Gram matrix from per-parameter dot
products (large parameters) and one float64 GEMM (all small ones) and assembles the
total gradient with foreach ops. Each is checked here against the obvious computation:
per-parameter torch ops in float64, and one ``autograd.grad`` per term.

The model has one layer big enough for the dot-product path (k * numel > 65536) and
several small ones for the stacked path; a few gradient entries are set to exactly zero.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from meaning_transform.diagnostics import (
    GradientHooks,
    GradientMonitor,
    gradient_snapshot,
    term_attribution,
)

D, H, Z = 40, 600, 6  # the (H, D) first layer has 24,000 entries: 3 * 24,000 > 65,536


class MidVAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, 16), nn.Tanh())
        self.mu = nn.Linear(16, Z)
        self.log_var = nn.Linear(16, Z)
        self.decoder = nn.Sequential(nn.Linear(Z, 16), nn.ReLU(), nn.Linear(16, D))
        self.register_buffer("eps", torch.randn(64, Z, generator=torch.Generator().manual_seed(3)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.encoder(x)  # (B, 16)
        mu, log_var = self.mu(h), self.log_var(h)  # (B, Z)
        z = mu + self.eps[: x.shape[0]] * (0.5 * log_var).exp()  # (B, Z)
        return {"reconstruction": self.decoder(z), "mu": mu, "log_var": log_var}


def make() -> tuple[MidVAE, torch.Tensor]:
    torch.manual_seed(0)
    return MidVAE(), torch.randn(48, D, generator=torch.Generator().manual_seed(1))


def three_terms(model: MidVAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = model(x)
    rec, mu, lv = out["reconstruction"], out["mu"], out["log_var"]
    return {
        "recon": ((rec - x) ** 2).sum(1).mean(),
        "kl": (0.5 * (lv.exp() + mu**2 - 1 - lv)).sum(1).mean(),  # never reaches the decoder
        "l1": (rec - x).abs().sum(1).mean(),
    }


WEIGHTS = {"recon": 1.0, "kl": 0.3, "l1": 0.2}


def backward(model: MidVAE, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    terms = three_terms(model, x)
    sum(WEIGHTS[n] * t for n, t in terms.items()).backward()
    with torch.no_grad():
        model.decoder[2].bias.grad[:3] = 0.0  # exact zeros to count
        model.encoder[0].weight.grad[0, :5] = 0.0


def assert_matches_direct(snap, model: MidVAE) -> None:
    """Every field against per-parameter float64 torch ops on the same gradients."""
    for name, p in model.named_parameters():
        s = snap.param(name)
        g = p.grad.detach().double()
        assert s.norm == pytest.approx(g.norm().item(), rel=1e-6)
        assert s.abs_mean == pytest.approx(g.abs().mean().item(), rel=1e-6)
        # the mean can cancel: its error is relative to mean |g|, not to the mean
        assert abs(s.mean - g.mean().item()) <= 1e-6 * g.abs().mean().item()
        assert s.std == pytest.approx(g.std(correction=0).item(), rel=1e-5)
        assert s.min == p.grad.min().item() and s.max == p.grad.max().item()
        assert s.zero_fraction == (g == 0).double().mean().item()
        assert s.non_finite == 0
        assert s.weight_norm == pytest.approx(p.detach().double().norm().item(), rel=1e-6)
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf).item()
    assert snap.total_norm == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------- gradient statistics


def test_snapshot_matches_per_parameter_torch_ops():
    model, x = make()
    backward(model, x)
    snap = gradient_snapshot(model)
    assert snap.detail == "full"
    assert snap.param("decoder.2.bias").zero_fraction == 3 / D
    assert_matches_direct(snap, model)


def test_monitor_and_hooks_match_the_snapshot():
    model, x = make()
    monitor = GradientMonitor(model)
    with GradientHooks(model) as hooks:
        backward(model, x)  # backward() zeroes a few entries after the hooks ran ...
    recorded = monitor.after_backward()
    assert_matches_direct(recorded, model)
    (from_hooks,) = hooks.history
    for a, b in zip(from_hooks.params, recorded.params, strict=True):
        if a.name in ("decoder.2.bias", "encoder.0.weight"):
            continue  # ... so these two differ from what the hooks saw, by design
        assert a.norm == pytest.approx(b.norm, rel=1e-6) and a.min == b.min and a.max == b.max
        assert a.std == pytest.approx(b.std, rel=1e-6)


def test_lean_detail_matches_full_on_its_fields():
    model, x = make()
    backward(model, x)
    full, lean = gradient_snapshot(model), gradient_snapshot(model, detail="lean")
    assert lean.detail == "lean" and lean.total_norm == pytest.approx(full.total_norm, rel=1e-12)
    for a, b in zip(lean.params, full.params, strict=True):
        assert a.norm == b.norm and a.zero_fraction == b.zero_fraction
        assert a.non_finite == b.non_finite == 0
        assert a.mean is a.abs_mean is a.std is a.min is a.max is a.weight_norm is None
    with pytest.raises(ValueError, match="detail"):
        gradient_snapshot(model, detail="some")


@pytest.mark.parametrize("path", ["snapshot", "hooks"])
def test_non_finite_entries_are_counted_exactly(path):
    model, x = make()

    def poison() -> None:
        with torch.no_grad():
            g = model.encoder[0].weight.grad  # the big one
            g[1, 2], g[3, 4], g[5, 6] = math.nan, math.inf, -math.inf
            model.mu.bias.grad[0] = 1e30  # finite, but its square overflows float32

    if path == "snapshot":
        backward(model, x)
        poison()
        snap = gradient_snapshot(model)
    else:
        with GradientHooks(model) as hooks:
            out = model(x)
            loss = ((out["reconstruction"] - x) ** 2).mean()
            model.encoder[0].weight.register_hook(lambda g: _poisoned(g))
            model.mu.bias.register_hook(lambda g: torch.full_like(g, 1e30))
            loss.backward()
        snap = hooks.history[0]
    big = snap.param("encoder.0.weight")
    assert big.non_finite == 3 and math.isnan(big.norm) and math.isnan(big.std)
    overflow = snap.param("mu.bias")
    assert overflow.non_finite == 0 and overflow.norm == math.inf  # as torch's norm says
    assert sum(s.non_finite for s in snap.params) == 3
    assert math.isnan(snap.total_norm)


def _poisoned(g: torch.Tensor) -> torch.Tensor:
    g = g.clone()
    g[1, 2], g[3, 4], g[5, 6] = math.nan, math.inf, -math.inf
    return g


# ----------------------------------------------------------------- attribution


def direct_gram(terms: dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
    """One autograd.grad per term, flattened in float64: the straightforward Gram."""
    params = list(model.parameters())
    rows = []
    for t in terms.values():
        grads = torch.autograd.grad(t, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).double().flatten()
                    for g, p in zip(grads, params, strict=True)
                ]
            )
        )
    g = torch.stack(rows)  # (k, n_params)
    return g @ g.T


@pytest.mark.parametrize("method", ["loop", "batched"])
def test_attribution_matches_one_grad_per_term(method):
    model, x = make()
    terms = three_terms(model, x)
    gram = direct_gram(terms, model)
    att = term_attribution(terms, WEIGHTS, model, method=method)
    assert att.method == method
    names = list(terms)
    norms = gram.diagonal().sqrt()
    w = torch.tensor([WEIGHTS[n] for n in names], dtype=torch.float64)
    total_sq = w @ gram @ w
    for i, a in enumerate(names):
        assert att.norm[a] == pytest.approx(norms[i].item(), rel=1e-6)
        share = (w[i] * (gram[i] @ w) / total_sq).item()
        assert att.share[a] == pytest.approx(share, rel=1e-5, abs=1e-7)
        for j, b in enumerate(names):
            cosine = (gram[i, j] / (norms[i] * norms[j])).item()
            assert att.cosine[a][b] == pytest.approx(cosine, rel=1e-5, abs=1e-7)
    assert att.total_norm == pytest.approx(total_sq.sqrt().item(), rel=1e-6)


@pytest.mark.parametrize("method", ["loop", "batched"])
def test_write_grad_equals_backward_of_the_total(method):
    model, x = make()
    weights = dict(WEIGHTS, l1=0.0)  # a zero weight: its gradient must not leak in
    terms = three_terms(model, x)
    sum(weights[n] * t for n, t in terms.items()).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    term_attribution(three_terms(model, x), weights, model, method=method, write_grad=True)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------- cached layout


@pytest.mark.parametrize("path", ["monitor", "hooks"])
def test_a_parameter_resized_in_place_is_followed(path):
    """Names, shapes and sizes are cached per parameter list; a resize must refresh them."""
    lin = nn.Linear(4, 3)
    monitor = GradientMonitor(lin, detail="lean")
    with GradientHooks(lin, detail="lean") as hooks:
        lin(torch.randn(8, 4)).sum().backward()
        first = monitor.after_backward() if path == "monitor" else hooks.history[-1]
        assert first.param("weight").shape == (3, 4)
        monitor.after_step()
        with torch.no_grad():
            lin.weight.data = torch.randn(5, 4)  # same Parameter object, new shape
            lin.bias.data = torch.zeros(5)
        lin.zero_grad(set_to_none=True)
        x = torch.randn(8, 4)
        x[:, 0] = 0.0  # the weight gradient's first column is exactly zero: 5 of 20 entries
        lin(x).sum().backward()
        snap = monitor.after_backward() if path == "monitor" else hooks.history[-1]
    weight = snap.param("weight")
    assert weight.shape == (5, 4) and weight.numel == 20
    assert weight.zero_fraction == 5 / 20
    assert snap.param("bias").numel == 5
    assert snap.total_norm == pytest.approx(
        torch.nn.utils.clip_grad_norm_(lin.parameters(), math.inf).item(), rel=1e-6
    )


def test_lean_snapshot_with_a_parameter_without_gradient():
    """A missing gradient takes the general (scatter) path; the others match full detail."""
    model, x = make()
    backward(model, x)
    model.log_var.weight.grad = None
    full, lean = gradient_snapshot(model), gradient_snapshot(model, detail="lean")
    assert lean.missing == full.missing == ("log_var.weight",)
    for a, b in zip(lean.params, full.params, strict=True):
        assert a.has_grad == b.has_grad
        assert a.norm == b.norm and a.zero_fraction == b.zero_fraction
    assert lean.param("log_var.weight").norm is None
    assert lean.total_norm == pytest.approx(full.total_norm, rel=1e-12)
