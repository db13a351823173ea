"""Where an ssh-agent will be at the next login, for `autostart enable`; and which one a service reaches now, with
the keys it holds, for `autostart status`.

A service started at login does not see the SSH_AUTH_SOCK of the shell that ran `enable`: ssh-agent's own
`/tmp/ssh-XXXX/agent.N` is gone at the next login. Stable places are the host's IdentityAgent, the systemd
user manager's environment, and the sockets desktop and distribution agents keep under $XDG_RUNTIME_DIR.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tunneld.autostart.service import NO_BUS, LoginAgent, Runner, no_user_manager
from tunneld.config.keys import AgentProbe, keys_held, named_identity_files, probe_agent, usable_without_agent
from tunneld.config.spec import TunnelSpec
from tunneld.safetext import printable

# Sockets that agents started with a session keep under $XDG_RUNTIME_DIR, and who ships them.
WELL_KNOWN_SOCKETS = (
    ("gcr/ssh", "GNOME's gcr-ssh-agent (gcr-ssh-agent.socket)"),
    ("keyring/ssh", "gnome-keyring's ssh agent"),
    ("ssh-agent.socket", "the ssh-agent user unit of Arch and Fedora"),
    ("openssh_agent", "Debian's ssh-agent user unit"),
    ("gnupg/S.gpg-agent.ssh", "gpg-agent's ssh support (gpg-agent-ssh.socket)"),
)
LAUNCHD_AGENT = Path("/System/Library/LaunchAgents/com.openssh.ssh-agent.plist")
# ssh-agent's default socket ($TMPDIR/ssh-XXXXXXXXXX/agent.PPID, also sshd's forwarded agent), launchd's per-login one
_EPHEMERAL_RE = re.compile(r"/ssh-[^/]+/agent\.\d+$|/com\.apple\.launchd\.[^/]+/")
_UNIT_RE = re.compile(r"[A-Za-z0-9:_.\\@-]+\.(socket|service)")


@dataclass(frozen=True)
class AgentFinding:
    """What `enable` found: the agent to wire (or None), what to tell the user, and what to warn about."""

    agent: LoginAgent | None
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def is_ephemeral(path: str) -> bool:
    """Return True for an agent socket that belongs to one shell or one login and will not exist at the next."""
    return bool(_EPHEMERAL_RE.search(path))


def runtime_dir(environ: Mapping[str, str]) -> str:
    """Return $XDG_RUNTIME_DIR (systemd's %t), /run/user/UID when unset."""
    return environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def manager_environment(runner: Runner) -> dict[str, str]:
    """Return the systemd user manager's environment (`systemctl --user show-environment`)."""
    out = runner.check(["systemctl", "--user", "show-environment"]).output
    environment = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep and value.startswith("$'"):
            value = _unquote(value)
        if sep:
            environment[key] = value
    return environment


def _unquote(value: str) -> str:
    """Undo systemctl's $'...' quoting of a value with special characters (the escapes it writes)."""
    try:
        return shlex.split(value[1:].encode().decode("unicode_escape"))[0]
    except (ValueError, IndexError, UnicodeDecodeError):
        return value


def _identity_agent(spec: TunnelSpec, environ: Mapping[str, str]) -> str | None:
    """Return the agent socket ssh_config's IdentityAgent names ('none' for none), None when it defers to the env."""
    setting = spec.identity_agent
    if setting is None or setting == "SSH_AUTH_SOCK":
        return None
    if setting.lower() == "none":
        return "none"
    if setting.startswith("$") and not setting.startswith("${"):
        return environ.get(setting[1:], "")
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: environ.get(m[1], ""), setting)


def find_login_agent(spec: TunnelSpec, via: str, runner: Runner, environ: Mapping[str, str]) -> AgentFinding:
    """Find the agent `spec`'s host will reach when the service manager `via` starts it at login."""
    named = _identity_agent(spec, environ)
    if named == "none":
        return _without_agent(spec, "ssh_config says IdentityAgent none for it")
    if named is not None and is_ephemeral(named):
        return _without_agent(spec, f"ssh_config's IdentityAgent {printable(named)} will not exist at the next login")
    if named is not None:
        return _finding(spec, LoginAgent(named, None, f"ssh_config's IdentityAgent {named}"), probe_agent(named), [])
    candidates: list[tuple[str, str]] = []
    reasons: list[str] = []
    shell = environ.get("SSH_AUTH_SOCK", "")
    launchd_socket = via == "launchd" and "/com.apple.launchd." in shell  # launchd gives it anew at every login
    if shell and is_ephemeral(shell) and not launchd_socket:
        reasons.append(f"this shell's agent (SSH_AUTH_SOCK={printable(shell)}) will not exist at the next login")
    elif shell and not launchd_socket:
        candidates.append((shell, "this shell's SSH_AUTH_SOCK"))
    if via != "launchd":
        candidates += _systemd_candidates(runner, environ, reasons)
    chosen, probe = _best(spec, candidates)
    if chosen is None and via == "launchd" and LAUNCHD_AGENT.exists():
        given = LoginAgent(shell if launchd_socket else "", None, "launchd's ssh-agent, given to every LaunchAgent")
        return _finding(spec, given, probe_agent(shell) if launchd_socket else None, [])
    if chosen is None:
        if via == "launchd":
            reasons.append(f"{LAUNCHD_AGENT} is missing")
        return _finding(spec, None, None, reasons)
    path, who = chosen
    agent = _wired(path, who, runner, environ) if via == "systemd" else LoginAgent(path, path, who)
    return _finding(spec, agent, probe, reasons)


def _systemd_candidates(runner: Runner, environ: Mapping[str, str], reasons: list[str]) -> list[tuple[str, str]]:
    """Return the user manager's SSH_AUTH_SOCK and the well-known agent sockets of the runtime directory."""
    candidates = []
    manager = manager_environment(runner).get("SSH_AUTH_SOCK", "")
    if manager and not is_ephemeral(manager):
        candidates.append((manager, "the systemd user manager's environment"))
    elif manager:
        reasons.append(f"the systemd user manager's SSH_AUTH_SOCK ({printable(manager)}) is temporary")
    else:
        reasons.append("the systemd user manager's environment has no SSH_AUTH_SOCK")
    runtime = runtime_dir(environ)
    found = [
        (os.path.join(runtime, rel), who) for rel, who in WELL_KNOWN_SOCKETS if _is_socket(os.path.join(runtime, rel))
    ]
    if not found:
        reasons.append(
            f"no agent socket is in {printable(runtime)} ({', '.join(rel for rel, _ in WELL_KNOWN_SOCKETS)})"
        )
    return candidates + found


def _best(spec: TunnelSpec, candidates: Sequence[tuple[str, str]]) -> tuple[tuple[str, str] | None, AgentProbe | None]:
    """Return the first candidate whose agent holds a key for the host, else the first that answers at all."""
    seen: set[str] = set()
    reachable: list[tuple[tuple[str, str], AgentProbe]] = []
    for path, who in candidates:
        if os.path.realpath(path) in seen:
            continue
        seen.add(os.path.realpath(path))
        probe = probe_agent(path)
        if probe.reachable:
            reachable.append(((path, who), probe))
    for candidate, probe in reachable:
        if _holds_for(spec, probe):
            return candidate, probe
    return reachable[0] if reachable else (None, None)


def _holds_for(spec: TunnelSpec, probe: AgentProbe) -> bool:
    named = named_identity_files(spec)
    return bool(keys_held(probe, named)) if named else bool(probe.blobs)


def _wired(path: str, who: str, runner: Runner, environ: Mapping[str, str]) -> LoginAgent:
    """Return the agent with the unit setting (%t/... under the runtime directory) and the unit that provides it."""
    runtime = runtime_dir(environ)
    inside = os.path.commonpath([runtime, path]) == runtime if os.path.isabs(path) else False
    setting = f"%t/{os.path.relpath(path, runtime)}" if inside else path
    provider = _provider(path, runner)
    return LoginAgent(path, setting, who, after=provider[0] if provider else None, wants=bool(provider and provider[1]))


def _provider(path: str, runner: Runner) -> tuple[str, bool] | None:
    """Return the user unit that provides the agent socket at `path` (and whether it is a socket unit)."""
    sockets = runner.run(["systemctl", "--user", "show", "--property=Id,Listen", "*.socket"]).output
    for block in sockets.split("\n\n"):
        fields = [line.partition("=")[::2] for line in block.splitlines()]
        listens = [value.rsplit(" (", 1)[0] for key, value in fields if key == "Listen"]  # PATH (Stream)
        unit = next((value for key, value in fields if key == "Id"), "")
        if path in listens and _UNIT_RE.fullmatch(unit):
            return unit, True
    service = runner.run(
        ["systemctl", "--user", "show", "--property=LoadState,Environment,ExecStart", "ssh-agent.service"]
    ).output
    if "LoadState=loaded" in service.splitlines() and (
        f"SSH_AUTH_SOCK={path}" in service or (path.endswith("/openssh_agent") and "agent-launch" in service)
    ):
        return "ssh-agent.service", False
    return None


def _finding(spec: TunnelSpec, agent: LoginAgent | None, probe: AgentProbe | None, reasons: list[str]) -> AgentFinding:
    host = spec.alias
    if agent is None or (probe is not None and not probe.reachable):
        if probe is not None and probe.problem:
            reasons.append(f"{printable(probe.path)}: {probe.problem}")
        return _without_agent(spec, "; ".join(reasons) or "no agent was found", agent)
    notes = [f"agent at login: {printable(agent.setting or agent.path or 'SSH_AUTH_SOCK')} ({agent.source})"]
    warnings = []
    if probe is not None and not _holds_for(spec, probe) and usable_without_agent(spec) is None:
        named = named_identity_files(spec)
        key = named[0] if named else "~/.ssh/id_ed25519"
        warnings.append(
            f"the agent at login ({printable(agent.path)}) holds no key for {host} now ({describe(probe, spec)}): "
            f"add it with `SSH_AUTH_SOCK={shlex.quote(agent.path)} ssh-add {key}` (an agent forgets its keys at "
            "logout; `AddKeysToAgent yes` in ssh_config adds the key at your first ssh of a session)"
        )
    return AgentFinding(agent, tuple(notes), tuple(warnings))


def _without_agent(spec: TunnelSpec, why: str, agent: LoginAgent | None = None) -> AgentFinding:
    key = usable_without_agent(spec)
    if key is not None:
        return AgentFinding(agent, (f"no agent needed: {key} has no passphrase",))
    macos = sys.platform == "darwin"
    remedy = (
        "use launchd's ssh-agent (it is macOS's default; `ssh-add --apple-use-keychain KEY` keeps the key)"
        if macos
        else "run an agent that starts with your session (GNOME's gcr-ssh-agent.socket, "
        "`systemctl --user enable --now ssh-agent` on Arch and Fedora, gpg-agent with enable-ssh-support)"
    )
    return AgentFinding(
        agent,
        warnings=(
            f"no agent will be reachable at login: {why}; what to do: {remedy}, add the key with ssh-add, and "
            f"run `tunneld autostart enable {spec.alias}` again; or name the agent in ssh_config "
            "(IdentityAgent), or use a key without a passphrase",
        ),
    )


def describe(probe: AgentProbe, spec: TunnelSpec) -> str:
    """Say what the agent holds for the host: the named keys it has, else how many keys."""
    if not probe.reachable:
        return f"unreachable: {probe.problem}"
    named = named_identity_files(spec)
    held = keys_held(probe, named)
    if held:
        return f"holds the key {', '.join(held)}"
    count = f"{len(probe.blobs)} key{'' if len(probe.blobs) == 1 else 's'}"
    if named:
        return f"holds {count}, none of them {', '.join(named)}"
    return f"holds {count}"


def service_agent(spec: TunnelSpec, via: str, runner: Runner, unit: str | None) -> tuple[str | None, str]:
    """Return the agent socket the service reaches now and where that comes from (for `autostart status`)."""
    named = _identity_agent(spec, os.environ)
    if named == "none":
        return None, "ssh_config says IdentityAgent none"
    if named is not None:
        return named, "ssh_config's IdentityAgent"
    if via == "systemd" and unit is not None:
        shown = runner.run(["systemctl", "--user", "show", "--property=Environment", unit])
        if shown.returncode != 0 and NO_BUS in shown.output:
            raise no_user_manager(shown.output)
        words = shlex.split(shown.output.removeprefix("Environment="), posix=True) if shown.returncode == 0 else []
        value = next((w.split("=", 1)[1] for w in words if w.startswith("SSH_AUTH_SOCK=")), None)
        if value:
            return value, "the unit's environment"
        value = manager_environment(runner).get("SSH_AUTH_SOCK")
        return (value, "the systemd user manager's environment") if value else (None, "no SSH_AUTH_SOCK in systemd")
    shell = os.environ.get("SSH_AUTH_SOCK")
    if via == "xdg":
        return desktop_agent(shell)
    return (shell, "launchd's SSH_AUTH_SOCK") if shell else (None, f"no SSH_AUTH_SOCK here for {via}")


def desktop_agent(shell: str | None) -> tuple[str | None, str]:
    """Return what this shell knows of the agent an XDG autostart entry gets (the desktop session's) and whence:
    this shell's SSH_AUTH_SOCK when it may be that agent, None when it cannot be (none here, or a temporary
    `/tmp/ssh-*/agent.N`: ssh-agent's own or `ssh -A`'s, gone when this shell or login ends)."""
    if shell and not is_ephemeral(shell):
        return shell, "this shell's SSH_AUTH_SOCK: the desktop session's agent if this shell runs in that session"
    return None, "the desktop session's SSH_AUTH_SOCK, which this shell does not show"


def desktop_summary(shell: str | None) -> str:
    """Say why this shell cannot tell which agent an XDG autostart entry gets, and where to look."""
    mine = (
        f"this shell's SSH_AUTH_SOCK ({printable(shell)}) is its own and temporary"
        if shell
        else "this shell has no SSH_AUTH_SOCK"
    )
    return (
        f"unknown here: the entry runs in the desktop session and gets that session's agent; {mine}; "
        "`ssh-add -l` in a terminal of that session lists its keys"
    )


@dataclass(frozen=True)
class AgentReport:
    """Which agent the service manager reaches for a host, and whether it holds a key for it."""

    socket: str | None
    source: str
    reachable: bool
    keys: int
    holds: tuple[str, ...]
    summary: str
    warning: str | None = None

    def to_dict(self) -> dict[str, object]:
        """Return the report as JSON-ready data (without the warning, which `autostart status` lists apart)."""
        return {k: getattr(self, k) for k in ("socket", "source", "reachable", "keys", "holds", "summary")}


def agent_report(spec: TunnelSpec, via: str, runner: Runner, unit: str | None) -> AgentReport:
    """Ask the agent the service reaches for `spec`'s host (over its socket) which keys it holds."""
    socket, source = service_agent(spec, via, runner, unit)
    without = usable_without_agent(spec)
    if socket is None and via == "xdg":  # the desktop session's agent: not one this shell can ask
        summary = desktop_summary(os.environ.get("SSH_AUTH_SOCK")) + (
            f"; {without} has no passphrase" if without else ""
        )
        return AgentReport(None, source, False, 0, (), summary)
    if socket is None:
        summary = f"none ({source})" + (f"; {without} has no passphrase" if without else "")
        warning = None if without else f"{via} reaches no agent for {spec.alias} ({source})"
        return AgentReport(None, source, False, 0, (), summary, warning)
    probe = probe_agent(socket)
    held = keys_held(probe, named_identity_files(spec))
    summary = f"{printable(socket)} ({source}): {describe(probe, spec)}"
    warning = None
    shown = printable(socket)
    if without is None and not probe.reachable:
        where = (
            f"this shell's agent at {shown} does not answer"
            if via == "xdg"
            else f"{via} cannot reach the agent at {shown}"
        )
        warning = f"{where}: {probe.problem}"
    elif without is None and not _holds_for(spec, probe):
        named = named_identity_files(spec)
        whose = "this shell's agent" if via == "xdg" else f"the agent {via} reaches"  # xdg: the session's, maybe
        warning = (
            f"{whose} ({shown}) holds no key for {spec.alias}: "
            f"SSH_AUTH_SOCK={shlex.quote(socket)} ssh-add {named[0] if named else 'KEY'}"
        )
    return AgentReport(socket, source, probe.reachable, len(probe.blobs), held, summary, warning)
