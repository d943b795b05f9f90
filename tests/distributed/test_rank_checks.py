"""Rank checks: real 2-rank gloo runs for the wiring, hand-built evidence for the rules.

One launch of 2 spawned ranks runs every scenario (``_workers.SCENARIOS``) in turn; a
rank that hangs is killed after ``LAUNCH_TIMEOUT`` s and the fixture fails.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _workers import NAN_STEP, launch

from meaning_transform.diagnostics import distributed
from meaning_transform.diagnostics.distributed import (
    CODES,
    DATA_FROZEN_MIN_STEPS,
    DUPLICATE_FRACTION,
    GRAD_DISAGREE_FRACTION,
    GRAD_MIN_STEPS,
    GRAD_RATIO_THRESHOLD,
    GRAD_WARMUP_STEPS,
    REPEATS_MIN_EPOCH_STEPS,
    RankEvent,
    RankEvidence,
    RankMonitor,
    _odd_ranks,
    rank_findings,
    rank_not_checked,
)
from meaning_transform.model import MeaningVAE

LAUNCH_TIMEOUT = 120.0
RUN = [
    "hook",
    "healthy_meaning",
    "healthy_examples",
    "healthy_mlp",
    "reshuffled",
    "nan",
    "nan_grad",
    "desync",
    "unsynced_bn",
    "loss_x100",
    "scaled_input",
    "frozen",
    "duplicate",
    "repeats",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Per rank, ``{scenario: result}`` (findings as dicts, evidence as plain data)."""
    return launch(RUN, tmp_path_factory.mktemp("ranks"), world=2, timeout=LAUNCH_TIMEOUT)


def rank_codes(result: dict[str, Any]) -> list[str]:
    return [f["code"] for f in result["findings"] if f["code"].startswith("rank-")]


def only(result: dict[str, Any], code: str) -> dict[str, Any]:
    """The one finding with ``code``, and no other rank-* finding."""
    assert rank_codes(result) == [code], result["findings"]
    return next(f for f in result["findings"] if f["code"] == code)


# ---- the wiring, on real process groups ----
def test_hook_sees_the_local_gradient_before_the_all_reduce(runs: list[dict[str, Any]]) -> None:
    r0, r1 = runs[0]["hook"], runs[1]["hook"]
    local, reduced = r0["local_grad_norm"], r0["reduced_grad_norm"]
    assert local == r1["local_grad_norm"] and reduced == r1["reduced_grad_norm"]  # gathered
    # each rank's hook saw its own gradient (autograd.grad on the unwrapped model) ...
    assert local[0] == pytest.approx(r0["own_norm"], rel=1e-6)
    assert local[1] == pytest.approx(r1["own_norm"], rel=1e-6)
    assert abs(local[0] - local[1]) > 0.01 * local[0]  # different data, different norms
    # ... and p.grad afterwards holds the mean over ranks, identical everywhere
    assert reduced[0] == reduced[1] == pytest.approx(r0["mean_norm"], rel=1e-6)
    assert r0["after_matches_mean"] and r1["after_matches_mean"]


@pytest.mark.parametrize(
    "scenario", ["healthy_meaning", "healthy_examples", "healthy_mlp", "reshuffled"]
)
def test_healthy_runs_have_no_rank_finding(runs: list[dict[str, Any]], scenario: str) -> None:
    for rank in (0, 1):
        result = runs[rank][scenario]
        assert rank_codes(result) == [], result["findings"]
        ev = result["evidence"]
        # replicas bitwise equal: no fingerprint differed at any step
        assert ev["first_param_desync"] is None and ev["first_buffer_desync"] is None
        assert ev["max_buffer_relative_difference"] == 0.0
        assert ev["steps_seen"] >= 12 and ev["duplicate_steps"] == 0
    ev = runs[0][scenario]["evidence"]
    judged = [n for s, n in zip(ev["steps"], ev["local_grad_norm"]) if s >= GRAD_WARMUP_STEPS]
    assert max(max(n) / min(n) for n in judged) < GRAD_RATIO_THRESHOLD / 2


def test_healthy_meaning_vae_judges_its_buffers(runs: list[dict[str, Any]]) -> None:
    ev = runs[0]["healthy_meaning"]["evidence"]
    assert any("running_mean" in b for b in ev["buffer_names"])
    assert ev["buffer_unchecked_steps"] == 0  # fingerprinted before every forward


def test_findings_are_the_same_on_every_rank(runs: list[dict[str, Any]]) -> None:
    for scenario in RUN[1:]:
        assert runs[0][scenario]["findings"] == runs[1][scenario]["findings"], scenario


def test_nan_on_one_rank_names_the_rank_step_and_term(runs: list[dict[str, Any]]) -> None:
    f = only(runs[0]["nan"], "rank-nonfinite")
    assert f["severity"] == "error"
    assert f["evidence"]["ranks"] == "1" and f["evidence"]["step"] == NAN_STEP
    assert f["evidence"]["name"] == "recon" and f["evidence"]["kind"] == "term"
    assert f["evidence"]["spread"] == 1  # the all-reduce averaged it into rank 0
    assert f["where"] == "rank 1: recon"
    assert f"step {NAN_STEP}" in f["message"] and "rank 0 stayed finite" in f["message"]


def test_a_nan_gradient_under_a_finite_loss_names_the_parameter(
    runs: list[dict[str, Any]],
) -> None:
    f = only(runs[0]["nan_grad"], "rank-nonfinite")
    ev = f["evidence"]
    assert ev["ranks"] == "1" and ev["step"] == NAN_STEP and ev["kind"] == "local-grad"
    # the first parameter the backward reached: the output layer's
    assert ev["name"] in ("fc2.weight", "fc2.bias") and ev["spread"] == 1


def test_a_weight_changed_on_one_rank_is_a_desync(runs: list[dict[str, Any]]) -> None:
    f = only(runs[0]["desync"], "rank-desync")
    assert f["evidence"] == {"step": 0, "ranks": "1", "parameter": "decoder.fc_out.weight"}
    assert f["where"] == "rank 1: decoder.fc_out.weight"


def test_unsynced_batchnorm_is_a_buffer_desync(runs: list[dict[str, Any]]) -> None:
    f = only(runs[0]["unsynced_bn"], "rank-buffer-desync")
    assert f["severity"] == "warning"
    assert f["evidence"]["buffer"].startswith("encoder.") and "running_" in f["evidence"]["buffer"]
    assert f["evidence"]["ranks"] == "1" and f["evidence"]["step"] == 1  # synced at init
    assert 0 < f["evidence"]["relative_difference"] <= f["evidence"]["max_relative_difference"]
    assert "SyncBatchNorm" in f["remedy"]


@pytest.mark.parametrize("scenario", ["loss_x100", "scaled_input"])
def test_one_rank_scaled_is_a_grad_disagreement(runs: list[dict[str, Any]], scenario: str) -> None:
    f = only(runs[0][scenario], "rank-grad-disagree")
    assert f["evidence"]["rank"] == 1 and f["where"] == "rank 1"
    assert f["evidence"]["median_ratio"] > 2 * GRAD_RATIO_THRESHOLD


def test_a_rank_reusing_one_batch_is_frozen(runs: list[dict[str, Any]]) -> None:
    f = only(runs[0]["frozen"], "rank-data-frozen")
    assert f["evidence"]["ranks"] == "1" and f["where"] == "rank 1"


def test_no_distributed_sampler_is_duplicate_data(runs: list[dict[str, Any]]) -> None:
    f = only(runs[0]["duplicate"], "rank-data-duplicate")
    assert f["evidence"]["share"] == 1.0


def test_a_repeated_epoch_order_without_set_epoch(runs: list[dict[str, Any]]) -> None:
    f = only(runs[0]["repeats"], "rank-data-repeats")
    assert f["severity"] == "info" and f["evidence"] == {"ranks": "0,1", "epoch": 1}
    assert len(runs[0]["repeats"]["evidence"]["epoch_orders"]) == 3


def test_a_hung_collective_fails_instead_of_hanging(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"did not finish within 10 s \(killed\)"):
        launch(["hang"], tmp_path, world=2, timeout=10.0)


# ---- world size 1: no process group ----
def test_without_a_process_group_it_records_and_reports_nothing() -> None:
    assert not torch.distributed.is_initialized()
    model = MeaningVAE(input_dim=16, latent_dim=4, hidden_dims=(32, 16), seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mon = RankMonitor(model).attach()
    x = torch.rand(8, 16, generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        out = model(x)
        terms = {"recon": F.mse_loss(out["reconstruction"], x), "kl": out["mu"].pow(2).mean()}
        mon.before_backward(terms, x)
        sum(terms.values()).backward()
        mon.after_backward()
        opt.step()
        opt.zero_grad()
    mon.epoch_end()
    mon.close()
    ev = mon.evidence()
    assert (ev.world_size, ev.rank, ev.steps_seen, ev.term_names) == (1, 0, 5, ("recon", "kl"))
    assert all(len(n) == 1 and n[0] > 0 for n in ev.local_grad_norm)
    assert ev.local_grad_norm == ev.reduced_grad_norm  # no all-reduce: p.grad is local
    assert mon.findings() == []
    skipped = rank_not_checked(ev)
    assert [n.code for n in skipped] == list(CODES)
    assert all(n.reason == "not a distributed run (world size 1)" for n in skipped)


def test_a_long_run_keeps_an_evenly_thinned_series(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed, "MAX_KEPT_STEPS", 8)
    model = torch.nn.Linear(3, 1)
    mon = RankMonitor(model).attach()
    for i in range(40):
        x = torch.full((4, 3), float(i))
        loss = model(x).pow(2).mean()
        mon.before_backward({"loss": loss}, x)
        loss.backward()
        mon.after_backward()
        model.zero_grad()
    ev = mon.evidence()
    assert ev.steps == (0, 8, 16, 24, 32) and len(ev.local_grad_norm) == len(ev.terms) == 5
    assert ev.steps_seen == 40 and ev.data_changes == (39,)  # the counters see every step


def test_steps_out_of_order_are_errors() -> None:
    mon = RankMonitor(torch.nn.Linear(2, 1))
    with pytest.raises(RuntimeError, match="before attach"):
        mon.before_backward({}, None)
    with pytest.raises(RuntimeError, match="without before_backward"):
        mon.attach().after_backward()


# ---- the rules, on hand-built evidence ----
def evidence(**kw: Any) -> RankEvidence:
    base: dict[str, Any] = dict(
        world_size=2,
        rank=0,
        backend="gloo",
        steps_seen=20,
        shuffle_expected=False,
        term_names=("recon", "kl"),
        param_names=("fc.weight", "fc.bias"),
        buffer_names=("bn.running_mean",),
        data_steps=20,
        data_changes=(19, 19),
    )
    base.update(kw)
    return RankEvidence(**base)


def codes(ev: RankEvidence) -> list[str]:
    return [f.code for f in rank_findings(ev)]


def test_a_healthy_evidence_has_no_finding() -> None:
    assert codes(evidence()) == []


def test_nonfinite_on_one_rank_fires_and_on_every_rank_does_not() -> None:
    e = RankEvent(3, (1,), "fc.weight", "local-grad", spread=False)
    (f,) = rank_findings(evidence(first_nonfinite=e))
    assert f.code == "rank-nonfinite" and "local gradient of fc.weight" in f.message
    assert "stayed finite" in f.message and f.where == "rank 1: fc.weight"
    assert codes(evidence(first_all_nonfinite_step=3)) == []  # not rank-specific


def test_desync_and_buffer_desync_fire_on_an_event() -> None:
    p = RankEvent(0, (1,), "fc.weight", "parameter")
    b = RankEvent(1, (1,), "bn.running_mean", "buffer", relative_difference=1e-3)
    ev = evidence(first_param_desync=p, first_buffer_desync=b, buffer_desync_steps=19)
    assert codes(ev) == ["rank-desync", "rank-buffer-desync"]
    assert "at least 0.001" in rank_findings(ev)[1].message


def grad_series(ratios: list[float]) -> dict[str, Any]:
    """Kept steps 0.. with rank 1's local norm ``ratio`` x rank 0's (after a warm-up)."""
    steps = tuple(range(GRAD_WARMUP_STEPS + len(ratios)))
    norms = tuple((2.0, 2.0 * q) for q in [1.0] * GRAD_WARMUP_STEPS + ratios)
    return {"steps": steps, "local_grad_norm": norms, "steps_seen": len(steps)}


def test_grad_disagreement_fires_just_above_its_edges() -> None:
    n = 2 * GRAD_MIN_STEPS
    flagged = math.ceil(GRAD_DISAGREE_FRACTION * n)
    above = GRAD_RATIO_THRESHOLD * 1.01
    ratios = [above] * flagged + [1.5] * (n - flagged)
    (f,) = rank_findings(evidence(**grad_series(ratios)))
    assert f.code == "rank-grad-disagree" and f.evidence["rank"] == 1
    assert f.evidence["steps_flagged"] == flagged and f.evidence["steps_judged"] == n
    # the odd rank is the one with the larger norm
    ev = evidence(**grad_series([1 / above] * n))
    assert rank_findings(ev)[0].evidence["rank"] == 0


def test_grad_disagreement_is_silent_just_below_its_edges() -> None:
    n = 2 * GRAD_MIN_STEPS
    flagged = math.ceil(GRAD_DISAGREE_FRACTION * n)
    above = GRAD_RATIO_THRESHOLD * 1.01
    assert codes(evidence(**grad_series([GRAD_RATIO_THRESHOLD] * n))) == []  # ratio not >
    fewer = [above] * (flagged - 1) + [1.5] * (n - flagged + 1)  # just under the fraction
    assert codes(evidence(**grad_series(fewer))) == []
    short = evidence(**grad_series([100.0] * (GRAD_MIN_STEPS - 1)))
    assert codes(short) == []
    assert "rank-grad-disagree" in [n.code for n in rank_not_checked(short)]
    # a non-finite norm is not judged (rank-nonfinite's business)
    assert codes(evidence(**grad_series([math.nan] * n))) == []


def test_data_frozen_edges() -> None:
    at = evidence(data_steps=DATA_FROZEN_MIN_STEPS, data_changes=(3, 0))
    (f,) = rank_findings(at)
    assert f.code == "rank-data-frozen" and f.where == "rank 1"
    assert codes(evidence(data_steps=DATA_FROZEN_MIN_STEPS - 1, data_changes=(2, 0))) == []
    assert codes(evidence(data_steps=DATA_FROZEN_MIN_STEPS, data_changes=(3, 1))) == []


def test_data_duplicate_edges() -> None:
    at = math.ceil(DUPLICATE_FRACTION * 20)
    assert codes(evidence(duplicate_steps=at)) == ["rank-data-duplicate"]
    assert codes(evidence(duplicate_steps=at - 1)) == []


def test_data_repeats_needs_shuffle_expected_and_full_epochs() -> None:
    orders = (("a", "b"), ("a", "c"))  # rank 0 repeated its order, rank 1 did not
    steps = (REPEATS_MIN_EPOCH_STEPS, REPEATS_MIN_EPOCH_STEPS)
    ev = evidence(epoch_orders=orders, epoch_steps=steps, shuffle_expected=True)
    (f,) = rank_findings(ev)
    assert f.code == "rank-data-repeats" and f.evidence == {"ranks": "0", "epoch": 1}
    assert codes(dataclasses.replace(ev, shuffle_expected=False)) == []
    assert "rank-data-repeats" in [
        n.code for n in rank_not_checked(dataclasses.replace(ev, shuffle_expected=False))
    ]
    short = dataclasses.replace(ev, epoch_steps=(REPEATS_MIN_EPOCH_STEPS - 1,) * 2)
    assert codes(short) == []
    assert codes(dataclasses.replace(ev, epoch_orders=(("a", "b"), ("c", "d")))) == []


def test_world_size_one_evidence_never_fires() -> None:
    e = RankEvent(0, (0,), "fc.weight", "parameter")
    ev = evidence(world_size=1, first_param_desync=e, data_changes=(0,), duplicate_steps=20)
    assert rank_findings(ev) == []


def test_not_checked_explains_missing_buffers_and_steps() -> None:
    reasons = {n.code: n.reason for n in rank_not_checked(evidence(buffer_names=()))}
    assert reasons["rank-buffer-desync"] == "the model has no buffers"
    none = rank_not_checked(evidence(steps_seen=0))
    assert {n.code for n in none} == set(CODES)


def test_odd_ranks_is_the_minority_with_ties_to_rank_0() -> None:
    rows = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 3.0]])
    assert _odd_ranks(rows) == (2,)
    assert _odd_ranks(torch.tensor([[1.0], [5.0], [5.0]])) == (0,)
    assert _odd_ranks(torch.tensor([[1.0], [5.0]])) == (1,)
    assert _odd_ranks(torch.tensor([[math.nan], [math.nan]])) == ()
