"""The state machine that keeps one host's link up: connect, hold, notice loss, back off, retry.

Its concerns beyond the main loop have their own modules: the shared state (runtime.supervision), waiting between
attempts (runtime.waiting), waiting for credentials (runtime.needsauth), on demand (runtime.ondemand).
"""

from __future__ import annotations

import threading
import time

from tunneld.config.credentials import host_auth_plan
from tunneld.engines.link import Link, LinkEvents
from tunneld.errors import EXIT_OK, AuthError, ConnectError, NeedsAuthError, PortInUseError, TunneldError
from tunneld.runtime.backoff import Backoff
from tunneld.runtime.health import HealthMonitor
from tunneld.runtime.needsauth import REFUSED_LOGINS_MAX, AwaitingCredentials
from tunneld.runtime.ondemand import OnDemand
from tunneld.runtime.probes import ATTEMPT_GRACE_S, PathWatch
from tunneld.runtime.supervision import HEARTBEAT_S, SETTLE_TICK_S, WAIT_TICK_S, log
from tunneld.runtime.tunnelstatus import Reporter, TunnelStatus, error_record, with_health
from tunneld.runtime.waiting import Waiting
from tunneld.states import CONNECTING, DEGRADED, FORWARD_DEGRADED, LOST, STARTING, STOPPED, UP

__all__ = ["REFUSED_LOGINS_MAX", "Backoff", "Reporter", "Supervisor", "TunnelStatus"]


class AttemptAbandonedError(Exception):
    """An attempt hung on a path that was dead and has come back: a fresh attempt replaces it."""


class Supervisor(Waiting, AwaitingCredentials, OnDemand):
    """Keeps one host's link up until stopped, or until a fatal error says retrying cannot help."""

    def run(self) -> int:
        """Run until stopped (exit 0) or a fatal error (its exit code); release the engine either way."""
        try:
            return self._run()
        finally:
            self.engine.close()

    def _run(self) -> int:
        self._set(state=STARTING)
        first_try, had_link = True, False
        while not self.wakeups.stop.is_set():
            if self._unwanted():
                if not self._idle(self.on_demand):  # type: ignore[arg-type]  # _unwanted: on demand
                    break
                had_link = False  # a link brought up for a client is not a reconnect
            if not self._take_budget():
                break
            self._set(state=CONNECTING, next_try_at=None)
            self._progress(f"connecting to {self.spec.user}@{self.spec.hostname}:{self.spec.port}")
            try:
                link = self._connect()
            except AttemptAbandonedError:
                log.info("%s: the path to the server came back while an attempt hung on it: starting afresh",
                         self.spec.alias)  # fmt: skip
                continue
            except TunneldError as error:
                if self.wakeups.stop.is_set():
                    break
                code = self._after_failed_attempt(error, first_try, had_link)
                if code is not None:
                    return code
                first_try = False
                continue
            first_try = False
            self._note_login()
            if self.on_demand is not None and not self._verified:
                self._verified_only(link)
                continue
            reconnects = self.status.reconnects + (1 if had_link else 0)  # a first link is not a reconnect
            had_link = True
            uptime, lost = self._serve(link, reconnects)
            self.backoff = self.backoff.after_link(uptime)
            if lost is not None:  # else a stop ends the loop, or an on-demand link was closed for idleness
                code = self._after_lost_link(lost, uptime)
                if code is not None:
                    return code
        self._set(state=STOPPED, forwards=(), children=(), next_try_at=None)
        log.info("%s: stopped", self.spec.alias)
        return EXIT_OK

    def _after_lost_link(self, lost: TunneldError, uptime: float) -> int | None:
        """Record why a link ended; return the exit code when that is fatal, else wait as the reason asks."""
        if isinstance(lost, NeedsAuthError) and host_auth_plan(self.spec).needs == "keys":
            # The login connection of `tunneld login` ended, but the host's keys may log in by themselves.
            lost = ConnectError(f"{lost.message}; the host's keys may do: reconnecting with them")
        self._set(state=LOST, last_error=error_record(lost), forwards=(), children=())
        if isinstance(lost, AuthError) and self.status.logged_in_to:  # the login connection (tunneld login) ended
            self._await_credentials(lost)
            return None
        if not lost.retryable:
            return self._fail(lost)
        log.warning("%s: link lost after %.1f s: %s", self.spec.alias, uptime, lost.message)
        if not self._unwanted():  # else nobody waits: idle, and the next client brings it up
            self._pause()
        return None

    def _connect(self) -> Link:
        """One attempt (its budget slot already taken), watched while its TCP connect is pending.

        An attempt stuck in TCP SYN retransmission on a dead path would otherwise wait out ConnectTimeout
        after the server is reachable again: if TCP has not connected within ATTEMPT_GRACE_S, the first hop
        is probed, and a path that was dead and answers again makes a fresh attempt replace this one. Once
        the attempt's TCP is up, nothing is probed. When the attempt ends, its slot is spent if it reached the
        server without logging in.
        """
        cancel, abandoned = threading.Event(), threading.Event()
        events = LinkEvents(cancel, self.wakeups.wake)
        self.credentials.last = self.credentials.look()  # what the agent offered this attempt (needs-auth compares)

        def path_changed() -> None:
            if watch.came_back.is_set() and not events.tcp_up.is_set():
                abandoned.set()
                cancel.set()

        watch = PathWatch(
            self.spec.first_hop(), path_changed, self.probe, budget=self.budget, delay_s=ATTEMPT_GRACE_S,
            until=events.tcp_up,
        ).start()  # fmt: skip
        self.wakeups.attempt = cancel
        if self.wakeups.stop.is_set():
            cancel.set()
        try:
            return self.engine.connect(self.spec, self._progress, events)
        except TunneldError:
            if abandoned.is_set() and not self.wakeups.stop.is_set():
                raise AttemptAbandonedError from None
            raise
        finally:
            watch.stop()
            self.wakeups.attempt = None
            if self.spec.first_hop() is None:  # behind a ProxyCommand: count every attempt that did not log in
                self.budget.end(spent=not events.authenticated.is_set())
            else:  # the connection tunneld opened is the one to the first hop
                self.budget.end(spent=events.tcp_up.is_set() and not events.first_hop_authenticated.is_set())

    def _serve(self, link: Link, reconnects: int) -> tuple[float, TunneldError | None]:
        """Check the forwards, publish `up`, hold the link until it ends; always close it. A reload that keeps the
        link checks again with the new settings."""
        started = time.monotonic()
        try:
            while True:
                health = HealthMonitor(self.spec, link, self.settings, self.wakeups.wake.set, stop=self.wakeups.stop)
                try:
                    health.check_now()  # before `up` is reported: the forwards carry traffic to their targets
                    if self.wakeups.stop.is_set():  # a stop cut the checks short: never report `up` on the way out
                        return 0.0, None
                    health.start()
                    held = self._hold(link, health, reconnects, started)
                finally:
                    health.stop()
                if held is not None:
                    return held
                reconnects = self.status.reconnects
        finally:
            link.close()

    def _hold(
        self, link: Link, health: HealthMonitor, reconnects: int, started: float
    ) -> tuple[float, TunneldError | None] | None:
        """Hold a live link; return (uptime, why it was lost), with None for the reason when a stop was requested or
        an on-demand link went unused for idle_timeout_s; None when a reload kept the link (check it again)."""
        cleared = self.status.last_error
        self._publish_up(link, health, reconnects=reconnects, attempts=0, last_error=None,
                         previous_error=cleared or self.status.previous_error)  # fmt: skip
        for forward in self.status.forwards:
            log.info("%s: forward %s is up on %s", self.spec.alias, forward.forward, ", ".join(forward.listen))
        last_beat = time.monotonic()
        unused_since: float | None = None
        tick = SETTLE_TICK_S if link.settling() else HEARTBEAT_S
        if self.on_demand is not None:
            tick = min(tick, max(WAIT_TICK_S, self.settings.idle_timeout_s / 4))
        while not self.wakeups.stop.is_set():
            self.wakeups.wake.wait(tick)
            self.wakeups.wake.clear()
            lost = link.wait(0)
            if lost is not None:
                return time.monotonic() - started, lost.error
            if self.on_demand is not None:
                unused_since = None if self.on_demand.busy() else unused_since or time.monotonic()
                if unused_since is not None and time.monotonic() - unused_since >= self.settings.idle_timeout_s:
                    log.info("%s: no connection for %.0f s: closing the link (on demand; still listening)",
                             self.spec.alias, self.settings.idle_timeout_s)  # fmt: skip
                    return time.monotonic() - started, None
            if self.wakeups.retry_now.is_set():
                self.wakeups.retry_now.clear()
                log.info("%s: retry requested, but the link is up", self.spec.alias)
            if self.wakeups.reload.is_set():
                if self._reload(link_up=True):
                    return time.monotonic() - started, ConnectError("reconnecting with the new configuration")
                return None
            self._look_at_config()
            before = self.status.state
            if self._publish_up(link, health, force=time.monotonic() - last_beat >= HEARTBEAT_S):
                last_beat = time.monotonic()
            if self.status.state != before:
                self._log_forward_health()
        return time.monotonic() - started, None

    def _after_failed_attempt(self, error: TunneldError, first_try: bool, had_link: bool) -> int | None:
        """Record a failed attempt; return the exit code when it is fatal, else wait out the backoff and None."""
        if isinstance(error, AuthError) and self.status.logged_in_to and not (first_try and self.fail_fast):
            self._await_credentials(error)
            return None
        self._set(attempts=self.status.attempts + 1, last_error=error_record(error))
        # A port taken while the link was down may be freed again: only at the very start is it fatal.
        retryable = error.retryable or (isinstance(error, PortInUseError) and had_link)
        if not retryable or (first_try and self.fail_fast):
            return self._fail(error)
        log.warning("%s: %s", self.spec.alias, error.message)
        if not self._unwanted():  # else nobody waits for this link any more: idle until the next client
            self._pause(error)
        return None

    def _publish_up(self, link: Link, health: HealthMonitor, force: bool = True, **changes: object) -> bool:
        forwards = tuple(with_health(f, health.result(f.forward)) for f in link.stats())
        state = DEGRADED if any(f.state == FORWARD_DEGRADED for f in forwards) else UP
        if not force and state == self.status.state and forwards == self.status.forwards:
            return False
        self._set(state=state, forwards=forwards, children=tuple(link.children()), next_try_at=None, **changes)
        return True

    def _log_forward_health(self) -> None:
        for forward in self.status.forwards:
            if forward.state == FORWARD_DEGRADED:
                log.warning("%s: degraded: %s (target: %s)", self.spec.alias, forward.forward, forward.detail)
        if self.status.state == UP:
            log.info("%s: every forward's target answers again", self.spec.alias)
