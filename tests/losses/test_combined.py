from __future__ import annotations

import pytest
import torch

from meaning_transform.data import SEMANTIC_FEATURES
from meaning_transform.losses import (
    CANONICAL_FEATURE_WEIGHTS,
    CombinedLoss,
    FeatureWeightedLoss,
    NonFiniteEvent,
    NonFiniteLossError,
    ShapeMismatchError,
)

RESULT_KEYS = {
    "loss",
    "reconstruction_loss",
    "kl_loss",
    "semantic_loss",
    "compression_loss",
    "semantic_breakdown",
    "terms",
    "weights",
    "reduction",
    "floors_engaged",
    "non_finite",
}


def _model_output(x_rec: torch.Tensor, seed: int = 0, z: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = x_rec.shape[0]
    return {
        "reconstruction": x_rec,
        "mu": torch.randn(b, z, generator=g, dtype=x_rec.dtype),
        "log_var": 0.3 * torch.randn(b, z, generator=g, dtype=x_rec.dtype),
    }


def test_result_has_every_key_and_total_is_the_weighted_sum(agent_batch) -> None:
    x, x_rec = agent_batch
    loss_fn = CombinedLoss(recon_loss_weight=1.0, kl_loss_weight=0.1, semantic_loss_weight=0.5)
    result = loss_fn(_model_output(x_rec.clone().requires_grad_()), x)
    assert RESULT_KEYS <= set(result)
    want = result["reconstruction_loss"] + 0.1 * result["kl_loss"] + 0.5 * result["semantic_loss"]
    torch.testing.assert_close(result["loss"].detach(), want)
    assert result["loss"].requires_grad
    for key in ("reconstruction_loss", "kl_loss", "semantic_loss", "compression_loss"):
        assert result[key].dim() == 0 and not result[key].requires_grad
    assert list(result["semantic_breakdown"]) == list(SEMANTIC_FEATURES)
    assert result["weights"] == {"reconstruction": 1.0, "kl": 0.1, "semantic": 0.5}
    assert result["floors_engaged"] == [] and result["non_finite"] == []


def test_terms_are_undetached_and_unweighted(agent_batch) -> None:
    x, x_rec = agent_batch
    out = _model_output(x_rec.clone().requires_grad_())
    out["mu"].requires_grad_()
    result = CombinedLoss(kl_loss_weight=0.25)(out, x)
    terms = result["terms"]
    expected = {"reconstruction", "kl", "semantic", *(f"semantic/{f}" for f in SEMANTIC_FEATURES)}
    assert set(terms) == expected
    torch.testing.assert_close(terms["kl"].detach(), result["kl_loss"])  # unweighted
    (g_mu,) = torch.autograd.grad(terms["kl"], out["mu"], retain_graph=True)
    assert g_mu.abs().sum() > 0
    for name in ("reconstruction", "semantic", "semantic/role", "semantic/is_alive"):
        (g,) = torch.autograd.grad(terms[name], out["reconstruction"], retain_graph=True)
        assert g.abs().sum() > 0, name


def test_weights_are_mutable_attributes(agent_batch) -> None:
    x, x_rec = agent_batch
    loss_fn = CombinedLoss()
    out = _model_output(x_rec)
    before = loss_fn(out, x)
    loss_fn.kl_loss_weight = 2.0
    after = loss_fn(out, x)
    assert after["weights"]["kl"] == 2.0
    delta = after["loss"] - before["loss"]
    torch.testing.assert_close(delta.detach(), (2.0 - 0.1) * before["kl_loss"])


def test_zero_semantic_weight_skips_semantic_and_accepts_other_data() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 7, generator=g)
    result = CombinedLoss(semantic_loss_weight=0.0)(_model_output(x + 0.1), x)
    assert result["semantic_loss"].item() == 0.0
    assert result["semantic_breakdown"] == {}
    assert set(result["terms"]) == {"reconstruction", "kl"}
    assert RESULT_KEYS <= set(result)


def test_non_agent_data_with_semantic_weight_says_what_to_do() -> None:
    x = torch.rand(6, 7)
    with pytest.raises(ShapeMismatchError, match="semantic_loss_weight=0"):
        CombinedLoss()(_model_output(x), x)


def test_semantic_features_as_a_list_of_names(agent_batch) -> None:
    x, x_rec = agent_batch
    out = _model_output(x_rec)
    result = CombinedLoss(semantic_feature_extractors=["health", "position"])(out, x)
    assert list(result["semantic_breakdown"]) == ["position", "health"]
    assert {t for t in result["terms"] if t.startswith("semantic/")} == {
        "semantic/position",
        "semantic/health",
    }
    full = CombinedLoss()(out, x)["semantic_breakdown"]
    want = full["position"] + full["health"]
    assert result["semantic_loss"].item() == pytest.approx(want, rel=1e-6)


def test_semantic_features_list_with_an_unknown_name_names_both() -> None:
    with pytest.raises(ValueError, match=r"\['speed'\]; known: \['position', 'health'"):
        CombinedLoss(semantic_feature_extractors=["position", "speed"])
    with pytest.raises(ValueError, match=r"\['speed'\]; known"):
        FeatureWeightedLoss(semantic_feature_extractors=["speed"])


def test_feature_weighted_loss_with_a_list_weights_only_those(agent_batch) -> None:
    x, x_rec = agent_batch
    loss_fn = FeatureWeightedLoss(semantic_feature_extractors=["position", "health"])
    result = loss_fn(_model_output(x_rec), x)
    weights = result["feature_weights"]
    assert list(weights) == ["position", "health"]  # canonical weights, renormalised
    assert weights["position"] == pytest.approx(0.554 / (0.554 + 0.150))


def test_shape_mismatch_message(agent_batch) -> None:
    x, _ = agent_batch
    out = _model_output(x)
    out["reconstruction"] = x[:, 0]
    with pytest.raises(ShapeMismatchError, match=r"got \(64,\) and \(64, 10\)"):
        CombinedLoss()(out, x)
    out = _model_output(x)
    out["log_var"] = out["log_var"][:, :3]
    with pytest.raises(ShapeMismatchError, match=r"mu and log_var"):
        CombinedLoss()(out, x)


@pytest.mark.parametrize("name", ["reconstruction", "x_original", "mu", "log_var"])
def test_non_finite_inputs_named(agent_batch, name) -> None:
    x, x_rec = agent_batch
    out = _model_output(x_rec.clone())
    x = x.clone()
    target = x if name == "x_original" else out[name]
    target[5, 1] = float("nan")
    with pytest.raises(NonFiniteLossError, match=rf"non-finite values in {name}: 1 NaN"):
        CombinedLoss()(out, x)


@pytest.mark.parametrize("name", ["reconstruction", "x_original", "mu", "log_var"])
def test_record_mode_lists_events_in_the_result(agent_batch, name) -> None:
    x, x_rec = agent_batch
    out = _model_output(x_rec.clone())
    x = x.clone()
    target = x if name == "x_original" else out[name]
    target[0, 0] = float("inf")
    loss_fn = CombinedLoss(on_non_finite="record")
    result = loss_fn(out, x)
    events = result["non_finite"]
    assert all(isinstance(e, NonFiniteEvent) for e in events)
    assert events[0].tensor == name and events[0].inf_count == 1
    # The total is reported too - except for an infinite log_var, which the KL clamps.
    assert ("loss" in {e.tensor for e in events}) == (name != "log_var")
    clean = loss_fn(_model_output(x_rec), agent_batch[0])
    assert clean["non_finite"] == []  # per call, not cumulative
    assert len(loss_fn.log.non_finite) == len(events)


def test_floors_engaged_per_call_and_counted_cumulatively(agent_batch) -> None:
    x, _ = agent_batch
    loss_fn = CombinedLoss()
    perfect = {"reconstruction": x.clone(), "mu": torch.zeros(64, 4), "log_var": torch.zeros(64, 4)}
    result = loss_fn(perfect, x)
    assert result["floors_engaged"] == ["reconstruction", "kl"]
    assert result["reconstruction_loss"].item() == pytest.approx(1e-8)
    assert loss_fn(_model_output(x + 0.1), x)["floors_engaged"] == []
    loss_fn(perfect, x)
    assert loss_fn.log.floor_engagements == {"reconstruction": 2, "kl": 2}


def test_total_floor_is_reported_when_everything_is_zero() -> None:
    x = torch.rand(4, 3)
    loss_fn = CombinedLoss(semantic_loss_weight=0.0, kl_loss_weight=0.0, recon_loss_weight=0.0)
    result = loss_fn({"reconstruction": x, "mu": torch.ones(4, 2), "log_var": torch.zeros(4, 2)}, x)
    assert result["floors_engaged"] == ["reconstruction", "total"]
    assert result["loss"].item() == pytest.approx(1e-6)


def test_reduction_sum_vs_mean_and_the_original_mix(agent_batch) -> None:
    x, x_rec = agent_batch
    out = _model_output(x_rec)
    mean = CombinedLoss(reduction="mean")(out, x)
    total = CombinedLoss(reduction="sum")(out, x)
    b = x.shape[0]
    for key in ("reconstruction_loss", "kl_loss", "semantic_loss"):
        torch.testing.assert_close(total[key], b * mean[key])
    original = CombinedLoss(reduction="sum", semantic_reduction="mean")(out, x)
    assert original["reduction"] == {"reconstruction": "sum", "kl": "sum", "semantic": "mean"}
    torch.testing.assert_close(original["semantic_loss"], mean["semantic_loss"])
    torch.testing.assert_close(original["kl_loss"], total["kl_loss"])


def test_compression_loss_is_added_unweighted(agent_batch) -> None:
    x, x_rec = agent_batch
    out = _model_output(x_rec)
    base = CombinedLoss()(out, x)
    out["compression_loss"] = torch.tensor(0.75, requires_grad=True)
    with_c = CombinedLoss()(out, x)
    torch.testing.assert_close((with_c["loss"] - base["loss"]).detach(), torch.tensor(0.75))
    assert with_c["compression_loss"].item() == 0.75
    assert "compression" in with_c["terms"]
    out["compression_loss"] = torch.tensor(float("nan"))
    with pytest.raises(NonFiniteLossError, match="compression_loss"):
        CombinedLoss()(out, x)


def test_follows_input_dtype(make_agent) -> None:
    x, x_rec = make_agent(dtype=torch.float64)
    result = CombinedLoss()(_model_output(x_rec), x)
    assert result["loss"].dtype == torch.float64
    assert result["compression_loss"].dtype == torch.float64


def test_hard_semantic_mode_is_reproducible(make_agent) -> None:
    x, x_rec = make_agent(noise=0.5)
    out = _model_output(x_rec.clone().requires_grad_())
    terms = CombinedLoss(semantic_mode="hard")(out, x)["terms"]
    assert not terms["semantic/role"].requires_grad
    assert terms["semantic/position"].requires_grad


# --- FeatureWeightedLoss --------------------------------------------------------


def test_canonical_weights_normalised_and_contributions_reported(agent_batch) -> None:
    x, x_rec = agent_batch
    result = FeatureWeightedLoss()(_model_output(x_rec), x)
    weights = result["feature_weights"]
    assert set(weights) == set(SEMANTIC_FEATURES)
    assert sum(weights.values()) == pytest.approx(1.0)
    total = sum(CANONICAL_FEATURE_WEIGHTS.values())
    assert weights["position"] == pytest.approx(0.554 / total)
    contributions = result["feature_contributions"]
    assert set(contributions) == set(SEMANTIC_FEATURES)
    assert sum(contributions.values()) == pytest.approx(result["semantic_loss"].item(), rel=1e-5)
    n = len(SEMANTIC_FEATURES)
    for name, c in contributions.items():
        want = n * weights[name] * result["semantic_breakdown"][name]
        assert c == pytest.approx(want, rel=1e-5)


def test_uniform_weights_equal_the_unweighted_semantic_term(agent_batch) -> None:
    x, x_rec = agent_batch
    out = _model_output(x_rec)
    uniform = FeatureWeightedLoss(feature_weights={f: 1.0 for f in SEMANTIC_FEATURES})(out, x)
    plain = CombinedLoss()(out, x)
    torch.testing.assert_close(uniform["semantic_loss"], plain["semantic_loss"])


def test_partial_weights_give_zero_to_missing_features(agent_batch) -> None:
    x, x_rec = agent_batch
    result = FeatureWeightedLoss(feature_weights={"position": 3.0, "health": 1.0})(
        _model_output(x_rec), x
    )
    assert result["feature_weights"]["position"] == pytest.approx(0.75)
    assert result["feature_weights"]["role"] == 0.0
    assert result["feature_contributions"]["role"] == 0.0


def test_progressive_schedule_moves_from_top3_to_canonical() -> None:
    loss_fn = FeatureWeightedLoss(progressive=True)
    loss_fn.set_epoch(0, 11)
    start = loss_fn.scheduled_weights()
    assert {n for n, w in start.items() if w > 0} == {"position", "health", "energy"}
    assert sum(start.values()) == pytest.approx(1.0)
    loss_fn.set_epoch(10, 11)
    end = loss_fn.scheduled_weights()
    assert end == pytest.approx(loss_fn.base_feature_weights)
    loss_fn.set_epoch(5, 11)
    mid = loss_fn.scheduled_weights()
    assert mid["role"] == pytest.approx(0.5 * end["role"])
    assert sum(mid.values()) == pytest.approx(1.0)


def test_stability_adjustment_damps_an_exploding_feature(agent_batch) -> None:
    x, x_rec = agent_batch
    x_rec = x_rec.clone()
    x_rec[:, 4] += 50.0  # energy loss far above the median feature loss
    out = _model_output(x_rec)
    plain = FeatureWeightedLoss()(out, x)
    damped = FeatureWeightedLoss(stability_adjustment=True)(out, x)
    assert damped["feature_weights"]["energy"] < plain["feature_weights"]["energy"] / 10
    assert sum(damped["feature_weights"].values()) == pytest.approx(1.0)
    assert damped["semantic_loss"] < plain["semantic_loss"]


def test_feature_weighted_skip_keeps_keys() -> None:
    x = torch.rand(4, 7)
    result = FeatureWeightedLoss(semantic_loss_weight=0.0)(_model_output(x), x)
    assert result["feature_contributions"] == {} and result["feature_weights"] == {}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"feature_weights": {"speed": 1.0}}, "unknown features"),
        ({"feature_weights": {"position": -1.0}}, "feature_weights"),
        ({"feature_weights": {"position": 0.0}}, "all be zero"),
        ({"semantic_feature_extractors": {"speed": lambda t: t}}, "feature_weights"),
        ({"reduction": "none"}, "reduction"),
        ({"semantic_reduction": "none"}, "reduction"),
        ({"on_non_finite": "warn"}, "on_non_finite"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        FeatureWeightedLoss(**kwargs)
