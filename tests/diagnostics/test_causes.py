"""Root cause first: consequences are marked, demoted to info and placed after their cause."""

from __future__ import annotations

from meaning_transform.diagnostics.causes import CAUSES, ORDER, cause_of, mark_consequences
from meaning_transform.diagnostics.findings import Finding, exit_code_for


def _f(code: str, severity: str = "warning", where: str = "run") -> Finding:
    return Finding(code, severity, f"{code} title", f"{code} message", f"{code} remedy", where)  # type: ignore[arg-type]


def test_a_cause_only_names_codes_after_it_so_the_graph_has_no_cycle():
    for i, (cause, why, consequences) in enumerate(CAUSES):
        assert why and consequences, cause
        assert cause not in consequences
        for code in consequences:
            if code in ORDER:
                assert ORDER.index(code) > i, (cause, code)
    assert len(set(ORDER)) == len(ORDER)


def test_a_nan_run_leads_with_the_nan_and_marks_the_rest():
    found = [_f("exploding-grad"), _f("loss-plateau"), _f("nonfinite-loss", "error")]
    marked = mark_consequences(found)
    assert [f.code for f in marked] == ["nonfinite-loss", "exploding-grad", "loss-plateau"]
    lead, *rest = marked
    assert (
        lead.severity == "error"
        and lead.consequence_of == ""
        and lead.remedy == ("nonfinite-loss remedy")
    )
    for f in rest:
        assert f.severity == "info" and f.consequence_of == "nonfinite-loss"
        assert "consequence of nonfinite-loss" in f.title
        assert f.remedy.startswith("Fix nonfinite-loss first")
        assert f.message == f"{f.code} message"  # what was seen is kept
    # the exit code follows the cause alone
    assert exit_code_for([f.severity for f in marked], "warning") == 1
    assert exit_code_for([f.severity for f in rest], "warning") == 0


def test_without_its_cause_a_symptom_stands_as_a_fault():
    marked = mark_consequences([_f("exploding-grad"), _f("unused-params")])
    assert [(f.code, f.severity, f.consequence_of) for f in marked] == [
        ("exploding-grad", "warning", ""),
        ("unused-params", "warning", ""),
    ]


def test_the_earliest_cause_present_leads_a_chain():
    found = [_f("exploding-grad"), _f("nonfinite-loss", "error"), _f("kl-formula", "error")]
    marked = {f.code: f for f in mark_consequences(found)}
    assert marked["kl-formula"].consequence_of == ""
    assert marked["nonfinite-loss"].consequence_of == "kl-formula"
    assert marked["exploding-grad"].consequence_of == "kl-formula"


def test_an_info_finding_causes_nothing():
    marked = mark_consequences([_f("posterior-collapse", "info"), _f("zero-loss")])
    assert {f.code: f.severity for f in marked} == {
        "posterior-collapse": "info",
        "zero-loss": "warning",
    }


def test_detached_reconstruction_starves_the_decoder():
    found = [
        _f("no-grad-path", "error", "run:recon"),
        _f("unused-params"),
        _f("posterior-collapse"),
        _f("scale-imbalance"),
        _f("loss-plateau"),
    ]
    marked = mark_consequences(found)
    assert marked[0].code == "no-grad-path" and marked[0].severity == "error"
    assert {f.consequence_of for f in marked[1:]} == {"no-grad-path"}


def test_dead_relus_lead_vanishing_gradients_and_lost_gradient_paths():
    found = [_f("no-grad-path", "error"), _f("vanishing-grad"), _f("dying-relu")]
    marked = mark_consequences(found)
    assert [f.code for f in marked] == ["dying-relu", "no-grad-path", "vanishing-grad"]
    assert [f.consequence_of for f in marked] == ["", "dying-relu", "dying-relu"]


def test_cause_of_reads_only_the_codes_present():
    assert cause_of("loss-plateau", ["loss-plateau"]) is None
    cause, why = cause_of("loss-plateau", ["no-grad-path", "dying-relu"]) or ("", "")
    assert cause == "dying-relu" and why


def _at(code: str, step: int, severity: str = "error") -> Finding:
    return Finding(code, severity, code, code, code, "run", {"first_step": step})  # type: ignore[arg-type]


def test_a_gradient_that_went_nan_before_the_loss_leads_it():
    """sqrt at 0: the loss is finite, its gradient NaN; the update makes the loss NaN."""
    marked = mark_consequences(
        [_at("nonfinite-loss", 1), _at("nonfinite-grad", 0), _f("exploding-grad")]
    )
    assert [(f.code, f.consequence_of) for f in marked] == [
        ("nonfinite-grad", ""),
        ("exploding-grad", "nonfinite-grad"),
        ("nonfinite-loss", "nonfinite-grad"),
    ]


def test_a_loss_that_went_nan_first_leads_its_gradient():
    marked = mark_consequences([_at("nonfinite-loss", 3), _at("nonfinite-grad", 3)])
    assert [(f.code, f.consequence_of) for f in marked] == [
        ("nonfinite-loss", ""),
        ("nonfinite-grad", "nonfinite-loss"),
    ]


def test_a_term_without_a_gradient_is_not_blamed_on_exploding_gradients():
    """A hard threshold has no gradient whatever the others do: no-grad-path stays a cause."""
    marked = mark_consequences([_f("no-grad-path", "error"), _f("exploding-grad")])
    assert {f.code: f.consequence_of for f in marked} == {"no-grad-path": "", "exploding-grad": ""}


def test_steps_skipped_on_a_nan_gradient_follow_the_gradient():
    """The built-in loop skips a step whose gradient is NaN: nonfinite-loss fires with every
    loss value finite (no first step of its own), and the gradient leads."""
    loss = Finding("nonfinite-loss", "error", "l", "l", "l", "run", {"first_step": None})
    marked = mark_consequences([loss, _at("nonfinite-grad", 0)])
    assert [(f.code, f.consequence_of) for f in marked] == [
        ("nonfinite-grad", ""),
        ("nonfinite-loss", "nonfinite-grad"),
    ]
