"""The OpenSSH engine: supervise an `ssh -N` child, know when it listens, read why it ended."""

from __future__ import annotations

import collections
import ctypes
import functools
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import psutil

from tunneld.config import ssh_binary
from tunneld.engines import (
    ChildProcess,
    ForwardStatus,
    LinkEvents,
    LinkLost,
    ProgressCallback,
    algorithms,
)
from tunneld.errors import (
    AuthError,
    ConfigError,
    ConnectError,
    HandshakeStalledError,
    HostKeyError,
    TunneldError,
    UnreachableError,
)
from tunneld.health import LocalProber, Stream
from tunneld.listen import plan_spec
from tunneld.ports import Listeners, clear_stale_socket, listeners_of, port_in_use_error
from tunneld.spec import LOCAL, REMOTE, Forward, TunnelSpec
from tunneld.states import FORWARD_DEGRADED, FORWARD_OK

log = logging.getLogger(__name__)

AES_GCM_CIPHERS = "aes128-gcm@openssh.com,aes256-gcm@openssh.com"
POLL_S = 0.05
STOP_GRACE_S = 2.0
STDERR_LINES_KEPT = 60
# Past ConnectTimeout (TCP + banner), key exchange and auth get this long before tunneld gives up.
HANDSHAKE_MARGIN_S = 15.0
# A channel that has not failed this long after it opened reached its target.
CHANNEL_SETTLE_S = 2.0
_PR_SET_PDEATHSIG = 1

_MILESTONES = (
    ("Remote protocol version", "connected, checking host key"),  # the server's banner arrived
    ("Authenticated to ", "authenticated"),
)
_QUIET_PREFIXES = ("Transferred: ", "Bytes per second: ")
_REQUEST_RE = re.compile(r"Connection to port (\d+) forwarding to (.+) port (\d+) requested")
_NEW_CHANNEL_RE = re.compile(r"channel (\d+): new direct-(?:tcpip|streamlocal)")
_OPEN_FAILED_RE = re.compile(r"channel (\d+): open failed: (.+)$")
_FREE_RE = re.compile(r"channel (\d+): free: direct-")
_REMOTE_OK_RE = re.compile(r"remote forward success for: listen (\S+), connect")
_BIND_ADDR_RE = re.compile(r"bind \[([^\]]*)\]:(\d+): Address already in use")
_BIND_PORT_RE = re.compile(r"cannot listen to port: (\d+)")
# After this line ssh has tried to bind every local forward (it sets them up before its main loop).
_SESSION_LINE = "Entering interactive session"
_BIND_PATH_RE = re.compile(r"cannot bind to path:? (\S+?):? Address already in use")
_OFFENDING_RE = re.compile(r"Offending \S+ key in (\S+):(\d+)")
_FINGERPRINT_RE = re.compile(r"Server host key: \S+ (\S+)")
# Lines that decide how a link ended; kept apart from the bounded tail so DEBUG chatter cannot push them out.
_VERDICT_NEEDLES = ("HOST IDENTIFICATION HAS CHANGED", "REVOKED HOST KEY", "marked as revoked", "Offending ",
                    "host key check failure", "Server host key: ", "Host key verification failed")  # fmt: skip
# ssh could not even open TCP to the first hop: the path (or the server) is down.
_UNREACHABLE = (
    "Could not resolve hostname",
    "Connection refused",
    "Connection timed out",
    "No route to host",
    "Network is unreachable",
)
_CONNECT_FAILURES = (
    "Connection closed by",
    "Connection reset by",
    "closed by remote host",
    "kex_exchange_identification",
    "banner exchange",
    "not responding",
    "Broken pipe",
    "remote port forwarding failed",
)


def build_argv(spec: TunnelSpec) -> list[str]:
    """Return the ssh command line that keeps `spec`'s forwards up under supervision."""
    ssh = ssh_binary()
    if ssh is None:
        raise ConfigError("the OpenSSH client ('ssh') is not on PATH", "install openssh-client or use another engine")
    argv = [ssh, "-N"]
    if spec.ssh_config:
        argv += ["-F", spec.ssh_config]
    options = {
        "ExitOnForwardFailure": "yes",
        "BatchMode": "yes",
        # An existing master would take our forwards and let this ssh exit 0 while the port works.
        "ControlMaster": "no",
        "ControlPath": "none",
        "ForkAfterAuthentication": "no",
        "StdinNull": "yes",
        "RequestTTY": "no",
        # The link is a tunnel and nothing else, whatever the host entry says for interactive use:
        # a week-long tunnel must not lend the agent or the X display to the server.
        "ForwardAgent": "no",
        "ForwardX11": "no",
        "PermitLocalCommand": "no",
        "Tunnel": "no",
        # DEBUG1 names the channel of each forwarded connection, so a refusing target can be told apart.
        "LogLevel": "DEBUG1",
    }
    if not spec.keepalive_from_user:
        options["ServerAliveInterval"] = str(spec.keepalive_interval_s)
        options["ServerAliveCountMax"] = str(spec.keepalive_count_max)
    if not spec.connect_timeout_from_user:
        options["ConnectTimeout"] = str(spec.connect_timeout_s)
    if not algorithms.user_set(spec, "ciphers") and cpu_has_aes():
        # AES-GCM runs in hardware here: 400-490 MB/s against chacha20's ~280-290 (docs/benchmarks.md).
        # '^' puts them first and keeps the rest of OpenSSH's default list.
        options["Ciphers"] = "^" + AES_GCM_CIPHERS
    for key, value in options.items():
        argv += ["-o", f"{key}={value}"]
    argv += ["--", spec.alias]
    return argv


@functools.lru_cache(maxsize=1)
def cpu_has_aes() -> bool:
    """Return True when the CPU has AES instructions (x86 AES-NI, ARMv8 AES; every Apple Silicon Mac)."""
    if sys.platform == "darwin":
        return True
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(
        line.startswith(("flags", "Features")) and "aes" in line.split(":", 1)[-1].split() for line in text.splitlines()
    )


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Ask Linux to SIGTERM the ssh child when tunneld dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class StderrWatcher:
    """Reads ssh's stderr: logs it, reports milestones, and tracks each forwarded channel's fate."""

    def __init__(self, stream: IO[bytes], spec: TunnelSpec, progress: ProgressCallback, events: LinkEvents) -> None:
        self.spec = spec
        self.progress = progress
        self.events = events
        self.changed = events.changed
        self.eof = threading.Event()
        self.lines: collections.deque[str] = collections.deque(maxlen=STDERR_LINES_KEPT)
        self.verdicts: collections.deque[str] = collections.deque(maxlen=STDERR_LINES_KEPT)
        self.remote_ok = 0
        self.binds_done = threading.Event()
        self._lock = threading.Lock()
        self._pending_port: int | None = None
        self._channels: dict[int, tuple[int | None, float]] = {}
        self._degraded: dict[int | None, str] = {}
        self._thread = threading.Thread(target=self._read, args=(stream,), name="ssh-stderr", daemon=True)
        self._thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._handle(line)
        stream.close()
        self.eof.set()
        self.changed.set()

    def _handle(self, line: str) -> None:
        debug = line.startswith("debug")
        text = line.split(": ", 1)[1] if debug and ": " in line else line.removeprefix("ssh: ")
        if (not debug or "open failed" in text) and not text.startswith(_QUIET_PREFIXES):
            log.info("%s: ssh: %s", self.spec.alias, text)
        else:
            log.debug("%s: ssh: %s", self.spec.alias, text)
        with self._lock:
            self.lines.append(text)
            if any(needle in text for needle in _VERDICT_NEEDLES):
                self.verdicts.append(text)
            self._track(text)
        for needle, milestone in _MILESTONES:
            if text.startswith(needle):
                self.progress(milestone)
        if debug and text.startswith("Connection established."):
            self.events.tcp_up.set()
        elif text.startswith("Authenticated to "):  # with ProxyJump, the jump ssh's login comes first
            self.events.first_hop_authenticated.set()
            self.events.authenticated.set()

    def _track(self, text: str) -> None:
        if match := _REQUEST_RE.search(text):
            self._pending_port = int(match[1])
        elif match := _NEW_CHANNEL_RE.search(text):
            self._channels[int(match[1])] = (self._pending_port, time.monotonic())
            self._pending_port = None
        elif match := _OPEN_FAILED_RE.search(text):
            port, _ = self._channels.pop(int(match[1]), (None, 0.0))
            self._degraded[port] = match[2]
            self.changed.set()
        elif match := _FREE_RE.search(text):
            port_opened = self._channels.pop(int(match[1]), None)
            if port_opened is not None and self._degraded.pop(port_opened[0], None) is not None:
                self.changed.set()
        elif _REMOTE_OK_RE.search(text):
            self.remote_ok += 1
        elif text.startswith(_SESSION_LINE):
            self.binds_done.set()

    def degraded(self) -> dict[int | None, str]:
        """Return {listen port: why} for forwards whose target refused the last connection."""
        now = time.monotonic()
        with self._lock:
            for port, opened in self._channels.values():
                if now - opened >= CHANNEL_SETTLE_S:
                    self._degraded.pop(port, None)
            return dict(self._degraded)

    def settling(self) -> bool:
        """Return True while a channel is open but not yet known to have reached its target."""
        with self._lock:
            return bool(self._channels) and bool(self._degraded)

    def tail(self) -> list[str]:
        """Return the lines that decide how ssh ended (host key verdicts), then the last lines it wrote."""
        with self._lock:
            return [*self.verdicts, *self.lines]

    def join(self, timeout: float) -> None:
        """Wait for ssh's stderr to reach EOF (after the child exited)."""
        self._thread.join(timeout)


def classify_exit(spec: TunnelSpec, returncode: int, lines: list[str]) -> TunneldError:
    """Turn how ssh ended (status and stderr) into a typed tunneld error."""
    # Per-connection lines (a refusing target) say nothing about why the link itself ended.
    lines = [line.removeprefix("ssh: ") for line in lines if not line.startswith(("channel ", *_QUIET_PREFIXES))]
    text = "\n".join(lines)
    where = f"{spec.user}@{spec.hostname}:{spec.port}"
    host_key = _host_key_error(spec, text)
    if host_key is not None:
        return host_key
    if "Permission denied" in text or "Too many authentication failures" in text:
        locked = "" if "passphrase" in text else None  # ssh's debug lines do not always name the key
        denied = _last_matching(lines, "Permission denied")
        return AuthError.refused(where, spec.ssh_command, denied, locked, spec.missing_identity_files())
    if "Address already in use" in text or "Could not request local forwarding" in text:
        return _port_error(spec, text)
    return _connection_error(spec, returncode, lines, text)


def _connection_error(spec: TunnelSpec, returncode: int, lines: list[str], text: str) -> ConnectError:
    """Why a link that is worth retrying ended: killed, stalled, refused, unreachable, or ssh's last words."""
    if returncode < 0:  # killed by a signal: whatever ssh last printed is not why
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return ConnectError(f"ssh was killed ({name})", "tunneld reconnects by itself")
    if "timed out during banner exchange" in text:
        needle = "banner exchange"
        return HandshakeStalledError(_last_matching(lines, needle), _connect_hint(spec, needle))
    for needle in _UNREACHABLE:
        if needle in text:
            return UnreachableError(_last_matching(lines, needle), _connect_hint(spec, needle))
    for needle in _CONNECT_FAILURES:
        if needle in text:
            return ConnectError(_last_matching(lines, needle), _connect_hint(spec, needle))
    last = lines[-1] if lines else ""
    return ConnectError(f"ssh exited with status {returncode}" + (f": {last}" if last else ""))


def _host_key_error(spec: TunnelSpec, text: str) -> HostKeyError | None:
    """Read ssh's host-key verdict; under StrictHostKeyChecking no a changed or revoked key still ends the
    link ("forwarding disabled due to host key check failure"), and that is fatal, not a retry."""
    if "REVOKED HOST KEY" in text or "is marked as revoked" in text:
        fingerprint = _FINGERPRINT_RE.search(text)
        return HostKeyError.revoked(spec.hostname, fingerprint[1] if fingerprint else "", "")
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or "host key check failure" in text:
        offending = _OFFENDING_RE.search(text)
        saved_in = f" ({offending[1]} line {offending[2]})" if offending else ""
        return HostKeyError.changed(spec.hostname, spec.ssh_command, spec.remove_key_command, saved_in)
    if "host key is known for" in text or "Host key verification failed" in text:
        return HostKeyError.unknown(spec.hostname, spec.ssh_command)
    return None


def _last_matching(lines: list[str], needle: str) -> str:
    return next((line for line in reversed(lines) if needle in line), needle)


def _connect_hint(spec: TunnelSpec, needle: str) -> str:
    if needle == "Could not resolve hostname":
        return f"check HostName for {spec.alias} in your ssh_config and your network"
    if needle == "banner exchange":
        return (
            f"{spec.hostname}:{spec.port} accepts TCP but sent no SSH banner in time: a frozen or overloaded "
            "sshd, or another service on that port; tunneld keeps one attempt pending"
        )
    if needle == "remote port forwarding failed":
        return "the server refused a RemoteForward: the port may be held by an older session there"
    return f"is {spec.hostname} up and reachable on port {spec.port}? tunneld keeps retrying"


def _port_error(spec: TunnelSpec, text: str) -> TunneldError:
    if path_match := _BIND_PATH_RE.search(text):
        return port_in_use_error(path=path_match[1])
    if addr_match := _BIND_ADDR_RE.search(text):
        return port_in_use_error(port=int(addr_match[2]), ip=addr_match[1])
    port_match = _BIND_PORT_RE.search(text)
    return port_in_use_error(port=int(port_match[1]) if port_match else None)


class OpenSshLink:
    """A running `ssh -N` child whose forwards listen."""

    def __init__(
        self, spec: TunnelSpec, proc: subprocess.Popen[bytes], watcher: StderrWatcher, argv: list[str]
    ) -> None:
        self.spec = spec
        self.proc = proc
        self.argv = tuple(argv)
        self.watcher = watcher
        self.create_time = psutil.Process(proc.pid).create_time()
        self.plans = {plan.forward: plan for plan in plan_spec(spec)}
        self.listeners = Listeners({}, frozenset())

    def forwards_ready(self) -> bool:
        """Return True once ssh listens on every address of every local forward and the server took every remote one.

        Once ssh has tried every bind, an address it does not hold is held by someone else: clients
        resolving `localhost` to that family would reach them, so that is a PortInUseError, not `up`.
        """
        binds_done = self.watcher.binds_done.is_set()
        self.listeners = listeners_of(self.proc.pid)
        for plan in self.plans.values():
            if plan.path is not None:
                if plan.path not in self.listeners.unix:
                    return False
                continue
            held = self.listeners.tcp.get(plan.port, ())
            for ip, address in zip(plan.ips, plan.addresses, strict=True):
                if address not in held:
                    if binds_done:
                        raise port_in_use_error(port=plan.port, ip=ip)
                    return False
        remote = sum(1 for f in self.spec.forwards if f.kind == REMOTE)
        return self.watcher.remote_ok >= remote

    def wait(self, timeout: float) -> LinkLost | None:
        """Return why ssh ended, or None if it is still running after `timeout` seconds."""
        try:
            # ssh closes stderr as it exits: once EOF is seen, waiting for the status is short.
            returncode = self.proc.wait(max(timeout, STOP_GRACE_S) if self.watcher.eof.is_set() else timeout)
        except subprocess.TimeoutExpired:
            return None
        self.watcher.join(timeout=2.0)
        return LinkLost(classify_exit(self.spec, returncode, self.watcher.tail()))

    def close(self) -> None:
        """Stop ssh: SIGTERM, then SIGKILL after a grace period."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.watcher.join(timeout=1.0)

    def stats(self) -> list[ForwardStatus]:
        """Return each forward with its real listen addresses and whether its target refuses."""
        degraded = self.watcher.degraded()
        statuses = []
        for forward in self.spec.forwards:
            listen = self._listen_addresses(forward)
            reason = degraded.get(forward.listen.port) if forward.kind == LOCAL else None
            if reason is None and forward.kind == LOCAL and None in degraded and len(self.spec.local_forwards) == 1:
                reason = degraded[None]
            state = FORWARD_DEGRADED if reason else FORWARD_OK
            detail = f"{forward.target} {reason}" if reason else None
            target = str(forward.target) if forward.target else "SOCKS"
            plan = self.plans.get(forward)
            exposed = plan.exposed if plan else False
            statuses.append(ForwardStatus(str(forward), listen, target, state, detail, exposed=exposed))
        return statuses

    def _listen_addresses(self, forward: Forward) -> tuple[str, ...]:
        if forward.kind == REMOTE:
            return (f"remote {forward.listen}",)
        return self.plans[forward].addresses

    def open_probe(self, forward: Forward, timeout: float, settle: bool) -> Stream:
        """Connect through the forward's first local address: ssh opens a channel to the target for it."""
        plan = self.plans[forward]
        address: tuple[str, int] | str = plan.path if plan.path is not None else (plan.ips[0], plan.port)
        return LocalProber(address).open_probe(forward, timeout, settle)

    def settling(self) -> bool:
        """Return True while a degraded forward may clear once an open connection settles."""
        return self.watcher.settling()

    def children(self) -> list[ChildProcess]:
        """Return the ssh child, so a later tunneld can reap it if this one is killed."""
        return [ChildProcess(self.proc.pid, self.create_time, "ssh", self.argv)]


class OpenSshEngine:
    """Runs one `ssh -N` per link, with the user's own config and tunneld's supervision options."""

    name = "openssh"

    def close(self) -> None:
        """Nothing outlives a link here: each ssh child owns its listeners."""

    def connect(self, spec: TunnelSpec, progress: ProgressCallback, events: LinkEvents) -> OpenSshLink:
        """Start ssh and return once it listens on every forward; raise the typed reason if it ends first."""
        argv = build_argv(spec)
        for forward in spec.local_forwards:
            if forward.listen.path is not None:
                clear_stale_socket(forward.listen.path)  # a killed ssh leaves its socket file behind
        log.debug("%s: running %s", spec.alias, " ".join(argv))
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
        )
        assert proc.stderr is not None
        link = OpenSshLink(spec, proc, StderrWatcher(proc.stderr, spec, progress, events), argv)
        deadline = time.monotonic() + spec.connect_timeout_s + HANDSHAKE_MARGIN_S
        try:
            _wait_until_ready(link, deadline, events.stop)
        except BaseException:
            link.close()
            raise
        progress("listening")
        return link


def _wait_until_ready(link: OpenSshLink, deadline: float, cancel: threading.Event) -> None:
    spec = link.spec
    while True:
        lost = link.wait(POLL_S)
        if lost is not None:
            raise lost.error
        if link.forwards_ready():
            return
        if cancel.is_set():
            raise ConnectError("stopped while connecting")
        if time.monotonic() > deadline:
            raise HandshakeStalledError(
                f"no working link to {spec.hostname} within "
                f"{spec.connect_timeout_s + HANDSHAKE_MARGIN_S:.0f} s (last from ssh: {_last_line(link)})",
                "the server accepted TCP but the SSH handshake stalled; tunneld keeps retrying",
            )


def _last_line(link: OpenSshLink) -> str:
    tail = link.watcher.tail()
    return tail[-1] if tail else "nothing"
