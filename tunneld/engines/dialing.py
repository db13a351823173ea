"""How the paramiko engine reaches a host, up to an authenticated transport: TCP to the first hop, its first
bytes, the handshake with OpenSSH's algorithms, the host key and the login, then each ProxyJump hop in turn (or a
ProxyCommand).

Separate from the engine because this part only dials: it ends with the transports of a chain (or a typed
error for whatever the network or the server did), and an attempt cancelled meanwhile (Abort) ends at once;
what a live link then does (keepalive, channels, the forwarder) is engines/paramiko.py.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import TypeVar

import paramiko

from tunneld.config.resolve import resolve_hop
from tunneld.config.spec import TunnelSpec
from tunneld.config.tokens import expand_tokens, token_table
from tunneld.engines import algorithms
from tunneld.engines.link import LinkEvents, ProgressCallback
from tunneld.engines.sshkeys import authenticate, preferred_key_types, verify_host_key
from tunneld.errors import ConfigError, ConnectError, HandshakeStalledError, RefusedByServerError, UnreachableError
from tunneld.safetext import quote_peer

_T = TypeVar("_T")

ABORT_POLL_S = 0.05
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
BANNER_PEEK_BYTES = 256
# A server silent for all of ConnectTimeout may wait for our banner first (RFC 4253 lets it): paramiko sends
# ours, then gives the server this long for its own.
SILENT_SERVER_GRACE_S = 2.0
_STALLED_HINT = (
    "the port accepts TCP but does not complete an SSH handshake: a frozen or overloaded sshd, or another service "
    "on that port; tunneld keeps one attempt pending"
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
