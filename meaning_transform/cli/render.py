"""Rich rendering of the typed reports: the one place that knows how things look.

Every section is a pure builder: it takes one typed part of a report and returns a
Rich renderable, computing nothing beyond formatting. One composer per report type
stacks the sections into a :class:`~rich.console.Group`; :func:`render` prints it
once. :func:`renderable` gives the composed Group itself (tests print it into a
string console of any width).

Readable at any width: a table is a :class:`Grid`, which decides at print time,
for the width it is given, how to show its rows without cutting a number or a name
(the first that fits):

1. the whole table, with Rich's usual padding;
2. the same with multi-word headers on several lines;
3. compact: one space between columns, no edge padding;
4. split into parts that each repeat the key column (the row's name);
5. stacked: the row's name as a heading, then one ``column  value`` line per cell.

Columns that hold numbers, names and codes never wrap (their width is their longest
cell); only prose and flag lists wrap, between words. Everything a user or a user's
code chose (data paths, model specs, run and term names, messages) is a
:class:`~rich.text.Text`, never markup, so ``[bold]`` in a file name is printed as is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import singledispatch
from typing import TYPE_CHECKING

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.padding import Padding
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from meaning_transform.studies.report import (
    AnnealingRun,
    AnnealReport,
    CheckGradsReport,
    DebugExtendedReport,
    DebugLossReport,
    Diagnosis,
    DistributedCheckGradsReport,
    EpochRow,
    KindSection,
    LossRun,
    ParamRow,
    Report,
    StepRow,
    SummaryRow,
)

if TYPE_CHECKING:
    from rich.console import JustifyMethod

    from meaning_transform.diagnostics.attribution import AttributionSummary
    from meaning_transform.diagnostics.findings import Finding, NotChecked, Verdict
    from meaning_transform.diagnostics.gradient_summary import GradientSummary
    from meaning_transform.diagnostics.kl_terms import KLTermStats
    from meaning_transform.diagnostics.latent import LatentHealth
    from meaning_transform.diagnostics.parameters import ParameterStats
    from meaning_transform.diagnostics.probe import ModeProbe

FLAG_STYLE = {
    # loss components
    "non-finite": "bold red",
    "zero": "bold red",
    "floored": "bold yellow",
    "off": "dim",
    # check-grads parameters
    "no-grad": "bold red",
    "all-zero": "bold red",
    "missing": "bold yellow",
    "tiny": "bold yellow",
    "frozen": "bold yellow",
    "large-update": "bold yellow",
    "bn-absorbed": "dim",
    # debug-extended parameters
    "identical": "bold red",
    "huge": "bold red",
}
SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
SPARK = "▁▂▃▄▅▆▇█"
STEPS_SHOWN = 12  # check-grads: a longer run shows its first and last steps
FEATURES_SHOWN = 32  # debug-extended: wider data shows its worst-reconstructed features
NO_FINDINGS = "No findings: nothing looks wrong."
NO_FINDINGS_PARTLY = "No findings in the checks that ran (see Not checked above)."

Cell = str | Text


# --------------------------------------------------------------------------- formatting


def num(x: float | int | None, digits: int = 4) -> str:
    """A number for a table cell: NaN/Inf and None shown plainly, never hidden."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Inf" if x > 0 else "-Inf"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}f}"


def pct(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def weights_text(weights: Mapping[str, float]) -> str:
    """``1/0.1/0.5``: mtx's reconstruction/KL/semantic weights; for the user's own loss
    the weights given by term name (``KLD=0.005``), or ``own`` when none was given."""
    mtx_names = ("reconstruction", "kl", "semantic")
    if not set(weights) & set(mtx_names):
        return ", ".join(f"{k}={v:g}" for k, v in weights.items()) or "own"
    return "/".join(f"{weights.get(k, 0.0):g}" for k in mtx_names)


def flags_text(flags: Iterable[str]) -> Text:
    text = Text()
    for i, flag in enumerate(flags):
        if i:
            text.append(" ")
        kind = flag.rsplit(":", 1)[-1]  # "semantic:zero" is styled as "zero"
        text.append(flag, style=FLAG_STYLE.get(kind, "yellow"))
    return text


def sparkline(values: Iterable[float | None]) -> str:
    """One block character per value, scaled between the finite min and max; ``!`` = NaN/Inf."""
    vals = list(values)
    finite = [v for v in vals if v is not None and math.isfinite(v)]
    if not finite:
        return "!" * len(vals)
    lo, hi = min(finite), max(finite)
    chars = []
    for v in vals:
        if v is None or not math.isfinite(v):
            chars.append("!")
        else:
            level = 0 if hi == lo else round((v - lo) / (hi - lo) * (len(SPARK) - 1))
            chars.append(SPARK[level])
    return "".join(chars)


def plain(text: str, style: str = "") -> Text:
    """User-controlled or prose text, printed as is (no markup, no emoji codes)."""
    return Text(text, style=style)


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Col:
    """One column: numbers, names and codes stay on one line; ``wrap`` columns (prose,
    flag lists) may break between words."""

    header: str
    justify: JustifyMethod = "right"
    wrap: bool = False
    readable: int = 0  # a wrapping column narrower than this is stacked instead


@dataclass(frozen=True)
class _Style:
    compact: bool  # one space between columns, no edge padding
    wrapped_headers: bool  # a header wider than its column's cells goes on several lines

    def overhead(self, n: int) -> int:
        """Columns taken by padding, separators and edges for ``n`` columns."""
        return n - 1 if self.compact else 3 * n + 1


_ROOMY = _Style(compact=False, wrapped_headers=False)
_NARROW_HEADERS = _Style(compact=False, wrapped_headers=True)
_COMPACT = _Style(compact=True, wrapped_headers=True)


@dataclass(frozen=True, eq=False)
class Grid:
    """A table that fits any width without cutting a cell (see the module docstring).

    ``key`` names the columns repeated in each part of a split table and shown as the
    heading of each row when stacked; ``split=False`` goes straight to stacking.
    """

    columns: tuple[Col, ...]
    rows: tuple[tuple[Text, ...], ...]
    title: Text | None = None
    caption: Text | None = None
    row_styles: tuple[str, ...] = ()
    key: tuple[int, ...] = (0,)
    split: bool = True
    # (narrowest, widest) of each column, keyed by whether headers may wrap
    _spans: dict[bool, tuple[tuple[int, int], ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.title is not None:
            yield self.title
        yield from self.tables(options.max_width)
        if self.caption is not None:
            yield self.caption

    def tables(self, width: int) -> list[RenderableType]:
        """The table(s) that show every cell whole within ``width`` columns."""
        every = tuple(range(len(self.columns)))
        for style in (_ROOMY, _NARROW_HEADERS, _COMPACT):
            widths = self._fit(every, width, style)
            if widths is not None:
                return [self._table(every, widths, style)]
        if self.split:  # fewest parts; the roomier style when it needs no more of them
            splits = [
                p
                for p in (self._parts(width, st) for st in (_NARROW_HEADERS, _COMPACT))
                if p is not None
            ]
            if splits:
                style, parts = min(splits, key=lambda p: len(p[1]))
                tables: list[RenderableType] = []
                for cols, widths in parts:
                    if tables and style.compact:
                        tables.append(Text())  # a compact table has no blank edge rows
                    tables.append(self._table(cols, widths, style))
                return tables
        return self._stacked()

    # -- widths

    def __post_init__(self) -> None:
        # (narrowest, widest) of each column, with headers whole and with headers wrapped
        spans = {
            w: tuple(self._measure(i, w) for i in range(len(self.columns))) for w in (False, True)
        }
        object.__setattr__(self, "_spans", spans)

    def _span(self, index: int, style: _Style) -> tuple[int, int]:
        return self._spans[style.wrapped_headers][index]

    def _measure(self, index: int, wrapped_headers: bool) -> tuple[int, int]:
        """(narrowest, widest) the column's content allows, header included."""
        col = self.columns[index]
        cells = [row[index].plain for row in self.rows]
        header = col.header.split() if wrapped_headers else [col.header]
        lines = [line for t in cells for line in t.splitlines()]
        widest = max((cell_len(t) for t in (*lines, *header)), default=0)
        if not col.wrap:
            return widest, widest
        words = [w for t in cells for w in t.split()] + col.header.split()
        narrowest = max((cell_len(w) for w in words), default=0)
        return min(widest, max(narrowest, col.readable)), widest

    def _fit(self, cols: Sequence[int], width: int, style: _Style) -> list[int] | None:
        """Column widths for ``cols`` within ``width``, or None: shrink the widest
        wrapping column first, never below its longest word; others never shrink."""
        spans = [self._span(i, style) for i in cols]
        widths = [hi for _, hi in spans]
        excess = sum(widths) + style.overhead(len(cols)) - width
        while excess > 0:
            shrinkable = [j for j, (lo, _) in enumerate(spans) if widths[j] > lo]
            if not shrinkable:
                return None
            j = max(shrinkable, key=lambda j: widths[j])
            runner_up = max((widths[k] for k in shrinkable if k != j), default=0)
            floor = max(spans[j][0], runner_up, widths[j] - excess)
            cut = max(1, widths[j] - floor)  # down to the next widest, then in turns
            widths[j] -= cut
            excess -= cut
        return widths

    def _parts(
        self, width: int, style: _Style
    ) -> tuple[_Style, list[tuple[tuple[int, ...], list[int]]]] | None:
        """Split the non-key columns into consecutive parts that each fit with the key."""
        key = tuple(i for i in self.key if i < len(self.columns))
        if not key:
            return None
        parts: list[tuple[int, ...]] = []
        current: list[int] = []
        for i in (i for i in range(len(self.columns)) if i not in key):
            if self._fit((*key, *current, i), width, style) is not None:
                current.append(i)
                continue
            if not current:
                return None  # the key and this one column alone do not fit
            parts.append((*key, *current))
            current = [i]
            if self._fit((*key, i), width, style) is None:
                return None
        if current or not parts:
            parts.append((*key, *current))
        fitted = []
        for part in parts:
            widths = self._fit(part, width, style)
            if widths is None:
                return None
            fitted.append((part, widths))
        return style, fitted

    # -- tables

    def _style(self, row: int) -> str:
        return self.row_styles[row] if row < len(self.row_styles) else ""

    def _table(self, cols: Sequence[int], widths: Sequence[int], style: _Style) -> Table:
        t = Table(
            box=box.SIMPLE_HEAD,
            padding=(0, 0) if style.compact else (0, 1),
            show_edge=not style.compact,
        )
        headers = [
            _wrap_words(self.columns[i].header, w)
            if style.wrapped_headers and not self.columns[i].wrap
            else [self.columns[i].header]
            for i, w in zip(cols, widths, strict=True)
        ]
        height = max(len(h) for h in headers)
        for i, w, header in zip(cols, widths, headers, strict=True):
            col = self.columns[i]
            t.add_column(
                Text("\n".join([""] * (height - len(header)) + header)),  # bottom-aligned
                justify=col.justify,
                width=w,
                no_wrap=not col.wrap,
                overflow="fold",
            )
        for r, row in enumerate(self.rows):
            t.add_row(*(row[i] for i in cols), style=self._style(r) or None)
        return t

    def _stacked(self) -> list[RenderableType]:
        """One block per row: the key cells as a heading, then ``column  value`` lines."""
        blocks: list[RenderableType] = []
        key = [i for i in self.key if i < len(self.columns)]
        for r, row in enumerate(self.rows):
            heading = Text("  ").join(row[i] for i in key) if key else Text(f"row {r + 1}")
            heading.stylize("bold")
            if self._style(r):
                heading.stylize(self._style(r))
            pairs = Table.grid(padding=(0, 1))
            pairs.add_column(no_wrap=True, style="dim")
            pairs.add_column(overflow="fold")
            for i, col in enumerate(self.columns):
                if i not in key and row[i].plain:
                    pairs.add_row(Text(col.header), row[i])
            if blocks:
                blocks.append(Text())
            blocks.append(Group(heading, Padding(pairs, (0, 0, 0, 2))))
        return blocks


def grid(
    columns: Sequence[Col | str],
    rows: Iterable[Sequence[Cell]],
    title: Cell | None = None,
    caption: Cell | None = None,
    row_styles: Sequence[str] = (),
    key: tuple[int, ...] = (0,),
    split: bool = True,
) -> Grid:
    """A :class:`Grid`; a column given as a string is a name (first) or a number."""
    cols = tuple(
        c if isinstance(c, Col) else Col(c, "left" if i == 0 else "right")
        for i, c in enumerate(columns)
    )
    return Grid(
        columns=cols,
        rows=tuple(tuple(_text(c) for c in row) for row in rows),
        title=None if title is None else _text(title, "italic"),
        caption=None if caption is None else _text(caption, "dim"),
        row_styles=tuple(row_styles),
        key=key,
        split=split,
    )


def _wrap_words(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` cells, broken between words."""
    lines: list[str] = []
    for word in text.split():
        if lines and cell_len(lines[-1]) + 1 + cell_len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def _text(cell: Cell, style: str = "") -> Text:
    return Text(cell, style=style) if isinstance(cell, str) else cell


@dataclass(frozen=True, eq=False)
class Heading:
    """A rule with a title; a title too long for the rule goes on its own line below."""

    title: Text

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if cell_len(self.title.plain) + 4 <= options.max_width:
            yield Rule(self.title)
        else:
            yield Rule()
            yield self.title


# --------------------------------------------------------------------------- shared sections


@dataclass(frozen=True, eq=False)
class Line:
    """Items separated by two spaces, wrapped between items (an item is never split
    unless it alone is wider than the console)."""

    items: tuple[Text, ...]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        line: Text | None = None
        for item in self.items:
            if line is not None and cell_len(line.plain) + 2 + cell_len(item.plain) <= width:
                line.append("  ")
                line.append_text(item)
                continue
            if line is not None:
                yield line
            line = item.copy()
        if line is not None:
            yield line


def header_section(report: Report, extra: Sequence[str] = ()) -> Line:
    """``mtx <command>  data … (N×D)  seed …  epochs …  batch …  lr …  reduction …  device …``."""
    cfg, data = report.config, report.data
    batch = f"{report.batch_size}" + (" (full)" if cfg.batch_size == 0 else "")
    parts = [
        ("data", f"{data.source} ({data.n_samples}×{data.n_features})"),
        ("seed", str(cfg.seed)),
        ("epochs", str(cfg.epochs)),
        ("batch", batch),
        ("lr", f"{report.lr:g}"),
        ("reduction", report.reduction),
        ("device", report.device),
    ]
    if cfg.model is not None:
        parts.append(("model", cfg.model))
    if report.scenario != "healthy":
        parts.append(("scenario", report.scenario))
    items = [Text(f"mtx {report.command}", style="bold")]
    for label, value in parts:
        item = Text(f"{label} ")
        item.append(value, style="bold magenta" if label == "scenario" else "")
        items.append(item)
    items += [Text(e) for e in extra]
    return Line(tuple(items))


def semantic_note(report: Report) -> Text | None:
    if report.semantic_applicable:
        return None
    return plain("semantic term off: the data is not the 10-feature agent-state layout", "dim")


def attribution_section(summary: AttributionSummary, run: str = "") -> Grid:
    """Per-term gradient attribution; every number is the mean over the attributed steps."""
    terms = list(summary.norm)
    mains = [n for n in terms if "/" not in n]
    steps = summary.steps_attributed
    prefix = f"{run} · " if run else ""
    caption = (
        f"every number, cosines included, is the mean over the {steps} attributed step(s) "
        f"(method {summary.method}); share: projection of w·g on the total gradient (the "
        f"main terms' shares sum to 100%); cos < 0: the terms pull against each other (PCGrad)"
    )
    if summary.zero_gradient:
        zero = ", ".join(summary.zero_gradient)
        caption += f"; zero gradient at the last attributed step: {zero}"
    rows = [
        [
            n,
            num(summary.weights.get(n)),
            num(summary.norm[n]),
            num(summary.weighted_norm[n]),
            pct(summary.share[n]),
            *(num(summary.cosine.get(n, {}).get(m), 2) for m in mains),
        ]
        for n in terms
    ]
    return grid(
        ["term", "weight", "‖g‖", "‖w·g‖", "share", *(f"cos {m}" for m in mains)],
        rows,
        title=f"{prefix}gradient by loss term (mean over {steps} attributed step(s))",
        caption=caption,
    )


def collapse_text(verdict: Verdict) -> Text:
    """The posterior-collapse verdict in words that agree with the findings."""
    if verdict.status == "finding":
        return plain("posterior collapse (see findings)", "bold red")
    if verdict.status == "not-judged":
        return plain(f"collapse not judged: {verdict.reason}", "dim")
    return plain(f"no posterior collapse ({verdict.reason})")


def _gain_text(gain: float) -> str:
    """The reconstruction against predicting the data mean, in words."""
    return f"the reconstruction explains {gain:.0%} of the variance the data mean leaves"


def latent_section(latent: LatentHealth | None, verdict: Verdict) -> Text:
    """One line: active units, KL per dimension, free bits, and the collapse verdict."""
    line = Text("latent: ")
    if latent is None:
        line.append("not measured; ")
    else:
        line.append(
            f"{latent.active_units}/{latent.latent_dim} active units (Var of mu > "
            f"{latent.active_threshold:g}), KL per dimension "
            f"{' '.join(num(v, 3) for v in latent.kl_per_dim)} nats, free bits "
            f"(λ={latent.free_bits_lambda:g}) {num(latent.free_bits, 3)}; "
        )
        if latent.recon_gain is not None:
            line.append(f"{_gain_text(latent.recon_gain)}; ")
        if latent.non_finite:
            line.append(f"{latent.non_finite} NaN/Inf entries in mu and log_var; ", "bold red")
    line.append_text(collapse_text(verdict))
    return line


def diagnosis_sections(diagnosis: Diagnosis, run: str = "") -> list[RenderableType]:
    parts: list[RenderableType] = []
    if diagnosis.attribution is not None:
        parts.append(attribution_section(diagnosis.attribution, run))
    parts.append(latent_section(diagnosis.latent, diagnosis.collapse))
    return parts


def not_checked_section(items: Sequence[NotChecked]) -> Grid | None:
    """Every check that could not run, the runs it concerns, and why."""
    if not items:
        return None
    # checks skipped for one reason in the same runs share a row (one code per line)
    groups: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for c in items:
        groups.setdefault((c.reason, c.runs), []).append(c.code)
    return grid(
        [Col("not checked", "left"), Col("runs", "left", wrap=True), Col("why", "left", wrap=True)],
        [
            ["\n".join(codes), ", ".join(runs) or "—", reason]
            for (reason, runs), codes in groups.items()
        ],
        title="Not checked",
        split=False,
    )


def findings_section(
    findings: Sequence[Finding], not_checked: Sequence[NotChecked] = ()
) -> RenderableType:
    """severity, code, where, and the finding: title, message and → remedy."""
    if not findings:
        return plain(NO_FINDINGS_PARTLY if not_checked else NO_FINDINGS, "green")

    def what(f: Finding) -> Text:
        text = Text()
        text.append(f.title, style="bold")
        text.append(f": {f.message}\n")
        text.append(f"→ {f.remedy}", style="italic")
        return text

    return grid(
        [
            Col("severity", "left"),
            Col("code", "left"),
            Col("where", "left", wrap=True),
            Col("finding", "left", wrap=True, readable=40),
        ],
        [
            [
                Text(f.severity, style=SEVERITY_STYLE.get(f.severity, "")),
                f.code,
                f.where or "—",
                what(f),
            ]
            for f in findings
        ],
        title="Findings",
        key=(0, 1),
        split=False,
    )


def closing_sections(report: Report) -> list[RenderableType]:
    """What every report ends with: the checks that did not run, then the findings."""
    parts: list[RenderableType] = []
    missing = not_checked_section(report.not_checked)
    if missing is not None:
        parts.append(missing)
    parts.append(findings_section(report.findings, report.not_checked))
    return parts


def codes_text(codes: Sequence[str]) -> str:
    """Finding codes once each, with how often: ``no-grad-path ×3, frozen-noise``."""
    counts: dict[str, int] = {}
    for code in codes:
        counts[code] = counts.get(code, 0) + 1
    return ", ".join(f"{c} ×{n}" if n > 1 else c for c, n in counts.items())


def _compose(*parts: RenderableType | None) -> Group:
    return Group(*(p for p in parts if p is not None))


# --------------------------------------------------------------------------- loss tables


def component_section(title: str, epoch: EpochRow, reduction: Mapping[str, str]) -> Grid:
    """component, reduction, raw, weight, weighted, share, flags; a total row; a caption."""
    rows: list[list[Cell]] = [
        [
            name,
            reduction.get(name, "—"),
            num(row.raw),
            num(row.weight),
            num(row.weighted),
            pct(row.share),
            flags_text(row.flags),
        ]
        for name, row in epoch.components.items()
    ]
    rows.append(["total", "", "", "", num(epoch.total), "100.0%", flags_text(epoch.total_flags)])
    caption = (
        f"total gradient norm before clipping {num(epoch.grad_norm)} "
        f"(max {num(epoch.grad_norm_max)}) over {epoch.steps} step(s)"
    )
    if epoch.skipped_steps:
        caption += f"; {epoch.skipped_steps} step(s) skipped (non-finite loss)"
    if epoch.non_finite:
        caption += f"; non-finite: {'; '.join(epoch.non_finite)}"
    return grid(
        [
            "component",
            Col("reduction", "left"),
            "raw",
            "weight",
            "weighted",
            "share",
            Col("flags", "left", wrap=True),
        ],
        rows,
        title=title,
        caption=caption,
        row_styles=[""] * (len(rows) - 1) + ["bold"],
    )


def raw(epoch: EpochRow, name: str) -> str:
    row = epoch.components.get(name)
    return "—" if row is None else num(row.raw)


def raw_or_off(epoch: EpochRow, name: str) -> Cell:
    row = epoch.components.get(name)
    if row is None:
        return "—"
    return Text("off", style="dim") if "off" in row.flags else num(row.raw)


# --------------------------------------------------------------------------- debug-loss


def loss_run_sections(run: LossRun) -> list[RenderableType]:
    w = run.weights
    parts: list[RenderableType] = [
        Heading(
            plain(
                f"{run.name}: reconstruction {num(w.get('reconstruction'))}, "
                f"KL {num(w.get('kl'))}, semantic {num(w.get('semantic'))}"
                if "reconstruction" in w
                else f"{run.name}: your loss, weights {weights_text(w)}"
            )
        )
    ]
    parts += [
        component_section(f"{run.name} · epoch {e.epoch}", e, run.reduction) for e in run.epochs
    ]
    parts += diagnosis_sections(run.diagnosis, run.name)
    return parts


def summary_section(summary: Sequence[SummaryRow]) -> Grid:
    components = list(dict.fromkeys(n for s in summary for n in s.final_raw))
    return grid(
        [
            "configuration",
            "weights r/kl/s",
            "first total",
            "final total",
            *components,
            "grad norm",
            Col("flags", "left", wrap=True),
            Col("findings", "left", wrap=True),
        ],
        [
            [
                s.name,
                weights_text(s.weights),
                num(s.first_total),
                num(s.final_total),
                *(num(s.final_raw.get(c)) for c in components),
                num(s.final_grad_norm),
                flags_text(s.flagged),
                codes_text(s.findings) or "—",
            ]
            for s in summary
        ],
        title="Summary (final epoch, raw components)",
    )


@singledispatch
def renderable(report: Report) -> RenderableType:
    """The whole report as one Rich renderable (a Group of its sections)."""
    raise TypeError(f"no renderer for {type(report).__name__}")


@renderable.register(DebugLossReport)
def _debug_loss(report: DebugLossReport) -> Group:
    parts: list[RenderableType | None] = [header_section(report), semantic_note(report)]
    for run in report.runs:
        parts += loss_run_sections(run)
    parts.append(summary_section(report.summary))
    return _compose(*parts, *closing_sections(report))


# --------------------------------------------------------------------------- anneal-demo


def anneal_epochs_section(report: AnnealReport) -> Grid:
    w = report.weights
    reductions = ", ".join(f"{k} {v}" for k, v in report.reductions.items())
    return grid(
        [
            "epoch",
            "β",
            "recon",
            "KL",
            "β·KL",
            "semantic",
            "total",
            "grad norm",
            Col("flags", "left", wrap=True),
        ],
        [
            [
                str(e.epoch),
                num(e.beta),
                raw(e, "reconstruction"),
                raw(e, "kl"),
                num(e.components["kl"].weighted) if "kl" in e.components else "—",
                raw_or_off(e, "semantic"),
                num(e.total),
                num(e.grad_norm),
                flags_text(e.flagged()),
            ]
            for e in report.epochs
        ],
        title=(
            f"Per epoch (reconstruction weight {num(w.get('reconstruction'))}, KL weight β, "
            f"semantic weight {num(w.get('semantic'))})"
        ),
        caption=f"raw components, means over each epoch's steps; reduction: {reductions}",
    )


def sparklines_section(rows: Sequence[tuple[str, Sequence[float | None]]]) -> Table:
    t = Table.grid(padding=(0, 1))
    t.add_column(no_wrap=True)
    t.add_column(overflow="fold")
    t.add_column(no_wrap=True)
    for label, values in rows:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        span = f"min {num(min(finite))}  max {num(max(finite))}" if finite else "no finite values"
        t.add_row(Text(label), Text(sparkline(values)), Text(span))
    return t


@renderable.register(AnnealReport)
def _anneal(report: AnnealReport) -> Group:
    s = report.schedule
    schedule = f"schedule {s.type} β {num(s.min_beta)}→{num(s.max_beta)}"
    if s.type == "cyclical":
        schedule += f" (cycles {s.cycles}, ratio {num(s.ratio)})"
    kl = [e.components["kl"].raw if "kl" in e.components else None for e in report.epochs]
    return _compose(
        header_section(report, [schedule]),
        semantic_note(report),
        anneal_epochs_section(report),
        sparklines_section(
            [("β", report.beta_curve), ("KL", kl), ("total", [e.total for e in report.epochs])]
        ),
        *diagnosis_sections(report.diagnosis, s.type),
        *closing_sections(report),
    )


# --------------------------------------------------------------------------- check-grads


def steps_section(steps: Sequence[StepRow], clip: float | None) -> Grid:
    shown: list[StepRow | None] = list(steps)
    hidden = 0
    if len(steps) > STEPS_SHOWN:
        half = STEPS_SHOWN // 2 - 1
        hidden = len(steps) - 2 * half
        shown = [*steps[:half], None, *steps[-half:]]
    columns: list[Col | str] = [
        "step",
        "epoch",
        "loss",
        "total norm",
        "clip_grad_norm_",
        "first/last",
        "missing",
        "non-finite",
    ]
    if clip is not None:
        columns.append(Col("clipped", "left"))
    rows: list[list[Cell]] = []
    for s in shown:
        if s is None:
            rows.append(["⋮", *([""] * (len(columns) - 1))])
            continue
        row: list[Cell] = [
            str(s.step),
            str(s.epoch),
            num(s.loss),
            "skipped" if s.total_norm is None else num(s.total_norm),
            num(s.clip_grad_norm),
            num(s.first_last_ratio),
            str(len(s.missing)),
            str(s.non_finite),
        ]
        if clip is not None:
            row.append("yes" if s.clipped else "")
        rows.append(row)
    caption = f"total norm over the steps {sparkline(s.total_norm for s in steps)}"
    if hidden:
        caption += f"; {hidden} middle steps not shown (--json has every step)"
    return grid(columns, rows, title="Per step", caption=caption)


def parameters_section(report: CheckGradsReport) -> Grid:
    th = report.thresholds

    def row(p: ParamRow) -> list[Cell]:
        return [
            p.name,
            "×".join(str(d) for d in p.shape) or "scalar",
            num(p.norm, 3),
            num(p.mean, 3),
            num(p.std, 3),
            num(p.min, 3),
            num(p.max, 3),
            pct(p.zero_fraction),
            num(p.non_finite),
            num(p.update_ratio, 3),
            flags_text(p.flags),
        ]

    return grid(
        [
            "parameter",
            "shape",
            "norm",
            "mean",
            "std",
            "min",
            "max",
            "zeros",
            "NaN",
            "Δw/w",
            Col("flags", "left", wrap=True),
        ],
        [row(p) for p in report.parameters],
        title=f"Parameters at step {report.last_step}",
        caption=(
            "gradients before clipping; NaN = NaN/Inf entries; Δw/w = ‖update‖ / ‖weight‖; "
            f"tiny: mean|g| < {th.get('tiny_abs_mean', math.nan):g}; large-update: Δw/w > "
            f"{th.get('large_update', math.nan):g} (weight matrices; ~1e-3 is typical)"
        ),
    )


def gradient_totals_section(report: CheckGradsReport) -> Group:
    lines = [
        plain(
            f"total gradient norm {num(report.total_norm)} before clipping "
            f"(clip_grad_norm_ returned {num(report.clip_grad_norm)})"
        ),
        plain(
            f"first/last layer gradient norm ratio {num(report.first_last_ratio)} "
            f"({report.first_layer or '—'} / {report.last_layer or '—'})"
        ),
    ]
    if report.never_received:
        line = Text("never received a gradient: ", style="bold red")
        line.append(", ".join(report.never_received), style="")
        lines.append(line)
    else:
        lines.append(plain("every parameter that requires a gradient received one"))
    return Group(*lines)


def ranks_section(report: DistributedCheckGradsReport) -> Grid:
    """One row per rank of a distributed run."""
    return grid(
        ["rank", "steps", "samples", "skipped", "final loss", "median local ‖g‖", "findings"],
        [
            [
                str(r.rank),
                str(r.steps),
                str(r.samples),
                str(r.skipped_steps),
                num(r.final_loss),
                num(r.median_local_grad_norm),
                str(r.findings),
            ]
            for r in report.ranks
        ],
        title=f"Ranks ({report.nproc} processes, {report.backend}, DistributedDataParallel)",
        caption=(
            "final loss: the rank's last finite step loss on its own batch; local ‖g‖: its "
            "gradient before DDP's all-reduce; findings: its own (the rank checks' are the "
            "same on every rank). Steps and parameters below are rank 0's: after the "
            "all-reduce every rank holds the same gradient"
        ),
    )


@renderable.register(CheckGradsReport)
def _check_grads(report: CheckGradsReport) -> Group:
    extra = [f"weights r/kl/s {weights_text(report.weights)}"]
    if report.clip is not None:
        extra.append(f"clip {report.clip:g}")
    ranks = None
    if isinstance(report, DistributedCheckGradsReport):
        extra.append(f"nproc {report.nproc} (batch per rank)")
        ranks = ranks_section(report)
    parts: list[RenderableType | None] = [
        header_section(report, extra),
        semantic_note(report),
        ranks,
        steps_section(report.steps, report.clip),
    ]
    if report.parameters:
        parts += [parameters_section(report), gradient_totals_section(report)]
    else:
        parts.append(plain("no step produced gradients: every loss was NaN/Inf", "bold red"))
    parts += diagnosis_sections(report.diagnosis, report.data.kind)
    return _compose(*parts, *closing_sections(report))


# --------------------------------------------------------------------------- debug-extended

KL_FORMULAS = {
    "one": "1",
    "log_var": "log σ²",
    "neg_mu_sq": "−μ²",
    "neg_exp_log_var": "−exp(log σ²)",
}


def dx_parameters_section(params: Sequence[ParameterStats]) -> Grid:
    flagged = sum(1 for p in params if p.flags)
    caption = (
        f"{flagged} parameter(s) flagged" if flagged else "no parameter flagged"
    ) + " (zero biases and batch-norm ones are how layers start, not faults)"
    return grid(
        [
            "parameter",
            Col("role", "left"),
            "shape",
            "mean",
            "std",
            "min",
            "max",
            "NaN",
            "Inf",
            Col("flags", "left", wrap=True),
        ],
        [
            [
                p.name,
                p.role,
                "×".join(str(s) for s in p.shape) or "scalar",
                num(p.mean),
                num(p.std),
                num(p.min),
                num(p.max),
                num(p.nan),
                num(p.inf),
                flags_text(p.flags),
            ]
            for p in params
        ],
        title="parameters of the untrained model",
        caption=caption,
    )


def dx_untrained_section(probe: ModeProbe, weights: Mapping[str, float]) -> Grid:
    rows: list[list[Cell]] = []
    for role, tr in probe.train.tensors.items():
        ev = probe.eval.tensors.get(role)
        rows.append(
            [
                f"{role} mean ± std",
                f"{num(tr.mean)} ± {num(tr.std)}",
                f"{num(ev.mean)} ± {num(ev.std)}" if ev is not None else "—",
                f"max |Δ| {num(probe.max_abs_difference.get(role))}",
            ]
        )
    for name, value in probe.train.loss.items():
        off = weights.get(name) == 0.0
        rows.append(
            [
                f"loss: {name}" + (" (off)" if off else ""),
                num(value),
                num(probe.eval.loss.get(name)),
                num(probe.loss_difference.get(name)),
            ]
        )
    return grid(
        ["quantity", "train mode", "eval mode", "train − eval"],
        rows,
        title=f"untrained pass, no update ({probe.n_samples} samples)",
        caption=probe.why,
    )


def dx_training_section(records: Sequence[EpochRow], reduction: Mapping[str, str]) -> Grid:
    components = list(dict.fromkeys(n for e in records for n in e.components))
    reductions = ", ".join(f"{k} {v}" for k, v in reduction.items())
    return grid(
        ["epoch", "β", *components, "total", "grad norm", Col("flags", "left", wrap=True)],
        [
            [
                str(e.epoch),
                num(e.beta),
                *(raw_or_off(e, c) for c in components),
                num(e.total),
                num(e.grad_norm),
                flags_text(e.flagged()),
            ]
            for e in records
        ],
        title="training (raw components, means over each epoch's steps)",
        caption=f"reduction: {reductions}",
    )


def dx_gradients_section(g: GradientSummary) -> Grid:
    caption = (
        f"{g.captured_steps} of {g.training_steps} training steps captured by "
        f"{g.hooks_registered} hooks; final total norm {num(g.final_total_norm)}; "
        f"first/last layer ratio {num(g.final_first_last_ratio)}"
    )
    if g.never_reached:
        caption += f"; never reached: {', '.join(g.never_reached)}"
    if g.batch_norm_centred:
        caption += "; bn: the bias feeds batch norm, so its gradient is ~0 by design"

    def note(p: object) -> Cell:
        if getattr(p, "mean_norm", None) is None:
            return Text("never reached", style="bold red")
        return Text("bn", style="dim") if getattr(p, "batch_norm_centred", False) else ""

    return grid(
        ["parameter", "mean ‖g‖", "max ‖g‖", "final ‖g‖", Col("note", "left")],
        [
            [p.name, num(p.mean_norm), num(p.max_norm), num(p.final_norm), note(p)]
            for p in g.parameters
        ],
        title="gradient norms during training (hooks)",
        caption=caption,
    )


def dx_kl_terms_section(kl: KLTermStats) -> Grid:
    caption = (
        f"KL per sample = −½ Σ_z (sum of the four terms) = "
        f"{num(kl.kl_per_sample_mean_from_terms)}; loss library {num(kl.kl_per_sample_mean)}; "
        f"|Δ| {num(kl.abs_difference)}"
    )
    return grid(
        ["term", Col("formula", "left"), "mean", "std", "min", "max"],
        [
            [name, KL_FORMULAS.get(name, ""), num(s.mean), num(s.std), num(s.min), num(s.max)]
            for name, s in kl.terms.items()
        ],
        title="KL term by term, over samples × latents",
        caption=caption,
    )


def dim_status(latent: LatentHealth, verdict: Verdict, dim: int) -> Text:
    """A latent dimension's collapse status, in agreement with the collapse verdict."""
    low_kl = dim in latent.collapsed_dims
    if verdict.status == "not-judged":
        return Text("not judged", style="dim")
    if verdict.status == "finding":
        if low_kl or not latent.active[dim]:
            return Text("collapsed", style="bold red")
        return Text("—")
    return Text("low KL", style="yellow") if low_kl else Text("ok")


def dx_latent_section(latent: LatentHealth, verdict: Verdict) -> Grid:
    caption = Text(
        f"active units {latent.active_units}/{latent.latent_dim} (Var μ > "
        f"{latent.active_threshold:g}); KL total {num(latent.kl_total)} nats; free bits "
        f"(λ = {latent.free_bits_lambda:g}) {num(latent.free_bits)}; low KL: < "
        f"{latent.collapse_threshold:g} nats; "
        + (f"{_gain_text(latent.recon_gain)}; " if latent.recon_gain is not None else ""),
        style="dim",
    )
    caption.append_text(collapse_text(verdict))
    return grid(
        ["dim", "KL (nats)", "Var μ", Col("active", "left"), Col("collapse", "left")],
        [
            [
                str(j),
                num(kl),
                num(latent.activity[j]),
                num(latent.active[j]),
                dim_status(latent, verdict, j),
            ]
            for j, kl in enumerate(latent.kl_per_dim)
        ],
        title="KL per latent dimension",
        caption=caption,
    )


def dx_recon_section(per_feature: Mapping[str, float]) -> Grid:
    items = list(per_feature.items())
    caption = None
    if len(items) > FEATURES_SHOWN:
        worst = sorted(items, key=lambda kv: -kv[1] if math.isfinite(kv[1]) else -math.inf)
        shown = {name for name, _ in worst[:FEATURES_SHOWN]}
        caption = (
            f"the {FEATURES_SHOWN} largest of {len(items)} features; the other "
            f"{len(items) - FEATURES_SHOWN} are in --json"
        )
        items = [(n, v) for n, v in items if n in shown]
    return grid(
        ["feature", "error"],
        [[name, num(value)] for name, value in items],
        title="reconstruction error per feature (squared error, mean)",
        caption=caption,
    )


def dx_annealing_section(run: AnnealingRun, semantic_on: bool) -> Grid:
    return grid(
        ["epoch", "β", "reconstruction", "kl", "semantic", "total"],
        [
            [
                str(e.epoch),
                num(e.beta),
                num(e.reconstruction),
                num(e.kl),
                num(e.semantic) if semantic_on else Text("off", style="dim"),
                num(e.total),
            ]
            for e in run.epochs
        ],
        title=(
            f"{run.schedule} β annealing {run.min_beta:g} → {run.max_beta:g}, fresh model "
            "(raw components)"
        ),
    )


def kind_sections(kind: KindSection) -> list[RenderableType]:
    """The eight sections of one data kind (with the main run's gradient attribution after
    the hook statistics), then what they were measured on and the kind's findings."""
    d = kind.data
    title = (
        f"{kind.kind}: {d.source} ({d.n_samples}×{d.n_features}), output "
        f"{kind.output_activation or '—'}, weights r/kl/s {weights_text(kind.weights)}, "
        f"batch {kind.batch_size}"
    ) + ("" if kind.agent_layout else " (semantic off: not agent states)")
    codes = codes_text(kind.diagnosis.findings) or "none"
    return [
        Heading(plain(title)),
        dx_parameters_section(kind.parameters),
        dx_untrained_section(kind.untrained_pass, kind.weights),
        dx_training_section(kind.records, kind.reduction),
        dx_gradients_section(kind.gradients),
        *(
            [attribution_section(kind.diagnosis.attribution, kind.kind)]
            if kind.diagnosis.attribution is not None
            else []
        ),
        dx_kl_terms_section(kind.kl_terms),
        dx_latent_section(kind.latent, kind.diagnosis.collapse),
        dx_recon_section(kind.recon_per_feature),
        dx_annealing_section(kind.annealing, kind.weights.get("semantic", 0.0) != 0.0),
        plain(kind.measured_on, "dim"),
        plain(f"findings ({kind.kind}): {codes}"),
    ]


@renderable.register(DebugExtendedReport)
def _debug_extended(report: DebugExtendedReport) -> Group:
    parts: list[RenderableType | None] = [header_section(report)]
    for kind in report.kinds:
        parts += kind_sections(kind)
    return _compose(*parts, *closing_sections(report))


# --------------------------------------------------------------------------- output


def render(report: Report, console: Console | None = None) -> None:
    """Print the report's tables once, on ``console`` (default: stdout's)."""
    if console is None:
        from meaning_transform.cli.console import console as stdout_console

        console = stdout_console()
    console.print(renderable(report))
