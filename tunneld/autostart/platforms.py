"""Which autostart mechanism can start anything on which platform."""

from __future__ import annotations

import sys

# Where each mechanism exists: launchd is macOS's, systemd Linux's, XDG autostart the free desktops' (Linux, BSDs).
RUNS_ON = {"systemd": "Linux", "launchd": "macOS", "xdg": "Linux and the BSDs"}


def platform_name(platform: str | None = None) -> str:
    """Return what people call `platform` (sys.platform by default): macOS, Linux, Windows, freebsd."""
    platform = platform or sys.platform
    names = {"darwin": "macOS", "linux": "Linux", "win32": "Windows", "cygwin": "Cygwin"}
    return names.get(platform, platform.rstrip("0123456789") or platform)  # freebsd14 -> freebsd


def works_here(via: str, platform: str | None = None) -> bool:
    """Return True when the mechanism `via` can start anything on `platform` (sys.platform by default)."""
    platform = platform or sys.platform
    if via == "launchd":
        return platform == "darwin"
    if via == "systemd":
        return platform.startswith("linux")
    return via == "xdg" and platform != "darwin" and not platform.startswith(("win", "cygwin"))
