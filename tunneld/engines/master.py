"""The master connection of `tunneld login`: ssh logged in once, interactively, in the user's terminal, on a
private control socket of tunneld's (`ssh -M -S`), carrying the host's forwards; the supervisor adopts it.

For hosts that need a human at every login (a password, a one-time code, a Duo push, a FIDO touch): the
background never prompts. When the master ends (network loss, server restart), the host waits in needs-auth
until `tunneld login HOST` makes a new one. The user's own ControlMaster/ControlPath settings are neither
touched nor used: tunneld names its own socket on the command line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import threading
from pathlib import Path

import psutil

from tunneld.config.credentials import control_socket_alive, control_socket_peer
from tunneld.config.listen import ListenPlan, plan_spec
from tunneld.config.ports import listeners_of, port_in_use_error
from tunneld.config.spec import DYNAMIC, LOCAL, REMOTE, Endpoint, Forward, TunnelSpec
from tunneld.engines.link import ChildProcess, ForwardStatus, LinkLost
from tunneld.engines.sshargv import ssh_program, tunnel_options
from tunneld.engines.streams import LocalProber, Stream
from tunneld.errors import ConnectError, NeedsAuthError
from tunneld.safetext import printable
from tunneld.state.paths import HostFiles, ensure_private_dir, open_private
from tunneld.states import FORWARD_OK

log = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 10.0
WATCH_S = 0.25
_MASTER_RE = re.compile(r"Master running \(pid=(\d+)\)")


def _control_argv(host: str, control: Path, command: str) -> list[str]:
    """`ssh -S CONTROL -O COMMAND HOST`: talk to the master, not to the server (no ssh_config is read: with the
    socket named, nothing in it matters, and a `Match exec` there must not run)."""
    return [ssh_program(), "-F", "/dev/null", "-S", str(control), "-O", command, "--", host]


def master_argv(spec: TunnelSpec, files: HostFiles) -> list[str]:
    """The interactive login: the tunnel's own options, but prompting allowed, a master on tunneld's socket with no
    forwards of its own (the supervisor asks for them once it adopts it, when its own hold on the ports has ended),
    backgrounded once logged in."""
    options = tunnel_options(spec)
    options.pop("BatchMode", None)
    options.update(
        ClearAllForwardings="yes",  # the supervisor asks for the forwards once it adopts the master (-O forward)
        ControlMaster="yes",
        ControlPersist="no",
        ForkAfterAuthentication="yes",
        StdinNull="no",
        LogLevel="INFO",  # into the master's own log (-E): why it ended, for `status`
    )
    argv = [ssh_program(), "-N", "-S", str(files.control), "-E", str(files.master_log)]
    argv += ["-F", spec.ssh_config] if spec.ssh_config else []
    for key, value in options.items():
        argv += ["-o", f"{key}={value}"]
    return [*argv, "--", spec.alias]


def master_pid(files: HostFiles) -> int | None:
    """Return the pid of the host's live master connection, or None (no socket, nobody answers there, or what
    answers is not this user's ssh master on that very socket)."""
    if control_socket_peer(files.control) is None:  # not this user's socket, or not this user's listener
        return None
    try:
        done = subprocess.run(_control_argv(files.host, files.control, "check"), capture_output=True, text=True,
                              timeout=CONTROL_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _MASTER_RE.search(done.stderr)
    if done.returncode != 0 or not match:
        return None
    pid = int(match[1])
    return pid if _is_our_master(pid, files) else None


def _is_our_master(pid: int, files: HostFiles) -> bool:
    """The pid `-O check` names runs as this user and is an ssh started with this very control socket. (The socket's
    own peer credentials name whoever called listen(): with `ssh -f`, the parent that has exited since.)"""
    try:
        proc = psutil.Process(pid)
        argv = proc.cmdline()
        return proc.uids().real == os.getuid() and "-S" in argv and str(files.control) in argv
    except psutil.Error:
        return False


def stop_master(files: HostFiles) -> bool:
    """Ask the host's master connection to exit (`ssh -O exit`); True when one was there."""
    if not control_socket_alive(files.control):
        return False
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(_control_argv(files.host, files.control, "exit"), capture_output=True, timeout=CONTROL_TIMEOUT_S,
                       stdin=subprocess.DEVNULL, check=False)  # fmt: skip
    return True


def forward_options(spec: TunnelSpec) -> list[str]:
    """The host's forwards as ssh's -L, -R and -D options (what `ssh -O forward` asks a master for)."""
    options = []
    for forward in spec.forwards:
        listen = _endpoint(forward.listen, listen=True)
        if forward.kind == DYNAMIC:
            options += ["-D", listen]
        elif forward.target is not None:
            options += ["-L" if forward.kind == LOCAL else "-R", f"{listen}:{_endpoint(forward.target)}"]
    return options


def _endpoint(endpoint: Endpoint, listen: bool = False) -> str:
    if endpoint.path is not None:
        return endpoint.path
    host = endpoint.host
    if host is None:
        return str(endpoint.port) if listen else f"localhost:{endpoint.port}"
    shown = "*" if host == "" else f"[{host}]" if ":" in host else host
    return f"{shown}:{endpoint.port}"


def prepare_login(files: HostFiles) -> None:
    """Before a new master: tunneld's private directories, no stale socket file, a private log for ssh -E."""
    ensure_private_dir(files.directory)
    ensure_private_dir(files.control.parent)
    if files.control.is_socket() and not control_socket_alive(files.control):
        files.control.unlink()  # a master that died leaves its socket file; ssh -M would refuse to replace it

    os.close(open_private(files.master_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND))


def last_words(files: HostFiles) -> str:
    """The last line the master's ssh wrote (why it ended), escaped; "" when there is none."""
    try:
        with files.master_log.open("rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - 4096))
            lines = [line for line in handle.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return printable(lines[-1].strip())[:160] if lines else ""


class MasterLink:
    """The forwards of a live master connection: it listens, the supervisor watches it and checks through it."""

    def __init__(self, spec: TunnelSpec, files: HostFiles, pid: int, changed: threading.Event) -> None:
        self.spec = spec
        self.files = files
        self.pid = pid
        self.create_time = psutil.Process(pid).create_time()
        self.plans = {plan.forward: plan for plan in plan_spec(spec)}
        self.changed = changed
        self._ended = threading.Event()
        self._closing = threading.Event()
        threading.Thread(target=self._watch, name="master-watch", daemon=True).start()

    def open_forwards(self) -> None:
        """Ask the master for the host's forwards (`ssh -O forward`), unless it holds them already (a supervisor that
        adopts the master again); then every address of every local forward must be the master's."""
        missing = self._missing()
        if missing:
            argv = _control_argv(self.spec.alias, self.files.control, "forward")
            argv[-2:-2] = forward_options(self.spec)
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=CONTROL_TIMEOUT_S,
                                      stdin=subprocess.DEVNULL, check=False)  # fmt: skip
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise ConnectError(
                    f"the login connection of {self.spec.alias} did not take the forwards: {exc}"
                ) from exc
            log.debug("%s: ssh -O forward: %s", self.spec.alias, printable(done.stderr.strip()))
        for plan in self._missing():
            if plan.path is not None:
                raise port_in_use_error(path=plan.path)
            held = listeners_of(self.pid).tcp.get(plan.port, ())
            ip = next(ip for ip, address in zip(plan.ips, plan.addresses, strict=True) if address not in held)
            raise port_in_use_error(port=plan.port, ip=ip)

    def _missing(self) -> list[ListenPlan]:
        listeners = listeners_of(self.pid)
        return [
            plan for plan in self.plans.values()
            if (plan.path not in listeners.unix if plan.path is not None
                else not set(plan.addresses) <= set(listeners.tcp.get(plan.port, ())))
        ]  # fmt: skip

    def _alive(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            return abs(proc.create_time() - self.create_time) < 0.05 and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def _watch(self) -> None:
        while not self._closing.wait(WATCH_S):
            if not self._alive():
                self._ended.set()
                self.changed.set()
                return

    def wait(self, timeout: float) -> LinkLost | None:
        """Return why the master ended (the host then needs `tunneld login`), or None while it lives."""
        if not self._ended.wait(timeout):
            return None
        said = last_words(self.files)
        reason = "its login connection (tunneld login) ended" + (f" (ssh said: {said})" if said else "")
        return LinkLost(NeedsAuthError.waiting(self.spec.alias, reason, interactive=True))

    def abandon(self) -> None:
        """Stop watching the master without ending it (it was not used)."""
        self._closing.set()

    def close(self) -> None:
        """The supervisor is done with the link: end the master too (a `tunneld stop`), unless it ended already."""
        self._closing.set()
        if self._alive():
            stop_master(self.files)

    def stats(self) -> list[ForwardStatus]:
        statuses = []
        for forward in self.spec.forwards:
            plan = self.plans.get(forward)
            listen = (f"remote {forward.listen}",) if forward.kind == REMOTE or plan is None else plan.addresses
            target = str(forward.target) if forward.target else "SOCKS"
            exposed = bool(plan and plan.exposed)
            statuses.append(ForwardStatus(str(forward), listen, target, FORWARD_OK, exposed=exposed))
        return statuses

    def settling(self) -> bool:
        return False

    def children(self) -> list[ChildProcess]:
        return []  # not the supervisor's child: a later tunneld adopts it instead of reaping it

    def open_probe(self, forward: Forward, timeout: float, settle: bool) -> Stream:
        plan = self.plans[forward]
        address: tuple[str, int] | str = plan.path if plan.path is not None else (plan.ips[0], plan.port)
        return LocalProber(address).open_probe(forward, timeout, settle)
