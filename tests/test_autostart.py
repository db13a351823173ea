"""Autostart: rendered files against golden copies, service-manager calls recorded at the OS edge."""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.harness import SshServer, free_port, wait_for
from tests.helpers import read_state, run_cli, write_config, write_settings
from tunneld.autostart.launchd import plist_path, render_plist
from tunneld.autostart.manage import autostart_report, disable, enable
from tunneld.autostart.managed import start_managed, stop_managed
from tunneld.autostart.service import CommandResult, Launch, Runner
from tunneld.autostart.systemd import render_dropin, render_template, unit_dir
from tunneld.autostart.xdg import desktop_path, render_desktop
from tunneld.errors import EXIT_CONFIG
from tunneld.state.manifests import enabled_hosts, read_manifest

GOLDEN = Path(__file__).parent / "golden"
HOST = "mlflowserver"
LAUNCH = Launch(("/opt/tunneld/bin/python", "-m", "tunneld"), (("TUNNELD_SSH_CONFIG", "/home/u/.ssh/tunnels"),))


class RecordingRunner(Runner):
    """Records service-manager commands instead of running them (the OS edge tests cannot own), on a machine that
    has every mechanism (launchd too)."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, ...]] = []

    def supports(self, via: str) -> bool:
        return True

    def run(self, argv: Sequence[str]) -> CommandResult:
        self.commands.append(tuple(argv))
        return CommandResult(tuple(argv), 0)


def golden(name: str, text: str) -> None:
    assert text == (GOLDEN / name).read_text(), f"{name} differs from its golden copy"


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_systemd_unit_matches_golden() -> None:
    golden("tunneld@.service", render_template(LAUNCH))
    golden("tunneld.conf", render_dropin(LAUNCH))


def test_launchd_plist_matches_golden_and_round_trips(isolated_home: Path) -> None:
    text = render_plist(HOST, LAUNCH)
    state = str(Path(os.environ["TUNNELD_HOME"]) / "state")
    golden("io.tunneld.mlflowserver.plist", text.replace(state, "$STATE"))
    agent = plistlib.loads(text.encode())
    assert agent["Label"] == "io.tunneld.mlflowserver"
    assert agent["ProgramArguments"][-4:] == ["run", HOST, "--managed-by", "launchd"]
    assert agent["KeepAlive"] == {"SuccessfulExit": False} and agent["RunAtLoad"] is True
    assert agent["StandardErrorPath"] == f"{state}/{HOST}.log"
    assert plistlib.loads(plistlib.dumps(agent)) == agent


def test_xdg_entry_matches_golden() -> None:
    golden("tunneld-mlflowserver.desktop", render_desktop(HOST, LAUNCH))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = tmp_path / "tunneld@demo.service"  # verify needs an instance of the template
    unit.write_text(render_template(Launch.current(None)))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "tunneld@demo.service" not in done.stderr, done.stderr  # no warnings about our unit


@pytest.mark.parametrize(
    ("via", "enable_cmds", "disable_cmds"),
    [
        (
            "systemd",
            [
                ("systemctl", "--user", "daemon-reload"),
                ("systemctl", "--user", "enable", "tunneld@mlflowserver.service"),
            ],
            [
                ("systemctl", "--user", "disable", "tunneld@mlflowserver.service"),
                ("systemctl", "--user", "daemon-reload"),
            ],
        ),
        ("launchd", [], []),
        ("xdg", [], []),
    ],
)
def test_enable_disable_round_trip_leaves_nothing_behind(
    isolated_home: Path, via: str, enable_cmds: list[tuple[str, ...]], disable_cmds: list[tuple[str, ...]]
) -> None:
    runner = RecordingRunner()
    manifest = enable(HOST, via, LAUNCH, runner)
    assert runner.commands == enable_cmds
    assert all(Path(f).exists() for f in manifest.files) and manifest.files
    assert enabled_hosts() == [HOST] and autostart_report(HOST).via == via
    again = enable(HOST, via, LAUNCH, RecordingRunner())  # enabling twice is harmless
    assert again.files == manifest.files
    runner.commands.clear()
    assert disable(HOST, runner) is not None
    assert runner.commands == disable_cmds
    assert files_under(isolated_home) == []
    assert read_manifest(HOST) is None and disable(HOST, runner) is None


def test_now_starts_and_stops_through_the_service_manager(isolated_home: Path) -> None:
    runner = RecordingRunner()
    enable(HOST, "systemd", LAUNCH, runner, now=True)
    assert ("systemctl", "--user", "enable", "--now", "tunneld@mlflowserver.service") in runner.commands
    disable(HOST, runner, now=True)
    assert ("systemctl", "--user", "disable", "--now", "tunneld@mlflowserver.service") in runner.commands
    uid = os.getuid()
    runner = RecordingRunner()
    enable(HOST, "launchd", LAUNCH, runner, now=True)
    assert runner.commands[-1:] == [("launchctl", "bootstrap", f"gui/{uid}", str(plist_path(HOST)))]
    disable(HOST, runner, now=True)
    assert runner.commands[-1:] == [("launchctl", "bootout", f"gui/{uid}/io.tunneld.mlflowserver")]
    runner = RecordingRunner()
    enable(HOST, "xdg", LAUNCH, runner, now=True)
    assert runner.commands == [("env", "TUNNELD_SSH_CONFIG=/home/u/.ssh/tunnels", *LAUNCH.argv, "start", HOST,
                                "--keep-trying")]  # fmt: skip
    disable(HOST, runner, now=True)
    assert runner.commands[-1:] == [(*LAUNCH.argv, "stop", HOST)]


def test_the_shared_template_stays_while_another_host_uses_it(isolated_home: Path) -> None:
    runner = RecordingRunner()
    enable(HOST, "systemd", LAUNCH, runner)
    enable("jupyter", "systemd", Launch(LAUNCH.argv), runner)
    disable(HOST, runner)
    assert (unit_dir() / "tunneld@.service").exists()
    disable("jupyter", runner)
    assert files_under(isolated_home) == []


def test_status_warns_when_the_baked_tunneld_is_gone(isolated_home: Path) -> None:
    enable(HOST, "xdg", Launch(("/nonexistent/venv/bin/python", "-m", "tunneld")), RecordingRunner())
    (warning,) = autostart_report(HOST).warnings
    assert "no longer exists (/nonexistent/venv/bin/python)" in warning
    desktop_path(HOST).unlink()
    assert any("is missing" in w for w in autostart_report(HOST).warnings)


def fake_systemctl(tmp_path: Path, no_bus: bool = False) -> tuple[dict[str, str], Path]:
    """A `systemctl` first on PATH that records its arguments: the OS edge, for real CLI processes. With `no_bus`
    it answers as where no systemd user manager runs for the login (su, a container)."""
    bindir, record = tmp_path / "fakebin", tmp_path / "systemctl.calls"
    bindir.mkdir()
    script = bindir / "systemctl"
    answer = 'echo "Failed to connect to bus: No medium found" >&2; exit 1\n' if no_bus else ""
    script.write_text(f'#!/bin/sh\necho "$@" >> {record}\n{answer}')
    script.chmod(0o755)
    return dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}"), record


def test_cli_enable_status_disable_with_systemd(tmp_path: Path, sshd: SshServer) -> None:
    config = write_config(tmp_path, sshd.client_config(HOST, [f"LocalForward {free_port()} 127.0.0.1:9"]))
    env, record = fake_systemctl(tmp_path)
    enabled = run_cli("autostart", "enable", HOST, "-F", str(config), "--via", "systemd", env=env)
    assert enabled.returncode == 0, enabled.stderr
    assert record.read_text().splitlines() == [
        "--user show-environment",  # where an agent will be at login: asked before any file is written
        "--user daemon-reload",
        f"--user enable tunneld@{HOST}.service",
    ]
    assert f"no agent needed: {sshd.client_key} has no passphrase" in enabled.stdout
    unit = (unit_dir() / "tunneld@.service").read_text()
    assert f"ExecStart={os.path.abspath(sys.executable)} -m tunneld run %i" in unit
    dropin = (unit_dir() / f"tunneld@{HOST}.service.d" / "tunneld.conf").read_text()
    assert f'Environment="TUNNELD_SSH_CONFIG={config}"' in dropin
    status = run_cli("status", env=env)
    header, row = status.stdout.splitlines()
    assert row.startswith(f"{HOST}  not running") and header.index("AUTOSTART") == row.index("systemd")
    listed = run_cli("autostart", "status", HOST, env=env)
    assert listed.stdout.startswith(f"{HOST}  systemd  {os.path.abspath(sys.executable)} -m tunneld")
    disabled = run_cli("autostart", "disable", HOST, env=env)
    assert disabled.returncode == 0
    assert record.read_text().splitlines()[-2:] == [f"--user disable tunneld@{HOST}.service", "--user daemon-reload"]
    assert not unit_dir().exists() or files_under(unit_dir()) == []


def test_enable_refuses_a_host_the_config_check_rejects(tmp_path: Path) -> None:
    config = write_config(tmp_path, "Host bare\n  HostName 10.0.0.1\n")
    done = run_cli("autostart", "enable", "bare", "-F", str(config), "--via", "xdg")
    assert done.returncode == EXIT_CONFIG
    assert "has no LocalForward" in done.stderr and "LocalForward 5000 localhost:5000" in done.stderr
    assert read_manifest("bare") is None and not desktop_path("bare").exists()


ON_LINUX = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="a Linux machine, where launchd does not exist"
)


@ON_LINUX
def test_enable_via_launchd_on_linux_is_refused_before_anything_is_written(tmp_path: Path, isolated_home: Path) -> None:
    config = write_config(tmp_path, f"Host {HOST}\n  HostName 127.0.0.1\n  LocalForward 5000 localhost:5000\n")
    done = run_cli("autostart", "enable", HOST, "-F", str(config), "--via", "launchd")
    assert done.returncode == 1 and done.stdout == "", done.stdout
    assert "Error: launchd cannot start anything on Linux: it runs only on macOS" in done.stderr, done.stderr
    assert re.search(r"hint: use --via (systemd|xdg), what tunneld picks here when --via is left out", done.stderr)
    assert files_under(isolated_home) == [] and read_manifest(HOST) is None  # no ~/Library/LaunchAgents


def test_a_host_enabled_via_xdg_is_named_before_systemd_is_asked_anything(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, "".join(f"Host {name}\n  HostName 127.0.0.1\n  LocalForward {port} x:1\n"
                          for name, port in ((HOST, 5000), ("jupyter", 8888)))
    )  # fmt: skip
    assert run_cli("autostart", "enable", HOST, "-F", str(config), "--via", "xdg").returncode == 0
    write_settings(f'[groups]\nml = ["jupyter", "{HOST}"]\n')
    env, record = fake_systemctl(tmp_path, no_bus=True)  # systemd would answer with the bus error
    for name in (HOST, "@ml"):
        done = run_cli("autostart", "enable", name, "-F", str(config), "--via", "systemd", env=env)
        assert done.returncode == 1, done.stderr
        assert f"Error: {HOST} is already enabled for autostart via xdg" in done.stderr, done.stderr
        assert f"hint: disable it first: tunneld autostart disable {HOST}" in done.stderr
    assert not record.exists()  # systemctl was never run
    assert read_manifest("jupyter") is None  # a group is enabled whole or not at all


@ON_LINUX
def test_a_launchd_manifest_on_linux_leaves_start_stop_and_disable_to_tunneld(tmp_path: Path, sshd: SshServer) -> None:
    config = write_config(tmp_path, sshd.client_config(HOST, [f"LocalForward {free_port()} 127.0.0.1:9"]))
    enable(HOST, "launchd", Launch.current(str(config)), RecordingRunner())  # a ~/.config synced from a Mac
    try:
        listed = run_cli("autostart", "status", HOST)
        assert listed.returncode == 0 and "agent:" not in listed.stdout, listed.stdout
        assert f"warning: launchd runs only on macOS: nothing starts {HOST} at login on Linux" in listed.stderr
        started = run_cli("start", HOST, "-F", str(config))
        assert started.returncode == 0, started.stderr  # by hand: no launchctl to ask
        assert read_state(HOST).get("state") in ("up", "degraded")  # degraded: nothing listens on the discard port
        disabled = run_cli("autostart", "disable", HOST, "--now")
        assert disabled.returncode == 0, disabled.stderr
        assert disabled.stdout.startswith(f"{HOST}  autostart disabled (launchd) and stopped\n"), disabled.stdout
        assert read_state(HOST)["state"] == "stopped" and read_manifest(HOST) is None
    finally:
        run_cli("stop", HOST)


def test_keep_trying_start_survives_a_network_that_is_not_up_yet(tmp_path: Path, sshd: SshServer) -> None:
    config = write_config(tmp_path, sshd.client_config(HOST, [f"LocalForward {free_port()} 127.0.0.1:9"]))
    sshd.stop()  # at login the server cannot be reached yet
    try:
        done = run_cli("start", HOST, "-F", str(config), "--keep-trying", "--timeout", "2")
        assert done.returncode == 0, done.stderr
        assert "still trying in the background" in done.stdout
        sshd.start()
        # degraded: the link is up, and the health check found nothing listening on the discard port
        up = ("up", "degraded")
        wait_for(lambda: read_state(HOST).get("state") in up, 20, "the tunnel to come up once the server is there")
    finally:
        run_cli("stop", HOST)


def test_fatal_error_under_launchd_exits_0_so_it_is_not_restarted(tmp_path: Path, sshd: SshServer) -> None:
    sshd.authorized_keys.write_text("")
    config = write_config(tmp_path, sshd.client_config(HOST, [f"LocalForward {free_port()} 127.0.0.1:9"]))
    done = run_cli("run", HOST, "-F", str(config), "--managed-by", "launchd")
    assert done.returncode == 0
    assert "so that launchd does not restart" in done.stderr
    assert read_state(HOST)["state"] == "failed"


class FakeLaunchd(Runner):
    """launchctl at the OS edge: bootstrap and kickstart run the agent's real ProgramArguments (with its
    EnvironmentVariables) as launchd would; print reports its pid; bootout stops it."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, ...]] = []
        self.loaded = False
        self.proc: subprocess.Popen[bytes] | None = None

    def supports(self, via: str) -> bool:
        return via == "launchd"  # this machine stands for a Mac

    def run(self, argv: Sequence[str]) -> CommandResult:
        self.commands.append(tuple(argv))
        verb = argv[1]
        running = self.proc is not None and self.proc.poll() is None
        if verb == "print" and not self.loaded:
            return CommandResult(tuple(argv), 113, f"Could not find service {argv[2]!r}")
        if verb == "print":
            return CommandResult(tuple(argv), 0, f"\tstate = running\n\tpid = {self.proc.pid}" if running and self.proc
                                 else "\tstate = not running\n\tlast exit code = 0")  # fmt: skip
        if verb in ("bootstrap", "kickstart") and not running:
            self.loaded = True
            agent = plistlib.loads(plist_path(HOST).read_bytes())
            env = {**os.environ, **agent.get("EnvironmentVariables", {})}
            self.proc = subprocess.Popen(agent["ProgramArguments"], env=env, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)  # fmt: skip
        if verb == "bootout" and self.proc is not None:
            self.loaded = False
            self.proc.terminate()
            self.proc.wait(15)
        return CommandResult(tuple(argv), 0)


def test_start_and_stop_of_a_launchd_host_go_through_launchctl(tmp_path: Path, sshd: SshServer) -> None:
    config = write_config(tmp_path, sshd.client_config(HOST, [f"LocalForward {free_port()} 127.0.0.1:9"]))
    launchd = FakeLaunchd()
    enable(HOST, "launchd", Launch.current(str(config)), launchd)
    started = start_managed(HOST, 30, runner=launchd)
    assert started is not None and launchd.proc is not None
    assert started.via == "launchd" and started.pid == launchd.proc.pid and not started.pending
    assert started.state["state"] in ("up", "degraded")  # degraded: nothing listens on the discard port
    assert [c[1] for c in launchd.commands].count("bootstrap") == 1
    assert stop_managed(HOST, launchd) == started.pid
    assert launchd.commands[-1] == ("launchctl", "bootout", f"gui/{os.getuid()}/io.tunneld.{HOST}")  # unloaded
    assert read_state(HOST)["state"] == "stopped"
    launchd.loaded = True  # loaded again (the next login), and its tunneld ended by itself: kickstart runs it
    again = start_managed(HOST, 30, runner=launchd)
    assert again is not None and again.pid == launchd.proc.pid and again.pid != started.pid
    target = f"gui/{os.getuid()}/io.tunneld.{HOST}"
    assert ("launchctl", "kickstart", target) in launchd.commands
    assert [c[1] for c in launchd.commands].count("bootstrap") == 1
    assert stop_managed(HOST, launchd) == again.pid
