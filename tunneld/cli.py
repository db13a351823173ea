"""The command line: parse, call one function, render, map errors to exit codes. No logic lives here."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from tunneld import __version__
from tunneld.autostart.commands import autostart
from tunneld.cliopts import CONTEXT, POSITIVE_S, engine_option, ssh_config_option, ssh_config_unused
from tunneld.completion import complete_configured_hosts, complete_hosts_with_files
from tunneld.errors import EXIT_NOT_RUNNING, EXIT_OK, NotRunningError, TunneldError, report_error
from tunneld.lookup import check, list_, show, warn_skipped
from tunneld.scripting import env, exec_, url
from tunneld.starting import StartOptions, start_hosts

if TYPE_CHECKING:
    from tunneld.status import HostReport

F = TypeVar("F", bound=Callable[..., Any])
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class TunneldGroup(click.Group):
    """A click group that turns TunneldError into `Error: ...` + `hint: ...` and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            from tunneld.paths import check_home

            check_home()
            return super().invoke(ctx)
        except TunneldError as error:
            import logging

            logging.getLogger(__name__).debug("%s", error.message, exc_info=True)  # the log, under `run`
            ctx.exit(report_error(error, _echo))
        except KeyboardInterrupt:  # Ctrl-C on `logs -f`, `wait` or `start`: what the user asked for, quietly
            ctx.exit(EXIT_INTERRUPTED)


def _echo(text: str, to_stderr: bool) -> None:
    click.echo(text, err=to_stderr)


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
@click.argument("host", shell_complete=complete_configured_hosts)
@ssh_config_option
@engine_option
@click.option("--fail-fast", is_flag=True, help="Exit 69 if the first connection attempt fails (instead of retrying).")
@click.option("--notify-fd", type=int, default=None, hidden=True)
@click.option("--lock-fd", type=int, default=None, hidden=True)
@click.option("-v", "--verbose", is_flag=True, help="Log every line ssh writes (DEBUG).")
@click.option(
    "--managed-by",
    type=click.Choice(["launchd"]),
    default=None,
    help="Under launchd a fatal error exits 0, since KeepAlive would restart exit 78 forever.",
)
def run(
    host: str,
    ssh_config: str | None,
    engine: str,
    fail_fast: bool,
    notify_fd: int | None,
    lock_fd: int | None,
    verbose: bool,
    managed_by: str | None,
) -> None:
    """Keep HOST's forwards up in the foreground until Ctrl-C or SIGTERM.

    Logs go to stderr and to the host's log file. Transient failures are retried with
    backoff; a fatal one (auth refused, host key, bad config) exits 78. SIGUSR1 retries now.
    This is what service managers run.
    """
    from tunneld.daemon import run_tunnel

    sys.exit(run_tunnel(host, ssh_config, engine, fail_fast, notify_fd, lock_fd, verbose, managed_by))


def _hosts_or_all(hosts: tuple[str, ...], all_: bool, every: Callable[[], list[str]], verb: str) -> list[str]:
    if all_ and hosts:
        raise click.UsageError(f"give host names or --all, not both: tunneld {verb} --all")
    if not all_ and not hosts:
        raise click.UsageError(f"name a host (e.g. tunneld {verb} mlflowserver) or use --all")
    from tunneld.settings import expand_groups

    return every() if all_ else expand_groups(hosts)


def _run_each(hosts: list[str], action: Callable[[str], int]) -> int:
    """Run `action` per host; report each host's error and return the worst exit code."""
    worst = EXIT_OK
    for host in hosts:
        try:
            code = action(host)
        except TunneldError as error:
            code = report_error(error, _echo)
        worst = max(worst, code)
    return worst


@cli.command()
@click.argument("hosts", nargs=-1, metavar="HOST...", shell_complete=complete_configured_hosts)
@click.option("--all", "all_", is_flag=True, help="Start every host of the ssh_config that has forwards.")
@ssh_config_option
@engine_option
@click.option(
    "--timeout", type=POSITIVE_S, default=40.0, show_default=True, help="Seconds to wait for the tunnel to be up."
)
@click.option("--foreground", is_flag=True, help="Do not detach: the same as `tunneld run HOST`.")
@click.option(
    "--keep-trying",
    is_flag=True,
    help="If the server cannot be reached yet, keep retrying in the background instead of exiting 69 "
    "(autostart at login uses this).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every line ssh writes (DEBUG) in the host's log.")
@click.option(
    "--no-prompt",
    is_flag=True,
    help="Never ask in the terminal: no ssh-add for a key that needs a passphrase, no interactive login.",
)
def start(
    hosts: tuple[str, ...],
    all_: bool,
    ssh_config: str | None,
    engine: str,
    timeout: float,
    foreground: bool,
    keep_trying: bool,
    verbose: bool,
    no_prompt: bool,
) -> None:
    """Bring up HOST's forwards in the background; return once they work or with the reason they do not.

    HOST may be @GROUP, a group of tunneld.toml's [groups] (`tunneld start @ml`).

    On a terminal, one host: a key that needs a passphrase is loaded with ssh-add (it asks), and a host that
    takes only a password or a one-time code is logged in as `tunneld login HOST` does. A host waiting for
    credentials (needs-auth) is asked to try again now.

    \b
    Example:
      $ tunneld start mlflowserver
      mlflowserver  up  127.0.0.1:5000 -> localhost:5000  (pid 4242, 0.6 s)
      stop it with: tunneld stop mlflowserver
    """
    from tunneld.config import list_hosts
    from tunneld.daemon import run_tunnel

    def every() -> list[str]:
        specs, skipped = list_hosts(ssh_config)
        warn_skipped(skipped)
        return [spec.alias for spec in specs]

    names = _hosts_or_all(hosts, all_, every, "start")
    if foreground:
        if len(names) != 1:
            raise click.UsageError("--foreground runs one host: tunneld start --foreground HOST")
        sys.exit(run_tunnel(names[0], ssh_config, engine, verbose=verbose))
    prompt = len(names) == 1 and not no_prompt
    sys.exit(start_hosts(names, StartOptions(ssh_config, engine, timeout, verbose, keep_trying, prompt), _echo))


def _stop_host(host: str, timeout: float, typed: bool = False, width: int = 0) -> int:
    """Stop one host; a name tunneld never ran is an error when it was typed (a typo: `stop mlflowsever` must not
    pass for success while mlflowserver runs), a mere `not running` for a member of a group. `width`: that of the
    widest host name stopped, so that the lines of several hosts are columns, as `status` draws them."""
    from tunneld.status import never_ran, never_ran_error
    from tunneld.stopping import stop_tunnel

    try:
        result = stop_tunnel(host, timeout)
    except NotRunningError:
        unknown = never_ran(host)
        if unknown and typed:
            raise never_ran_error(host) from None
        said = "not running (tunneld has never run it)" if unknown else "not running"
    else:
        if result.stale and result.pid is None:
            said = "not running (removed its unreadable pid file)"
        elif result.stale:
            said = f"not running (removed the stale pid file of pid {result.pid})"
        elif result.killed:
            said = f"stopped (pid {result.pid} ignored SIGTERM for {timeout:.0f} s; killed with SIGKILL)"
        else:
            said = "stopped"
    click.echo(f"{host.ljust(width)}  {said}")
    return EXIT_OK


@cli.command()
@click.argument("hosts", nargs=-1, metavar="HOST...", shell_complete=complete_hosts_with_files)
@click.option("--all", "all_", is_flag=True, help="Stop every running tunnel.")
@ssh_config_unused
@click.option(
    "--timeout", type=POSITIVE_S, default=10.0, show_default=True, help="Seconds to wait after SIGTERM before SIGKILL."
)
def stop(hosts: tuple[str, ...], all_: bool, ssh_config: str | None, timeout: float) -> None:
    """Stop HOST's tunnel: SIGTERM, then SIGKILL after --timeout. Stopping a stopped host is fine (exit 0); a
    name tunneld has never run is an error (exit 1) that lists the known ones.

    HOST may be @GROUP, a group of tunneld.toml's [groups].
    """
    from tunneld.stopping import stoppable_hosts

    names = _hosts_or_all(hosts, all_, stoppable_hosts, "stop")
    if all_ and not names:
        click.echo("no tunnel is running")
        return
    typed = {host for host in hosts if not host.startswith("@")}
    width = max(map(len, names), default=0)
    sys.exit(_run_each(names, lambda host: _stop_host(host, timeout, typed=host in typed, width=width)))


@cli.command()
@click.argument("host", shell_complete=complete_hosts_with_files)
@ssh_config_option
@engine_option
@click.option(
    "--timeout", type=POSITIVE_S, default=40.0, show_default=True, help="Seconds to wait for the tunnel to be up."
)
@click.pass_context
def restart(ctx: click.Context, host: str, ssh_config: str | None, engine: str, timeout: float) -> None:
    """Stop HOST's tunnel if it runs, then start it again (a broken config leaves the running one alone).

    Without -F or --engine, the ssh_config file and engine it was last started with are used again.
    """
    from tunneld.config import resolve_host
    from tunneld.paths import validate_host
    from tunneld.status import recorded_launch

    recorded = recorded_launch(validate_host(host))
    if recorded is not None:
        if ssh_config is None:
            ssh_config = recorded.ssh_config
        if ctx.get_parameter_source("engine") == click.core.ParameterSource.DEFAULT and recorded.engine:
            engine = recorded.engine
    resolve_host(host, ssh_config)
    _stop_host(host, timeout=10.0)
    sys.exit(start_hosts([host], StartOptions(ssh_config, engine, timeout), _echo))


@cli.command()
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
    from tunneld.paths import validate_host
    from tunneld.render import status_lines, terminal_width
    from tunneld.settings import expand_groups
    from tunneld.status import NOT_RUNNING, STATUS_SCHEMA_VERSION, collect, listed_hosts, never_ran, never_ran_error

    if watch and as_json:
        raise click.UsageError("--watch draws the table; for JSON, poll `tunneld status --json`")
    named = [validate_host(h) for h in expand_groups(hosts)]

    def current(warn: bool = False) -> list[HostReport]:
        listed, stray = listed_hosts()
        for name in stray if warn else ():
            click.echo(f"warning: skipping {name} in the state directory: not a file name tunneld creates", err=True)
        return [collect(h) for h in named or listed]

    if watch:
        from tunneld.watch import draw_until_interrupted

        draw_until_interrupted(current, interval, sys.stdout)
        return
    reports = current(warn=True)
    typed = {host for host in hosts if not host.startswith("@")}
    never = {r.host for r in reports if r.host in typed and r.state == NOT_RUNNING and never_ran(r.host)}
    for host in sorted(never):
        report_error(never_ran_error(host, not_running=True), _echo)
    if as_json:
        click.echo(json.dumps({"version": STATUS_SCHEMA_VERSION, "hosts": [r.to_dict() for r in reports]}, indent=2))
    elif any(r.host not in never for r in reports):
        click.echo("\n".join(status_lines([r for r in reports if r.host not in never], terminal_width())))
    elif not never:
        click.echo("no tunnels: start one with `tunneld start HOST` (`tunneld list` shows the candidates)")
    if hosts and not all(r.is_up for r in reports):
        sys.exit(EXIT_NOT_RUNNING)


@cli.command()
@click.argument("hosts", nargs=-1, metavar="HOST...", shell_complete=complete_hosts_with_files)
@click.option("--stopped", is_flag=True, help="Forget every host that is not running (stopped, failed, dead).")
@ssh_config_unused
def forget(hosts: tuple[str, ...], stopped: bool, ssh_config: str | None) -> None:
    """Remove the files (state, pid, log) of hosts that are not running, so `status` no longer lists them.

    A running tunnel is never forgotten: stop it first.
    """
    from tunneld.errors import AlreadyRunningError
    from tunneld.paths import known_hosts_with_files
    from tunneld.status import collect
    from tunneld.stopping import forget_host

    def not_running() -> list[str]:
        return [h for h in known_hosts_with_files() if not collect(h).running]

    names = _hosts_or_all(hosts, stopped, not_running, "forget") if hosts or stopped else []
    if not names:
        if not hosts and not stopped:
            raise click.UsageError("name a host (e.g. tunneld forget mlflowserver) or use --stopped")
        click.echo("nothing to forget")
        return

    def one(host: str) -> int:
        try:
            removed = forget_host(host)
        except AlreadyRunningError:
            raise TunneldError(f"{host} is running: not forgetting it", f"stop it first: tunneld stop {host}") from None
        click.echo(f"{host}  forgotten" + ("" if removed else " (it had no files)"))
        return EXIT_OK

    sys.exit(_run_each(names, one))


@cli.command()
@click.argument("host", shell_complete=complete_hosts_with_files)
@ssh_config_unused
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines as they are written (Ctrl-C ends).")
@click.option("-n", "--lines", "count", type=int, default=50, show_default=True, help="How many recent lines.")
def logs(host: str, ssh_config: str | None, follow: bool, count: int) -> None:
    """Print HOST's log (what `tunneld run` wrote: connects, losses, retries, errors)."""
    from tunneld.logfile import follow_lines, tail_lines
    from tunneld.paths import HostFiles
    from tunneld.status import never_ran, never_ran_error

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


@cli.command()
@click.argument("host", shell_complete=complete_hosts_with_files)
@ssh_config_unused
@click.option("--timeout", type=POSITIVE_S, default=30.0, show_default=True, help="Seconds to wait.")
def wait(host: str, ssh_config: str | None, timeout: float) -> None:
    """Block until HOST's tunnel is up and its configured health checks pass; exit 1 on timeout, or at once
    when HOST is not running (failed, stopped, never started). For scripts: tunneld wait mlflowserver && python train.py
    """
    from tunneld.paths import validate_host
    from tunneld.status import not_ready_error, wait_until_up

    up, report = wait_until_up(validate_host(host), timeout)
    if not up:
        raise not_ready_error(report, timeout)
    click.echo(f"{host}  {report.state}")


@cli.command()
@click.argument("host", shell_complete=complete_hosts_with_files)
@ssh_config_unused
def reload(host: str, ssh_config: str | None) -> None:
    """Apply HOST's changed ssh_config and tunneld.toml to its running tunnel (also: SIGHUP to it).

    tunneld.toml's settings apply in place; changed forwards too with the paramiko engine (unchanged ones keep
    their connections); anything else that concerns the connection (and forwards with the OpenSSH engine) with a
    new link; an engine change at a restart. A broken configuration is reported and not applied. It reads the
    ssh_config file the tunnel was started with.
    """
    from tunneld.drift import reload_host
    from tunneld.status import ssh_config_for

    for line in reload_host(host, ssh_config_for(host, None), _echo):
        click.echo(line)


@cli.command()
@click.argument("host", shell_complete=complete_configured_hosts)
@ssh_config_option
@engine_option
def login(host: str, ssh_config: str | None, engine: str) -> None:
    """Log in to HOST once, in this terminal (password, one-time code, Duo push, FIDO touch: whatever ssh asks),
    and hand the connection to HOST's tunnel.

    For hosts that need a human at every login. The connection is an OpenSSH master on a private socket of
    tunneld's (your own ControlMaster settings are not used); the tunnel runs its forwards through it. When it
    ends (network loss, server restart), the host waits in needs-auth until you run `tunneld login HOST` again.
    """
    from tunneld.login import login_host
    from tunneld.status import ssh_config_for

    for line in login_host(host, ssh_config_for(host, ssh_config), engine, _echo):
        click.echo(line)


for _verb in (autostart, check, env, exec_, list_, show, url):
    cli.add_command(_verb)


def main() -> None:
    """Entry point of the `tunneld` console script."""
    cli()
