"""Render, enable and disable autostart files; the Runner is the one place that calls systemctl/launchctl."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tunneld.autostart.platforms import RUNS_ON, platform_name
from tunneld.autostart.service import Launch, Mechanism, Runner
from tunneld.errors import AutostartError, CorruptFileError
from tunneld.state.manifests import VIA_CHOICES, Manifest, enabled_hosts, manifest_path, read_manifest
from tunneld.state.pidfile import write_json_atomic

if TYPE_CHECKING:
    from tunneld.config.spec import TunnelSpec

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


def check_enable(host: str, via: str, runner: Runner) -> None:
    """Refuse, before anything is asked or written, a mechanism that cannot run on this platform, or a host whose
    autostart runs through another one (`enable` could not undo that)."""
    if not runner.supports(via):
        default = default_via()  # on Windows this is the error: no mechanism runs there yet
        raise AutostartError(
            f"{via} cannot start anything on {platform_name()}: it runs only on {RUNS_ON[via]}",
            f"use --via {default}, what tunneld picks here when --via is left out",
        )
    _refuse_another_mechanism(host, via)


def _refuse_another_mechanism(host: str, via: str) -> None:
    previous = read_manifest(host)
    if previous is not None and previous.via != via:
        raise AutostartError(
            f"{host} is already enabled for autostart via {previous.via}",
            f"disable it first: tunneld autostart disable {host}",
        )


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


@dataclass(frozen=True)
class Enabled:
    """What `enable` did for one host, and what the user should know about the agent it will reach at login."""

    manifest: Manifest
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def enable_host(spec: TunnelSpec, via: str, launch: Launch, runner: Runner, now: bool = False) -> Enabled:
    """Check that `via` can work here for the host, find the agent the host will reach at login, wire the service
    to it (or warn), then `enable`."""
    from tunneld.autostart.loginagent import find_login_agent

    check_enable(spec.alias, via, runner)  # before the user manager is asked anything
    finding = find_login_agent(spec, via, runner, os.environ) if via in ("systemd", "launchd") else None
    if finding is not None:
        launch = replace(launch, agent=finding.agent)
    manifest = enable(spec.alias, via, launch, runner, now)
    notes, warnings = (finding.notes, finding.warnings) if finding is not None else ((), ())
    if via == "xdg":
        from tunneld.autostart.xdg import session_warnings

        warnings = session_warnings(spec.alias)
    return Enabled(manifest, notes, warnings)


def enable(host: str, via: str, launch: Launch, runner: Runner, now: bool = False) -> Manifest:
    """Write the host's autostart files, tell the service manager, record what was created."""
    chosen = mechanism(via)
    _refuse_another_mechanism(host, via)
    files = chosen.render(host, launch)
    for path in chosen.owned_files(host):  # what an earlier enable wrote and this one does not (a drop-in) goes
        if path not in files and path.exists():
            path.unlink()
            _remove_empty_dropin_dir(path)
    created = [path for path in files if not path.exists()]
    new_dirs = sorted({d for path in files for d in _missing_parents(path)}, key=lambda d: len(d.parts), reverse=True)
    try:
        for path, content in files.items():
            _write(path, content)
        chosen.activate(host, launch, runner, now)
    except BaseException:
        for path in created:  # a failed enable leaves no unit behind without a manifest, and no empty directory
            path.unlink(missing_ok=True)
        for directory in new_dirs:
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    owned = tuple(str(p) for p in files if p not in chosen.shared_files())
    ssh_config = dict(launch.environment).get("TUNNELD_SSH_CONFIG")
    manifest = Manifest(host, via, owned, launch.argv, ssh_config=ssh_config)
    write_json_atomic(manifest_path(host), manifest.to_dict())
    return manifest


def _missing_parents(path: Path) -> list[Path]:
    """Return the directories above `path` that do not exist yet (writing it will create them)."""
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


def disable(host: str, runner: Runner, now: bool = False) -> Manifest | None:
    """Undo `enable` for `host`; return what was removed (None when it was not enabled).

    A mechanism that cannot run on this platform is not asked anything (`now` cannot stop through it: the caller
    stops the host's tunnel by hand); its files are removed all the same."""
    manifest = read_manifest(host)
    if manifest is None:
        return None
    chosen = mechanism(manifest.via)
    if runner.supports(manifest.via):  # else nothing of it can be loaded here (a launchd manifest on Linux)
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
    agent: dict[str, object] | None = None

    def to_dict(self) -> dict[str, object]:
        """Return the report as JSON-ready data."""
        return asdict(self)


def autostart_report(host: str, runner: Runner | None = None) -> AutostartReport:
    """Return `host`'s autostart setup, with warnings for files or a tunneld that are gone; with a Runner, also
    which agent the service manager reaches and whether it holds a key for the host."""
    try:
        manifest = read_manifest(host)
    except CorruptFileError as error:
        return AutostartReport(host, None, warnings=(f"{error.message} ({error.hint})",))
    if manifest is None:
        return AutostartReport(host, None)
    if not (runner or Runner()).supports(manifest.via):  # a manifest written elsewhere (a synced ~/.config)
        why = (
            f"{manifest.via} runs only on {RUNS_ON[manifest.via]}: nothing starts {host} at login on "
            f"{platform_name()}; run `tunneld autostart disable {host}`, then `tunneld autostart enable {host}`"
        )
        return AutostartReport(host, manifest.via, manifest.files, manifest.launch, (why,))
    agent, warned = _agent_of(manifest, runner) if runner is not None else (None, [])
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
    return AutostartReport(host, manifest.via, manifest.files, manifest.launch, tuple(warnings + warned), agent)


def _agent_of(manifest: Manifest, runner: Runner) -> tuple[dict[str, object] | None, list[str]]:
    from tunneld.autostart.loginagent import agent_report
    from tunneld.autostart.systemd import instance
    from tunneld.config.resolve import resolve_host
    from tunneld.errors import TunneldError

    try:
        spec = resolve_host(manifest.host, manifest.ssh_config)
        unit = instance(manifest.host) if manifest.via == "systemd" else None
        report = agent_report(spec, manifest.via, runner, unit)
    except TunneldError as error:
        return None, [f"cannot tell which agent {manifest.via} reaches: {error.message}"]
    return report.to_dict(), [report.warning] if report.warning else []
