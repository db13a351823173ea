"""The paramiko engine's forwarder: local listeners that outlive links, and one selector loop for every connection.

While the link is down, accepted connections wait (up to a hold limit) and are served as soon as a
new link attaches its channel opener. There is no thread per connection: the loop accepts and pumps.
Its parts are modules of their own: the listeners, and accepting within the file descriptor budget
(engines/listeners.py); opening each connection's channel off the loop's thread (engines/pairing.py);
the bytes both ways, with the buffer budget and window growth (engines/pump.py).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import selectors
import socket
import threading
from collections.abc import Callable

from tunneld.config.listen import plan_spec
from tunneld.config.spec import LOCAL, Forward, TunnelSpec
from tunneld.engines.link import ForwardStatus
from tunneld.engines.listeners import Listener, ListenerSet
from tunneld.engines.pairing import Opener, Pairing
from tunneld.engines.pump import Channel, Counters, Pair, Pump
from tunneld.errors import ConfigError, TunneldError
from tunneld.states import FORWARD_DEGRADED, FORWARD_OK

log = logging.getLogger(__name__)

PENDING_POLL_S = 0.002
IDLE_TICK_S = 0.5
DEFAULT_HOLD_S = 10.0
UPDATE_TIMEOUT_S = 10.0


class Forwarder:
    """Owns a spec's local listeners and pumps connections through whichever link is attached."""

    def __init__(
        self, spec: TunnelSpec, hold_s: float = DEFAULT_HOLD_S, widen: Callable[[Channel, int], None] | None = None
    ) -> None:
        """`widen(channel, extra)` grants a channel more receive window (the engine's; None: windows never grow)."""
        self.spec = spec
        self.plans = plan_spec(spec)
        self.counters = {f: Counters() for f in spec.local_forwards}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.listeners = ListenerSet(self._selector, spec.alias)
        self.pump = Pump(self._selector, spec.alias, widen)

        def demanded() -> None:  # on_demand looked up per call: the engine sets it after construction
            self.on_demand()

        self.pairing = Pairing(spec.alias, self.pump, hold_s, self._mark_refused, self._wake, demanded)
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_change: Callable[[], None] = lambda: None
        self.on_failure: Callable[[Exception], None] = lambda _exc: None
        self.on_demand: Callable[[], None] = lambda: None  # a client arrived while no link is attached
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

    # The engine sets these; they belong to the parts that use them.
    @property
    def hold_s(self) -> float:
        """How long an accepted connection waits for a link before it is closed."""
        return self.pairing.hold_s

    @hold_s.setter
    def hold_s(self, value: float) -> None:
        self.pairing.hold_s = value

    @property
    def rtt_s(self) -> float:
        """The link's keepalive round trip (0 until measured: no window growth before)."""
        return self.pump.rtt_s

    @rtt_s.setter
    def rtt_s(self, value: float) -> None:
        self.pump.rtt_s = value

    def bind(self) -> None:
        """Bind every address OpenSSH would listen on (tunneld.config.listen); raise PortInUseError naming a holder.

        No address is skipped because it is taken: half a forward is not a forward.
        """
        try:
            self.listeners.bind(self.plans)
        except BaseException:
            self.close()
            raise
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
        added, gone = self.listeners.replan(self.plans, plans)
        self.spec, self.plans = spec, plans
        for forward in spec.local_forwards:
            self.counters.setdefault(forward, Counters())
        for listener in gone:
            log.info("%s: stopped listening on %s (%s)", spec.alias, listener.address, listener.forward)
        for listener in added:
            log.info("%s: listening on %s (%s)", spec.alias, listener.address, listener.forward)

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
        self.pairing.attach(opener)

    def refuse(self, refusing: bool) -> None:
        """Close new connections at once (and those waiting now) while `refusing`: no link will come for them
        until the user acts. The listeners stay bound."""
        self.pairing.refuse(refusing)

    def close(self) -> None:
        """Close listeners and every connection; stop the loop."""
        self._closed.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        self.pairing.close()
        self.listeners.close()
        self.pump.close()
        self._wake_r.close()
        self._wake_w.close()

    def stats(self) -> list[ForwardStatus]:
        """Return listen addresses, bytes and connections per forward, and which targets refuse."""
        out = []
        for forward in self.spec.local_forwards:
            c = self.counters[forward]
            out.append(
                ForwardStatus(
                    str(forward), self.listeners.addresses(forward), str(forward.target),
                    FORWARD_DEGRADED if c.refused else FORWARD_OK,
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
        events = self._selector.select(PENDING_POLL_S if self.pump.pending() else IDLE_TICK_S)
        for key, mask in events:
            if key.data is None:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
            elif isinstance(key.data, Listener):
                self._accept(key.data)
            else:
                self.pump.service(key.data, key.fileobj, mask)
        self._register_opened()
        self.pump.flush_pending()
        self.pairing.expire_waiting()
        self.listeners.resume_if_room(self._connections())

    def _accept(self, listener: Listener) -> None:
        for sock, peer in self.listeners.accept(listener, self._connections):
            self.counters[listener.forward].total += 1
            self.pairing.admit(sock, listener.forward, peer)

    def _register_opened(self) -> None:
        for sock, forward, channel, window in self.pairing.opened():
            try:
                self.pump.add(Pair(sock, channel, self.counters[forward], window))
            except OSError as exc:
                log.warning("%s: cannot serve a connection to %s: %s", self.spec.alias, forward, exc.strerror or exc)
                self.listeners.pause(f"out of file descriptors ({exc.strerror})", self._connections())

    # -- what the engine asks ------------------------------------------------------------------------

    def _connections(self) -> int:
        return len(self.pump.pairs) + self.pairing.count()

    def busy(self) -> bool:
        """Return True while any connection is open, being opened, or waiting for a link."""
        return self._connections() > 0

    def has_waiting(self) -> bool:
        """Return True while a connection waits for a link."""
        return self.pairing.has_waiting()


def unsupported_forwards(spec: TunnelSpec) -> list[Forward]:
    """Return the forwards an in-process forwarder cannot serve: only LocalForward to host:port is implemented."""
    return [f for f in spec.forwards if f.kind != LOCAL or f.target is None or f.target.path is not None]
