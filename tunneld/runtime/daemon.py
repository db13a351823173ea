"""Run a host's supervisor: resolve, lock, log, report state, handle signals (`tunneld run` and the detached child).

`runtime.launch` starts it in the background and waits for its readiness handshake."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time

from tunneld.config.resolve import resolve_host
from tunneld.config.settings import HostSettings, host_settings
from tunneld.engines import make_engine
from tunneld.errors import EXIT_CONFIG, EXIT_OK, AlreadyRunningError, FatalError, TunneldError
from tunneld.runtime.health import check_health_keys
from tunneld.runtime.notices import DesktopNotices
from tunneld.runtime.probes import Wakeups
from tunneld.runtime.reloading import FileConfig
from tunneld.runtime.stopping import reap_orphans, state_or_empty
from tunneld.runtime.supervisor import Supervisor, TunnelStatus
from tunneld.state.logfile import configure_logging
from tunneld.state.paths import HostFiles
from tunneld.state.pidfile import PidFile, PidRecord, write_json_atomic
from tunneld.states import FAILED, READY_STATES

log = logging.getLogger(__name__)


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
