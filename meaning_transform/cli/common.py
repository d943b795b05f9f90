"""What every command shares: option types, the error boundary, output.

Nothing here imports torch at module level: ``mtx --help`` must stay fast.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer

from meaning_transform.cli.boundary import (  # noqa: F401 (the commands call common.X)
    UsageProblem,
    fail,
    real_stdout,
    stdout_to_stderr,
    user_errors_exit,
)
from meaning_transform.cli.console import (  # noqa: F401 (moved; re-exported)
    PIPED_WIDTH,
    console,
)
from meaning_transform.constants import DEVICES, REDUCTIONS, SCENARIO_NAMES  # noqa: F401

# ---- limits on what the user may ask for (one place; the help texts quote them) ----

# torch.manual_seed and torch.Generator.manual_seed take 64 bits (signed or unsigned);
# numpy's generators refuse negative seeds, so the common range is [0, 2**64).
MAX_SEED = 2**64 - 1
# An epoch of the built-in setup takes ~50 ms with the doctor attached: 10,000 epochs is
# ~10 minutes per run, far past what a diagnosis needs; --epochs 1000000 would run for days.
MAX_EPOCHS = 10_000
# Larger than any batch a CPU diagnosis uses; 0 (full batch) covers bigger data sets.
MAX_BATCH_SIZE = 1_000_000
# debug-extended --samples, per data kind (5 kinds, two runs each): 100,000 rows is
# minutes; beyond that it is a typo, not a diagnosis (the default is 256).
MAX_SAMPLES = 100_000
# debug-loss --every: a table every K epochs; K beyond --epochs shows the first and last.
MAX_EVERY = MAX_EPOCHS
# anneal-demo --cycles: the cyclical schedule needs two epochs per cycle.
MAX_CYCLES = MAX_EPOCHS // 2


# ---- shell completion: the choices of an option, without importing torch ----


def completes(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    """A Typer ``autocompletion`` offering the ``choices`` that start with what was typed."""

    def complete(incomplete: str) -> list[str]:
        return [c for c in choices if c.startswith(incomplete)]

    return complete


# ---- option types (one place, so all four commands read the same) ----

Seed = Annotated[
    int,
    typer.Option(
        "--seed",
        help="Seed for the model, data, noise and shuffling: 0 to 2**64-1 "
        "(what torch and numpy both accept).",
    ),
]
Device = Annotated[
    str,
    typer.Option(
        "--device",
        help="auto|cpu|cuda|mps; auto falls back to cpu.",
        autocompletion=completes(DEVICES),
    ),
]
Epochs = Annotated[
    int, typer.Option("--epochs", help=f"Training epochs per run, 1 to {MAX_EPOCHS:,}.")
]
BatchSize = Annotated[
    int,
    typer.Option("--batch-size", help=f"Mini-batch size, 0 (full batch) to {MAX_BATCH_SIZE:,}."),
]
Lr = Annotated[float, typer.Option("--lr", help="Adam learning rate.")]
DataPath = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="Your data instead of synthetic agent states: .npy, .csv or .pt, 2-D numeric.",
        show_default=False,
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print only JSON on stdout.")]
Plot = Annotated[
    Path | None, typer.Option("--plot", help="Save a PNG figure to this path.", show_default=False)
]
FailOn = Annotated[
    str,
    typer.Option(
        "--fail-on",
        help="never|error|warning: exit 1 when a finding is at or above this.",
        autocompletion=completes(("never", "error", "warning")),
    ),
]
Force = Annotated[
    bool, typer.Option("--force", help="Overwrite an existing --plot or --output file.")
]
# The report formats (meaning_transform.formats.FORMATS, not imported here: mtx --help
# must stay fast; a test holds the two lists together).
FORMAT_CHOICES = "table|json|github|markdown|sarif|junit"
Format = Annotated[
    str | None,
    typer.Option(
        "--format",
        help=f"{FORMAT_CHOICES}: the report as tables (default), JSON, GitHub annotations, "
        "a Markdown summary, SARIF 2.1.0 or JUnit XML. Without --output it alone goes to "
        "stdout; --json is --format json.",
        autocompletion=completes(tuple(FORMAT_CHOICES.split("|"))),
        show_default=False,
    ),
]
Output = Annotated[
    Path | None,
    typer.Option(
        "--output",
        help="Write the report in --format to this file (atomically; an existing file only "
        "with --force); the tables still print.",
        show_default=False,
    ),
]


@dataclass(frozen=True)
class CommonOptions:
    seed: int
    device: str
    epochs: int
    batch_size: int
    lr: float
    data: Path | None
    json: bool
    plot: Path | None
    fail_on: str
    force: bool
    format: str | None = None  # --format as given (None: not given)
    output: Path | None = None

    def reporting(self, format: str | None, output: Path | None) -> CommonOptions:
        """These options with --format and --output (checked by :meth:`validate`)."""
        return replace(self, format=format, output=output)

    @property
    def report_format(self) -> str:
        """The format the report is written in: --format, json with --json, else table."""
        return "json" if self.json else (self.format or "table")

    @property
    def machine_stdout(self) -> bool:
        """Stdout carries only the report's machine format (nothing else may print)."""
        return self.report_format != "table" and self.output is None

    def validate(self) -> CommonOptions:
        from meaning_transform.diagnostics.findings import FAIL_ON
        from meaning_transform.formats import FORMATS

        if self.format is not None:
            choice("--format", self.format, FORMATS)
        if self.json and self.format not in (None, "json"):
            raise UsageProblem(
                f"--json means --format json; it cannot be used with --format {self.format}"
            )
        choice("--device", self.device, DEVICES)
        choice("--fail-on", self.fail_on, FAIL_ON)
        check_seed(self.seed)
        count_option("--epochs", self.epochs, 1, MAX_EPOCHS)
        if not 0 <= self.batch_size <= MAX_BATCH_SIZE:
            raise UsageProblem(
                f"--batch-size must be 0 (full batch) to {MAX_BATCH_SIZE:,}, "
                f"got {self.batch_size:,}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageProblem(f"--lr must be a positive number, got {self.lr}")
        if self.plot is not None:
            check_output_path("--plot", self.plot, self.force, suffix=".png")
        if self.output is not None:
            check_output_path("--output", self.output, self.force)
            if self.plot is not None and _same_file(self.plot, self.output):
                raise UsageProblem(f"--plot and --output name the same file {str(self.output)!r}")
        return self


def _same_file(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def choice(option: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise UsageProblem(f"{option} must be one of {'|'.join(allowed)}, got {value!r}")
    return value


def non_negative(option: str, value: float) -> float:
    if not (value >= 0 and math.isfinite(value)):
        raise UsageProblem(f"{option} must be a finite number >= 0, got {value}")
    return value


def count_option(option: str, value: int, minimum: int, maximum: int) -> int:
    """Refuse a count outside ``[minimum, maximum]``; the limits are the MAX_* above.

    Example: ``count_option("--samples", samples, 2, MAX_SAMPLES)``.
    """
    if value < minimum:
        raise UsageProblem(f"{option} must be at least {minimum}, got {value}")
    if value > maximum:
        raise UsageProblem(f"{option} must be at most {maximum:,}, got {value:,}")
    return value


def check_seed(seed: int) -> int:
    if not 0 <= seed <= MAX_SEED:
        raise UsageProblem(f"--seed must be between 0 and 2**64-1 ({MAX_SEED}), got {seed}")
    return seed


def check_batch_size(model: Any, batch_size: int, n_samples: int) -> None:
    """Refuse a --batch-size that gives ``model`` a training batch of one sample when it
    has batch norm: batch norm cannot normalise a single sample in training mode.

    ``batch_size`` is the option (0 = full batch), ``n_samples`` the rows trained on;
    batches are cut as ``training.train`` cuts them.
    """
    if min(batch_sizes(n_samples, batch_size), default=2) > 1:
        return
    from torch import nn

    norms = [
        name or type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    if norms:
        raise UsageProblem(
            f"--batch-size {batch_size} with {n_samples} rows gives a training batch of 1 "
            f"sample, and the model's batch norm ({norms[0]!r}) cannot train on one; "
            "use --batch-size 2 or more, or 0 for the full batch"
        )


def batch_sizes(n_samples: int, batch_size: int) -> list[int]:
    """The sizes of the batches ``training.train`` cuts per epoch (0 = full batch).

    As ``training._batches``: batches of ``batch_size``, and a last batch of one
    sample joins the one before it.
    """
    if n_samples < 1:
        return []
    size = n_samples if batch_size == 0 else min(batch_size, n_samples)
    sizes = [size] * (n_samples // size) + ([n_samples % size] if n_samples % size else [])
    if len(sizes) > 1 and sizes[-1] == 1:
        sizes[-2:] = [sizes[-2] + 1]
    return sizes


def check_output_path(option: str, path: Path, force: bool, suffix: str | None = None) -> None:
    """Refuse, before any work is done, whatever would make the final write fail.

    A wrong suffix (when ``suffix`` is given), a name too long for the file system, a
    path whose parent is a file, a missing directory or one this process cannot create
    files in (tried, not guessed: ``os.access`` says yes to root on a read-only file
    system), a directory or other non-file at the path, and an existing file without
    ``force``.
    """
    if suffix is not None and path.suffix.lower() != suffix:
        raise UsageProblem(f"{option} must end in {suffix}, got {str(path)!r}")
    found = _stat(option, path)
    if found is not None:
        if stat.S_ISDIR(found.st_mode):
            raise UsageProblem(f"{option} {str(path)!r} is a directory")
        if not stat.S_ISREG(found.st_mode):
            raise UsageProblem(f"{option} {str(path)!r} exists and is not a regular file")
    if (found is not None or os.path.islink(path)) and not force:
        raise UsageProblem(f"{option}: {str(path)!r} already exists (use --force to overwrite)")
    parent = path.parent
    found = _stat(option, parent)
    if found is None:
        raise UsageProblem(f"{option}: directory {str(parent)!r} does not exist")
    if not stat.S_ISDIR(found.st_mode):
        raise UsageProblem(f"{option}: {str(parent)!r} is not a directory")
    try:
        _new_temp_file(path).unlink()
    except OSError as e:
        raise UsageProblem(
            f"{option}: cannot create files in directory {str(parent)!r}: {_reason(e)}"
        ) from None


def _stat(option: str, path: Path) -> os.stat_result | None:
    """``os.stat(path)``, None when nothing is there; any other failure is the user's."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise UsageProblem(
            f"{option} {str(path)!r}: a parent of it is a file, not a directory"
        ) from None
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise UsageProblem(
                f"{option}: name too long for the file system: {_shortened(path)}"
            ) from None
        raise UsageProblem(f"{option}: cannot use {str(path)!r}: {_reason(e)}") from None
    except ValueError as e:  # an embedded NUL byte
        raise UsageProblem(f"{option}: cannot use {str(path)!r}: {e}") from None


def _shortened(path: Path, keep: int = 60) -> str:
    text = str(path)
    if len(text) <= keep:
        return text
    return f"{text[: keep - 20]}...{text[-16:]} ({len(os.fsencode(text))} bytes)"


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _new_temp_file(path: Path) -> Path:
    """Create an empty, uniquely named file next to ``path`` and return its path.

    Opened with mode 0o666, so the umask gives it (and the file it becomes) the usual
    permissions, unlike ``tempfile.mkstemp``'s 0600. The name stays short, so a
    ``path`` whose own name is near the length limit still gets a temporary file.
    """
    import secrets  # hashlib underneath: ~7 ms that --help does not need

    for _ in range(100):
        name = f".{path.stem[:48]}.{secrets.token_hex(4)}.tmp{path.suffix[:16]}"
        tmp = path.parent / name
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path.parent))


def write_atomically(path: Path, write: Callable[[Path], None], *, force: bool = False) -> None:
    """Write through a temporary file in the same directory, then move it into place.

    ``path`` appears whole or not at all. Without ``force`` the move is exclusive (a
    hard link, which fails if ``path`` exists): of two runs writing the same path at
    once, the first to finish wins and the other refuses with :class:`UsageProblem`.
    With ``force`` the file is replaced (``os.replace``). The new file gets the usual
    permissions (0o666 less the umask). An ``OSError`` (disk full, say) becomes a
    :class:`UsageProblem` naming ``path``; the temporary file is always removed.
    """
    try:
        tmp = _new_temp_file(path)
    except OSError as e:
        raise UsageProblem(f"cannot write {str(path)!r}: {_reason(e)}") from None
    try:
        write(tmp)
        if force:
            os.replace(tmp, path)
        else:
            _move_exclusively(tmp, path)
    except FileExistsError:
        raise UsageProblem(
            f"{str(path)!r} was created by something else while mtx ran; it was left as it "
            "is (use --force to overwrite)"
        ) from None
    except OSError as e:
        raise UsageProblem(f"cannot write {str(path)!r}: {_reason(e)}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _move_exclusively(tmp: Path, path: Path) -> None:
    """Give ``tmp`` the name ``path``, failing with FileExistsError if ``path`` exists."""
    try:
        os.link(tmp, path)  # atomic, and refuses an existing path
        return
    except FileExistsError:
        raise
    except (OSError, NotImplementedError):  # no hard links here (FAT, some network mounts)
        pass
    # Claim the name first, then replace the empty claim: readers may briefly see an
    # empty file, but never another run's file overwritten.
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    os.replace(tmp, path)


class ProgressBar:
    """What :func:`progress` yields: one bar whose phase and length can change.

    ``begin(description, total)`` starts a phase with a fresh count, clock and ETA
    (``total=None``: length unknown yet, the bar pulses); ``advance()``, or calling the
    bar itself (``on_epoch=bar`` works), counts one unit. A disabled bar ignores all.
    """

    def __init__(self, bar: Any = None, description: str = "", total: int | None = None):
        self._bar = bar
        self._task: Any = None
        if bar is not None:
            self._task = bar.add_task(description, total=total)

    def begin(self, description: str, total: int | None = None) -> None:
        if self._bar is not None:
            self._bar.remove_task(self._task)
            self._task = self._bar.add_task(description, total=total)

    def advance(self, units: float = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, units)

    def __call__(self, *_: object) -> None:
        self.advance()

    def close(self) -> None:
        """Take the bar off the screen now (before the report prints); idempotent."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@contextmanager
def progress(
    description: str = "starting", total: int | None = None, enabled: bool = True
) -> Iterator[ProgressBar]:
    """A transient progress bar on stderr, shown only when stderr is a terminal.

    Cheap to open before torch is imported (Rich is imported only when the bar will be
    shown), so a command can show it from its start::

        with common.progress("loading torch", enabled=not json) as bar:
            from meaning_transform.studies... import run  # imports torch
            bar.begin("training", total=epochs)
            run(..., on_epoch=bar)
    """
    if not (enabled and sys.stderr.isatty()):
        yield ProgressBar()
        return
    from rich.progress import (
        BarColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Count(ProgressColumn):
        """``3/16``; nothing while the length is unknown."""

        def render(self, task: Any) -> Text:
            if task.total is None:
                return Text("")
            return Text(f"{int(task.completed)}/{int(task.total)}")

    err = console(stderr=True)
    bar = Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        Count(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    with bar:
        yield ProgressBar(bar, description, total)


def train_config(opts: CommonOptions, **overrides: Any) -> Any:
    """The training configuration the common options describe."""
    from meaning_transform.training import TrainConfig

    return TrainConfig(
        epochs=opts.epochs,
        batch_size=opts.batch_size or None,
        lr=opts.lr,
        device=opts.device,
        seed=opts.seed,
        **overrides,
    )


def run_options(
    opts: CommonOptions, model: str | None, scenario: str, reduction: str = "mean"
) -> dict[str, Any]:
    """The fields of the report's ``config`` (a ``RunConfig``) the common options give."""
    return {
        "seed": opts.seed,
        "device": opts.device,
        "epochs": opts.epochs,
        "batch_size": opts.batch_size,
        "lr": opts.lr,
        "data": str(opts.data) if opts.data is not None else None,
        "model": model,
        "scenario": scenario,
        "reduction": reduction,
        "fail_on": opts.fail_on,
        "plot": str(opts.plot) if opts.plot is not None else None,
    }


def pipeline(
    opts: CommonOptions,
    dataset: Any,
    factory: Any,
    scenario: Any,
    reduction: str,
    on_epoch: Callable[[], None] | None,
    losses: Any = None,
    **train_overrides: Any,
) -> Any:
    """The run pipeline the options describe (see ``studies.pipeline.Pipeline``)."""
    from meaning_transform.studies.pipeline import Pipeline

    return Pipeline(
        dataset=dataset,
        train_config=train_config(opts, **train_overrides),
        reduction=reduction,
        model_factory=factory,
        scenario=scenario,
        on_epoch=on_epoch,
        loss_factory=losses,
    )


def finish(report: Any, opts: CommonOptions, user: UserCode | None = None) -> None:
    """Write the --plot figure and the --output file, print the report, exit with its code.

    Call it inside ``user_errors_exit``. Files are written first, so one that cannot be
    written ends in one error line with nothing on stdout. Stdout gets the tables, or,
    with a machine --format and no --output, that format alone. ``user`` locates the
    --model/--loss definitions the github and sarif formats point at. matplotlib is
    imported only with --plot.
    """
    fmt = opts.report_format
    text = None
    if fmt != "table":
        from meaning_transform.formats import render_format

        located = sources(user, opts.data) if fmt in ("github", "sarif") else None
        text = render_format(report, fmt, located)
    if opts.plot is not None:
        from meaning_transform import plots

        fig = plots.figure(report)
        write_atomically(opts.plot, lambda tmp: plots.save_png(fig, tmp), force=opts.force)
    if opts.output is not None:
        content = text if text is not None else table_text(report)
        write_atomically(
            opts.output,
            lambda tmp: _write_text(tmp, content),
            force=opts.force,
        )
    if opts.machine_stdout and text is not None:
        with real_stdout():
            sys.stdout.write(text)
            sys.stdout.flush()
    else:
        from meaning_transform.cli import render

        render.render(report)
        if opts.plot is not None:
            console().print(f"plot saved to {opts.plot}", markup=False)
        if opts.output is not None:
            console().print(f"{fmt} report saved to {opts.output}", markup=False)
    raise typer.Exit(report.exit_code)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def table_text(report: Any) -> str:
    """The report's tables as plain text (no colour), laid out as for a pipe."""
    import io

    from rich.console import Console

    from meaning_transform.cli import render
    from meaning_transform.cli.console import stdout_width

    buffer = io.StringIO()
    plain = Console(
        file=buffer,
        width=stdout_width() or PIPED_WIDTH,
        color_system=None,
        force_terminal=False,
        highlight=False,
        emoji=False,
    )
    render.render(report, console=plain)
    return buffer.getvalue()


def sources(user: UserCode | None, data: Path | None = None) -> Any:
    """Where the user's --model, --loss and --data are, for annotations that point at
    them (``formats.Sources``). Call it after the model and loss are loaded: their
    modules are looked up, never imported again."""
    from meaning_transform.formats import SourceLocation, Sources

    return Sources(
        model=definition(user.model) if user is not None and user.model else None,
        loss=definition(user.loss) if user is not None and user.loss else None,
        data=SourceLocation(shown_path(data)) if data is not None else None,
    )


def shown_path(path: str | Path) -> str:
    """``path`` relative to the working directory when inside it, else absolute;
    ``/``-separated (what GitHub annotations and SARIF expect)."""
    full = Path(os.path.abspath(path))
    try:
        return full.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return full.as_posix()


def definition(spec: str) -> Any:
    """The file and line where ``FILE.py:NAME`` or ``module:NAME`` (``Class.method``
    too) is defined (``formats.SourceLocation``); None when it cannot be told.

    A file is read, not imported again (its definitions found by name, the last one
    winning as at import); a module is looked up among those already imported.
    """
    from meaning_transform.formats import SourceLocation

    target, _, attr = spec.rpartition(":")
    if target.endswith(".py") or "/" in target or "\\" in target:
        if not os.path.isfile(target):
            return None
        return SourceLocation(shown_path(target), _line_in_file(Path(target), attr))
    module = sys.modules.get(target)
    return _module_definition(module, attr) if module is not None else None


def _line_in_file(path: Path, attr: str) -> int | None:
    """The line of the ``def``, ``class`` or assignment that binds ``attr`` (dotted:
    inside a class) at the top of the file at ``path``."""
    import ast

    try:
        body: list[ast.stmt] = ast.parse(path.read_bytes()).body
    except (OSError, SyntaxError, ValueError):
        return None
    line = None
    for part in attr.split("."):
        found = [node for node in body if part in _bound_names(node)]
        if not found:
            return None
        line = found[-1].lineno
        body = getattr(found[-1], "body", [])
    return line


def _bound_names(node: Any) -> set[str]:
    import ast

    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return {node.target.id}
    return set()


def _module_definition(module: Any, attr: str) -> Any:
    import inspect

    from meaning_transform.formats import SourceLocation

    module_file = getattr(module, "__file__", None)
    whole = SourceLocation(shown_path(module_file)) if isinstance(module_file, str) else None
    obj: Any = module
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
        obj = inspect.unwrap(obj)
        file = inspect.getsourcefile(obj)
        _, line = inspect.getsourcelines(obj)
    # no source to read (a C function, a lambda built at run time) or a module
    # __getattr__ that raises: the annotation points at the module's file alone
    except Exception:
        return whole
    if file is None:
        return whole
    return SourceLocation(shown_path(file), line if line > 0 else None)


ModelSpec = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Your VAE: FILE.py:NAME or package.module:NAME, a build function or an "
        "nn.Module class; forward(x) may return a dict (reconstruction/recon/x_hat, mu, "
        "log_var/logvar, z), a tuple or list such as (recon, mu, logvar), or an object.",
        show_default=False,
    ),
]
ScenarioName = Annotated[
    str,
    typer.Option(
        "--scenario",
        help="Inject a known fault into the built-in setup to see its finding, e.g. "
        "frozen-noise, no-grad-path, posterior-collapse (all listed in the README).",
        autocompletion=completes(SCENARIO_NAMES),
    ),
]


LossSpec = Annotated[
    str | None,
    typer.Option(
        "--loss",
        help="Your loss: FILE.py:NAME or package.module:NAME (a function, or a method as "
        "Class.method). Called as fn(output, x), by its parameter names (recon_x, x, mu, "
        "logvar, ...) or as fn(*output); returns a scalar, a dict of named terms (total "
        "under 'loss' or not) or a tuple. Replaces mtx's loss entirely.",
        show_default=False,
    ),
]
LossArgs = Annotated[
    list[str] | None,
    typer.Option(
        "--loss-arg",
        help="KEY=VALUE passed to your loss by keyword on every call, e.g. M_N=0.005 "
        "(repeatable; numbers are read as numbers).",
        show_default=False,
    ),
]
LossWeights = Annotated[
    list[str] | None,
    typer.Option(
        "--loss-weight",
        help="NAME=W: the weight your loss gives its term NAME in the total (repeatable); "
        "per-term checks weigh the terms with it, others count 1.",
        show_default=False,
    ),
]
BetaKwarg = Annotated[
    str | None,
    typer.Option(
        "--beta-kwarg",
        help="With --loss: the keyword of your loss that takes the KL weight (e.g. M_N "
        "or beta), which the β schedule sets each epoch.",
        show_default=False,
    ),
]
InputShape = Annotated[
    str | None,
    typer.Option(
        "--input-shape",
        help="C,H,W (or any shape): reshape each flat data row to it for your conv model; "
        "the reconstruction is compared in that shape.",
        show_default=False,
    ),
]


@dataclass(frozen=True)
class UserCode:
    """What the user brought: --model, --loss (and their options), as given."""

    model: str | None = None
    loss: str | None = None
    loss_args: tuple[str, ...] = ()
    input_shape: str | None = None
    beta_kwarg: str | None = None  # the user's loss keyword a β schedule drives
    loss_weights: tuple[str, ...] = ()

    @classmethod
    def of(
        cls,
        model: str | None,
        loss: str | None,
        loss_arg: list[str] | None,
        loss_weight: list[str] | None,
        input_shape: str | None,
        beta_kwarg: str | None = None,
    ) -> UserCode:
        """From the command's options as Typer gives them (repeatable ones may be None)."""
        return cls(
            model, loss, tuple(loss_arg or ()), input_shape, beta_kwarg, tuple(loss_weight or ())
        )


def loss_kwargs(items: tuple[str, ...], option: str = "--loss-arg") -> dict[str, object]:
    """``("M_N=0.005", "tag=x")`` -> ``{"M_N": 0.005, "tag": "x"}``."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageProblem(f"{option} expects KEY=VALUE with KEY a name, got {item!r}")
        value: object = text
        for kind in (int, float):
            try:
                value = kind(text)
                break
            except ValueError:
                continue
        out[key] = value
    return out


def model_and_scenario(user: UserCode, scenario_name: str) -> tuple[Any, Any]:
    """Resolve --model and --scenario (before any training) into (factory, scenario)."""
    from meaning_transform.scenarios import SCENARIOS

    model_spec = user.model
    if scenario_name not in SCENARIOS:
        raise UsageProblem(
            f"--scenario must be one of {'|'.join(SCENARIOS)}, got {scenario_name!r}"
        )
    scenario = None if scenario_name == "healthy" else SCENARIOS[scenario_name]
    if scenario is not None and (model_spec is not None or user.loss is not None):
        what = "--model" if model_spec is not None else "--loss"
        raise UsageProblem(
            f"--scenario injects faults into the built-in model and loss; drop {what}"
        )
    if user.input_shape is not None and model_spec is None:
        raise UsageProblem("--input-shape reshapes the data for your --model; give --model")
    if model_spec is None:
        # The built-in VAE is tiny: one intra-op thread is as fast alone and ~10x faster
        # when the other core is busy (OpenMP threads wait on each other).
        import torch

        torch.set_num_threads(1)
        return None, scenario
    from meaning_transform.adapters import parse_input_shape
    from meaning_transform.user_model import load_model_factory

    shape = None
    if user.input_shape is not None:
        try:
            shape = parse_input_shape(user.input_shape)
        except ValueError as e:
            raise UsageProblem(f"--input-shape: {e}") from e
    return load_model_factory(model_spec, shape), None


def loss_factory(user: UserCode) -> Any:
    """Resolve --loss (before any training) into a per-model loss factory, or None."""
    if user.loss is None:
        if user.loss_args or user.loss_weights:
            raise UsageProblem("--loss-arg/--loss-weight are for your --loss; give --loss")
        return None
    from meaning_transform.user_model import load_loss_factory

    weights = {}
    for name, value in loss_kwargs(user.loss_weights, "--loss-weight").items():
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UsageProblem(f"--loss-weight {name} must be a number, got {value!r}")
        weights[name] = float(value)
    return load_loss_factory(user.loss, loss_kwargs(user.loss_args), user.beta_kwarg, weights)


def checked_model(
    factory: Any,
    dataset: Any,
    opts: CommonOptions,
    spec: str | None,
    scenario: Any = None,
    losses: Any = None,
    nproc: int = 1,
) -> None:
    """Build the model once on the data: the user's is checked against the output
    contract, the user's loss on its output; either model must be able to train on the
    batches --batch-size gives (with ``nproc`` ranks: each rank's batches of its share)."""
    if factory is not None:
        from meaning_transform.user_model import check_model

        model = factory(dataset.n_features, opts.seed)
        check_model(model, dataset.tensor, f"--model {spec}")
    else:
        from meaning_transform.studies.setup import default_model

        model = default_model(dataset.n_features, opts.seed, dataset.tensor, scenario)
    rows = int(dataset.tensor.shape[0])
    if nproc > 1:
        rows, batch = -(-rows // nproc), opts.batch_size // nproc
        if opts.batch_size and not batch:
            raise UsageProblem(
                f"--batch-size {opts.batch_size} is split between the --nproc {nproc} "
                f"ranks: give at least {nproc} (one sample per rank), or 0 for full batches"
            )
        check_batch_size(model, batch, rows)
    else:
        check_batch_size(model, opts.batch_size, rows)
    if losses is not None:
        from meaning_transform.user_model import check_loss

        check_loss(losses(model), model, dataset.tensor)


def prepare(
    opts: CommonOptions,
    user: UserCode,
    scenario_name: str,
    semantic_weight: float | None = None,
    nproc: int = 1,
) -> tuple[Any, Any, Any, Any]:
    """Resolve --model/--loss/--scenario, load or make the data, check both on it.

    Returns ``(dataset, model_factory or None, scenario or None, loss_factory or None)``.
    An explicit ``semantic_weight`` > 0 needs the 10-feature agent-state layout. A
    distributed scenario needs ``nproc`` >= 2.
    """
    from meaning_transform.studies.setup import get_data

    factory, scenario = model_and_scenario(user, scenario_name)
    if scenario is not None and nproc < scenario.min_nproc:
        raise UsageProblem(
            f"--scenario {scenario_name} is a distributed fault: it needs "
            f"mtx check-grads --nproc {scenario.min_nproc} or more"
        )
    losses = loss_factory(user)
    dataset = get_data(opts.data, seed=opts.seed, scenario=scenario)
    checked_model(factory, dataset, opts, user.model, scenario, losses, nproc)
    if semantic_weight and not dataset.agent_layout:
        raise UsageProblem(
            f"--semantic-weight needs the agent-state layout (10 features per row), "
            f"the data has {dataset.n_features}; use --semantic-weight 0"
        )
    return dataset, factory, scenario, losses
