import pytest
import torch
from _diagnostics_helpers import loss_terms
from torch import nn

from meaning_transform.diagnostics import term_attribution

METHODS = ["batched", "loop"]


def direct_grads(terms, model):
    """Per-term flattened gradient over all trainable params (zeros where unreached)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for name, t in terms.items():
        if not t.requires_grad:
            out[name] = torch.cat([torch.zeros(p.numel()) for p in params]).double()
            continue
        grads = torch.autograd.grad(t, params, retain_graph=True, allow_unused=True)
        out[name] = torch.cat(
            [
                (torch.zeros_like(p) if g is None else g).flatten()
                for g, p in zip(grads, params, strict=True)
            ]
        ).double()
    return out


def all_terms(model, x):
    out = model(x)
    terms = loss_terms(out, x)
    rec = out["reconstruction"]
    terms["recon/first"] = ((rec[:, :3] - x[:, :3]) ** 2).sum(1).mean()  # part of recon
    return terms


@pytest.mark.parametrize("method", METHODS)
def test_matches_direct_per_term_autograd(model, x, method):
    terms = all_terms(model, x)
    weights = {"recon": 1.0, "kl": 0.3}
    att = term_attribution(terms, weights, model, method=method)
    assert att.method == method and att.fallback_reason is None
    assert att.total_of == ("recon", "kl")
    g = direct_grads(terms, model)
    for a in terms:
        assert att.norm[a] == pytest.approx(g[a].norm().item(), rel=1e-5)
        for b in terms:
            cos = torch.dot(g[a], g[b]) / (g[a].norm() * g[b].norm())
            assert att.cosine[a][b] == pytest.approx(cos.item(), rel=1e-5, abs=1e-12)
    assert att.weighted_norm["kl"] == pytest.approx(0.3 * g["kl"].norm().item(), rel=1e-5)
    total = g["recon"] + 0.3 * g["kl"]
    assert att.total_norm == pytest.approx(total.norm().item(), rel=1e-5)
    share_kl = torch.dot(0.3 * g["kl"], total) / total.norm() ** 2
    assert att.share["kl"] == pytest.approx(share_kl.item(), rel=1e-5)
    assert att.share["recon"] + att.share["kl"] == pytest.approx(1.0, abs=1e-12)
    assert att.zero_gradient == () and att.detached == ()


def test_batched_and_loop_agree(model, x):
    terms = all_terms(model, x)
    weights = {"recon": 1.0, "kl": 2.0}
    batched = term_attribution(terms, weights, model, method="batched")
    loop = term_attribution(terms, weights, model, method="loop")
    for name in terms:
        assert batched.norm[name] == pytest.approx(loop.norm[name], rel=1e-6)
        assert batched.share[name] == pytest.approx(loop.share[name], rel=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_terms_without_gradient_are_reported(model, x, method):
    out = model(x)
    terms = loss_terms(out, x)
    rec = out["reconstruction"]
    # The original fault: a term computed through a hard step (round) is on the graph
    # but carries zero gradient; a term built on detached outputs has no graph at all.
    terms["hard"] = ((torch.round(rec) - x) ** 2).mean()
    terms["detached"] = ((rec.detach() - x) ** 2).mean()
    weights = {"recon": 1.0, "kl": 0.1, "hard": 10.0, "detached": 5.0}
    att = term_attribution(terms, weights, model, method=method)
    assert terms["hard"].requires_grad and terms["hard"].item() > 0
    assert att.norm["hard"] == 0.0 and att.norm["detached"] == 0.0
    assert set(att.zero_gradient) == {"hard", "detached"}
    assert att.detached == ("detached",)
    assert att.share["hard"] == 0.0 and att.share["detached"] == 0.0
    assert att.cosine["hard"]["recon"] == 0.0 and att.cosine["hard"]["hard"] == 0.0
    assert att.cosine["recon"]["recon"] == 1.0
    assert sum(att.share.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("method", METHODS)
def test_write_grad_equals_one_backward_of_the_weighted_total(model, x, method):
    weights = {"recon": 1.0, "kl": 0.25}
    terms = all_terms(model, x)
    (terms["recon"] + 0.25 * terms["kl"]).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    terms = all_terms(model, x)
    term_attribution(terms, weights, model, method=method, write_grad=True)
    for name, p in model.named_parameters():
        if name.startswith("unused"):
            assert p.grad is None  # backward() would not touch it either
        else:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7)


def test_write_grad_accumulates_like_backward(model, x):
    weights = {"recon": 1.0, "kl": 1.0}
    term_attribution(all_terms(model, x), weights, model, write_grad=True)
    once = model.mu.weight.grad.clone()
    term_attribution(all_terms(model, x), weights, model, write_grad=True)
    torch.testing.assert_close(model.mu.weight.grad, 2 * once)


def test_retain_graph_allows_a_later_backward(model, x):
    terms = all_terms(model, x)
    term_attribution(terms, {"recon": 1.0, "kl": 1.0}, model, method="loop")
    terms["recon"].backward()  # graph still there
    assert model.mu.weight.grad is not None


class NoVmapScale(torch.autograd.Function):
    """Doubles its input; the backward reads a Python scalar, which vmap cannot batch."""

    @staticmethod
    def forward(ctx, a):
        return a * 2

    @staticmethod
    def backward(ctx, grad):
        scale = 2.0 if grad.abs().sum().item() >= 0 else 0.0
        return grad * scale


def test_batched_falls_back_to_loop_when_vmap_fails(model, x):
    out = model(x)
    terms = loss_terms(out, x)
    terms["custom"] = NoVmapScale.apply(out["mu"]).pow(2).mean()
    weights = {"recon": 1.0, "kl": 1.0, "custom": 1.0}
    att = term_attribution(terms, weights, model, method="batched")
    assert att.method == "loop" and att.fallback_reason
    loop = term_attribution(terms, weights, model, method="loop")
    assert att.norm == loop.norm and att.cosine == loop.cosine


def test_opposite_terms_conflict():
    layer = nn.Linear(3, 1)
    y = layer(torch.ones(2, 3)).sum()
    att = term_attribution({"up": y, "down": -y}, {"up": 1.0, "down": 0.5}, layer)
    assert att.cosine["up"]["down"] == pytest.approx(-1.0)
    assert att.conflicts == (("up", "down"),)
    assert att.share["up"] == pytest.approx(2.0) and att.share["down"] == pytest.approx(-1.0)


def test_params_as_name_pairs_restricts_the_gradient(model, x):
    terms = loss_terms(model(x), x)
    decoder = list(model.decoder.named_parameters())
    att = term_attribution(terms, {"recon": 1.0, "kl": 1.0}, decoder)
    assert att.norm["kl"] == 0.0  # the KL term does not reach the decoder
    expected = torch.autograd.grad(terms["recon"], [p for _, p in decoder], retain_graph=True)
    norm = torch.cat([g.flatten() for g in expected]).norm()
    assert att.norm["recon"] == pytest.approx(norm.item(), rel=1e-5)


def test_bad_arguments_are_named(model, x):
    terms = loss_terms(model(x), x)
    with pytest.raises(ValueError, match="kl"):
        term_attribution(terms, {"recon": 1.0}, model)
    with pytest.raises(ValueError, match="nope"):
        term_attribution(terms, {"recon": 1.0, "kl": 1.0}, model, total_of=("nope",))
    with pytest.raises(ValueError, match=r"shape \(32,\)"):
        term_attribution({"v": model(x)["mu"][:, 0]}, {"v": 1.0}, model)
    with pytest.raises(ValueError, match="method"):
        term_attribution(terms, {"recon": 1.0, "kl": 1.0}, model, method="vmap")


def test_summary_means_skip_steps_that_did_not_attribute_a_term():
    from meaning_transform.diagnostics.attribution import Attribution, summarise_attributions

    def att(norms: dict[str, float]) -> Attribution:
        names = tuple(norms)
        return Attribution(
            terms=names,
            weights=dict.fromkeys(names, 1.0),
            total_of=names,
            norm=norms,
            weighted_norm=norms,
            share=dict.fromkeys(names, 0.5),
            cosine={a: {b: (1.0 if a == b else -0.5) for b in names} for a in names},
            total_norm=1.0,
            method="loop",
            fallback_reason=None,
            zero_gradient=(),
            detached=(),
            conflicts=(),
        )

    summary = summarise_attributions([att({"rec": 2.0}), att({"rec": 4.0, "kl": 1.0})])
    assert summary.norm == {"rec": 3.0, "kl": 1.0}  # kl: its one attributed step
    assert summary.cosine["rec"]["kl"] == -0.5
    assert summary.steps_attributed == 2
    assert summarise_attributions([]) is None
