from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from torch import nn

from meaning_transform.diagnostics.gradients import ParamGradStats
from meaning_transform.diagnostics.structure import biases_before_batch_norm
from meaning_transform.diagnostics.thresholds import LARGE_UPDATE, VANISHING_ABS_MEAN
from meaning_transform.model import MeaningVAE
from meaning_transform.studies.check_grads import param_flags, run_check_grads
from meaning_transform.studies.pipeline import Pipeline
from meaning_transform.studies.report import CheckGradsConfig, CheckGradsReport
from meaning_transform.studies.setup import (
    Dataset,
    ModelFactory,
    build_loss,
    default_model,
    get_data,
)
from meaning_transform.training import TrainConfig

ONE_STEP = ("--epochs", "1", "--batch-size", "0", "--json")


def _tiny_vae(input_dim: int, seed: int) -> MeaningVAE:
    return MeaningVAE(input_dim=input_dim, latent_dim=2, hidden_dims=(8,), seed=seed)


def _with_unused_layer(input_dim: int, seed: int) -> nn.Module:
    model = _tiny_vae(input_dim, seed)
    model.unused = nn.Linear(3, 3)  # registered, trainable, never called in forward
    return model


def _study(dataset: Dataset, config: TrainConfig, factory: ModelFactory) -> CheckGradsReport:
    """The study in-process, as the CLI runs it (default weights 1/0.1/0.5)."""
    pipeline = Pipeline(dataset=dataset, train_config=config, model_factory=factory)
    options = CheckGradsConfig(
        epochs=config.epochs,
        batch_size=config.batch_size or 0,
        device=config.device,
        seed=config.seed,
        clip=config.clip_grad_norm,
    )
    return run_check_grads(pipeline, options, recon=1.0, kl=0.1, semantic=0.5)


# ---------------------------------------------------------------- the reference: clip_grad_norm_


def test_each_step_total_norm_is_clip_grad_norms_value_before_clipping(mtx):
    out = mtx("check-grads", "--epochs", "2", "--batch-size", "256", "--clip", "0.5", "--json").json
    assert out["command"] == "check-grads"
    steps = out["steps"]
    assert [s["step"] for s in steps] == [0, 1, 2, 3]  # 512 samples / 256, two epochs
    for s in steps:
        assert s["total_norm"] == pytest.approx(s["clip_grad_norm"], rel=1e-6)
        # measured before clipping: clipped gradients would have a norm of at most 0.5
        assert s["total_norm"] > 0.5
        assert s["clipped"] is True
    assert out["total_norm"] == steps[-1]["total_norm"]
    assert out["clip_grad_norm"] == steps[-1]["clip_grad_norm"]
    assert out["clip"] == 0.5


def test_study_matches_clip_grad_norm_computed_independently():
    """Rebuild the first step by hand: same model, loss and batch; call clip_grad_norm_."""
    dataset = get_data(None, n=64, seed=1)
    config = TrainConfig(epochs=1, batch_size=None, seed=0)
    result = _study(dataset, config, _tiny_vae)

    model = _tiny_vae(dataset.n_features, config.seed)
    loss_fn = build_loss(1.0, 0.1, 0.5, dataset, "mean")
    loss_fn(model(dataset.tensor), dataset.tensor)["loss"].backward()
    params = [p for p in model.parameters() if p.requires_grad]
    expected = float(nn.utils.clip_grad_norm_(params, max_norm=math.inf))

    assert result.steps[0].total_norm == pytest.approx(expected, rel=1e-6)
    assert result.steps[0].clip_grad_norm == pytest.approx(expected, rel=1e-6)
    by_name = {p.name: p for p in result.parameters}
    assert list(by_name) == [name for name, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        g = p.grad.double()
        row = by_name[name]
        assert row.shape == tuple(p.shape)
        assert row.norm == pytest.approx(float(g.norm()), rel=1e-5, abs=1e-12)
        assert row.min == pytest.approx(float(g.min()), rel=1e-6, abs=1e-12)
        assert row.max == pytest.approx(float(g.max()), rel=1e-6, abs=1e-12)
        assert row.zero_fraction == pytest.approx(float((g == 0).double().mean()))


def test_clip_is_applied_after_the_measurement():
    built: list[nn.Module] = []

    def factory(input_dim: int, seed: int) -> nn.Module:
        built.append(_tiny_vae(input_dim, seed))
        return built[-1]

    dataset = get_data(None, n=64, seed=1)
    result = _study(dataset, TrainConfig(epochs=1, clip_grad_norm=1e-3), factory)
    # the gradients the optimizer used (still in .grad) were clipped ...
    used = nn.utils.clip_grad_norm_(built[0].parameters(), max_norm=math.inf)
    assert float(used) == pytest.approx(1e-3, rel=1e-3)
    # ... and what was reported is the norm before clipping
    assert result.total_norm > 100 * 1e-3
    assert result.steps[0].clipped is True
    assert result.clip == 1e-3


# ---------------------------------------------------------------- a healthy run


def test_healthy_run_covers_every_parameter_and_flags_nothing_wrong(mtx):
    run = mtx("check-grads", *ONE_STEP)
    assert run.exit_code == 0, run.stderr
    out = run.json
    model = default_model(10, 0, get_data(None).tensor)
    trainable = {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert {p["name"]: p["shape"] for p in out["parameters"]} == trainable
    assert out["never_received"] == []
    for p in out["parameters"]:
        assert p["has_grad"] is True
        assert p["non_finite"] == 0
        assert not {"no-grad", "missing", "non-finite", "all-zero", "tiny"} & set(p["flags"])
        if len(p["shape"]) == 2:  # a weight matrix moved after one step with lr > 0
            assert p["update_ratio"] > 0
    # the Linear biases that feed BatchNorm are noted, not flagged as vanished
    absorbed = [p["name"] for p in out["parameters"] if "bn-absorbed" in p["flags"]]
    assert absorbed == list(biases_before_batch_norm(model))
    assert absorbed  # the built-in model has batch norm
    assert out["first_layer"] == "encoder.layers.0.linear.weight"
    assert out["last_layer"] == "decoder.fc_out.weight"
    assert out["first_last_ratio"] > 0
    assert out["weights"] == {"reconstruction": 1.0, "kl": 0.1, "semantic": 0.5}
    assert out["batch_size"] == 512 and out["reduction"] == "mean"
    assert out["device"] == "cpu" and out["config"]["device"] == "auto"  # used vs asked
    # "tiny" is relative to the loss scale: the median |loss| of the last 10 steps (one
    # full batch per step here), as the vanishing-grad rule reads it
    scale = statistics.median(abs(s["loss"]) for s in out["steps"][-10:])
    assert out["thresholds"] == {
        "tiny_abs_mean": pytest.approx(VANISHING_ABS_MEAN * scale, rel=1e-6),
        "large_update": LARGE_UPDATE,
    }


def test_unused_parameter_is_never_received_and_flagged():
    dataset = get_data(None, n=64, seed=1)
    result = _study(dataset, TrainConfig(epochs=2, batch_size=32), _with_unused_layer)
    assert result.never_received == ("unused.weight", "unused.bias")
    flags = {p.name: p.flags for p in result.parameters}
    assert flags["unused.weight"] == ("no-grad",) and flags["unused.bias"] == ("no-grad",)
    assert not any("no-grad" in f for n, f in flags.items() if not n.startswith("unused."))
    assert all(s.missing == ("unused.weight", "unused.bias") for s in result.steps)
    assert len(result.steps) == 4


def test_weights_and_clip_options_reach_the_loss(mtx):
    out = mtx(
        "check-grads",
        *ONE_STEP,
        "--kl-weight",
        "0.3",
        "--recon-weight",
        "2",
        "--semantic-weight",
        "0",
        "--reduction",
        "sum",
    ).json
    assert out["weights"] == {"reconstruction": 2.0, "kl": 0.3, "semantic": 0.0}
    assert out["reduction"] == "sum"
    assert out["config"]["reduction"] == "sum" and out["config"]["kl_weight"] == 0.3
    assert out["clip"] is None and out["steps"][0]["clipped"] is False


# ---------------------------------------------------------------- flags


def _stats(**kw: object) -> ParamGradStats:
    base = dict(
        name="w",
        shape=(4, 4),
        numel=16,
        has_grad=True,
        norm=1.0,
        mean=0.0,
        abs_mean=0.1,
        std=0.2,
        min=-0.5,
        max=0.5,
        zero_fraction=0.0,
        non_finite=0,
        weight_norm=2.0,
        update_ratio=1e-3,
    )
    base.update(kw)
    return ParamGradStats(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("stats", "never", "absorbed", "flags"),
    [
        (_stats(), (), False, []),
        (_stats(has_grad=False, norm=None), ("w",), False, ["no-grad"]),
        (_stats(has_grad=False, norm=None), (), False, ["missing"]),
        (_stats(non_finite=3), (), False, ["non-finite"]),
        (_stats(zero_fraction=1.0, abs_mean=0.0), (), False, ["all-zero"]),
        (_stats(abs_mean=VANISHING_ABS_MEAN / 2), (), False, ["tiny"]),
        (_stats(abs_mean=VANISHING_ABS_MEAN / 2), (), True, ["bn-absorbed"]),
        (_stats(update_ratio=0.0), (), False, ["frozen"]),
        (_stats(update_ratio=LARGE_UPDATE * 2), (), False, ["large-update"]),
        # vectors (biases, BatchNorm) start near zero: a large relative update is normal
        (_stats(shape=(4,), update_ratio=LARGE_UPDATE * 5), (), False, []),
        # a zero-initialised bias on its first step has no ratio: not judged
        (_stats(shape=(4,), update_ratio=None), (), False, []),
    ],
)
def test_param_flags_thresholds(stats, never, absorbed, flags):
    assert param_flags(stats, never, absorbed) == tuple(flags)


def test_biases_before_batch_norm_follow_the_model_structure():
    with_bn = biases_before_batch_norm(MeaningVAE(hidden_dims=(8, 4)))
    assert with_bn == (  # in registration order
        "encoder.layers.0.linear.bias",
        "encoder.layers.1.linear.bias",
        "decoder.layers.0.linear.bias",
        "decoder.layers.1.linear.bias",
    )
    assert biases_before_batch_norm(MeaningVAE(hidden_dims=(8, 4), use_batch_norm=False)) == ()


# ---------------------------------------------------------------- CLI conventions


def test_same_seed_gives_byte_identical_json(mtx):
    a = mtx("check-grads", *ONE_STEP, "--seed", "7")
    b = mtx("check-grads", *ONE_STEP, "--seed", "7")
    c = mtx("check-grads", *ONE_STEP, "--seed", "8")
    assert a.exit_code == b.exit_code == 0
    assert a.stdout == b.stdout
    assert a.stdout != c.stdout


def test_plot_writes_png(mtx, tmp_path):
    path = tmp_path / "grads.png"
    run = mtx("check-grads", *ONE_STEP, "--plot", str(path))
    assert run.exit_code == 0, run.stderr
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run.json["config"]["plot"] == str(path)
    assert "plot" not in run.json  # the path is part of the config, not a key of its own
    assert [p.name for p in tmp_path.iterdir()] == ["grads.png"]  # no temp file left


def test_table_output_for_people(mtx):
    run = mtx("check-grads", "--epochs", "1", "--batch-size", "0")
    assert run.exit_code == 0, run.stderr
    assert "encoder.layers.0.linear.weight" in run.stdout


def test_non_agent_data_switches_semantic_off(mtx, tmp_path):
    path = tmp_path / "seven.npy"
    np.save(path, np.random.default_rng(0).normal(size=(40, 7)))
    out = mtx("check-grads", *ONE_STEP, "--data", str(path)).json
    assert out["semantic_applicable"] is False
    assert out["weights"]["semantic"] == 0.0
    assert out["data"]["n_features"] == 7 and out["batch_size"] == 40


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--epochs", "0"), ("--epochs",)),
        (("--batch-size", "-1"), ("--batch-size",)),
        (("--lr", "0"), ("--lr",)),
        (("--device", "tpu"), ("--device", "tpu")),
        (("--fail-on", "sometimes"), ("--fail-on",)),
        (("--reduction", "median"), ("--reduction",)),
        (("--kl-weight", "-0.5"), ("--kl-weight",)),
        (("--recon-weight", "-1"), ("--recon-weight",)),
        (("--semantic-weight", "-1"), ("--semantic-weight",)),
        (("--clip", "0"), ("--clip",)),
        (("--clip", "-2"), ("--clip",)),
        (("--clip", "nan"), ("--clip",)),
        (("--data", "/nonexistent/x.npy"), ("not found",)),
        (("--plot", "grads.jpg"), ("--plot", ".png")),
    ],
)
def test_bad_options_exit_2_with_one_line(mtx, assert_bad_input, args, words):
    assert_bad_input(mtx("check-grads", "--epochs", "1", *args), *words)


def test_semantic_weight_on_non_agent_data_is_bad_input(mtx, assert_bad_input, tmp_path):
    path = tmp_path / "seven.npy"
    np.save(path, np.zeros((8, 7)))
    assert_bad_input(
        mtx("check-grads", "--epochs", "1", "--semantic-weight", "0.5", "--data", str(path)),
        "10 features",
    )


def test_help_does_not_need_torch_to_be_fast():
    import subprocess
    import sys

    code = (
        "import sys; from meaning_transform.cli import check_grads; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_torch_is_seeded_locally():
    """The study must not move the global RNG (the model owns its generators)."""
    before = torch.random.get_rng_state()
    _study(get_data(None, n=16, seed=0), TrainConfig(epochs=1), _tiny_vae)
    assert torch.equal(before, torch.random.get_rng_state())


REVERSED = """
import torch
from torch import nn


class Reversed(nn.Module):
    def __init__(self, input_dim=10):
        super().__init__()
        self.out = nn.Linear(8, input_dim)  # registered first, runs last
        self.dec = nn.Linear(2, 8)
        self.head = nn.Linear(8, 4)
        self.enc = nn.Linear(input_dim, 8)  # registered last, runs first

    def forward(self, x):
        mu, log_var = self.head(torch.relu(self.enc(x))).chunk(2, dim=1)
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
        return torch.sigmoid(self.out(torch.relu(self.dec(z)))), mu, log_var
"""


def test_first_and_last_layers_are_taken_in_forward_order(mtx, tmp_path):
    path = tmp_path / "reversed.py"
    path.write_text(REVERSED)
    out = mtx("check-grads", "--epochs", "1", "--json", "--model", f"{path}:Reversed").json
    assert (out["first_layer"], out["last_layer"]) == ("enc.weight", "out.weight")
