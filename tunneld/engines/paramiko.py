"""The paramiko engine: the SSH connection in-process (ProxyJump chain, host keys, auth, keepalive).

Its listeners live in a Forwarder that outlives each link, so connections made during an
outage wait for the next link instead of being refused. How a link is dialed, up to its
authenticated transports, is engines/dialing.py.
"""

from __future__ import annotations

import logging
import threading
import time

import paramiko

from tunneld.config.settings import HostSettings
from tunneld.config.spec import Forward, TunnelSpec
from tunneld.engines.dialing import Abort, open_chain
from tunneld.engines.forwarding import DEFAULT_HOLD_S, Forwarder, unsupported_forwards
from tunneld.engines.link import ChildProcess, ForwardStatus, LinkEvents, LinkLost, ProgressCallback
from tunneld.engines.pump import Channel
from tunneld.errors import ConfigError, ConnectError, TunneldError
from tunneld.safetext import quote_peer

log = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 15.0
MIN_PROBE_WINDOW_BYTES = 64 * 1024  # a health check reads a status line, nothing more
WATCH_S = 0.25


def check_supported(spec: TunnelSpec) -> None:
    """Refuse forwards this engine does not implement, pointing at the engine that does."""
    for forward in unsupported_forwards(spec):
        raise ConfigError(
            f"the paramiko engine supports LocalForward to host:port only, not {forward}",
            "use --engine openssh for RemoteForward, DynamicForward and unix-socket targets",
        )


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
