"""What `tunneld status` and `wait` report for a host, read from its pid and state files only."""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass

from tunneld.errors import CorruptFileError, NeedsAuthError, NotRunningError, StartupError, TunneldError
from tunneld.safetext import printable
from tunneld.state.manifests import enabled_hosts, read_manifest
from tunneld.state.paths import HostFiles, hosts_with_files, is_valid_host, known_hosts_with_files, state_dir
from tunneld.state.pidfile import PidFile, read_json
from tunneld.states import ALL_STATES, FAILED, FORWARD_DEGRADED, NEEDS_AUTH, READY_STATES, RUNNING_STATES

STATUS_SCHEMA_VERSION = 1
STALE = "dead (stale pid file)"
CORRUPT = "corrupt file"
DEAD = "dead"
NOT_RUNNING = "not running"
WAIT_POLL_S = 0.2
NEEDS_AUTH_GRACE_S = 4.0  # the supervisor asks the agent every 2 s


@dataclass(frozen=True)
class HostReport:
    """One row of `tunneld status` (and one object of `status --json`)."""

    host: str
    state: str
    running: bool
    pid: int | None = None
    engine: str | None = None
    started_at: float | None = None
    since: float | None = None
    uptime_s: float | None = None
    reconnects: int = 0
    attempts: int = 0
    next_try_at: float | None = None
    last_error: dict[str, object] | None = None
    previous_error: dict[str, object] | None = None
    forwards: tuple[dict[str, object], ...] = ()
    children: tuple[int, ...] = ()
    autostart: str | None = None
    # Failed on tunneld.toml or ssh_config, and that file changed since: a start may work now (the table says so).
    config_changed_since: bool = False
    # How the files on disk differ from what the running tunnel uses (`tunneld reload HOST` applies them).
    config_changes: tuple[str, ...] = ()

    @property
    def config_changed(self) -> bool:
        """True when the running tunnel uses an older configuration than the files say."""
        return bool(self.config_changes)

    @property
    def is_up(self) -> bool:
        """Return True when the tunnel runs and every forward listens (degraded counts: the link is up; idle
        counts: an on-demand tunnel listens and connects at the first client)."""
        return self.running and self.state in READY_STATES

    @property
    def health_ok(self) -> bool:
        """Return True when no health check that tunneld.toml asked for is failing."""
        for forward in self.forwards:
            health = forward.get("health")
            if isinstance(health, dict) and health.get("configured") and not health.get("ok"):
                return False
        return True

    def to_dict(self) -> dict[str, object]:
        """Return the documented JSON form (docs/usage.md, `status --json`)."""
        data = asdict(self)
        data.pop("config_changed_since")  # the table's remark only: the JSON schema stays as documented
        data["config_changed"] = self.config_changed
        data["config_changes"] = list(self.config_changes)
        data["forwards"] = list(self.forwards)
        data["children"] = list(self.children)
        return data


def listed_hosts() -> tuple[list[str], list[str]]:
    """Return (the hosts `status` lists: those with files or with autostart, sorted; stray state-directory names)."""
    with_files, stray = hosts_with_files()
    return sorted({*with_files, *enabled_hosts()}), stray


def known_names() -> list[str]:
    """Return every host tunneld has run or set up: a pid, state or log file, or an autostart manifest (sorted)."""
    logs = {path.name.removesuffix(".log") for path in state_dir().glob("*.log")} if state_dir().is_dir() else set()
    return sorted({*known_hosts_with_files(), *(name for name in logs if is_valid_host(name)), *enabled_hosts()})


def never_ran(host: str) -> bool:
    """Return True when tunneld has never run `host` nor set it up: no pid, state or log file, no autostart."""
    files = HostFiles.of(host)
    if any(path.exists() for path in (files.pid, files.state, files.log)):
        return False
    try:
        return read_manifest(host) is None
    except CorruptFileError:
        return False


def never_ran_error(host: str, not_running: bool = False) -> TunneldError:
    """The error of `stop`, `status` or `logs` of a name tunneld has never run (a typo, most often), naming the known
    ones and the closest of them; a NotRunningError (exit 3) for `status`, else exit 1."""
    import difflib

    known = known_names()
    close = difflib.get_close_matches(host, known, n=2)
    kind = NotRunningError if not_running else TunneldError
    return kind(
        f"tunneld has never run {host}; known: {', '.join(known) or 'none yet'}",
        (f"did you mean {' or '.join(close)}? " if close else "")
        + "`tunneld list` shows the hosts of your ssh_config; `tunneld start HOST` starts one",
    )


def collect(host: str) -> HostReport:
    """Return the host's report; a pid file whose process is gone or reused is reported as stale.

    A corrupt pid, state or manifest file is reported for this host alone, never as a traceback.
    """
    files = HostFiles.of(host)
    pidfile = PidFile(files)
    problem: CorruptFileError | None = None
    try:
        record = pidfile.read()
    except CorruptFileError as error:
        record, problem = None, error
    try:
        state = _valid_state(read_json(files.state, host) or {}, files)
    except CorruptFileError as error:
        state, problem = {}, problem or error
    live = record is not None and record.is_live()
    if live and record is not None:
        shown = str(state.get("state")) if state.get("pid") == record.pid else "starting"
    elif problem is not None:
        shown = CORRUPT
    elif pidfile.exists():
        shown = STALE
    elif state:
        recorded = str(state.get("state"))
        shown = DEAD if recorded in RUNNING_STATES else recorded
    else:
        shown = NOT_RUNNING
    running = bool(live)
    started = record.started_at if record and live else None
    forwards = state.get("forwards") if running else None
    last_error = problem.to_dict() if problem is not None and not running else state.get("last_error")
    previous_error = state.get("previous_error")
    if shown in (STALE, DEAD):
        # The process vanished without a word: whatever error the state file still holds was before that.
        previous_error = last_error or previous_error
        last_error = _death(record.pid if record else state.get("pid"), files)
    return HostReport(
        host=host,
        state=shown,
        running=running,
        pid=record.pid if record else None,
        engine=str(state.get("engine"))[:32] if state.get("engine") else (record.engine if record else None),
        started_at=started,
        since=_number(state.get("since")),
        uptime_s=time.time() - started if started else None,
        reconnects=int(_number(state.get("reconnects")) or 0),
        attempts=int(_number(state.get("attempts")) or 0),
        next_try_at=_number(state.get("next_try_at")) if running else None,
        last_error=last_error if isinstance(last_error, dict) else None,
        previous_error=previous_error if isinstance(previous_error, dict) else None,
        forwards=tuple(f for f in forwards if isinstance(f, dict)) if isinstance(forwards, list) else (),
        children=_child_pids(state.get("children")) if running else (),
        autostart=_autostart_of(host),
        config_changed_since=shown == FAILED and _config_changed_since(last_error, state),
        config_changes=_strings(state.get("config_changed")) if running else (),
    )


CONFIG_ERRORS = ("ConfigError", "NoForwardsError")  # the kinds a fixed tunneld.toml or ssh_config can cure
_PATH_RE = re.compile(r"(?:^|[\s,(])(~?/[^\s,:;()']+)")


def _config_changed_since(error: object, state: dict[str, object]) -> bool:
    """Return True when `error` is a tunneld.toml or ssh_config error and one of those files (tunneld.toml, the
    recorded -F file or ~/.ssh/config, a file the message names) changed after it. Stats only: `status` stays cheap."""
    if not isinstance(error, dict) or error.get("kind") not in CONFIG_ERRORS:
        return False
    when = _number(error.get("at")) or _number(state.get("since"))
    if when is None:
        return False
    from tunneld.state.paths import local_home, settings_path

    recorded = state.get("ssh_config")
    files = [str(settings_path()), recorded if isinstance(recorded, str) else "~/.ssh/config"]
    files += _PATH_RE.findall(str(error.get("message", "")))
    for name in files:
        path = local_home() + name[1:] if name.startswith("~/") else name
        try:
            if os.stat(path).st_mtime > when:
                return True
        except OSError:
            continue
    return False


def _death(pid: object, files: HostFiles) -> dict[str, object]:
    """Explain a supervisor that ended without recording why: only an uncatchable end does that."""
    try:
        last_seen = files.state.stat().st_mtime
    except OSError:
        last_seen = None
    seen = f"; last sign of life {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last_seen))}" if last_seen else ""
    return {
        "kind": "Dead",
        "message": f"the tunneld process (pid {pid}) ended without cleaning up: killed by SIGKILL "
        f"(kill -9, the out-of-memory killer) or crashed{seen}",
        "hint": f"start it again with `tunneld start {files.host}`; `tunneld logs {files.host}` shows its last lines",
        "exit_code": None,
        "retryable": True,
        "at": last_seen,
    }


def _valid_state(state: dict[str, object], files: HostFiles) -> dict[str, object]:
    """Check the fields `status` relies on; a state file that lies about its shape is corrupt."""
    value = state.get("state")
    if state and (not isinstance(value, str) or value not in ALL_STATES):
        raise CorruptFileError(files.state, f"unknown state {str(value)!r:.40}", files.host)
    for key in ("forwards", "children"):
        if key in state and not isinstance(state[key], list):
            raise CorruptFileError(files.state, f"{key} must be a list", files.host)
    error = state.get("last_error")
    if error is not None and not (isinstance(error, dict) and isinstance(error.get("message"), str)):
        raise CorruptFileError(files.state, "last_error must be an object with a message", files.host)
    return state


def _autostart_of(host: str) -> str | None:
    try:
        manifest = read_manifest(host)
    except CorruptFileError:
        return "corrupt manifest"
    return manifest.via if manifest else None


@dataclass(frozen=True)
class Launch:
    """How a host was last started: the engine it ran and the ssh_config file it read (None: ssh's default)."""

    engine: str | None
    ssh_config: str | None


def recorded_launch(host: str) -> Launch | None:
    """Return how `host` was last started, from its state file (None when it never ran or the file is bad)."""
    try:
        state = read_json(HostFiles.of(host).state, host)
    except CorruptFileError:
        return None
    if not state:
        return None
    engine, ssh_config = state.get("engine"), state.get("ssh_config")
    return Launch(
        engine if engine in ("openssh", "paramiko") else None,
        ssh_config if isinstance(ssh_config, str) and ssh_config else None,
    )


def ssh_config_for(host: str, given: str | None) -> str | None:
    """Return the ssh_config file to read for `host`: the one given, else the one its running (or last) tunnel
    was started with (None: ssh's default)."""
    if given is not None:
        return given
    recorded = recorded_launch(host)
    return recorded.ssh_config if recorded else None


def host_owning_pid(pid: int) -> str | None:
    """Return the tunneld host whose live supervisor is `pid`, or whose supervisor is `pid`'s parent (ssh)."""
    import psutil

    try:
        candidates = {pid, psutil.Process(pid).ppid()}
    except psutil.Error:
        candidates = {pid}
    for host in known_hosts_with_files():
        try:
            record = PidFile(HostFiles(host, state_dir())).read()
        except CorruptFileError:
            continue
        if record is not None and record.pid in candidates and record.is_live():
            return host
    return None


def _child_pids(children: object) -> tuple[int, ...]:
    if not isinstance(children, list):
        return ()
    return tuple(int(c["pid"]) for c in children if isinstance(c, dict) and isinstance(c.get("pid"), int))


def _strings(value: object) -> tuple[str, ...]:
    return tuple(str(item)[:300] for item in value[:20]) if isinstance(value, list) else ()


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def wait_until_up(host: str, timeout: float, healthy: bool = True) -> tuple[bool, HostReport]:
    """Poll until the host is up (with `healthy`, also its configured health checks passing); return
    (ready, last report).

    Returns at once, not ready, when no tunnel runs for the host (failed, stopped, dead, never started); and when it
    waits for credentials (needs-auth) after NEEDS_AUTH_GRACE_S, time for its supervisor to notice a key loaded just
    before (`ssh-add && tunneld wait HOST`): beyond that, waiting cannot help, the user must act.
    """
    began = time.monotonic()
    deadline = began + timeout
    while True:
        report = collect(host)
        ready = report.is_up and (report.health_ok or not healthy)
        waiting = report.state == NEEDS_AUTH and time.monotonic() - began >= min(NEEDS_AUTH_GRACE_S, timeout)
        if ready or not report.running or waiting or time.monotonic() >= deadline:
            return ready, report
        time.sleep(WAIT_POLL_S)


def not_ready_error(report: HostReport, timeout: float) -> TunneldError:
    """Return the error for a host that `wait_until_up` gave up on: not running, not up, or health failing."""
    host = report.host
    error = report.last_error.get("message") if report.last_error else None
    hint = f"see `tunneld logs {host}`"
    if report.state == NEEDS_AUTH:
        waiting = report.last_error.get("hint") if report.last_error else None
        return NeedsAuthError(str(error or f"{host} needs your credentials"), str(waiting) if waiting else hint)
    if not report.running:
        why = f"{host} is not running (state: {report.state}"
        hint = f"start it with `tunneld start {host}`; {hint}"
    elif report.is_up:
        failing = [str(f.get("detail")) for f in report.forwards if f.get("state") == FORWARD_DEGRADED]
        why = f"{host} health checks still failing after {timeout:g} s ({'; '.join(failing)}"
        error = None
    else:
        why = f"{host} not up after {timeout:g} s (state: {report.state}"
    return StartupError(printable(why + (f"; last error: {error}" if error else "") + ")"), hint)
