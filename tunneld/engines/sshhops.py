"""What each ssh process (the target's, each ProxyJump hop's) said about its server, kept as facts: the stage it
reached and what it noted on the way (peer lines before the banner, the host key verdict, accepted key files,
forwarding errors).

The records of each ssh process (engines/sshstderr.py) move it through stages, matched at the start
of ssh's own lines: TCP up, the server's banner, its host key checked, verified (ssh sends NEWKEYS only
after accepting the key), authenticated. A fact counts only at the stage it belongs to. Separate from
the verdict (engines/sshdiag.py) because a hop only records; the error they add up to is chosen there.
"""

from __future__ import annotations

import enum
import re
import shlex
from dataclasses import dataclass, field

from tunneld.engines.sshstderr import Record

FACTS_KEPT = 20  # lines of one kind kept per hop (peer lines, accepted keys, forwarding errors)
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
_STDIO_TARGET = re.compile(r"channel_connect_stdio_fwd: (\S+)$")
_FORWARD_FAILED = ("bind [", "channel_setup_fwd_listener_tcpip: cannot listen to port", "unix_listener: cannot bind",
                   "Could not request local forwarding", "Error: remote port forwarding failed",
                   "Warning: remote port forwarding failed")  # fmt: skip
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
        if quoted := record.quoted:
            self._quoting(*quoted)
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
