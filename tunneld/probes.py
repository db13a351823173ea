"""Reasons to retry now instead of waiting: the server's first hop answers TCP again, the machine slept,
the network changed, or someone asked (SIGUSR1). The clock, the probe and the address source are
injectable so the supervisor's timing is testable without a network."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

PROBE_EVERY_S = 0.25
PROBE_TIMEOUT_S = 1.0
CLOCK_JUMP_S = 5.0
NETWORK_CHECK_S = 2.0

Hop = tuple[str, int]
Probe = Callable[[Hop], bool]


def name_for_lookup(host: str) -> str | bytes:
    """Return `host` as getaddrinfo takes it most cheaply: an ASCII name as bytes.

    getaddrinfo passes every str through the idna codec, whose tables (unicodedata, stringprep) would
    stay in every supervisor (~0.5 MiB); an ASCII name needs no conversion. Others stay str.
    """
    return host.encode() if host.isascii() else host


def tcp_answers(target: Hop | None, timeout: float = PROBE_TIMEOUT_S) -> bool | None:
    """Return whether a TCP connection to `target` succeeds (None when there is nothing to probe)."""
    if target is None:
        return None
    try:
        with socket.create_connection((name_for_lookup(target[0]), target[1]), timeout=timeout):  # type: ignore[arg-type]
            return True
    except OSError:
        return False


def local_addresses() -> frozenset[str]:
    """Return the machine's interface addresses (psutil is imported here: only the supervisor needs it)."""
    import psutil

    return frozenset(
        addr.address for addrs in psutil.net_if_addrs().values() for addr in addrs if addr.family != psutil.AF_LINK
    )


@dataclass
class Wakeups:
    """Reasons to stop waiting: stop requested, or 'retry now' (SIGUSR1, sleep, network change)."""

    stop: threading.Event = field(default_factory=threading.Event)
    retry_now: threading.Event = field(default_factory=threading.Event)
    wake: threading.Event = field(default_factory=threading.Event)
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
    """Overlapping TCP probes of the server's first hop: a new one every 0.25 s, each with its own timeout.

    `came_back` is set once a probe answers that started after another probe had failed: the path
    was dead and is alive again. A probe that hangs (a blackhole, a link that is down) never delays
    the next one, so the return of the path is seen within about a quarter of a second.
    """

    def __init__(
        self,
        hop: Hop | None,
        on_change: Callable[[], None],
        probe: Probe | None = None,
        every_s: float = PROBE_EVERY_S,
        monotonic: Callable[[], float] = time.monotonic,
        known_down: bool = False,
    ) -> None:
        self.hop = hop
        self.on_change = on_change
        self.probe: Probe = probe or (lambda hop: bool(tcp_answers(hop)))
        self.every_s = every_s
        self.monotonic = monotonic
        self.came_back = threading.Event()
        self.failures = 0
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

    def _loop(self) -> None:
        while not self._stop.is_set():
            threading.Thread(target=self._one, args=(self.monotonic(),), name="probe", daemon=True).start()
            self._stop.wait(self.every_s)

    def _one(self, started: float) -> None:
        assert self.hop is not None
        answered = self.probe(self.hop)
        if self._stop.is_set():
            return
        with self._lock:
            if not answered:
                self.failures += 1
                if self._first_failure_started is None or started < self._first_failure_started:
                    self._first_failure_started = started
                return
            back = self._first_failure_started is not None and started >= self._first_failure_started
        if back and not self.came_back.is_set():
            self.came_back.set()
            self.on_change()
