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
    return [name for name in [*(spec.alias for spec in specs), *_group_names()] if name.startswith(incomplete)]


def complete_hosts_with_files(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Complete HOST from the hosts tunneld has files for (what `status` shows)."""
    from tunneld.paths import known_hosts_with_files

    return [name for name in [*known_hosts_with_files(), *_group_names()] if name.startswith(incomplete)]


def _group_names() -> list[str]:
    """Return `@group` for every group of tunneld.toml (none when the file is unreadable)."""
    from tunneld.settings import groups

    try:
        return [f"@{name}" for name in groups()]
    except TunneldError:
        return []
