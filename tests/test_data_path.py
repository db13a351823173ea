"""`up` means the data path is right: no half-bound ports, exposure shown, health checked through the forward."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import (
    ControlledHttpServer,
    EchoServer,
    SshServer,
    echo_roundtrip,
    free_port_both,
    hold_port,
    ipv6_loopback,
    wait_for,
)
from tests.helpers import (
    ForegroundTunnel,
    read_log,
    read_state,
    run_cli,
    start,
    state_dir,
    write_config,
    write_settings,
)
from tunneld.errors import EXIT_CONFIG, EXIT_RUNTIME

UP = ("up", "degraded")
needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback")
HOLDERS = [
    pytest.param(("127.0.0.1",), id="v4-only"),
    pytest.param(("::1",), id="v6-only", marks=needs_ipv6),
    pytest.param(("127.0.0.1", "::1"), id="both", marks=needs_ipv6),
]


@pytest.fixture
def stopped_hosts() -> Iterator[list[str]]:
    """Hosts started through the CLI in a test; each is stopped (by its pid file) afterwards."""
    hosts: list[str] = []
    yield hosts
    for host in hosts:
        run_cli("stop", host, "--timeout", "5")


def settings(text: str) -> None:
    """Write tunneld.toml for the CLI under test."""
    write_settings(text)


@contextlib.contextmanager
def holders(ips: tuple[str, ...], port: int) -> Iterator[None]:
    """Hold `port` on each of `ips` (another program already listening there) for a with-block."""
    with contextlib.ExitStack() as stack:
        for ip in ips:
            stack.enter_context(hold_port(ip, port))
        yield


def no_tunnel_left(host: str) -> bool:
    state = run_cli("status", host, "--json")
    return not json.loads(state.stdout)["hosts"][0]["running"]


@pytest.mark.parametrize("held", HOLDERS)
def test_start_refuses_a_port_held_on_any_loopback_family(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, held: tuple[str, ...], stopped_hosts: list[str]
) -> None:
    port = free_port_both()
    config = write_config(tmp_path, sshd.client_config("half", [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    stopped_hosts.append("half")
    with holders(held, port):
        done = run_cli("start", "half", "-F", str(config), "--engine", engine)
    assert done.returncode == EXIT_CONFIG, done.stderr
    assert any(f"local port {port} is already in use on {ip} by " in done.stderr for ip in held), done.stderr
    assert f"(pid {os.getpid()})" in done.stderr
    assert no_tunnel_left("half")


@pytest.mark.parametrize("held", HOLDERS)
def test_check_fails_the_local_port_held_on_one_family(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, held: tuple[str, ...]
) -> None:
    port = free_port_both()
    config = write_config(tmp_path, sshd.client_config("half", [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    with holders(held, port):
        done = run_cli("check", "half", "-F", str(config))
    assert done.returncode == EXIT_RUNTIME, done.stdout
    for ip in held:
        shown = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        assert f"[FAIL] local port {shown} is already in use by python" in done.stdout, done.stdout
    assert "[skip] host key" in done.stdout


@pytest.mark.parametrize("held", HOLDERS)
def test_a_port_taken_during_an_outage_is_never_reported_up(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, foreground: list[ForegroundTunnel], held: tuple[str, ...]
) -> None:
    """openssh: the listeners die with ssh, so another program can take ::1 while the server is down."""
    port = free_port_both()
    config = write_config(tmp_path, sshd.client_config("reconn", [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    tunnel = start(foreground, "reconn", config, "openssh")
    tunnel.wait_state(*UP)
    sshd.stop()
    tunnel.wait_state("lost", "backoff", "connecting")
    with holders(held, port):
        sshd.start()
        conflict = [f"in use on {ip} by " for ip in held]
        wait_for(lambda: any(c in str(read_state("reconn").get("last_error")) for c in conflict), 40, "the conflict")
        state = read_state("reconn")
        assert state["state"] in ("backoff", "connecting") and state["forwards"] == [], state
    os.kill(tunnel.proc.pid, signal.SIGUSR1)  # the port is free again: retry now
    state = tunnel.wait_state(*UP)
    expected = [f"127.0.0.1:{port}"] + ([f"[::1]:{port}"] if ipv6_loopback() else [])
    assert state["forwards"][0]["listen"] == expected  # type: ignore[index]
    for ip in held:
        assert echo_roundtrip((ip, port), b"reaches the tunnel") == b"reaches the tunnel"


def test_the_paramiko_engine_keeps_every_address_through_an_outage(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, foreground: list[ForegroundTunnel]
) -> None:
    port = free_port_both()
    config = write_config(tmp_path, sshd.client_config("keep", [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    tunnel = start(foreground, "keep", config, "paramiko")
    tunnel.wait_state(*UP)
    sshd.stop()
    tunnel.wait_state("lost", "backoff", "connecting")
    for ip in ("127.0.0.1", "::1") if ipv6_loopback() else ("127.0.0.1",):
        with pytest.raises(OSError), hold_port(ip, port):
            pass
    sshd.start()
    tunnel.wait_state(*UP)
    assert echo_roundtrip(("127.0.0.1", port), b"still ours") == b"still ours"


def test_a_port_held_by_another_tunneld_host_names_that_host(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, stopped_hosts: list[str]
) -> None:
    port = free_port_both()
    text = sshd.client_config("jupyter", [f"LocalForward {port} 127.0.0.1:{echo.port}"])
    text += sshd.client_config("mlflow", [f"LocalForward {port} 127.0.0.1:{echo.port}"])
    config = write_config(tmp_path, text)
    stopped_hosts.extend(["jupyter", "mlflow"])
    first = run_cli("start", "jupyter", "-F", str(config), "--engine", engine)
    assert first.returncode == 0, first.stderr
    second = run_cli("start", "mlflow", "-F", str(config), "--engine", engine)
    assert second.returncode == EXIT_CONFIG, second.stderr
    assert "is held by tunneld host jupyter (stop it with: tunneld stop jupyter)" in second.stderr
    assert no_tunnel_left("mlflow")


@pytest.mark.parametrize(
    ("line", "extra", "listen", "exposed"),
    [
        ("LocalForward {p} 127.0.0.1:9", [], ["127.0.0.1:{p}", "[::1]:{p}"], False),
        ("LocalForward localhost:{p} 127.0.0.1:9", [], ["127.0.0.1:{p}", "[::1]:{p}"], False),
        ("LocalForward 127.0.0.1:{p} 127.0.0.1:9", [], ["127.0.0.1:{p}"], False),
        ("LocalForward *:{p} 127.0.0.1:9", [], ["0.0.0.0:{p}", "[::]:{p}"], True),
        ("LocalForward :{p} 127.0.0.1:9", [], ["0.0.0.0:{p}", "[::]:{p}"], True),
        ("LocalForward {p} 127.0.0.1:9", ["GatewayPorts yes"], ["0.0.0.0:{p}", "[::]:{p}"], True),
        ("LocalForward 192.0.2.7:{p} 127.0.0.1:9", [], ["192.0.2.7:{p}"], True),
        ("LocalForward {p} 127.0.0.1:9", ["AddressFamily inet"], ["127.0.0.1:{p}"], False),
    ],
)
def test_show_lists_every_listen_address_and_exposure(
    tmp_path: Path, line: str, extra: list[str], listen: list[str], exposed: bool
) -> None:
    port = 5000
    text = "Host x\n  HostName 127.0.0.1\n" + "".join(f"  {e}\n" for e in extra) + f"  {line.format(p=port)}\n"
    config = write_config(tmp_path, text)
    expected = [a.format(p=port) for a in listen if ipv6_loopback() or "[" not in a]
    data = json.loads(run_cli("show", "x", "-F", str(config), "--json").stdout)
    assert data["forwards"][0]["listen_addresses"] == expected
    assert data["forwards"][0]["exposed"] is exposed
    shown = run_cli("show", "x", "-F", str(config)).stdout
    assert f"  {', '.join(expected)} -> 127.0.0.1:9" in shown
    assert ("(reachable from the network)" in shown) is exposed


def test_both_engines_bind_an_empty_bind_address_on_every_interface(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    port = free_port_both()
    config = write_config(tmp_path, sshd.client_config("wide", [f"LocalForward :{port} 127.0.0.1:{echo.port}"]))
    tunnel = start(foreground, "wide", config, engine)
    forward = tunnel.wait_state(*UP)["forwards"][0]  # type: ignore[index]
    expected = [f"0.0.0.0:{port}"] + ([f"[::]:{port}"] if ipv6_loopback() else [])
    assert forward["listen"] == expected and forward["exposed"] is True
    table = run_cli("status").stdout
    assert "(reachable from the network)" in table
    assert echo_roundtrip(("127.0.0.1", port), b"wide") == b"wide"


def test_a_unix_socket_forward_survives_stop_start_and_a_server_restart(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, stopped_hosts: list[str], foreground: list[ForegroundTunnel]
) -> None:
    path = tmp_path / "mlflow.sock"
    config = write_config(tmp_path, sshd.client_config("sock", [f"LocalForward {path} 127.0.0.1:{echo.port}"]))
    stopped_hosts.append("sock")
    for round_ in range(2):
        done = run_cli("start", "sock", "-F", str(config), "--engine", "openssh")
        assert done.returncode == 0, done.stderr
        assert echo_roundtrip(str(path), f"round {round_}".encode()) == f"round {round_}".encode()
        assert run_cli("stop", "sock").returncode == 0
    tunnel = start(foreground, "sock", config, "openssh")
    tunnel.wait_state(*UP)
    sshd.stop()
    tunnel.wait_state("lost", "backoff", "connecting")
    sshd.start()
    state = tunnel.wait_state(*UP)
    assert state["reconnects"] == 1
    assert echo_roundtrip(str(path), b"after restart") == b"after restart"


def test_a_unix_socket_someone_listens_on_is_a_conflict_about_the_socket(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, stopped_hosts: list[str]
) -> None:
    import socket

    path = tmp_path / "taken.sock"
    config = write_config(tmp_path, sshd.client_config("sock", [f"LocalForward {path} 127.0.0.1:{echo.port}"]))
    stopped_hosts.append("sock")
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(path))
        other.listen(1)
        done = run_cli("start", "sock", "-F", str(config), "--engine", engine)
        assert done.returncode == EXIT_CONFIG, done.stderr
        assert f"local socket {path} is already in use by " in done.stderr
        assert "another socket path" in done.stderr and "local port" not in done.stderr
        assert path.exists()  # another program's socket is never removed


def health_fields(state: dict[str, object]) -> dict[str, object]:
    forward = state["forwards"][0]  # type: ignore[index]
    health = forward["health"]
    assert isinstance(health, dict)
    return health


@pytest.mark.slow
def test_http_health_goes_bad_and_good_with_status_json_fields(
    tmp_path: Path, sshd: SshServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    target = ControlledHttpServer()
    try:
        port = free_port_both()
        settings(f'[hosts.ml]\nhealth_interval_s = 1\n\n[hosts.ml.health]\n"{port}" = "/health"\n')
        config = write_config(tmp_path, sshd.client_config("ml", [f"LocalForward {port} 127.0.0.1:{target.port}"]))
        tunnel = start(foreground, "ml", config, engine)
        health = health_fields(tunnel.wait_state("up"))
        assert health["kind"] == "http" and health["path"] == "/health" and health["ok"] is True
        assert health["detail"] == "HTTP 200 from /health" and health["configured"] is True
        assert isinstance(health["checked_at"], float) and isinstance(health["latency_ms"], float)

        target.set_mode("503")
        state = tunnel.wait_state("degraded", timeout=10)
        assert state["forwards"][0]["detail"] == "HTTP 503 from /health"  # type: ignore[index]
        assert run_cli("status", "ml").returncode == 0  # degraded: the link is up
        waited = run_cli("wait", "ml", "--timeout", "1")
        assert waited.returncode == EXIT_RUNTIME and "health checks still failing" in waited.stderr
        target.set_mode("ok")
        tunnel.wait_state("up", timeout=10)
        assert run_cli("wait", "ml", "--timeout", "5").returncode == 0

        target.set_mode("hang")
        state = tunnel.wait_state("degraded", timeout=15)
        assert "no complete answer from /health within 5 s" in str(state["forwards"][0]["detail"])  # type: ignore[index]
        target.set_mode("ok")
        tunnel.wait_state("up", timeout=15)
        log = read_log("ml")
        assert log.count("health: 127.0.0.1") + log.count(f"health: localhost:{port}") == 4, log
    finally:
        target.close()


def test_a_refusing_target_is_degraded_before_any_user_connects_and_recovers(
    tmp_path: Path, sshd: SshServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    target = EchoServer()
    target_port = target.port
    target.close()  # nothing listens there: the server side refuses
    port = free_port_both()
    settings("health_interval_s = 1\n")
    config = write_config(tmp_path, sshd.client_config("db", [f"LocalForward {port} 127.0.0.1:{target_port}"]))
    tunnel = start(foreground, "db", config, engine)
    state = tunnel.wait_state("degraded")
    health = health_fields(state)
    assert health["kind"] == "tcp" and health["ok"] is False and health["configured"] is False
    assert f"connection refused by 127.0.0.1:{target_port}" in str(health["detail"])
    revived = EchoServer(port=target_port)
    try:
        state = tunnel.wait_state("up", timeout=10)
        assert health_fields(state)["ok"] is True
    finally:
        revived.close()


def test_wait_returns_at_once_when_the_host_is_not_running(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, stopped_hosts: list[str]
) -> None:
    began = time.monotonic()
    unknown = run_cli("wait", "nosuchhost", "--timeout", "20")
    assert unknown.returncode == EXIT_RUNTIME and "is not running (state: not running" in unknown.stderr

    port = free_port_both()
    config = write_config(tmp_path, sshd.client_config("w", [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    stopped_hosts.append("w")
    assert run_cli("start", "w", "-F", str(config)).returncode == 0
    assert run_cli("wait", "w", "--timeout", "20").returncode == 0
    assert run_cli("stop", "w").returncode == 0
    stopped = run_cli("wait", "w", "--timeout", "20")
    assert stopped.returncode == EXIT_RUNTIME and "(state: stopped" in stopped.stderr

    sshd.authorized_keys.write_text("")
    failed_start = run_cli("start", "w", "-F", str(config))
    assert failed_start.returncode == EXIT_CONFIG
    failed = run_cli("wait", "w", "--timeout", "20")
    assert failed.returncode == EXIT_RUNTIME and "(state: failed; last error: " in failed.stderr
    assert time.monotonic() - began < 20  # none of the three waited out its timeout
    assert not (state_dir() / "w.pid").exists()
    assert read_state("w")["state"] == "failed"
