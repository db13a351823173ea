"""Recovery against a real sshd: lost links retried at once, attempts stuck on a dead path replaced."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from tests.harness import EchoServer, SshServer, SwitchableRelay, echo_roundtrip, free_port, wait_for
from tests.helpers import ForegroundTunnel, read_log, read_state, start, write_config

UP = ("up", "degraded")


def test_an_attempt_stuck_on_a_dead_path_is_replaced_when_the_path_returns(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    """The attempt's TCP connect hangs in SYN retransmission (a full accept queue drops SYNs, as a dead path
    does; ConnectTimeout 30 s): once the path is back, the probes that began after a second of waiting see
    it, and a fresh attempt replaces the stuck one instead of waiting for its next SYN."""
    relay = SwitchableRelay((sshd.host, sshd.port))
    try:
        port = free_port()
        text = sshd.client_config("stuck", [f"LocalForward {port} 127.0.0.1:{echo.port}"], ["ConnectTimeout 30"])
        text = text.replace(f"Port {sshd.port}", f"Port {relay.port}")
        (tmp_path / "known_relay").write_text(f"[127.0.0.1]:{relay.port} {sshd.host_public_key()}\n")
        config = write_config(tmp_path, text.replace(str(sshd.known_hosts), str(tmp_path / "known_relay")))
        relay.set_mode("full")
        tunnel = start(foreground, "stuck", config, engine)
        tunnel.wait_state("connecting")
        time.sleep(3.5)  # the attempt's SYNs are dropped; its next retransmission is due about 7 s after the first
        relay.set_mode("forward")  # the path comes back
        tunnel.wait_state(*UP, timeout=20)
        assert "came back while an attempt hung on it" in read_log("stuck")
        assert read_state("stuck")["attempts"] == 0
        assert echo_roundtrip(("127.0.0.1", port), b"fresh path") == b"fresh path"
    finally:
        relay.close()


@pytest.mark.slow
def test_a_lost_link_is_retried_at_once_every_time(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, foreground: list[ForegroundTunnel]
) -> None:
    """Kill the ssh child of a link that held: each time the next attempt starts at once, no growing backoff."""
    port = free_port()
    config = write_config(tmp_path, sshd.client_config("kills", [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    tunnel = start(foreground, "kills", config, "openssh")
    for kill in range(1, 3):
        state = tunnel.wait_state(*UP)
        time.sleep(5.5)  # longer than a flapping link lives: this one held
        pid = state["children"][0]["pid"]  # type: ignore[index]
        psutil.Process(pid).kill()
        wait_for(lambda n=kill: read_state("kills").get("reconnects") == n, 20, f"reconnect {kill}")
    log = read_log("kills")
    assert log.count("ssh was killed (SIGKILL)") == 2
    assert "retrying in" not in log, log
    state = read_state("kills")
    assert state["last_error"] is None and "SIGKILL" in str(state["previous_error"])
    assert echo_roundtrip(("127.0.0.1", port), b"after kills") == b"after kills"
