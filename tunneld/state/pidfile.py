"""Per-host pid file (with its lock) and state file: atomic, private, and honest about staleness."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from tunneld.errors import AlreadyRunningError, CorruptFileError, StartupError
from tunneld.state.paths import HostFiles, ensure_private_dir, open_private

CREATE_TIME_TOLERANCE_S = 0.05
GONE_POLL_S = 0.02
KILL_WAIT_S = 3.0
MAX_JSON_BYTES = 1024 * 1024
LOCK_POLL_S = 0.02
# A lock taken only to look (is a tunneld running? a stop checking for a start) is released within this.
LOCK_CONTENTION_S = 0.5
OWNER_WAIT_S = 5.0  # how long a start waits for a concurrent start that holds the lock to record its tunneld


def write_json_atomic(path: Path, data: object) -> None:
    """Write `data` as JSON to `path` via a new private temp file and rename: readers never see half a file.

    The temp file is created exclusively under a random name (a planted link there cannot be followed).
    """
    ensure_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.urandom(8).hex()}.tmp")
    # O_EXCL | O_NOFOLLOW: never an existing file, never through a link (tempfile would cost the daemon ~0.8 MiB)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: Path, host: str | None = None) -> dict[str, object] | None:
    """Return the JSON object in one of tunneld's files, or None when there is none.

    Anything else (a link, a huge or non-UTF-8 file, broken or deeply nested JSON, not an object)
    is a CorruptFileError naming the file, never a traceback.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CorruptFileError(path, exc.strerror or str(exc), host) from exc
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptFileError(path, "not a regular file", host)
        raw = handle.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise CorruptFileError(path, f"larger than {MAX_JSON_BYTES} bytes", host)
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CorruptFileError(path, "not UTF-8 text", host) from exc
    except RecursionError as exc:
        raise CorruptFileError(path, "JSON nested too deeply", host) from exc
    except ValueError as exc:
        raise CorruptFileError(path, f"not JSON ({exc})", host) from exc
    if not isinstance(data, dict):
        raise CorruptFileError(path, f"a JSON {type(data).__name__}, not an object", host)
    return data


def _same_process(proc: psutil.Process, create_time: float) -> bool:
    return abs(proc.create_time() - create_time) < CREATE_TIME_TOLERANCE_S and proc.status() != psutil.STATUS_ZOMBIE


def process_matches(pid: int, create_time: float, cmdline: Sequence[str] | None = None) -> bool:
    """Return True when `pid` is the very process recorded, so it may be signalled.

    It must be > 1, alive with the recorded create time, owned by this user, and be what was
    recorded: tunneld itself (`cmdline` None), or a child with exactly the recorded command line.
    """
    if pid <= 1:
        return False
    try:
        proc = psutil.Process(pid)
        if not _same_process(proc, create_time) or proc.uids().real != os.getuid():
            return False
        actual = proc.cmdline()
    except psutil.Error:
        return False
    if cmdline is None:
        return is_tunneld(actual)
    return list(actual) == list(cmdline)


_SUPERVISOR_WORDS = frozenset({"tunneld.runtime.detached", "tunneld.detached", "tunneld"})


def is_tunneld(cmdline: Sequence[str]) -> bool:
    """Return True for a tunneld supervisor: `python -m tunneld.runtime.detached HOST`, `tunneld run HOST` and the
    like; `tunneld.detached` is where versions before the layer folders kept it, and their supervisors may still run."""
    return any(part in _SUPERVISOR_WORDS or part.endswith("/tunneld") for part in cmdline)


def foreign_owner(pid: int, create_time: float) -> str | None:
    """Return the user name when the recorded process is alive but belongs to another user."""
    with contextlib.suppress(psutil.Error, KeyError):
        proc = psutil.Process(pid)
        if pid > 1 and _same_process(proc, create_time) and proc.uids().real != os.getuid():
            return proc.username()
    return None


def terminate(pid: int, create_time: float, grace_s: float, cmdline: Sequence[str] | None = None) -> bool:
    """SIGTERM the recorded process, SIGKILL it after `grace_s`; return True when SIGKILL was needed.

    Only a process that `process_matches` is signalled, checked again before each signal. Gone means
    gone or a zombie: nothing may reap our orphans (pid 1 in containers often does not).
    """
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, KILL_WAIT_S)):
        if not process_matches(pid, create_time, cmdline):
            return sig == signal.SIGKILL
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
        if _wait_gone(pid, create_time, wait_s, cmdline):
            return sig == signal.SIGKILL
    return True


def _wait_gone(pid: int, create_time: float, timeout: float, cmdline: Sequence[str] | None) -> bool:
    deadline = time.monotonic() + timeout
    while process_matches(pid, create_time, cmdline):
        if time.monotonic() >= deadline:
            return False
        time.sleep(GONE_POLL_S)
    return True


def _flock_within(fd: int, operation: int, wait_s: float) -> bool:
    """Take flock `operation` (LOCK_EX, LOCK_SH) on `fd`, trying again for up to `wait_s`; return whether it did."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(LOCK_POLL_S)
        else:
            return True


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class PidRecord:
    """What a pid file says: which process runs the host's tunnel, and since when."""

    pid: int
    create_time: float
    host: str
    engine: str
    started_at: float

    @classmethod
    def of_current_process(cls, host: str, engine: str) -> PidRecord:
        """Return the record describing this very process."""
        me = psutil.Process()
        return cls(me.pid, me.create_time(), host, engine, time.time())

    @classmethod
    def of_child(cls, pid: int, host: str) -> PidRecord | None:
        """Return the record of a tunneld `start` has just launched (None if it is gone already)."""
        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:
            return None
        return cls(pid, created, host, "", time.time())

    def is_live(self) -> bool:
        """Return True when the recorded process still runs (a reused pid does not count)."""
        return process_matches(self.pid, self.create_time)


class PidFile:
    """The pid file of one host plus the lock that makes exactly one process own it."""

    def __init__(self, files: HostFiles) -> None:
        self.files = files

    def read(self) -> PidRecord | None:
        """Return the recorded owner, or None when there is no pid file; a CorruptFileError for a bad one."""
        data = read_json(self.files.pid, self.files.host)
        if data is None:
            return None
        pid, created, started = data.get("pid"), data.get("create_time"), data.get("started_at", 0.0)
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
            raise CorruptFileError(
                self.files.pid, f"pid must be a whole number above 1, not {pid!r:.40}", self.files.host
            )
        if not _is_number(created) or not _is_number(started):
            raise CorruptFileError(self.files.pid, "create_time and started_at must be numbers", self.files.host)
        if data.get("host", self.files.host) != self.files.host:
            raise CorruptFileError(
                self.files.pid, f"it names another host ({str(data.get('host'))!r:.60})", self.files.host
            )
        return PidRecord(pid, float(created), self.files.host, str(data.get("engine", ""))[:32], float(started))  # type: ignore[arg-type]

    def exists(self) -> bool:
        """Return True when a pid file is present, readable or not."""
        return os.path.lexists(self.files.pid)

    def lock(self, wait_s: float = LOCK_CONTENTION_S) -> int:
        """Take the host's exclusive lock and return its fd; raise AlreadyRunningError when another holds it
        for longer than `wait_s` (a look by `stop` holds it for a moment only).

        The lock lives on a separate file because the pid file is replaced atomically (a new
        inode), and it is released by the kernel when its holder dies, even by SIGKILL.
        """
        ensure_private_dir(self.files.directory)
        fd = open_private(self.files.lock, os.O_RDWR | os.O_CREAT)
        if not _flock_within(fd, fcntl.LOCK_EX, wait_s):
            os.close(fd)
            try:
                record = self.read()
            except CorruptFileError:
                record = None
            raise AlreadyRunningError(self.files.host, record.pid if record else None) from None
        return fd

    def live(self) -> PidRecord | None:
        """Return the host's running tunneld, or None (no pid file, a stale one, or a corrupt one: the lock decides)."""
        try:
            record = self.read()
        except CorruptFileError:
            return None
        return record if record is not None and record.is_live() else None

    def claim(self, deadline: float) -> int:
        """Take the lock for a new tunneld of the host and return its fd; raise AlreadyRunningError when one runs.

        A tunneld that is being stopped is waited for (up to `deadline`, monotonic): a start must follow
        the stop, not report the stopping tunneld as running. While another process holds the lock, a
        start in progress records its tunneld within moments, and a look (`stop`) releases it at once.
        """
        give_up = min(deadline, time.monotonic() + OWNER_WAIT_S)
        while True:
            record = self.live()
            if record is not None and not self.stop_in_progress():
                raise AlreadyRunningError(self.files.host, record.pid)
            if not self.wait_while_stopping(deadline):
                shown = f" (pid {record.pid})" if record else ""
                raise StartupError(
                    f"{self.files.host} is still being stopped{shown}: not started",
                    f"start it once `tunneld stop {self.files.host}` has ended",
                )
            if record is not None and record.is_live():  # the stop gave up (interrupted): it still runs
                raise AlreadyRunningError(self.files.host, record.pid)
            try:
                return self.lock()
            except AlreadyRunningError:
                if time.monotonic() >= give_up:
                    raise

    def held_by_someone(self) -> bool:
        """Return True when a running tunneld, or a start in progress, holds the host's lock."""
        try:
            fd = self.lock(wait_s=0.0)
        except AlreadyRunningError:
            return True
        os.close(fd)
        return False

    @contextlib.contextmanager
    def stopping(self, wait_s: float) -> Iterator[None]:
        """Hold the host's stop lock while a stop runs, so that a start meeting the stopping tunneld waits for
        the stop to end instead of calling it running. Another stop's hold is waited for up to `wait_s`,
        then this one goes on regardless."""
        ensure_private_dir(self.files.directory)
        fd = open_private(self.files.stopping, os.O_RDWR | os.O_CREAT)
        try:
            _flock_within(fd, fcntl.LOCK_EX, wait_s)
            yield
        finally:
            os.close(fd)

    def stop_in_progress(self) -> bool:
        """Return True while a `tunneld stop` of this host runs (it holds the stop lock)."""
        try:
            fd = os.open(self.files.stopping, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return False  # never stopped (no file), or not a file tunneld made: stop itself refuses that one
        try:
            return not _flock_within(fd, fcntl.LOCK_SH, 0.0)
        finally:
            os.close(fd)

    def wait_while_stopping(self, deadline: float) -> bool:
        """Wait until no stop of this host runs, up to `deadline` (monotonic); return True when none runs."""
        while self.stop_in_progress():
            if time.monotonic() >= deadline:
                return False
            time.sleep(LOCK_POLL_S)
        return True

    def write(self, record: PidRecord) -> None:
        """Record `record` as the owner."""
        write_json_atomic(self.files.pid, asdict(record))

    def remove(self, pid: int) -> bool:
        """Remove the pid file if it still names `pid` (0: whatever it says, even if corrupt); return whether it did."""
        try:
            record = self.read()
        except CorruptFileError:
            record = None
        if pid and record is not None and record.pid != pid:
            return False
        try:
            self.files.pid.unlink()
        except FileNotFoundError:
            return False
        return True
