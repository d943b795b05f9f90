"""The Doctor in a user's own training loop, with the two public VAEs as their authors wrote them.

The loop is pytorch/examples' ``train()`` (vae/main.py) with one line added,
``doctor.step(...)`` after the loss and before ``backward()``, and ``doctor.epoch_end()``
after each epoch. Each fault is a small patch a user could plausibly write: a subclass
overriding one method, or a loss written slightly differently. Nothing here is built by
hand for the Doctor: no records, no roles, no adapters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from public_vaes import VAE, VanillaVAE, loss_function
from torch import Tensor, nn
from torch.utils.data import DataLoader

from meaning_transform.diagnostics.doctor import Doctor, Findings
from meaning_transform.diagnostics.rules import PER_TERM_CODES
from meaning_transform.diagnostics.schedule import ATTRIBUTION_SCHEDULE
from meaning_transform.diagnostics.thresholds import PLATEAU_MIN_EPOCHS

N, BATCH, EPOCHS = 256, 32, 3
STEPS = N // BATCH * EPOCHS  # 24
ANTIXK_KLD_WEIGHT = 0.005  # AntixK's M_N (their configs use kld_weight 0.00025-0.005)

# ---- data: deterministic 8x8 images in [0, 1] ---------------------------------------------


def blob_images(n: int = N, seed: int = 0) -> Tensor:
    """(n, 1, 8, 8) Gaussian blobs at random centres and widths, in [0, 1], with exact
    zeros in the background (as MNIST has)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    cy, cx = (torch.rand(n, 1, 1, generator=g) * 7 for _ in range(2))
    r = 1 + 2 * torch.rand(n, 1, 1, generator=g)
    img = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
    img = torch.where(img < 0.05, torch.zeros_like(img), img)
    return img.unsqueeze(1)


DATA = blob_images()


def loader() -> DataLoader[Tensor]:
    return DataLoader(
        DATA,  # type: ignore[arg-type]  # a tensor is a map-style dataset of its rows
        batch_size=BATCH,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )


# ---- the user's loop ------------------------------------------------------------------------

Loss = Callable[[Tensor, Tensor, Tensor, Tensor], Any]


def total_of(loss: Any) -> Tensor:
    return loss["loss"] if isinstance(loss, Mapping) else loss


def train(
    model: nn.Module,
    doctor: Doctor,
    loss_fn: Loss = loss_function,
    careful: bool = False,
    epoch_end: bool = True,
    end_every: int | None = None,
    with_z: bool = False,
    **step_kwargs: Any,
) -> None:
    """pytorch/examples' train(), for EPOCHS epochs, plus the Doctor's two lines.

    careful: skip backward on a non-finite loss (as a careful loop does); end_every: call
    epoch_end every k steps instead of per epoch; with_z: hand the Doctor a dict output
    with the z the model stashed (its tuple has none).
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = 0
    for _epoch in range(EPOCHS):
        model.train()
        for _batch_idx, data in enumerate(loader()):
            optimizer.zero_grad()
            recon_batch, mu, logvar = model(data)
            loss = loss_fn(recon_batch, data, mu, logvar)
            output: object = (recon_batch, mu, logvar)
            if with_z:
                output = {"reconstruction": recon_batch, "mu": mu, "log_var": logvar}
                output["z"] = model.z
            doctor.step(output, loss, data, **step_kwargs)
            steps += 1
            if end_every and steps % end_every == 0:
                doctor.epoch_end()
            if careful and not torch.isfinite(total_of(loss)):
                continue
            total_of(loss).backward()
            optimizer.step()
        if epoch_end:
            doctor.epoch_end()


def diagnose(
    model: nn.Module,
    data: Tensor | None = DATA,
    steps_per_epoch: int | None = None,
    findings_kwargs: Mapping[str, Any] | None = None,
    **train_kwargs: Any,
) -> tuple[Doctor, Findings]:
    with Doctor(model, where="run", steps_per_epoch=steps_per_epoch) as doctor:
        train(model, doctor, **train_kwargs)
    return doctor, doctor.findings(data=data, **(findings_kwargs or {}))


def pytorch_examples(cls: type[VAE] = VAE, seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return cls()


def codes(found: Findings) -> set[str]:
    """Codes of the warnings and errors (info findings left out)."""
    return {f.code for f in found if f.severity in ("warning", "error")}


def skipped(found: Findings) -> dict[str, str]:
    return {n.code: n.reason for n in found.not_checked}


# ---- losses a user might write instead of pytorch/examples' loss_function ------------------


def dict_loss(recon_x: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> dict[str, Tensor]:
    """loss_function, returning its named terms."""
    BCE = F.binary_cross_entropy(recon_x, x.view(-1, 64), reduction="sum")
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return {"loss": BCE + KLD, "BCE": BCE, "KLD": KLD}


def detached_recon_loss(
    recon_x: Tensor, x: Tensor, mu: Tensor, logvar: Tensor
) -> dict[str, Tensor]:
    """The fault: the reconstruction term is detached, in the total too."""
    BCE = F.binary_cross_entropy(recon_x, x.view(-1, 64), reduction="sum").detach()
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return {"loss": BCE + KLD, "BCE": BCE, "KLD": KLD}


def mixed_reduction_loss(
    recon_x: Tensor, x: Tensor, mu: Tensor, logvar: Tensor
) -> dict[str, Tensor]:
    """The fault: BCE summed over the batch, KLD averaged over it."""
    BCE = F.binary_cross_entropy(recon_x, x.view(-1, 64), reduction="sum")
    KLD = torch.mean(-0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1))
    return {"loss": BCE + KLD, "BCE": BCE, "KLD": KLD}


def tiny_kl_loss(recon_x: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> dict[str, Tensor]:
    """The fault: KLD weighted by 1e-6, noise in the total (passed as weights= to step)."""
    terms = dict_loss(recon_x, x, mu, logvar)
    return {**terms, "loss": terms["BCE"] + TINY_KL * terms["KLD"]}


TINY_KL = 1e-6


def log_of_zero_loss(recon_x: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """The fault: the Bernoulli KL written out by hand; x * log(x / recon) at x = 0 is
    0 * -inf = NaN (the images' background is exactly 0)."""
    x = x.view(-1, 64)
    BCE = torch.sum(x * torch.log(x / recon_x) + (1 - x) * torch.log((1 - x) / (1 - recon_x)))
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return BCE + KLD


# ---- faulty models: one method overridden ----------------------------------------------------


class ReseededVAE(VAE):
    def reparameterize(self, mu: Tensor, logvar: Tensor) -> Tensor:
        torch.manual_seed(0)  # "for reproducibility"
        return super().reparameterize(mu, logvar)


class MeanOnlyVAE(VAE):
    def reparameterize(self, mu: Tensor, logvar: Tensor) -> Tensor:
        return mu  # z = mu in training too


class VarianceAsSigmaVAE(VAE):
    def reparameterize(self, mu: Tensor, logvar: Tensor) -> Tensor:
        std = torch.exp(logvar)  # the variance used as sigma
        self.z = mu + torch.randn_like(std) * std
        return self.z


class VarianceAsSigmaVanillaVAE(VanillaVAE):
    def reparameterize(self, mu: Tensor, logvar: Tensor) -> Tensor:
        std = torch.exp(logvar)  # the variance used as sigma
        self.z = torch.randn_like(std) * std + mu
        return self.z


# ---- 1. healthy pytorch/examples, scalar loss and dict loss -------------------------------


def test_healthy_pytorch_examples_scalar_loss_is_clean_and_says_what_it_could_not_check():
    doctor, found = diagnose(pytorch_examples())
    assert codes(found) == set()
    reasons = skipped(found)
    for code in PER_TERM_CODES:  # one scalar: no named terms to check
        assert "named terms" in reasons[code], (code, reasons.get(code))
    # the Doctor built its own epochs: the epoch rules ran
    assert len(doctor.records()) == EPOCHS
    assert "loss-plateau" not in reasons
    # and so did the gradient, noise and dead-unit checks
    for code in ("frozen-noise", "vanishing-grad", "unused-params", "dying-relu"):
        assert code not in reasons, (code, reasons.get(code))
    assert doctor.summary() is None  # nothing to attribute


def test_healthy_pytorch_examples_dict_loss_runs_the_per_term_checks_and_attributes():
    doctor, found = diagnose(pytorch_examples(), loss_fn=dict_loss)
    assert codes(found) == set()
    reasons = skipped(found)
    # every per-term check ran but batch-dependent-weights, which needs the reductions
    # (the Doctor cannot measure them from what step() sees: reduction= gives them)
    assert set(PER_TERM_CODES) & set(reasons) == {"batch-dependent-weights"}, reasons
    assert "reduction=" in reasons["batch-dependent-weights"]
    assert "loss-plateau" not in reasons
    summary = doctor.summary()
    assert summary is not None
    assert summary.steps_attributed == ATTRIBUTION_SCHEDULE.count(STEPS) == 3  # 0, 4, 16
    assert {"BCE", "KLD"} <= set(summary.norm)
    assert all(summary.norm[n] > 0 for n in ("BCE", "KLD"))


def test_dict_loss_gives_the_same_epoch_totals_as_the_scalar_loss():
    scalar, _ = diagnose(pytorch_examples())
    named, _ = diagnose(pytorch_examples(), loss_fn=dict_loss)
    assert [r.total for r in scalar.records()] == pytest.approx([r.total for r in named.records()])
    assert set(named.records()[-1].raw) == {"BCE", "KLD"}
    assert scalar.records()[-1].raw == {}


# ---- 2. healthy AntixK VanillaVAE, list output, dict loss with detached terms ----------------


def train_antixk(model: VanillaVAE, doctor: Doctor, with_z: bool = False) -> None:
    """The same loop with AntixK's model and loss as their authors call them."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _epoch in range(EPOCHS):
        model.train()
        for _batch_idx, data in enumerate(loader()):
            optimizer.zero_grad()
            out = model(data)  # [recons, input, mu, log_var]
            loss = model.loss_function(*out, M_N=ANTIXK_KLD_WEIGHT)
            if with_z:
                recons, _, mu, log_var = out
                roles = {"reconstruction": recons, "mu": mu, "log_var": log_var, "z": model.z}
                doctor.step(roles, loss, data)
            else:
                doctor.step(out, loss, data)
            loss["loss"].backward()
            optimizer.step()
        doctor.epoch_end()


def test_healthy_antixk_is_clean_with_its_list_output_and_detached_terms():
    torch.manual_seed(0)
    model = VanillaVAE(in_channels=1, latent_dim=4)
    with Doctor(model, where="run") as doctor:
        train_antixk(model, doctor)
    found = doctor.findings(data=DATA)  # encodes DATA through the list output
    assert codes(found) == set(), [(f.code, f.message) for f in found]
    assert doctor.detached_terms  # AntixK logs detached copies: nothing to attribute
    assert doctor.summary() is None
    assert len(doctor.records()) == EPOCHS
    reasons = skipped(found)
    assert "no-grad-path" in reasons  # said, not silently skipped
    assert "dying-relu" not in reasons  # its nn.LeakyReLU modules were watched
    # its KLD is -KL (a per-sample mean), weighed by M_N in the total: audited, and right
    assert "kl-formula" not in reasons
    vae = doctor.evidence().vae
    assert vae.kl_term == "KLD" and vae.weight_source == "total"
    assert vae.steps[-1].weight == pytest.approx(-ANTIXK_KLD_WEIGHT, rel=1e-3)


def test_healthy_pytorch_examples_summed_kl_is_audited_and_matches():
    _, found = diagnose(pytorch_examples(), loss_fn=dict_loss)  # KLD summed over the batch
    assert not {"kl-formula", "beta-schedule", "collapse-onset"} & {f.code for f in found}
    assert "kl-formula" not in skipped(found)
    assert "collapse-onset" not in skipped(found)  # 24 steps: judged


def test_a_scalar_loss_has_no_kl_term_to_audit_and_says_so():
    _, found = diagnose(pytorch_examples())
    assert "one scalar" in skipped(found)["kl-formula"]


def antixk_kl_as_minus_kl_plus(recon_x: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> Any:
    """The fault: AntixK's formula with the leading minus dropped, so KLD is -KL and the
    total adds it: the loss rewards KL."""
    BCE = F.binary_cross_entropy(recon_x, x.view(-1, 64), reduction="sum")
    KLD = 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return {"loss": BCE + KLD, "BCE": BCE, "KLD": KLD}


def test_a_kl_with_its_minus_dropped_is_the_wrong_sign():
    _, found = diagnose(pytorch_examples(), loss_fn=antixk_kl_as_minus_kl_plus)
    (f,) = [f for f in found if f.code == "kl-formula"]
    assert f.severity == "error"
    assert f.evidence["convention"] == "sum over the batch"
    assert f.evidence["ratio"] == pytest.approx(-1.0, rel=1e-3)


# ---- 3. faults, each found with its code ---------------------------------------------------


def test_reseeding_inside_reparameterize_is_frozen_noise():
    doctor, found = diagnose(pytorch_examples(ReseededVAE))
    frozen = [f for f in found if f.code == "frozen-noise"]
    assert frozen and frozen[0].severity == "error"
    # no z in the tuple: eps is recovered from what reparameterize returned, every step
    assert frozen[0].evidence["probed"] == 0
    assert frozen[0].evidence["pairs"] == frozen[0].evidence["repeated"] == STEPS - 1
    assert doctor.reparameterize.calls == STEPS


class ClassCallVAE(ReseededVAE):
    """Draws z through the class, so the instance's method (the Doctor's wrapper) is
    never called: z cannot be read, as for a model that samples inline."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x.view(-1, 64))
        z = ReseededVAE.reparameterize(self, mu, logvar)
        return self.decode(z), mu, logvar


def test_reseeding_is_found_by_two_passes_when_z_cannot_be_read():
    doctor, found = diagnose(pytorch_examples(ClassCallVAE))
    assert doctor.reparameterize.calls == 0
    frozen = [f for f in found if f.code == "frozen-noise"]
    assert frozen and frozen[0].severity == "error"
    assert int(frozen[0].evidence["probed"] or 0) > 0  # found by two passes of one batch
    assert "needs z" in skipped(found)["noise-scale"]


def test_the_reparameterize_wrapper_is_removed_on_close():
    model = pytorch_examples()
    with Doctor(model) as doctor:
        assert "reparameterize" in vars(model)
        assert doctor.reparameterize.name == "reparameterize"
    assert "reparameterize" not in vars(model)
    assert model.reparameterize.__func__ is VAE.reparameterize  # the class method again


def test_z_equals_mu_in_training_is_frozen_noise():
    _, found = diagnose(pytorch_examples(MeanOnlyVAE))
    assert "frozen-noise" in codes(found)
    assert found[0].code == "frozen-noise"  # the worst


def test_variance_as_sigma_without_z_is_read_from_reparameterize():
    """Neither public VAE returns z: the Doctor reads it from their reparameterize. Near
    init pytorch/examples' log_var barely varies, so the exponent is not judged (said)."""
    _, found = diagnose(pytorch_examples(VarianceAsSigmaVAE))
    assert "noise-scale" not in codes(found)
    assert "varied too little" in skipped(found)["noise-scale"]


def test_variance_as_sigma_in_antixk_reparameterize_is_noise_scale_without_z():
    """The same fault as test_variance_as_sigma_with_z_is_noise_scale, with AntixK's own
    list output (no z): z comes from the wrapped reparameterize."""
    torch.manual_seed(3)
    model = VarianceAsSigmaVanillaVAE(in_channels=1, latent_dim=4)
    with Doctor(model, where="run") as doctor:
        train_antixk(model, doctor)
    found = doctor.findings(data=DATA)
    scale = [f for f in found if f.code == "noise-scale"]
    assert scale, [(n.code, n.reason) for n in found.not_checked]
    assert "exp(log_var) (the variance) is used as sigma" in scale[0].message


def test_healthy_antixk_noise_is_judged_from_reparameterize_and_clean():
    torch.manual_seed(3)
    model = VanillaVAE(in_channels=1, latent_dim=4)
    with Doctor(model, where="run") as doctor:
        train_antixk(model, doctor)
    found = doctor.findings(data=DATA)
    assert not {"noise-scale", "frozen-noise"} & {f.code for f in found}
    reasons = skipped(found)
    assert "frozen-noise" not in reasons
    assert "needs z" not in reasons.get("noise-scale", "")


def test_variance_as_sigma_with_z_near_init_is_not_judged_rather_than_passed():
    """pytorch/examples' log_var barely moves from 0 in 24 steps (std ~0.1), where
    exp(log_var) and exp(0.5 * log_var) agree: the Doctor says it cannot tell them apart."""
    _, found = diagnose(pytorch_examples(VarianceAsSigmaVAE), with_z=True)
    assert "noise-scale" not in codes(found)
    assert "varied too little" in skipped(found)["noise-scale"]


def test_variance_as_sigma_with_z_is_noise_scale():
    """AntixK's encoder (batch norm before fc_var) spreads log_var enough (std ~0.4-0.6)
    to measure the exponent; seed 3 gives a standard error of ~0.036 against the 0.05 the
    rule asks for (7 of seeds 0-7 are found; seed 5 sits at 0.050)."""
    torch.manual_seed(3)
    model = VarianceAsSigmaVanillaVAE(in_channels=1, latent_dim=4)
    with Doctor(model, where="run") as doctor:
        train_antixk(model, doctor, with_z=True)
    found = doctor.findings(data=DATA)
    scale = [f for f in found if f.code == "noise-scale"]
    assert scale, [(n.code, n.reason) for n in found.not_checked]
    assert "exp(log_var) (the variance) is used as sigma" in scale[0].message
    assert scale[0].evidence["exponent"] == pytest.approx(1.0, abs=0.25)


def test_detached_reconstruction_term_has_no_grad_path():
    _, found = diagnose(pytorch_examples(), loss_fn=detached_recon_loss)
    nograd = [f for f in found if f.code == "no-grad-path"]
    assert [f.where for f in nograd] == ["run:BCE"]
    assert nograd[0].severity == "error"


def test_sum_and_mean_reductions_are_batch_dependent_weights():
    """The Doctor sees one batch size, so it cannot measure reductions: the user says them."""
    _, found = diagnose(
        pytorch_examples(),
        loss_fn=mixed_reduction_loss,
        reduction={"BCE": "sum", "KLD": "mean"},
        findings_kwargs={"batch_size": BATCH},
    )
    bdw = [f for f in found if f.code == "batch-dependent-weights"]
    assert bdw, [(f.code, f.message) for f in found]
    assert "BCE summed over the batch but KLD averaged" in bdw[0].message
    assert f"at batch {BATCH}" in bdw[0].message


def test_batch_dependent_weights_names_the_batch_size_the_doctor_saw():
    _, found = diagnose(
        pytorch_examples(), loss_fn=mixed_reduction_loss, reduction={"BCE": "sum", "KLD": "mean"}
    )
    bdw = [f for f in found if f.code == "batch-dependent-weights"]
    assert bdw and f"at batch {BATCH}" in bdw[0].message, bdw[0].message


def test_unknown_reductions_are_listed_as_not_checked():
    _, found = diagnose(pytorch_examples(), loss_fn=mixed_reduction_loss)
    assert "batch-dependent-weights" in codes(found) | set(skipped(found))


def test_scale_imbalance_reads_the_users_term_names():
    _, found = diagnose(pytorch_examples(), loss_fn=tiny_kl_loss, weights={"KLD": TINY_KL})
    assert "scale-imbalance" in codes(found) | set(skipped(found))


@pytest.mark.parametrize("careful", [True, False], ids=["skips-backward", "backward-anyway"])
def test_log_of_zero_is_nonfinite_loss_whether_or_not_the_loop_skips_backward(careful):
    """The Doctor reads the loss in step(), before backward: it needs no backward pass."""
    doctor, found = diagnose(pytorch_examples(), loss_fn=log_of_zero_loss, careful=careful)
    loss = [f for f in found if f.code == "nonfinite-loss"]
    assert loss and loss[0].severity == "error"
    assert loss[0].evidence["skipped_steps"] == STEPS  # steps with a NaN total
    assert found[0].severity == "error"  # the NaN comes first
    reasons = skipped(found)
    if careful:  # no backward: the gradient checks say they could not run
        assert "no gradient was recorded" in reasons["nonfinite-grad"]
    else:  # NaN reached the gradients and the weights; findings(data=) still works
        assert "nonfinite-grad" in {f.code for f in found}  # a consequence of the NaN loss
        assert "posterior-collapse" in reasons  # mu is NaN: not judged


def test_nan_weights_are_not_reported_as_dead_relus():
    _, found = diagnose(pytorch_examples(), loss_fn=log_of_zero_loss)
    assert "dying-relu" not in codes(found)


def test_dead_relus_behind_functional_relu_need_data():
    model = pytorch_examples()
    with torch.no_grad():
        model.fc1.bias.fill_(-10.0)
    doctor, found = diagnose(model)
    dying = [f for f in found if f.code == "dying-relu"]
    assert [f.where for f in dying] == ["run:fc1 → F.relu"]
    assert dying[0].evidence["worst_fraction"] == 1.0
    # without data= the Doctor cannot run the model to look, and says so
    without = doctor.findings()
    assert "dying-relu" not in codes(without)
    assert "dying-relu" in skipped(without)


# ---- 4. steps_per_epoch ----------------------------------------------------------------------


def test_steps_per_epoch_matches_epoch_end_every_k_steps():
    by_count, _ = diagnose(pytorch_examples(), steps_per_epoch=8, epoch_end=False)
    by_hand, _ = diagnose(pytorch_examples(), epoch_end=False, end_every=8)
    both, _ = diagnose(pytorch_examples(), steps_per_epoch=8)  # and epoch_end per epoch
    counted, handed, doubled = by_count.records(), by_hand.records(), both.records()
    assert len(counted) == len(handed) == len(doubled) == STEPS // 8 == EPOCHS
    assert [r.steps for r in counted] == [r.steps for r in handed] == [8, 8, 8]
    assert [r.total for r in counted] == [r.total for r in handed] == [r.total for r in doubled]
    assert [r.epoch for r in counted] == [0, 1, 2]


def test_without_epoch_end_the_whole_run_is_one_epoch():
    doctor, found = diagnose(pytorch_examples(), epoch_end=False)
    assert len(doctor.records()) == 1
    assert doctor.records()[0].steps == STEPS
    assert f"needs {PLATEAU_MIN_EPOCHS} epochs, this run had 1" in skipped(found)["loss-plateau"]
