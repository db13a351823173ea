"""ssh's stderr read as ssh wrote it: one record per write of ssh's, the process that wrote it, and which of its
words are ssh's own.

ssh quotes its peer in its own log (`banner line 0: ...`, `remote software version ...`, `Remote: ...`,
`Received disconnect ...: <reason>`), and on stderr it escapes control characters but not newlines:
a peer's DEBUG or DISCONNECT message, sent before any host key is exchanged, can carry whole lines
that look like ssh's own. So ssh's stderr is a SOCK_SEQPACKET socket where the platform has one:
every log call of ssh is one write, hence one record, whose first line is ssh's own words whatever
follows it; on Linux each record also names the process that wrote it (the target's ssh, or the ssh
of a ProxyJump hop). Without such a socket a pipe is read by line, and the rest of a read that
follows a line quoting the peer stays with that line.

Separate from what the records mean (engines/sshdiag.py, the classification) because this is the
channel: whose words a line is must be settled before any of them is judged.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from tunneld.safetext import printable, quote_peer

RECORD_MAX_BYTES = 65536
_UCRED = struct.Struct("3i")  # Linux struct ucred: pid, uid, gid of a record's writer
_DEBUG = "debug1: "

# ssh's own lines that quote the peer: (ssh's words)(the peer's words, newlines included).
_QUOTES_PEER = re.compile(
    r"((?:debug1: )?(?:kex_exchange_identification: banner line \d+: |Remote protocol version [\d.]+, remote "
    r"software version |compat_banner: (?:no )?match: |Remote: |Received disconnect from .*? port \d+:\d+: |"
    r"Bad remote protocol version identification: |Unable to negotiate with .*? Their offer: |"
    r"channel \d+: open failed: [^:\n]*: ))(.*)",
    re.DOTALL,
)


@dataclass(frozen=True)
class Record:
    """One write to ssh's stderr and the process that wrote it (None where the platform cannot tell)."""

    text: str
    pid: int | None = None

    @property
    def debug(self) -> bool:
        return self.text.startswith(_DEBUG)

    @property
    def line(self) -> str:
        """ssh's own words: the first line without `debug1: ` (what follows a newline may be the peer's)."""
        return self.text.split("\n", 1)[0].rstrip("\r").removeprefix(_DEBUG)

    @property
    def quoted(self) -> tuple[str, str] | None:
        """(ssh's words, the peer's words after them) when this is a line of ssh's that quotes the peer, else None."""
        if match := _QUOTES_PEER.fullmatch(self.text):
            return match[1].removeprefix(_DEBUG), match[2]
        return None

    def shown(self) -> str:
        """The record for a log or a message: what ssh quotes from the peer quoted, short and escaped."""
        if quoted := self.quoted:
            return printable(quoted[0]) + quote_peer(quoted[1])
        rest = self.text.split("\n", 1)[1:]
        return printable(self.line) + (f" {quote_peer(rest[0])}" if rest and rest[0].strip() else "")


class StderrChannel:
    """Where ssh writes its stderr: a SOCK_SEQPACKET pair where there is one (one record per write, and on
    Linux the pid of each record's writer), else a pipe read by line."""

    def __init__(self, records: bool = True) -> None:
        """`records` False: a pipe even where records are possible (what other platforms get)."""
        self.knows_writers = False
        pair = _socket_pair() if records else None
        self._sock = pair[0] if pair is not None else None
        if pair is None:
            self._pipe, self.child_fd = os.pipe()
            return
        self.child_fd = pair[1].detach()
        with contextlib.suppress(OSError, AttributeError):  # SO_PASSCRED: Linux only
            pair[0].setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self.knows_writers = True

    def close(self) -> None:
        """Close both ends (the child could not be started)."""
        for fd in (self.child_fd, self._sock.detach() if self._sock is not None else self._pipe):
            with contextlib.suppress(OSError):
                os.close(fd)

    def spawned(self) -> None:
        """The child has its copy of the writing end: close ours, so the end of ssh is the end of the records."""
        os.close(self.child_fd)

    def records(self) -> Iterator[Record]:
        """Yield each record until every writer closed its end."""
        if self._sock is None:
            with os.fdopen(self._pipe, "rb", buffering=0) as pipe:
                lines = LineRecords()
                while chunk := pipe.read(RECORD_MAX_BYTES):
                    yield from lines.feed(chunk)
                yield from lines.feed(b"", end=True)
            return
        with self._sock:
            while True:
                data, ancillary, _, _ = self._sock.recvmsg(RECORD_MAX_BYTES, socket.CMSG_SPACE(_UCRED.size))
                if not data:
                    return
                pid = None
                for level, kind, blob in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(blob) >= _UCRED.size:
                        pid = _UCRED.unpack_from(blob)[0]
                text = data.decode(errors="replace").rstrip("\r\n")
                if text:
                    yield Record(text, pid)


def _socket_pair() -> tuple[socket.socket, socket.socket] | None:
    try:
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except (OSError, AttributeError):  # no SOCK_SEQPACKET for AF_UNIX (macOS)
        return None


class LineRecords:
    """A pipe's lines as records: where a line quotes the peer, the rest of the same read stays with it (a write
    of ssh's arrives whole in one read, so the peer's lines end there; best effort where records are not kept)."""

    def __init__(self) -> None:
        self._pending = b""
        self._quoting: str | None = None

    def feed(self, chunk: bytes, end: bool = False) -> list[Record]:
        """Return the records that `chunk` completes (`end`: the stream ended, flush everything)."""
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        if end and self._pending:
            lines, self._pending = [*lines, self._pending], b""
        records = []
        for raw in lines:
            text = raw.decode(errors="replace")
            if self._quoting is not None:
                self._quoting += "\n" + text
            elif _QUOTES_PEER.fullmatch(text.rstrip("\r")):
                self._quoting = text
            elif text.rstrip("\r"):
                records.append(Record(text.rstrip("\r")))
        if self._quoting is not None and (end or not self._pending):
            records.append(Record(self._quoting.rstrip("\r\n")))
            self._quoting = None
        return records
