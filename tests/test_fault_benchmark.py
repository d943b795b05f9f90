"""The seeded-fault benchmark (benchmarks/faults/run.py) on its --quick grid.

The quick grid (two MLP families on digits, seed 0) must produce its tables, raise no
warning or error on the healthy runs, and recall the frozen-noise, NaN and dead-ReLU
faults. It runs in-process in a few seconds and is deterministic (fixed seeds, one thread).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

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


@pytest.fixture(scope="module")
def quick():
    results, skips = bench.run_grid(bench.QUICK)
    return results, skips


def test_quick_grid_produces_the_tables(quick):
    results, _ = quick
    text = bench.report(results)
    assert "Per fault" in text and "Recall by family" in text and "Healthy runs" in text
    assert "Overall: recall" in text
    assert not [r for r in results if r.error], [r.error for r in results if r.error]


def test_main_quick_prints_the_tables_and_the_total_time(tmp_path, capsys):
    out = tmp_path / "quick.json"
    text = bench.main(["--quick", "--json", str(out)])
    assert "Total time:" in text and "false-alarm rate" in text
    assert out.exists() and '"runs"' in out.read_text()


def test_healthy_runs_raise_no_warning_or_error(quick):
    results, _ = quick
    healthy = [r for r in results if r.fault == "healthy"]
    assert healthy
    assert all(r.fired == [] for r in healthy), [(r.family, r.fired) for r in healthy]


@pytest.mark.parametrize("fault", ["frozen-noise", "nan-log0", "dying-relu"])
def test_fault_is_recalled(quick, fault):
    results, _ = quick
    runs = [r for r in results if r.fault == fault]
    assert runs
    assert all(r.found for r in runs), [(r.family, r.fired) for r in runs]


def test_quick_grid_is_deterministic(quick):
    results, _ = quick
    again, _ = bench.run_grid(bench.QUICK)
    assert [(r.fault, r.family, r.fired, r.info, r.steps) for r in results] == [
        (r.fault, r.family, r.fired, r.info, r.steps) for r in again
    ]
