from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from meaning_transform.cli import app
from meaning_transform.model import MeaningVAE

AGENT_NAMES = [
    "x",
    "y",
    "health",
    "has_target",
    "energy",
    "role_0",
    "role_1",
    "role_2",
    "role_3",
    "role_4",
]
# Every key of a data kind's section, in the order the JSON (the dataclass) has them.
SECTIONS = [
    "kind",
    "data",
    "agent_layout",
    "weights",
    "reduction",
    "batch_size",
    "output_activation",
    "parameters",
    "untrained_pass",
    "measured_on",
    "kl_terms",
    "recon_per_feature",
    "gradients",
    "annealing",
    "records",
    "diagnosis",
]


def _json(*args: str) -> dict:
    import json

    result = CliRunner().invoke(app, ["debug-extended", "--json", *args])
    assert result.exit_code in (0, 1), (result.exit_code, result.stderr)
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def all_kinds() -> dict:
    """One small run over every kind, shared by the tests that only read it."""
    return _json("--epochs", "1", "--batch-size", "0", "--samples", "64")


@pytest.fixture(scope="module")
def normal() -> dict:
    """Normal data, 2 epochs of 3 steps (256 samples, batch 100: 100 + 100 + 56)."""
    return _json("--data-kind", "normal", "--epochs", "2", "--batch-size", "100")


def _params(kind: dict) -> dict[str, dict]:
    return {p["name"]: p for p in kind["parameters"]}


def test_all_kinds_appear_with_every_section(all_kinds):
    assert all_kinds["command"] == "debug-extended"
    assert all_kinds["data"]["kind"] == "all"
    assert all_kinds["data"]["source"] == ("synthetic:agent_states,normal,uniform,binary,one_hot")
    assert [k["kind"] for k in all_kinds["kinds"]] == [
        "agent_states",
        "normal",
        "uniform",
        "binary",
        "one_hot",
    ]
    for kind in all_kinds["kinds"]:
        assert set(SECTIONS) <= set(kind), kind["kind"]
        assert kind["data"]["n_samples"] == 64
        # The semantic term is on for agent states only, though every kind has 10 features.
        assert (kind["weights"]["semantic"] > 0) == (kind["kind"] == "agent_states")
        assert kind["agent_layout"] == (kind["kind"] == "agent_states")
        # Linear output for real-valued data, sigmoid for data in [0, 1].
        assert kind["output_activation"] == ("none" if kind["kind"] == "normal" else "sigmoid")
    kinds = {k["kind"] for k in all_kinds["kinds"]}
    for finding in all_kinds["findings"]:
        assert finding["runs"] and set(finding["runs"]) <= kinds
        assert all(
            finding["code"] in by["diagnosis"]["findings"]
            for by in all_kinds["kinds"]
            if by["kind"] in finding["runs"]
        )
    assert all_kinds["exit_code"] == int(
        any(f["severity"] == "error" for f in all_kinds["findings"])
    )


def test_healthy_default_has_no_parameter_flagged(all_kinds):
    for kind in all_kinds["kinds"]:
        params = _params(kind)
        assert len(params) == 22
        assert {name: p["flags"] for name, p in params.items() if p["flags"]} == {}
        # The original's false alarms are present in the model and still not flagged:
        # batch-norm shifts start at exactly zero (std 0) and scales at exactly one.
        shift = params["encoder.layers.0.norm.bias"]
        scale = params["encoder.layers.0.norm.weight"]
        assert shift["role"] == "norm_bias" and shift["max"] == shift["min"] == 0.0
        assert scale["role"] == "norm_weight" and scale["std"] == 0.0 and scale["mean"] == 1.0
        assert params["decoder.fc_out.weight"]["shape"] == [10, 64]


def test_kl_terms_add_up_to_the_kl_per_dimension(normal):
    kind = normal["kinds"][0]
    health = kind["diagnosis"]["latent"]
    latent_dim = health["latent_dim"]
    assert latent_dim == 4
    assert len(health["kl_per_dim"]) == latent_dim
    kl = kind["kl_terms"]
    terms = kl["terms"]
    assert list(terms) == ["one", "log_var", "neg_mu_sq", "neg_exp_log_var"]
    assert terms["one"] == {"mean": 1.0, "std": 0.0, "min": 1.0, "max": 1.0}
    # Term means are over samples × latents: KL per sample = -0.5 * Z * (sum of the means).
    from_terms = -0.5 * latent_dim * sum(t["mean"] for t in terms.values())
    assert from_terms == pytest.approx(sum(health["kl_per_dim"]), rel=1e-5)
    assert kl["kl_per_sample_mean"] == pytest.approx(from_terms, rel=1e-5)
    assert kl["abs_difference"] < 1e-9
    assert terms["neg_mu_sq"]["max"] <= 0.0 and terms["neg_exp_log_var"]["max"] < 0.0
    assert health["kl_total"] == pytest.approx(sum(health["kl_per_dim"]), rel=1e-9)
    assert health["active_units"] == sum(health["active"])
    assert health["free_bits"] == pytest.approx(
        sum(max(health["free_bits_lambda"], v) for v in health["kl_per_dim"])
    )
    # The latent table is what the rules judged, over all samples.
    assert health["num_samples"] == kind["data"]["n_samples"] == 256
    assert kind["diagnosis"]["collapse"]["code"] == "posterior-collapse"


def test_gradient_hooks_capture_every_training_step(normal):
    kind = normal["kinds"][0]
    grads = kind["gradients"]
    assert grads["training_steps"] == 2 * 3
    assert grads["captured_steps"] == grads["training_steps"]
    assert grads["hooks_registered"] == len(kind["parameters"]) == len(grads["parameters"])
    assert sum(r["steps"] for r in kind["records"]) == grads["training_steps"]
    by_name = {p["name"]: p for p in grads["parameters"]}
    for name, stats in by_name.items():
        assert 0 <= stats["mean_norm"] <= stats["max_norm"], name
    # Biases feeding batch norm get a ~0 gradient by design, and are marked as such.
    centred = [
        "encoder.layers.0.linear.bias",
        "encoder.layers.1.linear.bias",
        "decoder.layers.0.linear.bias",
        "decoder.layers.1.linear.bias",
    ]
    assert grads["batch_norm_centred"] == centred
    assert [n for n, p in by_name.items() if p["batch_norm_centred"]] == centred
    assert by_name["encoder.layers.0.linear.bias"]["max_norm"] < 1e-5
    assert by_name["decoder.fc_out.weight"]["mean_norm"] > 1e-3
    assert grads["never_reached"] == []


def test_final_total_norm_is_what_clip_grad_norm_returned():
    out = _json("--data-kind", "uniform", "--epochs", "2", "--batch-size", "0", "--samples", "64")
    kind = out["kinds"][0]
    assert kind["records"][-1]["steps"] == 1  # full batch: the last epoch is the final step
    assert kind["gradients"]["final_total_norm"] == pytest.approx(
        kind["records"][-1]["grad_norm"], rel=1e-5
    )


def test_untrained_train_and_eval_passes_differ_and_say_why(normal):
    u = normal["kinds"][0]["untrained_pass"]
    assert u["n_samples"] == 256
    assert u["differ"] is True
    assert u["max_abs_difference"]["reconstruction"] > 0
    assert u["max_abs_difference"]["z"] > 0
    # Eval mode uses z = mu, train mode samples around it.
    train, eval_ = u["train"]["tensors"], u["eval"]["tensors"]
    assert eval_["z"] == eval_["mu"]
    assert train["z"]["std"] > train["mu"]["std"]
    # The loss's own terms (the semantic term is off on normal data), then the total.
    assert list(u["train"]["loss"]) == ["reconstruction", "kl", "total"]
    assert u["loss_difference"]["kl"] == pytest.approx(
        u["train"]["loss"]["kl"] - u["eval"]["loss"]["kl"]
    )
    assert "z = mu" in u["why"] and "batch norm" in u["why"]


def test_records_and_annealing(normal):
    kind = normal["kinds"][0]
    assert [r["epoch"] for r in kind["records"]] == [0, 1]
    assert {r["beta"] for r in kind["records"]} == {0.1}
    assert "off" in kind["records"][0]["components"]["semantic"]["flags"]
    anneal = kind["annealing"]
    assert (anneal["schedule"], anneal["min_beta"], anneal["max_beta"]) == ("linear", 0.0, 1.0)
    assert [e["beta"] for e in anneal["epochs"]] == [0.0, 1.0]
    first = anneal["epochs"][0]
    assert first["total"] == pytest.approx(first["reconstruction"])  # β = 0: no KL in it


def test_feature_names_follow_the_agent_state_layout(all_kinds, mtx, tmp_path):
    by_kind = {k["kind"]: k for k in all_kinds["kinds"]}
    assert list(by_kind["agent_states"]["recon_per_feature"]) == AGENT_NAMES
    # 10 features, but not agent states: generic names.
    assert list(by_kind["normal"]["recon_per_feature"]) == [f"f{i}" for i in range(10)]
    path = tmp_path / "seven.npy"
    np.save(path, np.random.default_rng(0).normal(size=(40, 7)))
    out = mtx("debug-extended", "--json", "--epochs", "1", "--data", str(path)).json
    (kind,) = out["kinds"]
    assert kind["kind"] == "file" and out["data"]["source"] == str(path)
    assert list(kind["recon_per_feature"]) == [f"f{i}" for i in range(7)]
    assert all(v >= 0 for v in kind["recon_per_feature"].values())
    assert kind["weights"]["semantic"] == 0.0


def test_agent_state_file_gets_names_and_semantic_term(mtx, agent_file):
    out = mtx("debug-extended", "--json", "--epochs", "1", "--data", str(agent_file)).json
    (kind,) = out["kinds"]
    assert list(kind["recon_per_feature"]) == AGENT_NAMES
    assert kind["weights"]["semantic"] == 0.5
    assert kind["records"][0]["components"]["semantic"]["raw"] > 0


def test_same_seed_gives_byte_identical_json(mtx):
    args = ("debug-extended", "--json", "--data-kind", "binary", "--epochs", "1", "--samples", "64")
    a = mtx(*args, "--seed", "3")
    b = mtx(*args, "--seed", "3")
    c = mtx(*args, "--seed", "4")
    assert a.exit_code == 0, a.stderr
    assert a.stdout == b.stdout
    assert a.stdout != c.stdout


def test_plot_writes_png(mtx, tmp_path):
    path = tmp_path / "deep.png"
    run = mtx(
        "debug-extended",
        "--json",
        "--data-kind",
        "one_hot",
        "--epochs",
        "2",
        "--samples",
        "64",
        "--plot",
        str(path),
    )
    assert run.exit_code == 0, run.stderr
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run.json["config"]["plot"] == str(path)
    assert [p.name for p in tmp_path.iterdir()] == ["deep.png"]


def test_table_output_for_people(mtx):
    run = mtx("debug-extended", "--data-kind", "normal", "--epochs", "1", "--samples", "64")
    assert run.exit_code == 0, run.stderr
    assert run.stdout.strip() and not run.stdout.lstrip().startswith("{")


def test_scenario_without_batch_norm_changes_the_why_and_is_found(mtx):
    out = mtx(
        "debug-extended",
        "--json",
        "--data-kind",
        "normal",
        "--epochs",
        "2",
        "--samples",
        "64",
        "--scenario",
        "dying-relu",
    ).json
    assert out["scenario"] == "dying-relu"
    (kind,) = out["kinds"]
    assert "batch norm" not in kind["untrained_pass"]["why"]
    assert "z = mu" in kind["untrained_pass"]["why"]
    assert kind["gradients"]["batch_norm_centred"] == []
    assert "dying-relu" in kind["diagnosis"]["findings"]
    assert not any(p["role"].startswith("norm") for p in kind["parameters"])


USER_VAE = """
import torch
from torch import nn


class TinyVAE(nn.Module):
    def __init__(self, input_dim):
        super().__init__()
        self.enc = nn.Linear(input_dim, 16)
        self.mu = nn.Linear(16, 2)
        self.log_var = nn.Linear(16, 2)
        self.dec = nn.Linear(2, input_dim)
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, x):
        h = torch.relu(self.enc(x))
        mu, log_var = self.mu(h), self.log_var(h)
        z = mu + torch.exp(0.5 * log_var) * torch.randn(mu.shape, generator=self.gen)
        return {"reconstruction": self.dec(z), "mu": mu, "log_var": log_var, "z": z}


def build(input_dim=10):
    return TinyVAE(input_dim)
"""


def test_user_model_is_the_one_inspected(mtx, tmp_path):
    path = tmp_path / "tiny_vae.py"
    path.write_text(USER_VAE)
    out = mtx(
        "debug-extended",
        "--json",
        "--data-kind",
        "normal",
        "--epochs",
        "1",
        "--samples",
        "64",
        "--model",
        f"{path}:build",
    ).json
    (kind,) = out["kinds"]
    assert [p["name"] for p in kind["parameters"]] == [
        "enc.weight",
        "enc.bias",
        "mu.weight",
        "mu.bias",
        "log_var.weight",
        "log_var.bias",
        "dec.weight",
        "dec.bias",
    ]
    assert kind["gradients"]["hooks_registered"] == 8
    latent = kind["diagnosis"]["latent"]
    assert len(latent["kl_per_dim"]) == latent["latent_dim"] == 2
    assert kind["output_activation"] is None


# ---- the study, called directly ----


class _CollapsedVAE(nn.Module):
    """A tiny VAE whose encoder ignores its input: mu = 0, log_var = 0 (the prior)."""

    def __init__(self, input_dim: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Linear(input_dim, 4)
        self.mu = nn.Linear(4, 2)
        self.dec = nn.Linear(2, input_dim)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mu = 0.0 * self.mu(torch.relu(self.enc(x)))  # (B, Z)
        log_var = torch.zeros_like(mu)
        return {"reconstruction": self.dec(mu), "mu": mu, "log_var": log_var, "z": mu}


def _study(model_factory, epochs: int = 1, batch_size: int | None = None, n: int = 32):
    from meaning_transform.studies.debug_extended import run_debug_extended
    from meaning_transform.studies.pipeline import Pipeline
    from meaning_transform.studies.report import DebugExtendedConfig
    from meaning_transform.studies.setup import get_data
    from meaning_transform.training import TrainConfig

    dataset = get_data(None, kind="normal", n=n, seed=0)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, seed=0)
    options = DebugExtendedConfig(
        seed=0,
        device="cpu",
        epochs=epochs,
        batch_size=batch_size or 0,
        lr=1e-3,
        data=None,
        model="test",
        scenario="healthy",
        reduction="mean",
        fail_on="error",
        plot=None,
        data_kind="normal",
        samples=n,
    )
    return run_debug_extended(
        lambda d: Pipeline(d, config, model_factory=model_factory), [dataset], options
    )


def test_study_flags_a_nan_weight_and_reports_the_nan_run():
    from meaning_transform.studies.report import DebugExtendedReport, KindSection

    def nan_model(input_dim: int, seed: int) -> nn.Module:
        model = MeaningVAE(input_dim=input_dim, seed=seed)
        with torch.no_grad():
            model.encoder.fc_mu.weight[0, 0] = math.nan
        return model

    report = _study(nan_model)
    assert isinstance(report, DebugExtendedReport)
    (kind,) = report.kinds
    assert isinstance(kind, KindSection) and kind.kind == "normal"
    flagged = {p.name: p.flags for p in kind.parameters if p.flags}
    assert flagged == {"encoder.fc_mu.weight": ("non-finite",)}
    assert next(p for p in kind.parameters if p.name == "encoder.fc_mu.weight").nan == 1
    assert "nonfinite-loss" in kind.diagnosis.findings
    assert any(
        f.code == "nonfinite-loss" and f.severity == "error" and f.runs == ("normal",)
        for f in report.findings
    )
    assert report.exit_code == 1
    # The NaN step made no backward pass, so the hooks saw nothing.
    assert kind.gradients.captured_steps == 0 < kind.gradients.training_steps


def test_collapsed_latent_table_and_findings_agree():
    """The bug: the latent table said "collapsed" and the run ended with no findings."""
    report = _study(_CollapsedVAE, epochs=2, batch_size=2, n=24)  # 24 steps >= 20
    (kind,) = report.kinds
    latent = kind.diagnosis.latent  # the numbers the table shows are the ones judged
    assert latent.collapsed and latent.active_units == 0
    assert latent.num_samples == 24  # the trained model, all samples
    assert kind.diagnosis.collapse.status == "finding"
    assert "posterior-collapse" in kind.diagnosis.findings
    assert [f.runs for f in report.findings if f.code == "posterior-collapse"] == [("normal",)]


def test_report_json_follows_the_dataclass_field_order():
    from meaning_transform.studies.report import json_data, to_json

    report = _study(_CollapsedVAE)
    data = json_data(report)
    assert list(data)[:2] == ["command", "version"] and list(data)[-1] == "kinds"
    assert data["config"]["data_kind"] == "normal"
    kind = data["kinds"][0]
    assert list(kind) == SECTIONS
    assert to_json(report) == to_json(_study(_CollapsedVAE))  # same seed, same bytes


# ---- bad input ----


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--data-kind", "gaussian"), ("--data-kind", "agent_states", "one_hot", "gaussian")),
        (("--epochs", "-1"), ("--epochs",)),
        (("--samples", "1"), ("--samples",)),
        (("--reduction", "median"), ("--reduction",)),
        (("--scenario", "gremlins"), ("--scenario", "gremlins")),
        (("--data", "/nonexistent/x.npy"), ("not found",)),
    ],
)
def test_bad_options_exit_2_with_one_line(mtx, assert_bad_input, args, words):
    assert_bad_input(mtx("debug-extended", "--epochs", "1", *args), *words)


def test_data_file_excludes_data_kind_and_samples(mtx, assert_bad_input, agent_file):
    assert_bad_input(
        mtx("debug-extended", "--data", str(agent_file), "--data-kind", "normal"),
        "--data-kind",
        "--data",
    )
    assert_bad_input(
        mtx("debug-extended", "--data", str(agent_file), "--samples", "10"), "--samples"
    )
