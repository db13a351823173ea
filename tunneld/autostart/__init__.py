"""Start a host's tunnel at login. This module only reads what `enable` recorded (cheap, for `status`);
`manage` renders, enables and disables.

Each mechanism renders its files, then asks the service manager to act through a Runner
(the one place that runs `systemctl` or `launchctl`, and the seam tests replace). What enable
created is written to a manifest, so disable removes exactly that.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunneld.paths import config_dir, validate_host
from tunneld.pidfile import read_json

VIA_CHOICES = ("systemd", "launchd", "xdg")


@dataclass(frozen=True)
class Manifest:
    """What `enable` created for one host, so `disable` removes exactly that."""

    host: str
    via: str
    files: tuple[str, ...]
    launch: tuple[str, ...]
    enabled_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, object]:
        """Return the manifest as JSON-ready data."""
        return asdict(self)


def manifest_path(host: str) -> Path:
    """Return where the manifest of `host` lives."""
    return config_dir() / "autostart" / f"{validate_host(host)}.json"


def read_manifest(host: str) -> Manifest | None:
    """Return the manifest of `host`, or None when autostart is not enabled for it."""
    data = read_json(manifest_path(host))
    if data is None:
        return None
    files, launch = data.get("files"), data.get("launch")
    return Manifest(
        host=host,
        via=str(data.get("via")),
        files=tuple(str(f) for f in files) if isinstance(files, list) else (),
        launch=tuple(str(a) for a in launch) if isinstance(launch, list) else (),
        enabled_at=float(data.get("enabled_at", 0.0)),  # type: ignore[arg-type]
    )


def enabled_hosts() -> list[str]:
    """Return every host with an autostart manifest."""
    directory = config_dir() / "autostart"
    return sorted(p.stem for p in directory.glob("*.json")) if directory.is_dir() else []
