"""Reasons to retry now instead of waiting: the server's first hop answers TCP again, the machine slept,
the network changed, or someone asked (SIGUSR1); and the budget that keeps all of it polite.

Every connection that reaches an sshd and ends before authentication counts against this machine's
address on OpenSSH >= 9.8 (PerSourcePenalties): past a threshold the server refuses every connection
from it for minutes, the user's own `ssh` included. So the first hop is probed only while TCP to it
fails (a probe that fails never reaches the server), probing ends at the first answer, and one budget
bounds what may reach the server without logging in: probes and attempts alike. The clock, the probe
and the address source are injectable so the supervisor's timing is testable without a network."""

from __future__ import annotations

import collections
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tunneld.config.listen import name_for_lookup

PROBE_EVERY_S = 0.25
PROBE_TIMEOUT_S = 1.0
# An attempt's own TCP connect gets this long before its path is probed (a live path answers far sooner).
ATTEMPT_GRACE_S = 1.0
# At most this many connections per window may end before authentication (OpenSSH 9.8's PerSourcePenalties
# adds 1 s per such connection and blocks the address once 15 s have accumulated).
PREAUTH_LIMIT = 6
PREAUTH_WINDOW_S = 60.0
CLOCK_JUMP_S = 5.0
NETWORK_CHECK_S = 2.0

Hop = tuple[str, int]
Probe = Callable[[Hop], bool]


def tcp_answers(target: Hop | None, timeout: float = PROBE_TIMEOUT_S) -> bool | None:
    """Return whether a TCP connection to `target` succeeds (None when there is nothing to probe)."""
    if target is None:
        return None
    try:
        with socket.create_connection((name_for_lookup(target[0]), target[1]), timeout=timeout):  # type: ignore[arg-type]
            return True
    except OSError:
        return False


def boottime() -> float:
    """Return seconds on a clock that keeps counting while the machine sleeps (CLOCK_BOOTTIME on Linux).

    A budget measured on the monotonic clock would still be spent after a night of suspend.
    """
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(clock) if clock is not None else time.monotonic()


class PreauthBudget:
    """At most `limit` connections per `window_s` may reach the server and end before authentication.

    The one place that bounds them, whatever the failure pattern: path probes that answered, and
    attempts that reached the server but did not log in (a refused, reset or stalled handshake, a
    changed host key, a refused login). A connection takes a slot before it is opened (`take`) and, when
    it ends, either spends it (`end(spent=True)`: the slot stays used for `window_s`) or gives it back (it
    never reached the server, or it authenticated). Slots in flight count as used until they end.
    """

    def __init__(
        self, limit: int = PREAUTH_LIMIT, window_s: float = PREAUTH_WINDOW_S, clock: Callable[[], float] = boottime
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self._spent: collections.deque[float] = collections.deque()
        self._in_flight = 0
        self._lock = threading.Lock()

    def _forget_old(self, now: float) -> None:
        while self._spent and self._spent[0] <= now - self.window_s:
            self._spent.popleft()

    def take(self) -> bool:
        """Reserve a slot for one connection now; False when the budget is used up."""
        with self._lock:
            self._forget_old(self.clock())
            if len(self._spent) + self._in_flight >= self.limit:
                return False
            self._in_flight += 1
            return True

    def end(self, spent: bool) -> None:
        """End a reservation: `spent` when the connection reached the server and ended before authentication."""
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)
            if spent:
                self._spent.append(self.clock())

    def wait_s(self) -> float:
        """Return how long until a slot may be free (0: now; PROBE_TIMEOUT_S while only connections in
        flight hold it, since each ends within its own timeout)."""
        with self._lock:
            now = self.clock()
            self._forget_old(now)
            if len(self._spent) + self._in_flight < self.limit:
                return 0.0
            if len(self._spent) < self.limit:
                return PROBE_TIMEOUT_S
            return max(0.0, self._spent[len(self._spent) - self.limit] + self.window_s - now)

    def spent(self) -> int:
        """Return how many connections ended before authentication within the window."""
        with self._lock:
            self._forget_old(self.clock())
            return len(self._spent)


def local_addresses() -> frozenset[str]:
    """Return the machine's interface addresses (psutil is imported here: only the supervisor needs it)."""
    import psutil

    return frozenset(
        addr.address for addrs in psutil.net_if_addrs().values() for addr in addrs if addr.family != psutil.AF_LINK
    )


@dataclass
class Wakeups:
    """Reasons to stop waiting: stop requested, 'retry now' (SIGUSR1, sleep, network change), or 'reload' (SIGHUP)."""

    stop: threading.Event = field(default_factory=threading.Event)
    retry_now: threading.Event = field(default_factory=threading.Event)
    wake: threading.Event = field(default_factory=threading.Event)
    reload: threading.Event = field(default_factory=threading.Event)  # SIGHUP, `tunneld reload`
    attempt: threading.Event | None = None  # cancels the connection attempt in progress

    def request_stop(self) -> None:
        """Ask the supervisor to stop (signal handlers call this; it only sets flags)."""
        self.stop.set()
        self.wake.set()
        attempt = self.attempt
        if attempt is not None:
            attempt.set()

    def request_retry(self) -> None:
        """Ask the supervisor to skip the current backoff wait."""
        self.retry_now.set()
        self.wake.set()

    def request_reload(self) -> None:
        """Ask the supervisor to read its ssh_config and tunneld.toml again and apply what changed."""
        self.reload.set()
        self.wake.set()


class Environment:
    """Watches for a wall-clock jump against the monotonic clock (sleep) and for changed local addresses."""

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        addresses: Callable[[], frozenset[str]] = local_addresses,
        check_every_s: float = NETWORK_CHECK_S,
    ) -> None:
        self.wall = wall
        self.monotonic = monotonic
        self.addresses = addresses
        self.check_every_s = check_every_s
        self._offset = wall() - monotonic()
        self._known = addresses()
        self._checked = monotonic()

    def changed(self) -> str | None:
        """Return why the machine's situation changed since the last call (or None)."""
        offset = self.wall() - self.monotonic()
        jumped = abs(offset - self._offset) > CLOCK_JUMP_S
        self._offset = offset
        if jumped:
            return "the clock jumped (the machine slept)"
        now = self.monotonic()
        if now - self._checked >= self.check_every_s:
            self._checked = now
            current = self.addresses()
            if current != self._known:
                self._known = current
                return "the local network addresses changed"
        return None


class PathWatch:
    """Overlapping TCP probes of the server's first hop while it does not answer: a new one every 0.25 s,
    each with its own timeout, so the return of the path is seen within about a quarter of a second.

    A probe that fails never reached the server; one that answers did, and the first answer ends the
    probing. `came_back` is set when that answer follows a probe (or an attempt, `known_down`) that found
    the path dead. Every probe needs a slot of the budget: none is started while it is used up. With
    `until`, probing stops once that event is set (an attempt's TCP connect succeeded); `delay_s` gives
    the attempt that long before the first probe.
    """

    def __init__(
        self,
        hop: Hop | None,
        on_change: Callable[[], None],
        probe: Probe | None = None,
        every_s: float = PROBE_EVERY_S,
        monotonic: Callable[[], float] = time.monotonic,
        known_down: bool = False,
        budget: PreauthBudget | None = None,
        delay_s: float = 0.0,
        until: threading.Event | None = None,
    ) -> None:
        self.hop = hop
        self.on_change = on_change
        self.probe: Probe = probe or (lambda hop: bool(tcp_answers(hop)))
        self.every_s = every_s
        self.monotonic = monotonic
        self.budget = budget
        self.delay_s = delay_s
        self.until = until or threading.Event()
        self.came_back = threading.Event()
        self.answered = threading.Event()
        self.failures = 0
        self.started = 0
        # known_down: the attempt that just failed could not reach the hop: the first answer means it is back
        self._first_failure_started: float | None = monotonic() if known_down else None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PathWatch:
        """Start probing (nothing to probe behind a ProxyCommand)."""
        if self.hop is not None:
            self._thread = threading.Thread(target=self._loop, name="path-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop starting probes; the ones in flight end by their own timeout and are ignored."""
        self._stop.set()

    def _done(self) -> bool:
        return self._stop.is_set() or self.until.is_set() or self.answered.is_set()

    def _loop(self) -> None:
        if self.delay_s > 0 and self._stop.wait(self.delay_s):
            return
        while not self._done():
            if self.budget is None or self.budget.take():
                self.started += 1
                threading.Thread(target=self._one, args=(self.monotonic(),), name="probe", daemon=True).start()
            self._stop.wait(self.every_s)

    def _one(self, started: float) -> None:
        assert self.hop is not None
        answered = False
        try:
            answered = self.probe(self.hop)
        finally:
            if self.budget is not None:
                self.budget.end(spent=answered)  # a probe that answered reached the server and left unauthenticated
        if self._stop.is_set():
            return
        with self._lock:
            if not answered:
                self.failures += 1
                if self._first_failure_started is None or started < self._first_failure_started:
                    self._first_failure_started = started
                return
            self.answered.set()
            back = self._first_failure_started is not None and started >= self._first_failure_started
        if back and not self.came_back.is_set():
            self.came_back.set()
            self.on_change()
