"""ssh's stderr read as ssh wrote it: whose words each line is, how far each hop got, and why the link ended.

ssh quotes its peer in its own log (`banner line 0: ...`, `remote software version ...`, `Remote: ...`,
`Received disconnect ...: <reason>`), and on stderr it escapes control characters but not newlines:
a peer's DEBUG or DISCONNECT message, sent before any host key is exchanged, can carry whole lines
that look like ssh's own. So ssh's stderr is a SOCK_SEQPACKET socket where the platform has one:
every log call of ssh is one write, hence one record, whose first line is ssh's own words whatever
follows it; on Linux each record also names the process that wrote it (the target's ssh, or the ssh
of a ProxyJump hop). Without such a socket a pipe is read by line, and the rest of a read that
follows a line quoting the peer stays with that line.

The records of each ssh process move it through stages, matched at the start of ssh's own lines:
TCP up, the server's banner, its host key checked, verified (ssh sends NEWKEYS only after accepting
the key), authenticated. A verdict counts only at the stage it belongs to, so a failure before the
server's host key was verified is transient whatever the peer sent.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import shlex
import signal
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from tunneld.config.keys import needs_passphrase
from tunneld.config.ports import port_in_use_error
from tunneld.config.spec import TunnelSpec
from tunneld.errors import (
    AuthError,
    ConnectError,
    HandshakeStalledError,
    HostKeyError,
    RefusedByServerError,
    TunneldError,
    UnreachableError,
)
from tunneld.safetext import printable, quote_peer

RECORD_MAX_BYTES = 65536
HOPS_KEPT = 8  # ssh processes tracked per link: the target's ssh and its ProxyJump hops
FACTS_KEPT = 20  # lines of one kind kept per hop (peer lines, accepted keys, forwarding errors)
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
_CONNECTING = re.compile(r"Connecting to (\S+) \[[^\]]*\] port (\d+)\.$")
_AUTHENTICATING = re.compile(r"Authenticating to (.+):(\d+) as '(.*)'$")
_HOST_KEY = re.compile(r"Server host key: \S+ (\S+)")
_OFFENDING = re.compile(r"Offending \S+ key in (.+):(\d+)$")
_REMOVE_WITH = re.compile(r'\s+ssh-keygen -f "(.+)" -R "(.+)"$')
_ACCEPTED = re.compile(r"Server accepts key: (.+) \S+ \S+:\S+ explicit$")  # a key file, not agent/token/FIDO
_LOAD_FAILED = re.compile(r'Load key "(.+)": ')
_KILLED = re.compile(r"Killed by signal (\d+)\.$")
_WRITE_FAILED = {"kex_exchange_identification: write: Connection reset by peer": "reset",
                 "kex_exchange_identification: write: Broken pipe": "closed"}  # fmt: skip
_DENIED = re.compile(r"\S+@\S+: Permission denied \(.*\)\.$")
_STDIO_TARGET = re.compile(r"channel_connect_stdio_fwd: (\S+)$")
_FORWARD_FAILED = ("bind [", "channel_setup_fwd_listener_tcpip: cannot listen to port", "unix_listener: cannot bind",
                   "Could not request local forwarding", "Error: remote port forwarding failed",
                   "Warning: remote port forwarding failed")  # fmt: skip
_BIND_ADDR_RE = re.compile(r"bind \[([^\]]*)\]:(\d+): Address already in use")
_BIND_PORT_RE = re.compile(r"cannot listen to port: (\d+)")
_BIND_PATH_RE = re.compile(r"cannot bind to path:? (\S+?):? Address already in use")
# Not why ssh ended: said after the verdict (a hop's ssh killed, the byte counts), or a stage reached.
_STILL_AUTHENTICATING = (
    "Authentications that can continue: ",
    "Next authentication method: ",
    "Offering public key: ",
    "Server accepts key: ",
    "Trying private key: ",
    "No more authentication methods to try.",
)
_TRAILING = ("Killed by signal", "Transferred: ", "Bytes per second: ", "Authenticated to ")


class Stage(enum.IntEnum):
    """How far one ssh process got with its server, by ssh's own lines."""

    START = 0
    TCP = 1  # debug1: Connection established.
    BANNER = 2  # debug1: Remote protocol version ...: the server's SSH banner arrived
    HOST_KEY = 3  # debug1: Server host key: ...: ssh is checking it; host key verdicts belong here
    VERIFIED = 4  # debug1: SSH2_MSG_NEWKEYS sent: ssh sends it only after it accepted the host key
    AUTHENTICATED = 5  # Authenticated to HOST ...


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

    def shown(self) -> str:
        """The record for a log or a message: what ssh quotes from the peer quoted, short and escaped."""
        if match := _QUOTES_PEER.fullmatch(self.text):
            return printable(match[1].removeprefix(_DEBUG)) + quote_peer(match[2])
        rest = self.text.split("\n", 1)[1:]
        return printable(self.line) + (f" {quote_peer(rest[0])}" if rest and rest[0].strip() else "")


@dataclass
class Hop:
    """What one ssh process said about its server, kept as facts (never as a tail chatter could push out)."""

    pid: int | None
    stage: Stage = Stage.START
    host: str = ""
    port: int = 0
    user: str = ""
    unreachable: str | None = None  # ssh could not open TCP to it (or resolve its name)
    banner_timeout: bool = False
    before_banner: str | None = None  # "closed" or "reset": the connection ended before an SSH banner
    peer_lines: list[str] = field(default_factory=list)  # lines it sent before its banner
    fingerprint: str = ""
    changed: bool = False
    revoked: bool = False
    unknown: bool = False
    saved_in: str = ""
    remove_command: str | None = None
    accepted_files: list[str] = field(default_factory=list)  # key files the server would take
    unloadable: set[str] = field(default_factory=set)
    disconnect: str | None = None  # the peer's reason for ending the connection
    channel_failed: tuple[str, str] | None = None  # a ProxyJump hop could not reach the next: (why, server's words)
    stdio_target: str = ""
    forward_errors: list[str] = field(default_factory=list)
    last: Record | None = None  # the last thing ssh said that was not debug chatter
    killed: int = 0  # the signal ssh said ended it (SIGHUP, SIGINT after login: "Killed by signal 1.")
    tcp: bool = False  # this ssh opened TCP itself (not through a ProxyCommand or ProxyJump): the first hop

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}" if self.host else "the server"

    def is_past(self, record: Record) -> bool:
        """Return True when `record` starts a new connection (one stream holding several hops, in order)."""
        line = record.line
        return (
            (line.startswith("Connecting to ") and self.stage >= Stage.TCP)
            or (line == "Connection established." and self.stage >= Stage.TCP)
            or (line.startswith("Remote protocol version ") and self.stage >= Stage.BANNER)
        )

    def feed(self, record: Record) -> None:
        """Take one record: advance the stage or note a fact, each only where ssh says it."""
        line = record.line
        if not record.debug and not line.startswith(_TRAILING):
            self.last = record
        if quoted := _QUOTES_PEER.fullmatch(record.text):
            self._quoting(quoted[1].removeprefix(_DEBUG), quoted[2])
        elif record.debug:
            self._debug(line)
        else:
            self._error(line)

    def _quoting(self, said: str, peer: str) -> None:
        """A line of ssh's that quotes the peer: only ssh's words in front of the quote count."""
        if said.startswith("Received disconnect from "):
            self.disconnect = peer.strip()
        elif self.stage <= Stage.TCP and said.startswith("kex_exchange_identification: banner line "):
            if len(self.peer_lines) < FACTS_KEPT:
                self.peer_lines.append(peer)
        elif self.stage <= Stage.TCP and said.startswith("Remote protocol version "):
            self.stage = Stage.BANNER
        elif self.stage == Stage.AUTHENTICATED and said.startswith("channel "):
            self.channel_failed = (said.split(": open failed: ", 1)[-1].removesuffix(": "), peer)

    def _debug(self, line: str) -> None:
        stage = self.stage
        if stage == Stage.START and (match := _CONNECTING.match(line)):
            self.host, self.port = match[1], int(match[2])
        elif stage == Stage.START and line == "Connection established.":
            self.stage, self.tcp = Stage.TCP, True
        elif stage <= Stage.TCP and line in _WRITE_FAILED:  # it closed or reset before ssh sent its own banner
            self.before_banner = _WRITE_FAILED[line]
        elif stage == Stage.BANNER and (match := _AUTHENTICATING.match(line)):
            self.host, self.port, self.user = match[1], int(match[2]), match[3]
        elif stage == Stage.BANNER and (match := _HOST_KEY.match(line)):
            self.stage, self.fingerprint = Stage.HOST_KEY, match[1]
        elif stage == Stage.HOST_KEY and line == "SSH2_MSG_NEWKEYS sent":
            self.stage = Stage.VERIFIED
        elif stage == Stage.VERIFIED and (match := _ACCEPTED.match(line)) and len(self.accepted_files) < FACTS_KEPT:
            self.accepted_files.append(match[1])
        elif stage == Stage.AUTHENTICATED and (match := _STDIO_TARGET.match(line)):
            self.stdio_target = match[1]
        elif stage == Stage.AUTHENTICATED and line.startswith(_STILL_AUTHENTICATING):
            # ssh is still trying credentials: the `Authenticated to` line was the server's login banner, which ssh
            # prints raw (after the host key was verified, but the server's words all the same).
            self.stage = Stage.VERIFIED

    def _error(self, line: str) -> None:
        stage = self.stage
        if match := _KILLED.match(line):
            self.killed = int(match[1])
        elif (
            stage == Stage.START
            and line.startswith("ssh: connect to host ")
            and line.endswith(": Connection reset by peer")
        ):
            self.before_banner = "reset"  # it accepted TCP, then reset it before ssh looked
        elif stage == Stage.START and line.startswith(("ssh: connect to host ", "ssh: Could not resolve hostname ")):
            self.unreachable = line.removeprefix("ssh: ")
        elif stage <= Stage.TCP and line == "Connection timed out during banner exchange":
            self.banner_timeout = True
        elif stage <= Stage.TCP and line == "kex_exchange_identification: Connection closed by remote host":
            self.before_banner = "closed"
        elif stage <= Stage.TCP and line == "kex_exchange_identification: read: Connection reset by peer":
            self.before_banner = "reset"
        elif stage == Stage.HOST_KEY:
            self._host_key_verdict(line)
        elif stage == Stage.VERIFIED and line.startswith("Authenticated to "):
            self.stage = Stage.AUTHENTICATED
        elif stage == Stage.VERIFIED and (match := _LOAD_FAILED.match(line)):
            self.unloadable.add(match[1])
        elif (
            stage == Stage.AUTHENTICATED and line.startswith(_FORWARD_FAILED) and len(self.forward_errors) < FACTS_KEPT
        ):
            self.forward_errors.append(line)

    def _host_key_verdict(self, line: str) -> None:
        """ssh's own lines while it checks the key (no peer text can reach stderr before NEWKEYS but quoted)."""
        if line.startswith("@") and ("REMOTE HOST IDENTIFICATION HAS CHANGED" in line or "DNS SPOOFING" in line):
            self.changed = True
        elif (line.startswith("@") and "REVOKED HOST KEY" in line) or line.endswith("is marked as revoked."):
            self.revoked = True
        elif line == "Error: forwarding disabled due to host key check failure":
            self.changed = True
        elif line == "Host key verification failed." or (line.startswith("No ") and " host key is known for " in line):
            self.unknown = True
        elif match := _OFFENDING.match(line):
            self.saved_in = f" ({match[1]} line {match[2]})"
        elif match := _REMOVE_WITH.match(line):
            self.remove_command = shlex.join(["ssh-keygen", "-f", match[1], "-R", match[2]])


class Diagnosis:
    """Everything ssh said about one link, hop by hop, and the error it adds up to when ssh ends."""

    def __init__(self, spec: TunnelSpec, main_pid: int | None = None) -> None:
        self.spec = spec
        self.main_pid = main_pid  # the target's ssh; None when records do not name their writer
        self.hops: list[Hop] = []
        self._current: dict[int | None, Hop] = {}

    def feed(self, record: Record) -> None:
        """Take the next record ssh (or a ProxyJump hop's ssh) wrote."""
        pid = record.pid if self.main_pid is not None else None
        hop = self._current.get(pid)
        if hop is None or hop.is_past(record):
            if len(self.hops) >= HOPS_KEPT:
                return
            hop = Hop(pid)
            self.hops.append(hop)
            self._current[pid] = hop
        hop.feed(record)

    @property
    def tcp_up(self) -> bool:
        """TCP to the first hop is connected (or a banner arrived through a ProxyCommand)."""
        return any(hop.stage >= Stage.TCP for hop in self.hops)

    @property
    def banner(self) -> bool:
        """The target's SSH banner arrived (it is checking the host key now)."""
        return self.target.stage >= Stage.BANNER

    @property
    def authenticated(self) -> bool:
        """The target (not a ProxyJump hop) accepted the login."""
        return self.target.stage == Stage.AUTHENTICATED

    @property
    def first_hop_authenticated(self) -> bool:
        """The ssh that opened TCP (to the server, or to the first ProxyJump host) got past authentication: the
        connection tunneld opened did not end before it, whatever happened behind it."""
        return any(hop.tcp and hop.stage == Stage.AUTHENTICATED for hop in self.hops)

    @property
    def target(self) -> Hop:
        """The hop that is the spec's own server (a fresh one while ssh has not reached it)."""
        if self.main_pid is not None:
            mine = [hop for hop in self.hops if hop.pid == self.main_pid]
        else:
            wanted = (self.spec.hostname.lower(), self.spec.port)
            mine = [hop for hop in self.hops if (hop.host.lower(), hop.port) == wanted]
            if not mine and not (self.spec.proxy_jump or self.spec.proxy_command):
                mine = self.hops
        return mine[-1] if mine else Hop(self.main_pid)

    def jumps(self) -> list[Hop]:
        """The other ssh processes that said where they connect (ProxyJump hops), in the order they began."""
        target = self.target
        return [hop for hop in self.hops if hop is not target and (hop.host or hop.stage > Stage.START)]

    def last_words(self) -> str:
        """What ssh said last (peer text quoted), for a message."""
        for hop in (self.target, *reversed(self.hops)):
            if hop.last is not None:
                return hop.last.shown()
        return "nothing"

    def error(self, returncode: int) -> TunneldError:
        """Why the link ended, as a typed error: only ssh's own words, each at its stage, choose the class."""
        if returncode < 0:  # killed by a signal: whatever ssh last printed is not why
            return ConnectError(f"ssh was killed ({_signal_name(-returncode)})", "tunneld reconnects by itself")
        target = self.target
        if target.stage < Stage.BANNER:
            for hop in self.jumps():
                if (error := self._hop_error(hop, jump=True)) is not None:
                    return error
        if (error := self._hop_error(target, jump=False)) is not None:
            return error
        if target.killed:
            return ConnectError(f"ssh was killed ({_signal_name(target.killed)})", "tunneld reconnects by itself")
        if returncode == 0:  # ssh -N ends so on SIGTERM after login
            return ConnectError("ssh ended without an error (status 0)", "tunneld reconnects by itself")
        last = target.last or next((hop.last for hop in reversed(self.hops) if hop.last), None)
        said = last.shown() if last is not None else ""
        hint = _connect_hint(self.spec.hostname, self.spec.port, said)
        return ConnectError(said or f"ssh exited with status {returncode}", hint)

    def _hop_error(self, hop: Hop, jump: bool) -> TunneldError | None:
        """The error one hop's own lines decide, judged at the stage it reached."""
        where = hop.where if jump else f"{self.spec.hostname}:{self.spec.port}"
        shown = f"jump host {where}" if jump else where
        error: TunneldError | None
        if hop.stage <= Stage.TCP:
            error = self._reach_error(hop, shown, jump)
        elif hop.stage < Stage.AUTHENTICATED:
            error = self._host_key_error(hop, jump) or self._auth_error(hop, jump, where)
        else:
            error = self._session_error(hop, shown, jump, where)
        if error is None and hop.disconnect is not None:
            before = " before its host key was verified" if hop.stage < Stage.VERIFIED else ""
            error = ConnectError(f"{shown} ended the connection{before}: {quote_peer(hop.disconnect)}")
        return error

    def _reach_error(self, hop: Hop, shown: str, jump: bool) -> ConnectError | None:
        """Before any SSH banner: TCP failed, nothing was said in time, or the connection ended first."""
        if hop.unreachable:
            return UnreachableError(
                hop.unreachable, _connect_hint(hop.host, hop.port, hop.unreachable, self.spec.alias)
            )
        if hop.banner_timeout:
            return HandshakeStalledError(f"{shown}: Connection timed out during banner exchange", _STALLED_HINT)
        if not hop.before_banner:
            return None
        how = hop.before_banner
        if hop.peer_lines:  # OpenSSH 9.8+ refuses with a line of text (`Not allowed at this time`), then closes
            more = f" (and {len(hop.peer_lines) - 1} more lines)" if len(hop.peer_lines) > 1 else ""
            return RefusedByServerError.before_banner(shown, how, f"{quote_peer(hop.peer_lines[0])}{more}")
        if not jump and self.spec.proxy_command:
            return ConnectError(
                f"the ProxyCommand of {self.spec.alias} ended before {shown} sent its SSH banner",
                f"try `{self.spec.ssh_command}` by hand; tunneld keeps retrying",
            )
        return RefusedByServerError.before_banner(shown, how)

    def _session_error(self, hop: Hop, shown: str, jump: bool, where: str) -> TunneldError | None:
        """After login: a ProxyJump hop could not reach the next one, or a forward could not be set up."""
        if jump and hop.channel_failed:
            why, server_said = hop.channel_failed
            target = hop.stdio_target or "the next hop"
            return ConnectError(
                f"{shown} could not reach {target}: {why}: {quote_peer(server_said)}",
                f"is {target} up and reachable from {where}? tunneld keeps retrying",
            )
        if not jump and hop.forward_errors:
            return _forward_error(hop.forward_errors)
        return None

    def _host_key_error(self, hop: Hop, jump: bool) -> HostKeyError | None:
        spec = self.spec
        host = f"jump host {hop.where}" if jump else spec.hostname
        if hop.revoked:
            return HostKeyError.revoked(host, hop.fingerprint, "")
        if hop.changed:
            remove = (hop.remove_command or f"ssh-keygen -R {hop.where}") if jump else spec.remove_key_command
            return HostKeyError.changed(host, spec.ssh_command, remove, hop.saved_in)
        if hop.unknown:
            return HostKeyError.unknown(host, spec.ssh_command)
        return None

    def _auth_error(self, hop: Hop, jump: bool, where: str) -> AuthError | None:
        """ssh's own refusal, as the last thing it said (a server's banner, printed raw before, can look alike)."""
        spec = self.spec
        if hop.stage != Stage.VERIFIED:
            return None
        login = f"jump host {hop.user}@{where}" if jump else f"{spec.user}@{where}"
        if hop.disconnect == "Too many authentication failures":  # the verified server's word on auth
            return AuthError.too_many_keys(login, spec.ssh_command)
        if hop.last is None or hop.last.debug or not _DENIED.fullmatch(hop.last.text.rstrip("\r\n")):
            return None
        # ssh offered the key's public half and could not sign: a passphrase no agent supplies, when the key file
        # says it is encrypted (a private key that is simply missing beside its .pub is not "locked").
        locked = [p for p in hop.accepted_files if p not in hop.unloadable and needs_passphrase(p) is True]
        if locked:
            return AuthError.locked_keys(login, spec.ssh_command, list(dict.fromkeys(locked)))
        missing = spec.missing_identity_files() if hop is self.target else ()
        return AuthError.refused(login, spec.ssh_command, hop.last.line, None, missing)


_STALLED_HINT = (
    "the server accepts TCP but sent no SSH banner in time: a frozen or overloaded sshd, or another service on "
    "that port; tunneld keeps one attempt pending"
)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _connect_hint(host: str, port: int, said: str, alias: str = "") -> str:
    if "Could not resolve hostname" in said:
        return f"check HostName for {alias or host} in your ssh_config and your network"
    if "remote port forwarding failed" in said:
        return "the server refused a RemoteForward: the port may be held by an older session there"
    return f"is {host} up and reachable on port {port}? tunneld keeps retrying"


def _forward_error(lines: list[str]) -> TunneldError:
    text = "\n".join(lines)
    if path_match := _BIND_PATH_RE.search(text):
        return port_in_use_error(path=path_match[1])
    if addr_match := _BIND_ADDR_RE.search(text):
        return port_in_use_error(port=int(addr_match[2]), ip=addr_match[1])
    if port_match := _BIND_PORT_RE.search(text):
        return port_in_use_error(port=int(port_match[1]))
    if "Could not request local forwarding" in text:
        return port_in_use_error(port=None)
    remote = next(line for line in lines if "remote port forwarding failed" in line)
    return ConnectError(remote, _connect_hint("", 0, remote))


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
