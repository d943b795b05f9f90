"""What the NaN guard costs on healthy steps, next to a plain step and detect_anomaly.

    python benchmarks/bench_nan_guard.py                    # ~3 min on 2 CPU cores
    python benchmarks/bench_nan_guard.py --runs 5 --rounds 60
    python benchmarks/bench_nan_guard.py --json out.json    # also save the numbers

The model is the issue's mid-size MLP VAE: MeaningVAE(input_dim=784, latent_dim=32,
hidden_dims=(512, 256)) with batch norm, batch 256 of uniform [0, 1) data, Adam (lr 1e-3),
CombinedLoss (reconstruction + 0.1 KL). Every configuration trains its own copy from the
same seed on the same batch; every step is healthy (nothing non-finite), so the guard
never localises and what is measured is its per-step check.

Configurations (one row each, interleaved in every round):

- plain step: zero_grad, forward, loss, backward, Adam step.
- + NanGuard alone: plain step + ``NanGuard.check`` before backward (the loss and its
  terms checked on the device and read once, the batch's finiteness counted).
- + Doctor, guard off: plain step + ``Doctor.step`` (``attribute_every=0``,
  ``nan_guard=False``) before backward, the Doctor's gradient hooks attached.
- + Doctor, guard on: the same with ``nan_guard=True`` (the default).
- detect_anomaly: the plain step under ``torch.autograd.detect_anomaly(check_nan=True)``.

``--runs`` independent interleaved runs (fresh models each); the summary gives, per
configuration, the median over runs of each run's median ratio to the plain step, with
the min-max of those run medians. "guard on / guard off" is the Doctor's two rows'
per-round ratio: the guard's cost inside the Doctor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from _harness import (  # noqa: E402
    machine_info,
    print_machine,
    print_table,
    run_interleaved,
    summarise,
)

from meaning_transform.diagnostics.doctor import Doctor  # noqa: E402
from meaning_transform.diagnostics.nan_guard import NanGuard  # noqa: E402
from meaning_transform.losses import CombinedLoss  # noqa: E402
from meaning_transform.model import MeaningVAE  # noqa: E402

INPUT_DIM, LATENT_DIM, HIDDEN, BATCH = 784, 32, (512, 256), 256
PLAIN = "plain step"


class Run:
    """One model + optimizer + loss, trained by one configuration."""

    def __init__(self, x: torch.Tensor) -> None:
        self.model = MeaningVAE(INPUT_DIM, LATENT_DIM, HIDDEN, seed=0)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.loss_fn = CombinedLoss(
            recon_loss_weight=1.0, kl_loss_weight=0.1, semantic_loss_weight=0.0
        )
        self.x = x


def plain_step(run: Run) -> Callable[[], None]:
    def step() -> None:
        run.optimizer.zero_grad(set_to_none=True)
        out = run.model(run.x)
        result = run.loss_fn(out, run.x)
        result["loss"].backward()
        run.optimizer.step()

    return step


def guard_step(run: Run) -> Callable[[], None]:
    guard = NanGuard(run.model)
    count = [0]

    def step() -> None:
        run.optimizer.zero_grad(set_to_none=True)
        out = run.model(run.x)
        result = run.loss_fn(out, run.x)
        guard.check(count[0], run.x, out, result)
        result["loss"].backward()
        run.optimizer.step()
        count[0] += 1

    return step


def doctor_step(run: Run, nan_guard: bool) -> Callable[[], None]:
    doctor = Doctor(run.model, attribute_every=0, nan_guard=nan_guard).attach()

    def step() -> None:
        run.optimizer.zero_grad(set_to_none=True)
        out = run.model(run.x)
        result = run.loss_fn(out, run.x)
        doctor.step(out, result, run.x)
        result["loss"].backward()
        run.optimizer.step()

    return step


def anomaly_step(run: Run) -> Callable[[], None]:
    plain = plain_step(run)

    def step() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Anomaly Detection has been enabled" per call
            with torch.autograd.detect_anomaly(check_nan=True):
                plain()

    return step


def configs(x: torch.Tensor) -> dict[str, Callable[[], None]]:
    return {
        PLAIN: plain_step(Run(x)),
        "+ NanGuard alone": guard_step(Run(x)),
        "+ Doctor, guard off": doctor_step(Run(x), nan_guard=False),
        "+ Doctor, guard on": doctor_step(Run(x), nan_guard=True),
        "detect_anomaly(check_nan=True)": anomaly_step(Run(x)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="independent interleaved runs")
    parser.add_argument("--rounds", type=int, default=40, help="interleaved rounds per run")
    parser.add_argument("--block", type=int, default=2, help="steps per configuration per round")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(BATCH, INPUT_DIM, generator=torch.Generator().manual_seed(0))  # (B, D)
    info = machine_info()
    print_machine(info)
    print(
        f"model: MeaningVAE({INPUT_DIM}, latent {LATENT_DIM}, hidden {HIDDEN}, batch norm); "
        f"batch {BATCH}; Adam; {args.runs} runs x {args.rounds} rounds x {args.block} steps"
    )

    per_run: dict[str, list[float]] = {}  # configuration -> each run's median ratio
    guard_in_doctor: list[float] = []  # each run's median of (guard on / guard off)
    runs = []
    for r in range(args.runs):
        samples = run_interleaved(configs(x), rounds=args.rounds, block=args.block)
        rows = summarise(samples, PLAIN)
        print_table(rows, f"run {r + 1}/{args.runs}: ms per step and ratio to the plain step")
        for row in rows:
            per_run.setdefault(row.name, []).append(row.ratio_median)
        on, off = samples["+ Doctor, guard on"], samples["+ Doctor, guard off"]
        guard_in_doctor.append(statistics.median(a / b for a, b in zip(on, off, strict=True)))
        runs.append({"rows": [asdict(row) for row in rows], "samples_ms": samples})

    print(f"\nSummary over {args.runs} runs: median of the runs' median ratios (min-max)")
    width = max(len(name) for name in per_run)
    for name, ratios in per_run.items():
        median = statistics.median(ratios)
        print(f"  {name:<{width}}  {median:6.3f} x plain ({min(ratios):.3f}-{max(ratios):.3f})")
    median = statistics.median(guard_in_doctor)
    low, high = min(guard_in_doctor), max(guard_in_doctor)
    print(
        f"  {'guard on / guard off (Doctor)':<{width}}  {median:6.3f}        ({low:.3f}-{high:.3f})"
    )

    if args.json is not None:
        payload = {
            "machine": info,
            "args": vars(args) | {"json": str(args.json)},
            "summary": {name: ratios for name, ratios in per_run.items()},
            "guard_on_over_off": guard_in_doctor,
            "runs": runs,
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
