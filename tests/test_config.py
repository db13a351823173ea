"""The resolver against the real `ssh -G`: every forward form, token expansion, clear config errors."""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import pwd
import socket
from pathlib import Path

import pytest

from tests.helpers import run_cli, write_config
from tunneld.config.resolve import list_hosts, resolve_host
from tunneld.config.spec import DYNAMIC, LOCAL, REMOTE, Endpoint
from tunneld.errors import EXIT_CONFIG, ConfigError, NoForwardsError

ALL_FORMS = """\
Host mlflowserver
  HostName mlserver-desktop
  User hoshinokirby
  LocalForward 5000 localhost:5000
  LocalForward 127.0.0.1:5001 localhost:5001
  LocalForward [::1]:5002 [::1]:5002
  LocalForward *:8080 host:80
  LocalForward /tmp/tunneld-test-listen.sock /run/target.sock
  LocalForward 5003 /run/z.sock
  RemoteForward 9000 localhost:9000
  DynamicForward 1080
"""


def test_every_forward_form_is_resolved(tmp_path: Path) -> None:
    spec = resolve_host("mlflowserver", str(write_config(tmp_path, ALL_FORMS)))
    shown = [(f.kind, f.listen, f.target) for f in spec.forwards]
    assert shown == [
        (LOCAL, Endpoint(port=5000), Endpoint("localhost", 5000)),
        (LOCAL, Endpoint("127.0.0.1", 5001), Endpoint("localhost", 5001)),
        (LOCAL, Endpoint("::1", 5002), Endpoint("::1", 5002)),
        (LOCAL, Endpoint("*", 8080), Endpoint("host", 80)),
        (LOCAL, Endpoint(path="/tmp/tunneld-test-listen.sock"), Endpoint(path="/run/target.sock")),
        (LOCAL, Endpoint(port=5003), Endpoint(path="/run/z.sock")),
        (REMOTE, Endpoint(port=9000), Endpoint("localhost", 9000)),
        (DYNAMIC, Endpoint(port=1080), None),
    ]
    assert (spec.hostname, spec.port, spec.user) == ("mlserver-desktop", 22, "hoshinokirby")


def test_unix_socket_forwards_do_not_become_dynamic_forwards(tmp_path: Path) -> None:
    """ssh -G 9.2 prints unix-socket LocalForwards again as `dynamicforward`; only real ones count."""
    config = "Host u\n  LocalForward /tmp/tunneld-a.sock /run/b.sock\n  LocalForward 5003 /run/z.sock\n"
    spec = resolve_host("u", str(write_config(tmp_path, config)))
    assert [f.kind for f in spec.forwards] == [LOCAL, LOCAL]


def test_tokens_are_expanded_like_ssh(tmp_path: Path) -> None:
    config = (
        "Host tok\n  HostName example.invalid\n  User remoteuser\n  Port 2222\n  LocalForward 5000 localhost:5000\n"
        "  IdentityFile ~/keys/%h_%r_%p_%n_%u_%l_%%\n  IdentityFile %d/keys/%C\n  IdentityAgent ~/agent-%h.sock\n"
    )
    spec = resolve_host("tok", str(write_config(tmp_path, config)))
    home, local = pwd.getpwuid(os.getuid()).pw_dir, socket.gethostname()  # ssh's ~ is the passwd home
    digest = hashlib.sha1(f"{local}example.invalid2222remoteuser".encode()).hexdigest()
    assert spec.identity_files == (
        f"{home}/keys/example.invalid_remoteuser_2222_tok_{getpass.getuser()}_{local}_%",
        f"{home}/keys/{digest}",
    )
    assert spec.identity_agent == f"{home}/agent-example.invalid.sock"


def test_percent_c_matches_what_ssh_itself_computes(tmp_path: Path) -> None:
    """ssh -G expands ControlPath itself but prints IdentityFile raw: our %C must equal ssh's."""
    config = "Host h\n  HostName 10.1.2.3\n  User u\n  LocalForward 5000 localhost:5000\n"
    config += "  ControlPath /x/%C\n  IdentityFile /x/%C\n"
    spec = resolve_host("h", str(write_config(tmp_path, config)))
    assert spec.identity_files == (dict(spec.options)["controlpath"],)


def test_user_keepalive_and_timeouts_are_kept(tmp_path: Path) -> None:
    config = "Host k\n  LocalForward 5000 localhost:5000\n"
    config += "  ServerAliveInterval 7\n  ServerAliveCountMax 5\n  ConnectTimeout 4\n"
    spec = resolve_host("k", str(write_config(tmp_path, config)))
    assert (spec.keepalive_interval_s, spec.keepalive_count_max, spec.keepalive_from_user) == (7, 5, True)
    assert (spec.connect_timeout_s, spec.connect_timeout_from_user) == (4, True)


def test_host_without_forwards_hints_the_line_to_add(tmp_path: Path) -> None:
    path = str(write_config(tmp_path, "Host bare\n  HostName 10.0.0.1\n"))
    with pytest.raises(NoForwardsError) as info:
        resolve_host("bare", path)
    assert "has no LocalForward" in info.value.message
    assert "LocalForward 5000 localhost:5000" in str(info.value.hint)


def test_unknown_host_says_there_is_no_such_entry(tmp_path: Path) -> None:
    path = str(write_config(tmp_path, "Host other\n  LocalForward 5000 localhost:5000\n"))
    with pytest.raises(NoForwardsError) as info:
        resolve_host("nothere", path)
    assert "no 'Host nothere' entry" in info.value.message
    assert "Host nothere" in str(info.value.hint)


def test_malformed_config_carries_file_and_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, "Host a\n  LocalForward 5000 localhost:5000\n  Bogus yes\n")
    with pytest.raises(ConfigError) as info:
        resolve_host("a", str(path))
    assert info.value.message == f"{path} line 3: Bad configuration option: bogus"


def test_cli_show_json_prints_the_whole_spec(tmp_path: Path) -> None:
    path = write_config(tmp_path, ALL_FORMS + "  ProxyJump jump@bastion:2200\n  StrictHostKeyChecking accept-new\n")
    done = run_cli("show", "mlflowserver", "-F", str(path), "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["alias"] == "mlflowserver" and data["engine"] == "openssh"
    assert data["proxy_jump"] == "jump@bastion:2200"
    assert data["strict_host_key_checking"] == "accept-new"
    assert (data["keepalive_interval_s"], data["keepalive_count_max"]) == (3, 3)
    assert data["connect_timeout_s"] == 10
    assert len(data["forwards"]) == 8
    for key in ("identity_files", "user_known_hosts_files", "global_known_hosts_files", "proxy_command", "port"):
        assert key in data


def test_cli_errors_exit_78_with_file_and_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, "Host a\n  LocalForward 5000\n")
    done = run_cli("show", "a", "-F", str(path))
    assert done.returncode == EXIT_CONFIG
    assert f"Error: {path} line 2: Missing target argument." in done.stderr
    assert "hint:" in done.stderr


def test_list_shows_only_hosts_with_forwards(tmp_path: Path) -> None:
    config = "Host a b\n  LocalForward 5000 localhost:5000\nHost c\n  HostName x\nHost *.wild\n  LocalForward 1 h:1\n"
    path = write_config(tmp_path, config)
    assert [spec.alias for spec in list_hosts(str(path))[0]] == ["a", "b"]
    done = run_cli("list", "-F", str(path))
    assert done.returncode == 0
    assert done.stdout.splitlines() == ["a  localhost:5000 -> localhost:5000", "b  localhost:5000 -> localhost:5000"]


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "-rf", "x" * 200, ".hidden"])
def test_hostile_host_names_are_refused(bad: str) -> None:
    done = run_cli("run", "--", bad) if bad.startswith("-") else run_cli("run", bad)
    assert done.returncode == EXIT_CONFIG, done.stderr
    assert "Error: the host name" in done.stderr


def test_openssh_argv_adds_only_what_the_user_did_not_set(tmp_path: Path) -> None:
    from tunneld.engines.sshargv import build_argv, cpu_has_aes

    plain = build_argv(resolve_host("p", str(write_config(tmp_path, "Host p\n  LocalForward 5000 localhost:5000\n"))))
    for option in ("ExitOnForwardFailure=yes", "BatchMode=yes", "ControlMaster=no", "ControlPath=none",
                   "ServerAliveInterval=3", "ServerAliveCountMax=3", "ConnectTimeout=10"):  # fmt: skip
        assert option in plain
    assert ("Ciphers=^aes128-gcm@openssh.com,aes256-gcm@openssh.com" in plain) == cpu_has_aes()
    own = "Host o\n  LocalForward 5000 localhost:5000\n"
    own += "  Ciphers aes256-ctr\n  ServerAliveInterval 9\n  ConnectTimeout 2\n"
    theirs = build_argv(resolve_host("o", str(write_config(tmp_path, own))))
    assert not any(a.startswith(("Ciphers=", "ServerAlive", "ConnectTimeout=")) for a in theirs)
