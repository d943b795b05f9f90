from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from meaning_transform.losses.annealing import SCHEDULES, beta_annealing
from meaning_transform.studies.anneal import WHILE_BETA_CHANGES

FAST = ("--batch-size", "0", "--json")  # full batch: one step per epoch
# anneal-demo's epochs are the same rows as debug-loss's (no flat reconstruction/kl keys)
EPOCH_ROW = [
    "epoch",
    "beta",
    "components",
    "total",
    "total_flags",
    "grad_norm",
    "grad_norm_max",
    "steps",
    "skipped_steps",
    "non_finite",
]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_betas_follow_the_schedule_and_weight_the_kl_term(mtx, schedule):
    n = 6
    run = mtx(
        "anneal-demo",
        *FAST,
        "--schedule",
        schedule,
        "--epochs",
        str(n),
        "--min-beta",
        "0.1",
        "--max-beta",
        "0.8",
        "--cycles",
        "2",
        "--ratio",
        "0.5",
    )
    assert run.exit_code == 0, run.stderr
    out = run.json
    assert out["command"] == "anneal-demo"
    assert out["schedule"] == {
        "type": schedule,
        "min_beta": 0.1,
        "max_beta": 0.8,
        "cycles": 2,
        "ratio": 0.5,
    }
    expected = [beta_annealing(e, n, 0.1, 0.8, schedule, cycles=2, ratio=0.5) for e in range(n)]
    assert [e["epoch"] for e in out["epochs"]] == list(range(n))
    assert [e["beta"] for e in out["epochs"]] == expected
    assert out["beta_curve"] == expected
    if schedule != "cyclical":
        assert expected[0] == 0.1 and expected[-1] == 0.8
    assert len(set(expected)) > 1  # the schedule really moves β
    w_sem = out["weights"]["semantic"]
    assert out["weights"] == {"reconstruction": 1.0, "semantic": 0.5}
    for e in out["epochs"]:
        assert list(e) == EPOCH_ROW
        raw = {name: c["raw"] for name, c in e["components"].items()}
        kl = e["components"]["kl"]
        assert kl["weighted"] == pytest.approx(e["beta"] * kl["raw"], rel=1e-12)
        assert kl["weight"] == e["beta"]
        # The total is the loss the optimizer saw: it only adds up with β as the KL weight.
        assert e["total"] == pytest.approx(
            raw["reconstruction"] + e["beta"] * raw["kl"] + w_sem * raw["semantic"], rel=1e-5
        )


def test_cyclical_matches_fu_et_al(mtx):
    run = mtx(
        "anneal-demo",
        *FAST,
        "--schedule",
        "cyclical",
        "--epochs",
        "16",
        "--cycles",
        "4",
        "--ratio",
        "0.5",
    )
    assert run.exit_code == 0, run.stderr
    assert run.json["beta_curve"] == [0.0, 0.5, 1.0, 1.0] * 4


def test_defaults_and_byte_identical_json_for_the_same_seed(mtx):
    # 5 epochs of 4 steps: enough for every rule, so only the β-trend ones are set aside
    a = mtx("anneal-demo", "--json", "--epochs", "5", "--seed", "7")
    b = mtx("anneal-demo", "--json", "--epochs", "5", "--seed", "7")
    c = mtx("anneal-demo", "--json", "--epochs", "5", "--seed", "8")
    assert a.exit_code == 0, a.stderr
    assert a.stdout == b.stdout
    assert a.stdout != c.stdout
    out = a.json
    assert out["schedule"] == {
        "type": "sigmoid",
        "min_beta": 0.0,
        "max_beta": 1.0,
        "cycles": 4,
        "ratio": 0.5,
    }
    assert out["reduction"] == "mean"
    assert out["reductions"] == {"reconstruction": "mean", "kl": "mean", "semantic": "mean"}
    # β moves, so the rules on the trend of the total are set aside, and say so.
    assert out["not_checked"] == [
        {"code": "loss-oscillation", "reason": WHILE_BETA_CHANGES, "runs": ["sigmoid"]},
        {"code": "loss-plateau", "reason": WHILE_BETA_CHANGES, "runs": ["sigmoid"]},
    ]
    # the one run's own diagnosis lists the same checks
    assert [(c["code"], c["reason"]) for c in out["diagnosis"]["not_checked"]] == [
        (c["code"], c["reason"]) for c in out["not_checked"]
    ]


def test_constant_beta_keeps_every_rule(mtx):
    # 5 epochs of 4 steps: enough for every rule to run (none lacks epochs or steps)
    out = mtx(
        "anneal-demo", "--json", "--epochs", "5", "--min-beta", "0.3", "--max-beta", "0.3"
    ).json
    assert out["beta_curve"] == [0.3] * 5
    assert out["not_checked"] == []


def test_non_agent_data_switches_semantic_off(mtx, tmp_path):
    path = tmp_path / "seven.npy"
    np.save(path, np.random.default_rng(0).normal(size=(40, 7)))
    out = mtx("anneal-demo", *FAST, "--epochs", "2", "--data", str(path)).json
    assert out["semantic_applicable"] is False
    assert out["weights"]["semantic"] == 0.0
    assert out["data"]["n_features"] == 7


def test_plot_writes_png_atomically(mtx, tmp_path):
    path = tmp_path / "beta.png"
    run = mtx("anneal-demo", *FAST, "--epochs", "2", "--plot", str(path))
    assert run.exit_code == 0, run.stderr
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run.json["config"]["plot"] == str(path)
    assert "plot" not in run.json  # the path is part of the config, not a key of its own
    assert [p.name for p in tmp_path.iterdir()] == ["beta.png"]  # no temp file left


def test_table_output_for_people(mtx):
    run = mtx("anneal-demo", "--epochs", "2", "--batch-size", "0")
    assert run.exit_code == 0, run.stderr
    assert "sigmoid" in run.stdout and "b.KL" in run.stdout  # piped: ASCII (β·KL on a terminal)


def test_schedule_names_match_the_library():
    from meaning_transform.cli.anneal_demo import SCHEDULE_TYPES

    assert SCHEDULE_TYPES == SCHEDULES


def test_cli_import_does_not_import_torch():
    code = "import sys, meaning_transform.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--schedule", "step"), ("--schedule", "linear|sigmoid|cyclical|exponential", "step")),
        (("--min-beta", "-0.1"), ("--min-beta",)),
        (("--max-beta", "nan"), ("--max-beta",)),
        (("--min-beta", "0.5", "--max-beta", "0.2"), ("--max-beta", "--min-beta")),
        (("--ratio", "0"), ("--ratio", "(0, 1]")),
        (("--ratio", "1.5"), ("--ratio", "(0, 1]")),
        (("--cycles", "0"), ("--cycles",)),
        (("--schedule", "cyclical", "--epochs", "6", "--cycles", "4"), ("--cycles", "--epochs")),
        (("--epochs", "0"), ("--epochs",)),
        (("--device", "tpu"), ("--device", "tpu")),
    ],
)
def test_bad_options_exit_2_with_one_line(mtx, assert_bad_input, args, words):
    assert_bad_input(mtx("anneal-demo", "--json", *args), *words)


def test_existing_plot_needs_force(mtx, assert_bad_input, tmp_path):
    existing = tmp_path / "exists.png"
    existing.write_bytes(b"keep")
    assert_bad_input(mtx("anneal-demo", "--epochs", "2", "--plot", str(existing)), "already exists")
    assert existing.read_bytes() == b"keep"
    run = mtx("anneal-demo", *FAST, "--epochs", "2", "--plot", str(existing), "--force")
    assert run.exit_code == 0, run.stderr
    assert existing.read_bytes()[:4] == b"\x89PNG"
