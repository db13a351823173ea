"""Shell completion of HOST arguments (click's `_TUNNELD_COMPLETE=bash_source tunneld`, zsh, fish)."""

from __future__ import annotations

import click

from tunneld.errors import TunneldError


def complete_configured_hosts(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Complete HOST from the ssh_config's hosts that have forwards (what `list` shows), honouring -F."""
    import os

    from tunneld.config import list_hosts

    ssh_config = ctx.params.get("ssh_config") or os.environ.get("TUNNELD_SSH_CONFIG")
    try:
        specs, _ = list_hosts(ssh_config)
    except TunneldError:
        return []
    return [spec.alias for spec in specs if spec.alias.startswith(incomplete)]


def complete_hosts_with_files(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Complete HOST from the hosts tunneld has files for (what `status` shows)."""
    from tunneld.paths import known_hosts_with_files

    return [host for host in known_hosts_with_files() if host.startswith(incomplete)]
