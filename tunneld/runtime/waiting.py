"""Waiting between attempts: the budget of unauthenticated connections, the backoff, and what ends a wait early
(a stop, SIGUSR1, a reload, the path's return found by probing it, a change of the machine's network)."""

from __future__ import annotations

import time

from tunneld.errors import HandshakeStalledError, RefusedByServerError, TunneldError, UnreachableError
from tunneld.runtime.probes import PathWatch
from tunneld.runtime.supervision import WAIT_TICK_S, Supervision, log
from tunneld.states import BACKOFF


class Waiting(Supervision):
    """The supervisor's waits between attempts."""

    def _take_budget(self) -> bool:
        """Take a slot for the next attempt, waiting while the budget is used up; False when a stop came first."""
        told = False
        while not self.wakeups.stop.is_set():
            if self.budget.take():
                return True
            wait = self.budget.wait_s()
            if not told:
                told = True
                log.warning(
                    "%s: %d connections to the server ended before authentication in the last %.0f s: waiting "
                    "%.0f s (at most %d a minute: OpenSSH 9.8+ blocks addresses that make more)",
                    self.spec.alias, self.budget.spent(), self.budget.window_s, wait, self.budget.limit,
                )  # fmt: skip
                self._set(state=BACKOFF, next_try_at=time.time() + wait)
            self.wakeups.stop.wait(min(max(wait, WAIT_TICK_S / 5), WAIT_TICK_S))
        return False

    def _pause(self, error: TunneldError | None = None) -> None:
        """Wait out one backoff step; end early on stop, on 'retry now', a machine change, or the path's return.

        The path is probed only after an attempt that could not reach it (UnreachableError): a server that
        answers TCP is never probed, its failures wait out the backoff alone. A server that closed the
        connection before its banner (RefusedByServerError) is refusing this address for now: at least
        `refused_s` (a bare close or reset once it repeats, see _refusal_wait). After a stalled handshake (the
        port accepted TCP, no banner or handshake followed: a frozen or overloaded server) the next attempt
        starts at once: one attempt at a time stays pending, so a server that resumes is used the moment it
        answers; each lasts ConnectTimeout and the budget bounds them.
        """
        if isinstance(error, HandshakeStalledError):
            self.backoff = self.backoff.next()
            log.info("%s: the server accepted TCP but the handshake stalled: trying again now", self.spec.alias)
            return
        delay = self.backoff.delay(self.rng)
        if isinstance(error, RefusedByServerError):
            delay = max(delay, self._refusal_wait(error))
        self._bare_refusal = isinstance(error, RefusedByServerError) and not error.peer_said
        self.backoff = self.backoff.next()
        if delay <= 0:
            log.info("%s: retrying now", self.spec.alias)
            return
        log.info("%s: retrying in %.1f s", self.spec.alias, delay)
        self._set(state=BACKOFF, next_try_at=time.time() + delay)
        reason = self._wait(delay, probing=isinstance(error, UnreachableError))
        if reason:
            log.info("%s: %s: retrying now", self.spec.alias, reason)

    def _refusal_wait(self, error: RefusedByServerError) -> float:
        """How long a refusal before the banner keeps the server alone. sshd refuses with a line of text (`Not allowed
        at this time`, `Exceeded MaxStartups`): `refused_s` at once. A bare close or reset is also what a server
        going down does to a connection still in its accept queue (a restart): one more try after a base step
        (the server gone, that try is refused at TCP and probing finds it back), `refused_s` when it repeats."""
        if error.peer_said or self._bare_refusal:
            return self.backoff.refused_s
        log.info("%s: closed before its banner without a word (a server going down does that too): "
                 "one more try before leaving it alone", self.spec.alias)  # fmt: skip
        return self.backoff.base_s

    def _wait(self, delay: float, probing: bool = False) -> str | None:
        """Sleep up to `delay`; return why it ended early (None when it ran out or a stop was requested).

        `probing`: the attempt that failed could not reach the first hop, so it is probed until the
        first answer, which means the path is back.
        """
        deadline = time.monotonic() + delay
        hop = self.spec.first_hop()
        watch = PathWatch(hop if probing else None, self.wakeups.wake.set, self.probe, known_down=True,
                          budget=self.budget).start()  # fmt: skip
        try:
            while not self.wakeups.stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                if self.wakeups.wake.wait(min(remaining, WAIT_TICK_S)):
                    self.wakeups.wake.clear()
                if self.wakeups.retry_now.is_set():
                    self.wakeups.retry_now.clear()
                    return "retry requested (SIGUSR1)"
                if self.wakeups.reload.is_set():
                    self._reload(link_up=False)
                    return "configuration reloaded"
                self._look_at_config()
                if watch.came_back.is_set() and hop is not None:
                    return f"{hop[0]}:{hop[1]} answers again"
                changed = self.environment.changed()
                if changed:
                    return changed
            return None
        finally:
            watch.stop()
