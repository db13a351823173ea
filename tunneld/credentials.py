"""What credentials a host can use right now, asked of the agent, never of the server.

A host whose login was refused after it had worked waits in `needs-auth` until its credentials may
have changed: the agent's list of identities changed (keys added, removed, expired, the agent locked
or unlocked, started or gone), or the interactive login connection of `tunneld login` appeared. The
agent is asked every few seconds over its socket (SSH_AGENTC_REQUEST_IDENTITIES); the server sees one
authentication attempt per change at most (OpenSSH 9.8+ penalises failed logins too: `authfail`).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

AGENT_CHECK_S = 2.0
AGENT_TIMEOUT_S = 1.0
MAX_AGENT_REPLY_BYTES = 256 * 1024
_REQUEST_IDENTITIES = 11
_IDENTITIES_ANSWER = 12


def agent_socket(identity_agent: str | None) -> str | None:
    """Return the agent socket ssh would use: IdentityAgent from ssh_config, else SSH_AUTH_SOCK (None: no agent)."""
    if identity_agent is not None and identity_agent.lower() == "none":
        return None
    if identity_agent in (None, "SSH_AUTH_SOCK"):
        return os.environ.get("SSH_AUTH_SOCK") or None
    if identity_agent.startswith("$"):
        return os.environ.get(identity_agent[1:]) or None
    return os.path.expanduser(identity_agent)


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise OSError("the agent closed the connection")
        data += chunk
    return data


def agent_identities(path: str | None) -> tuple[bytes, ...] | None:
    """Return the public key blobs the agent at `path` offers (empty when it holds none or is locked), or None
    when no agent answers there. Only public data is read: the agent protocol's identity list."""
    if not path:
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(AGENT_TIMEOUT_S)
            sock.connect(path)
            sock.sendall(struct.pack(">IB", 1, _REQUEST_IDENTITIES))
            (length,) = struct.unpack(">I", _read_exactly(sock, 4))
            if not 1 <= length <= MAX_AGENT_REPLY_BYTES:
                return None
            reply = _read_exactly(sock, length)
    except (OSError, struct.error):
        return None
    return _parse_identities(reply)


def _parse_identities(reply: bytes) -> tuple[bytes, ...] | None:
    if reply[:1] != bytes([_IDENTITIES_ANSWER]) or len(reply) < 5:
        return None
    (count,) = struct.unpack(">I", reply[1:5])
    blobs, offset = [], 5
    try:
        for _ in range(min(count, 4096)):
            (size,) = struct.unpack(">I", reply[offset : offset + 4])
            blobs.append(reply[offset + 4 : offset + 4 + size])
            offset += 4 + size
            (size,) = struct.unpack(">I", reply[offset : offset + 4])  # the comment: skipped
            offset += 4 + size
    except struct.error:
        return None
    return tuple(blobs)


@dataclass(frozen=True)
class Credentials:
    """One look at what a host could log in with: the agent's identities (None: no agent answers) and whether
    the interactive login connection (`tunneld login`) is there."""

    agent: tuple[bytes, ...] | None
    master: bool = False

    def compared_to(self, before: Credentials) -> str | None:
        """Return how these credentials differ from `before` (None: unchanged)."""
        if self.master and not before.master:
            return "the interactive login connection is there"
        if self.agent == before.agent:
            return None
        if before.agent is None:
            return "an agent answers now"
        if self.agent is None:
            return "the agent went away"
        added = len(set(self.agent) - set(before.agent))
        removed = len(set(before.agent) - set(self.agent))
        return f"the agent's keys changed (+{added}, -{removed})"


class CredentialWatch:
    """Tells when a host's credentials may have changed: asks the agent at most every AGENT_CHECK_S."""

    def __init__(
        self,
        identity_agent: str | None,
        master: Callable[[], bool] = lambda: False,
        every_s: float = AGENT_CHECK_S,
        monotonic: Callable[[], float] = time.monotonic,
        identities: Callable[[str | None], tuple[bytes, ...] | None] = agent_identities,
    ) -> None:
        self.identity_agent = identity_agent
        self.master = master
        self.every_s = every_s
        self.monotonic = monotonic
        self.identities = identities
        self.last = self.look()
        self._checked = monotonic()

    def look(self) -> Credentials:
        """Ask the agent (and look for the login connection) now."""
        return Credentials(self.identities(agent_socket(self.identity_agent)), self.master())

    def changed(self) -> str | None:
        """Return why the credentials changed since the last look, or None; asks at most every `every_s`."""
        now = self.monotonic()
        if now - self._checked < self.every_s:
            return None
        self._checked = now
        current = self.look()
        why = current.compared_to(self.last)
        self.last = current
        return why


def control_socket_alive(path: Path) -> bool:
    """Return True when a unix socket at `path` accepts a connection (an ssh master listens there)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(AGENT_TIMEOUT_S)
            sock.connect(str(path))
    except OSError:
        return False
    return True
