"""``mtx check-grads --nproc 2``: real 2-rank gloo runs through the installed ``mtx``.

Each run starts 2 spawned ranks (3 processes import torch): one run per scenario, with
every assertion about it, the tables and the JSON from the same run (``--output``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

MTX = [sys.executable, "-m", "meaning_transform"]
TIMEOUT_S = 180


def mtx(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "80", "NO_COLOR": "1"}
    return subprocess.run(
        [*MTX, "check-grads", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
        check=False,
    )


def run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """One 2-rank run: the tables on stdout, the JSON report in a file."""
    out = tmp_path / "report.json"
    proc = mtx("--nproc", "2", "--format", "json", "--output", str(out), *args)
    assert proc.returncode in (0, 1), proc.stderr
    return proc, json.loads(out.read_text())


def rank_rows(stdout: str) -> list[list[str]]:
    """The Ranks table's rows, split into cells, checked to sit under its header."""
    lines = stdout.splitlines()
    head = next(
        i for i, line in enumerate(lines) if line.split()[:3] == ["rank", "steps", "samples"]
    )
    header = lines[head]
    rows = []
    for line in lines[head + 2 :]:
        if not line.strip():
            break
        cells = line.split()
        # right-aligned numbers end where their header ends
        assert line.rstrip().endswith(cells[-1]) and header.rstrip().endswith("findings")
        assert line.index(cells[1]) + len(cells[1]) == header.index("steps") + len("steps")
        rows.append(cells)
    return rows


def codes(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["code"]: f for f in report["findings"]}


def test_healthy_two_ranks(tmp_path):
    proc, report = run(tmp_path)
    assert proc.returncode == 0
    assert all(len(line.encode()) <= 80 for line in proc.stdout.splitlines())
    assert [r[0] for r in rank_rows(proc.stdout)] == ["0", "1"]
    bad = [(f["code"], f["severity"]) for f in report["findings"] if f["severity"] != "info"]
    assert bad == []
    assert report["command"] == "check-grads" and report["nproc"] == 2
    assert report["backend"] == "gloo" and report["config"]["nproc"] == 2
    assert report["batch_size"] == 64  # --batch-size 128 split between 2 ranks
    ranks = report["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["steps"] == 12 and r["samples"] == 768 for r in ranks)
    assert all(r["median_local_grad_norm"] > 0 and r["skipped_steps"] == 0 for r in ranks)
    assert ranks[0]["final_loss"] != ranks[1]["final_loss"]  # each rank's own batch
    assert len(report["steps"]) == 12 and report["parameters"]


def test_rank_nan_names_rank_1(tmp_path):
    proc, report = run(tmp_path, "--scenario", "rank-nan")
    assert proc.returncode == 1
    found = codes(report)["rank-nonfinite"]
    assert found["severity"] == "error"
    assert found["where"].startswith("rank 1") and "rank 1" in found["message"]
    skipped = [r["skipped_steps"] for r in report["ranks"]]
    assert skipped == [1, 1]  # the all-reduce spread it: every rank skipped the update


def test_rank_desync_names_the_parameter_and_rank(tmp_path):
    proc, report = run(tmp_path, "--scenario", "rank-desync")
    assert proc.returncode == 1
    found = codes(report)["rank-desync"]
    assert found["where"] == "rank 1: decoder.fc_out.weight"
    assert "decoder.fc_out.weight" in found["message"] and "rank 1" in found["message"]
    assert len(rank_rows(proc.stdout)) == 2
    assert "rank-desync" in proc.stdout


def test_unsynced_bn_buffers_drift(tmp_path):
    proc, report = run(tmp_path, "--scenario", "unsynced-bn", "--fail-on", "warning")
    assert proc.returncode == 1
    found = codes(report)["rank-buffer-desync"]
    assert found["severity"] == "warning" and "running" in found["where"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--nproc", "0"], "--nproc must be at least 1"),
        (["--nproc", "99"], "--nproc must be at most 8"),
        (["--scenario", "rank-nan"], "needs mtx check-grads --nproc 2"),
        (["--nproc", "2", "--batch-size", "1"], "split between the --nproc 2 ranks"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, says):
    proc = mtx(*args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_public_vae_with_its_own_loss_is_healthy_on_two_ranks(tmp_path: Path) -> None:
    """pytorch/examples' VAE and loss (tests/public_vaes.py, as written there) on
    scikit-learn's bundled digits in [0, 1]: no warning on two ranks, as on one."""
    import numpy as np
    from sklearn.datasets import load_digits

    data = tmp_path / "digits.npy"
    np.save(data, (load_digits().data / 16.0).astype(np.float32)[:512])
    public = Path(__file__).resolve().parents[1] / "public_vaes.py"
    proc, report = run(
        tmp_path,
        "--model", f"{public}:VAE", "--loss", f"{public}:loss_function",
        "--data", str(data), "--epochs", "3", "--batch-size", "64",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:]
    bad = [(f["code"], f["severity"]) for f in report["findings"] if f["severity"] != "info"]
    assert bad == []
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    assert [p["name"] for p in report["parameters"]][:2] == ["fc1.weight", "fc1.bias"]
