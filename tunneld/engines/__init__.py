"""The Engine/Link seam: an engine turns a TunnelSpec into a live Link; the supervisor drives it.

Nothing above this package imports paramiko or knows an ssh argv.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from tunneld.config import ssh_binary
from tunneld.errors import ConfigError, TunneldError
from tunneld.health import Stream
from tunneld.settings import ENGINES, HostSettings, host_settings
from tunneld.spec import Forward, TunnelSpec
from tunneld.states import FORWARD_OK

ENGINE_CHOICES = ENGINES

ProgressCallback = Callable[[str], None]


@dataclass(frozen=True)
class ForwardStatus:
    """What an engine knows about one forward right now."""

    forward: str
    listen: tuple[str, ...]
    target: str
    state: str = FORWARD_OK
    detail: str | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None
    open_connections: int | None = None
    total_connections: int | None = None
    exposed: bool = False
    health: dict[str, object] | None = None

    def to_dict(self) -> dict[str, object]:
        """Return the status as JSON-ready data (the state file)."""
        return {
            "forward": self.forward,
            "listen": list(self.listen),
            "target": self.target,
            "state": self.state,
            "detail": self.detail,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "open_connections": self.open_connections,
            "total_connections": self.total_connections,
            "exposed": self.exposed,
            "health": self.health,
        }


@dataclass(frozen=True)
class LinkLost:
    """Why a link ended: the error, which says whether retrying can help."""

    error: TunneldError

    @property
    def retryable(self) -> bool:
        return self.error.retryable


@dataclass(frozen=True)
class ChildProcess:
    """A helper process a link runs (e.g. the ssh client), recorded so it is never orphaned."""

    pid: int
    create_time: float
    name: str = field(default="ssh")
    cmdline: tuple[str, ...] = ()  # what it ran: a later tunneld signals it only if this still matches


@dataclass(frozen=True)
class LinkEvents:
    """How an engine hears `stop`, and tells the supervisor to look again (link ended, a forward changed).

    An attempt also reports how far it got: `tcp_up` once TCP to the first hop is connected (the path
    works: probing it is pointless from then on), `first_hop_authenticated` once the first hop (the server,
    or the first ProxyJump host) accepted the login (the connection tunneld opened did not end before
    authentication, whatever happens behind it), `authenticated` once the server itself accepted it.
    """

    stop: threading.Event
    changed: threading.Event
    tcp_up: threading.Event = field(default_factory=threading.Event)
    first_hop_authenticated: threading.Event = field(default_factory=threading.Event)
    authenticated: threading.Event = field(default_factory=threading.Event)


class Link(Protocol):
    """One live SSH connection with its forwards up."""

    def wait(self, timeout: float) -> LinkLost | None:
        """Block up to `timeout` seconds; return why the link ended, or None if it is still up."""

    def settling(self) -> bool:
        """Return True while a forward's state may still change with time alone (poll again soon)."""

    def close(self) -> None:
        """Tear the link down and release every listener; safe to call twice."""

    def stats(self) -> list[ForwardStatus]:
        """Return the state of each forward."""

    def children(self) -> list[ChildProcess]:
        """Return helper processes the link runs (empty for in-process engines)."""

    def open_probe(self, forward: Forward, timeout: float, settle: bool) -> Stream:
        """Return a connection to `forward`'s target through this link (health checks); ConnectError if none."""


@runtime_checkable
class OnDemandEngine(Protocol):
    """An engine whose listeners outlive its links: it can sit idle and connect when a client arrives."""

    def wanted(self) -> bool:
        """Return True when a client asked for a link (or waits for one)."""

    def busy(self) -> bool:
        """Return True while a connection is open, being opened, or waiting."""

    def listening(self) -> list[ForwardStatus]:
        """Return the forwards while no link is attached (listeners and counters)."""


@runtime_checkable
class KeepsListeners(Protocol):
    """An engine whose listeners stay bound between links: while the host waits for credentials it keeps the
    ports (no other local user can take them) and refuses clients at once instead of letting them hang."""

    def listening(self) -> list[ForwardStatus]:
        """Return the forwards while no link is attached (listeners and counters)."""

    def refuse_clients(self, refusing: bool) -> None:
        """Close new (and waiting) connections at once while `refusing`; hold them for the next link otherwise."""


@runtime_checkable
class ChangesInPlace(Protocol):
    """An engine that takes a changed configuration without a new link (`tunneld reload`)."""

    def change_forwards(self, spec: TunnelSpec) -> None:
        """Listen for `spec`'s local forwards: bind new ones, close removed ones, keep the rest and their
        connections; a TunneldError (a new port taken) changes nothing."""

    def change_settings(self, settings: HostSettings) -> None:
        """Apply tunneld.toml's settings that concern the engine (how long connections wait for a link)."""


class Engine(Protocol):
    """Turns a TunnelSpec into a Link."""

    name: str

    def close(self) -> None:
        """Release what the engine keeps across links (the paramiko engine's listeners)."""

    def connect(self, spec: TunnelSpec, progress: ProgressCallback, events: LinkEvents) -> Link:
        """Bring the link up and return once every local forward listens; raise a TunneldError otherwise.

        Give up with a ConnectError when `events.stop` is set; set `events.changed` whenever the
        link ends or a forward's state changes, so the supervisor need not poll.
        """


def paramiko_available() -> bool:
    """Return True when the paramiko engine can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("paramiko") is not None


def select_engine_name(requested: str, host: str | None = None, settings: HostSettings | None = None) -> str:
    """Return the engine `requested` resolves to: --engine, else the host's settings, else auto.

    auto is openssh where an `ssh` binary exists and paramiko where it does not, and paramiko for an
    on-demand host. `settings`: the host's, when the caller has read them already.
    """
    if requested not in ENGINE_CHOICES:
        raise ConfigError(f"unknown engine {requested!r}", f"choose one of: {', '.join(ENGINE_CHOICES)}")
    if settings is None and host is not None:
        settings = host_settings(host)
    on_demand = settings is not None and settings.on_demand
    if requested == "auto" and settings is not None:
        requested = settings.engine
    if on_demand and requested == "auto":
        requested = "paramiko"  # only it can listen without a link (docs/engines.md, on demand)
    if on_demand and requested == "openssh":
        raise ConfigError(
            f"{host}: on_demand = true needs the paramiko engine: ssh -N cannot adopt listeners that wait for a client",
            f'use --engine paramiko or engine = "auto" for {host} in tunneld.toml, or set on_demand = false',
        )
    if requested == "auto":
        requested = "openssh" if ssh_binary() is not None else "paramiko"
    if requested == "openssh" and ssh_binary() is None:
        raise ConfigError(
            "the openssh engine needs the OpenSSH client ('ssh'), which is not on PATH",
            "install openssh-client, or use --engine paramiko",
        )
    if requested == "paramiko" and not paramiko_available():
        raise ConfigError("the paramiko engine needs paramiko", "install it: python -m pip install paramiko")
    return requested


def make_engine(requested: str, host: str | None = None, settings: HostSettings | None = None) -> Engine:
    """Return an engine instance (its module is imported only now, so `status` never loads paramiko)."""
    if settings is None and host is not None:
        settings = host_settings(host)
    name = select_engine_name(requested, host, settings)
    if name == "paramiko":
        from tunneld.engines.paramiko import ParamikoEngine

        return ParamikoEngine(hold_s=(settings or HostSettings()).hold_connections_s)
    from tunneld.engines.openssh import OpenSshEngine

    return OpenSshEngine()
