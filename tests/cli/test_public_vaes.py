"""The two public VAEs of ``tests/public_vaes.py`` through the CLI, as their authors wrote them.

pytorch/examples' ``VAE`` with its ``loss_function`` and AntixK's ``VanillaVAE`` with its
own ``VanillaVAE.loss_function`` run through ``mtx`` with ``--model``/``--loss`` and no
adapter code. This file is also the module the tests hand to mtx as ``FILE.py:NAME``:
VanillaVAE's ``build()`` (it needs constructor arguments), and each fault as a small
patch of the public code (a subclass overriding one method, a builder changing one
initial value, or a loss wrapper); the copied code itself is never touched.

The data: 256 deterministic 8x8 "digit-like" images (strokes) in [0, 1], so the BCE of
pytorch/examples is defined. Every run is 3 epochs of batch 64 (12 steps) or fewer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from public_vaes import IMAGE_SHAPE, VAE, VanillaVAE, loss_function

HERE = Path(__file__).resolve()
PUBLIC = HERE.parent.parent / "public_vaes.py"
LATENT = 4  # VanillaVAE's latent_dim, as in tests/test_adapters.py

# ---- models mtx is given (--model FILE.py:NAME) ----------------------------------------


def build_vanilla():
    """AntixK's VanillaVAE needs its constructor arguments: this is its build()."""
    return VanillaVAE(in_channels=IMAGE_SHAPE[0], latent_dim=LATENT)


class FrozenNoiseVAE(VAE):
    """The original bug: the RNG is reseeded on every call."""

    def reparameterize(self, mu, logvar):
        torch.manual_seed(0)
        return super().reparameterize(mu, logvar)


class FrozenNoiseVanilla(VanillaVAE):
    def reparameterize(self, mu, logvar):
        torch.manual_seed(0)
        return super().reparameterize(mu, logvar)


def build_frozen_vanilla():
    return FrozenNoiseVanilla(in_channels=IMAGE_SHAPE[0], latent_dim=LATENT)


class MeanOnlyVAE(VAE):
    """z = mu in training: no noise at all."""

    def reparameterize(self, mu, logvar):
        return mu


class VarianceAsSigmaVAE(VAE):
    """exp(logvar), the variance, used as sigma; the output has no z (as the original)."""

    def reparameterize(self, mu, logvar):
        std = torch.exp(logvar)
        eps = torch.randn_like(std)
        return mu + eps * std


class VarianceAsSigmaWithZ(VAE):
    """The same fault, with z returned so eps = (z - mu) / sigma can be recovered."""

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 64))
        z = mu + torch.randn_like(mu) * torch.exp(logvar)
        return self.decode(z), mu, logvar, z


class HealthyWithZ(VAE):
    """pytorch/examples' forward, returning z as well: the control for the two above."""

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 64))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar, z


def _spread_log_var(model, scale=8.0):
    """fc22 (log_var's head) weights x scale: log_var varies from the first step on."""
    with torch.no_grad():
        model.fc22.weight.mul_(scale)
    return model


def build_variance_as_sigma_spread():
    return _spread_log_var(VarianceAsSigmaWithZ())


def build_healthy_spread():
    return _spread_log_var(HealthyWithZ())


def build_dead_relu():
    """pytorch/examples' VAE with fc1's bias at -10: F.relu(fc1(x)) never fires."""
    model = VAE()
    with torch.no_grad():
        model.fc1.bias.fill_(-10.0)
    return model


class MuLogVarOnly(VAE):
    """forward returns (mu, logvar) only: no reconstruction."""

    def forward(self, x):
        return self.encode(x.view(-1, 64))


class TwoLikeX(VAE):
    """forward returns (mu, logvar, recon, recon / 2): two tensors shaped like x, neither first."""

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 64))
        recon = self.decode(self.reparameterize(mu, logvar))
        return mu, logvar, recon, recon / 2


# ---- losses mtx is given (--loss FILE.py:NAME) -----------------------------------------


def named_terms_loss(recon_x, x, mu, logvar):
    """pytorch/examples' loss, unchanged in value, returning its two terms by name."""
    BCE = F.binary_cross_entropy(recon_x, x.view(-1, 64), reduction="sum")
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return {"loss": BCE + KLD, "BCE": BCE, "KLD": KLD}


def detached_bce_loss(recon_x, x, mu, logvar):
    """The fault: BCE on recon_x.detach(). Named terms, so mtx can see which one is dead."""
    BCE = F.binary_cross_entropy(recon_x.detach(), x.view(-1, 64), reduction="sum")
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return {"loss": BCE + KLD, "BCE": BCE, "KLD": KLD}


def sum_and_mean_loss(recon_x, x, mu, logvar):
    """The fault: BCE summed over the batch, KLD averaged over it (named terms)."""
    BCE = F.binary_cross_entropy(recon_x, x.view(-1, 64), reduction="sum")
    KLD = -0.5 * torch.mean(torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1))
    return {"loss": BCE + KLD, "BCE": BCE, "KLD": KLD}


def log_zero_loss(recon_x, x, mu, logvar):
    """The fault: a log of zero, log(recon_x - recon_x) = -inf, times 0 is NaN."""
    return loss_function(recon_x, x, mu, logvar) + torch.log(recon_x - recon_x).sum() * 0.0


def float_loss(recon_x, x, mu, logvar):
    return float(loss_function(recon_x, x, mu, logvar))


def per_sample_loss(recon_x, x, mu, logvar):
    BCE = F.binary_cross_entropy(recon_x, x.view(-1, 64), reduction="none").sum(dim=1)
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)
    return BCE + KLD  # (B,): not reduced over the batch


def raising_loss(recon_x, x, mu, logvar):
    raise RuntimeError("loss exploded on purpose")


def unbindable_loss(a, b, c):
    return a.sum() + b.sum() + c.sum()


# ---- data ------------------------------------------------------------------------------


def digit_like(n: int, seed: int = 0) -> np.ndarray:
    """(n, 64) float32 in [0, 1]: 8x8 images of one to three strokes, lightly blurred.

    Each stroke is a straight line between two random points of the grid, drawn at 1
    and spread to its 4-neighbours at 0.3; each image is scaled to a maximum of 1.
    """
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 8, 8), dtype=np.float64)
    for img in images:
        for _ in range(rng.integers(1, 4)):
            (r0, c0), (r1, c1) = rng.integers(0, 8, size=(2, 2))
            steps = max(abs(r1 - r0), abs(c1 - c0), 1)
            for t in np.linspace(0.0, 1.0, steps + 1):
                r, c = round(r0 + t * (r1 - r0)), round(c0 + t * (c1 - c0))
                img[r, c] = 1.0
                for dr, dc in ((0, 1), (0, -1), (1, 0), (-1, 0)):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < 8 and 0 <= cc < 8:
                        img[rr, cc] = max(img[rr, cc], 0.3)
        img /= img.max()
    return images.reshape(n, 64).astype(np.float32)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("digits") / "digits.npy"
    np.save(path, digit_like(256))
    return path


def test_the_digit_like_data_is_deterministic_and_in_the_unit_interval():
    a, b = digit_like(256), digit_like(256)
    assert a.shape == (256, 64) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert a.min() == 0.0 and a.max() == 1.0
    assert 0.1 < a.mean() < 0.4  # strokes, not blank or full images
    assert len(np.unique(a, axis=0)) > 250  # a few single-dot images repeat


# ---- helpers -----------------------------------------------------------------------------

EXAMPLES = ("--model", f"{PUBLIC}:VAE", "--loss", f"{PUBLIC}:loss_function")
ANTIXK = (
    "--model",
    f"{HERE}:build_vanilla",
    "--loss",
    f"{PUBLIC}:VanillaVAE.loss_function",
    "--loss-arg",
    "M_N=0.005",
    "--input-shape",
    ",".join(map(str, IMAGE_SHAPE)),
)
SHORT = ("--epochs", "3", "--batch-size", "64", "--json")


def model(name: str) -> tuple[str, str]:
    return ("--model", f"{HERE}:{name}")


def loss(name: str) -> tuple[str, str]:
    return ("--loss", f"{HERE}:{name}")


def examples_loss() -> tuple[str, str]:
    return ("--loss", f"{PUBLIC}:loss_function")


def codes(report: dict, *severities: str) -> set[str]:
    return {f["code"] for f in report["findings"] if not severities or f["severity"] in severities}


def not_checked(report: dict) -> dict[str, str]:
    return {n["code"]: n["reason"] for n in report["not_checked"]}


def ran(run, exit_code: int | None = None) -> dict:
    """The JSON report of a run that ran (exit 0 or 1), nothing on stderr."""
    assert run.exit_code in (0, 1), (run.exit_code, run.stderr)
    if exit_code is not None:
        assert run.exit_code == exit_code, (run.exit_code, run.json["findings"])
    report = run.json
    assert report["exit_code"] == run.exit_code
    return report


# ---- 1. healthy: each public model with its own loss, no adapter code ---------------------


@pytest.mark.parametrize("command", ["check-grads", "debug-loss"])
@pytest.mark.parametrize("vae", ["examples", "antixk"])
def test_a_public_vae_with_its_own_loss_is_healthy(mtx, digits, command, vae):
    spec = EXAMPLES if vae == "examples" else ANTIXK
    report = ran(mtx(command, *spec, "--data", str(digits), *SHORT), exit_code=0)
    assert codes(report, "warning", "error") == set(), report["findings"]
    assert report["config"]["model"] == spec[1]
    assert report["data"]["n_samples"] == 256 and report["data"]["n_features"] == 64
    # neither model returns z: the Doctor reads it from their own reparameterize(), so
    # the noise scale is measured; in this short run log_var varies too little to judge
    # the exponent, which is said, not skipped
    assert "varied too little" in not_checked(report)["noise-scale"]


def test_check_grads_reports_the_public_vaes_own_parameters(mtx, digits):
    report = ran(mtx("check-grads", *EXAMPLES, "--data", str(digits), *SHORT), exit_code=0)
    names = {p["name"] for p in report["parameters"]}
    assert names == {f"fc{i}.{w}" for i in (1, 21, 22, 3, 4) for w in ("weight", "bias")}
    assert report["never_received"] == []


def test_antixk_terms_are_read_by_name_and_measured_as_means(mtx, digits):
    report = ran(mtx("debug-loss", *ANTIXK, "--data", str(digits), *SHORT), exit_code=0)
    (run,) = report["runs"]
    assert run["reduction"] == {"Reconstruction_Loss": "mean", "KLD": "mean"}
    # the examples' loss returns one scalar: its per-term checks are listed as not run
    examples = ran(mtx("debug-loss", *EXAMPLES, "--data", str(digits), *SHORT), exit_code=0)
    assert "one scalar" in not_checked(examples)["no-grad-path"]


def test_antixk_negative_kld_entry_is_not_flagged_zero(mtx, digits):
    report = ran(mtx("debug-loss", *ANTIXK, "--data", str(digits), *SHORT), exit_code=0)
    for row in report["runs"][0]["epochs"]:
        for name, c in row["components"].items():
            if "zero" in c["flags"]:
                assert 0 <= c["raw"] <= 1e-8, (row["epoch"], name, c)


def test_debug_extended_runs_antixk_with_its_kl_weight_keyword(mtx, digits):
    run = mtx("debug-extended", *ANTIXK, "--beta-kwarg", "M_N", "--data", str(digits), *SHORT)
    report = ran(run, exit_code=0)
    assert codes(report, "warning", "error") == set(), report["findings"]


def test_anneal_demo_runs_antixk_with_its_kl_weight_keyword(mtx, digits):
    run = mtx("anneal-demo", *ANTIXK, "--beta-kwarg", "M_N", "--data", str(digits), *SHORT)
    report = ran(run)
    assert [e["beta"] for e in report["epochs"]][-1] == pytest.approx(1.0)


@pytest.mark.parametrize("command", ["debug-extended", "anneal-demo"])
def test_a_loss_without_a_kl_weight_keyword_is_refused_by_beta_schedules(
    mtx, assert_bad_input, digits, command
):
    run = mtx(command, *EXAMPLES, "--data", str(digits), *SHORT)
    assert_bad_input(run, "--beta-kwarg")


def test_a_beta_kwarg_the_loss_does_not_take_is_one_line(mtx, assert_bad_input, digits):
    run = mtx("anneal-demo", *EXAMPLES, "--beta-kwarg", "beta", "--data", str(digits), *SHORT)
    assert_bad_input(run, "beta")


# ---- 2. faults injected into the public code are found ------------------------------------

FAULTS = {
    # name: (model/loss options, the command, the code expected in findings)
    "frozen-noise": ((*model("FrozenNoiseVAE"), *examples_loss()), "check-grads", "frozen-noise"),
    "frozen-noise-antixk": (
        (*model("build_frozen_vanilla"), *ANTIXK[2:]),
        "debug-loss",
        "frozen-noise",
    ),
    "z-is-mu": ((*model("MeanOnlyVAE"), *examples_loss()), "check-grads", "frozen-noise"),
    "variance-as-sigma": (
        (*model("build_variance_as_sigma_spread"), *examples_loss()),
        "check-grads",
        "noise-scale",
    ),
    "batch-dependent-weights": (
        ("--model", f"{PUBLIC}:VAE", *loss("sum_and_mean_loss")),
        "debug-loss",
        "batch-dependent-weights",
    ),
    "nan": (("--model", f"{PUBLIC}:VAE", *loss("log_zero_loss")), "check-grads", "nonfinite-loss"),
    "dead-relu": ((*model("build_dead_relu"), *examples_loss()), "check-grads", "dying-relu"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_in_public_code_is_found(mtx, digits, fault):
    options, command, code = FAULTS[fault]
    report = ran(mtx(command, *options, "--data", str(digits), *SHORT))
    assert code in codes(report), (fault, report["findings"], not_checked(report))


def test_frozen_noise_is_an_error_with_every_probe_repeated(mtx, digits):
    options = FAULTS["frozen-noise"][0]
    report = ran(mtx("check-grads", *options, "--data", str(digits), *SHORT), exit_code=1)
    (finding,) = [f for f in report["findings"] if f["code"] == "frozen-noise"]
    assert finding["severity"] == "error"
    assert finding["evidence"]["repeated"] == finding["evidence"]["pairs"] > 0


def test_variance_as_sigma_is_measured_as_exponent_one_and_its_control_is_clean(mtx, digits):
    options = FAULTS["variance-as-sigma"][0]
    report = ran(mtx("check-grads", *options, "--data", str(digits), *SHORT), exit_code=1)
    (finding,) = [f for f in report["findings"] if f["code"] == "noise-scale"]
    assert finding["severity"] == "error"
    assert finding["evidence"]["exponent"] == pytest.approx(1.0, abs=0.2)
    # the control: the same spread of log_var with sigma = exp(0.5 * logvar)
    control = (*model("build_healthy_spread"), *examples_loss())
    report = ran(mtx("check-grads", *control, "--data", str(digits), *SHORT), exit_code=0)
    assert codes(report, "warning", "error") == set(), report["findings"]


@pytest.mark.parametrize(
    ("name", "why"),
    [
        # the fault as a one-method patch: the output has no z, the Doctor reads z from
        # reparameterize(); log_var barely varies at initialisation in 12 steps
        ("VarianceAsSigmaVAE", "varied too little"),
        # with z, at the default initialisation log_var barely varies (std ~0.12) in 12 steps
        ("VarianceAsSigmaWithZ", "varied too little"),
    ],
)
def test_variance_as_sigma_that_cannot_be_judged_is_listed_not_checked(mtx, digits, name, why):
    report = ran(mtx("check-grads", *model(name), *examples_loss(), "--data", str(digits), *SHORT))
    assert "noise-scale" not in codes(report)
    assert why in not_checked(report)["noise-scale"]


def test_a_detached_reconstruction_term_has_no_grad_path(mtx, digits):
    options = ("--model", f"{PUBLIC}:VAE", *loss("detached_bce_loss"))
    report = ran(mtx("debug-loss", *options, "--data", str(digits), *SHORT), exit_code=1)
    (finding,) = [f for f in report["findings"] if f["code"] == "no-grad-path"]
    assert finding["severity"] == "error"
    assert "BCE" in finding["message"] and "KLD" not in finding["message"]


def test_a_detached_reconstruction_term_leaves_the_decoder_without_gradient(mtx, digits):
    """The same fault seen from the parameters: the decoder gets no gradient at all."""
    options = ("--model", f"{PUBLIC}:VAE", *loss("detached_bce_loss"))
    report = ran(mtx("debug-loss", *options, "--data", str(digits), *SHORT))
    (unused,) = [f for f in report["findings"] if f["code"] == "unused-params"]
    assert all(name in unused["message"] for name in ("fc3.weight", "fc4.weight"))


def test_named_terms_of_a_user_loss_get_per_term_gradients(mtx, digits):
    options = ("--model", f"{PUBLIC}:VAE", *loss("named_terms_loss"))
    report = ran(mtx("debug-loss", *options, "--data", str(digits), *SHORT), exit_code=0)
    assert report["runs"][0]["diagnosis"]["attribution"] is not None
    assert "no-grad-path" not in not_checked(report)


@pytest.mark.parametrize(("fail_on", "exit_code"), [("error", 1), ("never", 0)])
def test_nan_in_the_loss_is_a_finding_not_a_crash(mtx, digits, fail_on, exit_code):
    options = ("--model", f"{PUBLIC}:VAE", *loss("log_zero_loss"), "--fail-on", fail_on)
    run = mtx("check-grads", *options, "--data", str(digits), *SHORT)
    report = ran(run, exit_code=exit_code)
    (finding,) = [f for f in report["findings"] if f["code"] == "nonfinite-loss"]
    assert finding["severity"] == "error"
    assert finding["evidence"]["skipped_steps"] == 12  # 3 epochs x 4 batches, all skipped
    assert run.stderr == ""


def test_dead_relus_are_found_behind_f_relu(mtx, digits):
    options = (*model("build_dead_relu"), *examples_loss())
    report = ran(mtx("check-grads", *options, "--data", str(digits), *SHORT))
    (finding,) = [f for f in report["findings"] if f["code"] == "dying-relu"]
    assert "fc1" in finding["where"] and finding["evidence"]["worst_fraction"] == 1.0


# ---- 3. bad input: exit 2, one line on stderr, nothing on stdout ------------------------

EX_MODEL = ("--model", f"{PUBLIC}:VAE")
BAD = {
    "loss returns a float": ((*EX_MODEL, *loss("float_loss")), ("float", "scalar tensor")),
    "loss returns a vector": ((*EX_MODEL, *loss("per_sample_loss")), ("(4,)", "scalar")),
    "loss raises": ((*EX_MODEL, *loss("raising_loss")), ("RuntimeError", "exploded")),
    "loss cannot be bound": ((*EX_MODEL, *loss("unbindable_loss")), ("cannot bind", "'a'")),
    "forward returns (mu, logvar)": (
        (*model("MuLogVarOnly"), *examples_loss()),
        ("2 elements", "reconstruction"),
    ),
    "two outputs shaped like x": (
        (*model("TwoLikeX"), *examples_loss()),
        ("shaped like the input",),
    ),
    "input shape does not match the data": (
        (*ANTIXK[:-1], "1,7,7"),
        ("1,7,7", "49", "64"),
    ),
    "input shape is not numbers": ((*ANTIXK[:-1], "a,b"), ("positive integers",)),
    "loss-arg without '='": (
        (*ANTIXK[:4], "--loss-arg", "M_N", *ANTIXK[6:]),
        ("KEY=VALUE", "'M_N'"),
    ),
    "antixk's loss without its M_N": ((*ANTIXK[:4], *ANTIXK[6:]), ("KeyError", "M_N")),
    "antixk without --input-shape": (
        ANTIXK[:6],
        ("forward failed", "conv2d", "give their shape with --input-shape C,H,W"),
    ),
    "loss-arg without --loss": (("--loss-arg", "M_N=1"), ("--loss-arg", "--loss")),
    "input-shape without --model": (("--input-shape", "1,8,8"), ("--input-shape", "--model")),
    "antixk's loss on the built-in model": (
        ANTIXK[2:6],
        ("*args", "name its parameters"),
    ),
    "mtx's weights with a user loss": (
        (*EXAMPLES, "--kl-weight", "0.5"),
        ("--kl-weight", "--loss"),
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_user_code_or_options_are_one_line(mtx, assert_bad_input, digits, case):
    options, words = BAD[case]
    command = "debug-loss" if "--kl-weight" in options else "check-grads"
    run = mtx(command, *options, "--data", str(digits), "--epochs", "1", "--json")
    assert_bad_input(run, *words)


def test_a_user_loss_with_the_built_in_model_is_allowed(mtx, digits):
    run = mtx("check-grads", *examples_loss(), "--data", str(digits), *SHORT)
    report = ran(run)
    assert report["config"]["model"] is None
    assert codes(report, "error") == set(), report["findings"]
