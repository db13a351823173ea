"""The verbs that start, stop and change a host's tunnel: run, start, stop, restart, forget, reload, login."""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from tunneld.cli.completion import complete_configured_hosts, complete_hosts_with_files
from tunneld.cli.lookup import warn_skipped
from tunneld.cli.options import POSITIVE_S, echo, engine_option, ssh_config_option, ssh_config_unused
from tunneld.cli.starting import start_hosts
from tunneld.errors import EXIT_OK, NotRunningError, TunneldError, report_error


@click.command()
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
    from tunneld.runtime.daemon import run_tunnel

    sys.exit(run_tunnel(host, ssh_config, engine, fail_fast, notify_fd, lock_fd, verbose, managed_by))


def _hosts_or_all(hosts: tuple[str, ...], all_: bool, every: Callable[[], list[str]], verb: str) -> list[str]:
    if all_ and hosts:
        raise click.UsageError(f"give host names or --all, not both: tunneld {verb} --all")
    if not all_ and not hosts:
        raise click.UsageError(f"name a host (e.g. tunneld {verb} mlflowserver) or use --all")
    from tunneld.config.settings import expand_groups

    return every() if all_ else expand_groups(hosts)


def _run_each(hosts: list[str], action: Callable[[str], int]) -> int:
    """Run `action` per host; report each host's error and return the worst exit code."""
    worst = EXIT_OK
    for host in hosts:
        try:
            code = action(host)
        except TunneldError as error:
            code = report_error(error, echo)
        worst = max(worst, code)
    return worst


@click.command()
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
    from tunneld.config.resolve import list_hosts
    from tunneld.runtime.daemon import run_tunnel
    from tunneld.runtime.launch import StartOptions

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
    sys.exit(start_hosts(names, StartOptions(ssh_config, engine, timeout, verbose, keep_trying, prompt), echo))


def _stop_host(host: str, timeout: float, typed: bool = False, width: int = 0) -> int:
    """Stop one host; a name tunneld never ran is an error when it was typed (a typo: `stop mlflowsever` must not
    pass for success while mlflowserver runs), a mere `not running` for a member of a group. `width`: that of the
    widest host name stopped, so that the lines of several hosts are columns, as `status` draws them."""
    from tunneld.runtime.stopping import stop_tunnel
    from tunneld.state.status import never_ran, never_ran_error

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


@click.command()
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
    from tunneld.runtime.stopping import stoppable_hosts

    names = _hosts_or_all(hosts, all_, stoppable_hosts, "stop")
    if all_ and not names:
        click.echo("no tunnel is running")
        return
    typed = {host for host in hosts if not host.startswith("@")}
    width = max(map(len, names), default=0)
    sys.exit(_run_each(names, lambda host: _stop_host(host, timeout, typed=host in typed, width=width)))


@click.command()
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
    from tunneld.config.resolve import resolve_host
    from tunneld.runtime.launch import StartOptions
    from tunneld.state.paths import validate_host
    from tunneld.state.status import recorded_launch

    recorded = recorded_launch(validate_host(host))
    if recorded is not None:
        if ssh_config is None:
            ssh_config = recorded.ssh_config
        if ctx.get_parameter_source("engine") == click.core.ParameterSource.DEFAULT and recorded.engine:
            engine = recorded.engine
    resolve_host(host, ssh_config)
    _stop_host(host, timeout=10.0)
    sys.exit(start_hosts([host], StartOptions(ssh_config, engine, timeout), echo))


@click.command()
@click.argument("hosts", nargs=-1, metavar="HOST...", shell_complete=complete_hosts_with_files)
@click.option("--stopped", is_flag=True, help="Forget every host that is not running (stopped, failed, dead).")
@ssh_config_unused
def forget(hosts: tuple[str, ...], stopped: bool, ssh_config: str | None) -> None:
    """Remove the files (state, pid, log) of hosts that are not running, so `status` no longer lists them.

    A running tunnel is never forgotten: stop it first.
    """
    from tunneld.errors import AlreadyRunningError
    from tunneld.runtime.stopping import forget_host
    from tunneld.state.paths import known_hosts_with_files
    from tunneld.state.status import collect

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


@click.command()
@click.argument("host", shell_complete=complete_hosts_with_files)
@ssh_config_unused
def reload(host: str, ssh_config: str | None) -> None:
    """Apply HOST's changed ssh_config and tunneld.toml to its running tunnel (also: SIGHUP to it).

    tunneld.toml's settings apply in place; changed forwards too with the paramiko engine (unchanged ones keep
    their connections); anything else that concerns the connection (and forwards with the OpenSSH engine) with a
    new link; an engine change at a restart. A broken configuration is reported and not applied. It reads the
    ssh_config file the tunnel was started with.
    """
    from tunneld.cli.drift import reload_host
    from tunneld.state.status import ssh_config_for

    for line in reload_host(host, ssh_config_for(host, None), echo):
        click.echo(line)


@click.command()
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
    from tunneld.cli.starting import login_host
    from tunneld.state.status import ssh_config_for

    for line in login_host(host, ssh_config_for(host, ssh_config), engine, echo):
        click.echo(line)
