"""The NaN guard names where the first NaN/Inf appeared: data, a module, a loss term, backward."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from _diagnostics_helpers import TinyVAE, loss_terms
from torch import Tensor

from meaning_transform.diagnostics.doctor import Doctor
from meaning_transform.diagnostics.nan_guard import NanGuard, NanOrigin, abs_range
from meaning_transform.diagnostics.rules import RunEvidence, nonfinite_grad, nonfinite_input

Terms = Callable[[dict[str, Tensor], Tensor], dict[str, Tensor]]


def train(
    model: TinyVAE, x: Tensor, steps: int = 3, terms: Terms = loss_terms, **kwargs: object
) -> Doctor:
    """A user's loop of ``steps`` Adam steps on ``x`` with the Doctor attached."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with Doctor(model, attribute_every=0, **kwargs) as doctor:  # type: ignore[arg-type]
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            out = model(x)
            t = terms(out, x)
            result = {"loss": sum(t.values()), "terms": t}
            doctor.step(out, result, x)
            result["loss"].backward()
            optimizer.step()
    return doctor


def finding(doctor: Doctor, code: str):  # type: ignore[no-untyped-def]
    (found,) = [f for f in doctor.findings() if f.code == code]
    return found


def test_an_overflowing_middle_layer_is_named_with_its_abs_range(model: TinyVAE) -> None:
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    x[5] = 1e19  # finite data, but encoder.0 then overflows float32 on this row
    with torch.no_grad():
        model.encoder[0].weight.fill_(1e20)
    doctor = train(model, x, steps=1)
    origin = doctor.evidence().nan_origin
    assert origin.kind == "forward" and origin.where == "encoder.0" and origin.step == 0
    assert origin.details["module"] == "Linear"
    assert origin.details["input_abs_max"] == pytest.approx(1e19, rel=1e-6)
    assert origin.details["output_abs_max"] == math.inf and origin.details["output_inf"] > 0
    loss = finding(doctor, "nonfinite-loss")
    assert "forward output of encoder.0 (Linear)" in loss.message
    assert loss.evidence["first_module"] == "encoder.0" and loss.evidence["origin"] == "forward"


def test_a_custom_middle_module_returning_inf_is_named_not_its_parents() -> None:
    class Pole(torch.nn.Module):
        def forward(self, h: Tensor) -> Tensor:
            return h / (h - 2.0)  # Inf where h == 2

    model = TinyVAE(batch_norm=False)
    model.encoder = torch.nn.Sequential(torch.nn.Identity(), Pole(), torch.nn.Linear(6, 8))
    x = torch.zeros(4, 6)
    x[1, 3] = 2.0
    origin = train(model, x, steps=1).evidence().nan_origin
    assert (origin.kind, origin.where, origin.details["module"]) == ("forward", "encoder.1", "Pole")
    assert origin.details["input_abs_max"] == 2.0 and origin.details["output_inf"] == 1


def test_a_log_of_zero_in_a_loss_term_names_the_term(model: TinyVAE, x: Tensor) -> None:
    def terms(out: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
        return {**loss_terms(out, x), "log_term": torch.log(out["mu"].abs() * 0.0).mean()}

    doctor = train(model, x, steps=2, terms=terms)
    origin = doctor.evidence().nan_origin
    assert (origin.kind, origin.where, origin.step) == ("loss-term", "log_term", 0)
    assert origin.details["value"] == -math.inf
    loss = finding(doctor, "nonfinite-loss")
    assert "in the loss term 'log_term'" in loss.message
    assert "first_module" not in loss.evidence and loss.evidence["origin_where"] == "log_term"


def test_a_nan_only_in_backward_names_the_parameter_nearest_it(model: TinyVAE, x: Tensor) -> None:
    def terms(out: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
        mu = out["mu"]
        # value 0, derivative sqrt'(0) = inf (times abs'(0) = 0: NaN) into mu's layer
        return {**loss_terms(out, x), "root": torch.sqrt((mu - mu.detach()).abs()).sum()}

    doctor = train(model, x, steps=2, terms=terms)
    origin = doctor.evidence().nan_origin
    assert (origin.kind, origin.where, origin.step) == ("backward", "mu.weight", 0)
    grad = finding(doctor, "nonfinite-grad")
    assert "in backward (pass 0), in the gradient of mu.weight" in grad.message
    assert grad.evidence["first_parameter"] == "mu.weight"


def test_nan_in_the_data_is_the_origin(model: TinyVAE, x: Tensor) -> None:
    x = x.clone()
    x[3, 2] = math.nan
    doctor = train(model, x, steps=1)
    origin = doctor.evidence().nan_origin
    assert (origin.kind, origin.where, origin.details["nan"]) == ("data", "input batch", 1)
    data = finding(doctor, "nonfinite-input")
    assert "in the data: 1 NaN, 0 Inf in the batch of shape (32, 6)" in data.message


def test_a_healthy_run_has_no_origin_and_trains_bit_identically(x: Tensor) -> None:
    weights = []
    for guard in (True, False):
        torch.manual_seed(0)
        model = TinyVAE()
        doctor = train(model, x, steps=4, nan_guard=guard)
        assert doctor.evidence().nan_origin is None
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))


def test_localising_leaves_the_step_and_the_rng_alone(model: TinyVAE) -> None:
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.log_var.bias.fill_(math.inf)
    out = model(x)
    loss = sum(loss_terms(out, x).values())
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    origin = NanGuard(model).check(0, x, out, {"loss": loss, "terms": {}})
    assert origin is not None and origin.where == "log_var"
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    loss.backward()  # the pending graph is intact (BatchNorm's saved buffers untouched)


def test_only_the_first_occurrence_is_kept(model: TinyVAE, x: Tensor) -> None:
    guard = NanGuard(model)
    bad = x.clone()
    bad[0, 0] = math.inf
    out = model(x)
    finite = {"loss": sum(loss_terms(out, x).values()), "terms": {}}
    assert guard.check(0, x, out, finite) is None
    assert guard.check(1, bad, out, finite) == guard.first
    assert guard.check(2, bad, out, finite) is None and guard.first.step == 1


def test_abs_range_leaves_nan_out_and_keeps_inf() -> None:
    t = torch.tensor([-3.0, 0.5, math.nan, -math.inf])
    assert abs_range([t]) == {"abs_min": 0.5, "abs_max": math.inf, "nan": 1, "inf": 1}


def test_the_rules_read_the_origin_from_hand_built_evidence() -> None:
    origin = NanOrigin("data", "input batch", 2, {"nan": 3, "inf": 0, "shape": (4, 6)})
    (found,) = nonfinite_input(RunEvidence(where="run", input_non_finite=3, nan_origin=origin))
    assert "at step 2, in the data: 3 NaN" in found.message
    assert found.evidence["origin"] == "data" and found.evidence["origin_step"] == 2
    backward = NanOrigin("backward", "fc.weight", 0, {"non_finite": 1})
    (found,) = nonfinite_input(RunEvidence(where="run", input_non_finite=3, nan_origin=backward))
    assert "origin" not in found.evidence  # not a data origin: the input rule stays as it was
    assert nonfinite_grad(RunEvidence(where="run", nan_origin=backward)) == []  # needs snapshots


def test_the_origin_survives_a_state_round_trip(model: TinyVAE, x: Tensor) -> None:
    x = x.clone()
    x[0, 0] = math.nan
    doctor = train(model, x, steps=1)
    other = Doctor(TinyVAE(), attribute_every=0)
    other.load_state_dict(doctor.state_dict())
    assert other.evidence().nan_origin == doctor.evidence().nan_origin
