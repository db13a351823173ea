"""Fixtures: an isolated HOME, a real sshd on loopback, real targets, the real CLI in subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import (
    EchoServer,
    SshServer,
    accepts_connections,
    become_subreaper,
    find_sshd,
    reap_descendants,
    running_sshd,
    wait_for,
)
from tests.helpers import ENGINES, ForegroundTunnel


def pytest_configure(config: pytest.Config) -> None:
    """Let the tests' children see SIGINT. A run started in the background by a shell without job control (a CI
    script, `make test &` in a subshell) ignores SIGINT, and an ignored signal stays ignored across exec: the
    CLI would never see the Ctrl-C that tests of `logs -f` and `status --watch` send. A handled one is reset
    to the default in every child."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In parallel, deal the tests out so that every worker's share starts with the slow ones.

    xdist's worksteal gives each worker a contiguous share of the collection and lets an idle worker steal from
    the end of a busy one's: a slow test left at the end of a share would run alone while the others wait.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers < 2:
        return
    ordered = sorted(items, key=lambda item: item.get_closest_marker("slow") is None)  # stable: slow ones first
    items[:] = [item for share in range(workers) for item in ordered[share::workers]]


@pytest.fixture(scope="session", autouse=True)
def subreaper() -> None:
    """Make the test process the subreaper of everything it starts: a daemon that `start` detaches is
    reparented to us, not to init, so every process a test started is found among our descendants."""
    become_subreaper()


@pytest.fixture(autouse=True)
def owned_processes() -> Iterator[None]:
    """After each test (and after its other fixtures), kill and reap whatever it started that still runs."""
    yield
    reap_descendants()


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point HOME, XDG dirs and TUNNELD_HOME into tmp_path so no test touches the real user's files."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var, sub in (
        ("XDG_CONFIG_HOME", ".config"),
        ("XDG_STATE_HOME", ".local/state"),
        ("XDG_DATA_HOME", ".local/share"),
    ):
        monkeypatch.setenv(var, str(home / sub))
    monkeypatch.setenv("TUNNELD_HOME", str(tmp_path / "tunneld"))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.delenv("TUNNELD_SSH_CONFIG", raising=False)
    return home


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[SshServer]:
    """A real OpenSSH sshd on a free loopback port, stopped afterwards."""
    if find_sshd() is None:
        pytest.fail("sshd is not installed: run `make test`, which installs openssh-server, or install it yourself")
    with running_sshd(tmp_path / "sshd") as server:
        yield server


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    """A TCP echo server on a loopback port: the forward's target."""
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A real ssh-agent on a socket of its own (SSH_AUTH_SOCK points at it), stopped by its pid afterwards."""
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: accepts_connections(sock), 5, "ssh-agent's socket")
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(5)


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """Each behavioural test runs once per engine."""
    return str(request.param)


@pytest.fixture
def foreground(tmp_path: Path) -> Iterator[list[ForegroundTunnel]]:
    """Collects ForegroundTunnels and kills any still running at the end of the test."""
    started: list[ForegroundTunnel] = []
    yield started
    for tunnel in started:
        tunnel.kill()
