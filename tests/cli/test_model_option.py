"""--model: bring your own VAE; a bad spec is one line and exit 2."""

from __future__ import annotations

import textwrap

import pytest

GOOD = """
import torch
from torch import nn


class TinyVAE(nn.Module):
    def __init__(self, input_dim=10, unused=False):
        super().__init__()
        self.enc = nn.Linear(input_dim, 16)
        self.mu = nn.Linear(16, 2)
        self.log_var = nn.Linear(16, 2)
        self.dec = nn.Linear(2, input_dim)
        if unused:
            self.extra = nn.Linear(3, 3)
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, x):
        h = torch.relu(self.enc(x))
        mu, log_var = self.mu(h), self.log_var(h)
        eps = torch.randn(mu.shape, generator=self.gen)
        z = mu + torch.exp(0.5 * log_var) * eps
        return {"reconstruction": torch.sigmoid(self.dec(z)), "mu": mu, "log_var": log_var,
                "z": z}


def build(input_dim=10):
    return TinyVAE(input_dim)


def build_unused():
    return TinyVAE(10, unused=True)


def build_raises():
    raise RuntimeError("no GPU here")


def build_not_module():
    return 42


class Wrong(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(10, 10)

    def forward(self, x):
        return self.lin(x)


def build_wrong_output():
    return Wrong()


def build_wrong_dim():
    return TinyVAE(7)
"""


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "my_vae.py"
    path.write_text(textwrap.dedent(GOOD))
    return path


def test_user_model_runs_in_every_command(mtx, model_file):
    spec = f"{model_file}:build"
    for command in ("debug-loss", "check-grads", "anneal-demo", "debug-extended"):
        extra = ("--data-kind", "agent_states") if command == "debug-extended" else ()
        run = mtx(command, "--epochs", "2", "--json", "--model", spec, *extra)
        assert run.exit_code in (0, 1), (command, run.stderr)
        assert run.json["command"] == command
        assert run.json["config"]["model"] == spec


def test_user_model_parameters_are_the_ones_reported(mtx, model_file):
    out = mtx("check-grads", "--epochs", "1", "--json", "--model", f"{model_file}:build").json
    assert {p["name"] for p in out["parameters"]} == {
        "enc.weight",
        "enc.bias",
        "mu.weight",
        "mu.bias",
        "log_var.weight",
        "log_var.bias",
        "dec.weight",
        "dec.bias",
    }


def test_user_model_unused_parameter_is_found(mtx, model_file):
    out = mtx(
        "debug-loss",
        "--epochs",
        "2",
        "--kl-weight",
        "0.1",
        "--json",
        "--model",
        f"{model_file}:build_unused",
    ).json
    codes = {f["code"] for f in out["findings"]}
    assert "unused-params" in codes


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("{dir}/missing.py:build", ("file not found",)),
        ("{file}:nothing_here", ("no attribute", "nothing_here")),
        ("{file}:build_raises", ("RuntimeError", "no GPU here")),
        ("{file}:build_not_module", ("nn.Module", "int")),
        ("{file}:build_wrong_output", ("dict",)),
        ("{file}:build_wrong_dim", ("forward failed",)),
        ("{file}", ("FILE.py:NAME",)),
        ("no_such_package_xyz.module:build", ("cannot import",)),
    ],
)
def test_bad_model_specs(mtx, assert_bad_input, model_file, spec, words):
    spec = spec.format(dir=model_file.parent, file=model_file)
    assert_bad_input(mtx("debug-loss", "--epochs", "1", "--model", spec), *words)


def test_model_and_scenario_do_not_mix(mtx, assert_bad_input, model_file):
    run = mtx(
        "debug-loss",
        "--epochs",
        "1",
        "--model",
        f"{model_file}:build",
        "--scenario",
        "frozen-noise",
    )
    assert_bad_input(run, "--scenario")
