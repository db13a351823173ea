"""What a new user reads at a first failure: a mistyped host, ssh -L syntax in ssh_config, the files that were read,
a server that is down at `start`, names tunneld never ran, a ProxyCommand as ssh runs it, a fixed tunneld.toml."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

import tunneld
from tests.harness import EchoServer, SshServer, free_port, scaled
from tests.helpers import read_state, run_cli, tunneld_cmd, write_config, write_settings
from tunneld.config.resolve import describe_sources
from tunneld.errors import EXIT_CONFIG, EXIT_NOT_RUNNING, EXIT_RUNTIME, EXIT_UNAVAILABLE

HOST = "mlflowserver"
CONFIG = """\
Host mlflowserver
  HostName 127.0.0.1
  LocalForward 5000 localhost:5000
Host tensorboard
  HostName 127.0.0.1
  LocalForward 6006 localhost:6006
"""


def test_a_mistyped_host_under_a_host_star_block_is_not_named_and_gets_did_you_mean(tmp_path: Path) -> None:
    config = write_config(tmp_path, CONFIG + "Host *\n  ServerAliveInterval 5\n")
    done = run_cli("start", "mlflowsever", "-F", str(config))
    assert done.returncode == EXIT_CONFIG
    assert f"Error: no 'Host mlflowsever' entry in {config} (only 'Host *' matches it)" in done.stderr, done.stderr
    assert "hint: did you mean mlflowserver?" in done.stderr
    assert "has no LocalForward" not in done.stderr


def test_a_mistyped_host_without_wildcards_gets_did_you_mean_too(tmp_path: Path) -> None:
    config = write_config(tmp_path, CONFIG)
    done = run_cli("start", "tensorbord", "-F", str(config))
    assert done.returncode == EXIT_CONFIG
    assert f"Error: no 'Host tensorbord' entry in {config}\n" in done.stderr
    assert "hint: did you mean tensorboard?" in done.stderr


def test_show_of_a_mistyped_host_warns_with_did_you_mean(tmp_path: Path) -> None:
    config = write_config(tmp_path, CONFIG + "Host *\n  User me\n")
    done = run_cli("show", "mlflowsever", "-F", str(config))
    assert done.returncode == 0
    assert "warning: no 'Host mlflowsever' entry" in done.stderr and "did you mean mlflowserver?" in done.stderr


def test_list_and_the_no_forwards_error_name_the_files_read(tmp_path: Path) -> None:
    included = tmp_path / "more.conf"
    included.write_text("Host bare\n  HostName 127.0.0.1\n")
    config = write_config(tmp_path, f"Include {included}\n" + CONFIG)
    listed = run_cli("list", "-F", str(config))
    assert listed.returncode == 0
    assert f"ssh_config files read: {config}, {included}" in listed.stderr
    refused = run_cli("start", "bare", "-F", str(config))
    assert refused.returncode == EXIT_CONFIG
    assert f"host bare has no LocalForward, RemoteForward or DynamicForward in {config}, {included}" in refused.stderr
    empty = write_config(tmp_path, "Host nothing\n  HostName 127.0.0.1\n")
    none = run_cli("list", "-F", str(empty))
    assert f"no host in {empty} has a LocalForward" in none.stderr


def test_a_missing_user_config_is_named_as_not_existing(tmp_path: Path) -> None:
    """ssh reads ~/.ssh/config of the passwd entry's home; a home without one is named, not left out."""
    home = tmp_path / "somebody"
    (home / ".ssh").mkdir(parents=True)
    assert describe_sources(None, str(home)).startswith("~/.ssh/config (does not exist), /etc/ssh/ssh_config")
    (home / ".ssh" / "config").write_text("Host x\n")
    assert describe_sources(None, str(home)).startswith("~/.ssh/config, /etc/ssh/ssh_config")


def test_ssh_minus_l_syntax_in_local_forward_gets_the_two_argument_form(tmp_path: Path) -> None:
    config = write_config(tmp_path, "Host mlflowserver\n  LocalForward 5000:localhost:5050\n")
    for env in (None, dict(os.environ, PATH=str(tmp_path / "no-ssh-here"))):  # ssh -G, then the fallback reader
        done = run_cli("start", "mlflowserver", "-F", str(config), env=env)
        assert done.returncode == EXIT_CONFIG
        assert f"Error: {config} line 2: Missing target argument." in done.stderr
        assert "hint: LocalForward takes two arguments, not ssh -L's one: write `LocalForward 5000 localhost:5050`" in (
            done.stderr
        )


def test_a_server_down_at_a_plain_start_points_to_keep_trying(tmp_path: Path, sshd: SshServer, engine: str) -> None:
    config = write_config(tmp_path, sshd.client_config("down", [f"LocalForward {free_port()} 127.0.0.1:9"]))
    sshd.stop()
    done = run_cli("start", "down", "-F", str(config), "--engine", engine)
    assert done.returncode == EXIT_UNAVAILABLE, done.stderr
    assert "keeps retrying" not in done.stderr
    command = f"tunneld start down -F {config} --keep-trying"
    assert f"othing is left running: to keep retrying in the background until the server answers, run `{command}`" in (
        done.stderr
    )
    assert read_state("down").get("state") == "failed"  # what `status` shows: nothing runs
    assert run_cli("status", "down").returncode == EXIT_NOT_RUNNING


def read_terminal(fd: int, seconds: float) -> str:
    """What arrives on a pty's main side within `seconds` (bounded), until the other side closes."""
    out = b""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: every process on the other side has closed it
            break
        if not chunk:
            break
        out += chunk
    return out.decode().replace("\r\n", "\n")


def in_terminal(args: list[str], columns: int, watch_s: float | None = None) -> str:
    """Run the CLI with a terminal of `columns` columns as stdout; a --watch runs `watch_s` seconds, then Ctrl-C."""
    main, secondary = os.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(tunneld_cmd(*args), stdin=secondary, stdout=secondary, stderr=secondary,
                            start_new_session=True)  # fmt: skip
    os.close(secondary)
    try:
        if watch_s is None:
            return read_terminal(main, scaled(30.0))
        output = read_terminal(main, scaled(watch_s))
        proc.send_signal(signal.SIGINT)
        return output + read_terminal(main, scaled(10.0))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        os.close(main)


def test_the_status_table_fits_the_terminal_and_pipes_keep_everything(
    tmp_path: Path, sshd: SshServer, echo: EchoServer
) -> None:
    forwards = [f"LocalForward {free_port()} 127.0.0.1:{echo.port}" for _ in range(4)]
    config = write_config(tmp_path, sshd.client_config("wide", forwards))
    assert run_cli("start", "wide", "-F", str(config)).returncode == 0
    try:
        piped = run_cli("status").stdout.splitlines()
        assert len(piped[1]) > 120 and "…" not in piped[1] and piped[1].count("->") == 4
        shown = in_terminal(["status"], columns=80).splitlines()
        assert [line.split()[:2] for line in shown] == [["HOST", "STATE"], ["wide", "up"]], shown
        assert all(len(line) <= 80 for line in shown) and "…" in shown[1], shown
        frames = in_terminal(["status", "--watch", "--interval", "0.5"], columns=80, watch_s=2.0)
        rows = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line) for line in frames.split("\n")]
        table = [row for row in rows if row.startswith(("HOST ", "wide "))]
        assert len(table) >= 2 and all(len(row) < 80 for row in table), table
    finally:
        run_cli("stop", "wide")


def test_stop_status_and_logs_of_a_name_tunneld_never_ran_say_so_and_name_the_known_ones(
    tmp_path: Path, sshd: SshServer, echo: EchoServer
) -> None:
    config = write_config(tmp_path, sshd.client_config(HOST, [f"LocalForward {free_port()} 127.0.0.1:{echo.port}"]))
    assert run_cli("start", HOST, "-F", str(config)).returncode == 0
    try:
        stopped = run_cli("stop", "mlflowsever")
        assert stopped.returncode == EXIT_RUNTIME, stopped
        assert f"Error: tunneld has never run mlflowsever; known: {HOST}" in stopped.stderr
        assert f"hint: did you mean {HOST}?" in stopped.stderr and "not running" not in stopped.stdout
        assert run_cli("status", HOST).returncode == 0  # the typo stopped nothing
        status = run_cli("status", HOST, "mlflowsever")
        assert status.returncode == EXIT_NOT_RUNNING
        assert f"Error: tunneld has never run mlflowsever; known: {HOST}" in status.stderr
        assert [line.split()[0] for line in status.stdout.splitlines()] == ["HOST", HOST]
        logs = run_cli("logs", "mlflowsever")
        assert logs.returncode == EXIT_RUNTIME and f"tunneld has never run mlflowsever; known: {HOST}" in logs.stderr
    finally:
        assert run_cli("stop", HOST).returncode == 0
    again = run_cli("stop", HOST)  # it ran once: stopping it again is fine
    assert again.returncode == 0 and again.stdout == f"{HOST}  not running\n"
    write_settings(f'[groups]\nml = ["{HOST}", "tensorboard"]\n')
    group = run_cli("stop", "@ml")  # a member nobody started is no typo
    assert group.returncode == 0, group.stderr
    assert group.stdout.splitlines() == [
        f"{HOST}  not running",
        "tensorboard   not running (tunneld has never run it)",  # in columns, as `status` draws them
    ]
    assert tunneld.stop("tensorboard") is False  # the Python API: nothing ran


def test_a_host_failed_on_tunneld_toml_says_config_changed_once_the_file_is_fixed(
    tmp_path: Path, sshd: SshServer, echo: EchoServer
) -> None:
    settings = write_settings('[hosts.cfgd]\nhold_connections_s = "ten"\n')
    config = write_config(tmp_path, sshd.client_config("cfgd", [f"LocalForward {free_port()} 127.0.0.1:{echo.port}"]))
    failed = run_cli("start", "cfgd", "-F", str(config))
    assert failed.returncode == EXIT_CONFIG and str(settings) in failed.stderr
    assert run_cli("status").stdout.splitlines()[1].split("  ")[:2] == ["cfgd", "failed"]
    write_settings("[hosts.cfgd]\nhold_connections_s = 10\n")
    row = run_cli("status").stdout.splitlines()[1]
    assert row.startswith("cfgd  failed (config changed since)  "), row
    assert json.loads(run_cli("status", "--json").stdout)["hosts"][0]["state"] == "failed"  # the schema is kept
    assert run_cli("start", "cfgd", "-F", str(config)).returncode == 0
    try:
        assert "config changed" not in run_cli("status").stdout
    finally:
        run_cli("stop", "cfgd")


def test_show_prints_the_proxy_command_as_ssh_runs_it_and_json_keeps_it_as_written(tmp_path: Path) -> None:
    written = "nc -X connect -x proxy:8080 %h %p # %r@%n 100%%"
    config = write_config(
        tmp_path, f"Host pc\n  HostName real.example\n  User bob\n  Port 2200\n  ProxyCommand {written}\n"
    )
    ran = "nc -X connect -x proxy:8080 real.example 2200 # bob@pc 100%"
    shown = run_cli("show", "pc", "-F", str(config))
    assert f"connects to bob@real.example:2200 via ProxyCommand {ran}\n" in shown.stdout
    assert "%h" not in shown.stdout
    data = json.loads(run_cli("show", "pc", "-F", str(config), "--json").stdout)
    assert (data["proxy_command"], data["proxy_command_raw"]) == (ran, written)
