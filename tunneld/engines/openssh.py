"""The OpenSSH engine: supervise an `ssh -N` child, know when it listens, read why it ended."""

from __future__ import annotations

import ctypes
import logging
import re
import signal
import subprocess
import sys
import threading
import time

import psutil

from tunneld.config.listen import plan_spec
from tunneld.config.ports import Listeners, clear_stale_socket, listeners_of, port_in_use_error
from tunneld.config.spec import LOCAL, REMOTE, Forward, TunnelSpec
from tunneld.engines.link import ChildProcess, ForwardStatus, LinkEvents, LinkLost, ProgressCallback
from tunneld.engines.master import MasterLink, master_pid
from tunneld.engines.sshargv import build_argv
from tunneld.engines.sshdiag import Diagnosis
from tunneld.engines.sshstderr import Record, StderrChannel
from tunneld.engines.streams import LocalProber, Stream
from tunneld.errors import ConnectError, HandshakeStalledError, TunneldError
from tunneld.state.paths import HostFiles
from tunneld.states import FORWARD_DEGRADED, FORWARD_OK

log = logging.getLogger(__name__)

POLL_S = 0.05
STOP_GRACE_S = 2.0
# Past ConnectTimeout (TCP + banner), key exchange and auth get this long before tunneld gives up.
HANDSHAKE_MARGIN_S = 15.0
# A channel that has not failed this long after it opened reached its target.
CHANNEL_SETTLE_S = 2.0
_PR_SET_PDEATHSIG = 1

# Not worth INFO: the byte counts at exit, and the version line every ssh run with -v prints first.
_QUIET_PREFIXES = ("Transferred: ", "Bytes per second: ", "OpenSSH_")
_REQUEST_RE = re.compile(r"Connection to port (\d+) forwarding to (.+) port (\d+) requested")
_NEW_CHANNEL_RE = re.compile(r"channel (\d+): new direct-(?:tcpip|streamlocal)")
_OPEN_FAILED_RE = re.compile(r"channel (\d+): open failed: ")
_FREE_RE = re.compile(r"channel (\d+): free: direct-")
_REMOTE_OK_RE = re.compile(r"remote forward success for: listen (\S+), connect")
# After this line ssh has tried to bind every local forward (it sets them up before its main loop).
_SESSION_LINE = "Entering interactive session"


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Ask Linux to SIGTERM the ssh child when tunneld dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class StderrWatcher:
    """Reads ssh's stderr: logs it, follows how far the link got, and tracks each forwarded channel's fate."""

    def __init__(
        self, channel: StderrChannel, spec: TunnelSpec, progress: ProgressCallback, events: LinkEvents, pid: int
    ) -> None:
        self.spec = spec
        self.progress = progress
        self.events = events
        self.changed = events.changed
        self.pid = pid
        self.diagnosis = Diagnosis(spec, pid if channel.knows_writers else None)
        self.eof = threading.Event()
        self.remote_ok = 0
        self.binds_done = threading.Event()
        self._lock = threading.Lock()
        self._pending_port: int | None = None
        self._channels: dict[int, tuple[int | None, float]] = {}
        self._degraded: dict[int | None, tuple[str, float]] = {}  # port: (why, when), by a channel's open failure
        self._thread = threading.Thread(target=self._read, args=(channel,), name="ssh-stderr", daemon=True)
        self._thread.start()

    def _read(self, channel: StderrChannel) -> None:
        for record in channel.records():
            self._handle(record)
        self.eof.set()
        self.changed.set()

    def _handle(self, record: Record) -> None:
        own = record.pid in (None, self.pid)  # not a ProxyJump hop's ssh (nor a ProxyCommand)
        line = record.line
        loud = (not record.debug or "open failed" in line) and not line.startswith(_QUIET_PREFIXES)
        shown = record.shown().removeprefix("ssh: ") if own else record.shown()  # ssh names itself in some lines
        log.log(logging.INFO if loud else logging.DEBUG, "%s: %s: %s", self.spec.alias, "ssh" if own else "proxy",
                shown)  # fmt: skip
        with self._lock:
            was_banner, was_authenticated = self.diagnosis.banner, self.diagnosis.authenticated
            self.diagnosis.feed(record)
            if own:
                self._track(record)
            banner, authenticated = self.diagnosis.banner, self.diagnosis.authenticated
            if self.diagnosis.tcp_up:
                self.events.tcp_up.set()
            if self.diagnosis.first_hop_authenticated:
                self.events.first_hop_authenticated.set()
        if banner and not was_banner:
            self.progress("connected, checking host key")
        if authenticated and not was_authenticated:
            self.events.authenticated.set()
            self.progress("authenticated")

    def _track(self, record: Record) -> None:
        text = record.line
        if match := _REQUEST_RE.match(text):
            self._pending_port = int(match[1])
        elif match := _NEW_CHANNEL_RE.match(text):
            self._channels[int(match[1])] = (self._pending_port, time.monotonic())
            self._pending_port = None
        elif match := _OPEN_FAILED_RE.match(text):
            port, _ = self._channels.pop(int(match[1]), (None, 0.0))
            reason = record.shown().split(": open failed: ", 1)[-1]  # the server's words, quoted
            self._degraded[port] = (reason, time.monotonic())
            self.changed.set()
        elif match := _FREE_RE.match(text):
            port_opened = self._channels.pop(int(match[1]), None)
            if port_opened is not None and self._clears(*port_opened):  # it reached its target after the failure
                del self._degraded[port_opened[0]]
                self.changed.set()
        elif _REMOTE_OK_RE.match(text):
            self.remote_ok += 1
        elif text.startswith(_SESSION_LINE):
            self.binds_done.set()

    def _clears(self, port: int | None, opened: float) -> bool:
        """A channel of `port` that was opened after its last failure proves the target back; one opened before
        (a long connection, a health check still closing) says nothing about it now."""
        failed = self._degraded.get(port)
        return failed is not None and opened > failed[1]

    def degraded(self) -> dict[int | None, str]:
        """Return {listen port: why} for forwards whose target refused the last connection."""
        now = time.monotonic()
        with self._lock:
            for port, opened in self._channels.values():
                if now - opened >= CHANNEL_SETTLE_S and self._clears(port, opened):
                    del self._degraded[port]
            return {port: why for port, (why, _) in self._degraded.items()}

    def settling(self) -> bool:
        """Return True while a channel is open but not yet known to have reached its target."""
        with self._lock:
            return bool(self._channels) and bool(self._degraded)

    def error(self, returncode: int) -> TunneldError:
        """Why ssh ended, as ssh's own words decide it (sshdiag)."""
        with self._lock:
            return self.diagnosis.error(returncode)

    def last_words(self) -> str:
        """What ssh said last, peer text quoted."""
        with self._lock:
            return self.diagnosis.last_words()

    def join(self, timeout: float) -> None:
        """Wait for ssh's stderr to reach EOF (after the child exited)."""
        self._thread.join(timeout)


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
        return LinkLost(self.watcher.error(returncode))

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

    def connect(self, spec: TunnelSpec, progress: ProgressCallback, events: LinkEvents) -> OpenSshLink | MasterLink:
        """Start ssh and return once it listens on every forward; raise the typed reason if it ends first.

        A host with a live login connection (`tunneld login`) uses it instead: it already listens.
        """
        files = HostFiles.of(spec.alias)
        pid = master_pid(files)
        if pid is not None:
            master = MasterLink(spec, files, pid, events.changed)
            try:
                master.open_forwards()
            except TunneldError:
                master.abandon()
                raise
            events.authenticated.set()
            progress("listening (through the login connection)")
            return master
        argv = build_argv(spec)
        for forward in spec.local_forwards:
            if forward.listen.path is not None:
                clear_stale_socket(forward.listen.path)  # a killed ssh leaves its socket file behind
        log.debug("%s: running %s", spec.alias, " ".join(argv))
        channel = StderrChannel()
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=channel.child_fd,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
            )
        except BaseException:
            channel.close()
            raise
        channel.spawned()
        link = OpenSshLink(spec, proc, StderrWatcher(channel, spec, progress, events, proc.pid), argv)
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
                f"{spec.connect_timeout_s + HANDSHAKE_MARGIN_S:.0f} s (last from ssh: {link.watcher.last_words()})",
                "the server accepted TCP but the SSH handshake stalled; tunneld keeps retrying",
            )
