"""--format and --output through the CLI: each format on a run with an error, a warning and
an info finding, read back with a real parser; the file gets the format, the terminal the
tables; a bad --format or --output ends in one line and exit 2 before any training."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest

from meaning_transform.cli import common
from meaning_transform.formats import ABOUT, FORMATS
from tests.test_formats import SCHEMA, parse_github

# A model with a head it never calls, and a loss with a hard threshold (no gradient), a KL
# summed over the batch beside averaged terms and a term that is always 0: no-grad-path
# (error), batch-dependent-weights (warning) and their consequences at info (unused-params,
# zero-loss, ...), in 3 epochs of 4 steps.
USER_CODE = """\
from pathlib import Path

import torch
from torch import nn

Path("imported.flag").touch()  # the run got as far as loading the user's code


class TinyVAE(nn.Module):
    def __init__(self, input_dim=10):
        super().__init__()
        self.enc = nn.Linear(input_dim, 8)
        self.mu = nn.Linear(8, 2)
        self.log_var = nn.Linear(8, 2)
        self.dec = nn.Linear(2, input_dim)
        self.unused = nn.Linear(8, 8)

    def forward(self, x):
        print("hello from forward")  # must not reach stdout under a machine format
        h = torch.relu(self.enc(x))
        mu, log_var = self.mu(h), self.log_var(h)
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
        return {"reconstruction": self.dec(z), "mu": mu, "log_var": log_var, "z": z}


def loss(recon_x, x, mu, log_var):
    recon = ((recon_x - x) ** 2).mean()
    kl = -0.5 * torch.sum(1 + log_var - mu**2 - log_var.exp())  # summed over the batch
    hard = (recon_x > 0.5).float().mean()
    zero = 0.0 * recon
    return {"loss": recon + kl + hard + zero, "recon": recon, "kl": kl, "hard": hard, "zero": zero}
"""
LINES = USER_CODE.splitlines()
MODEL_LINE = LINES.index("class TinyVAE(nn.Module):") + 1
LOSS_LINE = LINES.index("def loss(recon_x, x, mu, log_var):") + 1
RUN = ("debug-loss", "--model", "models/vae.py:TinyVAE", "--loss", "models/vae.py:loss")
FAST = ("--epochs", "3")


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A checkout with the user's code in models/vae.py; the working directory."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "vae.py").write_text(USER_CODE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_help_lists_the_formats_of_the_formatters():
    assert common.FORMAT_CHOICES == "|".join(FORMATS)


@pytest.fixture
def findings(mtx, project):
    """The findings of the run, from --json: all three severities are there."""
    run = mtx(*RUN, *FAST, "--json")
    assert run.exit_code == 1, run.stderr
    found = run.json["findings"]
    assert {f["severity"] for f in found} == {"error", "warning", "info"}
    return found


def test_json_format_is_json(mtx, findings):
    run = mtx(*RUN, *FAST, "--format", "json")
    assert run.exit_code == 1
    assert run.json["findings"] == findings
    assert "hello from forward" in run.stderr  # the user's print went to stderr


def test_github_annotations_point_at_the_model_and_the_loss(mtx, findings):
    run = mtx(*RUN, *FAST, "--format", "github")
    assert run.exit_code == 1
    commands = parse_github(run.stdout)  # every line of stdout is a workflow command
    assert len(commands) == len(findings)
    level = {"error": "error", "warning": "warning", "info": "notice"}
    assert [c[0] for c in commands] == [level[f["severity"]] for f in findings]
    for (_, props, message), finding in zip(commands, findings):
        assert props["title"] == f"mtx {finding['code']}: {finding['title']}"
        assert message.startswith(f"{finding['where']}: {finding['message']}")
        line = MODEL_LINE if ABOUT[finding["code"]] == "model" else LOSS_LINE
        assert (props["file"], props["line"]) == ("models/vae.py", str(line)), finding["code"]


def test_markdown_summary(mtx, findings):
    run = mtx(*RUN, *FAST, "--format", "markdown")
    assert run.exit_code == 1
    lines = run.stdout.splitlines()
    assert lines[0] == "## mtx debug-loss"
    assert lines[2].startswith("**Verdict: fails** (exit code 1, `--fail-on error`)")
    rows = [ln for ln in lines if ln.startswith(("| error ", "| warning ", "| info "))]
    assert [r.split(" | ")[1] for r in rows] == [f["code"] for f in findings]
    assert "### Main numbers" in run.stdout and "| loss | 2 |" in run.stdout


def test_sarif_is_valid_and_locates_the_user_code(mtx, findings):
    run = mtx(*RUN, *FAST, "--format", "sarif")
    assert run.exit_code == 1
    log = json.loads(run.stdout)
    jsonschema.Draft4Validator(SCHEMA).validate(log)
    results = log["runs"][0]["results"]
    assert [(r["ruleId"], r["level"]) for r in results] == [
        (f["code"], {"info": "note"}.get(f["severity"], f["severity"])) for f in findings
    ]
    for result in results:
        (place,) = result["locations"]
        assert place["physicalLocation"]["artifactLocation"] == {"uri": "models/vae.py"}
    again = json.loads(mtx(*RUN, *FAST, "--format", "sarif").stdout)
    assert again == log  # same seed, same SARIF: fingerprints are stable


def test_junit_one_case_per_check(mtx, findings):
    run = mtx(*RUN, *FAST, "--format", "junit")
    assert run.exit_code == 1
    suite = ET.fromstring(run.stdout).find("testsuite")
    assert suite is not None
    failed = {c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None}
    assert failed == {f["code"] for f in findings if f["severity"] != "info"}
    skipped = {c.get("name") for c in suite.iter("testcase") if c.find("skipped") is not None}
    assert skipped and not skipped & {f["code"] for f in findings}
    assert suite.get("failures") == str(len(failed)) and suite.get("skipped") == str(len(skipped))


@pytest.mark.parametrize("fmt", ["github", "markdown", "sarif", "junit", "json", "table"])
def test_output_writes_the_format_and_the_tables_still_print(mtx, project, fmt):
    path = project / f"report.{fmt}"
    run = mtx(*RUN, *FAST, "--format", fmt, "--output", str(path))
    assert run.exit_code == 1, run.stderr
    text = path.read_text(encoding="utf-8")
    assert run.stdout.rstrip().endswith(f"{fmt} report saved to {path}")
    assert "Findings" in run.stdout and "no-grad-path" in run.stdout  # the tables
    assert text != run.stdout
    if fmt == "json":
        assert json.loads(text)["findings"][0]["code"] == "no-grad-path"
    elif fmt == "sarif":
        jsonschema.Draft4Validator(SCHEMA).validate(json.loads(text))
    elif fmt == "junit":
        assert ET.fromstring(text).tag == "testsuites"
    elif fmt == "github":
        assert parse_github(text)[0][1]["file"] == "models/vae.py"
    elif fmt == "markdown":
        assert text.startswith("## mtx debug-loss\n")
    else:  # the tables, as plain text
        assert "\x1b[" not in text and "no-grad-path" in text
    assert [p.name for p in project.iterdir() if p.name.startswith(".")] == []  # no temp file


def test_output_refuses_an_existing_file_unless_forced(mtx, project, assert_bad_input):
    path = project / "report.sarif"
    path.write_text("keep me")
    assert_bad_input(mtx(*RUN, *FAST, "--format", "sarif", "--output", str(path)), "--force")
    assert path.read_text() == "keep me"
    assert not (project / "imported.flag").exists()  # refused before the model was loaded
    run = mtx(*RUN, *FAST, "--format", "sarif", "--output", str(path), "--force")
    assert run.exit_code == 1
    jsonschema.Draft4Validator(SCHEMA).validate(json.loads(path.read_text()))


def refused_before_training(run, project: Path, assert_bad_input, *words: str) -> None:
    assert_bad_input(run, *words)
    assert not (project / "imported.flag").exists()  # the user's code was never loaded


@pytest.mark.parametrize(
    "args, words",
    [
        (("--format", "xml"), ("--format must be one of", "table|json|github", "'xml'")),
        (("--format", "JSON"), ("--format must be one of",)),
        (("--json", "--format", "sarif"), ("--json means --format json",)),
    ],
)
def test_bad_format_is_one_line_before_training(mtx, project, assert_bad_input, args, words):
    run = mtx(*RUN, *FAST, *args)
    refused_before_training(run, project, assert_bad_input, *words)


def test_json_with_format_json_is_fine(mtx, findings):
    assert mtx(*RUN, *FAST, "--json", "--format", "json").json["findings"] == findings


@pytest.mark.parametrize(
    "where, words",
    [
        ("missing/report.sarif", ("--output", "does not exist")),
        (".", ("--output", "is a directory")),
        ("models/vae.py/report.sarif", ("--output", "a parent of it is a file")),
    ],
)
def test_unwritable_output_is_one_line_before_training(
    mtx, project, assert_bad_input, where, words
):
    run = mtx(*RUN, *FAST, "--format", "sarif", "--output", where)
    refused_before_training(run, project, assert_bad_input, *words)
    assert sorted(p.name for p in project.iterdir()) == ["models"]  # nothing written


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_directory_is_refused(mtx, project, assert_bad_input):
    locked = project / "locked"
    locked.mkdir(mode=0o555)
    run = mtx(*RUN, *FAST, "--format", "junit", "--output", str(locked / "r.xml"))
    refused_before_training(run, project, assert_bad_input, "cannot create files")


def test_plot_and_output_cannot_be_one_file(mtx, project, assert_bad_input):
    run = mtx(*RUN, *FAST, "--plot", "r.png", "--output", "r.png")
    refused_before_training(run, project, assert_bad_input, "same file")


@pytest.mark.parametrize(
    "command",
    [
        ("check-grads", "--epochs", "1"),
        ("anneal-demo", "--epochs", "2"),
        ("debug-extended", "--data-kind", "normal", "--samples", "64", "--epochs", "1"),
    ],
)
def test_every_command_takes_format_and_output(mtx, tmp_path, command):
    path = tmp_path / "report.xml"
    run = mtx(*command, "--format", "junit", "--output", str(path))
    assert run.exit_code == 0, run.stderr
    suite = ET.fromstring(path.read_text()).find("testsuite")
    assert suite is not None and suite.get("name") == f"mtx {command[0]}"
    assert run.stdout.rstrip().endswith(f"junit report saved to {path}")
    markdown = mtx(*command, "--format", "markdown")
    assert markdown.stdout.startswith(f"## mtx {command[0]}\n")
    assert "**Verdict: passes** (exit code 0" in markdown.stdout
