"""Start one host or many: each detached with its readiness handshake, several at once within a bound.

sshd drops unauthenticated connections at random beyond MaxStartups (10 by default), so hosts are
started at most START_CONCURRENCY at a time: 50 hosts on one server come up in seconds and none
fails by chance. Each host's result is reported in one piece, `[N/M]` as it ends.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TYPE_CHECKING

from tunneld.errors import EXIT_OK, AlreadyRunningError, TunneldError, report_error

if TYPE_CHECKING:  # runtime.launch resolves ssh_config and reaches the engines: `tunneld status` never loads it
    from tunneld.autostart.managed import ManagedStart
    from tunneld.runtime.launch import StartOptions, StartResult

START_CONCURRENCY = 8
Echo = Callable[[str, bool], None]


def start_host(host: str, options: StartOptions, progress: Callable[[str], None] | None) -> list[str]:
    """Start `host` detached and return the lines that report it (raise its TunneldError when it fails).

    A host that waits for credentials (needs-auth) is asked to try again now instead. On a terminal (with
    `options.prompt`), credentials that need the user are asked for there, by ssh-add or ssh.
    """
    from tunneld.cli.drift import config_drift, drift_note
    from tunneld.cli.login import offer_ssh_add, on_terminal
    from tunneld.config.resolve import resolve_host
    from tunneld.errors import AuthError
    from tunneld.runtime.launch import launch_host, managed, waiting_for_credentials
    from tunneld.state.status import ssh_config_for

    if waiting_for_credentials(host):
        return _retry_waiting(host, options)
    spec = resolve_host(host, options.ssh_config) if not managed(host) else None

    def attempt() -> list[str]:
        return started_lines(host, launch_host(host, options, progress, spec))

    try:
        return attempt()
    except AlreadyRunningError as error:
        changes = config_drift(host, ssh_config_for(host, options.ssh_config))
        if changes:
            raise AlreadyRunningError(host, error.pid, drift_note(host, changes)) from None
        raise
    except AuthError as error:
        if not (options.prompt and on_terminal()) or spec is None:
            raise
        if error.locked and offer_ssh_add(error, spec.identity_agent, _stderr):
            return attempt()
        if error.interactive and not error.locked:
            return login_host(host, options.ssh_config, options.engine, _stderr)
        raise


def started_lines(host: str, result: StartResult | ManagedStart) -> list[str]:
    from tunneld.cli.render import forward_text
    from tunneld.safetext import printable

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


def _retry_waiting(host: str, options: StartOptions) -> list[str]:
    """The host's supervisor waits for credentials: load a locked key or log in first where the terminal allows,
    then ask it to try once now (SIGUSR1) and report what came of it."""
    from tunneld.cli.login import offer_ssh_add, on_terminal
    from tunneld.config.resolve import resolve_host
    from tunneld.errors import AuthError, error_from_dict
    from tunneld.runtime.launch import hand_agent_over
    from tunneld.state.status import collect

    waiting = collect(host).last_error or {}
    error = error_from_dict(waiting)
    spec = resolve_host(host, options.ssh_config)
    if options.prompt and on_terminal() and isinstance(error, AuthError):
        if error.interactive and not error.locked:
            return login_host(host, options.ssh_config, "openssh", _stderr)
        if error.locked:
            offer_ssh_add(error, spec.identity_agent, _stderr)
    hand_agent_over(host, spec.identity_agent)
    return hand_over(host, options.ssh_config, _stderr)


def login_host(host: str, ssh_config: str | None, engine: str, echo: Echo) -> list[str]:
    """Log in to `host` interactively and hand the connection to its tunnel; return the lines that report it."""
    from tunneld.cli.login import log_in

    log_in(host, ssh_config, engine, echo)
    return hand_over(host, ssh_config, echo)


def hand_over(host: str, ssh_config: str | None, echo: Echo) -> list[str]:
    """Ask the host's supervisor to try logging in now (a new login connection, or a key just loaded), or start one
    when none runs; report the outcome of that one attempt. A host that waits for credentials again (the attempt
    was refused, or refused logins wait for the next minute) is its NeedsAuthError (exit 78), at once."""
    from tunneld.cli.render import forward_text
    from tunneld.runtime.launch import HANDOVER_TIMEOUT_S, StartOptions, retry_waiting
    from tunneld.safetext import printable
    from tunneld.state.status import collect

    if not collect(host).running:
        return start_host(host, StartOptions(ssh_config, "openssh", HANDOVER_TIMEOUT_S), None)
    report = retry_waiting(host)
    shown = ", ".join(forward_text(f) for f in report.forwards)
    return [printable(f"{host}  {report.state}  {shown}  (pid {report.pid})")]


def _stderr(text: str, _to_stderr: bool) -> None:
    print(text, file=sys.stderr, flush=True)


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
