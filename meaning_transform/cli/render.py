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

from meaning_transform.cli.common import console

out = console()

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
    if result.get("scenario", "healthy") != "healthy":
        line += f"  scenario [bold magenta]{result['scenario']}[/]"
    out.print(line + extra)


def render_findings(findings: list[dict[str, Any]]) -> None:
    if not findings:
        out.print("[green]No findings: nothing looks wrong.[/]")
        return
    t = Table(title="Findings", box=box.SIMPLE_HEAD, title_justify="left")
    t.add_column("severity", no_wrap=True)
    t.add_column("code", no_wrap=True)
    t.add_column("where", overflow="fold", max_width=28)
    t.add_column("finding, evidence and remedy", ratio=1)
    for f in findings:
        what = Text()
        what.append(f["title"], style="bold")
        what.append(f": {f['message']}\n")
        what.append(f"→ {f['remedy']}", style="italic")
        t.add_row(
            Text(f["severity"], style=SEVERITY_STYLE[f["severity"]]), f["code"], f["where"], what
        )
    out.print(t)


def render_diagnosis(name: str, attribution: dict[str, Any], latent: dict[str, Any] | None) -> None:
    """Per-term gradient attribution and latent health of one run."""
    if attribution:
        terms = list(attribution["norm"])
        t = table(
            f"{name} · gradient by loss term (mean over {attribution['steps_attributed']} "
            f"attributed steps)",
            [
                "term",
                "weight",
                "‖g‖",
                "‖w·g‖",
                "share",
                *[f"cos {n}" for n in terms if "/" not in n],
            ],
            "share: projection of w·g on the total gradient (sums to 100% over the main "
            "terms); cos < 0: the terms pull against each other (PCGrad)",
        )
        mains = [n for n in terms if "/" not in n]
        for n in terms:
            t.add_row(
                n,
                num(attribution["weights"].get(n)),
                num(attribution["norm"][n]),
                num(attribution["weighted_norm"][n]),
                pct(attribution["share"][n]),
                *[num(attribution["cosine"].get(n, {}).get(m), 2) for m in mains],
            )
        out.print(t)
    if latent:
        active = latent["active_units"]
        out.print(
            f"latent: {active}/{latent['latent_dim']} active units "
            f"(Var of mu > {latent['active_threshold']}), KL per dimension "
            f"{' '.join(num(v, 3) for v in latent['kl_per_dim'])} nats, free bits "
            f"(λ={latent['free_bits_lambda']}) {num(latent['free_bits'], 3)}"
            + ("  [bold red]collapsed[/]" if latent["collapsed"] else "")
        )


def component_table(title: str, epoch: dict[str, Any], reduction: dict[str, str]) -> Table:
    caption = (
        f"total gradient norm before clipping {num(epoch['grad_norm'])}"
        f" (max {num(epoch['grad_norm_max'])}) over {epoch['steps']} step(s)"
    )
    if epoch.get("skipped_steps"):
        caption += f"; {epoch['skipped_steps']} step(s) skipped (non-finite)"
    t = table(
        title, ["component", "reduction", "raw", "weight", "weighted", "share", "flags"], caption
    )
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
        Text("total", style="bold"),
        "",
        "",
        "",
        num(epoch["total"]),
        "100.0%",
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
            out.print(
                component_table(f"{run['name']} · epoch {epoch['epoch']}", epoch, run["reduction"])
            )
        render_diagnosis(run["name"], run.get("attribution") or {}, run.get("latent"))
    t = table(
        "Summary",
        [
            "configuration",
            "weights r/kl/s",
            "first total",
            "final total",
            "recon",
            "KL",
            "semantic",
            "grad norm",
            "flags",
            "findings",
        ],
    )
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


@renderer("anneal-demo")
def render_anneal_demo(result: dict[str, Any]) -> None:
    s = result["schedule"]
    extra = f"  schedule [bold]{s['type']}[/] β {num(s['min_beta'])}→{num(s['max_beta'])}"
    if s["type"] == "cyclical":
        extra += f" (cycles {s['cycles']}, ratio {num(s['ratio'])})"
    render_header(result, extra)
    if not result.get("semantic_applicable", True):
        out.print("[dim]semantic term off: the data is not the 10-feature agent-state layout[/]")
    w = result["weights"]
    t = table(
        f"Per epoch (reconstruction weight {num(w['reconstruction'])}, KL weight β, "
        f"semantic weight {num(w['semantic'])})",
        ["epoch", "β", "recon", "KL", "β·KL", "semantic", "total", "grad norm", "flags"],
    )
    for e in result["epochs"]:
        flags = sorted(
            {
                f"{name}:{fl}"
                for name, row in e["components"].items()
                for fl in row["flags"]
                if fl != "off"
            }
            | {f"total:{fl}" for fl in e["total_flags"]}
        )
        semantic = e["components"].get("semantic", {})
        t.add_row(
            str(e["epoch"]),
            num(e["beta"]),
            num(e["reconstruction"]),
            num(e["kl"]),
            num(e["weighted_kl"]),
            Text("off", style="dim") if "off" in semantic.get("flags", []) else num(e["semantic"]),
            num(e["total"]),
            num(e["grad_norm"]),
            flags_text(flags),
        )
    out.print(t)
    for label, values in (
        ("β    ", result["beta_curve"]),
        ("KL   ", [e["kl"] for e in result["epochs"]]),
        ("total", [e["total"] for e in result["epochs"]]),
    ):
        finite = [v for v in values if v is not None and math.isfinite(v)]
        span = f"min {num(min(finite))}  max {num(max(finite))}" if finite else "no finite values"
        out.print(f"{label} {sparkline(values)}  {span}", markup=False)
    if result.get("not_checked"):
        out.print(
            f"[dim]not checked while β changes (the total is a different objective each "
            f"epoch): {', '.join(result['not_checked'])}[/]"
        )
    render_diagnosis(
        result["schedule"]["type"], result.get("attribution") or {}, result.get("latent")
    )
    render_findings(result["findings"])


CHECK_GRADS_FLAG_STYLE = {
    "no-grad": "bold red",
    "non-finite": "bold red",
    "all-zero": "bold red",
    "missing": "bold yellow",
    "tiny": "bold yellow",
    "frozen": "bold yellow",
    "large-update": "bold yellow",
    "bn-absorbed": "dim",
}


@renderer("check-grads")
def render_check_grads(result: dict[str, Any]) -> None:
    clip = result.get("clip")
    w = result["weights"]
    render_header(
        result,
        f"  weights r/kl/s {w['reconstruction']:g}/{w['kl']:g}/{w['semantic']:g}"
        + (f"  clip {clip:g}" if clip is not None else ""),
    )
    if not result.get("semantic_applicable", True):
        out.print("[dim]semantic term off: the data is not the 10-feature agent-state layout[/]")
    steps = result["steps"]
    shown = steps if len(steps) <= 12 else steps[:5] + [None] + steps[-5:]
    t = table(
        "Per step",
        [
            "step",
            "epoch",
            "loss",
            "total norm",
            "clip_grad_norm_",
            "first/last",
            "missing",
            "non-finite",
        ],
        caption=f"total norm over steps {sparkline(s['total_norm'] for s in steps)}",
    )
    for s in shown:
        if s is None:
            t.add_row("…", "", "", "", "", "", "", "")
            continue
        t.add_row(
            str(s["step"]),
            str(s["epoch"]),
            num(s["loss"]),
            num(s["total_norm"]) + (" (clipped)" if s["clipped"] else ""),
            num(s["clip_grad_norm"]),
            num(s["first_last_ratio"]),
            str(len(s["missing"])),
            str(s["non_finite"]),
        )
    out.print(t)
    if not result["parameters"]:
        out.print("[bold red]no step produced gradients: every loss was NaN/Inf[/]")
        render_findings(result["findings"])
        return
    th = result["thresholds"]
    t = table(
        f"Parameters at step {result['last_step']}",
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
            "flags",
        ],
        caption=(
            "gradients before clipping; NaN = NaN/Inf entries; Δw/w = ||update|| / ||weight||; "
            f"tiny: mean|g| < {th['tiny_abs_mean']:g}; large-update: Δw/w > "
            f"{th['large_update']:g} (weight matrices; ~1e-3 is typical)"
        ),
    )
    t.padding = 0  # 11 columns in 120: the box's one-space separator is the only gap
    t.show_edge = False
    longest = max((len(p["name"]) for p in result["parameters"]), default=9)
    widths = [longest, 5, 8, 9, 8, 9, 9, 6, 3, 8]  # std and Δw/w are never negative
    for column, width in zip(t.columns, widths):  # the flags may wrap; nothing else may
        column.no_wrap = True
        column.min_width = width
    for p in result["parameters"]:
        flags = Text()
        for i, flag in enumerate(p["flags"]):
            if i:
                flags.append(" ")
            flags.append(flag, style=CHECK_GRADS_FLAG_STYLE.get(flag, "yellow"))
        t.add_row(
            p["name"],
            "×".join(str(d) for d in p["shape"]) or "scalar",
            num(p["norm"], 3),
            num(p["mean"], 3),
            num(p["std"], 3),
            num(p["min"], 3),
            num(p["max"], 3),
            pct(p["zero_fraction"]),
            num(p["non_finite"]),
            num(p["update_ratio"], 3),
            flags,
        )
    out.print(t)
    out.print(
        f"total gradient norm {num(result['total_norm'])} before clipping "
        f"(clip_grad_norm_ returned {num(result['clip_grad_norm'])})"
    )
    out.print(
        f"first/last layer gradient norm ratio {num(result['first_last_ratio'])} "
        f"({result['first_layer']} / {result['last_layer']})"
    )
    never = result["never_received"]
    if never:
        out.print(f"[bold red]never received a gradient:[/] {', '.join(never)}")
    else:
        out.print("every parameter that requires a gradient received one")
    render_diagnosis(result["data"]["kind"], result.get("attribution") or {}, result.get("latent"))
    render_findings(result["findings"])


# ---- debug-extended ------------------------------------------------------------------

_DX_MAX_ROWS = 24  # longer per-feature / per-parameter lists are cut, the JSON has them all
_DX_KL_FORMULAS = {
    "one": "1",
    "log_var": "log σ²",
    "neg_mu_sq": "−μ²",
    "neg_exp_log_var": "−exp(log σ²)",
}


def _dx_table(title: str, columns: list[str], caption: str | None = None) -> Table:
    t = table(title, columns, caption)
    t.min_width = 72  # narrow tables would otherwise wrap their title and caption
    return t


def _dx_cut(items: list[Any]) -> tuple[list[Any], str]:
    if len(items) <= _DX_MAX_ROWS:
        return items, ""
    return items[:_DX_MAX_ROWS], f"; {len(items) - _DX_MAX_ROWS} more rows in --json"


def _dx_parameters(kind: dict[str, Any]) -> Table:
    rows, more = _dx_cut(list(kind["parameters"].items()))
    flagged = sum(1 for _, p in kind["parameters"].items() if p["flags"])
    caption = (
        (f"{flagged} parameter(s) flagged" if flagged else "no parameter flagged")
        + " (zero biases and batch-norm ones are how layers start, not faults)"
        + more
    )
    t = _dx_table(
        "parameters of the untrained model",
        ["parameter", "role", "shape", "mean", "std", "min", "max", "NaN", "Inf", "flags"],
        caption,
    )
    for name, p in rows:
        t.add_row(
            name,
            p["role"],
            "×".join(str(s) for s in p["shape"]),
            num(p["mean"]),
            num(p["std"]),
            num(p["min"]),
            num(p["max"]),
            num(p["nan"]),
            num(p["inf"]),
            flags_text(p["flags"]),
        )
    return t


def _dx_untrained(kind: dict[str, Any]) -> Table:
    u = kind["untrained_pass"]
    diff = u["differences"]
    t = _dx_table(
        f"untrained pass, no update ({u['n_samples']} samples)",
        ["quantity", "train mode", "eval mode", "train − eval"],
        u["why"],
    )
    for key in ("reconstruction", "mu", "log_var", "z"):
        if key not in u["train"]:
            continue
        tr, ev = u["train"][key], u["eval"][key]
        t.add_row(
            f"{key} mean ± std",
            f"{num(tr['mean'])} ± {num(tr['std'])}",
            f"{num(ev['mean'])} ± {num(ev['std'])}",
            f"max |Δ| {num(diff['max_abs'].get(key))}",
        )
    for name, value in u["train"]["loss"].items():
        if name == "semantic" and not kind["weights"]["semantic"]:
            continue  # off for this kind
        t.add_row(
            f"loss: {name}", num(value), num(u["eval"]["loss"][name]), num(diff["loss"][name])
        )
    return t


def _dx_kl_terms(kind: dict[str, Any]) -> Table:
    terms = kind["kl_terms"]
    check = terms["sum_check"]
    caption = (
        f"KL per sample = −½ Σ_z (sum of the four) = {num(check['kl_per_sample_mean_from_terms'])}"
        f"; loss library {num(check['kl_per_sample_mean'])}; |Δ| {num(check['abs_difference'])}"
    )
    t = _dx_table(
        "KL term by term, over samples × latents",
        ["term", "formula", "mean", "std", "min", "max"],
        caption,
    )
    for name, formula in _DX_KL_FORMULAS.items():
        s = terms[name]
        t.add_row(name, formula, num(s["mean"]), num(s["std"]), num(s["min"]), num(s["max"]))
    return t


def _dx_latent(kind: dict[str, Any]) -> Table:
    h = kind["latent_health"]
    collapsed = set(h["collapsed_dims"])
    caption = (
        f"active units {h['active_units']}/{h['latent_dim']} (Var μ > {h['active_threshold']:g})"
        f"; KL total {num(h['kl_total'])} nats; free bits (λ = {h['free_bits_lambda']:g}) "
        f"{num(h['free_bits'])}" + ("; [bold red]posterior collapsed[/]" if h["collapsed"] else "")
    )
    t = _dx_table(
        "KL per latent dimension", ["dim", "KL (nats)", "Var μ", "active", "collapsed"], caption
    )
    for j, value in enumerate(kind["kl_per_dim"]):
        t.add_row(
            str(j),
            num(value),
            num(h["activity"][j]),
            num(h["active"][j]),
            Text("yes", style="yellow") if j in collapsed else "no",
        )
    return t


def _dx_recon(kind: dict[str, Any]) -> Table:
    rows, more = _dx_cut(list(kind["recon_per_feature"].items()))
    t = _dx_table(
        "reconstruction error per feature (squared error, mean)",
        ["feature", "error"],
        more.lstrip("; ") or None,
    )
    for name, value in rows:
        t.add_row(name, num(value))
    return t


def _dx_gradients(kind: dict[str, Any]) -> Table:
    g = kind["gradients"]
    rows, more = _dx_cut(list(g["parameters"].items()))
    caption = (
        f"{g['captured_steps']} of {g['training_steps']} training steps captured by "
        f"{g['hooks_registered']} hooks; final total norm {num(g['final_total_norm'])}; "
        f"first/last layer ratio {num(g['final_first_last_ratio'])}"
    )
    if g["never_reached"]:
        caption += f"; never reached: {', '.join(g['never_reached'])}"
    centred = set(g.get("batch_norm_centred", ()))
    if centred:
        caption += "; bn: the bias feeds batch norm, so its gradient is ~0 by design"
    t = _dx_table(
        "gradient norms during training (hooks)",
        ["parameter", "mean ‖g‖", "max ‖g‖", "final ‖g‖", ""],
        caption + more,
    )
    for name, s in rows:
        t.add_row(
            name,
            num(s["mean_norm"]),
            num(s["max_norm"]),
            num(s["final_norm"]),
            Text("bn", style="dim") if name in centred else "",
        )
    return t


def _dx_training(kind: dict[str, Any]) -> Table:
    red = kind["reduction"]
    t = _dx_table(
        f"training (reduction {red.get('reconstruction', '—')})",
        ["epoch", "β", "reconstruction", "KL", "semantic", "total", "grad norm", "flags"],
    )
    for e in kind["records"]:
        comps = e["components"]
        flags = [f"{n}:{f}" for n, c in comps.items() for f in c["flags"] if f != "off"]
        flags += [f"total:{f}" for f in e["total_flags"]]
        t.add_row(
            str(e["epoch"]),
            num(e["beta"]),
            num(comps["reconstruction"]["raw"]),
            num(comps["kl"]["raw"]),
            num(comps["semantic"]["raw"])
            if "off" not in comps["semantic"]["flags"]
            else Text("off", style="dim"),
            num(e["total"]),
            num(e["grad_norm"]),
            flags_text(flags),
        )
    return t


def _dx_annealing(kind: dict[str, Any]) -> Table:
    a = kind["annealing"]
    t = _dx_table(
        f"{a['schedule']} β annealing {a['min_beta']:g} → {a['max_beta']:g}, fresh model",
        ["epoch", "β", "reconstruction", "KL", "total"],
    )
    for e in a["epochs"]:
        t.add_row(
            str(e["epoch"]), num(e["beta"]), num(e["reconstruction"]), num(e["kl"]), num(e["total"])
        )
    return t


@renderer("debug-extended")
def render_debug_extended(result: dict[str, Any]) -> None:
    render_header(result)
    for kind in result["kinds"]:
        data = kind["data"]
        w = kind["weights"]
        out.rule(
            f"{kind['kind']}: {data['source']} ({data['n_samples']}×{data['n_features']}), "
            f"output {kind.get('output_activation') or '—'}, weights r/kl/s "
            f"{w['reconstruction']:g}/{w['kl']:g}/{w['semantic']:g}"
            + ("" if kind["agent_layout"] else " (semantic off: not agent states)")
        )
        for draw in (
            _dx_parameters,
            _dx_untrained,
            _dx_training,
            _dx_gradients,
            _dx_kl_terms,
            _dx_latent,
            _dx_recon,
            _dx_annealing,
        ):
            out.print(draw(kind))
        out.print(f"[dim]{kind['measured_on']}[/]")
        out.print(f"findings: {', '.join(kind['findings']) or 'none'}")
    render_findings(result["findings"])
