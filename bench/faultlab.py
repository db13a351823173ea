"""The fault lab of `make faults`: a network namespace joined to this one by a veth pair, a real sshd and an
echo target inside it, tunneld outside, and what is measured of each scenario (Result).

Root only (namespaces, links, routes); everything it creates is removed by name or pid. Addresses:
198.18.77.0/30 (RFC 2544's benchmarking range), only inside the namespace pair it creates.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import DelayRelay, SshServer, free_port, wait_for
from tunneld.state.pidfile import is_tunneld

ROOT = Path(__file__).resolve().parent.parent
HOST_IP, SERVER_IP = "198.18.77.1", "198.18.77.2"
SSH_PORT = 2222
PROBE_EVERY_S = 0.02
ECHO_TIMEOUT_S = 0.5
RECOVERY_LIMIT_S = 90.0
DETECT_LIMIT_S = 60.0
DELAY_MS = 75  # each way: 150 ms round trip


@dataclass
class Result:
    """One scenario on one engine."""

    scenario: str
    engine: str
    detected_s: float | None
    recovered_s: float | None
    attempts: int
    logins: int
    unauthenticated: int
    reconnects: int
    left_behind: int
    note: str = ""


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=30)


class Namespace:
    """A network namespace with one veth link to this one; removed by name."""

    def __init__(self) -> None:
        suffix = os.getpid() % 100000
        self.name = f"tunneld-faults-{suffix}"
        self.host_if, self.server_if = f"tdf{suffix}h", f"tdf{suffix}s"

    def create(self) -> None:
        run("ip", "netns", "add", self.name)
        run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.server_if)
        run("ip", "link", "set", self.server_if, "netns", self.name)
        run("ip", "addr", "add", f"{HOST_IP}/30", "dev", self.host_if)
        run("ip", "link", "set", self.host_if, "up")
        self.exec("ip", "addr", "add", f"{SERVER_IP}/30", "dev", self.server_if)
        self.exec("ip", "link", "set", self.server_if, "up")
        self.exec("ip", "link", "set", "lo", "up")

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.name, *argv, check=check)

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def remove(self) -> None:
        run("ip", "link", "del", self.host_if, check=False)
        run("ip", "netns", "del", self.name, check=False)


class Bench:
    """The server side in the namespace, tunneld here, and the measurements."""

    def __init__(self, workdir: Path, ns: Namespace) -> None:
        self.workdir = workdir
        self.ns = ns
        self.env = dict(os.environ, TUNNELD_HOME=str(workdir / "tunneld"))
        self.sshd = SshServer(workdir / "sshd", port=SSH_PORT, host=SERVER_IP, prefix=ns.prefix())
        self.target: subprocess.Popen[str] | None = None
        self.target_port = 0
        self.relay: DelayRelay | None = None
        self.config = workdir / "ssh_config"
        self.local_port = free_port()

    def start_server(self) -> None:
        self.sshd.start()
        self.target = subprocess.Popen(
            [*self.ns.prefix(), sys.executable, str(ROOT / "bench" / "target.py")], stdout=subprocess.PIPE, text=True
        )
        assert self.target.stdout is not None
        self.target_port = int(self.target.stdout.readline())

    def write_config(self, host: str, port: int, hostname: str) -> None:
        text = self.sshd.client_config(host, [f"LocalForward {self.local_port} 127.0.0.1:{self.target_port}"])
        text = text.replace(f"HostName {SERVER_IP}", f"HostName {hostname}").replace(f"Port {SSH_PORT}", f"Port {port}")
        known = self.workdir / f"known_{host}"
        known.write_text(f"[{hostname}]:{port} {self.sshd.host_public_key()}\n")
        self.config.write_text(text.replace(str(self.sshd.known_hosts), str(known)))

    def tunneld(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "tunneld", *args], env=self.env, capture_output=True, text=True, timeout=60,
            check=False,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise RuntimeError(f"tunneld {' '.join(args)} failed: {done.stderr}")
        return done

    def state(self, host: str) -> dict[str, object]:
        with contextlib.suppress(OSError, ValueError):
            data = json.loads((self.workdir / "tunneld" / "state" / f"{host}.state.json").read_text())
            return data if isinstance(data, dict) else {}
        return {}

    def echo_works(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.local_port), timeout=ECHO_TIMEOUT_S) as sock:
                sock.settimeout(ECHO_TIMEOUT_S)
                sock.sendall(b"ECHO\nping")
                return sock.recv(4) == b"ping"
        except OSError:
            return False

    def mark(self) -> int:
        """Return where sshd's log ends now: what follows is what this scenario made sshd see."""
        return self.sshd.log_mark()

    def logins(self, since: int) -> int:
        """Logins sshd accepted since the mark (`Accepted publickey for ...`)."""
        text = self.sshd.log.read_bytes()[since:].decode(errors="replace")
        return sum(line.startswith("Accepted publickey for ") for line in text.splitlines())

    def unauthenticated(self, since: int) -> int:
        """Connections sshd saw since the mark that ended before authentication: what OpenSSH 9.8+ penalises."""
        return self.sshd.preauth_connections(since)

    def first_echo_after(self, since: float) -> float | None:
        """Seconds from `since` until a fresh connection through the forward works (bounded)."""
        successes: list[float] = []
        stop = threading.Event()

        def one() -> None:
            if self.echo_works():
                successes.append(time.monotonic())
                stop.set()

        threads = []
        deadline = since + RECOVERY_LIMIT_S
        while not stop.is_set() and time.monotonic() < deadline:
            thread = threading.Thread(target=one, daemon=True)
            thread.start()
            threads.append(thread)
            stop.wait(PROBE_EVERY_S)
        for thread in threads[-50:]:
            thread.join(ECHO_TIMEOUT_S + 0.1)
        return min(successes) - since if successes else None

    def wait_state(self, host: str, states: tuple[str, ...], limit_s: float) -> float | None:
        began = time.monotonic()
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: self.state(host).get("state") in states, limit_s, "state", interval=0.02)
            return time.monotonic() - began
        return None

    def stop(self) -> None:
        if self.relay is not None:
            self.relay.close()
        with contextlib.suppress(Exception):
            self.tunneld("stop", "--all", check=False)
        self.sshd.thaw()
        self.sshd.stop()
        if self.target is not None:
            self.target.kill()
            self.target.wait(5)


def count(state: dict[str, object], key: str) -> int:
    value = state.get(key)
    return value if isinstance(value, int) else 0


def left_behind(bench: Bench) -> int:
    """Count tunneld and ssh processes still running after `stop` (daemons are ours: we are their subreaper)."""
    import psutil

    count = 0
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.status() == psutil.STATUS_ZOMBIE:
                proc.wait(0)
                continue
            if is_tunneld(proc.cmdline()) or proc.name() == "ssh":
                count += 1
    return count
