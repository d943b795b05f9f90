"""DoctorCallback on a real Lightning Trainer (CPU, a few steps).

The module wraps pytorch/examples' VAE as its author wrote it (tests/public_vaes.py);
each fault is one small change a user could write in their LightningModule.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from public_vaes import VAE  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from meaning_transform.diagnostics.schedule import ATTRIBUTION_SCHEDULE  # noqa: E402
from meaning_transform.integrations.lightning import DoctorCallback  # noqa: E402

N, BATCH, EPOCHS = 256, 32, 3
STEPS = N // BATCH * EPOCHS  # 24


def blob_rows(n: int = N, seed: int = 0) -> Tensor:
    """(n, 64) flattened 8x8 Gaussian blobs in [0, 1], zeros in the background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    cy, cx = (torch.rand(n, 1, 1, generator=g) * 7 for _ in range(2))
    r = 1 + 2 * torch.rand(n, 1, 1, generator=g)
    img = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
    return torch.where(img < 0.05, torch.zeros_like(img), img).reshape(n, 64)


DATA = blob_rows()


class ReseededVAE(VAE):
    def reparameterize(self, mu: Tensor, logvar: Tensor) -> Tensor:
        eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(0))  # same each step
        return mu + eps * torch.exp(0.5 * logvar)


class LitVAE(pl.LightningModule):
    """pytorch/examples' VAE in a LightningModule; ``named`` returns the terms."""

    def __init__(self, vae: type[VAE] = VAE, named: bool = True, detach_bce: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.vae = vae()
        self.named, self.detach_bce = named, detach_bce

    def forward(self, x: Tensor) -> Any:
        return self.vae(x)

    def training_step(self, batch: Tensor, batch_idx: int) -> Any:
        recon, mu, logvar = self(batch)
        bce = F.binary_cross_entropy(recon, batch, reduction="sum")
        if self.detach_bce:
            bce = bce.detach()  # the fault: no gradient reaches the decoder from it
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        if not self.named:
            return bce + kld
        return {"loss": bce + kld, "BCE": bce, "KLD": kld, "mu": mu}  # mu: not a term

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def loader() -> DataLoader[Tensor]:
    g = torch.Generator().manual_seed(0)
    return DataLoader(DATA, batch_size=BATCH, shuffle=True, generator=g)  # type: ignore[arg-type]


def fit(
    module: LitVAE,
    callback: DoctorCallback,
    tmp_path: Path | None = None,
    max_epochs: int = EPOCHS,
    ckpt_path: str | None = None,
) -> Any:
    logger: Any = False
    if tmp_path is not None:
        logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        callbacks=[callback],
        accelerator="cpu",
        devices=1,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer


def codes(callback: DoctorCallback) -> set[str]:
    assert callback.findings is not None
    return {f.code for f in callback.findings if f.severity in ("warning", "error")}


def test_healthy_module_returning_a_scalar_has_no_warning(capsys):
    module = LitVAE(named=False)
    callback = DoctorCallback()
    trainer = fit(module, callback)
    assert codes(callback) == set(), [(f.code, f.message) for f in callback.findings or ()]
    assert callback.doctor is not None and callback.doctor.steps == STEPS
    assert len(callback.doctor.records()) == EPOCHS  # one Doctor epoch per Lightning epoch
    assert callback.doctor.hooks.history[-1].total_norm > 0  # gradients were recorded
    reasons = {n.code: n.reason for n in callback.findings.not_checked}  # type: ignore[union-attr]
    assert "named terms" in reasons["no-grad-path"]  # a scalar: said, not skipped silently
    assert "frozen-noise" not in reasons  # the noise was checked (two passes, no z)
    printed = capsys.readouterr().out
    assert (
        printed.count(f"mtx: {len(callback.findings or ())} finding(s) after {STEPS} step(s)") == 1
    )
    metrics = trainer.callback_metrics
    assert {"mtx/loss", "mtx/grad_norm/total"} <= set(metrics)
    assert not any(k.startswith("mtx/term/") for k in metrics)
    # the wrapper and the hooks are gone after fit
    assert "training_step" not in vars(module)
    assert not callback.doctor.hooks.active


def test_healthy_module_returning_terms_logs_them_and_writes_the_report(tmp_path):
    report = tmp_path / "report.json"
    module = LitVAE()
    callback = DoctorCallback(model_attr="vae", report_path=report, print_findings=False)
    trainer = fit(module, callback, tmp_path)
    assert codes(callback) == set(), [(f.code, f.message) for f in callback.findings or ()]
    summary = callback.doctor.summary()  # type: ignore[union-attr]
    # attribution on the Doctor's default schedule (steps 0, 1, 2, 4, 8, 16 of 24)
    assert summary is not None
    assert summary.steps_attributed == ATTRIBUTION_SCHEDULE.count(STEPS) == 3  # 0, 4, 16
    assert set(summary.norm) == {"BCE", "KLD"}  # "mu" is not a scalar: not a term
    # log_dict under the stable keys, as the logger wrote them
    (metrics_file,) = tmp_path.glob("csv/*/metrics.csv")
    with metrics_file.open() as f:
        columns = set(next(csv.reader(f)))
    expected = {"mtx/loss", "mtx/term/BCE", "mtx/term/KLD", "mtx/grad_norm/BCE", "mtx/kl/analytic"}
    assert expected <= columns, columns
    assert trainer.callback_metrics["mtx/term/KLD"] > 0
    data = json.loads(report.read_text())
    assert data["steps"] == STEPS and data["stopped_by"] is None
    assert [f["code"] for f in data["findings"]] == [f.code for f in callback.findings or ()]
    assert {"code", "reason", "runs"} == set(data["not_checked"][0])


def test_reseeded_noise_is_found():
    callback = DoctorCallback(model_attr="vae", print_findings=False)
    trainer = fit(LitVAE(ReseededVAE), callback)
    assert "frozen-noise" in codes(callback)
    assert trainer.global_step == STEPS  # without stop_on, training runs to the end


def test_a_detached_term_has_no_grad_path():
    callback = DoctorCallback(model_attr="vae", print_findings=False)
    fit(LitVAE(detach_bce=True), callback)
    nograd = [f for f in callback.findings or () if f.code == "no-grad-path"]
    assert [f.where for f in nograd] == ["run:BCE"]


@pytest.mark.parametrize("check_every", [None, 2], ids=["at-epoch-end", "every-2-steps"])
def test_stop_on_error_stops_training_through_the_trainer(check_every, capsys):
    callback = DoctorCallback(model_attr="vae", stop_on="error", check_every=check_every)
    trainer = fit(LitVAE(ReseededVAE), callback)
    assert callback.stopped_by is not None and callback.stopped_by.code == "frozen-noise"
    assert trainer.should_stop
    assert trainer.global_step < STEPS
    if check_every is None:
        assert trainer.global_step == N // BATCH  # after the first epoch
    assert "stopping training on error frozen-noise" in capsys.readouterr().out
    assert "frozen-noise" in codes(callback)  # and the end-of-training findings say it


def test_a_resumed_run_keeps_its_evidence(tmp_path):
    first = DoctorCallback(model_attr="vae", print_findings=False)
    trainer = fit(LitVAE(), first, max_epochs=1)
    ckpt = tmp_path / "one-epoch.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = DoctorCallback(model_attr="vae", print_findings=False)
    fit(LitVAE(), resumed, max_epochs=EPOCHS, ckpt_path=str(ckpt))
    doctor = resumed.doctor
    assert doctor is not None and doctor.steps == STEPS  # 8 restored + 16 new
    assert len(doctor.evidence().step_losses) == STEPS
    assert [s.step for s in doctor.hooks.history] == list(range(STEPS))
    assert len(doctor.records()) == EPOCHS
    restored, seen = doctor.records()[0], first.doctor.records()[0]  # type: ignore[union-attr]
    assert repr(restored) == repr(seen)  # the same first epoch (repr: its beta is NaN)
    assert resumed.findings is not None  # judged on all 24 steps


def test_model_attr_must_name_a_module():
    callback = DoctorCallback(model_attr="named", print_findings=False)
    with pytest.raises(TypeError, match=r"expected an nn.Module at LitVAE.named, got bool"):
        fit(LitVAE(), callback, max_epochs=1)
