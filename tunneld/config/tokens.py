"""ssh's `~` and `%` tokens, expanded as ssh expands IdentityFile, IdentityAgent and ProxyCommand."""

from __future__ import annotations

import getpass
import os
import pwd
import re
import socket

from tunneld.errors import ConfigError
from tunneld.state.paths import local_home


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


def expand_proxy_command(command: str, tokens: dict[str, str]) -> str:
    """Expand what ssh expands in a ProxyCommand before running it (%%, %h, %n, %p, %r); leave anything else."""
    return re.sub(r"%([%hnpr])", lambda match: tokens[match[1]], command)


def expand_path(value: str, tokens: dict[str, str], tilde: bool = True) -> str:
    """Expand `~` (unless `tilde` is False), `%x` and `${VAR}` as ssh expands ControlPath, IdentityAgent and
    UserKnownHostsFile (and the socket paths of forwards, without `~`)."""

    def variable(match: re.Match[str]) -> str:
        if match[1] not in os.environ:
            raise ConfigError(f"env var ${{{match[1]}}} has no value (in {value!r})")
        return os.environ[match[1]]

    head = "~" if not tilde and value.startswith("~") else ""
    return head + re.sub(r"\$\{(\w+)\}", variable, expand_tokens(value[len(head) :], tokens))


def local_user() -> str:
    """Return the local user name as ssh knows it (%u, the default User): the passwd entry's, not $USER."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return getpass.getuser()


def token_table(alias: str, hostname: str, port: int, user: str) -> dict[str, str]:
    """Return the values of ssh's `%` tokens for one connection."""
    local_host = socket.gethostname()
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
        "u": local_user(),
    }


def connection_hash(tokens: dict[str, str]) -> str:
    """Return ssh's %C: SHA-1 of %l%h%p%r (hashlib is imported here: loading OpenSSL costs ~4 MiB of RSS)."""
    import hashlib

    material = tokens["l"] + tokens["h"] + tokens["p"] + tokens["r"]
    return hashlib.sha1(material.encode()).hexdigest()  # noqa: S324 - ssh's own hash, not security
