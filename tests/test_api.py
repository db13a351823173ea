"""The Python API as a notebook uses it: from ANOTHER virtualenv, into which this project is installed as a wheel
and whose PATH has no `tunneld` script; real programs in real processes, a real sshd, real targets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click
import psutil
import pytest

from tests.harness import EchoServer, HttpServer, SshServer, free_port, free_port_both, keygen, machine_lock, scaled
from tests.helpers import read_state, run_cli, write_config, write_settings
from tunneld.errors import EXIT_CONFIG, EXIT_UNAVAILABLE

PROJECT = Path(__file__).resolve().parent.parent
PATH_WITHOUT_TUNNELD = "/usr/bin:/bin"  # ssh and sh, and no `tunneld` script


@dataclass(frozen=True)
class OtherVenv:
    """A virtualenv with tunneld installed from a wheel of this tree (its dependencies come from ours via a .pth)."""

    root: Path
    python: Path
    site_packages: Path

    def run(self, program: str, *args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
        """Run `program` there (a file of its own, as a user's script) with PATH lacking any `tunneld` script."""
        with tempfile.NamedTemporaryFile("w", suffix=".py", dir=self.root, delete=False) as file:  # parallel tests
            file.write(program)
        script = Path(file.name)
        env = dict(os.environ, PATH=PATH_WITHOUT_TUNNELD)
        env.pop("PYTHONPATH", None)
        return subprocess.run(
            [str(self.python), str(script), *args],
            capture_output=True, text=True, env=env, timeout=scaled(timeout), stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip

    def result(self, program: str, *args: str) -> dict[str, object]:
        """Run `program` and return the JSON object it printed last."""
        done = self.run(program, *args)
        assert done.returncode == 0, done.stderr
        data = json.loads(done.stdout.splitlines()[-1])
        assert isinstance(data, dict)
        return data


@pytest.fixture(scope="session")
def other_venv(tmp_path_factory: pytest.TempPathFactory) -> OtherVenv:
    """Build a wheel of this tree (from a copy: the tree gets no build/), install it into a fresh virtualenv: once per
    run, in the run's temporary directory that the parallel workers share (the first one builds, under a lock)."""
    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared
    base = shared / "other-venv"
    with machine_lock("other-venv"):
        if not (base / "ready").exists():
            shutil.rmtree(base, ignore_errors=True)
            base.mkdir()
            _build_other_venv(base)
            (base / "ready").touch()
    root = base / "venv"
    site = subprocess.run(
        [str(root / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    assert shutil.which("tunneld", path=PATH_WITHOUT_TUNNELD) is None
    return OtherVenv(root, root / "bin" / "python", Path(site))


def _build_other_venv(base: Path) -> None:
    source = base / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT / name, source / name)
    shutil.copytree(PROJECT / "tunneld", source / "tunneld", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(base / "wheel"), str(source)], check=True, timeout=300)
    (wheel,) = (base / "wheel").glob("tunneld-*.whl")
    root = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=60)
    python = root / "bin" / "python"
    install = [*pip, "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(install, check=True, timeout=300)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    # Only the dependencies come from our environment: a path line in a .pth adds that directory, and the .pth
    # files in it (our editable install of this tree) are not run.
    ours = Path(click.__file__).parent.parent
    assert ours == Path(sysconfig.get_paths()["purelib"])
    Path(site, "dependencies-from-the-test-environment.pth").write_text(f"{ours}\n")


ENSURE_AND_LEAVE_RUNNING = """
import json, sys, threading, urllib.request
import tunneld

t = tunneld.ensure("ml", ssh_config=sys.argv[1])
with urllib.request.urlopen(t.url() + "/health", timeout=10) as answer:
    body = answer.read().decode()
print(json.dumps({
    "file": tunneld.__file__, "url": t.url(), "body": body, "state": t.state, "pid": t.pid, "env": dict(t.env),
    "threads": threading.active_count(), "loaded": [m for m in ("paramiko", "click") if m in sys.modules],
}))
"""

REUSE_AND_STOP = """
import json
import tunneld

t = tunneld.ensure("ml")  # no ssh_config: a running tunnel is reused as it is
again = tunneld.status("ml")
stopped = t.stop()
after = t.status()
print(json.dumps({
    "pid": t.pid, "status_pid": again.pid, "listed": [x.host for x in tunneld.status()], "stopped": stopped,
    "after": [after.state, after.running, after.pid is None or after.pid == t.pid], "stop_again": tunneld.stop("ml"),
}))
"""


@pytest.mark.slow
def test_ensure_from_another_virtualenv_starts_a_detached_tunnel_that_outlives_the_program(
    tmp_path: Path, sshd: SshServer, other_venv: OtherVenv
) -> None:
    target = HttpServer()
    try:
        port = free_port_both()
        config = write_config(tmp_path, sshd.client_config("ml", [f"LocalForward {port} 127.0.0.1:{target.port}"]))
        write_settings(
            f'[hosts.ml.health]\n"{port}" = "/health"\n\n[hosts.ml.env]\nMLFLOW_TRACKING_URI = "http://{{local}}"\n'
        )
        first = other_venv.result(ENSURE_AND_LEAVE_RUNNING, str(config))
        assert Path(str(first["file"])).is_relative_to(other_venv.site_packages)  # the installed copy, not this tree
        assert first["url"] == f"http://127.0.0.1:{port}" and first["body"] == "OK" and first["state"] == "up"
        assert first["env"] == {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
        assert first["threads"] == 1 and first["loaded"] == []  # no SSH in the caller's process
        pid = first["pid"]
        assert isinstance(pid, int) and psutil.pid_exists(pid)  # the program has ended; its tunnel has not
        assert run_cli("status", "ml").returncode == 0

        second = other_venv.result(REUSE_AND_STOP)
        assert second["pid"] == second["status_pid"] == pid and second["listed"] == ["ml"]
        assert second["stopped"] is True and second["after"] == ["stopped", False, True]
        assert second["stop_again"] is False
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        target.close()


TYPED_ERRORS = """
import json, sys
import tunneld

seen = {}
for host in sys.argv[2:]:
    try:
        tunneld.ensure(host, ssh_config=sys.argv[1], timeout=30)
    except tunneld.TunneldError as error:
        seen[host] = {"class": f"{type(error).__module__}.{type(error).__name__}", "message": error.message,
                      "hint": error.hint, "exit_code": error.exit_code, "fatal": isinstance(error, tunneld.FatalError)}
print(json.dumps(seen))
"""


@pytest.mark.slow
def test_errors_reach_the_program_as_the_typed_errors_of_the_project(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, other_venv: OtherVenv
) -> None:
    stranger = keygen(tmp_path / "not_authorized")
    forward = [f"LocalForward {free_port_both()} 127.0.0.1:{echo.port}"]
    denied = sshd.client_config("denied", forward).replace(str(sshd.client_key), str(stranger))
    nobody = sshd.client_config("nobody", forward).replace(f"Port {sshd.port}", f"Port {free_port()}")
    config = write_config(tmp_path, denied + nobody)
    seen = other_venv.result(TYPED_ERRORS, str(config), "nosuchhost", "denied", "nobody")
    unknown, denied_, unreachable = (seen[host] for host in ("nosuchhost", "denied", "nobody"))
    assert isinstance(unknown, dict) and isinstance(denied_, dict) and isinstance(unreachable, dict)
    assert unknown["class"] == "tunneld.errors.NoForwardsError" and unknown["exit_code"] == EXIT_CONFIG
    assert unknown["fatal"] is True and "nosuchhost" in unknown["message"] and "LocalForward" in unknown["hint"]
    assert denied_["class"] == "tunneld.errors.AuthError" and denied_["exit_code"] == EXIT_CONFIG  # from the child
    assert "refused authentication" in denied_["message"] and denied_["hint"], denied_
    assert unreachable["class"] == "tunneld.errors.UnreachableError", unreachable
    assert unreachable["exit_code"] == EXIT_UNAVAILABLE and unreachable["fatal"] is False
    assert read_state("nobody")["state"] == "failed"  # nothing left running


CONTEXT_MANAGER = """
import json, sys
import tunneld

out = {}
with tunneld.tunnel("fresh", ssh_config=sys.argv[1]) as t:
    out["inside"] = [t.up, tunneld.status("fresh").running]
out["fresh_after"] = tunneld.status("fresh").state
with tunneld.tunnel("kept", ssh_config=sys.argv[1]) as k:
    out["kept_pid"] = k.pid
out["kept_after"] = tunneld.status("kept").running
try:
    with tunneld.tunnel("fresh", ssh_config=sys.argv[1]):
        raise KeyError("the body failed")
except KeyError:
    out["after_error"] = tunneld.status("fresh").state
print(json.dumps(out))
"""


@pytest.mark.slow
def test_the_context_manager_stops_only_a_tunnel_it_started(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, other_venv: OtherVenv
) -> None:
    fresh = sshd.client_config("fresh", [f"LocalForward {free_port_both()} 127.0.0.1:{echo.port}"])
    kept = sshd.client_config("kept", [f"LocalForward {free_port_both()} 127.0.0.1:{echo.port}"])
    config = write_config(tmp_path, fresh + kept)
    try:
        assert run_cli("start", "kept", "-F", str(config)).returncode == 0
        pid = read_state("kept")["pid"]
        out = other_venv.result(CONTEXT_MANAGER, str(config))
        assert out["inside"] == [True, True] and out["fresh_after"] == "stopped"
        assert out["kept_pid"] == pid and out["kept_after"] is True  # running before: left running
        assert out["after_error"] == "stopped"
        assert read_state("kept")["pid"] == pid and psutil.pid_exists(int(str(pid)))
    finally:
        run_cli("stop", "kept")


CONSUMER = """
import tunneld


def notebook() -> str:
    t: tunneld.Tunnel = tunneld.ensure("mlflowserver", timeout=10.0, healthy=False)
    tunnels: list[tunneld.Tunnel] = tunneld.status()
    one: tunneld.Tunnel = tunneld.status("mlflowserver")
    try:
        with tunneld.tunnel("tensorboard") as tb:
            return tb.url(6006) + str(len(tunnels)) + one.state + str(t.env.get("X"))
    except tunneld.ConfigError as error:
        code: int = error.exit_code
        return (error.hint or "") + str(code)


port: int = tunneld.ensure("mlflowserver").url()
"""


@pytest.mark.slow
def test_a_consumer_type_checks_against_the_installed_package(tmp_path: Path, other_venv: OtherVenv) -> None:
    program = tmp_path / "consumer.py"
    program.write_text(CONSUMER)
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--python-executable", str(other_venv.python),
         str(program)],
        capture_output=True, text=True, cwd=tmp_path, timeout=scaled(300), check=False,
    )  # fmt: skip
    errors = [line for line in checked.stdout.splitlines() if ": error:" in line]
    # The one mistake planted in it, and nothing else: without py.typed mypy would report a missing library instead.
    assert len(errors) == 1, checked.stdout
    assert (
        'consumer.py:17: error: Incompatible types in assignment (expression has type "str", variable has type "int")'
        in errors[0]
    )


def test_ensure_refuses_a_missing_or_unreadable_ssh_config_even_for_a_running_tunnel(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tunneld

    config = write_config(
        tmp_path, sshd.client_config("ml", [f"LocalForward {free_port_both()} 127.0.0.1:{echo.port}"])
    )
    started = run_cli("start", "ml", "-F", str(config))
    try:
        assert started.returncode == 0, started.stderr
        assert tunneld.ensure("ml", ssh_config=str(config)).running  # the file is fine: the tunnel is reused
        with pytest.raises(tunneld.ConfigError) as missing:
            tunneld.ensure("ml", ssh_config=str(tmp_path / "nope"))
        assert missing.value.message == f"the ssh_config file {tmp_path / 'nope'} does not exist"
        assert missing.value.exit_code == EXIT_CONFIG and "ssh_config=" in str(missing.value.hint)
        monkeypatch.setenv("TUNNELD_SSH_CONFIG", str(tmp_path))
        with pytest.raises(tunneld.ConfigError) as directory:
            tunneld.ensure("ml")
        assert directory.value.message == f"the ssh_config file {tmp_path} is a directory"
        assert "TUNNELD_SSH_CONFIG" in str(directory.value.hint)
        assert tunneld.ensure("ml", ssh_config="/dev/null").running  # what ssh -F /dev/null reads: nothing, fine
    finally:
        run_cli("stop", "ml")
