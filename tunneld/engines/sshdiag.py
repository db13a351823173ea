"""ssh's stderr judged: the typed error only ssh's own words decide, each at the stage it belongs to.

Three modules read ssh's stderr, in order: engines/sshstderr.py turns it into records (one per write of
ssh's, ssh's own words told from the peer's it quotes), engines/sshhops.py keeps what each ssh process
said as facts and stages, and this module adds them up: a failure before the server's host key was
verified is transient whatever the peer sent (docs/security.md).
"""

from __future__ import annotations

import re
import signal

from tunneld.config.keys import needs_passphrase
from tunneld.config.ports import port_in_use_error
from tunneld.config.spec import TunnelSpec
from tunneld.engines.sshhops import Hop, Stage
from tunneld.engines.sshstderr import Record
from tunneld.errors import (
    AuthError,
    ConnectError,
    HandshakeStalledError,
    HostKeyError,
    RefusedByServerError,
    TunneldError,
    UnreachableError,
)
from tunneld.safetext import quote_peer

HOPS_KEPT = 8  # ssh processes tracked per link: the target's ssh and its ProxyJump hops
_DENIED = re.compile(r"\S+@\S+: Permission denied \(.*\)\.$")
_BIND_ADDR_RE = re.compile(r"bind \[([^\]]*)\]:(\d+): Address already in use")
_BIND_PORT_RE = re.compile(r"cannot listen to port: (\d+)")
_BIND_PATH_RE = re.compile(r"cannot bind to path:? (\S+?):? Address already in use")


class Diagnosis:
    """Everything ssh said about one link, hop by hop, and the error it adds up to when ssh ends."""

    def __init__(self, spec: TunnelSpec, main_pid: int | None = None) -> None:
        self.spec = spec
        self.main_pid = main_pid  # the target's ssh; None when records do not name their writer
        self.hops: list[Hop] = []
        self._current: dict[int | None, Hop] = {}

    def feed(self, record: Record) -> None:
        """Take the next record ssh (or a ProxyJump hop's ssh) wrote."""
        pid = record.pid if self.main_pid is not None else None
        hop = self._current.get(pid)
        if hop is None or hop.is_past(record):
            if len(self.hops) >= HOPS_KEPT:
                return
            hop = Hop(pid)
            self.hops.append(hop)
            self._current[pid] = hop
        hop.feed(record)

    @property
    def tcp_up(self) -> bool:
        """TCP to the first hop is connected (or a banner arrived through a ProxyCommand)."""
        return any(hop.stage >= Stage.TCP for hop in self.hops)

    @property
    def banner(self) -> bool:
        """The target's SSH banner arrived (it is checking the host key now)."""
        return self.target.stage >= Stage.BANNER

    @property
    def authenticated(self) -> bool:
        """The target (not a ProxyJump hop) accepted the login."""
        return self.target.stage == Stage.AUTHENTICATED

    @property
    def first_hop_authenticated(self) -> bool:
        """The ssh that opened TCP (to the server, or to the first ProxyJump host) got past authentication: the
        connection tunneld opened did not end before it, whatever happened behind it."""
        return any(hop.tcp and hop.stage == Stage.AUTHENTICATED for hop in self.hops)

    @property
    def target(self) -> Hop:
        """The hop that is the spec's own server (a fresh one while ssh has not reached it)."""
        if self.main_pid is not None:
            mine = [hop for hop in self.hops if hop.pid == self.main_pid]
        else:
            wanted = (self.spec.hostname.lower(), self.spec.port)
            mine = [hop for hop in self.hops if (hop.host.lower(), hop.port) == wanted]
            if not mine and not (self.spec.proxy_jump or self.spec.proxy_command):
                mine = self.hops
        return mine[-1] if mine else Hop(self.main_pid)

    def jumps(self) -> list[Hop]:
        """The other ssh processes that said where they connect (ProxyJump hops), in the order they began."""
        target = self.target
        return [hop for hop in self.hops if hop is not target and (hop.host or hop.stage > Stage.START)]

    def last_words(self) -> str:
        """What ssh said last (peer text quoted), for a message."""
        for hop in (self.target, *reversed(self.hops)):
            if hop.last is not None:
                return hop.last.shown()
        return "nothing"

    def error(self, returncode: int) -> TunneldError:
        """Why the link ended, as a typed error: only ssh's own words, each at its stage, choose the class."""
        if returncode < 0:  # killed by a signal: whatever ssh last printed is not why
            return ConnectError(f"ssh was killed ({_signal_name(-returncode)})", "tunneld reconnects by itself")
        target = self.target
        if target.stage < Stage.BANNER:
            for hop in self.jumps():
                if (error := self._hop_error(hop, jump=True)) is not None:
                    return error
        if (error := self._hop_error(target, jump=False)) is not None:
            return error
        if target.killed:
            return ConnectError(f"ssh was killed ({_signal_name(target.killed)})", "tunneld reconnects by itself")
        if returncode == 0:  # ssh -N ends so on SIGTERM after login
            return ConnectError("ssh ended without an error (status 0)", "tunneld reconnects by itself")
        last = target.last or next((hop.last for hop in reversed(self.hops) if hop.last), None)
        said = last.shown() if last is not None else ""
        hint = _connect_hint(self.spec.hostname, self.spec.port, said)
        return ConnectError(said or f"ssh exited with status {returncode}", hint)

    def _hop_error(self, hop: Hop, jump: bool) -> TunneldError | None:
        """The error one hop's own lines decide, judged at the stage it reached."""
        where = hop.where if jump else f"{self.spec.hostname}:{self.spec.port}"
        shown = f"jump host {where}" if jump else where
        error: TunneldError | None
        if hop.stage <= Stage.TCP:
            error = self._reach_error(hop, shown, jump)
        elif hop.stage < Stage.AUTHENTICATED:
            error = self._host_key_error(hop, jump) or self._auth_error(hop, jump, where)
        else:
            error = self._session_error(hop, shown, jump, where)
        if error is None and hop.disconnect is not None:
            before = " before its host key was verified" if hop.stage < Stage.VERIFIED else ""
            error = ConnectError(f"{shown} ended the connection{before}: {quote_peer(hop.disconnect)}")
        return error

    def _reach_error(self, hop: Hop, shown: str, jump: bool) -> ConnectError | None:
        """Before any SSH banner: TCP failed, nothing was said in time, or the connection ended first."""
        if hop.unreachable:
            return UnreachableError(
                hop.unreachable, _connect_hint(hop.host, hop.port, hop.unreachable, self.spec.alias)
            )
        if hop.banner_timeout:
            return HandshakeStalledError(f"{shown}: Connection timed out during banner exchange", _STALLED_HINT)
        if not hop.before_banner:
            return None
        how = hop.before_banner
        if hop.peer_lines:  # OpenSSH 9.8+ refuses with a line of text (`Not allowed at this time`), then closes
            more = f" (and {len(hop.peer_lines) - 1} more lines)" if len(hop.peer_lines) > 1 else ""
            return RefusedByServerError.before_banner(shown, how, f"{quote_peer(hop.peer_lines[0])}{more}")
        if not jump and self.spec.proxy_command:
            return ConnectError(
                f"the ProxyCommand of {self.spec.alias} ended before {shown} sent its SSH banner",
                f"try `{self.spec.ssh_command}` by hand; tunneld keeps retrying",
            )
        return RefusedByServerError.before_banner(shown, how)

    def _session_error(self, hop: Hop, shown: str, jump: bool, where: str) -> TunneldError | None:
        """After login: a ProxyJump hop could not reach the next one, or a forward could not be set up."""
        if jump and hop.channel_failed:
            why, server_said = hop.channel_failed
            target = hop.stdio_target or "the next hop"
            return ConnectError(
                f"{shown} could not reach {target}: {why}: {quote_peer(server_said)}",
                f"is {target} up and reachable from {where}? tunneld keeps retrying",
            )
        if not jump and hop.forward_errors:
            return _forward_error(hop.forward_errors)
        return None

    def _host_key_error(self, hop: Hop, jump: bool) -> HostKeyError | None:
        spec = self.spec
        host = f"jump host {hop.where}" if jump else spec.hostname
        if hop.revoked:
            return HostKeyError.revoked(host, hop.fingerprint, "")
        if hop.changed:
            remove = (hop.remove_command or f"ssh-keygen -R {hop.where}") if jump else spec.remove_key_command
            return HostKeyError.changed(host, spec.ssh_command, remove, hop.saved_in)
        if hop.unknown:
            return HostKeyError.unknown(host, spec.ssh_command)
        return None

    def _auth_error(self, hop: Hop, jump: bool, where: str) -> AuthError | None:
        """ssh's own refusal, as the last thing it said (a server's banner, printed raw before, can look alike)."""
        spec = self.spec
        if hop.stage != Stage.VERIFIED:
            return None
        login = f"jump host {hop.user}@{where}" if jump else f"{spec.user}@{where}"
        if hop.disconnect == "Too many authentication failures":  # the verified server's word on auth
            return AuthError.too_many_keys(login, spec.ssh_command)
        if hop.last is None or hop.last.debug or not _DENIED.fullmatch(hop.last.text.rstrip("\r\n")):
            return None
        # ssh offered the key's public half and could not sign: a passphrase no agent supplies, when the key file
        # says it is encrypted (a private key that is simply missing beside its .pub is not "locked").
        locked = [p for p in hop.accepted_files if p not in hop.unloadable and needs_passphrase(p) is True]
        if locked:
            return AuthError.locked_keys(login, spec.ssh_command, list(dict.fromkeys(locked)))
        missing = spec.missing_identity_files() if hop is self.target else ()
        return AuthError.refused(login, spec.ssh_command, hop.last.line, None, missing)


_STALLED_HINT = (
    "the server accepts TCP but sent no SSH banner in time: a frozen or overloaded sshd, or another service on "
    "that port; tunneld keeps one attempt pending"
)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _connect_hint(host: str, port: int, said: str, alias: str = "") -> str:
    if "Could not resolve hostname" in said:
        return f"check HostName for {alias or host} in your ssh_config and your network"
    if "remote port forwarding failed" in said:
        return "the server refused a RemoteForward: the port may be held by an older session there"
    return f"is {host} up and reachable on port {port}? tunneld keeps retrying"


def _forward_error(lines: list[str]) -> TunneldError:
    text = "\n".join(lines)
    if path_match := _BIND_PATH_RE.search(text):
        return port_in_use_error(path=path_match[1])
    if addr_match := _BIND_ADDR_RE.search(text):
        return port_in_use_error(port=int(addr_match[2]), ip=addr_match[1])
    if port_match := _BIND_PORT_RE.search(text):
        return port_in_use_error(port=int(port_match[1]))
    if "Could not request local forwarding" in text:
        return port_in_use_error(port=None)
    remote = next(line for line in lines if "remote port forwarding failed" in line)
    return ConnectError(remote, _connect_hint("", 0, remote))
