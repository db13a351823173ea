"""Resolve an ssh_config host into a TunnelSpec through OpenSSH's own `ssh -G`; find the hosts a config names."""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shlex
import subprocess
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tunneld.config.spec import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_KEEPALIVE_COUNT_MAX,
    DEFAULT_KEEPALIVE_INTERVAL_S,
    TunnelSpec,
    parse_forwards,
    parse_jump,
)
from tunneld.config.syntax import LineError, forward_hint, matches, split_keyword, split_words
from tunneld.config.tokens import expand_tokens, local_user, token_table
from tunneld.errors import ConfigError, NoForwardsError
from tunneld.state.paths import find_program, is_valid_host, local_home, validate_host

SSH_G_TIMEOUT_S = 10.0
SYSTEM_CONFIG = Path("/etc/ssh/ssh_config")
_FILE_LINE_RE = re.compile(r"^(?P<file>.+?):? line (?P<line>\d+): (?P<reason>.+)$")
_MATCH_HOST = ("host", "originalhost")
_TTY_NOTE = "Pseudo-terminal will not be allocated"  # ssh -G 9.2 says it whenever stdin is no terminal: not a reason


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
    from tunneld.config.fallback import RESOLVER, config_pairs

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
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not line.startswith(_TTY_NOTE)]
    for line in lines:
        match = _FILE_LINE_RE.match(line)
        if match:
            return ConfigError(
                f"{match['file']} line {match['line']}: {match['reason']}",
                forward_hint(_line_of(match["file"], int(match["line"])))
                or f"fix that line; `{command}` reports the same error",
            )
    where = ssh_config or "~/.ssh/config"
    reason = lines[0] if lines else "ssh -G failed without a message"
    return ConfigError(f"cannot read ssh_config {where}: {reason}", f"check the file with `{command}`")


def _line_of(path: str, number: int) -> str:
    """Return line `number` of `path` ("" when it cannot be read): the line ssh complained about."""
    try:
        with open(path, "rb") as handle:
            lines = handle.read(1024 * 1024).decode(errors="replace").splitlines()
    except OSError:
        return ""
    return lines[number - 1] if 0 < number <= len(lines) else ""


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

    hostname, port, user = one("hostname", alias), int(one("port", "22")), one("user", local_user())
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
    """Explain a host without forwards: one that no Host entry names (only wildcards match it, or nothing does:
    perhaps a typo of a name the config has) apart from one whose entry has no forwards; name the files read."""
    import difflib

    files = config_files(ssh_config)
    shown = describe_sources(ssh_config)
    lines = host_lines(files)
    if any(matches(alias, patterns) and alias in patterns for patterns in lines):
        return NoForwardsError(
            f"host {alias} has no LocalForward, RemoteForward or DynamicForward in {shown}",
            f"add a line under 'Host {alias}', for example:  LocalForward 5000 localhost:5000",
        )
    wildcards = [" ".join(patterns) for patterns in lines if matches(alias, patterns)]
    only = f" (only {', '.join(repr('Host ' + w) for w in wildcards)} match{'es' * (len(wildcards) == 1)} it)"
    close = difflib.get_close_matches(alias, literal_hosts(lines), n=3)
    add = f"add one, for example:\n    Host {alias}\n      HostName <server>\n      LocalForward 5000 localhost:5000"
    hint = f"did you mean {' or '.join(close)}? (`tunneld list` shows the hosts with forwards) If not, {add}"
    return NoForwardsError(f"no 'Host {alias}' entry in {shown}" + (only if wildcards else ""), hint if close else add)


def config_roots(ssh_config: str | None, home: str | None = None) -> list[tuple[Path, bool]]:
    """Return the files ssh starts from, each with whether it is a user's config (relative Includes are then under
    ~/.ssh): the -F file, else the user's ~/.ssh/config and the system's /etc/ssh/ssh_config."""
    if ssh_config:
        return [(Path(ssh_config), True)]
    return [(Path(home or local_home()) / ".ssh" / "config", True), (SYSTEM_CONFIG, False)]


def config_files(ssh_config: str | None, home: str | None = None) -> list[Path]:
    """Return the ssh_config files ssh reads (the -F file, else the user's and the system's), with Includes."""
    seen: list[Path] = []
    for root, user_config in config_roots(ssh_config, home):
        _collect_includes(root, user_config, seen, home or local_home(), depth=0)
    return seen


def describe_sources(ssh_config: str | None, home: str | None = None) -> str:
    """Name the ssh_config files ssh reads, as `~/.ssh/config (does not exist), /etc/ssh/ssh_config`."""
    home = home or local_home()

    def shown(path: Path) -> str:
        text = str(path)
        return "~" + text[len(home) :] if text.startswith(home.rstrip("/") + "/") else text

    parts: list[str] = []
    for root, user_config in config_roots(ssh_config, home):
        read: list[Path] = []
        _collect_includes(root, user_config, read, home, depth=0)
        parts += [shown(path) for path in read] or [f"{shown(root)} (does not exist)"]
    return ", ".join(dict.fromkeys(parts))


def _collect_includes(path: Path, user_config: bool, seen: list[Path], home: str, depth: int) -> None:
    if depth > 16 or path in seen or not path.is_file():
        return
    seen.append(path)
    base = Path(home) / ".ssh" if user_config else SYSTEM_CONFIG.parent
    for keyword, words in _config_lines(path):
        if keyword == "include":
            for pattern in words:
                expanded = home + pattern[1:] if pattern.startswith("~/") else pattern
                full = expanded if os.path.isabs(expanded) else str(base / expanded)
                for match in sorted(glob.glob(full)):
                    _collect_includes(Path(match), user_config, seen, home, depth + 1)


def _config_lines(path: Path) -> Iterable[tuple[str, list[str]]]:
    """Yield (keyword, words) of every line as ssh splits it; a line ssh refuses is skipped (ssh -G reports it)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return
    for line in text.splitlines():
        keyword, rest = split_keyword(line)
        try:
            words = split_words(rest) if keyword else []
        except LineError:
            continue
        if words:
            yield keyword, words


def host_lines(files: Sequence[Path]) -> list[list[str]]:
    """Return the pattern lists of every `Host` line (and `Match [original]host`) in `files`."""
    found = []
    for path in files:
        for keyword, words in _config_lines(path):
            if keyword == "host":
                found.append(words)
            elif keyword == "match":
                found += [words[i + 1].split(",") for i, w in enumerate(words[:-1]) if w.lower() in _MATCH_HOST]
    return found


def literal_hosts(lines: Sequence[Sequence[str]]) -> list[str]:
    """Return the host names the Host lines spell out (no `*`, `?` or `!`), in the config's order."""
    names: list[str] = []
    for patterns in lines:
        names += [p for p in patterns if not any(c in p for c in "*?!") and p not in names]
    return names


def list_hosts(ssh_config: str | None = None) -> tuple[list[TunnelSpec], list[str]]:
    """Return the specs of every literally named host in the ssh_config that has forwards, and why others
    were skipped: an alias tunneld cannot use as a file name is skipped, never a reason to fail them all."""
    names = literal_hosts(host_lines(config_files(ssh_config)))
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
