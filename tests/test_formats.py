"""The CI formats, on a hand-built report with an error, a warning, an info finding and a
check that could not run; each output is read back with a real parser."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest

from meaning_transform.diagnostics.findings import Finding, NotChecked, Verdict
from meaning_transform.diagnostics.rules import RULES
from meaning_transform.diagnostics.vae_checks import VAE_RULES
from meaning_transform.formats import (
    ABOUT,
    CHECK_DESCRIPTIONS,
    FORMATS,
    SourceLocation,
    Sources,
    check_codes,
    escape_data,
    escape_property,
    fingerprint,
    render_format,
)
from meaning_transform.studies.report import (
    ComponentRow,
    DataInfo,
    DebugLossConfig,
    DebugLossReport,
    Diagnosis,
    EpochRow,
    LossRun,
    json_data,
)

SCHEMA = json.loads((Path(__file__).parent / "data" / "sarif-schema-2.1.0.json").read_text())

# Text that needs every escape: GitHub's %, CR, LF, and the property separators : and ,
TRICKY = "50% of kl: 0, then\r\nrecon | 1 <b>"

ERROR = Finding(
    "no-grad-path",
    "error",
    "hard has a value but no gradient",
    f"the gradient norm is 0; {TRICKY}",
    "Replace hard thresholds with a differentiable form.",
    "Default: hard",
    {"value": 0.1, "ratio": float("nan")},
    ("Default",),
)
WARNING = Finding(
    "unused-params",
    "warning",
    "Parameters never receive a gradient",
    "2 parameter(s) require grad but got none: head.weight, head.bias",
    "Call the head in forward, or set requires_grad=False.",
    "Default",
    runs=("Default",),
)
INFO = Finding(
    "loss-plateau",
    "info",
    "Loss is not decreasing (consequence of no-grad-path)",
    "the total fell by 0.1%",
    "Fix no-grad-path first.",
    "Default",
    runs=("Default",),
    consequence_of="no-grad-path",
)
SKIPPED = NotChecked("posterior-collapse", "latent health was not measured", ("Default",))

MODEL = SourceLocation("models/vae.py", 12)
LOSS = SourceLocation("models/loss.py", 30)
SOURCES = Sources(model=MODEL, loss=LOSS)


def epoch(n: int, total: float) -> EpochRow:
    components = {
        "reconstruction": ComponentRow(total * 0.8, 1.0, total * 0.8, 0.8, ()),
        "kl": ComponentRow(total * 0.2, 1.0, total * 0.2, 0.2, ()),
    }
    return EpochRow(n, 1.0, components, total, (), 0.5, 0.7, 4, 0, ())


def report(findings: tuple[Finding, ...] = (ERROR, WARNING, INFO)) -> DebugLossReport:
    final = epoch(1, 1.25)
    diagnosis = Diagnosis(
        None,
        None,
        Verdict("posterior-collapse", "not-judged", SKIPPED.reason),
        tuple(f.code for f in findings),
        (SKIPPED,),
    )
    run = LossRun(
        "Default", {"kl": 1.0}, {"kl": 1.0}, {"kl": "mean"}, (final,), final, 2.5, diagnosis
    )
    return DebugLossReport(
        command="debug-loss",
        version="0.1.0",
        config=DebugLossConfig(epochs=2, device="cpu"),
        device="cpu",
        data=DataInfo("synthetic:agent_states", "agent_states", 64, 10),
        batch_size=32,
        lr=1e-3,
        reduction="mean",
        scenario="healthy",
        semantic_applicable=True,
        findings=findings,
        not_checked=(SKIPPED,),
        reported_epochs=(1,),
        runs=(run,),
        summary=(),
    )


# ---- the lists the formats read -------------------------------------------------------


def test_every_rule_has_a_description_and_no_description_is_stale():
    from meaning_transform.diagnostics.distributed import CODES as RANK_CODES

    # the rules' codes and the rank checks' (check-grads --nproc)
    codes = {r.__name__.replace("_", "-") for r in [*RULES, *VAE_RULES]} | set(RANK_CODES)
    assert set(CHECK_DESCRIPTIONS) == codes
    assert set(ABOUT) <= codes
    assert all(text.strip() and "\n" not in text for text in CHECK_DESCRIPTIONS.values())


def test_unknown_formats_and_the_table_are_refused():
    assert FORMATS[0] == "table"
    with pytest.raises(ValueError, match="cli.render"):
        render_format(report(), "table")
    with pytest.raises(ValueError, match="table|json"):
        render_format(report(), "xml")


def test_json_is_the_report():
    assert json.loads(render_format(report(), "json")) == json_data(report())


# ---- github ----------------------------------------------------------------------------

COMMAND = re.compile(r"^::(?P<command>error|warning|notice)(?: (?P<props>[^:]*))?::(?P<msg>.*)$")


def unescape(text: str) -> str:
    for escaped, char in (("%0D", "\r"), ("%0A", "\n"), ("%3A", ":"), ("%2C", ","), ("%25", "%")):
        text = text.replace(escaped, char)
    return text


def parse_github(text: str) -> list[tuple[str, dict[str, str], str]]:
    """Each line as (command, properties, message), by the workflow-command syntax."""
    commands = []
    for line in text.splitlines():
        match = COMMAND.match(line)
        assert match, line
        props = {}
        for item in (match["props"] or "").split(","):
            if item:
                key, sep, value = item.partition("=")
                assert sep and key in ("file", "line", "title"), item
                props[key] = unescape(value)
        commands.append((match["command"], props, unescape(match["msg"])))
    return commands


def test_escaping_round_trips():
    assert escape_data(TRICKY) == "50%25 of kl: 0, then%0D%0Arecon | 1 <b>"
    assert escape_property(TRICKY) == "50%25 of kl%3A 0%2C then%0D%0Arecon | 1 <b>"
    assert unescape(escape_property(TRICKY)) == TRICKY == unescape(escape_data(TRICKY))


def test_github_one_command_per_finding_pointing_at_the_user_code():
    text = render_format(report(), "github", SOURCES)
    assert text.count("\n") == 3 and text.endswith("\n")
    (error, error_props, error_msg), warning, notice = parse_github(text)
    assert [error, warning[0], notice[0]] == ["error", "warning", "notice"]
    # no-grad-path is about the loss, unused-params about the model, the plateau neither
    assert error_props == {
        "file": "models/loss.py",
        "line": "30",
        "title": f"mtx no-grad-path: {ERROR.title}",
    }
    assert warning[1] == {
        "file": "models/vae.py",
        "line": "12",
        "title": f"mtx unused-params: {WARNING.title}",
    }
    assert notice[1] == {"title": f"mtx loss-plateau: {INFO.title}"}
    assert error_msg == f"{ERROR.where}: {ERROR.message}\nRemedy: {ERROR.remedy}"
    assert TRICKY in error_msg


def test_github_without_sources_points_nowhere_and_no_findings_print_nothing():
    for _, props, _ in parse_github(render_format(report(), "github")):
        assert set(props) == {"title"}
    assert render_format(report(findings=()), "github") == ""


# ---- markdown --------------------------------------------------------------------------


def cells(line: str) -> list[str]:
    """A Markdown table row's cells, split on the pipes that are not escaped."""
    assert line.startswith("| ") and line.endswith(" |"), line
    return [c.strip() for c in re.split(r"(?<!\\)\|", line[2:-2])]


def section(text: str, title: str) -> list[str]:
    body = text.split(f"### {title}\n\n")[1].split("\n\n")[0]
    return body.splitlines()


def test_markdown_verdict_findings_not_checked_and_numbers():
    text = render_format(report(), "markdown")
    lines = text.splitlines()
    assert lines[0] == "## mtx debug-loss"
    assert lines[2] == (
        "**Verdict: fails** (exit code 1, `--fail-on error`): 1 error, 1 warning, 1 info; "
        "worst severity error."
    )
    header, rule, *rows = section(text, "Findings")
    assert cells(header) == ["severity", "code", "where", "message", "remedy"]
    assert rule == "|---|---|---|---|---|"
    assert [cells(r)[:3] for r in rows] == [
        ["error", "no-grad-path", "Default: hard"],
        ["warning", "unused-params", "Default"],
        ["info", "loss-plateau", "Default"],
    ]
    message = cells(rows[0])[3]  # the pipe is escaped, the line break a <br>, HTML shown
    assert message.endswith("50% of kl: 0, then<br>recon \\| 1 &lt;b&gt;")
    assert cells(rows[0])[4] == ERROR.remedy
    assert [cells(r) for r in section(text, "Not checked")[2:]] == [
        ["posterior-collapse", "Default", SKIPPED.reason]
    ]
    numbers = text.split("### Main numbers\n\n")[1].split("\n\n")[1].splitlines()
    assert cells(numbers[0]) == [
        "run",
        "epoch",
        "reconstruction",
        "kl",
        "total",
        "grad norm",
        "KL nats (latent)",
        "active units",
    ]
    assert cells(numbers[2]) == ["Default", "1", "1", "0.25", "1.25", "0.5", "n/a", "n/a"]


def test_markdown_of_a_clean_run_passes():
    text = render_format(report(findings=()), "markdown")
    assert "**Verdict: passes** (exit code 0, `--fail-on error`): no findings." in text
    assert section(text, "Findings") == ["None."]


# ---- sarif -----------------------------------------------------------------------------


def sarif(sources: Sources | None = SOURCES, findings=(ERROR, WARNING, INFO)) -> dict:
    log = json.loads(render_format(report(findings), "sarif", sources))
    jsonschema.Draft4Validator(SCHEMA).validate(log)
    return log


def test_sarif_is_valid_with_one_rule_per_code():
    run = sarif()["runs"][0]
    rules = run["tool"]["driver"]["rules"]
    assert [r["id"] for r in rules] == ["no-grad-path", "unused-params", "loss-plateau"]
    for rule, finding in zip(rules, (ERROR, WARNING, INFO)):
        assert rule["shortDescription"]["text"] == CHECK_DESCRIPTIONS[finding.code]
        assert finding.title in rule["fullDescription"]["text"]
        assert rule["help"]["text"] == finding.remedy
    results = run["results"]
    assert [(r["ruleId"], r["ruleIndex"], r["level"]) for r in results] == [
        ("no-grad-path", 0, "error"),
        ("unused-params", 1, "warning"),
        ("loss-plateau", 2, "note"),
    ]
    assert TRICKY in results[0]["message"]["text"]
    assert results[0]["properties"]["evidence"] == {"value": 0.1, "ratio": None}
    notes = run["invocations"][0]["toolExecutionNotifications"]
    assert [(n["descriptor"]["id"], n["level"]) for n in notes] == [("posterior-collapse", "note")]


def test_sarif_locations_and_fingerprints():
    results = sarif()["runs"][0]["results"]
    places = [r["locations"][0]["physicalLocation"] for r in results]
    assert places[0] == {"artifactLocation": {"uri": "models/loss.py"}, "region": {"startLine": 30}}
    assert places[1] == {"artifactLocation": {"uri": "models/vae.py"}, "region": {"startLine": 12}}
    assert places[2]["artifactLocation"]["uri"] == "models/vae.py"  # about no file: the model
    prints = [r["partialFingerprints"]["mtxFinding/v1"] for r in results]
    assert len(set(prints)) == 3
    assert (
        prints[0]
        == fingerprint(report(), ERROR)
        == sarif()["runs"][0]["results"][0]["partialFingerprints"]["mtxFinding/v1"]
    )
    moved = Finding(**{**ERROR.as_dict(), "message": "another message", "runs": ("Default",)})
    assert fingerprint(report(), moved) == prints[0]  # the numbers may change, the id not


def test_sarif_without_sources_or_findings_is_still_valid():
    assert all("locations" not in r for r in sarif(sources=None)["runs"][0]["results"])
    odd = Sources(data=SourceLocation("my data/a b.npy"), model=SourceLocation("/abs/v.py", 1))
    uris = [
        r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        for r in sarif(sources=odd)["runs"][0]["results"]
    ]
    assert uris == ["file:///abs/v.py"] * 3
    only_data = sarif(sources=Sources(data=SourceLocation("my data/a b.npy")))
    uri = only_data["runs"][0]["results"][0]["locations"][0]["physicalLocation"]
    assert uri["artifactLocation"]["uri"] == "my%20data/a%20b.npy"
    assert sarif(findings=())["runs"][0]["results"] == []


# ---- junit -----------------------------------------------------------------------------


def test_junit_one_test_case_per_check():
    root = ET.fromstring(render_format(report(), "junit"))
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert list(cases) == check_codes(report())
    from meaning_transform.diagnostics.distributed import CODES as RANK_CODES

    # the rank checks run only with check-grads --nproc N (tests/cli/test_nproc.py)
    assert set(CHECK_DESCRIPTIONS) - set(RANK_CODES) <= set(cases)
    failed = {n for n, c in cases.items() if c.find("failure") is not None}
    skipped = {n for n, c in cases.items() if c.find("skipped") is not None}
    assert failed == {"no-grad-path", "unused-params"}
    assert skipped == {"posterior-collapse"}
    for attrs in (root.attrib, suite.attrib):
        assert attrs["tests"] == str(len(cases))
        assert (attrs["failures"], attrs["skipped"], attrs["errors"]) == ("2", "1", "0")
    failure = cases["no-grad-path"].find("failure")
    assert failure is not None
    assert failure.get("type") == "error" and failure.get("message") == ERROR.title
    assert TRICKY.replace("\r\n", "\n") in (failure.text or "")
    assert ERROR.remedy in (failure.text or "")
    plateau = cases["loss-plateau"]  # info: passes, with its message in system-out
    assert plateau.find("failure") is None and plateau.find("skipped") is None
    assert INFO.message in (plateau.findtext("system-out") or "")
    assert SKIPPED.reason in (cases["posterior-collapse"].find("skipped").get("message") or "")
    assert list(cases["zero-loss"]) == []  # checked, nothing found: passed


def test_junit_holds_text_xml_cannot():
    odd = Finding("new-check", "warning", "bell \x07 here", "nul \x00 too", "fix", "Default")
    root = ET.fromstring(render_format(report(findings=(odd,)), "junit"))
    case = root.find("testsuite/testcase[@name='new-check']")  # a code outside RULES is kept
    assert case is not None
    failure = case.find("failure")
    assert failure is not None and failure.get("message") == "bell \\x07 here"
