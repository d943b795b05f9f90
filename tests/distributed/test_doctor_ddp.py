"""The Doctor in a user's DDP loop (2 gloo ranks): its own rules on each rank, the rank
checks gathered at the end of each backward with nothing called after it."""

from __future__ import annotations

from typing import Any

import pytest
from _workers import NAN_STEP, launch

LAUNCH_TIMEOUT = 150.0
RUN = [
    "doctor_healthy_meaning",
    "doctor_healthy_examples",
    "doctor_nan",
    "doctor_desync",
    "doctor_unsynced_bn",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch(RUN, tmp_path_factory.mktemp("doctor"), world=2, timeout=LAUNCH_TIMEOUT)


def codes(result: dict[str, Any], prefix: str = "") -> list[str]:
    return sorted(f["code"] for f in result["findings"] if f["code"].startswith(prefix))


@pytest.mark.parametrize("scenario", ["doctor_healthy_meaning", "doctor_healthy_examples"])
def test_a_healthy_ddp_run_has_no_warning_on_any_rank(
    runs: list[dict[str, Any]], scenario: str
) -> None:
    for rank in (0, 1):
        result = runs[rank][scenario]
        bad = [f for f in result["findings"] if f["severity"] != "info"]
        assert bad == [], bad
        ev = result["evidence"]
        # one gather per step, every step, with no after_backward call in the loop
        assert ev["steps_seen"] == result["steps"] == result["snapshots"] == 16
        assert ev["first_param_desync"] is None and ev["first_buffer_desync"] is None


def test_rank_checks_are_judged_and_listed_when_they_cannot_be(runs: list[dict[str, Any]]) -> None:
    skipped = {n["code"]: n["reason"] for n in runs[0]["doctor_healthy_meaning"]["not_checked"]}
    assert "rank-data-repeats" in skipped  # shuffle_expected was not declared
    assert "rank-desync" not in skipped


def test_nan_on_rank_1_is_named_by_the_doctor_on_every_rank(runs: list[dict[str, Any]]) -> None:
    for rank in (0, 1):
        result = runs[rank]["doctor_nan"]
        (f,) = [f for f in result["findings"] if f["code"] == "rank-nonfinite"]
        assert f["evidence"]["ranks"] == "1" and f["evidence"]["step"] == NAN_STEP
        assert f["where"].startswith("rank 1")
    # rank 1's own Doctor saw the NaN enter with the data; rank 0's only the spread gradient
    assert "nonfinite-input" in codes(runs[1]["doctor_nan"])
    assert "nonfinite-input" not in codes(runs[0]["doctor_nan"])


def test_desync_and_unsynced_buffers(runs: list[dict[str, Any]]) -> None:
    for rank in (0, 1):
        desync = runs[rank]["doctor_desync"]
        assert codes(desync, "rank-") == ["rank-desync"]
        (f,) = [f for f in desync["findings"] if f["code"] == "rank-desync"]
        assert f["evidence"]["parameter"] == "decoder.fc_out.weight"
        assert f["evidence"]["ranks"] == "1"
        assert codes(runs[rank]["doctor_unsynced_bn"], "rank-") == ["rank-buffer-desync"]
