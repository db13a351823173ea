"""The OpenSSH 10 instrument: Debian 13's sshd (bench/debian13.py) runs under the harness and penalises for real.

These tests run only where `make debian13-sshd` has prepared the Debian 13 root (root only, cached outside
the repository). That root is an expensive optional artefact that `make test` never builds, so this is the
one place in the suite where a skip is right; the reason names the command that prepares it.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from bench.debian13 import prepared, unavailable_reason
from tests.harness import SshServer, wait_for

UNAVAILABLE = unavailable_reason()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")

OLD_PROBE_INTERVAL_S = 0.25  # tunneld's old path probes: one plain TCP connect every 0.25 s during a backoff
MAX_PROBES = 40  # at 4 a second, OpenSSH 10's defaults block the address after about 20
NOAUTH = "penalty: connections without attempting authentication"


@pytest.fixture
def debian13_sshd(tmp_path: Path) -> Iterator[SshServer]:
    """Debian 13's sshd with the harness's configuration on a loopback port, stopped by its pid afterwards."""
    found = prepared()
    assert found is not None
    server = found.server(tmp_path / "sshd")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def ssh(server: SshServer, tmp_path: Path, command: str) -> subprocess.Popen[str]:
    """Start a real ssh login with the harness's client key that runs `command`."""
    config = tmp_path / "ssh_config"
    config.write_text(server.client_config("debian13", [], extra=["BatchMode yes", "ConnectTimeout 10"]))
    return subprocess.Popen(
        ["ssh", "-F", str(config), "debian13", command],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def login(server: SshServer, tmp_path: Path, command: str = "true") -> subprocess.CompletedProcess[str]:
    """A real ssh login that runs `command`; returns once ssh exits (bounded)."""
    proc = ssh(server, tmp_path, command)
    stdout, stderr = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def activation_line(server: SshServer) -> str | None:
    """sshd's `activating ... penalty` line, once it has penalised the address."""
    for line in server.log.read_text(errors="replace").splitlines():
        if "activating" in line and "penalty" in line:
            return line
    return None


def alive(proc: psutil.Process) -> bool:
    """True while `proc` runs (a zombie waiting for its reaper does not)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def names(procs: list[psutil.Process]) -> list[str]:
    """The names of those of `procs` that still run."""
    found = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            found.append(proc.name())
    return found


def test_debian13_sshd_serves_logins_from_its_own_root_and_stops_with_its_sessions_by_pid(
    debian13_sshd: SshServer, tmp_path: Path
) -> None:
    assert login(debian13_sshd, tmp_path, "cat /etc/debian_version").stdout.startswith("13.")
    with socket.create_connection((debian13_sshd.host, debian13_sshd.port), timeout=5) as sock:
        assert sock.recv(64).startswith(b"SSH-2.0-OpenSSH_10.")
    session = ssh(debian13_sshd, tmp_path, "sleep 60")
    try:
        assert debian13_sshd.proc is not None
        listener = psutil.Process(debian13_sshd.proc.pid)
        wait_for(lambda: "sleep" in names(listener.children(recursive=True)), 10, "the session's `sleep` under sshd")
        tree = [listener, *listener.children(recursive=True)]
        debian13_sshd.stop()
        assert not [proc for proc in tree if alive(proc)]
        assert session.wait(timeout=10) != 0
    finally:
        session.kill()
        session.communicate(timeout=10)


def test_tcp_probes_every_quarter_second_get_loopback_blocked_and_a_blocked_client_is_told_so_before_any_banner(
    debian13_sshd: SshServer, tmp_path: Path
) -> None:
    assert login(debian13_sshd, tmp_path).returncode == 0
    began = time.monotonic()
    for index in range(MAX_PROBES):
        while time.monotonic() < began + index * OLD_PROBE_INTERVAL_S:
            time.sleep(0.01)  # the probes' own pace, not a wait for anything
        with socket.create_connection((debian13_sshd.host, debian13_sshd.port), timeout=5):
            pass
        if activation_line(debian13_sshd) is not None:
            break
    wait_for(lambda: activation_line(debian13_sshd) is not None, 5, "sshd to activate a penalty")
    assert NOAUTH in (activation_line(debian13_sshd) or "")
    assert "127.0.0.1/32" in (activation_line(debian13_sshd) or "")

    refused = login(debian13_sshd, tmp_path)
    assert refused.returncode == 255
    # ssh has sent its own banner by then, so sshd's close is a FIN or, with that banner unread, a reset
    assert any(
        f"kex_exchange_identification: {how}" in refused.stderr
        for how in ("Connection closed by remote host", "read: Connection reset by peer")
    ), refused.stderr
    with socket.create_connection((debian13_sshd.host, debian13_sshd.port), timeout=5) as sock:
        sock.settimeout(5)
        assert sock.recv(1024) == b"Not allowed at this time\r\n"
        assert sock.recv(1024) == b""
    drops = [line for line in debian13_sshd.log.read_text().splitlines() if line.startswith("drop connection")]
    assert len(drops) >= 2
    assert all(line.endswith(NOAUTH) for line in drops)
