"""Real servers for tests and the demo: an OpenSSH sshd on loopback, echo and HTTP targets."""

from __future__ import annotations

import contextlib
import getpass
import http.server
import os
import queue
import random
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd", "/opt/homebrew/sbin/sshd")
READY_TIMEOUT_S = 10.0
# One knob for a slow machine: every wait in the tests is multiplied by it (TUNNELD_TEST_TIMEOUT_FACTOR=2).
TIMEOUT_FACTOR = float(os.environ.get("TUNNELD_TEST_TIMEOUT_FACTOR", "1"))
PORT_ATTEMPTS = 5
# Test ports: below Linux's ephemeral range (32768-60999), where outgoing connections take their source ports.
PORT_POOL = (20000, 32000)
_LOGIN_RE = re.compile(r"Accepted \S+ for ")  # `Accepted publickey for root from ...` (not `Accepted key ...`)
_PR_SET_CHILD_SUBREAPER = 36


def scaled(seconds: float) -> float:
    """Return a test timeout scaled by TUNNELD_TEST_TIMEOUT_FACTOR."""
    return seconds * TIMEOUT_FACTOR


def become_subreaper() -> bool:
    """Adopt every orphan among our descendants (Linux): a detached daemon stays ours to find and stop."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def reap_descendants() -> list[int]:
    """SIGKILL every process this test process started that still runs, reap them all; return their pids."""
    procs = psutil.Process().children(recursive=True)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=5)
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:  # orphans adopted earlier that already ended
            pass
    return [proc.pid for proc in procs]


def find_sshd() -> str | None:
    """Return the path of an OpenSSH sshd binary, or None."""
    found = shutil.which("sshd")
    if found:
        return found
    for candidate in SSHD_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on `host` now and that no other test process hands out meanwhile.

    A port the kernel picks (bind to 0) comes from the ephemeral range, where every outgoing connection also
    takes its source port: between this call and the moment sshd or a tunnel binds it, any connection of
    any test worker could take it. So ports come from a range below the ephemeral one, in turn from one
    counter that every test process of this user shares (a file under flock in a private directory of
    $TMPDIR): parallel workers, and other test runs at the same time, never get the same port until the
    range has gone round.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(PORT_POOL[1] - PORT_POOL[0]):
        port = _next_pool_port()
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, port))
            return port
    raise RuntimeError(f"no free port on {host} in {PORT_POOL[0]}..{PORT_POOL[1] - 1}")


def _next_pool_port() -> int:
    import fcntl

    fd = _open_shared("ports")
    try:
        _wait_for_flock(fd, 60.0, "the shared test port counter")
        raw = os.pread(fd, 16, 0).strip()
        last = int(raw) if raw.isdigit() else random.randrange(*PORT_POOL)
        port = last + 1 if PORT_POOL[0] <= last + 1 < PORT_POOL[1] else PORT_POOL[0]
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{port}\n".encode(), 0)
        return port
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _open_shared(name: str) -> int:
    """Open (create) file `name` in the directory every test process of this user shares: $TMPDIR/tunneld-test.UID,
    mode 0700. The temporary directory is everyone's: a directory or file planted there by another user is refused,
    never followed or written through."""
    import stat
    import tempfile

    shared = Path(tempfile.gettempdir()) / f"tunneld-test.{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        shared.mkdir(mode=0o700)
    info = os.lstat(shared)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise RuntimeError(f"{shared} is not a private directory of this user: remove it (another user's, or a link)")
    return os.open(shared / name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)


def _wait_for_flock(fd: int, timeout: float, what: str) -> None:
    import fcntl

    def taken() -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    wait_for(taken, timeout, what, interval=0.01)


def wait_for(predicate: object, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `predicate()` until it is truthy; raise TimeoutError naming `what` after `timeout`."""
    assert callable(predicate)
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {what}")


@contextlib.contextmanager
def machine_lock(name: str, timeout: float = 300.0) -> Iterator[None]:
    """Hold the lock `name`, shared by every test process on this machine (parallel workers, other runs at the same
    time): for what exists once per machine, such as the systemd user manager of the test user or /etc/passwd."""
    fd = _open_shared(f"{name}.lock")
    try:
        _wait_for_flock(fd, timeout, f"the machine-wide test lock {name!r}")
        yield
    finally:
        os.close(fd)  # closing releases the lock


def accepts_connections(path: Path) -> bool:
    """True once a unix socket accepts a connection. Its file appears at bind(), before listen(): waiting for the
    file alone races the server, whose first client would then be refused."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True


def keygen(path: Path, comment: str = "tunneld-test", passphrase: str = "") -> Path:
    """Generate an ed25519 key pair at `path` (and `path`.pub)."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return path


def read_banner(host: str, port: int, timeout: float = 1.0) -> bytes:
    """Connect to host:port and return the first bytes the server sends (b'' on failure)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            return sock.recv(64)
    except OSError:
        return b""


# Runs "$@" (sshd and its arguments) chrooted into another OS tree ($1), in the private mount namespace that
# `unshare --mount` made: a tmpfs on the scratch directory ($2) takes an overlay of the tree, so the tree itself
# stays as prepared and every mount ends with the namespace's last process. The work directory ($3) appears
# inside at its own path, so the harness's paths (config, keys, pid file) mean the same to that sshd. A shell
# because the mounts must be made inside the new namespace before the exec; the paths are arguments, never
# part of the script. unshare, sh and chroot each exec the next: the pid Popen returns is sshd's own.
_CHROOT_SCRIPT = """set -eu
root=$1 scratch=$2 work=$3
shift 3
mount -t tmpfs -o mode=0755 tunneld-chroot "$scratch"
mkdir "$scratch/upper" "$scratch/work" "$scratch/merged"
mount -t overlay overlay -o "lowerdir=$root,upperdir=$scratch/upper,workdir=$scratch/work" "$scratch/merged"
inside=$scratch/merged
mount --rbind /dev "$inside/dev"
mount -t proc proc "$inside/proc"
mkdir -p "$inside/run/sshd" "$inside$work"
mount --bind "$work" "$inside$work"
exec chroot "$inside" "$@"
"""


def chroot_prefix(root: Path, scratch: Path, workdir: Path) -> list[str]:
    """Return argv to put before a command so that it runs inside the OS tree `root` (root only).

    For SshServer's `prefix`, with `sshd` the path of that tree's sshd (bench/debian13.py): `workdir` (the
    server's directory) is seen inside at the same path; `scratch` is an empty directory outside the tree
    that a private tmpfs covers while the command runs. Nothing is left mounted afterwards.
    """
    for path in (root, scratch, workdir):
        if not path.is_absolute():
            raise ValueError(f"chroot_prefix needs absolute paths, got {path}")
    script_args = ["tunneld-chroot", str(root), str(scratch), str(workdir)]
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _CHROOT_SCRIPT, *script_args]


class PortTakenError(RuntimeError):
    """sshd could not bind its port: someone took it after it was picked."""


class SshServer:
    """An OpenSSH sshd on a loopback port, with its own host key and one authorized client key."""

    def __init__(
        self, workdir: Path, port: int | None = None, ipv6: bool = False, host: str = "127.0.0.1",
        prefix: Sequence[str] = (), sshd: str | None = None,
    ) -> None:  # fmt: skip
        sshd = sshd or find_sshd()  # another sshd: the one inside chroot_prefix's tree (bench/debian13.py)
        if sshd is None:
            raise RuntimeError("sshd not found: install openssh-server (apt-get install openssh-server)")
        self.sshd = sshd
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.prefix = list(prefix)  # e.g. `ip netns exec NS`: run sshd in a network namespace (make faults)
        self.fixed_port = port is not None
        self.started_once = False
        self.port = port or free_port()
        self.ipv6 = ipv6
        self.user = getpass.getuser()
        self.host_key = keygen(self.dir / "ssh_host_ed25519_key", "host")
        self.client_key = keygen(self.dir / "id_ed25519", "client")
        self.authorized_keys = self.dir / "authorized_keys"
        self.authorized_keys.write_text((self.dir / "id_ed25519.pub").read_text())
        self.known_hosts = self.dir / "known_hosts"
        self.write_known_hosts()
        self.config = self.dir / "sshd_config"
        self.extra_config: list[str] = []
        self.password_auth = False  # sshd takes the first value of a keyword: extra_config cannot turn this on
        self.log_level = "VERBOSE"  # DEBUG2 logs each client's KEXINIT proposal
        self.max_startups = "100:30:200"  # sshd's own default is 10:30:100
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "sshd.log"

    def host_public_key(self) -> str:
        """Return the 'type base64' part of the server's public host key."""
        parts = (self.dir / "ssh_host_ed25519_key.pub").read_text().split()
        return f"{parts[0]} {parts[1]}"

    def write_known_hosts(self) -> None:
        """Write a known_hosts file that trusts this server's current host key."""
        self.known_hosts.write_text(f"[{self.host}]:{self.port} {self.host_public_key()}\n")

    def regenerate_host_key(self) -> None:
        """Replace the host key (the 'changed host key' case); takes effect at the next start."""
        for suffix in ("", ".pub"):
            (self.dir / f"ssh_host_ed25519_key{suffix}").unlink()
        keygen(self.host_key, "host2")

    def _write_config(self) -> None:
        listen = [f"ListenAddress {self.host}:{self.port}"]
        if self.ipv6:
            listen.append(f"ListenAddress [::1]:{self.port}")
        lines = [
            *listen,
            f"HostKey {self.host_key}",
            f"PidFile {self.dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "StrictModes no",
            f"PasswordAuthentication {'yes' if self.password_auth else 'no'}",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "UsePAM no",
            "AllowTcpForwarding yes",
            "AllowStreamLocalForwarding yes",
            "PermitRootLogin prohibit-password",
            "PermitTTY no",
            f"LogLevel {self.log_level}",
            f"MaxStartups {self.max_startups}",
            "MaxSessions 100",
            *self.extra_config,
        ]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        """Start sshd and return once it logs that it listens (at LogLevel QUIET, FATAL or ERROR: once it sends
        its banner). No connection is made where it can be avoided: tests count the connections sshd sees.

        The first start binds with retry: a port picked free can be taken by someone else before
        sshd binds it, and then another one is picked (known_hosts follows). A restart keeps its port.
        """
        for attempt in range(PORT_ATTEMPTS):
            try:
                self._start_once()
            except PortTakenError:
                if self.started_once or self.fixed_port or attempt == PORT_ATTEMPTS - 1:
                    raise
                self.port = free_port()
                self.write_known_hosts()
            else:
                self.started_once = True
                return

    def _start_once(self) -> None:
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self._write_config()
        mark = self.log.stat().st_size if self.log.exists() else 0
        log = self.log.open("ab")
        self.proc = subprocess.Popen(
            [*self.prefix, self.sshd, "-D", "-e", "-f", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        proc = self.proc

        def banner_or_exit() -> bool:
            if proc.poll() is not None:
                said = self.log.read_bytes()[mark:].decode(errors="replace")
                if "Address already in use" in said:
                    self.proc = None
                    raise PortTakenError(said)
                raise RuntimeError(f"sshd exited with {proc.returncode}: {said[-2000:]}")
            if self.log_level.upper() not in ("QUIET", "FATAL", "ERROR"):
                return b"Server listening on " in self.log.read_bytes()[mark:]
            return read_banner(self.host, self.port).startswith(b"SSH-2.0-")

        wait_for(banner_or_exit, READY_TIMEOUT_S, f"sshd on port {self.port}")

    def _tree(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        """Kill sshd and every session process it forked (a server crash, not a clean shutdown)."""
        procs = self._tree()
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(procs, timeout=5)
        if self.proc is not None:
            self.proc.wait(timeout=5)
            self.proc = None

    def log_mark(self) -> int:
        """Return where the log ends now (for `preauth_connections` since this moment)."""
        return self.log.stat().st_size if self.log.exists() else 0

    def preauth_connections(self, since: int = 0) -> int:
        """Return how many connections sshd saw since `since` (a log_mark) that did not log in: `Connection from`
        lines (LogLevel VERBOSE) minus `Accepted` ones. OpenSSH 9.8+ penalises the source of each."""
        lines = self.log.read_bytes()[since:].decode(errors="replace").splitlines()
        connections = sum(line.startswith("Connection from ") for line in lines)
        return connections - sum(bool(_LOGIN_RE.match(line)) for line in lines)

    def freeze(self) -> None:
        """SIGSTOP sshd and its sessions: the link hangs without closing."""
        for proc in self._tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT everything `freeze` stopped."""
        for proc in self._tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGCONT)

    def client_config(
        self,
        alias: str,
        forwards: Sequence[str],
        extra: Sequence[str] = (),
        strict: str = "yes",
    ) -> str:
        """Return an ssh_config Host block that reaches this server with the client key."""
        lines = [
            f"Host {alias}",
            f"  HostName {self.host}",
            f"  Port {self.port}",
            f"  User {self.user}",
            f"  IdentityFile {self.client_key}",
            "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {self.known_hosts}",
            "  GlobalKnownHostsFile /dev/null",
            f"  StrictHostKeyChecking {strict}",
            *(f"  {line}" for line in extra),
            *(f"  {fwd}" for fwd in forwards),
        ]
        return "\n".join(lines) + "\n"


@contextlib.contextmanager
def running_sshd(workdir: Path, **kwargs: object) -> Iterator[SshServer]:
    """Start an SshServer and stop it afterwards, whatever happens."""
    server = SshServer(workdir, **kwargs)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.thaw()
        server.stop()


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            sock.sendall(data)


class _ThreadingTCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    accepted = 0  # connections accepted so far (counted in the serving thread)

    def verify_request(self, request: object, client_address: object) -> bool:
        self.accepted += 1
        return True


class _ThreadingTCPServer6(_ThreadingTCPServer):
    address_family = socket.AF_INET6


class _ServedInThread:
    """A socketserver serving from a daemon thread until close()."""

    def __init__(self, server: socketserver.TCPServer, host: str) -> None:
        self.server = server
        self.host = host
        self.port = int(server.server_address[1])
        # serve_forever accepts only after select() said a connection waits; should none be there after all, a
        # blocking accept would never return and close() (shutdown) would wait for it for ever. Non-blocking,
        # that accept fails, socketserver ignores the error, and the loop goes on. (Accepted sockets block.)
        server.socket.setblocking(False)
        self.thread = threading.Thread(target=server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop serving and release the port."""
        self.server.shutdown()
        self.server.server_close()


class EchoServer(_ServedInThread):
    """A threaded TCP echo server on a loopback port (the forward's target)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        cls = _ThreadingTCPServer6 if ":" in host else _ThreadingTCPServer
        super().__init__(cls((host, port), _EchoHandler), host)

    @property
    def accepted(self) -> int:
        """How many connections the server accepted so far."""
        assert isinstance(self.server, _ThreadingTCPServer)
        return self.server.accepted


class _FloodHandler(socketserver.BaseRequestHandler):
    server: _FloodTCPServer

    def handle(self) -> None:
        chunk = b"x" * 65536
        sock: socket.socket = self.request
        sock.settimeout(1.0)
        while not self.server.stopping.is_set():
            try:
                sent = sock.send(chunk)
            except TimeoutError:
                continue  # the reader is not reading: keep the pressure on until the test ends
            except OSError:
                return
            with self.server.count_lock:
                self.server.bytes_sent += sent


class _FloodTCPServer(_ThreadingTCPServer):
    bytes_sent = 0
    stopping = threading.Event()
    count_lock = threading.Lock()


class FloodServer(_ServedInThread):
    """A target that sends to every client as fast as the client (and the tunnel) take it."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        server = _FloodTCPServer((host, 0), _FloodHandler)
        server.stopping = threading.Event()
        server.count_lock = threading.Lock()
        super().__init__(server, host)

    @property
    def bytes_sent(self) -> int:
        assert isinstance(self.server, _FloodTCPServer)
        return self.server.bytes_sent

    def close(self) -> None:
        """Stop every sender, then the server."""
        assert isinstance(self.server, _FloodTCPServer)
        self.server.stopping.set()
        super().close()


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"OK" if self.path == "/health" else b"tunneld demo stand-in for an MLflow server\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base
        return


class HttpServer(_ServedInThread):
    """An HTTP server that answers GET /health with 200 OK, as MLflow's tracking server does."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(http.server.ThreadingHTTPServer((host, port), _HealthHandler), host)


class _ControlledHandler(http.server.BaseHTTPRequestHandler):
    server: _ControlledHttp

    def do_GET(self) -> None:
        mode = self.server.mode
        if mode == "hang":
            self.server.release.wait(30)  # answer nothing until the test ends or changes its mind
            return
        code = 200 if mode == "ok" else int(mode)
        body = b"OK" if code == 200 else f"{code}\n".encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base
        return


class _ControlledHttp(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    mode = "ok"
    release = threading.Event()


class ControlledHttpServer(_ServedInThread):
    """An HTTP target whose answer the test sets: "ok" (200), "503" (any code), or "hang" (never answers)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        server = _ControlledHttp((host, port), _ControlledHandler)
        server.release = threading.Event()
        super().__init__(server, host)

    def set_mode(self, mode: str) -> None:
        """Change how /health is answered from the next request on."""
        assert isinstance(self.server, _ControlledHttp)
        self.server.mode = mode
        if mode != "hang":
            self.server.release.set()
            self.server.release = threading.Event()

    def close(self) -> None:
        """Release hanging requests, then stop serving."""
        assert isinstance(self.server, _ControlledHttp)
        self.server.release.set()
        super().close()


class _DribbleHandler(socketserver.BaseRequestHandler):
    server: _DribbleTCPServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(5)
        request = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in request and len(request) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    return
                request += chunk
        with self.server.count_lock:
            self.server.requests += 1
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK"
        for byte in answer:  # one byte, then a pause shorter than any per-read timeout a client may use
            if self.server.stopping.wait(self.server.interval_s):
                return
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return


class _DribbleTCPServer(_ThreadingTCPServer):
    interval_s = 1.0
    requests = 0
    stopping = threading.Event()
    count_lock = threading.Lock()


class DribblingHttpServer(_ServedInThread):
    """An HTTP target that answers 200 OK one byte every `interval_s` seconds (its status line alone takes
    17 intervals): alive enough for a per-read timeout, never in time for a deadline on the whole answer."""

    def __init__(self, interval_s: float = 1.0, host: str = "127.0.0.1") -> None:
        server = _DribbleTCPServer((host, 0), _DribbleHandler)
        server.interval_s = interval_s
        server.stopping = threading.Event()
        server.count_lock = threading.Lock()
        super().__init__(server, host)

    @property
    def requests(self) -> int:
        """How many requests arrived (complete headers) so far."""
        assert isinstance(self.server, _DribbleTCPServer)
        with self.server.count_lock:
            return self.server.requests

    def close(self) -> None:
        """End every dribbling answer, then stop serving."""
        assert isinstance(self.server, _DribbleTCPServer)
        self.server.stopping.set()
        super().close()


@contextlib.contextmanager
def hold_port(ip: str, port: int) -> Iterator[socket.socket]:
    """Listen on ip:port from this test process (a program that already holds the port), closed afterwards."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((ip, port))
        sock.listen(8)
        yield sock
    finally:
        sock.close()


def ipv6_loopback() -> bool:
    """Return True when this machine can listen on ::1."""
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def free_port_both() -> int:
    """Return a port free on both 127.0.0.1 and ::1 right now."""
    for _ in range(50):
        port = free_port()
        if not ipv6_loopback():
            return port
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET6) as sock:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(("::1", port))
            return port
    raise RuntimeError("no port free on both loopback families")


class SwitchableRelay:
    """A TCP relay in front of a server whose path the test switches: "forward", "swallow" (accept and
    say nothing, like a frozen server's backlog), "full" (a full accept queue: the kernel drops SYNs, so a
    connect hangs in SYN retransmission as on a dead path), "closed" (nothing listens: refused) or "greet"
    (answer with chosen bytes and close: a device on the path; with no bytes, a server's defences closing at
    once). `accepted` counts the connections it accepted from clients (not its own fillers)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.mode = "forward"
        self.payload = b""
        self.port = free_port()
        self.accepted = 0
        self._listener: socket.socket | None = None
        self._held: list[socket.socket] = []
        self._fillers: list[socket.socket] = []
        self._acceptor: threading.Thread | None = None
        self._lock = threading.Lock()
        self.set_mode("forward")

    def set_mode(self, mode: str, payload: bytes = b"") -> None:
        """Switch the path; "closed" stops listening, "full" listens without accepting, the others accept
        ("greet" sends `payload`)."""
        with self._lock:
            previous, self.mode = self.mode, mode
            self.payload = payload
            if (mode == "closed" or (mode == "full") != (previous == "full")) and self._listener is not None:
                self._stop_listening()
            for filler in self._fillers:
                filler.close()
            self._fillers = []
            if mode == "closed" or self._listener is not None:
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            self._listener = listener
            if mode == "full":
                listener.listen(0)  # room for one queued connection: the fillers take it, further SYNs are dropped
                for _ in range(2):
                    filler = socket.socket()
                    filler.setblocking(False)
                    with contextlib.suppress(BlockingIOError):
                        filler.connect(("127.0.0.1", self.port))
                    self._fillers.append(filler)
                return
            listener.listen(64)
            self._acceptor = threading.Thread(target=self._accept, args=(listener,), daemon=True)
            self._acceptor.start()

    def _stop_listening(self) -> None:
        """Close the listener for real: shutdown wakes a thread blocked in accept(), which would otherwise keep
        the socket listening (and take one more connection) after close()."""
        assert self._listener is not None
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._listener = None
        if self._acceptor is not None:
            self._acceptor.join(5)
            self._acceptor = None

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self.mode == "swallow":
                self._held.append(client)  # never answered: the client waits for a banner
                continue
            if self.mode == "greet":
                threading.Thread(target=_greet, args=(client, self.payload), daemon=True).start()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=_pipe, args=(src, dst), daemon=True).start()

    def close(self) -> None:
        """Stop listening and drop every connection it holds."""
        self.set_mode("closed")
        for sock in self._held:
            sock.close()


def _greet(client: socket.socket, payload: bytes) -> None:
    """Send `payload` and close, reading until the client closes (unread bytes would turn the close into a reset)."""
    with client, contextlib.suppress(OSError):
        client.settimeout(5)
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        while client.recv(65536):
            pass


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


class DelayRelay:
    """A TCP relay on 127.0.0.1 that delays every chunk by `delay_ms` each way: a long path without netem.

    TCP itself stays unconstrained (the relay acknowledges at once), so only SSH's own window sees the delay.
    """

    def __init__(self, upstream: tuple[str, int], delay_ms: int) -> None:
        self.upstream = upstream
        self.delay_s = delay_ms / 1000
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()

        def writer() -> None:
            while True:
                due, data = chunks.get()
                time.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                try:
                    dst.sendall(data)
                except OSError:
                    return

        threading.Thread(target=writer, daemon=True).start()
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            chunks.put((time.monotonic() + self.delay_s, data))
            if not data:
                return

    def close(self) -> None:
        self.closed.set()
        self.listener.close()


class DownloadServer(_ServedInThread):
    """A target that sends every client the same `size` pseudo-random bytes, then closes."""

    def __init__(self, size: int, seed: int = 7) -> None:
        self.payload = random.Random(seed).randbytes(size)
        payload = self.payload

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with contextlib.suppress(OSError):
                    self.request.sendall(payload)

        super().__init__(_ThreadingTCPServer(("127.0.0.1", 0), Handler), "127.0.0.1")


def echo_roundtrip(address: tuple[str, int] | str, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send `payload` to an echo service at (host, port) or a unix socket path; return the echo."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received
