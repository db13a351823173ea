"""What `tunneld autostart enable` recorded per host. Only read here (cheap, for `status`);
`tunneld.autostart.manage` renders, enables and disables.
What enable created is written to a manifest, so disable removes exactly that.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunneld.errors import CorruptFileError
from tunneld.state.paths import config_dir, is_valid_host, validate_host
from tunneld.state.pidfile import read_json

VIA_CHOICES = ("systemd", "launchd", "xdg")
LAUNCH_WORDS = 3  # PYTHON -m tunneld


@dataclass(frozen=True)
class Manifest:
    """What `enable` created for one host, so `disable` removes exactly that."""

    host: str
    via: str
    files: tuple[str, ...]
    launch: tuple[str, ...]
    enabled_at: float = field(default_factory=time.time)
    ssh_config: str | None = None  # -F FILE at enable: `autostart status` resolves the host with it

    def to_dict(self) -> dict[str, object]:
        """Return the manifest as JSON-ready data."""
        return asdict(self)


def manifest_path(host: str) -> Path:
    """Return where the manifest of `host` lives."""
    return config_dir() / "autostart" / f"{validate_host(host)}.json"


def read_manifest(host: str) -> Manifest | None:
    """Return the manifest of `host`, or None when autostart is not enabled for it.

    The manifest decides what `disable` removes and runs, so it is checked: a known mechanism, a
    list of file names, and a launch command that is `PYTHON -m tunneld` and nothing else.
    """
    path = manifest_path(host)
    data = read_json(path, host)
    if data is None:
        return None
    via, files, launch, enabled_at = data.get("via"), data.get("files"), data.get("launch"), data.get("enabled_at", 0)
    if via not in VIA_CHOICES:
        raise CorruptFileError(path, f"unknown mechanism {str(via)!r:.40}")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise CorruptFileError(path, "files must be a list of paths")
    if not (
        isinstance(launch, list)
        and len(launch) == LAUNCH_WORDS
        and all(isinstance(a, str) for a in launch)
        and Path(launch[0]).is_absolute()
        and launch[1:] == ["-m", "tunneld"]
    ):
        raise CorruptFileError(path, 'launch must be [PYTHON, "-m", "tunneld"]')
    if not isinstance(enabled_at, (int, float)):
        raise CorruptFileError(path, "enabled_at must be a number")
    ssh_config = data.get("ssh_config")
    if ssh_config is not None and not (isinstance(ssh_config, str) and Path(ssh_config).is_absolute()):
        raise CorruptFileError(path, "ssh_config must be an absolute path or null")
    return Manifest(host, str(via), tuple(files), tuple(launch), float(enabled_at), ssh_config)


def enabled_hosts() -> list[str]:
    """Return every host with an autostart manifest."""
    directory = config_dir() / "autostart"
    names = sorted(p.stem for p in directory.glob("*.json")) if directory.is_dir() else []
    return [name for name in names if is_valid_host(name)]  # a stray file never breaks every host
