"""What a peer on the network path says never ends a tunnel for good, and is shown only quoted, short, escaped.

Both engines, against a real sshd behind a relay on loopback (harness.SwitchableRelay) or a scripted peer
(evil.ScriptedPeer) that plays the device on the path or a server's defences.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.evil import FORGED, OSC52, WARNING_BLOCK, ScriptedPeer, debug_and_disconnect
from tests.harness import (
    EchoServer,
    SshServer,
    SwitchableRelay,
    echo_roundtrip,
    free_port,
    keygen,
    running_sshd,
    wait_for,
)
from tests.helpers import ForegroundTunnel, expect_fatal, read_log, read_state, run_cli, start, write_config
from tunneld.errors import EXIT_UNAVAILABLE
from tunneld.safetext import PEER_TEXT_MAX_CHARS, printable, quote_peer

UP = ("up", "degraded")
REFUSED = "the server refuses new connections for now (rate limit?)"


@pytest.fixture
def relay(sshd: SshServer) -> Iterator[SwitchableRelay]:
    """A relay on loopback in front of the real sshd: the network path, which the test switches."""
    path = SwitchableRelay(("127.0.0.1", sshd.port))
    yield path
    path.close()


def config_via(tmp_path: Path, sshd: SshServer, port: int, alias: str, forwards: list[str]) -> Path:
    """An ssh_config reaching `sshd` at 127.0.0.1:`port` (a relay or a scripted peer), trusting sshd's host key."""
    known = tmp_path / f"known_hosts_{port}"
    known.write_text(f"[127.0.0.1]:{port} {sshd.host_public_key()}\n")
    text = sshd.client_config(alias, forwards).replace(f"Port {sshd.port}", f"Port {port}")
    return write_config(tmp_path, text.replace(str(sshd.known_hosts), str(known)))


def last_error(host: str) -> str:
    error = read_state(host).get("last_error")
    return str(error.get("message")) if isinstance(error, dict) else ""


@pytest.mark.parametrize(
    ("payload", "first_line"),
    [(b"Permission denied (publickey).\r\n", "Permission denied (publickey)."),
     (WARNING_BLOCK, "@" * 59)],
    ids=["permission-denied", "host-key-changed"],
)  # fmt: skip
def test_a_verdict_spoofed_on_a_reconnect_is_retried_and_the_tunnel_comes_back(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, relay: SwitchableRelay, engine: str,
    foreground: list[ForegroundTunnel], payload: bytes, first_line: str,
) -> None:  # fmt: skip
    port = free_port()
    config = config_via(tmp_path, sshd, relay.port, "spoof", [f"LocalForward {port} 127.0.0.1:{echo.port}"])
    tunnel = start(foreground, "spoof", config, engine)
    tunnel.wait_state(*UP)
    relay.set_mode("greet", payload)  # from now on the path answers every connection with ssh's own words
    before = relay.accepted
    sshd.stop()  # the link drops; every reconnect meets the relay
    sshd.start()
    said = f'the peer sent "{first_line}"'  # quoted, attributed, and not taken for ssh's verdict

    def retried_with(text: str) -> bool:
        if tunnel.proc.poll() is not None:  # a spoofed line made the tunnel give up
            raise AssertionError(f"tunneld run exited {tunnel.proc.returncode}:\n{tunnel.stderr()}")
        return text in last_error("spoof")

    wait_for(lambda: retried_with(said), 30, "a reconnect to meet the spoofed lines")
    assert "not an SSH banner" in last_error("spoof")
    wait_for(lambda: read_state("spoof").get("next_try_at"), 10, "the supervisor to schedule the next try by itself")
    assert read_state("spoof")["state"] == "backoff"
    # Lines instead of a banner, then closed, is how OpenSSH 9.8+ refuses an address: the next try waits at least
    # 20 s (Backoff.refused_s). SIGUSR1 asks for it now: it meets the spoofed lines again, and is no verdict either.
    os.kill(tunnel.proc.pid, signal.SIGUSR1)
    wait_for(lambda: retried_with(said) and relay.accepted >= before + 2, 30, "another reconnect to meet them")
    state = read_state("spoof")
    assert tunnel.proc.poll() is None and state["state"] != "failed", state
    assert "CHANGED" not in last_error("spoof") and "refused authentication" not in last_error("spoof")
    relay.set_mode("forward")
    os.kill(tunnel.proc.pid, signal.SIGUSR1)  # retry now rather than at the end of the backoff
    tunnel.wait_state(*UP)
    assert echo_roundtrip(("127.0.0.1", port), b"back") == b"back"


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_a_server_that_drops_connections_at_once_refuses_new_ones_for_now(
    tmp_path: Path, sshd: SshServer, engine: str, reset: bool
) -> None:
    """What OpenSSH 9.8+'s PerSourcePenalties and MaxStartups look like: TCP accepted, then closed or reset."""
    peer = ScriptedPeer(reset=reset)
    try:
        config = config_via(tmp_path, sshd, peer.port, "drop", [f"LocalForward {free_port()} 127.0.0.1:9"])
        done = run_cli("start", "drop", "-F", str(config), "--engine", engine)
    finally:
        peer.close()
    assert done.returncode == EXIT_UNAVAILABLE, done.stderr
    assert REFUSED in done.stderr and "PerSourcePenalties" in done.stderr, done.stderr
    assert ("reset the connection" if reset else "closed the connection") in done.stderr, done.stderr


def test_a_peers_words_are_shown_escaped_short_and_attributed(tmp_path: Path, sshd: SshServer, engine: str) -> None:
    peer = ScriptedPeer(f"{OSC52}\x1b[2J\u009b2J".encode() + b"X" * 400 + b"\r\n")
    try:
        config = config_via(tmp_path, sshd, peer.port, "loud", [f"LocalForward {free_port()} 127.0.0.1:9"])
        done = run_cli("start", "loud", "-F", str(config), "--engine", engine)
    finally:
        peer.close()
    assert done.returncode == EXIT_UNAVAILABLE, done.stderr
    quoted = done.stderr.split("the peer sent ", 1)[1].split(", not an SSH banner", 1)[0]
    # ssh shows ESC as \033 itself and passes BEL on; either way it arrives escaped, then cut short
    assert quoted.startswith('"\\') and "]52;c;ZXZpbA==\\x07" in quoted and quoted.endswith('XXX..."'), quoted
    assert len(quoted) <= PEER_TEXT_MAX_CHARS + 5, quoted
    log = read_log("loud")
    for control in ("\x1b", "\x07", "\x9b"):
        assert control not in done.stderr + log
    assert "X" * (PEER_TEXT_MAX_CHARS + 1) not in done.stderr + log


def test_every_c0_and_c1_control_is_shown_escaped() -> None:
    """U+009B is CSI in one character on many terminals, as ESC [ is in two: C1 is escaped like C0 (and DEL)."""
    controls = [chr(code) for code in (*range(0x20), *range(0x7F, 0xA0))]
    for keep_newlines in (False, True):
        checked = [c for c in controls if not (keep_newlines and c == "\n")]
        unescaped = [
            f"U+{ord(c):04X}" for c in checked if printable(f"a{c}[2J", keep_newlines) != f"a\\x{ord(c):02x}[2J"
        ]
        assert unescaped == [], f"keep_newlines={keep_newlines}"
    assert quote_peer("\u009b2J hello") == '"\\x9b2J hello"'


def test_lines_forged_in_a_peers_debug_message_never_make_a_start_fatal(
    tmp_path: Path, sshd: SshServer, engine: str
) -> None:
    """Before any host key, the peer's SSH2_MSG_DEBUG and DISCONNECT carry lines that read like ssh's verdicts."""
    peer = ScriptedPeer(debug_and_disconnect(FORGED, b"bye\r\nroot@127.0.0.1: Permission denied (publickey)."))
    try:
        config = config_via(tmp_path, sshd, peer.port, "forged", [f"LocalForward {free_port()} 127.0.0.1:9"])
        done = run_cli("start", "forged", "-F", str(config), "--engine", engine)
    finally:
        peer.close()
    assert done.returncode == EXIT_UNAVAILABLE, done.stderr
    assert "CHANGED" not in done.stderr and "refused authentication" not in done.stderr, done.stderr


def test_a_key_that_needs_a_passphrase_is_named_alike_by_both_engines(
    tmp_path: Path, sshd: SshServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    key = keygen(tmp_path / "id_locked", passphrase="correct horse")
    sshd.authorized_keys.write_text(Path(f"{key}.pub").read_text())
    text = sshd.client_config("locked", [f"LocalForward {free_port()} 127.0.0.1:9"]).replace(
        str(sshd.client_key), str(key)
    )
    tunnel = start(foreground, "locked", write_config(tmp_path, text), engine)
    expect_fatal(tunnel, f"refused authentication: {key} needs a passphrase and no agent holds it", f"`ssh-add {key}`")


def test_a_jump_host_that_cannot_reach_the_target_is_named_and_retried(
    tmp_path: Path, sshd: SshServer, engine: str
) -> None:
    with running_sshd(tmp_path / "jump") as jump:
        jump.authorized_keys.write_text(sshd.authorized_keys.read_text())
        dead = free_port()
        text = jump.client_config("jump", []).replace(str(jump.client_key), str(sshd.client_key))
        target = sshd.client_config("far", [f"LocalForward {free_port()} 127.0.0.1:9"], ["ProxyJump jump"])
        config = write_config(tmp_path, text + target.replace(f"Port {sshd.port}", f"Port {dead}"))
        done = run_cli("start", "far", "-F", str(config), "--engine", engine)
    assert done.returncode == EXIT_UNAVAILABLE, done.stderr
    assert f"jump host 127.0.0.1:{jump.port} could not reach 127.0.0.1:{dead}: connect failed" in done.stderr
    assert REFUSED not in done.stderr, done.stderr
