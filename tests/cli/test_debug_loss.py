from __future__ import annotations

import numpy as np
import pytest

FAST = ("--epochs", "2", "--json")


def test_presets_run_from_fresh_models_with_their_weights(mtx):
    run = mtx("debug-loss", *FAST, "--batch-size", "0")
    assert run.exit_code == 0, run.stderr
    out = run.json
    assert out["command"] == "debug-loss"
    assert out["device"] == "cpu" and out["config"]["device"] == "auto"  # used vs asked
    weights = {r["name"]: r["weights"] for r in out["runs"]}
    assert weights == {
        "Default": {"reconstruction": 1.0, "kl": 0.1, "semantic": 0.5},
        "Higher KL": {"reconstruction": 1.0, "kl": 1.0, "semantic": 0.5},
        "No Semantic": {"reconstruction": 1.0, "kl": 0.1, "semantic": 0.0},
        "Balanced": {"reconstruction": 1.0, "kl": 1.0, "semantic": 1.0},
    }
    # Full batch: epoch 0 is one step measured before any update, so every configuration
    # sees the same reconstruction only if each starts from a fresh model at the same seed.
    firsts = {r["epochs"][0]["components"]["reconstruction"]["raw"] for r in out["runs"]}
    assert len(firsts) == 1
    for r in out["runs"]:
        comps = r["epochs"][0]["components"]
        assert comps["kl"]["weighted"] == pytest.approx(comps["kl"]["raw"] * r["weights"]["kl"])
        shares = sum(c["share"] for c in comps.values())
        assert shares == pytest.approx(1.0)
        assert r["reduction"]["reconstruction"] == "mean"
    no_sem = next(r for r in out["runs"] if r["name"] == "No Semantic")
    assert "off" in no_sem["final"]["components"]["semantic"]["flags"]
    # each run's diagnosis is its own; the summary repeats its finding codes
    for r, row in zip(out["runs"], out["summary"], strict=True):
        assert row["name"] == r["name"]
        assert not {"attribution", "latent", "findings"} & set(r)
        assert list(r["diagnosis"]) == [
            "attribution",
            "latent",
            "collapse",
            "findings",
            "not_checked",
        ]
        assert row["findings"] == r["diagnosis"]["findings"]
        assert all(isinstance(code, str) for code in row["findings"])


def test_single_configuration_from_weight_options(mtx):
    out = mtx("debug-loss", *FAST, "--kl-weight", "0.3", "--semantic-weight", "0").json
    assert [r["name"] for r in out["runs"]] == ["Custom"]
    assert out["runs"][0]["weights"] == {"reconstruction": 1.0, "kl": 0.3, "semantic": 0.0}
    assert out["exit_code"] == 0
    # the options as given, next to the weights as used (unset ones are the presets')
    assert {k: out["config"][k] for k in ("recon_weight", "kl_weight", "semantic_weight")} == {
        "recon_weight": None,
        "kl_weight": 0.3,
        "semantic_weight": 0.0,
    }


def test_reported_grad_norm_is_the_norm_before_clipping(mtx):
    out = mtx("debug-loss", *FAST, "--kl-weight", "0.1", "--batch-size", "0").json
    epoch = out["runs"][0]["final"]
    assert epoch["steps"] == 1
    assert epoch["grad_norm"] == epoch["grad_norm_max"] > 0


def test_same_seed_gives_byte_identical_json(mtx):
    a = mtx("debug-loss", *FAST, "--seed", "7")
    b = mtx("debug-loss", *FAST, "--seed", "7")
    c = mtx("debug-loss", *FAST, "--seed", "8")
    assert a.stdout == b.stdout
    assert a.stdout != c.stdout


def test_sum_reduction_is_shown(mtx):
    out = mtx("debug-loss", *FAST, "--kl-weight", "0.1", "--reduction", "sum").json
    assert out["runs"][0]["reduction"] == {"reconstruction": "sum", "kl": "sum", "semantic": "sum"}
    assert out["reduction"] == out["config"]["reduction"] == "sum"


def test_user_data_file(mtx, agent_file):
    out = mtx("debug-loss", *FAST, "--kl-weight", "0.1", "--data", str(agent_file)).json
    assert out["data"]["source"] == str(agent_file)
    assert out["data"]["n_samples"] == 64


def test_non_agent_data_switches_semantic_off_for_presets(mtx, tmp_path):
    path = tmp_path / "seven.npy"
    np.save(path, np.random.default_rng(0).normal(size=(40, 7)))
    out = mtx("debug-loss", *FAST, "--data", str(path)).json
    assert out["semantic_applicable"] is False
    assert all(r["weights"]["semantic"] == 0.0 for r in out["runs"])


def test_table_output_for_people(mtx):
    run = mtx("debug-loss", "--epochs", "1", "--kl-weight", "0.1")
    assert run.exit_code == 0
    assert "reconstruction" in run.stdout and "Summary" in run.stdout


def test_plot_writes_png(mtx, tmp_path):
    path = tmp_path / "loss.png"
    run = mtx("debug-loss", *FAST, "--kl-weight", "0.1", "--plot", str(path))
    assert run.exit_code == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run.json["config"]["plot"] == str(path)
    assert "plot" not in run.json  # the path is part of the config, not a key of its own
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]  # no temp file left


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--epochs", "-1"), ("--epochs",)),
        (("--epochs", "0"), ("--epochs",)),
        (("--kl-weight", "-0.5"), ("--kl-weight",)),
        (("--lr", "0"), ("--lr",)),
        (("--device", "tpu"), ("--device", "tpu")),
        (("--fail-on", "sometimes"), ("--fail-on",)),
        (("--reduction", "median"), ("--reduction",)),
        (("--data", "/nonexistent/x.npy"), ("not found",)),
    ],
)
def test_bad_options_exit_2_with_one_line(mtx, assert_bad_input, args, words):
    assert_bad_input(mtx("debug-loss", "--epochs", "1", *args), *words)


def test_bad_data_files(mtx, assert_bad_input, tmp_path):
    nan = tmp_path / "nan.npy"
    arr = np.zeros((8, 10))
    arr[2, 3] = np.nan
    np.save(nan, arr)
    assert_bad_input(mtx("debug-loss", "--epochs", "1", "--data", str(nan)), "non-finite")
    csv = tmp_path / "bad.csv"
    csv.write_text("1,2,3\n4,oops,6\n")
    assert_bad_input(mtx("debug-loss", "--epochs", "1", "--data", str(csv)), "oops")
    seven = tmp_path / "seven.npy"
    np.save(seven, np.zeros((8, 7)))
    assert_bad_input(
        mtx("debug-loss", "--epochs", "1", "--semantic-weight", "0.5", "--data", str(seven)),
        "10 features",
    )


def test_plot_path_problems(mtx, assert_bad_input, tmp_path):
    existing = tmp_path / "exists.png"
    existing.write_bytes(b"keep")
    assert_bad_input(mtx("debug-loss", "--epochs", "1", "--plot", str(existing)), "already exists")
    assert existing.read_bytes() == b"keep"
    assert_bad_input(
        mtx("debug-loss", "--epochs", "1", "--plot", str(tmp_path / "no" / "x.png")),
        "does not exist",
    )
    run = mtx("debug-loss", *FAST, "--kl-weight", "0.1", "--plot", str(existing), "--force")
    assert run.exit_code == 0
    assert existing.read_bytes()[:4] == b"\x89PNG"


def test_one_row_of_data_is_bad_input_and_odd_batches_train(mtx, assert_bad_input, tmp_path):
    one = tmp_path / "one.npy"
    np.save(one, np.random.default_rng(0).random((1, 10)))
    assert_bad_input(mtx("debug-loss", "--epochs", "1", "--data", str(one)), "at least 2 rows")
    odd = tmp_path / "odd.npy"
    np.save(odd, np.random.default_rng(0).random((129, 10)))
    run = mtx(
        "debug-loss",
        "--epochs",
        "1",
        "--kl-weight",
        "0.1",
        "--batch-size",
        "128",
        "--data",
        str(odd),
        "--json",
    )
    assert run.exit_code == 0, run.stderr
    assert run.json["runs"][0]["final"]["steps"] == 1  # the single last sample joined batch 1
