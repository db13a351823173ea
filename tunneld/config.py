"""Resolve an ssh_config host into a TunnelSpec through OpenSSH's own `ssh -G`; find the hosts a config names."""

from __future__ import annotations

import dataclasses
import fnmatch
import getpass
import glob
import os
import re
import shlex
import subprocess
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tunneld.errors import ConfigError, NoForwardsError
from tunneld.paths import find_program, is_valid_host, validate_host
from tunneld.spec import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_KEEPALIVE_COUNT_MAX,
    DEFAULT_KEEPALIVE_INTERVAL_S,
    TunnelSpec,
    parse_forwards,
    parse_jump,
)
from tunneld.tokens import expand_tokens, local_home, token_table

SSH_G_TIMEOUT_S = 10.0
USER_CONFIG = Path("~/.ssh/config")
SYSTEM_CONFIG = Path("/etc/ssh/ssh_config")
_FILE_LINE_RE = re.compile(r"^(?P<file>.+?):? line (?P<line>\d+): (?P<reason>.+)$")
_ADD_FORWARD_HINT = "add a line under 'Host {alias}', for example:  LocalForward 5000 localhost:5000"


MAX_JUMP_DEPTH = 8  # a chain of ProxyJumps deeper than this (or a loop) is not followed for probing


@dataclass(frozen=True)
class Resolver:
    """Where the (keyword, value) lines of a host come from: `ssh -G`, or tunneld's reader where no ssh exists."""

    name: str
    read: Callable[[str, str | None], list[tuple[str, str]]]


def default_resolver() -> Resolver:
    """Return `ssh -G` when an OpenSSH client is on PATH, else the fallback reader (which `show` names)."""
    return SSH_G if ssh_binary() is not None else fallback_resolver()


def fallback_resolver() -> Resolver:
    """Return tunneld's own ssh_config reader, used where no `ssh` binary exists."""
    from tunneld.configfallback import RESOLVER, config_pairs

    return Resolver(RESOLVER, lambda alias, ssh_config: config_pairs(alias, ssh_config, local_home()))


def resolve_hop(hop: str, ssh_config: str | None, depth: int = 0, resolver: Resolver | None = None) -> TunnelSpec:
    """Resolve one ProxyJump hop (`[user@]host[:port]` or `ssh://[user@]host[:port]`, an alias or not) as ssh
    does: `ssh -G` of the host, with the user and port the hop names taking precedence."""
    hop = hop.removeprefix("ssh://")
    user, _, rest = hop.rpartition("@")
    host, port = parse_jump(rest, default_port=0)
    spec = resolve_host(host, ssh_config, require_forwards=False, depth=depth, resolver=resolver)
    return dataclasses.replace(spec, user=user or spec.user, port=port or spec.port)


def first_jump_hop(
    proxy_jump: str, ssh_config: str | None, depth: int, resolver: Resolver | None = None
) -> tuple[str, int] | None:
    """Return where ssh connects first for `ProxyJump proxy_jump`: the first jump's own first hop (it may have
    a ProxyJump of its own), or None behind a ProxyCommand, past MAX_JUMP_DEPTH, or when it does not resolve."""
    if depth >= MAX_JUMP_DEPTH:
        return None
    try:
        return resolve_hop(proxy_jump.split(",", maxsplit=1)[0].strip(), ssh_config, depth + 1, resolver).first_hop()
    except (ConfigError, ValueError):
        return None


def ssh_binary() -> str | None:
    """Return the path of the OpenSSH client on PATH, or None when there is none."""
    return find_program("ssh")


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
        raise config_error_from_stderr(done.stderr, ssh_config, alias)
    pairs = []
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" ")
        pairs.append((key.lower(), value))
    return pairs


def config_error_from_stderr(stderr: str, ssh_config: str | None, alias: str = "HOST") -> ConfigError:
    """Turn OpenSSH's complaint about a config file into a ConfigError with `file line N: reason`."""
    command = shlex.join(["ssh", "-G", *(["-F", ssh_config] if ssh_config else []), alias])
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        match = _FILE_LINE_RE.match(line)
        if match:
            return ConfigError(
                f"{match['file']} line {match['line']}: {match['reason']}",
                f"fix that line; `{command}` reports the same error",
            )
    where = ssh_config or str(USER_CONFIG)
    reason = lines[0] if lines else "ssh -G failed without a message"
    return ConfigError(f"cannot read ssh_config {where}: {reason}", f"check the file with `{command}`")


def resolve_host(
    alias: str,
    ssh_config: str | None = None,
    require_forwards: bool = True,
    depth: int = 0,
    resolver: Resolver | None = None,
) -> TunnelSpec:
    """Return the TunnelSpec of `alias` exactly as `ssh` would resolve it (a jump host needs no forwards;
    `depth`: how many ProxyJumps deep this host is, when it is one; `resolver`: default_resolver())."""
    name = validate_host(alias) if require_forwards else alias
    resolver = resolver or default_resolver()
    pairs = resolver.read(name, ssh_config)
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
    proxy_jump, proxy_command = optional("proxyjump"), optional("proxycommand")
    jump_first_hop = (
        first_jump_hop(proxy_jump, ssh_config, depth, resolver) if proxy_jump and not proxy_command else None
    )
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
        proxy_jump=proxy_jump,
        jump_first_hop=jump_first_hop,
        proxy_command=proxy_command,
        host_key_alias=optional("hostkeyalias"),
        strict_host_key_checking=normalize_strict(one("stricthostkeychecking", "ask")),
        user_known_hosts_files=tuple(one("userknownhostsfile").split()),  # ssh -G prints them expanded
        global_known_hosts_files=tuple(one("globalknownhostsfile").split()),
        keepalive_interval_s=interval or DEFAULT_KEEPALIVE_INTERVAL_S,
        keepalive_count_max=int(one("serveralivecountmax", str(DEFAULT_KEEPALIVE_COUNT_MAX))),
        keepalive_from_user=interval > 0,
        connect_timeout_s=int(timeout) if timeout else DEFAULT_CONNECT_TIMEOUT_S,
        connect_timeout_from_user=timeout is not None,
        ssh_config=ssh_config,
        resolver=resolver.name,
        options=tuple(pairs),
    )


SSH_G = Resolver("ssh -G", run_ssh_g)


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


def list_hosts(ssh_config: str | None = None) -> tuple[list[TunnelSpec], list[str]]:
    """Return the specs of every literally named host in the ssh_config that has forwards, and why others
    were skipped: an alias tunneld cannot use as a file name is skipped, never a reason to fail them all."""
    names: list[str] = []
    for patterns in host_patterns(config_files(ssh_config)):
        for pattern in patterns:
            if not any(c in pattern for c in "*?!") and pattern not in names:
                names.append(pattern)
    usable = [name for name in names if is_valid_host(name)]
    skipped = [
        f"skipping Host {name!r}: tunneld names files after hosts and uses letters, digits and . _ - @ + only"
        for name in names
        if not is_valid_host(name)
    ]

    def try_resolve(name: str) -> TunnelSpec | None:
        try:
            return resolve_host(name, ssh_config)
        except NoForwardsError:
            return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        specs = list(pool.map(try_resolve, usable))
    return [spec for spec in specs if spec is not None], skipped
