"""The verbs for scripts and shells: `url` (a forward's local URL), `env` (tunneld.toml's [hosts.HOST.env] as
`export` lines), `exec` (make sure HOST is up, then run a command with those variables)."""

from __future__ import annotations

import sys

import click

from tunneld.cli.completion import complete_configured_hosts
from tunneld.cli.options import POSITIVE_S, engine_option, ssh_config_option


def _valid_scheme(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from tunneld.config.urls import is_scheme

    if not is_scheme(value):
        raise click.BadParameter(f"{value!r} is not a URL scheme (e.g. http, https, socks5h)")
    return value


@click.command()
@click.argument("host", shell_complete=complete_configured_hosts)
@click.argument("port", type=click.IntRange(1, 65535), required=False)
@ssh_config_option
@click.option("--scheme", default="http", show_default=True, callback=_valid_scheme, help="The URL's scheme.")
def url(host: str, port: int | None, ssh_config: str | None, scheme: str) -> None:
    """Print the local URL of HOST's first LocalForward, or of the one whose local or remote port is PORT.

    \b
      $ tunneld url mlflowserver
      http://127.0.0.1:5000

    IPv4 loopback is preferred. A host that is not running: the address `start` would listen on, from the
    ssh_config (without -F, the one it was last started with). A PORT that names no forward is a usage error
    (exit 2) that lists the forwards.
    """
    from tunneld.config.urls import NoSuchForwardError, host_forwards, pick_forward
    from tunneld.safetext import printable

    try:
        forward = pick_forward(host, host_forwards(host, ssh_config), port)
    except NoSuchForwardError as error:
        raise click.BadParameter(printable(f"{error.message}; {error.hint}"), param_hint="PORT") from None
    click.echo(forward.url(scheme))


@click.command()
@click.argument("host", shell_complete=complete_configured_hosts)
@ssh_config_option
def env(host: str, ssh_config: str | None) -> None:
    """Print `export NAME='value'` lines for tunneld.toml's [hosts.HOST.env], for a shell's eval.

    \b
    In tunneld.toml:   [hosts.mlflowserver.env]
                       MLFLOW_TRACKING_URI = "http://{local}"
    In a shell:        eval "$(tunneld env mlflowserver)"

    {local} is the first LocalForward's address (127.0.0.1:5000), {local:PORT} the forward whose local or
    remote port is PORT. A host that is not running: its addresses from the ssh_config, as for `url`.
    """
    from tunneld.config.settings import host_settings
    from tunneld.config.urls import export_lines, host_forwards, render_env

    variables = host_settings(host).env
    if not variables:
        click.echo(f"nothing to export: tunneld.toml has no [hosts.{host}.env] table", err=True)
        return
    for line in export_lines(render_env(host, variables, host_forwards(host, ssh_config))):
        click.echo(line)


@click.command("exec")
@click.argument("host", shell_complete=complete_configured_hosts)
@click.argument("command", nargs=-1, required=True, metavar="-- CMD [ARG]...")
@ssh_config_option
@engine_option
@click.option("--timeout", type=POSITIVE_S, default=30.0, show_default=True, help="Seconds to wait for up and healthy.")
def exec_(host: str, command: tuple[str, ...], ssh_config: str | None, engine: str, timeout: float) -> None:
    """Make sure HOST is up and healthy (start it if needed, as `start` and `wait` would), then run CMD with
    tunneld.toml's [hosts.HOST.env] set; exit with CMD's exit code.

    \b
      tunneld exec mlflowserver -- python train.py

    Options go before `--`; all after it is CMD. Without -F, the ssh_config the host was last started with.
    What a start says goes to stderr; stdout is CMD's. A CMD that does not exist exits 127, one that cannot
    run 126.
    """
    from tunneld.cli.starting import started_lines
    from tunneld.config.urls import exec_command, forwards_from_state, host_env
    from tunneld.runtime.launch import StartOptions, ensure_host
    from tunneld.state.status import ssh_config_for

    progress = (lambda text: click.echo(f"  {host}: {text}...", err=True)) if sys.stderr.isatty() else None
    options = StartOptions(ssh_config_for(host, ssh_config), engine, timeout)
    ensured = ensure_host(host, options, healthy=True, progress=progress)
    for line in started_lines(host, ensured.started) if ensured.started else ():
        click.echo(line, err=True)
    exec_command(command, host_env(host, forwards_from_state(ensured.report.forwards)))
