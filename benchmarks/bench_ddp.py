"""What the Doctor costs per step under 2-rank DDP (gloo, CPU), next to plain DDP.

    python benchmarks/bench_ddp.py                      # ~2 min on 2 CPU cores
    python benchmarks/bench_ddp.py --rounds 100 --block 8
    python benchmarks/bench_ddp.py --json ddp.json      # also save the numbers

Two spawned ranks on localhost (gloo, ``torch.set_num_threads(1)`` each), one process
group. The model is the issue's mid-size MLP VAE: MeaningVAE(input_dim=784, latent_dim=32,
hidden_dims=(512, 256)) with batch norm, batch 256 of uniform [0, 1) data per rank (other
batches on each rank, 8 in turn), Adam (lr 1e-3), CombinedLoss (reconstruction + 0.1 KL,
semantic_loss_weight=0). Every configuration trains its own DDP copy from the same seed.

Configurations (one row each, interleaved in every round, in the same processes):

- plain DDP step: zero_grad, DDP forward, loss, backward (DDP's gradient all-reduce),
  Adam step.
- + Doctor, default settings: plain step + ``Doctor(ddp).step`` before backward: its own
  checks (gradient statistics, NaN guard, attribution on its default schedule) and the
  rank checks (one all_gather queued at the end of each backward).
- + Doctor, rank checks off: the same with ``distributed=False`` (what the rank checks
  add is the difference between these two rows).
- + RankMonitor alone: plain step + ``RankMonitor.before_backward``, its all_gather
  queued after DDP's own finalize (``gather_after_backward=True``, as in the Doctor).

Both ranks run the same configurations in the same order; DDP's all-reduce keeps them in
lockstep, so rank 0's clock times the pair. Per round: ms per step (mean over ``--block``
steps) and the ratio to the plain step of the same round; the table gives median
(min-max) over rounds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from _harness import (  # noqa: E402
    Summary,
    machine_info,
    print_machine,
    print_table,
    run_interleaved,
    summarise,
)
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from meaning_transform.diagnostics.distributed import RankMonitor  # noqa: E402
from meaning_transform.diagnostics.doctor import Doctor  # noqa: E402
from meaning_transform.losses import CombinedLoss  # noqa: E402
from meaning_transform.model import MeaningVAE  # noqa: E402
from meaning_transform.studies.distributed import free_port  # noqa: E402

INPUT_DIM, LATENT_DIM, HIDDEN, BATCH = 784, 32, (512, 256), 256
WORLD = 2
N_BATCHES = 8
PLAIN = "plain DDP step"
DOCTOR = "+ Doctor, default settings"
LOCAL_ONLY = "+ Doctor, rank checks off"
MONITOR = "+ RankMonitor alone"


class Run:
    """One DDP model + optimizer + loss, trained by one configuration."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        model = MeaningVAE(INPUT_DIM, LATENT_DIM, HIDDEN, seed=0)
        with warnings.catch_warnings():  # torch 2.13 renames a DDP argument's default
            warnings.simplefilter("ignore", FutureWarning)
            self.ddp = DDP(model)
        self.optimizer = torch.optim.Adam(self.ddp.parameters(), lr=1e-3)
        self.loss_fn = CombinedLoss(
            recon_loss_weight=1.0, kl_loss_weight=0.1, semantic_loss_weight=0.0
        )
        self.batches = batches
        self.seen = 0

    @property
    def x(self) -> torch.Tensor:
        """This step's batch; :meth:`next` moves to the next one."""
        return self.batches[self.seen % len(self.batches)]

    def next(self) -> None:
        self.seen += 1


def plain_step(run: Run) -> Callable[[], None]:
    def step() -> None:
        run.optimizer.zero_grad(set_to_none=True)
        out = run.ddp(run.x)
        result = run.loss_fn(out, run.x)
        result["loss"].backward()
        run.optimizer.step()
        run.next()

    return step


def doctor_step(run: Run, distributed: bool) -> tuple[Callable[[], None], Doctor]:
    doctor = Doctor(run.ddp, distributed=distributed).attach()

    def step() -> None:
        run.optimizer.zero_grad(set_to_none=True)
        out = run.ddp(run.x)
        result = run.loss_fn(out, run.x)
        doctor.step(out, result, run.x)
        result["loss"].backward()  # the rank checks' all_gather runs at its end
        run.optimizer.step()
        run.next()

    return step, doctor


def monitor_step(run: Run) -> tuple[Callable[[], None], RankMonitor]:
    monitor = RankMonitor(run.ddp, gather_after_backward=True).attach()

    def step() -> None:
        run.optimizer.zero_grad(set_to_none=True)
        out = run.ddp(run.x)
        result = run.loss_fn(out, run.x)
        monitor.before_backward(result["terms"], run.x)
        result["loss"].backward()  # its all_gather runs at the end, after DDP's finalize
        run.optimizer.step()
        run.next()

    return step, monitor


def worker(rank: int, port: int, out_dir: str, rounds: int, block: int, warmup: int) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=WORLD,
            timeout=datetime.timedelta(seconds=60),
        )
        # different batches per rank, as a DistributedSampler gives; a fixed one would
        # be rank-data-frozen
        g = torch.Generator().manual_seed(rank)
        x = [torch.rand(BATCH, INPUT_DIM, generator=g) for _ in range(N_BATCHES)]  # (B, D)
        doctor_run, doctor = doctor_step(Run(x), distributed=True)
        local_run, _ = doctor_step(Run(x), distributed=False)
        monitor_run, monitor = monitor_step(Run(x))
        configs = {PLAIN: plain_step(Run(x)), DOCTOR: doctor_run, LOCAL_ONLY: local_run}
        configs[MONITOR] = monitor_run
        samples = run_interleaved(configs, rounds, block, warmup=warmup, progress=rank == 0)
        rank_codes = sorted({f.code for f in monitor.findings()})
        doctor_rank_codes = sorted(f.code for f in doctor.findings() if f.code.startswith("rank-"))
        result = {
            "samples_ms": samples,
            "steps": doctor.steps,
            "monitor_rank_findings": rank_codes,
            "doctor_rank_findings": doctor_rank_codes,
        }
        (out / f"rank{rank}.json").write_text(json.dumps(result))
    except BaseException:
        import traceback

        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(out_dir: Path, rounds: int, block: int, warmup: int, timeout: float) -> list[Any]:
    """Run :func:`worker` on 2 spawned ranks; each rank's result, rank 0 first."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=worker, args=(r, port, str(out_dir), rounds, block, warmup))
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    if hung:
        raise SystemExit(f"ranks {hung} did not finish within {timeout:g} s (killed)")
    errors = [(out_dir / f"rank{r}.err") for r in range(WORLD)]
    if any(p.exitcode != 0 for p in procs):
        text = "\n".join(e.read_text() for e in errors if e.exists())
        raise SystemExit(f"ranks exited with {[p.exitcode for p in procs]}:\n{text}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60, help="interleaved rounds")
    parser.add_argument("--block", type=int, default=8, help="steps per configuration per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before killing")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()

    torch.set_num_threads(1)  # as each rank has it, so that machine_info says so
    info = machine_info() | {"ranks": WORLD, "backend": "gloo"}
    print_machine(info)
    print(
        f"model: MeaningVAE({INPUT_DIM}, latent {LATENT_DIM}, hidden {HIDDEN}, batch norm); "
        f"batch {BATCH} per rank; Adam; DDP over {WORLD} gloo ranks, 1 thread each; "
        f"{args.rounds} rounds x {args.block} steps"
    )
    with tempfile.TemporaryDirectory() as tmp:
        rank0, rank1 = launch(Path(tmp), args.rounds, args.block, args.warmup, args.timeout)
    rows: list[Summary] = summarise(rank0["samples_ms"], PLAIN)
    print_table(rows, "ms per step on rank 0 and ratio to the plain DDP step")
    print(
        f"\nrank findings after {rank0['steps']} Doctor steps (healthy run: none expected): "
        f"Doctor {rank0['doctor_rank_findings'] or 'none'}, "
        f"RankMonitor {rank0['monitor_rank_findings'] or 'none'}"
    )
    same = rank0["doctor_rank_findings"] == rank1["doctor_rank_findings"]
    print(f"the same rank findings on rank 1: {same}")

    if args.json is not None:
        payload = {
            "machine": info,
            "args": vars(args) | {"json": str(args.json)},
            "rows": [asdict(row) for row in rows],
            "samples_ms": rank0["samples_ms"],
            "rank_findings": {
                "doctor": rank0["doctor_rank_findings"],
                "monitor": rank0["monitor_rank_findings"],
            },
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
