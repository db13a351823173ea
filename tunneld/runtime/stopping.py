"""Stop a host's tunnel by its pid file (only ever the process recorded there), reap what a killed tunneld left
behind, and forget the files of hosts that are not running."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tunneld.engines.master import stop_master
from tunneld.errors import CorruptFileError, NotRunningError, TunneldError
from tunneld.state.paths import HostFiles, hosts_with_locks, known_hosts_with_files
from tunneld.state.pidfile import (
    PidFile,
    PidRecord,
    foreign_owner,
    process_matches,
    read_json,
    terminate,
    write_json_atomic,
)
from tunneld.states import STOPPED

log = logging.getLogger(__name__)

DEFAULT_STOP_TIMEOUT_S = 10.0
ORPHAN_GRACE_S = 3.0
STARTING_POLL_S = 0.02


def reap_orphans(files: HostFiles) -> None:
    """Stop helper processes (ssh) that a previous, killed tunneld of this host left running.

    Only a process that is still exactly what was recorded (pid, create time, user, command line) is
    signalled: an edited state file cannot get another process killed.
    """
    try:
        previous = read_json(files.state, files.host) or {}
    except CorruptFileError as error:
        log.warning("%s: %s: not looking for processes left behind", files.host, error.message)
        return
    children = previous.get("children")
    for child in children if isinstance(children, list) else []:
        pid, created, cmdline = child.get("pid"), child.get("create_time"), child.get("cmdline")
        if not (isinstance(pid, int) and isinstance(created, float) and isinstance(cmdline, list) and cmdline):
            continue
        if process_matches(pid, created, [str(arg) for arg in cmdline]):
            log.warning(
                "%s: stopping %s (pid %d) left behind by a previous tunneld", files.host, child.get("name"), pid
            )
            terminate(pid, created, ORPHAN_GRACE_S, [str(arg) for arg in cmdline])


@dataclass(frozen=True)
class StopResult:
    """What `stop` did for one host."""

    host: str
    pid: int | None
    killed: bool = False
    stale: bool = False


def stop_tunnel(host: str, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> StopResult:
    """SIGTERM the host's tunnel, SIGKILL it after `timeout`; raise NotRunningError when none runs.

    Only the process the pid file names *and* that is still that tunneld (create time, user,
    command line) is signalled; anything else is a stale pid file, removed and reported. A start in
    progress is stopped too, once it has recorded the process it started. The stop holds the host's
    stop lock throughout, so that a start meeting the stopping tunneld waits for it instead.
    """
    from tunneld.autostart.managed import stop_managed

    if (stopped := stop_managed(host)) is not None:  # systemd/launchd own an autostarted host: they stop it
        return StopResult(host, stopped)
    files = HostFiles.of(host)
    pidfile = PidFile(files)
    if not pidfile.exists() and not os.path.lexists(files.lock):
        if stop_master(files):  # only the login connection of `tunneld login` was left
            return StopResult(host, None)
        raise NotRunningError(f"{host} is not running")  # never started: no files to make for it
    try:
        with pidfile.stopping(timeout):
            return _stop(files, pidfile, timeout)
    finally:
        stop_master(files)  # the supervisor ends it; one a killed supervisor left behind ends here


def _stop(files: HostFiles, pidfile: PidFile, timeout: float) -> StopResult:
    host = files.host
    try:
        record = pidfile.read()
    except CorruptFileError as error:
        if pidfile.held_by_someone():
            raise CorruptFileError(
                files.pid,
                f"{error.message.split(': ', 1)[-1]}; and a tunneld of {host} is running (it holds {files.lock})",
            ) from error
        pidfile.remove(0)
        _mark_stopped(files)
        return StopResult(host, None, stale=True)
    if record is None or not record.is_live():
        record = _starting(files, pidfile, timeout) or record
    if record is not None and (owner := foreign_owner(record.pid, record.create_time)):
        raise TunneldError(
            f"{files.pid} names pid {record.pid}, a process of user {owner}: "
            "tunneld never signals another user's process",
            f"if no tunnel of yours runs for {host}, remove {files.pid}",
        )
    if record is None or not record.is_live():
        if not pidfile.exists():
            raise NotRunningError(f"{host} is not running")
        reap_orphans(files)
        pidfile.remove(record.pid if record else 0)
        _mark_stopped(files)
        return StopResult(host, record.pid if record else None, stale=True)
    killed = terminate(record.pid, record.create_time, timeout)
    if killed:
        reap_orphans(files)
    if killed or state_or_empty(files).get("pid") != record.pid:  # killed, or stopped before it wrote a state
        _mark_stopped(files)
    pidfile.remove(record.pid)
    return StopResult(host, record.pid, killed=killed)


def _starting(files: HostFiles, pidfile: PidFile, timeout: float) -> PidRecord | None:
    """Return the process of a start in progress, or None when no start holds the host's lock.

    `start` takes the lock, then launches the tunneld and records it in the pid file: wait up to
    `timeout` for that record (a foreground `tunneld run` records itself once its config is resolved).
    """
    deadline = time.monotonic() + timeout
    while pidfile.held_by_someone():
        with contextlib.suppress(CorruptFileError):
            record = pidfile.read()
            if record is not None and record.is_live():
                return record
        if time.monotonic() >= deadline:
            raise TunneldError(
                f"{files.host} is starting (a process holds {files.lock}) but no tunneld is recorded in "
                f"{files.pid} after {timeout:g} s",
                f"try `tunneld stop {files.host}` again in a moment",
            )
        time.sleep(STARTING_POLL_S)
    return None


def stoppable_hosts() -> list[str]:
    """Return the hosts `stop --all` stops: running, with a stale pid file, or starting (a first start holds
    the host's lock before any pid file names its tunneld)."""
    from tunneld.state.status import STALE, collect

    found = []
    for host in sorted({*known_hosts_with_files(), *hosts_with_locks()}):
        report = collect(host)
        if report.running or report.state == STALE or PidFile(HostFiles.of(host)).held_by_someone():
            found.append(host)
    return found


def forget_host(host: str) -> list[Path]:
    """Remove the pid, state, lock and log files of a host that is not running; return what was removed.

    The host's lock decides: a running tunneld holds it, and then nothing is touched.
    """
    files = HostFiles.of(host)
    pidfile = PidFile(files)
    fd = pidfile.lock()  # AlreadyRunningError while a tunneld runs for the host
    try:
        removed = []
        logs = sorted(files.directory.glob(f"{host}.log.*"))
        for path in (files.pid, files.state, files.log, files.master_log, *logs):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
        files.stopping.unlink(missing_ok=True)
        files.lock.unlink(missing_ok=True)
        return removed
    finally:
        os.close(fd)


def state_or_empty(files: HostFiles) -> dict[str, object]:
    """Return the host's state file, or {} when there is none or it is corrupt."""
    try:
        return read_json(files.state, files.host) or {}
    except CorruptFileError:
        return {}


def _mark_stopped(files: HostFiles) -> None:
    data = state_or_empty(files)
    if data.get("state") != STOPPED:
        data.update(host=files.host, state=STOPPED, since=time.time(), forwards=[], children=[])
        write_json_atomic(files.state, data)
