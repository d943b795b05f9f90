"""The figures: titled, labelled, numbered, legends clear of the data, totals with parts.

Each report is built once, with tiny settings (64 samples, 3 full-batch epochs).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import matplotlib.pyplot as plt
import pytest
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from meaning_transform import plots
from meaning_transform.studies.anneal import run_anneal
from meaning_transform.studies.check_grads import run_check_grads
from meaning_transform.studies.debug_extended import run_debug_extended
from meaning_transform.studies.debug_loss import PRESETS, run_debug_loss
from meaning_transform.studies.pipeline import Pipeline
from meaning_transform.studies.report import (
    AnnealConfig,
    CheckGradsConfig,
    DebugExtendedConfig,
    DebugLossConfig,
)
from meaning_transform.studies.setup import get_data
from meaning_transform.training import BetaSchedule, TrainConfig

EPOCHS = 3
COMMON = {
    "seed": 0,
    "device": "cpu",
    "epochs": EPOCHS,
    "batch_size": 0,
    "lr": 1e-3,
    "data": None,
    "model": None,
    "scenario": "healthy",
    "reduction": "mean",
    "fail_on": "error",
    "plot": None,
}
INTEGER_AXES = ("epoch", "optimizer step", "latent dimension")


@pytest.fixture(scope="module")
def reports() -> dict[str, object]:
    config = TrainConfig(epochs=EPOCHS, batch_size=None)
    pipeline = Pipeline(dataset=get_data(None, n=64, seed=0), train_config=config)
    kinds = [get_data(None, kind=kind, n=64, seed=0) for kind in ("agent_states", "normal")]
    return {
        "debug-loss": run_debug_loss(
            pipeline,
            (PRESETS[0], PRESETS[2]),  # "No Semantic" has a component off
            DebugLossConfig(
                **COMMON, recon_weight=None, kl_weight=None, semantic_weight=None, every=1
            ),
        ),
        "anneal": run_anneal(
            pipeline,
            BetaSchedule("linear"),
            AnnealConfig(
                **COMMON, schedule="linear", min_beta=0.0, max_beta=1.0, cycles=4, ratio=0.5
            ),
        ),
        "check-grads": run_check_grads(
            pipeline,
            CheckGradsConfig(
                **COMMON, recon_weight=1.0, kl_weight=0.1, semantic_weight=0.5, clip=None
            ),
        ),
        "debug-extended": run_debug_extended(
            lambda d: Pipeline(dataset=d, train_config=config),
            kinds,
            DebugExtendedConfig(**COMMON, data_kind="all", samples=64),
        ),
    }


@pytest.fixture(scope="module")
def figures(reports: dict[str, object]) -> Iterator[dict[str, Figure]]:
    drawn = {name: plots.figure(report) for name, report in reports.items()}
    for fig in drawn.values():
        fig.canvas.draw()  # tick labels and legend positions exist only after a draw
    yield drawn
    for fig in drawn.values():
        plt.close(fig)


NAMES = ("debug-loss", "anneal", "check-grads", "debug-extended")


def is_twin(ax: Axes) -> bool:
    """A twinx axes: its x axis is hidden (it is the one of the axes it twins)."""
    return not ax.xaxis.get_visible()


def tick_texts(axis: Axis) -> list[tuple[float, str]]:
    """(value, text) of the major and minor ticks inside the view that carry text."""
    lo, hi = sorted(axis.get_view_interval())
    out = []
    for minor in (False, True):
        locs = axis.get_ticklocs(minor=minor)
        labels = axis.get_ticklabels(minor=minor)
        out += [
            (float(v), t.get_text())
            for v, t in zip(locs, labels)
            if t.get_visible() and t.get_text() and lo - 1e-9 * abs(lo) <= v <= hi + 1e-9 * abs(hi)
        ]
    return out


def data_lines(ax: Axes) -> list[Line2D]:
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


def titled(ax: Axes) -> bool:
    return any(ax.get_title(loc=loc) for loc in ("center", "left", "right"))


@pytest.mark.parametrize("name", NAMES)
def test_every_panel_has_a_title_labels_and_tick_values(figures, name):
    fig = figures[name]
    assert fig.get_suptitle()
    assert fig.axes
    for ax in fig.axes:
        if not is_twin(ax):
            assert titled(ax), f"{name}: a panel without a title"
            assert ax.get_xlabel(), f"{name}: {ax.get_title()!r} has no x label"
        assert ax.get_ylabel(), f"{name}: {ax.get_title()!r} has no y label"
        numbers = tick_texts(ax.yaxis)
        assert len(numbers) >= 2, f"{name}: {ax.get_ylabel()!r} shows {numbers}"


@pytest.mark.parametrize("name", NAMES)
def test_epoch_and_step_axes_have_integer_ticks(figures, name):
    checked = 0
    for ax in figures[name].axes:
        if ax.get_xlabel() in INTEGER_AXES:
            values = [v for v, _ in tick_texts(ax.xaxis)]
            assert len(values) >= 2
            assert all(v == int(v) for v in values), f"{name} {ax.get_xlabel()}: {values}"
            checked += 1
    assert checked


@pytest.mark.parametrize("name", NAMES)
def test_legends_where_several_lines_and_clear_of_every_axes(figures, name):
    fig = figures[name]
    renderer = fig.canvas.get_renderer()
    legends = []
    for ax in fig.axes:
        twins = [o for o in fig.axes if o is not ax and o.bbox.bounds == ax.bbox.bounds]
        if len(data_lines(ax)) + sum(len(data_lines(t)) for t in twins) > 1:
            assert ax.get_legend() or any(t.get_legend() for t in twins), (
                f"{name}: {ax.get_title()!r} has several lines and no legend"
            )
        if ax.get_legend() is not None:
            legends.append(ax.get_legend().get_window_extent(renderer))
    # no legend covers a plotting area, an axis' numbers or label, or another legend
    for box in legends:
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), name
            for axis in (ax.xaxis, ax.yaxis):
                if axis.get_visible():
                    assert not box.overlaps(axis.get_tightbbox(renderer)), name
        assert sum(box.overlaps(other) for other in legends) == 1  # itself only
        assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1), name


def total_and_parts(ax: Axes) -> tuple[list[float], list[str], list[list[float]]]:
    lines = {line.get_label(): list(line.get_ydata()) for line in data_lines(ax)}
    total = lines.pop("total")
    return total, list(lines), list(lines.values())


def assert_parts_sum_to_total(total: list[float], parts: list[list[float]]) -> None:
    for epoch, value in enumerate(total):
        assert sum(p[epoch] for p in parts) == pytest.approx(value, rel=1e-6)


def test_debug_loss_shows_each_configuration_total_with_its_weighted_parts(reports, figures):
    report, fig = reports["debug-loss"], figures["debug-loss"]
    by_title = {ax.get_title(): ax for ax in fig.axes}
    for run in report.runs:
        ax = next(a for title, a in by_title.items() if title.startswith(run.name + " ("))
        total, labels, parts = total_and_parts(ax)
        assert total == pytest.approx([e.total for e in run.epochs])
        on = [n for n, row in run.final.components.items() if "off" not in row.flags]
        assert len(labels) == len(on), labels
        assert_parts_sum_to_total(total, parts)
    no_semantic = next(ax for t, ax in by_title.items() if t.startswith("No Semantic"))
    assert not any("semantic" in label for label in total_and_parts(no_semantic)[1])


def test_anneal_shows_the_total_with_beta_kl_and_the_other_parts(reports, figures):
    report, fig = reports["anneal"], figures["anneal"]
    ax = next(a for a in fig.axes if a.get_title().startswith("total"))
    total, labels, parts = total_and_parts(ax)
    assert total == pytest.approx([e.total for e in report.epochs])
    assert "β × KL" in labels and len(labels) == len(report.epochs[-1].components)
    assert_parts_sum_to_total(total, parts)
    beta_axes = next(a for a in fig.axes if a.get_ylabel().startswith("β"))
    assert list(beta_axes.get_lines()[0].get_ydata()) == list(report.beta_curve)


def test_debug_extended_has_one_row_of_three_panels_per_kind(reports, figures):
    report, fig = reports["debug-extended"], figures["debug-extended"]
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if not is_twin(ax)]
    rows: dict[int, list[Axes]] = {}
    for ax in panels:
        rows.setdefault(round(ax.get_window_extent(renderer).y1), []).append(ax)
    assert len(rows) == len(report.kinds) == 2
    assert all(len(row) == 3 for row in rows.values())
    top_down = [rows[y] for y in sorted(rows, reverse=True)]
    for row, section in zip(top_down, report.kinds, strict=True):
        kl, rec, anneal = sorted(row, key=lambda a: a.get_window_extent(renderer).x0)
        bars = [p.get_height() for p in kl.patches]
        assert bars == pytest.approx(section.diagnosis.latent.kl_per_dim)
        threshold = [
            line
            for line in kl.get_lines()
            if set(line.get_ydata()) == {section.diagnosis.latent.collapse_threshold}
        ]
        assert threshold, "no collapse-threshold line"
        assert [p.get_height() for p in rec.patches] == pytest.approx(
            list(section.recon_per_feature.values())
        )
        assert [t.get_text() for t in rec.get_xticklabels()] == list(section.recon_per_feature)
        total, labels, parts = total_and_parts(anneal)
        assert total == pytest.approx([e.total for e in section.annealing.epochs])
        assert ("semantic" in " ".join(labels)) == section.agent_layout
        assert_parts_sum_to_total(total, parts)
        twin = next(a for a in fig.axes if is_twin(a) and a.bbox.bounds == anneal.bbox.bounds)
        assert list(twin.get_lines()[0].get_ydata()) == [e.beta for e in section.annealing.epochs]


def test_check_grads_has_a_bar_per_parameter_and_a_point_per_step(reports, figures):
    report, fig = reports["check-grads"], figures["check-grads"]
    ax_params, ax_steps = fig.axes
    names = [t.get_text().split(" [")[0] for t in ax_params.get_yticklabels()]
    assert names == [p.name for p in report.parameters]
    widths = [p.get_width() for p in ax_params.patches]
    norms = [p.norm if p.norm else math.nan for p in report.parameters]
    assert widths == pytest.approx(norms, nan_ok=True)
    assert list(data_lines(ax_steps)[0].get_xdata()) == [s.step for s in report.steps]


@pytest.mark.parametrize(
    ("values", "log"),
    [
        ([1.0, 99.0], False),
        ([1.0, 100.0], True),
        ([0.0, 1.0, 1e6], False),  # a 0 has no place on a log axis
        ([-1.0, 1e6], False),
        ([1e-3, math.nan, 10.0], True),  # non-finite values are ignored
        ([], False),
    ],
)
def test_an_axis_is_logarithmic_only_for_positive_values_spanning_100(values, log):
    fig = plt.figure()
    ax = fig.add_subplot()
    assert plots._value_scale(ax, values) is log
    assert ax.get_yscale() == ("log" if log else "linear")
    plt.close(fig)


def test_an_unknown_report_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="no figure for int; expected one of .*DebugLossReport"):
        plots.figure(42)


def test_save_png_writes_a_png(reports, tmp_path):
    path = tmp_path / "anneal.png"
    plots.save_png(plots.figure(reports["anneal"]), path)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
