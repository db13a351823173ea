"""Local listeners: which sockets a process listens on, and which process holds a busy port."""

from __future__ import annotations

import contextlib
import errno
import socket
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from psutil._ntuples import pconn, sconn

from tunneld.errors import PortInUseError

# macOS's AirPlay Receiver listens on 5000 and 7000 (ControlCenter since Monterey).
_AIRPLAY_PROCESSES = ("ControlCenter", "AirPlayXPCHelper")


@dataclass(frozen=True)
class Holder:
    """A process that holds a port or socket path."""

    pid: int | None
    name: str | None

    def __str__(self) -> str:
        if self.pid is None:
            return "another user's process (run as that user or as root to see which)"
        return f"{self.name} (pid {self.pid})"


@dataclass(frozen=True)
class Listeners:
    """The sockets one process listens on: TCP ports with their addresses, and unix socket paths."""

    tcp: dict[int, tuple[str, ...]]
    unix: frozenset[str]


def format_address(ip: str, port: int) -> str:
    """Return `ip:port`, bracketing IPv6 addresses."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def listeners_of(pid: int) -> Listeners:
    """Return what process `pid` listens on (empty when it is gone)."""
    tcp: dict[int, list[str]] = {}
    unix: set[str] = set()
    try:
        proc = psutil.Process(pid)
        for conn in proc.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr:
                tcp.setdefault(conn.laddr.port, []).append(format_address(conn.laddr.ip, conn.laddr.port))
        for conn in proc.net_connections(kind="unix"):
            if isinstance(conn.laddr, str) and conn.laddr:
                unix.add(conn.laddr)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        pass
    ordered = {port: tuple(sorted(addrs, key=lambda a: a.startswith("["))) for port, addrs in tcp.items()}
    return Listeners(ordered, frozenset(unix))


def _holder_from(conns: list[sconn]) -> Holder | None:
    for conn in conns:
        if conn.pid is None:
            return Holder(None, None)
        try:
            return Holder(conn.pid, psutil.Process(conn.pid).name())
        except psutil.Error:
            return Holder(conn.pid, None)
    return None


def port_holder(port: int | None = None, path: str | None = None) -> Holder | None:
    """Return the process listening on TCP `port` or unix socket `path`, if one can be found."""
    kind = "unix" if path is not None else "inet"

    def matches(conn: sconn | pconn) -> bool:
        laddr: object = conn.laddr  # a str for unix sockets, whatever the stubs say
        if path is not None:
            return laddr == path
        return isinstance(laddr, tuple) and len(laddr) == 2 and laddr[1] == port and conn.status == psutil.CONN_LISTEN

    try:
        return _holder_from([c for c in psutil.net_connections(kind=kind) if matches(c)])
    except psutil.AccessDenied:
        pass
    # Without privileges (macOS) walk our own processes one by one.
    for proc in psutil.process_iter(["pid", "name"]):
        with contextlib.suppress(psutil.Error):
            conns = [c for c in proc.net_connections(kind=kind) if matches(c)]
            if conns:
                return Holder(proc.pid, proc.info["name"])
    return None


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Return True when a listener could bind `host:port` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def port_in_use_error(listen: str, port: int | None = None, path: str | None = None) -> PortInUseError:
    """Build the error for a forward that cannot listen, naming the process that holds it."""
    holder = port_holder(port=port, path=path)
    what = f"local socket {path}" if path is not None else f"local port {port}"
    where = f" by {holder}" if holder else ""
    message = f"{what} ({listen}) is already in use{where}"
    if (holder is not None and holder.name in _AIRPLAY_PROCESSES) or (
        sys.platform == "darwin" and port in (5000, 7000)
    ):
        hint = (
            "on macOS, turn off AirPlay Receiver (System Settings > General > AirDrop & Handoff) "
            f"or use another local port, e.g. LocalForward {(port or 5000) + 1} localhost:{port}"
        )
    elif holder is not None and holder.pid is not None:
        hint = f"stop {holder.name} (pid {holder.pid}) or pick another local port in your LocalForward line"
    else:
        hint = "free the port or pick another local port in your LocalForward line"
    return PortInUseError(message, hint, holder=str(holder) if holder else None)
