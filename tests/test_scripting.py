"""`url`, `env` and `exec` as scripts use them: the real CLI in subprocesses, a real sshd, a real `sh`."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import EchoServer, SshServer, echo_roundtrip, free_port_both, scaled
from tests.helpers import read_state, run_cli, tunneld_cmd, write_config, write_settings
from tunneld.errors import EXIT_CONFIG, EXIT_USAGE

ENV = """
[hosts.ml.env]
ECHO_ADDRESS = "{local}"
BY_REMOTE_PORT = "http://{local:%(target)d}/api"
"""


@pytest.fixture
def stopped_hosts() -> Iterator[list[str]]:
    """Hosts started through the CLI in a test; each is stopped (by its pid file) afterwards."""
    hosts: list[str] = []
    yield hosts
    for host in hosts:
        run_cli("stop", host, "--timeout", "5")


def two_forwards(tmp_path: Path, sshd: SshServer, echo: EchoServer) -> tuple[Path, int, int]:
    """An ssh_config whose host `ml` forwards a free port to the echo server, then another to sshd's own port."""
    first, second = free_port_both(), free_port_both()
    forwards = [f"LocalForward {first} 127.0.0.1:{echo.port}", f"LocalForward {second} 127.0.0.1:{sshd.port}"]
    return write_config(tmp_path, sshd.client_config("ml", forwards)), first, second


def test_exec_starts_the_host_runs_the_command_in_its_place_with_the_env_and_exits_with_its_code(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, stopped_hosts: list[str]
) -> None:
    config, port, _ = two_forwards(tmp_path, sshd, echo)
    write_settings(ENV % {"target": echo.port})
    stopped_hosts.append("ml")
    script = 'echo "$$"; echo "$ECHO_ADDRESS"; echo "$BY_REMOTE_PORT"; exit 7'
    proc = subprocess.Popen(
        tunneld_cmd("exec", "ml", "-F", str(config), "--", "sh", "-c", script),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = proc.communicate(timeout=scaled(60))
    assert proc.returncode == 7, err
    shell_pid, address, url = out.splitlines()
    assert int(shell_pid) == proc.pid  # exec'd in place: the command's exit code and signals are its own
    assert address == f"127.0.0.1:{port}" and url == f"http://127.0.0.1:{port}/api"
    assert f"ml  up  127.0.0.1:{port}" in err  # it said that it started the host (on stderr)
    assert echo_roundtrip(("127.0.0.1", port), b"through the tunnel exec started") == b"through the tunnel exec started"

    pid = read_state("ml")["pid"]
    again = run_cli("exec", "ml", "--", "sh", "-c", 'test "$ECHO_ADDRESS" = 127.0.0.1:' + str(port))
    assert again.returncode == 0 and again.stderr == "", again.stderr  # reused, without -F: nothing started
    assert read_state("ml")["pid"] == pid

    missing = run_cli("exec", "ml", "--", "no-such-command-tunneld-test")
    assert missing.returncode == 127 and "no-such-command-tunneld-test: command not found" in missing.stderr
    not_executable = tmp_path / "notes.txt"
    not_executable.write_text("not a program\n")
    refused = run_cli("exec", "ml", "--", str(not_executable))
    assert refused.returncode == 126 and "cannot run it: Permission denied" in refused.stderr, refused.stderr


def test_url_and_env_of_a_running_tunnel_and_of_a_stopped_one_read_the_ssh_config_it_was_started_with(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, stopped_hosts: list[str]
) -> None:
    config, first, second = two_forwards(tmp_path, sshd, echo)
    write_settings(ENV % {"target": echo.port})
    stopped_hosts.append("ml")
    assert run_cli("start", "ml", "-F", str(config)).returncode == 0
    for running in (True, False):  # from the state file, then from the ssh_config it was last started with
        assert run_cli("url", "ml").stdout == f"http://127.0.0.1:{first}\n"
        assert run_cli("url", "ml", str(second), "--scheme", "https").stdout == f"https://127.0.0.1:{second}\n"
        assert run_cli("url", "ml", str(echo.port)).stdout == f"http://127.0.0.1:{first}\n"  # the remote port
        exported = run_cli("env", "ml")
        assert exported.stdout.splitlines() == [
            f"export ECHO_ADDRESS='127.0.0.1:{first}'",
            f"export BY_REMOTE_PORT='http://127.0.0.1:{first}/api'",
        ], (running, exported.stderr)
        if running:
            assert run_cli("stop", "ml").returncode == 0
    assert read_state("ml")["state"] == "stopped"


def test_env_output_evaluated_by_a_real_sh_gives_the_values(tmp_path: Path) -> None:
    config = write_config(tmp_path, "Host ml\n  HostName 127.0.0.1\n  LocalForward 5000 localhost:5000\n")
    tricky = 'it\'s $HOME `id` \\\\ \\"q\\" {{braces}} {local}'
    write_settings(f'[hosts.ml.env]\nPLAIN = "http://{{local}}"\nTRICKY = "{tricky}"\nEMPTY = ""\n')
    exported = run_cli("env", "ml", "-F", str(config))
    assert exported.returncode == 0, exported.stderr
    shown = subprocess.run(
        ["sh", "-c", 'eval "$1"; printf "%s\\n" "$PLAIN" "$TRICKY" "[$EMPTY]"', "sh", exported.stdout],
        capture_output=True, text=True, timeout=10, check=True,
    )  # fmt: skip
    assert shown.stdout.splitlines() == [
        "http://127.0.0.1:5000",
        'it\'s $HOME `id` \\ "q" {braces} 127.0.0.1:5000',
        "[]",
    ]


def test_a_port_or_placeholder_that_names_no_forward_is_an_error_listing_the_forwards(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, "Host ml\n  HostName 127.0.0.1\n  LocalForward 5000 localhost:5050\n  DynamicForward 1080\n"
    )
    url = run_cli("url", "ml", "9999", "-F", str(config))
    assert url.returncode == EXIT_USAGE and url.stdout == ""  # the argument is wrong, as click's own usage errors
    assert url.stderr.startswith("Usage: ") and "Error: Invalid value for PORT: " in url.stderr, url.stderr
    assert "no forward of ml has the local or remote port 9999" in url.stderr
    assert "127.0.0.1:5000 -> localhost:5050, 127.0.0.1:1080 -> SOCKS" in url.stderr
    assert run_cli("url", "ml", "5050", "-F", str(config)).stdout == "http://127.0.0.1:5000\n"

    for template, complaint in (
        ("http://{local:9999}", "{local:9999}: no forward of ml has the local or remote port 9999"),
        ("http://{remote}", "unknown placeholder {remote} (known: {local}, {local:PORT})"),
        ("http://{local", "a lone '{'"),
    ):
        write_settings(f'[hosts.ml.env]\nGOOD = "{{local}}"\nURI = "{template}"\n')
        env = run_cli("env", "ml", "-F", str(config))
        assert env.returncode == EXIT_CONFIG and env.stdout == "", env.stdout
        assert "[hosts.ml.env] URI: " in env.stderr and complaint in env.stderr, env.stderr
        assert "the forwards of ml: 127.0.0.1:5000 -> localhost:5050" in env.stderr or "lone" in complaint


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        ('[hosts.ml.env]\n"1NAME" = "x"\n', 'env name "1NAME" is not an environment variable name'),
        ("[hosts.ml.env]\nPORT = 5000\n", 'env.PORT must be a string such as "http://{local}", not 5000'),
        ('[hosts.ml]\nenv = "MLFLOW"\n', "env must be a table"),
        ('[env]\nURI = "http://{local}"\n', "env is set per host, in a [hosts.NAME.env] table"),
    ],
)
def test_a_bad_env_table_is_a_config_error_naming_it(tmp_path: Path, settings: str, complaint: str) -> None:
    config = write_config(tmp_path, "Host ml\n  HostName 127.0.0.1\n  LocalForward 5000 localhost:5000\n")
    write_settings(settings)
    done = run_cli("env", "ml", "-F", str(config))
    assert done.returncode == EXIT_CONFIG and complaint in done.stderr, done.stderr
