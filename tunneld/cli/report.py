"""The verbs that read what runs: status (also --json and --watch), logs, wait."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import click

from tunneld.cli.completion import complete_hosts_with_files
from tunneld.cli.options import POSITIVE_S, echo, ssh_config_unused
from tunneld.errors import EXIT_NOT_RUNNING, TunneldError, report_error

if TYPE_CHECKING:
    from tunneld.state.status import HostReport


@click.command()
@click.argument("hosts", nargs=-1, metavar="[HOST]...", shell_complete=complete_hosts_with_files)
@ssh_config_unused
@click.option("--json", "as_json", is_flag=True, help="Print the documented JSON schema (docs/usage.md).")
@click.option("--watch", is_flag=True, help="Redraw the table in place every --interval seconds until Ctrl-C.")
@click.option("--interval", type=POSITIVE_S, default=2.0, show_default=True, help="Seconds between --watch redraws.")
def status(hosts: tuple[str, ...], ssh_config: str | None, as_json: bool, watch: bool, interval: float) -> None:
    """Show each tunnel: state, pid, uptime, forwards, reconnects, last error.

    Exit 0 when every named host is up, 3 when one is not (as `systemctl is-active`) or when tunneld has never
    run it (then it says so on stderr, with the known names).
    HOST may be @GROUP, a group of tunneld.toml's [groups]. With --watch: retry countdowns and byte
    rates (paramiko engine) live; plain frames when stdout is not a terminal; NO_COLOR turns colour off.
    """
    from tunneld.cli.render import status_lines, terminal_width
    from tunneld.config.settings import expand_groups
    from tunneld.state.paths import validate_host
    from tunneld.state.status import (
        NOT_RUNNING,
        STATUS_SCHEMA_VERSION,
        collect,
        listed_hosts,
        never_ran,
        never_ran_error,
    )

    if watch and as_json:
        raise click.UsageError("--watch draws the table; for JSON, poll `tunneld status --json`")
    named = [validate_host(h) for h in expand_groups(hosts)]

    def current(warn: bool = False) -> list[HostReport]:
        listed, stray = listed_hosts()
        for name in stray if warn else ():
            click.echo(f"warning: skipping {name} in the state directory: not a file name tunneld creates", err=True)
        return [collect(h) for h in named or listed]

    if watch:
        from tunneld.cli.watch import draw_until_interrupted

        draw_until_interrupted(current, interval, sys.stdout)
        return
    reports = current(warn=True)
    typed = {host for host in hosts if not host.startswith("@")}
    never = {r.host for r in reports if r.host in typed and r.state == NOT_RUNNING and never_ran(r.host)}
    for host in sorted(never):
        report_error(never_ran_error(host, not_running=True), echo)
    if as_json:
        click.echo(json.dumps({"version": STATUS_SCHEMA_VERSION, "hosts": [r.to_dict() for r in reports]}, indent=2))
    elif any(r.host not in never for r in reports):
        click.echo("\n".join(status_lines([r for r in reports if r.host not in never], terminal_width())))
    elif not never:
        click.echo("no tunnels: start one with `tunneld start HOST` (`tunneld list` shows the candidates)")
    if hosts and not all(r.is_up for r in reports):
        sys.exit(EXIT_NOT_RUNNING)


@click.command()
@click.argument("host", shell_complete=complete_hosts_with_files)
@ssh_config_unused
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines as they are written (Ctrl-C ends).")
@click.option("-n", "--lines", "count", type=int, default=50, show_default=True, help="How many recent lines.")
def logs(host: str, ssh_config: str | None, follow: bool, count: int) -> None:
    """Print HOST's log (what `tunneld run` wrote: connects, losses, retries, errors)."""
    from tunneld.state.logfile import follow_lines, tail_lines
    from tunneld.state.paths import HostFiles
    from tunneld.state.status import never_ran, never_ran_error

    files = HostFiles.of(host)
    if not files.log.exists():
        if never_ran(host):
            raise never_ran_error(host)
        raise TunneldError(f"no log for {host} yet", f"start it with: tunneld start {host}")
    for line in tail_lines(files.log, count):
        click.echo(line)
    if follow:
        for line in follow_lines(files.log):
            click.echo(line)


@click.command()
@click.argument("host", shell_complete=complete_hosts_with_files)
@ssh_config_unused
@click.option("--timeout", type=POSITIVE_S, default=30.0, show_default=True, help="Seconds to wait.")
def wait(host: str, ssh_config: str | None, timeout: float) -> None:
    """Block until HOST's tunnel is up and its configured health checks pass; exit 1 on timeout, or at once
    when HOST is not running (failed, stopped, never started). For scripts: tunneld wait mlflowserver && python train.py
    """
    from tunneld.state.paths import validate_host
    from tunneld.state.status import not_ready_error, wait_until_up

    up, report = wait_until_up(validate_host(host), timeout)
    if not up:
        raise not_ready_error(report, timeout)
    click.echo(f"{host}  {report.state}")
