"""What the Doctor costs with its default settings, and what per-term attribution costs.

    python benchmarks/bench_doctor.py                   # ~12 min on 2 CPU cores
    python benchmarks/bench_doctor.py --runs 3 --rounds 10   # quicker, noisier
    python benchmarks/bench_doctor.py --json out.json   # also save the numbers

The model is the issue's mid-size MLP VAE: MeaningVAE(input_dim=784, latent_dim=32,
hidden_dims=(512, 256)) with batch norm (1.09 M parameters), batch 256 of uniform [0, 1)
data (8 batches, in turn), Adam (lr 1e-3), and bench_overhead.py's three-term loss:

    total = 1.0 * reconstruction + 0.1 * kl + 0.1 * l1

Part 1, a 200-step training run end to end, one sample per configuration per run, the
configurations interleaved (rotated order) in every run:

- plain run: zero_grad, forward, loss, backward, Adam step, 200 times.
- Doctor, default settings: the same, with ``Doctor(model)`` attached, ``doctor.step``
  before every backward, and ``doctor.findings(data=...)`` at the end (the Doctor's
  construction, its hooks and its verdicts are inside the timing).
- the same with one setting changed: ``nan_guard=False``; ``attribute_every=0`` (no
  attribution); ``schedule=Schedule(every=1), attribute_every=0`` (full gradient
  statistics every step, no attribution); ``schedule=Schedule(every=1),
  attribute_every=1`` (everything every step: full statistics and attribution, what
  the default was before issue 13, apart from the cheaper attribution).

Part 1b, the default Doctor's run in lockstep with a plain run: both step in turn (the
order swapped every step), each step timed, so the machine's drift between whole runs
(10-30% on a shared 2-core VM) hits both alike; the ratio is the Doctor run's total
(its steps, construction, close and findings) over the plain steps', and the Doctor's
extra time is split into its ordinary steps, its attribution steps, its other
full-statistics steps and the fixed costs. The two runs share the caches, which can make
the Doctor's memory-bound work (gradient norms) dearer than in a run of its own.

Part 2, one training step with per-term attribution for the three terms, next to a plain
step (blocks of steps, interleaved; ratio to the plain step of the same round):

- attribution, K - 1 passes: ``begin_attribution`` (the KL and L1 terms' own passes, the
  KL one through the encoder only), the step's ``total.backward()``, then
  ``complete_attribution`` takes the reconstruction term as the total minus the others,
  Adam step. This is what the Doctor does on an attribution step.
- attribution, K passes + write_grad: ``term_attribution(write_grad=True)``, one pass per
  term and the total written from them (no separate backward), Adam step.
- attribution, K passes + backward: ``term_attribution`` then ``total.backward()``: the
  Doctor's attribution step before issue 13.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from _harness import (  # noqa: E402
    Summary,
    machine_info,
    print_machine,
    print_table,
    run_interleaved,
    summarise,
)

from meaning_transform.diagnostics.attribution import (  # noqa: E402
    begin_attribution,
    complete_attribution,
    term_attribution,
)
from meaning_transform.diagnostics.doctor import Doctor  # noqa: E402
from meaning_transform.diagnostics.schedule import (  # noqa: E402
    ATTRIBUTION_SCHEDULE,
    Schedule,
)
from meaning_transform.losses import CombinedLoss  # noqa: E402
from meaning_transform.model import MeaningVAE  # noqa: E402

INPUT_DIM, LATENT_DIM, HIDDEN, BATCH, BATCHES = 784, 32, (512, 256), 256, 8
WEIGHTS = {"reconstruction": 1.0, "kl": 0.1, "l1": 0.1}
PLAIN_RUN, PLAIN_STEP = "plain run", "plain step"


class Run:
    """One model + optimizer + loss."""

    def __init__(self) -> None:
        self.model = MeaningVAE(INPUT_DIM, LATENT_DIM, HIDDEN, seed=0)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=1e-3)
        self.loss_fn = CombinedLoss(
            recon_loss_weight=WEIGHTS["reconstruction"],
            kl_loss_weight=WEIGHTS["kl"],
            semantic_loss_weight=0.0,
        )

    def forward(self, x: torch.Tensor) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor]:
        """The model output, the three unweighted terms and the weighted total."""
        out = self.model(x)
        result = self.loss_fn(out, x)
        terms = {
            "reconstruction": result["terms"]["reconstruction"],
            "kl": result["terms"]["kl"],
            "l1": (out["reconstruction"] - x).abs().sum(dim=1).mean(),
        }
        total = result["loss"] + WEIGHTS["l1"] * terms["l1"]
        return out, terms, total


# ---------------------------------------------------------------- part 1: a 200-step run


def train_step(r: Run, doctor: Doctor | None, data: torch.Tensor, step: int) -> None:
    """One training step on the step's batch of ``data``, with ``doctor.step`` if given."""
    x = data[(step % BATCHES) * BATCH : (step % BATCHES + 1) * BATCH]
    r.optimizer.zero_grad(set_to_none=True)
    out, terms, total = r.forward(x)
    if doctor is not None:
        doctor.step(out, {"loss": total, **terms}, x, weights=WEIGHTS)
    total.backward()
    r.optimizer.step()


def training_run(data: torch.Tensor, steps: int, doctor_kwargs: dict | None) -> Callable[[], None]:
    """A whole run from a fresh model; ``doctor_kwargs=None``: no Doctor."""

    def run() -> None:
        r = Run()
        doctor = Doctor(r.model, **doctor_kwargs).attach() if doctor_kwargs is not None else None
        for step in range(steps):
            train_step(r, doctor, data, step)
        if doctor is not None:
            doctor.close()
            doctor.findings(data=data)

    return run


def lockstep(data: torch.Tensor, steps: int, doctor_kwargs: dict) -> tuple[float, float, dict]:
    """A plain run and a run with the Doctor stepped in turn (the order swapped every step),
    each step timed: the machine's drift (this 2-core VM's step time wanders by 10-30%
    between whole runs) hits both runs alike. Returns (plain ms, Doctor ms, parts): the
    Doctor's total includes its construction, ``close`` and ``findings(data=...)``."""
    plain, watched = Run(), Run()
    t0 = time.perf_counter()
    doctor = Doctor(watched.model, **doctor_kwargs).attach()
    setup = time.perf_counter() - t0
    plain_s = doctor_s = 0.0
    extra: list[float] = []  # per step: the Doctor's step minus the plain one, ms
    for step in range(steps):
        times = {}
        for r in (plain, watched) if step % 2 else (watched, plain):
            d = doctor if r is watched else None
            start = time.perf_counter()
            train_step(r, d, data, step)
            times[d is None] = time.perf_counter() - start
        plain_s += times[True]
        doctor_s += times[False]
        extra.append((times[False] - times[True]) * 1000)
    t0 = time.perf_counter()
    doctor.close()
    doctor.findings(data=data)
    end = time.perf_counter() - t0
    attributed = {i for i in range(steps) if ATTRIBUTION_SCHEDULE(i)}
    full = {i for i in range(steps) if Schedule()(i)} - attributed
    ordinary = [v for i, v in enumerate(extra) if i not in attributed | full]
    parts = {
        "ordinary steps": sum(ordinary),
        "per ordinary step": statistics.median(ordinary),
        "attribution steps": sum(extra[i] for i in attributed),
        "full-statistics steps": sum(extra[i] for i in full),
        "construction, close, findings": (setup + end) * 1000,
    }
    return plain_s * 1000, (doctor_s + setup + end) * 1000, parts


# ----------------------------------------------------------- part 2: an attribution step


def plain_step(r: Run, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        r.optimizer.zero_grad(set_to_none=True)
        _, _, total = r.forward(x)
        total.backward()
        r.optimizer.step()

    return step


def derived_step(r: Run, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        r.optimizer.zero_grad(set_to_none=True)
        _, terms, total = r.forward(x)
        pending = begin_attribution(terms, WEIGHTS, r.model, derive="reconstruction")
        total.backward()
        complete_attribution(pending, [p.grad for p in r.params])
        r.optimizer.step()

    return step


def write_grad_step(r: Run, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        r.optimizer.zero_grad(set_to_none=True)
        _, terms, _ = r.forward(x)
        term_attribution(terms, WEIGHTS, r.model, method="loop", write_grad=True)
        r.optimizer.step()

    return step


def backward_after_step(r: Run, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        r.optimizer.zero_grad(set_to_none=True)
        _, terms, total = r.forward(x)
        term_attribution(terms, WEIGHTS, r.model, method="loop")
        total.backward()
        r.optimizer.step()

    return step


def runs_summary(per_run: list[list[Summary]]) -> list[Summary]:
    """Per configuration: the median over runs of each run's median (min-max over runs)."""
    out = []
    for i, first in enumerate(per_run[0]):
        rows = [run[i] for run in per_run]
        ratios = [r.ratio_median for r in rows]
        ms = [r.ms_median for r in rows]
        out.append(
            Summary(
                first.name, statistics.median(ms), min(ms), max(ms),
                statistics.median(ratios), min(ratios), max(ratios), len(rows),
            )
        )  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="independent interleaved runs")
    parser.add_argument("--run-rounds", type=int, default=4, help="200-step runs per config")
    parser.add_argument("--steps", type=int, default=200, help="steps of a training run")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of attribution steps")
    parser.add_argument("--block", type=int, default=5, help="steps per round and config")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--lockstep", type=int, default=5, help="pairs of lockstep runs")
    parser.add_argument("--no-steps", action="store_true", help="parts 1 and 1b only")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    info = machine_info()
    print_machine(info)
    torch.manual_seed(0)
    data = torch.rand(BATCH * BATCHES, INPUT_DIM)

    every = Schedule(every=1)
    run_configs = {
        PLAIN_RUN: training_run(data, args.steps, None),
        "Doctor, default settings": training_run(data, args.steps, {}),
        "  nan_guard=False": training_run(data, args.steps, {"nan_guard": False}),
        "  attribute_every=0": training_run(data, args.steps, {"attribute_every": 0}),
        "  full statistics every step, no attribution": training_run(
            data, args.steps, {"schedule": every, "attribute_every": 0}
        ),
        "  everything every step": training_run(
            data, args.steps, {"schedule": every, "attribute_every": 1}
        ),
    }
    print(
        f"\nPart 1: {args.steps}-step runs; by default {Schedule().count(args.steps)} "
        f"steps take full statistics and {ATTRIBUTION_SCHEDULE.count(args.steps)} "
        f"are attributed, of {args.steps}"
    )
    part1 = []
    for _ in range(args.runs):
        samples = run_interleaved(run_configs, rounds=args.run_rounds, block=1, warmup=1)
        per_step = {k: [ms / args.steps for ms in v] for k, v in samples.items()}
        part1.append(summarise(per_step, PLAIN_RUN))
    rows1 = runs_summary(part1)
    title = f"Doctor over a {args.steps}-step run, per step (medians of {args.runs} runs)"
    print_table(rows1, title)

    lock = [lockstep(data, args.steps, {}) for _ in range(args.lockstep)]
    ratios = [d / p for p, d, _ in lock]
    print(
        f"\nPart 1b: the default Doctor in lockstep with a plain run ({args.lockstep} pairs "
        f"of {args.steps}-step runs): x plain {statistics.median(ratios):.3f} "
        f"({min(ratios):.3f}-{max(ratios):.3f})"
    )
    print("  where the Doctor's time goes, ms per run (median over the pairs):")
    for part in lock[0][2]:
        print(f"    {part:32s} {statistics.median(p[part] for _, _, p in lock):8.2f}")

    rows2: list[Summary] = []
    if not args.no_steps:
        x = data[:BATCH]
        step_configs = {
            PLAIN_STEP: plain_step(Run(), x),
            "attribution, K-1 passes (the Doctor's)": derived_step(Run(), x),
            "attribution, K passes + write_grad": write_grad_step(Run(), x),
            "attribution, K passes + backward": backward_after_step(Run(), x),
        }
        part2 = []
        for _ in range(args.runs):
            samples = run_interleaved(step_configs, rounds=args.rounds, block=args.block)
            part2.append(summarise(samples, PLAIN_STEP))
        rows2 = runs_summary(part2)
        print_table(rows2, f"attribution for 3 terms, one step (medians of {args.runs} runs)")
    if args.json:
        payload = {
            "machine": info,
            "run": [asdict(r) for r in rows1],
            "lockstep": [{"plain_ms": p, "doctor_ms": d, "parts": parts} for p, d, parts in lock],
            "attribution": [asdict(r) for r in rows2],
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
