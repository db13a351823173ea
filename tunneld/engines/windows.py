"""How far a channel's receive window grows: the client grants it, so on a long fat path the client decides
whether a download runs at the path's speed or at window / round trip (OpenSSH keeps 2 MiB: 42 MB/s at 40 ms).

When the sender fills a channel's window within about one round trip while the local reader keeps
up, the window (not the path) is what limits the transfer: it doubles, up to MAX_WINDOW_BYTES,
and only out of what the engine's buffer budget has left. A reader that falls behind stops growth.
"""

from __future__ import annotations

from dataclasses import dataclass

START_WINDOW_BYTES = 2 * 1024 * 1024
MAX_WINDOW_BYTES = 32 * 1024 * 1024
# "Filled within one round trip": at least this much of the window per RTT. A window-limited transfer
# measures 0.55-0.75 of its window per round trip (window adjustments arrive in bursts, samples are
# one RTT long); at 0.75 growth stalled at 4-8 MiB on a 40 ms path (76-119 MB/s instead of ~145).
FILLED_FRACTION = 0.5
MIN_SAMPLE_S = 0.05


@dataclass(frozen=True)
class WindowGrowth:
    """The growth rule as a value: given what a channel received lately, how much to add to its window."""

    maximum: int = MAX_WINDOW_BYTES
    filled_fraction: float = FILLED_FRACTION

    def bytes_to_add(
        self, window: int, received: int, elapsed_s: float, rtt_s: float, budget_left: int, reader_keeps_up: bool
    ) -> int:
        """Return the bytes to add to a channel's window now (0 to leave it as it is)."""
        if not reader_keeps_up or window >= self.maximum or rtt_s <= 0 or elapsed_s <= 0 or budget_left <= 0:
            return 0
        per_round_trip = received / elapsed_s * rtt_s
        if per_round_trip < self.filled_fraction * window:
            return 0  # the path or the sender is slower than the window: more window would only buffer
        return min(window, self.maximum - window, budget_left)
