"""What every part of a host's supervision shares: the spec and settings it runs with, the status it publishes,
the wakeups that interrupt its waits, the reload of its configuration, and the ticks of its loops.

The supervisor (runtime.supervisor) is this plus three concerns in their own modules: waiting between attempts
(runtime.waiting), waiting for credentials (runtime.needsauth) and the on-demand path (runtime.ondemand).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
import time
from collections.abc import Callable

from tunneld.config.credentials import Credentials, CredentialWatch, control_socket_alive
from tunneld.config.diff import summary
from tunneld.config.settings import HostSettings
from tunneld.config.spec import TunnelSpec
from tunneld.engines.link import Engine, OnDemandEngine
from tunneld.errors import TunneldError
from tunneld.runtime.backoff import Backoff
from tunneld.runtime.probes import Environment, PreauthBudget, Probe, Wakeups, tcp_answers
from tunneld.runtime.reloading import ConfigSource, Reloader
from tunneld.runtime.tunnelstatus import Reporter, TunnelStatus, error_record
from tunneld.state.paths import HostFiles
from tunneld.states import FAILED, STARTING

log = logging.getLogger("tunneld.runtime.supervisor")

SETTLE_TICK_S = 1.0
HEARTBEAT_S = 5.0
WAIT_TICK_S = 0.25


class Supervision:
    """The state of one host's supervision and the steps every concern of it takes (publish, fail, reload)."""

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
        self._bare_refusal = False  # the last attempt was closed or reset before the banner, without a word
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

    def _progress(self, text: str) -> None:
        log.info("%s: %s", self.spec.alias, text)
        self.reporter.progress(text)

    def _fail(self, error: TunneldError) -> int:
        log.error("%s: %s", self.spec.alias, error.message)
        if error.hint:
            log.error("%s: hint: %s", self.spec.alias, error.hint)
        self._set(state=FAILED, last_error=error_record(error), forwards=(), children=())
        return error.exit_code

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
        self._bare_refusal = False
        if self.status.logged_in_to != self._login_target():
            self._set(logged_in_to=self._login_target())
