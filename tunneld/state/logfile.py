"""A host's log: written private and escaped by the supervisor; read back (last N lines, follow) by `logs`."""

from __future__ import annotations

import collections
import io
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tunneld.safetext import printable
from tunneld.state.paths import HostFiles, ensure_private_dir, open_private

FOLLOW_POLL_S = 0.25


def tail_lines(path: Path, count: int) -> list[str]:
    """Return the last `count` lines of `path`."""
    with path.open(errors="replace") as handle:
        return [printable(line.rstrip("\n")) for line in collections.deque(handle, maxlen=max(count, 0))]


def follow_lines(path: Path) -> Iterator[str]:
    """Yield lines appended to `path` from now on, reopening it when the log rotates; runs until interrupted."""
    handle = path.open(errors="replace")
    handle.seek(0, os.SEEK_END)
    inode = os.fstat(handle.fileno()).st_ino
    try:
        while True:
            line = handle.readline()
            if line:
                yield printable(line.rstrip("\n"))
                continue
            time.sleep(FOLLOW_POLL_S)
            try:
                if os.stat(path).st_ino != inode:
                    handle.close()
                    handle = path.open(errors="replace")
                    inode = os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                continue
    finally:
        handle.close()


LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
LOG_MAX_BYTES = 1_000_000
LOG_BACKUPS = 3


class SafeFormatter(logging.Formatter):
    """Log lines never carry control characters (a newline from a server would forge a line)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = printable(record.message)
        return super().formatMessage(record)


class PrivateRotatingFileHandler(logging.FileHandler):
    """A log that rotates at `max_bytes` into `backups` numbered files (as logging.handlers' rotating one).

    It is 0600 from its first byte and after every rotation and never follows a link. It is written
    here rather than loaded from logging.handlers, which would bring socket-logging and pickle
    (~0.6 MiB) into every supervisor.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.max_bytes = max_bytes
        self.backups = backups
        super().__init__(path, encoding="utf-8", delay=True)

    def _open(self) -> io.TextIOWrapper:
        fd = open_private(Path(self.baseFilename), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        return open(fd, "a", encoding=self.encoding or "utf-8", errors=self.errors)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self._full(self.format(record)):
                self._rotate()
        except Exception:  # logging must never take the supervisor down
            self.handleError(record)
            return
        super().emit(record)

    def _full(self, line: str) -> bool:
        if self.stream is None:
            self.stream = self._open()
        return self.stream.tell() + len(line.encode(errors="replace")) + 1 > self.max_bytes

    def _rotate(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None  # FileHandler reopens a None stream on the next emit
        base = self.baseFilename
        for number in range(self.backups - 1, 0, -1):
            if os.path.exists(f"{base}.{number}"):
                os.replace(f"{base}.{number}", f"{base}.{number + 1}")
        if self.backups > 0:
            os.replace(base, f"{base}.1")
        else:
            os.truncate(base, 0)


def configure_logging(files: HostFiles, verbose: bool = False) -> None:
    """Log to the host's rotating log file and to stderr (unless stderr already is that file)."""
    ensure_private_dir(files.directory)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # paramiko logs every refused channel and reset socket at ERROR; tunneld reports those itself.
    logging.getLogger("paramiko").setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    formatter = SafeFormatter(LOG_FORMAT)
    file_handler = PrivateRotatingFileHandler(files.log, LOG_MAX_BYTES, LOG_BACKUPS)
    file_handler.setFormatter(formatter)
    root.addHandler(file_handler)
    if not _stderr_is(files.log):
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(formatter)
        root.addHandler(stream)


def _stderr_is(path: Path) -> bool:
    try:
        mine, theirs = os.fstat(sys.stderr.fileno()), os.stat(path)
    except (OSError, ValueError, AttributeError):
        return False
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)
