"""Test helpers shared by the test modules: the real CLI in subprocesses, state and log readers, tunnels run in
the foreground (always stopped by pid), and the contract of a fatal start."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import psutil

from tests.harness import scaled, wait_for
from tunneld.errors import EXIT_CONFIG

ENGINES = ["openssh", "paramiko"]
UP_TIMEOUT_S = 30.0


def tunneld_cmd(*args: str) -> list[str]:
    """Return the argv of the real tunneld CLI in this interpreter."""
    return [sys.executable, "-m", "tunneld", *args]


def run_cli(*args: str, timeout: float = 60.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the tunneld CLI to completion and return its result."""
    return subprocess.run(
        tunneld_cmd(*args),
        capture_output=True,
        text=True,
        timeout=scaled(timeout),
        stdin=subprocess.DEVNULL,
        env=env,
        check=False,
    )


def state_dir() -> Path:
    """Return the state directory the CLI under test uses."""
    return Path(os.environ["TUNNELD_HOME"]) / "state"


def read_state(host: str) -> dict[str, object]:
    """Return the host's state file, or {} while there is none."""
    try:
        data = json.loads((state_dir() / f"{host}.state.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_log(host: str) -> str:
    """Return the host's log file."""
    path = state_dir() / f"{host}.log"
    return path.read_text() if path.exists() else ""


class ForegroundTunnel:
    """`tunneld run HOST` as a real subprocess; always stopped by its pid afterwards."""

    def __init__(
        self, host: str, config: Path, engine: str, extra: Sequence[str] = (), limit_fds: int | None = None
    ) -> None:
        self.host = host
        self.stderr_path = config.parent / f"{host}.run.stderr"

        def limit() -> None:  # pragma: no cover - runs in the child: a hard limit tunneld cannot raise
            if limit_fds is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit_fds, limit_fds))

        with self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                tunneld_cmd("run", host, "-F", str(config), "--engine", engine, *extra),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                preexec_fn=limit if limit_fds is not None else None,  # noqa: PLW1509 - setrlimit only
            )

    def stderr(self) -> str:
        """Return what the tunnel wrote to stderr so far."""
        return self.stderr_path.read_text()

    def wait_state(self, *states: str, timeout: float = UP_TIMEOUT_S) -> dict[str, object]:
        """Wait until the state file shows one of `states`; fail with the log if the process ends first."""

        def reached() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"tunneld run exited {self.proc.returncode}:\n{self.stderr()}")
            return read_state(self.host).get("state") in states

        try:
            wait_for(reached, timeout, f"{self.host} to be {'/'.join(states)}")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\nstate: {read_state(self.host)}\nstderr:\n{self.stderr()}") from exc
        return read_state(self.host)

    def wait_exit(self, timeout: float = UP_TIMEOUT_S) -> int:
        """Wait for the process to exit and return its code."""
        return self.proc.wait(timeout)

    def ssh_children(self) -> list[int]:
        """Return the pids of the tunnel's ssh children."""
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def terminate(self) -> int:
        """SIGTERM the tunnel and return its exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(15)

    def kill(self) -> None:
        """Make sure the tunnel and its children are gone."""
        procs: list[psutil.Process] = []
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(procs, timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


def start(foreground: list[ForegroundTunnel], host: str, config: Path, engine: str) -> ForegroundTunnel:
    """Start `tunneld run HOST` and register it with the `foreground` fixture, which kills it afterwards."""
    tunnel = ForegroundTunnel(host, config, engine)
    foreground.append(tunnel)
    return tunnel


def expect_fatal(tunnel: ForegroundTunnel, *needles: str) -> str:
    """Assert the tunnel exits 78 after one attempt (no retry storm) with every needle on stderr."""
    code = tunnel.wait_exit(timeout=40)
    stderr = tunnel.stderr()
    assert code == EXIT_CONFIG, stderr
    for needle in needles:
        assert needle in stderr, stderr
    state = read_state(tunnel.host)
    assert state["state"] == "failed" and state["attempts"] == 1, state
    return stderr


def write_settings(text: str) -> Path:
    """Write tunneld.toml for the CLI under test and return its path."""
    path = Path(os.environ["TUNNELD_HOME"]) / "config" / "tunneld.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_config(tmp_path: Path, text: str) -> Path:
    """Write an ssh_config for the test and return its path."""
    path = tmp_path / "ssh_config"
    path.write_text(text)
    return path
