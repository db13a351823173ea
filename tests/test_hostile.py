"""A hostile server, local user or file gets nothing: host keys, reach-back, escapes, files, signals, limits."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.evil import AgentSnoopingServer, EscapeGreeter
from tests.harness import (
    EchoServer,
    FloodServer,
    SshServer,
    echo_roundtrip,
    free_port,
    hold_port,
    keygen,
    wait_for,
)
from tests.helpers import (
    ForegroundTunnel,
    expect_fatal,
    read_log,
    read_state,
    run_cli,
    start,
    state_dir,
    write_config,
)
from tunneld.config.credentials import agent_identities, control_socket_peer
from tunneld.config.keys import probe_agent
from tunneld.engines.knownhosts import evaluate
from tunneld.errors import EXIT_CONFIG, EXIT_RUNTIME

UP = ("up", "degraded")
ESCAPES = ("\x1b", "\x07", "\x9b")


def other_key(tmp_path: Path) -> str:
    """Return `type base64` of a key that is not the server's."""
    keygen(tmp_path / "impostor", "impostor")
    return " ".join((tmp_path / "impostor.pub").read_text().split()[:2])


# -- host keys -------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["accept-new", "no"])
def test_a_pattern_entry_with_another_key_is_changed_and_never_appended(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, policy: str, foreground: list[ForegroundTunnel]
) -> None:
    line = f"[127.0.0.*]:{sshd.port} {other_key(tmp_path)}\n"
    sshd.known_hosts.write_text(line)
    text = sshd.client_config("pat", [f"LocalForward {free_port()} 127.0.0.1:{echo.port}"], strict=policy)
    expect_fatal(start(foreground, "pat", write_config(tmp_path, text), engine), "CHANGED")
    assert sshd.known_hosts.read_text() == line


def test_a_negated_pattern_does_not_match(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    """`pattern,!this-host` vetoes the line: the key is new (accept-new learns it), not changed."""
    line = f"[127.0.0.*]:{sshd.port},![127.0.0.1]:{sshd.port} {other_key(tmp_path)}\n"
    sshd.known_hosts.write_text(line)
    port = free_port()
    text = sshd.client_config("neg", [f"LocalForward {port} 127.0.0.1:{echo.port}"], strict="accept-new")
    start(foreground, "neg", write_config(tmp_path, text), engine).wait_state(*UP)
    assert echo_roundtrip(("127.0.0.1", port), b"learned") == b"learned"
    assert sshd.host_public_key() in sshd.known_hosts.read_text()


@pytest.mark.parametrize("policy", ["yes", "no"])
def test_a_revoked_key_is_refused_whatever_the_policy(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, policy: str, foreground: list[ForegroundTunnel]
) -> None:
    sshd.known_hosts.write_text(f"@revoked * {sshd.host_public_key()}\n" + sshd.known_hosts.read_text())
    text = sshd.client_config("rev", [f"LocalForward {free_port()} 127.0.0.1:{echo.port}"], strict=policy)
    expect_fatal(start(foreground, "rev", write_config(tmp_path, text), engine), "REVOKED")


def test_a_revoked_other_key_of_the_same_type_leaves_the_servers_key_trusted(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, foreground: list[ForegroundTunnel]
) -> None:
    """`@revoked` names one key, not a key type: another ed25519 key revoked for every host refuses nobody else."""
    sshd.known_hosts.write_text(f"@revoked * {other_key(tmp_path)}\n" + sshd.known_hosts.read_text())
    port = free_port()
    text = sshd.client_config("revother", [f"LocalForward {port} 127.0.0.1:{echo.port}"])
    start(foreground, "revother", write_config(tmp_path, text), "paramiko").wait_state(*UP)
    assert echo_roundtrip(("127.0.0.1", port), b"trusted") == b"trusted"


def test_revoked_is_decided_by_the_key_blob_whatever_other_lines_say(tmp_path: Path) -> None:
    good_type, good = other_key(tmp_path).split()
    keygen(tmp_path / "revoked", "revoked")
    revoked = (tmp_path / "revoked.pub").read_text().split()[1]
    blob = base64.b64decode(good)
    known = tmp_path / "known_hosts"
    known.write_text(f"@revoked server {good_type} {revoked}\nserver {good_type} {good}\n")
    verdict = evaluate("server", good_type, blob, [known])
    assert (verdict.matches, verdict.revoked_in) == (True, None), verdict  # another ed25519 key was revoked
    known.write_text(f"server {good_type} {good}\n@revoked server {good_type} {good}\n")
    verdict = evaluate("server", good_type, blob, [known])
    assert verdict.revoked_in == f"{known} line 2", verdict  # this very key: refused although line 1 accepts it


def test_a_changed_key_under_strict_no_is_fatal_for_openssh_too(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, foreground: list[ForegroundTunnel]
) -> None:
    """ssh itself only disables forwarding ("host key check failure"): that is a host-key error, not 69."""
    sshd.known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {other_key(tmp_path)}\n")
    text = sshd.client_config("chg", [f"LocalForward {free_port()} 127.0.0.1:{echo.port}"], strict="no")
    expect_fatal(start(foreground, "chg", write_config(tmp_path, text), "openssh"), "CHANGED")


def test_a_cert_authority_line_makes_paramiko_refuse_instead_of_learning(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, foreground: list[ForegroundTunnel]
) -> None:
    line = f"@cert-authority [127.0.0.1]:{sshd.port} {other_key(tmp_path)}\n"
    sshd.known_hosts.write_text(line)
    text = sshd.client_config("ca", [f"LocalForward {free_port()} 127.0.0.1:{echo.port}"], strict="accept-new")
    expect_fatal(
        start(foreground, "ca", write_config(tmp_path, text), "paramiko"), "@cert-authority", "--engine openssh"
    )
    assert sshd.known_hosts.read_text() == line


def test_known_hosts_command_stops_trust_on_first_use_in_paramiko(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, foreground: list[ForegroundTunnel]
) -> None:
    sshd.known_hosts.write_text("")
    extra = ["KnownHostsCommand /bin/true"]
    text = sshd.client_config("khc", [f"LocalForward {free_port()} 127.0.0.1:{echo.port}"], extra, "accept-new")
    expect_fatal(start(foreground, "khc", write_config(tmp_path, text), "paramiko"), "KnownHostsCommand")
    assert sshd.known_hosts.read_text() == ""


def _client_proposal(log: str, what: str) -> list[str]:
    """Return the list a client offered for `what` (`ciphers ctos`, `MACs ctos`, ...) in sshd's DEBUG2 log."""
    client_part = log.split("peer client KEXINIT proposal", 1)[1]  # sshd logs its own proposal first
    line = next(line for line in client_part.splitlines() if f"debug2: {what}: " in line)
    return line.split(f"{what}: ", 1)[1].split()[0].split(",")


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        ([], lambda c, m: not {"3des-cbc", "aes128-cbc", "aes256-cbc"} & set(c) and "hmac-md5" not in m),
        (["Ciphers ^aes256-ctr"], lambda c, m: c[0] == "aes256-ctr"),
        (["Ciphers -*gcm*"], lambda c, m: not any("gcm" in x for x in c) and "aes128-ctr" in c),
        (["MACs hmac-sha2-512"], lambda c, m: m == ["hmac-sha2-512"]),
    ],
)
def test_paramiko_offers_only_what_openssh_would(
    tmp_path: Path, echo: EchoServer, foreground: list[ForegroundTunnel], extra: list[str], check: object
) -> None:
    server = SshServer(tmp_path / "sshd")
    server.log_level = "DEBUG2"  # sshd logs each client's proposal
    server.start()
    try:
        text = server.client_config("alg", [f"LocalForward {free_port()} 127.0.0.1:{echo.port}"], extra)
        start(foreground, "alg", write_config(tmp_path, text), "paramiko").wait_state(*UP)
    finally:
        server.stop()
    log = server.log.read_text()
    ciphers, macs = _client_proposal(log, "ciphers ctos"), _client_proposal(log, "MACs ctos")
    assert callable(check) and check(ciphers, macs), (ciphers, macs)
    assert "hmac-sha1-96" not in macs


# -- the link is a tunnel and nothing else ----------------------------------------------------------


BANNER_WITH_ESCAPES = "welcome\x1b]52;c;ZXZpbA==\x07\x1b[2J\n"


@pytest.fixture
def evil(tmp_path: Path) -> Iterator[AgentSnoopingServer]:
    server = AgentSnoopingServer(tmp_path / "evil", banner=BANNER_WITH_ESCAPES)
    yield server
    server.close()


def test_forward_agent_yes_lends_the_server_nothing(
    tmp_path: Path,
    evil: AgentSnoopingServer,
    agent: Path,
    engine: str,
    foreground: list[ForegroundTunnel],
) -> None:
    subprocess.run(["ssh-add", "-q", str(evil.client_key)], check=True, capture_output=True, env=dict(os.environ))
    text = evil.client_config(
        "snoop", [f"LocalForward {free_port()} 127.0.0.1:9"], ["ForwardAgent yes", "ForwardX11 yes"]
    )
    config = write_config(tmp_path, text)
    tunnel = start(foreground, "snoop", config, engine)
    tunnel.wait_state(*UP)
    assert evil.done.wait(15), "the server never got to try"
    assert evil.outcome == "refused", evil.outcome
    shown = run_cli("show", "snoop", "-F", str(config), "--engine", engine).stdout
    assert "ForwardAgent" in shown and "ignored" in shown


def test_control_characters_from_a_server_never_reach_the_terminal_or_log(
    tmp_path: Path, evil: AgentSnoopingServer, engine: str
) -> None:
    greeter = EscapeGreeter()
    try:
        text = evil.client_config("esc", [f"LocalForward {free_port()} 127.0.0.1:9"], []).replace(
            f"Port {evil.port}", f"Port {greeter.port}"
        )
        text += evil.client_config("banner", [f"LocalForward {free_port()} 127.0.0.1:9"], [])
        config = write_config(tmp_path, text)
        done = run_cli("start", "esc", "-F", str(config), "--engine", engine, "-v")
        assert done.returncode != 0
        banner = run_cli("start", "banner", "-F", str(config), "--engine", engine, "-v")
        assert banner.returncode == 0, banner.stderr
        run_cli("stop", "banner")
        for shown in (done.stdout, done.stderr, banner.stdout, banner.stderr, read_log("esc"), read_log("banner")):
            assert not any(c in shown for c in ESCAPES), repr(shown)
        logs = run_cli("logs", "esc", "-n", "200").stdout + run_cli("status").stdout
        assert not any(c in logs for c in ESCAPES), repr(logs)
    finally:
        greeter.close()


# -- local ports -------------------------------------------------------------------------------------


def test_during_a_reconnect_openssh_frees_the_local_port_and_paramiko_keeps_it(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, foreground: list[ForegroundTunnel]
) -> None:
    """What docs/security.md says another local user can do while the server is away, and what `check` shows."""
    port = free_port()
    config = write_config(tmp_path, sshd.client_config("rc", [f"LocalForward 127.0.0.1:{port} 127.0.0.1:{echo.port}"]))
    tunnel = start(foreground, "rc", config, engine)
    tunnel.wait_state("up")
    sshd.stop()
    tunnel.wait_state("backoff", "connecting")

    def check() -> str:
        return run_cli("check", "rc", "-F", str(config), "--engine", engine).stdout

    if engine == "paramiko":
        assert f"[ ok ] local port 127.0.0.1:{port} held by this host's running tunnel (pid" in check()
        with pytest.raises(OSError), hold_port("127.0.0.1", port):
            pass
        return
    assert f"[ ok ] local port 127.0.0.1:{port} free" in check()
    with hold_port("127.0.0.1", port):  # any local user's program can take it now
        assert f"[FAIL] local port 127.0.0.1:{port} is already in use by {psutil.Process().name()}" in check()
        sshd.start()
        wait_for(lambda: "already in use" in str(read_state("rc").get("last_error")), 30, "the conflict in status")
        assert read_state("rc")["state"] != "up"


# -- files tunneld writes and reads ------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path, sshd: SshServer, echo: EchoServer) -> Iterator[Path]:
    path = write_config(tmp_path, sshd.client_config("h", [f"LocalForward {free_port()} 127.0.0.1:{echo.port}"]))
    yield path
    run_cli("stop", "--all", "--timeout", "5")


def test_a_symlinked_state_directory_is_refused(tmp_path: Path, config: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    state_dir().parent.mkdir(parents=True, exist_ok=True)
    state_dir().symlink_to(elsewhere)
    done = run_cli("start", "h", "-F", str(config))
    assert done.returncode == EXIT_CONFIG and "symbolic link" in done.stderr, done.stderr
    assert list(elsewhere.iterdir()) == []


def test_a_loose_state_directory_is_tightened(config: Path) -> None:
    state_dir().mkdir(parents=True)
    state_dir().chmod(0o755)
    assert run_cli("start", "h", "-F", str(config)).returncode == 0
    assert stat.S_IMODE(state_dir().stat().st_mode) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a directory of another user")
def test_a_state_directory_of_another_user_is_refused(config: Path) -> None:
    state_dir().mkdir(parents=True)
    os.chown(state_dir(), 65534, 65534)
    done = run_cli("start", "h", "-F", str(config))
    assert done.returncode == EXIT_CONFIG and "belongs to uid 65534" in done.stderr, done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a link or directory of another user")
@pytest.mark.parametrize("form", ["link of another user", "link into a directory of another user"])
@pytest.mark.parametrize("verb", [["status"], ["stop", "--all"], ["start", "h"], ["run", "h"]])
def test_a_tunneld_home_another_user_could_redirect_is_refused(tmp_path: Path, form: str, verb: list[str]) -> None:
    """Whoever can re-point TUNNELD_HOME can hide a running tunnel from `status` and `stop`. (`run HOST` is
    what autostart runs: `python -m tunneld` takes it past the CLI, to the light entry point.)"""
    theirs = tmp_path / "theirs"
    mine = theirs / "mine" if "into" in form else tmp_path / "mine"
    mine.mkdir(parents=True, mode=0o700)
    link = tmp_path / "th"
    link.symlink_to(mine)
    if "into" in form:
        os.chown(theirs, 65534, 65534)
        needle = f"lies in {theirs}, which belongs to uid 65534"
    else:
        os.lchown(link, 65534, 65534)
        needle = f"goes through the symbolic link {link}, which belongs to uid 65534"
    config = write_config(tmp_path, "Host h\n  LocalForward 5000 localhost:5000\n")
    done = run_cli(*verb, env=dict(os.environ, TUNNELD_HOME=str(link), TUNNELD_SSH_CONFIG=str(config)))
    assert done.returncode == EXIT_CONFIG and needle in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and list(mine.iterdir()) == []


def test_a_tunneld_home_that_is_your_link_to_your_directory_is_used(tmp_path: Path, config: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    link = tmp_path / "th"
    link.symlink_to(mine)
    env = dict(os.environ, TUNNELD_HOME=str(link))
    started = run_cli("start", "h", "-F", str(config), env=env)
    assert started.returncode == 0, started.stderr
    assert (mine / "state" / "h.pid").exists()
    assert run_cli("status", "h", env=env).returncode == 0
    assert run_cli("stop", "h", env=env).returncode == 0


@pytest.mark.parametrize("name", ["h.log", "h.lock"])
def test_a_planted_symlink_is_never_written_through(tmp_path: Path, config: Path, name: str) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    state_dir().mkdir(parents=True)
    (state_dir() / name).symlink_to(victim)
    done = run_cli("start", "h", "-F", str(config))
    assert done.returncode == EXIT_CONFIG and "symbolic link" in done.stderr, done.stderr
    assert victim.read_text() == "precious\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644


def test_the_log_stays_private_after_rotation(tmp_path: Path) -> None:
    from tunneld.state.logfile import LOG_FORMAT, PrivateRotatingFileHandler, SafeFormatter

    path = tmp_path / "h.log"
    handler = PrivateRotatingFileHandler(path, max_bytes=200, backups=2)
    handler.setFormatter(SafeFormatter(LOG_FORMAT))
    logger = logging.getLogger("test.rotation")
    logger.addHandler(handler)
    try:
        for i in range(40):
            logger.warning("line %d with a forged\nnewline and \x1b]52;c;x\x07", i)
    finally:
        logger.removeHandler(handler)
        handler.close()
    files = sorted(tmp_path.glob("h.log*"))
    assert len(files) == 3
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
        text = file.read_text()
        assert "\x1b" not in text and "\x07" not in text and "forged\\x0anewline" in text
        assert len(file.read_bytes()) <= 200, file
    assert "line 39 " in path.read_text()  # the newest line is in the live file, older ones rotated out
    assert "line 0 " not in "".join(file.read_text() for file in files)


def sleeper(user: int | None = None) -> subprocess.Popen[bytes]:
    """A process that is not tunneld, as a victim a forged file might name."""
    return subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL, user=user)


def forge_pid_file(host: str, pid: int) -> None:
    """Write a pid file naming `pid` with its true create time, as an attacker editing it would."""
    created = psutil.Process(pid).create_time()
    state_dir().mkdir(parents=True)
    record = {"pid": pid, "create_time": created, "host": host, "engine": "openssh", "started_at": 0}
    (state_dir() / f"{host}.pid").write_text(json.dumps(record))


def test_a_forged_pid_file_never_gets_another_process_killed() -> None:
    victim = sleeper()
    try:
        forge_pid_file("h", victim.pid)
        done = run_cli("stop", "h")
        assert done.returncode == 0 and "stale" in done.stdout, done.stdout + done.stderr
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_a_forged_state_file_never_gets_its_children_killed(config: Path) -> None:
    victim = sleeper()
    try:
        created = psutil.Process(victim.pid).create_time()
        state_dir().mkdir(parents=True)
        child = {"pid": victim.pid, "create_time": created, "name": "ssh", "cmdline": ["ssh", "-N", "h"]}
        (state_dir() / "h.state.json").write_text(json.dumps({"state": "up", "children": [child]}))
        assert run_cli("start", "h", "-F", str(config)).returncode == 0
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process of another user")
def test_a_pid_of_another_user_is_a_clear_error() -> None:
    victim = sleeper(65534)
    try:
        forge_pid_file("h", victim.pid)
        done = run_cli("stop", "h")
        assert done.returncode == EXIT_RUNTIME and "another user's process" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


CORRUPT = {
    "nested": b"[" * 100_000 + b"]" * 100_000,
    "wrong types": json.dumps({"pid": "1; rm -rf /", "create_time": []}).encode(),
    "not utf-8": b'{"pid": "\xff\xfe"}',
    "huge": b'{"pad": "' + b"x" * (2 * 1024 * 1024) + b'"}',
    "not an object": b"[1, 2, 3]",
}


@pytest.mark.parametrize("content", CORRUPT.values(), ids=CORRUPT.keys())
@pytest.mark.parametrize("which", ["pid", "state.json"])
def test_a_corrupt_file_is_reported_for_its_host_alone(content: bytes, which: str) -> None:
    state_dir().mkdir(parents=True)
    (state_dir() / f"bad.{which}").write_bytes(content)
    (state_dir() / "good.state.json").write_text(json.dumps({"host": "good", "state": "stopped"}))
    done = run_cli("status")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "good" in done.stdout and "stopped" in done.stdout
    assert "corrupt file" in done.stdout, done.stdout
    assert json.loads(run_cli("status", "--json").stdout)["hosts"][0]["last_error"]["kind"] == "CorruptFileError"
    stopped = run_cli("stop", "bad")
    assert "Traceback" not in stopped.stderr and "pid None" not in stopped.stdout
    assert stopped.returncode == 0, stopped.stderr
    assert not (state_dir() / "bad.pid").exists()


def test_stray_files_are_skipped_with_a_warning() -> None:
    state_dir().mkdir(parents=True)
    (state_dir() / "bad name.pid").write_text("{}")
    (state_dir() / "-x.state.json").write_text("{}")
    (state_dir() / "good.state.json").write_text(json.dumps({"host": "good", "state": "stopped"}))
    done = run_cli("status")
    assert done.returncode == 0 and "good" in done.stdout, done.stderr
    assert "warning: skipping bad name.pid" in done.stderr and "warning: skipping -x.state.json" in done.stderr
    assert run_cli("stop", "--all").returncode == 0


@pytest.mark.parametrize("content", [b"engine = '\xff'\n", b"# " + b"x" * 300_000 + b"\n"], ids=["not-utf8", "huge"])
def test_a_corrupt_tunneld_toml_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    settings = Path(os.environ["TUNNELD_HOME"]) / "config" / "tunneld.toml"
    settings.parent.mkdir(parents=True)
    settings.write_bytes(content)
    config = write_config(tmp_path, "Host x\n  LocalForward 5000 localhost:5000\n")
    done = run_cli("show", "x", "-F", str(config))
    assert done.returncode == EXIT_CONFIG and "Traceback" not in done.stderr and str(settings) in done.stderr


def test_a_tampered_manifest_removes_and_runs_nothing(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    marker = tmp_path / "pwned"
    manifest = Path(os.environ["TUNNELD_HOME"]) / "config" / "autostart" / "h.json"
    manifest.parent.mkdir(parents=True)
    python = os.path.abspath(sys.executable)
    good = {"host": "h", "via": "xdg", "files": [str(victim)], "launch": [python, "-m", "tunneld"], "enabled_at": 0}
    manifest.write_text(json.dumps(good))
    done = run_cli("autostart", "disable", "h")
    assert done.returncode == 0 and victim.exists(), done.stdout + done.stderr
    bad = {**good, "launch": ["/bin/sh", "-c", f"touch {marker}"]}
    manifest.write_text(json.dumps(bad))
    done = run_cli("autostart", "disable", "h", "--now")
    assert done.returncode == EXIT_CONFIG and "corrupt file" in done.stderr, done.stderr
    assert not marker.exists() and victim.exists()


# -- autostart files ----------------------------------------------------------------------------------


def test_systemd_lines_escape_specifiers_dollars_and_quotes() -> None:
    from tunneld.autostart.service import Launch
    from tunneld.autostart.systemd import render_dropin, render_template

    launch = Launch(("/opt/py 100%/$HOME/bin/python", "-m", "tunneld"), (("TUNNELD_SSH_CONFIG", '/c/50%"q\\'),))
    unit = render_template(launch)
    assert 'ExecStart="/opt/py 100%%/$$HOME/bin/python" -m tunneld run %i' in unit
    assert 'Environment="TUNNELD_SSH_CONFIG=/c/50%%\\"q\\\\"' in render_dropin(launch)


@pytest.mark.parametrize("via", ["systemd", "xdg"])
def test_a_newline_in_a_path_is_refused_for_autostart(via: str) -> None:
    from tunneld.autostart.manage import mechanism
    from tunneld.autostart.service import Launch
    from tunneld.errors import AutostartError

    launch = Launch(("/usr/bin/python3", "-m", "tunneld"), (("TUNNELD_SSH_CONFIG", "/tmp/a\nExecStartPre=/bin/evil"),))
    with pytest.raises(AutostartError, match="newline or another control character"):
        mechanism(via).render("h", launch)


def test_a_failed_systemctl_leaves_no_unit_file_behind(tmp_path: Path) -> None:
    from tunneld.autostart.manage import enable
    from tunneld.autostart.service import CommandResult, Launch, Runner
    from tunneld.autostart.systemd import unit_dir
    from tunneld.errors import AutostartError
    from tunneld.state.manifests import read_manifest

    class FailingSystemctl(Runner):
        def run(self, argv: object) -> CommandResult:
            return CommandResult(tuple(argv), 1, "Failed to connect to bus")  # type: ignore[arg-type]

    launch = Launch((sys.executable, "-m", "tunneld"), (("TUNNELD_SSH_CONFIG", str(tmp_path / "cfg")),))
    with pytest.raises(AutostartError):
        enable("h", "systemd", launch, FailingSystemctl())
    assert not unit_dir().exists() or not any(unit_dir().rglob("*"))
    assert read_manifest("h") is None


# -- resource limits (paramiko engine) -----------------------------------------------------------------


@pytest.mark.slow
def test_running_out_of_file_descriptors_pauses_accepting_and_recovers(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, foreground: list[ForegroundTunnel]
) -> None:
    import socket

    port = free_port()
    config = write_config(tmp_path, sshd.client_config("fds", [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    tunnel = ForegroundTunnel("fds", config, "paramiko", limit_fds=256)
    foreground.append(tunnel)
    tunnel.wait_state(*UP)
    clients = []
    try:
        for i in range(150):  # macOS's default limit is 256: each connection costs 3 descriptors
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(f"client {i:03d}".encode())
            clients.append(sock)
        for i, sock in enumerate(clients):
            sock.settimeout(30)
            assert sock.recv(100) == f"client {i:03d}".encode()
            sock.close()
    finally:
        for sock in clients:
            sock.close()
    assert tunnel.proc.poll() is None
    log = read_log("fds")
    assert log.count("not accepting new connections") >= 1 and "accepting new connections again" in log
    assert echo_roundtrip(("127.0.0.1", port), b"after") == b"after"


@pytest.mark.slow
def test_clients_that_never_read_cannot_grow_the_daemon_without_bound(
    tmp_path: Path, sshd: SshServer, foreground: list[ForegroundTunnel]
) -> None:
    import socket

    flood = FloodServer()
    clients: list[socket.socket] = []
    try:
        port = free_port()
        config = write_config(tmp_path, sshd.client_config("flood", [f"LocalForward {port} 127.0.0.1:{flood.port}"]))
        tunnel = start(foreground, "flood", config, "paramiko")
        tunnel.wait_state(*UP)
        for _ in range(200):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            clients.append(sock)  # and never read
        daemon = psutil.Process(tunnel.proc.pid)
        wait_for(lambda: _stalled(flood), 90, "the tunnel to stop taking the flood (every buffer full)", interval=0.1)
        peak = daemon.memory_info().rss
        # paramiko's 2 MiB window per channel would allow 400 MiB here; tunneld's budget is 64 MiB of windows.
        assert peak < 200 * 1024 * 1024, f"daemon RSS {peak / 2**20:.0f} MiB"
    finally:
        for sock in clients:
            sock.close()
        flood.close()


def _stalled(flood: FloodServer, window_s: float = 2.0) -> bool:
    """Return True once the flood moved less than 1 MiB in `window_s` (everything in between is full)."""
    import time

    before = flood.bytes_sent
    time.sleep(window_s)
    return flood.bytes_sent - before < 1024 * 1024 and flood.bytes_sent > 0


FOREIGN_LISTENER = """
import os, socket, struct, sys
path = sys.argv[1]
server = socket.socket(socket.AF_UNIX)
server.bind(path)
os.chmod(path, 0o777)
server.listen(8)
print("ready", flush=True)
while True:
    client, _ = server.accept()
    try:
        client.recv(5)
        client.sendall(struct.pack(">IBI", 5, 12, 0))  # an agent's answer: no keys
    except OSError:
        pass
    client.close()
"""


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory another user can reach (tmp_path's parents are private): directly under /tmp, removed after."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="tunneld-test-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _foreign_listener(path: Path) -> subprocess.Popen[str]:
    """A unix socket at `path` served by a process of another user (uid 65534), answering like an empty agent."""
    proc = subprocess.Popen(["/usr/bin/python3", "-c", FOREIGN_LISTENER, str(path)], user=65534, group=65534,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_an_agent_another_user_serves_is_never_taken_for_yours(open_dir: Path) -> None:
    """SSH_AUTH_SOCK at a stale /tmp/ssh-XXXX/agent.N another user re-created: `ssh-add` would hand them the key."""
    shared = open_dir / "ssh-XXXX"
    shared.mkdir()
    shared.chmod(0o777)
    sock = shared / "agent.4242"
    proc = _foreign_listener(sock)
    try:
        probe = probe_agent(str(sock))
        assert not probe.reachable and probe.problem == "served by uid 65534, not by you (uid 0)", probe
        assert agent_identities(str(sock)) is None  # needs-auth does not wait on it, start offers no ssh-add there
    finally:
        proc.kill()
        proc.wait(5)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_a_control_socket_another_user_made_is_not_the_login_connection(open_dir: Path) -> None:
    """A long state path moves `tunneld login`'s socket to /tmp/tunneld-UID: another user who made that directory, or
    serves a socket in it, must not pose as the login connection (it could then own the tunnel's ports)."""
    theirs = open_dir / "tunneld-0"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    theirs.chmod(0o777)
    proc = _foreign_listener(theirs / "h.master")
    try:
        assert control_socket_peer(theirs / "h.master") is None  # their directory, their socket
        ours = open_dir / "ours"
        ours.mkdir(mode=0o700)
        planted = ours / "h.master"
        os.link(theirs / "h.master", planted)  # a hard link: the socket file is still theirs
        assert control_socket_peer(planted) is None
    finally:
        proc.kill()
        proc.wait(5)
    mine = open_dir / "mine"
    mine.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(mine / "h.master"))
        listener.listen(1)
        assert control_socket_peer(mine / "h.master") == os.getpid()
