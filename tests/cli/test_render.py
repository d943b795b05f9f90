"""The tables people read: cells checked by column, every section present, nothing cut.

Reports are built once per module from short runs; rendering is pure, so every test
prints the same report into a string console of the width it needs.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
from _cli_tables import is_subsequence, names_to_find, render_text, table_rows
from typer.testing import CliRunner

from meaning_transform.cli import app, render
from meaning_transform.diagnostics.findings import Finding, NotChecked, Verdict
from meaning_transform.studies.report import (
    AnnealConfig,
    CheckGradsConfig,
    DebugExtendedConfig,
    DebugLossConfig,
    DebugLossReport,
)

WIDTHS = (50, 80, 120)
COMMON = dict(
    seed=0,
    device="cpu",
    epochs=2,
    batch_size=128,
    lr=1e-3,
    data=None,
    model=None,
    scenario="healthy",
    reduction="mean",
    fail_on="error",
    plot=None,
)


# --------------------------------------------------------------------------- reports


@pytest.fixture(scope="module")
def reports():
    """One report per command from short runs on the built-in setup (a few seconds)."""
    import torch

    from meaning_transform.studies.anneal import run_anneal
    from meaning_transform.studies.check_grads import run_check_grads
    from meaning_transform.studies.debug_extended import extended_datasets, run_debug_extended
    from meaning_transform.studies.debug_loss import PRESETS, run_debug_loss
    from meaning_transform.studies.pipeline import Pipeline
    from meaning_transform.studies.setup import get_data
    from meaning_transform.training import BetaSchedule, TrainConfig

    torch.set_num_threads(1)
    train = TrainConfig(epochs=2, batch_size=128, device="cpu")
    pipeline = Pipeline(dataset=get_data(None, seed=0), train_config=train)
    debug_loss = run_debug_loss(
        pipeline,
        PRESETS[:2],
        DebugLossConfig(**COMMON, recon_weight=None, kl_weight=None, semantic_weight=None, every=0),
    )
    anneal = run_anneal(
        pipeline,
        BetaSchedule("linear"),
        AnnealConfig(**COMMON, schedule="linear", min_beta=0.0, max_beta=1.0, cycles=4, ratio=0.5),
    )
    check_grads = run_check_grads(
        pipeline,
        CheckGradsConfig(
            **COMMON, recon_weight=1.0, kl_weight=0.1, semantic_weight=None, clip=None
        ),
    )
    datasets = extended_datasets("all", None, n=64, seed=0)[:2]  # agent states and one other
    debug_extended = run_debug_extended(
        lambda d: Pipeline(dataset=d, train_config=replace(train, batch_size=32)),
        datasets,
        DebugExtendedConfig(**COMMON, data_kind="all", samples=64),
    )
    return {
        "debug-loss": debug_loss,
        "anneal-demo": anneal,
        "check-grads": check_grads,
        "debug-extended": debug_extended,
    }


def text_of(report, width: int = 120) -> str:
    return render_text(render.renderable(report), width)


# --------------------------------------------------------------------------- debug-loss


@pytest.mark.parametrize("width", [80, 120])
def test_component_table_cells_sit_under_their_headers(reports, width):
    report = reports["debug-loss"]
    run = report.runs[0]
    epoch = run.epochs[0]
    kl = epoch.components["kl"]
    assert render.num(kl.raw) != render.num(kl.weighted)  # a swap would show
    rows = table_rows(
        text_of(report, width),
        f"{run.name} · epoch {epoch.epoch}",
        ["component", "reduction", "raw", "weight", "weighted", "share", "flags"],
    )
    by_name = {r["component"]: r for r in rows}
    assert list(by_name) == [*epoch.components, "total"]
    for name, component in epoch.components.items():
        cells = by_name[name]
        assert cells["raw"] == render.num(component.raw)
        assert cells["weight"] == render.num(component.weight)
        assert cells["weighted"] == render.num(component.weighted)
        assert cells["share"] == render.pct(component.share)
        assert cells["reduction"] == run.reduction[name]
    assert by_name["total"]["weighted"] == render.num(epoch.total)
    assert by_name["total"]["raw"] == ""


def test_component_caption_has_grad_norm_and_a_table_per_reported_epoch(reports):
    report = reports["debug-loss"]
    text = text_of(report)
    for run in report.runs:
        for epoch in run.epochs:
            assert f"{run.name} · epoch {epoch.epoch}" in text
            assert f"total gradient norm before clipping {render.num(epoch.grad_norm)}" in text


def test_attribution_table_says_every_number_is_a_mean(reports):
    report = reports["debug-loss"]
    attribution = report.runs[0].diagnosis.attribution
    assert attribution is not None
    text = text_of(report)
    steps = attribution.steps_attributed
    assert f"gradient by loss term (mean over {steps} attributed step(s))" in text
    assert "cosines included, is the mean" in text
    mains = [t for t in attribution.norm if "/" not in t]
    rows = table_rows(
        text_of(report, 200),
        f"{report.runs[0].name} · gradient by loss term (mean over {steps} attributed step(s))",
        ["term", "weight", "‖g‖", "‖w·g‖", "share", *(f"cos {m}" for m in mains)],
    )
    by_term = {r["term"]: r for r in rows}
    assert list(by_term) == list(attribution.norm)
    for term in attribution.norm:
        assert by_term[term]["‖g‖"] == render.num(attribution.norm[term])
        assert by_term[term]["‖w·g‖"] == render.num(attribution.weighted_norm[term])
        assert by_term[term]["cos kl"] == render.num(attribution.cosine[term]["kl"], 2)


def test_summary_has_a_row_per_configuration(reports):
    report = reports["debug-loss"]
    components = list(report.summary[0].final_raw)
    rows = table_rows(
        text_of(report, 200),
        "Summary (final epoch, raw components)",
        [
            "configuration",
            "weights r/kl/s",
            "first total",
            "final total",
            *components,
            "grad norm",
            "flags",
            "findings",
        ],
    )
    assert [r["configuration"] for r in rows] == [s.name for s in report.summary]
    for row, s in zip(rows, report.summary):
        assert row["final total"] == render.num(s.final_total)
        assert row["kl"] == render.num(s.final_raw["kl"])


# --------------------------------------------------------------------------- latent and collapse


def _with_collapse(report: DebugLossReport, status: str, reason: str) -> DebugLossReport:
    run = report.runs[0]
    diagnosis = replace(run.diagnosis, collapse=Verdict("posterior-collapse", status, reason))
    return replace(report, runs=(replace(run, diagnosis=diagnosis), *report.runs[1:]))


def test_latent_line_says_not_judged_rather_than_collapsed(reports):
    report = _with_collapse(reports["debug-loss"], "not-judged", "only 4 steps, judged after 20")
    line = render_text(
        render.latent_section(report.runs[0].diagnosis.latent, report.runs[0].diagnosis.collapse),
        400,
    )
    assert "collapse not judged: only 4 steps, judged after 20" in line
    assert "collapsed" not in line


def test_latent_line_points_to_the_finding_when_the_rule_fired(reports):
    report = _with_collapse(reports["debug-loss"], "finding", "0/4 units active")
    diagnosis = report.runs[0].diagnosis
    line = render_text(render.latent_section(diagnosis.latent, diagnosis.collapse), 400)
    assert "posterior collapse (see findings)" in line


# --------------------------------------------------------------------------- findings, not checked


def test_findings_table_shows_title_message_and_remedy(reports):
    unique = Finding(
        code="made-up-code",
        severity="warning",
        title="a made-up title",
        message="the made-up message with 1.2345",
        remedy="turn the quibble-dial to eleven and retrain",
        where="Default: semantic/threatened",
    )
    report = replace(reports["debug-loss"], findings=(unique,))
    for width in WIDTHS:
        text = text_of(report, width)
        section = text[text.index("Findings") :]
        assert "made-up-code" in section and "semantic/threatened" in section
        tokens = section.split()
        assert is_subsequence(unique.title.split(), tokens), section
        assert is_subsequence(unique.message.split(), tokens), section
        assert is_subsequence(["→", *unique.remedy.split()], tokens), section
    assert render.NO_FINDINGS not in text_of(report)


def test_no_findings_says_so(reports):
    report = replace(reports["debug-loss"], findings=(), not_checked=())
    assert render.NO_FINDINGS in text_of(report)
    assert render.NO_FINDINGS_PARTLY not in text_of(report)


def test_no_findings_with_checks_not_run_does_not_claim_all_is_well(reports):
    from meaning_transform.diagnostics.findings import NotChecked

    skipped = (NotChecked("loss-plateau", "needs 3 epochs, this run had 2", ("Default",)),)
    report = replace(reports["debug-loss"], findings=(), not_checked=skipped)
    text = text_of(report)
    assert render.NO_FINDINGS_PARTLY in " ".join(text.split())
    assert render.NO_FINDINGS not in text


@pytest.mark.parametrize("command", ["debug-loss", "anneal-demo", "check-grads", "debug-extended"])
def test_every_not_checked_item_is_listed(reports, command):
    extra = NotChecked("made-up-check", "the made-up reason it could not run", ("Run A", "Run B"))
    report = replace(reports[command], not_checked=(*reports[command].not_checked, extra))
    for width in WIDTHS:
        text = text_of(report, width)
        section = text[text.index("Not checked") :]
        tokens = section.split()
        for item in report.not_checked:
            assert item.code in section
            assert is_subsequence(item.reason.split(), tokens), (item, section)
            assert is_subsequence(", ".join(item.runs).split(), tokens), (item, section)


# ------------------------------------------------------------------ anneal-demo, check-grads


def test_anneal_table_has_beta_and_weighted_kl_per_epoch(reports):
    report = reports["anneal-demo"]
    text = text_of(report)
    title = next(line.strip() for line in text.splitlines() if line.startswith("Per epoch"))
    rows = table_rows(
        text,
        title,
        ["epoch", "β", "recon", "KL", "β·KL", "semantic", "total", "grad norm", "flags"],
    )
    assert [r["epoch"] for r in rows] == [str(e.epoch) for e in report.epochs]
    for row, e in zip(rows, report.epochs):
        assert row["β"] == render.num(e.beta)
        assert row["KL"] == render.num(e.components["kl"].raw)  # shown at β = 0 too
        assert row["β·KL"] == render.num(e.components["kl"].weighted)
    assert "β " in text_of(report) and render.sparkline(report.beta_curve) in text_of(report)


def test_check_grads_parameter_rows(reports):
    report = reports["check-grads"]
    text = text_of(report, 200)
    rows = table_rows(
        text,
        f"Parameters at step {report.last_step}",
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
    )
    assert [r["parameter"] for r in rows] == [p.name for p in report.parameters]
    for row, p in zip(rows, report.parameters):
        assert row["norm"] == render.num(p.norm, 3)
        assert row["min"] == render.num(p.min, 3)
        assert row["flags"] == " ".join(p.flags)
    assert "every parameter that requires a gradient received one" in text


def test_check_grads_never_received_line(reports):
    report = replace(reports["check-grads"], never_received=("decoder.unused.weight",))
    assert "never received a gradient: decoder.unused.weight" in text_of(report)


# --------------------------------------------------------------------------- debug-extended


def _sections(kind):
    """(title start, a formatted number from the section's typed part), in print order."""
    g = kind.gradients.parameters[0]
    first_feature = next(iter(kind.recon_per_feature.values()))
    return [
        ("parameters of the untrained model", render.num(kind.parameters[0].std)),
        ("untrained pass, no update", render.num(kind.untrained_pass.max_abs_difference["z"])),
        ("training (raw components", render.num(kind.records[-1].total)),
        ("gradient norms during training", render.num(g.max_norm)),
        ("KL term by term", render.num(kind.kl_terms.terms["log_var"].std)),
        ("KL per latent dimension", render.num(kind.diagnosis.latent.kl_per_dim[0])),
        ("reconstruction error per feature", render.num(first_feature)),
        (f"{kind.annealing.schedule} β annealing", render.num(kind.annealing.epochs[-1].total)),
    ]


@pytest.mark.parametrize(
    "index",
    range(8),
    ids=[
        "parameters",
        "untrained-pass",
        "training",
        "gradients",
        "kl-terms",
        "kl-per-dim",
        "recon-per-feature",
        "annealing",
    ],
)
def test_debug_extended_section(reports, index):
    report = reports["debug-extended"]
    text = text_of(report)
    lines = text.splitlines()
    for kind in report.kinds:
        start = next(i for i, line in enumerate(lines) if f"{kind.kind}: synthetic:" in line)
        end = next(
            i for i in range(start, len(lines)) if lines[i].startswith(f"findings ({kind.kind})")
        )
        block = lines[start:end]
        sections = _sections(kind)
        title, number = sections[index]
        at = next((i for i, line in enumerate(block) if line.startswith(title)), None)
        assert at is not None, f"no section {title!r} for {kind.kind}"
        following = [t for t, _ in sections[index + 1 :]]
        stop = next(
            (
                i
                for i in range(at + 1, len(block))
                if any(block[i].startswith(t) for t in following)
            ),
            len(block),
        )
        assert number in "\n".join(block[at:stop]), (title, number)


def test_debug_extended_measured_on_and_findings_per_kind(reports):
    report = reports["debug-extended"]
    text = text_of(report, 400)
    for kind in report.kinds:
        assert kind.measured_on in text
        codes = render.codes_text(kind.diagnosis.findings) or "none"
        assert f"findings ({kind.kind}): {codes}" in text


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("not-judged", {"not judged"}),
        ("finding", {"collapsed", "—"}),
        ("ok", {"ok", "low KL"}),
    ],
)
def test_kl_per_dim_status_agrees_with_the_collapse_verdict(reports, status, expected):
    report = reports["debug-extended"]
    kind = report.kinds[0]
    verdict = Verdict("posterior-collapse", status, "why")
    text = render_text(render.dx_latent_section(kind.diagnosis.latent, verdict), 120)
    rows = table_rows(
        text, "KL per latent dimension", ["dim", "KL (nats)", "Var μ", "active", "collapse"]
    )
    assert len(rows) == kind.diagnosis.latent.latent_dim
    statuses = {r["collapse"] for r in rows}
    assert statuses <= expected
    if status == "finding":
        for j, row in enumerate(rows):
            low = j in kind.diagnosis.latent.collapsed_dims or not kind.diagnosis.latent.active[j]
            assert row["collapse"] == ("collapsed" if low else "—")
    if status == "not-judged":
        assert "collapse not judged: why" in " ".join(text.split())
    assert {r["KL (nats)"] for r in rows} == {
        render.num(v) for v in kind.diagnosis.latent.kl_per_dim
    }


# --------------------------------------------------------------------------- any width


def _names(report) -> set[str]:
    from meaning_transform.studies.report import json_data

    return names_to_find(json_data(report))


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("command", ["debug-loss", "anneal-demo", "check-grads", "debug-extended"])
def test_nothing_is_cut_at_any_width(reports, command, width):
    report = reports[command]
    text = text_of(report, width)
    assert "…" not in text
    long = [line for line in text.splitlines() if len(line) > width]
    assert not long, long
    names = _names(report)
    assert names, "nothing to look for"
    missing = sorted(n for n in names if n not in text)
    assert not missing, missing


def test_user_text_is_printed_not_read_as_markup(reports):
    report = reports["debug-loss"]
    run = replace(report.runs[0], name="[/]run [bold]A[/bold]")
    marked = replace(
        report,
        config=replace(report.config, data="[bold]x[/].npy", model="[red]m.py[/]:build"),
        data=replace(report.data, source="[bold]x[/].npy"),
        runs=(run, *report.runs[1:]),
    )
    text = text_of(marked, 200)
    assert "[bold]x[/].npy" in text
    assert "[red]m.py[/]:build" in text
    assert "[/]run [bold]A[/bold] · epoch 0" in text


def test_render_prints_once_on_the_given_console(reports):
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=80, color_system=None, legacy_windows=False)
    render.render(reports["check-grads"], console)
    assert console.file.getvalue() == text_of(reports["check-grads"], 80)


def test_unknown_report_type_is_an_error():
    with pytest.raises(TypeError, match="no renderer"):
        render.renderable(object())


# --------------------------------------------------------------------------- the stdout console


def test_console_width_honours_columns_and_defaults_to_120_when_piped(monkeypatch):
    import io

    from meaning_transform.cli import console as consoles

    monkeypatch.setattr("sys.stdout", io.StringIO())  # not a terminal
    monkeypatch.delenv("COLUMNS", raising=False)
    assert consoles.console().width == consoles.PIPED_WIDTH == 120
    monkeypatch.setenv("COLUMNS", "80")
    assert consoles.console().width == 80


def test_console_asks_the_terminal_when_there_is_one(monkeypatch):
    import io

    from meaning_transform.cli import console as consoles

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdout", Terminal())
    monkeypatch.delenv("COLUMNS", raising=False)
    assert consoles.stdout_width() is None
    monkeypatch.setenv("COLUMNS", "93")
    assert consoles.stdout_width() == 93


def test_no_color_removes_colour_even_on_a_forced_terminal(monkeypatch, reports):
    import io

    from meaning_transform.cli import console as consoles

    monkeypatch.setattr("sys.stdout", io.StringIO())
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("NO_COLOR", "1")
    report = replace(
        reports["debug-loss"],
        findings=(Finding("made-up-code", "error", "t", "m", "r", "Default"),),
    )
    out = consoles.console()
    render.render(report, out)
    colours = re.findall(r"\x1b\[[0-9;]*(?:3[0-9]|4[0-9]|9[0-7])[0-9;]*m", out.file.getvalue())
    assert not colours


def test_common_reexports_the_console():
    from meaning_transform.cli import common
    from meaning_transform.cli.console import console

    assert common.console is console


# --------------------------------------------------------------------------- through the CLI

CLI_RUNS = {
    "debug-loss": [
        "debug-loss",
        "--epochs",
        "2",
        "--kl-weight",
        "0.1",
        "--scenario",
        "no-grad-path",
    ],
    "anneal-demo": ["anneal-demo", "--epochs", "2", "--scenario", "imbalance"],
    "check-grads": ["check-grads", "--epochs", "2", "--scenario", "unused-params"],
    "debug-extended": [
        "debug-extended",
        "--epochs",
        "2",
        "--data-kind",
        "agent_states",
        "--samples",
        "64",
    ],
}


@pytest.fixture(scope="module")
def cli():
    """``mtx <command>`` output per (command, environment), each run once."""
    runner = CliRunner()
    cache: dict[tuple[str, str], str] = {}

    def run(command: str, mode: str) -> str:
        if (command, mode) not in cache:
            args = list(CLI_RUNS[command])
            env = {"COLUMNS": None, "NO_COLOR": None}
            if mode == "json":
                args.append("--json")
            elif mode == "80":
                env["COLUMNS"] = "80"
            elif mode == "piped-no-color":
                env["NO_COLOR"] = "1"
            result = runner.invoke(app, args, env=env)
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                raise result.exception
            assert result.exit_code in (0, 1), result.output
            cache[command, mode] = result.stdout
        return cache[command, mode]

    return run


@pytest.mark.parametrize("command", list(CLI_RUNS))
def test_cli_at_80_columns_piped_cuts_nothing(cli, command):
    text = cli(command, "80")
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    names = names_to_find(json.loads(cli(command, "json")))
    assert names
    missing = sorted(n for n in names if n not in text)
    assert not missing, missing


@pytest.mark.parametrize("command", list(CLI_RUNS))
def test_cli_piped_is_ascii_so_bytes_and_columns_agree(cli, command):
    """Box drawing, ‖ and Greek letters are one column but two or three bytes (and two
    columns on East Asian terminals): piped, each is one ASCII character instead."""
    text = cli(command, "80")
    assert text.isascii(), sorted({c for c in text if not c.isascii()})
    assert max(len(line.encode()) for line in text.splitlines()) <= 80


def test_the_ascii_map_is_one_character_for_one():
    from meaning_transform.cli.console import ASCII_FOR

    assert all(len(chr(k)) == 1 and len(v) == 1 and v.isascii() for k, v in ASCII_FOR.items())


@pytest.mark.parametrize("command", list(CLI_RUNS))
def test_cli_piped_without_columns_is_120_wide_and_colourless(cli, command):
    text = cli(command, "piped-no-color")
    assert "\x1b" not in text
    widths = [len(line) for line in text.splitlines()]
    assert max(widths) <= 120
    assert max(widths) > 80  # laid out for 120, not Rich's 80
    assert "…" not in text
    names = names_to_find(json.loads(cli(command, "json")))
    assert not sorted(n for n in names if n not in text)


# --------------------------------------------------------------------------- the layouts


def _wide_grid():
    names = ["alpha.beta.gamma.delta.epsilon.weight", "b.bias"]
    columns = ["param", *(f"stat{i}" for i in range(8)), render.Col("flags", "left", wrap=True)]
    rows = [
        [n, *(render.num(-1.0e-5 * (10 * r + i + 1)) for i in range(8)), "tiny bn-absorbed"]
        for r, n in enumerate(names)
    ]
    return render.grid(columns, rows, title="wide"), names, rows


@pytest.mark.parametrize("width", [200, 100, 60])
def test_a_wide_table_splits_repeating_its_key(width):
    table, names, rows = _wide_grid()
    text = render_text(table, width)
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= width
    parts = sum(1 for line in text.splitlines() if line.split()[:1] == ["param"])
    assert parts == (1 if width == 200 else parts)
    assert parts > 1 or width == 200
    for name in names:
        assert text.count(name) == parts  # the key column heads every part
    tokens = text.split()
    for cell in {c for row in rows for c in row[1:-1]}:
        assert tokens.count(cell) == 1  # every other cell once, whole
    for i in range(8):
        assert tokens.count(f"stat{i}") == 1


def test_a_table_too_wide_to_split_is_stacked():
    table, names, rows = _wide_grid()
    text = render_text(table, 40)  # the name fits, the name and one number do not
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 40
    for name in names:
        assert any(line.strip() == name for line in text.splitlines())  # a heading per row
    tokens = text.split()
    for cell in {c for row in rows for c in row[1:-1]}:
        assert tokens.count(cell) == 1


def test_a_data_path_with_markup_is_printed_literally(tmp_path):
    import numpy as np

    from meaning_transform.data import synthetic_agent_states

    path = tmp_path / "[bold]x[red]y.npy"  # a file name cannot hold the "/" of "[/]"
    np.save(path, synthetic_agent_states(64, seed=3).numpy())
    result = CliRunner().invoke(
        app, ["check-grads", "--epochs", "1", "--data", str(path)], env={"COLUMNS": "200"}
    )
    assert result.exit_code in (0, 1), result.output
    assert f"data {path} (64x10)" in result.stdout  # piped: ASCII
