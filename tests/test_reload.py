"""Config edits reach the running tunnel, or say why not: drift shown by `status` and `start`, applied by
`tunneld reload HOST` (SIGHUP), against a real sshd and real targets."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import psutil

from tests.harness import EchoServer, SshServer, echo_roundtrip, free_port_both, wait_for
from tests.helpers import read_state, run_cli, write_config, write_settings
from tunneld.errors import EXIT_CONFIG

UP = ("up", "degraded")


def status_of(host: str) -> dict[str, object]:
    data = json.loads(run_cli("status", host, "--json").stdout)
    host_data = data["hosts"][0]
    assert isinstance(host_data, dict)
    return host_data


def test_an_added_forward_is_reported_then_reloaded_and_the_old_one_keeps_its_connection(
    tmp_path: Path, sshd: SshServer, echo: EchoServer
) -> None:
    first, second = free_port_both(), free_port_both()
    one = sshd.client_config("grow", [f"LocalForward {first} 127.0.0.1:{echo.port}"])
    config = write_config(tmp_path, one)
    assert run_cli("start", "grow", "-F", str(config), "--engine", "paramiko").returncode == 0
    kept = socket.create_connection(("127.0.0.1", first), timeout=5)  # a notebook's open connection
    kept.settimeout(5)
    kept.sendall(b"before")
    assert kept.recv(64) == b"before"
    config.write_text(one + f"  LocalForward {second} 127.0.0.1:{echo.port}\n")
    wait_for(lambda: status_of("grow")["config_changed"] is True, 20, "status to show the edit")
    changes = status_of("grow")["config_changes"]
    assert changes == [f"LocalForward localhost:{second} 127.0.0.1:{echo.port} added"], changes
    again = run_cli("start", "grow", "-F", str(config))
    assert again.returncode == 0 and "running with an older config" in again.stdout, again.stdout
    assert "tunneld reload grow" in again.stdout
    reloaded = run_cli("reload", "grow")
    assert reloaded.returncode == 0 and "grow  reloaded" in reloaded.stdout, reloaded.stderr
    assert echo_roundtrip(("127.0.0.1", second), b"the new one") == b"the new one"
    kept.sendall(b"after")
    assert kept.recv(64) == b"after", "the unchanged forward's connection was dropped"
    kept.close()
    state = read_state("grow")
    assert state["reconnects"] == 0 and state["config_changed"] == [] and status_of("grow")["config_changed"] is False


def test_a_moved_forward_reconnects_the_openssh_engine_and_sighup_does_the_same(
    tmp_path: Path, sshd: SshServer, echo: EchoServer
) -> None:
    old, new = free_port_both(), free_port_both()
    text = sshd.client_config("moved", [f"LocalForward {old} 127.0.0.1:{echo.port}"])
    config = write_config(tmp_path, text)
    assert run_cli("start", "moved", "-F", str(config)).returncode == 0
    config.write_text(text.replace(f"LocalForward {old} ", f"LocalForward {new} "))
    os.kill(int(read_state("moved")["pid"]), signal.SIGHUP)  # type: ignore[call-overload]
    wait_for(lambda: read_state("moved").get("state") in UP and read_state("moved")["reconnects"] == 1, 30,
             "the new link")  # fmt: skip
    assert echo_roundtrip(("127.0.0.1", new), b"moved") == b"moved"
    listening = [c.laddr for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr]
    assert not any(address.port == old for address in listening)


def test_a_settings_change_applies_without_dropping_the_link_and_a_broken_config_is_not_applied(
    tmp_path: Path, sshd: SshServer, echo: EchoServer
) -> None:
    port = free_port_both()
    text = sshd.client_config("steady", [f"LocalForward {port} 127.0.0.1:{echo.port}"])
    config = write_config(tmp_path, text)
    assert run_cli("start", "steady", "-F", str(config)).returncode == 0
    child = read_state("steady")["children"][0]["pid"]  # type: ignore[index]
    write_settings(f'[hosts.steady]\nhealth_interval_s = 2\n[hosts.steady.health]\n"{port}" = "tcp"\n')
    reloaded = run_cli("reload", "steady")
    assert reloaded.returncode == 0 and "health_interval_s 30 -> 2" in reloaded.stderr, reloaded.stderr
    assert read_state("steady")["children"][0]["pid"] == child, "a settings change replaced the ssh child"  # type: ignore[index]
    wait_for(lambda: bool(read_state("steady")["forwards"][0]["health"]["configured"]), 10, "the configured check")  # type: ignore[index]
    config.write_text(text + "  Prot 22\n")
    refused = run_cli("reload", "steady")
    assert refused.returncode == EXIT_CONFIG and "Bad configuration option" in refused.stderr, refused.stderr
    assert read_state("steady")["state"] in UP and read_state("steady")["children"][0]["pid"] == child  # type: ignore[index]
    assert echo_roundtrip(("127.0.0.1", port), b"still here") == b"still here"


def test_a_health_key_that_names_no_forward_is_an_error_listing_the_ports(
    tmp_path: Path, sshd: SshServer, echo: EchoServer
) -> None:
    port = free_port_both()
    config = write_config(tmp_path, sshd.client_config("typo", [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    write_settings('[hosts.typo.health]\n"5050" = "/health"\n')
    for verb in ("start", "show", "check"):
        done = run_cli(verb, "typo", "-F", str(config))
        said = done.stdout + done.stderr
        assert done.returncode in (1, EXIT_CONFIG) and "'5050' names no LocalForward of typo" in said, (verb, said)
        assert f'its forwards listen on: "{port}"' in said, (verb, said)
