"""Connections through a forward for health checks: what a stream is, and one through a local listener.

The engines hand these to the health checks (`runtime.health`) without knowing what a check asks.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Protocol

from tunneld.config.listen import name_for_lookup
from tunneld.config.spec import Forward
from tunneld.errors import ConnectError

TCP_SETTLE_S = 0.5  # how long a probe waits for OpenSSH to close a connection its target refused


class Stream(Protocol):
    """A connection through a forward (a local socket, or a paramiko channel)."""

    def sendall(self, data: bytes) -> None: ...
    def recv(self, nbytes: int) -> bytes: ...
    def settimeout(self, timeout: float | None) -> None: ...
    def close(self) -> None: ...


def probe_local(address: tuple[str, int] | str, timeout: float, settle: bool, target: str) -> socket.socket:
    """Connect to a forward's local listener; with `settle`, wait briefly for the tunnel to refuse it.

    Through OpenSSH a refused target shows as the connection closing at once: that is a ConnectError.
    """
    try:
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(address)
        else:
            sock = socket.create_connection((name_for_lookup(address[0]), address[1]), timeout=timeout)  # type: ignore[arg-type]
    except OSError as exc:
        raise ConnectError(f"cannot connect to the local end {address}: {exc.strerror or exc}") from exc
    if not settle:
        return sock
    sock.settimeout(TCP_SETTLE_S)
    try:
        data = sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return sock
    except OSError as exc:
        sock.close()
        raise ConnectError(f"connection to {target} failed: {exc.strerror or exc}") from exc
    if not data:
        sock.close()
        raise ConnectError(f"connection refused by {target}")
    return sock


@dataclass(frozen=True)
class LocalProber:
    """Health checks through one local listen address (`127.0.0.1`, `::1` or a socket path) of a forward."""

    address: tuple[str, int] | str

    def open_probe(self, forward: Forward, timeout: float, settle: bool) -> Stream:
        """Connect to the listener; with `settle`, give the tunnel a moment to refuse the connection."""
        return probe_local(self.address, timeout, settle, str(forward.target))
