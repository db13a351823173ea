"""Autostart against a REAL systemd user manager (tests/usermanager.py): the unit reaches the login's agent, and
start/stop/restart of the host go through systemctl. Skipped, with the reason, where no manager can be started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import (
    EchoServer,
    SshServer,
    accepts_connections,
    echo_roundtrip,
    free_port,
    keygen,
    machine_lock,
    wait_for,
)
from tests.usermanager import ManagerUnavailableError, UserManager, require_tools, user_manager_base, user_python

HOST = "mlflowserver"
UNIT = f"tunneld@{HOST}.service"
UP_TIMEOUT_S = 40.0


@pytest.fixture(scope="session")
def user_venv() -> Iterator[Path]:
    """The test user's own virtualenv running this checkout (made once per session)."""
    with user_manager_base() as base:
        try:
            _, user = require_tools()
            python = user_python(base, user)
        except ManagerUnavailableError as exc:
            pytest.skip(f"no systemd user manager here: {exc}")
        yield python


@pytest.fixture
def manager(user_venv: Path) -> Iterator[UserManager]:
    """A real `systemd --user` of the test user, stopped by its pid afterwards."""
    with machine_lock("systemd-user-manager"), user_manager_base() as base:  # the test user has one manager at a time
        try:
            started = UserManager(base, user_venv)
        except ManagerUnavailableError as exc:
            pytest.skip(f"no systemd user manager here: {exc}")
        try:
            yield started
        finally:
            started.stop()


class Agent:
    """A real ssh-agent of the test user on `socket`, stopped by its pid."""

    def __init__(self, manager: UserManager, socket: Path) -> None:
        self.manager, self.socket = manager, socket
        argv = ["setpriv", f"--reuid={manager.user.pw_uid}", f"--regid={manager.user.pw_gid}", "--clear-groups"]
        self.proc = subprocess.Popen([*argv, "ssh-agent", "-D", "-a", str(socket)], stdout=subprocess.DEVNULL)
        wait_for(lambda: accepts_connections(socket), 10, f"ssh-agent on {socket}")

    def ssh_add(self, *args: str) -> None:
        done = self.manager.run(["ssh-add", *args], env={"SSH_AUTH_SOCK": str(self.socket)})
        assert done.returncode == 0, done.stderr

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for agent in started:
        agent.stop()


def user_host(manager: UserManager, sshd: SshServer, echo: EchoServer) -> tuple[Path, Path, int]:
    """Give the test user a key sshd accepts and an ssh_config for HOST; return (config, key, local port)."""
    key = keygen(manager.work / "id_ed25519", "test-user")
    with sshd.authorized_keys.open("a") as keys:
        keys.write((manager.work / "id_ed25519.pub").read_text())
    known_hosts = manager.work / "known_hosts"
    known_hosts.write_text(sshd.known_hosts.read_text())
    port = free_port()
    config = manager.work / "ssh_config"
    config.write_text(
        f"Host {HOST}\n  HostName {sshd.host}\n  Port {sshd.port}\n  User {sshd.user}\n  IdentityFile {key}\n"
        f"  IdentitiesOnly yes\n  UserKnownHostsFile {known_hosts}\n  GlobalKnownHostsFile /dev/null\n"
        f"  StrictHostKeyChecking yes\n  LocalForward {port} {echo.host}:{echo.port}\n"
    )
    for path in (key, Path(f"{key}.pub"), known_hosts, config):
        manager.chown(path)
    return config, key, port


def lock_key_in_agent(manager: UserManager, agents: list[Agent], key: Path, socket: Path) -> Agent:
    """Load the key into a real agent on `socket`, then give the file a passphrase: only the agent can use it."""
    agent = Agent(manager, socket)
    agents.append(agent)
    agent.ssh_add(str(key))
    done = manager.run(["ssh-keygen", "-q", "-p", "-P", "", "-N", "not-typed-anywhere", "-f", str(key)])
    assert done.returncode == 0, done.stderr
    return agent


def state_of(manager: UserManager) -> dict[str, object]:
    try:
        data = json.loads((manager.tunneld_home / "state" / f"{HOST}.state.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def pid_file_pid(manager: UserManager) -> object:
    try:
        return json.loads((manager.tunneld_home / "state" / f"{HOST}.pid").read_text()).get("pid")
    except (OSError, ValueError):
        return None


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """Assert that a command succeeded, showing what it said when it did not."""
    assert done.returncode == 0, f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    return done


def main_pid(manager: UserManager) -> int:
    return int(manager.show(UNIT, "MainPID")["MainPID"])


def wait_up_under_systemd(manager: UserManager, not_pid: int = 0) -> int:
    """Wait until the unit runs a supervisor (other than `not_pid`) whose state file says up; return its pid."""

    def up() -> bool:
        pid, state = main_pid(manager), state_of(manager)
        return pid not in (0, not_pid) and state.get("pid") == pid and state.get("state") == "up"

    wait_for(up, UP_TIMEOUT_S, f"{UNIT} to run a supervisor that is up (state: {state_of(manager)})", interval=0.2)
    return main_pid(manager)


def test_enable_now_wires_the_unit_to_the_login_agent_and_the_tunnel_carries_traffic(
    manager: UserManager, sshd: SshServer, echo: EchoServer, agents: list[Agent]
) -> None:
    config, key, port = user_host(manager, sshd, echo)
    lock_key_in_agent(manager, agents, key, manager.runtime / "ssh-agent.socket")
    enabled = manager.cli("autostart", "enable", "--now", HOST, "-F", str(config))  # no SSH_AUTH_SOCK in this shell
    assert enabled.returncode == 0, enabled.stderr
    assert "agent at login: %t/ssh-agent.socket" in enabled.stdout, enabled.stdout
    assert f"{HOST}  up" in enabled.stdout and "under systemd" in enabled.stdout, enabled.stdout
    dropin = (manager.home / ".config/systemd/user" / f"{UNIT}.d" / "tunneld.conf").read_text()
    assert 'Environment="SSH_AUTH_SOCK=%t/ssh-agent.socket"' in dropin, dropin
    environment = manager.show(UNIT, "Environment")["Environment"]
    assert f"SSH_AUTH_SOCK={manager.runtime}/ssh-agent.socket" in environment.split(), environment
    assert manager.systemctl("is-active", UNIT).stdout.strip() == "active"
    pid = wait_up_under_systemd(manager)
    assert pid_file_pid(manager) == pid
    assert echo_roundtrip(("127.0.0.1", port), b"through the unit") == b"through the unit"


@pytest.mark.slow
def test_start_restart_stop_go_through_systemd_which_restarts_a_killed_supervisor(
    manager: UserManager, sshd: SshServer, echo: EchoServer, agents: list[Agent]
) -> None:
    config, key, port = user_host(manager, sshd, echo)
    lock_key_in_agent(manager, agents, key, manager.runtime / "ssh-agent.socket")
    ok(manager.cli("autostart", "enable", HOST, "-F", str(config)))
    assert manager.systemctl("is-active", UNIT).stdout.strip() == "inactive"

    started = manager.cli("start", HOST)
    assert started.returncode == 0, started.stderr
    first = wait_up_under_systemd(manager)
    assert f"(pid {first}," in started.stdout, started.stdout  # the supervisor `start` reports is the unit's
    assert manager.systemctl("is-active", UNIT).stdout.strip() == "active"
    assert manager.cli("start", HOST).stdout.strip() == f"{HOST} is already running (pid {first})"

    os.kill(first, signal.SIGKILL)  # a supervisor that dies is restarted by systemd (Restart=on-failure)
    second = wait_up_under_systemd(manager, not_pid=first)

    restarted = manager.cli("restart", HOST)
    assert restarted.returncode == 0, restarted.stderr
    third = wait_up_under_systemd(manager, not_pid=second)
    assert echo_roundtrip(("127.0.0.1", port), b"after restart") == b"after restart"

    stopped = manager.cli("stop", HOST)
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"{HOST}  stopped", stopped
    assert manager.systemctl("is-active", UNIT).stdout.strip() == "inactive"
    assert main_pid(manager) == 0
    wait_for(lambda: not os.path.exists(f"/proc/{third}"), 10, "the stopped supervisor to be gone")
    assert state_of(manager)["state"] == "stopped"


def test_autostart_status_asks_the_agent_systemd_reaches_whether_it_holds_the_key(
    manager: UserManager, sshd: SshServer, echo: EchoServer, agents: list[Agent]
) -> None:
    config, key, _ = user_host(manager, sshd, echo)
    agent = lock_key_in_agent(manager, agents, key, manager.runtime / "ssh-agent.socket")
    ok(manager.cli("autostart", "enable", HOST, "-F", str(config)))
    status = manager.cli("autostart", "status", HOST)
    assert status.returncode == 0, status.stderr
    socket = f"{manager.runtime}/ssh-agent.socket"
    assert f"agent: {socket} (the unit's environment): holds the key {key}" in status.stdout, status.stdout
    assert status.stderr == ""
    report = json.loads(manager.cli("autostart", "status", HOST, "--json").stdout)["hosts"][0]["agent"]
    assert report["reachable"] is True and report["holds"] == [str(key)] and report["keys"] == 1

    agent.ssh_add("-D")  # the agent forgot every key (logout, ssh-add -D, a lock)
    status = manager.cli("autostart", "status", HOST)
    assert f"agent: {socket} (the unit's environment): holds 0 keys, none of them {key}" in status.stdout
    assert f"warning: the agent systemd reaches ({socket}) holds no key for {HOST}" in status.stderr, status.stderr


def test_enable_never_writes_a_shell_agent_from_tmp_and_says_no_agent_will_be_reachable(
    manager: UserManager, sshd: SshServer, echo: EchoServer, agents: list[Agent]
) -> None:
    config, key, _ = user_host(manager, sshd, echo)
    shell_dir = Path(tempfile.mkdtemp(prefix="ssh-", dir=manager.base))  # ssh-agent's own $TMPDIR/ssh-XXXX/agent.N
    manager.chown(shell_dir)
    shell_socket = shell_dir / "agent.4242"
    lock_key_in_agent(manager, agents, key, shell_socket)
    enabled = manager.cli("autostart", "enable", HOST, "-F", str(config), env={"SSH_AUTH_SOCK": str(shell_socket)})
    assert enabled.returncode == 0, enabled.stderr
    assert "warning: no agent will be reachable at login: " in enabled.stderr, enabled.stderr
    assert f"this shell's agent (SSH_AUTH_SOCK={shell_socket}) will not exist at the next login" in enabled.stderr
    assert "what to do: run an agent that starts with your session" in enabled.stderr
    dropin = (manager.home / ".config/systemd/user" / f"{UNIT}.d" / "tunneld.conf").read_text()
    assert "SSH_AUTH_SOCK" not in dropin and str(shell_dir) not in dropin, dropin
    assert "SSH_AUTH_SOCK" not in manager.show(UNIT, "Environment")["Environment"]
    # The unit has no agent: its fatal error is start's, as today. Paramiko engine: as a non-root user, an ssh
    # child that exits on the refusal can make the openssh engine's listener check (psutil) raise AccessDenied.
    settings = manager.tunneld_home / "config" / "tunneld.toml"
    settings.write_text(f'[hosts.{HOST}]\nengine = "paramiko"\n')  # its directory is enable's (manifests)
    manager.chown(settings)
    started = manager.cli("start", HOST)
    assert started.returncode == 78, started
    assert "refused authentication" in started.stderr and "ssh-add" in started.stderr, started.stderr
    is_failed = lambda: manager.systemctl("is-active", UNIT).stdout.strip() == "failed"  # noqa: E731
    wait_for(is_failed, 10, f"{UNIT} to be failed (exit 78: never restarted)")


def test_a_supervisor_started_by_hand_before_enable_is_named_and_stop_then_start_moves_it_under_systemd(
    manager: UserManager, sshd: SshServer, echo: EchoServer, agents: list[Agent]
) -> None:
    config, key, _ = user_host(manager, sshd, echo)
    socket = manager.runtime / "ssh-agent.socket"
    lock_key_in_agent(manager, agents, key, socket)
    by_hand = manager.cli("start", HOST, "-F", str(config), env={"SSH_AUTH_SOCK": str(socket)})
    assert by_hand.returncode == 0, by_hand.stderr
    detached = pid_file_pid(manager)
    ok(manager.cli("autostart", "enable", HOST, "-F", str(config)))
    refused = manager.cli("start", HOST)
    assert refused.returncode == 1
    assert f"Error: {HOST} already runs outside systemd (pid {detached}" in refused.stderr, refused.stderr
    assert manager.systemctl("is-active", UNIT).stdout.strip() == "inactive"
    stopped = manager.cli("stop", HOST)  # systemd runs nothing for it: the pid file names what to stop
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"{HOST}  stopped", stopped
    ok(manager.cli("start", HOST))
    assert wait_up_under_systemd(manager) != detached
