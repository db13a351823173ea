"""Shell completion of HOST arguments (click's `_TUNNELD_COMPLETE=bash_source tunneld`, zsh, fish)."""

from __future__ import annotations

import click

from tunneld.errors import TunneldError


def complete_configured_hosts(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Complete HOST from the Host names the ssh_config spells out (no wildcards), honouring -F.

    Nothing is run: resolving each host (`ssh -G`, as `list` does) would run every `Match exec` of
    the config for every host on each Tab, before the user pressed Enter.
    """
    import os

    from tunneld.config.resolve import config_files, host_lines, literal_hosts
    from tunneld.state.paths import is_valid_host

    ssh_config = ctx.params.get("ssh_config") or os.environ.get("TUNNELD_SSH_CONFIG")
    names = [name for name in literal_hosts(host_lines(config_files(ssh_config))) if is_valid_host(name)]
    return [name for name in [*names, *_group_names()] if name.startswith(incomplete)]


def complete_hosts_with_files(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Complete HOST from the hosts tunneld has files for (what `status` shows)."""
    from tunneld.state.paths import known_hosts_with_files

    return [name for name in [*known_hosts_with_files(), *_group_names()] if name.startswith(incomplete)]


def _group_names() -> list[str]:
    """Return `@group` for every group of tunneld.toml (none when the file is unreadable)."""
    from tunneld.config.settings import groups

    try:
        return [f"@{name}" for name in groups()]
    except TunneldError:
        return []
