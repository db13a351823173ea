"""Health checks through each forward: the target accepts a connection (TCP) or answers a GET with 2xx (HTTP).

Every forward with a target is checked right after each (re)connect, before the host is
reported `up`. Forwards that tunneld.toml names are checked again every `health_interval_s`;
any forward whose last check failed is checked again every 5 s (or the interval, if shorter)
until it passes, so `degraded` clears without a reconnect. One check per forward at a time,
short timeouts.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from tunneld.errors import ConnectError, TunneldError
from tunneld.probes import name_for_lookup
from tunneld.settings import HostSettings
from tunneld.spec import LOCAL, Forward, TunnelSpec

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 5.0
# A refusal travels back through ssh in one round trip; a connection still open after this was accepted.
TCP_SETTLE_S = 0.5
STATUS_LINE_MAX_BYTES = 1024
RECHECK_FAILED_S = 5.0
TCP = "tcp"
HTTP = "http"


class Stream(Protocol):
    """A connection through a forward (a local socket, or a paramiko channel)."""

    def sendall(self, data: bytes) -> None: ...
    def recv(self, nbytes: int) -> bytes: ...
    def settimeout(self, timeout: float | None) -> None: ...
    def close(self) -> None: ...


class Prober(Protocol):
    """What a link offers health checks: a connection to a forward's target through the tunnel."""

    def open_probe(self, forward: Forward, timeout: float, settle: bool) -> Stream:
        """Return a connection the target accepted; raise ConnectError saying why there is none."""


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


def run_check(prober: Prober, check: HealthCheck, timeout: float = CHECK_TIMEOUT_S) -> Health:
    """Run one check through `prober` and return its result (never raises for a failing target)."""
    began = time.monotonic()
    try:
        stream = prober.open_probe(check.forward, timeout, settle=check.kind == TCP)
    except TunneldError as error:
        return _result(check, False, error.message, began)
    try:
        if check.kind == TCP:
            return _result(check, True, f"{check.forward.target} accepts connections", began)
        ok, detail = http_get(stream, check.path or "/", str(check.forward.target), timeout)
        return _result(check, ok, detail, began)
    finally:
        stream.close()


def _result(check: HealthCheck, ok: bool, detail: str, began: float) -> Health:
    latency_ms = round((time.monotonic() - began) * 1000, 1)
    return Health(check.kind, check.path, ok, detail, time.time(), latency_ms, check.configured)


def http_get(stream: Stream, path: str, host: str, timeout: float) -> tuple[bool, str]:
    """Send `GET path` and read the status line: (True, "HTTP 200 from /health") on 2xx."""
    stream.settimeout(timeout)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tunneld-health\r\nConnection: close\r\n\r\n"
    received = b""
    try:
        stream.sendall(request.encode())
        while b"\r\n" not in received and len(received) < STATUS_LINE_MAX_BYTES:
            chunk = stream.recv(STATUS_LINE_MAX_BYTES)
            if not chunk:
                break
            received += chunk
    except TimeoutError:
        return False, f"no answer from {path} within {timeout:g} s"
    except OSError as exc:
        return False, f"{path}: connection failed: {exc.strerror or exc}"
    if not received:
        return False, f"connection refused or closed by {host} before it answered {path}"
    words = received.split(b"\r\n", 1)[0].decode("ascii", "replace").split()
    if len(words) < 2 or not words[0].startswith("HTTP/") or not words[1].isdigit():
        return False, f"{path}: not an HTTP answer"
    code = int(words[1])
    return 200 <= code < 300, f"HTTP {code} from {path}"


def probe_local(address: tuple[str, int] | str, timeout: float, settle: bool, target: str) -> socket.socket:
    """Connect to a forward's local listener; with `settle`, wait briefly for the tunnel to refuse it.

    Through OpenSSH a refused target shows as the connection closing at once: that is a ConnectError.
    """
    try:
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(address)
        else:
            sock = socket.create_connection((name_for_lookup(address[0]), address[1]), timeout=timeout)  # type: ignore[arg-type]
    except OSError as exc:
        raise ConnectError(f"cannot connect to the local end {address}: {exc.strerror or exc}") from exc
    if not settle:
        return sock
    sock.settimeout(TCP_SETTLE_S)
    try:
        data = sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return sock
    except OSError as exc:
        sock.close()
        raise ConnectError(f"connection to {target} failed: {exc.strerror or exc}") from exc
    if not data:
        sock.close()
        raise ConnectError(f"connection refused by {target}")
    return sock


@dataclass(frozen=True)
class LocalProber:
    """Health checks through one local listen address (`127.0.0.1`, `::1` or a socket path) of a forward."""

    address: tuple[str, int] | str

    def open_probe(self, forward: Forward, timeout: float, settle: bool) -> Stream:
        """Connect to the listener; with `settle`, give the tunnel a moment to refuse the connection."""
        return probe_local(self.address, timeout, settle, str(forward.target))


class HealthMonitor:
    """Runs a link's checks: all of them now, then the periodic ones on a thread until stopped."""

    def __init__(self, spec: TunnelSpec, prober: Prober, settings: HostSettings, on_change: Callable[[], None]) -> None:
        self.spec = spec
        self.prober = prober
        self.interval_s = settings.health_interval_s
        self.checks = checks_for(spec, settings)
        self.on_change = on_change
        self._results: dict[str, Health] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_now(self) -> None:
        """Run every check once, concurrently (right after a connect)."""
        if not self.checks:
            return
        with ThreadPoolExecutor(max_workers=min(8, len(self.checks)), thread_name_prefix="health") as pool:
            results = list(pool.map(lambda c: run_check(self.prober, c), self.checks))
        for check, result in zip(self.checks, results, strict=True):
            self._record(check, result)

    def start(self) -> None:
        """Check again every interval: configured forwards always, others while their last check failed."""
        if not self.checks:
            return
        self._thread = threading.Thread(target=self._loop, name="health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the periodic checks (the link is ending); waits for a running check to finish."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(CHECK_TIMEOUT_S + 1)

    def result(self, forward: str) -> Health | None:
        """Return the latest result for the forward named `forward` (its config text)."""
        with self._lock:
            return self._results.get(forward)

    def _loop(self) -> None:
        due = {str(check.forward): time.monotonic() + self._interval(check) for check in self.checks}
        while not self._stop.wait(min(due.values(), default=time.monotonic() + 1) - time.monotonic()):
            for check in self.checks:
                key = str(check.forward)
                if time.monotonic() < due[key] or self._stop.is_set():
                    continue
                if check.configured or not self._ok(key):
                    self._record(check, run_check(self.prober, check))
                due[key] = time.monotonic() + self._interval(check)

    def _interval(self, check: HealthCheck) -> float:
        """Configured checks run every interval; a failing forward is re-checked sooner, so recovery shows."""
        key = str(check.forward)
        return self.interval_s if self._ok(key) else min(self.interval_s, RECHECK_FAILED_S)

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
