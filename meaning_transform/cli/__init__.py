"""The ``mtx`` command line: one module per command, assembled here.

Command modules import torch and the compute code inside the command body, so
``mtx --help`` stays fast and torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import typer
from typer.core import TyperGroup

from meaning_transform import __version__
from meaning_transform.cli import anneal_demo, check_grads, debug_extended, debug_loss
from meaning_transform.cli.boundary import one_line, print_error, user_message

if TYPE_CHECKING:  # the class main() looks up at run time, as this Typer vendors it
    from typer._click.exceptions import UsageError


class _Group(TyperGroup):
    """The root group, with its unset flags read as False rather than None.

    Typer coerces every option's value through pydantic unless it is already a bool;
    the root's ``--help``, ``--install-completion`` and ``--show-completion`` default to
    None, so ``mtx <command> --help`` imported pydantic (~0.1 s) just to pass those
    Nones on. False is what an unset flag means, and it needs no coercion.
    """

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        for param in self.get_params(ctx):
            if getattr(param, "is_bool_flag", False) and param.default is None:
                param.default = False
        return super().parse_args(ctx, args)


app = typer.Typer(
    name="mtx",
    cls=_Group,
    help="A command-line doctor for VAE training: finds zero, NaN and vanishing loss terms "
    "and dying gradients, says why, and what to do.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, pwsh)
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mtx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """mtx: a command-line doctor for VAE training losses and gradients."""


app.command("debug-loss")(debug_loss.debug_loss)
app.command("debug-extended")(debug_extended.debug_extended)
app.command("anneal-demo")(anneal_demo.anneal_demo)
app.command("check-grads")(check_grads.check_grads)


def main() -> None:
    """Entry point: like ``app()``, but a usage error is one line on stderr and exit 2."""
    import sys

    # Typer re-exports click's BadParameter (vendored in new Typer); its base is UsageError.
    usage_error = cast(
        "type[UsageError]",
        next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError"),
    )
    try:
        code = app(standalone_mode=False)
    except usage_error as e:
        where = e.ctx.command_path if e.ctx is not None else "mtx"
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare ``mtx``: show the help
            print(e.ctx.get_help() if e.ctx is not None else "")
            sys.exit(0)
        message = " ".join(one_line(e.format_message()).split())
        print(f"error: {message} (see '{one_line(where)} --help')", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # bad input that escaped a command's user_errors_exit
        problem = user_message(e)
        if problem is None:
            raise  # a bug: keep the traceback
        print_error(problem)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
