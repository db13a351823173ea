"""`make faults`: real faults on a real network path, both engines; writes docs/reliability.md.

A network namespace holds a real sshd and an echo target; a veth pair joins it to this namespace,
where tunneld runs. Scenarios: sshd restart, outages of 3 s and 65 s, a frozen server, the link
going down, a blackhole, a slow path, and a changed host key. For each: how long until tunneld
noticed, how long from the end of the fault until a connection through the forward worked again,
how many SSH attempts it made meanwhile, and whether anything was left running afterwards.

Root only (namespaces, links, routes); everything it creates is removed by name or pid on exit,
error or signal; every loop is bounded. Addresses: 198.18.77.0/30 (RFC 2544's benchmarking
range), only inside the namespace pair this script creates.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import DelayRelay, SshServer, become_subreaper, free_port, wait_for
from tunneld.pidfile import is_tunneld

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


Fault = Callable[[Bench], contextlib.AbstractContextManager[None]]


@contextlib.contextmanager
def sshd_down(bench: Bench) -> Iterator[None]:
    bench.sshd.stop()
    try:
        yield
    finally:
        bench.sshd.start()


@contextlib.contextmanager
def frozen(bench: Bench) -> Iterator[None]:
    bench.sshd.freeze()
    try:
        yield
    finally:
        bench.sshd.thaw()


@contextlib.contextmanager
def link_down(bench: Bench) -> Iterator[None]:
    bench.ns.exec("ip", "link", "set", bench.ns.server_if, "down")
    try:
        yield
    finally:
        bench.ns.exec("ip", "link", "set", bench.ns.server_if, "up")


@contextlib.contextmanager
def blackhole(bench: Bench) -> Iterator[None]:
    """The server's packets back to us vanish: SYNs arrive, nothing returns (no error, no reset)."""
    bench.ns.exec("ip", "route", "add", "blackhole", f"{HOST_IP}/32")
    try:
        yield
    finally:
        bench.ns.exec("ip", "route", "del", "blackhole", f"{HOST_IP}/32", check=False)


SCENARIOS: list[tuple[str, Fault, float]] = [
    ("sshd restart (2 s down)", sshd_down, 2.0),
    ("outage 3 s", sshd_down, 3.0),
    ("outage 65 s", sshd_down, 65.0),
    ("server frozen 20 s (SIGSTOP)", frozen, 20.0),
    ("link down 20 s", link_down, 20.0),
    ("blackhole 20 s", blackhole, 20.0),
]


def measure(bench: Bench, engine: str, name: str, fault: Fault, seconds: float) -> Result:
    host = f"f-{engine}"
    bench.tunneld("start", host, "-F", str(bench.config), "--engine", engine)
    wait_for(bench.echo_works, 20, "the forward")
    time.sleep(6)  # a link that held: the next loss is retried at once
    before = bench.mark()
    began = time.monotonic()
    with fault(bench):
        detected = bench.wait_state(host, ("lost", "backoff", "connecting"), min(DETECT_LIMIT_S, seconds))
        remaining = seconds - (time.monotonic() - began)
        if remaining > 0:
            time.sleep(remaining)
        attempts = _count(bench.state(host), "attempts")
    ended = time.monotonic()
    recovered = bench.first_echo_after(ended)
    bench.wait_state(host, ("up", "degraded"), 10)  # traffic flows before `up` is published (health check)
    state = bench.state(host)
    result = Result(
        name, engine, detected, recovered, attempts, bench.logins(before), bench.unauthenticated(before),
        _count(state, "reconnects"), 0,
        "" if detected is not None else "not noticed while the fault lasted",
    )  # fmt: skip
    bench.tunneld("stop", host, check=False)
    return result


def child_kills(bench: Bench, kills: int = 6) -> Result:
    """SIGKILL the ssh child of a healthy tunnel `kills` times, each after the link held 6 s: outage each time."""
    import psutil

    host = "f-openssh"
    bench.write_config(host, SSH_PORT, SERVER_IP)
    bench.tunneld("start", host, "-F", str(bench.config), "--engine", "openssh")
    before = bench.mark()
    outages = []
    for _ in range(kills):
        wait_for(bench.echo_works, 20, "the forward")
        time.sleep(6)
        children = bench.state(host).get("children")
        pid = children[0]["pid"] if isinstance(children, list) and children else None
        if not isinstance(pid, int):
            break
        killed = time.monotonic()
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()
        time.sleep(0.05)  # let the listener close before timing the way back
        recovered = bench.first_echo_after(killed)
        outages.append(recovered if recovered is not None else RECOVERY_LIMIT_S)
    state = bench.state(host)
    bench.tunneld("stop", host, check=False)
    shown = ", ".join(f"{o:.2f}" for o in outages)
    return Result(
        f"ssh child killed {len(outages)} times", "openssh", None, max(outages, default=None),
        _count(state, "attempts"), bench.logins(before), bench.unauthenticated(before), _count(state, "reconnects"),
        left_behind(bench), f"outages (s): {shown}",
    )  # fmt: skip


def slow_path(bench: Bench, engine: str, seconds: float) -> Result:
    """150 ms round trip through a delaying relay for `seconds`: no reconnect may happen."""
    host = f"slow-{engine}"
    relay = bench.relay or DelayRelay((SERVER_IP, SSH_PORT), DELAY_MS)
    bench.relay = relay
    bench.write_config(host, relay.port, "127.0.0.1")
    bench.tunneld("start", host, "-F", str(bench.config), "--engine", engine)
    wait_for(bench.echo_works, 30, "the forward over the slow path")
    before = bench.mark()
    rtts = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        began = time.monotonic()
        if bench.echo_works():
            rtts.append((time.monotonic() - began) * 1000)
        time.sleep(0.5)
    state = bench.state(host)
    bench.tunneld("stop", host, check=False)
    note = f"echo p50 {statistics.median(rtts):.0f} ms; loss not emulated (this kernel has no netem)" if rtts else ""
    return Result(
        f"150 ms round trip for {seconds:.0f} s", engine, None, None, _count(state, "attempts"),
        bench.logins(before), bench.unauthenticated(before), _count(state, "reconnects"), 0, note,
    )  # fmt: skip


def changed_key(bench: Bench, engine: str) -> Result:
    """The server's key changes: tunneld must fail (78) at once, carry no traffic, and not retry."""
    host = f"f-{engine}"
    bench.write_config(host, SSH_PORT, SERVER_IP)
    bench.tunneld("start", host, "-F", str(bench.config), "--engine", engine)
    wait_for(bench.echo_works, 20, "the forward")
    bench.sshd.stop()
    bench.sshd.regenerate_host_key()
    before = bench.mark()
    bench.sshd.start()
    detected = bench.wait_state(host, ("failed",), 30)
    time.sleep(5)
    state = bench.state(host)
    carried = bench.echo_works()
    bench.sshd.write_known_hosts()
    note = "state failed (78), no retries" if state.get("state") == "failed" else f"state {state.get('state')}"
    if carried:
        note += "; TRAFFIC STILL FLOWED"
    bench.tunneld("stop", host, check=False)
    return Result("host key changed", engine, detected, None, _count(state, "attempts"), bench.logins(before),
                  bench.unauthenticated(before), _count(state, "reconnects"), 0, note)  # fmt: skip


def _count(state: dict[str, object], key: str) -> int:
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


def report(results: list[Result], path: Path) -> None:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    lines = [
        "# Reliability: real faults on a real network path",
        "",
        f"Measured by `make faults` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"{platform.node()}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"{run('ssh', '-V', check=False).stderr.strip()}.",
        "",
        "sshd and the target run in a network namespace joined to tunneld's by a veth pair; faults are",
        "applied there (sshd killed or SIGSTOPped, the link set down, a blackhole route for the",
        "replies). Keepalive: tunneld's default 3 s x 3. *noticed*: from the start of the fault to",
        "state `lost`; *working again*: from the end of the fault to the first new connection",
        "through the forward that reaches the target; *attempts*: failed SSH attempts during the",
        "fault; *logins*: logins sshd accepted from the start of the fault on; *unauthenticated*:",
        "connections sshd saw in that time that ended before authentication (`Connection from` lines",
        "less `Accepted` ones at LogLevel VERBOSE): the probe that found the server back, attempts",
        "that reached a server that could not log them in. OpenSSH 9.8+ penalises the source of each",
        "(PerSourcePenalties); tunneld allows itself at most 6 a minute per host and probes only while",
        "TCP to the server fails. For the ssh-child kills, *working again* is the longest of the",
        "outages, each from the SIGKILL to a working connection.",
        "",
        "| fault | engine | noticed | working again | attempts | logins | unauthenticated | reconnects "
        "| left behind | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.scenario} | {r.engine} | {seconds(r.detected_s)} | {seconds(r.recovered_s)} | {r.attempts} | "
            f"{r.logins} | {r.unauthenticated} | {r.reconnects} | {r.left_behind} | {r.note} |"
        )
    lines.append("")
    path.write_text("\n".join(lines))
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "faults.json").write_text(json.dumps([asdict(r) for r in results], indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", default="openssh,paramiko")
    parser.add_argument("--quick", action="store_true", help="skip the 65 s outage and the slow path")
    parser.add_argument("--output", default=str(ROOT / "docs" / "reliability.md"))
    parser.add_argument("--only", default="", help="run only scenarios whose name contains this text")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) for a look afterwards")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("make faults: skipped: it needs root (network namespaces, links, routes)")
        return 0
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="tunneld-faults-"))
    ns = Namespace()
    bench = Bench(workdir, ns)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    become_subreaper()  # daemons that `start` detaches stay ours to count and stop
    results: list[Result] = []
    try:
        ns.create()
        bench.start_server()
        for engine in args.engines.split(","):
            for name, fault, seconds in SCENARIOS:
                if (args.quick and seconds > 30) or args.only not in name:
                    continue
                bench.write_config(f"f-{engine}", SSH_PORT, SERVER_IP)
                result = measure(bench, engine, name, fault, seconds)
                result.left_behind = left_behind(bench)
                print(result, flush=True)
                results.append(result)
            if not args.quick:
                results.append(slow_path(bench, engine, 60.0))
                print(results[-1], flush=True)
            if engine == "openssh" and args.only in "ssh child killed":
                results.append(child_kills(bench))
                print(results[-1], flush=True)
            results.append(changed_key(bench, engine))
            print(results[-1], flush=True)
        report(results, Path(args.output))
        print(f"wrote {args.output}")
        return 0
    finally:
        bench.stop()
        ns.remove()
        import shutil

        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
