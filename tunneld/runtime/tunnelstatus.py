"""What a supervisor publishes: one snapshot of its tunnel (the state file's content), and to whom."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Protocol

from tunneld.engines.link import ChildProcess, ForwardStatus
from tunneld.errors import TunneldError
from tunneld.runtime.health import Health
from tunneld.states import FORWARD_DEGRADED


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


def with_health(forward: ForwardStatus, health: Health | None) -> ForwardStatus:
    """Attach the forward's latest health check; a failing one makes the forward degraded."""
    if health is None:
        return forward
    forward = dataclasses.replace(forward, health=health.to_dict())
    if not health.ok and forward.state != FORWARD_DEGRADED:
        forward = dataclasses.replace(forward, state=FORWARD_DEGRADED, detail=health.detail)
    return forward


def error_record(error: TunneldError) -> dict[str, object]:
    """Return the error as the state file records it: its fields and when it happened."""
    record = error.to_dict()
    record["at"] = time.time()
    return record
