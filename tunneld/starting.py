"""Start one host or many: each detached with its readiness handshake, several at once within a bound.

sshd drops unauthenticated connections at random beyond MaxStartups (10 by default), so hosts are
started at most START_CONCURRENCY at a time: 50 hosts on one server come up in seconds and none
fails by chance. Each host's result is reported in one piece, `[N/M]` as it ends.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from tunneld.errors import EXIT_OK, TunneldError, report_error

START_CONCURRENCY = 8
Echo = Callable[[str, bool], None]


@dataclass(frozen=True)
class StartOptions:
    """How `start` (and `restart`) bring a host up."""

    ssh_config: str | None
    engine: str
    timeout: float
    verbose: bool = False
    keep_trying: bool = False


def start_host(host: str, options: StartOptions, progress: Callable[[str], None] | None) -> list[str]:
    """Start `host` detached and return the lines that report it (raise its TunneldError when it fails)."""
    from tunneld.autostart.managed import start_managed
    from tunneld.config import resolve_host
    from tunneld.daemon import start_tunnel
    from tunneld.render import forward_text
    from tunneld.safetext import printable

    result = start_managed(host, options.timeout, progress) or start_tunnel(  # systemd/launchd own an autostarted host
        resolve_host(host, options.ssh_config), options.engine, options.timeout, progress, options.verbose,
        options.keep_trying,
    )  # fmt: skip
    if result.pending:
        return [
            f"{host}  {result.state.get('state', 'starting')}: not up yet, still trying in the background "
            f"(pid {result.pid}); see: tunneld status {host}"
        ]
    forwards = result.state.get("forwards")
    shown = ", ".join(forward_text(f) for f in forwards if isinstance(f, dict)) if isinstance(forwards, list) else ""
    return [
        printable(f"{host}  {result.state.get('state')}  {shown}  (pid {result.pid}, {result.elapsed_s:.1f} s)"),
        f"stop it with: tunneld stop {host}",
    ]


def start_hosts(hosts: list[str], options: StartOptions, echo: Echo) -> int:
    """Start every host (one alone with progress on a terminal; several up to START_CONCURRENCY at once),
    report each, and return the worst exit code."""
    if len(hosts) == 1:
        host = hosts[0]
        progress = (lambda text: echo(f"  {host}: {text}...", True)) if sys.stderr.isatty() else None
        return _report(lambda: start_host(host, options, progress), echo)

    def one(host: str) -> tuple[int, list[tuple[str, bool]]]:
        said: list[tuple[str, bool]] = []
        code = _report(lambda: start_host(host, options, None), lambda text, err: said.append((text, err)))
        return code, [(f"{host}: {text}" if err else text, err) for text, err in said]

    worst = EXIT_OK
    with ThreadPoolExecutor(max_workers=min(START_CONCURRENCY, len(hosts)), thread_name_prefix="start") as pool:
        futures = [pool.submit(one, host) for host in hosts]
        for done, future in enumerate(as_completed(futures), start=1):
            code, said = future.result()
            for text, to_stderr in said:
                echo(f"[{done}/{len(hosts)}] {text}", to_stderr)
            worst = max(worst, code)
    return worst


def _report(attempt: Callable[[], list[str]], echo: Echo) -> int:
    try:
        lines = attempt()
    except TunneldError as error:
        return report_error(error, echo)
    for line in lines:
        echo(line, False)
    return EXIT_OK
