"""`make debian13-sshd`: a Debian 13 ("trixie") root with OpenSSH 10's sshd, to measure PerSourcePenalties.

OpenSSH >= 9.8 penalises a source address for connections that end before authentication; this machine's
own sshd may be older. This script builds (once) a minimal Debian 13 root with openssh-server by
debootstrap, cached outside the repository (/var/cache/tunneld/debian13, or $TUNNELD_DEBIAN13_CACHE), and
checks that its sshd runs the test harness's configuration on loopback and lets the harness's key in.
Tests and bench scripts run that sshd with `Debian13.server(workdir)`: an SshServer whose sshd runs
chrooted into the root, in a private mount namespace (tests/harness.py, chroot_prefix). Combine its
prefix with `ip netns exec NS` to run it in a network namespace.

Root only (debootstrap, mounts, chroot). The host's own /etc and sshd are never touched; the root is
built in a directory of its own and renamed into place only once complete.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import SshServer, chroot_prefix

CACHE_DIR = Path(os.environ.get("TUNNELD_DEBIAN13_CACHE", "/var/cache/tunneld/debian13"))
SUITE = "trixie"
MIRROR = "http://deb.debian.org/debian"
SSHD = "/usr/sbin/sshd"  # inside the root; sshd re-executes /usr/lib/openssh/sshd-session from there
READY_STAMP = "ready"  # written last: a root without it is incomplete
DEBOOTSTRAP_TIMEOUT_S = 1800.0
COMMAND_TIMEOUT_S = 60.0


class PrepareError(RuntimeError):
    """The root is missing and cannot be built (the message says why)."""


@dataclass(frozen=True)
class Debian13:
    """A prepared Debian 13 root: run commands and an sshd inside it."""

    cache: Path

    @property
    def root(self) -> Path:
        return self.cache / "root"

    @property
    def scratch(self) -> Path:
        return self.cache / "scratch"  # stays empty: each run covers it with a private tmpfs

    @property
    def version(self) -> str:
        """The version line `sshd -V` printed when the root was prepared."""
        return (self.cache / READY_STAMP).read_text().strip()

    def prefix(self, workdir: Path) -> list[str]:
        """Argv that runs a command inside the root with `workdir` visible at its own path."""
        return chroot_prefix(self.root, self.scratch, workdir.resolve())

    def server(self, workdir: Path, outer_prefix: Sequence[str] = (), **kwargs: object) -> SshServer:
        """An SshServer (not started) running this root's sshd; `outer_prefix` e.g. `ip netns exec NS`."""
        workdir.mkdir(parents=True, exist_ok=True)
        workdir = workdir.resolve()  # the server writes these paths into its config: the same inside and out
        prefix = [*outer_prefix, *self.prefix(workdir)]
        return SshServer(workdir, prefix=prefix, sshd=SSHD, **kwargs)  # type: ignore[arg-type]

    def run(self, workdir: Path, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run argv inside the root (with `workdir` visible); output captured, never raises on failure."""
        workdir.mkdir(parents=True, exist_ok=True)
        return subprocess.run(
            [*self.prefix(workdir), *argv], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )


def prepared(cache: Path = CACHE_DIR) -> Debian13 | None:
    """The prepared root under `cache`, or None when it is missing or incomplete."""
    found = Debian13(cache)
    complete = (cache / READY_STAMP).is_file() and (found.root / SSHD.lstrip("/")).is_file() and found.scratch.is_dir()
    return found if complete else None


def unavailable_reason(cache: Path = CACHE_DIR) -> str | None:
    """Why a Debian 13 sshd cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return "running the Debian 13 sshd needs root (mount namespace, chroot)"
    if prepared(cache) is None:
        return f"no prepared Debian 13 root at {cache}: run `make debian13-sshd` (root, reaches deb.debian.org)"
    return None


def _debootstrap() -> str:
    found = shutil.which("debootstrap")
    if found:
        return found
    if shutil.which("apt-get") is None:
        raise PrepareError("debootstrap is not installed and there is no apt-get to install it")
    print("installing debootstrap (apt-get install debootstrap)", flush=True)
    done = subprocess.run(
        ["apt-get", "install", "-y", "-q", "debootstrap"], capture_output=True, text=True, check=False, timeout=600
    )
    found = shutil.which("debootstrap")
    if done.returncode != 0 or not found:
        raise PrepareError(f"could not install debootstrap: {done.stderr.strip()[-500:]}")
    return found


def prepare(cache: Path = CACHE_DIR, mirror: str = MIRROR) -> Debian13:
    """Build the root under `cache` unless it is there already; return it or raise PrepareError."""
    if os.geteuid() != 0:
        raise PrepareError("preparing the Debian 13 root needs root (debootstrap)")
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two preparations at once: the second finds the first's root
        existing = prepared(cache)
        if existing is not None:
            return existing
        debootstrap = _debootstrap()
        found = Debian13(cache)
        partial = cache / "root.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(found.root, ignore_errors=True)  # incomplete: no stamp
        argv = [debootstrap, "--variant=minbase", "--include=openssh-server", SUITE, str(partial), mirror]
        print(f"building the Debian 13 root: {' '.join(argv)} (about a minute)", flush=True)
        try:
            done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=DEBOOTSTRAP_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise PrepareError(f"debootstrap took longer than {DEBOOTSTRAP_TIMEOUT_S:.0f} s") from exc
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-8:]
            shutil.rmtree(partial, ignore_errors=True)
            raise PrepareError(f"debootstrap failed ({done.returncode}):\n  " + "\n  ".join(tail))
        partial.rename(found.root)
        found.scratch.mkdir(exist_ok=True)
        version = _sshd_version(found)
        if not version.startswith("OpenSSH_"):
            raise PrepareError(f"the root's sshd does not run: {version}")
        (cache / READY_STAMP).write_text(version + "\n")
        return found


def _sshd_version(found: Debian13) -> str:
    with tempfile.TemporaryDirectory(prefix="tunneld-debian13-") as tmp:
        done = found.run(Path(tmp), SSHD, "-V")
    return (done.stderr or done.stdout).strip()


def check(found: Debian13) -> str:
    """Start the root's sshd with the harness's configuration and log in with ssh; return what happened."""
    with tempfile.TemporaryDirectory(prefix="tunneld-debian13-") as tmp:
        server = found.server(Path(tmp) / "sshd")
        config = Path(tmp) / "ssh_config"
        config.write_text(server.client_config("debian13", [], extra=["BatchMode yes", "ConnectTimeout 10"]))
        server.start()
        try:
            login = subprocess.run(
                ["ssh", "-F", str(config), "debian13", "cat /etc/debian_version"],
                capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        finally:
            server.stop()
        if login.returncode != 0:
            raise PrepareError(f"ssh into the Debian 13 sshd failed ({login.returncode}): {login.stderr.strip()}")
        return f"port {server.port}: ssh ran `cat /etc/debian_version` inside the root: {login.stdout.strip()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=str(CACHE_DIR), help="where the root is kept (default: %(default)s)")
    parser.add_argument("--mirror", default=MIRROR)
    args = parser.parse_args()
    try:
        found = prepare(Path(args.cache), args.mirror)
        print(f"Debian 13 root: {found.root}")
        print(f"sshd: {found.version}")
        print(f"check: {check(found)}")
    except PrepareError as exc:
        print(f"make debian13-sshd: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
