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


@dataclass(frozen=True)
class CommandResult:
    """What a service-manager command returned."""

    argv: tuple[str, ...]
    returncode: int
    output: str = ""


class Runner:
    """Runs service-manager commands (`systemctl --user`, `launchctl`); tests record them instead."""

    def run(self, argv: Sequence[str]) -> CommandResult:
        """Run `argv` and return its status and combined output."""
        try:
            done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
        except FileNotFoundError as exc:
            raise AutostartError(f"{argv[0]} is not installed", "pick another mechanism with --via") from exc
        return CommandResult(tuple(argv), done.returncode, (done.stdout + done.stderr).strip())

    def check(self, argv: Sequence[str]) -> CommandResult:
        """Run `argv`; raise AutostartError when it fails."""
        result = self.run(argv)
        if result.returncode != 0:
            raise AutostartError(
                f"`{shlex.join(argv)}` failed (exit {result.returncode}): {result.output or 'no output'}",
                "run the command by hand to see more",
            )
        return result


@dataclass(frozen=True)
class Launch:
    """How the service manager starts tunneld: the absolute command line and the environment to keep."""

    argv: tuple[str, ...]
    environment: tuple[tuple[str, str], ...] = ()

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
