"""Text rendering for the command line: specs, status tables, durations."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from tunneld.runtime.probes import PREAUTH_LIMIT, PREAUTH_WINDOW_S
from tunneld.safetext import printable
from tunneld.state.status import HostReport, Launch
from tunneld.states import BACKOFF, DEGRADED, FORWARD_DEGRADED, IDLE, STOPPED, UP

NO_FORWARDS_WARNING = "start would refuse: no forwards (no LocalForward, RemoteForward or DynamicForward)"

if TYPE_CHECKING:
    from tunneld.config.spec import TunnelSpec


def spec_lines(spec: TunnelSpec, engine: str, recorded: Launch | None = None) -> list[str]:
    """Return `tunneld show`'s human-readable description of a spec."""
    from tunneld.config.listen import plan_spec

    via = []
    if spec.proxy_jump:
        via.append(f"ProxyJump {spec.proxy_jump}")
    if spec.proxy_command:
        via.append(f"ProxyCommand {proxy_command_shown(spec)}")
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
    ]
    lines.append(f"probes      {probe_text(spec)}")
    lines.append(f"budget      {BUDGET_TEXT}")
    if recorded is not None:
        lines.append(
            f"last start  engine {recorded.engine or '?'}, ssh_config {recorded.ssh_config or 'ssh default'} "
            "(restart reuses them unless -F or --engine says otherwise)"
        )
    if not spec.forwards:
        lines.append(f"warning     {NO_FORWARDS_WARNING}")
    reach_back = [
        f"{name} {spec.option(key)}"
        for key, name in (
            ("forwardagent", "ForwardAgent"),
            ("forwardx11", "ForwardX11"),
            ("permitlocalcommand", "PermitLocalCommand"),
        )
        if spec.option(key, "no") not in ("no", "false")
    ]
    if reach_back:
        lines.append(
            f"ignored     {', '.join(reach_back)}: the tunnel never lends your agent or display to the server "
            "and runs no local command (interactive ssh is unaffected)"
        )
    if spec.resolver != "ssh -G":
        from tunneld.config.fallback import LIMITS

        lines.append(f"warning     {LIMITS}")
    if engine == "paramiko":
        from tunneld.engines.forwarding import unsupported_forwards

        missing = unsupported_forwards(spec)
        if missing:
            lines.append(f"warning     the paramiko engine cannot serve: {', '.join(map(str, missing))} (use openssh)")
    lines.append("forwards:")
    plans = {plan.forward: plan for plan in plan_spec(spec)}
    for forward in spec.forwards:
        plan = plans.get(forward)
        lines.append(f"  {plan.describe() if plan else forward}")
        if plan and plan.skipped:
            lines.append(f"    not listening on {', '.join(plan.skipped)}")
    return lines


BUDGET_TEXT = (
    f"at most {PREAUTH_LIMIT} connections a minute may end before authentication (probes and failed attempts): "
    "OpenSSH 9.8+ blocks an address that makes more (PerSourcePenalties)"
)


def probe_text(spec: TunnelSpec) -> str:
    """Say what tunneld probes while a link is down, and when: only while TCP to the first hop fails."""
    hop = spec.first_hop()
    if hop is None and spec.proxy_jump:
        return f"none: the first ProxyJump hop ({spec.proxy_jump.split(',')[0]}) is reached through a ProxyCommand"
    if hop is None:
        return "none: behind a ProxyCommand only SSH attempts can tell when the server is back"
    host, port = hop
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    which = f"the first ProxyJump hop, {spec.proxy_jump.split(',')[0]}" if spec.proxy_jump else "the server"
    return f"TCP to {shown} ({which}) every 0.25 s, only while it refuses or does not answer TCP"


def proxy_command_shown(spec: TunnelSpec) -> str | None:
    """Return the ProxyCommand as ssh runs it: its %h, %n, %p, %r and %% expanded (None without one)."""
    from tunneld.config.tokens import expand_proxy_command, token_table

    if spec.proxy_command is None:
        return None
    return expand_proxy_command(spec.proxy_command, token_table(spec.alias, spec.hostname, spec.port, spec.user))


def spec_json(spec: TunnelSpec, engine: str, recorded: Launch | None = None) -> dict[str, object]:
    """Return `tunneld show --json`: the spec (ProxyCommand expanded, as written in `proxy_command_raw`), the engine,
    and each forward's listen addresses and exposure."""
    from tunneld.config.listen import plan_spec

    data = {**spec.to_dict(), "engine": engine, "warnings": [] if spec.forwards else [NO_FORWARDS_WARNING]}
    data["proxy_command"], data["proxy_command_raw"] = proxy_command_shown(spec), spec.proxy_command
    data["last_start"] = {"engine": recorded.engine, "ssh_config": recorded.ssh_config} if recorded else None
    hop = spec.first_hop()
    data["probes"] = {
        "first_hop": {"host": hop[0], "port": hop[1]} if hop else None,
        "when": "only while TCP to the first hop fails",
        "preauth_budget": {"connections": PREAUTH_LIMIT, "per_s": PREAUTH_WINDOW_S},
    }
    plans = {plan.forward: plan for plan in plan_spec(spec)}
    forwards = []
    for forward in spec.forwards:
        plan = plans.get(forward)
        item = forward.to_dict()
        item["listen_addresses"] = list(plan.addresses) if plan else []
        item["skipped_addresses"] = list(plan.skipped) if plan else []
        item["exposed"] = plan.exposed if plan else False
        forwards.append(item)
    data["forwards"] = forwards
    return data


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


def size(count: int) -> str:
    """Return a byte count as 512 B, 1.5 KiB, 3.2 MiB, 1.1 GiB."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], width: int | None = None) -> list[str]:
    """Return left-aligned columns separated by two spaces (the last column is not padded).

    With `width` (a terminal's), the widest columns are cut first (with `…`) until a line fits, never the first two
    (HOST and STATE) and none below its header's width.
    """
    rows = [[printable(str(cell)) for cell in row] for row in rows]  # cells quote state files and servers
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    marker = ellipsis(sys.stdout)
    for _ in range(sum(widths)):  # one column one character narrower per round: bounded by the table's width
        if width is None or sum(widths) + 2 * (len(widths) - 1) <= width:
            break
        cuttable = [i for i in range(2, len(widths)) if widths[i] > max(len(header[i]), len(marker))]
        if not cuttable:
            break
        widths[max(cuttable, key=lambda i: widths[i])] -= 1
    out = []
    for row in [header, *rows]:
        cells = [cell if len(cell) <= widths[i] else cell[: widths[i] - len(marker)] + marker
                 for i, cell in enumerate(row)]  # fmt: skip
        out.append("  ".join([*(cell.ljust(widths[i]) for i, cell in enumerate(cells[:-1])), cells[-1]]).rstrip())
    return out


def columns(rows: Sequence[Sequence[str]]) -> list[str]:
    """Return `rows` as `table` draws them, without a header and without cutting anything (`list`, `stop @GROUP`)."""
    if not rows:
        return []
    return table([printable(str(cell)) for cell in rows[0]], rows[1:])


def ellipsis(stream: TextIO) -> str:
    """Return `…`, or `...` where the stream's encoding cannot write it."""
    try:
        "…".encode(getattr(stream, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "..."
    return "…"


def terminal_width(stream: TextIO | None = None) -> int | None:
    """Return the width of the terminal `stream` (stdout) writes to; None for a pipe or a file (they keep every
    character) or a terminal that does not know its size."""
    stream = stream or sys.stdout
    try:
        columns = os.get_terminal_size(stream.fileno()).columns if stream.isatty() else 0
    except (OSError, ValueError):
        columns = 0
    return columns or None


STATUS_HEADER = ("HOST", "STATE", "PID", "UPTIME", "FORWARDS", "RECONNECTS", "AUTOSTART", "LAST ERROR")


def forward_text(forward: dict[str, object]) -> str:
    """Return `listen, listen -> target` with every real listen address, exposure, health, and why it is degraded."""
    listen = forward.get("listen")
    shown = ", ".join(map(str, listen)) if isinstance(listen, list) and listen else "?"
    arrow = "<-" if str(forward.get("forward", "")).startswith("remote ") else "->"  # as `show` writes it
    text = f"{shown} {arrow} {forward.get('target')}"
    if forward.get("exposed"):
        text += " (reachable from the network)"
    total, bytes_in, bytes_out = forward.get("total_connections"), forward.get("bytes_in"), forward.get("bytes_out")
    if isinstance(total, int) and isinstance(bytes_in, int) and isinstance(bytes_out, int):
        text += f" [{forward.get('open_connections')}/{total} conns, in {size(bytes_in)}, out {size(bytes_out)}]"
    health = forward.get("health")
    if forward.get("state") == FORWARD_DEGRADED:
        text += f" (degraded: {forward.get('detail')})"
    elif isinstance(health, dict) and health.get("configured"):
        text += f" (health: {health.get('detail')}, {health.get('latency_ms')} ms)"
    return text


def status_row(report: HostReport) -> list[str]:
    """Return one row of the status table."""
    forwards = ", ".join(forward_text(f) for f in report.forwards) or "-"
    error = "-"
    if report.last_error and report.state not in (UP, DEGRADED, STOPPED):
        error = str(report.last_error.get("message", "-"))
    state = report.state
    if report.config_changed_since:
        state += " (config changed since)"
    if report.config_changed:
        state += " (older config: tunneld reload)"
    if report.state == IDLE:
        state += " (on demand)"
    if report.next_try_at and report.state == BACKOFF:
        state += f" (retry in {max(0.0, report.next_try_at - time.time()):.0f}s)"
    return [
        report.host,
        state,
        str(report.pid) if report.running and report.pid else "-",
        duration(report.uptime_s),
        forwards,
        str(report.reconnects),
        report.autostart or "-",
        error,
    ]


def status_lines(reports: Sequence[HostReport], width: int | None = None) -> list[str]:
    """Return the whole status table (fitted to `width`, a terminal's, when given)."""
    return table(STATUS_HEADER, [status_row(r) for r in reports], width)


def step_line(name: str, verdict: str, detail: str) -> str:
    """Return one line of `tunneld check`."""
    return f"[{verdict:^4}] {name:<10} {printable(detail)}"
