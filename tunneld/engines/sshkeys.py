"""Host keys and authentication the way OpenSSH does them, for the paramiko engine."""

from __future__ import annotations

import base64
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import paramiko

from tunneld.config.spec import TunnelSpec
from tunneld.engines.knownhosts import evaluate, hash_name, known_types
from tunneld.errors import AuthError, ConnectError, HostKeyError
from tunneld.safetext import quote_peer

log = logging.getLogger(__name__)


def _files(names: tuple[str, ...]) -> list[Path]:
    return [Path(os.path.expanduser(n)) for n in names if n.lower() != "none"]


def _known_files(spec: TunnelSpec) -> list[Path]:
    return _files(spec.user_known_hosts_files) + _files(spec.global_known_hosts_files)


def verify_host_key(spec: TunnelSpec, key: paramiko.PKey) -> None:
    """Accept the server's key only as OpenSSH would: known, or new under accept-new/no; never changed or revoked.

    `StrictHostKeyChecking no` lets a *new* key in; a changed or revoked one is refused whatever
    the policy (OpenSSH disables forwarding for it, which for a tunnel is the same refusal).
    """
    name = spec.known_hosts_name
    verdict = evaluate(name, key.get_name(), key.asbytes(), _known_files(spec))
    if verdict.revoked_in:
        raise HostKeyError.revoked(spec.hostname, _fp(key), verdict.revoked_in)
    if verdict.matches:
        return
    if verdict.changed_in:
        raise HostKeyError.changed(spec.hostname, spec.ssh_command, spec.remove_key_command, f" ({verdict.changed_in})")
    if verdict.other_types:
        raise HostKeyError(
            f"{spec.hostname} offered a {key.get_name()} host key, but known_hosts holds only "
            f"{', '.join(verdict.other_types)} for {name}",
            f"connect once with `{spec.ssh_command}` to check and save the new key type",
        )
    if verdict.cert_authority_in:
        raise HostKeyError(
            f"{name} is vouched for by a @cert-authority line ({verdict.cert_authority_in}); "
            "the paramiko engine cannot verify host certificates",
            'use --engine openssh for this host (or engine = "openssh" under [hosts.NAME] in tunneld.toml)',
        )
    if spec.strict_host_key_checking not in ("accept-new", "no"):
        raise HostKeyError.unknown(spec.hostname, spec.ssh_command)
    undecidable = _undecidable(spec)
    if undecidable:
        raise HostKeyError(
            f"the host key of {spec.hostname} is not in known_hosts, and your ssh_config sets {undecidable}, "
            "which the paramiko engine cannot evaluate: it will not trust a key on first use",
            f"use --engine openssh, or connect once with `{spec.ssh_command}` to save the key",
        )
    _remember(spec, name, key)


def _undecidable(spec: TunnelSpec) -> str | None:
    """Return the ssh_config option that decides host keys in a way this engine cannot follow, if set."""
    command = spec.option("knownhostscommand", "none")
    if command.lower() != "none":
        return f"KnownHostsCommand {command}"
    if spec.option("verifyhostkeydns", "no").lower() in ("yes", "true", "ask"):
        return "VerifyHostKeyDNS yes"
    return None


def _remember(spec: TunnelSpec, name: str, key: paramiko.PKey) -> None:
    files = _files(spec.user_known_hosts_files)
    if not files:
        log.warning("%s: accepted new host key %s (UserKnownHostsFile none: not saved)", spec.alias, _fp(key))
        return
    path = files[0]
    hashed = spec.option("hashknownhosts", "no") in ("yes", "true")
    shown = hash_name(name) if hashed else name
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(f"{shown} {key.get_name()} {key.get_base64()}\n")
    log.warning("%s: added the new host key %s of %s to %s", spec.alias, _fp(key), name, path)


def _fp(key: paramiko.PKey) -> str:
    digest = key.fingerprint if hasattr(key, "fingerprint") else key.get_base64()[:16]
    return str(digest)


def preferred_key_types(spec: TunnelSpec, offered: tuple[str, ...]) -> tuple[str, ...]:
    """Put the key types known_hosts holds for this host first, as OpenSSH does."""
    known = known_types(spec.known_hosts_name, _known_files(spec))
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
            raise ConnectError(
                f"{spec.hostname}: connection lost during authentication: {quote_peer(str(exc))}"
            ) from exc
        if transport.is_authenticated():
            return
    where = f"{spec.user}@{spec.hostname}:{spec.port}"
    if locked:
        raise AuthError.locked_keys(where, spec.ssh_command, locked)
    detail = f"Permission denied (publickey) after {offered} key(s)"
    raise AuthError.refused(where, spec.ssh_command, detail, missing=spec.missing_identity_files())
