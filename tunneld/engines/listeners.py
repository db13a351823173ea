"""The paramiko engine's local listening sockets: OpenSSH's listen plan bound all or none, re-planned on reload,
and accepted on only while the process's file descriptor budget has room.

Separate from the forwarder's loop because this is where a forward meets the rest of the machine:
an address another process holds is a PortInUseError naming the holder, a unix socket path left by a
dead process is cleared first, no address is skipped because it is taken (half a forward is not a
forward), and a process out of descriptors stops accepting (clients wait in the backlog) instead of failing.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from tunneld.config.listen import ListenPlan, format_address
from tunneld.config.ports import clear_stale_socket, port_in_use_error
from tunneld.config.spec import Forward
from tunneld.errors import ConfigError

log = logging.getLogger(__name__)

# A forwarded connection holds its local socket and the pipe paramiko makes for a channel's fileno().
FDS_PER_CONNECTION = 3
FD_RESERVE = 64  # listeners, the SSH socket, log files, the opener pool, psutil
RESUME_MARGIN = 8


def fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (macOS starts at 256) and return the soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 65536


@dataclass(frozen=True)
class Listener:
    """A bound listening socket of one forward."""

    sock: socket.socket
    forward: Forward
    address: str


class ListenerSet:
    """A spec's listeners, registered on the forwarder's selector while it accepts (not while it is paused)."""

    def __init__(self, selector: selectors.BaseSelector, alias: str) -> None:
        self.alias = alias
        self.bound: list[Listener] = []
        self.paused = False
        self.fd_budget = max(FDS_PER_CONNECTION, fd_limit() - FD_RESERVE)
        self._selector = selector

    def bind(self, plans: Sequence[ListenPlan]) -> None:
        """Bind every address of `plans` and accept on them; raise PortInUseError naming a holder (nothing bound)."""
        self.bound = bind_plans(plans)
        for listener in self.bound:
            self._selector.register(listener.sock, selectors.EVENT_READ, listener)

    def replan(self, old: Sequence[ListenPlan], new: Sequence[ListenPlan]) -> tuple[list[Listener], list[Listener]]:
        """Listen for `new`'s forwards from now on: bind the new ones, close those that are gone, keep the others.

        Return (added, gone). A new address that is taken raises, and then the listeners are those of `old` again.
        """
        wanted = {plan.forward for plan in new}
        gone = [listener for listener in self.bound if listener.forward not in wanted]
        kept = {listener.forward for listener in self.bound} & wanted
        for listener in gone:
            self._release(listener)
        try:
            added = bind_plans([plan for plan in new if plan.forward not in kept])
        except BaseException:
            self.bound = [listener for listener in self.bound if listener not in gone]
            self._adopt(bind_plans([plan for plan in old if plan.forward in {g.forward for g in gone}]))
            raise
        self.bound = [listener for listener in self.bound if listener not in gone]
        self._adopt(added)
        return added, gone

    def accept(
        self, listener: Listener, open_connections: Callable[[], int]
    ) -> Iterator[tuple[socket.socket, tuple[str, int]]]:
        """Yield each connection waiting on `listener`, and its peer, while the descriptor budget has room for one
        more beside `open_connections()`; pause accepting when it has not, or when the process runs out."""
        while True:
            if (open_connections() + 1) * FDS_PER_CONNECTION > self.fd_budget:
                why = f"the file descriptor budget ({self.fd_budget} of the process limit) is used up"
                self.pause(why, open_connections())
                return
            try:
                sock, peer = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.pause(f"out of file descriptors or memory ({exc.strerror})", open_connections())
                else:
                    log.warning("%s: accept on %s failed: %s", self.alias, listener.address, exc)
                return
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            yield sock, ((str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else ("127.0.0.1", 0))

    def pause(self, why: str, open_connections: int) -> None:
        """Stop accepting (clients wait in the listen backlog) until connections close; one log line per episode."""
        if self.paused:
            return
        self.paused = True
        for listener in self.bound:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(listener.sock)
        log.warning(
            "%s: %s: not accepting new connections until some of the %d open ones close",
            self.alias, why, open_connections,
        )  # fmt: skip

    def resume_if_room(self, open_connections: int) -> None:
        """Accept again once enough connections closed (a margin, so that accepting does not flap)."""
        if not self.paused or (open_connections + RESUME_MARGIN) * FDS_PER_CONNECTION > self.fd_budget:
            return
        self.paused = False
        for listener in self.bound:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.register(listener.sock, selectors.EVENT_READ, listener)
        log.info("%s: accepting new connections again (%d open)", self.alias, open_connections)

    def addresses(self, forward: Forward) -> tuple[str, ...]:
        """Return where `forward` listens, as shown to users."""
        return tuple(listener.address for listener in self.bound if listener.forward is forward)

    def close(self) -> None:
        """Close every listener (a unix socket's path goes with it)."""
        for listener in self.bound:
            _close(listener)

    def _adopt(self, listeners: list[Listener]) -> None:
        for listener in listeners:
            self.bound.append(listener)
            if not self.paused:
                self._selector.register(listener.sock, selectors.EVENT_READ, listener)

    def _release(self, listener: Listener) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(listener.sock)
        _close(listener)


def bind_plans(plans: Sequence[ListenPlan]) -> list[Listener]:
    """Bind every address of `plans` (all or none: what was bound is closed again when one is taken)."""
    bound: list[Listener] = []
    try:
        for plan in plans:
            if plan.path is not None:
                clear_stale_socket(plan.path)
                bound.append(_listen(plan.forward, socket.AF_UNIX, plan.path))
            for ip in plan.ips:
                family = socket.AF_INET6 if ":" in ip else socket.AF_INET
                bound.append(_listen(plan.forward, family, ip))
    except BaseException:
        for listener in bound:
            listener.sock.close()
        raise
    return bound


def _close(listener: Listener) -> None:
    listener.sock.close()
    if listener.forward.listen.path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(listener.forward.listen.path)


def _listen(forward: Forward, family: int, address: str) -> Listener:
    shown = address if family == socket.AF_UNIX else format_address(address, forward.listen.port or 0)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as OpenSSH: [::] is not 0.0.0.0
            sock.bind((address, forward.listen.port or 0))
        else:
            sock.bind(address)
            os.chmod(address, 0o600)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            if family == socket.AF_UNIX:
                raise port_in_use_error(path=address) from exc
            raise port_in_use_error(port=forward.listen.port, ip=address) from exc
        raise ConfigError(f"cannot listen on {shown}: {exc.strerror}") from exc
    return Listener(sock, forward, shown)
