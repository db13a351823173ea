"""Local listeners and one selector loop that pumps every forwarded connection (no thread per connection).

The listeners outlive links: while the link is down, accepted connections wait (up to a hold
limit) and are served as soon as a new link attaches its channel opener.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from tunneld.config.listen import ListenPlan, format_address, plan_spec
from tunneld.config.ports import clear_stale_socket, port_in_use_error
from tunneld.config.spec import LOCAL, Forward, TunnelSpec
from tunneld.engines.link import ForwardStatus
from tunneld.engines.windows import MIN_SAMPLE_S, WindowGrowth
from tunneld.errors import ConfigError, TunneldError
from tunneld.states import FORWARD_DEGRADED, FORWARD_OK

log = logging.getLogger(__name__)

BUFFER_BYTES = 128 * 1024
PACKET_BYTES = 32 * 1024
OPEN_WORKERS = 4
PENDING_POLL_S = 0.002
IDLE_TICK_S = 0.5
DEFAULT_HOLD_S = 10.0
UPDATE_TIMEOUT_S = 10.0
# A forwarded connection holds its local socket and the pipe paramiko makes for a channel's fileno().
FDS_PER_CONNECTION = 3
FD_RESERVE = 64  # listeners, the SSH socket, log files, the opener pool, psutil
RESUME_MARGIN = 8
# What every channel's receive windows may add up to: a client that stops reading leaves its
# window's worth of data buffered in this process (paramiko's default is 2 MiB per channel).
BUFFER_BUDGET_BYTES = 64 * 1024 * 1024
MIN_WINDOW_BYTES = 64 * 1024
MAX_WINDOW_BYTES = 2 * 1024 * 1024


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


class Channel(Protocol):
    """What the pump needs of an SSH channel (paramiko's Channel has all of it)."""

    closed: bool

    def fileno(self) -> int: ...
    def recv(self, nbytes: int) -> bytes: ...
    def send(self, data: bytes) -> int: ...
    def sendall(self, data: bytes) -> None: ...
    def shutdown_write(self) -> None: ...
    def close(self) -> None: ...
    def settimeout(self, timeout: float | None) -> None: ...


# Opens a channel to `forward`'s target for a client at `peer`, granting it a receive window of so many
# bytes; raises TunneldError when the target refuses.
Opener = Callable[[Forward, tuple[str, int], int], Channel]


@dataclass
class Counters:
    """Per-forward traffic: bytes each way, connections open and in total, and whether the target refuses."""

    bytes_in: int = 0
    bytes_out: int = 0
    open: int = 0
    total: int = 0
    refused: str | None = None


@dataclass(eq=False)
class Pair:
    """One forwarded connection: the local socket, its channel, and what is still to be written each way."""

    local: socket.socket
    channel: Channel
    counters: Counters
    window: int = 0  # the receive window granted to the channel (the buffer budget's share)
    sample_at: float = 0.0  # when the current throughput sample began (window growth)
    sample_bytes: int = 0
    to_channel: bytearray = field(default_factory=bytearray)
    to_local: bytearray = field(default_factory=bytearray)
    local_eof: bool = False
    channel_eof: bool = False


@dataclass(frozen=True)
class Listener:
    """A bound listening socket of one forward."""

    sock: socket.socket
    forward: Forward
    address: str


class Forwarder:
    """Owns a spec's local listeners and pumps connections through whichever link is attached."""

    def __init__(self, spec: TunnelSpec, hold_s: float = DEFAULT_HOLD_S) -> None:
        self.spec = spec
        self.hold_s = hold_s
        self.plans = plan_spec(spec)
        self.listeners: list[Listener] = []
        self.counters = {f: Counters() for f in spec.local_forwards}
        self._opener: Opener | None = None
        self._lock = threading.Lock()
        self._waiting: collections.deque[tuple[socket.socket, Forward, tuple[str, int], float]] = collections.deque()
        self._opened: queue.SimpleQueue[tuple[socket.socket, Forward, Channel, int]] = queue.SimpleQueue()
        self._pairs: dict[int, Pair] = {}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._pool = ThreadPoolExecutor(max_workers=OPEN_WORKERS, thread_name_prefix="open-channel")
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._in_flight = 0
        self._granted = 0
        self._paused = False
        self.fd_budget = max(FDS_PER_CONNECTION, fd_limit() - FD_RESERVE)
        self.on_change: Callable[[], None] = lambda: None
        self.on_failure: Callable[[Exception], None] = lambda _exc: None
        self.growth = WindowGrowth()
        self.rtt_s = 0.0  # the link's keepalive round trip (0 until measured: no growth before)
        self.widen: Callable[[Channel, int], None] | None = None  # grants a channel more window (the engine)
        self.on_demand: Callable[[], None] = lambda: None  # a client arrived while no link is attached
        self._refusing = False  # the host waits for credentials: clients are closed at once, not held
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

    def bind(self) -> None:
        """Bind every address OpenSSH would listen on (tunneld.config.listen); raise PortInUseError naming a holder.

        No address is skipped because it is taken: half a forward is not a forward.
        """
        try:
            self.listeners = _bind_plans(self.plans)
        except BaseException:
            self.close()
            raise
        for listener in self.listeners:
            self._selector.register(listener.sock, selectors.EVENT_READ, listener)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name="forwarder", daemon=True)
        self._thread.start()

    def update(self, spec: TunnelSpec, timeout: float = UPDATE_TIMEOUT_S) -> None:
        """Listen for `spec`'s forwards from now on: bind the new ones, close those that are gone, keep the others
        (and every open connection). Runs in the loop's thread; a new address that is taken is a PortInUseError
        and then nothing changes."""
        done, failures = threading.Event(), []

        def apply() -> None:
            try:
                self._apply(spec)
            except BaseException as exc:  # handed to the caller
                failures.append(exc)
            finally:
                done.set()

        self._calls.put(apply)
        self._wake()
        if not done.wait(timeout):
            raise ConfigError(f"the forwarding loop did not take the new forwards within {timeout:g} s")
        if failures:
            raise failures[0]

    def _apply(self, spec: TunnelSpec) -> None:
        plans = plan_spec(spec)
        wanted = {plan.forward for plan in plans}
        gone = [listener for listener in self.listeners if listener.forward not in wanted]
        kept = {listener.forward for listener in self.listeners} & wanted
        for listener in gone:
            self._release(listener)
        try:
            added = _bind_plans([plan for plan in plans if plan.forward not in kept])
        except BaseException:
            self.listeners = [listener for listener in self.listeners if listener not in gone]
            restored = _bind_plans([plan for plan in self.plans if plan.forward in {g.forward for g in gone}])
            self._adopt(restored)
            raise
        self.listeners = [listener for listener in self.listeners if listener not in gone]
        self._adopt(added)
        self.spec, self.plans = spec, plans
        for forward in spec.local_forwards:
            self.counters.setdefault(forward, Counters())
        for listener in gone:
            log.info("%s: stopped listening on %s (%s)", spec.alias, listener.address, listener.forward)
        for listener in added:
            log.info("%s: listening on %s (%s)", spec.alias, listener.address, listener.forward)

    def _adopt(self, listeners: list[Listener]) -> None:
        for listener in listeners:
            self.listeners.append(listener)
            if not self._paused:
                self._selector.register(listener.sock, selectors.EVENT_READ, listener)

    def _release(self, listener: Listener) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(listener.sock)
        listener.sock.close()
        if listener.forward.listen.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(listener.forward.listen.path)

    def probe(self, forward: Forward, open_channel: Callable[[], Channel]) -> Channel:
        """Open a channel for a health check: it marks the forward refused or not, but is not counted as traffic."""
        try:
            channel = open_channel()
        except TunneldError as error:
            self._mark_refused(forward, error.message)
            raise
        self._mark_refused(forward, None)
        return channel

    def _mark_refused(self, forward: Forward, why: str | None) -> None:
        """Record whether the forward's target refuses (None: it accepted); tell the supervisor on a change."""
        counters = self.counters[forward]
        if counters.refused == why:
            return
        counters.refused = why
        if why is not None:
            log.warning("%s: degraded: %s: %s", self.spec.alias, forward, why)
        self.on_change()

    def attach(self, opener: Opener | None) -> None:
        """Serve connections through `opener` (a live link); None while the link is down (connections wait)."""
        with self._lock:
            self._opener = opener
            waiting = list(self._waiting) if opener else []
            if opener:
                self._waiting.clear()
                self._in_flight += len(waiting)
        for sock, forward, peer, _ in waiting:
            self._pool.submit(self._open, opener, sock, forward, peer)  # type: ignore[arg-type]

    def refuse(self, refusing: bool) -> None:
        """Close new connections at once (and those waiting now) while `refusing`: no link will come for them
        until the user acts. The listeners stay bound."""
        with self._lock:
            self._refusing = refusing
            waiting = list(self._waiting) if refusing else []
            if refusing:
                self._waiting.clear()
        for sock, *_ in waiting:
            sock.close()

    def close(self) -> None:
        """Close listeners and every connection; stop the loop."""
        self._closed.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for listener in self.listeners:
            listener.sock.close()
            if listener.forward.listen.path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(listener.forward.listen.path)
        for pair in list(self._pairs.values()):
            self._drop(pair)
        for sock, *_ in self._waiting:
            sock.close()
        self._waiting.clear()
        self._wake_r.close()
        self._wake_w.close()

    def stats(self) -> list[ForwardStatus]:
        """Return listen addresses, bytes and connections per forward, and which targets refuse."""
        out = []
        for forward in self.spec.local_forwards:
            c = self.counters[forward]
            listen = tuple(lst.address for lst in self.listeners if lst.forward is forward)
            out.append(
                ForwardStatus(
                    str(forward), listen, str(forward.target), FORWARD_DEGRADED if c.refused else FORWARD_OK,
                    f"{forward.target} {c.refused}" if c.refused else None, c.bytes_in, c.bytes_out, c.open, c.total,
                    exposed=any(p.exposed for p in self.plans if p.forward is forward),
                )
            )  # fmt: skip
        return out

    # -- the loop -------------------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def alive(self) -> bool:
        """Return True while the pump thread runs (a dead one means the forwarder must be replaced)."""
        return self._thread is not None and self._thread.is_alive() and not self._closed.is_set()

    def _loop(self) -> None:
        try:
            while not self._closed.is_set():
                self._turn()
        except Exception as exc:  # a bug, not one connection's trouble: the link is lost and rebuilt
            log.exception("%s: the forwarding loop failed", self.spec.alias)
            self.on_failure(exc)

    def _turn(self) -> None:
        while True:  # work handed to the loop's thread (update)
            try:
                self._calls.get_nowait()()
            except queue.Empty:
                break
        pending = any(p.to_channel for p in self._pairs.values())
        events = self._selector.select(PENDING_POLL_S if pending else IDLE_TICK_S)
        for key, mask in events:
            if key.data is None:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
            elif isinstance(key.data, Listener):
                self._accept(key.data)
            else:
                self._service_safely(key.data, key.fileobj, mask)
        self._register_opened()
        for pair in [p for p in self._pairs.values() if p.to_channel]:
            self._flush_to_channel(pair)
        self._expire_waiting()
        self._resume_if_room()

    def _service_safely(self, pair: Pair, fileobj: object, mask: int) -> None:
        """One connection's failure, whatever it is, ends that connection and nothing else."""
        try:
            self._service(pair, fileobj, mask)
        except Exception:
            log.debug("%s: dropping a connection after an error", self.spec.alias, exc_info=True)
            self._drop(pair)

    # -- budgets: file descriptors and buffered bytes ----------------------------------------------

    def _connections(self) -> int:
        return len(self._pairs) + len(self._waiting) + self._in_flight

    def busy(self) -> bool:
        """Return True while any connection is open, being opened, or waiting for a link."""
        return self._connections() > 0

    def has_waiting(self) -> bool:
        """Return True while a connection waits for a link."""
        return bool(self._waiting)

    def _out_of_room(self) -> bool:
        return (self._connections() + 1) * FDS_PER_CONNECTION > self.fd_budget

    def _pause(self, why: str) -> None:
        """Stop accepting (clients wait in the listen backlog) until connections close; one log line per episode."""
        if self._paused:
            return
        self._paused = True
        for listener in self.listeners:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(listener.sock)
        log.warning(
            "%s: %s: not accepting new connections until some of the %d open ones close",
            self.spec.alias, why, self._connections(),
        )  # fmt: skip

    def _resume_if_room(self) -> None:
        if not self._paused or (self._connections() + RESUME_MARGIN) * FDS_PER_CONNECTION > self.fd_budget:
            return
        self._paused = False
        for listener in self.listeners:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.register(listener.sock, selectors.EVENT_READ, listener)
        log.info("%s: accepting new connections again (%d open)", self.spec.alias, self._connections())

    def _grant_window(self) -> int:
        """Reserve the receive window for a new channel out of what the budget has left.

        A client that never reads leaves at most its channel's window buffered here, so the sum of
        granted windows bounds the daemon's buffers: at most the budget plus MIN_WINDOW_BYTES per
        connection once the budget is spent.
        """
        with self._lock:
            window = max(MIN_WINDOW_BYTES, min(MAX_WINDOW_BYTES, BUFFER_BUDGET_BYTES - self._granted))
            self._granted += window
        return window

    def _release_window(self, window: int) -> None:
        with self._lock:
            self._granted -= window

    def _accept(self, listener: Listener) -> None:
        while True:
            if self._out_of_room():
                self._pause(f"the file descriptor budget ({self.fd_budget} of the process limit) is used up")
                return
            try:
                sock, peer = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause(f"out of file descriptors or memory ({exc.strerror})")
                else:
                    log.warning("%s: accept on %s failed: %s", self.spec.alias, listener.address, exc)
                return
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer_addr = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else ("127.0.0.1", 0)
            self.counters[listener.forward].total += 1
            with self._lock:
                opener = self._opener
                if opener is None and self._refusing:
                    sock.close()
                    continue
                if opener is None:
                    self._waiting.append((sock, listener.forward, peer_addr, time.monotonic() + self.hold_s))
                    self.on_demand()
                    continue
                self._in_flight += 1
            self._pool.submit(self._open, opener, sock, listener.forward, peer_addr)

    def _open(self, opener: Opener, sock: socket.socket, forward: Forward, peer: tuple[str, int]) -> None:
        """Runs in the small opener pool: one round trip per new connection, never on the pump thread."""
        window = self._grant_window()
        try:
            channel = opener(forward, peer, window)
        except TunneldError as error:
            sock.close()
            self._finish_open()
            self._release_window(window)
            self._mark_refused(forward, error.message)
            return
        except Exception as exc:
            log.debug("%s: could not open a channel for %s (%s): waiting for the next link", self.spec.alias, forward,
                      exc)  # fmt: skip
            self._release_window(window)
            with self._lock:
                self._in_flight -= 1
                self._waiting.append((sock, forward, peer, time.monotonic() + self.hold_s))
            return
        self._mark_refused(forward, None)
        self._opened.put((sock, forward, channel, window))
        self._wake()

    def _finish_open(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _register_opened(self) -> None:
        while True:
            try:
                sock, forward, channel, window = self._opened.get_nowait()
            except queue.Empty:
                return
            self._finish_open()
            pair = Pair(sock, channel, self.counters[forward], window)
            try:
                sock.setblocking(False)
                channel.settimeout(0.0)
                channel_fd = channel.fileno()  # paramiko makes a pipe here: this can run out of descriptors
            except OSError as exc:
                log.warning("%s: cannot serve a connection to %s: %s", self.spec.alias, forward, exc.strerror or exc)
                sock.close()
                with contextlib.suppress(Exception):
                    channel.close()
                self._release_window(window)
                self._pause(f"out of file descriptors ({exc.strerror})")
                continue
            pair.counters.open += 1
            self._pairs[sock.fileno()] = pair
            self._selector.register(sock, selectors.EVENT_READ, pair)
            self._selector.register(channel_fd, selectors.EVENT_READ, pair)

    def _interest(self, pair: Pair) -> None:
        """Read a side only while its output is drained (backpressure); write the local side when pending."""
        local = 0 if pair.to_channel or pair.local_eof else selectors.EVENT_READ
        if pair.to_local:
            local |= selectors.EVENT_WRITE
        self._modify(pair.local, local, pair)
        self._modify(pair.channel.fileno(), 0 if pair.to_local or pair.channel_eof else selectors.EVENT_READ, pair)

    def _modify(self, fileobj: socket.socket | int, events: int, pair: Pair) -> None:
        try:
            key = self._selector.get_key(fileobj)
        except KeyError:
            if events:
                self._selector.register(fileobj, events, pair)
            return
        if not events:
            self._selector.unregister(fileobj)
        elif key.events != events:
            self._selector.modify(fileobj, events, pair)

    def _service(self, pair: Pair, fileobj: object, mask: int) -> None:
        try:
            if fileobj is pair.local:
                if mask & selectors.EVENT_WRITE:
                    self._flush_to_local(pair)
                if mask & selectors.EVENT_READ:
                    data = pair.local.recv(BUFFER_BYTES)
                    if data:
                        pair.to_channel += data
                        pair.counters.bytes_out += len(data)
                        self._flush_to_channel(pair)
                    else:
                        pair.local_eof = True
                        if not pair.to_channel:
                            pair.channel.shutdown_write()
            else:
                data = pair.channel.recv(BUFFER_BYTES)
                if data:
                    pair.to_local += data
                    pair.counters.bytes_in += len(data)
                    self._flush_to_local(pair)
                    self._maybe_grow(pair, len(data))
                else:
                    pair.channel_eof = True
                    if not pair.to_local:
                        pair.local.shutdown(socket.SHUT_WR)
        except (TimeoutError, BlockingIOError):
            pass
        except OSError:
            self._drop(pair)
            return
        self._settle(pair)

    def _maybe_grow(self, pair: Pair, received: int) -> None:
        """Widen a busy channel's window when it, not the path, limits the download (engines/windows.py)."""
        now = time.monotonic()
        if not pair.sample_at:
            pair.sample_at, pair.sample_bytes = now, 0
            return
        pair.sample_bytes += received
        elapsed = now - pair.sample_at
        if elapsed < max(self.rtt_s, MIN_SAMPLE_S):
            return
        with self._lock:
            left = BUFFER_BUDGET_BYTES - self._granted
        extra = self.growth.bytes_to_add(pair.window, pair.sample_bytes, elapsed, self.rtt_s, left, not pair.to_local)
        log.debug("%s: window %d, %.0f of it per round trip (%.1f ms), reader %s: %+d", self.spec.alias, pair.window,
                  pair.sample_bytes / elapsed * self.rtt_s, self.rtt_s * 1000,
                  "keeps up" if not pair.to_local else "behind", extra)  # fmt: skip
        pair.sample_at, pair.sample_bytes = now, 0
        if extra > 0 and self.widen is not None:
            with self._lock:
                self._granted += extra
            pair.window += extra
            self.widen(pair.channel, extra)

    def _flush_to_channel(self, pair: Pair) -> None:
        try:
            while pair.to_channel:
                # One SSH packet's worth per call: a channel takes at most its max packet size anyway,
                # and slicing more would copy the whole buffer for every 32 KiB sent.
                sent = pair.channel.send(bytes(pair.to_channel[:PACKET_BYTES]))
                if sent <= 0:
                    break
                del pair.to_channel[:sent]
        except TimeoutError:
            pass  # the channel's window is full; retried on the next turn of the loop
        except OSError:
            self._drop(pair)
            return
        if not pair.to_channel and pair.local_eof and not pair.channel.closed:
            with contextlib.suppress(OSError, EOFError):
                pair.channel.shutdown_write()
        self._settle(pair)

    def _flush_to_local(self, pair: Pair) -> None:
        try:
            while pair.to_local:
                sent = pair.local.send(pair.to_local)
                del pair.to_local[:sent]
        except BlockingIOError:
            pass
        if not pair.to_local and pair.channel_eof:
            with contextlib.suppress(OSError):
                pair.local.shutdown(socket.SHUT_WR)

    def _settle(self, pair: Pair) -> None:
        if pair.local.fileno() not in self._pairs:
            return
        both_done = pair.local_eof and pair.channel_eof and not pair.to_local and not pair.to_channel
        if both_done or (pair.channel.closed and not pair.to_local):
            self._drop(pair)
        else:
            self._interest(pair)

    def _drop(self, pair: Pair) -> None:
        fd = pair.local.fileno()
        if self._pairs.pop(fd, None) is None:
            return
        pair.counters.open -= 1
        self._release_window(pair.window)
        for fileobj in (pair.local, pair.channel.fileno()):
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(fileobj)
        pair.local.close()
        with contextlib.suppress(Exception):
            pair.channel.close()

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        with self._lock:
            while self._waiting and self._waiting[0][3] <= now:
                sock, forward, _, _ = self._waiting.popleft()
                log.info("%s: closed a connection to %s that waited %.0f s for the link", self.spec.alias, forward,
                         self.hold_s)  # fmt: skip
                sock.close()


def unsupported_forwards(spec: TunnelSpec) -> list[Forward]:
    """Return the forwards an in-process forwarder cannot serve: only LocalForward to host:port is implemented."""
    return [f for f in spec.forwards if f.kind != LOCAL or f.target is None or f.target.path is not None]


def _bind_plans(plans: Sequence[ListenPlan]) -> list[Listener]:
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
