"""How an accepted connection gets its channel: at once through the attached link, or after waiting for one.

Separate from the forwarder's loop because it runs on other threads: opening a channel costs a round
trip, so a small pool opens them while the loop keeps pumping; and while no link is attached the
connections wait here (up to a hold limit), to be opened by the next link or closed when it is too late.
"""

from __future__ import annotations

import collections
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from tunneld.config.spec import Forward
from tunneld.engines.pump import Channel, Pump
from tunneld.errors import TunneldError

log = logging.getLogger(__name__)

OPEN_WORKERS = 4

# Opens a channel to `forward`'s target for a client at `peer`, granting it a receive window of so many
# bytes; raises TunneldError when the target refuses.
Opener = Callable[[Forward, tuple[str, int], int], Channel]


class Pairing:
    """Pairs each accepted connection with a channel of whichever link is attached, off the loop's thread.

    `mark_refused(forward, why)` records whether a forward's target refused (None: it accepted); `wake()` tells
    the loop that an opened channel waits to be pumped; `on_demand()` that a client waits with no link attached.
    """

    def __init__(
        self, alias: str, pump: Pump, hold_s: float, mark_refused: Callable[[Forward, str | None], None],
        wake: Callable[[], None], on_demand: Callable[[], None],
    ) -> None:  # fmt: skip
        self.alias = alias
        self.hold_s = hold_s
        self._pump = pump
        self._mark_refused = mark_refused
        self._wake = wake
        self._on_demand = on_demand
        self._opener: Opener | None = None
        self._lock = threading.Lock()
        self._waiting: collections.deque[tuple[socket.socket, Forward, tuple[str, int], float]] = collections.deque()
        self._opened: queue.SimpleQueue[tuple[socket.socket, Forward, Channel, int]] = queue.SimpleQueue()
        self._pool = ThreadPoolExecutor(max_workers=OPEN_WORKERS, thread_name_prefix="open-channel")
        self._in_flight = 0
        self._refusing = False  # the host waits for credentials: clients are closed at once, not held

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
        """Close new connections at once (and those waiting now) while `refusing`."""
        with self._lock:
            self._refusing = refusing
            waiting = list(self._waiting) if refusing else []
            if refusing:
                self._waiting.clear()
        for sock, *_ in waiting:
            sock.close()

    def admit(self, sock: socket.socket, forward: Forward, peer: tuple[str, int]) -> None:
        """Take a connection just accepted: open its channel, hold it for a link, or close it while refusing."""
        with self._lock:
            opener = self._opener
            if opener is None and self._refusing:
                sock.close()
                return
            if opener is None:
                self._waiting.append((sock, forward, peer, time.monotonic() + self.hold_s))
                self._on_demand()
                return
            self._in_flight += 1
        self._pool.submit(self._open, opener, sock, forward, peer)

    def _open(self, opener: Opener, sock: socket.socket, forward: Forward, peer: tuple[str, int]) -> None:
        """Runs in the small opener pool: one round trip per new connection, never on the pump thread."""
        window = self._pump.grant_window()
        try:
            channel = opener(forward, peer, window)
        except TunneldError as error:
            sock.close()
            self._finish_open()
            self._pump.release_window(window)
            self._mark_refused(forward, error.message)
            return
        except Exception as exc:
            log.debug("%s: could not open a channel for %s (%s): waiting for the next link", self.alias,
                      forward, exc)  # fmt: skip
            self._pump.release_window(window)
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

    def opened(self) -> Iterator[tuple[socket.socket, Forward, Channel, int]]:
        """Yield each connection whose channel is open now, with its granted window (on the loop's thread)."""
        while True:
            try:
                sock, forward, channel, window = self._opened.get_nowait()
            except queue.Empty:
                return
            self._finish_open()
            yield sock, forward, channel, window

    def expire_waiting(self) -> None:
        """Close the connections that waited longer than the hold limit for a link."""
        now = time.monotonic()
        with self._lock:
            while self._waiting and self._waiting[0][3] <= now:
                sock, forward, _, _ = self._waiting.popleft()
                log.info("%s: closed a connection to %s that waited %.0f s for the link", self.alias, forward,
                         self.hold_s)  # fmt: skip
                sock.close()

    def count(self) -> int:
        """Return the connections waiting for a link or for their channel to open."""
        return len(self._waiting) + self._in_flight

    def has_waiting(self) -> bool:
        """Return True while a connection waits for a link."""
        return bool(self._waiting)

    def close(self) -> None:
        """Stop opening channels; close the connections that wait."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        for sock, *_ in self._waiting:
            sock.close()
        self._waiting.clear()
