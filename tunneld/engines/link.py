"""The Engine/Link seam: what an engine hands the supervisor (a Link), and what the supervisor asks of it.

Nothing above engines/ imports paramiko or knows an ssh argv; they see only these types.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from tunneld.config.settings import HostSettings
from tunneld.config.spec import Forward, TunnelSpec
from tunneld.engines.streams import Stream
from tunneld.errors import TunneldError
from tunneld.states import FORWARD_OK

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
