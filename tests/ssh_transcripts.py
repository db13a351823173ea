"""Capture what the OpenSSH engine's ssh writes to stderr, as records, in each case tests/test_sshdiag.py checks.

Each case runs the engine's own argv (`openssh.build_argv`) against real servers on loopback (OpenSSH
sshd from tests/harness.py, and tests/evil.py's ScriptedPeer for a device on the path) and stores the
records exactly as tunneld receives them (sshstderr.StderrChannel: one record per write of ssh's, with
the writer's pid) in tests/data/ssh_stderr/CASE.json. Regenerate with:

    .venv/bin/python -m tests.ssh_transcripts
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.evil import FORGED, WARNING_BLOCK, ScriptedPeer, debug_and_disconnect
from tests.harness import SshServer, free_port, hold_port, keygen, running_sshd
from tunneld.config.resolve import resolve_host
from tunneld.engines.sshargv import build_argv
from tunneld.engines.sshstderr import StderrChannel

DATA = Path(__file__).parent / "data" / "ssh_stderr"
UP_LINE = "Entering interactive session"


@dataclasses.dataclass
class Capture:
    """One run of ssh: the spec fields the classifier uses, its exit status, its records."""

    case: str
    how: str
    spec: dict[str, object]
    returncode: int
    main_pid: int
    records: list[tuple[int | None, str]]

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        version = subprocess.run(["ssh", "-V"], capture_output=True, text=True, check=False).stderr.strip()
        data = {**dataclasses.asdict(self), "ssh_version": version}
        (directory / f"{self.case}.json").write_text(json.dumps(data, indent=1) + "\n")


def run_ssh(case: str, how: str, alias: str, config: str, workdir: Path,
            until: Callable[[list[str]], bool] | None = None, timeout: float = 30.0) -> Capture:  # fmt: skip
    """Run the engine's ssh for `alias` and collect its records; `until(texts)` true: stop ssh (SIGTERM)."""
    path = workdir / f"{case}.config"
    path.write_text(config)
    spec = resolve_host(alias, str(path))
    channel = StderrChannel()
    proc = subprocess.Popen(build_argv(spec), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=channel.child_fd)  # fmt: skip
    channel.spawned()
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    records: list[tuple[int | None, str]] = []
    try:
        for record in channel.records():
            records.append((record.pid, record.text))
            if until is not None and until([text for pid, text in records if pid == proc.pid]):
                until = None
                proc.terminate()
    finally:
        killer.cancel()
    fields = ("alias", "hostname", "port", "user", "proxy_jump", "proxy_command")
    return Capture(case, how, {f: getattr(spec, f) for f in fields}, proc.wait(), proc.pid, records)


def _up(texts: list[str]) -> bool:
    return any(UP_LINE in text for text in texts)


@contextlib.contextmanager
def _peer(payload: bytes = b"", reset: bool = False, read_first: bool = False) -> Iterator[ScriptedPeer]:
    peer = ScriptedPeer(payload, reset, read_first)
    try:
        yield peer
    finally:
        peer.close()


def _at(server: SshServer, port: int, text: str) -> str:
    return text.replace(f"Port {server.port}", f"Port {port}")


def direct_cases(work: Path) -> Iterator[Capture]:
    """Cases against one sshd (and devices on the path in front of it)."""
    work.mkdir(parents=True)
    with running_sshd(work / "sshd") as sshd:
        fwd = f"LocalForward {free_port()} 127.0.0.1:9"
        base = sshd.client_config("h", [fwd])
        yield run_ssh("up_then_stopped", "a working link, stopped by SIGTERM", "h", base, work, until=_up)
        other = keygen(work / "other_key", "other")
        refused = base.replace(str(sshd.client_key), str(other))
        yield run_ssh("auth_refused", "a key the server does not know", "h", refused, work)
        locked = keygen(work / "locked_key", "locked", passphrase="secret")
        sshd.authorized_keys.write_text(sshd.authorized_keys.read_text() + (work / "locked_key.pub").read_text())
        how = "a passphrase key the server accepts, BatchMode yes, no agent"
        yield run_ssh("locked_key", how, "h", base.replace(str(sshd.client_key), str(locked)), work)
        keygen(work / "stranger", "x")
        stranger_pub = " ".join((work / "stranger.pub").read_text().split()[:2])
        changed = work / "known_hosts_changed"
        changed.write_text(f"[127.0.0.1]:{sshd.port} {stranger_pub}\n")
        text = base.replace(str(sshd.known_hosts), str(changed))
        yield run_ssh("host_key_changed", "known_hosts holds another key", "h", text, work)
        text = sshd.client_config("h", [fwd], strict="no").replace(str(sshd.known_hosts), str(changed))
        yield run_ssh("host_key_changed_strict_no", "another key, StrictHostKeyChecking no", "h", text, work)
        revoked = work / "known_hosts_revoked"
        revoked.write_text(f"@revoked [127.0.0.1]:{sshd.port} {sshd.host_public_key()}\n{sshd.known_hosts.read_text()}")
        text = base.replace(str(sshd.known_hosts), str(revoked))
        yield run_ssh("host_key_revoked", "the server's key is @revoked", "h", text, work)
        empty = work / "known_hosts_empty"
        empty.write_text("")
        text = base.replace(str(sshd.known_hosts), str(empty))
        yield run_ssh("host_key_unknown", "no key known, StrictHostKeyChecking yes", "h", text, work)
        port = free_port()
        with hold_port("127.0.0.1", port):
            text = sshd.client_config("h", [f"LocalForward 127.0.0.1:{port} 127.0.0.1:9"])
            yield run_ssh("local_port_in_use", "the LocalForward's port is held", "h", text, work)
        port = free_port()
        with hold_port("127.0.0.1", port):
            text = sshd.client_config("h", [f"RemoteForward 127.0.0.1:{port} 127.0.0.1:9"])
            yield run_ssh("remote_forward_refused", "the RemoteForward's port is held on the server", "h", text, work)
        yield run_ssh("connection_refused", "nothing listens on the port", "h", _at(sshd, free_port(), base), work)
        text = base.replace("HostName 127.0.0.1", "HostName nonexistent.invalid")
        yield run_ssh("unresolvable", "HostName does not resolve", "h", text, work)
        yield from _peer_cases(work, sshd, base)
        yield from _server_cases(work, sshd, base, fwd)


def _peer_cases(work: Path, sshd: SshServer, base: str) -> Iterator[Capture]:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nobody ever answers
        text = _at(sshd, silent.getsockname()[1], base) + "  ConnectTimeout 1\n"
        yield run_ssh("banner_timeout", "accepts TCP, never speaks", "h", text, work)
    with _peer() as peer:
        how = "accepts TCP and closes at once (PerSourcePenalties, MaxStartups)"
        yield run_ssh("closed_before_banner", how, "h", _at(sshd, peer.port, base), work)
    with _peer(reset=True) as peer:
        yield run_ssh("reset_at_accept", "accepts TCP and resets at once", "h", _at(sshd, peer.port, base), work)
    with _peer(reset=True, read_first=True) as peer:
        how = "accepts TCP, reads ssh's banner and resets"
        yield run_ssh("reset_before_banner", how, "h", _at(sshd, peer.port, base), work)
    with _peer(b"Permission denied (publickey).\r\n") as peer:
        how = "a relay answers with ssh's refusal line, then closes"
        yield run_ssh("peer_says_permission_denied", how, "h", _at(sshd, peer.port, base), work)
    with _peer(WARNING_BLOCK) as peer:
        how = "a relay answers with ssh's changed-host-key warning, then closes"
        yield run_ssh("peer_says_host_key_changed", how, "h", _at(sshd, peer.port, base), work)
    payload = debug_and_disconnect(FORGED, b"bye\r\nroot@127.0.0.1: Permission denied (publickey).")
    with _peer(payload, read_first=True) as peer:
        how = "a relay sends an SSH banner, then DEBUG and DISCONNECT messages that carry forged lines"
        yield run_ssh("peer_forges_lines", how, "h", _at(sshd, peer.port, base), work)


def _server_cases(work: Path, sshd: SshServer, base: str, fwd: str) -> Iterator[Capture]:
    (work / "banner").write_text("root@127.0.0.1: Permission denied (publickey).\nHost key verification failed.\n")
    sshd.extra_config = [f"Banner {work / 'banner'}"]
    sshd.stop()
    sshd.start()
    other = work / "other_key"
    how = "the server's Banner mimics ssh's verdicts; the key is refused"
    yield run_ssh("banner_mimics_verdicts", how, "h", base.replace(str(sshd.client_key), str(other)), work)
    how = "the server's Banner mimics ssh's verdicts; the login works"
    yield run_ssh("banner_mimics_verdicts_up", how, "h", base, work, until=_up)
    keys = [keygen(work / f"stray{i}", f"stray{i}") for i in range(3)]
    sshd.extra_config = ["MaxAuthTries 2"]
    sshd.stop()
    sshd.start()
    text = base.replace(f"  IdentityFile {sshd.client_key}\n", "".join(f"  IdentityFile {k}\n" for k in keys))
    yield run_ssh("too_many_auth_failures", "three unknown keys, MaxAuthTries 2", "h", text, work)
    sshd.extra_config = []
    sshd.stop()
    sshd.start()

    def stop_server(texts: list[str]) -> bool:
        if _up(texts):
            threading.Thread(target=sshd.stop).start()
        return False

    yield run_ssh("server_stopped_after_up", "the link is up, then sshd is killed", "h", base, work, until=stop_server)
    sshd.start()


def jump_cases(work: Path) -> Iterator[Capture]:
    """Cases through `ProxyJump jump` (two sshd)."""
    work.mkdir(parents=True)
    with running_sshd(work / "jump") as jump, running_sshd(work / "target") as target:
        target.authorized_keys.write_text(jump.authorized_keys.read_text())
        hop = jump.client_config("jump", [])
        fwd = f"LocalForward {free_port()} 127.0.0.1:9"
        tgt = target.client_config("tgt", [fwd, "ProxyJump jump"]).replace(str(target.client_key), str(jump.client_key))
        yield run_ssh("jump_up", "a working link through a jump host", "tgt", hop + tgt, work, until=_up)
        how = "the jump host cannot connect to the target (nothing listens)"
        yield run_ssh("jump_target_down", how, "tgt", hop + _at(target, free_port(), tgt), work)
        how = "the jump host itself refuses TCP"
        yield run_ssh("jump_unreachable", how, "tgt", _at(jump, free_port(), hop) + tgt, work)
        keygen(work / "stranger", "x")
        stranger_pub = " ".join((work / "stranger.pub").read_text().split()[:2])
        changed = work / "known_hosts_jump_changed"
        changed.write_text(f"[127.0.0.1]:{jump.port} {stranger_pub}\n")
        how = "known_hosts holds another key for the jump host"
        yield run_ssh("jump_host_key_changed", how, "tgt", hop.replace(str(jump.known_hosts), str(changed)) + tgt, work)
        other = keygen(work / "other_key", "other")
        how = "the jump host refuses the key"
        yield run_ssh("jump_auth_refused", how, "tgt", hop.replace(str(jump.client_key), str(other)) + tgt, work)
        how = "the target refuses the key (the jump host accepts its own)"
        text = hop + tgt.replace(f"IdentityFile {jump.client_key}", f"IdentityFile {other}")
        yield run_ssh("target_auth_refused_via_jump", how, "tgt", text, work)
        with _peer() as peer:
            how = "behind the jump host, the target closes at once"
            yield run_ssh("target_closed_before_banner_via_jump", how, "tgt", hop + _at(target, peer.port, tgt), work)


def main() -> None:
    """Capture every case into tests/data/ssh_stderr (or the directory given)."""
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else DATA
    with tempfile.TemporaryDirectory() as tmp:
        for capture in [*direct_cases(Path(tmp) / "direct"), *jump_cases(Path(tmp) / "jump")]:
            capture.save(directory)
            print(f"{capture.case}: status {capture.returncode}, {len(capture.records)} records")


if __name__ == "__main__":
    main()
