"""The state machine that keeps one host's link up: connect, hold, notice loss, back off, retry."""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tunneld.config.credentials import Credentials, CredentialWatch, control_socket_alive, host_auth_plan
from tunneld.config.diff import summary
from tunneld.config.keys import named_identity_files, probe_agent
from tunneld.config.ports import PortGuard
from tunneld.config.settings import HostSettings
from tunneld.config.spec import TunnelSpec, default_identity_files
from tunneld.engines.link import ChildProcess, Engine, ForwardStatus, KeepsListeners, Link, LinkEvents, OnDemandEngine
from tunneld.errors import (
    EXIT_OK,
    AuthError,
    ConnectError,
    HandshakeStalledError,
    NeedsAuthError,
    PortInUseError,
    RefusedByServerError,
    TunneldError,
    UnreachableError,
)
from tunneld.runtime.health import Health, HealthMonitor
from tunneld.runtime.probes import ATTEMPT_GRACE_S, Environment, PathWatch, PreauthBudget, Probe, Wakeups, tcp_answers
from tunneld.runtime.reloading import ConfigSource, Reloader
from tunneld.state.paths import HostFiles
from tunneld.state.pidfile import read_json
from tunneld.states import (
    BACKOFF,
    CONNECTING,
    DEGRADED,
    FAILED,
    FORWARD_DEGRADED,
    IDLE,
    LOST,
    NEEDS_AUTH,
    STARTING,
    STOPPED,
    UP,
)

log = logging.getLogger(__name__)


SETTLE_TICK_S = 1.0
HEARTBEAT_S = 5.0
WAIT_TICK_S = 0.25
CREDENTIALS_TICK_S = 0.5
REFUSED_LOGINS_MAX = 2  # a minute: 2 x OpenSSH's authfail:5s stays below its 15 s threshold


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
    logged_in_to: str | None = None  # user@host:port this host has logged in to (kept across runs: needs-auth)
    config: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # what it runs with (configdiff.summary)
    config_changed: tuple[str, ...] = ()  # how the files differ from that, not applied yet (`tunneld reload`)

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
        budget: PreauthBudget | None = None,
        credentials: CredentialWatch | None = None,
        logged_in_to: str | None = None,
        config: ConfigSource | None = None,
        on_settings: Callable[[HostSettings], None] | None = None,
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
        self.budget = budget or PreauthBudget()
        self.credentials = credentials or CredentialWatch(
            spec.identity_agent, master=lambda: control_socket_alive(HostFiles.of(spec.alias).control)
        )
        self._at_last_login: Credentials | None = None
        self._refused: collections.deque[float] = collections.deque()  # when logins were refused (monotonic)
        keepalive = f"{spec.keepalive_interval_s}s x {spec.keepalive_count_max}"
        now = time.time()
        # A login that worked for this very target before (this run, or a run recorded in the state file) turns a
        # later refusal into `needs-auth` instead of a fatal error.
        known = logged_in_to if logged_in_to == self._login_target() else None
        self.status = TunnelStatus(
            spec.alias, engine.name, STARTING, now, now, keepalive=keepalive, ssh_config=spec.ssh_config,
            logged_in_to=known, config=summary(spec, self.settings),
        )  # fmt: skip
        self.reloader = Reloader(config, spec, self.settings) if config is not None else None
        self.on_settings = on_settings
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
        self._set(state=LOST, last_error=_error_record(lost), forwards=(), children=())
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

    def _progress(self, text: str) -> None:
        log.info("%s: %s", self.spec.alias, text)
        self.reporter.progress(text)

    def _fail(self, error: TunneldError) -> int:
        log.error("%s: %s", self.spec.alias, error.message)
        if error.hint:
            log.error("%s: hint: %s", self.spec.alias, error.hint)
        self._set(state=FAILED, last_error=_error_record(error), forwards=(), children=())
        return error.exit_code

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

    def _reload(self, link_up: bool) -> bool:
        """`tunneld reload` (SIGHUP): apply the configuration on disk; True when the link must be replaced for it."""
        self.wakeups.reload.clear()
        if self.reloader is None:
            return False
        reloaded = self.reloader.reload(self.spec, self.settings, self.engine, link_up)
        if reloaded.settings != self.settings and self.on_settings is not None:
            self.on_settings(reloaded.settings)
        self.spec, self.settings = reloaded.spec, reloaded.settings
        self._set(
            config=summary(self.spec, self.settings), config_changed=reloaded.pending, ssh_config=self.spec.ssh_config
        )
        return reloaded.reconnect

    def _look_at_config(self) -> None:
        """Publish how the files on disk differ from what runs, once they changed (cheap: modification times)."""
        news = self.reloader.poll() if self.reloader is not None else None
        if news is not None and news != self.status.config_changed:
            if news:
                log.info("%s: the configuration on disk differs from the running one: %s (tunneld reload %s applies "
                         "it)", self.spec.alias, "; ".join(news), self.spec.alias)  # fmt: skip
            self._set(config_changed=news)

    def _login_target(self) -> str:
        return f"{self.spec.user}@{self.spec.hostname}:{self.spec.port}"

    def _note_login(self) -> None:
        """The server accepted the login: a later refusal waits for credentials (needs-auth) instead of failing."""
        self._at_last_login = self.credentials.look()
        if self.status.logged_in_to != self._login_target():
            self._set(logged_in_to=self._login_target())

    def _after_failed_attempt(self, error: TunneldError, first_try: bool, had_link: bool) -> int | None:
        """Record a failed attempt; return the exit code when it is fatal, else wait out the backoff and None."""
        if isinstance(error, AuthError) and self.status.logged_in_to and not (first_try and self.fail_fast):
            self._await_credentials(error)
            return None
        self._set(attempts=self.status.attempts + 1, last_error=_error_record(error))
        # A port taken while the link was down may be freed again: only at the very start is it fatal.
        retryable = error.retryable or (isinstance(error, PortInUseError) and had_link)
        if not retryable or (first_try and self.fail_fast):
            return self._fail(error)
        log.warning("%s: %s", self.spec.alias, error.message)
        if not self._unwanted():  # else nobody waits for this link any more: idle until the next client
            self._pause(error)
        return None

    def _await_credentials(self, error: AuthError) -> None:
        """needs-auth: the login worked before and is refused now. Wait until the credentials may have changed
        (the agent's identities, the login connection), SIGUSR1 or a stop; never retry on a timer against the
        server. The ports stay ours where the engine keeps listeners, and their clients are refused at once."""
        now = self.credentials.look()
        if isinstance(error, NeedsAuthError):  # the login connection ended: nothing was tried, look from here
            self.credentials.last = now
            needs = error
        else:
            self._refused.append(time.monotonic())
            reason = self._why_refused(error, now)
            named = tuple(p for p in named_identity_files(self.spec) if p not in default_identity_files())
            needs = NeedsAuthError.waiting(self.spec.alias, reason, error.interactive, error.locked, named)
        holder = self.engine if isinstance(self.engine, KeepsListeners) else None
        forwards = tuple(holder.listening()) if holder is not None else ()
        self._set(state=NEEDS_AUTH, last_error=_error_record(needs), forwards=forwards, children=(), next_try_at=None)
        log.warning("%s: %s (%s)", self.spec.alias, needs.message, error.message)
        log.warning("%s: hint: %s", self.spec.alias, needs.hint)
        guard = PortGuard(self.spec) if holder is None else None  # ssh's listeners are gone: keep the ports ours
        if holder is not None:
            holder.refuse_clients(True)
        try:
            why = self._credentials_changed()
            if why is not None:
                self._within_refusal_limit()
                log.info("%s: %s: trying to log in once", self.spec.alias, why)
        finally:
            if holder is not None:
                holder.refuse_clients(False)
            if guard is not None:
                guard.release()

    def _credentials_changed(self) -> str | None:
        """Wait for a reason to try logging in again (None: a stop came first)."""
        while not self.wakeups.stop.is_set():
            if self.wakeups.wake.wait(CREDENTIALS_TICK_S):
                self.wakeups.wake.clear()
            if self.wakeups.retry_now.is_set():
                self.wakeups.retry_now.clear()
                self._adopt_agent()
                return "retry requested"
            if self.wakeups.reload.is_set():
                self._reload(link_up=False)
                return "configuration reloaded"
            self._look_at_config()
            changed = self.credentials.changed()
            if changed:
                return changed
        return None

    def _adopt_agent(self) -> None:
        """Use the agent `tunneld start` handed over (the user started a new one: SSH_AUTH_SOCK changed), when the host
        takes its agent from SSH_AUTH_SOCK and that socket is an agent of this user's."""
        files = HostFiles.of(self.spec.alias)
        try:
            handed = read_json(files.agent, self.spec.alias) or {}
        except TunneldError:
            handed = {}
        files.agent.unlink(missing_ok=True)
        path = handed.get("ssh_auth_sock")
        if not isinstance(path, str) or self.spec.identity_agent not in (None, "SSH_AUTH_SOCK"):
            return
        if path != os.environ.get("SSH_AUTH_SOCK") and probe_agent(path).reachable:
            os.environ["SSH_AUTH_SOCK"] = path  # the ssh children and paramiko's agent client read it from here
            log.info("%s: using the ssh-agent at %s from now on (handed over by tunneld start)", self.spec.alias, path)

    def _within_refusal_limit(self) -> None:
        """At most REFUSED_LOGINS_MAX refused logins per minute: OpenSSH 9.8+ adds 5 s of penalty for each
        (`authfail:5s`) and blocks the address past 15 s, whatever asked for the attempt (SIGUSR1 included)."""
        window = self.backoff.refused_logins_window_s
        while not self.wakeups.stop.is_set():
            now = time.monotonic()
            while self._refused and self._refused[0] <= now - window:
                self._refused.popleft()
            if len(self._refused) < REFUSED_LOGINS_MAX:
                return
            wait = self._refused[0] + window - now
            log.warning("%s: %d logins were refused in the last %.0f s: the next try waits %.0f s (OpenSSH 9.8+ "
                        "blocks an address after 3)", self.spec.alias, len(self._refused), window, wait)  # fmt: skip
            self._set(next_try_at=time.time() + wait)
            self.wakeups.stop.wait(wait)

    def _why_refused(self, error: AuthError, now: Credentials) -> str:
        """Say what is missing, from the agent's point of view (a key that needs a passphrase wins)."""
        target = self._login_target()
        if "needs a passphrase" in error.message:
            return error.message.split(": ", 1)[-1]
        before = self._at_last_login
        had = len(before.agent) if before is not None and before.agent else 0
        if now.agent is None:
            return f"no ssh-agent answers for {target} (SSH_AUTH_SOCK unset, or the agent is gone)"
        if not now.agent:
            gone = f"it held {had} at the last login: expired, removed or locked" if had else "emptied or locked"
            return f"the agent has no key for {target} ({gone})"
        if before is not None and before.agent and set(before.agent) - set(now.agent):
            return f"a key the agent held at the last login to {target} is gone (expired, removed or locked)"
        return f"{target} refused the agent's {len(now.agent)} key(s)"

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
            if self.wakeups.reload.is_set():
                self._reload(link_up=False)
            self._look_at_config()
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

    def _pause(self, error: TunneldError | None = None) -> None:
        """Wait out one backoff step; end early on stop, on 'retry now', a machine change, or the path's return.

        The path is probed only after an attempt that could not reach it (UnreachableError): a server that
        answers TCP is never probed, its failures wait out the backoff alone. A server that closed the
        connection before its banner (RefusedByServerError) is refusing this address for now: at least
        `refused_s`. After a stalled handshake (the port accepted TCP, no banner or handshake followed: a
        frozen or overloaded server) the next attempt starts at once: one attempt at a time stays pending, so
        a server that resumes is used the moment it answers; each lasts ConnectTimeout and the budget bounds them.
        """
        if isinstance(error, HandshakeStalledError):
            self.backoff = self.backoff.next()
            log.info("%s: the server accepted TCP but the handshake stalled: trying again now", self.spec.alias)
            return
        delay = self.backoff.delay(self.rng)
        if isinstance(error, RefusedByServerError):
            delay = max(delay, self.backoff.refused_s)
        self.backoff = self.backoff.next()
        if delay <= 0:
            log.info("%s: retrying now", self.spec.alias)
            return
        log.info("%s: retrying in %.1f s", self.spec.alias, delay)
        self._set(state=BACKOFF, next_try_at=time.time() + delay)
        reason = self._wait(delay, probing=isinstance(error, UnreachableError))
        if reason:
            log.info("%s: %s: retrying now", self.spec.alias, reason)

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
