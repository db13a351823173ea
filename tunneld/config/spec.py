"""What a host's tunnel is: its forwards (parsed from `ssh -G`'s lines) and the immutable TunnelSpec."""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from tunneld.state.paths import local_home

DEFAULT_KEEPALIVE_INTERVAL_S = 3
DEFAULT_KEEPALIVE_COUNT_MAX = 3
DEFAULT_CONNECT_TIMEOUT_S = 10
# The IdentityFiles ssh tries when ssh_config names none (`ssh -G` lists them all the same).
DEFAULT_IDENTITY_NAMES = ("id_rsa", "id_ecdsa", "id_ecdsa_sk", "id_ed25519", "id_ed25519_sk", "id_xmss", "id_dsa")
LOCAL = "local"
REMOTE = "remote"
DYNAMIC = "dynamic"


@dataclass(frozen=True)
class Endpoint:
    """One side of a forward: a host and port, or a unix socket path."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse `ssh -G`'s form of an endpoint: `5000`, `[h]:5000`, `h:5000` or `/path`."""
        if text.startswith("["):
            host, _, port = text[1:].partition("]:")
            return cls(host=host, port=int(port))
        if "/" in text:
            return cls(path=text)
        if text.isdigit():
            return cls(port=int(text))
        host, _, port = text.rpartition(":")
        return cls(host=host or None, port=int(port))

    def __str__(self) -> str:
        if self.path is not None:
            return self.path
        host = "*" if self.host == "" else self.host or "localhost"  # `:5000` means every interface
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Forward:
    """One LocalForward, RemoteForward or DynamicForward of a host."""

    kind: str
    listen: Endpoint
    target: Endpoint | None = None

    def __str__(self) -> str:
        if self.kind == DYNAMIC:
            return f"{self.listen} (SOCKS)"
        arrow = "->" if self.kind == LOCAL else "<-"
        where = "remote " if self.kind == REMOTE else ""
        return f"{where}{self.listen} {arrow} {self.target}"

    def to_dict(self) -> dict[str, object]:
        """Return the forward as JSON-ready data."""
        data: dict[str, object] = {"kind": self.kind, "listen": asdict(self.listen), "text": str(self)}
        data["target"] = asdict(self.target) if self.target else None
        return data


@dataclass(frozen=True)
class TunnelSpec:
    """Everything needed to bring up and keep up one host's forwards (immutable)."""

    alias: str
    hostname: str
    port: int
    user: str
    forwards: tuple[Forward, ...]
    identity_files: tuple[str, ...] = ()
    certificate_files: tuple[str, ...] = ()
    identities_only: bool = False
    identity_agent: str | None = None
    proxy_jump: str | None = None
    # Where ssh connects first for a ProxyJump: the first jump resolved as ssh resolves it (its own
    # HostName, Port and ProxyJump, via `ssh -G`); None when that hop is reached through a ProxyCommand.
    jump_first_hop: tuple[str, int] | None = None
    proxy_command: str | None = None
    host_key_alias: str | None = None
    strict_host_key_checking: str = "ask"
    user_known_hosts_files: tuple[str, ...] = ()
    global_known_hosts_files: tuple[str, ...] = ()
    keepalive_interval_s: int = DEFAULT_KEEPALIVE_INTERVAL_S
    keepalive_count_max: int = DEFAULT_KEEPALIVE_COUNT_MAX
    keepalive_from_user: bool = False
    connect_timeout_s: int = DEFAULT_CONNECT_TIMEOUT_S
    connect_timeout_from_user: bool = False
    ssh_config: str | None = None
    resolver: str = "ssh -G"
    options: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @property
    def local_forwards(self) -> tuple[Forward, ...]:
        """Forwards that listen on this machine (LocalForward and DynamicForward)."""
        return tuple(f for f in self.forwards if f.kind in (LOCAL, DYNAMIC))

    def first_hop(self) -> tuple[str, int] | None:
        """Return the (host, port) ssh connects to first (what a probe tries), or None behind a ProxyCommand."""
        if self.proxy_command:
            return None
        if self.proxy_jump:
            return self.jump_first_hop
        return (self.hostname, self.port)

    @property
    def known_hosts_name(self) -> str:
        """The name OpenSSH looks up in known_hosts: HostKeyAlias as it is, else HostName (`[name]:port` off 22)."""
        if self.host_key_alias:
            return self.host_key_alias
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    @property
    def ssh_command(self) -> str:
        """The ssh command that tests this very config by hand: `ssh -F FILE HOST` when -F was used."""
        return shlex.join(["ssh", *(["-F", self.ssh_config] if self.ssh_config else []), self.alias])

    @property
    def remove_key_command(self) -> str:
        """The ssh-keygen command that removes this host's saved key from the known_hosts file ssh uses."""
        files = [f for f in self.user_known_hosts_files if f.lower() != "none"]
        custom = files and os.path.expanduser(files[0]) != os.path.join(local_home(), ".ssh", "known_hosts")
        return shlex.join(["ssh-keygen", *(["-f", files[0]] if custom else []), "-R", self.known_hosts_name])

    def missing_identity_files(self) -> tuple[str, ...]:
        """Return the IdentityFiles ssh_config names explicitly that do not exist (ssh's defaults are not named)."""
        defaults = default_identity_files()
        if set(self.identity_files) <= defaults:
            return ()
        return tuple(f for f in self.identity_files if f not in defaults and not os.path.exists(f))

    def option(self, key: str, default: str = "") -> str:
        """Return the first value `ssh -G` printed for `key` (lower case)."""
        return next((value for name, value in self.options if name == key), default)

    def to_dict(self) -> dict[str, object]:
        """Return the spec as JSON-ready data (`tunneld show --json`)."""
        data = asdict(self)
        data.pop("options")
        data["forwards"] = [f.to_dict() for f in self.forwards]
        return data


def default_identity_files() -> frozenset[str]:
    """Return the IdentityFiles ssh tries when ssh_config names none (`ssh -G` lists them all the same)."""
    home = local_home()
    return frozenset(os.path.join(home, ".ssh", name) for name in DEFAULT_IDENTITY_NAMES)


def parse_forwards(pairs: Sequence[tuple[str, str]]) -> tuple[Forward, ...]:
    """Build Forwards from `ssh -G` lines, dropping the ghost DynamicForwards of ssh 9.2.

    ssh -G 9.2 prints each LocalForward that involves a unix socket a second time as a
    `dynamicforward` line naming its listen side; those are not real SOCKS forwards.
    """
    forwards: list[Forward] = []
    ghosts: list[str] = []
    for key, value in pairs:
        if key in ("localforward", "remoteforward"):
            listen, _, target = value.partition(" ")
            kind = LOCAL if key == "localforward" else REMOTE
            forwards.append(Forward(kind, Endpoint.parse(listen), Endpoint.parse(target) if target else None))
            if kind == LOCAL and ("/" in listen or "/" in target):
                ghosts.append(listen)
    for key, value in pairs:
        if key == "dynamicforward":
            if value in ghosts:
                ghosts.remove(value)
                continue
            forwards.append(Forward(DYNAMIC, Endpoint.parse(value)))
    return tuple(forwards)


def parse_jump(hop: str, default_port: int) -> tuple[str, int]:
    """Return (host, port) of one ProxyJump hop such as `user@bastion:2222` or `[::1]:22`."""
    hop = hop.split("@", 1)[-1]
    if hop.startswith("ssh://"):
        hop = hop[len("ssh://") :]
    if hop.startswith("["):
        host, _, port = hop[1:].partition("]")
        return host, int(port.lstrip(":") or default_port)
    host, _, port = hop.partition(":")
    return host, int(port or default_port)
