"""Host keys and authentication the way OpenSSH does them, for the paramiko engine."""

from __future__ import annotations

import base64
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko

from tunneld.config import TunnelSpec
from tunneld.errors import AuthError, ConnectError, HostKeyError

log = logging.getLogger(__name__)


def _files(names: tuple[str, ...]) -> list[Path]:
    return [Path(os.path.expanduser(n)) for n in names if n.lower() != "none"]


@dataclass(frozen=True)
class KnownKeys:
    """What the known_hosts files say about one host name."""

    name: str
    matches: bool
    changed_in: str | None
    types: tuple[str, ...]


def lookup_known(spec: TunnelSpec, key: paramiko.PKey | None = None) -> KnownKeys:
    """Look the host up in the user's and the global known_hosts files (hashed entries included)."""
    name = spec.known_hosts_name
    types: list[str] = []
    changed_in = None
    for path in _files(spec.user_known_hosts_files) + _files(spec.global_known_hosts_files):
        if not path.is_file():
            continue
        try:
            entries = paramiko.HostKeys(str(path)).lookup(name)
        except (OSError, paramiko.SSHException) as exc:
            log.warning("%s: cannot read %s: %s", spec.alias, path, exc)
            continue
        if not entries:
            continue
        types += [t for t in entries if t not in types]
        if key is not None and key.get_name() in entries:
            if entries[key.get_name()].asbytes() == key.asbytes():
                return KnownKeys(name, True, None, tuple(types))
            changed_in = changed_in or str(path)
    return KnownKeys(name, False, changed_in, tuple(types))


def verify_host_key(spec: TunnelSpec, key: paramiko.PKey) -> None:
    """Accept the server's key only as OpenSSH would: known, or new under accept-new/no; never changed."""
    known = lookup_known(spec, key)
    if known.matches:
        return
    if known.changed_in:
        raise HostKeyError.changed(spec.hostname, spec.alias, known.name, f" ({known.changed_in})")
    if known.types:
        raise HostKeyError(
            f"{spec.hostname} offered a {key.get_name()} host key, but known_hosts holds only "
            f"{', '.join(known.types)} for {known.name}",
            f"connect once with `ssh {spec.alias}` to check and save the new key type",
        )
    if spec.strict_host_key_checking not in ("accept-new", "no"):
        raise HostKeyError.unknown(spec.hostname, spec.alias)
    _remember(spec, known.name, key)


def _remember(spec: TunnelSpec, name: str, key: paramiko.PKey) -> None:
    files = _files(spec.user_known_hosts_files)
    if not files:
        log.warning("%s: accepted new host key %s (UserKnownHostsFile none: not saved)", spec.alias, _fp(key))
        return
    path = files[0]
    hashed = dict(spec.options).get("hashknownhosts", "no") in ("yes", "true")
    shown = paramiko.HostKeys.hash_host(name) if hashed else name
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(f"{shown} {key.get_name()} {key.get_base64()}\n")
    log.warning("%s: added the new host key %s of %s to %s", spec.alias, _fp(key), name, path)


def _fp(key: paramiko.PKey) -> str:
    digest = key.fingerprint if hasattr(key, "fingerprint") else key.get_base64()[:16]
    return str(digest)


def preferred_key_types(spec: TunnelSpec, offered: tuple[str, ...]) -> tuple[str, ...]:
    """Put the key types known_hosts holds for this host first, as OpenSSH does."""
    known = lookup_known(spec).types
    expanded = [t for k in known for t in (("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa") if k == "ssh-rsa" else (k,))]
    first = [t for t in offered if t in expanded]
    return tuple(first + [t for t in offered if t not in first])


class _SocketAgent(paramiko.agent.AgentSSH):
    """An ssh-agent at an explicit socket path (IdentityAgent)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        self._connect(sock)  # type: ignore[attr-defined]  # AgentSSH's own way in; public Agent reads only env


def agent_keys(spec: TunnelSpec) -> list[paramiko.PKey]:
    """Return the keys ssh-agent offers (IdentityAgent, else SSH_AUTH_SOCK); none when there is no agent."""
    setting = spec.identity_agent
    if setting is not None and setting.lower() == "none":
        return []
    path = os.environ.get("SSH_AUTH_SOCK") if setting in (None, "SSH_AUTH_SOCK") else setting
    if not path:
        return []
    try:
        return list(_SocketAgent(path).get_keys())
    except (OSError, paramiko.SSHException) as exc:
        log.warning("%s: cannot use ssh-agent at %s: %s", spec.alias, path, exc)
        return []


def _public_blob(path: str) -> bytes | None:
    try:
        parts = Path(f"{path}.pub").read_text().split()
        return base64.b64decode(parts[1])
    except (OSError, IndexError, ValueError):
        return None


def _file_keys(spec: TunnelSpec, locked: list[str]) -> Iterator[paramiko.PKey]:
    """Yield each IdentityFile's key, its certificate first when one sits next to it."""
    for path in spec.identity_files:
        if not Path(path).is_file():
            continue
        certs = [c for c in (*spec.certificate_files, f"{path}-cert.pub") if Path(c).is_file()]
        for cert in [*certs[:1], None]:
            try:
                key = paramiko.PKey.from_path(path)
            except (paramiko.PasswordRequiredException, TypeError):
                # cryptography raises TypeError for an encrypted OpenSSH-format key loaded without a passphrase.
                locked.append(path)
                break
            except (OSError, paramiko.SSHException, ValueError) as exc:
                log.warning("%s: cannot load %s: %s", spec.alias, path, exc)
                break
            if cert is not None:
                try:
                    key.load_certificate(cert)
                except (OSError, ValueError, paramiko.SSHException) as exc:
                    log.warning("%s: cannot use certificate %s: %s", spec.alias, cert, exc)
                    continue
            yield key


def authenticate(transport: paramiko.Transport, spec: TunnelSpec) -> None:
    """Try agent keys, then IdentityFiles (honouring IdentitiesOnly), as OpenSSH orders them; never prompt."""
    from_agent = agent_keys(spec)
    if spec.identities_only:
        wanted = {blob for blob in (_public_blob(p) for p in spec.identity_files) if blob}
        from_agent = [k for k in from_agent if k.asbytes() in wanted]
    locked: list[str] = []
    offered = 0
    for key in [*from_agent, *_file_keys(spec, locked)]:
        offered += 1
        try:
            transport.auth_publickey(spec.user, key)
        except paramiko.AuthenticationException:
            continue
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectError(f"{spec.hostname}: connection lost during authentication: {exc}") from exc
        if transport.is_authenticated():
            return
    where = f"{spec.user}@{spec.hostname}:{spec.port}"
    if locked:
        detail = f"{', '.join(locked)} needs a passphrase and no agent holds it"
        raise AuthError.refused(where, spec.alias, detail, locked[0])
    raise AuthError.refused(where, spec.alias, f"Permission denied (publickey) after {offered} key(s)")
