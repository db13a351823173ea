"""`make faults` against OpenSSH 10's PerSourcePenalties: a Debian 13 sshd (bench/debian13.py) in the fault
namespace, and the failure patterns that got tunneld's users locked out of their own servers.

For each: how many connections ended before authentication (sshd's log), whether sshd activated a penalty
for this machine's address because of tunneld, and whether the user's own `ssh` still logs in at the end.
And one case where something else got the address blocked: tunneld must recognise the refusal, leave the
server alone for at least 20 s at a time, and come back once the block ends without extending it.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from bench.debian13 import Debian13
from bench.faultlab import HOST_IP, SERVER_IP, Bench, Result, count, left_behind
from tests.harness import SshServer, free_port_both, wait_for

SSH10_PORT = 2210
STRAY_CONNECTS = 25
STRAY_EVERY_S = 0.1
# `srclimit_penalise: 198.18.77.1/32: activating ipv4 penalty of 16 seconds for penalty: connections without ...`
ACTIVATING = re.compile(r"(\S+): activating ipv[46] penalty of \d+ seconds for (?:penalty: )?(.*)")


class Lab10:
    """The Debian 13 sshd in the bench's namespace, and tunneld configs that reach it."""

    def __init__(self, bench: Bench, found: Debian13) -> None:
        self.bench = bench
        self.server: SshServer = found.server(
            bench.workdir / "sshd10", outer_prefix=bench.ns.prefix(), port=SSH10_PORT, host=SERVER_IP
        )
        self.config = bench.workdir / "ssh_config10"
        self.version = found.version

    def write_config(self, host: str, forwards: list[str]) -> None:
        self.config.write_text(self.server.client_config(host, forwards))

    def activations(self, since: int) -> list[str]:
        """Penalties sshd activated for this machine's address since the mark (why, as sshd logged it)."""
        text = self.server.log.read_bytes()[since:].decode(errors="replace")
        return [m[2] for m in ACTIVATING.finditer(text) if m[1].startswith(f"{HOST_IP}/")]

    def login_works(self, host: str) -> bool:
        """The user's own ssh, as they would run it: `ssh -F CONFIG HOST true`."""
        done = subprocess.run(
            ["ssh", "-F", str(self.config), "-o", "BatchMode=yes", host, "true"],
            capture_output=True, timeout=30, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        return done.returncode == 0

    def kill_sessions(self) -> int:
        """Kill sshd's per-connection processes, not the listener (its penalty table survives): every link drops."""
        listener = self.server.proc.pid if self.server.proc is not None else None
        sessions = []
        with contextlib.suppress(psutil.Error):
            sessions = psutil.Process(listener).children(recursive=True) if listener else []
        for proc in sessions:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(sessions, timeout=5)
        return len(sessions)


@contextlib.contextmanager
def held_in_namespace(bench: Bench, port: int) -> Iterator[None]:
    """Listen on 127.0.0.1 and ::1 port `port` inside the namespace: a RemoteForward there finds it taken."""
    code = (
        "import socket,sys,time\n"
        f"a=socket.create_server(('127.0.0.1',{port}))\n"
        f"b=socket.create_server(('::1',{port}),family=socket.AF_INET6)\n"
        "print('ready',flush=True)\ntime.sleep(600)\n"
    )
    proc = subprocess.Popen([*bench.ns.prefix(), sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        yield
    finally:
        proc.kill()
        proc.wait(5)


def _result(
    lab: Lab10, name: str, engine: str, since: int, host: str, note: str, others: int = 0, **values: object
) -> Result:
    """`others`: penalties the scenario itself caused (not tunneld)."""
    state = lab.bench.state(host)
    activated = lab.activations(since)[others:]
    login = "ok" if lab.login_works(host) else "REFUSED"
    shown = f"penalties caused by tunneld: {len(activated)}" + (f" ({'; '.join(activated)})" if activated else "")
    return Result(
        name, engine, values.get("detected"), values.get("recovered"), count(state, "attempts"),  # type: ignore[arg-type]
        lab.server.log.read_bytes()[since:].decode(errors="replace").count("Accepted publickey for "),
        lab.server.preauth_connections(since), count(state, "reconnects"), 0,
        f"{shown}; your own ssh afterwards: {login}" + (f"; {note}" if note else ""),
    )  # fmt: skip


def remote_forward_held(lab: Lab10, seconds: float) -> Result:
    """A RemoteForward whose port on the server is still held (a stale session), `--keep-trying` for `seconds`."""
    host, remote = "p10-rfwd", free_port_both()
    lab.write_config(host, [f"RemoteForward {remote} 127.0.0.1:{lab.bench.target_port}"])
    with held_in_namespace(lab.bench, remote):
        since = lab.server.log_mark()
        lab.bench.tunneld("start", host, "-F", str(lab.config), "--engine", "openssh", "--keep-trying", check=False)
        time.sleep(seconds)
        result = _result(lab, f"OpenSSH 10: RemoteForward port held {seconds:.0f} s", "openssh", since, host, "")
        lab.bench.tunneld("stop", host, check=False)
    result.left_behind = left_behind(lab.bench)
    return result


def flapping(lab: Lab10, engine: str, seconds: float, every_s: float = 3.0) -> Result:
    """sshd killed and restarted every `every_s` for `seconds` (its penalty table restarts with it: each cycle
    counts on its own, so this is a bound on what one outage costs)."""
    host = f"p10-flap-{engine}"
    lab.write_config(host, [f"LocalForward {lab.bench.local_port} 127.0.0.1:{lab.bench.target_port}"])
    lab.bench.tunneld("start", host, "-F", str(lab.config), "--engine", engine)
    since = lab.server.log_mark()
    deadline = time.monotonic() + seconds
    cycles = 0
    while time.monotonic() < deadline:
        lab.server.stop()
        time.sleep(every_s / 2)
        lab.server.start()
        time.sleep(every_s / 2)
        cycles += 1
    recovered = lab.bench.first_echo_after(time.monotonic())
    result = _result(lab, f"OpenSSH 10: sshd restarted every {every_s:.0f} s for {seconds:.0f} s", engine, since,
                     host, f"{cycles} restarts", recovered=recovered)  # fmt: skip
    lab.bench.tunneld("stop", host, check=False)
    result.left_behind = left_behind(lab.bench)
    return result


def blocked_by_others(lab: Lab10, engine: str) -> Result:
    """Something else (a port scanner, another tool) got this address blocked; then every link drops. tunneld
    sees `closed before the banner`, waits at least 20 s per attempt, and is back once the block ends."""
    host = f"p10-blocked-{engine}"
    lab.write_config(host, [f"LocalForward {lab.bench.local_port} 127.0.0.1:{lab.bench.target_port}"])
    lab.bench.tunneld("start", host, "-F", str(lab.config), "--engine", engine)
    wait_for(lab.bench.echo_works, 20, "the forward")
    since = lab.server.log_mark()
    for _ in range(STRAY_CONNECTS):  # what tunneld's old probes did, from the same address
        with contextlib.suppress(OSError):
            socket.create_connection((SERVER_IP, SSH10_PORT), timeout=2).close()
        time.sleep(STRAY_EVERY_S)
    wait_for(lambda: bool(lab.activations(since)), 30, "sshd to block the address")
    blocked_at = time.monotonic()
    lab.kill_sessions()
    detected = lab.bench.wait_state(host, ("lost", "backoff", "connecting"), 20)
    recovered = lab.bench.first_echo_after(blocked_at)
    state = lab.bench.state(host)
    errors = [state.get("previous_error"), state.get("last_error")]
    last = next((str(e.get("message", "")) for e in errors if isinstance(e, dict)), "")
    note = f"back {recovered:.1f} s after the block began" if recovered is not None else "not back"
    note += f"; tunneld said: {last[:90]}" if "refuses new connections" in last else "; the refusal was NOT recognised"
    result = _result(lab, f"OpenSSH 10: address blocked by {STRAY_CONNECTS} stray connections, links dropped",
                     engine, since, host, note, others=1, detected=detected, recovered=recovered)  # fmt: skip
    lab.bench.tunneld("stop", host, check=False)
    result.left_behind = left_behind(lab.bench)
    return result


def run_all(bench: Bench, found: Debian13, engines: list[str], quick: bool) -> list[Result]:
    """Every OpenSSH 10 scenario, each engine where it applies; the server is stopped afterwards."""
    lab = Lab10(bench, found)
    lab.server.start()
    results: list[Result] = []
    try:
        seconds = 30.0 if quick else 60.0
        if "openssh" in engines:
            results.append(remote_forward_held(lab, seconds))
            print(results[-1], flush=True)
        for engine in engines:
            results.append(flapping(lab, engine, seconds))
            print(results[-1], flush=True)
            results.append(blocked_by_others(lab, engine))
            print(results[-1], flush=True)
    finally:
        lab.server.stop()
    return results


def describe(found: Debian13) -> str:
    """One line on the server, for the report."""
    return f"{found.version} from a Debian 13 root ({Path(found.root)})"
