"""Local listeners: which sockets a process listens on, and which process holds a busy port."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

from tunneld.config.listen import format_address
from tunneld.errors import ConfigError, PortInUseError, TunneldError

if TYPE_CHECKING:
    from psutil._ntuples import pconn, sconn

    from tunneld.config.spec import TunnelSpec

log = logging.getLogger(__name__)

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


def listeners_of(pid: int) -> Listeners:
    """Return what process `pid` listens on (empty when it is gone, or cannot be read: a process that is exiting
    denies even its own user a look at its descriptors)."""
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
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
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


def _covers(ip: str | None, laddr_ip: str) -> int:
    """Rank how a listener on `laddr_ip` blocks `ip`: 2 exactly, 1 as a wildcard, 0 not at all."""
    if ip is None or laddr_ip == ip:
        return 2
    if laddr_ip == "::" or (laddr_ip == "0.0.0.0" and ":" not in ip) or ip in ("0.0.0.0", "::"):
        return 1
    return 0


def port_holder(port: int | None = None, path: str | None = None, ip: str | None = None) -> Holder | None:
    """Return the process listening on unix socket `path`, or on TCP `port` in a way that blocks `ip`."""
    kind = "unix" if path is not None else "inet"

    def rank(conn: sconn | pconn) -> int:
        laddr: object = conn.laddr  # a str for unix sockets, whatever the stubs say
        if path is not None:
            return 2 if laddr == path else 0
        if not (isinstance(laddr, tuple) and len(laddr) == 2 and laddr[1] == port):
            return 0
        return _covers(ip, str(laddr[0])) if conn.status == psutil.CONN_LISTEN else 0

    def best(conns: list[sconn]) -> Holder | None:
        # A unix listener's connections still in its backlog carry its path and no process (fd -1): the
        # listener's own entry, with its pid, names the holder.
        ranked = sorted((c for c in conns if rank(c)), key=lambda c: (rank(c), c.pid is not None), reverse=True)
        return _holder_from(ranked)

    try:
        return best(psutil.net_connections(kind=kind))
    except psutil.AccessDenied:
        pass
    # Without privileges (macOS) walk our own processes one by one.
    for proc in psutil.process_iter(["pid", "name"]):
        with contextlib.suppress(psutil.Error):
            if any(rank(c) for c in proc.net_connections(kind=kind)):
                return Holder(proc.pid, proc.info["name"])
    return None


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Return True when a listener could bind `host:port` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as ssh binds it
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def unix_socket_answers(path: str) -> bool:
    """Return True when something accepts connections on the unix socket `path`."""
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def socket_path_error(path: str) -> TunneldError | None:
    """Return what keeps a LocalForward from binding the unix socket `path` (None: nothing is there, or a stale
    socket of yours that binding may remove): a live socket, another user's, or something that is no socket."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return ConfigError(
            f"cannot check local socket path {path}: {exc.strerror}",
            "point the LocalForward at a socket path in a directory of yours",
        )
    if not stat.S_ISSOCK(info.st_mode):
        return ConfigError(
            f"local socket path {path} exists and is not a socket",
            "move that file away, or point the LocalForward at another socket path",
        )
    if unix_socket_answers(path):
        return port_in_use_error(path=path)
    if info.st_uid != os.getuid():
        owner = user_name(info.st_uid)
        return PortInUseError(
            f"local socket path {path} holds a stale socket of {owner}: tunneld removes only its own",
            f"ask {owner} (or root) to remove it (rm {path}), or point the LocalForward at another socket path",
            holder=f"a socket file of {owner}",
        )
    return None


def clear_stale_socket(path: str) -> None:
    """Before binding `path`: remove a socket file of yours nobody listens on (a crashed link's); refuse a live
    one, another user's, or one that cannot be removed, naming what holds the path.

    OpenSSH's StreamLocalBindUnlink would remove a live socket too; this keeps another program's.
    """
    error = socket_path_error(path)
    if error is not None:
        raise error
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise PortInUseError(
            f"local socket path {path} holds a stale socket that tunneld cannot remove: {exc.strerror}",
            f"remove it (rm {path}), or point the LocalForward at a socket path in a directory you can write to",
            holder="a stale socket file",
        ) from exc


def user_name(uid: int) -> str:
    """Return `user NAME (uid N)`, or `uid N` when the account has no name."""
    import pwd

    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def port_in_use_error(port: int | None = None, path: str | None = None, ip: str | None = None) -> PortInUseError:
    """Build the error for a forward that cannot listen on `ip:port` (or `path`), naming what holds it."""
    holder = port_holder(port=port, path=path, ip=ip)
    what = f"local socket {path}" if path is not None else f"local port {port}"
    where = f" on {ip}" if ip else ""
    owner = _tunneld_host_of(holder)
    if owner is not None:
        return PortInUseError(
            f"{what}{where} is held by tunneld host {owner} (stop it with: tunneld stop {owner})",
            f"two hosts cannot share a local port: `tunneld stop {owner}`, or change one of the two LocalForward lines",
            holder=f"tunneld host {owner}",
        )
    message = f"{what} is already in use{where}" + (f" by {holder}" if holder else "")
    if path is not None and (owner := _foreign_owner(path)) is not None:
        message += f"; the socket file belongs to {owner}"
    if path is not None:
        hint = (
            f"another program listens on {path}: stop it, or point the LocalForward at another socket path"
            if holder is None or holder.pid is None
            else f"stop {holder.name} (pid {holder.pid}), or point the LocalForward at another socket path"
        )
    elif (holder is not None and holder.name in _AIRPLAY_PROCESSES) or (
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


def _foreign_owner(path: str) -> str | None:
    """Return the owner of the file at `path` when it is another user (None: yours, or gone)."""
    try:
        uid = os.lstat(path).st_uid
    except OSError:
        return None
    return user_name(uid) if uid != os.getuid() else None


def _tunneld_host_of(holder: Holder | None) -> str | None:
    """Return the tunneld host whose supervisor (or its ssh child) is `holder`, if any."""
    if holder is None or holder.pid is None:
        return None
    from tunneld.state.status import host_owning_pid

    return host_owning_pid(holder.pid)


class PortGuard:
    """Holds a host's local forward addresses while no ssh does (the OpenSSH engine's listeners die with its
    ssh): while a host waits for credentials, possibly for hours, no other local user can take a port and receive
    the connections meant for the tunnel. A client is closed at once. `release` before ssh binds them again."""

    def __init__(self, spec: TunnelSpec) -> None:
        import threading

        from tunneld.config.listen import plan_spec

        self.sockets: list[socket.socket] = []
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        for plan in plan_spec(spec):
            for address in ([plan.path] if plan.path is not None else []) + [(ip, plan.port) for ip in plan.ips]:
                sock = self._bind(address)
                if sock is not None:
                    self.sockets.append(sock)
        if self.sockets:
            self._thread = threading.Thread(target=self._refuse, name="port-guard", daemon=True)
            self._thread.start()

    @staticmethod
    def _bind(address: str | tuple[str, int | None]) -> socket.socket | None:
        family = (
            socket.AF_UNIX if isinstance(address, str) else socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        )
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            if isinstance(address, str):
                os.chmod(address, 0o600)
            sock.listen(16)
            sock.settimeout(0.25)
        except OSError as exc:  # taken meanwhile: the next attempt reports who holds it
            log.warning("cannot hold %s while waiting for credentials: %s", address, exc.strerror or exc)
            sock.close()
            return None
        return sock

    def _refuse(self) -> None:
        import select

        while True:
            try:
                readable, _, _ = select.select([*self.sockets, self._wake_r], [], [])
            except (OSError, ValueError):
                return
            if self._wake_r in readable:
                return
            for sock in readable:
                with contextlib.suppress(OSError):
                    client, _ = sock.accept()
                    client.close()

    def release(self) -> None:
        """Close every held address (unix socket files removed), so that ssh can bind them.

        The refusing thread is woken and joined first: a socket closed while a select() waits on it stays bound
        (the kernel's poll table holds the file) until that select returns, and ssh's bind would fail meanwhile."""
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        for sock in self.sockets:
            path = sock.getsockname() if sock.family == socket.AF_UNIX else None
            sock.close()
            if isinstance(path, str) and path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        self.sockets = []
        self._wake_r.close()
        self._wake_w.close()
