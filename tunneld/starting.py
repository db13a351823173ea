"""Start one host or many: each detached with its readiness handshake, several at once within a bound.

sshd drops unauthenticated connections at random beyond MaxStartups (10 by default), so hosts are
started at most START_CONCURRENCY at a time: 50 hosts on one server come up in seconds and none
fails by chance. Each host's result is reported in one piece, `[N/M]` as it ends.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tunneld.errors import EXIT_OK, EXIT_UNAVAILABLE, AlreadyRunningError, TunneldError, report_error

if TYPE_CHECKING:
    from tunneld.autostart.managed import ManagedStart
    from tunneld.daemon import StartResult
    from tunneld.status import HostReport

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
    # On a terminal, a key that needs a passphrase is offered to ssh-add, and a host that takes only a password
    # or a code is logged in interactively (`tunneld login`); off for several hosts at once, and with --no-prompt.
    prompt: bool = False


def start_host(host: str, options: StartOptions, progress: Callable[[str], None] | None) -> list[str]:
    """Start `host` detached and return the lines that report it (raise its TunneldError when it fails).

    A host that waits for credentials (needs-auth) is asked to try again now instead. On a terminal (with
    `options.prompt`), credentials that need the user are asked for there, by ssh-add or ssh.
    """
    from tunneld.autostart.managed import start_managed
    from tunneld.config import resolve_host
    from tunneld.daemon import start_tunnel
    from tunneld.drift import config_drift, drift_note
    from tunneld.errors import AuthError
    from tunneld.login import login_host, offer_ssh_add, on_terminal, waiting_for_credentials
    from tunneld.status import collect, ssh_config_for

    if waiting_for_credentials(host):
        return _retry_waiting(host, options)
    spec = resolve_host(host, options.ssh_config) if not _managed(host) else None

    def attempt() -> list[str]:
        try:
            result = start_managed(host, options.timeout, progress) or start_tunnel(  # systemd/launchd: autostart
                spec or resolve_host(host, options.ssh_config), options.engine, options.timeout, progress,
                options.verbose, options.keep_trying,
            )  # fmt: skip
        except TunneldError as error:
            if error.exit_code == EXIT_UNAVAILABLE and not options.keep_trying and not collect(host).running:
                error.hint = fail_fast_hint(host, options.ssh_config, error.hint)
            raise
        return _started_lines(host, result)

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


def _managed(host: str) -> bool:
    from tunneld.autostart import read_manifest

    with contextlib.suppress(TunneldError):
        manifest = read_manifest(host)
        return manifest is not None and manifest.via in ("systemd", "launchd")
    return False


def _started_lines(host: str, result: StartResult | ManagedStart) -> list[str]:
    from tunneld.render import forward_text
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
    from tunneld.config import resolve_host
    from tunneld.errors import AuthError, error_from_dict
    from tunneld.login import hand_agent_over, hand_over, login_host, offer_ssh_add, on_terminal
    from tunneld.status import collect

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


def _stderr(text: str, _to_stderr: bool) -> None:
    print(text, file=sys.stderr, flush=True)


_RETRY_CLAUSE = re.compile(r"(?:[;,]\s*|(?<=[?.!])\s+|^)tunneld (?:keeps|waits|reconnects|retries)\b[^;]*")


def fail_fast_hint(host: str, ssh_config: str | None, hint: str | None) -> str:
    """The hint of a plain `start` that could not reach the server (exit 69): nothing is left running, so the engine's
    "tunneld keeps retrying" is untrue; keep the rest of its hint and name the way to keep trying."""
    kept = _RETRY_CLAUSE.sub("", hint or "").strip().rstrip(";,").strip()
    command = shlex.join(["tunneld", "start", host, *(["-F", ssh_config] if ssh_config else []), "--keep-trying"])
    advice = f"nothing is left running: to keep retrying in the background until the server answers, run `{command}`"
    if not kept:
        return advice
    return f"{kept} {advice[0].upper()}{advice[1:]}" if kept.endswith(("?", ".")) else f"{kept}; {advice}"


@dataclass(frozen=True)
class Ensured:
    """A host that `ensure_host` found up or brought up: its report, and the lines of the start it made."""

    report: HostReport
    started: tuple[str, ...] = ()  # empty: a running tunnel was reused


def ensure_host(
    host: str, options: StartOptions, healthy: bool = True, progress: Callable[[str], None] | None = None
) -> Ensured:
    """Start `host` unless its tunnel runs, then wait until it is up (with `healthy`, until its configured health
    checks pass, as `tunneld wait` does), all within `options.timeout`; raise a TunneldError otherwise.

    What `exec` and the Python API's `ensure()` do: the same detached supervisor as `start`.
    """
    from tunneld.paths import validate_host
    from tunneld.status import collect, not_ready_error, wait_until_up

    deadline = time.monotonic() + options.timeout
    started: list[str] = []
    if not collect(validate_host(host)).running:
        with contextlib.suppress(AlreadyRunningError):  # another start won the race: wait for that one
            started = start_host(host, options, progress)
    up, report = wait_until_up(host, max(0.0, deadline - time.monotonic()), healthy)
    if not up:
        raise not_ready_error(report, options.timeout)
    return Ensured(report, tuple(started))


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
