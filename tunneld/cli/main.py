"""The `tunneld` command: the click group that maps a TunneldError to `Error:`/`hint:` and its exit code."""

from __future__ import annotations

from typing import Any

import click

from tunneld import __version__
from tunneld.cli.autostart import autostart
from tunneld.cli.lifecycle import forget, login, reload, restart, run, start, stop
from tunneld.cli.lookup import check, list_, show
from tunneld.cli.options import CONTEXT, echo
from tunneld.cli.report import logs, status, wait
from tunneld.cli.scripting import env, exec_, url
from tunneld.errors import TunneldError, report_error

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class TunneldGroup(click.Group):
    """A click group that turns TunneldError into `Error: ...` + `hint: ...` and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            from tunneld.state.paths import check_home

            check_home()
            return super().invoke(ctx)
        except TunneldError as error:
            import logging

            logging.getLogger(__name__).debug("%s", error.message, exc_info=True)  # the log, under `run`
            ctx.exit(report_error(error, echo))
        except KeyboardInterrupt:  # Ctrl-C on `logs -f`, `wait` or `start`: what the user asked for, quietly
            ctx.exit(EXIT_INTERRUPTED)


@click.group(cls=TunneldGroup, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="tunneld")
def cli() -> None:
    """Keep the LocalForwards of your ~/.ssh/config hosts up, in the background.

    \b
    tunneld start mlflowserver     bring up every forward of Host mlflowserver
    tunneld status                 what runs, since when, how often it reconnected
    tunneld stop mlflowserver      stop it (no ps | grep, no pkill)

    Exit codes: 0 ok, 1 runtime error, 2 usage, 3 not running (status), 69 server unreachable
    at first try, 78 configuration, authentication or host key is wrong (retrying cannot help).
    """


for _verb in (
    autostart,
    check,
    env,
    exec_,
    forget,
    list_,
    login,
    logs,
    reload,
    restart,
    run,
    show,
    start,
    status,
    stop,
    url,
    wait,
):
    cli.add_command(_verb)


def main() -> None:
    """Entry point of the `tunneld` console script."""
    cli()
