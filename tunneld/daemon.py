"""Run a host's supervisor in the foreground, and detach it with a readiness handshake (`start`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tunneld.config import resolve_host
from tunneld.engines import make_engine
from tunneld.errors import (
    EXIT_CONFIG,
    EXIT_OK,
    AlreadyRunningError,
    FatalError,
    StartupError,
    TunneldError,
    error_from_dict,
)
from tunneld.health import check_health_keys
from tunneld.logfile import configure_logging
from tunneld.notices import DesktopNotices
from tunneld.paths import HostFiles, config_dir, ensure_private_dir, open_private, state_dir
from tunneld.pidfile import (
    PidFile,
    PidRecord,
    write_json_atomic,
)
from tunneld.probes import Wakeups
from tunneld.reloading import FileConfig
from tunneld.settings import HostSettings, host_settings
from tunneld.spec import TunnelSpec
from tunneld.states import FAILED, READY_STATES
from tunneld.stopping import DEFAULT_STOP_TIMEOUT_S, reap_orphans, state_or_empty
from tunneld.supervisor import Supervisor, TunnelStatus

log = logging.getLogger(__name__)

DEFAULT_START_TIMEOUT_S = 40.0


class Notifier:
    """The child's end of the readiness handshake: progress lines, then `ready` or `failed`, then EOF."""

    def __init__(self, fd: int | None) -> None:
        self._stream = os.fdopen(fd, "w", buffering=1) if fd is not None else None

    def send(self, verb: str, payload: object) -> None:
        """Write one message; the parent may be gone already, which is fine."""
        if self._stream is None:
            return
        try:
            self._stream.write(f"{verb} {json.dumps(payload)}\n")
        except OSError:
            self._stream = None

    @property
    def open(self) -> bool:
        """True until the handshake has ended."""
        return self._stream is not None

    def close(self) -> None:
        """End the handshake (the parent sees EOF)."""
        if self._stream is not None:
            with contextlib.suppress(OSError):
                self._stream.close()
            self._stream = None


class StateReporter:
    """Publishes supervisor snapshots: the state file always, the readiness handshake until it is settled."""

    def __init__(self, files: HostFiles, notifier: Notifier) -> None:
        self.files = files
        self.notifier = notifier
        self.pid = os.getpid()
        self.notices: DesktopNotices | None = None

    def publish(self, status: TunnelStatus) -> None:
        """Write the state file; settle the handshake on the first up or on failure."""
        data = status.to_dict()
        data["pid"] = self.pid
        write_json_atomic(self.files.state, data)
        if self.notices is not None:
            self.notices.observe(status.state, status.last_error)
        if status.state in READY_STATES:
            if self.notifier.open:
                release_free_memory()
            self.notifier.send("ready", data)
            self.notifier.close()
        elif status.state == FAILED:
            self.notifier.send("failed", status.last_error)
            self.notifier.close()

    def configure_notices(self, host: str, settings: HostSettings, fail_fast: bool) -> None:
        """Desktop notifications as tunneld.toml asks (default: on for a supervisor that keeps trying)."""
        notify = settings.notify if settings.notify is not None else not fail_fast
        if not notify and self.notices is not None:
            self.notices.close()
            self.notices = None
        elif notify and self.notices is None:
            self.notices = DesktopNotices(host, settings.notify_after_s)
        elif self.notices is not None:
            self.notices.after_s = settings.notify_after_s

    def progress(self, text: str) -> None:
        """Forward a progress step to a waiting `tunneld start`."""
        self.notifier.send("progress", text)


def release_free_memory() -> None:
    """Hand the heap pages freed after startup (config parsing, imports) back to the system: ~1 MiB of RSS.

    glibc keeps freed memory for reuse; malloc_trim returns it. Elsewhere (macOS, musl) this does nothing.
    """
    import ctypes

    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).malloc_trim(0)


def run_tunnel(
    host: str,
    ssh_config: str | None,
    engine_name: str,
    fail_fast: bool = False,
    notify_fd: int | None = None,
    lock_fd: int | None = None,
    verbose: bool = False,
    managed_by: str | None = None,
) -> int:
    """Run the host's supervisor in this process until SIGTERM/SIGINT or a fatal error; return the exit code.

    Under launchd (`managed_by="launchd"`) a fatal error exits 0: KeepAlive restarts any other
    status and cannot exempt 78, so this is how "no restart loop" is kept there.
    """
    try:
        code = _run_supervised(host, ssh_config, engine_name, fail_fast, notify_fd, lock_fd, verbose)
    except FatalError:
        if managed_by != "launchd":
            raise
        code = EXIT_CONFIG
    if managed_by == "launchd" and code == EXIT_CONFIG:
        log.error("%s: exiting 0 so that launchd does not restart a tunnel that cannot work", host)
        return EXIT_OK
    return code


def _run_supervised(
    host: str,
    ssh_config: str | None,
    engine_name: str,
    fail_fast: bool,
    notify_fd: int | None,
    lock_fd: int | None,
    verbose: bool,
) -> int:
    files = HostFiles.of(host)
    configure_logging(files, verbose)
    notifier = Notifier(notify_fd)
    reporter = StateReporter(files, notifier)
    pidfile = PidFile(files)
    try:
        fd = lock_fd if lock_fd is not None else pidfile.lock()
        spec = resolve_host(host, ssh_config)
        settings = host_settings(host)
        check_health_keys(spec, settings)
        engine = make_engine(engine_name, host, settings)
    except TunneldError as error:
        notifier.send("failed", error.to_dict())
        notifier.close()
        if not isinstance(error, AlreadyRunningError):  # the CLI reports it; status shows it from here
            failed = {"host": host, "state": FAILED, "since": time.time(), "last_error": error.to_dict()}
            write_json_atomic(files.state, {**failed, "pid": os.getpid(), "forwards": [], "children": []})
        raise
    previous = state_or_empty(files)
    reap_orphans(files)
    reporter.configure_notices(host, settings, fail_fast)
    pidfile.write(PidRecord.of_current_process(host, engine.name))
    wakeups = Wakeups()
    _install_signal_handlers(wakeups)
    log.info(
        "%s: tunneld %d starting (%s engine, keepalive %ss x %s)",
        host,
        os.getpid(),
        engine.name,
        spec.keepalive_interval_s,
        spec.keepalive_count_max,
    )
    logged_in_to = previous.get("logged_in_to")
    supervisor = Supervisor(
        spec, engine, reporter, wakeups, fail_fast=fail_fast, settings=settings,
        logged_in_to=logged_in_to if isinstance(logged_in_to, str) else None,
        config=FileConfig(host, ssh_config),
        on_settings=lambda changed: reporter.configure_notices(host, changed, fail_fast),
    )  # fmt: skip
    try:
        return supervisor.run()
    except Exception as exc:  # a bug: record it where `status` looks, then crash loudly
        crash = {
            "kind": "Crash",
            "message": f"tunneld crashed: {type(exc).__name__}: {exc}",
            "at": time.time(),
            "hint": f"this is a bug; `tunneld logs {host}` has the traceback",
            "exit_code": 1,
            "retryable": False,
        }
        write_json_atomic(files.state, {**supervisor.status.to_dict(), "pid": os.getpid(), "state": FAILED,
                                        "last_error": crash, "forwards": [], "children": []})  # fmt: skip
        log.exception("%s: tunneld crashed", host)
        raise
    finally:
        notifier.close()
        pidfile.remove(os.getpid())
        os.close(fd)
        if reporter.notices is not None:  # after the pid file: nobody waits to stop a process that only notifies
            reporter.notices.close()  # flush: a fatal error's notice is shown before the process exits


def _install_signal_handlers(wakeups: Wakeups) -> None:
    """Handlers only set flags; the supervisor loop acts on them."""
    signal.signal(signal.SIGTERM, lambda *_: wakeups.request_stop())
    signal.signal(signal.SIGINT, lambda *_: wakeups.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: wakeups.request_reload())
    signal.signal(signal.SIGUSR1, lambda *_: wakeups.request_retry())


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
        "tunneld.detached",
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
