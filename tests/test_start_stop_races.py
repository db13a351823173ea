"""`start` and `stop` that overlap, with the real CLI and a real sshd: the later command wins, nothing is left over."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from tests.harness import EchoServer, SshServer, free_port, wait_for
from tests.helpers import read_state, run_cli, state_dir, tunneld_cmd, write_config

HOST = "racer"
STOP_TIMEOUT_S = 3
# Run by ssh for `Match exec`: inside a detached tunneld (a start in progress, its lock held), wait until the
# test opens the gate; everywhere else (`start` resolving hosts in the foreground) pass at once.
GATE = """
import os, sys, time
import psutil
host, gate = sys.argv[1], sys.argv[2]
ancestors = []
for proc in psutil.Process().parents():
    try:
        ancestors.append(" ".join(proc.cmdline()))
    except psutil.Error:
        pass
if any("tunneld.runtime.detached" in line for line in ancestors):
    open(os.path.join(gate, "held-" + host), "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(gate, "open")) and time.monotonic() < deadline:
        time.sleep(0.02)
"""

# Run by ssh for `Match exec` in a foreground `tunneld run`: hold its startup (lock taken, nothing recorded yet)
# until a `tunneld stop` holds the host's stop lock, i.e. until that stop is under way.
UNTIL_STOPPING = """
import fcntl, os, sys, time
stopping, gate = sys.argv[1], sys.argv[2]
open(os.path.join(gate, "held"), "w").close()
deadline = time.monotonic() + 60
while time.monotonic() < deadline and not os.path.exists(os.path.join(gate, "open")):
    try:
        with open(stopping) as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        break
    except OSError:
        pass
    time.sleep(0.02)
"""


def pid_of(host: str) -> int:
    return int(json.loads((state_dir() / f"{host}.pid").read_text())["pid"])


def sigterm_pending(pid: int) -> bool:
    """Return True while SIGTERM waits to be delivered to `pid` (it does while the process is stopped)."""
    status = Path(f"/proc/{pid}/status").read_text()
    masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask & (1 << (signal.SIGTERM - 1)) for mask in masks)


def running_hosts() -> list[str]:
    return sorted(r["host"] for r in json.loads(run_cli("status", "--json").stdout)["hosts"] if r["running"])


def detached_tunnelds() -> list[int]:
    """Return our descendants that are detached tunnelds (the test process is their subreaper)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and "tunneld.runtime.detached" in proc.cmdline():
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def test_a_start_during_a_slow_stop_waits_for_the_stop_and_starts(
    tmp_path: Path, sshd: SshServer, echo: EchoServer
) -> None:
    config = write_config(tmp_path, sshd.client_config(HOST, [f"LocalForward {free_port()} 127.0.0.1:{echo.port}"]))
    assert run_cli("start", HOST, "-F", str(config)).returncode == 0
    old = pid_of(HOST)
    daemon = psutil.Process(old)
    daemon.suspend()  # SIGSTOP: the stop's SIGTERM stays pending; the stop lasts its --timeout, then SIGKILLs
    try:
        stopping = subprocess.Popen(
            tunneld_cmd("stop", HOST, "--timeout", str(STOP_TIMEOUT_S)), stdout=subprocess.PIPE, text=True
        )
        wait_for(lambda: sigterm_pending(old), 10, "the stop to send SIGTERM")
        started = run_cli("start", HOST, "-F", str(config))
        stopped, _ = stopping.communicate(timeout=30)
    finally:
        if daemon.is_running():
            daemon.resume()
    assert stopped.strip() == f"{HOST}  stopped (pid {old} ignored SIGTERM for {STOP_TIMEOUT_S} s; killed with SIGKILL)"
    assert started.returncode == 0 and f"{HOST}  up  " in started.stdout, started.stdout + started.stderr
    assert running_hosts() == [HOST] and pid_of(HOST) != old
    assert run_cli("stop", HOST).returncode == 0


def test_stop_all_during_start_all_leaves_nothing_running(tmp_path: Path, echo: EchoServer) -> None:
    """Every host's tunneld is held while it resolves its config (lock taken, not connected yet) when
    `stop --all` runs: each is stopped, and `start --all` says so for each."""
    server = SshServer(tmp_path / "sshd")
    server.start()
    gate = tmp_path / "gate"
    gate.mkdir()
    script = tmp_path / "gate.py"
    script.write_text(GATE)
    hosts = [f"s{i}" for i in range(8)]
    text = "".join(server.client_config(h, [f"LocalForward {free_port()} 127.0.0.1:{echo.port}"]) for h in hosts)
    config = write_config(tmp_path, text + f'Match exec "{sys.executable} {script} %n {gate}"\n  Compression no\n')
    starting = subprocess.Popen(
        tunneld_cmd("start", "--all", "-F", str(config)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: len(list(gate.glob("held-*"))) == len(hosts), 60, "every host's tunneld to be starting")
        stopped = run_cli("stop", "--all")
        (gate / "open").touch()
        out, err = starting.communicate(timeout=120)
        assert stopped.returncode == 0 and stopped.stdout.count("  stopped") == len(hosts), stopped.stdout
        assert running_hosts() == [] and detached_tunnelds() == [], out + err
        assert err.count("was stopped before it was up") == len(hosts), out + err
        assert all(read_state(h).get("state") == "stopped" for h in hosts)
    finally:
        (gate / "open").touch()
        if starting.poll() is None:
            starting.kill()
            starting.wait()
        run_cli("stop", "--all")
        server.stop()


def test_a_stop_during_a_foreground_runs_startup_stops_it(tmp_path: Path, sshd: SshServer, echo: EchoServer) -> None:
    """`tunneld run` (what autostart runs) holds the lock while it resolves its config, before its pid file
    exists: a stop then waits for the pid file instead of answering "not running"."""
    gate = tmp_path / "gate"
    gate.mkdir()
    script = tmp_path / "until_stopping.py"
    script.write_text(UNTIL_STOPPING)
    text = sshd.client_config(HOST, [f"LocalForward {free_port()} 127.0.0.1:{echo.port}"])
    stopping = state_dir() / f"{HOST}.stopping"  # the lock `stop` holds while it works
    match = f'Match exec "{sys.executable} {script} {stopping} {gate}"\n  Compression no\n'
    config = write_config(tmp_path, text + match)
    run = subprocess.Popen(tunneld_cmd("run", HOST, "-F", str(config)), stderr=subprocess.PIPE, text=True)
    try:
        wait_for((gate / "held").exists, 30, "the run to resolve its config")
        stopped = run_cli("stop", HOST, "--timeout", "10")
        assert (stopped.returncode, stopped.stdout.strip()) == (0, f"{HOST}  stopped"), stopped.stdout
        (gate / "open").touch()
        _, err = run.communicate(timeout=30)
        assert run.returncode in (0, -signal.SIGTERM) and running_hosts() == [], err
    finally:
        (gate / "open").touch()
        if run.poll() is None:
            run.kill()
            run.wait()
