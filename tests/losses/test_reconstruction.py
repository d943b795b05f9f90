from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from meaning_transform.losses import (
    CheckLog,
    LossInputError,
    NonFiniteLossError,
    ReconstructionLoss,
    ShapeMismatchError,
    reconstruction_per_feature,
    reconstruction_per_sample,
)


def _batch(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(8, 10, generator=g, dtype=dtype)
    return x, x + 0.1 * torch.randn(8, 10, generator=g, dtype=dtype)


def test_mse_per_sample_sums_features_and_mean_averages_batch() -> None:
    x, x_rec = _batch()
    per_sample = ((x_rec - x) ** 2).sum(dim=1)
    torch.testing.assert_close(reconstruction_per_sample(x_rec, x), per_sample)
    torch.testing.assert_close(ReconstructionLoss()(x_rec, x), per_sample.mean())
    torch.testing.assert_close(ReconstructionLoss(reduction="sum")(x_rec, x), per_sample.sum())


def test_sum_is_batch_size_times_mean() -> None:
    x, x_rec = _batch(1)
    mean = ReconstructionLoss(reduction="mean")(x_rec, x)
    total = ReconstructionLoss(reduction="sum")(x_rec, x)
    torch.testing.assert_close(total, 8 * mean)


def test_bce_matches_torch_inside_the_unit_interval() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.rand(8, 10, generator=g, dtype=torch.float64)
    x_rec = torch.rand(8, 10, generator=g, dtype=torch.float64).clamp(0.01, 0.99)
    want = F.binary_cross_entropy(x_rec, x, reduction="sum") / 8
    torch.testing.assert_close(ReconstructionLoss("bce")(x_rec, x), want)


def test_bce_clamps_the_reconstruction_so_the_loss_stays_finite() -> None:
    x = torch.ones(2, 3)
    x_rec = torch.zeros(2, 3, requires_grad=True)  # log(0) without the clamp
    loss = ReconstructionLoss("bce")(x_rec, x)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 10
    assert torch.isfinite(x_rec.grad).all()


def test_bce_rejects_targets_outside_the_unit_interval() -> None:
    with pytest.raises(LossInputError, match=r"x_original in \[0, 1\]"):
        ReconstructionLoss("bce")(torch.rand(2, 3), torch.full((2, 3), 2.0))


def test_per_feature_is_batch_mean_and_sums_to_the_loss() -> None:
    x, x_rec = _batch(3)
    per_feature = reconstruction_per_feature(x_rec, x)
    assert per_feature.shape == (10,)
    torch.testing.assert_close(per_feature, ((x_rec - x) ** 2).mean(dim=0))
    torch.testing.assert_close(per_feature.sum(), ReconstructionLoss()(x_rec, x))


def test_follows_input_dtype() -> None:
    x, x_rec = _batch(dtype=torch.float64)
    assert ReconstructionLoss()(x_rec, x).dtype == torch.float64
    assert ReconstructionLoss("bce")(x_rec.clamp(0, 1), x).dtype == torch.float64


def test_shape_mismatch_message_names_both_shapes() -> None:
    with pytest.raises(ShapeMismatchError, match=r"same shape, got \(4, 10\) and \(4,\)"):
        ReconstructionLoss()(torch.zeros(4, 10), torch.zeros(4))


def test_one_dimensional_inputs_rejected() -> None:
    with pytest.raises(ShapeMismatchError, match=r"\(B, D\)"):
        ReconstructionLoss()(torch.zeros(10), torch.zeros(10))


@pytest.mark.parametrize("name", ["x_reconstructed", "x_original"])
def test_non_finite_input_is_named(name: str) -> None:
    tensors = {"x_reconstructed": torch.zeros(3, 4), "x_original": torch.zeros(3, 4)}
    tensors[name][1, 2] = float("inf")
    with pytest.raises(NonFiniteLossError, match=rf"{name}: 0 NaN, 1 Inf, first at index \[1, 2\]"):
        ReconstructionLoss()(tensors["x_reconstructed"], tensors["x_original"])


def test_record_mode_logs_input_and_result() -> None:
    log = CheckLog()
    x = torch.zeros(3, 4)
    x_rec = torch.zeros(3, 4)
    x_rec[0, 0] = float("nan")
    loss = ReconstructionLoss(on_non_finite="record", log=log)(x_rec, x)
    assert torch.isnan(loss)
    assert [e.tensor for e in log.non_finite] == ["x_reconstructed", "reconstruction_loss"]


def test_floor_engages_for_a_perfect_reconstruction_and_is_counted() -> None:
    x = torch.rand(4, 10)
    loss_fn = ReconstructionLoss()
    assert loss_fn(x, x).item() == pytest.approx(1e-8)
    assert loss_fn(x + 1.0, x).item() > 1.0
    assert loss_fn(x.clone(), x).item() == pytest.approx(1e-8)
    assert loss_fn.log.floor_engagements == {"reconstruction": 2}


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="loss_type"):
        ReconstructionLoss("huber")
    with pytest.raises(ValueError, match="reduction"):
        ReconstructionLoss(reduction="none")
