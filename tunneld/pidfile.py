"""Per-host pid file (with its lock) and state file: atomic, private, and honest about staleness."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from tunneld.errors import AlreadyRunningError
from tunneld.paths import HostFiles, ensure_private_dir

CREATE_TIME_TOLERANCE_S = 0.05
GONE_POLL_S = 0.02
KILL_WAIT_S = 3.0


def write_json_atomic(path: Path, data: object) -> None:
    """Write `data` as JSON to `path` via a private temp file and rename: readers never see half a file."""
    ensure_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> dict[str, object] | None:
    """Return the JSON object in `path`, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def process_matches(pid: int, create_time: float) -> bool:
    """Return True when `pid` is alive and is the same process that was recorded (same create time)."""
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - create_time) < CREATE_TIME_TOLERANCE_S and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return False


def terminate(pid: int, create_time: float, grace_s: float) -> bool:
    """SIGTERM the recorded process, SIGKILL it after `grace_s`; return True when SIGKILL was needed.

    Gone means gone or a zombie: nothing may reap our orphans (pid 1 in containers often does not).
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _wait_gone(pid, create_time, grace_s):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _wait_gone(pid, create_time, KILL_WAIT_S)
    return True


def _wait_gone(pid: int, create_time: float, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while process_matches(pid, create_time):
        if time.monotonic() >= deadline:
            return False
        time.sleep(GONE_POLL_S)
    return True


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

    def is_live(self) -> bool:
        """Return True when the recorded process still runs (a reused pid does not count)."""
        return process_matches(self.pid, self.create_time)


class PidFile:
    """The pid file of one host plus the lock that makes exactly one process own it."""

    def __init__(self, files: HostFiles) -> None:
        self.files = files

    def read(self) -> PidRecord | None:
        """Return the recorded owner, or None when there is no (readable) pid file."""
        data = read_json(self.files.pid)
        if data is None:
            return None
        try:
            return PidRecord(
                pid=int(data["pid"]),  # type: ignore[call-overload]
                create_time=float(data["create_time"]),  # type: ignore[arg-type]
                host=str(data.get("host", self.files.host)),
                engine=str(data.get("engine", "")),
                started_at=float(data.get("started_at", 0.0)),  # type: ignore[arg-type]
            )
        except (KeyError, TypeError, ValueError):
            return None

    def exists(self) -> bool:
        """Return True when a pid file is present, readable or not."""
        return self.files.pid.exists()

    def lock(self) -> int:
        """Take the host's exclusive lock and return its fd; raise AlreadyRunningError when another holds it.

        The lock lives on a separate file because the pid file is replaced atomically (a new
        inode), and it is released by the kernel when its holder dies, even by SIGKILL.
        """
        ensure_private_dir(self.files.directory)
        fd = os.open(self.files.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            record = self.read()
            raise AlreadyRunningError(self.files.host, record.pid if record else None) from None
        return fd

    def write(self, record: PidRecord) -> None:
        """Record `record` as the owner."""
        write_json_atomic(self.files.pid, asdict(record))

    def remove(self, pid: int) -> bool:
        """Remove the pid file if it still names `pid`; return whether it did."""
        record = self.read()
        if record is not None and record.pid != pid:
            return False
        try:
            self.files.pid.unlink()
        except FileNotFoundError:
            return False
        return True
