"""The state machine that keeps one host's link up: connect, hold, notice loss, back off, retry."""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from tunneld.engines import ChildProcess, Engine, ForwardStatus, Link, LinkEvents, OnDemandEngine
from tunneld.errors import EXIT_OK, HandshakeStalledError, PortInUseError, TunneldError, UnreachableError
from tunneld.health import Health, HealthMonitor
from tunneld.probes import Environment, PathWatch, Probe, Wakeups, tcp_answers
from tunneld.settings import HostSettings
from tunneld.spec import TunnelSpec
from tunneld.states import (
    BACKOFF,
    CONNECTING,
    DEGRADED,
    FAILED,
    FORWARD_DEGRADED,
    IDLE,
    LOST,
    STARTING,
    STOPPED,
    UP,
)

log = logging.getLogger(__name__)


SETTLE_TICK_S = 1.0
HEARTBEAT_S = 5.0
WAIT_TICK_S = 0.25


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


@dataclass(frozen=True)
class TunnelStatus:
    """One snapshot of a supervised tunnel, as the state file stores it."""

    host: str
    engine: str
    state: str
    since: float
    started_at: float
    attempts: int = 0
    reconnects: int = 0
    last_error: dict[str, object] | None = None
    previous_error: dict[str, object] | None = None
    next_try_at: float | None = None
    forwards: tuple[ForwardStatus, ...] = ()
    children: tuple[ChildProcess, ...] = ()
    keepalive: str = ""
    ssh_config: str | None = None  # the -F file it was started with, so `restart` can use it again

    def to_dict(self) -> dict[str, object]:
        """Return the snapshot as JSON-ready data."""
        data = dataclasses.asdict(self)
        data["forwards"] = [f.to_dict() for f in self.forwards]
        return data


class Reporter(Protocol):
    """Where the supervisor publishes state (state file, readiness pipe, log)."""

    def publish(self, status: TunnelStatus) -> None:
        """Record a new snapshot."""

    def progress(self, text: str) -> None:
        """Report a step of bringing the link up."""


class AttemptAbandonedError(Exception):
    """An attempt hung on a path that was dead and has come back: a fresh attempt replaces it."""


class Supervisor:
    """Keeps one host's link up until stopped, or until a fatal error says retrying cannot help."""

    def __init__(
        self,
        spec: TunnelSpec,
        engine: Engine,
        reporter: Reporter,
        wakeups: Wakeups,
        fail_fast: bool = False,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        settings: HostSettings | None = None,
        probe: Probe | None = None,
        environment: Environment | None = None,
    ) -> None:
        self.spec = spec
        self.settings = settings or HostSettings()
        self.engine = engine
        self.reporter = reporter
        self.wakeups = wakeups
        self.fail_fast = fail_fast
        self.backoff = backoff or Backoff()
        self.rng = rng or random.Random()
        self.probe: Probe = probe or (lambda hop: bool(tcp_answers(hop)))
        self.environment = environment or Environment()
        keepalive = f"{spec.keepalive_interval_s}s x {spec.keepalive_count_max}"
        now = time.time()
        self.status = TunnelStatus(
            spec.alias, engine.name, STARTING, now, now, keepalive=keepalive, ssh_config=spec.ssh_config
        )
        # On demand: the engine keeps listening without a link; the link lives while clients use it.
        self.on_demand = engine if self.settings.on_demand and isinstance(engine, OnDemandEngine) else None
        self._verified = False  # on demand: the first link checked host key and login, and was closed

    def _set(self, **changes: object) -> None:
        if "state" in changes and changes["state"] != self.status.state:
            changes.setdefault("since", time.time())
        self.status = dataclasses.replace(self.status, **changes)  # type: ignore[arg-type]
        self.reporter.publish(self.status)

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
            if self.on_demand is not None and not self._verified:
                self._verified_only(link)
                continue
            reconnects = self.status.reconnects + (1 if had_link else 0)  # a first link is not a reconnect
            had_link = True
            uptime, lost = self._serve(link, reconnects)
            self.backoff = self.backoff.after_link(uptime)
            if lost is None:
                continue  # a stop ends the loop; otherwise an on-demand link was closed for idleness
            self._set(state=LOST, last_error=_error_record(lost), forwards=(), children=())
            if not lost.retryable:
                return self._fail(lost)
            log.warning("%s: link lost after %.1f s: %s", self.spec.alias, uptime, lost.message)
            if not self._unwanted():  # else nobody waits: idle, and the next client brings it up
                self._pause()
        self._set(state=STOPPED, forwards=(), children=(), next_try_at=None)
        log.info("%s: stopped", self.spec.alias)
        return EXIT_OK

    def _connect(self) -> Link:
        """One attempt, watched: if the path was dead and comes back before the SSH banner, start afresh.

        An attempt stuck in TCP SYN retransmission or waiting for a banner on a dead path would
        otherwise wait out ConnectTimeout after the server is reachable again.
        """
        cancel, past_banner, abandoned = threading.Event(), threading.Event(), threading.Event()

        def path_changed() -> None:
            if watch.came_back.is_set() and not past_banner.is_set():
                abandoned.set()
                cancel.set()

        def progress(text: str) -> None:
            if text.startswith("connected"):
                past_banner.set()
            self._progress(text)

        watch = PathWatch(self.spec.first_hop(), path_changed, self.probe).start()
        self.wakeups.attempt = cancel
        if self.wakeups.stop.is_set():
            cancel.set()
        try:
            return self.engine.connect(self.spec, progress, LinkEvents(cancel, self.wakeups.wake))
        except TunneldError:
            if abandoned.is_set() and not self.wakeups.stop.is_set():
                raise AttemptAbandonedError from None
            raise
        finally:
            watch.stop()
            self.wakeups.attempt = None

    def _serve(self, link: Link, reconnects: int) -> tuple[float, TunneldError | None]:
        """Check the forwards, publish `up`, hold the link until it ends; always close it."""
        health = HealthMonitor(self.spec, link, self.settings, self.wakeups.wake.set, stop=self.wakeups.stop)
        try:
            health.check_now()  # before `up` is reported: the forwards carry traffic to their targets
            health.start()
            return self._hold(link, health, reconnects)
        finally:
            health.stop()
            link.close()

    def _progress(self, text: str) -> None:
        log.info("%s: %s", self.spec.alias, text)
        self.reporter.progress(text)

    def _fail(self, error: TunneldError) -> int:
        log.error("%s: %s", self.spec.alias, error.message)
        if error.hint:
            log.error("%s: hint: %s", self.spec.alias, error.hint)
        self._set(state=FAILED, last_error=_error_record(error), forwards=(), children=())
        return error.exit_code

    def _hold(self, link: Link, health: HealthMonitor, reconnects: int) -> tuple[float, TunneldError | None]:
        """Hold a live link; return (uptime, why it was lost), with None when a stop was requested or an
        on-demand link went unused for idle_timeout_s."""
        started = time.monotonic()
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
            before = self.status.state
            if self._publish_up(link, health, force=time.monotonic() - last_beat >= HEARTBEAT_S):
                last_beat = time.monotonic()
            if self.status.state != before:
                self._log_forward_health()
        return time.monotonic() - started, None

    def _after_failed_attempt(self, error: TunneldError, first_try: bool, had_link: bool) -> int | None:
        """Record a failed attempt; return the exit code when it is fatal, else wait out the backoff and None."""
        self._set(attempts=self.status.attempts + 1, last_error=_error_record(error))
        # A port taken while the link was down may be freed again: only at the very start is it fatal.
        retryable = error.retryable or (isinstance(error, PortInUseError) and had_link)
        if not retryable or (first_try and self.fail_fast):
            return self._fail(error)
        log.warning("%s: %s", self.spec.alias, error.message)
        if not self._unwanted():  # else nobody waits for this link any more: idle until the next client
            self._pause(stalled=isinstance(error, HandshakeStalledError),
                        unreachable=isinstance(error, UnreachableError))  # fmt: skip
        return None

    def _unwanted(self) -> bool:
        """Return True for an on-demand tunnel that no client waits for (it idles instead of connecting)."""
        return self.on_demand is not None and self._verified and not self.on_demand.wanted()

    def _verified_only(self, link: Link) -> None:
        """On demand, the first link only proves host key and login (a broken host fails in the foreground)."""
        self._verified = True
        link.close()
        self._set(attempts=0, last_error=None)
        log.info("%s: host key and login verified; the link opens when a client connects (on demand)",
                 self.spec.alias)  # fmt: skip

    def _idle(self, engine: OnDemandEngine) -> bool:
        """Listen without a link until a client arrives or SIGUSR1 asks (True), or a stop is requested (False)."""
        self._set(state=IDLE, forwards=tuple(engine.listening()), children=(), next_try_at=None)
        log.info("%s: idle: listening; the first client brings the link up", self.spec.alias)
        while not self.wakeups.stop.is_set():
            if engine.wanted():
                log.info("%s: a client connected: bringing the link up", self.spec.alias)
                return True
            if self.wakeups.retry_now.is_set():
                self.wakeups.retry_now.clear()
                log.info("%s: connect requested (SIGUSR1)", self.spec.alias)
                return True
            self.wakeups.wake.wait(HEARTBEAT_S)
            self.wakeups.wake.clear()
            forwards = tuple(engine.listening())
            if forwards != self.status.forwards:
                self._set(forwards=forwards)
        return False

    def _publish_up(self, link: Link, health: HealthMonitor, force: bool = True, **changes: object) -> bool:
        forwards = tuple(_with_health(f, health.result(f.forward)) for f in link.stats())
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

    def _pause(self, stalled: bool = False, unreachable: bool = False) -> None:
        """Wait out one backoff step; end early on stop, on 'retry now', a machine change, or the path's return.

        After a stalled handshake on a port that still accepts TCP (a frozen or overloaded server),
        the next attempt starts at once: one attempt at a time stays pending, so a server that
        resumes is used the moment it answers. Each such attempt lasts ConnectTimeout, which bounds the rate.
        """
        hop = self.spec.first_hop()
        if stalled and hop is not None and self.probe(hop):
            self.backoff = self.backoff.next()
            log.info("%s: %s:%d accepts connections but the handshake stalled: trying again now", self.spec.alias,
                     *hop)  # fmt: skip
            return
        delay = self.backoff.delay(self.rng)
        self.backoff = self.backoff.next()
        if delay <= 0:
            log.info("%s: retrying now", self.spec.alias)
            return
        log.info("%s: retrying in %.1f s", self.spec.alias, delay)
        self._set(state=BACKOFF, next_try_at=time.time() + delay)
        reason = self._wait(delay, known_down=unreachable)
        if reason:
            log.info("%s: %s: retrying now", self.spec.alias, reason)

    def _wait(self, delay: float, known_down: bool = False) -> str | None:
        """Sleep up to `delay`; return why it ended early (None when it ran out or a stop was requested).

        `known_down`: the attempt that failed could not reach the first hop, so the first probe that
        answers means the path is back (a path that answered all along never ends a wait early).
        """
        deadline = time.monotonic() + delay
        hop = self.spec.first_hop()
        watch = PathWatch(hop, self.wakeups.wake.set, self.probe, known_down=known_down).start()
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
                if watch.came_back.is_set() and hop is not None:
                    return f"{hop[0]}:{hop[1]} answers again"
                changed = self.environment.changed()
                if changed:
                    return changed
            return None
        finally:
            watch.stop()


def _with_health(forward: ForwardStatus, health: Health | None) -> ForwardStatus:
    """Attach the forward's latest health check; a failing one makes the forward degraded."""
    if health is None:
        return forward
    forward = dataclasses.replace(forward, health=health.to_dict())
    if not health.ok and forward.state != FORWARD_DEGRADED:
        forward = dataclasses.replace(forward, state=FORWARD_DEGRADED, detail=health.detail)
    return forward


def _error_record(error: TunneldError) -> dict[str, object]:
    record = error.to_dict()
    record["at"] = time.time()
    return record
