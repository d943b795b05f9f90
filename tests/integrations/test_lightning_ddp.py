"""DoctorCallback under Lightning's real ``strategy="ddp"`` (2 gloo ranks on the CPU).

Lightning's ddp launcher starts rank 1 by re-running the script rank 0 was started with,
so this module is also that script: the test runs ``python test_lightning_ddp.py OUT
SCENARIO...`` in a subprocess and Lightning re-runs it for rank 1. Each rank fits one
Trainer per scenario and writes what its callback saw to ``OUT/rank{r}-{scenario}.json``;
stdout is shared by both ranks, so a block printed by rank 1 too would show twice. A run
that does not finish in time is killed (its whole process group) and fails the test.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from meaning_transform.integrations import lightning as mtx_lightning  # noqa: E402
from meaning_transform.model import MeaningVAE  # noqa: E402
from meaning_transform.studies.distributed import free_port  # noqa: E402

N, BATCH, EPOCHS = 256, 16, 2  # 128 rows per rank: 8 steps per epoch
STEPS_PER_EPOCH = N // 2 // BATCH
TIMEOUT = 240.0  # seconds for the whole launch (measured: ~25 s for all scenarios)
HEAD = "finding(s) after"  # in the one line that opens the printed findings block


class LitMeaningVAE(pl.LightningModule):
    """A tiny MeaningVAE; ``training_step`` returns the total and its named terms."""

    def __init__(self) -> None:
        super().__init__()
        self.vae = MeaningVAE(input_dim=16, latent_dim=4, hidden_dims=(32, 16), seed=0)

    def training_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
        out = self.vae(batch)
        recon = F.mse_loss(out["reconstruction"], batch)
        mu, lv = out["mu"], out["log_var"]
        kl = (-0.5 * (1 + lv - mu.pow(2) - lv.exp()).sum(1)).mean()
        return {"loss": recon + kl, "recon": recon, "kl": kl}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class PerturbOnRank1(pl.Callback):
    """The desync fault: rank 1 changes one weight after DDP's broadcast at wrap time."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == 1:
            with torch.no_grad():
                pl_module.vae.decoder.fc_out.weight[0, 0] += 1e-3


class FrozenNoiseOnRank1(pl.Callback):
    """A local fault: rank 1 alone reuses one eps (its Doctor, not rank 0's, finds it)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == 1:
            pl_module.vae.noise = "frozen"


# scenario -> (DoctorCallback arguments, extra callbacks)
SCENARIOS: dict[str, tuple[dict[str, Any], list[pl.Callback]]] = {
    "healthy": ({"stop_on": "error", "check_every": 2}, []),
    "desync": ({}, [PerturbOnRank1()]),
    "stop-at-epoch-end": ({"stop_on": "error"}, [FrozenNoiseOnRank1()]),
    "stop-every-2-steps": ({"stop_on": "error", "check_every": 2}, [FrozenNoiseOnRank1()]),
}


def fit_scenario(name: str, out: Path) -> None:
    """One Trainer(strategy="ddp") fit on this rank; its callback's outcome as JSON."""
    from lightning.pytorch.strategies import DDPStrategy

    kwargs, extra = SCENARIOS[name]
    writes: list[str] = []
    write_report = mtx_lightning.write_report

    def counted(path: Path, *args: Any) -> None:
        writes.append(str(path))
        write_report(path, *args)

    mtx_lightning.write_report = counted  # type: ignore[assignment]
    callback = mtx_lightning.DoctorCallback(
        model_attr="vae", report_path=out / f"{name}-report.json", **kwargs
    )
    data = torch.rand(N, 16, generator=torch.Generator().manual_seed(0))  # (N, D) in [0, 1)
    loader: DataLoader[Tensor] = DataLoader(data, batch_size=BATCH, shuffle=True)  # type: ignore[arg-type]
    trainer = pl.Trainer(
        # "ddp" as an object only for the timeout: a hung collective fails within a minute
        strategy=DDPStrategy(process_group_backend="gloo", timeout=datetime.timedelta(seconds=60)),
        accelerator="cpu",
        devices=2,
        max_epochs=EPOCHS + 1 if name.startswith("stop") else EPOCHS,
        callbacks=[callback, *extra],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(LitMeaningVAE(), loader)
    mtx_lightning.write_report = write_report
    assert callback.findings is not None and callback.doctor is not None
    result = {
        "rank": trainer.global_rank,
        "strategy": type(trainer.strategy).__name__,
        "launcher": type(trainer.strategy.launcher).__name__,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "doctor_steps": callback.doctor.steps,
        "stopped_by": callback.stopped_by.code if callback.stopped_by else None,
        "findings": [
            {"code": f.code, "severity": f.severity, "where": f.where, "message": f.message}
            for f in callback.findings
        ],
        "report_writes": writes,
    }
    (out / f"rank{trainer.global_rank}-{name}.json").write_text(json.dumps(result))


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    out = Path(argv[0])
    for name in argv[1:]:
        fit_scenario(name, out)


# ---- the test side ----
@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """Run every scenario in one launch of 2 ranks; (stdout, the results' directory)."""
    out = tmp_path_factory.mktemp("lightning-ddp")
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GROUP_RANK"):
        env.pop(key, None)  # a launcher's variables would make this process a child
    proc = subprocess.Popen(
        [sys.executable, __file__, str(out), *SCENARIOS],
        env=env,
        cwd=out,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # rank 1 is rank 0's child: kill the group on a hang
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the ddp run did not finish within {TIMEOUT:g} s (killed)\n{stderr[-4000:]}")
    assert proc.returncode == 0, stderr[-4000:]
    return stdout, out


def results(out: Path, scenario: str) -> list[dict[str, Any]]:
    return [json.loads((out / f"rank{r}-{scenario}.json").read_text()) for r in range(2)]


def serious(result: dict[str, Any]) -> list[tuple[str, str]]:
    found = result["findings"]
    return [(f["code"], f["message"]) for f in found if f["severity"] in ("warning", "error")]


def test_it_ran_under_the_real_ddp_strategy(launched: tuple[str, Path]) -> None:
    _, out = launched
    for result in results(out, "healthy"):
        assert result["world_size"] == 2
        assert result["strategy"] == "DDPStrategy"
        assert result["launcher"] == "_SubprocessScriptLauncher"  # strategy="ddp" re-runs it


def test_the_findings_are_printed_once_per_fit(launched: tuple[str, Path]) -> None:
    stdout, _ = launched
    heads = [line for line in stdout.splitlines() if line.startswith("mtx: ") and HEAD in line]
    assert len(heads) == len(SCENARIOS), stdout  # rank 1 prints nothing


def test_a_healthy_run_has_no_warning_and_rank_0_writes_the_report(
    launched: tuple[str, Path],
) -> None:
    _, out = launched
    rank0, rank1 = results(out, "healthy")
    for result in (rank0, rank1):
        assert serious(result) == []
        assert result["doctor_steps"] == result["global_step"] == EPOCHS * STEPS_PER_EPOCH
        assert result["stopped_by"] is None
    assert rank0["report_writes"] == [str(out / "healthy-report.json")]
    assert rank1["report_writes"] == []
    report = json.loads((out / "healthy-report.json").read_text())
    assert report["steps"] == EPOCHS * STEPS_PER_EPOCH
    assert [f["code"] for f in report["findings"]] == [f["code"] for f in rank0["findings"]]


def test_a_weight_changed_on_rank_1_is_a_desync_on_every_rank(
    launched: tuple[str, Path],
) -> None:
    _, out = launched
    per_rank = [
        [f for f in result["findings"] if f["code"].startswith("rank-")]
        for result in results(out, "desync")
    ]
    assert per_rank[0] == per_rank[1]  # the rank findings are the same everywhere
    (desync,) = [f for f in per_rank[0] if f["code"] == "rank-desync"]
    assert desync["severity"] == "error"
    assert "rank 1" in desync["message"], desync["message"]
    assert "decoder.fc_out.weight" in desync["message"], desync["message"]


@pytest.mark.parametrize("scenario", ["stop-at-epoch-end", "stop-every-2-steps"])
def test_a_finding_on_rank_1_alone_stops_both_ranks_together(
    launched: tuple[str, Path], scenario: str
) -> None:
    stdout, out = launched
    rank0, rank1 = results(out, scenario)
    local = {f["code"] for f in rank1["findings"]} - {f["code"] for f in rank0["findings"]}
    assert "frozen-noise" in local  # only rank 1's Doctor saw it
    assert rank0["stopped_by"] == rank1["stopped_by"] == "frozen-noise"
    assert rank0["global_step"] == rank1["global_step"] < (EPOCHS + 1) * STEPS_PER_EPOCH
    if scenario == "stop-at-epoch-end":
        assert rank0["global_step"] == STEPS_PER_EPOCH  # after the first epoch
    stops = [line for line in stdout.splitlines() if line.startswith("mtx: stopping")]
    assert len(stops) == 2, stdout  # one line per stopped fit, from rank 0 only
    for line in stops:
        assert line.startswith("mtx: stopping training on error frozen-noise"), line
        assert line.endswith("(rank 1)"), line  # the rank whose Doctor found it


if __name__ == "__main__":
    main(sys.argv[1:])
