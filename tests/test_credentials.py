"""Credentials an unattended tunnel can live with, against a real sshd and a real ssh-agent: an agent emptied
while the tunnel runs makes the host wait in `needs-auth` (no retries against the server on a timer) and a
refilled agent brings it back by itself."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

import tunneld
from tests.harness import EchoServer, SshServer, echo_roundtrip, free_port_both, wait_for
from tests.helpers import ForegroundTunnel, read_state, run_cli, start, write_config, write_settings
from tunneld.config.ports import PortGuard
from tunneld.config.spec import LOCAL, Endpoint, Forward, TunnelSpec
from tunneld.errors import EXIT_CONFIG, NeedsAuthError, TunneldError

UP = ("up", "degraded")


def agent_only_config(tmp_path: Path, sshd: SshServer, alias: str, port: int, target: int) -> tuple[Path, Path]:
    """Move the client key out of IdentityFile's reach: only the agent can offer it. Return (config, key)."""
    hidden = tmp_path / "elsewhere"
    hidden.mkdir()
    key = sshd.client_key.rename(hidden / "id_ed25519")
    text = sshd.client_config(alias, [f"LocalForward {port} 127.0.0.1:{target}"]).replace("  IdentitiesOnly yes\n", "")
    return write_config(tmp_path, text), key


def ssh_add(*args: str) -> None:
    subprocess.run(["ssh-add", "-q", *args], check=True, capture_output=True, env=dict(os.environ))


def refused_logins(sshd: SshServer, since: int) -> int:
    """Logins sshd refused since the mark (it logs `Connection closed by authenticating user ...`)."""
    return sshd.log.read_bytes()[since:].decode(errors="replace").count("by authenticating user")


def closed_at_once(port: int) -> bool:
    """Connect to the local forward: True when the connection is closed without waiting (a refused client)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(3)
        return sock.recv(1) == b""


@pytest.mark.slow
def test_an_emptied_agent_waits_in_needs_auth_and_a_refilled_one_brings_the_tunnel_back(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, agent: Path, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    port = free_port_both()
    config, key = agent_only_config(tmp_path, sshd, "agented", port, echo.port)
    ssh_add(str(key))
    tunnel = start(foreground, "agented", config, engine)
    tunnel.wait_state(*UP)
    ssh_add("-D")  # the agent forgets every key (a lock, a key lifetime, an unplugged token look the same)
    mark = sshd.log_mark()
    sshd.stop()
    sshd.start()  # the link is lost; the reconnect is refused
    state = tunnel.wait_state("needs-auth")
    message = str(state["last_error"]["message"])  # type: ignore[index]
    assert f"the agent has no key for {sshd.user}@127.0.0.1:{sshd.port}" in message, message
    assert "ssh-add" in str(state["last_error"]["hint"])  # type: ignore[index]
    # The ports stay ours (no other local user can take them for the hours this may last: the OpenSSH engine's
    # supervisor holds them while no ssh does) and a client is refused at once instead of hanging.
    assert any(c.laddr.port == port for c in psutil.Process(tunnel.proc.pid).net_connections("tcp"))
    assert closed_at_once(port)
    waited = run_cli("wait", "agented", "--timeout", "30")
    assert waited.returncode == EXIT_CONFIG and "ssh-add" in waited.stderr, waited.stderr
    shown = json.loads(run_cli("status", "agented", "--json").stdout)
    assert shown["hosts"][0]["state"] == "needs-auth"
    before = refused_logins(sshd, mark)
    checked = run_cli("check", "agented", "-F", str(config))
    assert checked.returncode == 1 and "[FAIL] auth" in checked.stdout and "needs your key" in checked.stdout
    assert refused_logins(sshd, mark) == before, "check tried a login of its own while the tunnel waits"
    time.sleep(5)  # two looks at the unchanged agent: no attempt against the server
    assert refused_logins(sshd, mark) <= 2, sshd.log.read_text()[-3000:]
    assert read_state("agented")["state"] == "needs-auth"
    ssh_add(str(key))  # the user loads the key: the next look at the agent brings the link back
    tunnel.wait_state(*UP, timeout=20)
    assert echo_roundtrip(("127.0.0.1", port), b"welcome back") == b"welcome back"
    assert refused_logins(sshd, mark) <= 2, sshd.log.read_text()[-3000:]


def test_a_key_file_the_server_stops_accepting_is_blamed_on_the_server_not_the_agent(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    """The host logs in with an IdentityFile and no agent. The server's authorized_keys loses the key: nothing changed
    on this side, so the wait says so and how to retry, instead of sending the user to an agent they never used."""
    port = free_port_both()
    config = write_config(tmp_path, sshd.client_config("filekey", [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    tunnel = start(foreground, "filekey", config, engine)
    tunnel.wait_state(*UP)
    authorized = sshd.authorized_keys.read_text()
    sshd.authorized_keys.write_text("")
    sshd.stop()
    sshd.start()  # the link is lost; the reconnect is refused
    state = tunnel.wait_state("needs-auth")
    error = state["last_error"]
    assert isinstance(error, dict)
    assert f"refused the key that logged in before, from a file ({sshd.client_key})" in error["message"], error
    assert "authorized_keys" in error["hint"] and "ssh-add" not in error["hint"], error
    sshd.authorized_keys.write_text(authorized)
    assert run_cli("start", "filekey", "-F", str(config)).returncode == 0  # the one retry it asks for
    tunnel.wait_state(*UP)


def test_a_changed_host_key_stays_fatal_for_a_host_that_logged_in_before(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    port = free_port_both()
    config = write_config(tmp_path, sshd.client_config("rekeyed", [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    tunnel = start(foreground, "rekeyed", config, engine)
    tunnel.wait_state(*UP)
    sshd.stop()
    sshd.regenerate_host_key()
    sshd.start()
    assert tunnel.wait_exit(timeout=40) == EXIT_CONFIG
    state = read_state("rekeyed")
    assert state["state"] == "failed" and "CHANGED" in str(state["last_error"]), state


def test_the_login_is_remembered_across_runs_of_the_same_target(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, agent: Path, foreground: list[ForegroundTunnel]
) -> None:
    """Autostart at the next login, before the agent has its keys: the host worked before, so it waits."""
    port = free_port_both()
    config, key = agent_only_config(tmp_path, sshd, "remembered", port, echo.port)
    ssh_add(str(key))
    first = start(foreground, "remembered", config, "openssh")
    first.wait_state(*UP)
    assert read_state("remembered")["logged_in_to"] == f"{sshd.user}@127.0.0.1:{sshd.port}"
    assert first.terminate() == 0
    ssh_add("-D")
    second = start(foreground, "remembered", config, "openssh")
    second.wait_state("needs-auth")
    ssh_add(str(key))
    second.wait_state(*UP, timeout=20)
    wait_for(lambda: read_state("remembered").get("state") in UP, 5, "up")


def test_an_on_demand_port_stays_held_through_a_refused_login(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, agent: Path
) -> None:
    """Any local user may connect to an idle on-demand port and make the daemon log in. With the agent locked the
    login is refused: the port must stay the tunnel's (another user binding it would get the next client), and the
    host waits in needs-auth instead of failing."""
    port = free_port_both()
    config, key = agent_only_config(tmp_path, sshd, "lazy", port, echo.port)
    write_settings("[hosts.lazy]\non_demand = true\nidle_timeout_s = 2\n")
    ssh_add(str(key))
    started = run_cli("start", "lazy", "-F", str(config))
    assert started.returncode == 0 and "lazy  idle" in started.stdout, started.stderr
    ssh_add("-D")
    assert closed_at_once(port)  # the client that woke it is refused at once, not held for hold_connections_s
    wait_for(lambda: read_state("lazy").get("state") == "needs-auth", 20, "needs-auth")
    with pytest.raises(OSError):  # still ours: nobody else can take it
        socket.create_server(("127.0.0.1", port)).close()
    assert closed_at_once(port)
    ssh_add(str(key))
    wait_for(lambda: read_state("lazy").get("state") == "idle", 20, "idle again once the agent has the key")
    assert echo_roundtrip(("127.0.0.1", port), b"lazy but back") == b"lazy but back"
    assert run_cli("stop", "lazy").returncode == 0


def test_ports_held_while_waiting_are_free_the_moment_they_are_let_go() -> None:
    """The OpenSSH engine's ssh binds the forward ports right after needs-auth lets them go. A socket closed while
    the guard's thread still waits in select() stays bound until that select returns, and ssh's bind then fails
    with "address in use" by a holder no process owns: the host would fail where it should have come back."""
    port = free_port_both()
    spec = TunnelSpec(
        alias="held", hostname="127.0.0.1", port=9, user="u",
        forwards=(Forward(LOCAL, Endpoint(host="127.0.0.1", port=port), Endpoint(host="127.0.0.1", port=9)),),
    )  # fmt: skip
    for _ in range(5):
        guard = PortGuard(spec)
        thread = guard._thread
        assert thread is not None and thread.native_id is not None
        wchan = Path(f"/proc/self/task/{thread.native_id}/wchan")
        wait_for(lambda w=wchan: "poll_schedule" in w.read_text(), 10, "the guard's thread to wait in select()")
        guard.release()
        with socket.socket() as ssh_like:  # as ssh binds a forward: SO_REUSEADDR
            ssh_like.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ssh_like.bind(("127.0.0.1", port))
            ssh_like.listen()


def test_ensure_on_a_host_waiting_in_needs_auth_answers_within_its_own_timeout(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, agent: Path
) -> None:
    """ensure() of a host in needs-auth asks for one login attempt, as `start` does; if that attempt meets no server,
    the caller still gets its answer within its own timeout, naming the state, not after the 30 s `start` allows."""
    port = free_port_both()
    config, key = agent_only_config(tmp_path, sshd, "agented", port, echo.port)
    ssh_add(str(key))
    assert run_cli("start", "agented", "-F", str(config)).returncode == 0
    try:
        ssh_add("-D")
        sshd.stop()
        sshd.start()  # the link is lost; the reconnect is refused: needs-auth
        wait_for(lambda: read_state("agented").get("state") == "needs-auth", 30, "needs-auth")
        sshd.stop()  # the attempt ensure() asks for meets no server: connecting, then backoff
        with pytest.raises(TunneldError) as raised:
            tunneld.ensure("agented", ssh_config=str(config), timeout=3)
        error = raised.value
        assert isinstance(error, NeedsAuthError) or "after 3 s" in error.message, error.message
    finally:
        run_cli("stop", "agented")
