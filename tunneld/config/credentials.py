"""What credentials a host can use right now, asked of the agent, never of the server.

A host whose login was refused after it had worked waits in `needs-auth` until its credentials may
have changed: the agent's list of identities changed (keys added, removed, expired, the agent locked
or unlocked, started or gone), or the interactive login connection of `tunneld login` appeared. The
agent is asked every few seconds over its socket (SSH_AGENTC_REQUEST_IDENTITIES); the server sees one
authentication attempt per change at most (OpenSSH 9.8+ penalises failed logins too: `authfail`).
"""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunneld.config.keys import needs_passphrase, peer_credentials, probe_agent, public_blobs
from tunneld.config.spec import TunnelSpec

AGENT_CHECK_S = 2.0
AGENT_TIMEOUT_S = 1.0


def agent_socket(identity_agent: str | None) -> str | None:
    """Return the agent socket ssh would use: IdentityAgent from ssh_config, else SSH_AUTH_SOCK (None: no agent)."""
    if identity_agent is not None and identity_agent.lower() == "none":
        return None
    if identity_agent in (None, "SSH_AUTH_SOCK"):
        return os.environ.get("SSH_AUTH_SOCK") or None
    if identity_agent.startswith("$"):
        return os.environ.get(identity_agent[1:]) or None
    return os.path.expanduser(identity_agent)


def agent_identities(path: str | None) -> tuple[bytes, ...] | None:
    """Return the public key blobs the agent at `path` offers (empty when it holds none or is locked), or None
    when no agent answers there."""
    if not path:
        return None
    probe = probe_agent(path, timeout=AGENT_TIMEOUT_S)
    return probe.blobs if probe.reachable else None


@dataclass(frozen=True)
class Credentials:
    """One look at what a host could log in with: the agent's identities (None: no agent answers) and whether
    the interactive login connection (`tunneld login`) is there."""

    agent: tuple[bytes, ...] | None
    master: bool = False

    def could_log_in_where(self, before: Credentials) -> str | None:
        """Return why a login may work now that did not with `before` (None: nothing that could help came): the
        login connection appeared, or the agent offers a key it did not offer then. Keys removed, an agent that
        went away or answers in another order change nothing a server would accept: no reason to try."""
        if self.master and not before.master:
            return "the interactive login connection is there"
        if self.agent is None:
            return None
        added = set(self.agent) - set(before.agent or ())
        if not added:
            return None
        if before.agent is None:
            return f"an agent answers now, with {len(self.agent)} key(s)"
        return f"the agent offers {len(added)} key(s) it did not offer at the last attempt"


class CredentialWatch:
    """Tells when a host's credentials may have changed: asks the agent at most every AGENT_CHECK_S."""

    def __init__(
        self,
        identity_agent: str | None,
        master: Callable[[], bool] = lambda: False,
        every_s: float = AGENT_CHECK_S,
        monotonic: Callable[[], float] = time.monotonic,
        identities: Callable[[str | None], tuple[bytes, ...] | None] = agent_identities,
    ) -> None:
        self.identity_agent = identity_agent
        self.master = master
        self.every_s = every_s
        self.monotonic = monotonic
        self.identities = identities
        self.last = self.look()
        self._checked = monotonic()

    def look(self) -> Credentials:
        """Ask the agent (and look for the login connection) now."""
        return Credentials(self.identities(agent_socket(self.identity_agent)), self.master())

    def changed(self) -> str | None:
        """Return why a login may work now that did not with `self.last` (the look taken before the refused
        attempt), or None; asks at most every `every_s`."""
        now = self.monotonic()
        if now - self._checked < self.every_s:
            return None
        self._checked = now
        current = self.look()
        why = current.could_log_in_where(self.last)
        if why is not None:
            self.last = current
        return why


def control_socket_alive(path: Path) -> bool:
    """Return True when this user's ssh master listens at `path` (`tunneld login`'s control socket).

    Nobody else may have made it or serve it: the directory is the user's own (0700, not a link), the socket
    file is the user's, and the process that accepts the connection runs as the user. Another local user who
    pre-creates a socket there (say in /tmp) would otherwise pose as the login connection.
    """
    return control_socket_peer(path) is not None


def control_socket_peer(path: Path) -> int | None:
    """Return the pid serving this user's control socket at `path` (0 where the system does not tell), or None
    when there is none, or it is not trustworthy (see control_socket_alive)."""
    uid = os.getuid()
    try:
        folder, entry = os.lstat(path.parent), os.lstat(path)
    except OSError:
        return None
    if (stat.S_ISLNK(folder.st_mode) or folder.st_uid != uid or folder.st_mode & 0o077
            or not stat.S_ISSOCK(entry.st_mode) or entry.st_uid != uid):  # fmt: skip
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(AGENT_TIMEOUT_S)
            sock.connect(str(path))
            credentials = peer_credentials(sock)
    except OSError:
        return None
    if credentials is None:
        return 0
    pid, peer = credentials
    return pid if peer == uid else None


@dataclass(frozen=True)
class AuthPlan:
    """Which authentication a host will need, as far as ssh_config, the key files and the agent tell."""

    summary: str
    needs: str  # "keys", "passphrase" (a key ssh-add must load first), "interactive" (tunneld login), "nothing"

    def to_dict(self) -> dict[str, object]:
        """Return the plan as JSON-ready data (`show --json`)."""
        return {"summary": self.summary, "needs": self.needs}


def _shown(path: str) -> str:
    home = os.path.expanduser("~")
    return "~" + path[len(home) :] if path.startswith(home + os.sep) else path


def auth_plan(
    alias: str,
    identity_files: tuple[str, ...],
    identities_only: bool,
    identity_agent: str | None,
    option: Callable[[str, str], str],
    master: bool = False,
) -> AuthPlan:
    """Say which authentication `alias` will need: keys from the agent or from files, a passphrase to load
    first, or an interactive login (`tunneld login`). `option` reads ssh -G's values (lower-case keys)."""
    if master:
        return AuthPlan("logged in interactively: the connection of `tunneld login` carries the forwards", "nothing")
    interactive_ok = any(
        option(key, "yes").lower() in ("yes", "true")
        for key in ("passwordauthentication", "kbdinteractiveauthentication")
    )
    login = f"; a password or one-time code only through `tunneld login {alias}`" if interactive_ok else ""
    if option("pubkeyauthentication", "yes").lower() in ("no", "false"):
        return AuthPlan(f"interactive only (PubkeyAuthentication no): run `tunneld login {alias}`", "interactive")
    agent = agent_identities(agent_socket(identity_agent))
    if agent and identities_only:
        wanted = {blob for path in identity_files for blob in public_blobs(path)}
        agent = tuple(blob for blob in agent if blob in wanted)
    files = [path for path in identity_files if os.path.isfile(path)]
    locked = [path for path in files if needs_passphrase(path)]
    usable = [path for path in files if path not in locked and needs_passphrase(path) is False]
    parts = []
    if agent:
        parts.append(f"the agent ({len(agent)} key{'s' if len(agent) != 1 else ''})")
    parts += [_shown(path) for path in usable]
    parts += [f"{_shown(path)} (needs a passphrase: `ssh-add {_shown(path)}` loads it)" for path in locked]
    if agent or usable:
        return AuthPlan("keys: " + ", ".join(parts) + login, "keys")
    if locked:
        return AuthPlan("keys that need a passphrase: " + ", ".join(parts) + login, "passphrase")
    where = "no ssh-agent answers" if agent is None else "the agent holds no key"
    if interactive_ok:
        return AuthPlan(f"no key ({where}, no IdentityFile exists): run `tunneld login {alias}`", "interactive")
    return AuthPlan(f"no key ({where}, no IdentityFile exists): the server will refuse the login", "keys")


def host_auth_plan(spec: TunnelSpec) -> AuthPlan:
    """Which authentication `spec`'s host will need, as far as ssh_config, the key files and the agent tell (and
    whether the interactive login connection of `tunneld login` is there)."""
    from tunneld.state.paths import HostFiles

    return auth_plan(spec.alias, spec.identity_files, spec.identities_only, spec.identity_agent, spec.option,
                     master=control_socket_alive(HostFiles.of(spec.alias).control))  # fmt: skip
