"""Host keys, authentication and jump chains (both engines); the paramiko engine's own promises."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from tests.harness import EchoServer, SshServer, echo_roundtrip, free_port, keygen, wait_for
from tests.helpers import (
    ForegroundTunnel,
    expect_fatal,
    read_log,
    read_state,
    run_cli,
    start,
    tunneld_cmd,
    write_config,
    write_settings,
)
from tunneld.config.settings import HostSettings
from tunneld.errors import EXIT_CONFIG

UP = ("up", "degraded")


def test_hashed_known_hosts_with_a_port_entry(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(sshd.known_hosts)], check=True, capture_output=True)
    assert sshd.known_hosts.read_text().startswith("|1|")  # hashed, and the entry is [127.0.0.1]:PORT
    port = free_port()
    config = write_config(tmp_path, sshd.client_config("hashed", [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    start(foreground, "hashed", config, engine).wait_state(*UP)
    assert echo_roundtrip(("127.0.0.1", port), b"hashed") == b"hashed"


def test_host_key_alias_is_honoured(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    sshd.known_hosts.write_text(f"my-alias {sshd.host_public_key()}\n")  # OpenSSH adds no port to an alias
    port = free_port()
    lines = [f"LocalForward {port} 127.0.0.1:{echo.port}"]
    config = write_config(tmp_path, sshd.client_config("aliased", lines, ["HostKeyAlias my-alias"]))
    start(foreground, "aliased", config, engine).wait_state(*UP)


def test_accept_new_saves_the_key_then_refuses_a_changed_one(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    sshd.known_hosts.write_text("")
    port = free_port()
    config = write_config(
        tmp_path, sshd.client_config("new", [f"LocalForward {port} 127.0.0.1:{echo.port}"], strict="accept-new")
    )
    tunnel = start(foreground, "new", config, engine)
    tunnel.wait_state(*UP)
    assert sshd.host_public_key().split()[1] in sshd.known_hosts.read_text()
    assert tunnel.terminate() == 0
    sshd.stop()
    sshd.regenerate_host_key()
    sshd.start()
    expect_fatal(start(foreground, "new", config, engine), "has CHANGED")


@pytest.mark.parametrize("how", ["SSH_AUTH_SOCK", "IdentityAgent"])
def test_agent_authentication(
    tmp_path: Path,
    sshd: SshServer,
    echo: EchoServer,
    agent: Path,
    engine: str,
    foreground: list[ForegroundTunnel],
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    hidden = tmp_path / "elsewhere"
    hidden.mkdir()
    key = sshd.client_key.rename(hidden / "id_ed25519")
    subprocess.run(["ssh-add", "-q", str(key)], check=True, capture_output=True, env=dict(os.environ))
    port = free_port()
    config = sshd.client_config("agent", [f"LocalForward {port} 127.0.0.1:{echo.port}"])
    config = config.replace("  IdentitiesOnly yes\n", "")  # the key file is gone: only the agent has it
    if how == "IdentityAgent":
        config += f"  IdentityAgent {agent}\n"
        monkeypatch.delenv("SSH_AUTH_SOCK")
    start(foreground, "agent", write_config(tmp_path, config), engine).wait_state(*UP)
    assert echo_roundtrip(("127.0.0.1", port), b"agent") == b"agent"


def test_encrypted_key_without_agent_points_at_ssh_add(
    tmp_path: Path, sshd: SshServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    key = keygen(tmp_path / "locked", passphrase="correct horse")
    sshd.authorized_keys.write_text(Path(f"{key}.pub").read_text())
    config = sshd.client_config("locked", [f"LocalForward {free_port()} 127.0.0.1:9"])
    config = config.replace(str(sshd.client_key), str(key))
    expect_fatal(start(foreground, "locked", write_config(tmp_path, config), engine), "ssh-add")


def test_certificate_authentication(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    ca = keygen(tmp_path / "user_ca", "ca")
    subprocess.run(
        ["ssh-keygen", "-q", "-s", str(ca), "-I", "tunneld-test", "-n", sshd.user, "-V", "-5m:+1h",
         f"{sshd.client_key}.pub"],
        check=True, capture_output=True,
    )  # fmt: skip
    assert Path(f"{sshd.client_key}-cert.pub").exists()
    sshd.stop()
    sshd.authorized_keys.write_text("")  # only the CA can vouch for the key
    sshd.extra_config.append(f"TrustedUserCAKeys {ca}.pub")
    sshd.start()
    port = free_port()
    config = write_config(tmp_path, sshd.client_config("cert", [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    start(foreground, "cert", config, engine).wait_state(*UP)
    assert "Accepted publickey" in sshd.log.read_text() and "ED25519-CERT" in sshd.log.read_text()


def test_two_hop_proxyjump(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    hops = [SshServer(tmp_path / f"hop{i}") for i in (1, 2)]
    for hop in hops:
        hop.authorized_keys.write_text(sshd.authorized_keys.read_text())
        hop.start()
    try:
        known = tmp_path / "known_hosts_all"
        known.write_text("".join(s.known_hosts.read_text() for s in (sshd, *hops)))
        config = "".join(
            [
                hops[0].client_config("hop1", []),
                hops[1].client_config("hop2", [], ["ProxyJump hop1"]),
                sshd.client_config("deep", [f"LocalForward {(port := free_port())} 127.0.0.1:{echo.port}"],
                                   ["ProxyJump hop1,hop2"]),
            ]
        )  # fmt: skip
        for server in hops:
            config = config.replace(str(server.client_key), str(sshd.client_key))
        for server in (sshd, *hops):
            config = config.replace(str(server.known_hosts), str(known))
        start(foreground, "deep", write_config(tmp_path, config), engine).wait_state(*UP)
        assert echo_roundtrip(("127.0.0.1", port), b"two hops") == b"two hops"
        assert all("Accepted publickey" in hop.log.read_text() for hop in hops)
    finally:
        for hop in hops:
            hop.stop()


def test_proxycommand(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    """HostName and Port lead nowhere: only the relay, which is told sshd's real port, reaches the server."""
    port, nowhere = free_port(), free_port()
    marker = tmp_path / "relay-used"
    relay = f"ProxyCommand {sys.executable} {Path(__file__).parent / 'relay.py'} %h {sshd.port} {marker}"
    config = sshd.client_config("proxied", [f"LocalForward {port} 127.0.0.1:{echo.port}"], [relay])
    config = config.replace(f"Port {sshd.port}", f"Port {nowhere}")
    (tmp_path / "known_hosts_nowhere").write_text(f"[127.0.0.1]:{nowhere} {sshd.host_public_key()}\n")
    config = config.replace(str(sshd.known_hosts), str(tmp_path / "known_hosts_nowhere"))
    start(foreground, "proxied", write_config(tmp_path, config), engine).wait_state(*UP)
    assert echo_roundtrip(("127.0.0.1", port), b"via ProxyCommand") == b"via ProxyCommand"
    assert marker.read_text().strip() == f"127.0.0.1 {sshd.port}"


async def _many_roundtrips(port: int, count: int, size: int) -> list[bool]:
    payload = os.urandom(size)

    async def one() -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(payload)
            await writer.drain()
            received = await reader.readexactly(size)
            writer.close()
            await writer.wait_closed()
        except (OSError, asyncio.IncompleteReadError):
            return False
        return received == payload

    return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), timeout=120)


@pytest.mark.slow
def test_a_thousand_concurrent_connections_through_one_forward(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, foreground: list[ForegroundTunnel]
) -> None:
    port = free_port()
    config = write_config(tmp_path, sshd.client_config("many", [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    start(foreground, "many", config, "paramiko").wait_state(*UP)
    results = asyncio.run(_many_roundtrips(port, 1000, 16 * 1024))
    assert results.count(False) == 0
    wait_for(lambda: read_state("many")["forwards"][0]["total_connections"] >= 1000, 10, "stats")  # type: ignore[index]


def test_a_connection_made_during_an_outage_is_served_when_the_link_returns(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, foreground: list[ForegroundTunnel]
) -> None:
    port = free_port()
    config = write_config(tmp_path, sshd.client_config("hold", [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    tunnel = start(foreground, "hold", config, "paramiko")
    tunnel.wait_state(*UP)
    sshd.stop()
    tunnel.wait_state("lost", "backoff", "connecting")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:  # not refused: the listener stays
        sock.sendall(b"made while down")
        sshd.start()
        sock.settimeout(15)
        assert sock.recv(100) == b"made while down"
    # The held connection is served as soon as the link attaches; `up` is published after its health check.
    wait_for(lambda: read_state("hold").get("reconnects") == 1, 10, "the reconnect to be recorded")


def test_stats_move_and_reach_status_json(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, foreground: list[ForegroundTunnel]
) -> None:
    port = free_port()
    config = write_config(tmp_path, sshd.client_config("stats", [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    start(foreground, "stats", config, "paramiko").wait_state(*UP)
    for _ in range(3):
        assert echo_roundtrip(("127.0.0.1", port), b"x" * 1000) == b"x" * 1000

    def counted() -> bool:
        forward = json.loads(run_cli("status", "stats", "--json").stdout)["hosts"][0]["forwards"][0]
        return bool(forward["total_connections"] == 3 and forward["bytes_out"] == 3000 and forward["bytes_in"] == 3000)

    wait_for(counted, 15, "the counters to reach the state file")


def test_engine_chosen_per_host_in_tunneld_toml(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, foreground: list[ForegroundTunnel]
) -> None:
    settings = Path(os.environ["TUNNELD_HOME"]) / "config" / "tunneld.toml"
    settings.parent.mkdir(parents=True)
    settings.write_text('engine = "openssh"\n\n[hosts.viatoml]\nengine = "paramiko"\nhold_connections_s = 3\n')
    config = write_config(tmp_path, sshd.client_config("viatoml", [f"LocalForward {free_port()} 127.0.0.1:9"]))
    assert "engine      paramiko" in run_cli("show", "viatoml", "-F", str(config)).stdout
    start(foreground, "viatoml", config, "auto").wait_state(*UP)
    assert read_state("viatoml")["engine"] == "paramiko"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('engine = "telnet"\n', "engine must be one of auto, openssh, paramiko"),
        ("[hosts.x]\nspeed = 3\n", 'unknown setting "speed"'),
        ("hold_connections_s = -1\n", "hold_connections_s must be a number of seconds from 0 to 3600, not -1"),
        ("hold_connections_s = true\n", "not true"),
        ("health_interval_s = 0\n", "health_interval_s must be a number of seconds from 1 to 3600, not 0"),
        ('[hosts.x.health]\n"web" = "/health"\n', 'health key "web" must be a forward\'s local port'),
        ('[hosts.x.health]\n"5000" = "health"\n', 'health.5000 must be "tcp" or an HTTP path such as "/health"'),
        ("engine = \n", "tunneld.toml"),
    ],
)
def test_invalid_settings_are_a_clear_config_error(tmp_path: Path, text: str, needle: str) -> None:
    settings = Path(os.environ["TUNNELD_HOME"]) / "config" / "tunneld.toml"
    settings.parent.mkdir(parents=True)
    settings.write_text(text)
    config = write_config(tmp_path, "Host x\n  LocalForward 5000 localhost:5000\n")
    done = run_cli("show", "x", "-F", str(config))
    assert done.returncode == EXIT_CONFIG
    assert needle in done.stderr and str(settings) in done.stderr


@pytest.mark.parametrize("text", ["engine = \n", "[hosts.x]\nspeed = 3\n"], ids=["broken-toml", "unknown-setting"])
def test_the_hint_for_a_bad_tunneld_toml_lists_every_setting_and_its_values_without_pointing_at_docs(
    tmp_path: Path, text: str
) -> None:
    write_settings(text)
    config = write_config(tmp_path, "Host x\n  LocalForward 5000 localhost:5000\n")
    done = run_cli("show", "x", "-F", str(config))
    assert done.returncode == EXIT_CONFIG, done.stderr
    hint = done.stderr.split("  hint: ", 1)[1]
    assert ".md" not in hint  # a pipx install has no docs/ to read
    assert 'engine = "auto" | "openssh" | "paramiko"' in hint and "hold_connections_s = 0..3600 (seconds)" in hint
    assert "idle_timeout_s = 1..86400 (seconds)" in hint and "on_demand = true | false" in hint
    assert '[hosts.NAME.env] NAME = "http://{local}"' in hint and '[groups] ml = ["host1", "host2"]' in hint
    assert all(setting.name in hint for setting in fields(HostSettings))


def test_without_an_ssh_binary_paramiko_resolves_and_runs(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, foreground: list[ForegroundTunnel]
) -> None:
    port = free_port()
    config = write_config(tmp_path, sshd.client_config("nossh", [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    no_ssh = dict(os.environ, PATH=str(tmp_path / "empty-path"))
    shown = run_cli("show", "nossh", "-F", str(config), env=no_ssh)
    assert shown.returncode == 0, shown.stderr
    assert "resolved by tunneld's own ssh_config reader (no ssh binary on PATH)" in shown.stdout
    assert "engine      paramiko" in shown.stdout and "install openssh-client" in shown.stdout
    proc = subprocess.Popen(tunneld_cmd("run", "nossh", "-F", str(config)), env=no_ssh, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: read_state("nossh").get("state") == "up", 30, "the tunnel without ssh")
        assert echo_roundtrip(("127.0.0.1", port), b"no ssh") == b"no ssh"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert "stopped" in read_log("nossh")


def test_hold_connections_s_is_honoured(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, foreground: list[ForegroundTunnel]
) -> None:
    """A connection made while the server is down is closed after hold_connections_s, not the default 10 s."""
    settings = Path(os.environ["TUNNELD_HOME"]) / "config" / "tunneld.toml"
    settings.parent.mkdir(parents=True)
    settings.write_text("[hosts.held]\nhold_connections_s = 1\n")
    port = free_port()
    config = write_config(tmp_path, sshd.client_config("held", [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    tunnel = start(foreground, "held", config, "paramiko")
    tunnel.wait_state(*UP)
    sshd.stop()
    tunnel.wait_state("lost", "backoff", "connecting")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(6)  # well short of the default hold of 10 s
        assert sock.recv(100) == b""  # closed by tunneld after the 1 s hold, the server still down
    assert "closed a connection to" in read_log("held") and "that waited 1 s" in read_log("held")
