"""Shared by the benchmark scripts: machine description, interleaved timing, the table.

Timing is interleaved on purpose: every round runs each configuration once (a block of
steps), in a rotated order, so a burst of load from another process hits all of them
alike. Ratios are taken per round (configuration / plain of the same round) and reported
as median (min-max) over rounds; absolute times as median (min-max) ms per step.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, object]:
    """What the numbers were measured on (printed at the top of every benchmark)."""
    import torch  # imported here so that bench_cli can describe the machine torch-free

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def print_machine(info: dict[str, object]) -> None:
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))


@dataclass(frozen=True)
class Summary:
    name: str
    ms_median: float
    ms_min: float
    ms_max: float
    ratio_median: float
    ratio_min: float
    ratio_max: float
    rounds: int


def run_interleaved(
    configs: dict[str, Callable[[], None]],
    rounds: int,
    block: int,
    warmup: int = 2,
    progress: bool = True,
) -> dict[str, list[float]]:
    """ms per step of every configuration, one sample per round (mean over ``block`` steps)."""
    names = list(configs)
    for name in names:  # warm-up: allocator, autograd graph caches, optimizer state
        for _ in range(warmup):
            configs[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate the order
        for name in order:
            step = configs[name]
            start = time.perf_counter()
            for _ in range(block):
                step()
            samples[name].append((time.perf_counter() - start) * 1000.0 / block)
        if progress:
            print(f"  round {r + 1}/{rounds} done", flush=True, end="\r", file=sys.stderr)
    if progress:
        print(" " * 40, end="\r", file=sys.stderr)
    return samples


def summarise(samples: dict[str, list[float]], reference: str) -> list[Summary]:
    """Median (min-max) ms per step and per-round ratio to ``reference``."""
    ref = samples[reference]
    out = []
    for name, values in samples.items():
        ratios = [v / r for v, r in zip(values, ref, strict=True)]
        out.append(
            Summary(
                name=name,
                ms_median=statistics.median(values),
                ms_min=min(values),
                ms_max=max(values),
                ratio_median=statistics.median(ratios),
                ratio_min=min(ratios),
                ratio_max=max(ratios),
                rounds=len(values),
            )
        )
    return out


def print_table(rows: list[Summary], title: str, notes: dict[str, str] | None = None) -> None:
    """Plain-text table; the same rows go into docs/benchmarks.md."""
    notes = notes or {}
    width = max(len(r.name) for r in rows)
    print(f"\n{title}")
    columns = f"{'ms/step median (min-max)':>26}  {'x plain median (min-max)':>26}"
    header = f"{'configuration':<{width}}  {columns}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ms = f"{r.ms_median:8.2f} ({r.ms_min:.2f}-{r.ms_max:.2f})"
        ratio = f"{r.ratio_median:6.3f} ({r.ratio_min:.3f}-{r.ratio_max:.3f})"
        line = f"{r.name:<{width}}  {ms:>26}  {ratio:>26}"
        if r.name in notes:
            line += f"  {notes[r.name]}"
        print(line)
