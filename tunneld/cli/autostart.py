"""`tunneld autostart enable|disable|status`: the command-line verbs over `manage` (parse, call, render)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from tunneld.cli.completion import complete_configured_hosts, complete_hosts_with_files
from tunneld.cli.options import CONTEXT, ssh_config_option, ssh_config_unused

if TYPE_CHECKING:
    from tunneld.autostart.managed import ManagedStart

F = TypeVar("F", bound=Callable[..., Any])


@click.group(context_settings=CONTEXT)
def autostart() -> None:
    """Start tunnels at login: systemd user units, launchd agents, or XDG autostart entries."""


def via_option(func: F) -> F:
    """Add --via systemd|launchd|xdg."""
    from tunneld.state.manifests import VIA_CHOICES

    return click.option(
        "--via",
        type=click.Choice(VIA_CHOICES),
        default=None,
        help="Mechanism (default: launchd on macOS, systemd when a user manager runs, else xdg); launchd exists "
        "only on macOS, systemd only on Linux.",
    )(func)


@autostart.command("enable")
@click.argument("host", shell_complete=complete_configured_hosts)
@ssh_config_option
@via_option
@click.option("--now", is_flag=True, help="Also start the tunnel now through the service manager.")
def autostart_enable(host: str, ssh_config: str | None, via: str | None, now: bool) -> None:
    """Start HOST's tunnel at every login (enabling twice is harmless). HOST may be @GROUP: each member.

    Under systemd and launchd, enable finds the ssh-agent the service will reach at login and wires the
    service to it, or warns when none will be; `tunneld start/stop/restart HOST` then go through that
    service manager.
    """
    from tunneld.autostart.manage import check_enable, default_via, enable_host
    from tunneld.autostart.managed import MANAGERS, wait_started
    from tunneld.autostart.service import Launch, Runner
    from tunneld.config.resolve import resolve_host
    from tunneld.config.settings import expand_groups
    from tunneld.state.status import ssh_config_for

    hosts, runner = expand_groups([host]), Runner()
    chosen = via or default_via()
    # every member is checked before any is enabled: a group is enabled whole or not at all
    for name in hosts:
        check_enable(name, chosen, runner)
    # the config step `check` runs; without -F, the file a running (or last) tunnel of the host was started with
    specs = [resolve_host(name, ssh_config_for(name, ssh_config)) for name in hosts]
    for spec in specs:
        done = enable_host(spec, chosen, Launch.current(spec.ssh_config), runner, now)
        click.echo(f"{spec.alias}  autostart enabled via {done.manifest.via}" + (" and started" if now else ""))
        for note in done.notes:
            click.echo(f"  {note}")
        for written in done.manifest.files:
            click.echo(f"  wrote {written}")
        for warning in done.warnings:
            click.echo(f"  warning: {warning}", err=True)
        click.echo(f"undo with: tunneld autostart disable {spec.alias}")
        if now and done.manifest.via in MANAGERS:
            click.echo(_started_text(spec.alias, wait_started(spec.alias, done.manifest.via)))


def _started_text(host: str, started: ManagedStart) -> str:
    """Say how a host started through its service manager is doing (as `tunneld start` says it)."""
    from tunneld.cli.render import forward_text
    from tunneld.safetext import printable

    where = f"pid {started.pid} under {started.via}"
    if started.pending:
        return f"{host}  {started.state.get('state', 'starting')}: not up yet, still trying ({where})"
    forwards = started.state.get("forwards")
    shown = ", ".join(forward_text(f) for f in forwards if isinstance(f, dict)) if isinstance(forwards, list) else ""
    return printable(f"{host}  {started.state.get('state')}  {shown}  ({where}, {started.elapsed_s:.1f} s)")


@autostart.command("disable")
@click.argument("host", shell_complete=complete_hosts_with_files)
@ssh_config_unused
@click.option("--now", is_flag=True, help="Also stop the running tunnel.")
def autostart_disable(host: str, ssh_config: str | None, now: bool) -> None:
    """Stop starting HOST at login; remove exactly the files enable wrote. HOST may be @GROUP: each member."""
    from tunneld.autostart.manage import disable
    from tunneld.autostart.service import Runner
    from tunneld.config.settings import expand_groups

    runner = Runner()
    for name in expand_groups([host]):
        manifest = disable(name, runner, now)
        if manifest is None:
            click.echo(f"{name}  autostart was not enabled")
            continue
        stopped = " and stopped" if now else ""
        if now and not runner.supports(manifest.via):  # no service manager ran it here: its pid file decides
            stopped = " and stopped" if _stop_by_hand(name) else " (its tunnel was not running)"
        click.echo(f"{name}  autostart disabled ({manifest.via}){stopped}")
        for removed in manifest.files:
            click.echo(f"  removed {removed}")


def _stop_by_hand(host: str) -> bool:
    """Stop `host`'s tunnel by its pid file, as `tunneld stop` does; return False when none was running."""
    from tunneld.errors import NotRunningError
    from tunneld.runtime.stopping import stop_tunnel

    try:
        result = stop_tunnel(host)
    except NotRunningError:
        return False
    return not result.stale


@autostart.command("status")
@click.argument("hosts", nargs=-1, metavar="[HOST]...")
@ssh_config_unused
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def autostart_status(hosts: tuple[str, ...], ssh_config: str | None, as_json: bool) -> None:
    """Show which hosts start at login, how, whether the tunneld they run still exists, and which ssh-agent the
    service manager reaches for each (asked over its socket: does it hold a key for the host?). An XDG entry gets
    the desktop session's agent, which this shell may not show."""
    from tunneld.autostart.manage import autostart_report
    from tunneld.autostart.service import Runner
    from tunneld.state.manifests import enabled_hosts

    reports = [autostart_report(h, Runner()) for h in hosts or enabled_hosts()]
    if as_json:
        click.echo(json.dumps({"version": 1, "hosts": [r.to_dict() for r in reports]}, indent=2))
        return
    if not reports:
        click.echo("no host starts at login: tunneld autostart enable HOST")
    for report in reports:
        click.echo(f"{report.host}  {report.via or 'not enabled'}  {' '.join(report.launch)}".rstrip())
        if report.agent is not None:
            click.echo(f"  agent: {report.agent['summary']}")
        for warning in report.warnings:
            click.echo(f"  warning: {warning}", err=True)
