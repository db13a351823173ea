"""`start`, `stop` and `restart` of a host whose autostart runs through systemd or launchd go through that service
manager, so the supervisor stays the manager's: restarted when it dies, and `systemctl --user status` tells the
truth. A detached supervisor beside the unit would leave the unit inactive, and the unit's own `run` would exit
at once because the host already runs.

`start` asks the manager to start the service and then reads the state file its `tunneld run` writes, as a
detached start reads its readiness pipe: it returns once the host is up, raises the recorded error when it failed,
and reports a host that is still trying (server unreachable, waiting for credentials) as pending.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunneld.autostart.service import Runner
from tunneld.errors import (
    AlreadyRunningError,
    AutostartError,
    CorruptFileError,
    StartupError,
    TunneldError,
    error_from_dict,
)
from tunneld.state.manifests import read_manifest
from tunneld.state.paths import HostFiles
from tunneld.state.pidfile import PidFile, read_json
from tunneld.states import CONNECTING, FAILED, READY_STATES, STARTING

MANAGERS = ("systemd", "launchd")
POLL_INTERVAL_S = 0.1
PID_APPEAR_TIMEOUT_S = 10.0
START_TIMEOUT_S = 40.0  # as `tunneld start --timeout`
EXIT_TIMEOUT_S = 10.0  # a supervisor that recorded a fatal error exits right after


@dataclass(frozen=True)
class ManagedStart:
    """A host started through its service manager: what `start` reports, as for a detached supervisor."""

    pid: int
    state: dict[str, object]
    elapsed_s: float
    pending: bool = False
    via: str = "systemd"


class SystemdService:
    """One host's `tunneld@HOST.service` of the systemd user manager."""

    via = "systemd"

    def __init__(self, host: str, runner: Runner) -> None:
        from tunneld.autostart.systemd import instance

        self.host, self.unit, self.runner = host, instance(host), runner

    def properties(self) -> dict[str, str]:
        """Return what systemd knows of the unit now (MainPID, ActiveState, Result, ExecMainStatus)."""
        out = self.runner.check(
            ["systemctl", "--user", "show", "--property=MainPID,ActiveState,Result,ExecMainStatus", self.unit]
        ).output
        return dict(line.partition("=")[::2] for line in out.splitlines())

    def running_pid(self) -> int | None:
        """Return the unit's main pid while it runs."""
        return _pid(self.properties().get("MainPID", ""))

    def started_pid(self) -> int | None:
        """Return the pid of the run just started, even when it has ended already (ExecMainPID stays)."""
        props = self.runner.check(["systemctl", "--user", "show", "--property=MainPID,ExecMainPID", self.unit]).output
        values = dict(line.partition("=")[::2] for line in props.splitlines())
        return _pid(values.get("MainPID", "")) or _pid(values.get("ExecMainPID", ""))

    def start(self) -> None:
        """Start the unit (a unit that failed before, or hit its start limit, is reset first: a person asks)."""
        self.runner.run(["systemctl", "--user", "reset-failed", self.unit])
        self.runner.check(["systemctl", "--user", "start", self.unit])

    def stop(self) -> None:
        """Stop the unit; systemctl returns once its processes are gone."""
        self.runner.check(["systemctl", "--user", "stop", self.unit])

    def why_it_ended(self) -> str:
        """Say how the unit's last run ended."""
        props = self.properties()
        return f"{self.unit} is {props.get('ActiveState', '?')} (result {props.get('Result', '?')}, exit status " + (
            f"{props.get('ExecMainStatus', '?')})"
        )

    def hint(self) -> str:
        """Where to look next."""
        return f"systemctl --user status {self.unit}; tunneld logs {self.host}"


class LaunchdAgent:
    """One host's LaunchAgent `io.tunneld.HOST` in the user's GUI domain."""

    via = "launchd"

    def __init__(self, host: str, runner: Runner) -> None:
        from tunneld.autostart.launchd import label, plist_path

        self.host, self.runner = host, runner
        self.domain = f"gui/{os.getuid()}"
        self.target = f"{self.domain}/{label(host)}"
        self.plist: Path = plist_path(host)

    def _print(self) -> str | None:
        result = self.runner.run(["launchctl", "print", self.target])
        return result.output if result.returncode == 0 else None

    def running_pid(self) -> int | None:
        """Return the agent's pid while it runs (`pid = N` in `launchctl print`)."""
        shown = self._print()
        match = re.search(r"^\s*pid = (\d+)\s*$", shown or "", re.MULTILINE)
        return int(match[1]) if match and int(match[1]) > 1 else None

    def started_pid(self) -> int | None:
        """Return the pid of the run just started (launchd shows it while it runs)."""
        return self.running_pid()

    def start(self) -> None:
        """Load the agent (RunAtLoad starts it), or kickstart it when it is loaded already."""
        if self._print() is None:
            self.runner.check(["launchctl", "bootstrap", self.domain, str(self.plist)])
        else:
            self.runner.check(["launchctl", "kickstart", self.target])

    def stop(self) -> None:
        """Unload the agent: launchd stops it (it loads again at the next login)."""
        self.runner.check(["launchctl", "bootout", self.target])

    def why_it_ended(self) -> str:
        """Say how the agent's last run ended."""
        match = re.search(r"last exit code = (.+)", self._print() or "")
        return f"{self.target} is not running" + (f" (last exit code {match[1].strip()})" if match else "")

    def hint(self) -> str:
        """Where to look next."""
        return f"launchctl print {self.target}; tunneld logs {self.host}"


def managed_by(host: str, runner: Runner | None = None) -> str | None:
    """Return the service manager that owns `host`'s supervisor (its autostart runs through it), else None."""
    try:
        manifest = read_manifest(host)
    except CorruptFileError:
        return None  # `status` and `autostart status` report the bad manifest; start and stop work by hand
    if manifest is None or manifest.via not in MANAGERS:
        return None
    # A manager that cannot run here (a launchd agent's manifest on Linux: a ~/.config synced from a Mac, or an
    # older tunneld's enable) runs nothing: start and stop work by hand, and `autostart status` says why.
    return manifest.via if (runner or Runner()).supports(manifest.via) else None


def service_of(host: str, via: str, runner: Runner | None = None) -> SystemdService | LaunchdAgent:
    """Return the service of `host` under `via`."""
    if via == "systemd":
        return SystemdService(host, runner or Runner())
    return LaunchdAgent(host, runner or Runner())


def start_managed(
    host: str, timeout: float, progress: Callable[[str], None] | None = None, runner: Runner | None = None
) -> ManagedStart | None:
    """Start `host` through its service manager and wait for it to be up; None when no manager owns it."""
    via = managed_by(host, runner)
    if via is None:
        return None
    service = service_of(host, via, runner)
    began = time.monotonic()
    running = service.running_pid()
    if running is not None:
        raise AlreadyRunningError(host, running)
    _refuse_a_supervisor_beside(host, via)
    if progress is not None:
        progress(f"starting through {via}")
    service.start()
    return wait_managed(host, service, began + timeout, progress)


def wait_managed(
    host: str, service: SystemdService | LaunchdAgent, deadline: float, progress: Callable[[str], None] | None = None
) -> ManagedStart:
    """Wait until the service's supervisor reports up (or failed, or still trying) in the host's state file."""
    began = time.monotonic()
    pid = _poll(service.started_pid, began + PID_APPEAR_TIMEOUT_S)
    if pid is None:
        raise StartupError(f"{host} did not start through {service.via}: {service.why_it_ended()}", service.hint())
    shown = None
    while True:
        state = _state_of(host, pid)
        name = str(state.get("state", STARTING))
        if name in READY_STATES:
            return ManagedStart(pid, state, time.monotonic() - began, via=service.via)
        if name == FAILED:
            error = state.get("last_error")
            _poll(lambda: None if _alive(pid) else pid, time.monotonic() + EXIT_TIMEOUT_S)  # it exits next, as 78
            raise error_from_dict(error if isinstance(error, dict) else {})
        if name not in (STARTING, CONNECTING) and state.get("last_error"):  # backoff, needs credentials, ...
            return ManagedStart(pid, state, time.monotonic() - began, pending=True, via=service.via)
        if not _alive(pid):
            state = _state_of(host, pid)
            if state.get("state") == FAILED:
                continue
            raise StartupError(
                f"the tunnel process for {host} (pid {pid}) exited before it was up: {service.why_it_ended()}",
                service.hint(),
            )
        if time.monotonic() > deadline:
            return ManagedStart(pid, state, time.monotonic() - began, pending=True, via=service.via)
        if progress is not None and name != shown:
            shown = name
            progress(name)
        time.sleep(POLL_INTERVAL_S)


def wait_started(host: str, via: str, timeout: float = START_TIMEOUT_S) -> ManagedStart:
    """Wait for a host its service manager was just asked to start (`autostart enable --now`)."""
    return wait_managed(host, service_of(host, via), time.monotonic() + timeout)


def stop_managed(host: str, runner: Runner | None = None) -> int | None:
    """Stop `host` through its service manager; return the pid it stopped, None when the manager ran none."""
    via = managed_by(host, runner)
    if via is None:
        return None
    service = service_of(host, via, runner)
    try:
        pid = service.running_pid()
    except AutostartError:
        return None  # no manager to ask here (su, no user bus): the pid file still names the supervisor to stop
    if pid is None:
        return None  # not running under the manager: the pid file decides (a supervisor started by hand)
    service.stop()
    return pid


def _refuse_a_supervisor_beside(host: str, via: str) -> None:
    """A supervisor started by hand (before autostart was enabled) holds the host: the unit could not run."""
    try:
        record = PidFile(HostFiles.of(host)).read()
    except CorruptFileError:
        return
    if record is not None and record.is_live():
        raise TunneldError(
            f"{host} already runs outside {via} (pid {record.pid}, started before its autostart or by hand)",
            f"run `tunneld stop {host}`, then `tunneld start {host}` starts it through {via}",
        )


def _state_of(host: str, pid: int) -> dict[str, object]:
    """Return the host's state file when `pid` wrote it (an older run's file does not count), else {}."""
    try:
        state = read_json(HostFiles.of(host).state, host) or {}
    except CorruptFileError:
        return {}
    return state if state.get("pid") == pid else {}


def _pid(text: str) -> int | None:
    return int(text) if text.isdigit() and int(text) > 1 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _poll(ask: Callable[[], int | None], deadline: float) -> int | None:
    while True:
        found = ask()
        if found is not None or time.monotonic() > deadline:
            return found
        time.sleep(POLL_INTERVAL_S)
