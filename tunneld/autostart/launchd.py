"""macOS LaunchAgents: one plist per host, loaded with `launchctl bootstrap gui/UID`."""

from __future__ import annotations

import os
import plistlib
from pathlib import Path

from tunneld.autostart.service import Launch, Runner
from tunneld.state.paths import HostFiles

THROTTLE_INTERVAL_S = 10


def label(host: str) -> str:
    """Return the launchd label of `host`'s agent."""
    return f"io.tunneld.{host}"


def plist_path(host: str) -> Path:
    """Return where `host`'s agent lives."""
    return Path(os.path.expanduser("~")) / "Library" / "LaunchAgents" / f"{label(host)}.plist"


def render_plist(host: str, launch: Launch) -> str:
    """Return the agent: run at load, restarted on unsuccessful exit, output into tunneld's log."""
    log = str(HostFiles.of(host).log)
    agent: dict[str, object] = {
        "Label": label(host),
        # --managed-by launchd: a fatal error exits 0, because KeepAlive cannot exempt exit 78.
        "ProgramArguments": [*launch.argv, "run", host, "--managed-by", "launchd"],
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": THROTTLE_INTERVAL_S,
        "ProcessType": "Background",
        "StandardOutPath": log,
        "StandardErrorPath": log,
    }
    environment = dict(launch.environment)
    if launch.agent is not None and launch.agent.setting:  # an agent at a fixed path (not launchd's own)
        environment["SSH_AUTH_SOCK"] = launch.agent.setting
    if environment:
        agent["EnvironmentVariables"] = environment
    return plistlib.dumps(agent, sort_keys=False).decode()


class LaunchAgent:
    """Autostart through a per-host LaunchAgent."""

    name = "launchd"

    def render(self, host: str, launch: Launch) -> dict[Path, str]:
        return {plist_path(host): render_plist(host, launch)}

    def shared_files(self) -> tuple[Path, ...]:
        return ()

    def owned_files(self, host: str) -> tuple[Path, ...]:
        return (plist_path(host),)

    def activate(self, host: str, launch: Launch, runner: Runner, now: bool) -> None:
        # Agents in ~/Library/LaunchAgents load at every login; bootstrap loads (and starts) it now.
        if now:
            runner.run(["launchctl", "bootout", f"gui/{os.getuid()}/{label(host)}"])  # harmless if not loaded
            runner.check(["launchctl", "bootstrap", f"gui/{os.getuid()}", str(plist_path(host))])

    def deactivate(self, host: str, launch: Launch, runner: Runner, now: bool) -> None:
        # bootout stops the running agent, so it happens only when asked; the plist goes either way.
        if now:
            runner.run(["launchctl", "bootout", f"gui/{os.getuid()}/{label(host)}"])
