"""Figures drawn from the typed reports, one per command. Only imported for ``--plot``.

:func:`figure` dispatches on the report's type; :func:`save_png` writes the figure.
This is the one module that imports matplotlib (Agg: no display needed).

Every figure follows the same rules, so they all read the same way:

- where a total loss is drawn, each weighted part that sums to it is drawn with it; a
  component whose weight is 0 in every epoch is not part of the total and is left out;
- legends sit outside the axes, so they never cover data;
- epoch, step and latent-dimension axes have integer ticks;
- a value that is not finite has no point (a gap in its line) and the title says so;
- a value axis is logarithmic only when every value is positive and they span at least
  :data:`LOG_SPAN`, else linear; either way every panel has tick values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from functools import singledispatch
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator  # noqa: E402

from meaning_transform.constants import COMPONENTS  # noqa: E402
from meaning_transform.studies.report import (  # noqa: E402
    AnnealingRun,
    AnnealReport,
    CheckGradsReport,
    DebugExtendedReport,
    DebugLossReport,
    EpochRow,
    KindSection,
    Report,
)

LOG_SPAN = 100.0  # max / min from which a positive axis is logarithmic
LABELLED_DECADES = 3  # a log axis spanning at most this many decades labels 2 and 5 too
LABELS = {
    "reconstruction": "reconstruction",
    "kl": "KL",
    "semantic": "semantic",
    "compression": "compression",
}
COLOURS = {
    "total": "black",
    "reconstruction": "tab:blue",
    "kl": "tab:orange",
    "semantic": "tab:green",
    "compression": "tab:purple",
    "beta": "tab:grey",
}
FLAGGED, NOT_FLAGGED, NOTE = "tab:red", "tab:blue", "tab:grey"
NOT_FINITE = "non-finite values not drawn"
NOTHING_FINITE = "no finite value to draw"


def save_png(fig: Figure, path: Path) -> None:
    """Write ``fig`` as a PNG at ``path`` and close it."""
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


@singledispatch
def figure(report: Report) -> Figure:
    """The figure for one command's report (dispatched on its type)."""
    known = ", ".join(t.__name__ for t in figure.registry if t is not object)
    raise TypeError(f"no figure for {type(report).__name__}; expected one of {known}")


# --------------------------------------------------------------------------- debug-loss


@figure.register(DebugLossReport)
def _debug_loss(report: DebugLossReport) -> Figure:
    """A panel per configuration: the total and its weighted parts per reported epoch, on
    one shared y scale; under them, the raw components of each at the last epoch."""
    cols = 2 if len(report.runs) > 1 else 1
    rows = math.ceil(len(report.runs) / cols)
    fig = plt.figure(figsize=(7.0 * cols, 3.2 * (rows + 1)), layout="constrained")
    grid = fig.add_gridspec(rows + 1, cols)
    first: Axes | None = None
    values: list[float] = []
    for i, run in enumerate(report.runs):
        ax = fig.add_subplot(grid[i // cols, i % cols], sharey=first)
        first = first or ax
        drawn = _total_and_parts(ax, run.epochs, report.reduction)
        ax.set_title(
            _titled(f"{run.name} ({_weights_text(run.weights)})", drawn), fontsize="medium"
        )
        _say_if_empty(ax, drawn)
        values += drawn
    if first is not None:
        _value_scale(first, values, say_if_empty=False)  # shared: sets every run's panel
    _final_raw_bars(fig.add_subplot(grid[rows, :]), report)
    fig.suptitle(f"debug-loss: total loss and its weighted parts per epoch{_about(report)}")
    return fig


def _final_raw_bars(ax: Axes, report: DebugLossReport) -> None:
    """Grouped bars: each configuration's raw (unweighted) components at the last epoch.
    A component whose weight is 0 was not computed: no bar, "off" in its place."""
    runs = report.runs
    comps = _ordered(name for run in runs for name in run.final.components)
    width = 0.8 / max(len(comps), 1)
    values: list[float] = []
    for i, comp in enumerate(comps):
        rows = [run.final.components.get(comp) for run in runs]
        off = [row is None or "off" in row.flags for row in rows]
        ys = _finite([math.nan if o or row is None else row.raw for o, row in zip(off, rows)])
        values += [y for y, o in zip(ys, off) if not o]
        xs = [j - 0.4 + (i + 0.5) * width for j in range(len(runs))]
        ax.bar(xs, ys, width, label=LABELS.get(comp, comp), color=COLOURS.get(comp))
        for x in (x for x, o in zip(xs, off) if o):
            ax.annotate(
                "off",
                (x, 0),
                xycoords=ax.get_xaxis_transform(),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                fontsize="small",
                color=COLOURS.get(comp),
            )
    ax.set_xticks(range(len(runs)), [run.name for run in runs])
    ax.set_xlim(-0.5, len(runs) - 0.5)
    ax.set_xlabel("configuration")
    ax.set_ylabel(f"raw value ({report.reduction})")
    _value_scale(ax, values, bars=True)
    ax.set_title(_titled("unweighted components at the last epoch", values), fontsize="medium")
    _legend_outside(ax)


# --------------------------------------------------------------------------- anneal-demo


@figure.register(AnnealReport)
def _anneal(report: AnnealReport) -> Figure:
    """β per epoch; the total and its weighted parts; the raw components β weighs."""
    fig, (ax_beta, ax_loss, ax_raw) = plt.subplots(
        1, 3, figsize=(17, 4.2), layout="constrained", gridspec_kw={"width_ratios": [2, 3, 3]}
    )
    xs = [e.epoch for e in report.epochs]
    ax_beta.plot(xs, report.beta_curve, marker="o", color=COLOURS["beta"])
    ax_beta.set_xlabel("epoch")
    ax_beta.set_ylabel("β (KL weight)")
    ax_beta.set_title(f"{report.schedule.type} β schedule", fontsize="medium")
    _epoch_axis(ax_beta, xs)
    _value_scale(ax_beta, report.beta_curve)

    drawn = _total_and_parts(ax_loss, report.epochs, report.reduction)
    _value_scale(ax_loss, drawn)
    ax_loss.set_title(_titled("total and its weighted parts", drawn), fontsize="medium")

    values: list[float] = []
    for name in _drawn_components(report.epochs, include_off=True):
        ys = _finite(
            [e.components[name].raw if name in e.components else math.nan for e in report.epochs]
        )
        values += ys
        ax_raw.plot(xs, ys, marker=".", label=LABELS.get(name, name), color=COLOURS.get(name))
    ax_raw.set_xlabel("epoch")
    ax_raw.set_ylabel(f"raw value ({report.reduction})")
    ax_raw.set_title(_titled("unweighted components", values), fontsize="medium")
    _epoch_axis(ax_raw, xs)
    _value_scale(ax_raw, values)
    _legend_outside(ax_raw)
    fig.suptitle(
        f"anneal-demo: {report.schedule.type} β from {report.schedule.min_beta:g} "
        f"to {report.schedule.max_beta:g}{_about(report)}"
    )
    return fig


# --------------------------------------------------------------------------- check-grads


@figure.register(CheckGradsReport)
def _check_grads(report: CheckGradsReport) -> Figure:
    """Every parameter's gradient norm at the last step, and the total norm per step."""
    height = max(4.0, 0.24 * len(report.parameters) + 1.6)
    fig, (ax_params, ax_steps) = plt.subplots(
        1, 2, figsize=(15, height), layout="constrained", gridspec_kw={"width_ratios": [3, 2]}
    )
    _parameter_bars(ax_params, report)

    xs = [s.step for s in report.steps]
    norms = _finite([s.total_norm for s in report.steps])  # None: a skipped step
    ax_steps.plot(xs, norms, marker=".", label="total norm (before clipping)", color=NOT_FLAGGED)
    if report.clip is not None:
        ax_steps.axhline(report.clip, color=FLAGGED, linestyle="--", label="--clip max norm")
    ax_steps.set_title(_titled("total gradient norm per step", norms), fontsize="medium")
    ax_steps.set_xlabel("optimizer step")
    ax_steps.set_ylabel("total gradient norm")
    _epoch_axis(ax_steps, xs)
    _value_scale(ax_steps, norms + ([report.clip] if report.clip is not None else []))
    _legend_outside(ax_steps)
    fig.suptitle(f"check-grads: gradients before clipping{_about(report)}")
    return fig


def _parameter_bars(ax: Axes, report: CheckGradsReport) -> None:
    """Horizontal bars, first parameter at the top. A flagged one is red and its flags
    follow its name (``bn-absorbed`` alone is a note, grey)."""
    params = report.parameters
    colours = [
        FLAGGED if set(p.flags) - {"bn-absorbed"} else NOTE if p.flags else NOT_FLAGGED
        for p in params
    ]
    # a log axis has no 0: a zero or missing norm has no bar, and its flags say why
    norms = [n if n > 0 else math.nan for n in _finite(p.norm for p in params)]
    ys = range(len(params))
    ax.barh(ys, norms, color=colours)
    names = [f"{p.name} [{', '.join(p.flags)}]" if p.flags else p.name for p in params]
    ax.set_yticks(ys, names, fontsize="small")
    for label, colour in zip(ax.get_yticklabels(), colours, strict=True):
        label.set_color("black" if colour == NOT_FLAGGED else colour)
    ax.set_ylim(len(params) - 0.5, -0.5)  # first parameter at the top
    ax.set_ylabel("parameter")
    ax.set_xlabel("gradient norm")
    _value_scale(ax, norms, axis="x", bars=True)
    # a missing gradient (None) is in the flags; only a non-finite one is noted
    measured = _finite(p.norm for p in params if p.norm is not None)
    ax.set_title(
        _titled(f"per parameter at step {report.last_step} (red: flagged, grey: note)", measured),
        fontsize="medium",
    )


# --------------------------------------------------------------------------- debug-extended


@figure.register(DebugExtendedReport)
def _debug_extended(report: DebugExtendedReport) -> Figure:
    """A row per data kind: KL per latent dimension, reconstruction error per feature,
    and the short β-annealing run."""
    fig = plt.figure(figsize=(18, 4.2 * len(report.kinds)), layout="constrained")
    rows = fig.subfigures(len(report.kinds), 1, squeeze=False)[:, 0]
    for sub, section in zip(rows, report.kinds, strict=True):
        ax_kl, ax_rec, ax_anneal = sub.subplots(1, 3, gridspec_kw={"width_ratios": [3, 3, 4]})
        _kl_per_dim(ax_kl, section)
        _recon_per_feature(ax_rec, section)
        _annealing(ax_anneal, section.annealing, section.weights, report.reduction)
        # measured_on reads "<what>: <which model, which samples>"; the panels say what
        on = section.measured_on.split(": ", 1)[-1]
        sub.suptitle(
            f"{section.kind}: {section.data.n_samples} samples × "
            f"{section.data.n_features} features; KL and errors of {on}",
            fontsize="medium",
            fontweight="bold",
        )
    fig.suptitle(f"debug-extended: one row per data kind{_about(report, data=False)}")
    return fig


def _kl_per_dim(ax: Axes, section: KindSection) -> None:
    """Bars, red for a collapsed dimension, and the collapse threshold."""
    latent = section.latent
    kl = _finite(latent.kl_per_dim)
    threshold = latent.collapse_threshold
    collapsed = set(latent.collapsed_dims)
    ax.bar(
        range(len(kl)),
        kl,
        color=[FLAGGED if j in collapsed else NOT_FLAGGED for j in range(len(kl))],
    )
    ax.axhline(threshold, color="dimgrey", linestyle=":")
    ax.set_xlabel("latent dimension")
    ax.set_ylabel("KL (nats, mean over samples)")
    if len(kl) <= 16:
        ax.set_xticks(range(len(kl)))
    else:
        _epoch_axis(ax, range(len(kl)))
    _value_scale(ax, [*kl, threshold], bars=True)
    ax.set_title(
        _titled(f"KL per dimension ({len(collapsed)} of {len(kl)} collapsed)", kl),
        fontsize="medium",
    )
    ax.legend(
        handles=[
            Patch(color=NOT_FLAGGED, label="KL"),
            Patch(color=FLAGGED, label="collapsed"),
            Line2D(
                [], [], color="dimgrey", linestyle=":", label=f"collapse threshold {threshold:g}"
            ),
        ],
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        borderaxespad=0,
        fontsize="small",
    )


def _recon_per_feature(ax: Axes, section: KindSection) -> None:
    names = list(section.recon_per_feature)
    errors = _finite(section.recon_per_feature.values())
    ax.bar(range(len(names)), errors, color=COLOURS["reconstruction"])
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize="small")
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_xlabel("input feature")
    ax.set_ylabel("squared error (mean over samples)")
    _value_scale(ax, errors, bars=True)
    ax.set_title(_titled("reconstruction error per feature", errors), fontsize="medium")


def _annealing(ax: Axes, run: AnnealingRun, weights: Mapping[str, float], reduction: str) -> None:
    """The total and its weighted parts (β × KL with each epoch's β); β on a twin axis.
    The run records raw components; the weights are the section's, β replaces KL's."""
    xs = [e.epoch for e in run.epochs]
    w_recon, w_semantic = weights.get("reconstruction", 1.0), weights.get("semantic", 0.0)
    parts = [
        (
            f"{w_recon:g} × reconstruction",
            "reconstruction",
            [w_recon * e.reconstruction for e in run.epochs],
        ),
        ("β × KL", "kl", [e.beta * e.kl for e in run.epochs]),
    ]
    if w_semantic:  # 0 off the agent layout: not part of the total
        parts.append(
            (
                f"{w_semantic:g} × semantic",
                "semantic",
                [w_semantic * e.semantic for e in run.epochs],
            )
        )
    total = _finite([e.total for e in run.epochs])
    ax.plot(xs, total, marker="o", color=COLOURS["total"], linewidth=2, label="total")
    values = list(total)
    for label, name, ys in parts:
        ys = _finite(ys)
        ax.plot(xs, ys, marker=".", color=COLOURS[name], label=label)
        values += ys
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"loss ({reduction})")
    _epoch_axis(ax, xs)
    _value_scale(ax, values)
    ax.set_title(
        _titled(
            f"{run.schedule} β {run.min_beta:g} → {run.max_beta:g}: total and weighted parts",
            values,
        ),
        fontsize="medium",
    )
    twin = ax.twinx()
    betas = [e.beta for e in run.epochs]
    twin.plot(xs, betas, color=COLOURS["beta"], linestyle="--", label="β (right axis)")
    twin.set_ylabel("β", color=COLOURS["beta"])
    twin.tick_params(axis="y", colors=COLOURS["beta"])
    _value_scale(twin, betas)
    # one legend for both axes, right of the twin's numbers: it overlaps neither
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    twin.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.12, 1),
        borderaxespad=0,
        fontsize="small",
    )


# --------------------------------------------------------------------------- shared


def _total_and_parts(ax: Axes, epochs: Sequence[EpochRow], reduction: str) -> list[float]:
    """Draw the total per epoch and each weighted component that sums to it; return the
    values drawn (the caller sets the scale and title from them)."""
    xs = [e.epoch for e in epochs]
    total = _finite([e.total for e in epochs])
    ax.plot(xs, total, marker="o", color=COLOURS["total"], linewidth=2, label="total")
    values = list(total)
    for name in _drawn_components(epochs):
        rows = [e.components.get(name) for e in epochs]
        ys = _finite([r.weighted if r is not None else math.nan for r in rows])
        label = _weighted_label(name, [r.weight for r in rows if r is not None])
        ax.plot(xs, ys, marker=".", color=COLOURS.get(name), label=label)
        values += ys
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"loss ({reduction})")
    _epoch_axis(ax, xs)
    _legend_outside(ax)
    return values


def _drawn_components(epochs: Sequence[EpochRow], include_off: bool = False) -> list[str]:
    """Components in table order; without ``include_off`` only those weighted in some epoch."""
    return _ordered(
        name
        for e in epochs
        for name, row in e.components.items()
        if include_off or "off" not in row.flags
    )


def _ordered(names: Iterable[str]) -> list[str]:
    seen = dict.fromkeys(names)
    return [c for c in COMPONENTS if c in seen] + [n for n in seen if n not in COMPONENTS]


def _weighted_label(name: str, weights: Sequence[float]) -> str:
    """ "0.5 × semantic" for a fixed weight, "β × KL" for a KL weight that changes."""
    label = LABELS.get(name, name)
    if len(set(weights)) > 1:
        return f"β × {label}" if name == "kl" else f"weighted {label}"
    return f"{weights[0]:g} × {label}" if weights else label


def _weights_text(weights: Mapping[str, float]) -> str:
    return ", ".join(f"{LABELS.get(k, k)} {v:g}" for k, v in weights.items())


def _about(report: Report, data: bool = True) -> str:
    where = f"{report.data.source}, {report.data.n_samples} samples, " if data else ""
    return f"\n{where}{report.reduction} reduction, scenario {report.scenario}"


def _titled(title: str, values: Iterable[float]) -> str:
    """``title``, and a second line when some of ``values`` are not drawn (NaN)."""
    return title + (f"\n({NOT_FINITE})" if any(math.isnan(v) for v in values) else "")


def _finite(values: Iterable[float | None]) -> list[float]:
    """Floats with ``None``, NaN and ±Inf as NaN (matplotlib leaves a gap)."""
    return [float(v) if v is not None and math.isfinite(v) else math.nan for v in values]


def _epoch_axis(ax: Axes, xs: Iterable[int]) -> None:
    """Integer ticks over ``xs``, even when no point is drawn."""
    xs = list(xs)
    if xs:
        pad = max(0.05 * (max(xs) - min(xs)), 0.25)
        ax.set_xlim(min(xs) - pad, max(xs) + pad)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _value_scale(
    ax: Axes,
    values: Iterable[float | None],
    axis: str = "y",
    bars: bool = False,
    say_if_empty: bool = True,
) -> bool:
    """Logarithmic when every finite value is positive and they span :data:`LOG_SPAN`,
    else linear. Bars start at 0 (linear) or at the decade below the least (log), with
    room above the highest. Returns whether the axis is logarithmic."""
    finite = [v for v in _finite(values) if not math.isnan(v)]
    log = bool(finite) and min(finite) > 0 and max(finite) / min(finite) >= LOG_SPAN
    target = ax.yaxis if axis == "y" else ax.xaxis
    set_limits = ax.set_ylim if axis == "y" else ax.set_xlim
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log" if log else "linear")
    if log and max(finite) / min(finite) <= 10**LABELLED_DECADES:
        # few decades: label 2 and 5 of each decade too, as plain numbers
        target.set_major_formatter(FuncFormatter(_plain))
        target.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        target.set_minor_formatter(FuncFormatter(_plain))
    if bars and log:
        set_limits(10 ** math.floor(math.log10(min(finite))), None)
    elif bars and finite and min(finite) >= 0:
        set_limits(0, max(finite) * 1.08 or None)  # a line at the highest value shows
    if say_if_empty:
        _say_if_empty(ax, finite)
    return log


def _say_if_empty(ax: Axes, values: Iterable[float]) -> None:
    if all(math.isnan(v) for v in values):
        ax.text(
            0.5,
            0.5,
            NOTHING_FINITE,
            transform=ax.transAxes,
            ha="center",
            va="center",
            color=FLAGGED,
        )


def _plain(value: float, _pos: int | None = None) -> str:
    return f"{value:g}"


def _legend_outside(ax: Axes) -> None:
    """With several lines, a legend to the right of the axes: it never covers the data."""
    if len(ax.get_legend_handles_labels()[0]) > 1:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0, fontsize="small")
