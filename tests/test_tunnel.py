"""`tunneld run` against a real sshd: data flows, reconnects, hangs, fatal errors, clean shutdown."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.harness import EchoServer, SshServer, echo_roundtrip, free_port, ipv6_loopback, wait_for
from tests.helpers import ForegroundTunnel, expect_fatal, read_log, read_state, run_cli, start, write_config

UP = ("up", "degraded")


def test_forward_carries_data_end_to_end(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    port = free_port()
    config = write_config(tmp_path, sshd.client_config("mlflowserver", [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    tunnel = start(foreground, "mlflowserver", config, engine)
    state = tunnel.wait_state(*UP)
    payload = os.urandom(1 << 20)
    assert echo_roundtrip(("127.0.0.1", port), payload, timeout=20) == payload
    forwards = state["forwards"]
    assert isinstance(forwards, list)
    assert any(f"127.0.0.1:{port}" in f["listen"] for f in forwards)


def test_several_local_forwards_all_listen(
    tmp_path: Path, sshd: SshServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    targets = [EchoServer() for _ in range(3)]
    try:
        ports = [free_port() for _ in targets]
        lines = [f"LocalForward {p} 127.0.0.1:{t.port}" for p, t in zip(ports, targets, strict=True)]
        tunnel = start(foreground, "multi", write_config(tmp_path, sshd.client_config("multi", lines)), engine)
        state = tunnel.wait_state(*UP)
        assert len(state["forwards"]) == 3  # type: ignore[arg-type]
        for port in ports:
            assert echo_roundtrip(("127.0.0.1", port), f"to {port}".encode()) == f"to {port}".encode()
    finally:
        for target in targets:
            target.close()


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_ipv6_bind_forward(tmp_path: Path, sshd: SshServer, engine: str, foreground: list[ForegroundTunnel]) -> None:
    target = EchoServer("::1")
    try:
        port = free_port("::1")
        line = f"LocalForward [::1]:{port} [::1]:{target.port}"
        tunnel = start(foreground, "v6", write_config(tmp_path, sshd.client_config("v6", [line])), engine)
        state = tunnel.wait_state(*UP)
        assert state["forwards"][0]["listen"] == [f"[::1]:{port}"]  # type: ignore[index]
        assert echo_roundtrip(("::1", port), b"over v6") == b"over v6"
    finally:
        target.close()


def test_unix_socket_forward(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    sock_path = tmp_path / "fwd.sock"
    line = f"LocalForward {sock_path} 127.0.0.1:{echo.port}"
    tunnel = start(foreground, "unix", write_config(tmp_path, sshd.client_config("unix", [line])), engine)
    state = tunnel.wait_state(*UP)
    assert state["forwards"][0]["listen"] == [str(sock_path)]  # type: ignore[index]
    assert echo_roundtrip(str(sock_path), b"through a socket") == b"through a socket"


def stale_socket(path: Path) -> Path:
    """Leave a socket file at `path` that nobody listens on (what a killed program leaves behind)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
    return path


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a socket file of another user")
def test_another_users_stale_socket_at_the_forward_path_is_refused_naming_the_owner(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    path = stale_socket(tmp_path / "fwd.sock")
    os.chown(path, 65534, 65534)
    owner = f"user {pwd.getpwuid(65534).pw_name} (uid 65534)"
    line = f"LocalForward {path} 127.0.0.1:{echo.port}"
    config = write_config(tmp_path, sshd.client_config("us", [line]))
    checked = run_cli("check", "us", "-F", str(config), "--engine", engine)
    assert checked.returncode == 1 and f"[FAIL] local port {path} is already in use by a socket file of {owner}" in (
        checked.stdout
    ), checked.stdout
    stderr = expect_fatal(
        start(foreground, "us", config, engine),
        f"local socket path {path} holds a stale socket of {owner}",
        f"ask {owner} (or root) to remove it",
    )
    assert "crashed" not in stderr and "Traceback" not in stderr
    assert path.lstat().st_uid == 65534  # another user's file is left alone


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a socket file of another user")
def test_a_live_socket_of_another_user_at_the_forward_path_names_its_process_and_owner(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    path = tmp_path / "fwd.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen()
        os.chown(path, 65534, 65534)
        line = f"LocalForward {path} 127.0.0.1:{echo.port}"
        expect_fatal(
            start(foreground, "live", write_config(tmp_path, sshd.client_config("live", [line])), engine),
            f"local socket {path} is already in use by {psutil.Process().name()} (pid {os.getpid()}); "
            f"the socket file belongs to user {pwd.getpwuid(65534).pw_name} (uid 65534)",
        )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for chattr")
def test_a_stale_socket_that_cannot_be_removed_is_a_clear_error(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    directory = tmp_path / "sockets"
    directory.mkdir()
    path = stale_socket(directory / "fwd.sock")
    if subprocess.run(["chattr", "+a", str(directory)], capture_output=True, check=False).returncode != 0:
        pytest.skip("this file system has no append-only directories (chattr +a)")
    try:
        line = f"LocalForward {path} 127.0.0.1:{echo.port}"
        stderr = expect_fatal(
            start(foreground, "ro", write_config(tmp_path, sshd.client_config("ro", [line])), engine),
            f"local socket path {path} holds a stale socket that tunneld cannot remove: Operation not permitted",
        )
        assert "crashed" not in stderr and "Traceback" not in stderr
    finally:
        subprocess.run(["chattr", "-a", str(directory)], check=True)


def test_proxyjump_through_a_bastion(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    bastion = SshServer(tmp_path / "bastion")
    # One client key for both servers, as a user would have.
    bastion.authorized_keys.write_text(sshd.authorized_keys.read_text())
    bastion.start()
    try:
        port = free_port()
        known = tmp_path / "known_hosts_both"
        known.write_text(sshd.known_hosts.read_text() + bastion.known_hosts.read_text())
        config = bastion.client_config("bastion", []).replace(str(bastion.client_key), str(sshd.client_key))
        config += sshd.client_config("behind", [f"LocalForward {port} 127.0.0.1:{echo.port}"], ["ProxyJump bastion"])
        config = config.replace(str(bastion.known_hosts), str(known)).replace(str(sshd.known_hosts), str(known))
        tunnel = start(foreground, "behind", write_config(tmp_path, config), engine)
        tunnel.wait_state(*UP)
        assert echo_roundtrip(("127.0.0.1", port), b"via bastion") == b"via bastion"
        assert "Accepted publickey" in bastion.log.read_text()
    finally:
        bastion.stop()


def test_server_restart_is_survived_without_action(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    port = free_port()
    config = write_config(tmp_path, sshd.client_config("restarts", [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    tunnel = start(foreground, "restarts", config, engine)
    tunnel.wait_state(*UP)
    sshd.stop()
    tunnel.wait_state("lost", "backoff", "connecting")
    sshd.start()
    state = tunnel.wait_state(*UP)
    assert state["reconnects"] == 1
    assert echo_roundtrip(("127.0.0.1", port), b"after restart") == b"after restart"
    log = read_log("restarts")
    for word in ("link lost", "retrying", "connected", "is up on"):
        assert word in log, log


def test_frozen_server_is_detected_by_keepalive(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    port = free_port()
    # The user's own keepalive (1 s x 2) is honoured; tunneld's default (3 s x 3) is measured in `make bench`.
    extra = ["ServerAliveInterval 1", "ServerAliveCountMax 2", "ConnectTimeout 2"]
    config = sshd.client_config("frozen", [f"LocalForward {port} 127.0.0.1:{echo.port}"], extra)
    tunnel = start(foreground, "frozen", write_config(tmp_path, config), engine)
    tunnel.wait_state(*UP)
    frozen_at = time.monotonic()
    sshd.freeze()
    try:
        tunnel.wait_state("lost", "backoff", "connecting", timeout=20)
        noticed_s = time.monotonic() - frozen_at
        # 1 s x 2 without a reply is the budget (plus a reply's flight); both engines must stay within 2 s of it.
        assert noticed_s <= 1 * 2 + 2 + 2, f"a hung server took {noticed_s:.1f} s to notice"
        # The state is published before the log line is flushed: wait for it rather than read it once.
        wait_for(lambda: "not responding" in read_log("frozen") or "Timeout" in read_log("frozen"), 5, "the log")
    finally:
        sshd.thaw()
    tunnel.wait_state(*UP, timeout=30)
    assert echo_roundtrip(("127.0.0.1", port), b"thawed") == b"thawed"


def test_refused_key_exits_78_once(
    tmp_path: Path, sshd: SshServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    sshd.authorized_keys.write_text("")
    config = write_config(tmp_path, sshd.client_config("refused", [f"LocalForward {free_port()} 127.0.0.1:9"]))
    expect_fatal(start(foreground, "refused", config, engine), "refused authentication", "hint: ", "authorized_keys")
    assert sshd.log.read_text().count("closed by authenticating user") == 1  # one handshake only


def test_changed_host_key_exits_78(
    tmp_path: Path, sshd: SshServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    sshd.stop()
    sshd.regenerate_host_key()  # known_hosts still holds the old key
    sshd.start()
    config = write_config(tmp_path, sshd.client_config("changed", [f"LocalForward {free_port()} 127.0.0.1:9"]))
    # The remedy names the known_hosts file ssh really uses here, and the -F file to test with.
    expect_fatal(
        start(foreground, "changed", config, engine),
        "has CHANGED",
        f"ssh-keygen -f {sshd.known_hosts} -R '[127.0.0.1]:{sshd.port}'",
        f"ssh -F {config} changed",
    )


def test_unknown_host_key_with_strict_checking_exits_78(
    tmp_path: Path, sshd: SshServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    sshd.known_hosts.write_text("")
    config = write_config(tmp_path, sshd.client_config("unknown", [f"LocalForward {free_port()} 127.0.0.1:9"]))
    expect_fatal(start(foreground, "unknown", config, engine), "not in known_hosts", "accept-new")


def test_taken_port_names_the_process_holding_it(
    tmp_path: Path, sshd: SshServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    port = free_port()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import socket,time;s=socket.socket();s.bind(('127.0.0.1',{port}));s.listen();"
            "print('ok',flush=True);time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"ok"
        config = write_config(tmp_path, sshd.client_config("taken", [f"LocalForward 127.0.0.1:{port} 127.0.0.1:9"]))
        stderr = expect_fatal(start(foreground, "taken", config, engine), f"local port {port}")
        assert f"pid {holder.pid}" in stderr and psutil.Process(holder.pid).name() in stderr
    finally:
        holder.kill()
        holder.wait()


def test_refusing_target_marks_the_forward_degraded(
    tmp_path: Path, sshd: SshServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    port, dead_port = free_port(), free_port()
    config = write_config(tmp_path, sshd.client_config("deg", [f"LocalForward {port} 127.0.0.1:{dead_port}"]))
    tunnel = start(foreground, "deg", config, engine)
    tunnel.wait_state("degraded")  # the health check after connecting found it before any user did
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(5)
        assert sock.recv(1) == b""  # ssh closes our side when the target refuses
    state = tunnel.wait_state("degraded", timeout=10)
    assert "connect failed" in str(state["forwards"][0]["detail"])  # type: ignore[index]
    # degraded is still up: the link works, only the target refuses (scripts must not wait forever on it)
    assert run_cli("status", "deg").returncode == 0
    assert run_cli("wait", "deg", "--timeout", "5").returncode == 0
    target = EchoServer(port=dead_port)  # the service comes back: the next connection clears it
    try:
        assert echo_roundtrip(("127.0.0.1", port), b"back") == b"back"
        tunnel.wait_state("up", timeout=10)
    finally:
        target.close()


def test_sigterm_stops_cleanly_with_no_ssh_left(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    port = free_port()
    config = write_config(tmp_path, sshd.client_config("term", [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    tunnel = start(foreground, "term", config, engine)
    tunnel.wait_state(*UP)
    children = tunnel.ssh_children()
    assert tunnel.terminate() == 0
    wait_for(lambda: not any(psutil.pid_exists(pid) for pid in children), 5, "ssh children to exit")
    assert read_state("term")["state"] == "stopped"
    assert not (Path(os.environ["TUNNELD_HOME"]) / "state" / "term.pid").exists()


@pytest.mark.slow
def test_a_server_that_never_sends_a_banner_is_transient_for_both_engines(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    """A port that accepts TCP but never speaks SSH (a frozen sshd, another service): retried, never a crash."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes the TCP handshake; nothing ever answers
        port = free_port()
        text = sshd.client_config("mute", [f"LocalForward {port} 127.0.0.1:{echo.port}"], ["ConnectTimeout 2"])
        config = write_config(tmp_path, text.replace(f"Port {sshd.port}", f"Port {silent.getsockname()[1]}"))
        done = subprocess.run(
            [sys.executable, "-m", "tunneld", "start", "mute", "-F", str(config), "--engine", engine],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 69, done.stderr
        assert "Traceback" not in done.stderr and "Error: " in done.stderr
        tunnel = start(foreground, "mute", config, engine)

        def retried() -> bool:
            assert tunnel.proc.poll() is None, tunnel.stderr()  # a stalled handshake never ends the supervisor
            state = read_state("mute")  # this supervisor's, not what the failed `start` left
            return state.get("pid") == tunnel.proc.pid and isinstance(state["attempts"], int) and state["attempts"] >= 1

        wait_for(retried, 30, "an attempt that stalled, counted")
        assert read_state("mute")["state"] in ("connecting", "backoff")  # the next one starts at once
        assert "Traceback" not in tunnel.stderr()
