"""Rich rendering of command results. The one place that knows how things look.

Each ``render_<command>`` takes the same dict ``--json`` prints and draws tables
from it; no numbers are computed here beyond formatting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from meaning_transform.cli.common import out

FLAG_STYLE = {
    "non-finite": "bold red",
    "zero": "bold red",
    "floored": "bold yellow",
    "off": "dim",
}
SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
SPARK = "▁▂▃▄▅▆▇█"

Renderer = Callable[[dict[str, Any]], None]
RENDERERS: dict[str, Renderer] = {}


def renderer(command: str) -> Callable[[Renderer], Renderer]:
    """Register the renderer of one command's result."""

    def register(fn: Renderer) -> Renderer:
        RENDERERS[command] = fn
        return fn

    return register


def render(result: dict[str, Any]) -> None:
    RENDERERS[result["command"]](result)
    if result.get("plot"):
        out.print(f"plot saved to {result['plot']}")


def num(x: Any, digits: int = 4) -> str:
    """A number for a table cell: NaN/Inf and None shown plainly, not hidden."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return "Inf" if x > 0 else "-Inf"
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}f}"
    return str(x)


def pct(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def flags_text(flags: Iterable[str]) -> Text:
    text = Text()
    for i, flag in enumerate(flags):
        if i:
            text.append(" ")
        text.append(flag, style=FLAG_STYLE.get(flag, "yellow"))
    return text


def table(title: str, columns: Iterable[str], caption: str | None = None) -> Table:
    t = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    return t


def sparkline(values: Iterable[float]) -> str:
    vals = [v for v in values]
    finite = [v for v in vals if v is not None and math.isfinite(v)]
    if not finite:
        return ""
    lo, hi = min(finite), max(finite)
    span = hi - lo
    chars = []
    for v in vals:
        if v is None or not math.isfinite(v):
            chars.append("!")
        else:
            level = 0 if span == 0 else round((v - lo) / span * (len(SPARK) - 1))
            chars.append(SPARK[level])
    return "".join(chars)


def render_header(result: dict[str, Any], extra: str = "") -> None:
    data = result.get("data", {})
    cfg = result.get("config", {})
    line = (
        f"[bold]mtx {result['command']}[/]  data {data.get('source', '?')} "
        f"({data.get('n_samples', '?')}×{data.get('n_features', '?')})  "
        f"seed {cfg.get('seed')}  epochs {cfg.get('epochs')}  batch {result.get('batch_size')}  "
        f"lr {cfg.get('lr')}"
    )
    if "reduction" in result:
        line += f"  reduction [bold]{result['reduction']}[/]"
    out.print(line + extra)


def render_findings(findings: list[dict[str, Any]]) -> None:
    if not findings:
        out.print("[green]No findings: nothing looks wrong.[/]")
        return
    t = table("Findings", ["severity", "code", "where", "what", "remedy"])
    for f in findings:
        t.add_row(
            Text(f["severity"], style=SEVERITY_STYLE[f["severity"]]),
            f["code"],
            f["where"],
            f"{f['title']}: {f['message']}",
            f["remedy"],
        )
    out.print(t)


def component_table(title: str, epoch: dict[str, Any], reduction: dict[str, str]) -> Table:
    caption = (
        f"total gradient norm before clipping {num(epoch['grad_norm'])}"
        f" (max {num(epoch['grad_norm_max'])}) over {epoch['steps']} step(s)"
    )
    if epoch.get("skipped_steps"):
        caption += f"; {epoch['skipped_steps']} step(s) skipped (non-finite)"
    t = table(title, ["component", "reduction", "raw", "weight", "weighted", "share", "flags"],
              caption)
    for name, row in epoch["components"].items():
        t.add_row(
            name,
            reduction.get(name, "—"),
            num(row["raw"]),
            num(row["weight"]),
            num(row["weighted"]),
            pct(row["share"]),
            flags_text(row["flags"]),
        )
    t.add_row(
        Text("total", style="bold"), "", "", "", num(epoch["total"]), "100.0%",
        flags_text(epoch.get("total_flags", [])),
    )
    return t


@renderer("debug-loss")
def render_debug_loss(result: dict[str, Any]) -> None:
    render_header(result)
    if not result.get("semantic_applicable", True):
        out.print("[dim]semantic term off: the data is not the 10-feature agent-state layout[/]")
    for run in result["runs"]:
        w = run["weights"]
        out.rule(
            f"{run['name']}: reconstruction {num(w['reconstruction'])}, KL {num(w['kl'])}, "
            f"semantic {num(w['semantic'])}"
        )
        for epoch in run["epochs"]:
            out.print(component_table(f"{run['name']} · epoch {epoch['epoch']}", epoch,
                                      run["reduction"]))
    t = table("Summary", ["configuration", "weights r/kl/s", "first total", "final total",
                          "recon", "KL", "semantic", "grad norm", "flags", "findings"])
    for s in result["summary"]:
        w = s["weights"]
        raw = s["final_raw"]
        t.add_row(
            s["name"],
            f"{w['reconstruction']:g}/{w['kl']:g}/{w['semantic']:g}",
            num(s["first_total"]),
            num(s["final_total"]),
            num(raw.get("reconstruction")),
            num(raw.get("kl")),
            num(raw.get("semantic")),
            num(s["final_grad_norm"]),
            flags_text(s["flagged"]),
            ", ".join(s["findings"]) or "—",
        )
    out.print(t)
    render_findings(result["findings"])


