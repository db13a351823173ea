"""XDG autostart: a `.desktop` entry that runs `tunneld start HOST --keep-trying` at desktop login."""

from __future__ import annotations

import os
from pathlib import Path

from tunneld.autostart.service import Launch, Runner
from tunneld.errors import AutostartError


def autostart_dir() -> Path:
    """Return the XDG autostart directory (~/.config/autostart)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "autostart"


def desktop_path(host: str) -> Path:
    """Return where `host`'s entry lives."""
    return autostart_dir() / f"tunneld-{host}.desktop"


def _quote(arg: str) -> str:
    """Quote one Exec argument as the Desktop Entry Specification asks; a control character is refused."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in arg):
        raise AutostartError(
            f"cannot write {arg!r} into an autostart entry: it contains a newline or another control character",
            "use a path (ssh_config, TUNNELD_HOME, Python) without one",
        )
    arg = arg.replace("%", "%%")
    if any(c in arg for c in " \t\n\"'\\><~|&;$*?#()`"):
        return '"' + "".join("\\" + c if c in '"`$\\' else c for c in arg) + '"'
    return arg


def start_argv(host: str, launch: Launch) -> list[str]:
    """Return the command the entry runs: start, and keep retrying if the network is not up yet."""
    env = [f"{key}={value}" for key, value in launch.environment]
    return [*(["env", *env] if env else []), *launch.argv, "start", host, "--keep-trying"]


def render_desktop(host: str, launch: Launch) -> str:
    """Return the `.desktop` entry for `host`."""
    return f"""\
[Desktop Entry]
Type=Application
Name=tunneld: {host}
Comment=Keep the SSH forwards of {host} up (written by tunneld autostart enable)
Exec={" ".join(_quote(a) for a in start_argv(host, launch))}
Terminal=false
NoDisplay=true
X-GNOME-Autostart-enabled=true
"""


def session_warnings(host: str) -> tuple[str, ...]:
    """Say that an XDG entry runs only at desktop login, and what runs a tunnel without one."""
    warning = (
        f"an XDG autostart entry runs only when you log in to a desktop session: nothing starts {host} "
        "on a headless machine, over SSH, or under WSL"
    )
    if Path("/run/systemd/system").is_dir():  # systemd is the init system, there is just no user manager here
        warning += (
            "; systemd runs here: `loginctl enable-linger $USER` keeps a systemd user manager running from boot, "
            f"then `tunneld autostart disable {host} && tunneld autostart enable {host} --via systemd`"
        )
    elif _is_wsl():
        warning += "; under WSL, turn systemd on ([boot] systemd=true in /etc/wsl.conf), then use --via systemd"
    return (warning,)


def _is_wsl() -> bool:
    try:
        return "microsoft" in Path("/proc/sys/kernel/osrelease").read_text().lower()
    except OSError:
        return False


class XdgAutostart:
    """Autostart through the desktop session (no service manager: tunneld supervises itself)."""

    name = "xdg"

    def render(self, host: str, launch: Launch) -> dict[Path, str]:
        return {desktop_path(host): render_desktop(host, launch)}

    def shared_files(self) -> tuple[Path, ...]:
        return ()

    def owned_files(self, host: str) -> tuple[Path, ...]:
        return (desktop_path(host),)

    def activate(self, host: str, launch: Launch, runner: Runner, now: bool) -> None:
        if now:
            runner.check(start_argv(host, launch))

    def deactivate(self, host: str, launch: Launch, runner: Runner, now: bool) -> None:
        if now:
            runner.check([*launch.argv, "stop", host])
