"""The Typer app every ``csseg`` command registers on, and what the commands share: one-line errors
(usage errors and csseg errors alike), the console tables print to, percentages."""

from __future__ import annotations

import functools
import os
import sys

import typer
from rich.console import Console
from typer._click.exceptions import ClickException, NoArgsIsHelpError
from typer.core import TyperGroup

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


class OneLineErrors(TyperGroup):
    """Usage errors (unknown option, bad value, missing argument) as one ``error:`` line, exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as err:
            from typer import rich_utils

            rich_utils.rich_format_error(err)
            sys.exit(err.exit_code)
        except ClickException as err:
            where = f" (see `{err.ctx.command_path} --help`)" if getattr(err, "ctx", None) else ""
            typer.echo(f"error: {err.format_message()}{where}", err=True)
            sys.exit(err.exit_code)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Continual semantic segmentation (SDR and baselines) with Ray sweeps.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: generate the synthetic one.")
app.add_typer(data_app, name="data")
console = Console()


def user_errors(fn):
    """Turn csseg errors (and Ctrl-C) into one line on stderr and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from csseg_core.errors import CssegError

        try:
            return fn(*args, **kwargs)
        except CssegError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished steps and trials are kept on disk; rerun the same command to resume", err=True)
            raise typer.Exit(130) from None

    return wrapper


def pct(x) -> str:
    """IoU fraction as a percentage with one decimal (:func:`csseg_core.metrics.format_percent`, imported late)."""
    from csseg_core.metrics import format_percent

    return format_percent(x)

