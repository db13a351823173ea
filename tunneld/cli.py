"""The command line: parse, call one function, render, map errors to exit codes. No logic lives here."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from tunneld import __version__
from tunneld.errors import EXIT_OK, AlreadyRunningError, TunneldError

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class TunneldGroup(click.Group):
    """A click group that turns TunneldError into `Error: ...` + `hint: ...` and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AlreadyRunningError as error:
            click.echo(error.message)
            ctx.exit(EXIT_OK)
        except TunneldError as error:
            log.debug("%s", error.message, exc_info=True)
            click.echo(f"Error: {error.message}", err=True)
            if error.hint:
                click.echo(f"  hint: {error.hint}", err=True)
            ctx.exit(error.exit_code)


def ssh_config_option(func: F) -> F:
    """Add -F/--ssh-config FILE, as `ssh -F`."""
    return click.option(
        "-F",
        "--ssh-config",
        type=click.Path(dir_okay=False),
        default=None,
        help="Read this ssh_config file instead of ~/.ssh/config (as ssh -F).",
    )(func)


def engine_option(func: F) -> F:
    """Add --engine auto|openssh."""
    from tunneld.engines import ENGINE_CHOICES

    return click.option(
        "--engine",
        type=click.Choice(ENGINE_CHOICES),
        default="auto",
        show_default=True,
        help="How to run the SSH connection: openssh supervises an `ssh -N` child; auto picks openssh when ssh exists.",
    )(func)


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


@cli.command()
@click.argument("host")
@ssh_config_option
@engine_option
@click.option("--fail-fast", is_flag=True, help="Exit 69 if the first connection attempt fails (instead of retrying).")
@click.option("--notify-fd", type=int, default=None, hidden=True)
@click.option("--lock-fd", type=int, default=None, hidden=True)
@click.option("-v", "--verbose", is_flag=True, help="Log every line ssh writes (DEBUG).")
def run(
    host: str,
    ssh_config: str | None,
    engine: str,
    fail_fast: bool,
    notify_fd: int | None,
    lock_fd: int | None,
    verbose: bool,
) -> None:
    """Keep HOST's forwards up in the foreground until Ctrl-C or SIGTERM.

    Logs go to stderr and to the host's log file. Transient failures are retried with
    backoff; a fatal one (auth refused, host key, bad config) exits 78. SIGUSR1 retries now.
    This is what service managers run.
    """
    from tunneld.daemon import run_tunnel

    sys.exit(run_tunnel(host, ssh_config, engine, fail_fast, notify_fd, lock_fd, verbose))


@cli.command()
@click.argument("host")
@ssh_config_option
@engine_option
@click.option("--json", "as_json", is_flag=True, help="Print the whole resolved TunnelSpec as JSON.")
def show(host: str, ssh_config: str | None, engine: str, as_json: bool) -> None:
    """Print what tunneld would do for HOST: forwards, engine, keepalive, host-key policy."""
    from tunneld.config import resolve_host
    from tunneld.engines import select_engine_name
    from tunneld.render import spec_lines

    spec = resolve_host(host, ssh_config)
    engine_name = select_engine_name(engine)
    if as_json:
        click.echo(json.dumps({**spec.to_dict(), "engine": engine_name}, indent=2))
        return
    click.echo("\n".join(spec_lines(spec, engine_name)))


@cli.command("list")
@ssh_config_option
def list_(ssh_config: str | None) -> None:
    """List the hosts of the ssh_config that have forwards."""
    from tunneld.config import list_hosts

    specs = list_hosts(ssh_config)
    if not specs:
        click.echo("no host in the ssh_config has a LocalForward, RemoteForward or DynamicForward", err=True)
        return
    for spec in specs:
        click.echo(f"{spec.alias}  " + ", ".join(str(f) for f in spec.forwards))


def main() -> None:
    """Entry point of the `tunneld` console script."""
    cli()

