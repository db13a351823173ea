"""A real systemd user manager (`systemd --user`) for a test user, where the tests run as root without systemd as PID 1.

systemd runs as a user instance when /run/systemd/system exists (it is not booted otherwise), so it is started in a
private mount namespace with a tmpfs over /run/systemd; a cgroup of its own is delegated to the test user (nobody)
in every hierarchy systemd uses (cgroup2, and name=systemd on hybrid hosts). `systemctl --user` reaches it through
its private socket in the user's XDG_RUNTIME_DIR, from inside that namespace: `run` enters it (nsenter) and drops
to the user (setpriv). The manager is stopped by its pid, then its cgroups and files are removed.

The test user runs tunneld from a virtualenv of its own (a base interpreter it can execute, plus a .pth naming this
checkout and the test virtualenv's site-packages), as a user's pipx or venv install would be.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shlex
import shutil
import signal
import site
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import psutil

import tunneld
from tests.harness import scaled, wait_for

SYSTEMD_CANDIDATES = ("/usr/lib/systemd/systemd", "/lib/systemd/systemd")
TEST_USER = "nobody"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
EXIT_NO_MOUNT, EXIT_NO_CGROUP = 97, 98
_serial = itertools.count()


class ManagerUnavailableError(Exception):
    """The machine cannot run a user manager for a test user (not root, no systemd, no namespaces): skip."""


def require_tools() -> tuple[str, pwd.struct_passwd]:
    """Return the systemd binary and the test user; ManagerUnavailableError where the manager cannot run."""
    if os.geteuid() != 0:
        raise ManagerUnavailableError("a systemd user manager for a test user needs root (CI runs the tests as root)")
    systemd = next((p for p in SYSTEMD_CANDIDATES if os.access(p, os.X_OK)), None)
    if systemd is None:
        raise ManagerUnavailableError("systemd is not installed (.ci/run installs it)")
    missing = [tool for tool in ("unshare", "nsenter", "setpriv", "systemctl", "ssh-agent") if not shutil.which(tool)]
    if missing:
        raise ManagerUnavailableError(f"missing {', '.join(missing)}")
    try:
        return systemd, pwd.getpwnam(TEST_USER)
    except KeyError:
        raise ManagerUnavailableError(f"no user {TEST_USER!r} to run the user manager as") from None


def _cgroup_roots() -> list[Path]:
    """Return this process's cgroup directory in the cgroup2 hierarchy and in name=systemd (hybrid/legacy hosts)."""
    mounts: dict[str, tuple[str, str]] = {}  # "unified" | "name=systemd" -> (mount root, mount point)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        parts, (fstype, _, opts) = fields.split(), [*tail.split(), "", "", ""][:3]
        if fstype == "cgroup2":
            mounts.setdefault("unified", (parts[3], parts[4]))
        elif fstype == "cgroup" and "name=systemd" in opts.split(","):
            mounts.setdefault("name=systemd", (parts[3], parts[4]))
    roots = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        key = "unified" if number == "0" and controllers == "" else controllers
        if key in mounts:
            root, point = mounts[key]
            relative = os.path.relpath(path, root) if path.startswith(root) else path.lstrip("/")
            roots.append(Path(point) / relative)
    if not roots:
        raise ManagerUnavailableError("no cgroup2 or name=systemd hierarchy is mounted")
    return roots


def _delegate_cgroups(name: str, user: pwd.struct_passwd) -> list[Path]:
    """Create `name` under this process's cgroup in each hierarchy and give it to the user (systemd's Delegate=)."""
    created = []
    try:
        for root in _cgroup_roots():
            directory = root / name
            directory.mkdir()
            created.append(directory)
            for path in (directory, *directory.iterdir()):
                os.chown(path, user.pw_uid, user.pw_gid)
    except OSError as exc:
        _remove_cgroups(created)
        raise ManagerUnavailableError(f"cannot delegate a cgroup to {TEST_USER}: {exc}") from exc
    return created


def _remove_cgroups(directories: Sequence[Path]) -> None:
    """Kill what still runs in the cgroups, then remove them bottom-up (a bounded number of tries)."""
    for directory in directories:
        for _ in range(50):
            procs = [int(p) for d in directory.rglob("cgroup.procs") for p in d.read_text().split()]
            if not procs:
                break
            for pid in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            psutil.wait_procs([psutil.Process(p) for p in procs if psutil.pid_exists(p)], timeout=1)
        for sub in sorted((d for d in directory.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True):
            with contextlib.suppress(OSError):
                sub.rmdir()
        with contextlib.suppress(OSError):
            directory.rmdir()


def user_python(base: Path, user: pwd.struct_passwd) -> Path:
    """Create a virtualenv the test user can run tunneld from; return its python."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [os.path.realpath(getattr(sys, "_base_executable", sys.executable))]
    candidates += [f"{d}/python{version}" for d in ("/usr/local/bin", "/usr/bin")]
    venv = base / "venv"
    for interpreter in dict.fromkeys(candidates):
        if os.access(interpreter, os.X_OK) and _runs_as(user, [interpreter, "-c", "pass"]).returncode == 0:
            subprocess.run([interpreter, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
            break
    else:
        raise ManagerUnavailableError(
            f"no python{version} that {TEST_USER} may execute (tried {', '.join(candidates)})"
        )
    checkout = Path(tunneld.__file__).resolve().parents[1]
    (venv_site(venv) / "tunneld-test.pth").write_text("\n".join([str(checkout), *site.getsitepackages()]) + "\n")
    python = venv / "bin" / "python"
    probe = _runs_as(user, [str(python), "-c", "import tunneld.cli, psutil, paramiko"])
    if probe.returncode != 0:
        raise ManagerUnavailableError(
            f"{TEST_USER} cannot import tunneld from {checkout}: {probe.stderr.strip()[-300:]}"
        )
    return python


def venv_site(venv: Path) -> Path:
    """Return the site-packages directory of a virtualenv."""
    return next((venv / "lib").glob("python*/site-packages"))


def _as_user(user: pwd.struct_passwd) -> list[str]:
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]


def _runs_as(user: pwd.struct_passwd, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    # Through `env`, as every later command: setpriv itself may still reach a path the user cannot.
    env = ["env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE=1"]
    return subprocess.run(
        [*_as_user(user), *env, *argv], capture_output=True, text=True, cwd="/", timeout=scaled(60), check=False
    )


class UserManager:
    """`systemd --user` of the test user in a private mount namespace; `run` executes commands as that user there."""

    def __init__(self, base: Path, python: Path) -> None:
        systemd, self.user = require_tools()
        self.base, self.python = base, python
        self.home, self.runtime, self.tunneld_home = base / "home", base / "run", base / "tunneld"
        for directory in (self.home, self.runtime, self.tunneld_home, base / "work"):
            directory.mkdir(mode=0o700)
            self.chown(directory)
        self.work = base / "work"
        self.log = base / "manager.log"
        self.environment = {
            "HOME": str(self.home),
            "USER": self.user.pw_name,
            "LOGNAME": self.user.pw_name,
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "XDG_RUNTIME_DIR": str(self.runtime),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "XDG_STATE_HOME": str(self.home / ".local/state"),
            "XDG_DATA_HOME": str(self.home / ".local/share"),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        # Deterministic agents: the user has no gpg-agent ssh socket (Debian enables one for every user).
        masked = self.home / ".config" / "systemd" / "user" / "gpg-agent-ssh.socket"
        masked.parent.mkdir(parents=True)
        masked.symlink_to("/dev/null")
        for path in (self.home / ".config", masked.parent.parent, masked.parent):
            self.chown(path)
        self.cgroups = _delegate_cgroups(f"tunneld-test-{os.getpid()}-{next(_serial)}", self.user)
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            self._start(systemd)
        except BaseException:
            self.stop()
            raise

    def chown(self, path: Path) -> None:
        """Give `path` to the test user."""
        os.chown(path, self.user.pw_uid, self.user.pw_gid, follow_symlinks=False)

    def _start(self, systemd: str) -> None:
        moves = " && ".join(f"echo $$ > {shlex.quote(str(d / 'cgroup.procs'))}" for d in self.cgroups)
        env = " ".join(shlex.quote(f"{k}={v}") for k, v in self.environment.items())
        script = (
            "if [ -d /run/systemd ]; then over=/run/systemd; else over=/run; fi\n"
            f"mount -t tmpfs -o mode=0755 tunneld-test $over || exit {EXIT_NO_MOUNT}\n"
            "mkdir -p /run/systemd/system\n"
            f"{{ {moves}; }} || exit {EXIT_NO_CGROUP}\n"
            f"exec {shlex.join(_as_user(self.user))} env -i {env} {systemd} --user\n"
        )
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                said = self.log.read_text(errors="replace")[-2000:]
                if proc.returncode in (EXIT_NO_MOUNT, EXIT_NO_CGROUP) or "unshare failed" in said:
                    raise ManagerUnavailableError(f"cannot start a user manager in a private namespace: {said.strip()}")
                raise RuntimeError(f"systemd --user exited with {proc.returncode}: {said}")
            state = self.systemctl("is-system-running").stdout.strip()
            return state in ("running", "degraded")

        wait_for(ready, READY_TIMEOUT_S, "the systemd user manager to be running")

    @property
    def pid(self) -> int:
        """The manager's pid."""
        assert self.proc is not None
        return self.proc.pid

    def run(
        self, argv: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` as the test user inside the manager's mount namespace, with the login's environment."""
        environment = {**self.environment, **(env or {})}
        command = ["nsenter", f"--target={self.pid}", "--mount", "--", *_as_user(self.user), "env", "-i"]
        return subprocess.run(
            [*command, *(f"{k}={v}" for k, v in environment.items()), *argv],
            capture_output=True,
            text=True,
            cwd="/",
            stdin=subprocess.DEVNULL,
            timeout=scaled(timeout),
            check=False,
        )

    def cli(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run the tunneld CLI as the test user (its own virtualenv, TUNNELD_HOME in the test's directory)."""
        return self.run(
            [str(self.python), "-m", "tunneld", *args], {"TUNNELD_HOME": str(self.tunneld_home), **(env or {})}
        )

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `systemctl --user ARGS` as the test user."""
        return self.run(["systemctl", "--user", *args], timeout=30.0)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """Return properties of a unit (`systemctl --user show -p ...`)."""
        out = self.systemctl("show", f"--property={','.join(properties)}", unit).stdout
        return dict(line.partition("=")[::2] for line in out.splitlines())

    def stop(self) -> None:
        """Stop the manager by its pid (SIGTERM stops its units; SIGKILL after a deadline), then its cgroups."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(scaled(STOP_TIMEOUT_S))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        _remove_cgroups(self.cgroups)


@contextlib.contextmanager
def user_manager_base() -> Iterator[Path]:
    """A directory the test user can traverse (pytest's tmp_path is root's alone), removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="tunneld-usermgr-"))
    try:
        base.chmod(0o755)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)
