"""Where OpenSSH listens for a local forward: the addresses, whether they reach the network, what is skipped.

`up` promises that *every* one of these addresses is held by the tunnel (DESIGN.md, "What `up`
promises"): both engines bind, verify and report exactly this plan.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from dataclasses import dataclass

from tunneld.config.spec import Forward, TunnelSpec

LOOPBACK = (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6))
WILDCARD = (("0.0.0.0", socket.AF_INET), ("::", socket.AF_INET6))


@dataclass(frozen=True)
class ListenPlan:
    """The addresses one forward listens on (TCP `ip`s, or one unix socket path), and what was left out."""

    forward: Forward
    ips: tuple[str, ...] = ()
    path: str | None = None
    skipped: tuple[str, ...] = ()

    @property
    def port(self) -> int:
        return self.forward.listen.port or 0

    @property
    def addresses(self) -> tuple[str, ...]:
        """Return the listen addresses as shown to users: `127.0.0.1:5000`, `[::1]:5000` or a socket path."""
        if self.path is not None:
            return (self.path,)
        return tuple(format_address(ip, self.port) for ip in self.ips)

    @property
    def exposed(self) -> bool:
        """Return True when any listen address is reachable from other machines (not loopback)."""
        return any(not ipaddress.ip_address(ip).is_loopback for ip in self.ips)

    def describe(self) -> str:
        """Return `127.0.0.1:5000, [::1]:5000 -> localhost:5000`, marked when reachable from the network."""
        text = f"{', '.join(self.addresses)} -> {self.forward.target or 'SOCKS'}"
        return text + ("  (reachable from the network)" if self.exposed else "")


@functools.lru_cache(maxsize=4)
def format_address(ip: str, port: int) -> str:
    """Return `ip:port`, bracketing IPv6 addresses."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def name_for_lookup(host: str) -> str | bytes:
    """Return `host` as getaddrinfo takes it most cheaply: an ASCII name as bytes.

    getaddrinfo passes every str through the idna codec, whose tables (unicodedata, stringprep) would
    stay in every supervisor (~0.5 MiB); an ASCII name needs no conversion. Others stay str.
    """
    return host.encode() if host.isascii() else host


def family_available(family: int) -> bool:
    """Return True when this machine can listen on the family's loopback (IPv6 may be disabled)."""
    address = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((address, 0))
    except OSError:
        return False
    return True


def _families(address_family: str) -> tuple[int, ...]:
    return {"inet": (socket.AF_INET,), "inet6": (socket.AF_INET6,)}.get(
        address_family, (socket.AF_INET, socket.AF_INET6)
    )


def plan_forward(forward: Forward, gateway_ports: bool, address_family: str = "any") -> ListenPlan:
    """Return where OpenSSH's client would listen for `forward` (channels.c, channel_fwd_bind_addr).

    No bind address: loopback, or every interface under GatewayPorts yes. `localhost`: loopback of
    each family. `*` or an empty address (`:5000`): every interface. Anything else: that address.
    A family this machine cannot listen on is skipped, as ssh skips it.
    """
    listen = forward.listen
    if listen.path is not None:
        return ListenPlan(forward, path=listen.path)
    host = listen.host
    if host in ("", "*") or (host is None and gateway_ports):
        candidates: tuple[tuple[str, int], ...] = WILDCARD
    elif host in (None, "localhost"):
        candidates = LOOPBACK
    else:
        candidates = _resolve(str(host), listen.port or 0)
    wanted = _families(address_family)
    ips: list[str] = []
    skipped: list[str] = []
    for ip, family in candidates:
        if family not in wanted:
            continue
        if family_available(family):
            ips.append(ip)
        else:
            skipped.append(f"{format_address(ip, listen.port or 0)} (this machine has no IPv6)")
    return ListenPlan(forward, ips=tuple(ips), skipped=tuple(skipped))


def _resolve(host: str, port: int) -> tuple[tuple[str, int], ...]:
    try:
        infos = socket.getaddrinfo(name_for_lookup(host), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return ((host, socket.AF_INET6 if ":" in host else socket.AF_INET),)
    found: list[tuple[str, int]] = []
    for family, _, _, _, sockaddr in infos:
        item = (str(sockaddr[0]), int(family))
        if item not in found:
            found.append(item)
    return tuple(found)


def plan_spec(spec: TunnelSpec) -> tuple[ListenPlan, ...]:
    """Return the listen plan of each of the spec's local forwards, in order."""
    gateway = spec.option("gatewayports", "no") in ("yes", "true")
    family = spec.option("addressfamily", "any")
    return tuple(plan_forward(forward, gateway, family) for forward in spec.local_forwards)
