"""bench/penalties.py: what OpenSSH 10's PerSourcePenalties does to a client on 127.0.0.1 (root only, by hand).

Runs the sshd of the Debian 13 root that `make debian13-sshd` prepares (bench/debian13.py) with the test
harness's configuration on a loopback port, and measures, each case on a fresh sshd (an empty penalty
table): how many connections of a kind, at a given pace, get 127.0.0.1 blocked (sshd logs `activating ...
penalty`) and after how many seconds; how long a real `ssh` login with the harness's key is then refused;
what a blocked client sees (a raw socket, ssh's stderr); whether PerSourcePenaltyExemptList and
PerSourceNetBlockSize matter on loopback. Prints a table; results are for the reader, not for docs/.

Every loop is bounded in count and time; each sshd is stopped by its pid (SshServer.stop).
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.debian13 import SSHD, Debian13, prepared, unavailable_reason
from tests.harness import SshServer, keygen

MAX_CONNECTIONS = 60
MAX_ACTIVATION_S = 70.0
MAX_BLOCK_S = 660.0  # the penalty's own cap is 600 s
LOGIN_POLL_S = 0.25
QUIET_S = 2.5  # the readiness probe's own 1 s penalty has expired by then
RAW_TIMEOUT_S = 3.0
SESSION_START = re.compile(r"^Connection from ", re.MULTILINE)  # sshd-session's first line for each connection
ACTIVATING = re.compile(r"activating ipv[46] penalty of ([\d.]+) seconds for penalty: (.*)")
GARBAGE = b"GET / HTTP/1.0\r\n\r\n"
CLIENT_BANNER = b"SSH-2.0-penalties_probe\r\n"


@dataclass
class Outcome:
    """One case on a fresh sshd."""

    case: str
    connections: int | None = None  # until sshd activated the penalty (None: never, within the bounds)
    seconds: float | None = None  # from the first connection until the activation showed in the log
    penalty: str = ""  # what sshd logged: "16 s, connections without attempting authentication"
    blocked_s: float | None = None  # from the activation until a real login worked again
    sent: int = 0  # connections made (all of them, also those after activation)
    note: str = ""
    activated_at: float | None = None  # time.monotonic() when the activation showed in the log


class Lab:
    """One fresh Debian 13 sshd at a time, its client config, a key it accepts and one it does not."""

    def __init__(self, found: Debian13, workdir: Path) -> None:
        self.found = found
        self.workdir = workdir
        self.count = 0
        self.stranger = keygen(workdir / "stranger_ed25519", "not authorized")

    @contextmanager
    def server(self, extra: Sequence[str] = (), ipv6: bool = False) -> Iterator[SshServer]:
        self.count += 1
        server = self.found.server(self.workdir / f"sshd{self.count}", ipv6=ipv6)
        server.extra_config = list(extra)
        server.start()
        try:
            time.sleep(QUIET_S)  # not synchronisation: lets the readiness probe's penalty expire first
            yield server
        finally:
            server.stop()

    def config(self, server: SshServer, key: Path | None = None, host: str = "") -> Path:
        """Write an ssh_config for `server`: another `key`, or the connection from source address `host`."""
        extra = ["BatchMode yes", "ConnectTimeout 5", "LogLevel ERROR"]
        if host:
            extra.append(f"BindAddress {host}")
        text = server.client_config("lab", [], extra=extra)
        if key is not None:
            text = text.replace(str(server.client_key), str(key))
        if host == "::1":
            text = text.replace(f"HostName {server.host}", "HostName ::1")
        path = self.workdir / f"ssh_config{self.count}-{host or 'default'}-{(key or server.client_key).name}"
        path.write_text(text)
        host_key = server.host_public_key()
        server.known_hosts.write_text(f"[{server.host}]:{server.port} {host_key}\n[::1]:{server.port} {host_key}\n")
        return path

    def ssh(self, config: Path, *options: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ssh", "-F", str(config), *options, "lab", "true"],
            capture_output=True, text=True, timeout=30, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip


def plain(server: SshServer) -> None:
    """Connect and close at once (what tunneld's old path probes did)."""
    with socket.create_connection((server.host, server.port), timeout=5):
        pass


def banner_then_close(server: SshServer) -> None:
    """Connect, read the server's banner, close (a banner check, ssh-keyscan without the key exchange)."""
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.recv(256)


def garbage(server: SshServer) -> None:
    """Connect, send something that is not SSH, close."""
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(GARBAGE)


def raw_client_sees(server: SshServer, send: bytes = b"") -> str:
    """What a raw socket gets from a blocked sshd: refused, bytes, FIN or RST, and how soon."""
    began = time.monotonic()
    try:
        sock = socket.create_connection((server.host, server.port), timeout=RAW_TIMEOUT_S)
    except OSError as exc:
        return f"connect failed: {exc}"
    with sock:
        sock.settimeout(RAW_TIMEOUT_S)
        if send:
            sock.sendall(send)
        data = b""
        try:
            while len(data) < 1024:
                chunk = sock.recv(1024)
                if not chunk:
                    return f"{data!r}, then closed (FIN) after {time.monotonic() - began:.3f} s"
                data += chunk
        except ConnectionResetError:
            return f"{data!r}, then reset (RST) after {time.monotonic() - began:.3f} s"
        except TimeoutError:
            return f"{data!r}, still open after {RAW_TIMEOUT_S:.0f} s"
        return f"{data[:80]!r}..., still sending"


def paramiko_sees(server: SshServer) -> str:
    """The exception paramiko's client raises against a blocked sshd (the paramiko engine's view)."""
    import logging

    import paramiko

    logging.getLogger("paramiko").addHandler(logging.NullHandler())  # its transport thread logs a traceback
    sock = socket.create_connection((server.host, server.port), timeout=RAW_TIMEOUT_S)
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=RAW_TIMEOUT_S)
    except (paramiko.SSHException, OSError, EOFError) as exc:
        inner = exc.__cause__ or exc.__context__
        cause = f" (raised while handling {type(inner).__name__}: {inner})" if inner else ""
        return f"{type(exc).__module__}.{type(exc).__name__}: {exc}{cause}"
    finally:
        transport.close()
        sock.close()
    return "no exception: the key exchange worked"


def activation(server: SshServer) -> tuple[int, str] | None:
    """(index in the log, the line) of sshd's `activating ... penalty` line, if any."""
    log = server.log.read_text(errors="replace")
    match = ACTIVATING.search(log)
    return (match.start(), match.group(0)) if match else None


def provoke(
    server: SshServer, action: Callable[[], object], interval_s: float, max_connections: int = MAX_CONNECTIONS
) -> Outcome:
    """Run `action` every `interval_s` until sshd activates a penalty (bounded); fill in count and seconds."""
    before = len(SESSION_START.findall(server.log.read_text(errors="replace")))
    outcome = Outcome("")
    began = time.monotonic()
    for index in range(max_connections):
        due = began + index * interval_s
        while (now := time.monotonic()) < due:
            time.sleep(min(0.01, due - now))
        action()
        outcome.sent += 1
        found = activation(server)
        if found is None and index == max_connections - 1:
            time.sleep(0.5)  # the last connection's session may still be ending
            found = activation(server)
        if found is not None:
            outcome.activated_at = time.monotonic()
            outcome.seconds = outcome.activated_at - began
            log = server.log.read_text(errors="replace")
            outcome.connections = len(SESSION_START.findall(log[: found[0]])) - before
            match = ACTIVATING.search(found[1])
            assert match is not None
            outcome.penalty = f"{match.group(1)} s, {match.group(2)}"
            return outcome
        if time.monotonic() - began > MAX_ACTIVATION_S:
            break
    return outcome


def time_block(lab: Lab, outcome: Outcome, config: Path, during: Callable[[], object] | None = None) -> None:
    """Fill in how long after the activation a real login worked again (bounded); `during` runs between tries."""
    assert outcome.activated_at is not None
    while time.monotonic() - outcome.activated_at < MAX_BLOCK_S:
        if lab.ssh(config).returncode == 0:
            outcome.blocked_s = time.monotonic() - outcome.activated_at
            return
        if during is not None:
            during()
        time.sleep(LOGIN_POLL_S)


def blocking_case(
    lab: Lab, name: str, action: Callable[[SshServer], object], interval_s: float, during: bool = False
) -> tuple[Outcome, list[str]]:
    """Provoke a block with `action`, look at what a blocked client sees, and time the block."""
    seen: list[str] = []
    with lab.server() as server:
        config = lab.config(server)
        if lab.ssh(config).returncode != 0:
            raise RuntimeError(f"{name}: the baseline login failed: {server.log.read_text()[-1500:]}")
        outcome = provoke(server, lambda: action(server), interval_s)
        outcome.case = name
        if outcome.connections is None:
            outcome.note = f"no block after {outcome.sent} connections"
            return outcome, seen
        refused = lab.ssh(config, "-v")
        seen.append(f"ssh exit {refused.returncode}; stderr (DEBUG1 lines about the server's answer, all others):")
        for line in refused.stderr.splitlines():
            if not line.startswith("debug1:") or re.search(r"kex_exchange|banner|closed|reset|Connection", line):
                seen.append(f"    {line}")
        seen.append(f"raw socket, sends nothing: {raw_client_sees(server)}")
        seen.append(f"raw socket, sends an SSH banner: {raw_client_sees(server, CLIENT_BANNER)}")
        seen.append(f"paramiko start_client: {paramiko_sees(server)}")
        drops = [line for line in server.log.read_text(errors="replace").splitlines() if "drop connection" in line]
        seen.append(f"sshd logged {len(drops)} drops, e.g. {drops[0] if drops else '-'}")
        keep_probing = (lambda: plain(server)) if during else None
        time_block(lab, outcome, config, keep_probing)
        if during:
            outcome.note = f"a plain connect between login tries (every ~{LOGIN_POLL_S} s) during the block"
    return outcome, seen


def authfail_case(lab: Lab) -> Outcome:
    """Real logins with a key the server does not accept, one every 0.25 s."""
    with lab.server() as server:
        wrong = lab.config(server, key=lab.stranger)
        good = lab.config(server)
        outcome = provoke(server, lambda: lab.ssh(wrong), 0.25, max_connections=20)
        outcome.case = "ssh login with an unauthorized key (authfail), every 0.25 s"
        if outcome.connections is not None:
            time_block(lab, outcome, good)
        return outcome


def exempt_case(lab: Lab) -> Outcome:
    """PerSourcePenaltyExemptList 127.0.0.1: the same flood never blocks."""
    with lab.server(["PerSourcePenaltyExemptList 127.0.0.1"]) as server:
        outcome = provoke(server, lambda: plain(server), 0.1)
        outcome.case = "plain connects every 0.1 s, PerSourcePenaltyExemptList 127.0.0.1"
        login = lab.ssh(lab.config(server)).returncode
        outcome.note = f"login afterwards: exit {login}"
        return outcome


def neighbours_case(lab: Lab, extra: Sequence[str]) -> Outcome:
    """Block 127.0.0.1, then log in from 127.0.0.2 and from ::1: which neighbours share the block?"""
    setting = extra[0] if extra else "PerSourceNetBlockSize 32:128 (default)"
    with lab.server(extra, ipv6=True) as server:
        outcome = provoke(server, lambda: plain(server), 0.1)
        outcome.case = f"plain connects every 0.1 s from 127.0.0.1; {setting}"
        results = []
        for source in ("127.0.0.2", "::1", "127.0.0.1"):
            results.append(f"login from {source}: exit {lab.ssh(lab.config(server, host=source)).returncode}")
        outcome.note = "; ".join(results)
        return outcome


def settings(found: Debian13, workdir: Path) -> list[str]:
    """sshd -V, its effective PerSource* settings, and whether it accepts the harness's configuration."""
    server = found.server(workdir / "settings")
    server._write_config()  # the harness's own lines, as every test writes them
    lines = [f"sshd -V: {found.run(server.dir, SSHD, '-V').stderr.strip()}"]
    shown = found.run(server.dir, SSHD, "-T", "-f", str(server.config))
    lines += [f"sshd -T: {line}" for line in shown.stdout.splitlines() if "persource" in line.lower()]
    tested = found.run(server.dir, SSHD, "-t", "-f", str(server.config))
    said = tested.stderr.strip() or "nothing"
    lines.append(f"sshd -t with the harness's sshd_config: exit {tested.returncode}, said {said}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the 0.25 s plain-connect case")
    args = parser.parse_args()
    reason = unavailable_reason()
    found = prepared()
    if reason is not None or found is None:
        print(f"bench/penalties.py: {reason}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="tunneld-penalties-") as tmp:
        lab = Lab(found, Path(tmp))
        for line in settings(found, Path(tmp)):
            print(line, flush=True)
        cases: list[tuple[str, Callable[[SshServer], object], float, bool]] = [
            ("plain connects every 0.25 s (tunneld's old probes)", plain, 0.25, False),
        ]
        if not args.quick:
            cases += [
                ("plain connects every 0.1 s", plain, 0.1, False),
                ("plain connects every 0.5 s", plain, 0.5, False),
                ("plain connects every 1.0 s", plain, 1.0, False),
                ("plain connects every 0.1 s, then on through the block", plain, 0.1, True),
                ("banner read, then close, every 0.25 s", banner_then_close, 0.25, False),
                ("garbage sent, then close, every 0.25 s", garbage, 0.25, False),
            ]
        outcomes: list[Outcome] = []
        for name, action, interval, during in cases:
            outcome, seen = blocking_case(lab, name, action, interval, during)
            print(f"\n{outcome}", flush=True)
            for line in seen:
                print(f"  {line}", flush=True)
            outcomes.append(outcome)
        if not args.quick:
            outcomes.append(authfail_case(lab))
            print(f"\n{outcomes[-1]}", flush=True)
            outcomes.append(exempt_case(lab))
            print(f"\n{outcomes[-1]}", flush=True)
            for netblock in ([], ["PerSourceNetBlockSize 8:64"]):
                outcomes.append(neighbours_case(lab, netblock))
                print(f"\n{outcomes[-1]}", flush=True)
    print("\n| case | connections until blocked | within | penalty sshd logged | login refused for | note |")
    print("|---|---|---|---|---|---|")

    def show(value: float | None, unit: str = " s") -> str:
        return "-" if value is None else f"{value:.1f}{unit}"

    for o in outcomes:
        until = "never" if o.connections is None else str(o.connections)
        print(f"| {o.case} | {until} (of {o.sent}) | {show(o.seconds)} | {o.penalty or '-'} | {show(o.blocked_s)} "
              f"| {o.note} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
