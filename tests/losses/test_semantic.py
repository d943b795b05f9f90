from __future__ import annotations

import pytest
import torch

from meaning_transform.data import SEMANTIC_FEATURES
from meaning_transform.losses import (
    CheckLog,
    NonFiniteLossError,
    SemanticLoss,
    ShapeMismatchError,
)

# Which input columns each derived feature must send gradient to.
FEATURE_COLUMNS = {
    "position": [0, 1],
    "health": [2],
    "has_target": [3],
    "energy": [4],
    "is_alive": [2],
    "role": [5, 6, 7, 8, 9],
    "threatened": [2, 3],
}
HARD_FEATURES = ("is_alive", "role", "threatened")


def test_breakdown_has_every_feature_as_float(agent_batch) -> None:
    x, x_rec = agent_batch
    breakdown = SemanticLoss().detailed_breakdown(x_rec, x)
    assert list(breakdown) == list(SEMANTIC_FEATURES)
    assert all(isinstance(v, float) and v >= 0 for v in breakdown.values())


def test_forward_is_the_sum_of_per_feature_terms(agent_batch) -> None:
    x, x_rec = agent_batch
    loss_fn = SemanticLoss()
    per_feature = loss_fn.per_feature(x_rec, x)
    torch.testing.assert_close(loss_fn(x_rec, x), sum(per_feature.values()))


@pytest.mark.parametrize("similarity_type", ["cosine", "mse", "l1"])
@pytest.mark.parametrize("feature", SEMANTIC_FEATURES)
def test_soft_mode_every_feature_has_a_gradient(make_agent, similarity_type, feature) -> None:
    x, x_rec = make_agent()
    x_rec.requires_grad_(True)
    per_feature = SemanticLoss(similarity_type=similarity_type).per_feature(x_rec, x)
    (grad,) = torch.autograd.grad(per_feature[feature], x_rec)
    assert torch.isfinite(grad).all()
    assert grad[:, FEATURE_COLUMNS[feature]].abs().sum() > 0, feature


@pytest.mark.parametrize("feature", HARD_FEATURES)
def test_hard_mode_reproduces_the_missing_gradient_path(make_agent, feature) -> None:
    x, x_rec = make_agent(noise=0.5)
    x_rec.requires_grad_(True)
    per_feature = SemanticLoss(mode="hard").per_feature(x_rec, x)
    assert not per_feature[feature].requires_grad
    assert per_feature[feature].item() > 0  # ... while still adding to the loss value
    assert per_feature["position"].requires_grad  # the continuous features keep theirs


def test_hard_mode_values_are_indicator_mismatches() -> None:
    x = torch.zeros(2, 10)
    x[:, 2] = torch.tensor([0.5, 0.05])  # alive, dead
    x[:, 5] = 1.0
    x_rec = x.clone()
    x_rec[0, 2] = 0.05  # reconstructed as dead
    x_rec[1, 6] = 2.0  # role 1 instead of role 0
    per_feature = SemanticLoss(mode="hard").per_feature(x_rec, x)
    assert per_feature["is_alive"].item() == pytest.approx(0.5)
    assert per_feature["role"].item() == pytest.approx(0.5)


def test_soft_thresholds_track_the_hard_ones() -> None:
    x = torch.zeros(4, 10)
    x[:, 2] = torch.tensor([0.0, 0.01, 0.6, 0.9])
    x[:, 5] = 1.0
    breakdown = SemanticLoss().detailed_breakdown(x, x)
    assert breakdown["is_alive"] < 0.01  # soft: small, not zero, near the threshold
    assert breakdown["threatened"] < 1e-5
    wrong = x.clone()
    wrong[:, 2] = torch.tensor([0.9, 0.9, 0.0, 0.0])
    assert SemanticLoss().detailed_breakdown(wrong, x)["is_alive"] > 5


def test_cosine_position_also_sees_magnitude() -> None:
    x = torch.zeros(3, 10)
    x[:, 0:2] = 0.2
    x[:, 5] = 1.0
    x_rec = x.clone()
    x_rec[:, 0:2] = 0.8  # same direction, different place
    per_feature = SemanticLoss(similarity_type="cosine").per_feature(x_rec, x)
    assert per_feature["position"].item() == pytest.approx(2 * 0.6**2, rel=1e-5)


def test_similarity_types_differ_as_documented() -> None:
    x = torch.zeros(1, 10)
    x[0, 0:2] = torch.tensor([1.0, 0.0])
    x[0, 5] = 1.0
    x_rec = x.clone()
    x_rec[0, 0:2] = torch.tensor([0.0, 1.0])  # orthogonal, same length
    pos = {
        s: SemanticLoss(similarity_type=s).per_feature(x_rec, x)["position"].item()
        for s in ("cosine", "mse", "l1")
    }
    assert pos["mse"] == pytest.approx(2.0)
    assert pos["l1"] == pytest.approx(2.0)
    assert pos["cosine"] == pytest.approx(1.0 + 2.0)


def test_sum_is_batch_size_times_mean(agent_batch) -> None:
    x, x_rec = agent_batch
    mean = SemanticLoss(reduction="mean")(x_rec, x)
    total = SemanticLoss(reduction="sum")(x_rec, x)
    torch.testing.assert_close(total, x.shape[0] * mean)


def test_requires_the_agent_layout_without_extractors() -> None:
    with pytest.raises(ShapeMismatchError, match=r"\(B, 10\), got \(4, 7\)"):
        SemanticLoss()(torch.zeros(4, 7), torch.zeros(4, 7))


def test_shape_mismatch_message() -> None:
    with pytest.raises(ShapeMismatchError, match=r"got \(4, 10\) and \(4,\)"):
        SemanticLoss()(torch.zeros(4, 10), torch.zeros(4))


def test_custom_extractors_on_other_data() -> None:
    x = torch.rand(5, 7)
    loss_fn = SemanticLoss(feature_extractors={"norm": lambda t: t.norm(dim=1)})
    x_rec = x + 0.1
    per_feature = loss_fn.per_feature(x_rec, x)
    assert list(per_feature) == ["norm"]
    want = ((x_rec.norm(dim=1) - x.norm(dim=1)) ** 2).mean()
    torch.testing.assert_close(per_feature["norm"], want)


def test_custom_extractors_replace_and_extend_builtins(agent_batch) -> None:
    x, x_rec = agent_batch
    loss_fn = SemanticLoss(
        feature_extractors={"position": lambda t: t[:, 0:1], "speed": lambda t: t[:, 4:5] * 2}
    )
    per_feature = loss_fn.per_feature(x_rec, x)
    assert list(per_feature) == [*SEMANTIC_FEATURES, "speed"]
    torch.testing.assert_close(per_feature["position"], ((x_rec[:, 0] - x[:, 0]) ** 2).mean())


def test_bad_extractor_output_shape() -> None:
    loss_fn = SemanticLoss(feature_extractors={"total": lambda t: t.sum()})
    with pytest.raises(ShapeMismatchError, match="'total'"):
        loss_fn(torch.rand(4, 3), torch.rand(4, 3))


def test_non_finite_extractor_output_is_named() -> None:
    loss_fn = SemanticLoss(feature_extractors={"log": lambda t: torch.log(t - 1.0)})
    with pytest.raises(NonFiniteLossError, match="semantic/log"):
        loss_fn(torch.rand(4, 3), torch.rand(4, 3))


def test_non_finite_input_named_and_recorded(agent_batch) -> None:
    x, x_rec = agent_batch
    x_rec = x_rec.clone()
    x_rec[3, 2] = float("nan")
    with pytest.raises(NonFiniteLossError, match="x_reconstructed"):
        SemanticLoss()(x_rec, x)
    log = CheckLog()
    SemanticLoss(on_non_finite="record", log=log)(x_rec, x)
    assert log.non_finite[0].tensor == "x_reconstructed"
    assert log.non_finite[0].first_index == (3, 2)


def test_follows_input_dtype(make_agent) -> None:
    x, x_rec = make_agent(dtype=torch.float64)
    assert SemanticLoss()(x_rec, x).dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"similarity_type": "dot"}, "similarity_type"),
        ({"mode": "fuzzy"}, "mode"),
        ({"temperature": 0.0}, "temperature"),
        ({"reduction": "none"}, "reduction"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name) -> None:
    with pytest.raises(ValueError, match=name):
        SemanticLoss(**kwargs)


# ---- feature_extractors as a list of names (the original write-up's API) ----


def test_a_list_of_names_keeps_only_those_builtins(agent_batch) -> None:
    x, x_rec = agent_batch
    loss_fn = SemanticLoss(feature_extractors=["role", "position", "health"])
    per_feature = loss_fn.per_feature(x_rec, x)
    assert list(per_feature) == ["position", "health", "role"]  # SEMANTIC_FEATURES order
    everything = SemanticLoss().per_feature(x_rec, x)
    for name, value in per_feature.items():
        torch.testing.assert_close(value, everything[name])
    torch.testing.assert_close(loss_fn(x_rec, x), sum(per_feature.values()))


def test_a_list_of_every_name_equals_the_default(agent_batch) -> None:
    x, x_rec = agent_batch
    listed = SemanticLoss(feature_extractors=list(SEMANTIC_FEATURES))
    torch.testing.assert_close(listed(x_rec, x), SemanticLoss()(x_rec, x))


def test_a_list_of_names_still_needs_the_agent_layout() -> None:
    with pytest.raises(ShapeMismatchError, match=r"\(B, 10\), got \(4, 7\)"):
        SemanticLoss(feature_extractors=["health"])(torch.zeros(4, 7), torch.zeros(4, 7))


def test_an_unknown_name_is_named_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown semantic feature\(s\) \['speed'\]") as err:
        SemanticLoss(feature_extractors=["position", "speed"])
    for name in SEMANTIC_FEATURES:
        assert repr(name) in str(err.value)


def test_an_empty_list_or_a_bare_string_is_refused() -> None:
    with pytest.raises(ValueError, match="names no feature"):
        SemanticLoss(feature_extractors=[])
    with pytest.raises(TypeError, match="list of feature names"):
        SemanticLoss(feature_extractors="position")


def test_a_mapping_value_must_be_callable() -> None:
    with pytest.raises(TypeError, match="'speed' must be a callable"):
        SemanticLoss(feature_extractors={"speed": "position"})  # type: ignore[dict-item]
