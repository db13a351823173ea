"""A polite client: what a real sshd sees from a tunnel that keeps failing, counted in sshd's own log.

OpenSSH >= 9.8 penalises an address for every connection that ends before authentication
(PerSourcePenalties) and then refuses all its connections, the user's own `ssh` included. tunneld probes
the first hop only while TCP to it fails, and at most PREAUTH_LIMIT connections a minute may end before
authentication. Each test counts `Connection from` lines minus `Accepted` ones (LogLevel VERBOSE) from
the moment the fault began.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import (
    EchoServer,
    SshServer,
    SwitchableRelay,
    echo_roundtrip,
    free_port,
    free_port_both,
    hold_port,
    ipv6_loopback,
    running_sshd,
    wait_for,
)
from tests.helpers import ForegroundTunnel, read_log, read_state, run_cli, start, write_config
from tunneld.runtime.probes import PREAUTH_LIMIT

UP = ("up", "degraded")


def relayed_config(tmp_path: Path, sshd: SshServer, relay: SwitchableRelay, alias: str, forward: str,
                   extra: tuple[str, ...] = ()) -> Path:  # fmt: skip
    """Return an ssh_config whose host reaches `sshd` through `relay` (known_hosts names the relay's port)."""
    text = sshd.client_config(alias, [forward], list(extra)).replace(f"Port {sshd.port}", f"Port {relay.port}")
    known = tmp_path / f"known_{alias}"
    known.write_text(f"[127.0.0.1]:{relay.port} {sshd.host_public_key()}\n")
    return write_config(tmp_path, text.replace(str(sshd.known_hosts), str(known)))


def preauth_between_attempts(server: SshServer, mark: int, host: str) -> int:
    """Count the server's connections that ended before authentication while no attempt is in flight: in a backoff
    wait with time left, the same wait before and after the log is read. (Mid-attempt, a connection sshd has logged
    but not yet logged in would count as unauthenticated.)"""
    counted: list[int] = []

    def read() -> bool:
        before = read_state(host)
        next_try = before.get("next_try_at")
        if before.get("state") != "backoff" or not isinstance(next_try, (int, float)) or next_try - time.time() < 0.3:
            return False
        count = server.preauth_connections(mark)
        after = read_state(host)
        if after.get("state") != "backoff" or after.get("next_try_at") != next_try:
            return False
        counted.append(count)
        return True

    wait_for(read, 60, f"{host} to wait between attempts", interval=0.02)
    return counted[0]


def attempts(host: str) -> int:
    """Return the failed attempts the host's state file counts."""
    count = read_state(host).get("attempts", 0)
    return count if isinstance(count, int) else 0


@contextlib.contextmanager
def held(port: int) -> Iterator[None]:
    """Listen on port of both loopback families: the server side of a RemoteForward finds it taken (a stale
    session), whichever of 127.0.0.1 and ::1 sshd binds for `localhost`."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(hold_port("127.0.0.1", port))
        if ipv6_loopback():
            stack.enter_context(hold_port("::1", port))
        yield


def test_a_remote_forward_whose_server_port_is_held_costs_no_unauthenticated_connection(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, foreground: list[ForegroundTunnel]
) -> None:
    """The most common RemoteForward failure: every attempt logs in and the server refuses the forward.
    The server answered TCP all along, so nothing is probed (the old code probed it every 0.25 s)."""
    remote = free_port_both()
    config = write_config(tmp_path, sshd.client_config("rfwd", [f"RemoteForward {remote} 127.0.0.1:{echo.port}"]))
    with held(remote):
        mark = sshd.log_mark()
        tunnel = start(foreground, "rfwd", config, "openssh")
        wait_for(lambda: attempts("rfwd") >= 4, 30, "four refused attempts")
        time.sleep(3)  # a backoff wait: the old code probed the live server every 0.25 s during it
        assert preauth_between_attempts(sshd, mark, "rfwd") == 0, sshd.log.read_text()[-3000:]
        state = read_state("rfwd")
        assert state["state"] in ("backoff", "connecting"), state
        assert "remote port forwarding failed" in str(state["last_error"])
        tunnel.terminate()


@pytest.mark.parametrize("engine", ["openssh", "paramiko"])
def test_a_jump_target_that_is_down_is_not_probed_through_the_bastion(
    tmp_path: Path, echo: EchoServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    """ProxyJump to an alias with its own HostName and Port: `show` names that address, the bastion (which
    answers) is never probed, and the target that is down sees nothing."""
    with running_sshd(tmp_path / "bastion") as bastion, running_sshd(tmp_path / "target") as target:
        local = free_port()
        text = bastion.client_config("jb", []) + target.client_config(
            "behind", [f"LocalForward {local} 127.0.0.1:{echo.port}"], ["ProxyJump jb"]
        )
        known = tmp_path / "known_both"
        known.write_text(bastion.known_hosts.read_text() + target.known_hosts.read_text())
        text = text.replace(str(bastion.known_hosts), str(known)).replace(str(target.known_hosts), str(known))
        config = write_config(tmp_path, text)
        shown = run_cli("show", "behind", "-F", str(config))
        assert f"TCP to 127.0.0.1:{bastion.port} (the first ProxyJump hop, jb)" in shown.stdout, shown.stdout
        target_mark = target.log_mark()
        target.stop()
        mark = bastion.log_mark()
        tunnel = start(foreground, "behind", config, engine)
        wait_for(lambda: attempts("behind") >= 3, 40, "three failed attempts")
        time.sleep(2)  # inside a backoff wait
        assert preauth_between_attempts(bastion, mark, "behind") == 0, bastion.log.read_text()[-3000:]
        assert read_state("behind")["state"] in ("backoff", "connecting")
        target.start()
        tunnel.proc.send_signal(signal.SIGUSR1)  # retry now instead of waiting out the grown backoff
        tunnel.wait_state(*UP)
        assert echo_roundtrip(("127.0.0.1", local), b"through the bastion") == b"through the bastion"
        assert bastion.preauth_connections(mark) == 0
        assert target.preauth_connections(target_mark) == 0


@pytest.mark.parametrize("engine", ["openssh", "paramiko"])
def test_an_sshd_restart_costs_at_most_the_probe_that_found_it_back(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    local = free_port()
    config = write_config(tmp_path, sshd.client_config("restart", [f"LocalForward {local} 127.0.0.1:{echo.port}"]))
    tunnel = start(foreground, "restart", config, engine)
    tunnel.wait_state(*UP)
    mark = sshd.log_mark()
    sshd.stop()
    wait_for(lambda: read_state("restart").get("state") == "backoff", 30, "the backoff after the restart began")
    time.sleep(2)  # probes find the server down: refused connects never reach it
    sshd.start()
    tunnel.wait_state(*UP)
    assert echo_roundtrip(("127.0.0.1", local), b"back") == b"back"
    # Overlapping probes: the first answer ends them, one in flight at that moment may answer too. (Whether a probe or
    # a backoff that ran out first found the server back depends on timing: either costs no more than this.)
    assert sshd.preauth_connections(mark) <= 2, sshd.log.read_text()[-3000:]


@pytest.mark.slow
def test_a_flapping_server_stays_within_the_budget(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, foreground: list[ForegroundTunnel]
) -> None:
    """sshd killed and restarted every 1.5 s: each outage may cost the probe that finds the server back, but no
    more than PREAUTH_LIMIT connections a minute may end before authentication, whatever the pattern."""
    local = free_port()
    config = write_config(tmp_path, sshd.client_config("flap", [f"LocalForward {local} 127.0.0.1:{echo.port}"]))
    tunnel = start(foreground, "flap", config, "openssh")
    tunnel.wait_state(*UP)
    mark = sshd.log_mark()
    began = time.monotonic()
    for _ in range(10):
        sshd.stop()
        time.sleep(0.7)
        sshd.start()
        time.sleep(0.8)
    assert time.monotonic() - began < 60, "the flapping took longer than the budget's window: the bound below is weak"
    tunnel.wait_state(*UP, timeout=70)
    assert sshd.preauth_connections(mark) <= PREAUTH_LIMIT, sshd.log.read_text()[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["openssh", "paramiko"])
def test_a_frozen_server_gets_at_most_the_budget_of_stalled_attempts(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    """A frozen sshd's backlog accepts TCP and sends no banner: each attempt stalls for ConnectTimeout (1 s here)
    and the next starts at once, so one stays pending; the budget stops them at PREAUTH_LIMIT a minute."""
    text = sshd.client_config("frozen", [f"LocalForward {free_port()} 127.0.0.1:{echo.port}"], ["ConnectTimeout 1"])
    config = write_config(tmp_path, text)
    mark = sshd.log_mark()
    sshd.freeze()
    try:
        tunnel = start(foreground, "frozen", config, engine)
        wait_for(lambda: "ended before authentication" in read_log("frozen"), 30, "the budget to be used up")
        time.sleep(2)  # the old code kept one attempt a second going, and probed beside them
        tunnel.terminate()
    finally:
        sshd.thaw()
    stalled = read_log("frozen").count("the handshake stalled")
    assert 1 <= stalled <= PREAUTH_LIMIT
    # The thawed sshd takes the stalled connections from its backlog and logs each.
    wait_for(lambda: sshd.preauth_connections(mark) >= stalled, 10, "sshd to take its backlog")
    time.sleep(0.5)
    assert sshd.preauth_connections(mark) <= PREAUTH_LIMIT, sshd.log.read_text()[-4000:]


def test_an_attempt_whose_tcp_connected_is_never_probed(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, foreground: list[ForegroundTunnel]
) -> None:
    """A relay that accepts and says nothing: only the attempts themselves reach it, no probes beside them."""
    relay = SwitchableRelay((sshd.host, sshd.port))
    try:
        relay.set_mode("swallow")
        config = relayed_config(tmp_path, sshd, relay, "swallowed", f"LocalForward {free_port()} 127.0.0.1:{echo.port}",
                                ("ConnectTimeout 3",))  # fmt: skip
        start(foreground, "swallowed", config, "openssh")
        wait_for(lambda: read_log("swallowed").count("the handshake stalled") >= 2, 30, "two stalled attempts")
        attempts = read_log("swallowed").count("the handshake stalled")
        assert relay.accepted <= attempts + 1, f"{relay.accepted} connections for {attempts} stalled attempts"
    finally:
        relay.close()
