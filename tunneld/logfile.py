"""Read a host's log: the last N lines, and follow new ones across rotation (`tunneld logs`)."""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Iterator
from pathlib import Path

from tunneld.safetext import printable

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
