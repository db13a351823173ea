"""The command line's edges with real ssh_config files: every host ssh resolves can be shown, every bad input
gets a clear answer (never a traceback), and the CLI fits shell habits (completion, Ctrl-C, exit codes)."""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import EchoServer, SshServer, free_port
from tests.helpers import read_state, run_cli, state_dir, tunneld_cmd, write_config
from tunneld.errors import EXIT_CONFIG, EXIT_RUNTIME, EXIT_USAGE

EXIT_INTERRUPTED = 130


def ssh_g(config: Path, host: str) -> dict[str, list[str]]:
    done = subprocess.run(["ssh", "-G", "-F", str(config), host], capture_output=True, text=True, check=True)
    values: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" ")
        values.setdefault(key, []).append(value)
    return values


def test_a_host_without_forwards_is_shown_with_a_warning_and_refused_by_start(tmp_path: Path) -> None:
    config = write_config(tmp_path, "Host plain\n  HostName 192.0.2.10\n  User alice\n")
    shown = run_cli("show", "plain", "-F", str(config))
    assert shown.returncode == 0 and "start would refuse: no forwards" in shown.stdout, shown.stderr
    data = json.loads(run_cli("show", "plain", "-F", str(config), "--json").stdout)
    assert data["forwards"] == [] and data["hostname"] == "192.0.2.10" and data["warnings"]
    started = run_cli("start", "plain", "-F", str(config))
    assert started.returncode == EXIT_CONFIG and "has no LocalForward" in started.stderr


def test_a_match_only_host_is_shown_as_ssh_resolves_it(tmp_path: Path) -> None:
    text = (
        "Match originalhost mlm\n  HostName 192.0.2.20\n  User bob\n  Port 2200\n  IdentityFile ~/.ssh/id_mlm\n"
        "  LocalForward 5000 localhost:5000\n  ProxyJump jump.example\n  ServerAliveInterval 7\n"
        "  StrictHostKeyChecking accept-new\n  UserKnownHostsFile ~/.ssh/known_mlm\n  ConnectTimeout 4\n"
    )
    config = write_config(tmp_path, text)
    data = json.loads(run_cli("show", "mlm", "-F", str(config), "--json").stdout)
    ssh = ssh_g(config, "mlm")
    home = pwd.getpwuid(os.getuid()).pw_dir  # ssh expands ~ from the passwd entry, not $HOME
    assert data["hostname"] == ssh["hostname"][0] and data["user"] == ssh["user"][0]
    assert str(data["port"]) == ssh["port"][0]
    assert data["identity_files"] == [v.replace("~", home, 1) for v in ssh["identityfile"]]
    assert [f["text"] for f in data["forwards"]] == ["localhost:5000 -> localhost:5000"]
    assert ssh["localforward"] == ["5000 [localhost]:5000"]
    assert data["proxy_jump"] == ssh["proxyjump"][0]
    assert str(data["keepalive_interval_s"]) == ssh["serveraliveinterval"][0] and data["keepalive_from_user"] is True
    assert data["keepalive_count_max"] == 3 and ssh["serveralivecountmax"] == ["3"]
    assert data["strict_host_key_checking"] == ssh["stricthostkeychecking"][0]
    assert data["user_known_hosts_files"] == ssh["userknownhostsfile"][0].split()
    assert str(data["connect_timeout_s"]) == ssh["connecttimeout"][0] and data["connect_timeout_from_user"] is True


def test_start_accepts_forwards_that_only_a_match_block_gives(
    tmp_path: Path, sshd: SshServer, echo: EchoServer
) -> None:
    port = free_port()
    block = sshd.client_config("mlm", [f"LocalForward {port} 127.0.0.1:{echo.port}"])
    config = write_config(tmp_path, block.replace("Host mlm", "Match originalhost mlm"))
    done = run_cli("start", "mlm", "-F", str(config))
    assert done.returncode == 0, done.stderr
    run_cli("stop", "mlm")


@pytest.mark.parametrize("verb", [["list"], ["start", "--all"], ["status"], ["show", "x"], ["stop", "x"]])
def test_a_missing_ssh_config_file_is_an_error_for_every_verb(tmp_path: Path, verb: list[str]) -> None:
    missing = tmp_path / "no" / "such" / "file"
    done = run_cli(*verb, "-F", str(missing))
    assert done.returncode == EXIT_CONFIG and f"the ssh_config file {missing} does not exist" in done.stderr
    env = dict(os.environ, TUNNELD_SSH_CONFIG=str(missing))
    assert run_cli(*verb, env=env).returncode == EXIT_CONFIG


def test_an_unusable_alias_is_skipped_and_the_others_work(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, "Host hôst\n  LocalForward 5000 localhost:5000\nHost good\n  LocalForward 5001 h:1\n"
    )
    done = run_cli("list", "-F", str(config))
    assert done.returncode == 0 and "good  localhost:5001 -> h:1" in done.stdout, done.stderr
    assert "warning: skipping Host 'hôst'" in done.stderr


@pytest.mark.parametrize("form", ["regular file", "foreign directory"])
@pytest.mark.parametrize(
    "verb", [["status"], ["start", "x"], ["run", "x"], ["autostart", "enable", "x"], ["stop", "x"]]
)
def test_an_unusable_tunneld_home_is_a_clear_error(tmp_path: Path, form: str, verb: list[str]) -> None:
    home = tmp_path / "th"
    if form == "regular file":
        home.write_text("not a directory\n")
    else:
        if os.geteuid() != 0:
            pytest.skip("needs root to create a directory of another user")
        home.mkdir()
        os.chown(home, 65534, 65534)
    config = write_config(tmp_path, "Host x\n  LocalForward 5000 localhost:5000\n")
    done = run_cli(*verb, "-F", str(config), env=dict(os.environ, TUNNELD_HOME=str(home)))
    assert done.returncode == EXIT_CONFIG, done.stderr
    assert str(home) in done.stderr and "Traceback" not in done.stderr


def test_restart_reuses_the_engine_and_ssh_config_it_was_started_with(
    tmp_path: Path, sshd: SshServer, echo: EchoServer
) -> None:
    config = write_config(tmp_path, sshd.client_config("re", [f"LocalForward {free_port()} 127.0.0.1:{echo.port}"]))
    assert run_cli("start", "re", "-F", str(config), "--engine", "paramiko").returncode == 0
    restarted = run_cli("restart", "re")
    assert restarted.returncode == 0, restarted.stderr
    state = read_state("re")
    assert state["engine"] == "paramiko" and state["ssh_config"] == str(config)
    assert f"ssh_config {config}" in run_cli("show", "re", "-F", str(config)).stdout
    run_cli("stop", "re")


def test_a_missing_identity_file_is_named(tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str) -> None:
    missing = tmp_path / "keys" / "id_gone"
    text = sshd.client_config("idf", [f"LocalForward {free_port()} 127.0.0.1:{echo.port}"])
    config = write_config(tmp_path, text.replace(str(sshd.client_key), str(missing)))
    done = run_cli("start", "idf", "-F", str(config), "--engine", engine)
    assert done.returncode == EXIT_CONFIG and f"IdentityFile {missing} does not exist" in done.stderr, done.stderr
    assert f"`ssh -F {config} idf`" in done.stderr  # the suggested command tests the same config
    checked = run_cli("check", "idf", "-F", str(config), "--engine", engine)
    assert "[FAIL] auth       " in checked.stdout and f"IdentityFile {missing} does not exist" in checked.stdout


def steps(output: str) -> list[tuple[str, str]]:
    return [(line[1:5].strip(), line[7:17].strip()) for line in output.splitlines() if line.startswith("[")]


def test_check_files_each_failure_under_its_own_step(tmp_path: Path, sshd: SshServer) -> None:
    settings = Path(os.environ["TUNNELD_HOME"]) / "config" / "tunneld.toml"
    settings.parent.mkdir(parents=True)
    settings.write_text("engine = 7\n")
    config = write_config(tmp_path, sshd.client_config("c", [f"LocalForward {free_port()} 127.0.0.1:9"]))
    broken = steps(run_cli("check", "c", "-F", str(config)).stdout)
    assert broken[0] == ("FAIL", "config") and all(verdict == "skip" for verdict, _ in broken[1:]), broken
    settings.unlink()
    text = sshd.client_config("c", [f"LocalForward {free_port()} 127.0.0.1:9"])
    config.write_text(text.replace("HostName 127.0.0.1", "HostName no-such-host.invalid"))
    unresolvable = steps(run_cli("check", "c", "-F", str(config)).stdout)
    names = [name for _, name in unresolvable]
    assert ("FAIL", "dns") in unresolvable and names.count("host key") == 1
    assert all(verdict == "skip" for verdict, name in unresolvable[names.index("dns") + 1 :]), unresolvable


def test_start_completes_host_names_from_the_ssh_config(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        "Host mlflowserver\n  LocalForward 5000 localhost:5000\nHost mltrack\n  LocalForward 5001 localhost:5001\n"
        "Host web\n  LocalForward 8080 localhost:80\nHost noforwards\n  HostName x\n",
    )
    env = dict(
        os.environ, _TUNNELD_COMPLETE="bash_complete", COMP_WORDS=f"tunneld start -F {config} ml", COMP_CWORD="4"
    )
    script = Path(sys.executable).parent / "tunneld"  # completion keys on the program's name, as a shell runs it
    done = subprocess.run([str(script)], env=env, capture_output=True, text=True, check=False, timeout=30)
    assert sorted(line.split(",", 1)[1] for line in done.stdout.split()) == ["mlflowserver", "mltrack"], done


def test_completion_runs_nothing_from_the_ssh_config(tmp_path: Path) -> None:
    """A Tab must not run `Match exec` (ssh -G of every host would, once per host, before Enter)."""
    marker = tmp_path / "marker"
    config = write_config(
        tmp_path,
        f'Match exec "touch {marker}"\n  User someone\n'
        "Host web db-*\n  LocalForward 8080 localhost:80\nHost db\n  LocalForward 5432 localhost:5432\n",
    )
    env = dict(os.environ, _TUNNELD_COMPLETE="bash_complete", COMP_WORDS=f"tunneld start -F {config} ", COMP_CWORD="4")
    script = Path(sys.executable).parent / "tunneld"  # completion keys on the program's name, as a shell runs it
    done = subprocess.run([str(script)], env=env, capture_output=True, text=True, check=False, timeout=30)
    assert sorted(line.split(",", 1)[1] for line in done.stdout.split()) == ["db", "web"], done
    assert not marker.exists()


def test_exit_codes_and_messages_of_the_small_verbs() -> None:
    assert run_cli("logs", "nosuchhost").returncode == EXIT_RUNTIME
    assert run_cli("wait", "x", "--timeout", "0").returncode == EXIT_USAGE
    assert run_cli("start", "x", "--timeout", "-1").returncode == EXIT_USAGE
    nothing = run_cli("stop", "--all")
    assert nothing.returncode == 0 and "no tunnel is running" in nothing.stdout


def test_forget_removes_the_files_of_stopped_hosts_only(tmp_path: Path, sshd: SshServer, echo: EchoServer) -> None:
    text = sshd.client_config("a", [f"LocalForward {free_port()} 127.0.0.1:{echo.port}"])
    text += sshd.client_config("b", [f"LocalForward {free_port()} 127.0.0.1:{echo.port}"])
    config = write_config(tmp_path, text)
    for host in ("a", "b"):
        assert run_cli("start", host, "-F", str(config)).returncode == 0
    run_cli("stop", "a")
    refused = run_cli("forget", "b")
    assert refused.returncode == EXIT_RUNTIME and "b is running" in refused.stderr
    done = run_cli("forget", "--stopped")
    assert done.returncode == 0 and "a  forgotten" in done.stdout
    assert not list(state_dir().glob("a.*")) and (state_dir() / "b.pid").exists()
    listed = run_cli("status").stdout
    assert "b " in listed and "\na " not in listed
    run_cli("stop", "b")


def test_ctrl_c_on_logs_follow_exits_130_quietly(tmp_path: Path, sshd: SshServer, echo: EchoServer) -> None:
    config = write_config(tmp_path, sshd.client_config("f", [f"LocalForward {free_port()} 127.0.0.1:{echo.port}"]))
    assert run_cli("start", "f", "-F", str(config)).returncode == 0
    follow = subprocess.Popen(tunneld_cmd("logs", "f", "-f"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert follow.stdout is not None
        follow.stdout.readline()  # it is following
        time.sleep(0.3)
        follow.send_signal(signal.SIGINT)
        _, stderr = follow.communicate(timeout=10)
        assert follow.returncode == EXIT_INTERRUPTED and "Aborted" not in stderr and "Traceback" not in stderr
    finally:
        follow.kill()
        follow.wait(5)
        run_cli("stop", "f")


def test_remote_forwards_read_the_same_everywhere(tmp_path: Path, sshd: SshServer, echo: EchoServer) -> None:
    """`show`, `start`, `status` and `check` all write a RemoteForward as `remote LISTEN <- TARGET`."""
    remote = free_port()
    config = write_config(tmp_path, sshd.client_config("rf", [f"RemoteForward {remote} 127.0.0.1:{echo.port}"]))
    expected = f"remote localhost:{remote} <- 127.0.0.1:{echo.port}"
    assert expected in run_cli("show", "rf", "-F", str(config)).stdout
    started = run_cli("start", "rf", "-F", str(config), "--engine", "openssh")
    assert started.returncode == 0 and expected in started.stdout, started.stdout + started.stderr
    assert expected in run_cli("status").stdout
    assert expected in run_cli("check", "rf", "-F", str(config)).stdout
    run_cli("stop", "rf")


def test_show_says_what_is_probed_while_reconnecting(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        "Host direct\n  HostName 192.0.2.5\n  LocalForward 5000 h:1\n"
        "Host jumped\n  HostName 192.0.2.6\n  ProxyJump bastion.example:2222\n  LocalForward 5001 h:1\n"
        "Host piped\n  ProxyCommand nc %h %p\n  LocalForward 5002 h:1\n",
    )
    assert "TCP to 192.0.2.5:22 (the server)" in run_cli("show", "direct", "-F", str(config)).stdout
    shown = run_cli("show", "jumped", "-F", str(config)).stdout
    assert "TCP to bastion.example:2222 (the first ProxyJump hop, bastion.example:2222)" in shown, shown
    assert "probes      none: behind a ProxyCommand" in run_cli("show", "piped", "-F", str(config)).stdout
