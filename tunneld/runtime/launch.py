"""Start a host's supervisor in the background and wait until it is up: through its service manager when
autostart owns the host, else detached (`python -m tunneld.runtime.detached`) with a readiness handshake on a
pipe. Also: hand a supervisor that waits for credentials the ones this shell has, and ask it to retry now.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from tunneld.config.keys import probe_agent
from tunneld.config.resolve import resolve_host
from tunneld.config.spec import TunnelSpec
from tunneld.errors import (
    EXIT_OK,
    EXIT_UNAVAILABLE,
    AlreadyRunningError,
    NeedsAuthError,
    StartupError,
    TunneldError,
    error_from_dict,
)
from tunneld.runtime.stopping import DEFAULT_STOP_TIMEOUT_S, state_or_empty
from tunneld.state.paths import HostFiles, config_dir, ensure_private_dir, open_private, state_dir
from tunneld.state.pidfile import PidFile, PidRecord, process_matches
from tunneld.state.status import HostReport, collect, not_ready_error, wait_until_up
from tunneld.states import NEEDS_AUTH, READY_STATES

if TYPE_CHECKING:
    from tunneld.autostart.managed import ManagedStart

DEFAULT_START_TIMEOUT_S = 40.0
HANDOVER_TIMEOUT_S = 30.0
HANDOVER_POLL_S = 0.2


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


def launch_host(
    host: str, options: StartOptions, progress: Callable[[str], None] | None, spec: TunnelSpec | None = None
) -> StartResult | ManagedStart:
    """Start `host` through its service manager (autostart owns it) or detached, and return once it is up (or, with
    `options.keep_trying`, still trying); raise its TunneldError otherwise. `spec` spares resolving the host again."""
    from tunneld.autostart.managed import start_managed

    try:
        return start_managed(host, options.timeout, progress) or start_tunnel(
            spec or resolve_host(host, options.ssh_config), options.engine, options.timeout, progress,
            options.verbose, options.keep_trying,
        )  # fmt: skip
    except TunneldError as error:
        if error.exit_code == EXIT_UNAVAILABLE and not options.keep_trying and not collect(host).running:
            error.hint = fail_fast_hint(host, options.ssh_config, error.hint)
        raise


def managed(host: str) -> bool:
    """True when systemd or launchd starts `host` (its autostart manifest says so)."""
    from tunneld.state.manifests import read_manifest

    with contextlib.suppress(TunneldError):
        manifest = read_manifest(host)
        return manifest is not None and manifest.via in ("systemd", "launchd")
    return False


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


def waiting_for_credentials(host: str) -> bool:
    """True when the host's supervisor waits in needs-auth."""
    return collect(host).state == NEEDS_AUTH


def retry_waiting(host: str, timeout: float = HANDOVER_TIMEOUT_S) -> HostReport:
    """Ask the host's running supervisor to try logging in now (a new login connection, or a key just loaded) and
    return its report once that attempt ended in a ready state. A host that waits for credentials again (the attempt
    was refused, or refused logins wait for the next minute) raises its NeedsAuthError, at once; any other outcome,
    or none within `timeout`, raises a TunneldError naming the state."""
    before = collect(host)
    retry_now(host)
    deadline = time.monotonic() + timeout
    report = before
    while time.monotonic() < deadline:
        report = collect(host)
        waiting_again = report.state == NEEDS_AUTH and (report.since != before.since or report.next_try_at)
        if report.state in READY_STATES or not report.running or waiting_again:
            break
        time.sleep(HANDOVER_POLL_S)
    if report.state in READY_STATES:
        return report
    if report.state == NEEDS_AUTH and report.last_error:
        error = error_from_dict(report.last_error)
        if report.next_try_at:
            error.message += f" (the next login attempt waits {max(0.0, report.next_try_at - time.time()):.0f} s: "
            error.message += "logins were refused twice in the last minute)"
        raise error
    message = report.last_error.get("message") if report.last_error else None
    raise TunneldError(
        f"{host} is {report.state} after the retry" + (f": {message}" if message else ""),
        f"see `tunneld logs {host}`",
    )


def retry_now(host: str) -> bool:
    """Ask the host's running supervisor to retry at once (SIGUSR1), if it is really tunneld; True when asked."""
    record = PidFile(HostFiles.of(host)).read()
    if record is None or not process_matches(record.pid, record.create_time):
        return False
    os.kill(record.pid, signal.SIGUSR1)
    return True


def hand_agent_over(host: str, identity_agent: str | None) -> None:
    """Tell the host's supervisor which agent this shell has (it may have been started after the tunnel, at a new
    SSH_AUTH_SOCK): it uses it when it is an agent of this user's and the host takes its agent from SSH_AUTH_SOCK."""
    from tunneld.state.pidfile import write_json_atomic

    path = os.environ.get("SSH_AUTH_SOCK")
    if identity_agent in (None, "SSH_AUTH_SOCK") and path and probe_agent(path).reachable:
        write_json_atomic(HostFiles.of(host).agent, {"ssh_auth_sock": path})


@dataclass(frozen=True)
class Ensured:
    """A host that `ensure_host` found up or brought up: its report, and the start it made."""

    report: HostReport
    started: StartResult | ManagedStart | None = None  # None: a running tunnel was reused


def ensure_host(
    host: str, options: StartOptions, healthy: bool = True, progress: Callable[[str], None] | None = None
) -> Ensured:
    """Start `host` unless its tunnel runs, then wait until it is up (with `healthy`, until its configured health
    checks pass, as `tunneld wait` does), all within `options.timeout`; raise a TunneldError otherwise.

    What `exec` and the Python API's `ensure()` do: the same detached supervisor as `start`.
    """
    from tunneld.state.paths import validate_host

    deadline = time.monotonic() + options.timeout
    started: StartResult | ManagedStart | None = None
    if waiting_for_credentials(validate_host(host)):  # as `start` does: this shell's agent, and one login attempt
        hand_agent_over(host, resolve_host(host, options.ssh_config).identity_agent)
        try:
            retry_waiting(host, max(0.0, deadline - time.monotonic()))
        except NeedsAuthError:
            raise
        except TunneldError:  # not up within the caller's time: said by the wait below, which has none left
            pass
    elif not collect(host).running:
        with contextlib.suppress(AlreadyRunningError):  # another start won the race: wait for that one
            started = launch_host(host, options, progress)
    up, report = wait_until_up(host, max(0.0, deadline - time.monotonic()), healthy)
    if not up:
        raise not_ready_error(report, options.timeout)
    return Ensured(report, started)


@dataclass(frozen=True)
class StartResult:
    """A tunnel that came up in the background."""

    pid: int
    state: dict[str, object]
    elapsed_s: float
    pending: bool = False  # --keep-trying: not up yet, still trying in the background


def start_tunnel(
    spec: TunnelSpec,
    engine_name: str,
    timeout: float = DEFAULT_START_TIMEOUT_S,
    on_progress: Callable[[str], None] | None = None,
    verbose: bool = False,
    keep_trying: bool = False,
) -> StartResult:
    """Detach `tunneld run HOST` in a new session and return once it reports ready; raise its error otherwise.

    With `keep_trying` (autostart at login, when the network may not be up yet) a transient
    failure is retried in the background, and a timeout leaves the tunnel running.
    """
    began = time.monotonic()
    deadline = began + timeout
    files = HostFiles.of(spec.alias)
    pidfile = PidFile(files)
    lock_fd = pidfile.claim(deadline)
    if pidfile.exists():
        pidfile.remove(0)  # we hold the lock: whatever the old pid file said, nothing runs
    read_fd, write_fd = os.pipe()
    argv = [
        sys.executable,
        "-m",
        "tunneld.runtime.detached",
        spec.alias,
        "--engine",
        engine_name,
        *([] if keep_trying else ["--fail-fast"]),
        "--notify-fd",
        str(write_fd),
        "--lock-fd",
        str(lock_fd),
        "--state-dir",
        str(state_dir()),
        "--config-dir",
        str(config_dir()),
    ]
    if spec.ssh_config:
        argv += ["-F", spec.ssh_config]
    if verbose:
        argv.append("--verbose")
    with _open_private(files.log) as log_stream:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_stream,
            stderr=log_stream,
            pass_fds=(write_fd, lock_fd),
            start_new_session=True,
        )
    os.close(write_fd)
    try:
        _record_child(pidfile, child.pid, lock_fd)
        state = _await_ready(spec.alias, child, read_fd, deadline - time.monotonic(), on_progress)
    except StartupError:
        if keep_trying and child.poll() is None:
            return StartResult(child.pid, state_or_empty(files), time.monotonic() - began, pending=True)
        _abandon(child, pidfile)
        raise
    except BaseException:
        _abandon(child, pidfile)
        raise
    finally:
        os.close(read_fd)
    return StartResult(child.pid, state, time.monotonic() - began)


def _record_child(pidfile: PidFile, pid: int, lock_fd: int) -> None:
    """Record the child in the pid file while the lock is still ours too, then let the child hold it alone.

    A `stop` meeting this start finds the child at once, long before the child has resolved its
    config and records itself.
    """
    try:
        record = PidRecord.of_child(pid, pidfile.files.host)
        if record is not None and not pidfile.exists():
            pidfile.write(record)
    finally:
        os.close(lock_fd)


def _abandon(child: subprocess.Popen[bytes], pidfile: PidFile) -> None:
    """Stop a child that did not come up, and remove the record this start wrote for it."""
    _terminate(child)
    pidfile.remove(child.pid)


@contextlib.contextmanager
def _open_private(path: Path) -> Iterator[IO[bytes]]:
    ensure_private_dir(path.parent)
    with os.fdopen(open_private(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab") as stream:
        yield stream


def _await_ready(
    host: str, child: subprocess.Popen[bytes], read_fd: int, timeout: float, on_progress: Callable[[str], None] | None
) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    buffer = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise StartupError(
                f"{host} did not come up within {timeout:.0f} s",
                f"see `tunneld logs {host}`; raise the limit with --timeout",
            )
        readable, _, _ = select.select([read_fd], [], [], remaining)
        if not readable:
            continue
        chunk = os.read(read_fd, 65536)
        if not chunk:
            returncode = child.wait(timeout=5)
            if returncode in (EXIT_OK, -signal.SIGTERM):
                raise StartupError(
                    f"{host} was stopped before it was up (tunneld stop, or SIGTERM)",
                    f"start it again with: tunneld start {host}",
                )
            raise StartupError(
                f"the tunnel process for {host} exited with status {returncode} before it was up",
                f"see `tunneld logs {host}`",
            )
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            verb, _, payload = line.decode().partition(" ")
            data = json.loads(payload) if payload else None
            if verb == "progress" and on_progress is not None:
                on_progress(str(data))
            elif verb == "ready" and isinstance(data, dict):
                return data
            elif verb == "failed":
                child.wait(timeout=10)
                raise error_from_dict(data if isinstance(data, dict) else {})


def _terminate(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(DEFAULT_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
