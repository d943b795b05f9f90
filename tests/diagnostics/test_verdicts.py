"""Hand-built evidence for the verdicts a table shows, the not-checked list, the
oscillation rule's edges, and how findings from several runs are merged."""

from __future__ import annotations

import dataclasses
import math

import pytest

from meaning_transform.diagnostics.findings import (
    Finding,
    NotChecked,
    merge_findings,
    merge_not_checked,
)
from meaning_transform.diagnostics.latent import LatentHealth
from meaning_transform.diagnostics.rules import (
    RunEvidence,
    collapse_verdict,
    evaluate,
    loss_oscillation,
    not_checked,
)
from meaning_transform.diagnostics.thresholds import COLLAPSE_MIN_STEPS, OSC_SPIKE
from meaning_transform.training import EpochRecord


def record(epoch: int, total: float, kl: float = 0.5, steps: int = 4) -> EpochRecord:
    raw = {"reconstruction": total, "kl": kl, "semantic": 0.0, "compression": 0.0}
    weights = {"reconstruction": 1.0, "kl": 0.1, "semantic": 0.0, "compression": 1.0}
    return EpochRecord(
        epoch=epoch,
        beta=0.1,
        raw=raw,
        weighted={k: weights[k] * v for k, v in raw.items()},
        weights=weights,
        total=total,
        grad_norm=1.0,
        grad_norm_max=1.0,
        steps=steps,
        skipped_steps=0,
        floors_engaged={},
        non_finite=(),
    )


def latent(collapsed: bool) -> LatentHealth:
    kl = (0.001, 0.002) if collapsed else (0.5, 0.7)
    return LatentHealth(
        num_samples=64,
        latent_dim=2,
        kl_per_dim=kl,
        kl_total=sum(kl),
        activity=(0.0, 0.0) if collapsed else (0.3, 0.2),
        active=(False, False) if collapsed else (True, True),
        active_units=0 if collapsed else 2,
        active_threshold=0.01,
        free_bits=0.2,
        free_bits_lambda=0.1,
        collapsed_dims=(0, 1) if collapsed else (),
        collapse_threshold=0.01,
        collapsed=collapsed,
        non_finite=0,
    )


def evidence(epochs: int, steps: int, collapsed: bool, kl=None) -> RunEvidence:
    kls = kl or [0.5] * epochs
    records = tuple(record(e, 10.0 - e, kl=kls[e], steps=steps) for e in range(epochs))
    return RunEvidence(where="run", records=records, latent=latent(collapsed))


def codes(ev: RunEvidence) -> set[str]:
    return {f.code for f in evaluate(ev)}


def test_collapse_judged_only_after_enough_steps():
    per_epoch = COLLAPSE_MIN_STEPS // 5
    early = evidence(epochs=4, steps=per_epoch, collapsed=True)  # 4/5 of the minimum
    late = evidence(epochs=5, steps=per_epoch, collapsed=True)  # exactly the minimum
    assert collapse_verdict(early).status == "not-judged"
    assert "posterior-collapse" not in codes(early)
    assert any(c.code == "posterior-collapse" for c in not_checked(early))
    assert collapse_verdict(late).status == "finding"
    assert "posterior-collapse" in codes(late)
    assert all(c.code != "posterior-collapse" for c in not_checked(late))


def test_collapse_verdict_and_finding_agree_on_every_case():
    cases = [
        evidence(5, 4, collapsed=False),
        evidence(5, 4, collapsed=True),
        evidence(2, 4, collapsed=True),
        evidence(5, 4, collapsed=True, kl=[0.1, 0.2, 0.3, 0.4, 0.5]),  # KL rising
    ]
    for ev in cases:
        verdict = collapse_verdict(ev)
        assert (verdict.status == "finding") == ("posterior-collapse" in codes(ev))
        assert verdict.reason


def test_rising_kl_is_not_collapse_and_says_why():
    ev = evidence(5, 4, collapsed=True, kl=[0.1, 0.2, 0.3, 0.4, 0.5])
    verdict = collapse_verdict(ev)
    assert verdict.status == "not-judged" and "rose" in verdict.reason


def test_not_checked_names_missing_evidence():
    ev = RunEvidence(where="run", records=(record(0, 1.0), record(1, 0.9)))
    missing = {c.code: c.reason for c in not_checked(ev)}
    assert "loss-plateau" in missing and "2" in missing["loss-plateau"]
    assert "loss-oscillation" in missing
    assert "frozen-noise" in missing and "z" in missing["frozen-noise"]
    assert {"no-grad-path", "grad-dominance", "grad-conflict", "vanishing-grad"} <= set(missing)
    assert "posterior-collapse" in missing  # no latent measured


def _totals_evidence(totals: list[float]) -> RunEvidence:
    return RunEvidence(where="run", records=tuple(record(e, t) for e, t in enumerate(totals)))


@pytest.mark.parametrize(
    ("totals", "fires"),
    [
        ([10, 9, 8, 7, 6], False),  # falling
        ([10, 11, 9, 8, 7], False),  # one 10% rise
        ([10, 11, 9, 10, 8], True),  # two rises > 5%
        ([10, 10.4, 9, 9.4, 8], False),  # two rises of 4%: below the 5% edge
        ([10, 1, 1 * OSC_SPIKE * 1.01, 1, 0.9], True),  # one spike just above the edge
        ([10, 1, 1 * OSC_SPIKE * 0.99, 1, 0.9], False),  # ... and just below it
    ],
)
def test_oscillation_edges(totals, fires):
    assert bool(loss_oscillation(_totals_evidence(totals))) is fires


def test_oscillation_needs_finite_totals():
    assert loss_oscillation(_totals_evidence([10, 11, math.nan, 12, 8])) == []


def finding(code: str, where: str, severity: str = "warning") -> Finding:
    return Finding(code, severity, f"{code} title", f"{code} at {where}", "do this", where)


def test_merge_makes_one_row_per_code_and_subject_naming_the_runs():
    merged = merge_findings(
        [
            (
                "Default",
                [finding("no-grad-path", "Default:semantic/role"), finding("x", "Default")],
            ),
            ("Balanced", [finding("no-grad-path", "Balanced:semantic/role")]),
            ("Higher KL", [finding("no-grad-path", "Higher KL:semantic/is_alive", "error")]),
        ]
    )
    rows = {(f.code, f.where): f for f in merged}
    assert set(rows) == {
        ("no-grad-path", "Default, Balanced: semantic/role"),
        ("no-grad-path", "Higher KL: semantic/is_alive"),
        ("x", "Default"),
    }
    assert rows[("no-grad-path", "Default, Balanced: semantic/role")].runs == (
        "Default",
        "Balanced",
    )
    assert merged[0].severity == "error"  # worst first across all runs


def test_merge_keeps_the_worst_severity_of_a_group():
    merged = merge_findings(
        [
            ("a", [finding("grad-conflict", "a:kl|x", "info")]),
            ("b", [finding("grad-conflict", "b:kl|x", "warning")]),
        ]
    )
    assert len(merged) == 1 and merged[0].severity == "warning"
    assert merged[0].message == "grad-conflict at b:kl|x"


def test_merge_not_checked_groups_runs_by_reason():
    merged = merge_not_checked(
        [
            ("a", [NotChecked("loss-plateau", "needs 3")]),
            ("b", [NotChecked("loss-plateau", "needs 3")]),
            ("c", [NotChecked("loss-plateau", "other")]),
        ]
    )
    assert [(m.code, m.reason, m.runs) for m in merged] == [
        ("loss-plateau", "needs 3", ("a", "b")),
        ("loss-plateau", "other", ("c",)),
    ]


@pytest.mark.parametrize(
    ("unexplained", "fires"),
    [
        ((0.0, 0.0005, 0.0009), False),
        ((0.002, 0.0011, 0.5), True),
        ((), False),
        ((math.nan,), False),
    ],
)
def test_terms_mismatch_edges(unexplained, fires):
    from meaning_transform.diagnostics.rules import terms_mismatch

    ev = RunEvidence(where="run", records=(record(0, 1.0),), unexplained=unexplained)
    found = terms_mismatch(ev)
    assert bool(found) is fires
    if fires:
        assert found[0].severity == "info" and "weights" in found[0].remedy.lower()


def test_plateau_needs_enough_steps_and_says_so():
    from meaning_transform.diagnostics.rules import loss_plateau
    from meaning_transform.diagnostics.thresholds import PLATEAU_MIN_STEPS

    def flat(steps: int) -> RunEvidence:
        records = tuple(record(e, 10.0, steps=steps) for e in range(4))
        return RunEvidence(where="run", records=records)

    short, long = flat(PLATEAU_MIN_STEPS // 4 - 1), flat(PLATEAU_MIN_STEPS // 4)
    assert loss_plateau(short) == [] and loss_plateau(long)
    assert any(c.code == "loss-plateau" and "steps" in c.reason for c in not_checked(short))
    assert all(c.code != "loss-plateau" for c in not_checked(long))


def test_a_kl_term_reported_with_a_minus_sign_is_read_as_kl():
    """AntixK's loss returns 'KLD' = -KL: a KL falling from 0.5 to 0.01 is collapse."""
    from meaning_transform.diagnostics.rules import _kl_series

    def rec(epoch: int, kld: float) -> EpochRecord:
        base = record(epoch, 10.0)
        return dataclasses.replace(base, raw={"Reconstruction_Loss": 1.0, "KLD": kld})

    records = tuple(rec(e, v) for e, v in enumerate([-0.5, -0.2, -0.01]))
    assert _kl_series(records) == [0.5, 0.2, 0.01]
    ev = RunEvidence(
        where="run",
        records=tuple(dataclasses.replace(r, steps=10) for r in records),
        latent=latent(collapsed=True),
    )
    assert collapse_verdict(ev).status == "finding"


@pytest.mark.parametrize(
    ("pair", "severity"),
    [
        (("recon", "extra"), "warning"),
        (("recon", "KLD"), "info"),
        (("reconstruction", "kl"), "info"),
    ],
)
def test_strong_conflict_with_the_kl_term_is_only_info(pair, severity):
    from meaning_transform.diagnostics.attribution import Attribution
    from meaning_transform.diagnostics.rules import grad_conflict

    a, b = pair
    att = Attribution(
        terms=pair,
        weights={a: 1.0, b: 1.0},
        total_of=pair,
        norm={a: 1.0, b: 1.0},
        weighted_norm={a: 1.0, b: 1.0},
        share={a: 0.5, b: 0.5},
        cosine={a: {a: 1.0, b: -0.9}, b: {a: -0.9, b: 1.0}},
        total_norm=1.0,
        method="loop",
        fallback_reason=None,
        zero_gradient=(),
        detached=(),
        conflicts=((a, b),),
    )
    found = grad_conflict(RunEvidence(where="run", attributions=(att,) * 4))
    assert [f.severity for f in found] == [severity]
