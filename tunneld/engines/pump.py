"""The bytes of every forwarded connection: each local socket paired with its channel, pumped both ways.

Separate from the forwarder's listeners and loop because this is where memory is spent: backpressure
(a side is read only while the other has taken what it was given), the buffer budget that bounds the
receive windows granted to channels, and the growth of a busy channel's window (engines/windows.py).
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from tunneld.engines.windows import MIN_SAMPLE_S, WindowGrowth

log = logging.getLogger(__name__)

BUFFER_BYTES = 128 * 1024
PACKET_BYTES = 32 * 1024
# What every channel's receive windows may add up to: a client that stops reading leaves its
# window's worth of data buffered in this process (paramiko's default is 2 MiB per channel).
BUFFER_BUDGET_BYTES = 64 * 1024 * 1024
MIN_WINDOW_BYTES = 64 * 1024
MAX_WINDOW_BYTES = 2 * 1024 * 1024


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


class Pump:
    """Pumps every pair on the forwarder's selector, within the buffer budget; runs on the forwarder's loop thread
    (only the window budget is also taken from the threads that open channels)."""

    def __init__(
        self, selector: selectors.BaseSelector, alias: str, widen: Callable[[Channel, int], None] | None = None
    ) -> None:
        self.alias = alias
        self.pairs: dict[int, Pair] = {}
        self.growth = WindowGrowth()
        self.rtt_s = 0.0  # the link's keepalive round trip (0 until measured: no growth before)
        self.widen = widen  # grants a channel more window (the engine's)
        self._selector = selector
        self._lock = threading.Lock()
        self._granted = 0

    def grant_window(self) -> int:
        """Reserve the receive window for a new channel out of what the budget has left.

        A client that never reads leaves at most its channel's window buffered here, so the sum of
        granted windows bounds the daemon's buffers: at most the budget plus MIN_WINDOW_BYTES per
        connection once the budget is spent.
        """
        with self._lock:
            window = max(MIN_WINDOW_BYTES, min(MAX_WINDOW_BYTES, BUFFER_BUDGET_BYTES - self._granted))
            self._granted += window
        return window

    def release_window(self, window: int) -> None:
        """Return a channel's window to the budget (its channel could not be served, or it closed)."""
        with self._lock:
            self._granted -= window

    def add(self, pair: Pair) -> None:
        """Start pumping `pair`; an OSError (out of descriptors) closes both ends and releases its window."""
        try:
            pair.local.setblocking(False)
            pair.channel.settimeout(0.0)
            channel_fd = pair.channel.fileno()  # paramiko makes a pipe here: this can run out of descriptors
        except OSError:
            pair.local.close()
            with contextlib.suppress(Exception):
                pair.channel.close()
            self.release_window(pair.window)
            raise
        pair.counters.open += 1
        self.pairs[pair.local.fileno()] = pair
        self._selector.register(pair.local, selectors.EVENT_READ, pair)
        self._selector.register(channel_fd, selectors.EVENT_READ, pair)

    def pending(self) -> bool:
        """Return True while a pair has bytes its channel did not take yet (the loop polls instead of idling)."""
        return any(p.to_channel for p in self.pairs.values())

    def flush_pending(self) -> None:
        """Retry what channels did not take on their last turn (a full window does not wake the selector)."""
        for pair in [p for p in self.pairs.values() if p.to_channel]:
            self._flush_to_channel(pair)

    def service(self, pair: Pair, fileobj: object, mask: int) -> None:
        """Serve one ready side of `pair`; its failure, whatever it is, ends that connection and nothing else."""
        try:
            self._service(pair, fileobj, mask)
        except Exception:
            log.debug("%s: dropping a connection after an error", self.alias, exc_info=True)
            self.drop(pair)

    def drop(self, pair: Pair) -> None:
        """Close both ends of `pair` and return its window to the budget (once)."""
        fd = pair.local.fileno()
        if self.pairs.pop(fd, None) is None:
            return
        pair.counters.open -= 1
        self.release_window(pair.window)
        for fileobj in (pair.local, pair.channel.fileno()):
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(fileobj)
        pair.local.close()
        with contextlib.suppress(Exception):
            pair.channel.close()

    def close(self) -> None:
        """Drop every pair."""
        for pair in list(self.pairs.values()):
            self.drop(pair)

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
            self.drop(pair)
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
        log.debug("%s: window %d, %.0f of it per round trip (%.1f ms), reader %s: %+d", self.alias, pair.window,
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
            self.drop(pair)
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
        if pair.local.fileno() not in self.pairs:
            return
        both_done = pair.local_eof and pair.channel_eof and not pair.to_local and not pair.to_channel
        if both_done or (pair.channel.closed and not pair.to_local):
            self.drop(pair)
        else:
            self._interest(pair)
