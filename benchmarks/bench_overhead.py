"""What mtx's gradient diagnostics cost per training step, next to a plain step.

    python benchmarks/bench_overhead.py                 # ~2 min on 2 CPU cores (+1 with Cockpit)
    python benchmarks/bench_overhead.py --rounds 30     # quicker, noisier
    python benchmarks/bench_overhead.py --json out.json # also save the numbers

The model is the issue's mid-size MLP VAE: MeaningVAE(input_dim=784, latent_dim=32,
hidden_dims=(512, 256)) with batch norm (1.09 M parameters), batch 256 of uniform [0, 1)
data, Adam (lr 1e-3). Every configuration trains its own copy from the same seed on the
same batch, and every step optimises the same three-term loss:

    total = 1.0 * reconstruction   (CombinedLoss's MSE term, per-sample mean)
          + 0.1 * kl               (CombinedLoss's KL term)
          + 0.1 * l1               (mean over samples of sum |x_rec - x|, defined here)

(CombinedLoss's semantic term needs the 10-feature agent layout, so it is off:
semantic_loss_weight=0; the L1 term is the third term instead. Two of the three terms
reach every parameter; KL reaches only the encoder.)

Configurations (one row each; "v0" rows run the pre-optimisation code kept verbatim in
benchmarks/baseline/ so that before and after are measured in the same run):

- plain step: zero_grad, forward, loss, backward, Adam step.
- + GradientMonitor: plain step + ``after_backward()`` / ``after_step()`` every step
  (per-parameter norm, mean, |mean|, std, min, max, zero fraction, non-finite count,
  weight norm; one host copy per step).
- + GradientHooks: the same statistics from post-accumulate-grad hooks, read every step.
- attribution: forward, loss, ``term_attribution(3 terms, write_grad=True)`` which
  writes sum w_i g_i into .grad (so there is no separate backward), Adam step.
- naive attribution: one ``autograd.grad`` per term, Gram matrix from flattened float64
  copies, then the ordinary ``total.backward()``: 3 + 1 backward passes.
- Cockpit (only when ``import cockpit`` works; see docs/benchmarks.md for the separate
  environment): GradNorm alone, and the "economy" configuration, on a backpack-extended
  copy of the same model. Economy takes tens of seconds per step on 2 cores, so it is
  measured in its own short interleaved run (``--economy-rounds``) next to plain steps.
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
    machine_info,
    print_machine,
    print_table,
    run_interleaved,
    summarise,
)
from baseline import attribution_v0, gradients_v0  # noqa: E402

from meaning_transform.diagnostics import (  # noqa: E402
    GradientHooks,
    GradientMonitor,
    term_attribution,
)
from meaning_transform.losses import CombinedLoss  # noqa: E402
from meaning_transform.model import MeaningVAE  # noqa: E402

INPUT_DIM, LATENT_DIM, HIDDEN, BATCH = 784, 32, (512, 256), 256
WEIGHTS = {"reconstruction": 1.0, "kl": 0.1, "l1": 0.1}


class Run:
    """One model + optimizer + loss, trained by one configuration."""

    def __init__(self, x: torch.Tensor, extend: Callable | None = None) -> None:
        model = MeaningVAE(INPUT_DIM, LATENT_DIM, HIDDEN, seed=0)
        self.model = extend(model) if extend is not None else model
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=1e-3)
        self.loss_fn = CombinedLoss(
            recon_loss_weight=WEIGHTS["reconstruction"],
            kl_loss_weight=WEIGHTS["kl"],
            semantic_loss_weight=0.0,
        )
        self.x = x
        self.step_count = 0

    def forward(self) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict]:
        """The three unweighted terms, the weighted total, and the model output."""
        out = self.model(self.x)
        result = self.loss_fn(out, self.x)
        l1 = (out["reconstruction"] - self.x).abs().sum(dim=1).mean()
        terms = {"reconstruction": result["terms"]["reconstruction"], "kl": result["terms"]["kl"]}
        terms["l1"] = l1
        total = result["loss"] + WEIGHTS["l1"] * l1
        return terms, total, out


# ----------------------------------------------------------------------------- steps


def plain_step(run: Run) -> Callable[[], None]:
    def step() -> None:
        run.optimizer.zero_grad(set_to_none=True)
        _, total, _ = run.forward()
        total.backward()
        run.optimizer.step()

    return step


def monitor_step(
    run: Run, monitor_cls: type, inside: list[float] | None = None, **kwargs: object
) -> Callable[[], None]:
    """Plain step + the monitor's two calls; ``inside`` collects the ms spent in them."""
    monitor = monitor_cls(run.model, **kwargs)
    clock = time.perf_counter

    def step() -> None:
        run.optimizer.zero_grad(set_to_none=True)
        _, total, _ = run.forward()
        total.backward()
        start = clock()
        monitor.after_backward()
        middle = clock()
        run.optimizer.step()
        resume = clock()
        monitor.after_step()
        end = clock()
        if inside is not None:
            inside.append(((middle - start) + (end - resume)) * 1000.0)
        if len(monitor.history) > 50:
            monitor.history.clear()  # bounded memory over a long benchmark

    return step


def hooks_step(run: Run, hooks_cls: type, **kwargs: object) -> Callable[[], None]:
    hooks = hooks_cls(run.model, **kwargs).__enter__()

    def step() -> None:
        run.optimizer.zero_grad(set_to_none=True)
        _, total, _ = run.forward()
        total.backward()  # the hooks record here
        hooks.history  # noqa: B018 - materialise every step, as the monitor does
        run.optimizer.step()

    return step


def attribution_step(run: Run, attribute: Callable, method: str) -> Callable[[], None]:
    def step() -> None:
        run.optimizer.zero_grad(set_to_none=True)
        terms, _, _ = run.forward()
        attribute(terms, WEIGHTS, run.model, method=method, retain_graph=False, write_grad=True)
        run.optimizer.step()

    return step


def naive_attribution_step(run: Run) -> Callable[[], None]:
    """The straightforward version: one backward per term, then the ordinary backward."""

    def step() -> None:
        run.optimizer.zero_grad(set_to_none=True)
        terms, total, _ = run.forward()
        flat = []
        for t in terms.values():
            grads = torch.autograd.grad(t, run.params, retain_graph=True, allow_unused=True)
            flat.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if g is None else g).reshape(-1).double()
                        for g, p in zip(grads, run.params, strict=True)
                    ]
                )
            )
        g = torch.stack(flat)  # (3, n_params)
        gram = g @ g.T  # (3, 3)
        norms = gram.diagonal().sqrt()
        cosine = gram / (norms[:, None] * norms[None, :])
        torch.cat([norms, cosine.flatten()]).tolist()  # one host copy
        total.backward()
        run.optimizer.step()

    return step


def cockpit_steps(x: torch.Tensor) -> dict[str, Callable[[], None]] | str:
    """Cockpit's GradNorm-only and economy steps, or why they cannot run here."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from backpack import extend
            from cockpit import Cockpit, quantities
            from cockpit.utils.configuration import configuration
    except Exception as err:  # noqa: BLE001 - any import failure means "not installed"
        return f"Cockpit columns skipped: cannot import cockpit ({type(err).__name__}: {err})"

    def make(quants: list) -> Callable[[], None]:
        run = Run(x, extend=extend)
        cockpit = Cockpit(run.params, quantities=quants)

        def step() -> None:
            run.optimizer.zero_grad(set_to_none=True)
            terms, total, out = run.forward()
            with torch.no_grad():
                individual = ((out["reconstruction"] - x) ** 2).sum(1) + WEIGHTS["l1"] * (
                    out["reconstruction"] - x
                ).abs().sum(1)  # (B,) per-sample losses (Alpha only reads their variance)
            info = {
                "batch_size": x.shape[0],
                "individual_losses": individual,
                "loss": total,
                "optimizer": run.optimizer,
            }
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with cockpit(run.step_count, info=info):
                    total.backward(create_graph=cockpit.create_graph(run.step_count))
            run.optimizer.step()
            run.step_count += 1

        return step

    every = lambda step: True  # noqa: E731 - Cockpit's track_schedule signature
    return {
        "Cockpit GradNorm only": make([quantities.GradNorm(track_schedule=every)]),
        "Cockpit economy": make(configuration("economy")),
    }


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100, help="interleaved rounds")
    parser.add_argument("--block", type=int, default=1, help="steps per configuration per round")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--economy-rounds", type=int, default=3, help="0 skips Cockpit economy")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument(
        "--only", default=None, help="run only configurations whose name contains this text"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(BATCH, INPUT_DIM, generator=torch.Generator().manual_seed(0))  # (B, D)
    info = machine_info()
    print_machine(info)
    n_params = sum(p.numel() for p in MeaningVAE(INPUT_DIM, LATENT_DIM, HIDDEN).parameters())
    print(
        f"model: MeaningVAE({INPUT_DIM}, latent {LATENT_DIM}, hidden {HIDDEN}, batch norm), "
        f"{n_params:,} parameters; batch {BATCH}; Adam; terms and weights {WEIGHTS}; "
        f"{args.rounds} rounds x {args.block} steps"
    )

    monitors: dict[str, tuple[type, dict[str, object]]] = {
        "+ GradientMonitor": (GradientMonitor, {}),
        "+ GradientMonitor (v0, before)": (gradients_v0.GradientMonitor, {}),
        "+ GradientMonitor, detail=lean": (GradientMonitor, {"detail": "lean"}),
        "+ GradientMonitor, track_updates": (GradientMonitor, {"track_updates": True}),
    }
    inside: dict[str, list[float]] = {name: [] for name in monitors}  # ms per step, inside
    configs: dict[str, Callable[[], None]] = {"plain step": plain_step(Run(x))}
    for name, (cls, kwargs) in monitors.items():
        configs[name] = monitor_step(Run(x), cls, inside[name], **kwargs)
    configs |= {
        "+ GradientHooks": hooks_step(Run(x), GradientHooks),
        "+ GradientHooks (v0, before)": hooks_step(Run(x), gradients_v0.GradientHooks),
        "+ GradientHooks, detail=lean": hooks_step(Run(x), GradientHooks, detail="lean"),
        "attribution 3 terms, loop": attribution_step(Run(x), term_attribution, "loop"),
        "attribution 3 terms, loop (v0, before)": attribution_step(
            Run(x), attribution_v0.term_attribution, "loop"
        ),
        "attribution 3 terms, batched": attribution_step(Run(x), term_attribution, "batched"),
        "attribution 3 terms, batched (v0, before)": attribution_step(
            Run(x), attribution_v0.term_attribution, "batched"
        ),
        "naive attribution (3 grads + backward)": naive_attribution_step(Run(x)),
    }
    if args.only is not None:
        configs = {k: v for k, v in configs.items() if k == "plain step" or args.only in k}
    wanted = args.only is None or "Cockpit" in args.only
    cockpit = cockpit_steps(x) if wanted else "Cockpit skipped (--only)"
    economy: Callable[[], None] | None = None
    if isinstance(cockpit, str):
        print(cockpit)
    else:
        configs["Cockpit GradNorm only"] = cockpit["Cockpit GradNorm only"]
        economy = cockpit["Cockpit economy"]

    samples = run_interleaved(configs, rounds=args.rounds, block=args.block)
    rows = summarise(samples, "plain step")
    print_table(rows, "Overhead per training step (lower is better)")

    # The same monitors timed from the inside: only the time spent in after_backward() and
    # after_step(), against the plain step's median. Much less noisy than the ratio of two
    # whole steps; it misses indirect costs (e.g. caches the monitor evicts for Adam).
    plain = statistics.median(samples["plain step"])
    direct = []
    print(f"\nTime inside the monitor's calls, per step (plain step median {plain:.2f} ms)")
    for name, values in inside.items():
        if name not in samples:
            continue
        warm = values[-len(samples[name]) * args.block :]  # the timed rounds, not warm-up
        ms = statistics.median(warm)
        direct.append({"name": name, "ms_median": ms, "fraction_of_plain": ms / plain})
        print(f"  {name:<36} {ms:6.3f} ms  = {100 * ms / plain:4.1f}% of a plain step")

    economy_rows = []
    if economy is not None and args.economy_rounds > 0:
        print(f"\nCockpit economy: {args.economy_rounds} rounds of 1 step, next to plain steps")
        econ = run_interleaved(
            {"plain step": configs["plain step"], "Cockpit economy": economy},
            rounds=args.economy_rounds,
            block=1,
            warmup=1,
        )
        economy_rows = summarise(econ, "plain step")
        print_table(economy_rows, "Cockpit economy (separate run)")

    if args.json is not None:
        payload = {
            "machine": info,
            "args": vars(args) | {"json": str(args.json)},
            "rows": [asdict(r) for r in rows],
            "inside_monitor": direct,
            "economy_rows": [asdict(r) for r in economy_rows],
            "samples_ms": samples,
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
