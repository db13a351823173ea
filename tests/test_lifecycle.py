"""start / status / stop / restart / logs / wait / check as a user runs them: real CLI processes, real sshd."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.harness import EchoServer, SshServer, echo_roundtrip, free_port, ipv6_loopback, wait_for
from tests.helpers import read_log, read_state, run_cli, state_dir, tunneld_cmd, write_config
from tunneld.errors import EXIT_CONFIG, EXIT_NOT_RUNNING, EXIT_RUNTIME, EXIT_UNAVAILABLE

HOST = "mlflowserver"
STATUS_KEYS = {
    "host", "state", "running", "pid", "engine", "started_at", "since", "uptime_s", "reconnects", "attempts",
    "next_try_at", "last_error", "previous_error", "forwards", "children", "autostart", "config_changed",
    "config_changes",
}  # fmt: skip
# Field -> the types the documented schema allows (docs/usage.md, `status --json`).
NUMBER, OPTIONAL_NUMBER = (int, float), (int, float, type(None))
HOST_TYPES: dict[str, tuple[type, ...]] = {
    "host": (str,), "state": (str,), "running": (bool,), "pid": (int, type(None)), "engine": (str, type(None)),
    "started_at": OPTIONAL_NUMBER, "since": OPTIONAL_NUMBER, "uptime_s": OPTIONAL_NUMBER, "reconnects": (int,),
    "attempts": (int,), "next_try_at": OPTIONAL_NUMBER, "last_error": (dict, type(None)),
    "previous_error": (dict, type(None)), "forwards": (list,), "children": (list,), "autostart": (str, type(None)),
    "config_changed": (bool,), "config_changes": (list,),
}  # fmt: skip
FORWARD_TYPES: dict[str, tuple[type, ...]] = {
    "forward": (str,), "listen": (list,), "target": (str,), "state": (str,), "detail": (str, type(None)),
    "bytes_in": (int, type(None)), "bytes_out": (int, type(None)), "open_connections": (int, type(None)),
    "total_connections": (int, type(None)), "exposed": (bool,), "health": (dict, type(None)),
}  # fmt: skip
ERROR_TYPES: dict[str, tuple[type, ...]] = {
    "kind": (str,), "message": (str,), "hint": (str, type(None)), "exit_code": (int, type(None)),
    "retryable": (bool,), "at": OPTIONAL_NUMBER,
}  # fmt: skip


def assert_types(data: dict[str, object], types: dict[str, tuple[type, ...]]) -> None:
    """Every documented field is there with a documented type (bool is not accepted as a number)."""
    assert set(data) == set(types), set(data) ^ set(types)
    for key, allowed in types.items():
        value = data[key]
        assert isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed), (key, value)


FORWARD_KEYS = {
    "forward", "listen", "target", "state", "detail", "bytes_in", "bytes_out", "open_connections",
    "total_connections", "exposed", "health",
}  # fmt: skip


def is_daemon(cmdline: list[str]) -> bool:
    """A supervisor: `tunneld run HOST`, or `python -m tunneld.runtime.detached HOST` as `start` runs it."""
    return "tunneld.runtime.detached" in cmdline or "run" in cmdline


def tunnel_processes(config: Path) -> list[psutil.Process]:
    """Every live process (tunneld or ssh) this test started for its ssh_config.

    Only our own descendants are looked at: the test process is the subreaper of everything it
    starts (conftest), so a daemon that `start` detached is still found here, by pid.
    """
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = proc.cmdline()
        except psutil.Error:
            continue
        if str(config) in cmdline and (is_daemon(cmdline) or "-N" in cmdline):
            found.append(proc)
    return found


@pytest.fixture
def config(tmp_path: Path, sshd: SshServer, echo: EchoServer) -> Path:
    return write_config(tmp_path, sshd.client_config(HOST, [f"LocalForward {free_port()} 127.0.0.1:{echo.port}"]))


def local_port(config: Path) -> int:
    line = next(line for line in config.read_text().splitlines() if "LocalForward" in line)
    return int(line.split()[1])


def gone(pid: int) -> bool:
    """True when `pid` has exited (a zombie waiting for init to reap it counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def pid_of(host: str) -> int:
    return int(json.loads((state_dir() / f"{host}.pid").read_text())["pid"])


def test_start_status_stop_round_trip(config: Path, engine: str) -> None:
    started = run_cli("start", HOST, "-F", str(config), "--engine", engine)
    assert started.returncode == 0, started.stderr
    first, second = started.stdout.splitlines()
    port = local_port(config)
    listen = f"127.0.0.1:{port}, [::1]:{port}" if ipv6_loopback() else f"127.0.0.1:{port}"
    assert first.startswith(f"{HOST}  up  {listen} -> 127.0.0.1:"), first
    assert second == f"stop it with: tunneld stop {HOST}"
    assert echo_roundtrip(("127.0.0.1", local_port(config)), b"ping") == b"ping"

    status = run_cli("status", HOST)
    assert status.returncode == 0
    header, row = status.stdout.splitlines()
    assert header.split() == ["HOST", "STATE", "PID", "UPTIME", "FORWARDS", "RECONNECTS", "AUTOSTART", "LAST", "ERROR"]
    assert row.split()[:3] == [HOST, "up", str(pid_of(HOST))]

    stopped = run_cli("stop", HOST)
    assert (stopped.returncode, stopped.stdout.strip()) == (0, f"{HOST}  stopped")
    assert not (state_dir() / f"{HOST}.pid").exists()
    assert tunnel_processes(config) == []
    after = run_cli("status", HOST)
    assert after.returncode == EXIT_NOT_RUNNING and f"{HOST}  stopped" in after.stdout
    again = run_cli("stop", HOST)
    assert (again.returncode, again.stdout.strip()) == (0, f"{HOST}  not running")


def test_state_files_are_private(config: Path) -> None:
    assert run_cli("start", HOST, "-F", str(config)).returncode == 0
    assert state_dir().stat().st_mode & 0o777 == 0o700
    for path in state_dir().iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
    run_cli("stop", HOST)


def test_starting_a_running_host_says_so_and_succeeds(config: Path) -> None:
    assert run_cli("start", HOST, "-F", str(config)).returncode == 0
    again = run_cli("start", HOST, "-F", str(config))
    assert again.returncode == 0
    assert again.stdout.strip() == f"{HOST} is already running (pid {pid_of(HOST)})"
    run_cli("stop", HOST)


def test_concurrent_starts_leave_exactly_one_daemon(config: Path) -> None:
    procs = [
        subprocess.Popen(tunneld_cmd("start", HOST, "-F", str(config)), stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert sum("already running" in out for out in outputs) == 2, outputs
    daemons = [p for p in tunnel_processes(config) if is_daemon(p.cmdline())]
    assert len(daemons) == 1
    run_cli("stop", HOST)


@pytest.mark.parametrize(
    ("case", "code", "needle"),
    [
        ("refused key", EXIT_CONFIG, "refused authentication"),
        ("changed host key", EXIT_CONFIG, "has CHANGED"),
        ("unknown host key", EXIT_CONFIG, "not in known_hosts"),
        ("port taken", EXIT_CONFIG, "is already in use on 127.0.0.1 by"),
        ("server down", EXIT_UNAVAILABLE, "Connection refused"),
        ("no forwards", EXIT_CONFIG, "has no LocalForward"),
        ("malformed", EXIT_CONFIG, "line 2: Bad configuration option"),
    ],
)
def test_start_fails_in_the_foreground_and_leaves_nothing(
    tmp_path: Path, sshd: SshServer, case: str, code: int, needle: str
) -> None:
    port = free_port()
    config = write_config(tmp_path, sshd.client_config(HOST, [f"LocalForward 127.0.0.1:{port} 127.0.0.1:9"]))
    holder = None
    if case == "refused key":
        sshd.authorized_keys.write_text("")
    elif case == "changed host key":
        sshd.stop()
        sshd.regenerate_host_key()
        sshd.start()
    elif case == "unknown host key":
        sshd.known_hosts.write_text("")
    elif case == "port taken":
        holder = subprocess.Popen([sys.executable, "-c", f"import socket,time;s=socket.socket();"
                                   f"s.bind(('127.0.0.1',{port}));s.listen();print(1,flush=True);time.sleep(60)"],
                                  stdout=subprocess.PIPE)  # fmt: skip
        assert holder.stdout is not None
        holder.stdout.readline()
    elif case == "server down":
        sshd.stop()
    elif case == "no forwards":
        config.write_text(config.read_text().replace(f"LocalForward 127.0.0.1:{port} 127.0.0.1:9", ""))
    elif case == "malformed":
        config.write_text(config.read_text().replace("  HostName", "  Bogus yes\n  HostName", 1))
    try:
        done = run_cli("start", HOST, "-F", str(config))
        assert done.returncode == code, done.stdout + done.stderr
        assert needle in done.stderr and "hint:" in done.stderr, done.stderr
        assert tunnel_processes(config) == []
        assert not (state_dir() / f"{HOST}.pid").exists()
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()


def test_kill_9_then_status_is_stale_then_start_again(config: Path) -> None:
    assert run_cli("start", HOST, "-F", str(config)).returncode == 0
    daemon = psutil.Process(pid_of(HOST))
    ssh_children = daemon.children()
    daemon.kill()
    psutil.wait_procs([daemon], timeout=5)
    status = run_cli("status", HOST)
    assert status.returncode == EXIT_NOT_RUNNING
    assert "dead (stale pid file)" in status.stdout
    report = json.loads(run_cli("status", HOST, "--json").stdout)["hosts"][0]
    assert report["last_error"]["kind"] == "Dead" and "killed by SIGKILL" in report["last_error"]["message"]
    wait_for(lambda: not any(c.is_running() and c.status() != "zombie" for c in ssh_children), 5, "ssh to follow")
    restarted = run_cli("start", HOST, "-F", str(config))
    assert restarted.returncode == 0, restarted.stderr
    assert echo_roundtrip(("127.0.0.1", local_port(config)), b"again") == b"again"
    run_cli("stop", HOST)


def test_a_reused_pid_is_never_running_and_never_signalled(config: Path) -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state_dir().mkdir(parents=True, exist_ok=True)
        record = {"pid": bystander.pid, "create_time": 1000.0, "host": HOST, "engine": "openssh", "started_at": 1.0}
        (state_dir() / f"{HOST}.pid").write_text(json.dumps(record))
        status = run_cli("status", HOST, "--json")
        assert status.returncode == EXIT_NOT_RUNNING
        report = json.loads(status.stdout)["hosts"][0]
        assert (report["state"], report["running"]) == ("dead (stale pid file)", False)
        stopped = run_cli("stop", HOST)
        assert "removed the stale pid file" in stopped.stdout
        assert bystander.poll() is None  # never signalled
        assert run_cli("start", HOST, "-F", str(config)).returncode == 0
        run_cli("stop", HOST)
    finally:
        bystander.kill()
        bystander.wait()


def test_a_pid_recycled_by_another_tunneld_of_the_user_is_not_the_daemon_and_stop_leaves_it_alone() -> None:
    """The pid of a tunneld that died now belongs to another tunneld of the same user (`status --watch`): same
    user, a tunneld command line, only the create time tells them apart. That process is not signalled."""
    bystander = subprocess.Popen(tunneld_cmd("status", "--watch"), stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        earlier = psutil.Process(bystander.pid).create_time() - 60.0  # the daemon that wrote the file, a minute before
        state_dir().mkdir(parents=True, exist_ok=True)
        record = {"pid": bystander.pid, "create_time": earlier, "host": HOST, "engine": "openssh", "started_at": 1.0}
        (state_dir() / f"{HOST}.pid").write_text(json.dumps(record))
        report = json.loads(run_cli("status", HOST, "--json").stdout)["hosts"][0]
        assert (report["state"], report["running"]) == ("dead (stale pid file)", False), report
        stopped = run_cli("stop", HOST)
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.strip() == f"{HOST}  not running (removed the stale pid file of pid {bystander.pid})"
        assert bystander.poll() is None  # never signalled
    finally:
        bystander.kill()
        bystander.wait()


def test_stop_escalates_to_sigkill_when_sigterm_is_not_honoured(config: Path) -> None:
    assert run_cli("start", HOST, "-F", str(config)).returncode == 0
    daemon = psutil.Process(pid_of(HOST))
    daemon.suspend()  # a hung daemon: SIGTERM stays pending, SIGKILL still works
    stopped = run_cli("stop", HOST, "--timeout", "1")
    assert stopped.returncode == 0
    assert "killed with SIGKILL" in stopped.stdout
    wait_for(lambda: tunnel_processes(config) == [], 5, "daemon and ssh to be gone")
    assert not (state_dir() / f"{HOST}.pid").exists()


def test_wait_succeeds_when_up_and_times_out_when_not(config: Path, sshd: SshServer) -> None:
    assert run_cli("wait", HOST, "--timeout", "1").returncode == EXIT_RUNTIME
    assert run_cli("start", HOST, "-F", str(config)).returncode == 0
    waited = run_cli("wait", HOST, "--timeout", "10")
    assert (waited.returncode, waited.stdout.strip()) == (0, f"{HOST}  up")
    sshd.stop()
    wait_for(lambda: "Connection refused" in str(read_state(HOST).get("last_error")), 15, "an attempt to be refused")
    began = time.monotonic()
    timed_out = run_cli("wait", HOST, "--timeout", "1")
    assert timed_out.returncode == EXIT_RUNTIME
    assert "not up after 1 s" in timed_out.stderr and "Connection refused" in timed_out.stderr
    assert time.monotonic() - began < 10
    sshd.start()
    assert run_cli("wait", HOST, "--timeout", "20").returncode == 0
    run_cli("stop", HOST)


def test_check_passes_on_a_good_host_running_or_not(config: Path) -> None:
    done = run_cli("check", HOST, "-F", str(config))
    assert done.returncode == 0, done.stdout
    steps = [line[7:].split()[0] for line in done.stdout.splitlines() if line.startswith("[")]
    targets = ["target", "target"] if ipv6_loopback() else ["target"]  # through 127.0.0.1 and ::1
    assert steps == ["config", "local", "dns", "tcp", "host", "auth", "forwards", *targets]
    assert run_cli("start", HOST, "-F", str(config)).returncode == 0
    running = run_cli("check", HOST, "-F", str(config))
    assert running.returncode == 0, running.stdout
    assert "held by this host's running tunnel" in running.stdout
    run_cli("stop", HOST)


def test_check_names_the_process_holding_the_port(config: Path) -> None:
    port = local_port(config)
    holder = subprocess.Popen([sys.executable, "-c", f"import socket,time;s=socket.socket();"
                               f"s.bind(('127.0.0.1',{port}));s.listen();print(1,flush=True);time.sleep(60)"],
                              stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert holder.stdout is not None
        holder.stdout.readline()
        done = run_cli("check", HOST, "-F", str(config))
        assert done.returncode == 1
        assert f"[FAIL] local port 127.0.0.1:{port} is already in use by python" in done.stdout
        assert f"(pid {holder.pid})" in done.stdout
    finally:
        holder.kill()
        holder.wait()


def test_check_reports_a_refusing_target(tmp_path: Path, sshd: SshServer) -> None:
    config = write_config(tmp_path, sshd.client_config(HOST, [f"LocalForward {free_port()} 127.0.0.1:{free_port()}"]))
    done = run_cli("check", HOST, "-F", str(config))
    assert done.returncode == 1
    assert "[FAIL] target" in done.stdout and "[ ok ] forwards" in done.stdout


def test_logs_show_the_lifecycle(config: Path) -> None:
    assert run_cli("start", HOST, "-F", str(config)).returncode == 0
    run_cli("stop", HOST)
    lines = run_cli("logs", HOST, "-n", "200").stdout
    for needle in ("connecting to", "authenticated", "listening", "stopped"):
        assert needle in lines
    assert len(run_cli("logs", HOST, "-n", "2").stdout.splitlines()) == 2


def test_restart_replaces_the_daemon(config: Path) -> None:
    assert run_cli("start", HOST, "-F", str(config)).returncode == 0
    before = pid_of(HOST)
    restarted = run_cli("restart", HOST, "-F", str(config))
    assert restarted.returncode == 0, restarted.stderr
    assert pid_of(HOST) != before and gone(before)
    run_cli("stop", HOST)


def test_status_json_matches_the_documented_schema(config: Path, sshd: SshServer) -> None:
    assert run_cli("start", HOST, "-F", str(config)).returncode == 0
    data = json.loads(run_cli("status", "--json").stdout)
    assert data["version"] == 1
    (host,) = data["hosts"]
    assert set(host) == STATUS_KEYS
    assert_types(host, HOST_TYPES)
    assert set(host["forwards"][0]) == FORWARD_KEYS
    assert_types(host["forwards"][0], FORWARD_TYPES)
    assert all(isinstance(a, str) for a in host["forwards"][0]["listen"])
    assert host["state"] == "up" and host["running"] is True and host["pid"] == pid_of(HOST)
    run_cli("stop", HOST)
    stopped = json.loads(run_cli("status", "--json").stdout)["hosts"][0]
    assert set(stopped) == STATUS_KEYS and stopped["running"] is False and stopped["forwards"] == []
    assert_types(stopped, HOST_TYPES)
    sshd.authorized_keys.write_text("")  # the server no longer takes our key
    assert run_cli("start", HOST, "-F", str(config)).returncode == EXIT_CONFIG
    failed = json.loads(run_cli("status", "--json").stdout)["hosts"][0]
    assert failed["state"] == "failed" and isinstance(failed["last_error"], dict)
    assert_types(failed["last_error"], {**ERROR_TYPES, "locked": (list,), "methods": (list,)})  # a refused login
    assert failed["last_error"]["kind"] == "AuthError" and failed["last_error"]["exit_code"] == EXIT_CONFIG
    assert failed["last_error"]["methods"] == ["publickey"]


@pytest.mark.parametrize("verb", ["start", "stop", "status", "logs", "wait", "check"])
@pytest.mark.parametrize("bad", ["../x", "a/b", "x" * 200])
def test_hostile_host_names_are_refused_by_every_verb(verb: str, bad: str) -> None:
    done = run_cli(verb, bad)
    assert done.returncode == EXIT_CONFIG, (done.stdout, done.stderr)
    assert "the host name" in done.stderr


def test_sigusr1_is_accepted_while_up(config: Path) -> None:
    assert run_cli("start", HOST, "-F", str(config)).returncode == 0
    os.kill(pid_of(HOST), signal.SIGUSR1)
    wait_for(lambda: "retry requested, but the link is up" in (state_dir() / f"{HOST}.log").read_text(), 10, "log")
    assert run_cli("status", HOST).returncode == 0
    run_cli("stop", HOST)


def test_restart_with_a_broken_config_leaves_the_running_tunnel_alone(config: Path) -> None:
    assert run_cli("start", HOST, "-F", str(config)).returncode == 0
    before = pid_of(HOST)
    config.write_text(config.read_text() + "  Bogus yes\n")
    broken = run_cli("restart", HOST, "-F", str(config))
    assert broken.returncode == EXIT_CONFIG and "Bad configuration option: bogus" in broken.stderr, broken.stderr
    assert pid_of(HOST) == before and not gone(before)
    assert run_cli("status", HOST).returncode == 0


def test_start_timeout_stops_the_child_and_exits_1(tmp_path: Path, sshd: SshServer) -> None:
    import socket

    with socket.socket() as silent:  # accepts TCP, never says a word: the handshake cannot finish in time
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        text = sshd.client_config(HOST, [f"LocalForward {free_port()} 127.0.0.1:9"], ["ConnectTimeout 30"])
        config = write_config(tmp_path, text.replace(f"Port {sshd.port}", f"Port {silent.getsockname()[1]}"))
        done = run_cli("start", HOST, "-F", str(config), "--timeout", "2")
        assert done.returncode == EXIT_RUNTIME, done.stderr
        assert "did not come up within 2 s" in done.stderr
        assert tunnel_processes(config) == []
        assert run_cli("status", HOST).returncode == EXIT_NOT_RUNNING


def test_a_live_orphan_ssh_is_reaped_by_the_next_start(config: Path) -> None:
    """SIGSTOP the ssh child (so its parent-death signal stays pending), SIGKILL the daemon, start again."""
    assert run_cli("start", HOST, "-F", str(config)).returncode == 0
    daemon = psutil.Process(pid_of(HOST))
    (ssh,) = [p for p in daemon.children() if "ssh" in p.name()]
    ssh.suspend()
    daemon.kill()
    psutil.wait_procs([daemon], timeout=5)
    assert ssh.is_running() and ssh.status() == psutil.STATUS_STOPPED  # an orphan that still holds the port
    restarted = run_cli("start", HOST, "-F", str(config))
    assert restarted.returncode == 0, restarted.stderr
    wait_for(lambda: gone(ssh.pid), 5, "the orphan to be stopped")
    assert "left behind by a previous tunneld" in read_log(HOST)
    assert echo_roundtrip(("127.0.0.1", local_port(config)), b"fresh") == b"fresh"


def test_start_all_brings_up_more_hosts_than_it_starts_at_once(tmp_path: Path, echo: EchoServer) -> None:
    """12 hosts on one sshd with OpenSSH's default MaxStartups (10): started 8 at a time, none dropped."""
    from tunneld.cli.starting import START_CONCURRENCY

    server = SshServer(tmp_path / "sshd")
    server.max_startups = "10:30:100"
    server.start()
    try:
        hosts = [f"h{i:02d}" for i in range(12)]
        assert len(hosts) > START_CONCURRENCY
        text = "".join(server.client_config(h, [f"LocalForward {free_port()} 127.0.0.1:{echo.port}"]) for h in hosts)
        config = write_config(tmp_path, text)
        done = run_cli("start", "--all", "-F", str(config), timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "[12/12] " in done.stdout and done.stdout.count("  up  ") == 12, done.stdout
        reports = json.loads(run_cli("status", "--json").stdout)["hosts"]
        assert sorted(r["host"] for r in reports if r["state"] == "up") == hosts
        assert run_cli("stop", "--all").returncode == 0
    finally:
        server.stop()
