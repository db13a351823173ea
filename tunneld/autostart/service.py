"""What a service manager is asked to run (Launch), the one place that runs `systemctl`/`launchctl` (Runner),
and what each mechanism provides (Mechanism): the types `manage` and every backend share."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tunneld.errors import AutostartError
from tunneld.safetext import printable


@dataclass(frozen=True)
class CommandResult:
    """What a service-manager command returned."""

    argv: tuple[str, ...]
    returncode: int
    output: str = ""


NO_BUS = "Failed to connect to bus"  # what systemctl --user says when no user manager runs for this login


def no_user_manager(output: str) -> AutostartError:
    """Explain systemctl's `Failed to connect to bus`: this login has no systemd user manager to talk to."""
    return AutostartError(
        f"no systemd user manager for this login: {printable(output.strip())[:200]}",
        "systemd starts one for each login session (pam_systemd) and keeps one running without a login "
        "after `loginctl enable-linger $USER`; over su or sudo there is none (log in as the user instead); "
        "or start tunnels at desktop login with --via xdg",
    )


class Runner:
    """Runs service-manager commands (`systemctl --user`, `launchctl`); tests record them instead. It also says
    which mechanisms exist on this machine (tests that stand in for launchd say so)."""

    def supports(self, via: str) -> bool:
        """Return True when the mechanism `via` can start anything on this platform (launchd: macOS only)."""
        from tunneld.autostart.platforms import works_here

        return works_here(via)

    def run(self, argv: Sequence[str]) -> CommandResult:
        """Run `argv` and return its status and combined output."""
        try:
            done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
        except FileNotFoundError as exc:
            raise AutostartError(f"{argv[0]} is not installed", "pick another mechanism with --via") from exc
        return CommandResult(tuple(argv), done.returncode, (done.stdout + done.stderr).strip())

    def check(self, argv: Sequence[str]) -> CommandResult:
        """Run `argv`; raise AutostartError when it fails (explained when no systemd user manager answers)."""
        result = self.run(argv)
        if result.returncode != 0 and NO_BUS in result.output:
            raise no_user_manager(result.output)
        if result.returncode != 0:
            raise AutostartError(
                f"`{shlex.join(argv)}` failed (exit {result.returncode}): {result.output or 'no output'}",
                "run the command by hand to see more",
            )
        return result


@dataclass(frozen=True)
class LoginAgent:
    """The ssh-agent a service will reach at login: the socket as it is now, and how the unit is wired to it.

    `setting` is what SSH_AUTH_SOCK gets in the unit (`%t/gcr/ssh` under systemd: the runtime directory of
    that login), None when nothing needs writing (ssh_config's IdentityAgent, launchd's own agent). `after`
    is the unit that provides the socket (ordered after it; also pulled in with Wants= when `wants`).
    """

    path: str
    setting: str | None
    source: str
    after: str | None = None
    wants: bool = False


@dataclass(frozen=True)
class Launch:
    """How the service manager starts tunneld: the absolute command line, the environment to keep, the agent."""

    argv: tuple[str, ...]
    environment: tuple[tuple[str, str], ...] = ()
    agent: LoginAgent | None = None

    @classmethod
    def current(cls, ssh_config: str | None) -> Launch:
        """Return this very tunneld (absolute interpreter path, so venvs and pipx keep working)."""
        env = []
        if ssh_config:
            env.append(("TUNNELD_SSH_CONFIG", os.path.abspath(ssh_config)))
        if os.environ.get("TUNNELD_HOME"):
            env.append(("TUNNELD_HOME", os.path.abspath(os.environ["TUNNELD_HOME"])))
        return cls((os.path.abspath(sys.executable), "-m", "tunneld"), tuple(env))

    def exists(self) -> bool:
        """Return True while the baked interpreter still exists."""
        return os.access(self.argv[0], os.X_OK)


class Mechanism(Protocol):
    """One way to start tunneld at login."""

    name: str

    def render(self, host: str, launch: Launch) -> dict[Path, str]:
        """Return the files to write for `host`: {path: content}."""

    def activate(self, host: str, launch: Launch, runner: Runner, now: bool) -> None:
        """Tell the service manager (after the files are written); start the tunnel too when `now`."""

    def deactivate(self, host: str, launch: Launch, runner: Runner, now: bool) -> None:
        """Undo `activate` (before the files are removed); stop the running tunnel only when `now`."""

    def shared_files(self) -> tuple[Path, ...]:
        """Files several hosts share (removed only when no host uses them)."""

    def owned_files(self, host: str) -> tuple[Path, ...]:
        """Every file this mechanism may write for `host` alone: `disable` removes nothing else."""
