"""The paramiko engine: the SSH connection in-process (ProxyJump chain, host keys, auth, keepalive).

Its listeners live in a Forwarder that outlives each link, so connections made during an
outage wait for the next link instead of being refused.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import TypeVar

import paramiko

from tunneld.config.resolve import resolve_hop
from tunneld.config.settings import HostSettings
from tunneld.config.spec import Forward, TunnelSpec
from tunneld.config.tokens import expand_tokens, token_table
from tunneld.engines import algorithms
from tunneld.engines.forwarding import DEFAULT_HOLD_S, Forwarder, unsupported_forwards
from tunneld.engines.link import ChildProcess, ForwardStatus, LinkEvents, LinkLost, ProgressCallback
from tunneld.engines.pump import Channel
from tunneld.engines.sshkeys import authenticate, preferred_key_types, verify_host_key
from tunneld.errors import (
    ConfigError,
    ConnectError,
    HandshakeStalledError,
    RefusedByServerError,
    TunneldError,
    UnreachableError,
)
from tunneld.safetext import quote_peer

log = logging.getLogger(__name__)
_T = TypeVar("_T")

OPEN_TIMEOUT_S = 15.0
ABORT_POLL_S = 0.05
MIN_PROBE_WINDOW_BYTES = 64 * 1024  # a health check reads a status line, nothing more
WATCH_S = 0.25
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
BANNER_PEEK_BYTES = 256
# A server silent for all of ConnectTimeout may wait for our banner first (RFC 4253 lets it): paramiko sends
# ours, then gives the server this long for its own.
SILENT_SERVER_GRACE_S = 2.0
_STALLED_HINT = (
    "the port accepts TCP but does not complete an SSH handshake: a frozen or overloaded sshd, or another service "
    "on that port; tunneld keeps one attempt pending"
)


def check_supported(spec: TunnelSpec) -> None:
    """Refuse forwards this engine does not implement, pointing at the engine that does."""
    for forward in unsupported_forwards(spec):
        raise ConfigError(
            f"the paramiko engine supports LocalForward to host:port only, not {forward}",
            "use --engine openssh for RemoteForward, DynamicForward and unix-socket targets",
        )


class Abort:
    """Ends an attempt's blocking TCP connect or handshake at once when the attempt is cancelled.

    The supervisor cancels an attempt that hangs on a path that has since come back, and every
    attempt when it stops; closing what the attempt has open is what makes paramiko return.
    """

    def __init__(self, cancel: threading.Event) -> None:
        self.cancel = cancel
        self._open: list[socket.socket | paramiko.Transport | paramiko.ProxyCommand] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        threading.Thread(target=self._watch, name="abort", daemon=True).start()

    def track(self, item: _T) -> _T:
        """Close `item` if the attempt is cancelled before it finishes."""
        with self._lock:
            self._open.append(item)  # type: ignore[arg-type]
        if self.cancel.is_set():
            self._close_all()
            raise ConnectError("stopped while connecting")
        return item

    def check(self) -> None:
        """Raise when the attempt was cancelled."""
        if self.cancel.is_set():
            raise ConnectError("stopped while connecting")

    def done(self) -> None:
        """The attempt ended (up or failed): nothing more to close."""
        self._done.set()

    def _watch(self) -> None:
        while not self._done.is_set():
            if self.cancel.wait(ABORT_POLL_S):
                if not self._done.is_set():
                    self._close_all()
                return

    def _close_all(self) -> None:
        with self._lock:
            items, self._open = self._open, []
        for item in items:
            with contextlib.suppress(Exception):
                if isinstance(item, socket.socket):
                    item.shutdown(socket.SHUT_RDWR)  # wakes a connect() blocked in SYN retransmission
                item.close()


def _tcp(host: str, port: int, timeout: float, abort: Abort) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UnreachableError(
            f"Could not resolve hostname {host}: {exc.strerror}", "check HostName and your network"
        ) from exc
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = abort.track(socket.socket(family, kind, proto))
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            abort.check()
            error = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        return sock
    if isinstance(error, ConnectionResetError):  # accepted, then reset before connect() looked: as ssh sees it
        raise RefusedByServerError.before_banner(f"{host}:{port}", "reset") from error
    raise UnreachableError(f"connect to host {host} port {port}: {getattr(error, 'strerror', None) or error}")


def _first_bytes(sock: socket.socket, hop: TunnelSpec, abort: Abort) -> bytes | None:
    """Wait up to ConnectTimeout for the server's first bytes without taking them (paramiko reads them next).

    Closed or reset before one byte is how a server's defences (OpenSSH's PerSourcePenalties, MaxStartups,
    fail2ban) turn an address away: RefusedByServerError. None: the server has said nothing yet.
    """
    where = f"{hop.hostname}:{hop.port}"
    sock.settimeout(hop.connect_timeout_s)
    try:
        data = sock.recv(BANNER_PEEK_BYTES, socket.MSG_PEEK)
    except TimeoutError:
        return None
    except ConnectionResetError as exc:
        abort.check()
        raise RefusedByServerError.before_banner(where, "reset") from exc
    except OSError as exc:
        abort.check()
        raise ConnectError(f"{where}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(None)
    if not data:
        abort.check()  # an abort shuts the socket down, which reads as an end too
        raise RefusedByServerError.before_banner(where, "closed")
    return data


def _handshake_error(spec: TunnelSpec, greeting: bytes | None, exc: BaseException) -> ConnectError:
    """A failed handshake, transient whatever the peer sent; its words quoted (paramiko's messages embed them)."""
    where = f"{spec.hostname}:{spec.port}"
    if greeting is None:
        return HandshakeStalledError(
            f"{where}: no SSH banner within {spec.connect_timeout_s + SILENT_SERVER_GRACE_S:g} s", _STALLED_HINT
        )
    first = greeting.split(b"\n", 1)[0].rstrip(b"\r").decode(errors="replace")
    ended = (exc, exc.__cause__, exc.__context__)
    if greeting and not first.startswith("SSH-") and any(isinstance(e, (EOFError, ConnectionError)) for e in ended):
        how = "reset" if any(isinstance(e, ConnectionResetError) for e in ended) else "closed"
        return RefusedByServerError.before_banner(where, how, quote_peer(first))  # OpenSSH 9.8+: a line, then close
    if greeting and not first.startswith("SSH-"):
        return ConnectError(
            f"{where}: the peer sent {quote_peer(first)}, not an SSH banner",
            "something other than sshd answers there, or a device on the path interferes; tunneld keeps retrying",
        )
    return ConnectError(f"{where}: SSH handshake failed: {quote_peer(str(exc) or type(exc).__name__)}")


Carrier = socket.socket | paramiko.Channel | paramiko.ProxyCommand
# paramiko's names for the lists of each kind ssh_config sets.
_SECURITY_FIELDS = (("ciphers", "ciphers"), ("digests", "macs"), ("kex", "kexalgorithms"),
                    ("key_types", "hostkeyalgorithms"))  # fmt: skip


def offer_only_openssh_algorithms(options: paramiko.SecurityOptions, spec: TunnelSpec) -> None:
    """Offer what OpenSSH's client would offer (its defaults, or ssh_config's lists), in its order.

    paramiko alone would also offer 3des-cbc, aes-cbc, hmac-md5 and hmac-sha1-96.
    """
    for field, kind in _SECURITY_FIELDS:
        supported = tuple(getattr(options, field))
        chosen = tuple(name for name in algorithms.allowed(spec, kind) if name in supported)
        if not chosen:
            raise ConfigError(
                f"none of the {kind} your ssh_config allows for {spec.alias} is implemented by the paramiko engine "
                f"(it has: {', '.join(supported)})",
                "use --engine openssh, or allow one of those in your ssh_config",
            )
        if field == "ciphers" and not algorithms.user_set(spec, "ciphers"):
            # AES-GCM first: authenticated encryption in one pass through `cryptography` (fastest here).
            chosen = tuple(c for c in PREFERRED_CIPHERS if c in chosen) + tuple(
                c for c in chosen if c not in PREFERRED_CIPHERS
            )
        if field == "key_types":
            chosen = preferred_key_types(spec, chosen)
        setattr(options, field, chosen)


def _handshake(
    spec: TunnelSpec, sock: Carrier, progress: ProgressCallback, abort: Abort, greeting: bytes | None = b""
) -> paramiko.Transport:
    """SSH over `sock` (a socket, a channel of the previous hop, or a ProxyCommand): verify, authenticate.

    `greeting`: the first bytes the server sent, peeked (None: it was silent for all of ConnectTimeout).
    """
    transport = abort.track(paramiko.Transport(sock))
    transport.banner_timeout = spec.connect_timeout_s if greeting is not None else SILENT_SERVER_GRACE_S
    try:
        offer_only_openssh_algorithms(transport.get_security_options(), spec)
        try:
            transport.start_client(timeout=spec.connect_timeout_s)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            abort.check()
            raise _handshake_error(spec, greeting, exc) from exc
        try:
            # start_client returns quietly when its timeout passes mid-handshake: no key means no session.
            key = transport.get_remote_server_key()
        except paramiko.SSHException as exc:
            abort.check()
            raise HandshakeStalledError(
                f"{spec.hostname}:{spec.port}: no SSH handshake within {spec.connect_timeout_s} s", _STALLED_HINT
            ) from exc
        progress("connected, checking host key")
        verify_host_key(spec, key)
        authenticate(transport, spec)
        progress("authenticated")
    except BaseException:
        transport.close()
        raise
    return transport


def open_chain(
    spec: TunnelSpec, progress: ProgressCallback, abort: Abort, events: LinkEvents | None = None
) -> tuple[list[paramiko.Transport], paramiko.ProxyCommand | None]:
    """Connect through ProxyCommand or every ProxyJump hop (each verified and authenticated) to the host.

    `events.tcp_up` is set once TCP to the first hop is connected, `events.first_hop_authenticated` once it
    accepted the login.
    """
    transports: list[paramiko.Transport] = []
    proxy = None
    try:
        if spec.proxy_command:
            command = expand_tokens(spec.proxy_command, token_table(spec.alias, spec.hostname, spec.port, spec.user))
            proxy = abort.track(paramiko.ProxyCommand(command))
            transports.append(_handshake(spec, proxy, progress, abort))
            return transports, proxy
        hops = [resolve_hop(h, spec.ssh_config) for h in spec.proxy_jump.split(",")] if spec.proxy_jump else []
        chain = [*hops, spec]
        first = _tcp(chain[0].hostname, chain[0].port, chain[0].connect_timeout_s, abort)
        if events is not None:
            events.tcp_up.set()
        greeting = _first_bytes(first, chain[0], abort)
        sock: Carrier = first
        for index, hop in enumerate(chain):
            if index > 0:
                sock = _next_hop(chain[index - 1], transports[-1], hop)
            transports.append(_handshake(hop, sock, progress, abort, greeting if index == 0 else b""))
            if index == 0 and events is not None:
                events.first_hop_authenticated.set()
    except BaseException:
        for transport in reversed(transports):
            transport.close()
        if proxy is not None:
            proxy.close()
        raise
    return transports, proxy


def _next_hop(jump: TunnelSpec, transport: paramiko.Transport, hop: TunnelSpec) -> paramiko.Channel:
    """Open the channel from a ProxyJump hop to the next one, as `ssh -W` does."""
    try:
        return transport.open_channel(
            "direct-tcpip", (hop.hostname, hop.port), ("127.0.0.1", 0), timeout=hop.connect_timeout_s
        )
    except (paramiko.SSHException, OSError) as exc:
        # paramiko keeps the reason code's name ("Connect failed"), not the server's text.
        why = str(exc.text).lower() if isinstance(exc, paramiko.ChannelException) else quote_peer(str(exc))
        raise ConnectError(
            f"jump host {jump.hostname}:{jump.port} could not reach {hop.hostname}:{hop.port}: {why}",
            f"is {hop.hostname}:{hop.port} up and reachable from {jump.hostname}? tunneld keeps retrying",
        ) from exc


class ParamikoLink:
    """A live transport chain; keepalive requests that expect a reply tell when it is dead."""

    def __init__(
        self, spec: TunnelSpec, transports: list[paramiko.Transport], proxy: paramiko.ProxyCommand | None,
        forwarder: Forwarder, events: LinkEvents,
    ) -> None:  # fmt: skip
        self.spec = spec
        self.transports = transports
        self.transport = transports[-1]
        self.proxy = proxy
        self.forwarder = forwarder
        self.events = events
        self._lost = threading.Event()
        self._error: TunneldError | None = None
        self._closing = threading.Event()
        self._last_reply = time.monotonic()
        # Lost once count_max pings in a row went unanswered (plus half an interval for the reply's flight):
        # 3 s x 3 -> 10.5 s; OpenSSH's own check lands between 9 and 12 s.
        self._budget_s = spec.keepalive_interval_s * (spec.keepalive_count_max + 0.5)
        for target in (self._ping, self._watch):
            threading.Thread(target=target, name=f"link-{target.__name__}", daemon=True).start()

    def open_channel(
        self, forward: Forward, peer: tuple[str, int], window: int | None = None, timeout: float = OPEN_TIMEOUT_S
    ) -> Channel:
        """Open a direct-tcpip channel to the forward's target; a refusing target is a ConnectError."""
        target = forward.target
        assert target is not None and target.host is not None and target.port is not None  # check_supported
        try:
            return self.transport.open_channel(
                "direct-tcpip", (target.host, target.port), peer, window_size=window, timeout=timeout
            )
        except paramiko.ChannelException as exc:
            # paramiko keeps only the reason code ("Connect failed"), not the server's text.
            raise ConnectError(f"open failed: {str(exc.text).lower()} (the server could not reach the target)") from exc

    def open_probe(self, forward: Forward, timeout: float, settle: bool) -> Channel:
        """Open a channel to the forward's target for a health check (the channel open itself is the answer)."""
        try:
            channel = self.forwarder.probe(
                forward, lambda: self.open_channel(forward, ("127.0.0.1", 0), MIN_PROBE_WINDOW_BYTES, timeout)
            )
        except ConnectError as error:
            raise ConnectError(f"connection refused by {forward.target}") from error
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectError(
                f"no answer from {forward.target} within {timeout:g} s ({quote_peer(str(exc))})"
            ) from exc
        channel.settimeout(timeout)
        return channel

    def _ping(self) -> None:
        """Send keepalive@openssh.com with want_reply; any reply (even a refusal) proves the peer is alive.

        The first goes out at once: its round trip is what window growth needs to know.
        """
        wait_s = 0.0
        while not self._closing.wait(wait_s):
            wait_s = self.spec.keepalive_interval_s
            sent = time.monotonic()
            self.transport.global_request("keepalive@openssh.com", wait=True)
            if self.transport.is_active():
                self._last_reply = time.monotonic()
                self.forwarder.rtt_s = self._last_reply - sent

    def _watch(self) -> None:
        while not self._closing.wait(WATCH_S):
            if not all(t.is_active() for t in self.transports):
                self.lose(ConnectError(f"Connection to {self.spec.hostname} closed by remote host"))
            elif time.monotonic() - self._last_reply > self._budget_s:
                self.lose(ConnectError(f"Timeout, server {self.spec.hostname} not responding."))
            else:
                continue
            return

    def lose(self, error: TunneldError) -> None:
        """End the link with `error` (the supervisor reconnects when it is retryable)."""
        self._error = error
        self.forwarder.attach(None)  # new connections wait for the next link
        self._lost.set()
        self.events.changed.set()

    def wait(self, timeout: float) -> LinkLost | None:
        if self._lost.wait(timeout) and self._error is not None:
            return LinkLost(self._error)
        return None

    def close(self) -> None:
        self._closing.set()
        self.forwarder.attach(None)
        for transport in reversed(self.transports):
            transport.close()
        if self.proxy is not None:
            self.proxy.close()

    def stats(self) -> list[ForwardStatus]:
        return self.forwarder.stats()

    def settling(self) -> bool:
        return False

    def children(self) -> list[ChildProcess]:
        if self.proxy is None:
            return []
        import psutil

        pid = self.proxy.process.pid
        try:
            proc = psutil.Process(pid)
            return [ChildProcess(pid, proc.create_time(), "ProxyCommand", tuple(proc.cmdline()))]
        except psutil.Error:
            return []


def widen_window(channel: Channel, extra: int) -> None:
    """Grant the server `extra` more bytes on `channel` now (a CHANNEL_WINDOW_ADJUST beyond what was read)."""
    assert isinstance(channel, paramiko.Channel)
    with channel.lock:
        if channel.closed or not channel.active:
            return
        channel.in_window_size += extra
        channel.in_window_threshold = channel.in_window_size // 10
    message = paramiko.Message()
    message.add_byte(paramiko.common.cMSG_CHANNEL_WINDOW_ADJUST)
    message.add_int(channel.remote_chanid)
    message.add_int(extra)
    transport = channel.transport
    if transport is not None:  # paramiko has no public call to grant window beyond what was read
        transport._send_user_message(message)  # type: ignore[attr-defined]


class ParamikoEngine:
    """Runs the SSH connection in this process; keeps the local listeners bound across reconnects."""

    name = "paramiko"

    def __init__(self, hold_s: float = DEFAULT_HOLD_S) -> None:
        self.hold_s = hold_s
        self.forwarder: Forwarder | None = None
        self.demand = threading.Event()  # on demand: a client arrived while no link was attached

    # -- on demand: the listeners outlive links, so the link can be closed while nobody uses it -------

    def wanted(self) -> bool:
        """Return True when a client asked for a link since it was last brought up, or still waits for one."""
        return self.demand.is_set() or (self.forwarder is not None and self.forwarder.has_waiting())

    def busy(self) -> bool:
        """Return True while a connection is open, being opened, or waiting."""
        return self.forwarder is not None and self.forwarder.busy()

    def listening(self) -> list[ForwardStatus]:
        """Return the forwards' listeners and counters while no link is attached."""
        return self.forwarder.stats() if self.forwarder is not None else []

    def change_forwards(self, spec: TunnelSpec) -> None:
        """`tunneld reload`: the listeners follow the new forwards; the link and unchanged listeners stay."""
        check_supported(spec)
        if self.forwarder is not None:
            self.forwarder.update(spec)

    def change_settings(self, settings: HostSettings) -> None:
        """`tunneld reload`: how long a connection waits for a link."""
        self.hold_s = settings.hold_connections_s
        if self.forwarder is not None:
            self.forwarder.hold_s = settings.hold_connections_s

    def refuse_clients(self, refusing: bool) -> None:
        """While the host waits for credentials: keep the ports, close clients at once (they would wait in vain)."""
        if self.forwarder is not None:
            self.forwarder.refuse(refusing)

    def connect(self, spec: TunnelSpec, progress: ProgressCallback, events: LinkEvents) -> ParamikoLink:
        """Connect, verify, authenticate; bind the listeners on the first link; serve connections through it."""
        check_supported(spec)
        self.demand.clear()  # this attempt answers whoever asked; a failed one leaves only the waiting clients
        abort = Abort(events.stop)
        try:
            abort.check()
            transports, proxy = open_chain(spec, progress, abort, events)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            # Whatever the network does to a handshake is transient; the daemon must not die of it.
            abort.check()
            raise ConnectError(f"{spec.hostname}:{spec.port}: connection failed: {quote_peer(str(exc))}") from exc
        finally:
            abort.done()
        events.authenticated.set()
        if self.forwarder is not None and not self.forwarder.alive():
            self.forwarder.close()  # its loop died (logged): rebuild it rather than serve nothing
            self.forwarder = None
        if self.forwarder is None:
            forwarder = Forwarder(spec, self.hold_s, widen_window)
            forwarder.on_change = events.changed.set

            def demanded() -> None:
                self.demand.set()
                events.changed.set()

            forwarder.on_demand = demanded
            try:
                forwarder.bind()
            except BaseException:
                for transport in reversed(transports):
                    transport.close()
                raise
            self.forwarder = forwarder
        progress("listening")
        link = ParamikoLink(spec, transports, proxy, self.forwarder, events)
        self.forwarder.on_failure = lambda exc: link.lose(ConnectError(f"the forwarding loop failed: {exc}"))
        self.forwarder.attach(link.open_channel)
        # Every client that asked while this attempt ran is this link's now (attach took the waiting ones): a
        # demand left set would bring up another link, for nobody, as soon as this one closes for idleness.
        self.demand.clear()
        return link

    def close(self) -> None:
        """Release the listeners (the supervisor is stopping)."""
        if self.forwarder is not None:
            self.forwarder.close()
            self.forwarder = None
