"""The seeded-fault benchmark (benchmarks/faults/run.py) on its --quick grid.

The quick grid (two MLP families on digits, seed 0) must produce its tables with their
sections and columns in order, run the baseline (baseline.py) on the same runs, give
latencies as whole steps or "–", raise no warning or error on the healthy runs, and recall
the frozen-noise, NaN and dead-ReLU faults. The per-epoch findings that measure latency
must not change the run. It runs in-process in about ten seconds and is deterministic
(fixed seeds, one thread).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")  # the data sets ship inside scikit-learn (the dev extra)

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "faults" / "run.py"


def _load():
    spec = importlib.util.spec_from_file_location("fault_benchmark", PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load()

SECTIONS = {  # title -> columns, in order
    "Per fault (mtx)": bench.PER_FAULT_HEADERS,
    "Per finding code (mtx)": bench.PER_CODE_HEADERS,
    "Recall by family (mtx)": ("fault", "mlp-gauss", "mlp-bernoulli"),
    "Healthy runs (mtx)": ("family", "control", "false alarms", "codes"),
    "Per fault (baseline)": bench.PER_FAULT_HEADERS,
    "Per finding code (baseline)": bench.PER_CODE_HEADERS,
    "Healthy runs (baseline)": ("family", "control", "false alarms", "codes"),
    "mtx vs baseline": ("metric", "mtx", "baseline"),
    "mtx vs baseline, per fault": (
        "fault",
        "mtx recall",
        "baseline recall",
        "mtx lat.",
        "base lat.",
        "baseline fired",
    ),
}


@pytest.fixture(scope="module")
def quick():
    return bench.run_grid(bench.QUICK)


def test_the_column_lists_are_the_documented_ones():
    assert bench.PER_FAULT_HEADERS[:7] == (
        "fault",
        "recall",
        "precision",
        "+consequences",
        "latency",
        "steps",
        "s/run",
    )
    assert set(bench.PER_FAULT_HEADERS[7:]) == {
        "expected",
        "also fired (unexpected)",
        "marked consequences",
        "not checked",
    }
    assert bench.PER_CODE_HEADERS == (
        "code",
        "expected by",
        "recall",
        "precision",
        "latency",
        "fired on healthy",
    )


def test_quick_grid_produces_every_section_with_its_columns(quick):
    secs = bench.sections(quick)
    assert [s.title for s in secs] == list(SECTIONS)
    for s in secs:
        assert s.headers == SECTIONS[s.title], s.title
        assert s.rows, s.title
        assert all(len(r) == len(s.headers) for r in s.rows), s.title
    assert not [r for r in quick.mtx if r.error], [r.error for r in quick.mtx if r.error]


def test_per_code_rows_are_codes_and_per_fault_rows_are_faults(quick):
    secs = {s.title: s for s in bench.sections(quick)}
    fault_rows = [r[0] for r in secs["Per fault (mtx)"].rows]
    assert fault_rows == [f for f in bench.QUICK_FAULTS if f != "healthy"]
    codes = [r[0] for r in secs["Per finding code (mtx)"].rows]
    assert {"frozen-noise", "nonfinite-loss", "dying-relu", "unused-params"} <= set(codes)
    assert not set(codes) & set(bench.FAULTS) - {"frozen-noise", "dying-relu", "unused-params"}
    # recall and precision cells are "a/b (p%)" or "–", in their columns
    frac = re.compile(r"^(\d+/\d+ \(\d+%\)|–)$")
    for row in secs["Per finding code (mtx)"].rows:
        assert frac.match(row[2]) and frac.match(row[3]) and frac.match(row[5]), row


def test_the_baseline_runs_on_the_same_cells(quick):
    assert [(r.family, r.data, r.fault, r.seed) for r in quick.baseline] == [
        (r.family, r.data, r.fault, r.seed) for r in quick.mtx
    ]
    assert all(r.detector == "baseline" for r in quick.baseline)
    assert {c for r in quick.baseline for c in r.fired} <= set(bench.BASELINE.CODES)
    nan = [r for r in quick.baseline if r.fault == "nan-log0"]
    assert nan and all(r.found and r.sources["nonfinite-grad"] for r in nan)
    assert all("detect_anomaly" in (r.error or "") for r in nan)  # the run stopped there


def test_latencies_are_steps_or_a_dash(quick):
    for r in quick.mtx + quick.baseline:
        assert r.latency is None or (isinstance(r.latency, int) and 0 < r.latency <= r.steps + 1)
        assert (r.latency is not None) == r.found, (r.fault, r.family, r.detector)
        assert all(isinstance(v, int) for v in r.first_step.values())
    for s in bench.sections(quick):
        for col in ("latency", "mtx lat.", "base lat."):
            if col in s.headers:
                i = s.headers.index(col)
                assert all(re.match(r"^(\d+(\.5)?|–)$", r[i]) for r in s.rows), (s.title, col)


def test_text_report_and_markdown(quick):
    text = bench.report(quick)
    assert text.startswith("Overall (mtx): recall")
    assert "Overall (baseline): recall" in text
    for title in SECTIONS:
        assert title in text
    md = bench.markdown(quick, "python benchmarks/faults/run.py --quick")
    assert md.startswith("Reproduce: `python benchmarks/faults/run.py --quick`")
    for title, headers in SECTIONS.items():
        assert f"#### {title}" in md
        assert "| " + " | ".join(headers) + " |" in md


def test_main_quick_writes_json_and_markdown(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run_grid", lambda grid, **kw: _QUICK_CACHE)
    out, md = tmp_path / "quick.json", tmp_path / "quick.md"
    text = bench.main(["--quick", "--json", str(out), "--markdown", str(md)])
    assert "Total time:" in text and "false-alarm rate" in text
    data = json.loads(out.read_text())
    assert data["runs"] and data["baseline_runs"]
    assert {"latency", "first_step", "consequences"} <= set(data["runs"][0])
    assert "#### Per finding code (mtx)" in md.read_text()


_QUICK_CACHE = None


@pytest.fixture(autouse=True)
def _cache(quick):
    global _QUICK_CACHE
    _QUICK_CACHE = quick


def test_healthy_runs_raise_no_warning_or_error(quick):
    healthy = [r for r in quick.mtx + quick.baseline if r.fault == "healthy"]
    assert len(healthy) == 4
    assert all(r.fired == [] for r in healthy), [(r.family, r.fired) for r in healthy]


@pytest.mark.parametrize("fault", ["frozen-noise", "nan-log0", "dying-relu"])
def test_fault_is_recalled(quick, fault):
    runs = [r for r in quick.mtx if r.fault == fault]
    assert runs
    assert all(r.found for r in runs), [(r.family, r.fired) for r in runs]


def test_latency_checks_do_not_change_the_run():
    """Findings at every epoch end (latency) leave the model and the RNG as without them."""
    fam, fault = bench.FAMILIES["mlp-gauss"], bench.FAULTS["healthy"]
    states = []
    for every in (1, 0):
        torch.manual_seed(0)
        r = bench.run_one(fam, "digits", fault, 0, 3, latency_every=every)
        states.append((r.fired, r.info, torch.random.get_rng_state()))
    assert states[0][:2] == states[1][:2]
    assert torch.equal(states[0][2], states[1][2])


def test_quick_grid_is_deterministic(quick):
    again = bench.run_grid(bench.QUICK, baseline=False)
    assert [(r.fault, r.family, r.fired, r.info, r.steps, r.latency) for r in quick.mtx] == [
        (r.fault, r.family, r.fired, r.info, r.steps, r.latency) for r in again.mtx
    ]


def test_the_watching_baseline_equals_a_retrained_one(quick):
    """The baseline read on the Doctor's run gives what a plain run watched by it gives."""
    again = bench.run_grid(bench.QUICK, retrain=True)
    key = lambda r: (r.family, r.fault, r.fired, r.first_step, r.sources, r.latency)  # noqa: E731
    assert [key(r) for r in quick.baseline] == [key(r) for r in again.baseline]
    assert all(r.retrained for r in again.baseline)
