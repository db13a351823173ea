"""Render, enable and disable autostart files; the Runner is the one place that calls systemctl/launchctl."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from tunneld.autostart import VIA_CHOICES, Manifest, enabled_hosts, manifest_path, read_manifest
from tunneld.autostart.service import Launch, Mechanism, Runner
from tunneld.errors import AutostartError, CorruptFileError
from tunneld.pidfile import write_json_atomic

log = logging.getLogger(__name__)


def default_via() -> str:
    """Pick the mechanism for this platform: launchd on macOS, systemd where a user manager runs, else XDG."""
    if sys.platform == "darwin":
        return "launchd"
    if sys.platform.startswith("win"):
        raise AutostartError(
            "autostart is not supported on Windows yet",
            "create a Task Scheduler task at logon that runs: tunneld start HOST --keep-trying",
        )
    runtime = os.environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.getuid()}")
    if shutil.which("systemctl") and Path(runtime, "systemd").is_dir():
        return "systemd"
    return "xdg"


def mechanism(via: str) -> Mechanism:
    """Return the mechanism called `via`."""
    if via == "systemd":
        from tunneld.autostart.systemd import SystemdUser

        return SystemdUser()
    if via == "launchd":
        from tunneld.autostart.launchd import LaunchAgent

        return LaunchAgent()
    if via == "xdg":
        from tunneld.autostart.xdg import XdgAutostart

        return XdgAutostart()
    raise AutostartError(f"unknown autostart mechanism {via!r}", f"choose one of: {', '.join(VIA_CHOICES)}")


def enable(host: str, via: str, launch: Launch, runner: Runner, now: bool = False) -> Manifest:
    """Write the host's autostart files, tell the service manager, record what was created."""
    chosen = mechanism(via)
    previous = read_manifest(host)
    if previous is not None and previous.via != via:
        raise AutostartError(
            f"{host} is already enabled for autostart via {previous.via}",
            f"disable it first: tunneld autostart disable {host}",
        )
    files = chosen.render(host, launch)
    created = [path for path in files if not path.exists()]
    try:
        for path, content in files.items():
            _write(path, content)
        chosen.activate(host, launch, runner, now)
    except BaseException:
        for path in created:  # a failed enable leaves no unit behind without a manifest
            path.unlink(missing_ok=True)
            _remove_empty_dropin_dir(path)
        raise
    owned = tuple(str(p) for p in files if p not in chosen.shared_files())
    manifest = Manifest(host, via, owned, launch.argv)
    write_json_atomic(manifest_path(host), manifest.to_dict())
    return manifest


def disable(host: str, runner: Runner, now: bool = False) -> Manifest | None:
    """Undo `enable` for `host`; return what was removed (None when it was not enabled)."""
    manifest = read_manifest(host)
    if manifest is None:
        return None
    chosen = mechanism(manifest.via)
    chosen.deactivate(host, Launch(manifest.launch), runner, now)
    owned = chosen.owned_files(host)
    for name in manifest.files:
        if Path(name) not in owned:
            log.warning("%s: not removing %s: tunneld never writes that file for this host", host, name)
            continue
        Path(name).unlink(missing_ok=True)
        _remove_empty_dropin_dir(Path(name))
    manifest_path(host).unlink(missing_ok=True)
    remaining = [m for m in map(_manifest_or_none, enabled_hosts()) if m is not None and m.via == manifest.via]
    if not remaining:
        for shared in chosen.shared_files():
            shared.unlink(missing_ok=True)
    return manifest


def _manifest_or_none(host: str) -> Manifest | None:
    try:
        return read_manifest(host)
    except CorruptFileError:
        return None


def _write(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # never a planted link
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(content)
            os.fchmod(handle.fileno(), 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove_empty_dropin_dir(path: Path) -> None:
    """Remove a per-host drop-in directory (`tunneld@HOST.service.d`) once it holds nothing."""
    parent = path.parent
    if parent.name.endswith(".service.d") and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()


@dataclass(frozen=True)
class AutostartReport:
    """What `autostart status` shows for one host."""

    host: str
    via: str | None
    files: tuple[str, ...] = ()
    launch: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        """Return the report as JSON-ready data."""
        return asdict(self)


def autostart_report(host: str) -> AutostartReport:
    """Return `host`'s autostart setup, with warnings for files or a tunneld that are gone."""
    try:
        manifest = read_manifest(host)
    except CorruptFileError as error:
        return AutostartReport(host, None, warnings=(f"{error.message} ({error.hint})",))
    if manifest is None:
        return AutostartReport(host, None)
    warnings = [
        f"{name} is missing; re-run: tunneld autostart enable {host}"
        for name in manifest.files
        if not Path(name).exists()
    ]
    if manifest.launch and not Launch(manifest.launch).exists():
        warnings.append(
            f"the tunneld baked into it no longer exists ({manifest.launch[0]}): "
            f"re-run `tunneld autostart enable {host}` from the tunneld you use now"
        )
    return AutostartReport(host, manifest.via, manifest.files, manifest.launch, tuple(warnings))
