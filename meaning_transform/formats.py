"""The report in the formats CI reads: JSON, GitHub annotations, Markdown, SARIF, JUnit.

Pure functions of a report (and, for the formats that point into the user's code, of
the :class:`Sources` the CLI found for ``--model``/``--loss``/``--data``): the same
report gives the same text, byte for byte (no clock, no host name). The ``table``
format is Rich's and is drawn by ``cli/render.py``; everything else is here. No Rich,
no Typer, no torch.

    text = render_format(report, "sarif", Sources(model=SourceLocation("vae.py", 12)))
"""

from __future__ import annotations

import hashlib
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import singledispatch
from pathlib import PurePath
from typing import Any, Literal
from urllib.parse import quote

from meaning_transform.diagnostics.findings import SEVERITIES, Finding, NotChecked
from meaning_transform.studies.report import (
    AnnealReport,
    CheckGradsReport,
    DebugExtendedReport,
    DebugLossReport,
    EpochRow,
    Report,
    json_data,
    to_json,
)

FORMATS: tuple[str, ...] = ("table", "json", "github", "markdown", "sarif", "junit")

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"

# One line per check: what it looks at (SARIF's rule shortDescription). The findings
# themselves say what was wrong and what to do; tests hold this to every rule's code.
CHECK_DESCRIPTIONS: dict[str, str] = {
    "nonfinite-loss": "A step's loss or gradient norm is NaN or Inf.",
    "zero-loss": "A weighted loss component sits at or below its floor (no gradient).",
    "nonfinite-grad": "A parameter gradient holds NaN or Inf.",
    "nonfinite-input": "NaN or Inf reaches the model through the data.",
    "posterior-collapse": "The latent code carries next to no information about the input.",
    "frozen-noise": "The reparameterisation noise does not change between training steps.",
    "noise-scale": "The reparameterisation noise is not standard normal times exp(log_var / 2).",
    "no-grad-path": "A loss term contributes to the total but sends no gradient to the model.",
    "grad-dominance": "One loss term's gradient is far larger than another's.",
    "grad-conflict": "Two loss terms' gradients point against each other (PCGrad cosine < 0).",
    "vanishing-grad": "Gradients vanish, or shrink from the last layer to the first.",
    "exploding-grad": "Gradients grow from the last layer to the first, or over training.",
    "dying-relu": "Most units of a ReLU layer are never active on the data.",
    "unused-params": "Parameters that require a gradient never receive one.",
    "loss-plateau": "The total loss does not decrease over training.",
    "loss-oscillation": "The loss spikes, or the epoch total keeps rising.",
    "scale-imbalance": "One weighted loss term is orders of magnitude larger than another.",
    "terms-mismatch": "The loss's named terms, weighted, do not add up to its total.",
    "batch-dependent-weights": "Some terms are summed over the batch and others averaged.",
    "kl-formula": "The KL term does not match the analytic KL of the encoder's Gaussian.",
    "beta-schedule": "The declared β (KL-weight) schedule is not what the loss applied.",
    "collapse-onset": "The step at which the KL term collapsed during training.",
    # the rank checks of a distributed run (check-grads --nproc N)
    "rank-nonfinite": "NaN or Inf on some ranks only (a loss term or a local gradient).",
    "rank-desync": "A parameter differs between the DDP replicas.",
    "rank-buffer-desync": "A buffer (batch-norm statistics) differs between the ranks.",
    "rank-grad-disagree": "One rank's local gradient norm is far from the others'.",
    "rank-data-frozen": "A rank's batch never changes from step to step.",
    "rank-data-duplicate": "Every rank gets the same batch (no DistributedSampler).",
    "rank-data-repeats": "The batch order repeats every epoch (no sampler.set_epoch).",
}

About = Literal["model", "loss", "data"]
# What a finding is about, so an annotation can point at its definition: the model
# (gradients, noise, latent, activations, parameters), the loss (its terms, their
# gradients and weights) or the data. Codes not listed (the loss curve) point nowhere.
ABOUT: dict[str, About] = {
    "nonfinite-grad": "model",
    "vanishing-grad": "model",
    "exploding-grad": "model",
    "frozen-noise": "model",
    "noise-scale": "model",
    "posterior-collapse": "model",
    "collapse-onset": "model",
    "dying-relu": "model",
    "unused-params": "model",
    "nonfinite-loss": "loss",
    "zero-loss": "loss",
    "no-grad-path": "loss",
    "grad-dominance": "loss",
    "grad-conflict": "loss",
    "scale-imbalance": "loss",
    "terms-mismatch": "loss",
    "batch-dependent-weights": "loss",
    "kl-formula": "loss",
    "beta-schedule": "loss",
    "nonfinite-input": "data",
    "rank-desync": "model",
    "rank-buffer-desync": "model",
    "rank-grad-disagree": "loss",
    "rank-nonfinite": "data",
    "rank-data-frozen": "data",
    "rank-data-duplicate": "data",
    "rank-data-repeats": "data",
}

_GITHUB_COMMAND = {"error": "error", "warning": "warning", "info": "notice"}
_SARIF_LEVEL = {"error": "error", "warning": "warning", "info": "note"}


@dataclass(frozen=True)
class SourceLocation:
    """A file (relative to the working directory when inside it, ``/``-separated) and
    the 1-based line of the definition there (None: the file as a whole)."""

    path: str
    line: int | None = None


@dataclass(frozen=True)
class Sources:
    """Where the user's ``--model``, ``--loss`` and ``--data`` are (None: not given, or
    not found). Kept out of the report: the report is the run, this is the checkout."""

    model: SourceLocation | None = None
    loss: SourceLocation | None = None
    data: SourceLocation | None = None


def location(finding: Finding, sources: Sources) -> SourceLocation | None:
    """The user's definition ``finding`` is about, when the CLI knows where it is."""
    about = ABOUT.get(finding.code)
    return getattr(sources, about) if about is not None else None


def render_format(report: Report, fmt: str, sources: Sources | None = None) -> str:
    """``report`` as the text of ``fmt`` (any of :data:`FORMATS` but ``table``)."""
    writer = _WRITERS.get(fmt)
    if writer is None:
        if fmt == "table":
            raise ValueError("the table format is drawn by meaning_transform.cli.render")
        raise ValueError(f"format must be one of {'|'.join(FORMATS)}, got {fmt!r}")
    return writer(report, sources or Sources())


def check_codes(report: Report) -> list[str]:
    """Every check a run makes, in the order the rules run, then any other code the
    report names (a check added outside ``RULES``)."""
    from meaning_transform.diagnostics.rules import RULES

    codes = [r.__name__.replace("_", "-") for r in RULES]
    if getattr(report, "nproc", 1) > 1:  # check-grads --nproc N: the rank checks ran too
        from meaning_transform.diagnostics.distributed import CODES as RANK_CODES

        codes += RANK_CODES
    seen = set(codes)
    extra = ({f.code for f in report.findings} | {c.code for c in report.not_checked}) - seen
    return list(dict.fromkeys(codes)) + sorted(extra)


def _counts(findings: Sequence[Finding]) -> str:
    """``1 error, 2 warnings, 1 info`` (only the severities present); ``no findings``."""
    parts = []
    for severity in SEVERITIES:
        n = sum(f.severity == severity for f in findings)
        if n:
            plural = "s" if n > 1 and severity != "info" else ""
            parts.append(f"{n} {severity}{plural}")
    return ", ".join(parts) or "no findings"


# --------------------------------------------------------------------------- json


def _json(report: Report, sources: Sources) -> str:
    return to_json(report)


# --------------------------------------------------------------------------- github


def escape_data(text: str) -> str:
    """A workflow command's message: ``%``, CR and LF percent-encoded."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """A workflow command's property value: as a message, plus ``:`` and ``,``."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _github(report: Report, sources: Sources) -> str:
    """One ``::error``/``::warning``/``::notice`` line per finding, worst first."""
    lines = []
    for f in report.findings:
        props = []
        where = location(f, sources)
        if where is not None:
            props.append(f"file={escape_property(where.path)}")
            if where.line is not None:
                props.append(f"line={where.line}")
        props.append(f"title={escape_property(f'mtx {f.code}: {f.title}')}")
        text = f"{f.where}: {f.message}" if f.where else f.message
        text += f"\nRemedy: {f.remedy}"
        lines.append(f"::{_GITHUB_COMMAND[f.severity]} {','.join(props)}::{escape_data(text)}")
    return "".join(f"{line}\n" for line in lines)


# --------------------------------------------------------------------------- markdown


def _cell(text: object) -> str:
    """Text for one Markdown table cell: ``|`` escaped, line breaks as ``<br>``, HTML
    special characters as entities (user text is shown, never read as markup)."""
    value = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    value = value.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")
    return "<br>".join(part.strip() for part in value.splitlines()) or " "


def _row(cells: Iterable[object]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    return [_row(header), "|" + "---|" * len(header), *(_row(r) for r in rows)]


def _num(x: float | int | None) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, int):
        return str(x)
    if x != x or x in (float("inf"), float("-inf")):
        return str(x)  # nan, inf
    return f"{x:.4g}"


def _markdown(report: Report, sources: Sources) -> str:
    data = report.data
    worst = next((s for s in SEVERITIES if any(f.severity == s for f in report.findings)), None)
    verdict = "fails" if report.exit_code else "passes"
    lines = [
        f"## mtx {report.command}",
        "",
        f"**Verdict: {verdict}** (exit code {report.exit_code}, `--fail-on "
        f"{report.config.fail_on}`): {_counts(report.findings)}"
        + (f"; worst severity {worst}." if worst else "."),
        "",
        _cell(
            f"mtx {report.version} · data {data.source} ({data.n_samples} × {data.n_features}) "
            f"· device {report.device} · seed {report.config.seed} · {report.config.epochs} "
            f"epochs · batch {report.batch_size} · lr {_num(report.lr)} · "
            f"reduction {report.reduction} · scenario {report.scenario}"
        ),
        "",
        "### Findings",
        "",
    ]
    if report.findings:
        lines += _table(
            ("severity", "code", "where", "message", "remedy"),
            (
                (
                    f.severity,
                    f.code,
                    f.where,
                    f"{f.title}: {f.message}",
                    f.remedy,
                )
                for f in report.findings
            ),
        )
    else:
        lines.append("None.")
    if report.not_checked:
        lines += ["", "### Not checked", ""]
        lines += _table(
            ("code", "runs", "why"),
            ((c.code, ", ".join(c.runs), c.reason) for c in report.not_checked),
        )
    numbers = main_numbers(report)
    if numbers:
        lines += ["", "### Main numbers", "", *numbers]
    return "\n".join(lines) + "\n"


def _component_names(epochs: Iterable[EpochRow]) -> list[str]:
    return list(dict.fromkeys(n for e in epochs for n in e.components))


def _epoch_cells(epoch: EpochRow, names: Sequence[str]) -> list[str]:
    return [
        *(_num(epoch.components[n].raw) if n in epoch.components else "off" for n in names),
        _num(epoch.total),
        _num(epoch.grad_norm),
    ]


def _latent_cells(latent: Any) -> list[str]:
    if latent is None:
        return ["n/a", "n/a"]
    return [_num(latent.kl_total), f"{latent.active_units}/{latent.latent_dim}"]


@singledispatch
def main_numbers(report: Report) -> list[str]:
    """The Markdown lines of the report's headline numbers (none for an unknown report)."""
    return []


@main_numbers.register(DebugLossReport)
def _debug_loss_numbers(report: DebugLossReport) -> list[str]:
    names = _component_names(r.final for r in report.runs)
    return [
        "Final epoch, raw (unweighted) components:",
        "",
        *_table(
            ("run", "epoch", *names, "total", "grad norm", "KL nats (latent)", "active units"),
            (
                (
                    run.name,
                    run.final.epoch,
                    *_epoch_cells(run.final, names),
                    *_latent_cells(run.diagnosis.latent),
                )
                for run in report.runs
            ),
        ),
    ]


@main_numbers.register(AnnealReport)
def _anneal_numbers(report: AnnealReport) -> list[str]:
    if not report.epochs:
        return []
    names = _component_names(report.epochs)
    shown = [report.epochs[0], report.epochs[-1]] if len(report.epochs) > 1 else [report.epochs[0]]
    return [
        f"β schedule {report.schedule.type} from {_num(report.schedule.min_beta)} to "
        f"{_num(report.schedule.max_beta)}; first and final epoch, raw components:",
        "",
        *_table(
            ("epoch", "β", *names, "total", "grad norm"),
            ((e.epoch, _num(e.beta), *_epoch_cells(e, names)) for e in shown),
        ),
    ]


@main_numbers.register(CheckGradsReport)
def _check_grads_numbers(report: CheckGradsReport) -> list[str]:
    layers = (
        f"{report.first_layer} / {report.last_layer}"
        if report.first_layer is not None and report.last_layer is not None
        else "n/a"
    )
    return [
        "Last monitored step:",
        "",
        *_table(
            (
                "step",
                "total grad norm",
                "clip_grad_norm_",
                "first / last layer norm",
                "layers",
                "never got a gradient",
            ),
            [
                (
                    _num(report.last_step),
                    _num(report.total_norm),
                    _num(report.clip_grad_norm),
                    _num(report.first_last_ratio),
                    layers,
                    ", ".join(report.never_received) or "none",
                )
            ],
        ),
    ]


@main_numbers.register(DebugExtendedReport)
def _debug_extended_numbers(report: DebugExtendedReport) -> list[str]:
    finals = [(k, k.records[-1]) for k in report.kinds if k.records]
    names = _component_names(e for _, e in finals)
    return [
        "Final epoch of the main run per data kind, raw components:",
        "",
        *_table(
            ("kind", "epoch", *names, "total", "grad norm", "KL nats (latent)", "active units"),
            (
                (k.kind, e.epoch, *_epoch_cells(e, names), *_latent_cells(k.diagnosis.latent))
                for k, e in finals
            ),
        ),
    ]


# --------------------------------------------------------------------------- sarif


def _uri(path: str) -> str:
    """A SARIF artifact URI: a relative path as a URI reference, an absolute one as
    ``file://``."""
    pure = PurePath(path)
    if pure.is_absolute():
        return pure.as_uri()
    return quote(pure.as_posix(), safe="/")


def _sarif_location(where: SourceLocation) -> dict[str, Any]:
    physical: dict[str, Any] = {"artifactLocation": {"uri": _uri(where.path)}}
    if where.line is not None:
        physical["region"] = {"startLine": where.line}
    return {"physicalLocation": physical}


def fingerprint(report: Report, finding: Finding) -> str:
    """Stable across runs of the same command: the command, the code and the place."""
    key = "\0".join((report.command, finding.code, finding.where))
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _sarif(report: Report, sources: Sources) -> str:
    """SARIF 2.1.0: one rule per finding code, one result per finding, the checks that
    could not run as notifications. A finding about no file in particular points at the
    user's model (else loss, else data) when given: code scanning needs a location."""
    fallback = sources.model or sources.loss or sources.data
    codes = list(dict.fromkeys(f.code for f in report.findings))
    rules = []
    for code in codes:
        of_code = [f for f in report.findings if f.code == code]
        first = next((f for f in of_code if not f.consequence_of), of_code[0])
        short = CHECK_DESCRIPTIONS.get(code, first.title)
        rules.append(
            {
                "id": code,
                "name": "".join(part.capitalize() for part in code.split("-")),
                "shortDescription": {"text": short},
                "fullDescription": {"text": f"{short} Found here: {first.title}."},
                "help": {"text": first.remedy},
                "defaultConfiguration": {"level": _SARIF_LEVEL[first.severity]},
                "properties": {"tags": ["vae", ABOUT.get(code, "training")]},
            }
        )
    results = []
    for f in report.findings:
        result: dict[str, Any] = {
            "ruleId": f.code,
            "ruleIndex": codes.index(f.code),
            "level": _SARIF_LEVEL[f.severity],
            "message": {"text": (f"{f.where}: " if f.where else "") + f"{f.title}: {f.message}"},
            "partialFingerprints": {"mtxFinding/v1": fingerprint(report, f)},
            "properties": {
                "severity": f.severity,
                "where": f.where,
                "runs": list(f.runs),
                "consequenceOf": f.consequence_of,
                "evidence": json_data(f.evidence),
                "remedy": f.remedy,
            },
        }
        where = location(f, sources) or fallback
        if where is not None:
            result["locations"] = [_sarif_location(where)]
        results.append(result)
    notifications = [
        {
            "level": "note",
            "message": {"text": f"{c.code} not checked: {c.reason}" + _runs_text(c)},
            "descriptor": {"id": c.code},
        }
        for c in report.not_checked
    ]
    log = {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "mtx",
                        "fullName": f"mtx {report.command}",
                        "version": report.version,
                        "semanticVersion": report.version,
                        "rules": rules,
                    }
                },
                "automationDetails": {"id": f"mtx/{report.command}/"},
                "invocations": [
                    {
                        "executionSuccessful": True,
                        "exitCode": report.exit_code,
                        "toolExecutionNotifications": notifications,
                    }
                ],
                "results": results,
                "properties": {"config": json_data(report.config)},
            }
        ],
    }
    return json.dumps(log, indent=2, allow_nan=False) + "\n"


def _runs_text(item: NotChecked) -> str:
    return f" (runs: {', '.join(item.runs)})" if item.runs else ""


# --------------------------------------------------------------------------- junit

# Characters XML 1.0 cannot hold at all (control characters but tab, LF, CR).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml_text(text: str) -> str:
    return _NOT_XML.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _finding_text(f: Finding) -> str:
    where = f"{f.where}: " if f.where else ""
    return f"[{f.severity}] {where}{f.title}: {f.message}\nRemedy: {f.remedy}"


def _junit(report: Report, sources: Sources) -> str:
    """One test case per check: failed (a warning or error finding), skipped (not
    checked), else passed; an info finding passes with its message in system-out."""
    suite_name = f"mtx {report.command}"
    cases = []
    failures = skipped = 0
    for code in check_codes(report):
        found = [f for f in report.findings if f.code == code]
        missing = [c for c in report.not_checked if c.code == code]
        case = ET.Element("testcase", name=code, classname=f"mtx.{report.command}", time="0")
        loud = [f for f in found if f.severity != "info"]
        out = [_finding_text(f) for f in found if f.severity == "info"]
        if loud:
            failures += 1
            failure = ET.SubElement(
                case, "failure", message=_xml_text(loud[0].title), type=loud[0].severity
            )
            failure.text = _xml_text("\n\n".join(_finding_text(f) for f in loud))
        elif missing and not found:
            skipped += 1
            reason = "; ".join(c.reason + _runs_text(c) for c in missing)
            ET.SubElement(case, "skipped", message=_xml_text(f"not checked: {reason}"))
        out += [f"not checked: {c.reason}{_runs_text(c)}" for c in missing if found]
        if out:
            ET.SubElement(case, "system-out").text = _xml_text("\n\n".join(out))
        cases.append(case)
    totals = {
        "tests": str(len(cases)),
        "failures": str(failures),
        "errors": "0",
        "skipped": str(skipped),
        "time": "0",
    }
    root = ET.Element("testsuites", {"name": "mtx", **totals})
    suite = ET.SubElement(root, "testsuite", {"name": suite_name, **totals})
    properties = ET.SubElement(suite, "properties")
    config = json_data(report.config)
    for name, value in (
        ("command", report.command),
        ("version", report.version),
        ("exit_code", report.exit_code),
        *((f"config.{k}", v) for k, v in config.items()),
    ):
        text = value if isinstance(value, str) else json.dumps(value)
        ET.SubElement(properties, "property", name=name, value=_xml_text(text))
    suite.extend(cases)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, "unicode") + "\n"


_WRITERS: dict[str, Callable[[Report, Sources], str]] = {
    "json": _json,
    "github": _github,
    "markdown": _markdown,
    "sarif": _sarif,
    "junit": _junit,
}
