"""Resolve an ssh_config host into a TunnelSpec, through OpenSSH's own `ssh -G`."""

from __future__ import annotations

import dataclasses
import fnmatch
import getpass
import glob
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunneld.errors import ConfigError, NoForwardsError
from tunneld.paths import validate_host

SSH_G_TIMEOUT_S = 10.0
DEFAULT_KEEPALIVE_INTERVAL_S = 3
DEFAULT_KEEPALIVE_COUNT_MAX = 3
DEFAULT_CONNECT_TIMEOUT_S = 10
USER_CONFIG = Path("~/.ssh/config")
SYSTEM_CONFIG = Path("/etc/ssh/ssh_config")
LOCAL = "local"
REMOTE = "remote"
DYNAMIC = "dynamic"
_FILE_LINE_RE = re.compile(r"^(?P<file>.+?):? line (?P<line>\d+): (?P<reason>.+)$")
_ADD_FORWARD_HINT = "add a line under 'Host {alias}', for example:  LocalForward 5000 localhost:5000"


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
        """Return the (host, port) tunneld's TCP probe should try, or None behind a ProxyCommand."""
        if self.proxy_command:
            return None
        if self.proxy_jump:
            return parse_jump(self.proxy_jump.split(",")[0], default_port=22)
        return (self.hostname, self.port)

    @property
    def known_hosts_name(self) -> str:
        """The name OpenSSH looks up in known_hosts: HostKeyAlias as it is, else HostName (`[name]:port` off 22)."""
        if self.host_key_alias:
            return self.host_key_alias
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    def option(self, key: str, default: str = "") -> str:
        """Return the first value `ssh -G` printed for `key` (lower case)."""
        return next((value for name, value in self.options if name == key), default)

    def to_dict(self) -> dict[str, object]:
        """Return the spec as JSON-ready data (`tunneld show --json`)."""
        data = asdict(self)
        data.pop("options")
        data["forwards"] = [f.to_dict() for f in self.forwards]
        return data


def resolve_hop(hop: str, ssh_config: str | None) -> TunnelSpec:
    """Resolve one ProxyJump hop (`[user@]host[:port]`, an alias or not) through ssh_config."""
    hop = hop.removeprefix("ssh://")
    user, _, rest = hop.rpartition("@")
    host, port = parse_jump(rest, default_port=0)
    spec = resolve_host(host, ssh_config, require_forwards=False)
    return dataclasses.replace(spec, user=user or spec.user, port=port or spec.port)


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


def ssh_binary() -> str | None:
    """Return the path of the OpenSSH client, or None when there is none."""
    return shutil.which("ssh")


def expand_tokens(value: str, tokens: dict[str, str]) -> str:
    """Expand `~` and `%x` tokens the way ssh expands IdentityFile and friends."""
    if value == "~" or value.startswith("~/"):
        value = tokens["d"] + value[1:]
    elif value.startswith("~"):
        name, _, rest = value[1:].partition("/")
        try:
            value = os.path.join(pwd.getpwnam(name).pw_dir, rest)
        except KeyError as exc:
            raise ConfigError(f"no such user {name!r} in {value!r}") from exc
    out = []
    i = 0
    while i < len(value):
        char = value[i]
        if char == "%" and i + 1 < len(value):
            key = value[i + 1]
            if key == "C":
                out.append(connection_hash(tokens))
                i += 2
                continue
            if key not in tokens:
                raise ConfigError(f"unknown token %{key} in {value!r}", "see TOKENS in `man ssh_config`")
            out.append(tokens[key])
            i += 2
            continue
        out.append(char)
        i += 1
    return "".join(out)


def local_home() -> str:
    """Return the home directory ssh uses for `~` and `%d`: the passwd entry's, not $HOME."""
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return os.path.expanduser("~")


def token_table(alias: str, hostname: str, port: int, user: str) -> dict[str, str]:
    """Return the values of ssh's `%` tokens for one connection."""
    local_host = socket.gethostname()
    local_user = getpass.getuser()
    return {
        "%": "%",
        "d": local_home(),
        "h": hostname,
        "i": str(os.getuid()),
        "L": local_host.split(".")[0],
        "l": local_host,
        "n": alias,
        "p": str(port),
        "r": user,
        "u": local_user,
    }


def connection_hash(tokens: dict[str, str]) -> str:
    """Return ssh's %C: SHA-1 of %l%h%p%r (hashlib is imported here: loading OpenSSL costs ~4 MiB of RSS)."""
    import hashlib

    material = tokens["l"] + tokens["h"] + tokens["p"] + tokens["r"]
    return hashlib.sha1(material.encode()).hexdigest()  # noqa: S324 - ssh's own hash, not security


def run_ssh_g(alias: str, ssh_config: str | None) -> list[tuple[str, str]]:
    """Run `ssh -G` and return its (keyword, value) lines; malformed configs raise ConfigError."""
    ssh = ssh_binary()
    if ssh is None:
        raise ConfigError(
            "no OpenSSH client ('ssh') found on PATH; tunneld resolves ssh_config with it",
            "install it (Debian/Ubuntu: apt-get install openssh-client)",
        )
    argv = [ssh, "-G"]
    if ssh_config:
        argv += ["-F", ssh_config]
    argv += ["--", alias]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=SSH_G_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ConfigError(
            f"`ssh -G {alias}` did not finish within {SSH_G_TIMEOUT_S:.0f} s",
            "a Match exec or canonicalization in your ssh_config may hang; run `ssh -G HOST` to see",
        ) from exc
    if done.returncode != 0:
        raise config_error_from_stderr(done.stderr, ssh_config)
    pairs = []
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" ")
        pairs.append((key.lower(), value))
    return pairs


def config_error_from_stderr(stderr: str, ssh_config: str | None) -> ConfigError:
    """Turn OpenSSH's complaint about a config file into a ConfigError with `file line N: reason`."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        match = _FILE_LINE_RE.match(line)
        if match:
            return ConfigError(
                f"{match['file']} line {match['line']}: {match['reason']}",
                "fix that line; `ssh -G HOST` reports the same error",
            )
    where = ssh_config or str(USER_CONFIG)
    reason = lines[0] if lines else "ssh -G failed without a message"
    return ConfigError(f"cannot read ssh_config {where}: {reason}", "check the file with `ssh -G HOST`")


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


def resolve_host(alias: str, ssh_config: str | None = None, require_forwards: bool = True) -> TunnelSpec:
    """Return the TunnelSpec of `alias` exactly as `ssh` would resolve it (a jump host needs no forwards)."""
    name = validate_host(alias) if require_forwards else alias
    if ssh_binary() is not None:
        pairs, resolver = run_ssh_g(name, ssh_config), "ssh -G"
    else:
        from tunneld.configfallback import RESOLVER, paramiko_pairs

        pairs, resolver = paramiko_pairs(name, ssh_config, local_home()), RESOLVER
    values: dict[str, list[str]] = {}
    for key, value in pairs:
        values.setdefault(key, []).append(value)

    def one(key: str, default: str = "") -> str:
        return values.get(key, [default])[0]

    def optional(key: str) -> str | None:
        value = one(key, "none")
        return None if value.lower() == "none" else value

    hostname, port, user = one("hostname", alias), int(one("port", "22")), one("user", getpass.getuser())
    tokens = token_table(alias, hostname, port, user)
    forwards = parse_forwards(pairs)
    if not forwards and require_forwards:
        raise no_forwards_error(alias, ssh_config)
    interval = int(one("serveraliveinterval", "0"))
    timeout = optional("connecttimeout")
    agent = values.get("identityagent", [None])[0]  # "none" (no agent) differs from unset (SSH_AUTH_SOCK)
    return TunnelSpec(
        alias=alias,
        hostname=hostname,
        port=port,
        user=user,
        forwards=forwards,
        identity_files=tuple(expand_tokens(v, tokens) for v in values.get("identityfile", []) if v != "none"),
        certificate_files=tuple(expand_tokens(v, tokens) for v in values.get("certificatefile", []) if v != "none"),
        identities_only=one("identitiesonly", "no") == "yes",
        identity_agent=expand_tokens(agent, tokens) if agent and agent.lower() != "none" else agent,
        proxy_jump=optional("proxyjump"),
        proxy_command=optional("proxycommand"),
        host_key_alias=optional("hostkeyalias"),
        strict_host_key_checking=normalize_strict(one("stricthostkeychecking", "ask")),
        # ssh -G prints these already expanded; paramiko's parser does not expand them.
        user_known_hosts_files=tuple(
            v if resolver == "ssh -G" else expand_tokens(v, tokens) for v in one("userknownhostsfile").split()
        ),
        global_known_hosts_files=tuple(one("globalknownhostsfile").split()),
        keepalive_interval_s=interval or DEFAULT_KEEPALIVE_INTERVAL_S,
        keepalive_count_max=int(one("serveralivecountmax", str(DEFAULT_KEEPALIVE_COUNT_MAX))),
        keepalive_from_user=interval > 0,
        connect_timeout_s=int(timeout) if timeout else DEFAULT_CONNECT_TIMEOUT_S,
        connect_timeout_from_user=timeout is not None,
        ssh_config=ssh_config,
        resolver=resolver,
        options=tuple(pairs),
    )


def normalize_strict(value: str) -> str:
    """Map ssh -G's spellings of StrictHostKeyChecking onto yes | accept-new | no | ask."""
    return {"true": "yes", "false": "no", "off": "no"}.get(value.lower(), value.lower())


def no_forwards_error(alias: str, ssh_config: str | None) -> NoForwardsError:
    """Explain a host without forwards, telling an unknown alias apart from a known one."""
    files = config_files(ssh_config)
    shown = ", ".join(str(f) for f in files) or (ssh_config or str(USER_CONFIG))
    hint = _ADD_FORWARD_HINT.format(alias=alias)
    if not any(host_matches(alias, patterns) for patterns in host_patterns(files)):
        return NoForwardsError(
            f"no 'Host {alias}' entry in {shown}",
            f"add one, for example:\n    Host {alias}\n      HostName <server>\n      LocalForward 5000 localhost:5000",
        )
    return NoForwardsError(f"host {alias} has no LocalForward, RemoteForward or DynamicForward in {shown}", hint)


def config_files(ssh_config: str | None) -> list[Path]:
    """Return the ssh_config files ssh reads (the -F file, else the user's and the system's), with Includes."""
    roots = [Path(ssh_config)] if ssh_config else [Path(local_home()) / ".ssh" / "config", SYSTEM_CONFIG]
    seen: list[Path] = []
    for root in roots:
        _collect_includes(root, seen, depth=0)
    return seen


def _collect_includes(path: Path, seen: list[Path], depth: int) -> None:
    if depth > 16 or path in seen or not path.is_file():
        return
    seen.append(path)
    base = Path(local_home()) / ".ssh" if path != SYSTEM_CONFIG else SYSTEM_CONFIG.parent
    for words in _config_lines(path):
        if words[0].lower() == "include":
            for pattern in words[1:]:
                expanded = local_home() + pattern[1:] if pattern.startswith("~/") else pattern
                full = expanded if os.path.isabs(expanded) else str(base / expanded)
                for match in sorted(glob.glob(full)):
                    _collect_includes(Path(match), seen, depth + 1)


def _config_lines(path: Path) -> Iterable[list[str]]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.replace("=", " ", 1) if "=" in line.split(None, 1)[0] else line
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            words = line.split()
        if words:
            yield words


def host_patterns(files: Sequence[Path]) -> list[list[str]]:
    """Return the pattern lists of every `Host` line (and `Match [original]host`) in `files`."""
    found = []
    for path in files:
        for words in _config_lines(path):
            keyword = words[0].lower()
            if keyword == "host":
                found.append(words[1:])
            elif keyword == "match":
                for i, word in enumerate(words[1:-1], start=1):
                    if word.lower() in ("host", "originalhost"):
                        found.append(words[i + 1].split(","))
    return found


def host_matches(alias: str, patterns: Sequence[str]) -> bool:
    """Match `alias` against one Host line's patterns as ssh does (negations veto)."""
    matched = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if fnmatch.fnmatchcase(alias, pattern.lstrip("!")):
            if negated:
                return False
            matched = True
    return matched


def list_hosts(ssh_config: str | None = None) -> list[TunnelSpec]:
    """Return the specs of every literally named host in the ssh_config that has forwards."""
    names: list[str] = []
    for patterns in host_patterns(config_files(ssh_config)):
        for pattern in patterns:
            if not any(c in pattern for c in "*?!") and pattern not in names:
                names.append(pattern)

    def try_resolve(name: str) -> TunnelSpec | None:
        try:
            return resolve_host(name, ssh_config)
        except NoForwardsError:
            return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        specs = list(pool.map(try_resolve, names))
    return [spec for spec in specs if spec is not None]
