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


def anneal_figure(result: dict[str, Any]) -> Figure:
    """β per epoch, and reconstruction, KL, β·KL and total per epoch."""
    epochs = result["epochs"]
    xs = [e["epoch"] for e in epochs]
    sched = result["schedule"]
    fig, (ax_beta, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    ax_beta.plot(xs, result["beta_curve"], marker="o", drawstyle="steps-post")
    ax_beta.set_xlabel("epoch")
    ax_beta.set_ylabel("β (KL weight)")
    ax_beta.set_title(f"{sched['type']} schedule")
    for key, label in (
        ("reconstruction", "reconstruction"),
        ("kl", "KL"),
        ("weighted_kl", "β·KL"),
        ("total", "total"),
    ):
        ax_loss.plot(xs, [e[key] for e in epochs], marker=".", label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel(f"loss ({result.get('reduction', 'mean')})")
    ax_loss.set_yscale("symlog", linthresh=1e-3)
    ax_loss.legend()
    fig.tight_layout()
    return fig


def check_grads_figure(result: dict[str, Any]) -> Figure:
    """Per-parameter gradient norm at the last step (log scale), and total norm per step."""
    fig, (ax_params, ax_steps) = plt.subplots(
        1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]}
    )
    params = result["parameters"]
    names = [p["name"] for p in params]
    # log scale: a missing, zero or non-finite norm has no bar; its flags say why
    norms = [
        p["norm"] if p["norm"] is not None and 0 < p["norm"] < float("inf") else float("nan")
        for p in params
    ]
    colours = ["tab:red" if p["flags"] and p["flags"] != ["bn-absorbed"] else "tab:blue"
               for p in params]
    ax_params.bar(range(len(names)), norms, color=colours)
    ax_params.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax_params.set_yscale("log")
    ax_params.set_ylabel("gradient norm")
    ax_params.set_title(f"per parameter, step {result.get('last_step')} (red: flagged)")
    steps = [s for s in result["steps"] if s["total_norm"] is not None]
    ax_steps.plot([s["step"] for s in steps], [s["total_norm"] for s in steps], marker="o",
                  label="total norm (before clipping)")
    if result.get("clip") is not None:
        ax_steps.axhline(result["clip"], color="tab:red", linestyle="--", label="--clip")
    ax_steps.set_xlabel("step")
    ax_steps.set_ylabel("total gradient norm")
    ax_steps.legend()
    fig.tight_layout()
    return fig


def debug_extended_figure(result: dict[str, Any]) -> Figure:
    """For the first data kind: KL per latent dim, recon error per feature, annealing curves."""
    kind = result["kinds"][0]
    fig, (ax_kl, ax_rec, ax_anneal) = plt.subplots(1, 3, figsize=(15, 4))
    kl = [v if v is not None else 0.0 for v in kind["kl_per_dim"]]
    ax_kl.bar(range(len(kl)), kl)
    ax_kl.axhline(kind["latent_health"]["collapse_threshold"], color="grey", linestyle=":",
                  label="collapse threshold")
    ax_kl.set_xticks(range(len(kl)))
    ax_kl.set_xlabel("latent dimension")
    ax_kl.set_ylabel("KL (nats, mean over samples)")
    ax_kl.set_title(f"{kind['kind']}: KL per dimension")
    ax_kl.legend()
    names = list(kind["recon_per_feature"])
    errors = [v if v is not None else 0.0 for v in kind["recon_per_feature"].values()]
    ax_rec.bar(range(len(names)), errors)
    ax_rec.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax_rec.set_ylabel("squared error (mean over samples)")
    ax_rec.set_title("reconstruction error per feature")
    epochs = kind["annealing"]["epochs"]
    xs = [e["epoch"] for e in epochs]
    for key in ("reconstruction", "kl", "total"):
        ax_anneal.plot(xs, [e[key] for e in epochs], marker="o", label=key)
    ax_anneal.set_xlabel("epoch")
    ax_anneal.set_ylabel(f"loss ({result.get('reduction', 'mean')})")
    ax_beta = ax_anneal.twinx()
    ax_beta.plot(xs, [e["beta"] for e in epochs], color="black", linestyle="--", label="β")
    ax_beta.set_ylabel("β")
    ax_anneal.legend(loc="upper left")
    ax_beta.legend(loc="upper right")
    ax_anneal.set_title(f"{kind['annealing']['schedule']} β annealing")
    fig.tight_layout()
    return fig
