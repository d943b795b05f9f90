"""Worker side of the rank-check tests: 2 gloo ranks on localhost, several scenarios per launch.

:func:`launch` starts ``world`` spawned processes running :func:`main`; each rank runs the
named scenarios one after the other (fresh model, DDP wrapper, loader and RankMonitor
each) and writes ``{scenario: result}`` as JSON to ``rank{r}.json``. A child that does
not finish in time is killed and :func:`launch` raises, so a hung collective fails.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from meaning_transform.diagnostics.distributed import RankMonitor, rank_not_checked
from meaning_transform.diagnostics.doctor import Doctor
from meaning_transform.model import MeaningVAE
from meaning_transform.studies.distributed import free_port

N_SAMPLES = 512  # 256 per rank: 16 steps of 16 per epoch
BATCH = 16
NAN_STEP = 5  # the step at which rank 1's batch gets a NaN
INPUT_SCALE = 30.0  # rank 1's inputs in the scaled-input fault (digits in [0, 30])


def launch(
    scenarios: Sequence[str], out_dir: Path, world: int = 2, timeout: float = 120.0
) -> list[dict[str, Any]]:
    """Run ``scenarios`` on ``world`` ranks; the per-rank results, rank 0 first."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=main, args=(r, world, port, str(out_dir), list(scenarios)))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    for p in procs:
        p.join(max(0.0, (deadline - datetime.datetime.now()).total_seconds()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    if hung:
        raise RuntimeError(f"ranks {hung} did not finish within {timeout:g} s (killed)")
    codes = [p.exitcode for p in procs]
    if any(c != 0 for c in codes):
        errors = [
            (Path(out_dir) / f"rank{r}.err").read_text()
            for r in range(world)
            if (Path(out_dir) / f"rank{r}.err").exists()
        ]
        raise RuntimeError(f"ranks exited with {codes}:\n" + "\n".join(errors))
    return [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(world)]


def main(rank: int, world: int, port: int, out_dir: str, scenarios: list[str]) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=30),
        )
        results = {name: SCENARIOS[name](rank) for name in scenarios}
        (out / f"rank{rank}.json").write_text(json.dumps(results))
    except BaseException:
        import traceback

        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- data and models ----
def digits(n: int = N_SAMPLES) -> tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits in [0, 1]: ``(n, 64)`` features and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:n] / 16.0, dtype=torch.float32)  # (N, D)
    y = torch.tensor(d.target[:n], dtype=torch.long)
    return x, y


class DigitsMLP(nn.Module):
    """A 64-32-10 classifier (no noise, no BatchNorm: its gradient is a pure function)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))  # (B, 10)


def meaning_terms(model: nn.Module, out: Any, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    recon = F.mse_loss(out["reconstruction"], x)
    lv, mu = out["log_var"], out["mu"]
    kl = (-0.5 * (1 + lv - mu.pow(2) - lv.exp()).sum(1)).mean()
    return {"recon": recon, "kl": kl}


def examples_terms(model: nn.Module, out: Any, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    from public_vaes import loss_function  # pytorch/examples vae/main.py, as written

    recon, mu, logvar = out
    return {"loss": loss_function(recon, x, mu, logvar)}


def mlp_terms(model: nn.Module, out: Any, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    return {"ce": F.cross_entropy(out, y)}


def build(kind: str) -> tuple[nn.Module, Callable[..., dict[str, Tensor]]]:
    if kind == "meaning":
        return MeaningVAE(input_dim=64, latent_dim=4, hidden_dims=(32, 16), seed=0), meaning_terms
    if kind == "examples":
        from public_vaes import VAE  # pytorch/examples vae/main.py, shrunk to 64-32-4

        torch.manual_seed(0)
        return VAE(), examples_terms
    if kind == "mlp":
        return DigitsMLP(), mlp_terms
    raise ValueError(f"unknown model kind {kind!r}")


def train(
    rank: int,
    kind: str = "meaning",
    *,
    fault: str = "",
    sampler: bool = True,
    broadcast_buffers: bool = True,
    epochs: int = 1,
    set_epoch: bool = True,
    shuffle_expected: bool = False,
    n_samples: int = N_SAMPLES,
    batch: int = BATCH,
    optimizer: str = "adam",
    seed: int = 0,
    doctor: bool = False,
) -> dict[str, Any]:
    """One DDP training run with a RankMonitor; findings, evidence and extras as plain data.

    ``doctor=True``: the Doctor instead, as a user's loop has it (``doctor.step`` before
    backward, nothing after; its RankMonitor gathers at the end of the backward)."""
    torch.manual_seed(seed)  # the same on every rank, as a launcher would set it
    model, loss_terms = build(kind)
    with warnings.catch_warnings():  # torch 2.13 renames it; False keeps its old meaning
        warnings.simplefilter("ignore", FutureWarning)
        ddp = DDP(model, broadcast_buffers=broadcast_buffers)
    if fault == "desync" and rank == 1:
        with torch.no_grad():
            weight = model.decoder.fc_out.weight if kind == "meaning" else model.fc4.weight
            weight[0, 0] += 1e-3
    x_all, y_all = digits(n_samples)
    data = TensorDataset(x_all, y_all)
    samp = DistributedSampler(data, shuffle=True, seed=seed) if sampler else None
    loader = DataLoader(data, batch_size=batch, sampler=samp, shuffle=False)
    # SGD: pytorch/examples' loss is summed over the batch and the 64 features, hence its lr
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(ddp.parameters(), lr=1e-3)
        if optimizer == "adam"
        else torch.optim.SGD(ddp.parameters(), lr=1e-4 if kind == "examples" else 0.05)
    )
    doc = Doctor(ddp).attach() if doctor else None
    mon = doc.ranks if doc is not None else RankMonitor(ddp, shuffle_expected=shuffle_expected)
    assert mon is not None
    mon.attach()
    step = 0
    frozen: tuple[Tensor, Tensor] | None = None
    for epoch in range(epochs):
        if samp is not None and set_epoch:
            samp.set_epoch(epoch)
        for x, y in loader:
            if fault == "frozen" and rank == 1:
                frozen = frozen or (x, y)
                x, y = frozen
            if fault == "nan" and rank == 1 and step == NAN_STEP:
                x = x.clone()
                x[0, 0] = math.nan
            if fault == "scaled_input" and rank == 1:
                x = x * INPUT_SCALE
            out = ddp(x)
            terms = loss_terms(model, out, x, y)
            if fault == "nan_grad":  # a term worth 0 at every step, on every rank ...
                o = out if isinstance(out, Tensor) else out[0]
                zero = (o * 0).sum()
                if rank == 1 and step == NAN_STEP:  # ... whose gradient is 0 * inf = NaN
                    zero = 0.0 * torch.sqrt(o * 0).sum()
                terms["penalty"] = zero
            if fault == "loss_x100" and rank == 1:
                terms = {k: v * 100 for k, v in terms.items()}
            total = sum(terms.values())
            if doc is not None:
                named = terms if "loss" not in terms else {}
                doc.step(out, {"loss": total, **named} if named else total, x)
            else:
                mon.before_backward(terms, (x, y))
            total.backward()  # type: ignore[union-attr]
            if doc is None:
                mon.after_backward()
            opt.step()
            opt.zero_grad()
            step += 1
        mon.epoch_end()
    if doc is not None:
        found = doc.findings(data=x_all)
        doc.close()
        return {
            "findings": [f.as_dict() for f in found],
            "not_checked": [dataclasses.asdict(n) for n in found.not_checked],
            "evidence": dataclasses.asdict(mon.evidence()),
            "steps": doc.steps,
            "snapshots": len(doc.hooks.history),
        }
    mon.close()
    ev = mon.evidence()
    return {
        "findings": [f.as_dict() for f in mon.findings()],
        "not_checked": [dataclasses.asdict(n) for n in rank_not_checked(ev)],
        "evidence": dataclasses.asdict(ev),
    }


def hook_is_local(rank: int) -> dict[str, Any]:
    """The hook's norm equals the rank's own gradient (autograd.grad on the unwrapped
    model, no DDP); ``p.grad`` after DDP's backward is the mean of the ranks' gradients."""
    model = DigitsMLP()
    ddp = DDP(model)
    x_all, y_all = digits(64)
    x, y = x_all[rank * 32 : rank * 32 + 32], y_all[rank * 32 : rank * 32 + 32]
    params = list(model.parameters())
    own = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    own_flat = torch.cat([g.reshape(-1) for g in own])
    gathered = [torch.zeros_like(own_flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, own_flat)
    mean = torch.stack(gathered).mean(0)
    mon = RankMonitor(ddp).attach()
    loss = F.cross_entropy(ddp(x), y)
    mon.before_backward({"ce": loss}, x)
    loss.backward()
    mon.after_backward()
    mon.close()
    ev = mon.evidence()
    after = torch.cat([p.grad.reshape(-1) for p in params])
    return {
        "own_norm": float(own_flat.norm()),
        "mean_norm": float(mean.norm()),
        "after_matches_mean": bool(torch.allclose(after, mean, rtol=1e-5, atol=1e-7)),
        "local_grad_norm": list(ev.local_grad_norm[0]),
        "reduced_grad_norm": list(ev.reduced_grad_norm[0]),
        "findings": [f.as_dict() for f in mon.findings()],
    }


def hang(rank: int) -> dict[str, Any]:
    """A collective only rank 0 enters: it waits (up to the 30 s gloo timeout)."""
    if rank == 0:
        dist.barrier()
    else:
        time.sleep(60)
    return {}


SCENARIOS: dict[str, Callable[[int], dict[str, Any]]] = {
    "hang": hang,
    # the healthy runs GRAD_RATIO_THRESHOLD was measured on (not run by the tests)
    **{
        f"measure_{kind}_{opt}_b{b}_s{seed}": (
            lambda r, kind=kind, opt=opt, b=b, seed=seed: train(
                r, kind, optimizer=opt, batch=b, seed=seed, n_samples=40 * b
            )
        )
        for kind in ("meaning", "examples", "mlp")
        for opt in ("adam", "sgd")
        for b in (4, 16, 64)
        for seed in (0, 1)
    },
    "hook": hook_is_local,
    # the Doctor in a user's DDP loop (tests/distributed/test_doctor_ddp.py)
    "doctor_healthy_meaning": lambda r: train(r, "meaning", doctor=True),
    "doctor_healthy_examples": lambda r: train(r, "examples", doctor=True),
    "doctor_nan": lambda r: train(r, "meaning", fault="nan", doctor=True),
    "doctor_desync": lambda r: train(r, "meaning", fault="desync", doctor=True),
    "doctor_unsynced_bn": lambda r: train(r, "meaning", broadcast_buffers=False, doctor=True),
    "healthy_meaning": lambda r: train(r, "meaning"),
    "healthy_examples": lambda r: train(r, "examples"),
    "healthy_mlp": lambda r: train(r, "mlp"),
    "nan": lambda r: train(r, "meaning", fault="nan"),
    "nan_grad": lambda r: train(r, "mlp", fault="nan_grad"),
    "desync": lambda r: train(r, "meaning", fault="desync"),
    "unsynced_bn": lambda r: train(r, "meaning", broadcast_buffers=False),
    "loss_x100": lambda r: train(r, "examples", fault="loss_x100"),
    "scaled_input": lambda r: train(r, "mlp", fault="scaled_input"),
    "frozen": lambda r: train(r, "meaning", fault="frozen"),
    "duplicate": lambda r: train(r, "meaning", sampler=False),
    "repeats": lambda r: train(
        r, "mlp", epochs=3, set_epoch=False, shuffle_expected=True, n_samples=128
    ),
    "reshuffled": lambda r: train(
        r, "mlp", epochs=3, set_epoch=True, shuffle_expected=True, n_samples=128
    ),
}
