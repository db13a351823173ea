"""Resolve a host with paramiko's SSHConfig where no `ssh` binary exists: less exact than `ssh -G`."""

from __future__ import annotations

import getpass
from pathlib import Path

from tunneld.errors import ConfigError

RESOLVER = "paramiko SSHConfig (no ssh binary on PATH)"
LIMITS = (
    "without an ssh binary tunneld reads ssh_config with paramiko, which does not know every keyword: "
    "Match exec/canonical/final, CanonicalizeHostname, most %-tokens outside HostName/IdentityFile/ProxyCommand, "
    "and OpenSSH's own error reports are not reproduced; install openssh-client for exact resolution"
)
# What `ssh -G` would print for options a config does not set (the parts tunneld reads).
_DEFAULTS = {
    "port": "22",
    "identityfile": ["~/.ssh/id_rsa", "~/.ssh/id_ecdsa", "~/.ssh/id_ed25519"],
    "userknownhostsfile": "~/.ssh/known_hosts ~/.ssh/known_hosts2",
    "globalknownhostsfile": "/etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2",
    "stricthostkeychecking": "ask",
    "serveraliveinterval": "0",
    "serveralivecountmax": "3",
}


def paramiko_pairs(alias: str, ssh_config: str | None, home: str) -> list[tuple[str, str]]:
    """Return `ssh -G`-like (keyword, value) lines for `alias`, read by paramiko's parser."""
    import paramiko

    path = Path(ssh_config) if ssh_config else Path(home) / ".ssh" / "config"
    if ssh_config and not path.is_file():
        raise ConfigError(f"cannot read ssh_config {path}: no such file")
    try:
        found = paramiko.SSHConfig.from_path(str(path)).lookup(alias) if path.is_file() else {}
    except (OSError, paramiko.ConfigParseError, ValueError) as exc:
        raise ConfigError(
            f"{path}: {exc}", "fix the file (paramiko's parser; install openssh-client for details)"
        ) from exc
    values: dict[str, object] = {**_DEFAULTS, "hostname": alias, "user": getpass.getuser(), **dict(found)}
    pairs: list[tuple[str, str]] = []
    for key, value in values.items():
        for item in value if isinstance(value, list) else [value]:
            text = str(item)
            if key in ("localforward", "remoteforward") and " " in text:
                listen, target = text.split(None, 1)
                text = f"{listen} {target.strip()}"
            pairs.append((key.lower(), text))
    return pairs
