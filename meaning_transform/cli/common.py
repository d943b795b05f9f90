"""What every command shares: option types, the error boundary, output.

Nothing here imports torch at module level: ``mtx --help`` must stay fast.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console

DEVICES = ("auto", "cpu", "cuda", "mps")
FAIL_ON = ("never", "error", "warning")

_consoles: dict[str, Console] = {}


def console(stderr: bool = False) -> Console:
    """The shared Rich console for stdout (or stderr), built on first use.

    Built lazily because importing Rich costs about 25 ms that ``mtx --help`` does not need.
    Piped stdout gets 120 columns rather than Rich's 80, so tables stay readable in CI logs.
    """
    key = "err" if stderr else "out"
    if key not in _consoles:
        from rich.console import Console

        width = None if stderr or sys.stdout.isatty() else 120
        _consoles[key] = Console(stderr=stderr, highlight=False, width=width)
    return _consoles[key]


class UsageProblem(ValueError):
    """An option value or a path the user gave cannot be used."""


# ---- option types (one place, so all four commands read the same) ----

Seed = Annotated[int, typer.Option("--seed", help="Seed for the model, data, noise and shuffling.")]
Device = Annotated[
    str, typer.Option("--device", help="auto|cpu|cuda|mps; auto falls back to cpu.")
]
Epochs = Annotated[int, typer.Option("--epochs", help="Training epochs per run.")]
BatchSize = Annotated[
    int, typer.Option("--batch-size", help="Mini-batch size (0 = full batch).")
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
        "--fail-on", help="never|error|warning: exit 1 when a finding is at or above this."
    ),
]
Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing --plot file.")]


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

    def validate(self) -> CommonOptions:
        choice("--device", self.device, DEVICES)
        choice("--fail-on", self.fail_on, FAIL_ON)
        if self.epochs < 1:
            raise UsageProblem(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 0:
            raise UsageProblem(
                f"--batch-size must be 0 (full batch) or more, got {self.batch_size}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageProblem(f"--lr must be a positive number, got {self.lr}")
        if self.plot is not None:
            check_output_path("--plot", self.plot, self.force, suffix=".png")
        return self

    def config(self) -> dict[str, Any]:
        """The options as they appear in the JSON ``config`` block."""
        return {
            "seed": self.seed,
            "device": self.device,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "data": str(self.data) if self.data is not None else None,
        }


def choice(option: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise UsageProblem(f"{option} must be one of {'|'.join(allowed)}, got {value!r}")
    return value


def non_negative(option: str, value: float) -> float:
    if not (value >= 0 and math.isfinite(value)):
        raise UsageProblem(f"{option} must be a finite number >= 0, got {value}")
    return value


def check_output_path(option: str, path: Path, force: bool, suffix: str) -> None:
    """Refuse before any work is done: wrong suffix, missing dir, existing file."""
    if path.suffix.lower() != suffix:
        raise UsageProblem(f"{option} must end in {suffix}, got {str(path)!r}")
    if path.is_dir():
        raise UsageProblem(f"{option} {str(path)!r} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageProblem(f"{option}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageProblem(f"{option}: directory {str(parent)!r} is not writable")
    if path.exists() and not force:
        raise UsageProblem(f"{option}: {str(path)!r} already exists (use --force to overwrite)")


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same directory, then rename into place."""
    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input, not a bug. Imported lazily (torch)."""
    from meaning_transform.data import DataError
    from meaning_transform.training import DeviceError

    errors: list[type[BaseException]] = [UsageProblem, DataError, DeviceError]
    try:
        from meaning_transform.user_model import ModelSpecError

        errors.append(ModelSpecError)
    except ImportError:  # the --model loader is not part of this build
        pass
    return tuple(errors)


@contextmanager
def user_errors_exit() -> Iterator[None]:
    """Turn bad-input exceptions into one red line on stderr and exit code 2."""
    try:
        yield
    except UsageProblem as e:
        fail(str(e))
    except Exception as e:
        if isinstance(e, _user_errors()):
            fail(str(e))
        raise


def fail(message: str) -> None:
    console(stderr=True).print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)
    raise typer.Exit(2)


def clean_json(value: Any) -> Any:
    """Make a result JSON-safe and stable: non-finite floats become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    return value


def emit_json(result: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(clean_json(result), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


@contextmanager
def progress(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """A transient progress bar on stderr; ``advance()`` once per unit of work."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    err = console(stderr=True)
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not (enabled and err.is_terminal),
    )
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


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


def save_plot(result: dict[str, Any], opts: CommonOptions, figure: str) -> None:
    """With --plot, draw ``plots.<figure>(result)`` and write it as a PNG, atomically.

    matplotlib is imported only here, so a run without --plot never loads it.
    """
    if opts.plot is None:
        return
    from meaning_transform import plots

    fig = getattr(plots, figure)(result)
    write_atomically(opts.plot, lambda tmp: plots.save_png(fig, tmp))
    result["plot"] = str(opts.plot)


def finish(result: dict[str, Any], opts: CommonOptions) -> None:
    """Render the result (table or JSON) and exit with the code its findings call for."""
    from meaning_transform.cli import render
    from meaning_transform.diagnostics.findings import exit_code_for

    code = exit_code_for((f["severity"] for f in result.get("findings", [])), opts.fail_on)
    ordered = {
        "command": result["command"],
        "version": _version(),
        "config": result.pop("config", {}),
        **{k: v for k, v in result.items() if k != "command"},
        "exit_code": code,
    }
    if opts.json:
        emit_json(ordered)
    else:
        render.render(ordered)
    raise typer.Exit(code)


def _version() -> str:
    from meaning_transform import __version__

    return __version__


ModelSpec = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Your VAE: FILE.py:build or package.module:build; build() returns an nn.Module "
        "whose forward(x) gives reconstruction, mu, log_var.",
        show_default=False,
    ),
]
ScenarioName = Annotated[
    str,
    typer.Option(
        "--scenario",
        help="Inject a known fault into the built-in setup to see its finding, e.g. "
        "frozen-noise, no-grad-path, posterior-collapse (all listed in the README).",
    ),
]


def model_and_scenario(model_spec: str | None, scenario_name: str) -> tuple[Any, Any]:
    """Resolve --model and --scenario (before any training) into (factory, scenario)."""
    from meaning_transform.scenarios import SCENARIOS

    if scenario_name not in SCENARIOS:
        raise UsageProblem(
            f"--scenario must be one of {'|'.join(SCENARIOS)}, got {scenario_name!r}"
        )
    scenario = None if scenario_name == "healthy" else SCENARIOS[scenario_name]
    if model_spec is None:
        # The built-in VAE is tiny: one intra-op thread is as fast alone and ~10x faster
        # when the other core is busy (OpenMP threads wait on each other).
        import torch

        torch.set_num_threads(1)
        return None, scenario
    if scenario is not None:
        raise UsageProblem("--scenario injects faults into the built-in model; drop --model")
    from meaning_transform.user_model import load_model_factory

    return load_model_factory(model_spec), None


def checked_factory(factory: Any, dataset: Any, seed: int, spec: str | None) -> Any:
    """Build the user's model once on the data and check its output contract."""
    if factory is None:
        return None
    from meaning_transform.user_model import check_model

    check_model(factory(dataset.n_features, seed), dataset.tensor, spec or "--model")
    return factory


def prepare(
    opts: CommonOptions,
    model_spec: str | None,
    scenario_name: str,
    semantic_weight: float | None = None,
) -> tuple[Any, Any, Any]:
    """Resolve --model/--scenario, load or make the data, check the model on it.

    Returns ``(dataset, model_factory or None, scenario or None)``. An explicit
    ``semantic_weight`` > 0 needs the 10-feature agent-state layout.
    """
    from meaning_transform.studies.setup import get_data

    factory, scenario = model_and_scenario(model_spec, scenario_name)
    dataset = get_data(opts.data, seed=opts.seed, scenario=scenario)
    factory = checked_factory(factory, dataset, opts.seed, model_spec)
    if semantic_weight and not dataset.agent_layout:
        raise UsageProblem(
            f"--semantic-weight needs the agent-state layout (10 features per row), "
            f"the data has {dataset.n_features}; use --semantic-weight 0"
        )
    return dataset, factory, scenario
