"""On-demand tunnels against a real sshd: listening from `start`, connected only while clients use it."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import psutil

from tests.harness import EchoServer, SshServer, echo_roundtrip, free_port, hold_port, scaled, wait_for
from tests.helpers import read_log, read_state, run_cli, write_config, write_settings
from tunneld.errors import EXIT_CONFIG

IDLE_TIMEOUT_S = 2
LINK_UP = ("up", "degraded")


def sessions(sshd: SshServer) -> int:
    """Return how many connections the listening sshd is serving (one forked child each)."""
    assert sshd.proc is not None
    return len(psutil.Process(sshd.proc.pid).children())


def on_demand(tmp_path: Path, sshd: SshServer, echo: EchoServer, host: str = "od", extra: str = "") -> tuple[str, int]:
    """Write an ssh_config and a tunneld.toml that make `host` an on-demand tunnel; return (config, port)."""
    port = free_port()
    write_config(tmp_path, sshd.client_config(host, [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    write_settings(f"[hosts.{host}]\non_demand = true\nidle_timeout_s = {IDLE_TIMEOUT_S}\n{extra}")
    return str(tmp_path / "ssh_config"), port


def test_no_session_until_the_first_client_then_closed_when_idle_and_back_on_the_next(
    tmp_path: Path, sshd: SshServer, echo: EchoServer
) -> None:
    config, port = on_demand(tmp_path, sshd, echo)
    started = run_cli("start", "od", "-F", config)  # engine auto: on demand picks paramiko
    try:
        assert started.returncode == 0, started.stderr
        assert started.stdout.startswith("od  idle  127.0.0.1:"), started.stdout
        state = read_state("od")
        assert state["state"] == "idle" and state["engine"] == "paramiko" and state["reconnects"] == 0
        # start checked host key and login with one handshake, then closed it: sshd serves nobody now
        wait_for(lambda: sessions(sshd) == 0, 10, "the verifying session to end")
        assert "host key and login verified" in read_log("od")
        assert run_cli("wait", "od", "--timeout", "5").returncode == 0  # idle is ready
        assert run_cli("status", "od").returncode == 0
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:  # the first client...
            client.sendall(b"first")
            assert client.recv(5) == b"first"  # ...waited for the link and was served
            wait_for(lambda: read_state("od").get("state") == "up", 10, "up once the health check ran")
            assert sessions(sshd) == 1
        wait_for(lambda: read_state("od").get("state") == "idle", IDLE_TIMEOUT_S + 15, "the idle link to close")
        wait_for(lambda: sessions(sshd) == 0, 10, "sshd to see the session end")
        assert "no connection for 2 s: closing the link" in read_log("od")
        assert echo_roundtrip(("127.0.0.1", port), b"again", timeout=10) == b"again"  # the next client brings it up
        wait_for(lambda: read_state("od").get("state") in ("up", "idle"), 10, "up once the health check ran")
        assert read_state("od")["reconnects"] == 0  # a link brought up for a client is not a reconnect
        assert json.loads(run_cli("status", "od", "--json").stdout)["hosts"][0]["state"] in ("up", "idle")
    finally:
        run_cli("stop", "od")


def test_an_open_but_quiet_connection_keeps_the_link_up_past_the_idle_timeout_and_its_close_starts_the_count(
    tmp_path: Path, sshd: SshServer, echo: EchoServer
) -> None:
    """A notebook kernel's connection, or a download the server stalls, sends nothing for longer than
    idle_timeout_s: idleness counts only while no connection is open. The witness that time passed is the
    daemon's own clock: TCP health checks every second reach the target one connection each."""
    port = free_port()
    config = str(write_config(tmp_path, sshd.client_config("od", [f"LocalForward {port} 127.0.0.1:{echo.port}"])))
    write_settings(f'[hosts.od]\non_demand = true\nidle_timeout_s = 1\nhealth_interval_s = 1\n\n'
                   f'[hosts.od.health]\n"{port}" = "tcp"\n')  # fmt: skip
    try:
        assert run_cli("start", "od", "-F", config).returncode == 0
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.settimeout(scaled(10))
            client.sendall(b"hello")
            assert client.recv(5) == b"hello"
            wait_for(lambda: read_state("od").get("state") == "up", 10, "up once the health check ran")
            checks = echo.accepted
            # Two idle timeouts and more of silence on the open connection (checks run at least 1 s apart).
            wait_for(lambda: echo.accepted >= checks + 3 or read_state("od").get("state") not in LINK_UP, 20,
                     "three more health checks, or the link closing")  # fmt: skip
            assert read_state("od").get("state") in LINK_UP and "closing the link" not in read_log("od"), read_log("od")
            client.sendall(b"still")
            assert client.recv(5) == b"still"  # the same connection, through the same link
            assert logins(sshd) == 2, read_log("od")  # the verifying session at start, and this link
        wait_for(lambda: read_state("od").get("state") == "idle", 15, "the link to close once the connection did")
        assert "no connection for 1 s: closing the link" in read_log("od")
    finally:
        run_cli("stop", "od")


def test_start_still_fails_at_once_on_a_taken_port(tmp_path: Path, sshd: SshServer, echo: EchoServer) -> None:
    config, port = on_demand(tmp_path, sshd, echo)
    with hold_port("127.0.0.1", port):
        done = run_cli("start", "od", "-F", config)
    holder = f"local port {port} is already in use on 127.0.0.1 by python (pid {os.getpid()})"
    assert done.returncode == EXIT_CONFIG and holder in done.stderr, done.stderr
    assert read_state("od").get("state") != "idle"


def test_start_still_fails_at_once_on_an_unknown_host_key(tmp_path: Path, sshd: SshServer, echo: EchoServer) -> None:
    config, _ = on_demand(tmp_path, sshd, echo)
    sshd.known_hosts.write_text("")  # StrictHostKeyChecking yes in client_config: an unknown key is refused
    done = run_cli("start", "od", "-F", config)
    assert done.returncode == EXIT_CONFIG and "host key" in done.stderr.lower(), done.stderr


def test_on_demand_with_the_openssh_engine_is_refused_and_show_says_why(
    tmp_path: Path, sshd: SshServer, echo: EchoServer
) -> None:
    config, _ = on_demand(tmp_path, sshd, echo)
    done = run_cli("start", "od", "-F", config, "--engine", "openssh")
    assert done.returncode == EXIT_CONFIG and "needs the paramiko engine" in done.stderr, done.stderr
    shown = run_cli("show", "od", "-F", config)
    assert "engine      paramiko" in shown.stdout and "on demand   listens from `start`" in shown.stdout
    data = json.loads(run_cli("show", "od", "-F", config, "--json").stdout)
    assert data["on_demand"] is True and data["idle_timeout_s"] == IDLE_TIMEOUT_S


def test_a_link_that_cannot_come_up_goes_back_to_idle_once_nobody_waits(
    tmp_path: Path, sshd: SshServer, echo: EchoServer
) -> None:
    config, port = on_demand(tmp_path, sshd, echo, extra="hold_connections_s = 2\n")
    try:
        assert run_cli("start", "od", "-F", config).returncode == 0
        sshd.stop()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:  # our listener accepts it...
            client.settimeout(scaled(20))
            assert client.recv(1) == b""  # ...it waits hold_connections_s for a link that cannot come, then closes
        wait_for(lambda: read_state("od").get("state") == "idle" and read_state("od").get("last_error"), 20,
                 "idle again, with the error")  # fmt: skip
        assert "Connection refused" in str(read_state("od")["last_error"])
        status = run_cli("status", "od")
        assert status.returncode == 0 and "idle (on demand)" in status.stdout and "refused" in status.stdout
        sshd.start()
        assert echo_roundtrip(("127.0.0.1", port), b"back", timeout=10) == b"back"  # the next client tries again
    finally:
        run_cli("stop", "od")


def test_sigusr1_connects_an_idle_host_at_once(tmp_path: Path, sshd: SshServer, echo: EchoServer) -> None:
    config, _ = on_demand(tmp_path, sshd, echo)
    try:
        assert run_cli("start", "od", "-F", config).returncode == 0
        wait_for(lambda: sessions(sshd) == 0, 10, "the verifying session to end")
        os.kill(int(str(read_state("od")["pid"])), signal.SIGUSR1)
        wait_for(lambda: sessions(sshd) == 1, 10, "SIGUSR1 to bring the link up")
        wait_for(lambda: read_state("od").get("state") == "idle" and sessions(sshd) == 0, IDLE_TIMEOUT_S + 15,
                 "the unused link to close again")  # fmt: skip
    finally:
        run_cli("stop", "od")


def logins(sshd: SshServer) -> int:
    """Return how many SSH sessions sshd has accepted a login for so far (its VERBOSE log)."""
    return sshd.log.read_text(errors="replace").count("Accepted publickey")


def accepted_clients(pid: int, port: int) -> int:
    """Return how many client connections to local `port` the daemon `pid` has accepted."""
    conns = psutil.Process(pid).net_connections(kind="tcp")
    return sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port)


def connected_to(pid: int, port: int) -> bool:
    """Return True once the daemon `pid` has a TCP connection to `port` (its SSH attempt got past connect)."""
    conns = psutil.Process(pid).net_connections(kind="tcp")
    return any(c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port == port for c in conns)


def test_clients_arriving_together_at_an_idle_host_share_one_session(
    tmp_path: Path, sshd: SshServer, echo: EchoServer
) -> None:
    config, port = on_demand(tmp_path, sshd, echo)
    try:
        assert run_cli("start", "od", "-F", config).returncode == 0
        wait_for(lambda: sessions(sshd) == 0, 10, "the verifying session to end")
        assert logins(sshd) == 1
        pid = int(str(read_state("od")["pid"]))
        sshd.freeze()  # the link's handshake waits: the second client arrives while the first one's link comes up
        try:
            first = socket.create_connection(("127.0.0.1", port), timeout=10)
            wait_for(lambda: connected_to(pid, sshd.port), 10, "the link's TCP connect to sshd")
            second = socket.create_connection(("127.0.0.1", port), timeout=10)
            wait_for(lambda: accepted_clients(pid, port) == 2, 10, "both clients accepted")
        finally:
            sshd.thaw()
        with first, second:
            for client, payload in ((first, b"first"), (second, b"second")):
                client.settimeout(scaled(20))
                client.sendall(payload)
                assert client.recv(len(payload)) == payload
        wait_for(lambda: read_state("od").get("state") == "idle", IDLE_TIMEOUT_S + 15, "the idle link to close")
        wait_for(lambda: sessions(sshd) == 0, 10, "sshd to see the session end")
        assert logins(sshd) == 2, read_log("od")  # the verifying session, and one for both clients
    finally:
        run_cli("stop", "od")
