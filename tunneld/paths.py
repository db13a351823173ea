"""Every file location tunneld uses, in one place; TUNNELD_HOME overrides them all."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from tunneld.errors import ConfigError

APP_NAME = "tunneld"
HOST_NAME_MAX = 128
# Host names become file names: letters, digits and . _ - @ + only, never a leading dot or dash.
_HOST_NAME_RE = re.compile(r"[A-Za-z0-9_@+][A-Za-z0-9._@+-]*")


def validate_host(host: str) -> str:
    """Return `host` if it is safe to use in a file name; raise ConfigError otherwise."""
    if not host:
        raise ConfigError("the host name is empty", "name a Host from your ssh_config, e.g. tunneld start mlflowserver")
    if len(host) > HOST_NAME_MAX:
        raise ConfigError(
            f"the host name is {len(host)} characters long; tunneld accepts at most {HOST_NAME_MAX}",
            "use a shorter Host alias in your ssh_config",
        )
    if not _HOST_NAME_RE.fullmatch(host) or ".." in host:
        raise ConfigError(
            f"the host name {host!r} contains characters tunneld does not use in file names",
            "use a Host alias made of letters, digits and . _ - @ + (no '/', no '..', no leading '-' or '.')",
        )
    return host


def home() -> Path | None:
    """Return TUNNELD_HOME when set (tests and demos use it), else None."""
    value = os.environ.get("TUNNELD_HOME")
    return Path(value) if value else None


def state_dir() -> Path:
    """Return the directory of pid, state and log files (not created here)."""
    override = home()
    if override is not None:
        return override / "state"
    return Path(platformdirs.user_state_dir(APP_NAME))


def config_dir() -> Path:
    """Return the directory of tunneld's own settings."""
    override = home()
    if override is not None:
        return override / "config"
    return Path(platformdirs.user_config_dir(APP_NAME))


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) and make it readable by its owner only."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


@dataclass(frozen=True)
class HostFiles:
    """The files tunneld keeps for one host."""

    host: str
    directory: Path

    @classmethod
    def of(cls, host: str) -> HostFiles:
        """Return the files of a validated `host` under the state directory."""
        return cls(validate_host(host), state_dir())

    @property
    def pid(self) -> Path:
        return self.directory / f"{self.host}.pid"

    @property
    def lock(self) -> Path:
        return self.directory / f"{self.host}.lock"

    @property
    def state(self) -> Path:
        return self.directory / f"{self.host}.state.json"

    @property
    def log(self) -> Path:
        return self.directory / f"{self.host}.log"


def known_hosts_with_files() -> list[str]:
    """Return the hosts that have a pid or state file, sorted."""
    directory = state_dir()
    if not directory.is_dir():
        return []
    hosts = set()
    for entry in directory.iterdir():
        for suffix in (".pid", ".state.json"):
            if entry.name.endswith(suffix):
                hosts.add(entry.name[: -len(suffix)])
    return sorted(hosts)
