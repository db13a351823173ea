"""Which algorithms an SSH client may offer: OpenSSH's defaults, or what ssh_config's Ciphers, MACs,
KexAlgorithms and HostKeyAlgorithms say (with their `+`, `-` and `^` forms)."""

from __future__ import annotations

import functools
import subprocess

from tunneld.config.resolve import ssh_binary
from tunneld.config.spec import TunnelSpec
from tunneld.engines.knownhosts import match_pattern

# OpenSSH 9.2's client defaults (`ssh -G -F /dev/null x`), used only when there is no ssh binary to ask.
OPENSSH_DEFAULTS = {
    "ciphers": "chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr,aes128-gcm@openssh.com,"
    "aes256-gcm@openssh.com",
    "macs": "umac-64-etm@openssh.com,umac-128-etm@openssh.com,hmac-sha2-256-etm@openssh.com,"
    "hmac-sha2-512-etm@openssh.com,hmac-sha1-etm@openssh.com,umac-64@openssh.com,umac-128@openssh.com,"
    "hmac-sha2-256,hmac-sha2-512,hmac-sha1",
    "kexalgorithms": "sntrup761x25519-sha512,sntrup761x25519-sha512@openssh.com,curve25519-sha256,"
    "curve25519-sha256@libssh.org,ecdh-sha2-nistp256,ecdh-sha2-nistp384,ecdh-sha2-nistp521,"
    "diffie-hellman-group-exchange-sha256,diffie-hellman-group16-sha512,diffie-hellman-group18-sha512,"
    "diffie-hellman-group14-sha256",
    "hostkeyalgorithms": "ssh-ed25519-cert-v01@openssh.com,ecdsa-sha2-nistp256-cert-v01@openssh.com,"
    "ecdsa-sha2-nistp384-cert-v01@openssh.com,ecdsa-sha2-nistp521-cert-v01@openssh.com,"
    "sk-ssh-ed25519-cert-v01@openssh.com,sk-ecdsa-sha2-nistp256-cert-v01@openssh.com,"
    "rsa-sha2-512-cert-v01@openssh.com,rsa-sha2-256-cert-v01@openssh.com,ssh-ed25519,ecdsa-sha2-nistp256,"
    "ecdsa-sha2-nistp384,ecdsa-sha2-nistp521,sk-ssh-ed25519@openssh.com,sk-ecdsa-sha2-nistp256@openssh.com,"
    "rsa-sha2-512,rsa-sha2-256",
}
KINDS = tuple(OPENSSH_DEFAULTS)


@functools.lru_cache(maxsize=1)
def openssh_defaults() -> dict[str, str]:
    """Return this machine's OpenSSH client defaults (no config file read); the table above without ssh."""
    ssh = ssh_binary()
    if ssh is None:
        return dict(OPENSSH_DEFAULTS)
    done = subprocess.run(
        [ssh, "-G", "-F", "/dev/null", "tunneld-defaults"], capture_output=True, text=True, check=False, timeout=10
    )
    found = dict(OPENSSH_DEFAULTS)
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key in found and value:
            found[key] = value
    return found


def apply_spec(default: str, value: str) -> tuple[str, ...]:
    """Apply an ssh_config algorithm list to `default`: `+` appends, `-` removes (patterns), `^` puts first."""
    base = [a for a in default.split(",") if a]
    if not value:
        return tuple(base)
    items = [a for a in value[1:].split(",") if a] if value[0] in "+-^" else [a for a in value.split(",") if a]
    if value[0] == "+":
        return tuple(base + [a for a in items if a not in base])
    if value[0] == "-":
        return tuple(a for a in base if not any(match_pattern(a, p) for p in items))
    if value[0] == "^":
        return tuple(items + [a for a in base if a not in items])
    return tuple(items)


def allowed(spec: TunnelSpec, kind: str) -> tuple[str, ...]:
    """Return the algorithms of `kind` (ciphers, macs, kexalgorithms, hostkeyalgorithms) ssh would offer."""
    value = spec.option(kind)
    if spec.resolver == "ssh -G" and value:
        return tuple(a for a in value.split(",") if a)  # ssh -G prints the list with +/-/^ already applied
    return apply_spec(openssh_defaults()[kind], value)


def user_set(spec: TunnelSpec, kind: str) -> bool:
    """Return True when ssh_config changed the list from OpenSSH's default."""
    return allowed(spec, kind) != apply_spec(openssh_defaults()[kind], "")
