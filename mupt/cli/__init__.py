"""The ``mupt`` command line: a thin Typer layer over the modules.

This package is the only place that knows about the terminal.  Each command lives in its own
module and registers itself on :data:`app`; :func:`main` turns every user error
(:class:`mupt.errors.MuptError`, bad flags) into one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys

import click
import typer
from rich.console import Console

from mupt.errors import MuptError

app = typer.Typer(
    name="mupt",
    help=(
        "Tune a small proxy Mamba, transfer its optimum to a wide model through the µP-SSM width "
        "rules, prove the transfer with coordinate and LR-transfer checks, and launch the large run."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
check_app = typer.Typer(help="Pass/fail verification for CI: coordinate checks and LR-transfer checks.", no_args_is_help=True)
app.add_typer(check_app, name="check")

out = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one red line to stderr and return the Exit to raise."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


# Command modules register themselves on ``app`` / ``check_app`` when imported.
from mupt.cli import train as _train  # noqa: E402,F401


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except MuptError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        err.print("[bold red]aborted[/]")
        sys.exit(130)
    except click.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        err.print(f"[bold red]error:[/] {e.format_message()}{hint}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.ClickException as e:
        err.print(f"[bold red]error:[/] {e.format_message()}", highlight=False, soft_wrap=True)
        sys.exit(2)
