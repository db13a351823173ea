"""needs-auth: a login that worked before is refused now. The supervisor waits for the credentials to change (the
agent's keys, the login connection of `tunneld login`), SIGUSR1 or a stop, and never retries on a timer."""

from __future__ import annotations

import os
import time

from tunneld.config.credentials import Credentials
from tunneld.config.keys import named_identity_files, probe_agent
from tunneld.config.ports import PortGuard
from tunneld.config.spec import default_identity_files
from tunneld.engines.link import KeepsListeners
from tunneld.errors import AuthError, NeedsAuthError, TunneldError
from tunneld.runtime.supervision import Supervision, log
from tunneld.runtime.tunnelstatus import error_record
from tunneld.state.paths import HostFiles
from tunneld.state.pidfile import read_json
from tunneld.states import NEEDS_AUTH

CREDENTIALS_TICK_S = 0.5
REFUSED_LOGINS_MAX = 2  # a minute: 2 x OpenSSH's authfail:5s stays below its 15 s threshold


class AwaitingCredentials(Supervision):
    """The supervisor in needs-auth."""

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
            needs = NeedsAuthError.waiting(self.spec.alias, reason, error.interactive, error.locked, named,
                                           server_side=self._key_files_refused(now))  # fmt: skip
        holder = self.engine if isinstance(self.engine, KeepsListeners) else None
        # The ports are ours before needs-auth is published: whoever reads the state may rely on it at once.
        guard = PortGuard(self.spec) if holder is None else None  # ssh's listeners are gone: keep the ports ours
        if holder is not None:
            holder.refuse_clients(True)
        try:
            forwards = tuple(holder.listening()) if holder is not None else ()
            self._set(
                state=NEEDS_AUTH, last_error=error_record(needs), forwards=forwards, children=(), next_try_at=None
            )
            log.warning("%s: %s (%s)", self.spec.alias, needs.message, error.message)
            log.warning("%s: hint: %s", self.spec.alias, needs.hint)
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

    def _key_files_refused(self, now: Credentials) -> bool:
        """The last login of this run used a key file (the agent offered nothing then, and offers nothing more now):
        nothing changed on this side, the server no longer takes that key (authorized_keys edited)."""
        before = self._at_last_login
        return before is not None and not before.agent and not now.agent

    def _why_refused(self, error: AuthError, now: Credentials) -> str:
        """Say what is missing, from the agent's point of view (a key that needs a passphrase wins)."""
        target = self._login_target()
        if "needs a passphrase" in error.message:
            return error.message.split(": ", 1)[-1]
        before = self._at_last_login
        had = len(before.agent) if before is not None and before.agent else 0
        if self._key_files_refused(now):
            named = named_identity_files(self.spec)
            files = ", ".join(named) if named else "your key files"
            return f"{target} refused the key that logged in before, from a file ({files}), not the agent"
        if now.agent is None:
            return f"no ssh-agent answers for {target} (SSH_AUTH_SOCK unset, or the agent is gone)"
        if not now.agent:
            gone = f"it held {had} at the last login: expired, removed or locked" if had else "emptied or locked"
            return f"the agent has no key for {target} ({gone})"
        if before is not None and before.agent and set(before.agent) - set(now.agent):
            return f"a key the agent held at the last login to {target} is gone (expired, removed or locked)"
        return f"{target} refused the agent's {len(now.agent)} key(s)"
