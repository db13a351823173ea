"""The Python face: `ensure`, `tunnel`, `status`, `stop`, returning frozen `Tunnel` values.

It calls the same functions as the command line (launch.ensure_host, status.collect, stopping.stop_tunnel),
so a tunnel is the same detached supervisor `tunneld start` runs: no SSH in the caller's process, and the
tunnel outlives it (a notebook kernel's restart). Nothing here loads click or paramiko.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, overload

from tunneld.config.urls import ForwardAddress, forwards_from_state, host_env, pick_forward
from tunneld.errors import ConfigError, NotRunningError
from tunneld.state.status import HostReport, collect, listed_hosts

__all__ = ["ForwardAddress", "Tunnel", "ensure", "status", "stop", "tunnel"]

if TYPE_CHECKING:
    from tunneld.runtime.launch import Ensured

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Tunnel:
    """One host's tunnel as it was when asked: ask again with `status()`.

    `forwards` are where it listens on this machine (empty while nothing listens); `env` is tunneld.toml's
    `[hosts.HOST.env]` rendered for them (empty while it neither listens nor is up).
    """

    host: str
    state: str
    running: bool
    pid: int | None
    forwards: tuple[ForwardAddress, ...] = ()
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    @property
    def up(self) -> bool:
        """True when the tunnel runs and its forwards work (`up`, `degraded` or, on demand, `idle`)."""
        from tunneld.states import READY_STATES

        return self.running and self.state in READY_STATES

    def url(self, port: int | None = None, scheme: str = "http") -> str:
        """Return the URL of the first LocalForward (`http://127.0.0.1:5000`), or of the forward whose local or
        remote port is `port`; raise NotRunningError while the tunnel does not listen."""
        if not self.forwards and not self.up:
            raise NotRunningError(
                f"{self.host} is not listening (state: {self.state})",
                f'bring it up with tunneld.ensure("{self.host}"); `tunneld url {self.host}` shows the configured URL',
            )
        return pick_forward(self.host, self.forwards, port).url(scheme)

    def status(self) -> Tunnel:
        """Return a fresh Tunnel for this host."""
        return status(self.host)

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> bool:
        """Stop this host's tunnel; return False when none was running."""
        return stop(self.host, timeout)


def _tunnel_of(report: HostReport) -> Tunnel:
    forwards = forwards_from_state(report.forwards) if report.running else ()
    env = host_env(report.host, forwards) if forwards or report.is_up else {}
    return Tunnel(report.host, report.state, report.running, report.pid, forwards, MappingProxyType(env))


def ensure(
    host: str,
    *,
    ssh_config: str | None = None,
    engine: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    healthy: bool = True,
) -> Tunnel:
    """Start `host`'s tunnel unless it runs, and wait until it is up (with `healthy`, until the health checks of
    tunneld.toml pass); return it. Raises a TunneldError (`message`, `hint`, `exit_code`) when it cannot.

    Without `ssh_config`, $TUNNELD_SSH_CONFIG, else the file the host was last started with, else ssh's own. A file
    given that does not exist or cannot be read is a ConfigError, also when the tunnel already runs.
    """
    return _tunnel_of(_ensure(host, ssh_config, engine, timeout, healthy).report)


def _ensure(host: str, ssh_config: str | None, engine: str | None, timeout: float, healthy: bool) -> Ensured:
    import os

    from tunneld.config.settings import ENGINES
    from tunneld.runtime.launch import StartOptions, ensure_host
    from tunneld.state.status import ssh_config_for

    if engine is not None and engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    given = ssh_config or os.environ.get("TUNNELD_SSH_CONFIG") or None
    if given is not None:
        _check_readable(given, "ssh_config=" if ssh_config else "TUNNELD_SSH_CONFIG")
    return ensure_host(host, StartOptions(ssh_config_for(host, given), engine or "auto", timeout), healthy)


def _check_readable(path: str, where: str) -> None:
    """A missing or unreadable ssh_config file is an error, as the command line's -F: also for a running tunnel,
    which would otherwise be reused without a word about the file."""
    import os

    if os.path.exists(path) and not os.path.isdir(path) and os.access(path, os.R_OK):
        return  # /dev/null too, as for ssh -F
    why = "is a directory" if os.path.isdir(path) else "is not readable" if os.path.exists(path) else "does not exist"
    raise ConfigError(
        f"the ssh_config file {path} {why}",
        f"check the path given as {where}; without one, ssh's own ~/.ssh/config is read",
    )


@contextlib.contextmanager
def tunnel(
    host: str,
    *,
    ssh_config: str | None = None,
    engine: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    healthy: bool = True,
) -> Iterator[Tunnel]:
    """`ensure(host)` for a `with` block: at its end the tunnel is stopped only if this call started it."""
    ensured = _ensure(host, ssh_config, engine, timeout, healthy)
    try:
        yield _tunnel_of(ensured.report)
    finally:
        if ensured.started and collect(ensured.report.host).pid == ensured.report.pid:
            stop(host)


@overload
def status(host: str) -> Tunnel: ...
@overload
def status(host: None = None) -> list[Tunnel]: ...
def status(host: str | None = None) -> Tunnel | list[Tunnel]:
    """Return `host`'s Tunnel, or (without a host) the Tunnel of every host `tunneld status` lists.

    Reads only tunneld's own files and tunneld.toml: a host that is not running has no forwards here.
    """
    if host is not None:
        from tunneld.state.paths import validate_host

        return _tunnel_of(collect(validate_host(host)))
    return [_tunnel_of(collect(name)) for name in listed_hosts()[0]]


def stop(host: str, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> bool:
    """Stop `host`'s tunnel (SIGTERM, SIGKILL after `timeout`); return False when none was running."""
    from tunneld.runtime.stopping import stop_tunnel
    from tunneld.state.paths import validate_host

    try:
        result = stop_tunnel(validate_host(host), timeout)
    except NotRunningError:
        return False
    return not result.stale
