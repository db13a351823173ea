"""Health checks through each forward: the target accepts a connection (TCP) or answers a GET with 2xx (HTTP).

Every forward with a target is checked right after each (re)connect, before the host is
reported `up`. Forwards that tunneld.toml names are checked again every `health_interval_s`;
any forward whose last check failed, or whose target refused a connection on the link (ssh's
`open failed`, a refused channel), is checked again every 5 s (or the interval, if shorter)
until it passes, so `degraded` clears without a reconnect and without a user's connection.
One check per forward at a time; each check has one deadline for all of it (connect, request,
status line), and a stop ends a check in progress.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from tunneld.config.settings import HostSettings
from tunneld.config.spec import LOCAL, Forward, TunnelSpec
from tunneld.engines.streams import TCP_SETTLE_S, Stream
from tunneld.errors import ConfigError, TunneldError
from tunneld.states import FORWARD_DEGRADED

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 5.0  # for the whole check: connect (or channel open), request, status line
# A refusal travels back through ssh in one round trip; a connection still open after this was accepted.
STATUS_LINE_MAX_BYTES = 1024
RECHECK_FAILED_S = 5.0
CANCEL_POLL_S = 0.1  # how soon a check waiting for its answer notices a stop
# HTTP-version SP status-code [SP reason-phrase] (RFC 9112): the code is exactly three digits.
_STATUS_LINE_RE = re.compile(rb"HTTP/[0-9](?:\.[0-9])? ([0-9]{3})(?: .*)?")
TCP = "tcp"
HTTP = "http"


class Prober(Protocol):
    """What a link offers health checks: a connection to a forward's target through the tunnel."""

    def open_probe(self, forward: Forward, timeout: float, settle: bool) -> Stream:
        """Return a connection the target accepted; raise ConnectError saying why there is none."""


class ForwardState(Protocol):
    """What the link itself knows of one forward (engines.ForwardStatus)."""

    @property
    def forward(self) -> str: ...
    @property
    def state(self) -> str: ...


class CheckedLink(Prober, Protocol):
    """A link as the monitor sees it: probes, and the forwards whose target refused a connection on it."""

    def stats(self) -> Sequence[ForwardState]:
        """Return each forward's state on the link (`degraded` after a refused connection)."""


@dataclass(frozen=True)
class Deadline:
    """When a check must have ended, and the budget it was given (for the message)."""

    at: float
    budget_s: float

    def remaining(self) -> float:
        """Return the seconds left (<= 0 once it passed)."""
        return self.at - time.monotonic()


def _never() -> bool:
    return False


@dataclass(frozen=True)
class HealthCheck:
    """What to check on one forward: TCP, or an HTTP path; `configured` when tunneld.toml asked for it."""

    forward: Forward
    kind: str = TCP
    path: str | None = None
    configured: bool = False


@dataclass(frozen=True)
class Health:
    """The result of one check (`status --json`: forwards[].health)."""

    kind: str
    path: str | None
    ok: bool
    detail: str
    checked_at: float
    latency_ms: float
    configured: bool

    def to_dict(self) -> dict[str, object]:
        """Return the documented JSON form."""
        return {
            "kind": self.kind,
            "path": self.path,
            "ok": self.ok,
            "detail": self.detail,
            "checked_at": self.checked_at,
            "latency_ms": self.latency_ms,
            "configured": self.configured,
        }


def check_health_keys(spec: TunnelSpec, settings: HostSettings) -> None:
    """A `[hosts.X.health]` key must name a LocalForward of the host (its local port or socket path): a typo would
    otherwise check nothing, silently. Raise a ConfigError listing the forwards' ports."""
    names = [f.listen.path if f.listen.path is not None else str(f.listen.port) for f in spec.local_forwards]
    for key, _ in settings.health:
        if key not in names:
            from tunneld.state.paths import settings_path

            shown = ", ".join(f'"{name}"' for name in names) or "none"
            raise ConfigError(
                f"{settings_path()} [hosts.{spec.alias}.health]: {key!r} names no LocalForward of {spec.alias} "
                f"(its forwards listen on: {shown})",
                "use the local port (or socket path) of one of the host's LocalForwards as the key",
            )


def checks_for(spec: TunnelSpec, settings: HostSettings) -> list[HealthCheck]:
    """Return the check of each local forward that has a target (SOCKS and remote forwards have none here)."""
    checks = []
    for forward in spec.forwards:
        if forward.kind != LOCAL or forward.target is None:
            continue
        key = forward.listen.path if forward.listen.path is not None else str(forward.listen.port)
        configured = settings.health_check(key)
        if configured is None:
            checks.append(HealthCheck(forward))
        elif configured == TCP:
            checks.append(HealthCheck(forward, TCP, None, configured=True))
        else:
            checks.append(HealthCheck(forward, HTTP, configured, configured=True))
    return checks


def run_check(
    prober: Prober, check: HealthCheck, timeout: float = CHECK_TIMEOUT_S, cancelled: Callable[[], bool] = _never
) -> Health:
    """Run one check through `prober` within `timeout` in all; never raises for a failing target.

    `cancelled` is asked while the check waits for its answer: once it says True the check ends at once.
    """
    began = time.monotonic()
    deadline = Deadline(began + timeout, timeout)
    try:
        stream = prober.open_probe(check.forward, timeout, settle=check.kind == TCP)
    except TunneldError as error:
        return _result(check, False, error.message, began)
    try:
        if check.kind == TCP:
            return _result(check, True, f"{check.forward.target} accepts connections", began)
        ok, detail = http_get(stream, check.path or "/", str(check.forward.target), deadline, cancelled)
        return _result(check, ok, detail, began)
    finally:
        stream.close()


def _result(check: HealthCheck, ok: bool, detail: str, began: float) -> Health:
    latency_ms = round((time.monotonic() - began) * 1000, 1)
    return Health(check.kind, check.path, ok, detail, time.time(), latency_ms, check.configured)


def http_get(
    stream: Stream, path: str, host: str, deadline: Deadline, cancelled: Callable[[], bool] = _never
) -> tuple[bool, str]:
    """Send `GET path` and read the status line by `deadline`: (True, "HTTP 200 from /health") on 2xx.

    The deadline holds for the whole answer, not per read: a target that sends a byte now and then
    cannot hold the check (and the supervisor waiting for it) longer than the deadline.
    """
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tunneld-health\r\nConnection: close\r\n\r\n"
    try:
        stream.settimeout(max(deadline.remaining(), CANCEL_POLL_S))
        stream.sendall(request.encode())
        received = _read_status_line(stream, deadline, cancelled)
    except TimeoutError:
        return False, f"no complete answer from {path} within {deadline.budget_s:g} s"
    except OSError as exc:
        return False, f"{path}: connection failed: {exc.strerror or exc}"
    if not received:
        return False, f"connection refused or closed by {host} before it answered {path}"
    code = status_code(received)
    if code is None:
        return False, f"{path}: not an HTTP answer"
    return 200 <= code < 300, f"HTTP {code} from {path}"


def _read_status_line(stream: Stream, deadline: Deadline, cancelled: Callable[[], bool]) -> bytes:
    """Read until the first line ended, the peer closed, or STATUS_LINE_MAX_BYTES; TimeoutError at the deadline
    (or sooner when `cancelled`: the result of a check cut short by a stop is never recorded)."""
    received = b""
    while b"\n" not in received and len(received) < STATUS_LINE_MAX_BYTES:
        remaining = deadline.remaining()
        if remaining <= 0 or cancelled():
            raise TimeoutError
        stream.settimeout(min(remaining, CANCEL_POLL_S))
        try:
            chunk = stream.recv(STATUS_LINE_MAX_BYTES - len(received))
        except TimeoutError:
            continue
        if not chunk:
            break
        received += chunk
    return received


def status_code(received: bytes) -> int | None:
    """Return the status code of an HTTP answer's first line, or None when that line is not a status line."""
    line, newline, _ = received.partition(b"\n")
    if not newline:
        return None  # closed, or too long, before the line ended
    match = _STATUS_LINE_RE.fullmatch(line.removesuffix(b"\r"))
    return int(match[1]) if match else None


class HealthMonitor:
    """Runs a link's checks: all of them now, then the periodic ones and re-checks on a thread until stopped."""

    def __init__(
        self,
        spec: TunnelSpec,
        prober: CheckedLink,
        settings: HostSettings,
        on_change: Callable[[], None],
        stop: threading.Event | None = None,
    ) -> None:
        self.spec = spec
        self.prober = prober
        self.interval_s = settings.health_interval_s
        self.checks = checks_for(spec, settings)
        self.on_change = on_change
        self._results: dict[str, Health] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._supervisor_stop = stop  # the supervisor is stopping: a check in progress ends at once
        self._thread: threading.Thread | None = None

    def check_now(self) -> None:
        """Run every check once, concurrently (right after a connect); return at once when a stop is requested.

        Each check ends by its own deadline; a check still running when a stop comes ends by itself
        soon after (it is asked whether to go on while it waits), on a daemon thread nobody waits for.
        """
        if not self.checks:
            return
        results: queue.SimpleQueue[tuple[HealthCheck, Health]] = queue.SimpleQueue()
        for check in self.checks:
            threading.Thread(target=lambda c=check: results.put((c, self._run(c))), name="health", daemon=True).start()
        pending = len(self.checks)
        give_up = time.monotonic() + CHECK_TIMEOUT_S + TCP_SETTLE_S + 1  # every check is bounded; so is this wait
        while pending and not self._stopping() and time.monotonic() < give_up:
            try:
                check, result = results.get(timeout=CANCEL_POLL_S)
            except queue.Empty:
                continue
            if self._stopping():
                return  # a check cut short by the stop says nothing about the target
            pending -= 1
            self._record(check, result)

    def start(self) -> None:
        """Check again: configured forwards every interval, failing or refusing ones every 5 s until they pass."""
        if not self.checks:
            return
        self._thread = threading.Thread(target=self._loop, name="health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the periodic checks (the link is ending); a check in progress ends at once."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(CHECK_TIMEOUT_S + 1)

    def result(self, forward: str) -> Health | None:
        """Return the latest result for the forward named `forward` (its config text)."""
        with self._lock:
            return self._results.get(forward)

    def _stopping(self) -> bool:
        return self._stop.is_set() or (self._supervisor_stop is not None and self._supervisor_stop.is_set())

    def _run(self, check: HealthCheck) -> Health:
        return run_check(self.prober, check, cancelled=self._stopping)

    def _loop(self) -> None:
        last = {str(check.forward): time.monotonic() for check in self.checks}  # check_now ran them all
        while True:
            refused = self._refused_on_link()
            for check in self.checks:
                key = str(check.forward)
                if self._stopping():
                    return
                if time.monotonic() < self._due(check, last[key], refused):
                    continue
                result = self._run(check)
                last[key] = time.monotonic()
                if self._stopping():
                    return  # a check cut short by the stop says nothing about the target
                self._record(check, result)
            # Look again at least every RECHECK_FAILED_S: a forward may have been refused on the link meanwhile.
            wake_at = min([time.monotonic() + RECHECK_FAILED_S, *(self._due(c, last[str(c.forward)], refused)
                                                                    for c in self.checks)])  # fmt: skip
            if self._stop.wait(max(0.0, wake_at - time.monotonic())):
                return

    def _due(self, check: HealthCheck, last: float, refused: set[str]) -> float:
        """When the check runs next: configured ones every interval; failing or refused ones sooner, so
        recovery shows; healthy unconfigured ones never (only after each connect)."""
        key = str(check.forward)
        healthy = self._ok(key) and key not in refused
        if healthy and not check.configured:
            return float("inf")
        return last + (self.interval_s if healthy else min(self.interval_s, RECHECK_FAILED_S))

    def _refused_on_link(self) -> set[str]:
        """Return the forwards the link marks degraded (a connection to the target was refused on it)."""
        return {f.forward for f in self.prober.stats() if f.state == FORWARD_DEGRADED}

    def _ok(self, key: str) -> bool:
        result = self.result(key)
        return result is None or result.ok

    def _record(self, check: HealthCheck, result: Health) -> None:
        key = str(check.forward)
        with self._lock:
            previous = self._results.get(key)
            self._results[key] = result
        if previous is not None and previous.ok == result.ok:
            return
        if result.ok:
            if previous is not None:
                log.info("%s: health: %s is healthy again: %s", self.spec.alias, key, result.detail)
        else:
            log.warning("%s: health: %s: %s", self.spec.alias, key, result.detail)
        self.on_change()
