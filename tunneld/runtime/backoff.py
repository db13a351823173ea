"""How long a host waits between failed attempts: at once, then exponential with full jitter up to a cap."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Retry delays for consecutive failed attempts: at once, then exponential with full jitter up to a cap.

    The backoff guards against a server that keeps failing, not against one that answers: a link
    that held for `stable_s` and was then lost starts again at "at once". A link that dies within
    seconds of every login (a flapping server) counts as one more failed attempt, so it still backs off.
    """

    base_s: float = 0.5
    cap_s: float = 30.0
    stable_s: float = 5.0
    # A server that closes connections before its banner is refusing this address for now (PerSourcePenalties,
    # MaxStartups, fail2ban). OpenSSH 10 blocks for the penalty accumulated past 15 s, typically 16 s: coming back
    # at 15 s would meet the same block (measured: back after 30 s instead of 20).
    refused_s: float = 20.0
    refused_logins_window_s: float = 60.0  # at most REFUSED_LOGINS_MAX refused logins within it
    attempt: int = 0

    def delay(self, rng: random.Random) -> float:
        """Return how long to wait before the next try (0 after a stable link, and for the first try)."""
        if self.attempt == 0:
            return 0.0
        return rng.uniform(0.0, self.ceiling())

    def ceiling(self) -> float:
        """Return the longest delay this step may draw."""
        return 0.0 if self.attempt == 0 else min(self.cap_s, self.base_s * 2 ** (self.attempt - 1))

    def next(self) -> Backoff:
        """Return the backoff after one more failed try."""
        return dataclasses.replace(self, attempt=self.attempt + 1)

    def after_link(self, uptime_s: float) -> Backoff:
        """Return the backoff after a link that was up for `uptime_s` was lost (the wait that follows counts it)."""
        return dataclasses.replace(self, attempt=0) if uptime_s >= self.stable_s else self
