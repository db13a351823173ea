"""What a running tunnel was configured with, and how the configuration on disk differs from it.

The supervisor records a summary of its host's ssh_config resolution and tunneld.toml section in the state
file; `start` of a running host, `status` and `reload` compare it with what the files say now, and name
each difference the way the config spells it (`LocalForward 5000 localhost:5000 -> 5001 localhost:5000`).
"""

from __future__ import annotations

from tunneld.config.settings import HostSettings
from tunneld.config.spec import DYNAMIC, LOCAL, REMOTE, TunnelSpec

Summary = dict[str, list[str]]

# What only a new link applies (the OpenSSH engine reconnects for forwards too); the rest applies in place.
CONNECTION_KEYS = ("HostName", "Port", "User", "ProxyJump", "ProxyCommand", "IdentityFile", "CertificateFile",
                   "IdentitiesOnly", "IdentityAgent", "HostKeyAlias", "StrictHostKeyChecking", "UserKnownHostsFile",
                   "ServerAlive", "ConnectTimeout")  # fmt: skip
FORWARD_KEYS = ("LocalForward", "RemoteForward", "DynamicForward")
RESTART_KEYS = ("engine", "on_demand")  # tunneld.toml settings that choose the engine: they apply at a restart


def summary(spec: TunnelSpec, settings: HostSettings) -> Summary:
    """Return what the tunnel runs with, as `keyword: [values]` (ssh_config keywords, tunneld.toml keys)."""
    data: Summary = {
        "HostName": [spec.hostname],
        "Port": [str(spec.port)],
        "User": [spec.user],
        "ProxyJump": [spec.proxy_jump] if spec.proxy_jump else [],
        "ProxyCommand": [spec.proxy_command] if spec.proxy_command else [],
        "IdentityFile": list(spec.identity_files),
        "CertificateFile": list(spec.certificate_files),
        "IdentitiesOnly": ["yes" if spec.identities_only else "no"],
        "IdentityAgent": [spec.identity_agent] if spec.identity_agent else [],
        "HostKeyAlias": [spec.host_key_alias] if spec.host_key_alias else [],
        "StrictHostKeyChecking": [spec.strict_host_key_checking],
        "UserKnownHostsFile": list(spec.user_known_hosts_files),
        "ServerAlive": [f"{spec.keepalive_interval_s}s x {spec.keepalive_count_max}"],
        "ConnectTimeout": [str(spec.connect_timeout_s)],
    }
    for key, kind in (("LocalForward", LOCAL), ("RemoteForward", REMOTE), ("DynamicForward", DYNAMIC)):
        data[key] = [_forward_words(f.listen, f.target) for f in spec.forwards if f.kind == kind]
    data["engine"] = [settings.engine]
    data["on_demand"] = [str(settings.on_demand).lower()]
    data["idle_timeout_s"] = [f"{settings.idle_timeout_s:g}"]
    data["hold_connections_s"] = [f"{settings.hold_connections_s:g}"]
    data["health_interval_s"] = [f"{settings.health_interval_s:g}"]
    data["health"] = [f"{key} = {check}" for key, check in settings.health]
    data["notify"] = ["default" if settings.notify is None else str(settings.notify).lower()]
    data["notify_after_s"] = [f"{settings.notify_after_s:g}"]
    data["env"] = [f"{name} = {value}" for name, value in settings.env]
    return data


def _forward_words(listen: object, target: object | None) -> str:
    return f"{listen} {target}" if target is not None else str(listen)


def differences(running: Summary, now: Summary) -> list[str]:
    """Name each difference between what runs and what the files say now: `KEY OLD -> NEW`."""
    found = []
    for key in dict.fromkeys([*running, *now]):
        old, new = running.get(key, []), now.get(key, [])
        if old == new:
            continue
        if key in FORWARD_KEYS and old and new and len(old) == len(new):
            found += [f"{key} {a} -> {b}" for a, b in zip(old, new, strict=True) if a != b]
            continue
        removed, added = [v for v in old if v not in new], [v for v in new if v not in old]
        if key in FORWARD_KEYS or key in ("IdentityFile", "health", "env"):
            found += [f"{key} {value} removed" for value in removed] + [f"{key} {value} added" for value in added]
        else:
            found.append(f"{key} {' '.join(old) or '(none)'} -> {' '.join(new) or '(none)'}")
    return found


def kind_of_change(running: Summary, now: Summary) -> str:
    """Return how a reload applies the change: "none", "settings" (in place), "forwards" (listeners, or a new
    link for the OpenSSH engine), "connection" (a new link) or "restart" (the engine changes: restart)."""
    changed = {key for key in dict.fromkeys([*running, *now]) if running.get(key, []) != now.get(key, [])}
    if not changed:
        return "none"
    if changed & set(RESTART_KEYS):
        return "restart"
    if changed & set(CONNECTION_KEYS):
        return "connection"
    if changed & set(FORWARD_KEYS):
        return "forwards"
    return "settings"


def parse_summary(value: object) -> Summary | None:
    """Read a summary back from a state file (None when it is missing or not a summary)."""
    if not isinstance(value, dict):
        return None
    out: Summary = {}
    for key, values in value.items():
        if not isinstance(key, str) or not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            return None
        out[key] = list(values)
    return out
