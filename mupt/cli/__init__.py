"""The ``mupt`` command line: a thin Typer layer over the modules.

This package is the only place that knows about the terminal.  Each command lives in its own
module and registers itself on :data:`app`; :func:`main` turns every user error
(:class:`mupt.errors.MuptError`, bad flags) into one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import click
import typer
from pydantic import ValidationError
from rich.console import Console
from typer.core import TyperGroup

from mupt.config import format_validation_error
from mupt.errors import MuptError


class Interrupted(Exception):
    """Ctrl-C in a command that does not handle it, carried to :func:`main` (typer >= 0.26 turns a
    KeyboardInterrupt raised in a command into a silent exit 130)."""


class _Group(TyperGroup):
    def invoke(self, ctx: Any) -> Any:  # a click.Context, or typer's vendored one (typer >= 0.26)
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted() from None


app = typer.Typer(
    name="mupt",
    cls=_Group,
    help=(
        "Tune a small proxy Mamba, transfer its optimum to a wide model through the µP-SSM width "
        "rules, prove the transfer with coordinate and LR-transfer checks, and launch the large run."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
check_app = typer.Typer(
    help=(
        "Pass/fail verification for CI: coordinate checks (coord), LR-transfer checks with regret (transfer), "
        "both (all), and a few short runs of a recipe at the target width (target)."
    ),
    no_args_is_help=True,
)
app.add_typer(check_app, name="check")


class StdoutClosed(Exception):
    """Standard output's reader went away (``mupt ... | head``)."""


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """Silence this console (Rich's default) and end the command via :class:`StdoutClosed`, not exit 1."""
        self.quiet = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
        raise StdoutClosed()


#: Width of output that goes to a pipe or file (Rich's default there is 80 columns, which cuts the tables'
#: numbers to "0.00…"); a terminal's own width, or $COLUMNS when set, wins.
PIPE_WIDTH = 160


def _width(stream: object) -> int | None:
    isatty = getattr(stream, "isatty", None)
    return None if os.environ.get("COLUMNS") or (isatty is not None and isatty()) else PIPE_WIDTH


out = _Console(width=_width(sys.stdout))
err = Console(stderr=True, width=_width(sys.stderr))


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one red line to stderr and return the Exit to raise."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def mute_ctrl_c() -> None:
    """For a command that is ending after Ctrl-C: a Ctrl-C pressed again must not break the exit with a
    traceback.  A Python-level no-op handler, unlike ``SIG_IGN``, is not inherited by child processes."""
    signal.signal(signal.SIGINT, lambda signum, frame: None)


# Command modules register themselves on ``app`` / ``check_app`` when imported.
from mupt.cli import check_coord as _check_coord  # noqa: E402,F401
from mupt.cli import check_target as _check_target  # noqa: E402,F401
from mupt.cli import check_transfer as _check_transfer  # noqa: E402,F401
from mupt.cli import export as _export  # noqa: E402,F401
from mupt.cli import prepare as _prepare  # noqa: E402,F401
from mupt.cli import scale as _scale  # noqa: E402,F401
from mupt.cli import train as _train  # noqa: E402,F401
from mupt.cli import transfer as _transfer  # noqa: E402,F401
from mupt.cli import tune as _tune  # noqa: E402,F401


def _click_exception_types() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(usage/click errors, aborts) from click and from the copy newer typer releases vendor."""
    errors: list[type[BaseException]] = [click.ClickException]
    aborts: list[type[BaseException]] = [click.exceptions.Abort, typer.Abort]
    try:
        from typer._click import exceptions as vendored  # typer >= 0.26 ships its own click

        errors.append(vendored.ClickException)
        aborts.append(getattr(vendored, "Abort", typer.Abort))
    except ImportError:
        pass
    return tuple(errors), tuple(aborts)


_CLICK_ERRORS, _ABORTS = _click_exception_types()


#: Exit code when the reader of standard output went away (``mupt ... | head``): 128 + SIGPIPE, as for
#: any Unix tool stopped by the closed pipe.
EXIT_BROKEN_PIPE = 141


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, map user errors to one line and exit code 2.

    A closed standard output (``| head``) ends the command quietly with exit code 141; commands write
    their files before their tables, so nothing is lost.
    """
    try:
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:  # typer.Exit(n) comes back as a return value here
            sys.exit(code)
    except StdoutClosed:
        err.print("note: standard output was closed (e.g. `| head`); stopped printing there", highlight=False)
        sys.exit(EXIT_BROKEN_PIPE)
    except MuptError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except ValidationError as e:  # a settings object built from a flag no command checked first: still one line
        err.print(f"[bold red]error:[/] {format_validation_error(e, 'invalid value')}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (click.exceptions.Exit, typer.Exit) as e:
        sys.exit(e.exit_code)
    except _ABORTS:
        err.print("[bold red]aborted[/]")
        sys.exit(130)
    except (KeyboardInterrupt, Interrupted):  # Ctrl-C no command handles (they say what they kept): one line
        mute_ctrl_c()
        if "TORCHELASTIC_RUN_ID" not in os.environ:  # a torchrun worker (mupt scale) is silent: its launcher says it
            err.print("[bold red]interrupted[/] (Ctrl-C)")
        sys.exit(130)
    except _CLICK_ERRORS as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # help was asked for by giving no arguments
            out.print(e.format_message(), highlight=False)  # type: ignore[attr-defined]
            sys.exit(0)
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        message = " ".join(e.format_message().split())  # type: ignore[attr-defined]
        message = message.replace(": Value error, ", ": ")  # pydantic's prefix, via typer's enum conversion
        err.print(f"[bold red]error:[/] {message}{hint}", highlight=False, soft_wrap=True)
        sys.exit(2)
