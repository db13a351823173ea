"""`make bench`, the sections beyond loopback: a long fat path (40 ms round trip) and 50 tunnels at once."""

from __future__ import annotations

import contextlib
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import psutil

from bench import workload
from tests.harness import SshServer, free_port, wait_for


class Bench(Protocol):
    """What these sections use of a benchmark run (bench.run.Bench): its files, servers and the tunneld CLI."""

    config: Path
    workdir: Path
    sshd: SshServer
    target_port: int

    def tunneld(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]: ...
    def state(self, host: str) -> dict[str, object]: ...
    def host_block(self, alias: str, forwards: list[str]) -> str: ...


MIB = 1 << 20
DELAY_MS = 20  # each way: 40 ms round trip
LONG_PATH_RUNS = 3
IDLE_SETTLE_S = 5.0


@contextlib.contextmanager
def _ssh_l(bench: Bench, port: int, ssh_port: int, local: int) -> Iterator[int]:
    """Plain `ssh -N -L` through `ssh_port` (the relay); stopped by pid."""
    proc = subprocess.Popen(
        ["ssh", "-N", "-F", str(bench.config), "-o", "ExitOnForwardFailure=yes", "-o", f"Port={ssh_port}",
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-L", f"{local}:127.0.0.1:{port}", "plain"],
        stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: workload.echo_once(local, 2), 30, "ssh -L over the long path")
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(5)


def long_path(bench: Bench, size_mib: int = 96) -> dict[str, dict[str, float]]:
    """Download and upload MB/s over a 40 ms relay for ssh -N -L, both tunneld engines and sshtunnel
    (each the median of LONG_PATH_RUNS transfers on one tunnel; every transfer is a new connection)."""
    relay = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "delay_relay.py"), "127.0.0.1", str(bench.sshd.port),
         str(DELAY_MS)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    out: dict[str, dict[str, float]] = {}
    try:
        assert relay.stdout is not None
        relay_port = int(relay.stdout.readline())
        known = bench.workdir / "known_long"
        known.write_text(f"[127.0.0.1]:{relay_port} {bench.sshd.host_public_key()}\n")
        blocks = ""
        for engine in ("openssh", "paramiko"):
            block = bench.host_block(f"long-{engine}", [f"LocalForward {free_port()} 127.0.0.1:{bench.target_port}"])
            blocks += block.replace(f"Port {bench.sshd.port}", f"Port {relay_port}").replace(
                str(bench.sshd.known_hosts), str(known)
            )
        config = bench.workdir / "ssh_config_long"
        config.write_text(bench.config.read_text() + blocks)

        def measure(name: str, port: int) -> None:
            # The median of three: one transfer lasts a second or two, and a busy moment would decide it.
            down = statistics.median(workload.bulk_down(port, size_mib * MIB) for _ in range(LONG_PATH_RUNS))
            up = statistics.median(workload.bulk_up(port, size_mib // 2 * MIB) for _ in range(LONG_PATH_RUNS))
            out[name] = {"down_mbs": down, "up_mbs": up}
            print(f"  long path {name:18} down {down:6.0f} MB/s  up {up:6.0f} MB/s", flush=True)

        local = free_port()
        with _ssh_l(bench, bench.target_port, relay_port, local):
            measure("ssh -N -L", local)
        for engine in ("openssh", "paramiko"):
            host = f"long-{engine}"
            bench.tunneld("start", host, "-F", str(config), "--engine", engine)
            try:
                text = config.read_text().split(f"Host {host}\n", 1)[1]
                port = int(next(line for line in text.splitlines() if "LocalForward" in line).split()[1])
                measure(f"tunneld ({engine})", port)
            finally:
                bench.tunneld("stop", host, check=False)
        local = free_port()
        peer = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "sshtunnel_peer.py"), str(relay_port), bench.sshd.user,
             str(bench.sshd.client_key), str(bench.target_port), str(local)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        try:
            assert peer.stdout is not None
            if peer.stdout.readline().strip() == "ready":
                measure("sshtunnel", local)
        finally:
            peer.kill()
            peer.wait(5)
    finally:
        relay.kill()
        relay.wait(5)
    return out


def quiet_port(rng: random.Random) -> int:
    """Return a port below the ephemeral range that is free on 127.0.0.1 and ::1 right now.

    A `localhost` forward binds both families; and with a hundred connections being opened, a port
    the kernel handed out as free (an ephemeral one) can be taken again before the tunnel binds it.
    """
    for _ in range(500):
        port = rng.randrange(20000, 32768)
        try:
            for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                with socket.socket(family, socket.SOCK_STREAM) as sock:
                    sock.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no quiet port free on both loopback families")


def listens(pid: int, port: int) -> bool:
    """Return True when process `pid` listens on `port`."""
    with contextlib.suppress(psutil.Error):
        return any(c.laddr and c.laddr.port == port for c in psutil.Process(pid).net_connections())
    return False


def _rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total / MIB


def _pss_mib(pids: list[int]) -> float:
    """Proportional set size: shared pages (the python binary, libraries) split among the processes sharing them,
    so a sum over many processes is what they really cost together; VmRSS counts shared pages once per process."""
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_full_info().pss
    return total / MIB


def many_tunnels(bench: Bench, count: int = 50) -> dict[str, object]:
    """`tunneld start` of `count` hosts on one sshd (default MaxStartups): wall time to all up, and memory
    per tunnel next to `count` plain `ssh -fN` processes."""
    hosts = [f"many{i:02d}" for i in range(count)]
    config = bench.workdir / "ssh_config_many"
    rng = random.Random(count)
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(quiet_port(rng))
    config.write_text(
        bench.config.read_text()
        + "".join(
            bench.host_block(h, [f"LocalForward {p} 127.0.0.1:{bench.target_port}"])
            for h, p in zip(hosts, ports, strict=True)
        )
    )
    began = time.perf_counter()
    done = bench.tunneld("start", *hosts, "-F", str(config), "--engine", "openssh", check=False)
    wall = time.perf_counter() - began
    up = sum(1 for h in hosts if bench.state(h).get("state") in ("up", "degraded"))
    print(f"  {count} tunnels: {up} up in {wall:.1f} s (exit {done.returncode})", flush=True)
    failures = [line for line in done.stderr.splitlines() if line.strip()]
    for line in failures[:10]:
        print(f"    {line}", flush=True)
    try:
        time.sleep(IDLE_SETTLE_S)
        supervisors, children = [], []
        for host in hosts:
            state = bench.state(host)
            pid = state.get("pid")
            if isinstance(pid, int):
                supervisors.append(pid)
            for child in state.get("children") or []:  # type: ignore[attr-defined]
                children.append(int(child["pid"]))
        tunneld_total = _rss_mib(supervisors) + _rss_mib(children)
        tunneld_pss = _pss_mib(supervisors) + _pss_mib(children)
        per_supervisor = statistics.median(_rss_mib([p]) for p in supervisors) if supervisors else 0.0
        per_ssh = statistics.median(_rss_mib([p]) for p in children) if children else 0.0
    finally:
        bench.tunneld("stop", *hosts, check=False)
    plain: list[subprocess.Popen[bytes]] = []
    plain_up = 0
    try:
        # Started 8 at a time, each batch waited for until it listens: all at once, sshd's MaxStartups would
        # drop some, and a half-started ssh would make the comparison look cheaper than it is.
        for batch in range(0, count, 8):
            started = []
            for _ in hosts[batch : batch + 8]:
                port = free_port()
                started.append((port, subprocess.Popen(
                    ["ssh", "-N", "-F", str(bench.config), "-o", "ExitOnForwardFailure=yes", "-L",
                     f"{port}:127.0.0.1:{bench.target_port}", "plain"],
                    stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )))  # fmt: skip
            for port, proc in started:
                plain.append(proc)
                with contextlib.suppress(TimeoutError):
                    wait_for(lambda p=proc, n=port: listens(p.pid, n), 20, "plain ssh -N -L to listen")
                    plain_up += 1
        time.sleep(IDLE_SETTLE_S)
        plain_total = _rss_mib([p.pid for p in plain])
        plain_pss = _pss_mib([p.pid for p in plain])
    finally:
        for proc in plain:
            proc.kill()
        for proc in plain:
            proc.wait(5)
    result = {
        "count": float(count), "up": float(up), "start_wall_s": wall, "tunneld_total_mib": tunneld_total,
        "supervisor_median_mib": per_supervisor, "ssh_median_mib": per_ssh, "plain_ssh_total_mib": plain_total,
        "tunneld_total_pss_mib": tunneld_pss, "plain_ssh_total_pss_mib": plain_pss, "plain_ssh_up": float(plain_up),
        "failures": failures,
    }  # fmt: skip
    print(f"  {count} tunnels: tunneld {tunneld_total:.0f} MiB RSS ({tunneld_pss:.0f} PSS), plain ssh -N "
          f"({plain_up} listening) {plain_total:.0f} MiB RSS ({plain_pss:.0f} PSS)", flush=True)  # fmt: skip
    return result
