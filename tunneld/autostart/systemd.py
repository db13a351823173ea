"""systemd user units: one template `tunneld@.service`, enabled per host as `tunneld@HOST.service`."""

from __future__ import annotations

import os
from pathlib import Path

from tunneld.autostart.service import Launch, Runner
from tunneld.errors import AutostartError

TEMPLATE = "tunneld@.service"
RUNTIME_DIR = "%t"  # systemd's specifier for $XDG_RUNTIME_DIR of the user manager (/run/user/UID)
RESTART_DELAY_S = 5
START_LIMIT_INTERVAL_S = 300
START_LIMIT_BURST = 5


def unit_dir() -> Path:
    """Return the user's systemd unit directory (~/.config/systemd/user)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "systemd" / "user"


def _refuse_controls(value: str) -> str:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise AutostartError(
            f"cannot write {value!r} into a systemd unit: it contains a newline or another control character",
            "use a path (ssh_config, TUNNELD_HOME, Python) without one",
        )
    return value


def _quote(arg: str) -> str:
    """Quote one ExecStart word per systemd.syntax: `%` specifiers as %%, `$` expansion as $$, C-style quoting."""
    arg = _refuse_controls(arg).replace("%", "%%").replace("$", "$$")
    if any(c.isspace() for c in arg) or any(c in arg for c in "\"'\\;"):
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return arg


def _environment_line(key: str, value: str, specifier: str = "") -> str:
    """Return `Environment="KEY=VALUE"`: specifiers and quotes escaped (no `$` expansion happens there).

    `specifier` (`%t`, the runtime directory of the login) is written before VALUE unescaped.
    """
    text = _refuse_controls(f"{key}={value}").replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"')
    name, _, rest = text.partition("=")
    return f'Environment="{name}={specifier}{rest}"'


def render_template(launch: Launch) -> str:
    """Return the template unit: the service manager owns restarts, exit 78 (fatal) is never restarted."""
    exec_start = " ".join(_quote(a) for a in launch.argv) + " run %i"
    return f"""\
# Written by `tunneld autostart enable`; removed by `tunneld autostart disable` once no host uses it.
[Unit]
Description=tunneld: keep the SSH forwards of %i up
StartLimitIntervalSec={START_LIMIT_INTERVAL_S}
StartLimitBurst={START_LIMIT_BURST}

[Service]
Type=simple
ExecStart={exec_start}
Restart=on-failure
RestartSec={RESTART_DELAY_S}
# 78: configuration, authentication or host key is wrong; restarting cannot help.
RestartPreventExitStatus=78
KillMode=mixed
TimeoutStopSec=15
# `systemctl --user reload tunneld@HOST` = `tunneld reload HOST`: apply a changed ssh_config or tunneld.toml.
ExecReload=/bin/kill -HUP $MAINPID

[Install]
WantedBy=default.target
"""


def render_dropin(launch: Launch) -> str:
    """Return the per-host drop-in carrying -F FILE (and TUNNELD_HOME) and the agent at login for that instance."""
    unit, lines, agent = [], [_environment_line(key, value) for key, value in launch.environment], launch.agent
    if agent is not None and agent.after:
        unit = [f"# {_refuse_controls(agent.source)}", *([f"Wants={agent.after}"] if agent.wants else [])]
        unit.append(f"After={agent.after}")
    if agent is not None and agent.setting:
        relative = agent.setting.removeprefix(f"{RUNTIME_DIR}/")
        specifier = f"{RUNTIME_DIR}/" if relative != agent.setting else ""
        lines.append(_environment_line("SSH_AUTH_SOCK", relative, specifier))
    head = ["# Written by `tunneld autostart enable`."] + (["[Unit]", *unit, ""] if unit else [])
    return "\n".join([*head, "[Service]", *lines]) + "\n"


def needs_dropin(launch: Launch) -> bool:
    """Return True when the instance needs its own drop-in (environment or agent to carry)."""
    agent = launch.agent
    return bool(launch.environment) or (agent is not None and bool(agent.setting or agent.after))


def instance(host: str) -> str:
    """Return the unit name of `host`'s instance."""
    if "+" in host:
        raise AutostartError(
            f"systemd unit names cannot contain '+' ({host!r})", "use a Host alias without '+', or --via xdg"
        )
    return f"tunneld@{host}.service"


class SystemdUser:
    """Autostart through the systemd user manager (`systemctl --user`)."""

    name = "systemd"

    def render(self, host: str, launch: Launch) -> dict[Path, str]:
        files = {unit_dir() / TEMPLATE: render_template(launch)}
        if needs_dropin(launch):
            files[unit_dir() / f"{instance(host)}.d" / "tunneld.conf"] = render_dropin(launch)
        return files

    def shared_files(self) -> tuple[Path, ...]:
        return (unit_dir() / TEMPLATE,)

    def owned_files(self, host: str) -> tuple[Path, ...]:
        return (unit_dir() / f"{instance(host)}.d" / "tunneld.conf",)

    def activate(self, host: str, launch: Launch, runner: Runner, now: bool) -> None:
        runner.check(["systemctl", "--user", "daemon-reload"])
        runner.check(["systemctl", "--user", "enable", *(["--now"] if now else []), instance(host)])

    def deactivate(self, host: str, launch: Launch, runner: Runner, now: bool) -> None:
        runner.check(["systemctl", "--user", "disable", *(["--now"] if now else []), instance(host)])
        runner.check(["systemctl", "--user", "daemon-reload"])
