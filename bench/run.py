"""`make bench`: tunneld against what its users would otherwise run, side by side on loopback.

Every process it starts is stopped by its pid in `finally`; the whole run is bounded by --budget-s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import scale, workload  # noqa: E402
from tests.harness import SshServer, free_port, wait_for  # noqa: E402

MIB = 1 << 20
IDLE_SETTLE_S = 5.0  # idle RSS is read this long after a tunnel came up


@dataclass
class Forwarder:
    """One way to reach the target: its local port and the processes that do the forwarding."""

    name: str
    port: int
    processes: dict[str, int] = field(default_factory=dict)  # role -> pid
    stop: Callable[[], None] = lambda: None

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.processes.values():
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(pid).cpu_times()
                total += times.user + times.system
        return total


class Bench:
    """Owns the servers, forwarders and the deadline of one benchmark run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.deadline = time.monotonic() + args.budget_s
        self.workdir = Path(tempfile.mkdtemp(prefix="tunneld-bench-"))
        self.env = dict(os.environ, TUNNELD_HOME=str(self.workdir / "tunneld"), PYTHONPATH=str(ROOT))
        self.env.pop("SSH_AUTH_SOCK", None)
        self.sshd = SshServer(self.workdir / "sshd")
        self.sshd.max_startups = "10:30:100"  # OpenSSH's default: what `start` of many hosts must live with
        self.config = self.workdir / "ssh_config"
        self.target: subprocess.Popen[str] | None = None
        self.target_port = 0
        self.started: list[Forwarder] = []
        self.results: dict[str, object] = {}
        self.round_rows: list[dict[str, dict[str, object]]] = []
        self.rss_before_concurrency: dict[str, dict[str, float | None]] = {}
        self.idle_rss: dict[str, dict[str, float | None]] = {}
        self.skipped: list[str] = []

    # -- helpers ----------------------------------------------------------------------------

    def left(self, what: str, need_s: float) -> bool:
        if time.monotonic() + need_s < self.deadline:
            return True
        self.skipped.append(what)
        print(f"  skipped {what}: the run's time budget is spent", flush=True)
        return False

    def tunneld(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "tunneld", *args], env=self.env, capture_output=True,
                              text=True, timeout=120, check=False)  # fmt: skip
        if check and done.returncode != 0:
            raise RuntimeError(f"tunneld {' '.join(args)} failed: {done.stderr}")
        return done

    def state(self, host: str) -> dict[str, object]:
        path = self.workdir / "tunneld" / "state" / f"{host}.state.json"
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads(path.read_text()))
        return {}

    def host_block(self, alias: str, forwards: list[str]) -> str:
        return self.sshd.client_config(alias, forwards)

    # -- setup ------------------------------------------------------------------------------

    def start_servers(self) -> None:
        self.sshd.start()
        self.target = subprocess.Popen([sys.executable, str(ROOT / "bench" / "target.py")], stdout=subprocess.PIPE,
                                       text=True)  # fmt: skip
        assert self.target.stdout is not None
        self.target_port = int(self.target.stdout.readline())

    def forwarders(self) -> Iterator[Forwarder]:
        yield Forwarder("direct", self.target_port)
        yield self.plain_ssh()
        yield self.tunneld_forwarder("openssh")
        yield self.tunneld_forwarder("paramiko")
        yield self.sshtunnel()

    def plain_ssh(self) -> Forwarder:
        port = free_port()
        proc = subprocess.Popen(
            ["ssh", "-N", "-F", str(self.config), "-o", "ExitOnForwardFailure=yes", "-L",
             f"{port}:127.0.0.1:{self.target_port}", "plain"],
            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(lambda: scale.listens(proc.pid, port), 20, "ssh -L to listen")
        return Forwarder("ssh -N -L", port, {"ssh": proc.pid}, lambda: _stop(proc.pid))

    def tunneld_forwarder(self, engine: str) -> Forwarder:
        host = f"bench-{engine}"
        self.tunneld("start", host, "-F", str(self.config), "--engine", engine)
        pid = int(json.loads((self.workdir / "tunneld" / "state" / f"{host}.pid").read_text())["pid"])
        processes = {"supervisor": pid}
        children = self.state(host).get("children")
        for child in children if isinstance(children, list) else []:
            processes[str(child["name"])] = int(child["pid"])

        def stop() -> None:
            self.tunneld("stop", host, check=False)

        time.sleep(IDLE_SETTLE_S)  # the steady state a tunnel spends most of its life in
        self.idle_rss[f"tunneld ({engine})"] = {role: _rss_mib(p) for role, p in processes.items()}
        return Forwarder(f"tunneld ({engine})", self.config_port(host), processes, stop)

    def config_port(self, host: str) -> int:
        text = self.config.read_text().split(f"Host {host}\n", 1)[1]
        return int(next(line for line in text.splitlines() if "LocalForward" in line).split()[1])

    def sshtunnel(self) -> Forwarder:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "sshtunnel_peer.py"), str(self.sshd.port), self.sshd.user,
             str(self.sshd.client_key), str(self.target_port), str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("sshtunnel did not start")
        return Forwarder("sshtunnel", port, {"sshtunnel": proc.pid}, lambda: _stop(proc.pid))

    def write_config(self) -> None:
        blocks = [self.host_block("plain", [])]
        for engine in ("openssh", "paramiko"):
            blocks.append(
                self.host_block(f"bench-{engine}", [f"LocalForward {free_port()} 127.0.0.1:{self.target_port}"])
            )
        for i in range(5):
            blocks.append(self.host_block(f"cli{i}", [f"LocalForward {free_port()} 127.0.0.1:{self.target_port}"]))
        self.config.write_text("".join(blocks))

    # -- measurements -------------------------------------------------------------------------

    def measure(self, fwd: Forwarder) -> dict[str, object]:
        a = self.args
        size = a.bulk_mib * MIB
        cpu0 = fwd.cpu_seconds()
        up = workload.bulk_up(fwd.port, size)
        down = workload.bulk_down(fwd.port, size)
        cpu = fwd.cpu_seconds() - cpu0
        rtt = workload.summary(workload.round_trips(fwd.port, a.round_trips))
        new = workload.summary(workload.new_connections(fwd.port, a.new_connections))
        # The high-water mark so far covers bulk, round trips and new connections, not yet 1000 at once.
        self.rss_before_concurrency.setdefault(fwd.name, {r: _peak_rss_mib(p) for r, p in fwd.processes.items()})
        wall, failures = workload.concurrent(fwd.port, a.concurrent, a.concurrent_kib * 1024)
        gib = 2 * size / (1 << 30)
        return {
            "up_mbs": up, "down_mbs": down, "rtt_ms": rtt, "new_conn_ms": new,
            "concurrent_wall_s": wall, "concurrent_failures": failures,
            "cpu_s_per_gib": cpu / gib if fwd.processes else None,
        }  # fmt: skip

    def rounds(self, forwarders: list[Forwarder]) -> None:
        for r in range(self.args.rounds):
            if not self.left(f"round {r + 1}", 60):
                return
            order = forwarders[r % len(forwarders) :] + forwarders[: r % len(forwarders)]
            print(f"round {r + 1}/{self.args.rounds}: {', '.join(f.name for f in order)}", flush=True)
            row = {}
            for fwd in order:
                row[fwd.name] = self.measure(fwd)
                m = row[fwd.name]
                print(
                    f"  {fwd.name:18} up {m['up_mbs']:6.0f} MB/s  down {m['down_mbs']:6.0f} MB/s  "
                    f"rtt p50 {m['rtt_ms']['p50']:.3f} ms  new p50 {m['new_conn_ms']['p50']:.2f} ms  "  # type: ignore[index]
                    f"1000x {m['concurrent_wall_s']:.1f} s / {m['concurrent_failures']} failed",
                    flush=True,
                )
            self.round_rows.append(row)

    def recovery(self, engine: str, outage_s: float) -> float | None:
        """Seconds from the server answering again until a connection through the forward works."""
        host = f"bench-{engine}"
        port = self.config_port(host)
        # Both tunnels share this sshd: let an earlier test's reconnect finish before the clock starts.
        wait_for(lambda: self.state(host).get("state") == "up" and workload.echo_once(port, 2), 90, f"{host} up")
        self.sshd.stop()
        wait_for(lambda: self.state(host).get("state") not in ("up", "degraded"), 30, "the loss to be noticed")
        time.sleep(outage_s)
        self.sshd.start()  # returns once sshd sends its banner: the server is reachable again
        back = time.perf_counter()
        while time.perf_counter() - back < 60:
            if workload.echo_once(port, 1.0):
                return time.perf_counter() - back
            time.sleep(0.01)
        return None

    def hang_detection(self, engine: str) -> float | None:
        """Seconds from freezing sshd (SIGSTOP) until tunneld reports the link lost."""
        host = f"bench-{engine}"
        # After a hang the other tunnel may sit in a backoff step (TCP still answered): allow for the 30 s cap.
        wait_for(lambda: self.state(host).get("state") == "up", 90, f"{host} up")
        self.sshd.freeze()
        frozen = time.perf_counter()
        try:
            wait_for(lambda: self.state(host).get("state") not in ("up", "degraded"), 60, "the hang", 0.02)
            return time.perf_counter() - frozen
        except TimeoutError:
            return None
        finally:
            self.sshd.thaw()

    def cli_timing(self) -> dict[str, float]:
        hosts = [f"cli{i}" for i in range(5)]
        self.tunneld("start", *hosts, "-F", str(self.config), "--engine", "openssh")
        try:
            entry = "import sys; from tunneld.cli import main; sys.argv = ['tunneld', 'status']; main()"
            commands = {
                "tunneld status (5 tunnels)": [sys.executable, "-c", entry],
                "python -c pass": [sys.executable, "-c", "pass"],
                "python -c 'import click, psutil'": [sys.executable, "-c", "import click, psutil"],
            }
            out = {name: _median_wall(cmd, self.env, self.args.cli_runs) for name, cmd in commands.items()}
        finally:
            self.tunneld("stop", *hosts, check=False)
        return out

    def run(self) -> dict[str, object]:
        info = machine_info()
        self.results.update(machine=info, rounds=self.round_rows, skipped=self.skipped)
        self.start_servers()
        self.write_config()
        forwarders: list[Forwarder] = []
        try:
            for fwd in self.forwarders():
                forwarders.append(fwd)
                self.started.append(fwd)
            self.rounds(forwarders)
            self.results["idle_rss_mib"] = self.idle_rss
            self.results["peak_rss_mib_before_concurrency"] = {
                name: roles for name, roles in self.rss_before_concurrency.items() if roles
            }
            self.results["peak_rss_mib"] = {
                f.name: {role: _peak_rss_mib(pid) for role, pid in f.processes.items()}
                for f in forwarders
                if f.processes
            }
            recovery: dict[str, dict[str, float | None]] = {}
            hang: dict[str, float | None] = {}
            for engine in ("openssh", "paramiko"):
                recovery[engine] = {}
                for outage in self.args.outages:
                    if self.left(f"recovery {engine} {outage} s", outage + 120):
                        seconds = self.recovery(engine, outage)
                        recovery[engine][f"{outage:g} s"] = seconds
                        print(f"  recovery {engine} after {outage:g} s: {seconds}", flush=True)
            for engine in ("openssh", "paramiko"):
                if self.left(f"hang detection {engine}", 120):
                    hang[engine] = self.hang_detection(engine)
                    print(f"  hang detection {engine}: {hang[engine]}", flush=True)
            self.results["recovery_s"] = recovery
            self.results["hang_detection_s"] = hang
            if self.left("cli timing", 30):
                self.results["cli_s"] = self.cli_timing()
                print(f"  cli: {self.results['cli_s']}", flush=True)
            if self.left("long path", 240):
                self.results["long_path_mbs"] = scale.long_path(self)
            if self.left("50 tunnels", 180):
                self.results["many_tunnels"] = scale.many_tunnels(self)
        finally:
            for fwd in reversed(self.started):
                with contextlib.suppress(Exception):
                    fwd.stop()
            if self.target is not None:
                _stop(self.target.pid)
            self.sshd.thaw()
            self.sshd.stop()
            shutil.rmtree(self.workdir, ignore_errors=True)
        return self.results


def _stop(pid: int) -> None:
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        proc.terminate()
        _, alive = psutil.wait_procs([proc], timeout=5)
        for survivor in alive:
            survivor.kill()


def _peak_rss_mib(pid: int) -> float | None:
    return _status_mib(pid, "VmHWM:")


def _rss_mib(pid: int) -> float | None:
    return _status_mib(pid, "VmRSS:")


def _status_mib(pid: int, field: str) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return None


def _median_wall(cmd: list[str], env: dict[str, str], runs: int) -> float:
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def machine_info() -> dict[str, str]:
    import paramiko
    import sshtunnel

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")  # fmt: skip
    ssh_version = subprocess.run(["ssh", "-V"], capture_output=True, text=True, check=False).stderr.strip()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "openssh": ssh_version,
        "paramiko": paramiko.__version__,
        "sshtunnel": sshtunnel.__version__,
    }


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through Bench.run's finally: everything is stopped


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # background jobs start with SIGINT ignored
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bulk-mib", type=int, default=256)
    parser.add_argument("--round-trips", type=int, default=2000)
    parser.add_argument("--new-connections", type=int, default=300)
    parser.add_argument("--concurrent", type=int, default=1000)
    parser.add_argument("--concurrent-kib", type=int, default=256)
    parser.add_argument("--outages", type=float, nargs="*", default=[2.0, 60.0])
    parser.add_argument("--cli-runs", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=1800.0, help="stop measuring after this long")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    args = parser.parse_args()
    results = Bench(args).run()
    results["command"] = "python bench/run.py " + " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
