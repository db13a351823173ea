"""The state machine that keeps one host's link up: connect, hold, notice loss, back off, retry."""

from __future__ import annotations

import dataclasses
import logging
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import psutil

from tunneld.config import TunnelSpec
from tunneld.engines import ChildProcess, Engine, ForwardStatus, Link, LinkEvents
from tunneld.errors import EXIT_OK, PortInUseError, TunneldError
from tunneld.health import Health, HealthMonitor
from tunneld.settings import HostSettings
from tunneld.states import BACKOFF, CONNECTING, DEGRADED, FAILED, FORWARD_DEGRADED, LOST, STARTING, STOPPED, UP

log = logging.getLogger(__name__)


PROBE_INTERVAL_S = 0.5
PROBE_TIMEOUT_S = 1.0
SETTLE_TICK_S = 1.0
HEARTBEAT_S = 5.0
CLOCK_JUMP_S = 5.0
NETWORK_CHECK_S = 2.0


@dataclass(frozen=True)
class Backoff:
    """Retry delays: at once first, then exponential with full jitter up to a cap; reset after stable uptime."""

    base_s: float = 0.5
    cap_s: float = 30.0
    reset_after_s: float = 60.0
    attempt: int = 0

    def delay(self, rng: random.Random) -> float:
        """Return how long to wait before the next try (0 for the first try after a loss)."""
        if self.attempt == 0:
            return 0.0
        ceiling = min(self.cap_s, self.base_s * 2 ** (self.attempt - 1))
        return rng.uniform(0.0, ceiling)

    def next(self) -> Backoff:
        """Return the backoff after one more failed try."""
        return dataclasses.replace(self, attempt=self.attempt + 1)

    def after_uptime(self, uptime_s: float) -> Backoff:
        """Return a fresh backoff if the link stayed up long enough, else this one."""
        return dataclasses.replace(self, attempt=0) if uptime_s >= self.reset_after_s else self


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
    next_try_at: float | None = None
    forwards: tuple[ForwardStatus, ...] = ()
    children: tuple[ChildProcess, ...] = ()
    keepalive: str = ""

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


@dataclass
class Wakeups:
    """Reasons to stop waiting: stop requested, or 'retry now' (SIGUSR1, sleep, network change)."""

    stop: threading.Event = field(default_factory=threading.Event)
    retry_now: threading.Event = field(default_factory=threading.Event)
    wake: threading.Event = field(default_factory=threading.Event)

    def request_stop(self) -> None:
        """Ask the supervisor to stop (signal handlers call this; it only sets flags)."""
        self.stop.set()
        self.wake.set()

    def request_retry(self) -> None:
        """Ask the supervisor to skip the current backoff wait."""
        self.retry_now.set()
        self.wake.set()


class Environment:
    """Watches for a wall-clock jump against the monotonic clock (sleep) and for changed local addresses."""

    def __init__(self) -> None:
        self._offset = time.time() - time.monotonic()
        self._addresses = self._current_addresses()
        self._checked = time.monotonic()

    @staticmethod
    def _current_addresses() -> frozenset[str]:
        return frozenset(
            addr.address for addrs in psutil.net_if_addrs().values() for addr in addrs if addr.family != psutil.AF_LINK
        )

    def changed(self) -> str | None:
        """Return why the machine's situation changed since the last call (or None)."""
        offset = time.time() - time.monotonic()
        jumped = abs(offset - self._offset) > CLOCK_JUMP_S
        self._offset = offset
        if jumped:
            return "the clock jumped (the machine slept)"
        now = time.monotonic()
        if now - self._checked >= NETWORK_CHECK_S:
            self._checked = now
            addresses = self._current_addresses()
            if addresses != self._addresses:
                self._addresses = addresses
                return "the local network addresses changed"
        return None


def tcp_answers(target: tuple[str, int] | None, timeout: float = PROBE_TIMEOUT_S) -> bool | None:
    """Return whether a TCP connection to `target` succeeds (None when there is nothing to probe)."""
    if target is None:
        return None
    try:
        with socket.create_connection(target, timeout=timeout):
            return True
    except OSError:
        return False


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
    ) -> None:
        self.spec = spec
        self.settings = settings or HostSettings()
        self.engine = engine
        self.reporter = reporter
        self.wakeups = wakeups
        self.fail_fast = fail_fast
        self.backoff = backoff or Backoff()
        self.rng = rng or random.Random()
        self.environment = Environment()
        keepalive = f"{spec.keepalive_interval_s}s x {spec.keepalive_count_max}"
        now = time.time()
        self.status = TunnelStatus(spec.alias, engine.name, STARTING, now, now, keepalive=keepalive)

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
        first_try = True
        while not self.wakeups.stop.is_set():
            self._set(state=CONNECTING, next_try_at=None)
            self._progress(f"connecting to {self.spec.user}@{self.spec.hostname}:{self.spec.port}")
            try:
                link = self.engine.connect(self.spec, self._progress, LinkEvents(self.wakeups.stop, self.wakeups.wake))
            except TunneldError as error:
                if self.wakeups.stop.is_set():
                    break
                self._set(attempts=self.status.attempts + 1, last_error=_error_record(error))
                # A port taken while the link was down may be freed again: only at the very start is it fatal.
                retryable = error.retryable or (isinstance(error, PortInUseError) and not first_try)
                if not retryable or (first_try and self.fail_fast):
                    return self._fail(error)
                log.warning("%s: %s", self.spec.alias, error.message)
                first_try = False
                self._pause()
                continue
            reconnects = self.status.reconnects + (0 if first_try else 1)
            first_try = False
            health = HealthMonitor(self.spec, link, self.settings, self.wakeups.wake.set)
            health.check_now()  # before `up` is reported: the forwards carry traffic to their targets
            health.start()
            try:
                uptime, lost = self._hold(link, health, reconnects)
            finally:
                health.stop()
                link.close()
            self.backoff = self.backoff.after_uptime(uptime)
            if lost is None:
                break
            self._set(state=LOST, last_error=_error_record(lost), forwards=(), children=())
            if not lost.retryable:
                return self._fail(lost)
            log.warning("%s: link lost after %.1f s: %s", self.spec.alias, uptime, lost.message)
            self._pause()
        self._set(state=STOPPED, forwards=(), children=(), next_try_at=None)
        log.info("%s: stopped", self.spec.alias)
        return EXIT_OK

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
        """Hold a live link; return (uptime, why it was lost), with None when a stop was requested."""
        started = time.monotonic()
        self._publish_up(link, health, reconnects=reconnects, attempts=0)
        for forward in self.status.forwards:
            log.info("%s: forward %s is up on %s", self.spec.alias, forward.forward, ", ".join(forward.listen))
        last_beat = time.monotonic()
        while not self.wakeups.stop.is_set():
            self.wakeups.wake.wait(SETTLE_TICK_S if link.settling() else HEARTBEAT_S)
            self.wakeups.wake.clear()
            lost = link.wait(0)
            if lost is not None:
                return time.monotonic() - started, lost.error
            if self.wakeups.retry_now.is_set():
                self.wakeups.retry_now.clear()
                log.info("%s: retry requested, but the link is up", self.spec.alias)
            before = self.status.state
            if self._publish_up(link, health, force=time.monotonic() - last_beat >= HEARTBEAT_S):
                last_beat = time.monotonic()
            if self.status.state != before:
                self._log_forward_health()
        return time.monotonic() - started, None

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

    def _pause(self) -> None:
        """Wait out one backoff step; end early on stop, on 'retry now', or when the first hop answers again."""
        delay = self.backoff.delay(self.rng)
        self.backoff = self.backoff.next()
        if delay <= 0:
            log.info("%s: retrying now", self.spec.alias)
            return
        log.info("%s: retrying in %.1f s", self.spec.alias, delay)
        self._set(state=BACKOFF, next_try_at=time.time() + delay)
        reason = self._wait(delay)
        if reason:
            log.info("%s: %s: retrying now", self.spec.alias, reason)

    def _wait(self, delay: float) -> str | None:
        deadline = time.monotonic() + delay
        hop = self.spec.first_hop()
        saw_down = False
        # Probe at once: a server that comes back between the failed attempt and the first probe
        # must still count as "down, then up", or the whole backoff step would be waited out.
        next_probe = time.monotonic()
        while not self.wakeups.stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if self.wakeups.wake.wait(min(remaining, max(0.0, next_probe - time.monotonic()))):
                self.wakeups.wake.clear()
                if self.wakeups.retry_now.is_set():
                    self.wakeups.retry_now.clear()
                    return "retry requested (SIGUSR1)"
                continue
            changed = self.environment.changed()
            if changed:
                return changed
            if time.monotonic() >= next_probe:
                next_probe = time.monotonic() + PROBE_INTERVAL_S
                answers = tcp_answers(hop)
                if answers is False:
                    saw_down = True
                elif answers and saw_down:
                    return f"{hop[0]}:{hop[1]} answers again" if hop else None
        return None


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
