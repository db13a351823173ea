"""Groups of hosts in tunneld.toml: `start @ml`, `status @ml`, `stop @ml`, `autostart enable @ml`, `list`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.harness import EchoServer, SshServer, free_port
from tests.helpers import run_cli, write_config, write_settings
from tunneld.autostart.xdg import desktop_path
from tunneld.errors import EXIT_CONFIG, EXIT_NOT_RUNNING


def two_hosts(tmp_path: Path, sshd: SshServer, echo: EchoServer) -> Path:
    blocks = [sshd.client_config(h, [f"LocalForward {free_port()} 127.0.0.1:{echo.port}"]) for h in ("ga", "gb")]
    write_settings('[groups]\nml = ["ga", "gb"]\n')
    return write_config(tmp_path, "".join(blocks))


def test_start_status_stop_a_group(tmp_path: Path, sshd: SshServer, echo: EchoServer) -> None:
    config = str(two_hosts(tmp_path, sshd, echo))
    try:
        started = run_cli("start", "@ml", "-F", config)
        assert started.returncode == 0, started.stderr
        assert "[2/2]" in started.stdout and "ga  up" in started.stdout and "gb  up" in started.stdout
        status = run_cli("status", "@ml")
        assert status.returncode == 0
        assert [line.split()[0] for line in status.stdout.splitlines()[1:]] == ["ga", "gb"]
        assert "@ml  ga, gb" in run_cli("list", "-F", config).stdout
    finally:
        stopped = run_cli("stop", "@ml")
    assert stopped.returncode == 0 and stopped.stdout.splitlines() == ["ga  stopped", "gb  stopped"]
    assert run_cli("status", "@ml").returncode == EXIT_NOT_RUNNING


def test_a_host_named_by_two_groups_and_by_name_starts_and_stops_once(
    tmp_path: Path, sshd: SshServer, echo: EchoServer
) -> None:
    config = str(two_hosts(tmp_path, sshd, echo))
    write_settings('[groups]\na = ["ga", "gb"]\nb = ["gb", "ga"]\n')
    try:
        started = run_cli("start", "@a", "@b", "ga", "-F", config)
        assert started.returncode == 0, started.stderr
        lines = started.stdout.splitlines()
        assert all(line.startswith(("[1/2] ", "[2/2] ")) for line in lines), started.stdout  # two starts, no more
        assert sorted(line.split()[1] for line in lines if "  up  " in line) == ["ga", "gb"], started.stdout
    finally:
        stopped = run_cli("stop", "@b", "ga")
    assert stopped.returncode == 0 and stopped.stdout.splitlines() == ["gb  stopped", "ga  stopped"], stopped.stdout


def test_an_unknown_group_or_member_is_a_clear_error(tmp_path: Path) -> None:
    config = str(write_config(tmp_path, "Host ga\n  LocalForward 5000 localhost:5000\n"))
    write_settings('[groups]\nml = ["ghost"]\nother = ["ga"]\n')
    for verb in (("start", "@nope", "-F", config), ("stop", "@nope"), ("status", "@nope")):
        done = run_cli(*verb)
        assert done.returncode == EXIT_CONFIG, (verb, done.stderr)
        assert 'no group "@nope"' in done.stderr and "@ml, @other" in done.stderr, done.stderr
    done = run_cli("start", "@ml", "-F", config)
    assert done.returncode == EXIT_CONFIG and "no 'Host ghost' entry" in done.stderr, done.stderr
    assert re.search(r"^@ml +ghost \(no forwards in the ssh_config\)$", run_cli("list", "-F", config).stdout, re.M)
    write_settings('[groups]\nml = ["../etc"]\n')
    done = run_cli("status", "@ml")
    assert done.returncode == EXIT_CONFIG and '"../etc"' in done.stderr and "tunneld.toml" in done.stderr


def test_autostart_enable_and_disable_a_group(tmp_path: Path, sshd: SshServer, echo: EchoServer) -> None:
    config = str(two_hosts(tmp_path, sshd, echo))
    enabled = run_cli("autostart", "enable", "@ml", "-F", config, "--via", "xdg")
    assert enabled.returncode == 0, enabled.stderr
    assert desktop_path("ga").exists() and desktop_path("gb").exists()
    disabled = run_cli("autostart", "disable", "@ml")
    assert disabled.returncode == 0 and not desktop_path("ga").exists() and not desktop_path("gb").exists()


def test_a_group_is_enabled_whole_or_not_at_all(tmp_path: Path) -> None:
    config = str(write_config(tmp_path, "Host ga\n  LocalForward 5000 localhost:5000\n"))
    write_settings('[groups]\nml = ["ga", "ghost"]\n')
    done = run_cli("autostart", "enable", "@ml", "-F", config, "--via", "xdg")
    assert done.returncode == EXIT_CONFIG and "ghost" in done.stderr
    assert not desktop_path("ga").exists()


def test_shell_completion_offers_groups(tmp_path: Path) -> None:
    config = write_config(tmp_path, "Host mlflowserver\n  LocalForward 5000 localhost:5000\n")
    write_settings('[groups]\nml = ["mlflowserver"]\nweb = ["mlflowserver"]\n')
    env = dict(os.environ, _TUNNELD_COMPLETE="bash_complete", COMP_WORDS=f"tunneld start -F {config} @", COMP_CWORD="4")
    script = Path(sys.executable).parent / "tunneld"  # completion keys on the program's name, as a shell runs it
    done = subprocess.run([str(script)], env=env, capture_output=True, text=True, check=False, timeout=30)
    assert sorted(line.split(",", 1)[1] for line in done.stdout.split()) == ["@ml", "@web"], done


def test_list_and_stop_of_a_group_print_aligned_columns(tmp_path: Path) -> None:
    config = write_config(tmp_path, "Host a\n  LocalForward 5000 x:1\nHost tensorboard\n  LocalForward 6006 x:2\n")
    write_settings('[groups]\nml = ["a", "tensorboard"]\n')
    listed = run_cli("list", "-F", str(config))
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [
        "a            localhost:5000 -> x:1",
        "tensorboard  localhost:6006 -> x:2",
        "@ml          a, tensorboard",
    ]
    stopped = run_cli("stop", "@ml")  # members tunneld has never run: not running, exit 0
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.splitlines() == [
        "a            not running (tunneld has never run it)",
        "tensorboard  not running (tunneld has never run it)",
    ]
