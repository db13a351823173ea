"""Autostart at login: which agent `enable` wires (real ssh-agents; systemctl answered at the OS edge), what it says
when no systemd user manager answers (the real systemctl), and what XDG autostart warns about."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.harness import accepts_connections, keygen, wait_for
from tests.helpers import run_cli, write_config
from tunneld.autostart.manage import enable, enable_host
from tunneld.autostart.service import CommandResult, Launch, Runner
from tunneld.autostart.systemd import unit_dir
from tunneld.config.resolve import resolve_host
from tunneld.errors import AutostartError
from tunneld.state.manifests import read_manifest

HOST = "mlflowserver"
LAUNCH = Launch(("/opt/tunneld/bin/python", "-m", "tunneld"))
NO_BUS = "Failed to connect to bus: No such file or directory"


class AnsweringRunner(Runner):
    """Answers systemctl at the OS edge with canned output (keyed by the words after `systemctl --user`)."""

    def __init__(self, answers: dict[str, CommandResult]) -> None:
        self.answers = answers
        self.commands: list[tuple[str, ...]] = []

    def run(self, argv: Sequence[str]) -> CommandResult:
        self.commands.append(tuple(argv))
        words = " ".join(argv[2:]) if argv[:2] == ["systemctl", "--user"] else " ".join(argv)
        return self.answers.get(words, CommandResult(tuple(argv), 0))


def start_agent(socket: Path) -> subprocess.Popen[bytes]:
    socket.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket)], stdout=subprocess.DEVNULL)
    wait_for(lambda: accepts_connections(socket), 5, f"ssh-agent on {socket}")
    return proc


@pytest.fixture
def agents() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.send_signal(signal.SIGTERM)
        proc.wait(5)


def host_with_locked_key(tmp_path: Path) -> tuple[Path, Path]:
    """An ssh_config for HOST naming a key whose file needs a passphrase; return (config, key)."""
    key = keygen(tmp_path / "id_ed25519", "login-agent", passphrase="typed-at-login")
    config = write_config(
        tmp_path, f"Host {HOST}\n  HostName 127.0.0.1\n  IdentityFile {key}\n  LocalForward 5000 localhost:5000\n"
    )
    return config, key


def add_key(socket: Path, key: Path, tmp_path: Path) -> None:
    """Load an encrypted key into an agent without a terminal: ssh-add asks SSH_ASKPASS for the passphrase."""
    askpass = tmp_path / "askpass"
    askpass.write_text("#!/bin/sh\necho typed-at-login\n")
    askpass.chmod(0o700)
    env = dict(os.environ, SSH_AUTH_SOCK=str(socket), SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force")
    done = subprocess.run(
        ["ssh-add", str(key)],
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_enable_wires_the_agent_that_holds_the_key_through_the_runtime_dir_and_its_socket_unit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, agents: list[subprocess.Popen[bytes]]
) -> None:
    config, key = host_with_locked_key(tmp_path)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    agents.append(start_agent(runtime / "ssh-agent.socket"))  # a login agent, but without the host's key
    agents.append(start_agent(runtime / "gcr" / "ssh"))  # GNOME's, holding it
    add_key(runtime / "gcr" / "ssh", key, tmp_path)
    shell = tmp_path / "ssh-Xq3bW9lMzA" / "agent.4242"  # ssh-agent's own temporary socket, holding the key too
    agents.append(start_agent(shell))
    add_key(shell, key, tmp_path)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("SSH_AUTH_SOCK", str(shell))
    runner = AnsweringRunner(
        {
            "show-environment": CommandResult((), 0, f"HOME=/home/u\nSSH_AUTH_SOCK={shell}"),
            "show --property=Id,Listen *.socket": CommandResult(
                (), 0, f"Listen={runtime}/bus (Stream)\nId=dbus.socket\n\nListen={runtime}/gcr/ssh (Stream)\n"
                "Id=gcr-ssh-agent.socket",
            ),
        }
    )  # fmt: skip
    done = enable_host(resolve_host(HOST, str(config)), "systemd", Launch.current(str(config)), runner)
    assert done.notes == ("agent at login: %t/gcr/ssh (GNOME's gcr-ssh-agent (gcr-ssh-agent.socket))",)
    assert done.warnings == ()
    dropin = (unit_dir() / f"tunneld@{HOST}.service.d" / "tunneld.conf").read_text()
    assert "[Unit]\n# GNOME's gcr-ssh-agent (gcr-ssh-agent.socket)\nWants=gcr-ssh-agent.socket\n" in dropin
    assert "After=gcr-ssh-agent.socket\n" in dropin
    assert 'Environment="SSH_AUTH_SOCK=%t/gcr/ssh"' in dropin and str(shell.parent) not in dropin, dropin
    manifest = read_manifest(HOST)
    assert manifest is not None and manifest.ssh_config == str(config)  # `autostart status` resolves the host with it


def test_enable_says_which_key_to_add_when_the_login_agent_holds_none_for_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, agents: list[subprocess.Popen[bytes]]
) -> None:
    config, key = host_with_locked_key(tmp_path)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    agents.append(start_agent(runtime / "openssh_agent"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    runner = AnsweringRunner({"show-environment": CommandResult((), 0, "HOME=/home/u")})
    done = enable_host(resolve_host(HOST, str(config)), "systemd", Launch.current(str(config)), runner)
    assert done.notes == ("agent at login: %t/openssh_agent (Debian's ssh-agent user unit)",)
    (warning,) = done.warnings
    assert warning.startswith(f"the agent at login ({runtime}/openssh_agent) holds no key for {HOST} now ")
    assert f"(holds 0 keys, none of them {key})" in warning
    assert f"add it with `SSH_AUTH_SOCK={runtime}/openssh_agent ssh-add {key}`" in warning


def test_a_host_whose_key_needs_no_passphrase_needs_no_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = keygen(tmp_path / "id_ed25519")
    config = write_config(
        tmp_path, f"Host {HOST}\n  HostName 127.0.0.1\n  IdentityFile {key}\n  LocalForward 5000 x:1\n"
    )
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "empty"))
    runner = AnsweringRunner({"show-environment": CommandResult((), 0, "HOME=/home/u")})
    done = enable_host(resolve_host(HOST, str(config)), "systemd", Launch.current(str(config)), runner)
    assert done.notes == (f"no agent needed: {key} has no passphrase",) and done.warnings == ()


def test_a_failed_enable_leaves_neither_files_nor_directories(isolated_home: Path) -> None:
    runner = AnsweringRunner({"daemon-reload": CommandResult((), 1, NO_BUS)})
    with pytest.raises(AutostartError) as raised:
        enable(HOST, "systemd", LAUNCH, runner)
    assert raised.value.message == f"no systemd user manager for this login: {NO_BUS}"
    assert "loginctl enable-linger" in str(raised.value.hint)
    assert not (isolated_home / ".config").exists()
    assert read_manifest(HOST) is None


@pytest.mark.skipif(shutil.which("systemctl") is None, reason="systemctl is not installed")
def test_enable_without_a_user_manager_is_explained_and_writes_nothing(tmp_path: Path, isolated_home: Path) -> None:
    config, _ = host_with_locked_key(tmp_path)
    (tmp_path / "run").mkdir(mode=0o700)  # a runtime directory no systemd --user listens in
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path / "run"))
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    done = run_cli("autostart", "enable", HOST, "-F", str(config), "--via", "systemd", env=env)
    assert done.returncode == 1, done.stderr
    assert "Error: no systemd user manager for this login: Failed to connect to bus" in done.stderr
    assert "hint: systemd starts one for each login session" in done.stderr
    assert not (isolated_home / ".config").exists(), sorted(isolated_home.rglob("*"))
    assert read_manifest(HOST) is None


def test_xdg_autostart_warns_that_only_a_desktop_login_runs_it(tmp_path: Path) -> None:
    config, _ = host_with_locked_key(tmp_path)
    done = run_cli("autostart", "enable", HOST, "-F", str(config), "--via", "xdg")
    assert done.returncode == 0, done.stderr
    assert (
        f"warning: an XDG autostart entry runs only when you log in to a desktop session: nothing starts {HOST} "
        "on a headless machine, over SSH, or under WSL"
    ) in done.stderr, done.stderr
    systemd_booted = Path("/run/systemd/system").is_dir()
    assert ("loginctl enable-linger $USER" in done.stderr) == systemd_booted, done.stderr


def test_autostart_status_of_an_xdg_host_never_passes_this_shells_temporary_agent_for_the_desktop_sessions(
    tmp_path: Path, agents: list[subprocess.Popen[bytes]]
) -> None:
    config, key = host_with_locked_key(tmp_path)
    assert run_cli("autostart", "enable", HOST, "-F", str(config), "--via", "xdg").returncode == 0
    shell = tmp_path / "ssh-Xq3bW9lMzA" / "agent.4242"  # ssh-agent's own temporary socket, holding the key
    agents.append(start_agent(shell))
    add_key(shell, key, tmp_path)
    listed = run_cli("autostart", "status", HOST, env=dict(os.environ, SSH_AUTH_SOCK=str(shell)))
    assert listed.returncode == 0 and listed.stderr == "", listed.stderr
    assert listed.stdout.splitlines()[1] == (
        "  agent: unknown here: the entry runs in the desktop session and gets that session's agent; this shell's "
        f"SSH_AUTH_SOCK ({shell}) is its own and temporary; `ssh-add -l` in a terminal of that session lists its keys"
    )
    shown = run_cli("autostart", "status", HOST, "--json", env=dict(os.environ, SSH_AUTH_SOCK=str(shell)))
    agent = json.loads(shown.stdout)["hosts"][0]["agent"]
    assert agent["socket"] is None and agent["holds"] == []
    assert agent["source"] == "the desktop session's SSH_AUTH_SOCK, which this shell does not show"
    session = tmp_path / "run" / "gcr" / "ssh"  # a session agent's socket: this shell's may be the session's one
    agents.append(start_agent(session))
    add_key(session, key, tmp_path)
    listed = run_cli("autostart", "status", HOST, env=dict(os.environ, SSH_AUTH_SOCK=str(session)))
    assert listed.stdout.splitlines()[1] == (
        f"  agent: {session} (this shell's SSH_AUTH_SOCK: the desktop session's agent if this shell runs in that "
        f"session): holds the key {key}"
    )
