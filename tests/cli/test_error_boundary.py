"""The error boundary: whatever the user types or supplies ends in one ``error:`` line on
stderr and exit 2 (nothing on stdout, no traceback, no file written), or in a normal run."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import typer

from meaning_transform.cli import common
from meaning_transform.cli.boundary import (
    UsageProblem,
    one_line,
    real_stdout,
    user_errors_exit,
)

FAST = ("--epochs", "1")

MODELS = """
import sys
import warnings

import torch
from torch import nn

CALLS = [0]


class TinyVAE(nn.Module):
    def __init__(self, input_dim=10, batch_norm=False):
        super().__init__()
        self.enc = nn.Linear(input_dim, 8)
        self.norm = nn.BatchNorm1d(8) if batch_norm else nn.Identity()
        self.mu = nn.Linear(8, 2)
        self.log_var = nn.Linear(8, 2)
        self.dec = nn.Linear(2, input_dim)

    def forward(self, x):
        h = torch.relu(self.norm(self.enc(x)))
        mu, log_var = self.mu(h), self.log_var(h)
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
        return {"reconstruction": self.dec(z), "mu": mu, "log_var": log_var, "z": z}


class RaisesOnThirdCall(TinyVAE):
    def forward(self, x):
        CALLS[0] += 1
        if CALLS[0] == 3:
            raise RuntimeError("boom on call 3\\nsecond line")
        return super().forward(x)


class ExitsOnSecondCall(TinyVAE):
    def forward(self, x):
        CALLS[0] += 1
        if CALLS[0] == 2:
            sys.exit(0)
        return super().forward(x)


class Prints(TinyVAE):
    def forward(self, x):
        print("hello from forward")
        return super().forward(x)


class NoParameters(nn.Module):
    def forward(self, x):
        return {"reconstruction": x, "mu": x[:, :2], "log_var": x[:, :2]}


class Fails(TinyVAE):
    def forward(self, x):
        raise ValueError("cannot [bold]do[/] this :smile: [/]")


def build(input_dim=10):
    return TinyVAE(input_dim)


def build_batch_norm(input_dim=10):
    return TinyVAE(input_dim, batch_norm=True)


def build_raises_third(input_dim=10):
    return RaisesOnThirdCall(input_dim)


def build_exits_in_training(input_dim=10):
    return ExitsOnSecondCall(input_dim)


def build_prints(input_dim=10):
    return Prints(input_dim)


def build_exit_0():
    sys.exit(0)


def build_exit_3():
    sys.exit(3)


def build_no_parameters():
    return NoParameters()


def build_frozen(input_dim=10):
    return TinyVAE(input_dim).requires_grad_(False)


def build_on_meta(input_dim=10):
    return TinyVAE(input_dim).to("meta")


def build_fails(input_dim=10):
    return Fails(input_dim)


def build_warns_then_fails(input_dim=10):
    warnings.warn("a noisy library warning", UserWarning)
    return Fails(input_dim)


def build_touches(input_dim=10):
    open(__file__ + ".built", "w").close()
    return TinyVAE(input_dim)
"""


@pytest.fixture
def models(tmp_path: Path) -> Path:
    path = tmp_path / "models.py"
    path.write_text(textwrap.dedent(MODELS))
    return path


@pytest.fixture
def rows3(tmp_path: Path) -> Path:
    path = tmp_path / "rows3.npy"
    np.save(path, np.random.default_rng(0).random((3, 10)))
    return path


@pytest.fixture
def error_line(assert_bad_input):
    """``assert_bad_input``, and the line starts with ``error:``; returns the line."""

    def check(run, *words: str) -> str:
        assert_bad_input(run, *words)
        line = run.stderr.strip()
        assert line.startswith("error: "), line
        return line

    return check


# ---- 1. user text is printed literally ----


@pytest.mark.parametrize("name", ["[/]x.npy", "[bold]x.npy", "x:smile:.npy", "[red]a[/red].npy"])
def test_markup_in_a_path_is_printed_literally(mtx, tmp_path, name, error_line):
    missing = tmp_path / name
    line = error_line(mtx("check-grads", *FAST, "--data", str(missing)), "not found")
    assert line == f"error: data file not found: {missing}"


def test_markup_in_a_plot_dir_and_a_user_exception_is_literal(mtx, models, tmp_path, error_line):
    plot = tmp_path / "[bold]" / "x.png"
    error_line(mtx("check-grads", *FAST, "--plot", str(plot)), "[bold]", "does not exist")
    line = error_line(mtx("check-grads", *FAST, "--model", f"{models}:build_fails"))
    assert "cannot [bold]do[/] this :smile: [/]" in line


def test_control_characters_are_escaped_and_line_breaks_flattened(mtx, tmp_path, error_line):
    line = error_line(mtx("check-grads", *FAST, "--data", str(tmp_path / "a\x1b[31mb\nc.npy")))
    assert "\x1b" not in line and "\\x1b[31m" in line and "b c.npy" in line
    assert one_line("a\nb\r\nc\u2028d\te") == "a b  c d e"
    assert one_line("bell\x07 del\x7f") == "bell\\x07 del\\x7f"


# ---- 2. seeds torch accepts ----


@pytest.mark.parametrize("seed", ["-1", str(2**64), str(10**30)])
def test_seed_outside_0_to_2_pow_64_is_refused(mtx, seed, error_line):
    error_line(mtx("check-grads", *FAST, "--seed", seed), "--seed", "2**64-1", seed)


def test_largest_seed_runs(mtx):
    run = mtx("check-grads", *FAST, "--json", "--seed", str(2**64 - 1))
    assert run.exit_code in (0, 1), run.stderr
    assert run.json["config"]["seed"] == 2**64 - 1


# ---- 3. counts that would run for hours ----


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--epochs", common.MAX_EPOCHS + 1),
        ("--epochs", 10**12),
        ("--batch-size", common.MAX_BATCH_SIZE + 1),
    ],
)
def test_counts_above_their_limit_are_refused(mtx, option, value, error_line):
    error_line(mtx("check-grads", option, str(value)), option, f"{value:,}")


def _options(**changes):
    base = dict(
        seed=0,
        device="cpu",
        epochs=1,
        batch_size=0,
        lr=1e-3,
        data=None,
        json=True,
        plot=None,
        fail_on="error",
        force=False,
    )
    return common.CommonOptions(**{**base, **changes})


def test_common_limits_at_their_edges():
    for fine in (
        dict(epochs=common.MAX_EPOCHS),
        dict(batch_size=common.MAX_BATCH_SIZE),
        dict(seed=0),
        dict(seed=common.MAX_SEED),
        dict(batch_size=0),
    ):
        _options(**fine).validate()
    for bad in (
        dict(epochs=common.MAX_EPOCHS + 1),
        dict(epochs=0),
        dict(batch_size=common.MAX_BATCH_SIZE + 1),
        dict(batch_size=-1),
        dict(seed=-1),
        dict(seed=common.MAX_SEED + 1),
    ):
        with pytest.raises(UsageProblem):
            _options(**bad).validate()


@pytest.mark.parametrize(
    ("option", "minimum", "maximum"),
    [
        ("--samples", 2, common.MAX_SAMPLES),
        ("--every", 0, common.MAX_EVERY),
        ("--cycles", 1, common.MAX_CYCLES),
    ],
)
def test_count_option_at_its_edges(option, minimum, maximum):
    assert common.count_option(option, minimum, minimum, maximum) == minimum
    assert common.count_option(option, maximum, minimum, maximum) == maximum
    with pytest.raises(UsageProblem, match=f"{option} must be at least {minimum}, got"):
        common.count_option(option, minimum - 1, minimum, maximum)
    with pytest.raises(UsageProblem, match=f"{option} must be at most {maximum:,}, got"):
        common.count_option(option, maximum + 1, minimum, maximum)


def test_cyclical_limit_leaves_two_epochs_per_cycle():
    assert 2 * common.MAX_CYCLES <= common.MAX_EPOCHS


# ---- 4. batch norm on a batch of one sample ----


def test_batch_sizes_are_the_ones_training_cuts():
    import torch

    from meaning_transform.training import _batches

    for n in range(1, 12):
        for batch_size in range(0, 13):
            cut = _batches(n, batch_size or n, torch.Generator().manual_seed(0))
            assert sorted(common.batch_sizes(n, batch_size)) == sorted(b.numel() for b in cut)


def test_check_batch_size_refuses_one_sample_batches_only_with_batch_norm():
    from torch import nn

    with_norm = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    without = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(UsageProblem, match=r"--batch-size 1 .*batch norm \('1'\).*2 or more"):
        common.check_batch_size(with_norm, 1, 3)
    common.check_batch_size(with_norm, 1, 2)  # [1, 1] -> the last joins the first: [2]
    common.check_batch_size(with_norm, 2, 3)  # [2, 1] -> [3]
    common.check_batch_size(with_norm, 0, 2)
    common.check_batch_size(without, 1, 100)
    with pytest.raises(UsageProblem):
        common.check_batch_size(with_norm, 0, 1)  # the full batch is one sample


def test_user_model_with_batch_norm_and_batch_size_1(mtx, models, rows3, error_line):
    run = mtx(
        "check-grads",
        *FAST,
        "--batch-size",
        "1",
        "--data",
        str(rows3),
        "--model",
        f"{models}:build_batch_norm",
    )
    error_line(run, "batch norm", "--batch-size 2")


def test_built_in_model_with_batch_size_1(mtx, rows3, error_line):
    run = mtx("check-grads", *FAST, "--batch-size", "1", "--data", str(rows3))
    error_line(run, "batch norm", "--batch-size 2")


# ---- 5. names longer than the OS allows ----


def test_names_too_long_for_the_file_system(mtx, tmp_path, error_line):
    long = "a" * 300
    error_line(mtx("check-grads", *FAST, "--data", str(tmp_path / f"{long}.npy")), "too long")
    error_line(
        mtx("check-grads", *FAST, "--plot", str(tmp_path / f"{long}.png")), "--plot", "too long"
    )
    error_line(mtx("check-grads", *FAST, "--model", f"{tmp_path / long}.py:build"), "--model")


# ---- 6. --plot is checked before any work ----


@pytest.fixture
def unwritable_dir(tmp_path: Path):
    """A directory this process cannot create files in (root ignores permission bits)."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        yield locked
        locked.chmod(0o755)
        return
    sysfs = Path("/sys")
    try:
        os.close(os.open(sysfs / ".mtx-probe", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except OSError:
        yield sysfs
        return
    pytest.skip("no directory here that root cannot write")


def test_plot_problems_are_refused_before_training(
    mtx, models, tmp_path, unwritable_dir, error_line
):
    existing = tmp_path / "exists.png"
    existing.write_bytes(b"keep")
    a_file = tmp_path / "file.txt"
    a_file.write_text("")
    (tmp_path / "dir.png").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    spec = f"{models}:build_touches"
    cases = [
        (unwritable_dir / "x.png", ("cannot create files",)),
        (tmp_path / ("b" * 300 + ".png"), ("too long",)),
        (existing, ("already exists", "--force")),
        (tmp_path / "dir.png", ("is a directory",)),
        (a_file / "x.png", ("is a file",)),
        (tmp_path / "missing" / "x.png", ("does not exist",)),
    ]
    for plot, words in cases:
        error_line(
            mtx("check-grads", *FAST, "--model", spec, "--plot", str(plot)), "--plot", *words
        )
    assert not Path(f"{models}.built").exists()  # refused before the model was even built
    assert existing.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ---- 7. write_atomically: exclusive, whole, usual permissions ----


def test_written_file_gets_the_usual_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        common.write_atomically(tmp_path / "a.png", lambda tmp: tmp.write_bytes(b"png"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.png").stat().st_mode) == 0o640
    old = os.umask(0o022)
    try:
        common.write_atomically(tmp_path / "b.png", lambda tmp: tmp.write_bytes(b"png"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "b.png").stat().st_mode) == 0o644


def test_two_writers_of_one_path_one_wins_the_other_refuses(tmp_path):
    path = tmp_path / "plot.png"
    both_written = threading.Barrier(2)
    outcomes: dict[str, str] = {}

    def writer(content: str) -> None:
        def write(tmp: Path) -> None:
            tmp.write_text(content * 1000)
            both_written.wait(timeout=10)  # both temp files exist before either is placed

        try:
            common.write_atomically(path, write)
            outcomes[content] = "won"
        except UsageProblem as e:
            outcomes[content] = str(e)

    threads = [threading.Thread(target=writer, args=(c,)) for c in "AB"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [c for c, outcome in outcomes.items() if outcome == "won"]
    assert len(winners) == 1, outcomes
    loser = next(outcome for outcome in outcomes.values() if outcome != "won")
    assert "created by something else" in loser and "--force" in loser
    assert path.read_text() == winners[0] * 1000  # whole, and the winner's
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]  # no temp file left


def test_a_path_that_appears_meanwhile_is_kept_unless_forced(tmp_path):
    path = tmp_path / "plot.png"

    def someone_else_writes_first(tmp: Path) -> None:
        path.write_bytes(b"theirs")
        tmp.write_bytes(b"ours")

    with pytest.raises(UsageProblem, match="created by something else"):
        common.write_atomically(path, someone_else_writes_first)
    assert path.read_bytes() == b"theirs"
    common.write_atomically(path, lambda tmp: tmp.write_bytes(b"ours"), force=True)
    assert path.read_bytes() == b"ours"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_a_failing_write_leaves_nothing(tmp_path):
    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("renderer died")

    with pytest.raises(RuntimeError):
        common.write_atomically(tmp_path / "plot.png", broken)
    assert list(tmp_path.iterdir()) == []


# ---- 8-10. user code that exits, raises later, or has nothing to train ----


def test_sys_exit_at_import_is_one_line(mtx, tmp_path, error_line):
    path = tmp_path / "exits.py"
    path.write_text("import sys\nsys.exit(0)\n")
    error_line(mtx("check-grads", *FAST, "--model", f"{path}:build"), "importing", "sys.exit(0)")


@pytest.mark.parametrize(
    ("build", "words"),
    [
        ("build_exit_0", ("build_exit_0", "sys.exit(0)")),
        ("build_exit_3", ("build_exit_3", "sys.exit(3)")),
        ("build_exits_in_training", ("forward", "sys.exit(0)")),
        ("build_no_parameters", ("no parameters",)),
        ("build_frozen", ("requires a gradient",)),
        ("build_on_meta", ("'meta' device",)),
    ],
)
def test_user_code_that_exits_or_cannot_train(mtx, models, build, words, error_line):
    error_line(mtx("check-grads", *FAST, "--model", f"{models}:{build}"), *words)


def test_user_forward_raising_mid_training_is_one_line(mtx, models, error_line):
    spec = f"{models}:build_raises_third"
    line = error_line(
        mtx("check-grads", *FAST, "--model", spec),
        spec,
        "forward",
        "RuntimeError",
        "boom on call 3",
    )
    assert "second line" not in line


def test_guarded_model_keeps_its_parameter_names_and_deep_copies_cleanly(models):
    import copy

    import torch

    from meaning_transform.user_model import UserCodeError, load_model_factory

    model = load_model_factory(f"{models}:build_raises_third")(10, 0)
    assert [n for n, _ in model.named_parameters()][:2] == ["enc.weight", "enc.bias"]
    twin = copy.deepcopy(model)
    assert twin.forward.__self__ is twin
    x = torch.rand(4, 10)
    model(x), twin(x)
    with pytest.raises(UserCodeError, match="forward raised RuntimeError: boom on call 3$"):
        model(x)


# ---- 11. stdout stays pure JSON ----


def test_stdout_inside_the_json_boundary_goes_to_stderr(capsys):
    with pytest.raises(typer.Exit) as exit_info:
        with user_errors_exit(json=True):
            print("user noise")
            with real_stdout():
                print('{"ok": true}')
            raise typer.Exit(0)
    assert exit_info.value.exit_code == 0
    out, err = capsys.readouterr()
    assert out == '{"ok": true}\n' and err == "user noise\n"


def test_stdout_to_stderr_also_moves_file_descriptor_1():
    script = textwrap.dedent("""
        import os, sys
        from meaning_transform.cli.boundary import real_stdout, stdout_to_stderr
        with stdout_to_stderr(True):
            print("python print")
            os.write(1, b"raw fd 1\\n")
            os.system("echo child process")
            with real_stdout():
                print("the document")
            print("more noise")
        print("after")
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "the document\nafter\n"
    for noise in ("python print", "raw fd 1", "child process", "more noise"):
        assert noise in proc.stderr


def test_a_printing_user_model_keeps_json_pure(mtx, models):
    import json

    run = mtx("check-grads", *FAST, "--json", "--model", f"{models}:build_prints")
    assert run.exit_code in (0, 1), run.stderr
    assert json.loads(run.stdout)["command"] == "check-grads"
    assert "hello from forward" in run.stderr


# ---- 12. .pt files that do not hold numbers ----


def test_meta_tensor_file_is_one_line(mtx, tmp_path, error_line):
    import torch

    path = tmp_path / "meta.pt"
    torch.save(torch.empty(3, 10, device="meta"), path)
    error_line(mtx("check-grads", *FAST, "--data", str(path)), "meta")


# ---- 13. warnings around an error line ----


@pytest.fixture
def warnings_to_stderr():
    """Undo pytest's warning capture: warnings print on (the CliRunner's) sys.stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: (
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
        )
        yield


def test_a_warning_before_an_error_is_dropped(mtx, models, warnings_to_stderr, error_line):
    error_line(
        mtx("check-grads", *FAST, "--model", f"{models}:build_warns_then_fails"), "forward failed"
    )


def test_warnings_of_a_normal_run_are_replayed():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with user_errors_exit():
            warnings.warn("worth seeing", UserWarning, stacklevel=1)
            assert seen == []  # held back while the command runs
    assert [str(w.message) for w in seen] == ["worth seeing"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(typer.Exit):
            with user_errors_exit():
                warnings.warn("noise", UserWarning, stacklevel=1)
                raise UsageProblem("bad input")
    assert seen == []


# ---- 14. the progress bar ----


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_shows_phases_and_an_eta_on_a_terminal(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setenv("COLUMNS", "100")
    with common.progress("loading torch") as bar:
        bar.begin("training", total=4)
        for _ in range(4):
            bar()  # what on_epoch=bar calls
        bar._bar.refresh()  # draw now, not on the 10 Hz timer
        task = bar._bar.tasks[-1]
        assert (task.description, task.total, task.completed) == ("training", 4, 4)
    shown = terminal.getvalue()
    assert "training" in shown and "ETA" in shown and "4/4" in shown


def test_progress_bar_off_the_terminal_is_silent_and_needs_no_rich(capsys):
    with common.progress("loading torch", enabled=True) as bar:  # pytest's stderr: no tty
        bar.begin("training", total=3)
        bar.advance()
        bar(object())
    with common.progress("training", total=3, enabled=False) as bar:
        bar.advance()
    assert capsys.readouterr() == ("", "")
