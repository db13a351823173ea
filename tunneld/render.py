"""Text rendering for the command line: specs, status tables, durations."""

from __future__ import annotations

from collections.abc import Sequence

from tunneld.config import TunnelSpec


def spec_lines(spec: TunnelSpec, engine: str) -> list[str]:
    """Return `tunneld show`'s human-readable description of a spec."""
    via = []
    if spec.proxy_jump:
        via.append(f"ProxyJump {spec.proxy_jump}")
    if spec.proxy_command:
        via.append(f"ProxyCommand {spec.proxy_command}")
    keepalive_origin = "from your ssh_config" if spec.keepalive_from_user else "tunneld's default"
    lines = [
        f"host        {spec.alias}",
        f"connects to {spec.user}@{spec.hostname}:{spec.port}" + (f" via {'; '.join(via)}" if via else ""),
        f"engine      {engine}",
        f"keepalive   every {spec.keepalive_interval_s} s, {spec.keepalive_count_max} missed = lost "
        f"({keepalive_origin})",
        f"host keys   StrictHostKeyChecking {spec.strict_host_key_checking}; "
        f"known_hosts {' '.join(spec.user_known_hosts_files) or 'none'}",
        f"resolved by {spec.resolver}" + (f" -F {spec.ssh_config}" if spec.ssh_config else ""),
        "forwards:",
    ]
    lines += [f"  {forward}" for forward in spec.forwards]
    return lines


def duration(seconds: float | None) -> str:
    """Return a compact duration: 45s, 3m05s, 2h13m, 1d04h."""
    if seconds is None:
        return "-"
    total = int(seconds)
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Return left-aligned columns separated by two spaces (the last column is not padded)."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    out = []
    for row in [header, *rows]:
        cells = [str(cell).ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        out.append("  ".join([*cells, str(row[-1])]).rstrip())
    return out
