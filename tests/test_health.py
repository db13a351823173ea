"""Health checks are bounded and interruptible, and `degraded` clears by itself.

A target that dribbles its answer (one byte a second) meets one deadline for the whole check, not a
timeout per read; a stop during the first check ends it; a forward refused on the link (ssh's
`open failed`, a refused channel) is re-checked until its target is back, with no client connecting.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import DribblingHttpServer, EchoServer, SshServer, free_port_both, wait_for
from tests.helpers import ForegroundTunnel, read_log, read_state, run_cli, start, write_config, write_settings
from tunneld.runtime.health import Deadline, http_get

UP = ("up", "degraded")
LATE = "no complete answer from /health within 5 s"


@pytest.fixture
def dribbler() -> Iterator[DribblingHttpServer]:
    """An HTTP target that sends its answer one byte a second (17 s for the status line)."""
    server = DribblingHttpServer(interval_s=1.0)
    yield server
    server.close()


def health_host(tmp_path: Path, sshd: SshServer, host: str, target_port: int) -> Path:
    """Write an ssh_config and tunneld.toml for `host`: one forward with an HTTP check of /health every 1 s."""
    port = free_port_both()
    write_settings(f'[hosts.{host}]\nhealth_interval_s = 1\n\n[hosts.{host}.health]\n"{port}" = "/health"\n')
    return write_config(tmp_path, sshd.client_config(host, [f"LocalForward {port} 127.0.0.1:{target_port}"]))


def test_a_dribbling_target_fails_the_check_at_its_deadline_and_start_says_so(
    tmp_path: Path, sshd: SshServer, engine: str, dribbler: DribblingHttpServer
) -> None:
    config = health_host(tmp_path, sshd, "drip", dribbler.port)
    try:
        started = run_cli("start", "drip", "-F", str(config), "--engine", engine, "--timeout", "15")
        assert started.returncode == 0, started.stderr  # within --timeout: the check ended at its deadline
        assert "drip  degraded  " in started.stdout and LATE in started.stdout, started.stdout
        assert "SIGKILL" not in started.stdout + started.stderr
        state = read_state("drip")
        forward = state["forwards"][0]  # type: ignore[index]
        assert forward["health"]["ok"] is False and forward["health"]["detail"] == LATE, forward
    finally:
        stopped = run_cli("stop", "drip")
    # Periodic checks keep failing at their deadline (every second): a stop still ends them at once.
    assert stopped.returncode == 0 and stopped.stdout.strip() == "drip  stopped", stopped.stdout
    assert read_state("drip")["state"] == "stopped"


def test_a_stop_during_a_dribbling_first_check_ends_it_with_sigterm(
    tmp_path: Path, sshd: SshServer, engine: str, dribbler: DribblingHttpServer, foreground: list[ForegroundTunnel]
) -> None:
    config = health_host(tmp_path, sshd, "dripstop", dribbler.port)
    tunnel = start(foreground, "dripstop", config, engine)
    wait_for(lambda: dribbler.requests >= 1, 30, "the first health check's request at the target")
    assert read_state("dripstop")["state"] == "connecting"  # the first check runs: `up` is not published yet
    stopped = run_cli("stop", "dripstop")
    assert stopped.returncode == 0 and stopped.stdout.strip() == "dripstop  stopped", stopped.stdout  # no SIGKILL
    assert tunnel.wait_exit(5) == 0
    assert read_state("dripstop")["state"] == "stopped"
    assert "health: " not in read_log("dripstop")  # the check was cut short, not recorded as the target's failure


ANSWERS = [
    (b"HTTP/1.1 200 OK\r\n", (True, "HTTP 200 from /health")),
    (b"HTTP/1.0 204\r\n", (True, "HTTP 204 from /health")),
    (b"HTTP/1.1 503 Service Unavailable\r\n", (False, "HTTP 503 from /health")),
    # Only 2xx is healthy: a wrong path (404), a login in front of the app (401, 302 to its page) are not.
    (b"HTTP/1.1 404 Not Found\r\n", (False, "HTTP 404 from /health")),
    (b"HTTP/1.1 401 Unauthorized\r\n", (False, "HTTP 401 from /health")),
    (b"HTTP/1.1 302 Found\r\n", (False, "HTTP 302 from /health")),
    (b"HTTP/1.1 299 Custom\r\n", (True, "HTTP 299 from /health")),
    (b"HTTP/1.1 200 OK\n", (True, "HTTP 200 from /health")),  # a bare LF ends a line too (RFC 9112 allows it)
    (b"HTTP/1.1 2000 OK\r\n", (False, "/health: not an HTTP answer")),
    (b"HTTP/1.1 20 OK\r\n", (False, "/health: not an HTTP answer")),
    (b"HTTP/1.1 +200 OK\r\n", (False, "/health: not an HTTP answer")),
    (b"HTTP/1.1 0200 OK\r\n", (False, "/health: not an HTTP answer")),
    (b"HTTP/1.1 200OK\r\n", (False, "/health: not an HTTP answer")),
    (b"HTTP/ 200 OK\r\n", (False, "/health: not an HTTP answer")),
    (b"SSH-2.0-OpenSSH_9.2\r\n", (False, "/health: not an HTTP answer")),
    (b"HTTP/1.1 200 OK", (False, "/health: not an HTTP answer")),  # closed before the status line ended
]


@pytest.mark.parametrize(("answer", "expected"), ANSWERS, ids=[a.decode().strip() for a, _ in ANSWERS])
def test_a_status_code_is_exactly_three_digits_and_only_2xx_is_healthy(
    answer: bytes, expected: tuple[bool, str]
) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(answer)
        theirs.shutdown(socket.SHUT_WR)
        assert http_get(ours, "/health", "target", Deadline(time.monotonic() + 5, 5)) == expected


def test_a_forward_refused_on_the_link_clears_within_seconds_of_the_target_returning_without_a_client(
    tmp_path: Path, sshd: SshServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    target = EchoServer()
    target_port = target.port
    port = free_port_both()
    config = write_config(tmp_path, sshd.client_config("heal", [f"LocalForward {port} 127.0.0.1:{target_port}"]))
    tunnel = start(foreground, "heal", config, engine)  # no [health] entry: a TCP check after each connect only
    tunnel.wait_state("up")
    target.close()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:  # the one client connection
        client.settimeout(5)
        assert client.recv(1) == b""  # the target refused: ssh's `open failed` (or a refused channel) closes it
    state = tunnel.wait_state("degraded", timeout=10)
    assert "connect failed" in str(state["forwards"][0]["detail"]).lower(), state  # type: ignore[index]
    revived = EchoServer(port=target_port)
    try:
        # No client connects again: the re-check every 5 s through the forward clears the mark.
        state = tunnel.wait_state("up", timeout=15)
        forward = state["forwards"][0]  # type: ignore[index]
        assert forward["state"] == "ok" and forward["health"]["ok"] is True, forward
        if engine == "paramiko":  # it counts client connections: still the one above (checks are not counted)
            assert forward["total_connections"] == 1, forward
    finally:
        revived.close()


def test_a_connection_older_than_the_targets_failure_does_not_clear_degraded(
    tmp_path: Path, sshd: SshServer, foreground: list[ForegroundTunnel]
) -> None:
    """OpenSSH engine: a channel that reached its target proves the target only if it was opened after the failure.
    A connection from before (a browser's keep-alive, a health check still closing) that stays open past the settle
    time, or ends, says nothing about the target now: the forward stays degraded."""
    from tunneld.engines.openssh import CHANNEL_SETTLE_S

    target = EchoServer()
    port = free_port_both()
    config = write_config(tmp_path, sshd.client_config("older", [f"LocalForward {port} 127.0.0.1:{target.port}"]))
    tunnel = start(foreground, "older", config, "openssh")
    tunnel.wait_state("up")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as old:
        old.settimeout(5)
        old.sendall(b"x")
        assert old.recv(1) == b"x"  # its channel is open and reached the target
        target.close()  # the target stops listening; the old connection goes on
        with socket.create_connection(("127.0.0.1", port), timeout=5) as new:
            new.settimeout(5)
            assert new.recv(1) == b""  # refused at the target: ssh's `open failed`
        tunnel.wait_state("degraded", timeout=10)
        time.sleep(CHANNEL_SETTLE_S + 1)  # nothing may happen meanwhile: the old channel outlives the settle time
        assert read_state("older")["state"] == "degraded"
    time.sleep(1)  # the old channel ends (ssh frees it): still nothing that proves the target
    assert read_state("older")["state"] == "degraded"
