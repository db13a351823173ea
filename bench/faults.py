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
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import penalty_faults
from bench.debian13 import prepared, unavailable_reason
from bench.faultlab import (
    DELAY_MS,
    DETECT_LIMIT_S,
    HOST_IP,
    RECOVERY_LIMIT_S,
    ROOT,
    SERVER_IP,
    SSH_PORT,
    Bench,
    Namespace,
    Result,
    count,
    left_behind,
    run,
)
from tests.harness import DelayRelay, become_subreaper, wait_for

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
        attempts = count(bench.state(host), "attempts")
    ended = time.monotonic()
    recovered = bench.first_echo_after(ended)
    bench.wait_state(host, ("up", "degraded"), 10)  # traffic flows before `up` is published (health check)
    state = bench.state(host)
    result = Result(
        name, engine, detected, recovered, attempts, bench.logins(before), bench.unauthenticated(before),
        count(state, "reconnects"), 0,
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
        count(state, "attempts"), bench.logins(before), bench.unauthenticated(before), count(state, "reconnects"),
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
        f"150 ms round trip for {seconds:.0f} s", engine, None, None, count(state, "attempts"),
        bench.logins(before), bench.unauthenticated(before), count(state, "reconnects"), 0, note,
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
    return Result("host key changed", engine, detected, None, count(state, "attempts"), bench.logins(before),
                  bench.unauthenticated(before), count(state, "reconnects"), 0, note)  # fmt: skip


def _rows(results: list[Result]) -> list[str]:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    rows = [
        "| fault | engine | noticed | working again | attempts | logins | unauthenticated | reconnects "
        "| left behind | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r.scenario} | {r.engine} | {seconds(r.detected_s)} | {seconds(r.recovered_s)} | {r.attempts} | "
            f"{r.logins} | {r.unauthenticated} | {r.reconnects} | {r.left_behind} | {r.note} |"
        )
    return rows


def _penalty_section(results: list[Result], server: str | None, unavailable: str | None) -> list[str]:
    lines = [
        "",
        "## OpenSSH 10: PerSourcePenalties",
        "",
        "OpenSSH 9.8 and later add 1 s of penalty to an address for every connection that ends before",
        "authentication (5 s for a refused login) and refuse every connection from it once 15 s have",
        "accumulated net of the time passed, for as long as the penalty (up to 600 s): more than one such",
        "connection a second, sustained, blocks the address (bench/penalties.py measured 17-22 plain",
        "connections in 2-5 s; one a second never blocked). tunneld probes only while TCP to the server",
        "fails and allows itself at most 6 such connections a minute per host; a server that refuses a",
        "connection before its banner is left alone for at least 20 s (at once when it says so, as",
        "OpenSSH 10 does with `Not allowed at this time`; after one more try when it closes without a",
        "word, which a server going down also does). The same faults against a real OpenSSH 10 sshd, in",
        "the same namespace. With the server restarted every 3 s, each link dies within seconds of its",
        "login, so the backoff grows (a flapping server is not hammered): *working again*, from the end",
        "of the flapping to the first working connection, is the rest of that grown wait.",
        "",
    ]
    if unavailable is not None:
        return [*lines, f"Not measured in this run: {unavailable}.", *_HOW_TO_GET_10]
    return [*lines, f"Server: {server}.", "", *_rows(results), *_HOW_TO_GET_10]


_HOW_TO_GET_10 = [
    "",
    "The OpenSSH 10 server: `make debian13-sshd` (root, once, about 30 s; cached in",
    "/var/cache/tunneld/debian13) builds a Debian 13 root with its sshd by debootstrap, and",
    "`Debian13.server()` in bench/debian13.py runs that sshd as the harness's `SshServer` (chrooted, on",
    "loopback or, with `outer_prefix=ip netns exec NS`, in the namespace). `bench/penalties.py` (root, by",
    "hand) measures what its penalties do to a client on 127.0.0.1, and tests/test_debian13.py proves the",
    "instrument wherever the root has been prepared.",
]


def report(
    results: list[Result], path: Path, penalties: list[Result], server: str | None, unavailable: str | None
) -> None:
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
        *_rows(results),
        *_penalty_section(penalties, server, unavailable),
        "",
    ]
    path.write_text("\n".join(lines))
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    every = [asdict(r) for r in [*results, *penalties]]
    (ROOT / "bench" / "results" / "faults.json").write_text(json.dumps(every, indent=1))


def run_scenarios(bench: Bench, engines: list[str], quick: bool, only: str) -> list[Result]:
    """Every fault against the namespace's sshd, for each engine."""
    results: list[Result] = []
    for engine in engines:
        for name, fault, seconds in SCENARIOS:
            if (quick and seconds > 30) or only not in name:
                continue
            bench.write_config(f"f-{engine}", SSH_PORT, SERVER_IP)
            result = measure(bench, engine, name, fault, seconds)
            result.left_behind = left_behind(bench)
            print(result, flush=True)
            results.append(result)
        if not quick:
            results.append(slow_path(bench, engine, 60.0))
            print(results[-1], flush=True)
        if engine == "openssh" and only in "ssh child killed":
            results.append(child_kills(bench))
            print(results[-1], flush=True)
        results.append(changed_key(bench, engine))
        print(results[-1], flush=True)
    return results


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
    try:
        ns.create()
        bench.start_server()
        results = run_scenarios(bench, args.engines.split(","), args.quick, args.only)
        found = prepared()
        unavailable = None if found is not None else unavailable_reason()
        penalties: list[Result] = []
        if found is not None and args.only in "OpenSSH 10":
            penalties = penalty_faults.run_all(bench, found, args.engines.split(","), args.quick)
        server = penalty_faults.describe(found) if found is not None else None
        report(results, Path(args.output), penalties, server, unavailable)
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
