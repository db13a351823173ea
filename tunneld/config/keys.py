"""The keys a host could log in with: ask an ssh-agent which keys it holds (the agent protocol's
REQUEST_IDENTITIES, nothing else), tell which of them a host's IdentityFiles are, and whether a key file needs a
passphrase. Used by `autostart` (the agent a service will reach), the supervisor (needs-auth waits for the
agent's keys to change), `show`/`check` (which authentication a host will need) and the OpenSSH engine's
classifier (a key that needs a passphrase).

The agent's answer is data from another process: its size, key count and every length are bounded, and
comments are only ever shown escaped. No paramiko: `autostart status` stays light.
"""

from __future__ import annotations

import base64
import binascii
import os
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tunneld.config.spec import TunnelSpec, default_identity_files

REQUEST_IDENTITIES = 11  # SSH2_AGENTC_REQUEST_IDENTITIES (draft-miller-ssh-agent, 3.4)
IDENTITIES_ANSWER = 12  # SSH2_AGENT_IDENTITIES_ANSWER
AGENT_TIMEOUT_S = 3.0
MAX_ANSWER_BYTES = 256 * 1024
MAX_KEYS = 1024
MAX_KEY_FILE_BYTES = 64 * 1024


@dataclass(frozen=True)
class AgentProbe:
    """What an agent socket answered: the key blobs it holds, or why it could not be asked."""

    path: str
    blobs: tuple[bytes, ...] = ()
    problem: str | None = None

    @property
    def reachable(self) -> bool:
        """True when the agent answered the list of its keys."""
        return self.problem is None


def probe_agent(path: str, timeout: float = AGENT_TIMEOUT_S) -> AgentProbe:
    """Connect to the agent at `path` and list the public keys it holds, within `timeout` for the whole exchange.

    Only an agent of this user counts: a socket another user serves (a stale /tmp/ssh-XXXX/agent.N another user
    re-created, say) would receive whatever key `ssh-add` loads into it, so it is "not yours", never "your agent".
    """
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            return _ask(sock, path, deadline)
    except FileNotFoundError:
        return AgentProbe(path, problem="no such socket")
    except ConnectionRefusedError:
        return AgentProbe(path, problem="nothing listens on it (the agent is not running)")
    except TimeoutError:
        return AgentProbe(path, problem=f"the agent did not answer within {timeout:g} s")
    except (OSError, ValueError) as exc:
        return AgentProbe(path, problem=str(exc) or type(exc).__name__)


def _ask(sock: socket.socket, path: str, deadline: float) -> AgentProbe:
    owner = peer_uid(sock, path)
    if owner != os.getuid():
        return AgentProbe(path, problem=f"served by uid {owner}, not by you (uid {os.getuid()})")
    sock.sendall(struct.pack(">IB", 1, REQUEST_IDENTITIES))
    length = struct.unpack(">I", _read_exactly(sock, 4, deadline))[0]
    if not 1 <= length <= MAX_ANSWER_BYTES:
        return AgentProbe(path, problem=f"the agent answered a message of {length} bytes")
    return AgentProbe(path, _parse_identities(_read_exactly(sock, length, deadline)))


def peer_uid(sock: socket.socket, path: str) -> int | None:
    """Return the uid of the process serving a connected unix socket (SO_PEERCRED on Linux; elsewhere the owner
    of the socket file, which only its creator or root can change)."""
    credentials = peer_credentials(sock)
    if credentials is not None:
        return credentials[1]
    try:
        return os.stat(path).st_uid
    except OSError:
        return None


def peer_credentials(sock: socket.socket) -> tuple[int, int] | None:
    """Return (pid, uid) of the process at the other end of a connected unix socket, where the system tells
    (SO_PEERCRED: Linux); None elsewhere."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return int(pid), int(uid)


def _read_exactly(sock: socket.socket, count: int, deadline: float) -> bytes:
    data = b""
    while len(data) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)  # one deadline for the whole answer: an agent that dribbles cannot hold us
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ValueError("the agent closed the connection mid-answer")
        data += chunk
    return data


def _parse_identities(message: bytes) -> tuple[bytes, ...]:
    """Return the key blobs of an IDENTITIES_ANSWER: byte type, uint32 count, (string blob, string comment)*."""
    if message[0] != IDENTITIES_ANSWER:
        raise ValueError(f"the agent refused to list its keys (answer type {message[0]})")
    if len(message) < 5:
        raise ValueError("the agent's answer is truncated")
    count = struct.unpack(">I", message[1:5])[0]
    if count > MAX_KEYS:
        raise ValueError(f"the agent claims {count} keys")
    offset, blobs = 5, []
    for _ in range(count):
        blob, offset = _string(message, offset)
        _, offset = _string(message, offset)  # the comment: never needed, never shown
        blobs.append(blob)
    return tuple(blobs)


def _string(message: bytes, offset: int) -> tuple[bytes, int]:
    if offset + 4 > len(message):
        raise ValueError("the agent's answer is truncated")
    size = struct.unpack(">I", message[offset : offset + 4])[0]
    end = offset + 4 + size
    if end > len(message):
        raise ValueError("the agent's answer is truncated")
    return message[offset + 4 : end], end


def named_identity_files(spec: TunnelSpec) -> tuple[str, ...]:
    """Return the IdentityFiles ssh_config names for the host (ssh's defaults alone count as none named)."""
    if set(spec.identity_files) <= default_identity_files():
        return ()
    return spec.identity_files


def public_blobs(identity_file: str) -> tuple[bytes, ...]:
    """Return the public key blobs of `identity_file` (its .pub and -cert.pub), as an agent lists them."""
    blobs = []
    for path in (f"{identity_file}.pub", f"{identity_file}-cert.pub"):
        try:
            fields = Path(path).read_text(errors="replace")[:MAX_KEY_FILE_BYTES].split()
            blobs.append(base64.b64decode(fields[1], validate=True))
        except (OSError, IndexError, binascii.Error):
            continue
    return tuple(blobs)


def keys_held(probe: AgentProbe, identity_files: Iterable[str]) -> tuple[str, ...]:
    """Return the identity files whose public key the agent holds."""
    held = set(probe.blobs)
    return tuple(path for path in identity_files if held.intersection(public_blobs(path)))


def needs_passphrase(identity_file: str) -> bool | None:
    """Return whether a private key file is encrypted (None: unreadable or not a key ssh can use alone)."""
    try:
        with open(identity_file, "rb") as handle:
            text = handle.read(MAX_KEY_FILE_BYTES).decode("ascii", errors="replace")
    except OSError:
        return None
    if "-----BEGIN OPENSSH PRIVATE KEY-----" in text:
        cipher = _openssh_cipher(text.split("-----BEGIN OPENSSH PRIVATE KEY-----", 1)[1].split("-----END", 1)[0])
        return None if cipher is None else cipher != b"none"
    if "PRIVATE KEY-----" in text:
        return "ENCRYPTED" in text  # PEM: `Proc-Type: 4,ENCRYPTED` or `BEGIN ENCRYPTED PRIVATE KEY`
    return None


def _openssh_cipher(body: str) -> bytes | None:
    """Return the cipher name of an openssh-key-v1 private key (b"none": not encrypted), None when malformed."""
    magic = b"openssh-key-v1\x00"
    try:
        raw = base64.b64decode("".join(body.split()))
        return _string(raw, len(magic))[0] if raw.startswith(magic) else None
    except (binascii.Error, ValueError):
        return None


def usable_without_agent(spec: TunnelSpec) -> str | None:
    """Return an IdentityFile of the host that ssh can use without an agent (no passphrase), or None."""
    return next((path for path in spec.identity_files if needs_passphrase(path) is False), None)
