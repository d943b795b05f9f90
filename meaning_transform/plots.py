"""Matplotlib (Agg) figures drawn from plain result dicts. Only imported for --plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def save_png(fig: Figure, path: Path) -> None:
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def debug_loss_figure(result: dict[str, Any]) -> Figure:
    """Total loss per reported epoch for each configuration, and each final component."""
    fig, (ax_total, ax_final) = plt.subplots(1, 2, figsize=(11, 4))
    for run in result["runs"]:
        xs = [e["epoch"] for e in run["epochs"]]
        ax_total.plot(xs, [e["total"] for e in run["epochs"]], marker="o", label=run["name"])
    ax_total.set_xlabel("epoch")
    ax_total.set_ylabel(f"total loss ({result.get('reduction', 'mean')})")
    ax_total.set_yscale("symlog", linthresh=1e-3)
    ax_total.legend()
    names = [s["name"] for s in result["summary"]]
    comps = ["reconstruction", "kl", "semantic"]
    width = 0.8 / len(comps)
    for i, comp in enumerate(comps):
        vals = [s["final_raw"].get(comp) or 0.0 for s in result["summary"]]
        ax_final.bar([j + i * width for j in range(len(names))], vals, width, label=comp)
    ax_final.set_xticks([j + width for j in range(len(names))], names)
    ax_final.set_ylabel("final raw value")
    ax_final.legend()
    fig.tight_layout()
    return fig
