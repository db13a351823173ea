"""A running tunnel's configuration: read again on `tunneld reload` (SIGHUP), and watched for edits that have
not reached it yet (`status` shows them, `start` of the running host names them).

The files a host's configuration comes from (its ssh_config with every Include, and tunneld.toml) are looked
at every few seconds by their modification times only; when one changed, the host is resolved again (one
`ssh -G`) and compared with what runs, so an edit that changes nothing is not reported.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tunneld.config.diff import FORWARD_KEYS, Summary, differences, kind_of_change, summary
from tunneld.config.settings import HostSettings
from tunneld.config.spec import TunnelSpec
from tunneld.engines.link import ChangesInPlace, Engine
from tunneld.errors import TunneldError

log = logging.getLogger(__name__)

DRIFT_CHECK_S = 5.0


class ConfigSource(Protocol):
    """Where a host's configuration comes from."""

    def load(self) -> tuple[TunnelSpec, HostSettings]:
        """Resolve the host again (a TunneldError when the files cannot be used as they are now)."""

    def files(self) -> list[Path]:
        """The files whose modification says the configuration may have changed."""


class FileConfig:
    """The host's ssh_config (as `ssh -G` resolves it) and its tunneld.toml section, from the files on disk."""

    def __init__(self, alias: str, ssh_config: str | None) -> None:
        self.alias = alias
        self.ssh_config = ssh_config

    def load(self) -> tuple[TunnelSpec, HostSettings]:
        from tunneld.config.resolve import resolve_host
        from tunneld.config.settings import host_settings

        return resolve_host(self.alias, self.ssh_config), host_settings(self.alias)

    def files(self) -> list[Path]:
        from tunneld.config.resolve import config_files
        from tunneld.state.paths import settings_path

        return [*config_files(self.ssh_config), settings_path()]


def _mtimes(paths: list[Path]) -> tuple[tuple[str, float], ...]:
    stamps = []
    for path in paths:
        try:
            stamps.append((str(path), os.stat(path).st_mtime))
        except OSError:
            stamps.append((str(path), -1.0))  # gone (or not there yet): its coming back is a change too
    return tuple(stamps)


class ConfigWatch:
    """Tells when the configuration on disk differs from what runs: cheap looks (modification times) every
    `every_s`, and a resolution only when a file changed."""

    def __init__(
        self, source: ConfigSource, running: Summary, every_s: float = DRIFT_CHECK_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.source = source
        self.running = running
        self.every_s = every_s
        self.monotonic = monotonic
        self._stamps = self._look()
        self._checked = monotonic()

    def _look(self) -> tuple[tuple[str, float], ...]:
        try:
            return _mtimes(self.source.files())
        except (TunneldError, OSError):
            return ()

    def poll(self) -> tuple[str, ...] | None:
        """Return the differences between the files and what runs when the files changed since the last look
        (an empty tuple: they changed, but to the same configuration), None when there is nothing new."""
        now = self.monotonic()
        if now - self._checked < self.every_s:
            return None
        self._checked = now
        stamps = self._look()
        if stamps == self._stamps:
            return None
        self._stamps = stamps
        try:
            spec, settings = self.source.load()
        except TunneldError as error:
            return (f"the edited configuration cannot be used: {error.message}",)
        return tuple(differences(self.running, summary(spec, settings)))

    def applied(self, running: Summary) -> None:
        """The tunnel runs with `running` now (after a reload): compare with that from here on."""
        self.running = running
        self._stamps = self._look()


@dataclass(frozen=True)
class Reloaded:
    """What a reload made of the running tunnel: the configuration it runs with now, what changed, whether the
    link must be replaced to apply it, and what could not be applied (shown as still pending)."""

    spec: TunnelSpec
    settings: HostSettings
    changes: tuple[str, ...] = ()
    reconnect: bool = False
    pending: tuple[str, ...] = ()


class Reloader:
    """Reads a host's configuration again and applies it: tunneld.toml's settings in place, forwards in place where
    the engine keeps its listeners (paramiko), anything that concerns the connection with a new link."""

    def __init__(self, source: ConfigSource, spec: TunnelSpec, settings: HostSettings) -> None:
        self.source = source
        self.watch = ConfigWatch(source, summary(spec, settings))

    def poll(self) -> tuple[str, ...] | None:
        """The differences the files show now, when they changed since the last look (see ConfigWatch)."""
        return self.watch.poll()

    def reload(self, spec: TunnelSpec, settings: HostSettings, engine: Engine, link_up: bool) -> Reloaded:
        """Apply the files' configuration to a tunnel that runs `spec` and `settings` with `engine`."""
        try:
            new_spec, new_settings = self.source.load()
        except TunneldError as error:
            return self._not_applied(spec, settings, error, "the configuration cannot be used, keeping the running one")
        running, now = summary(spec, settings), summary(new_spec, new_settings)
        changes, kind = tuple(differences(running, now)), kind_of_change(running, now)
        if kind == "none":
            log.info("%s: reload: nothing changed", spec.alias)
            self.watch.applied(running)
            return Reloaded(spec, settings)
        if kind == "restart":
            log.warning("%s: reload: %s: the engine changes only at a restart (tunneld restart %s)", spec.alias,
                        "; ".join(changes), spec.alias)  # fmt: skip
            return Reloaded(spec, settings, pending=(*changes, f"applies at a restart: tunneld restart {spec.alias}"))
        changer = engine if isinstance(engine, ChangesInPlace) else None
        forwards_changed = any(running.get(key) != now.get(key) for key in FORWARD_KEYS)
        if changer is not None:
            changer.change_settings(new_settings)
            if forwards_changed:
                try:
                    changer.change_forwards(new_spec)
                except TunneldError as error:
                    return self._not_applied(spec, settings, error, "the new forwards cannot listen")
        reconnect = link_up and (kind == "connection" or (forwards_changed and changer is None))
        self.watch.applied(now)
        log.info("%s: reload: %s%s", spec.alias, "; ".join(changes), " (reconnecting to apply it)" if reconnect else "")
        return Reloaded(new_spec, new_settings, changes, reconnect)

    @staticmethod
    def _not_applied(spec: TunnelSpec, settings: HostSettings, error: TunneldError, what: str) -> Reloaded:
        log.warning("%s: reload: %s: %s", spec.alias, what, error.message)
        return Reloaded(spec, settings, pending=(f"not applied: {error.message}",))
