"""The verbs that look and change nothing: `show` (what would be done), `list` (hosts with forwards),
`check` (a step-by-step diagnosis)."""

from __future__ import annotations

import json
import sys

import click

from tunneld.cli.completion import complete_configured_hosts
from tunneld.cli.options import engine_option, ssh_config_option
from tunneld.errors import EXIT_OK, EXIT_RUNTIME


@click.command()
@click.argument("host", shell_complete=complete_configured_hosts)
@ssh_config_option
@engine_option
@click.option("--json", "as_json", is_flag=True, help="Print the whole resolved TunnelSpec as JSON.")
def show(host: str, ssh_config: str | None, engine: str, as_json: bool) -> None:
    """Print what tunneld would do for HOST: forwards, engine, keepalive, host-key policy.

    Shows every host `ssh -G` resolves, also one without forwards (with a warning: start would refuse it).
    """
    from tunneld.cli.render import spec_json, spec_lines
    from tunneld.config.credentials import host_auth_plan
    from tunneld.config.resolve import resolve_host
    from tunneld.config.settings import host_settings
    from tunneld.engines import select_engine_name
    from tunneld.runtime.health import check_health_keys
    from tunneld.state.paths import is_valid_host
    from tunneld.state.status import recorded_launch, ssh_config_for

    if is_valid_host(host):
        ssh_config = ssh_config_for(host, ssh_config)  # the file the running (or last) tunnel was started with
    spec = resolve_host(host, ssh_config, require_forwards=False)
    settings = host_settings(host)
    check_health_keys(spec, settings)
    plan = host_auth_plan(spec) if is_valid_host(host) else None
    engine_name = select_engine_name(engine, host, settings)
    recorded = recorded_launch(host) if is_valid_host(host) else None
    if as_json:
        data = spec_json(spec, engine_name, recorded)
        data["on_demand"] = settings.on_demand
        data["idle_timeout_s"] = settings.idle_timeout_s if settings.on_demand else None
        data["auth"] = plan.to_dict() if plan is not None else None
        click.echo(json.dumps(data, indent=2))
        return
    click.echo("\n".join(spec_lines(spec, engine_name, recorded)))
    if plan is not None:
        click.echo(f"auth        {plan.summary}")
    if not spec.forwards:
        from tunneld.config.resolve import no_forwards_error

        why = no_forwards_error(host, ssh_config)
        click.echo(f"warning: {why.message}\n  hint: {why.hint}", err=True)
    if settings.on_demand:
        click.echo(
            f"on demand   listens from `start`, connects when the first client does, disconnects after "
            f"{settings.idle_timeout_s:g} s without connections (needs the paramiko engine)"
        )


@click.command("list")
@ssh_config_option
def list_(ssh_config: str | None) -> None:
    """List the hosts of the ssh_config that have forwards, then tunneld.toml's groups (`start @GROUP`).

    The ssh_config files read are named on stderr (`~/.ssh/config (does not exist)` when there is none).
    """
    from tunneld.cli.render import columns
    from tunneld.config.resolve import describe_sources, list_hosts
    from tunneld.config.settings import groups

    specs, skipped = list_hosts(ssh_config)
    warn_skipped(skipped)
    sources = describe_sources(ssh_config)
    if specs:
        click.echo(f"ssh_config files read: {sources}", err=True)
    else:
        click.echo(f"no host in {sources} has a LocalForward, RemoteForward or DynamicForward", err=True)
    rows = [(spec.alias, ", ".join(str(f) for f in spec.forwards)) for spec in specs]
    listed = {spec.alias for spec in specs}
    for name, members in groups().items():
        shown = ", ".join(m if m in listed else f"{m} (no forwards in the ssh_config)" for m in members)
        rows.append((f"@{name}", shown))
    for line in columns(rows):  # hosts and groups in one set of columns, as `status` draws its table
        click.echo(line)


def warn_skipped(skipped: list[str]) -> None:
    """Say on stderr which ssh_config hosts were passed over, and why."""
    for why in skipped:
        click.echo(f"warning: {why}", err=True)


@click.command()
@click.argument("host", shell_complete=complete_configured_hosts)
@ssh_config_option
@engine_option
def check(host: str, ssh_config: str | None, engine: str) -> None:
    """Diagnose HOST step by step: config, local ports, DNS, TCP, host key, auth, forwards, target.

    Works whether or not the tunnel runs. Exit 0 only when every step passes.
    """
    from tunneld.cli.check import FAIL, run_checks
    from tunneld.cli.render import step_line
    from tunneld.state.paths import validate_host
    from tunneld.state.status import ssh_config_for

    validate_host(host)
    failed = False
    for step in run_checks(host, ssh_config_for(host, ssh_config), engine):
        click.echo(step_line(step.name, step.verdict, step.detail))
        if step.hint:
            click.echo(f"{'':18}hint: {step.hint}")
        failed = failed or step.verdict == FAIL
    sys.exit(EXIT_RUNTIME if failed else EXIT_OK)
