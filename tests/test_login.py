"""Hosts that need a human at every login: `tunneld login HOST` through a real pseudo-terminal against a real
sshd that takes a password, and a key with a passphrase loaded by `start` with ssh-add in the terminal.

A user with a password is an OS edge the tests make for themselves (root only): created with a random name
and password, removed afterwards.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import psutil
import pytest

from tests.harness import EchoServer, SshServer, echo_roundtrip, free_port_both, keygen, machine_lock, scaled, wait_for
from tests.helpers import read_state, run_cli, write_config
from tunneld.engines.master import master_pid
from tunneld.errors import EXIT_CONFIG
from tunneld.state.paths import HostFiles

UP = ("up", "degraded")
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="makes a user with a password: needs root")


class PasswordUser:
    """A throwaway local user whose password the test knows."""

    def __init__(self) -> None:
        self.name = f"tdpw{secrets.token_hex(3)}"
        self.password = secrets.token_urlsafe(12)
        with machine_lock("passwd"):  # useradd and userdel of parallel tests would contend for /etc/passwd's lock
            subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", self.name], check=True)
            subprocess.run(["chpasswd"], input=f"{self.name}:{self.password}\n", text=True, check=True)

    def remove(self) -> None:
        for proc in psutil.process_iter(["username"]):
            if proc.info["username"] == self.name:  # its sshd sessions
                proc.kill()
        with machine_lock("passwd"):
            subprocess.run(["userdel", self.name], check=False, capture_output=True)


@pytest.fixture
def password_user() -> Iterator[PasswordUser]:
    user = PasswordUser()
    try:
        yield user
    finally:
        user.remove()


@pytest.fixture
def password_sshd(sshd: SshServer) -> SshServer:
    """The test's sshd, restarted to take passwords too (its other settings as before)."""
    sshd.stop()
    sshd.password_auth = True
    sshd.start()
    return sshd


def password_config(tmp_path: Path, sshd: SshServer, user: PasswordUser, alias: str, port: int, target: int) -> Path:
    text = sshd.client_config(alias, [f"LocalForward {port} 127.0.0.1:{target}"])
    text = text.replace(f"  User {sshd.user}\n", f"  User {user.name}\n")
    text = text.replace(f"  IdentityFile {sshd.client_key}\n", "  IdentityFile none\n")
    return write_config(tmp_path, text + "  PreferredAuthentications password\n")


def tunneld_in_terminal(*args: str) -> pexpect.spawn[str]:
    """The real CLI in a pseudo-terminal (its controlling terminal: ssh and ssh-add ask there)."""
    return pexpect.spawn(sys.executable, ["-m", "tunneld", *args], env=dict(os.environ), encoding="utf-8",
                         timeout=scaled(30))  # fmt: skip


def answer_password(child: pexpect.spawn[str], password: str) -> str:
    child.expect("password:")
    child.sendline(password)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    return str(child.before)


def test_a_password_host_works_through_login_and_waits_for_it_when_the_connection_ends(
    tmp_path: Path, password_sshd: SshServer, password_user: PasswordUser, echo: EchoServer
) -> None:
    port = free_port_both()
    config = password_config(tmp_path, password_sshd, password_user, "pw", port, echo.port)
    refused = run_cli("start", "pw", "-F", str(config))  # not a terminal: nobody could answer
    assert refused.returncode == EXIT_CONFIG, refused.stderr
    assert "tunneld login pw" in refused.stderr, refused.stderr
    said = answer_password(tunneld_in_terminal("login", "pw", "-F", str(config)), password_user.password)
    assert "pw  up" in said, said
    assert echo_roundtrip(("127.0.0.1", port), b"through the login") == b"through the login"
    state = read_state("pw")
    pid = master_pid(HostFiles.of("pw"))
    assert pid is not None and state["children"] == [], "the login connection is adopted, never reaped as a child"
    psutil.Process(pid).kill()  # the network dropped it, say
    wait_for(lambda: read_state("pw").get("state") == "needs-auth", 20, "needs-auth after the connection ended")
    waiting = read_state("pw")["last_error"]
    assert isinstance(waiting, dict) and "tunneld login pw" in str(waiting["hint"]), waiting
    said = answer_password(tunneld_in_terminal("login", "pw", "-F", str(config)), password_user.password)
    assert "pw  up" in said, said
    assert echo_roundtrip(("127.0.0.1", port), b"logged in again") == b"logged in again"
    again = master_pid(HostFiles.of("pw"))
    stopped = run_cli("stop", "pw")
    assert stopped.returncode == 0, stopped.stderr
    wait_for(lambda: ended(again), 10, "the login connection to end with the tunnel")


def ended(pid: int | None) -> bool:
    """The process is gone, or a zombie (the test process adopts orphans: ssh -f's master is one)."""
    try:
        return psutil.Process(pid or 0).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_start_on_a_terminal_logs_a_password_host_in(
    tmp_path: Path, password_sshd: SshServer, password_user: PasswordUser, echo: EchoServer
) -> None:
    port = free_port_both()
    config = password_config(tmp_path, password_sshd, password_user, "pwstart", port, echo.port)
    said = answer_password(tunneld_in_terminal("start", "pwstart", "-F", str(config)), password_user.password)
    assert "pwstart  up" in said, said
    assert echo_roundtrip(("127.0.0.1", port), b"started") == b"started"
    assert run_cli("stop", "pwstart").returncode == 0


def test_start_on_a_terminal_loads_a_locked_key_with_ssh_add(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, agent: Path
) -> None:
    key = keygen(tmp_path / "locked", passphrase="correct horse battery")
    sshd.authorized_keys.write_text(Path(f"{key}.pub").read_text())
    port = free_port_both()
    text = sshd.client_config("locked", [f"LocalForward {port} 127.0.0.1:{echo.port}"])
    config = write_config(tmp_path, text.replace(str(sshd.client_key), str(key)))
    child = tunneld_in_terminal("start", "locked", "-F", str(config))
    child.expect("Enter passphrase for")  # ssh-add's own prompt, in the terminal
    child.sendline("correct horse battery")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert "locked  up" in str(child.before)
    assert echo_roundtrip(("127.0.0.1", port), b"unlocked") == b"unlocked"
    refused = run_cli("start", "locked", "-F", str(config), "--no-prompt")
    assert refused.returncode == 0  # it runs: already running, nothing to ask
    assert run_cli("stop", "locked").returncode == 0
    subprocess.run(["ssh-add", "-D"], check=True, capture_output=True)
    blocked = run_cli("start", "locked", "-F", str(config), "--no-prompt")
    assert blocked.returncode == EXIT_CONFIG and f"ssh-add {key}" in blocked.stderr, blocked.stderr
