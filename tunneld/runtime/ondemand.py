"""On demand: after the first link proved host key and login, the host idles (listening, no link) until a client
connects, and its link closes again after idle_timeout_s without an open connection."""

from __future__ import annotations

from tunneld.engines.link import Link, OnDemandEngine
from tunneld.runtime.supervision import HEARTBEAT_S, Supervision, log
from tunneld.states import IDLE


class OnDemand(Supervision):
    """The supervisor's on-demand path."""

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
